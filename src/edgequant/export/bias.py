"""Int32 bias with scale = input scale × weight scale, as integer kernels (ORT's QLinearConv, HTP, TFLite) add it.

An integer convolution accumulates ``Σ q_x·q_w`` in int32 at scale ``s_x·s_w``; the bias must be on that grid to be
added. ONNX Runtime fuses ``DQ → Conv → Q`` into QLinearConv only when the bias is an int32 DequantizeLinear, and
it then *assumes* the bias scale is ``s_x·s_w``. `quantize_bias_int32` makes the sim round the bias the same way,
so that simulation and runtime agree; export refuses int32 bias encodings that no longer match ``s_x·s_w``.

Blocked weights take AIMET's grids (its 2.0.0 encodings state them): an LPBQ weight's ``s_w`` is its per-channel scale
on the decompressed grid (every block scale is an integer multiple of it, so each product lies on ``s_x·s_w``); a
per-block weight's is its channel's largest block scale (only the widest block's products lie on that grid). A layer
whose input or weight has a float format (`FloatFormat`) has no integer accumulator: it gets no derived bias
encoding, and its bias stays in float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from edgequant.export.graph_map import (
    DATA_MOVEMENT_OPS,
    MARKER_OP,
    TracedSim,
    consumers,
    marker_quantizer,
    node_by_output,
)
from edgequant.export.original_graph import trace_any
from edgequant.quantization import Encoding, Granularity, Lpbq, PerBlock, PerChannel, PerTensor, Quantizer
from edgequant.quantization.number_format import FloatFormat
from edgequant.sim.quantized_module import param_quantizer

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim

BIAS_BITWIDTH = 32
ACCUMULATING_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""Ops that sum products in an int32 accumulator; only their bias lives on the s_x·s_w grid."""


def layer_input_quantizers(traced: TracedSim) -> dict[str, str]:
    """Layer name (owner of a weight quantizer) -> name of the quantizer that quantizes the layer's data input."""
    producers = node_by_output(traced.marked)
    users = consumers(traced.marked)
    found = {}
    for site in traced.sites:
        if not (site.is_param and site.key == "weight"):
            continue
        compute = _first_compute_user(site.marker_output, users)
        if compute is None or compute.op_type not in ACCUMULATING_OPS:
            continue
        source = _quantizer_upstream(compute.input[0], producers)
        if source is not None:
            found[site.owner] = source
    return found


def _first_compute_user(tensor: str, users: dict) -> Any:
    for node in users.get(tensor, []):
        if node.op_type in DATA_MOVEMENT_OPS:
            return _first_compute_user(node.output[0], users)
        return node
    return None


def _quantizer_upstream(tensor: str, producers: dict) -> str | None:
    node = producers.get(tensor)
    while node is not None and node.op_type in DATA_MOVEMENT_OPS:
        node = producers.get(node.input[0])
    if node is not None and node.op_type == MARKER_OP:
        return marker_quantizer(node)
    return None


def bias_granularity(weight: Granularity) -> Granularity | None:
    """The granularity of a bias on the ``s_x·s_w`` grid: per tensor, or per channel (the bias's only axis) for a
    per-channel or blocked weight; None where the weight has no scale per output channel (several channel axes)."""
    match weight:
        case PerTensor():
            return weight
        case PerChannel(axis=int()) | PerBlock():
            return PerChannel(0)
    return None


def weight_channel_scale(weight_encoding: Encoding) -> torch.Tensor:
    """``s_w`` of the bias grid, one per output channel (one for a per-tensor weight; see the module doc for blocks)."""
    granularity, scale = weight_encoding.granularity, weight_encoding.scale
    match granularity:
        case Lpbq():
            return granularity.channel_scale(scale, weight_encoding.bitwidth).reshape(-1)
        case PerBlock():
            return scale.amax(dim=granularity.block_axis).reshape(-1)
    return scale


