"""Sealing a module's tensors: take parameters/buffers out of reach while a derived copy of them is in use.

The simulation folds fake-quantized weights into its layers for evaluation (`QuantSim.freeze_weights`). A
cache of derived values can go stale whenever the source is written, and writes through ``tensor.data`` do not
bump version counters, so no check short of re-reading every byte can see them. Sealing removes the source
tensors (a layer's float weight, its quantizer's scale and offset) from the module instead: while sealed, any
access through the module, ``getattr(module, "weight", None)`` and ``hasattr`` included, raises
`SealedTensorError` naming the way out, so nothing can read stale values or write values that would be ignored.
State dicts still contain the sealed tensors (saving a frozen sim saves its float weights and encodings).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class SealedTensorError(RuntimeError):
    """A sealed tensor was accessed. Not an AttributeError on purpose: ``hasattr``/``getattr(..., None)`` must
    not mistake a sealed weight for a missing one."""


_HELD = "_edgequant_sealed_values"
"""Attribute of a sealed tensor: [its values, how many modules have it sealed]. A tensor two modules share (tied
weights) keeps its values until the last seal is lifted, and the second seal records the values, not the emptied
tensor; on the tensor itself, the record lives and dies with it."""


def live_data(tensor: torch.Tensor) -> torch.Tensor:
    """The values of ``tensor``, also while a module (another owner of a shared tensor) has it sealed."""
    held = getattr(tensor, _HELD, None)
    return held[0] if held is not None else tensor.data


class Sealable(nn.Module):
    """Mixin for modules whose parameters and buffers can be sealed (see the module docstring)."""

    def seal_tensors(self, names: list[str], message: str) -> None:
        """Take the tensors ``names`` out of the module; accessing them raises ``message``. The tensor objects
        keep their identity (an optimizer's references stay valid after unsealing) but hold no elements while
        sealed, so a write through a reference taken earlier cannot change the values that were sealed."""
        sealed = self.__dict__.setdefault("_sealed", {})
        for name in names:
            store = self._parameters if name in self._parameters else self._buffers
            tensor = store.pop(name)
            held = getattr(tensor, _HELD, None)
            if held is None:
                held = [tensor.data, 0]
                setattr(tensor, _HELD, held)
            held[1] += 1
            sealed[name] = (store is self._parameters, tensor, held[0], message)
            tensor.data = tensor.data.new_empty(0)

    def unseal_tensors(self) -> None:
        """Put every sealed tensor back where it was, with its values (a shared tensor gets them back when the
        last module that sealed it unseals it)."""
        for name, (is_parameter, tensor, data, _) in self.__dict__.pop("_sealed", {}).items():
            held = getattr(tensor, _HELD)
            held[1] -= 1
            if held[1] == 0:
                delattr(tensor, _HELD)
                tensor.data = data
            (self._parameters if is_parameter else self._buffers)[name] = tensor

    def tensor_values(self, name: str) -> torch.Tensor | None:
        """Parameter or buffer ``name`` (None where the module has none), sealed or not: for code that reads what a
        derived copy was made from without changing it (the emulation reads a frozen layer's weight and its
        encoding); a write goes through unsealing."""
        sealed = self.__dict__.get("_sealed")
        if sealed and name in sealed:
            return sealed[name][2]
        return self._parameters.get(name, self._buffers.get(name))

    @property
    def tensors_sealed(self) -> bool:
        return bool(self.__dict__.get("_sealed"))

    @contextmanager
    def _unsealed(self) -> Iterator[None]:
        sealed = self.__dict__.get("_sealed")
        if not sealed:
            yield
            return
        self.unseal_tensors()
        try:
            yield
        finally:
            self.seal_tensors(list(sealed), "")
            self.__dict__["_sealed"] = sealed  # the same tensors and values, with their messages

    def __getattr__(self, name: str) -> Any:
        """nn.Module's lookup of parameters, buffers and submodules (which this replaces, so that an attribute
        costs one Python frame as before), then the sealed names."""
        state = self.__dict__
        for store_name in ("_parameters", "_buffers", "_modules"):
            store = state.get(store_name)
            if store is not None and name in store:
                return store[name]
        sealed = state.get("_sealed")
        if sealed and name in sealed:
            raise SealedTensorError(sealed[name][3])
        return super().__getattr__(name)  # nn.Module's AttributeError

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        with self._unsealed():  # a state dict holds the values of sealed tensors too
            super()._save_to_state_dict(destination, prefix, keep_vars)
