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

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from edgequant.quantization import Granularity, Quantizer
from edgequant.quantization.sealing import Sealable, live_data
from edgequant.sim.ops import CLAMP_ACTIVATIONS, clamp_bounds, function_name


class FrozenParam(NamedTuple):
    """A parameter's fake-quantized value, folded in by `QuantizedModule.freeze_quantized_params`."""

    quantized: torch.Tensor
    bitwidth: int
    granularity: Granularity


class FrozenWeightsError(RuntimeError):
    """A frozen sim was asked to train (frozen weights are for evaluation)."""


_UNFREEZE_HINT = "call sim.unfreeze_weights() first (or leave the `with sim.frozen_weights():` block)"


class QuantizedModule(Sealable):
    """Mixin placed before the original class; see the module docstring."""

    input_quantizers: nn.ModuleDict
    param_quantizers: nn.ModuleDict
    output_quantizers: nn.ModuleDict
    onnx_op_type: str
    _frozen_params: dict[str, FrozenParam] | None = None  # set while frozen
    _freeze_pending = False
    clamps_output = False  # one of CLAMP_ACTIVATIONS (exactly that class): see `_clamped_and_quantized`

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - same signature as the wrapped module
        if self.clamps_output and len(args) == 1 and not kwargs:
            output = self._clamped_and_quantized(args[0])
            if output is not None:
                return output
        input_quantizers = self._modules["input_quantizers"]
        if input_quantizers:
            args = tuple(
                input_quantizers[str(i)](arg) if str(i) in input_quantizers else arg for i, arg in enumerate(args)
            )
        original = self._swap_in_quantized_params()
        try:
            output = super().forward(*args, **kwargs)
        finally:
            for name, param in original.items():
                if param is None:
                    del self._parameters[name]  # a sealed name goes back out of reach
                else:
                    self._parameters[name] = param
        output_quantizers = self._modules["output_quantizers"]
        if not output_quantizers:
            return output
        if isinstance(output, torch.Tensor):  # the common case, without a pytree round trip per forward
            return output_quantizers["0"](output) if "0" in output_quantizers else output
        leaves, spec = tree_flatten(output)
        leaves = [
            output_quantizers[str(i)](leaf) if str(i) in output_quantizers else leaf for i, leaf in enumerate(leaves)
        ]
        return tree_unflatten(leaves, spec)

    def _clamped_and_quantized(self, x: torch.Tensor) -> torch.Tensor | None:
        """A ReLU or ReLU6 run inside its output quantizer's fused pass (one memory pass instead of two), where
        the quantizer `absorbs_clamp`; None elsewhere (the activation then runs on its own)."""
        output_quantizers = self._modules["output_quantizers"]
        if self._modules["input_quantizers"] or "0" not in output_quantizers:
            return None
        quantizer = output_quantizers["0"]
        if not quantizer.absorbs_clamp(x):
            return None
        return quantizer(x, clamp_first=clamp_bounds(self), clamp_in_place=self.inplace)

    def _swap_in_quantized_params(self) -> dict[str, nn.Parameter | None]:
        """Put the fake-quantized parameters in place for one forward; returns what to put back after it
        (None: a frozen parameter, to be taken out of reach again)."""
        if self._freeze_pending:
            self.freeze_quantized_params()
        if self._frozen_params:
            self._check_frozen()
        original = {}
        for name, quantizer in self._modules["param_quantizers"].items():
            frozen = self._frozen_params.get(name) if self._frozen_params else None
            if frozen is not None:
                original[name] = None
                quantizing = quantizer.enabled and not quantizer.calibrating
                self._parameters[name] = frozen.quantized if quantizing else self.tensor_values(name)
            elif quantizer.enabled and not quantizer.calibrating:
                original[name] = self._parameters[name]
                self._parameters[name] = quantizer(original[name])
        return original

    def _check_frozen(self) -> None:
        if torch.is_grad_enabled():
            raise FrozenWeightsError(
                f"{type(self).__name__}: the sim's weights are frozen for evaluation (sim.freeze_weights()); run it "
                f"under torch.no_grad(), or to train {_UNFREEZE_HINT}"
            )
        for name, frozen in self._frozen_params.items():
            quantizer = self.param_quantizers[name]
            if (quantizer.bitwidth, quantizer.granularity) != (frozen.bitwidth, frozen.granularity):
                self.thaw_quantized_params()  # the grid changed: fold the weights in again on it
                self.freeze_quantized_params()
                return

    def freeze_quantized_params(self) -> None:
        """Fold the fake-quantized values of this layer's quantized parameters in (evaluation only); the float
        parameters and their encodings are sealed until `thaw_quantized_params`."""
        self._freeze_pending = False
        if self._frozen_params:
            return
        frozen = {}
        with torch.no_grad():
            for name, quantizer in self.param_quantizers.items():
                param = self._parameters.get(name)
                if param is None or not quantizer.enabled or quantizer.calibrating or quantizer.scale is None:
                    continue  # stays live: quantized (or refused) per forward as before
                frozen[name] = FrozenParam(quantizer(live_data(param)), quantizer.bitwidth, quantizer.granularity)
        for name in frozen:
            quantizer = self.param_quantizers[name]
            message = (f"the encoding of '{quantizer.name}' is sealed while the sim's weights are frozen "
                       f"(sim.freeze_weights()); {_UNFREEZE_HINT} to read or change it")
            quantizer.seal_tensors(["scale", "offset"], message)
        message = ("'{}.{}' is sealed while the sim's weights are frozen (sim.freeze_weights() folded the "
                   f"fake-quantized weights in for evaluation); {_UNFREEZE_HINT} to read or change weights")
        for name in frozen:
            self.seal_tensors([name], message.format(self.param_quantizers[name].owner, name))
        self._frozen_params = frozen or None

    def thaw_quantized_params(self) -> None:
        """Undo `freeze_quantized_params`: the float parameters and encodings are back, quantized per forward."""
        for name in self._frozen_params or ():
            self.param_quantizers[name].unseal_tensors()
        self.unseal_tensors()
        self._frozen_params = None
        self._freeze_pending = False

    @property
    def params_frozen(self) -> bool:
        """Frozen now, or to be frozen again at the next forward (after a load or a device move)."""
        return bool(self._frozen_params) or self._freeze_pending

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Loading writes the float parameters and encodings: thaw, and fold in again at the next forward."""
        if self._frozen_params:
            self.thaw_quantized_params()
            self._freeze_pending = True
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:  # .to(), .half(), .cuda() ...
        """Device and dtype moves apply to the float parameters and encodings: thaw, refreeze at the next forward."""
        if self._frozen_params:
            self.thaw_quantized_params()
            self._freeze_pending = True
        return super()._apply(fn, recurse)

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
    module.clamps_output = cls in CLAMP_ACTIVATIONS
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