def derived_bias_encoding(input_encoding: Encoding, weight_encoding: Encoding) -> Encoding:
    """Symmetric int32 encoding with scale ``s_x·s_w`` (per output channel when the weight has channel scales)."""
    granularity = bias_granularity(weight_encoding.granularity)
    if granularity is None:
        raise ValueError(f"a {weight_encoding.granularity.describe()} weight has no single scale per output channel: "
                         "no int32 bias grid s_x·s_w exists for it")
    scale = input_encoding.scale.to(weight_encoding.scale.device) * weight_channel_scale(weight_encoding)
    offset = torch.full_like(scale, -float(2 ** (BIAS_BITWIDTH - 1)))
    return Encoding(scale, offset, BIAS_BITWIDTH, True, granularity)


def derived_bias_encodings(
    traced: TracedSim, encodings: dict[str, Encoding | FloatFormat], sim: QuantSim
) -> dict[str, Encoding]:
    """``layer.bias`` -> derived int32 encoding, for layers with a bias and integer encodings of weight and input."""
    derived = {}
    for layer, input_quantizer in layer_input_quantizers(traced).items():
        module = sim.model.get_submodule(layer)
        weight_quantizer = param_quantizer(module, "weight")
        if (module._parameters.get("bias") is None or weight_quantizer is None
                or not isinstance(encodings.get(weight_quantizer.name), Encoding)
                or not isinstance(encodings.get(input_quantizer), Encoding)
                or bias_granularity(weight_quantizer.granularity) is None):
            continue
        derived[f"{layer}.bias"] = derived_bias_encoding(encodings[input_quantizer], encodings[weight_quantizer.name])
    return derived


def quantize_bias_int32(sim: QuantSim, dummy_input: Any = None) -> list[str]:
    """Give every layer with a bias, a quantized weight and a quantized input an int32 bias quantizer with
    scale = input scale × weight scale (frozen), as integer runtimes do. Call it after calibration, and again
    after anything that changes those encodings. Returns the biases it quantized."""
    traced = trace_any(sim, dummy_input)
    encodings = {name: q.encoding for name, q in sim.quantizers().items() if q.enabled and q.encoding is not None}
    derived = derived_bias_encodings(traced, encodings, sim)
    for bias_name, encoding in derived.items():
        layer = bias_name.rsplit(".", 1)[0]
        install_bias_quantizer(sim, layer, encoding)
    return sorted(derived)


def install_bias_quantizer(sim: QuantSim, layer: str, encoding: Encoding) -> None:
    """Put a frozen int32 bias quantizer with ``encoding`` on ``layer`` (replacing any bias quantizer)."""
    module = sim.model.get_submodule(layer)
    if not hasattr(module, "param_quantizers") or module._parameters.get("bias") is None:
        raise ValueError(f"layer '{layer}' is not a quantized layer with a bias; cannot quantize its bias")
    quantizer = Quantizer(BIAS_BITWIDTH, True, encoding.granularity, role="param", owner=layer, key="bias")
    quantizer.set_encoding(encoding)
    quantizer.frozen = True
    module.param_quantizers["bias"] = quantizer


def check_bias_encodings(quantizers: dict[str, Quantizer], derived: dict[str, Encoding]) -> None:
    """Int32 bias encodings must equal s_x·s_w (``derived``: `derived_bias_encodings`), or integer runtimes
    compute something else than the QDQ graph."""
    for quantizer in quantizers.values():
        encoding = quantizer.encoding
        is_bias = quantizer.role == "param" and quantizer.key == "bias"
        if not (quantizer.enabled and is_bias and encoding is not None and encoding.bitwidth == BIAS_BITWIDTH):
            continue
        bias_name = f"{quantizer.owner}.bias"
        expected = derived.get(bias_name)
        if expected is None or not torch.equal(expected.scale.cpu(), encoding.scale.cpu()):
            raise ValueError(
                f"the int32 encoding of '{bias_name}' does not equal input scale × weight scale (the encodings "
                "changed since it was set); call edgequant.export.quantize_bias_int32(sim) again before exporting"
            )
