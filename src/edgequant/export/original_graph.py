"""Export into the user's own ONNX graph: the sim of an ONNX model (`QuantSim.from_onnx`) maps every quantizer to a
tensor of the original graph by the node each layer was converted from, so Q/DQ go into that graph and the
encodings file uses its tensor names.

The float model written is the original graph with the sim's current weights (CLE, bias correction, AdaRound and
QAT change them) and, where the sim folded a BatchNormalization into the layer before it, without that node; every
other node, name, initializer and graph input/output is kept. Markers are inserted as `trace_sim` gets them from
torch's exporter, so the QDQ model, the encodings and the bias handling are the same code as for PyTorch models.
"""

from __future__ import annotations

import copy
import dataclasses
import heapq
from collections.abc import Container
from typing import TYPE_CHECKING, Any

import onnx
import torch
from onnx import helper, numpy_helper

from edgequant.export.graph_map import (
    INT4_INT16_OPSET,
    MARKER_DOMAIN,
    MARKER_OP,
    QuantSite,
    TracedSim,
    data_movement_propagation,
    required_opset,
    trace_sim,
)
from edgequant.export.qdq import AnyEncoding
from edgequant.quantization import FloatFormat, PerBlock, PerChannel, Quantizer
from edgequant.sim.onnx_source import ONNX_NODE_ATTRIBUTE, OnnxNodeRef, OnnxSource

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim


PER_CHANNEL_OPSET = 13  # first opset whose QuantizeLinear/DequantizeLinear take an axis


class OriginalGraphError(ValueError):
    """The sim no longer matches the ONNX graph it was converted from (the message says where)."""


@dataclasses.dataclass
class _Slot:
    """Where a quantizer acts: on ``tensor``, seen by the inputs of the node whose first output is ``node`` (None: by
    every reader of an output)."""

    tensor: str
    node: str | None


def trace_original_graph(
    sim: QuantSim, encodings: dict[str, AnyEncoding] | None = None, include_disabled: bool = False
) -> tuple[TracedSim, dict[str, AnyEncoding]]:
    """The original graph with markers (as `TracedSim`), and ``encodings`` (quantizer name -> what it exports as)
    laid out as the graph stores each tensor (a transposed weight's axes swapped)."""
    source: OnnxSource = sim.onnx_source
    refs = _layer_refs(sim)
    float_model, param_tensors = _float_model(source, refs)
    quantizers = {name: q for name, q in sim.quantizers().items() if q.enabled or include_disabled}
    slots = {name: _slot(name, q, refs, param_tensors, source) for name, q in quantizers.items()}
    marked, sites = _insert_markers(float_model, slots, quantizers)
    laid_out = {name: _graph_layout(encoding, quantizers[name], refs) for name, encoding in (encodings or {}).items()}
    traced = TracedSim(
        marked, float_model, sites, data_movement_propagation(float_model, {s.tensor for s in sites if not s.is_param}),
        source.input_names, source.output_names,
        param_tensors=param_tensors,
    )
    return traced, laid_out


def trace_any(sim: QuantSim, dummy_input: Any = None, include_disabled: bool = False, **options: Any) -> TracedSim:
    """The quantizer/tensor mapping of ``sim`` under the names its encodings use: the original graph's for a sim
    of an ONNX model, the exported graph's (`trace_sim`, with ``options``) otherwise."""
    if sim.onnx_source is not None:
        return trace_original_graph(sim, include_disabled=include_disabled)[0]
    return trace_sim(sim, sim.dummy_input if dummy_input is None else dummy_input,
                     include_disabled=include_disabled, **options)


def check_original_graph_opset(sim: QuantSim, opset: int | None) -> None:
    """The Q/DQ go into the graph at its own opset: refuse what that opset cannot express, rather than rewrite it."""
    graph_opset = sim.onnx_source.opset
    if opset is not None and opset != graph_opset:
        raise ValueError(f"the ONNX model is opset {graph_opset} and its graph is kept as it is; leave opset unset")
    quantizers = {name: q for name, q in sim.quantizers().items() if q.enabled}
    needed = PER_CHANNEL_OPSET
    try:
        required_opset(quantizers, graph_opset)
    except ValueError as error:  # a quantizer needs opset 21 (the message names it)
        needed, reason = INT4_INT16_OPSET, f" ({error})"
    else:
        reason = " (per-channel and per-tensor axes)"
    if graph_opset < needed:
        raise ValueError(
            f"the ONNX model is opset {graph_opset}; its Q/DQ need opset {needed}{reason}; convert the model first "
            f"with onnx.version_converter.convert_version(model, {needed}) and quantize that file"
        )


def _layer_refs(sim: QuantSim) -> dict[str, tuple[torch.nn.Module, OnnxNodeRef]]:
    """Sim layer name -> (layer, the ONNX node it computes)."""
    return {
        name: (module, module.__dict__[ONNX_NODE_ATTRIBUTE])
        for name, module in sim.model.named_modules() if ONNX_NODE_ATTRIBUTE in module.__dict__
    }


