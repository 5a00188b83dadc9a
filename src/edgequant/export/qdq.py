"""The QDQ model: every quantizer marker becomes a QuantizeLinear/DequantizeLinear pair.

Replacing each marker by Q→DQ keeps exactly the sim's semantics (an input quantizer only affects the consumer
that owns it, chained quantizers stay chained). Quantized parameters are stored as integer initializers followed by
DequantizeLinear (the form ORT and QNN expect), computed with the sim's own rounding. Tensors that inherit an
encoding through data movement (Flatten, Reshape...) get a Q/DQ pair too, so that the QDQ model carries a Q/DQ
for every entry of the encodings file.

ONNX types: signed grids (symmetric, `Encoding.signed`) use signed types with zero point 0, the others (asymmetric,
unsigned symmetric) unsigned types with zero point ``-offset``. 4-bit uses (u)int4 (opset ≥ 21), 16-bit (u)int16
(opset ≥ 21), 32-bit (biases only) int32. Other bitwidths use the next wider type and a Clip to the encoding's range
before QuantizeLinear, which rounds and clamps exactly as the sim. The strict symmetric grid (``[-127, 127]`` at 8
bits) has no ONNX type of its own either: it is the signed type with zero point 0 after the same Clip, to
``[-127 * scale, 127 * scale]``, so that nothing rounds to -128 (round(x / scale) of the clipped value is then
-127 at the least, exactly the sim's clamp). Strict symmetric weights are stored as integers in ``[-127, 127]``.

Per-block weights are DequantizeLinear with ``axis`` (the blocked axis) and ``block_size`` (opset 21), their scale
and zero point laid out with the weight's shape but for the blocks. An LPBQ weight's block scales are not stored as
floats: its integer multipliers (uint8) go through a per-channel DequantizeLinear on the channel scale, which gives
the same float32 products the sim uses, and that output is the weight's scale. The weight then costs its 4 bits plus
8 bits a block instead of 32, and ORT still receives the sim's block scales bit for bit.

A float16 or bfloat16 tensor (`FloatFormat`) is ``Cast`` to that type and back to float, parameters and activations
alike: ONNX's Cast rounds to nearest even and overflows to inf as torch's cast does, so ORT computes the sim's values
bit for bit.

An fp8 tensor (`Fp8Encoding`: the format and its scale) is QuantizeLinear → DequantizeLinear to a float8 type
(``axis`` per channel): QuantizeLinear divides by the scale, saturates to the finite maximum (``saturate=1``, the
default) and rounds to nearest even, exactly the sim's ``(x / scale).clamp(-max, max)`` cast; an fp8 weight is stored
as a float8 initializer computed that way, followed by DequantizeLinear. DequantizeLinear reads a float8 zero point 0;
QuantizeLinear states its float8 type by ``output_dtype`` (opset 21) instead, because ONNX Runtime's optimizer removes
a Relu in front of a QuantizeLinear with a zero point of any type but int8/uint8 (ReluQuantFusion), as if a float8
zero were the bottom of the range (negative values would then pass). Only integer QuantizeLinear outputs are listed in
the `QDQ_METADATA_KEY` metadata (they hold grid indices; fp8 values do not).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgequant.export.encodings_io import Fp8Encoding
from edgequant.export.graph_map import INT4_INT16_OPSET, MARKER_DOMAIN, TracedSim, marker_quantizer, node_by_output
from edgequant.quantization import Encoding, FloatFormat, Granularity, Lpbq, PerBlock, PerChannel, PerTensor

AnyEncoding = Encoding | FloatFormat | Fp8Encoding
"""What a quantizer or tensor is exported as: an integer grid, a 16-bit float cast, or fp8 with its scale."""

QDQ_METADATA_KEY = "edgequant.qdq"
"""metadata_props key: JSON ``{quantized tensor in the QDQ model: {"tensor": encodings name, "quantizers": [...]}}``."""


def container_bits(bitwidth: int, opset: int) -> int:
    """Bitwidth of the ONNX integer type that holds ``bitwidth``-bit values."""
    if bitwidth == 4 and opset >= INT4_INT16_OPSET:
        return 4
    for bits in (8, 16, 32):
        if bitwidth <= bits:
            return bits
    raise ValueError(f"{bitwidth}-bit encodings cannot be exported to ONNX")


_TYPES = {
    (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16,
    (32, True): TensorProto.INT32,
}


def onnx_type(encoding: Encoding, opset: int) -> int:
    bits = container_bits(encoding.bitwidth, opset)
    if (bits, encoding.signed) not in _TYPES:
        raise ValueError(
            f"unsigned {encoding.bitwidth}-bit encodings (asymmetric, or symmetric with offset 0) have no ONNX type; "
            "use a signed symmetric encoding"
        )
    return _TYPES[(bits, encoding.signed)]


_FLOAT_TYPES = {
    torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN, torch.float8_e5m2: TensorProto.FLOAT8E5M2,
}
"""The ONNX type of each float format's torch dtype."""


