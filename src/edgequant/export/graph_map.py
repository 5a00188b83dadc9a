"""Which ONNX tensor each sim quantizer quantizes.

Matching module scope names against exported node names breaks on fx-renamed modules (``layer1_0_relu``),
functional ops (``add_1``) and ops the exporter decomposes. Instead we export the sim once with every enabled
quantizer replaced by an identity *marker* op (``edgequant::QuantMarker``, carrying the quantizer's name) and
read the mapping off the graph: a marker's input is the tensor that quantizer quantizes, its consumers are the
ops that see the quantized value. Stripping the markers gives the float model with the exporter's own tensor
names (``/relu/Relu_output_0``, ``conv.weight``), which are the names the encodings file uses.

As AIMET does, tensors produced by pure data-movement ops (Flatten, Reshape...) inherit their input's encoding
so that a target toolchain finds an encoding for every quantized tensor.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx
import torch

from edgequant.quantization import Encoding, FloatFormat, PerBlock, Quantizer
from edgequant.sim.batches import split_model_input
from edgequant.sim.modes import training_mode
from edgequant.sim.ops import DATA_MOVEMENT_OPS

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim

MARKER_DOMAIN = "edgequant"
MARKER_OP = "QuantMarker"
DEFAULT_OPSET = 17
FP8_OPSET = 21  # float8 QuantizeLinear/DequantizeLinear (19), QuantizeLinear's output_dtype (21; see qdq)
INT4_INT16_OPSET = 21  # first opset whose QuantizeLinear has int4/uint4/int16/uint16 outputs

@dataclass
class QuantSite:
    """One place where the sim quantizes: quantizer ``quantizer`` acts on ONNX tensor ``tensor``."""

    quantizer: str
    tensor: str
    role: str  # the quantizer's role and owning layer (see `Quantizer`)
    owner: str
    key: str
    marker_input: str  # tensor names in the marked graph
    marker_output: str

    @property
    def is_param(self) -> bool:
        return self.role == "param"


@dataclass
class TracedSim:
    """The sim exported with markers, the float model derived from it, and the quantizer/tensor mapping."""

    marked: onnx.ModelProto
    float_model: onnx.ModelProto
    sites: list[QuantSite]
    propagated: dict[str, str] = field(default_factory=dict)  # data-movement output -> tensor it inherits from
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    param_tensors: dict[str, str] = field(default_factory=dict)  # "layer.bias" -> graph tensor, where not so named

    def tensors_of(self, quantizer: str) -> list[str]:
        return [site.tensor for site in self.sites if site.quantizer == quantizer]

    def quantizers_of(self, tensor: str) -> list[str]:
        return [site.quantizer for site in self.sites if site.tensor == tensor]

    def tensor_encodings(self, encodings: dict[str, Encoding | FloatFormat]) -> dict[str, Encoding | FloatFormat]:
        """Encoding (or float format) of every quantized ONNX tensor (propagated ones included), from quantizers'."""
        by_tensor: dict[str, Encoding | FloatFormat] = {}
        for site in self.sites:
            encoding = encodings[site.quantizer]
            previous = by_tensor.setdefault(site.tensor, encoding)
            if not previous.equals(encoding):
                warnings.warn(
                    f"tensor '{site.tensor}' is quantized twice with different encodings (by "
                    f"{', '.join(self.quantizers_of(site.tensor))}); the encodings file keeps the first",
                    stacklevel=2,
                )
        for tensor, source in self.propagated.items():
            by_tensor[tensor] = by_tensor[source]
        return by_tensor


class _Marker(torch.autograd.Function):
    """Identity in PyTorch; an ``edgequant::QuantMarker`` node named after the quantizer in the ONNX graph."""

    @staticmethod
    def forward(ctx, x, name):  # noqa: ANN001 - autograd signature
        return x.clone()

    @staticmethod
    def symbolic(g, x, name):  # noqa: ANN001 - ONNX symbolic signature
        marked = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, name_s=name)
        marked.setType(x.type())
        return marked


