"""Giving a Hugging Face module of any class another forward in place, keeping its attributes and weights."""

from __future__ import annotations

from torch import nn

_MIXED_CLASSES: dict[tuple[type, type], type] = {}


def mix_in(module: nn.Module, mixin: type, prefix: str) -> None:
    """Make ``module`` an instance of ``mixin`` placed before its own class (named ``prefix`` + its class name), one
    class per pair, so that every module of a class gets the same new class (isinstance and copies behave alike)."""
    cls = type(module)
    key = (mixin, cls)
    if key not in _MIXED_CLASSES:
        _MIXED_CLASSES[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _MIXED_CLASSES[key]
