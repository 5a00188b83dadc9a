"""Integer-kernel emulation: the sim computes, op for op, what a named integer runtime computes.

The default sim fake-quantizes: a convolution runs in float32 on dequantized values and its output is divided
by the output scale and rounded. An integer runtime instead accumulates ``Σ q_x·q_w`` exactly in int32, adds an
int32 bias and *requantizes* the accumulator with its own arithmetic (multiplier precision, rounding, clamping).
Ties and float32 rounding then break differently (≤ 1 LSB per layer), and the differences compound through deep
networks and residual adds. In emulation mode (``sim.emulate("onnxruntime")``) every op the runtime fuses into
an integer kernel is replaced by an *emulating* forward that recovers the integer grid indices of its inputs,
accumulates them exactly and requantizes with the arithmetic of a `RuntimeModel`:

* `OnnxRuntimeCPU` (``"onnxruntime"``): ONNX Runtime's CPU (MLAS, x86-64) kernels, read from its sources
  (``mlas/lib/requantize``, ``qladd``/``intrinsics/avx2/qladd_avx2.cpp``, ``qlgavgpool.cpp``) and checked
  against ORT 1.32 output for output:

  - QLinearConv / QGemm / QLinearMatMul: ``acc = Σ (q_x - z_x)(q_w - z_w) + bias_int32``;
    ``bias_int32 = round_half_even(b / fl32(s_x·s_w))`` (ORT quantizes a float bias itself, with this
    formula, when it fuses ``DQ→Conv→Q``); ``y = sat(rne(fl32(fl32(acc) · M)) + z_y)`` with the float32
    multiplier ``M = fl32(fl32(s_x·s_w) / s_y)`` (per output channel for per-channel weights).
  - QLinearAdd (8-bit, AVX2 kernel): ``r_a = fl32(s_a/s_c)``, ``r_b = fl32(s_b/s_c)``,
    ``c = fl32(z_c - fma(r_a, z_a, fl32(r_b·z_b)))``, then ``y = sat(rne(fma(q_a, r_a, fma(q_b, r_b, c))))``.
  - QLinearMul (SSE2 kernel): ``y = sat(rne(fl32(fl32(fl32((q_a - z_a)(q_b - z_b)) · fl32(s_a·s_b/s_c)) + z_c)))``.
  - QLinearAveragePool: float32 sum of the dequantized window in row-major order, divided by the count,
    ``y = sat(rne(fl32(y / s_y) + z_y))``.
  - QLinearSigmoid: a 256-entry table of MLAS's own logistic (Eigen's rational approximation, FMA3 kernel),
    quantized with a true division; emulated as that logistic followed by the sim's output quantizer.
  - QLinearGlobalAveragePool: ``acc = Σ q - z_x·N``, requantized as above with
    ``M = fl32(s_x / fl32(s_y · N))``.
  - A ReLU / ReLU6 between the op and its output quantizer is removed by ORT when the output grid already
    clamps it (ReLU: zero point at the grid's lowest value; Clip: the clip range covers the grid); those are
    emulated as part of the fused op. Otherwise ORT keeps the op in float and so does the emulating sim.

* `FixedPointRequantization` (``"fixed-point"``): the integer-only requantization of DSP/NPU toolchains
  (gemmlowp / TFLite reference kernels): an int32 multiplier in Q0.31 and a right shift, rounding half away
  from zero, and TFLite's fixed-point add. It plugs into the same emulated ops and shows how another runtime's
  requantization is modelled; it is not checked against a particular device.

What stays approximate (computed by the default fake-quantized path even in emulation mode), and why:

* ops whose grids are not 8-bit, or whose producers cannot be read off the fx graph (a quantized input that
  reaches the op through a module the sim could not trace): ORT does not fuse them the same way, or the sim
  does not know which grid the runtime sees;
* ops ORT leaves in float between Q/DQ pairs (MaxPool, Flatten, Transpose: exact in both; Softmax, LayerNorm,
  Gelu...: float in ORT too, so the default sim's float32 math is already the runtime's, up to op order);
* QLinearConcat (ORT requantizes each input through a lookup table) and ConvTranspose: not emulated yet;
* broadcast adds and muls (a scalar operand takes another path in ORT's kernels), average pools with
  ``ceil_mode`` or a ``divisor_override``;
* on CPUs without AVX-512 VNNI / AVX-VNNI, ORT's u8s8 kernels use ``vpmaddubsw``, whose int16 pair sums
  saturate for large operands; the emulation accumulates exactly (as VNNI CPUs and ARM do).

Emulation is for evaluation: it computes under ``no_grad`` and falls back to the default path while the sim
calibrates, while a quantizer involved is disabled or uncalibrated, and during ONNX export.
"""

