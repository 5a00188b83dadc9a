"""Turning a leaf module into a quantized one without moving its parameters.

The module's class is swapped for a subclass that mixes in `QuantizedModule`, so ``conv.weight`` keeps its
name (state dicts, encodings files and optimizers see the same tensors) and the original ``forward`` still
does the work. The mixin adds three `nn.ModuleDict` of `Quantizer`:

* ``input_quantizers``  keyed by input position (``"0"``, ``"1"``...),
* ``param_quantizers``  keyed by parameter name (``"weight"``...),
* ``output_quantizers`` keyed by output position.

Only tensors the hardware config quantizes get an entry.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from edgequant.quantization import Quantizer
from edgequant.sim.ops import function_name


class QuantizedModule(nn.Module):
    """Mixin placed before the original class; see the module docstring."""

    input_quantizers: nn.ModuleDict
    param_quantizers: nn.ModuleDict
    output_quantizers: nn.ModuleDict
    onnx_op_type: str

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - same signature as the wrapped module
        if self.input_quantizers:
            args = tuple(
                self.input_quantizers[str(i)](arg) if str(i) in self.input_quantizers else arg
                for i, arg in enumerate(args)
            )
        original = self._swap_in_quantized_params()
        try:
            output = super().forward(*args, **kwargs)
        finally:
            self._parameters.update(original)
        if not self.output_quantizers:
            return output
        if isinstance(output, torch.Tensor):  # the common case, without a pytree round trip per forward
            return self.output_quantizers["0"](output) if "0" in self.output_quantizers else output
        leaves, spec = tree_flatten(output)
        leaves = [
            self.output_quantizers[str(i)](leaf) if str(i) in self.output_quantizers else leaf
            for i, leaf in enumerate(leaves)
        ]
        return tree_unflatten(leaves, spec)

    def _swap_in_quantized_params(self) -> dict[str, nn.Parameter]:
        """Replace parameters by their fake-quantized values for one forward; returns the originals."""
        original = {}
        for name, quantizer in self.param_quantizers.items():
            param = self._parameters[name]
            if quantizer.enabled and not quantizer.calibrating:
                original[name] = param
                self._parameters[name] = quantizer(param)
        return original

    def quantizers(self) -> dict[str, Quantizer]:
        """This module's quantizers by local name (``input_quantizers.0``, ``param_quantizers.weight``...)."""
        found = {}
        for group in ("input_quantizers", "param_quantizers", "output_quantizers"):
            for key, quantizer in getattr(self, group).items():
                found[f"{group}.{key}"] = quantizer
        return found


_QUANTIZED_CLASSES: dict[type, type] = {}


def make_quantized(module: nn.Module, onnx_op_type: str) -> QuantizedModule:
    """Swap ``module``'s class for its quantized subclass (in place) and give it empty quantizer dicts."""
    cls = type(module)
    if cls not in _QUANTIZED_CLASSES:
        _QUANTIZED_CLASSES[cls] = type(f"Quantized{cls.__name__}", (QuantizedModule, cls), {})
    module.__class__ = _QUANTIZED_CLASSES[cls]
    module.input_quantizers = nn.ModuleDict()
    module.param_quantizers = nn.ModuleDict()
    module.output_quantizers = nn.ModuleDict()
    module.onnx_op_type = onnx_op_type
    return module


class FunctionalOp(nn.Module):
    """A functional op from the captured graph (``x + y``, ``torch.cat``, ``q @ k``) as a leaf module.

    Making it a module gives it quantizers and a name like any layer (AIMET requires users to do this
    by hand; we do it on the graph).
    """

    def __init__(self, target: object, onnx_op_type: str) -> None:
        super().__init__()
        self.target = target
        self.onnx_op_type = onnx_op_type

    def extra_repr(self) -> str:
        return function_name(self.target)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
        if isinstance(self.target, str):  # a tensor method: x.softmax(-1)
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


def param_quantizer(module: nn.Module, name: str = "weight") -> Quantizer | None:
    """The quantizer of parameter ``name`` of a sim layer, or None (not a sim layer, or not quantized)."""
    if not isinstance(module, QuantizedModule) or name not in module.param_quantizers:
        return None
    return module.param_quantizers[name]


def is_float_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