def _slot(name: str, quantizer: Quantizer, refs: dict, param_tensors: dict[str, str], source: OnnxSource) -> _Slot:
    if quantizer.role == "model_input":
        inputs = source.input_names
        index = int(quantizer.key) if quantizer.key.isdigit() else inputs.index(quantizer.key)
        return _Slot(inputs[index], None)
    if quantizer.owner not in refs:
        raise OriginalGraphError(
            f"quantizer '{name}' belongs to '{quantizer.owner}', which no node of the ONNX graph computes; export a "
            "sim built with QuantSim.from_onnx and changed only through edgequant's techniques"
        )
    _, ref = refs[quantizer.owner]
    if quantizer.role == "param":
        tensor = param_tensors.get(f"{quantizer.owner}.{quantizer.key}")
        if tensor is None:
            raise OriginalGraphError(
                f"parameter '{quantizer.owner}.{quantizer.key}' has no initializer in {ref.describe()} (an alpha or "
                "beta other than 1, or a computed weight); disable its quantizer to export into the original graph"
            )
        return _Slot(tensor, ref.outputs[0])
    index = int(quantizer.key)
    if quantizer.role == "input":
        return _Slot(ref.inputs[index], ref.outputs[0])
    return _Slot(ref.outputs[index], None)


def _float_model(source: OnnxSource, refs: dict) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The original graph with the sim's parameter values and without the BatchNormalizations the sim folded, and
    the tensor each layer parameter is (``layer.weight`` -> name in that graph)."""
    model = copy.deepcopy(source.model)
    graph = model.graph
    _weights_as_initializers(graph, {tensor for _, ref in refs.values() for tensor in ref.params.values()})
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes = {node.output[0]: node for node in graph.node}  # outputs name nodes: node names may be empty
    param_tensors: dict[str, str] = {}
    for layer, (module, ref) in refs.items():
        node = nodes.get(ref.outputs[0])
        if node is None:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            values = param.detach().cpu()
            tensor = ref.params.get(param_name)
            if tensor is None:
                param_tensors[f"{layer}.{param_name}"] = _add_missing_parameter(node, param_name, values, graph, ref)
                continue
            param_tensors[f"{layer}.{param_name}"] = tensor
            if param_name in ref.transposed:
                values = values.t()
            stored = _initializer_of(tensor, initializers, producers)
            current = numpy_helper.to_array(stored)
            if current.shape == tuple(values.shape) and (current == values.numpy().astype(current.dtype)).all():
                continue
            if stored.name == tensor and readers.get(tensor, 0) == 1:
                stored.CopyFrom(numpy_helper.from_array(values.numpy().astype(current.dtype), tensor))
            else:  # shared (or read through an Identity): this node gets its own copy
                name = _unique(f"{tensor}_{ref.name or ref.outputs[0]}", initializers, producers)
                copy_ = numpy_helper.from_array(values.numpy().astype(current.dtype), name)
                graph.initializer.append(copy_)
                initializers[name] = graph.initializer[-1]
                node.input[:] = [name if i == tensor else i for i in node.input]
                param_tensors[f"{layer}.{param_name}"] = name
    _remove_folded_batch_norms(model, {ref.outputs[0] for _, ref in refs.values()})
    return model, param_tensors


def _add_missing_parameter(
    node: onnx.NodeProto, param_name: str, values: torch.Tensor, graph: onnx.GraphProto, ref: OnnxNodeRef
) -> str:
    """A bias the sim added (bias correction, a folded BatchNorm) to a Conv/Gemm that had none."""
    if param_name != "bias" or node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) != 2:
        raise OriginalGraphError(f"{ref.describe()} has no input for the sim's parameter '{param_name}'")
    name = f"{node.name or node.output[0]}.bias"
    graph.initializer.append(numpy_helper.from_array(values.numpy(), name))
    node.input.append(name)
    return name


def _weights_as_initializers(graph: onnx.GraphProto, weights: set[str]) -> None:
    """Weights a ``Constant`` node holds (Paddle's exporter writes them so) become initializers of the same name:
    the same graph, in the form the QDQ model stores quantized weights in."""
    kept = []
    for node in graph.node:
        if (node.op_type == "Constant" and node.output[0] in weights and len(node.attribute) == 1
                and node.attribute[0].name == "value"):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _initializer_of(tensor: str, initializers: dict, producers: dict) -> onnx.TensorProto:
    """The initializer behind ``tensor``, through the Identity nodes exporters put on shared weights."""
    name = tensor
    while name not in initializers:
        producer = producers.get(name)
        if producer is None or producer.op_type != "Identity":
            raise OriginalGraphError(f"tensor '{tensor}' is computed by the graph, not stored; cannot write weights")
        name = producer.input[0]
    return initializers[name]


def _unique(name: str, *taken: Container[str]) -> str:
    candidate, index = name, 1
    while any(candidate in names for names in taken):
        candidate, index = f"{name}_{index}", index + 1
    return candidate


def _remove_folded_batch_norms(model: onnx.ModelProto, computed: set[str]) -> None:
    """Drop each BatchNormalization no sim layer computes any more (folded into the layer before it)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        if node.op_type == "BatchNormalization" and node.output[0] not in computed:
            if node.output[0] in outputs:
                raise OriginalGraphError(f"BatchNormalization '{node.name}' computes a graph output; export without "
                                         "folding it")
            rename[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _insert_markers(
    float_model: onnx.ModelProto, slots: dict[str, _Slot], quantizers: dict[str, Quantizer]
) -> tuple[onnx.ModelProto, list[QuantSite]]:
    """Markers on the slots' tensors: outputs (every reader), then inputs and parameters (their node only), in the
    sim's order, so an input quantizer chains after the output quantizer of the same tensor."""
    marked = copy.deepcopy(float_model)
    graph = marked.graph
    taken = {t for node in graph.node for t in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}  # tensor name as nodes read it now -> those nodes
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    markers_after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> markers to put after its producer
    source: dict[str, str] = {}  # marker output -> the tensor the marker quantizes
    sites = []
    nodes = {node.output[0]: node for node in graph.node}
    order = sorted(slots, key=lambda name: slots[name].node is not None)  # every-reader markers first
    for name in order:
        slot = slots[name]
        quantizer = quantizers[name]
        marker_output = _unique(f"{slot.tensor}_{MARKER_OP}", taken)
        taken.add(marker_output)
        if slot.node is None:
            chain = markers_after.get(slot.tensor)
            current = chain[-1].output[0] if chain else slot.tensor  # what every reader sees now
            if slot.tensor in graph_outputs and current == slot.tensor:
                current = _rename_graph_output(graph, slot.tensor, taken)
                marker_output = slot.tensor  # its readers, inside the graph too, now read the marker's output
            else:
                _rewire(readers.pop(current, []), current, marker_output, readers)
        else:
            node = nodes[slot.node]
            current = next((i for i in node.input if source.get(i, i) == slot.tensor), slot.tensor)
            readers[current] = [n for n in readers.get(current, []) if n is not node]
            _rewire([node], current, marker_output, readers)
        marker = helper.make_node(MARKER_OP, [current], [marker_output], domain=MARKER_DOMAIN, name=name)
        marker.attribute.append(helper.make_attribute("name", name))
        markers_after.setdefault(slot.tensor, []).append(marker)
        source[marker_output] = slot.tensor
        sites.append(QuantSite(name, slot.tensor, quantizer.role, quantizer.owner, quantizer.key, current,
                               marker_output))
    _place_markers(graph, markers_after)
    if not any(o.domain == MARKER_DOMAIN for o in marked.opset_import):
        marked.opset_import.append(helper.make_opsetid(MARKER_DOMAIN, 1))
    return marked, sites


def _rewire(nodes: list[onnx.NodeProto], old: str, new: str, readers: dict[str, list[onnx.NodeProto]]) -> None:
    """``nodes`` read ``new`` where they read ``old``."""
    for node in nodes:
        node.input[:] = [new if i == old else i for i in node.input]
    readers.setdefault(new, []).extend(nodes)


def _rename_graph_output(graph: onnx.GraphProto, tensor: str, taken: set[str]) -> str:
    """Let the producer of graph output ``tensor`` write a new name, so a marker can produce ``tensor`` itself."""
    renamed = _unique(f"{tensor}_float", taken)
    taken.add(renamed)
    for node in graph.node:
        node.output[:] = [renamed if o == tensor else o for o in node.output]
    return renamed


def _place_markers(graph: onnx.GraphProto, markers_after: dict[str, list[onnx.NodeProto]]) -> None:
    """Add the markers and order the nodes topologically, keeping the graph's own order where it is free."""
    nodes = list(graph.node) + [m for chain in markers_after.values() for m in chain]
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    waiting = [sum(1 for i in set(node.input) if i not in available and i in producer) for node in nodes]
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in set(node.input):
            if name not in available and name in producer:
                readers.setdefault(producer[name], []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    del graph.node[:]
    graph.node.extend(ordered)


def _graph_layout(encoding: AnyEncoding, quantizer: Quantizer, refs: dict) -> AnyEncoding:
    """``encoding`` for the tensor as the graph stores it: a weight kept transposed there swaps its two axes."""
    if quantizer.role != "param" or isinstance(encoding, FloatFormat):
        return encoding
    _, ref = refs[quantizer.owner]
    if quantizer.key not in ref.transposed:
        return encoding
    granularity = encoding.granularity
    if isinstance(granularity, PerBlock):
        swapped = dataclasses.replace(granularity, channel_axis=granularity.block_axis,
                                      block_axis=granularity.channel_axis)
        return dataclasses.replace(encoding, scale=encoding.scale.t(), offset=encoding.offset.t(),
                                   granularity=swapped)
    if isinstance(granularity, PerChannel) and len(granularity.axes) == 1:
        return dataclasses.replace(encoding, granularity=PerChannel(1 - granularity.axes[0]))
    return encoding
