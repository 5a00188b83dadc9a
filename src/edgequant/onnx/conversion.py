"""An ONNX file as a torch module the sim quantizes: onnx2torch's conversion, annotated with the user's graph.

onnx2torch turns every ONNX node into one module of an ``fx.GraphModule``. On top of it:

* the user's file is read once and never written; a copy is normalized for the converter (``Constant`` nodes and
  ``Identity`` nodes of initializers, which exporters emit for shared weights, become initializers);
* a node the converter cannot take is run by ONNX Runtime (`OnnxRuntimeNode`) and stays in float;
* every module records the node it computes (`OnnxNodeRef`) and its op type, so the hardware config applies by
  ONNX op type and the export finds each quantized tensor under its own name in the original graph;
* a ``MatMul`` by a 2-D initializer becomes an ``nn.Linear`` and a ``Gather`` from a 2-D table an ``nn.Embedding``,
  so their weights get weight quantizers (per channel where the config says so) instead of activation ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.numpy_helper
import torch
import torch.fx as fx
from onnx2torch import convert
from onnx2torch.node_converters import get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.utils.safe_shape_inference import safe_shape_inference
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from edgequant.onnx.converters import TORCH_DOMAIN  # importing it registers the op versions onnx2torch lacks
from edgequant.onnx.modules import FlattenToMatrix
from edgequant.onnx.reading import OnnxModelError, read_onnx
from edgequant.onnx.runtime_node import FALLBACK_DOMAIN, runtime_node_supported, wrap_for_onnxruntime, wrapped_node
from edgequant.sim.onnx_source import ONNX_NODE_ATTRIBUTE, ONNX_SOURCE_ATTRIBUTE, OnnxNodeRef, OnnxSource
from edgequant.sim.ops import DATA_MOVEMENT_OPS

PASS_THROUGH_OPS = DATA_MOVEMENT_OPS | {"Dropout"}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf files stop at 2 GiB: larger models keep their tensors beside them


def load_onnx(model: str | Path | onnx.ModelProto) -> fx.GraphModule:
    """The ONNX model ``model`` (a path or a loaded ``ModelProto``) as a torch module that `QuantSim` accepts.

    The result is in eval mode and carries the original graph (``.onnx_source``): a sim built on it exports into
    that graph, keeping every node, tensor name and initializer.
    """
    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    original, external = (model, False) if path is None else read_onnx(path)
    work = _conversion_copy(original)
    source = OnnxSource(original, path, external or tensor_bytes(original) > EXTERNAL_DATA_BYTES)
    graph = OnnxGraph(work.graph)
    opsets = {entry.domain: entry.version for entry in work.opset_import}
    for node in graph.nodes.values():
        if not _has_converter(node.proto, opsets):
            _run_in_onnxruntime(work, node.proto, opsets, source, "onnx2torch has no converter for this op")
    try:
        converted = convert(work, attach_onnx_mapping=True)
    except Exception:  # noqa: BLE001 - onnx2torch raises many kinds; find the node and route it to ONNX Runtime
        current = OnnxGraph(safe_shape_inference(work).graph)  # the value infos converters read, as convert's
        for node in current.nodes.values():
            reason = _conversion_failure(node, current, opsets)
            if reason is not None:
                _run_in_onnxruntime(work, node.proto, opsets, source, f"onnx2torch cannot convert it ({reason})")
        try:
            converted = convert(work, attach_onnx_mapping=True)
        except Exception as error:  # noqa: BLE001
            raise OnnxModelError(_where(path) + f"cannot be converted to torch ({_first_line(error)})") from None
    _annotate(converted, OnnxGraph(work.graph), _TensorTypes.of(work))
    setattr(converted, ONNX_SOURCE_ATTRIBUTE, source)
    # fx's deepcopy rebuilds a GraphModule from its graph and sets again only the attributes its meta lists: so a
    # copy (edgequant quantize's folded model, AutoQuant's stages, a user's own) stays a model of the ONNX file
    converted.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[ONNX_SOURCE_ATTRIBUTE] = source
    return converted.eval()  # an ONNX graph computes inference: BatchNorms use their running statistics


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of ``model``'s initializers held in the proto (protobuf files stop at 2 GiB)."""
    return sum(len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) for t in model.graph.initializer)


