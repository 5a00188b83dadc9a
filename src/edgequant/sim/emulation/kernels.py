"""The emulated ops: one `Kernel` per op kind in `KERNELS` (which modules it covers, how many tensor inputs,
and the computation that puts the runtime's arithmetic on the op's integer operands). Emulating another op is
one entry here plus, where the runtime has its own, the arithmetic in `RuntimeModel`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.quantization import Quantizer
from edgequant.quantization.granularity import PerBlock
from edgequant.sim.emulation.arithmetic import INT32_MAX, INT32_MIN, Grid, RuntimeModel, channels
from edgequant.sim.ops import masked_softmax, qualified_name
from edgequant.sim.quantized_module import FunctionalOp, QuantizedModule

Compute = Callable[[nn.Module, RuntimeModel, tuple, list[Grid], Grid], "torch.Tensor | None"]


@dataclass(frozen=True)
class Kernel:
    """One integer op of the runtime.

    ``covers`` says whether a module of the sim is this op; ``compute(module, runtime, inputs, input_grids,
    output_grid)`` returns the op's output values on the output grid (the float values the sim's own output
    quantizer takes, for an op the runtime tabulates), or None where the runtime takes another path for these
    inputs (the default fake-quantized forward then runs).
    """

    num_inputs: int | None  # None: a sequence of tensors as the first argument (Concat)
    covers: Callable[[nn.Module], bool]
    compute: Compute
    weighted: bool = False  # a Conv/Gemm: its weight's grid is read too, and must be quantized
    keywords: tuple[str, ...] = ()  # keyword arguments taken, in the order they follow the positional ones
    defaults: tuple[Any, ...] = ()  # where given, every keyword's default: an omitted one keeps its position
    float_inputs: bool = False  # a float op between DQ and Q: reads its inputs' values, whatever grid they are on,
    # and the sim's own quantizer rounds its output, whatever the bits


def _functional(kind: str) -> Callable[[nn.Module], bool]:
    return lambda module: isinstance(module, FunctionalOp) and module.onnx_op_type == kind


def is_global_pool_size(size: Any) -> bool:
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _weight_indices(module: nn.Module, quantizer: Quantizer) -> torch.Tensor:
    """The weight's integer grid indices, rounded exactly as the sim's quantizer rounds them (read also while the
    sim's frozen weights seal the float weight and its encoding)."""
    weight = module.tensor_values("weight").detach()
    grid = Grid.of(quantizer)
    scale = quantizer.granularity.broadcast(grid.scale, weight.shape)
    low = quantizer.granularity.broadcast(grid.offset, weight.shape)
    return torch.clamp(torch.round(weight / scale), low, low + grid.num_steps)


def _weight_as_exported(module: nn.Module) -> torch.Tensor | None:
    """The weight as the export's DequantizeLinear gives it to a float op (the float weight where it is not
    quantized); None where its quantizer has no encoding yet."""
    quantizer = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
    weight = module.tensor_values("weight").detach()
    if quantizer is None or not quantizer.enabled:
        return weight
    if quantizer.tensor_values("scale") is None:
        return None
    return _weight_indices(module, quantizer) * quantizer.granularity.broadcast(Grid.of(quantizer).scale, weight.shape)


def _layer_class(module: nn.Module) -> type:
    """The class whose forward the quantized ``module`` runs (the user's subclass, or the torch layer)."""
    return next(c for c in type(module).__mro__[1:] if "forward" in vars(c) and not issubclass(c, QuantizedModule))


def _float_forward(module: nn.Module, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The layer's own (unquantized) forward on integer indices, with integer weights and no bias: keeps what a
    subclass adds around the convolution (e.g. the static "same" padding of EfficientNet's convs)."""
    layer_class = _layer_class(module)
    saved = dict(module._parameters)  # without the weight while frozen weights seal it
    module._parameters["weight"], module._parameters["bias"] = weights, None
    try:
        return layer_class.forward(module, indices)
    finally:
        module._parameters.clear()
        module._parameters.update(saved)


EXACT_FLOAT32 = 2**24
"""Integers up to this magnitude are exact in float32, and so is every sum of products that stays below it."""


def _accumulate(module: nn.Module, runtime: RuntimeModel, x: torch.Tensor, source: Grid,
                bias_axis: int, with_bias: bool = True) -> torch.Tensor:
    """Exact int32 accumulator (bias included) of a Conv/Gemm, from float arithmetic on integer-valued tensors.

    A float32 convolution is exact when ``max|k_x| · max_c Σ|k_w[c]|`` bounds every partial sum below 2**24
    (integers below 2**24 add exactly in any order). Larger layers split the input indices into a high and a
    low part, ``k_x = 16·h + l`` with ``l`` in [0, 15] and ``|h| ≤ 16``, and sum two exact float32 convolutions
    in float64; float64 throughout (exact below 2**53) is the last resort. The bias is added in float64 unless
    the bound with it stays below 2**24.
    """
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
    bias = module.tensor_values("bias")
    if bias is None or not with_bias:
        return accumulator
    bias_int = runtime.bias_to_int32(bias, source.scale, Grid.of(weight_quantizer).scale)
    bound = largest + float(bias_int.abs().max())
    if bound >= EXACT_FLOAT32:
        accumulator = accumulator.double()
    accumulator.add_(channels(bias_int.to(accumulator.dtype), accumulator.dim(), bias_axis))
    if bound > INT32_MAX:  # the int32 accumulator wraps around (two's complement)
        accumulator = torch.remainder(accumulator - INT32_MIN, 2**32).add_(INT32_MIN)
    return accumulator


def _weighted(channel_axis: int) -> Compute:
    """Conv (channels on axis 1) and Gemm (channels last): exact accumulator, requantized per output channel.
    A Linear on inputs of rank > 2 is exported as MatMul + Add, which the runtime may compute otherwise
    (`RuntimeModel.matmul_add`)."""
    def compute(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid], output: Grid) -> torch.Tensor:
        weight_scale = Grid.of(module.param_quantizers["weight"]).scale
        if channel_axis == -1 and args[0].dim() > 2:
            accumulator = _accumulate(module, runtime, args[0], grids[0], channel_axis, with_bias=False)
            bias = module.tensor_values("bias")
            return output.values(runtime.matmul_add(accumulator, grids[0].scale, weight_scale,
                                                    None if bias is None else bias.detach(), output))
        accumulator = _accumulate(module, runtime, args[0], grids[0], channel_axis)
        indices = runtime.requantize(accumulator, grids[0].scale, weight_scale, output,
                                     channel_axis % accumulator.dim())
        return output.values(indices)

    return compute


def _matmul(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid], output: Grid) -> torch.Tensor:
    accumulator = torch.matmul(grids[0].indices(args[0]).double(), grids[1].indices(args[1]).double())
    return output.values(runtime.requantize(accumulator, grids[0].scale, grids[1].scale, output, 1))


def _as_dequantized(args: list[torch.Tensor], grids: list[Grid]) -> list[torch.Tensor]:
    """Each input as its DequantizeLinear gives it to a float op: ``fl32(k·scale)`` on its grid."""
    return [grid.values(grid.indices(x)) for x, grid in zip(args, grids, strict=True)]


def _float_linear(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                  output: Grid) -> torch.Tensor | None:
    """A Linear the runtime has no integer kernel for (activations not on 8-bit grids, a weight not on an 8-bit
    per-channel one): exported as MatMul (and a bias Add) on inputs of rank > 2, else as Gemm; run in float on the
    rows of the flattened input (`RuntimeModel.float_linear` says which kernel). The sim's quantizer follows."""
    (x,) = _as_dequantized([args[0]], grids)
    changes_width = output is not None and output.bits != grids[0].bits
    return _linear_in_float(module, runtime, x, None if output is None else grids[0].scale, changes_width)


def _linear_in_float(module: nn.Module, runtime: RuntimeModel, x: torch.Tensor, input_scale: torch.Tensor | None,
                     changes_width: bool = False) -> torch.Tensor | None:
    """``input_scale``: where the input comes from a DQ, whose Gemm's bias ORT quantizes (`float_bias`);
    ``changes_width``: the input and output grids differ in width, so ORT leaves a MatMul writing straight into
    the output's Q (no bias) on the dequantized weight (`WeightPath`)."""
    weight = _weight_as_exported(module)
    if weight is None:
        return None
    quantizer = module.param_quantizers["weight"]
    as_matmul = x.dim() > 2
    bias = module.tensor_values("bias")
    weight_path = ("transposed" if isinstance(quantizer.granularity, PerBlock)
                   else "dequantized" if changes_width and as_matmul and bias is None else "fused")
    if bias is not None:
        bias = bias.detach()
        if not as_matmul and input_scale is not None:
            bias = runtime.float_bias(bias, input_scale, Grid.of(quantizer).scale)
    product = runtime.float_linear(x.reshape(-1, x.shape[-1]), weight, bias, quantizer.bitwidth, as_matmul,
                                   weight_path)
    return None if product is None else product.reshape(*x.shape[:-1], -1)


def _gathered_gemm(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                   output: Grid) -> torch.Tensor | None:
    """A Linear whose input is indexed with an integer after its producer's DQ (ViT's class token, BERT's pooler):
    the export's Gather leaves the Gemm a float input, so the runtime runs it in float, with the weight as its DQ
    gives it and the float bias; an input of rank > 2 (Swin's windows, `window_partition`) makes it a MatMul on a
    float input, which ORT fuses with the weight's DQ and the bias into MatMulNBits. The sim's quantizer follows."""
    return _linear_in_float(module, runtime, args[0], None)


def _float_conv(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor | None:
    """A Conv the runtime has no integer kernel for (activations not on 8-bit grids, a weight not on an 8-bit
    per-channel one, no Q after it): a float Conv on the dequantized input and weight; the sim's quantizer (after
    any fused activation) follows. Without an output grid (a supergroup's Conv, read by a float op) neither the
    export nor ORT's BiasQuantization quantizes the bias."""
    weight = _weight_as_exported(module)
    if weight is None or not isinstance(module, nn.Conv2d):
        return None
    (x,) = _as_dequantized([args[0]], grids)
    bias = module.tensor_values("bias")
    return runtime.float_conv(x, weight, None if bias is None else bias.detach(),
                              None if output is None else grids[0].scale,
                              Grid.of(module.param_quantizers["weight"]).scale, module)


def _on_dequantized(name: str) -> Compute:
    """An op the runtime computes in float between DQ and Q (grids it has no integer kernel for): its
    `RuntimeModel` method ``name`` on the dequantized tensor inputs (a MatMul of two activations, a global average
    pool, a softmax over the last axis); the sim's quantizer follows."""
    def compute(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor | None:
        return getattr(runtime, name)(*_as_dequantized(list(args[:len(grids)]), grids))

    return compute


def _float_elementwise(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                       output: Grid) -> torch.Tensor:
    """An Add or Mul the runtime computes in float32 between DQ and Q (grids it has no integer kernel for): one
    IEEE operation per element, as PyTorch computes it; the sim's quantizer follows."""
    return FunctionalOp.forward(module, *_as_dequantized(list(args), grids))


def _float_concat(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                  output: Grid) -> torch.Tensor:
    """A Concat of dequantized inputs in float between DQ and Q; the sim's quantizer follows."""
    return FunctionalOp.forward(module, _as_dequantized(list(args[0]), grids), *args[1:])


def _elementwise(name: str) -> Compute:
    """Add and Mul of two broadcastable tensors (the runtime model picks its kernel's path from the shapes)."""
    def compute(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor:
        operation = getattr(runtime, name)
        return output.values(operation(grids[0].indices(args[0]), grids[0], grids[1].indices(args[1]), grids[1],
                                       output))

    return compute


def _sigmoid(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid], output: Grid) -> torch.Tensor:
    """A table of the runtime's logistic, quantized as the sim's quantizer does."""
    return runtime.sigmoid(args[0])


def softmax_dim(module: nn.Module, args: tuple) -> int | None:
    """The axis of a softmax, None where the call leaves it implicit (PyTorch then picks one by rank)."""
    return module.dim if isinstance(module, nn.Softmax) else args[1] if len(args) > 1 else None


def _softmax(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
             output: Grid) -> torch.Tensor:
    return output.values(runtime.softmax(args[0], grids[0], output, softmax_dim(module, args)))


def _is_masked_softmax(module: nn.Module) -> bool:
    """``softmax(scores + mask)`` over the last axis as one op (`edgequant.sim.ops.masked_softmax`):
    the export adds the float mask between DQ and Softmax, so the runtime runs a float Softmax, not QLinearSoftmax."""
    return _functional("Softmax")(module) and module.target is masked_softmax


def _masked_softmax(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                    output: Grid) -> torch.Tensor | None:
    """The float32 Add of the mask, then the runtime's float Softmax; the sim's quantizer follows."""
    return runtime.float_softmax(args[0] + args[1])


def _hard_sigmoid(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                  output: Grid) -> torch.Tensor:
    """A float op in the runtime, between DQ and Q, with its own formula; the sim's quantizer follows."""
    return runtime.hard_sigmoid(args[0])


def _hard_swish(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor:
    """The ONNX function body the runtime runs: HardSigmoid, then a float32 Mul by the input."""
    return args[0] * runtime.hard_sigmoid(args[0])


def _silu(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid], output: Grid) -> torch.Tensor:
    """Exported as Sigmoid and Mul, both float in the runtime (its own logistic); the sim's quantizer follows."""
    return args[0] * runtime.sigmoid(args[0])


def _is_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm running torch's own forward (a subclass that permutes first, as ConvNeXt's, normalises another
    axis than the one the runtime's kernel is modelled on)."""
    return isinstance(module, nn.LayerNorm) and _layer_class(module).forward is nn.LayerNorm.forward


def _layer_norm(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor | None:
    """A float op between DQ and Q in the runtime, with its own order of operations, on the scale as the export's
    DQ gives it; the sim's quantizer follows. Other shapes and a quantized bias take the default path."""
    bias, quantizers = module.tensor_values("bias"), module.param_quantizers
    if module.tensor_values("weight") is None or tuple(module.normalized_shape) != (args[0].shape[-1],) or (
            "bias" in quantizers and quantizers["bias"].enabled):
        return None
    weight = _weight_as_exported(module)
    if weight is None:
        return None
    return runtime.layer_norm(args[0], weight, None if bias is None else bias.detach(), module.eps)


CHANNELS_FIRST_LAYER_NORMS = ("torchvision.models.convnext.LayerNorm2d",)
"""LayerNorm subclasses whose forward is ``permute(0, 2, 3, 1)``, ``F.layer_norm`` over the channels, and the
permute back: exported as Transpose, LayerNormalization, Transpose (which ORT's layout optimizer folds into NHWC
neighbours), so the runtime normalises each position's channels in its LayerNorm order."""


def _is_channels_first_layer_norm(module: nn.Module) -> bool:
    if not isinstance(module, nn.LayerNorm):
        return False
    layer_class = _layer_class(module)
    return qualified_name(layer_class) in CHANNELS_FIRST_LAYER_NORMS


def _channels_first_layer_norm(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                               output: Grid) -> torch.Tensor | None:
    """The LayerNorm of each position's channels (axis 1), as `_layer_norm` computes it on the last axis."""
    values = _layer_norm(module, runtime, (args[0].movedim(1, -1),), grids, output)
    return None if values is None else values.movedim(-1, 1)


def _gelu(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid], output: Grid
          ) -> torch.Tensor | None:
    """Float ops between DQ and Q in the runtime (the exported erf formula) on the input's levels, tabulated (the
    runtime's erf costs dozens of float64 passes per element); the sim's quantizer follows."""
    source = grids[0]
    lowest = float(source.offset)
    table = runtime.gelu(source.values(torch.arange(lowest, lowest + source.num_steps + 1, device=args[0].device)))
    return None if table is None else table[(source.indices(args[0]) - lowest).long()]


def _is_rms_norm(module: nn.Module) -> bool:
    """A Hugging Face Llama-style RMSNorm (``weight · x·rsqrt(mean(x²) + variance_epsilon)``) that
    `edgequant.llm.prepare_causal_lm` names RMSNormalization; Gemma's ``(1 + weight)`` norm keeps ``eps``."""
    return getattr(module, "onnx_op_type", None) == "RMSNormalization" and hasattr(module, "variance_epsilon")


def _rms_norm(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
              output: Grid) -> torch.Tensor | None:
    """Float ops between DQ and Q in the runtime, in their exported order, on the scale as the export's DQ gives
    it; the sim's quantizer follows."""
    weight = _weight_as_exported(module)
    return None if weight is None else runtime.rms_norm(args[0], weight, module.variance_epsilon)


def _leaky_relu(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor:
    """A table of float32 ``x if x >= 0 else alpha·x`` on the input levels, quantized as the sim's quantizer does."""
    slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else _argument(args, 1, 0.01)
    return F.leaky_relu(args[0], slope)


def _concat(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
            output: Grid) -> torch.Tensor:
    """Each input's levels dequantized in float32 and joined; the sim's output quantizer then requantizes them with
    the runtime's table (``rne(fl32(s_x·k) / s_y)``, a copy where the grids are equal)."""
    return FunctionalOp.forward(module, _as_dequantized(list(args[0]), grids), *args[1:])


def _argument(args: tuple, position: int, default: float) -> float:
    return float(args[position]) if len(args) > position else default


def _global_average_pool(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                         output: Grid) -> torch.Tensor:
    spatial = tuple(range(2, args[0].dim()))
    sums = grids[0].indices(args[0]).double().sum(dim=spatial, keepdim=True)
    count = math.prod(args[0].shape[2:])
    return output.values(runtime.average(sums, count, grids[0], output))


def _pool(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid], output: Grid) -> torch.Tensor:
    return output.values(_average_pool(module, runtime, args[0], grids[0], output))


def _pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's (and the exported model's) output length; in ceil mode a last window that would start in the
    right padding is dropped."""
    span = size + 2 * padding - kernel
    count = (-(-span // stride) if ceil_mode else span // stride) + 1
    return count - 1 if ceil_mode and (count - 1) * stride >= size + padding else count


def _pool_windows(module: nn.AvgPool2d, x: torch.Tensor, whole_kernel: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Windows of ``x`` in the runtime's order (row-major; zeros where a window leaves the input), the divisor of
    each output position, and the output size.

    The divisors are ONNX Runtime's. With ``count_include_pad`` they count the padding: the whole kernel in every
    window for its integer kernel (``whole_kernel``), also a last window of ``ceil_mode`` that runs past the
    padding, where its float kernel counts only the part inside the padded input (as PyTorch does); without it,
    the input elements the window covers.
    """
    kernel, stride, padding = (torch.nn.modules.utils._pair(v) for v in (module.kernel_size,
                                                                          module.stride or module.kernel_size,
                                                                          module.padding))
    sizes = [_pooled_size(x.shape[-2 + axis], kernel[axis], stride[axis], padding[axis], module.ceil_mode)
             for axis in range(2)]
    beyond = [max((sizes[axis] - 1) * stride[axis] + kernel[axis] - x.shape[-2 + axis] - 2 * padding[axis], 0)
              for axis in range(2)]  # how far the last window runs past the padded input (ceil mode)
    pads = (padding[1], padding[1] + beyond[1], padding[0], padding[0] + beyond[0])
    windows = F.unfold(F.pad(x.float(), pads), kernel, stride=stride)  # (N, C·K, L)
    windows = windows.view(x.shape[0], x.shape[1], kernel[0] * kernel[1], -1)
    if module.count_include_pad and whole_kernel:
        counts = torch.full((windows.shape[-1],), float(kernel[0] * kernel[1]), device=x.device)
    else:
        counted = torch.ones(1, 1, *(x.shape[-2 + axis] + (2 * padding[axis] if module.count_include_pad else 0)
                                     for axis in range(2)), device=x.device)
        unpadded = (0, beyond[1], 0, beyond[0]) if module.count_include_pad else pads
        counts = F.unfold(F.pad(counted, unpadded), kernel, stride=stride).sum(dim=1)[0]
    return windows, counts, sizes


def _average_pool(module: nn.AvgPool2d, runtime: RuntimeModel, x: torch.Tensor, source: Grid,
                  output: Grid) -> torch.Tensor:
    """ORT's QLinearAveragePool on the windows and divisors of `_pool_windows` (the PyTorch model's output differs
    where a ``ceil_mode`` window runs past the padding)."""
    windows, counts, sizes = _pool_windows(module, x, whole_kernel=True)
    pooled = runtime.average_pool(windows, counts, source, output)
    return pooled.view(x.shape[0], x.shape[1], *sizes)


def _float_pool(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                output: Grid) -> torch.Tensor | None:
    """An AveragePool the runtime computes in float between DQ and Q (grids it has no integer kernel for), on the
    windows and divisors of `_pool_windows`; the sim's quantizer follows."""
    (x,) = _as_dequantized([args[0]], grids)
    windows, counts, sizes = _pool_windows(module, x, whole_kernel=False)
    pooled = runtime.float_average_pool(windows, counts)
    return None if pooled is None else pooled.view(x.shape[0], x.shape[1], *sizes)


def _conv_transpose(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
                    output: Grid) -> torch.Tensor | None:
    """A float op in the runtime, between DQ and Q, on the dequantized input and weight; the sim's quantizer
    follows."""
    bias = module.tensor_values("bias")
    return runtime.conv_transpose(args[0], _weight_as_exported(module), None if bias is None else bias.detach(),
                                  grids[0].scale, Grid.of(module.param_quantizers["weight"]).scale, module)


class Interpolation(NamedTuple):
    """The arguments of ``F.interpolate`` (or an ``nn.Upsample``'s), in its order."""

    size: Any = None
    scale_factor: Any = None
    mode: str = "nearest"
    align_corners: bool | None = None
    recompute_scale_factor: bool | None = None
    antialias: bool = False

    @classmethod
    def of(cls, module: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> Interpolation:
        if isinstance(module, nn.Upsample):
            return cls(module.size, module.scale_factor, module.mode, module.align_corners,
                       module.recompute_scale_factor)
        return cls(*args[1:], **(kwargs or {}))

    def unsupported(self) -> str:
        """Why the emulation does not compute this resize ("" where it does)."""
        if self.mode not in ("nearest", "bilinear") or self.antialias:
            kind = f"{'antialiased ' if self.antialias else ''}{self.mode}"
            return f"a {kind} resize (2-D nearest and bilinear are emulated)"
        return ""

    def geometry(self, x: torch.Tensor) -> tuple[tuple[int, int], tuple[float, float]]:
        """The output size PyTorch gives and the float32 scales the exported Resize gives the runtime: the scale
        factors as written, or ``output / input`` where the export writes sizes (``size``, recomputed scales)."""
        inputs = tuple(x.shape[-2:])
        if self.size is not None:
            size = tuple(torch.nn.modules.utils._pair(self.size))
        else:
            factors = torch.nn.modules.utils._pair(self.scale_factor)
            size = tuple(math.floor(n * float(f)) for n, f in zip(inputs, factors, strict=True))
            if not self.recompute_scale_factor:
                return size, tuple(float(torch.tensor(float(f), dtype=torch.float32)) for f in factors)
        scales = (torch.tensor(size, dtype=torch.float32) / torch.tensor(inputs, dtype=torch.float32)).tolist()
        return size, tuple(scales)


def _resize(module: nn.Module, runtime: RuntimeModel, args: tuple, grids: list[Grid],
            output: Grid) -> torch.Tensor | None:
    """A float op in the runtime, between DQ and Q (a copy for nearest); the sim's quantizer follows."""
    call = Interpolation.of(module, args)
    if args[0].dim() != 4:
        return None
    size, scales = call.geometry(args[0])
    return runtime.resize(args[0], size, scales, call.mode, bool(call.align_corners))


KERNELS: dict[str, Kernel] = {
    "Conv": Kernel(1, lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), _weighted(1), weighted=True),
    "Gemm": Kernel(1, lambda m: isinstance(m, nn.Linear), _weighted(-1), weighted=True),
    "MatMul": Kernel(2, _functional("MatMul"), _matmul),
    "Add": Kernel(2, _functional("Add"), _elementwise("add")),
    "Mul": Kernel(2, _functional("Mul"), _elementwise("mul")),
    "GlobalAveragePool": Kernel(1, lambda m: _functional("GlobalAveragePool")(m) or (
        isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))
        and is_global_pool_size(m.output_size)), _global_average_pool),
    "AveragePool": Kernel(1, lambda m: isinstance(m, nn.AvgPool2d) and m.divisor_override is None, _pool),
    "Sigmoid": Kernel(1, lambda m: isinstance(m, nn.Sigmoid) or _functional("Sigmoid")(m), _sigmoid,
                      float_inputs=True),
    "LeakyRelu": Kernel(1, lambda m: isinstance(m, nn.LeakyReLU) or _functional("LeakyRelu")(m), _leaky_relu,
                        keywords=("negative_slope",), float_inputs=True),
    "Concat": Kernel(None, _functional("Concat"), _concat, keywords=("dim",)),
    "Softmax": Kernel(1, lambda m: isinstance(m, nn.Softmax) or (_functional("Softmax")(m) and not
                      _is_masked_softmax(m)), _softmax, keywords=("dim",)),
    "MaskedSoftmax": Kernel(2, _is_masked_softmax, _masked_softmax, float_inputs=True),
    "HardSigmoid": Kernel(1, lambda m: isinstance(m, nn.Hardsigmoid) or _functional("HardSigmoid")(m),
                          _hard_sigmoid, keywords=("inplace",), float_inputs=True),
    "HardSwish": Kernel(1, lambda m: isinstance(m, nn.Hardswish) or _functional("HardSwish")(m), _hard_swish,
                        keywords=("inplace",), float_inputs=True),
    "Silu": Kernel(1, lambda m: isinstance(m, nn.SiLU) or getattr(m, "onnx_op_type", None) == "Silu", _silu,
                   float_inputs=True),
    "LayerNormalization": Kernel(1, _is_layer_norm, _layer_norm, float_inputs=True),
    "RMSNormalization": Kernel(1, _is_rms_norm, _rms_norm, float_inputs=True),
    "LayerNorm2d": Kernel(1, _is_channels_first_layer_norm, _channels_first_layer_norm, float_inputs=True),
    "Gelu": Kernel(1, lambda m: isinstance(m, nn.GELU) and m.approximate == "none", _gelu),
    "ConvTranspose": Kernel(1, lambda m: isinstance(m, nn.ConvTranspose2d), _conv_transpose, weighted=True),
    "Resize": Kernel(1, lambda m: isinstance(m, nn.Upsample) or _functional("Resize")(m), _resize,
                     keywords=Interpolation._fields, defaults=tuple(Interpolation())),
    "FloatConv": Kernel(1, lambda m: False, _float_conv, float_inputs=True),
    "FloatGemm": Kernel(1, lambda m: False, _float_linear, float_inputs=True),
    "GatheredGemm": Kernel(1, lambda m: False, _gathered_gemm, float_inputs=True),
    "FloatMatMul": Kernel(2, lambda m: False, _on_dequantized("float_matmul"), float_inputs=True),
    "FloatAdd": Kernel(2, lambda m: False, _float_elementwise, float_inputs=True),
    "FloatMul": Kernel(2, lambda m: False, _float_elementwise, float_inputs=True),
    "FloatConcat": Kernel(None, lambda m: False, _float_concat, keywords=("dim",), float_inputs=True),
    "FloatGlobalAveragePool": Kernel(1, lambda m: False, _on_dequantized("float_global_average"), float_inputs=True),
    "FloatAveragePool": Kernel(1, lambda m: False, _float_pool, float_inputs=True),
    "FloatSoftmax": Kernel(1, lambda m: False, _on_dequantized("float_softmax"), keywords=("dim",),
                           float_inputs=True),
}
"""The ops an integer runtime fuses into one kernel, and the float ops between Q/DQ it computes with another
formula than PyTorch (HardSigmoid, HardSwish, SiLU, ConvTranspose, bilinear Resize, LayerNorm, channels-first
LayerNorm, RMSNorm, GELU), by ONNX op type. The ``Float*`` kinds cover no module themselves: they are the
integer kinds of `FLOAT_FALLBACKS` on grids without an integer kernel; nor does ``GatheredGemm``, the planner's
kind for a Linear whose input is indexed after the DQ (a float Gemm in the runtime)."""

FLOAT_FALLBACKS = {"Conv": "FloatConv", "Gemm": "FloatGemm", "MatMul": "FloatMatMul", "Add": "FloatAdd",
                   "Mul": "FloatMul", "Concat": "FloatConcat", "GlobalAveragePool": "FloatGlobalAveragePool",
                   "AveragePool": "FloatAveragePool", "Softmax": "FloatSoftmax"}
"""The kind the runtime computes instead where an op's activations are not all 8-bit per-tensor grids (ONNX
Runtime's CPU QLinear kernels take 8-bit tensors only; a 16-bit op stays float between DQ and Q)."""

def op_kind(module: nn.Module) -> str | None:
    """The emulated op ``module`` of the sim is, if any."""
    if not isinstance(module, QuantizedModule):
        return None
    return next((kind for kind, kernel in KERNELS.items() if kernel.covers(module)), None)