from __future__ import annotations

import math
import types
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgequant.quantization import PerChannel, Quantizer
from edgequant.quantization.encoding import grid_steps
from edgequant.quantization.granularity import PER_TENSOR
from edgequant.sim.graph import FUSED_ACTIVATIONS, ModelGraph
from edgequant.sim.ops import is_data_movement, is_pass_through, module_op_type, weight_output_axis
from edgequant.sim.quantized_module import FunctionalOp, QuantizedModule

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Grid:
    """One quantizer's integer grid, per tensor: signed index ``k = q - z`` in ``[offset, offset + num_steps]``.

    ``zero_point`` is the ONNX zero point (``-offset`` unsigned, 0 signed) and ``q = k + zero_point`` the
    value a runtime stores in its (u)int8 tensor.
    """

    scale: torch.Tensor  # float32, shape () or (C,) for per-channel weights
    offset: torch.Tensor
    num_steps: int
    symmetric: bool

    @classmethod
    def of(cls, quantizer: Quantizer) -> Grid:
        return cls(quantizer.scale.detach().float(), quantizer.offset.detach().float(),
                   grid_steps(quantizer.bitwidth, quantizer.strict_grid), quantizer.symmetric)

    @property
    def zero_point(self) -> torch.Tensor:
        return torch.zeros_like(self.offset) if self.symmetric else -self.offset

    @property
    def largest_index(self) -> float:
        return max(-float(self.offset), float(self.offset) + self.num_steps)

    def indices(self, values: torch.Tensor) -> torch.Tensor:
        """Signed grid indices of values that lie on this grid (float32; exact since ``values = fl32(k·scale)``
        and ``|k| < 2**16``), saturated like the runtime's integer tensor (values off the grid are quantized)."""
        return self.clamp(torch.div(values.float(), self.scale).round_())

    def clamp(self, indices: torch.Tensor) -> torch.Tensor:
        """Saturate indices (in place) to the grid."""
        low = float(self.offset)
        return indices.clamp_(low, low + self.num_steps)

    def values(self, indices: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 values ``k·scale`` (what the sim's fake-quantizer would output)."""
        return indices.float() * self.scale


def _channels(tensor: torch.Tensor, ndim: int, axis: int = 1) -> torch.Tensor:
    """Per-channel values broadcast along ``axis`` of a rank-``ndim`` tensor (scalars stay scalars)."""
    if tensor.dim() == 0:
        return tensor
    shape = [1] * ndim
    shape[axis] = -1
    return tensor.reshape(shape)


class RuntimeModel(ABC):
    """How an integer runtime turns int32 accumulators and integer operands back into a quantized tensor.

    Every method works on signed grid indices (float tensors holding integers, float64 where they may exceed
    2**24) and returns the output's signed indices, clamped to the output grid.
    """

    name: str = ""

    @abstractmethod
    def bias_to_int32(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """The int32 bias the runtime adds to the accumulator (float64 holding integers)."""

    @abstractmethod
    def requantize(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   output: Grid, channel_axis: int = 1) -> torch.Tensor:
        """Requantize ``accumulator`` (scale ``input_scale·weight_scale``; ``weight_scale`` per channel along
        ``channel_axis`` or a scalar) to the output grid."""

    @abstractmethod
    def average(self, sums: torch.Tensor, count: int, source: Grid, output: Grid) -> torch.Tensor:
        """Global average pool: requantize sums of ``count`` input indices to the output grid."""

    @abstractmethod
    def add(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        """Elementwise ``a + b`` of two quantized tensors of the same shape, on the output grid."""

    @abstractmethod
    def mul(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        """Elementwise ``a · b`` of two quantized tensors of the same shape, on the output grid."""

    @abstractmethod
    def average_pool(self, windows: torch.Tensor, counts: torch.Tensor, source: Grid, output: Grid) -> torch.Tensor:
        """Average pool: ``windows`` (..., K, L) holds the dequantized input values of each of the L output
        positions' K window elements (zeros where a window leaves the input), ``counts`` (L,) the divisors."""

    def sigmoid(self, values: torch.Tensor) -> torch.Tensor:
        """The float logistic function the runtime tabulates for its quantized Sigmoid (float32 in and out)."""
        return torch.sigmoid(values)


def _fma_float32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fl32(a·b + c)`` with one rounding, as ``vfmadd`` computes it, for float32 operands: the product is exact
    in float64, and so is the sum unless the operands' exponents are more than ~5 binades apart beyond float64's
    precision (then the float64 sum rounds once more before the float32 rounding: a double rounding that only
    matters on an exact float32 tie, not seen on real grids)."""
    return (a.double() * b.double() + c.double()).float()


class OnnxRuntimeCPU(RuntimeModel):
    """ONNX Runtime's CPU execution provider (MLAS kernels on x86-64): see the module docstring."""

    name = "onnxruntime"

    def bias_to_int32(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        bias_scale = input_scale.float() * weight_scale.float()  # float32, as ORT's Mul of the two scales
        return torch.round(bias.detach().float() / bias_scale).double().clamp_(INT32_MIN, INT32_MAX)

    def requantize(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   output: Grid, channel_axis: int = 1) -> torch.Tensor:
        multiplier = input_scale.float() * weight_scale.float() / output.scale  # float32, left to right
        scaled = accumulator.float() * _channels(multiplier, accumulator.dim(), channel_axis)  # cvtdq2ps, mulps
        return output.clamp(scaled.round_())  # cvtps2dq rounds half to even; then saturate

    def average(self, sums: torch.Tensor, count: int, source: Grid, output: Grid) -> torch.Tensor:
        multiplier = source.scale / (output.scale * float(count))
        return output.clamp((sums.float() * multiplier).round_())

    def add(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        ratio_a, ratio_b = a_grid.scale / output.scale, b_grid.scale / output.scale
        # `z_c - (r_a·z_a + r_b·z_b)` in C++, which the compiler contracts to an FMA (checked on all 65536 input
        # pairs for 300 random grids against ORT 1.32: exact; without the FMA 32 elements differ)
        fixed = output.zero_point - _fma_float32(ratio_a, a_grid.zero_point, ratio_b * b_grid.zero_point)
        q_a, q_b = a + a_grid.zero_point.double(), b + b_grid.zero_point.double()
        total = _fma_float32(q_a, ratio_a, _fma_float32(q_b, ratio_b, fixed))
        rounded = total.round_() - output.zero_point  # the zero point is inside `fixed`
        return output.clamp(rounded)

    def mul(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        # MLAS qlmul (SSE2): fl32((q_a - z_a)(q_b - z_b)) · fl32(s_a·s_b/s_c) + z_c, rounded half to even
        ratio = a_grid.scale * b_grid.scale / output.scale
        total = (a * b).mul_(ratio).add_(output.zero_point)
        return output.clamp(total.round_() - output.zero_point)

    def average_pool(self, windows: torch.Tensor, counts: torch.Tensor, source: Grid, output: Grid) -> torch.Tensor:
        # contrib QLinearAveragePool: float32 sum in window order, divided by the count, then
        # nearbyint(y / s_y + z_y)
        total = windows[..., 0, :].clone()
        for index in range(1, windows.shape[-2]):
            total += windows[..., index, :]
        quotient = (total / counts).div_(output.scale).add_(output.zero_point)
        return output.clamp(quotient.round_() - output.zero_point)

    def sigmoid(self, values: torch.Tensor) -> torch.Tensor:
        return mlas_logistic(values)


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """gemmlowp/TFLite ``QuantizeMultiplier``: ``real = m · 2**(shift - 31)`` with ``m`` in ``[2**30, 2**31)``."""
    if real_multiplier <= 0:
        return 0, 0
    mantissa, shift = math.frexp(real_multiplier)
    quantized = round(mantissa * (1 << 31))
    if quantized == 1 << 31:
        quantized, shift = quantized // 2, shift + 1
    return quantized, shift


def _saturating_rounding_doubling_high_mul(a: torch.Tensor, b: int) -> torch.Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int64 tensors holding int32 values."""
    product = a * b
    nudge = torch.where(product >= 0, 1 << 30, 1 - (1 << 30))
    result = torch.div(product + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(overflow, torch.full_like(result, INT32_MAX), result)


def _rounding_divide_by_pot(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """gemmlowp ``RoundingDivideByPOT``: arithmetic right shift, rounding half away from zero."""
    if exponent <= 0:
        return x
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).long()
    return (x >> exponent) + (remainder > threshold).long()


def _multiply_by_quantized_multiplier(x: torch.Tensor, multiplier: int, shift: int) -> torch.Tensor:
    left, right = max(shift, 0), max(-shift, 0)
    shifted = torch.clamp(x * (1 << left), INT32_MIN, INT32_MAX)
    return _rounding_divide_by_pot(_saturating_rounding_doubling_high_mul(shifted, multiplier), right)


class FixedPointRequantization(RuntimeModel):
    """Integer-only requantization (gemmlowp / TFLite reference kernels, as DSP and NPU toolchains do it).

    The real multiplier ``s_x·s_w/s_y`` becomes an int32 ``m`` and a shift, ``y = z_y + RoundingDivideByPOT(
    SaturatingRoundingDoublingHighMul(acc, m), shift)``; the bias is ``round(b / (s_x·s_w))`` in double
    precision; an add rescales both operands to a common grid with 20 extra bits (TFLite's ``left_shift``).
    """

    name = "fixed-point"
    add_left_shift = 20

    def bias_to_int32(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        bias_scale = input_scale.double() * weight_scale.double()
        return torch.round(bias.detach().double() / bias_scale).clamp(INT32_MIN, INT32_MAX)

    def _requantize_with(self, accumulator: torch.Tensor, real_multipliers: torch.Tensor, output: Grid,
                         channel_axis: int) -> torch.Tensor:
        acc = accumulator.long()
        multipliers = real_multipliers.reshape(-1).tolist()
        if len(multipliers) == 1:
            result = _multiply_by_quantized_multiplier(acc, *quantize_multiplier(multipliers[0]))
        else:
            moved = acc.movedim(channel_axis, 0)
            result = torch.stack([
                _multiply_by_quantized_multiplier(channel, *quantize_multiplier(m))
                for channel, m in zip(moved, multipliers, strict=True)
            ]).movedim(0, channel_axis)
        return output.clamp(result.float())

    def requantize(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   output: Grid, channel_axis: int = 1) -> torch.Tensor:
        real = input_scale.double() * weight_scale.double() / output.scale.double()
        return self._requantize_with(accumulator, real, output, channel_axis)

    def average(self, sums: torch.Tensor, count: int, source: Grid, output: Grid) -> torch.Tensor:
        real = source.scale.double() / (output.scale.double() * count)
        return self._requantize_with(sums, real, output, 1)

    def add(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        twice_max = 2 * max(float(a_grid.scale), float(b_grid.scale))
        scaled = []
        for indices, grid in ((a, a_grid), (b, b_grid)):
            shifted = indices.long() * (1 << self.add_left_shift)
            multiplier = quantize_multiplier(float(grid.scale) / twice_max)
            scaled.append(_multiply_by_quantized_multiplier(shifted, *multiplier))
        out_multiplier = twice_max / ((1 << self.add_left_shift) * float(output.scale))
        total = _multiply_by_quantized_multiplier(scaled[0] + scaled[1], *quantize_multiplier(out_multiplier))
        return output.clamp(total.float())


    def mul(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        real = a_grid.scale.double() * b_grid.scale.double() / output.scale.double()
        return self._requantize_with(a * b, real, output, 1)

    def average_pool(self, windows: torch.Tensor, counts: torch.Tensor, source: Grid, output: Grid) -> torch.Tensor:
        sums = source.indices(windows).sum(dim=-2)
        result = torch.empty_like(sums)
        for count in counts.unique().tolist():
            where = counts == count
            result[..., where] = self.average(sums[..., where], int(count), source, output)
        return result


_LOGISTIC_ALPHA = torch.tensor([4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
                                8.51377133304701e-03, 2.48287947061529e-01])
_LOGISTIC_BETA = torch.tensor([6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
                               1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01])


def mlas_logistic(values: torch.Tensor) -> torch.Tensor:
    """MLAS's logistic (``MlasComputeLogistic``, the FMA3 kernel of x86-64): Eigen's rational approximation on
    ``[-18, 18]``, evaluated with fused multiply-adds in float32."""
    value = values.float().clamp(-18.0, 18.0)
    squared = value * value
    p = _fma_float32(squared, _LOGISTIC_ALPHA[0], _LOGISTIC_ALPHA[1])
    for alpha in _LOGISTIC_ALPHA[2:]:
        p = _fma_float32(p, squared, alpha)
    p = p * value
    q = _fma_float32(squared, _LOGISTIC_BETA[0], _LOGISTIC_BETA[1])
    for beta in _LOGISTIC_BETA[2:]:
        q = _fma_float32(q, squared, beta)
    return (p / q + 0.5).clamp_(0.0, 1.0)


RUNTIME_MODELS: dict[str, Callable[[], RuntimeModel]] = {
    OnnxRuntimeCPU.name: OnnxRuntimeCPU,
    FixedPointRequantization.name: FixedPointRequantization,
}
"""Runtime models `QuantSim.emulate` accepts by name."""


# -- which ops are fused, and which grids they read and write -------------------------------------------------

@dataclass
class EmulatedOp:
    """One fused integer op: the module whose forward is replaced, the grids it reads and writes."""

    name: str
    kind: str  # Conv, Gemm, MatMul, Add, Mul, GlobalAveragePool, AveragePool, Sigmoid
    module: nn.Module
    inputs: list[Quantizer]
    output: Quantizer
    activation: nn.Module | None = None  # the ReLU/ReLU6 fused between the op and its output quantizer


@dataclass
class EmulationPlan:
    """What `plan_emulation` found: the ops emulated, and the candidates left to the default path, with why."""

    runtime: RuntimeModel
    ops: list[EmulatedOp] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        lines = [f"emulating {self.runtime.name}: " + (", ".join(f"{k}×{n}" for k, n in sorted(counts.items()))
                                                      or "no op")]
        lines += [f"  not emulated: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _op_kind(module: nn.Module) -> str | None:
    if not isinstance(module, QuantizedModule):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "Conv"
    if isinstance(module, nn.Linear):
        return "Gemm"
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return "GlobalAveragePool" if _is_global_pool_size(module.output_size) else None
    if isinstance(module, nn.AvgPool2d):
        return "AveragePool" if not module.ceil_mode and module.divisor_override is None else None
    if isinstance(module, FunctionalOp) and module.onnx_op_type in _FUNCTIONAL_KINDS:
        return module.onnx_op_type
    if isinstance(module, nn.Sigmoid):
        return "Sigmoid"
    return None


_FUNCTIONAL_KINDS = ("Add", "Mul", "MatMul", "GlobalAveragePool", "Sigmoid")
_BINARY_KINDS = ("Add", "Mul", "MatMul")


def _is_global_pool_size(size: Any) -> bool:
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


class _GraphIndex:
    """The sim's fx graphs (the root's and nested ones), to follow a tensor to the quantizer that produced it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict[str, fx.GraphModule] = {
            name: m for name, m in model.named_modules() if isinstance(m, fx.GraphModule)
        }
        self.calls: dict[str, tuple[str, fx.Node]] = {}  # nested graph name -> (parent graph name, its call node)
        for prefix, graph_module in self.graphs.items():
            for node in graph_module.graph.nodes:
                if node.op == "call_module":
                    full = _join(prefix, node.target)
                    if full in self.graphs:
                        self.calls[full] = (prefix, node)
        self.views = {prefix: ModelGraph.of_traced(module, prefix) for prefix, module in self.graphs.items()}

    def module(self, prefix: str, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(_join(prefix, node.target))

    def producer_quantizer(self, prefix: str, node: Any) -> Quantizer | None:
        """The enabled quantizer whose output ``node`` holds (through pass-through and data-movement ops)."""
        while isinstance(node, fx.Node):
            if node.op == "placeholder":
                index = [n for n in self.graphs[prefix].graph.nodes if n.op == "placeholder"].index(node)
                if prefix in self.calls:
                    prefix, call = self.calls[prefix]
                    node = call.args[index] if index < len(call.args) else None
                    continue
                quantizers = getattr(self.model, "model_input_quantizers", {})
                quantizer = quantizers[str(index)] if str(index) in quantizers else None
                return quantizer if quantizer is not None and quantizer.enabled else None
            if node.op == "call_module":
                module = self.module(prefix, node)
                if isinstance(module, Quantizer):  # a model-input quantizer the sim placed in the graph
                    return module if module.enabled else None
                if isinstance(module, fx.GraphModule):
                    prefix = _join(prefix, node.target)
                    node = next(n for n in module.graph.nodes if n.op == "output").args[0]
                    continue
                quantizers = getattr(module, "output_quantizers", {})
                if "0" in quantizers and quantizers["0"].enabled:
                    return quantizers["0"]
                if is_pass_through(module):
                    node = node.args[0] if node.args else None
                    continue
                return None
            if node.op in ("call_function", "call_method") and is_data_movement(node.target):
                node = node.args[0] if node.args else None
                continue
            return None
        return None

    def fused_output(self, prefix: str, node: fx.Node) -> tuple[Quantizer | None, nn.Module | None]:
        """The quantizer that ends ``node``'s fused group (its own, or that of the activation the graph says is
        fused after it), and that activation; no quantizer where an unfolded BatchNorm is in between."""
        view = self.views[prefix]
        quantizers = getattr(self.module(prefix, node), "output_quantizers", {})
        activation = None
        for fused in view.fused_after(view.node_of(node)):
            if "0" in quantizers:
                break
            if module_op_type(fused.module) not in FUSED_ACTIVATIONS:
                return None, None
            activation = fused.module
            quantizers = getattr(activation, "output_quantizers", {})
        if "0" not in quantizers:
            return None, activation
        return (quantizers["0"] if quantizers["0"].enabled else None), activation


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _clip_bounds(module: nn.Module) -> tuple[float, float] | None:
    if module_op_type(module) == "Relu":
        return 0.0, math.inf
    if isinstance(module, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


def _activation_implied(module: nn.Module, grid: Grid) -> bool:
    """Does the output grid already clamp what ``module`` clamps (so the runtime drops the activation)?"""
    bounds = _clip_bounds(module)
    if bounds is None:
        return False
    low = float(grid.offset * grid.scale)
    high = float((grid.offset + grid.num_steps) * grid.scale)
    half = float(grid.scale) / 2
    return bounds[0] <= low + half and (bounds[0] >= low - half) and high <= bounds[1] + half


def plan_emulation(model: nn.Module, runtime: RuntimeModel) -> EmulationPlan:
    """Find every op the runtime fuses into an integer kernel, with the quantizers of its inputs and output."""
    plan = EmulationPlan(runtime)
    index = _GraphIndex(model)
    for prefix, graph_module in index.graphs.items():
        for node in graph_module.graph.nodes:
            if node.op != "call_module":
                continue
            name = _join(prefix, node.target)
            module = index.module(prefix, node)
            kind = _op_kind(module)
            if kind is None:
                continue
            reason = _plan_op(plan, index, prefix, node, name, module, kind)
            if reason:
                plan.skipped[name] = reason
    return plan


def _plan_op(plan: EmulationPlan, index: _GraphIndex, prefix: str, node: fx.Node, name: str,
             module: nn.Module, kind: str) -> str:
    """Add ``node``'s op to the plan; returns why not where it is not emulated."""
    if node.kwargs:
        return "called with keyword arguments"
    num_inputs = 2 if kind in _BINARY_KINDS else 1
    args = node.args
    if kind == "GlobalAveragePool" and isinstance(module, FunctionalOp):  # F.adaptive_avg_pool2d(x, 1)
        if len(args) != 2 or not _is_global_pool_size(args[1]):
            return "not a global average pool"
        args = args[:1]
    if len(args) != num_inputs or not all(isinstance(a, fx.Node) for a in args):
        return f"expects {num_inputs} tensor input(s)"
    inputs = []
    for position, arg in enumerate(args):
        own = module.input_quantizers[str(position)] if str(position) in module.input_quantizers else None
        quantizer = own if own is not None and own.enabled else index.producer_quantizer(prefix, arg)
        if quantizer is None:
            return f"input {position} does not come from a quantizer the sim can trace"
        inputs.append(quantizer)
    weight = module.param_quantizers["weight"] if "weight" in getattr(module, "param_quantizers", {}) else None
    if kind in ("Conv", "Gemm"):
        if weight is None or not weight.enabled:
            return "its weight is not quantized"
        if kind == "Conv" and module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the runtime pads in a separate op)"
    output, activation = index.fused_output(prefix, node)
    if output is None:
        return "its output is not quantized by one fused group (op → [ReLU/ReLU6] → quantizer)"
    for quantizer in (*inputs, output, *([weight] if weight is not None else [])):
        granularities = (PER_TENSOR,)
        if quantizer is weight:  # the runtime rescales its accumulator by one multiplier per output channel
            granularities += (PerChannel(weight_output_axis(module, module.weight)),)
        if quantizer.bitwidth != 8 or quantizer.granularity not in granularities:
            return (f"quantizer {quantizer.name} is not an 8-bit per-tensor activation / per-output-channel weight "
                    f"grid ({quantizer.granularity.describe()})")
    plan.ops.append(EmulatedOp(name, kind, module, inputs, output, activation))
    return ""


# -- the emulating forwards -----------------------------------------------------------------------------------

def _ready(quantizers: list[Quantizer]) -> bool:
    return all(q.enabled and not q.calibrating and q.scale is not None for q in quantizers)


def _weight_indices(module: nn.Module, quantizer: Quantizer) -> torch.Tensor:
    """The weight's integer grid indices, rounded exactly as the sim's quantizer rounds them."""
    weight = module._parameters["weight"].detach()
    grid = Grid.of(quantizer)
    scale = quantizer.granularity.broadcast(grid.scale, weight.shape)
    low = quantizer.granularity.broadcast(grid.offset, weight.shape)
    return torch.clamp(torch.round(weight / scale), low, low + grid.num_steps)


def _float_forward(module: nn.Module, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The layer's own (unquantized) forward on integer indices, with integer weights and no bias: keeps what a
    subclass adds around the convolution (e.g. the static "same" padding of EfficientNet's convs)."""
    layer_class = next(c for c in type(module).__mro__[1:]
                       if "forward" in vars(c) and not issubclass(c, QuantizedModule))
    saved = dict(module._parameters)
    module._parameters["weight"] = weights
    if "bias" in saved:
        module._parameters["bias"] = None
    try:
        return layer_class.forward(module, indices)
    finally:
        module._parameters.update(saved)


EXACT_FLOAT32 = 2**24
"""Integers up to this magnitude are exact in float32, and so is every sum of products that stays below it."""


def _accumulate(op: EmulatedOp, runtime: RuntimeModel, x: torch.Tensor, source: Grid) -> torch.Tensor:
    """Exact int32 accumulator (bias included) of a Conv/Gemm, from float arithmetic on integer-valued tensors.

    A float32 convolution is exact when ``max|k_x| · max_c Σ|k_w[c]|`` bounds every partial sum below 2**24
    (integers below 2**24 add exactly in any order). Larger layers split the input indices into a high and a
    low part, ``k_x = 16·h + l`` with ``l`` in [0, 15] and ``|h| ≤ 16``, and sum two exact float32 convolutions
    in float64; float64 throughout (exact below 2**53) is the last resort. The bias is added in float64 unless
    the bound with it stays below 2**24.
    """
    module = op.module
    weight_quantizer = module.param_quantizers["weight"]
    weights = _weight_indices(module, weight_quantizer)
    weight_sum = float(weights.abs().flatten(1).sum(1).max())
    indices = source.indices(x)
    largest = source.largest_index * weight_sum
    if largest < EXACT_FLOAT32:
        accumulator = _float_forward(module, indices, weights)
    elif source.largest_index <= 256 and 16 * weight_sum < EXACT_FLOAT32:
        high = torch.floor(indices / 16)
        low = indices - 16 * high
        accumulator = _float_forward(module, high, weights).double().mul_(16)
        accumulator += _float_forward(module, low, weights)
    else:
        accumulator = _float_forward(module, indices.double(), weights.double())
    bias = module._parameters.get("bias")
    if bias is None:
        return accumulator
    bias_int = runtime.bias_to_int32(bias, source.scale, Grid.of(weight_quantizer).scale)
    if largest + float(bias_int.abs().max()) >= EXACT_FLOAT32:
        accumulator = accumulator.double()
    return accumulator.add_(_channels(bias_int.to(accumulator.dtype), accumulator.dim(),
                                      1 if op.kind == "Conv" else -1))


def _emulated_forward(op: EmulatedOp, runtime: RuntimeModel, default: Callable[..., Any]) -> Callable[..., Any]:
    weight = op.module.param_quantizers["weight"] if op.kind in ("Conv", "Gemm") else None
    quantizers = [*op.inputs, op.output, *([weight] if weight is not None else [])]
    own_output = op.module.output_quantizers["0"] if "0" in op.module.output_quantizers else None

    def forward(self: nn.Module, *args: Any) -> torch.Tensor:
        if not _ready(quantizers) or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return default(*args)
        output = Grid.of(op.output)
        if op.activation is not None and not _activation_implied(op.activation, output):
            return default(*args)  # the runtime keeps this activation in float, and the op with it
        grids = [Grid.of(q) for q in op.inputs]
        with torch.no_grad():
            if op.kind in ("Conv", "Gemm"):
                accumulator = _accumulate(op, runtime, args[0], grids[0])
                channel_axis = 1 if op.kind == "Conv" else accumulator.dim() - 1
                indices = runtime.requantize(accumulator, grids[0].scale, Grid.of(weight).scale, output, channel_axis)
            elif op.kind == "MatMul":
                accumulator = torch.matmul(grids[0].indices(args[0]).double(), grids[1].indices(args[1]).double())
                indices = runtime.requantize(accumulator, grids[0].scale, grids[1].scale, output, 1)
            elif op.kind in ("Add", "Mul"):
                if args[0].shape != args[1].shape:
                    return default(*args)
                elementwise = runtime.add if op.kind == "Add" else runtime.mul
                indices = elementwise(grids[0].indices(args[0]), grids[0], grids[1].indices(args[1]), grids[1],
                                      output)
            elif op.kind == "Sigmoid":  # a table of the runtime's logistic, quantized as the sim's quantizer does
                values = runtime.sigmoid(args[0])
                return own_output(values) if own_output is not None else values
            elif op.kind == "AveragePool":
                indices = _average_pool(op.module, runtime, args[0], grids[0], output)
            else:  # GlobalAveragePool
                spatial = tuple(range(2, args[0].dim()))
                sums = grids[0].indices(args[0]).double().sum(dim=spatial, keepdim=True)
                count = math.prod(args[0].shape[2:])
                indices = runtime.average(sums, count, grids[0], output)
            values = output.values(indices)
        return own_output(values) if own_output is not None else values

    return forward


def _average_pool(module: nn.AvgPool2d, runtime: RuntimeModel, x: torch.Tensor, source: Grid,
                  output: Grid) -> torch.Tensor:
    """Windows of ``x`` in the runtime's order (row-major), the divisor of each output position, pooled."""
    kernel, stride, padding = (torch.nn.modules.utils._pair(v) for v in (module.kernel_size,
                                                                          module.stride or module.kernel_size,
                                                                          module.padding))
    height = (x.shape[-2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    width = (x.shape[-1] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    windows = F.unfold(x.float(), kernel, padding=padding, stride=stride)  # (N, C·K, L)
    windows = windows.view(x.shape[0], x.shape[1], kernel[0] * kernel[1], -1)
    if module.count_include_pad:
        counts = torch.full((windows.shape[-1],), float(kernel[0] * kernel[1]))
    else:
        ones = torch.ones(1, 1, *x.shape[-2:])
        counts = F.unfold(ones, kernel, padding=padding, stride=stride).sum(dim=1)[0]
    pooled = runtime.average_pool(windows, counts, source, output)
    return pooled.view(x.shape[0], x.shape[1], height, width)


def install(plan: EmulationPlan) -> None:
    """Replace the forward of every planned op by its emulating forward (an instance attribute)."""
    for op in plan.ops:
        default = types.MethodType(type(op.module).forward, op.module)
        op.module.forward = types.MethodType(_emulated_forward(op, plan.runtime, default), op.module)


def uninstall(plan: EmulationPlan) -> None:
    """Back to the default sim: drop the instance attributes `install` set."""
    for op in plan.ops:
        op.module.__dict__.pop("forward", None)


def runtime_model(runtime: str | RuntimeModel) -> RuntimeModel:
    """A `RuntimeModel` by name (see `RUNTIME_MODELS`), or the instance given."""
    if isinstance(runtime, RuntimeModel):
        return runtime
    if runtime not in RUNTIME_MODELS:
        raise ValueError(f"unknown runtime {runtime!r} to emulate; choose one of {', '.join(RUNTIME_MODELS)} "
                         "or pass a RuntimeModel instance")
    return RUNTIME_MODELS[runtime]()