def fp8_values(tensor: torch.Tensor, encoding: Fp8Encoding) -> torch.Tensor:
    """``tensor`` as the sim rounds it onto fp8, before the scale multiplies back: ``(x / scale).clamp(-max, max)``
    cast to the fp8 dtype."""
    number_format = encoding.number_format
    scale = encoding.granularity.group_scale(encoding.scale.float().to(tensor.device), tensor.dim())
    return (tensor.float() / scale).clamp(-number_format.max, number_format.max).to(number_format.dtype)


def integer_values(tensor: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """``tensor`` on ``encoding``'s grid in the ONNX type's values, rounded exactly as the sim rounds.

    Works on the signed index ``round(x / scale)`` (as `quantize_dequantize` does) rather than the unsigned grid,
    whose ``- offset`` would lose precision in float32 for 32-bit biases.
    """
    scale, offset = (v.to(tensor.device) for v in encoding.broadcast_to(tensor.shape))
    index = torch.round(tensor.float() / scale).long()
    lowest = offset.long()
    zero_point = encoding.granularity.broadcast(encoding.onnx_zero_point, tensor.shape).to(tensor.device).long()
    return torch.maximum(torch.minimum(index, lowest + encoding.num_steps), lowest) + zero_point


def axis_attributes(granularity: Granularity) -> dict:
    """QuantizeLinear/DequantizeLinear attributes of a granularity: none per tensor, ``axis`` per channel, ``axis`` and
    ``block_size`` (opset 21) per block; LPBQ runs as the per-block grid of its effective block scales."""
    match granularity:
        case PerTensor():
            return {}
        case PerChannel(axis=int(axis)):
            return {"axis": axis}
        case PerBlock(block_size=block_size, block_axis=int(axis)):
            return {"axis": axis, "block_size": block_size}
    raise ValueError(f"a {granularity.describe()} encoding has no ONNX QuantizeLinear/DequantizeLinear form")


def onnx_parameters(values: torch.Tensor, granularity: Granularity, shape: torch.Size) -> torch.Tensor:
    """A scale or zero point laid out as ONNX takes it: a blocked one has the tensor's shape, but for its blocks on
    the blocked axis (a per-block scale of ours is 1 on the dims that share it)."""
    if not isinstance(granularity, PerBlock):
        return values
    return values.expand([values.shape[d] if d == granularity.block_axis else size for d, size in enumerate(shape)])


class _QdqBuilder:
    def __init__(self, traced: TracedSim, opset: int) -> None:
        self.model = copy.deepcopy(traced.marked)
        self.opset = opset
        self.initializers = {init.name: init for init in self.model.graph.initializer}
        self.graph_outputs = {o.name for o in self.model.graph.output}
        self.new_initializers: list[onnx.TensorProto] = []
        self.used_names: set[str] = {t for n in self.model.graph.node for t in (*n.input, *n.output)}
        self.used_names |= set(self.initializers)
        self.metadata: dict[str, dict] = {}
        self.producers = node_by_output(self.model)

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self.used_names:
            candidate, index = f"{name}_{index}", index + 1
        self.used_names.add(candidate)
        return candidate

    def constant(self, name: str, values: np.ndarray | torch.Tensor, data_type: int) -> str:
        name = self.unique(name)
        if data_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):  # one byte each, as torch stores them
            raw = values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            self.new_initializers.append(helper.make_tensor(name, data_type, list(values.shape), raw, raw=True))
            return name
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
        if data_type in (TensorProto.INT4, TensorProto.UINT4):  # two per byte, the first in the low nibble
            nibbles = np.append(array.reshape(-1), np.zeros(array.size % 2, array.dtype)).astype(np.uint8) & 0xF
            packed = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
            tensor = helper.make_tensor(name, data_type, list(array.shape), packed, raw=True)
        else:
            tensor = numpy_helper.from_array(array.astype(helper.tensor_dtype_to_np_dtype(data_type)), name)
        self.new_initializers.append(tensor)
        return name

    def scale_and_zero_point(
        self, tensor: str, encoding: Encoding, shape: torch.Size | None = None
    ) -> tuple[str, str]:
        """Initializers of the encoding's scale and zero point (laid out for a tensor of ``shape`` where blocked)."""
        scale, zero_point = encoding.scale.float(), encoding.onnx_zero_point
        if shape is not None:
            scale, zero_point = (onnx_parameters(v, encoding.granularity, shape) for v in (scale, zero_point))
        scale_name = self.constant(f"{tensor}_scale", scale, TensorProto.FLOAT)
        zero_point_name = self.constant(f"{tensor}_zero_point", zero_point, onnx_type(encoding, self.opset))
        return scale_name, zero_point_name

    def fp8_scale_and_zero_point(self, tensor: str, encoding: Fp8Encoding) -> tuple[str, str]:
        """Initializers of an fp8 encoding's scale and its float8 zero point 0."""
        dtype = encoding.number_format.dtype
        scale_name = self.constant(f"{tensor}_scale", encoding.scale.float(), TensorProto.FLOAT)
        zero_point = torch.zeros(encoding.scale.shape, dtype=dtype)
        return scale_name, self.constant(f"{tensor}_zero_point", zero_point, _FLOAT_TYPES[dtype])

    def constant_source(self, tensor: str) -> str | None:
        """The initializer holding ``tensor`` (the exporter turns duplicate initializers into Identity nodes)."""
        while tensor not in self.initializers:
            producer = self.producers.get(tensor)
            if producer is None or producer.op_type != "Identity":
                return None
            tensor = producer.input[0]
        return tensor

    def param_nodes(
        self, tensor: str, source: str, output: str, encoding: Encoding | Fp8Encoding
    ) -> list[onnx.NodeProto]:
        """Integer (fp8: float8) initializer + DequantizeLinear for a quantized parameter."""
        weight = torch.from_numpy(numpy_helper.to_array(self.initializers[source]).copy())
        if isinstance(encoding, Fp8Encoding):
            values = fp8_values(weight, encoding)
            quantized = self.constant(f"{tensor}_quantized", values, _FLOAT_TYPES[values.dtype])
            scale, zero_point = self.fp8_scale_and_zero_point(tensor, encoding)
        else:
            quantized = self.constant(f"{tensor}_quantized", integer_values(weight, encoding),
                                      onnx_type(encoding, self.opset))
            scale_nodes = self.lpbq_scale_nodes(tensor, encoding, weight.shape)
            if scale_nodes:  # symmetric: the zero point is the default 0 of the weight's type
                return [*scale_nodes, helper.make_node(
                    "DequantizeLinear", [quantized, scale_nodes[-1].output[0]], [output],
                    name=self.unique(f"{tensor}_DequantizeLinear"), **axis_attributes(encoding.granularity),
                )]
            scale, zero_point = self.scale_and_zero_point(tensor, encoding, weight.shape)
        return [helper.make_node(
            "DequantizeLinear", [quantized, scale, zero_point], [output],
            name=self.unique(f"{tensor}_DequantizeLinear"),
            **axis_attributes(encoding.granularity),
        )]

    def lpbq_scale_nodes(self, tensor: str, encoding: Encoding, shape: torch.Size) -> list[onnx.NodeProto]:
        """An LPBQ weight's block scales computed in the graph: DequantizeLinear of its uint8 multipliers on the
        per-channel scale (``axis``: the channel axis). Empty for other granularities, and for block scales that are
        not exactly those products (then they are stored as floats, which is always exact)."""
        granularity = encoding.granularity
        if not isinstance(granularity, Lpbq):
            return []
        scale = encoding.scale.float()
        channel_scale = granularity.channel_scale(scale, encoding.bitwidth)
        multipliers = granularity.multipliers(scale, encoding.bitwidth)
        if not torch.equal(multipliers * channel_scale, scale) or multipliers.max() > 255:
            return []
        multipliers_name = self.constant(f"{tensor}_block_multipliers",
                                         onnx_parameters(multipliers, granularity, shape), TensorProto.UINT8)
        channel_scale_name = self.constant(f"{tensor}_channel_scale", channel_scale.reshape(-1), TensorProto.FLOAT)
        return [helper.make_node(
            "DequantizeLinear", [multipliers_name, channel_scale_name], [self.unique(f"{tensor}_scale")],
            name=self.unique(f"{tensor}_scale_DequantizeLinear"), axis=granularity.channel_axis,
        )]

    def cast_nodes(self, tensor: str, source: str, output: str, number_format: FloatFormat) -> list[onnx.NodeProto]:
        """Cast to the 16-bit float format and back: its counterpart of Q → DQ."""
        if number_format.scaled:
            raise ValueError(f"tensor '{tensor}' has format {number_format.name} without its scale; export it as an "
                             "Fp8Encoding")
        narrowed = self.unique(f"{tensor}_{number_format.name}")
        return [
            helper.make_node("Cast", [source], [narrowed], name=self.unique(f"{tensor}_Cast_{number_format.name}"),
                             to=_FLOAT_TYPES[number_format.dtype]),
            helper.make_node("Cast", [narrowed], [output], name=self.unique(f"{tensor}_CastFloat"),
                             to=TensorProto.FLOAT),
        ]

    def activation_nodes(
        self, tensor: str, source: str, output: str, encoding: AnyEncoding, quantizers: list[str]
    ) -> list[onnx.NodeProto]:
        """(Clip →) QuantizeLinear → DequantizeLinear on an activation (Cast → Cast in a 16-bit float format)."""
        if isinstance(encoding, FloatFormat):
            return self.cast_nodes(tensor, source, output, encoding)
        if isinstance(encoding, Fp8Encoding):
            scale, zero_point = self.fp8_scale_and_zero_point(tensor, encoding)
            return self.quantize_dequantize_nodes(
                tensor, source, output, scale, zero_point, encoding.granularity,
                output_dtype=_FLOAT_TYPES[encoding.number_format.dtype],
            )
        if encoding.bitwidth > 16:
            raise ValueError(f"tensor '{tensor}': 32-bit activations cannot be expressed with ONNX QuantizeLinear")
        nodes = []
        scale, zero_point = self.scale_and_zero_point(tensor, encoding)
        if container_bits(encoding.bitwidth, self.opset) != encoding.bitwidth or encoding.strict_symmetric:
            low = self.constant(f"{tensor}_clip_min", encoding.min.float().reshape(()), TensorProto.FLOAT)
            high = self.constant(f"{tensor}_clip_max", encoding.max.float().reshape(()), TensorProto.FLOAT)
            clipped = self.unique(f"{tensor}_clipped")
            nodes.append(helper.make_node("Clip", [source, low, high], [clipped], name=self.unique(f"{tensor}_Clip")))
            source = clipped
        quantize, dequantize = self.quantize_dequantize_nodes(
            tensor, source, output, scale, zero_point, encoding.granularity
        )
        self.metadata[quantize.output[0]] = {"tensor": tensor, "quantizers": quantizers}
        return [*nodes, quantize, dequantize]

    def quantize_dequantize_nodes(
        self, tensor: str, source: str, output: str, scale: str, zero_point: str, granularity: Granularity,
        output_dtype: int | None = None,
    ) -> list[onnx.NodeProto]:
        """QuantizeLinear → DequantizeLinear of ``source`` into ``output`` with the given scale and zero point; with
        ``output_dtype`` (fp8), QuantizeLinear states its type by that attribute instead of reading the zero point."""
        quantized = self.unique(f"{tensor}_quantized")
        quantize_inputs, attributes = [source, scale, zero_point], axis_attributes(granularity)
        if output_dtype is not None:
            quantize_inputs, attributes = [source, scale], attributes | {"output_dtype": output_dtype}
        return [
            helper.make_node(
                "QuantizeLinear", quantize_inputs, [quantized], name=self.unique(f"{tensor}_QuantizeLinear"),
                **attributes,
            ),
            helper.make_node(
                "DequantizeLinear", [quantized, scale, zero_point], [output],
                name=self.unique(f"{tensor}_DequantizeLinear"), **axis_attributes(granularity),
            ),
        ]

    def build(
        self, traced: TracedSim, encodings: dict[str, AnyEncoding], tensor_encodings: dict[str, AnyEncoding],
    ) -> onnx.ModelProto:
        sites = {site.marker_output: site for site in traced.sites}
        rename: dict[str, str] = {}
        nodes = []
        for node in self.model.graph.node:
            node.input[:] = [rename.get(i, i) for i in node.input]
            if node.domain != MARKER_DOMAIN:
                nodes.append(node)
                continue
            site = sites[node.output[0]]
            encoding = encodings[marker_quantizer(node)]
            output = node.output[0]
            if output not in self.graph_outputs:
                rename[node.output[0]] = output = self.unique(f"{site.tensor}_dequantized")
            constant = self.constant_source(node.input[0]) if site.is_param else None
            if constant is not None and isinstance(encoding, (Encoding, Fp8Encoding)):
                nodes += self.param_nodes(site.tensor, constant, output, encoding)
            else:
                nodes += self.activation_nodes(site.tensor, node.input[0], output, encoding, [site.quantizer])
        nodes = self.drop_unread_identities(self.propagate(nodes, traced, tensor_encodings))
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        self.model.graph.initializer.extend(self.new_initializers)
        self.drop_unused_initializers()
        opsets = [o for o in self.model.opset_import if o.domain != MARKER_DOMAIN]
        for entry in opsets:
            if entry.domain in ("", "ai.onnx"):
                entry.version = max(entry.version, self.opset)
        del self.model.opset_import[:]
        self.model.opset_import.extend(opsets)
        helper.set_model_props(self.model, {QDQ_METADATA_KEY: json.dumps(self.metadata)})
        onnx.checker.check_model(self.model)
        return self.model

    def drop_unread_identities(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Identity nodes nobody reads: the exporter reads a weight equal to another (a tied one) through an Identity
        of the first, which the weight's own integer copy replaces; left in place it would keep the float weight."""
        read, kept = set(self.graph_outputs), []
        for node in reversed(nodes):
            if node.op_type != "Identity" or node.output[0] in read:
                kept.append(node)
                read.update(node.input)
                for attribute in node.attribute:  # names an If/Loop body reads from the graph around it
                    for graph in (attribute.g, *attribute.graphs):
                        read.update(name for inner in graph.node for name in inner.input)
        return kept[::-1]

    def drop_unused_initializers(self) -> None:
        """The float weights are replaced by their integer versions; keep only what nodes read."""
        used = {name for node in self.model.graph.node for name in node.input}
        kept = [init for init in self.model.graph.initializer if init.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)

    def propagate(
        self, nodes: list[onnx.NodeProto], traced: TracedSim, tensor_encodings: dict[str, AnyEncoding]
    ) -> list[onnx.NodeProto]:
        """Q/DQ after data-movement outputs that inherit an encoding (see `TracedSim.propagated`)."""
        result, rename = [], {}
        for node in nodes:
            node.input[:] = [rename.get(i, i) for i in node.input]
            result.append(node)
            for output in node.output:
                if output in traced.propagated and output not in self.graph_outputs:
                    dequantized = rename[output] = self.unique(f"{output}_dequantized")
                    result += self.activation_nodes(output, output, dequantized, tensor_encodings[output], [])
        return result


def build_qdq_model(
    traced: TracedSim, encodings: dict[str, AnyEncoding], tensor_encodings: dict[str, AnyEncoding], opset: int,
) -> onnx.ModelProto:
    """QDQ model of the traced sim; ``encodings`` maps every enabled quantizer's name to its encoding (or float format),
    ``tensor_encodings`` is ``traced.tensor_encodings(encodings)``."""
    return _QdqBuilder(traced, opset).build(traced, encodings, tensor_encodings)