@contextmanager
def _quantizers_as_markers(sim: QuantSim, include_disabled: bool) -> Iterator[None]:
    quantizers = {name: q for name, q in sim.quantizers().items() if q.enabled or include_disabled}

    def marker(name: str):  # integer tensors (shape arithmetic) have no quantized form in ONNX
        return lambda x: _Marker.apply(x, name) if x.is_floating_point() else x

    for name, quantizer in quantizers.items():
        quantizer.forward = marker(name)
        quantizer.absorbs_clamp = _absorbs_nothing  # the activation before a marker stays in the graph
    try:
        yield
    finally:
        for quantizer in quantizers.values():
            del quantizer.forward, quantizer.absorbs_clamp


def _absorbs_nothing(x: torch.Tensor) -> bool:
    return False


@contextmanager
def _keyword_inputs_as_positional(model: torch.nn.Module, num_args: int, kwargs: dict) -> Iterator[None]:
    """The TorchScript exporter mis-binds keyword inputs (HF models); let forward take them positionally for a
    while (an instance attribute, so parameter names and module scopes stay as they are)."""
    if not kwargs:
        yield
        return
    original = model.forward
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    constants = {k: v for k, v in kwargs.items() if k not in names}

    def positional_forward(*inputs: torch.Tensor) -> Any:
        return original(*inputs[:num_args], **dict(zip(names, inputs[num_args:], strict=True)), **constants)

    model.forward = positional_forward
    try:
        yield
    finally:
        del model.forward


def default_input_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """``input`` for a single tensor (AIMET's convention), else the forward's parameter names / kwargs keys."""
    if len(args) == 1 and not kwargs:
        return ["input"]
    parameters = [
        p.name for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(len(args))]
    return names + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]


def _opset_need(quantizer: Quantizer) -> tuple[int, str] | None:
    """The opset ``quantizer`` needs and why (fp8 QuantizeLinear; 16-bit activations; blocked DequantizeLinear), None
    where the default does."""
    if not quantizer.enabled:
        return None
    if quantizer.float_format is not None and quantizer.float_format.scaled:
        return FP8_OPSET, f"is {quantizer.float_format.name}: ONNX QuantizeLinear takes a float8 output_dtype"
    if 8 < quantizer.bitwidth <= 16 and quantizer.role != "param" and quantizer.float_format is None:
        return INT4_INT16_OPSET, f"is {quantizer.bitwidth}-bit: ONNX QuantizeLinear supports 16-bit outputs"
    if isinstance(quantizer.granularity, PerBlock):
        return INT4_INT16_OPSET, f"is {quantizer.granularity.describe()}: ONNX DequantizeLinear takes a block_size"
    return None


def required_opset(quantizers: dict[str, Quantizer], opset: int | None) -> int:
    """Opset to export with: fp8 tensors, int16 (and 9..15-bit) activations and per-block weights need opset 21, which
    the user may not rule out; int4 weights get 21 by default (their own ONNX type)."""
    needs = {name: need for name, q in quantizers.items() if (need := _opset_need(q)) is not None}
    if opset is None:
        wants_int4 = any(q.enabled and q.bitwidth <= 4 for q in quantizers.values())
        wanted = [needed for needed, _ in needs.values()] + ([INT4_INT16_OPSET] if wants_int4 else [])
        return max([DEFAULT_OPSET, *wanted])
    for name, (needed, reason) in needs.items():
        if opset < needed:
            raise ValueError(f"quantizer '{name}' {reason} from opset {needed}; pass opset={needed} or higher")
    return opset


