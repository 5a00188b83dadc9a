"""Which torch modules and functions the simulation quantizes, and their ONNX op type names.

The hardware config speaks ONNX op types (``Conv``, ``Gemm``, ``Softmax``...), as AIMET's does, so every
quantizable op needs one. Users add their own leaf modules with `register_module`.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.config import register_op_types

MODULE_OP_TYPES: dict[type[nn.Module], str] = {
    nn.Conv1d: "Conv",
    nn.Conv2d: "Conv",
    nn.Conv3d: "Conv",
    nn.ConvTranspose1d: "ConvTranspose",
    nn.ConvTranspose2d: "ConvTranspose",
    nn.ConvTranspose3d: "ConvTranspose",
    nn.Linear: "Gemm",
    nn.BatchNorm1d: "BatchNormalization",
    nn.BatchNorm2d: "BatchNormalization",
    nn.BatchNorm3d: "BatchNormalization",
    nn.LayerNorm: "LayerNormalization",
    nn.GroupNorm: "GroupNormalization",
    nn.InstanceNorm1d: "InstanceNormalization",
    nn.InstanceNorm2d: "InstanceNormalization",
    nn.Embedding: "Gather",
    nn.ReLU: "Relu",
    nn.ReLU6: "Clip",
    nn.Hardtanh: "Clip",
    nn.LeakyReLU: "LeakyRelu",
    nn.PReLU: "PRelu",
    nn.ELU: "Elu",
    nn.GELU: "Gelu",
    nn.SiLU: "Silu",
    nn.Mish: "Mish",
    nn.Sigmoid: "Sigmoid",
    nn.Tanh: "Tanh",
    nn.Hardswish: "HardSwish",
    nn.Hardsigmoid: "HardSigmoid",
    nn.Softmax: "Softmax",
    nn.LogSoftmax: "LogSoftmax",
    nn.MaxPool1d: "MaxPool",
    nn.MaxPool2d: "MaxPool",
    nn.MaxPool3d: "MaxPool",
    nn.AvgPool1d: "AveragePool",
    nn.AvgPool2d: "AveragePool",
    nn.AvgPool3d: "AveragePool",
    nn.AdaptiveAvgPool1d: "GlobalAveragePool",
    nn.AdaptiveAvgPool2d: "GlobalAveragePool",
    nn.AdaptiveAvgPool3d: "GlobalAveragePool",
    nn.AdaptiveMaxPool2d: "GlobalMaxPool",
    nn.Upsample: "Resize",
    nn.UpsamplingNearest2d: "Resize",
    nn.UpsamplingBilinear2d: "Resize",
    nn.PixelShuffle: "DepthToSpace",
}

PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)
"""Modules whose output holds values of their input: they need no quantizer of their own."""

PASS_THROUGH_NAMES = {"StochasticDepth", "DropPath"}

MODULE_NAME_OP_TYPES = {
    "GELUActivation": "Gelu", "NewGELUActivation": "Gelu", "FastGELUActivation": "Gelu",
    "QuickGELUActivation": "Gelu", "GELUTanh": "Gelu", "SiLUActivation": "Silu",
}
"""Activation modules of Hugging Face transformers, matched by class name (no import needed)."""
"""Third-party identity-at-inference modules (torchvision, timm), matched by class name."""


CLAMP_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
"""Activation modules that only clamp: their output quantizer can apply the clamp in its own pass."""


def clamp_bounds(module: nn.Module) -> tuple[float, float]:
    """The range a `CLAMP_ACTIVATIONS` module clamps to."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return float(module.min_val), float(module.max_val)
    return 0.0, math.inf


def is_pass_through(module: nn.Module) -> bool:
    """Modules whose outputs hold their inputs' values; a class or instance declares it with
    ``holds_input_values = True``."""
    return (
        isinstance(module, PASS_THROUGH_MODULES)
        or type(module).__name__ in PASS_THROUGH_NAMES
        or getattr(module, "holds_input_values", False)  # the class's, or this instance's (a converted ONNX node)
    )

DATA_MOVEMENT_OPS = frozenset({
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Expand", "Slice", "Split", "Tile",
    "DepthToSpace", "SpaceToDepth",
})
"""ONNX ops whose outputs hold values of their first input, so they share its encoding."""

ZERO_PADDING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
)