def _where(path: Path | None) -> str:
    return f"ONNX model {str(path)!r} " if path is not None else "the ONNX model "


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def _conversion_copy(original: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose constant-producing ``Constant``/``Identity`` nodes are initializers under their output names."""
    work = onnx.ModelProto()
    work.CopyFrom(original)
    constants = {initializer.name: initializer for initializer in work.graph.initializer}
    kept = []
    for node in work.graph.node:
        value = _constant_value(node, constants)
        if value is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        work.graph.initializer.append(tensor)
        constants[tensor.name] = tensor
    del work.graph.node[:]
    work.graph.node.extend(kept)
    for node in work.graph.node:
        _normalize_allowzero(node, constants)
    if any(node.domain == TORCH_DOMAIN for node in work.graph.node):
        work.opset_import.append(onnx.helper.make_opsetid(TORCH_DOMAIN, 1))
    return work


def _normalize_allowzero(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> None:
    """A Reshape's ``allowzero=1`` (torch's dynamo exporter sets it), which onnx2torch refuses: dropped where the
    shape is a constant without a 0 (it changes nothing there), else the node goes to `ReshapeAllowingZero`."""
    allowzero = [a for a in node.attribute if a.name == "allowzero" and a.i == 1]
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or not allowzero:
        return
    node.attribute.remove(allowzero[0])
    shape = constants.get(node.input[1])
    if shape is None or 0 in onnx.numpy_helper.to_array(shape).tolist():
        node.domain = TORCH_DOMAIN


def _constant_value(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Identity" and node.input[0] in constants:
        return constants[node.input[0]]
    if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
        return node.attribute[0].t
    return None


def _has_converter(node: onnx.NodeProto, opsets: dict[str, int]) -> bool:
    try:
        get_converter(domain=node.domain, operation_type=node.op_type, version=opsets.get(node.domain, 1))
    except NotImplementedError:
        return False
    return True


def _conversion_failure(node: object, graph: OnnxGraph, opsets: dict[str, int]) -> str | None:
    """Why onnx2torch's converter fails on ``node`` (an onnx2torch ``OnnxNode``), None where it converts."""
    proto = node.proto
    try:
        get_converter(domain=proto.domain, operation_type=proto.op_type, version=opsets.get(proto.domain, 1))(
            node, graph
        )
    except Exception as error:  # noqa: BLE001
        return _first_line(error)
    return None


def _run_in_onnxruntime(
    work: onnx.ModelProto, node: onnx.NodeProto, opsets: dict[str, int], source: OnnxSource, reason: str
) -> None:
    """Replace ``node`` in the conversion copy by its ONNX Runtime stand-in, or refuse in one line."""
    described = OnnxNodeRef(node.name, node.op_type, node.domain, (), ()).describe()
    if not runtime_node_supported(node):
        raise OnnxModelError(
            f"{described}: {reason}, and ONNX Runtime has no kernel for it either; register a converter with "
            "onnx2torch.node_converters.add_converter(operation_type=..., version=..., domain=...) before loading"
        )
    index = next(i for i, candidate in enumerate(work.graph.node) if list(candidate.output) == list(node.output))
    work.graph.node[index].CopyFrom(wrap_for_onnxruntime(node, opsets))
    if not any(entry.domain == FALLBACK_DOMAIN for entry in work.opset_import):
        work.opset_import.append(onnx.helper.make_opsetid(FALLBACK_DOMAIN, 1))
    source.float_nodes[node.name] = f"{reason}: run by ONNX Runtime in float"


ELEMENTWISE_FUNCTIONS = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "MatMul": torch.matmul}
"""Ops whose converted module computes exactly this function of its two float inputs (ONNX broadcasting is torch's)."""


@dataclass(frozen=True)
class _TensorTypes:
    """Element type and rank of the tensors shape inference types (none where it cannot run: models over 2 GB)."""

    float_tensors: frozenset[str]
    ranks: dict[str, int]

    @classmethod
    def of(cls, work: onnx.ModelProto) -> _TensorTypes:
        try:
            inferred = onnx.shape_inference.infer_shapes(work)
        except Exception:  # noqa: BLE001 - then no op is declared a plain torch function
            return cls(frozenset(), {})
        values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        floats = {v.name for v in values if v.type.tensor_type.elem_type in _FLOAT_TYPES}
        floats |= {i.name for i in inferred.graph.initializer if i.data_type in _FLOAT_TYPES}
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}
        return cls(frozenset(floats), ranks)


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _annotate(converted: fx.GraphModule, graph: OnnxGraph, types: _TensorTypes) -> None:
    """Give each converted module its `OnnxNodeRef` and op type; turn constant-weight MatMul/Gather into layers and
    declare the plain torch function of two-input arithmetic (the sim then quantizes it as it does ``x + y``)."""
    for fx_node in list(converted.graph.nodes):
        if fx_node.op != "call_module" or fx_node.target not in graph.nodes:
            continue
        onnx_node = graph.nodes[fx_node.target]
        module = getattr(converted, fx_node.target)
        proto = onnx_node.proto
        op_type = proto.op_type
        wrapped = proto.domain == FALLBACK_DOMAIN
        if wrapped:
            original = wrapped_node(proto)
            op_type, domain = original.op_type, original.domain
        else:
            domain = "" if proto.domain == TORCH_DOMAIN else proto.domain
        mapping = module.onnx_mapping
        del module.onnx_mapping
        replacement = _as_layer(converted, fx_node, op_type, mapping.inputs, types)
        if replacement is not None:
            module, inputs = replacement
        else:
            inputs = tuple(mapping.inputs)
        layer = _innermost_layer(module)
        ref = OnnxNodeRef(
            proto.name or fx_node.target, op_type, domain, inputs, tuple(mapping.outputs),
            *_parameter_sources(layer, proto, graph),
        )
        setattr(layer, ONNX_NODE_ATTRIBUTE, ref)
        if wrapped:
            continue
        if op_type in PASS_THROUGH_OPS:
            layer.holds_input_values = True
            continue
        layer.onnx_op_type = op_type
        function = ELEMENTWISE_FUNCTIONS.get(op_type)
        if (function is not None and replacement is None and len(inputs) == 2 and set(inputs) <= types.float_tensors
                and getattr(layer, "broadcast", None) != 1):
            layer.computes_function = function
        elif op_type == "Concat" and set(inputs) <= types.float_tensors:
            layer.computes_function, layer.packs_inputs = torch.cat, True
            layer.function_keywords = {"dim": layer.axis}
    converted.graph.eliminate_dead_code()
    converted.delete_all_unused_submodules()
    converted.recompile()