def trace_sim(
    sim: QuantSim,
    dummy_input: Any,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    include_disabled: bool = False,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> TracedSim:
    """Export ``sim.model`` with quantizer markers and derive the float model and the quantizer mapping.

    Disabled quantizers get markers too when ``include_disabled`` (to map names for loading encodings).
    ``dynamic_axes`` (torch.onnx's, by input/output name) replaces the dynamic batch axis of ``dynamic_batch``."""
    args, kwargs = split_model_input(dummy_input)
    model = sim.model
    input_names = input_names or default_input_names(model, args, kwargs)
    opset = required_opset(sim.quantizers(), opset)
    buffer = io.BytesIO()
    try:
        with training_mode(model, False), torch.no_grad(), _quantizers_as_markers(sim, include_disabled):
            outputs = model(*args, **kwargs)
        flat_outputs = [o for o in torch.utils._pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)]
        output_names = output_names or (
            ["output"] if len(flat_outputs) == 1 else [f"output_{i}" for i in range(len(flat_outputs))]
        )
        if dynamic_axes is None and dynamic_batch:
            dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
        tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        with training_mode(model, False), _quantizers_as_markers(sim, include_disabled), \
                _keyword_inputs_as_positional(model, len(args), kwargs), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                model, args + tuple(tensor_kwargs.values()), buffer, dynamo=False, opset_version=opset,
                input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
    except Exception as error:
        raise RuntimeError(
            f"ONNX export of the sim failed ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            "check that the model runs on dummy_input and uses ops torch.onnx supports"
        ) from None
    marked = onnx.load_from_string(buffer.getvalue())
    sites = _read_sites(marked, sim.quantizers())
    float_model = _strip_markers(marked)
    return TracedSim(
        marked, float_model, sites, data_movement_propagation(float_model, {s.tensor for s in sites if not s.is_param}),
        list(input_names), list(output_names),
    )


def _marker_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == MARKER_DOMAIN and n.op_type == MARKER_OP]


def marker_quantizer(node: onnx.NodeProto) -> str:
    return next(a.s.decode() for a in node.attribute if a.name == "name")


def _marker_sources(marked: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
    """(marker output -> marker input, real tensor -> graph output name it takes where a marker produced one)."""
    source = {node.output[0]: node.input[0] for node in _marker_nodes(marked)}
    graph_outputs = {o.name for o in marked.graph.output}
    return source, {_real(name, source): name for name in source if name in graph_outputs}


def _read_sites(marked: onnx.ModelProto, quantizers: dict[str, Quantizer]) -> list[QuantSite]:
    source, renamed = _marker_sources(marked)
    sites = []
    for node in _marker_nodes(marked):
        name = marker_quantizer(node)
        quantizer = quantizers[name]
        real = _real(node.input[0], source)
        sites.append(QuantSite(name, renamed.get(real, real), quantizer.role, quantizer.owner, quantizer.key,
                               node.input[0], node.output[0]))
    return sites


def _real(tensor: str, source: dict[str, str]) -> str:
    while tensor in source:
        tensor = source[tensor]
    return tensor


def _strip_markers(marked: onnx.ModelProto) -> onnx.ModelProto:
    """The float model: markers removed, consumers reading the real tensor (renamed to a graph output's name
    where a marker produced one)."""
    model = copy.deepcopy(marked)
    markers = _marker_nodes(model)
    source, output_rename = _marker_sources(model)

    def resolve(tensor: str) -> str:
        real = _real(tensor, source)
        return output_rename.get(real, real)

    marker_ids = {id(node) for node in markers}
    kept = [node for node in model.graph.node if id(node) not in marker_ids]
    for node in kept:
        node.input[:] = [resolve(i) for i in node.input]
        node.output[:] = [output_rename.get(o, o) for o in node.output]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    opsets = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    onnx.checker.check_model(model)
    return model


def data_movement_propagation(float_model: onnx.ModelProto, quantized: set[str]) -> dict[str, str]:
    """Outputs of data-movement ops fed by a quantized tensor -> the tensor whose encoding they inherit."""
    initializers = {i.name for i in float_model.graph.initializer}
    propagated: dict[str, str] = {}
    for node in float_model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type not in DATA_MOVEMENT_OPS or not node.input or node.input[0] in initializers:
            continue
        source = propagated.get(node.input[0], node.input[0])
        if source not in quantized:
            continue
        for output in node.output:
            if output and output not in quantized:
                propagated[output] = source
    return propagated


def node_by_output(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found