def is_zero_padding(module: nn.Module) -> bool:
    """A constant padding of zeros: the runtime folds it into the next convolution's own padding."""
    return isinstance(module, ZERO_PADDING_MODULES) and float(getattr(module, "value", 0.0)) == 0.0


FUNCTION_OP_TYPES: dict[object, str] = {
    operator.add: "Add", operator.iadd: "Add", torch.add: "Add", "add": "Add", "add_": "Add",
    operator.sub: "Sub", operator.isub: "Sub", torch.sub: "Sub", "sub": "Sub", operator.neg: "Neg",
    torch.neg: "Neg", "neg": "Neg", operator.mul: "Mul", operator.imul: "Mul", torch.mul: "Mul",
    "mul": "Mul", "mul_": "Mul", operator.truediv: "Div", operator.itruediv: "Div", torch.div: "Div",
    "div": "Div", operator.matmul: "MatMul", torch.matmul: "MatMul", "matmul": "MatMul", torch.bmm: "MatMul",
    "bmm": "MatMul", torch.baddbmm: "MatMul", torch.addmm: "Gemm", F.linear: "Gemm", torch.einsum: "Einsum",
    torch.cat: "Concat", torch.concat: "Concat", torch.stack: "Concat",
    F.relu: "Relu", torch.relu: "Relu", "relu": "Relu", F.relu6: "Clip", F.hardtanh: "Clip",
    torch.clamp: "Clip", "clamp": "Clip", torch.clip: "Clip", F.gelu: "Gelu", F.silu: "Silu",
    F.leaky_relu: "LeakyRelu", F.hardswish: "HardSwish", F.hardsigmoid: "HardSigmoid", F.mish: "Mish",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", "sigmoid": "Sigmoid", torch.tanh: "Tanh",
    F.tanh: "Tanh", "tanh": "Tanh", F.softmax: "Softmax", torch.softmax: "Softmax", "softmax": "Softmax",
    F.log_softmax: "LogSoftmax", F.layer_norm: "LayerNormalization", F.group_norm: "GroupNormalization",
    F.batch_norm: "BatchNormalization", F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv",
    F.max_pool2d: "MaxPool", F.avg_pool2d: "AveragePool", F.adaptive_avg_pool2d: "GlobalAveragePool",
    F.interpolate: "Resize", torch.mean: "ReduceMean", "mean": "ReduceMean", torch.sum: "ReduceSum",
    "sum": "ReduceSum", torch.amax: "ReduceMax", "amax": "ReduceMax", torch.amin: "ReduceMin", "amin": "ReduceMin",
    torch.max: "ReduceMax", "max": "ReduceMax", torch.min: "ReduceMin", "min": "ReduceMin", torch.pow: "Pow",
    "pow": "Pow", operator.pow: "Pow", torch.sqrt: "Sqrt",
    "sqrt": "Sqrt", torch.rsqrt: "Sqrt", "rsqrt": "Sqrt", torch.exp: "Exp", "exp": "Exp", torch.erf: "Erf",
    torch.abs: "Abs", "abs": "Abs", "radd": "Add", "rmul": "Mul", "rsub": "Sub", "rtruediv": "Div", "truediv": "Div",
    F.scaled_dot_product_attention: "Attention", F.pad: "Pad",
    # names of ATen ops (torch.export graphs), matched through function_name
    "conv2d": "Conv", "conv1d": "Conv", "convolution": "Conv", "linear": "Gemm", "batch_norm": "BatchNormalization",
    "layer_norm": "LayerNormalization", "hardtanh": "Clip", "gelu": "Gelu", "silu": "Silu", "hardswish": "HardSwish",
    "max_pool2d": "MaxPool", "avg_pool2d": "AveragePool", "adaptive_avg_pool2d": "GlobalAveragePool",
    "cat": "Concat",
}
"""Functional ops (callables, or tensor method names) that compute new values and so get a quantizer."""

register_op_types(*MODULE_OP_TYPES.values(), *MODULE_NAME_OP_TYPES.values(), *FUNCTION_OP_TYPES.values())

DATA_MOVEMENT = {
    "view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "contiguous", "expand",
    "expand_as", "repeat", "repeat_interleave", "split", "chunk", "narrow", "select", "size", "dim", "to", "type",
    "float", "half", "detach", "clone", "unbind", "getitem", "getattr", "flip", "roll", "t", "view_as",
    "reshape_as", "unflatten", "dropout", "identity", "max_pool_indices", "where", "masked_fill",
}
"""Ops that only move or select values (or compute shapes): they share their input's encoding."""

