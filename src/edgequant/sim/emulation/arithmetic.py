"""The integer runtimes' arithmetic: grids, requantization, rounding and saturation, per `RuntimeModel`
(what each runtime computes is described in `edgequant.sim.emulation`)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.quantization import Quantizer
from edgequant.quantization.encoding import grid_steps

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
        """The quantizer's grid, also while the sim's frozen weights seal its encoding."""
        scale, offset = (quantizer.tensor_values(name).detach().float() for name in ("scale", "offset"))
        return cls(scale, offset, grid_steps(quantizer.bitwidth, quantizer.strict_grid), quantizer.symmetric)

    @property
    def bits(self) -> int:
        """The width of the integer type the export stores the grid in (8 for 255 or 254 steps)."""
        return self.num_steps.bit_length()

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


def channels(tensor: torch.Tensor, ndim: int, axis: int = 1) -> torch.Tensor:
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
    models: str = ""
    """Which runtime, version and CPU class the arithmetic reproduces (printed by `EmulationPlan.summary`)."""

    @abstractmethod
    def bias_to_int32(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """The int32 bias the runtime adds to the accumulator (float64 holding integers)."""

    @abstractmethod
    def requantize(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   output: Grid, channel_axis: int = 1) -> torch.Tensor:
        """Requantize ``accumulator`` (scale ``input_scale·weight_scale``; ``weight_scale`` per channel along
        ``channel_axis`` or a scalar) to the output grid."""

    def matmul_add(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, output: Grid) -> torch.Tensor:
        """A MatMul by a quantized weight (``weight_scale`` per last-axis channel or a scalar) followed by a float
        bias Add, then the output's quantizer; ``accumulator`` holds no bias. By default fused like a Gemm."""
        if bias is not None:
            accumulator = accumulator.double() + self.bias_to_int32(bias, input_scale, weight_scale)
        return self.requantize(accumulator, input_scale, weight_scale, output, accumulator.dim() - 1)

    @abstractmethod
    def average(self, sums: torch.Tensor, count: int, source: Grid, output: Grid) -> torch.Tensor:
        """Global average pool: requantize sums of ``count`` input indices to the output grid."""

    @abstractmethod
    def add(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        """Elementwise ``a + b`` of two broadcastable quantized tensors, on the output grid."""

    @abstractmethod
    def mul(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        """Elementwise ``a · b`` of two broadcastable quantized tensors, on the output grid."""

    @abstractmethod
    def average_pool(self, windows: torch.Tensor, counts: torch.Tensor, source: Grid, output: Grid) -> torch.Tensor:
        """Average pool: ``windows`` (..., K, L) holds the dequantized input values of each of the L output
        positions' K window elements (zeros where a window leaves the input), ``counts`` (L,) the divisors."""

    def sigmoid(self, values: torch.Tensor) -> torch.Tensor:
        """The float logistic function the runtime tabulates for its quantized Sigmoid (float32 in and out)."""
        return torch.sigmoid(values)

    def hard_sigmoid(self, values: torch.Tensor) -> torch.Tensor:
        """The runtime's float32 HardSigmoid (what its HardSwish multiplies by)."""
        return torch.nn.functional.hardsigmoid(values)

    def softmax(self, values: torch.Tensor, source: Grid, output: Grid, dim: int) -> torch.Tensor:
        """Softmax along ``dim`` of values on the ``source`` grid, as output grid indices."""
        return output.indices(torch.softmax(values.float(), dim))

    def conv_transpose(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       input_scale: torch.Tensor, weight_scale: torch.Tensor,
                       module: nn.ConvTranspose2d) -> torch.Tensor | None:
        """A ConvTranspose2d on dequantized float32 ``x`` and ``weight`` (scales ``input_scale``, ``weight_scale``
        per output channel), before the output's quantizer; None where the runtime computes what PyTorch does
        (the sim's default forward then runs)."""
        return None

    def float_bias(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """The bias of a float Conv, ConvTranspose or Gemm whose input and weight come from DQ, as the runtime
        adds it (by default the float bias)."""
        return bias.float()

    def float_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   input_scale: torch.Tensor | None, weight_scale: torch.Tensor,
                   module: nn.Conv2d) -> torch.Tensor | None:
        """A Conv2d on dequantized float32 ``x`` and ``weight`` where the runtime has no integer kernel for them
        (scales ``input_scale``, ``weight_scale`` per output channel; no ``input_scale``: a Conv with no Q after it,
        whose bias the runtime leaves float), before the output's quantizer; None where the runtime computes what
        PyTorch does."""
        return None

    def resize(self, values: torch.Tensor, size: tuple[int, int], scales: tuple[float, float], mode: str,
               align_corners: bool) -> torch.Tensor | None:
        """A 2-D ``nearest`` or ``bilinear`` resize of float32 values to ``size`` with the ``scales`` the exported
        model gives the runtime, before the output's quantizer; None where the runtime computes what PyTorch
        does."""
        return None

    def layer_norm(self, values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor | None:
        """A LayerNorm over the last axis of float32 values, before the output's quantizer; None where the runtime
        computes what PyTorch does."""
        return None

    def float_softmax(self, values: torch.Tensor) -> torch.Tensor | None:
        """A float Softmax over the last axis of float32 values (between DQ and Q, where the runtime does not fuse
        a QLinearSoftmax), before the output's quantizer; None where the runtime computes what PyTorch does."""
        return None

    def rms_norm(self, values: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """Llama's RMSNorm ``weight · x / sqrt(mean(x²) + eps)`` over the last axis of float32 values, before the
        output's quantizer; None where the runtime computes what PyTorch does."""
        return None

    def gelu(self, values: torch.Tensor) -> torch.Tensor | None:
        """The exact (erf) GELU of float32 values, before the output's quantizer; None where the runtime computes
        what PyTorch does."""
        return None

    def float_average_pool(self, windows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """AveragePool where the runtime pools in float between DQ and Q: ``windows`` (..., K, L) holds each of the
        L output positions' K window values (zeros where a window leaves the input), ``counts`` (L,) the divisors;
        before the output's quantizer. None where the runtime computes what PyTorch does."""
        return None

    def float_global_average(self, values: torch.Tensor) -> torch.Tensor | None:
        """GlobalAveragePool of float32 ``values`` (N, C, spatial...) where the runtime pools in float between DQ
        and Q, keeping the spatial axes as 1, before the output's quantizer; None where the runtime computes what
        PyTorch does."""
        return None

    def float_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """``a @ b`` of two float32 activations (batch axes broadcast) where the runtime multiplies in float between
        DQ and Q (grids it has no integer kernel for), before the output's quantizer; None where the runtime
        computes what PyTorch does."""
        return None

    def float_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_bits: int,
                     as_matmul: bool, weight_path: WeightPath = "fused") -> torch.Tensor | None:
        """``x @ weight.T + bias`` of float32 values (``x``: rows, ``weight``: output × input, as its DQ gives it)
        where the runtime runs a Linear in float between DQ and Q (activations or a weight it has no integer kernel
        for, an input indexed after its DQ), before the output's quantizer; ``as_matmul``: exported as MatMul (an
        input of rank > 2), else as Gemm; ``weight_path``: how the MatMul reads its weight (`WeightPath`). None
        where the runtime computes what PyTorch does."""
        return None


def eigen_sum_float32(values: torch.Tensor) -> torch.Tensor | None:
    """The float32 sum over the last axis in the order of Eigen's vectorised ``sum()`` on SSE packets of 4 (what
    ORT's CPU reductions call, e.g. ReduceMean over the last axis): two packet accumulators over alternate
    packets, added, an odd last packet added, then the lanes as ``(l0 + l2) + (l1 + l3)``. Rows must start on a
    16-byte boundary for that order (Eigen sums a misaligned head apart): None unless the length is a multiple
    of 4."""
    length = values.shape[-1]
    if length % 4:
        return None
    packets = values.float().unflatten(-1, (length // 4, 4))
    first = packets[..., 0, :].clone()
    if length >= 8:
        second = packets[..., 1, :].clone()
        for pair in range(1, length // 8):
            first += packets[..., 2 * pair, :]
            second += packets[..., 2 * pair + 1, :]
        first += second
        if (length // 4) % 2:
            first += packets[..., -1, :]
    return reduce_four_lanes(first)


def reduce_four_lanes(lanes: torch.Tensor) -> torch.Tensor:
    """A 4-lane float32 vector (last axis) summed as SSE reductions do (``MlasReduceAddFloat32x4``, Eigen's
    ``predux``): ``(l0 + l2) + (l1 + l3)``."""
    return (lanes[..., 0] + lanes[..., 2]) + (lanes[..., 1] + lanes[..., 3])


def lane_sums(values: torch.Tensor, width: int) -> torch.Tensor:
    """``width`` float32 accumulators over the last axis, element ``i`` added into lane ``i mod width`` in order (a
    vector kernel's loop); the length must be a multiple of ``width``."""
    blocks = values.float().unflatten(-1, (-1, width))
    lanes = blocks[..., 0, :].clone()
    for block in range(1, blocks.shape[-2]):
        lanes += blocks[..., block, :]
    return lanes


def scalar_operand(a: torch.Size, b: torch.Size) -> int | None:
    """Which operand of a broadcast binary op ONNX Runtime's broadcaster hands to the kernel as one scalar per
    span (0 or 1), or None when both run along the span. The span is the innermost run of output axes; an
    operand of size 1 on the last axis longer than 1 (an SE block's ``[N, C, 1, 1]``) is a scalar there."""
    shape = torch.broadcast_shapes(a, b)
    axis = next((i for i in range(len(shape) - 1, -1, -1) if shape[i] > 1), None)
    for operand, operand_shape in enumerate((a, b)):
        padded = (1,) * (len(shape) - len(operand_shape)) + tuple(operand_shape)
        if axis is None or padded[axis] == 1:
            return operand
    return None


def fma_float32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``fl32(a·b + c)`` with one rounding, as ``vfmadd`` computes it, for float32 operands: the product is exact
    in float64, and so is the sum unless the operands' exponents are more than ~5 binades apart beyond float64's
    precision (then the float64 sum rounds once more before the float32 rounding: a double rounding that only
    matters on an exact float32 tie, not seen on real grids)."""
    return (a.double() * b.double() + c.double()).float()


def fma_chain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_k a[k]·b[k]`` (broadcast) as one chain of `fma_float32` steps from zero, in order of the first axis;
    the operands are widened to float64 once, each step rounds to float32."""
    a, b = a.double(), b.double()
    chain = torch.zeros(torch.broadcast_shapes(a.shape[1:], b.shape[1:]), dtype=torch.float64, device=a.device)
    for a_k, b_k in zip(a, b, strict=True):
        chain = torch.addcmul(chain, a_k, b_k).float().double()
    return chain.float()


WeightPath = Literal["fused", "transposed", "dequantized"]
"""How the runtime's MatMul reads a Linear's weight, exported as DequantizeLinear then Transpose: ``fused`` into
MatMulNBits (a per-channel or per-tensor weight), ``transposed`` (a blocked weight, whose DQ the Transpose stays
after: a float MatMul with B transposed), ``dequantized`` (a per-channel or per-tensor weight of a MatMul without
bias whose input and output grids differ in width, as a 16-bit layer writing an 8-bit KV cache: ORT does not fuse
it, its transpose optimizer moves the Transpose into the DQ's initializer, and a float MatMul reads the DQ's
``[K, N]`` output as it is; with a bias Add between them ORT fuses it as usual)."""


class OnnxRuntimeCPU(RuntimeModel):
    """ONNX Runtime's CPU execution provider (MLAS kernels on x86-64): see the module docstring."""

    name = "onnxruntime"
    models = ("ONNX Runtime 1.32's CPU kernels on x86-64 with AVX2 and FMA, int32 accumulation exact as on CPUs with "
              "AVX-512 VNNI / AVX-VNNI (without VNNI, ORT's u8s8 pair sums can saturate)")

    def bias_to_int32(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        bias_scale = input_scale.float() * weight_scale.float()  # float32, as ORT's Mul of the two scales
        quantized = torch.round(bias.detach().float() / bias_scale).double()
        # a quotient outside int32 converts to 0x80000000 (x86's "integer indefinite"), whatever its sign: a dead
        # channel (tiny weight scale, large bias) gets INT32_MIN, not a saturated bias
        return quantized.masked_fill_((quantized < INT32_MIN) | (quantized > INT32_MAX), INT32_MIN)

    def requantize(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   output: Grid, channel_axis: int = 1) -> torch.Tensor:
        multiplier = input_scale.float() * weight_scale.float() / output.scale  # float32, left to right
        scaled = accumulator.float() * channels(multiplier, accumulator.dim(), channel_axis)  # cvtdq2ps, mulps
        return output.clamp(scaled.round_())  # cvtps2dq rounds half to even; then saturate

    def matmul_add(self, accumulator: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, output: Grid) -> torch.Tensor:
        if bias is None:  # DQ → MatMul → Q: QLinearMatMul, requantized as QGemm
            return super().matmul_add(accumulator, input_scale, weight_scale, None, output)
        # DQ → MatMul → Add → Q is not fused into one kernel: MatMulIntegerToFloat scales the int32 accumulator
        # to float32 (`fl32(acc) · fl32(s_x·s_w)`), the bias is a float32 Add, and QuantizeLinear divides
        values = accumulator.float() * (input_scale.float() * weight_scale.float()) + bias.float()
        return output.clamp(torch.div(values, output.scale).round_())

    def average(self, sums: torch.Tensor, count: int, source: Grid, output: Grid) -> torch.Tensor:
        multiplier = source.scale / (output.scale * float(count))
        return output.clamp((sums.float() * multiplier).round_())

    def add(self, a: torch.Tensor, a_grid: Grid, b: torch.Tensor, b_grid: Grid, output: Grid) -> torch.Tensor:
        if scalar_operand(a.shape, b.shape) == 0:  # the kernel takes the operand along the span as `a`
            a, a_grid, b, b_grid = b, b_grid, a, a_grid  # (checked on all input pairs against ORT 1.32)
        ratio_a, ratio_b = a_grid.scale / output.scale, b_grid.scale / output.scale
        # `z_c - (r_a·z_a + r_b·z_b)` in C++, which the compiler contracts to an FMA (checked on all 65536 input
        # pairs for 300 random grids against ORT 1.32: exact; without the FMA 32 elements differ)
        fixed = output.zero_point - fma_float32(ratio_a, a_grid.zero_point, ratio_b * b_grid.zero_point)
        q_a, q_b = a + a_grid.zero_point.double(), b + b_grid.zero_point.double()
        total = fma_float32(q_a, ratio_a, fma_float32(q_b, ratio_b, fixed))  # a scalar `b`'s FMA runs first too
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
        quotient = self.float_average_pool(windows, counts).div_(output.scale).add_(output.zero_point)
        return output.clamp(quotient.round_() - output.zero_point)

    def float_average_pool(self, windows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # cpu/nn/pool_functors.h: a float32 sum in window order (row-major; the padding skipped, which adding its
        # zeros matches), divided by the count (checked against ORT 1.32 with and without padding, ceil mode and
        # count_include_pad, strides 1 to 7)
        total = windows[..., 0, :].clone()
        for index in range(1, windows.shape[-2]):
            total += windows[..., index, :]
        return total / counts

    def sigmoid(self, values: torch.Tensor) -> torch.Tensor:
        return mlas_logistic(values)

    def softmax(self, values: torch.Tensor, source: Grid, output: Grid, dim: int) -> torch.Tensor:
        # contrib QLinearSoftmax (uint8): a 256-entry float32 table e[d] = fl32(exp((d + shift)·s_x)) (libm's exp
        # in double) of the distance d = q - max(q) in [-255, 0]; shift = max(0, log(fl32(FLT_MAX / D)) - 5) / s_x
        # keeps the sum below FLT_MAX, its log a float32 one (the C++ overload for a float argument, correctly
        # rounded here). A float32 sum in order along the axis, then `nearbyint(e · floor(1/s_y) / sum) + z_y`,
        # saturated at 255 only, on the exact quotient: ORT's binary rounds neither the product nor the quotient
        # to float32 (checked on 67 million outputs, 40 grids of 20-130 levels; float32 rounding there, or a log in
        # double, flips about one output in five million).
        levels = (source.indices(values) + source.zero_point).movedim(dim, -1)
        length = levels.shape[-1]
        scale = float(source.scale)
        quotient = float(torch.tensor(torch.finfo(torch.float32).max) / length)  # float32 division
        shift = max(0.0, float(torch.tensor(math.log(quotient), dtype=torch.float32)) - 5) / scale
        table = torch.tensor([math.exp((d - 255 + shift) * scale) for d in range(256)], dtype=torch.float64)
        exps = table.float().to(levels.device)[(levels - levels.amax(dim=-1, keepdim=True) + 255).long()]
        total = exps[..., 0].clone()
        for index in range(1, length):
            total += exps[..., index]
        inverse = math.floor(float(torch.tensor(1.0) / output.scale))
        rounded = (exps.double() * inverse).div_(total.double().unsqueeze(-1)).round_()
        indices = rounded.add_(output.zero_point).clamp_(max=255).sub_(output.zero_point)
        return indices.float().movedim(-1, dim)

    def conv_transpose(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       input_scale: torch.Tensor, weight_scale: torch.Tensor,
                       module: nn.ConvTranspose2d) -> torch.Tensor | None:
        # float ConvTranspose between DQ and Q (cpu/nn/conv_transpose.cc): per group an MLAS SGEMM with a transposed
        # filter, `col = W^T · X`, then Col2im adds each kernel tap's column into the zeroed output in row-major tap
        # order, then the bias (a float32 Add per channel)
        if x.shape[-2] * x.shape[-1] == 1:  # SGEMM with N = 1 takes MLAS's M1 kernel, whose order is not modelled
            return None
        groups = module.groups
        batch, in_channels, height, width = x.shape
        taps = module.kernel_size[0] * module.kernel_size[1]
        filters = weight.reshape(groups, in_channels // groups, -1)  # (G, K, M): M = output channels per group · taps
        inputs = x.float().reshape(batch, groups, in_channels // groups, height * width)
        columns = mlas_sgemm_columns(filters, inputs)  # (N, G, M, H·W)
        columns = columns.reshape(batch, module.out_channels, taps, height, width)
        output = _col2im(columns, module)
        return self._add_float_bias(output, bias, input_scale, weight_scale)

    def float_bias(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        # ORT's BiasQuantization turns such a float bias into DQ(int32): the int32 is the runtime's own
        # `bias_to_int32`, dequantized as fl32(fl32(int32) · fl32(s_x·s_w)); where the weight has fewer scales than
        # the bias (groups, blocks) the bias stays float
        if weight_scale.numel() in (1, bias.numel()):
            return self.bias_to_int32(bias, input_scale, weight_scale).float() * (input_scale * weight_scale)
        return bias.float()

    def _add_float_bias(self, output: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                        weight_scale: torch.Tensor) -> torch.Tensor:
        """The bias as ORT runs it (`float_bias`; as given without ``input_scale``), added per channel in float32."""
        if bias is None:
            return output
        added = bias.float() if input_scale is None else self.float_bias(bias, input_scale, weight_scale)
        return output + channels(added, output.dim())

    def float_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   input_scale: torch.Tensor | None, weight_scale: torch.Tensor,
                   module: nn.Conv2d) -> torch.Tensor | None:
        # a float Conv between DQ and Q (cpu/nn/conv.cc, MLAS conv.cpp): per image and group, the input unfolded
        # into columns (im2col: taps in channel, row, column order; a 1×1 convolution reads the input as is, the
        # same product) and an MLAS SGEMM of the filters by them; one filter per group (depthwise) is a single-row
        # product, MLAS's M1 kernel. Then the bias
        if isinstance(module.padding, str):
            return None
        groups, batch = module.groups, x.shape[0]
        columns = F.unfold(x.float(), module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        size = [(length + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for length, pad, dilation, kernel, stride
                in zip(x.shape[-2:], module.padding, module.dilation, module.kernel_size, module.stride, strict=True)]
        columns = columns.reshape(batch, groups, -1, columns.shape[-1])  # (N, G, K, L)
        filters = weight.float().reshape(1, groups, module.out_channels // groups, -1)  # (1, G, M, K)
        product = mlas_sgemm_m1(filters, columns) if filters.shape[2] == 1 else mlas_sgemm(filters, columns)
        output = product.reshape(batch, module.out_channels, *size)
        return self._add_float_bias(output, bias, input_scale, weight_scale)

    def resize(self, values: torch.Tensor, size: tuple[int, int], scales: tuple[float, float], mode: str,
               align_corners: bool) -> torch.Tensor | None:
        # float Resize between DQ and Q (cpu/tensor/upsample.h, .cc), NCHW and NHWC alike: nearest reads
        # floor(fl32(y / scale)) ("asymmetric", "floor", as exported); bilinear maps each output position to a
        # float32 source coordinate, clamps it, and sums the four taps left to right with float32 weights
        # fl32(d_x·d_y) (checked on every input level against ORT 1.32; PyTorch's nested lerp rounds otherwise)
        if mode == "nearest":
            rows, columns = (_nearest_sources(length, values.shape[axis - 2], scale)
                             for axis, (length, scale) in enumerate(zip(size, scales, strict=True)))
            return values.float()[..., rows[:, None], columns]
        (top, bottom, near_y, far_y), (left, right, near_x, far_x) = (
            _bilinear_taps(length, values.shape[axis - 2], scale, align_corners)
            for axis, (length, scale) in enumerate(zip(size, scales, strict=True)))
        near_y, far_y = near_y[:, None], far_y[:, None]
        x = values.float()
        rows_top, rows_bottom = x[..., top, :], x[..., bottom, :]
        return ((far_x * far_y) * rows_top[..., left] + (near_x * far_y) * rows_top[..., right]
                + (far_x * near_y) * rows_bottom[..., left] + (near_x * near_y) * rows_bottom[..., right])

    def hard_sigmoid(self, values: torch.Tensor) -> torch.Tensor:
        # ONNX HardSigmoid(alpha=fl32(1/6), beta=0.5), as exported and as ORT's HardSwish function body runs it
        # (PyTorch's `clip(x + 3, 0, 6)/6` rounds otherwise at some levels)
        return (values.float() * _ONE_SIXTH + 0.5).clamp_(0.0, 1.0)

    def layer_norm(self, values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor | None:
        # float LayerNormalization between DQ and Q, read off ORT 1.32's outputs (Y, Mean, InvStdDev: each
        # bit-identical on 4,000 rows of 384 grid values): the mean summed in double, rounded to float32;
        # d = fl32(x - mean); Σd² in 8 float32 FMA lanes (element i in lane i mod 8), the lanes added as
        # (l0+l4, l1+l5, l2+l6, l3+l7), then in pairs (0+2, 1+3), then 0+1; inv = 1/sqrtf(Σd²/n + eps);
        # y = fma(fl32(d·inv), scale, bias). Only lengths that are a multiple of 8 are modelled (the tail's
        # order is not known): others take the default path. The float32 square root is taken in double and
        # rounded, which is the correctly rounded sqrtf (torch's own float32 sqrt is off by an ulp at times).
        length = values.shape[-1]
        if length % 8:
            return None
        x = values.float()
        deviation = x - x.double().sum(-1, keepdim=True).div_(length).float()
        blocks = deviation.unflatten(-1, (length // 8, 8))
        lanes = torch.zeros_like(blocks[..., 0, :])
        for block in range(length // 8):
            lanes = fma_float32(blocks[..., block, :], blocks[..., block, :], lanes)
        lanes = lanes[..., :4] + lanes[..., 4:]
        lanes = lanes[..., :2] + lanes[..., 2:]
        squares = lanes[..., :1] + lanes[..., 1:]
        variance = squares / length + torch.tensor(eps, dtype=torch.float32)
        inverse = torch.reciprocal(variance.double().sqrt_().float())
        normalized = deviation * inverse
        return normalized * weight if bias is None else fma_float32(normalized, weight.float(), bias.float())

    def float_softmax(self, values: torch.Tensor) -> torch.Tensor | None:
        # MLAS's softmax (AVX-512F kernels): the row's maximum, e = MLAS's exp of fl32(x - max), summed in
        # 16 float32 lanes and reduced, each e times fl32(1 / sum)
        exponentials = mlas_exp(values.float() - values.float().amax(-1, keepdim=True))
        return exponentials * torch.reciprocal(_mlas_lane_sum(exponentials)).unsqueeze(-1)

    def rms_norm(self, values: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        # exported as Pow(x, 2), ReduceMean, Add eps, Sqrt, Div(1, ·), Mul by x, Mul by the scale; ORT's
        # DivMulFusion makes it x / sqrt: all float32 and correctly rounded (x·x, sqrtf, the division), except
        # ReduceMean's sum (Eigen's order, `eigen_sum_float32`) divided by the length. PyTorch's x·rsqrt(...)
        # rounds otherwise.
        x = values.float()
        sums = eigen_sum_float32(x * x)
        if sums is None:
            return None
        variance = (sums / x.shape[-1]).unsqueeze(-1) + torch.tensor(eps, dtype=torch.float32)
        return weight.float() * (x / variance.double().sqrt_().float())

    def gelu(self, values: torch.Tensor) -> torch.Tensor | None:
        # exported (opset 17) as Div by fl32(√2), Erf, Add 1, Mul by x, Mul by 0.5, float between DQ and Q: each
        # consumer of x reads its own DQ, so ORT's GeluFusion does not apply. Correctly rounded float32 steps around
        # MLAS's erf (`mlas_erf`); PyTorch's erf rounds otherwise on about one value in eight
        x = values.float()
        return x * (mlas_erf(x / _SQRT2) + 1) * 0.5

    def float_global_average(self, values: torch.Tensor) -> torch.Tensor | None:
        # MlasPool's global kernel (ORT's NchwcTransformer leaves a global pool whose input comes from a DQ alone):
        # four lanes (position p into lane p mod 4) summed in order, reduced as (l0 + l2) + (l1 + l3), the
        # positions past the last full vector added one by one, then a float32 division by the count (checked
        # against ORT 1.32)
        x = values.float().flatten(2)
        full = x.shape[-1] - x.shape[-1] % 4
        total = reduce_four_lanes(lane_sums(x[..., :full], 4)) if full else torch.zeros(x.shape[:-1], device=x.device)
        for position in range(full, x.shape[-1]):
            total += x[..., position]
        average = total / torch.tensor(float(x.shape[-1]), device=x.device)
        return average.reshape(*values.shape[:2], *(1,) * (values.dim() - 2))

    def float_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        # a float MatMul (cpu/math/matmul.cc): an MLAS SGEMM per batch item; a single row takes MLAS's M1 kernel,
        # for a transposed second operand (a transposed view in the sim, exported as a Transpose that ORT fuses
        # into the MatMul: q·kᵀ) its transposed-B variant
        if a.shape[-2] > 1:
            return mlas_sgemm(a, b)
        if b.stride(-2) == 1 and b.stride(-1) != 1:
            return mlas_sgemm_m1_transposed(a, b.transpose(-1, -2))
        return mlas_sgemm_m1(a, b)

    def float_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_bits: int,
                     as_matmul: bool, weight_path: WeightPath = "fused") -> torch.Tensor | None:
        # ORT fuses a weight's DQ and its MatMul (and a bias Add) into MatMulNBits where the DQ feeds the MatMul;
        # a DQ, then Transpose stays a float (Fused)MatMul, an SGEMM like the 8-bit case below. At accuracy level 1
        # (`edgequant.export.runtime_cpu.ORT_SESSION_CONFIG`; the default 4 rounds the input to int8 instead) a
        # 4-bit weight (per channel or per block) is one FMA chain over the whole reduction, then the bias
        # (sqnbitgemm's CompFp32 path; a single row: `sqnbitgemm_m1`). Everything else is an MLAS SGEMM
        # on the dequantized, transposed weight: MatMulNBits dequantizes 8-bit weights for one, and a Gemm is one
        # (cpu/math/gemm.cc): the bias broadcast into the output first, each reduction slice's FMA chain added
        # onto it (beta = 1); a single row is the transposed-B M1 kernel, then the bias. A "dequantized" weight
        # is B as it is ([K, N]): a single row is then the plain M1 kernel
        rows = x.shape[0]
        if as_matmul and weight_path == "fused" and weight_bits == 4:
            product = sqnbitgemm_m1(x, weight) if rows == 1 else mlas_sgemm(x, weight.t(), whole_reduction=True)
            return product if bias is None else product + bias.float()
        if rows == 1 and as_matmul and weight_path == "dequantized":
            return mlas_sgemm_m1(x, weight.t())
        if rows == 1:
            product = mlas_sgemm_m1_transposed(x, weight)
            return product if bias is None else product + bias.float()
        return mlas_sgemm(x, weight.t(), None if bias is None else bias.float())


MLAS_SGEMM_STRIDE = 128
"""MLAS's SGEMM works on slices of 128 reduction terms by 128 output columns, traded one for the other by
`mlas_sgemm_stride_k`."""


def mlas_sgemm_stride_k(depth: int, columns: int) -> int:
    """The reduction slice MLAS's SGEMM (``sgemm.cpp``) sums at a time for a ``depth``-long reduction into
    ``columns`` output columns: 128, halved (the column slice doubled) while half of it still covers a short
    reduction, doubled (the column slice halved, down to 16) while half the column slice covers few columns."""
    stride_n = stride_k = MLAS_SGEMM_STRIDE
    if columns >= depth:
        while stride_k // 2 >= depth:
            stride_n, stride_k = stride_n * 2, stride_k // 2
    else:
        while stride_n > 16 and stride_n // 2 >= columns:
            stride_n, stride_k = stride_n // 2, stride_k * 2
    return stride_k


def mlas_sgemm_columns(filters: torch.Tensor, inputs: torch.Tensor, initial: torch.Tensor | None = None,
                       whole_reduction: bool = False) -> torch.Tensor:
    """``Σ_k filters[g, k, m] · inputs[n, g, k, l]`` in MLAS's float32 order (FMA3 / AVX-512 kernels, ``m`` the
    rows and ``l`` the columns of each product): each slice of `mlas_sgemm_stride_k` terms (all of them with
    ``whole_reduction``) is an FMA chain in ``k`` from zero, and the slices add up in order, onto ``initial`` where
    the output holds it (beta = 1)."""
    total = initial
    depth = filters.shape[1]
    stride = depth if whole_reduction else mlas_sgemm_stride_k(depth, inputs.shape[-1])
    for start in range(0, depth, stride):
        chain = fma_chain(filters[None, :, start:start + stride, :, None].movedim(2, 0),
                          inputs[:, :, start:start + stride, None, :].movedim(2, 0))
        total = chain if total is None else total + chain
    return total


def mlas_sgemm(a: torch.Tensor, b: torch.Tensor, initial: torch.Tensor | None = None,
               whole_reduction: bool = False) -> torch.Tensor:
    """``a @ b`` of float32 matrices (batch axes broadcast) in MLAS's SGEMM order, for products of more than one
    row (`mlas_sgemm_columns`), added onto ``initial`` (broadcast to the product) where given. A single column
    (a 1×1 convolution of a pooled tensor) is MLAS's transposed M1 kernel with the operands' roles swapped."""
    if b.shape[-1] == 1 and not whole_reduction:
        product = mlas_sgemm_m1_transposed(b.transpose(-1, -2), a).transpose(-1, -2)
        return product if initial is None else product + initial
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.float().expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b = b.float().expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    product = mlas_sgemm_columns(a.transpose(-1, -2), b.unsqueeze(0), initial, whole_reduction)[0]
    return product.reshape(*batch, *product.shape[-2:])


def mlas_sgemm_m1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for one row ``a`` ``[..., 1, K]`` in the order of MLAS's M = 1 kernel (``SgemmKernelM1Avx.S``:
    multiplies and adds, no FMA): each group of four reduction terms summed as ``((p0 + p1) + p2) + p3`` and added
    to the running output, a tail of two and then one term likewise."""
    products = (a.float().transpose(-1, -2) * b.float()).movedim(-2, 0)  # [K, ..., N], each product rounded
    depth, total = products.shape[0], None
    start = 0
    for size in [4] * (depth // 4) + [2] * (depth % 4 // 2) + [1] * (depth % 2):
        group = products[start]
        for index in range(start + 1, start + size):
            group = group + products[index]
        total = group if total is None else group + total
        start += size
    return total.unsqueeze(-2)


def mlas_sgemm_m1_transposed(a: torch.Tensor, b_transposed: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for one row ``a`` ``[..., 1, K]`` and ``b`` given transposed, ``[..., N, K]``, in the order of
    MLAS's M = 1 kernel for a transposed B (``SgemmKernelM1TransposeBAvx.S``): eight lanes (term ``k`` in lane
    ``k mod 8``) of multiplies and adds, then the lanes of four output columns at a time reduced as
    ``(((l0+l1)+l2)+l3) + (((l4+l5)+l6)+l7)``, of a remaining pair as ``((l0+l2)+(l4+l6)) + ((l1+l3)+(l5+l7))``,
    of a last column as ``((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))``."""
    products = a.float() * b_transposed.float()  # [..., N, K], each product rounded
    depth = products.shape[-1]
    products = torch.nn.functional.pad(products, (0, -depth % 8))  # a masked tail adds zeros
    chunks = products.unflatten(-1, (-1, 8)).movedim(-2, 0)  # [K / 8, ..., N, 8]
    lanes = chunks[0].clone()
    for chunk in chunks[1:]:
        lanes = lanes + chunk
    l0, l1, l2, l3, l4, l5, l6, l7 = lanes.unbind(-1)
    result = (((l0 + l1) + l2) + l3) + (((l4 + l5) + l6) + l7)
    columns = result.shape[-1]
    start = 4 * (columns // 4)
    if columns % 4 >= 2:
        pair = ((l0 + l2) + (l4 + l6)) + ((l1 + l3) + (l5 + l7))
        result[..., start:start + 2] = pair[..., start:start + 2]
        start += 2
    if columns % 2:
        last = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
        result[..., start] = last[..., start]
    return result.unsqueeze(-2)


def sqnbitgemm_m1(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a @ weight.T`` for one row ``a`` ``[1, K]`` and a dequantized 4-bit ``weight`` ``[N, K]`` in the order of
    sqnbitgemm's single-row CompFp32 kernel on AVX-512 (``MlasQ4GemmKernelBlkLen*Avx512f``): sixteen FMA lanes
    (term ``k`` in lane ``k mod 16``), reduced per group of four output columns by ``FoldAccumulators`` (within each
    quarter ``((l0+l1)+l2)+l3``, then ``(q0+q2) + (q1+q3)``) and for the last ``N mod 4`` columns by
    ``_mm512_reduce_add_ps`` (halves added, down to one)."""
    depth = a.shape[-1]
    pad = -depth % 16
    terms = F.pad(a.float().reshape(depth), (0, pad)).reshape(-1, 16, 1)
    weights = F.pad(weight.float().t(), (0, 0, 0, pad)).reshape(-1, 16, weight.shape[0])
    lanes = fma_chain(terms, weights)
    quarters = [((lanes[4 * q] + lanes[4 * q + 1]) + lanes[4 * q + 2]) + lanes[4 * q + 3] for q in range(4)]
    result = (quarters[0] + quarters[2]) + (quarters[1] + quarters[3])
    full = 4 * (weight.shape[0] // 4)
    if full < weight.shape[0]:
        halves = lanes[8:] + lanes[:8]
        quarter_sums = halves[4:] + halves[:4]
        reduced = (quarter_sums[0] + quarter_sums[2]) + (quarter_sums[1] + quarter_sums[3])
        result[full:] = reduced[full:]
    return result.unsqueeze(0)


def _col2im(columns: torch.Tensor, module: nn.ConvTranspose2d) -> torch.Tensor:
    """ORT's Col2im: every kernel tap's column (``columns``: N, C, taps, H, W) added, tap after tap in row-major
    order, into a zeroed output (float32), cropped by the pads; ``output_padding`` rows stay zero."""
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = (
        module.kernel_size, module.stride, module.dilation)
    height, width = columns.shape[-2:]
    out_h, out_w = ((size - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1 + extra
                    for size, stride, pad, dilation, kernel, extra in zip(
                        (height, width), module.stride, module.padding, module.dilation, module.kernel_size,
                        module.output_padding, strict=True))
    pad_h, pad_w = module.padding
    full = columns.new_zeros(*columns.shape[:2], max((height - 1) * stride_h + dilation_h * (kernel_h - 1) + 1,
                                                     pad_h + out_h),
                             max((width - 1) * stride_w + dilation_w * (kernel_w - 1) + 1, pad_w + out_w))
    for tap in range(kernel_h * kernel_w):
        row, column = divmod(tap, kernel_w)
        top, left = row * dilation_h, column * dilation_w
        full[..., top:top + (height - 1) * stride_h + 1:stride_h,
             left:left + (width - 1) * stride_w + 1:stride_w] += columns[:, :, tap]
    return full[..., pad_h:pad_h + out_h, pad_w:pad_w + out_w]


def _source_coordinates(length: int, source_length: int, scale: float, align_corners: bool) -> torch.Tensor:
    """ORT's float32 source coordinate of each output position ("half_pixel" or "align_corners", as exported)."""
    positions = torch.arange(length, dtype=torch.float32)
    if align_corners:
        return positions * float(source_length - 1) / float(length - 1) if length > 1 else positions * 0
    return (positions + 0.5) / torch.tensor(scale, dtype=torch.float32) - 0.5


def _bilinear_taps(length: int, source_length: int, scale: float, align_corners: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORT's ``SetupUpsampleBilinear`` on one axis: the two source indices of each output position and their
    float32 weights ``|c - i1|`` (for the second) and ``|c - i2|`` (for the first), both 0.5 at the border."""
    coordinates = (torch.arange(length, dtype=torch.float32) if scale == 1
                   else _source_coordinates(length, source_length, scale, align_corners))
    coordinates = coordinates.clamp(0.0, float(source_length - 1))
    first = coordinates.long().clamp_(max=source_length - 1)
    second = (first + 1).clamp_(max=source_length - 1)
    near, far = (coordinates - first.float()).abs(), (coordinates - second.float()).abs()
    border = first == second
    return first, second, near.masked_fill(border, 0.5), far.masked_fill(border, 0.5)


def _nearest_sources(length: int, source_length: int, scale: float) -> torch.Tensor:
    """ORT's nearest source index ("asymmetric", "floor"): ``floor(fl32(y / scale))``, clamped to the input."""
    positions = torch.arange(length, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
    return positions.floor_().long().clamp_(0, source_length - 1)


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
    models = "gemmlowp / TFLite reference integer arithmetic (not checked against a device)"
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


_ONE_SIXTH = torch.tensor(1 / 6, dtype=torch.float32)

_LOGISTIC_ALPHA = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
                   2.48287947061529e-01)
_LOGISTIC_BETA = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
                  1.16817656904453e-01, 9.93151921023180e-01)


_EXP_LOWER_RANGE = -103.9720840454
_EXP_ROUNDING_BIAS = 12582912.0
_EXP_LOG2_RECIPROCAL = 1.44269504088896341
_EXP_LOG2_HIGH, _EXP_LOG2_LOW = -6.93145752e-1, -1.42860677e-6
_EXP_POLYNOMIAL = (*map(float.fromhex, ("0x1.694p-10", "0x1.125edcp-7", "0x1.555b5ap-5", "0x1.55545p-3",
                                         "0x1.fffff6p-2")), 1.0, 1.0)


def _float32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def mlas_exp(values: torch.Tensor) -> torch.Tensor:
    """MLAS's float32 exp (``TransKernelAvx512F.S``, as its softmax computes it): clamp below at -103.97,
    ``m = fl32(fma(x, 1/ln2, 1.5·2**23)) - 1.5·2**23``, ``r = fma(m, -ln2_low, fma(m, -ln2_high, x))``, a
    degree-6 polynomial in FMA steps and ``p·2**m`` rounded once (``vscalefps``)."""
    m, r = _exp_range_reduction(torch.maximum(values.float(), _float32(_EXP_LOWER_RANGE)))
    p = _polynomial(_EXP_POLYNOMIAL[0], _EXP_POLYNOMIAL[1:], r)
    return (p.double() * torch.exp2(m.double())).float()


def _exp_range_reduction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLAS's exp argument split ``x = m·ln2 + r``: ``m = fl32(fma(x, 1/ln2, 1.5·2**23)) - 1.5·2**23`` and
    ``r = fma(m, -ln2_low, fma(m, -ln2_high, x))``."""
    bias = _float32(_EXP_ROUNDING_BIAS)
    m = fma_float32(x, _float32(_EXP_LOG2_RECIPROCAL), bias) - bias
    return m, fma_float32(m, _float32(_EXP_LOG2_LOW), fma_float32(m, _float32(_EXP_LOG2_HIGH), x))


def _mlas_lane_sum(values: torch.Tensor) -> torch.Tensor:
    """The float32 sum over the last axis as MLAS's AVX-512F sum-of-exp kernel accumulates it: element i into
    lane i mod 16 in order, then the lanes as ``((s0+s1)+(s2+s3)) + ((s4+s5)+(s6+s7))`` with
    ``s_l = l_{l+8} + l_l``."""
    lanes = lane_sums(F.pad(values.float(), (0, -values.shape[-1] % 16)), 16)
    halves = lanes[..., 8:] + lanes[..., :8]
    pairs = halves[..., 0::2] + halves[..., 1::2]
    quads = pairs[..., 0::2] + pairs[..., 1::2]
    return quads[..., 0] + quads[..., 1]


_SQRT2 = _float32(math.sqrt(2))
_ERF_UPPER, _ERF_SPLIT = 3.925, 0.921875
_ERF_SMALL = (-5.99104969e-4, 4.99339588e-3, -2.67667342e-2, 1.12818025e-1, -3.76124859e-1, 1.28379151e-1)
_ERF_BIG = (1.72948930e-5, -3.83208680e-4, 3.88393435e-3, -2.42545605e-2, 1.06777847e-1, 6.34846687e-1,
            1.28717512e-1)
_ERF_EXP_LOWER = -88.3762626647949
_ERF_EXP_POLYNOMIAL = (1.38319808e-3, 8.37550033e-3, 4.16689515e-2, 1.66664466e-1, 4.99999851e-1, 1.0, 1.0)


def _polynomial(start: float, coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """Horner's scheme in float32 FMA steps from the constant ``start``."""
    result, wide = torch.full_like(x, start), x.double()
    for coefficient in coefficients:
        result = fma_float32(result, wide, _float32(coefficient))
    return result


def mlas_erf(values: torch.Tensor) -> torch.Tensor:
    """MLAS's float32 erf (``MlasComputeErf``: ``ErfKernelFma3.S`` on x86-64 with FMA3, constants of ``erf.cpp``),
    on ``a = min(|x|, 3.925)``: below 0.921875 ``fma(P(a²), a, a)``; above, ``1 - exp(-fma(Q(a), a, a))`` with an
    exp of its own (``m = fl32(fma(e, 1/ln2, 1.5·2**23)) - 1.5·2**23``, a two-step FMA range reduction, a degree-6
    FMA polynomial times ``2**m``); the sign of ``x``. Bit-identical to ORT 1.32's Erf on millions of values."""
    x = values.float()
    a = torch.minimum(x.abs(), _float32(_ERF_UPPER))
    result = torch.empty_like(a)
    above = a >= _ERF_SPLIT  # the kernel computes both branches and masks; each is computed where it is kept
    small = a[~above]
    result[~above] = fma_float32(_polynomial(_ERF_SMALL[0], _ERF_SMALL[1:], small * small), small, small)
    a = a[above]
    exponent = torch.maximum(-fma_float32(_polynomial(_ERF_BIG[0], _ERF_BIG[1:], a), a, a), _float32(_ERF_EXP_LOWER))
    m, reduced = _exp_range_reduction(exponent)
    result[above] = 1 - _polynomial(_ERF_EXP_POLYNOMIAL[0], _ERF_EXP_POLYNOMIAL[1:], reduced) * torch.exp2(m)
    return result.copysign_(x)


def mlas_logistic(values: torch.Tensor) -> torch.Tensor:
    """MLAS's logistic (``MlasComputeLogistic``, the FMA3 kernel of x86-64): Eigen's rational approximation on
    ``[-18, 18]``, evaluated with fused multiply-adds in float32."""
    value = values.float().clamp(-18.0, 18.0)
    squared = value * value
    p = _polynomial(_LOGISTIC_ALPHA[0], _LOGISTIC_ALPHA[1:], squared) * value
    q = _polynomial(_LOGISTIC_BETA[0], _LOGISTIC_BETA[1:], squared)
    return (p / q + 0.5).clamp_(0.0, 1.0)


RUNTIME_MODELS: dict[str, Callable[[], RuntimeModel]] = {
    OnnxRuntimeCPU.name: OnnxRuntimeCPU,
    FixedPointRequantization.name: FixedPointRequantization,
}
"""Runtime models `QuantSim.emulate` accepts by name."""


def runtime_model(runtime: str | RuntimeModel) -> RuntimeModel:
    """A `RuntimeModel` by name (see `RUNTIME_MODELS`), or the instance given."""
    if isinstance(runtime, RuntimeModel):
        return runtime
    if runtime not in RUNTIME_MODELS:
        raise ValueError(f"unknown runtime {runtime!r} to emulate; choose one of {', '.join(RUNTIME_MODELS)} "
                         "or pass a RuntimeModel instance")
    return RUNTIME_MODELS[runtime]()