def _innermost_layer(module: nn.Module) -> nn.Module:
    """The layer that computes a node: onnx2torch puts an explicit pad before a Conv with asymmetric padding
    (``Sequential(pad, conv)``); the Conv's input quantizer then sees the node's input, padded with zeros."""
    if isinstance(module, nn.Sequential) and len(module) == 2:
        module[0].holds_input_values = True  # zeros around the input: on every grid, as the kernel pads
        return module[1]
    return module


def _as_layer(
    converted: fx.GraphModule, fx_node: fx.Node, op_type: str, node_inputs: tuple[str, ...], types: _TensorTypes
) -> tuple[nn.Module, tuple[str, ...]] | None:
    """Replace a MatMul by a 2-D constant with ``nn.Linear``, a Gather from a 2-D constant with ``nn.Embedding``;
    returns the new module and the node inputs its positional inputs hold."""
    module = getattr(converted, fx_node.target)
    args = fx_node.args
    if op_type == "MatMul" and len(args) == 2:
        weight = _constant(converted, args[1])
        if weight is None or weight.dim() != 2:
            return None
        layer = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        layer.weight = nn.Parameter(weight.t().contiguous())
        kept, inputs = (args[0],), (node_inputs[0],)
    elif op_type == "Flatten" and len(args) == 1:
        layer = FlattenToMatrix(getattr(module, "axis", getattr(module, "start_dim", 1)))
        kept, inputs = args, node_inputs
    elif op_type == "GlobalAveragePool" and len(args) == 1 and types.ranks.get(node_inputs[0]) == 4:
        layer = nn.AdaptiveAvgPool2d(1)  # the same mean over H and W; emulated as ORT's QLinearGlobalAveragePool
        kept, inputs = args, node_inputs
    elif op_type == "Gather" and len(args) == 2 and getattr(module, "axis", 0) == 0:
        table = _constant(converted, args[0])
        if table is None or table.dim() != 2:
            return None
        layer = nn.Embedding(table.shape[0], table.shape[1])
        layer.weight = nn.Parameter(table.clone())
        kept, inputs = (args[1],), (node_inputs[1],)
    else:
        return None
    setattr(converted, fx_node.target, layer)
    fx_node.args = kept
    return layer, inputs


def _constant(converted: fx.GraphModule, arg: object) -> torch.Tensor | None:
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = converted.get_submodule(arg.target.rpartition(".")[0]).get_buffer(arg.target.rpartition(".")[2])
    return value if value.is_floating_point() else None


def _parameter_sources(layer: nn.Module, proto: onnx.NodeProto, graph: OnnxGraph) -> tuple[dict[str, str], frozenset]:
    """Which node input each parameter of ``layer`` holds (by value: as stored, or transposed)."""
    params: dict[str, str] = {}
    transposed: set[str] = set()
    candidates = [name for name in proto.input if name in graph.initializers]
    for param_name, param in layer.named_parameters(recurse=False):
        for candidate in candidates:
            values = graph.initializers[candidate].to_torch()
            if values.shape == param.shape and torch.equal(values.to(param.dtype), param.detach()):
                params[param_name] = candidate
            elif param.dim() == 2 and values.shape == param.t().shape and torch.equal(values.to(param.dtype),
                                                                                       param.detach().t()):
                params[param_name] = candidate
                transposed.add(param_name)
            else:
                continue
            break
    return params, frozenset(transposed)