_CUSTOM_MODULES: dict[type[nn.Module], str] = {}


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(scores + mask)`` over the last axis as one op: the additive mask (0 or the dtype's minimum) is applied
    inside the softmax kernel, so no grid has to hold the mask's -3.4e38 (attention layers use it; the emulation
    knows it as ORT's float softmax of a masked sum)."""
    return torch.softmax(scores + mask, dim=-1)


def register_module(module_type: type[nn.Module], onnx_op_type: str | None = None) -> None:
    """Treat ``module_type`` as a leaf: its parameters and outputs get quantizers like a built-in layer.

    ``onnx_op_type`` names the op for the hardware config (defaults to the class name).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_module expects an nn.Module subclass, got {module_type!r}")
    _CUSTOM_MODULES[module_type] = onnx_op_type or module_type.__name__
    register_op_types(_CUSTOM_MODULES[module_type])


def is_custom_module(module: nn.Module) -> bool:
    """Registered by the user with `register_module` (we know nothing of what its forward returns)."""
    return any(isinstance(module, module_type) for module_type in _CUSTOM_MODULES)


def module_op_type(module: nn.Module) -> str | None:
    """ONNX op type of a quantizable leaf module, or None when the module is not a known leaf."""
    declared = module.__dict__.get("onnx_op_type")  # FunctionalOp, or a module the sim already quantized
    if declared is not None:
        return declared
    for registry in (_CUSTOM_MODULES, MODULE_OP_TYPES):
        for module_type, op_type in registry.items():
            if type(module) is module_type:
                return op_type
    for registry in (_CUSTOM_MODULES, MODULE_OP_TYPES):
        for module_type, op_type in registry.items():
            if isinstance(module, module_type):
                return op_type
    return MODULE_NAME_OP_TYPES.get(type(module).__name__)


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class: how classes of packages edgequant does not import are recognised."""
    return f"{cls.__module__}.{cls.__qualname__}"


def function_name(target: object) -> str:
    """Readable name of an FX call target (function, tensor method name, or ATen op without its overload)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):  # torch.export graphs: aten.relu.default -> "relu"
        return target._opname
    return getattr(target, "__name__", repr(target))


def function_op_type(target: object) -> str | None:
    """ONNX op type for a functional call target, None for data movement or unknown ops."""
    try:
        op_type = FUNCTION_OP_TYPES.get(target)
    except TypeError:  # unhashable target
        return None
    if op_type is None and not isinstance(target, str) and hasattr(target, "__name__"):
        # tensor methods seen by __torch_function__ (Tensor.__add__, Tensor.__radd__, Tensor.softmax) and
        # ATen ops of torch.export graphs (aten.add.Tensor)
        name = function_name(target).strip("_")
        op_type = FUNCTION_OP_TYPES.get(name) or FUNCTION_OP_TYPES.get(name[1:] if name.startswith("r") else name)
    return op_type


def is_float_math_call(func: object, args: tuple, kwargs: dict) -> bool:
    """A math op on floating-point data: what an untraceable module's recorded op sequence holds.

    Ops on integer tensors only (shape and index arithmetic, integer masks) are left out: they are never quantized,
    and under tracing (ONNX export) shape arithmetic that ran on Python ints in eager mode becomes tensor ops, which
    would otherwise shift every later op onto the wrong recorded position."""
    if function_op_type(func) is None:
        return False
    values = [*args, *kwargs.values()]
    values += [v for value in values if isinstance(value, (list, tuple)) for v in value]
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values)


def is_data_movement(target: object) -> bool:
    """Moves values only: a `DATA_MOVEMENT` op, or a function that declares ``holds_input_values = True``."""
    return function_name(target).strip("_") in DATA_MOVEMENT or getattr(target, "holds_input_values", False)


def weight_output_axis(module: nn.Module, param: torch.Tensor) -> int | None:
    """Axis of a weight that holds the layer's output channels (1 for transposed convs); None for 1-D params,
    which stay per-tensor. The one place that knows this: per-channel quantizers, encodings import, folding."""
    if param.dim() < 2:
        return None
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def weight_input_axis(module: nn.Module, param: torch.Tensor) -> int | None:
    """Axis of a weight that holds the layer's input channels, the one per-block quantization blocks (0 for
    transposed convs, else 1); None for 1-D params."""
    if param.dim() < 2:
        return None
    return 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1
