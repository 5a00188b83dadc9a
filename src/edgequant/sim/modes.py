"""Context managers that change a (simulated) model for a while and always put it back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from edgequant.quantization import Quantizer


@contextmanager
def quantizers_enabled(quantizers: Iterable[Quantizer], enabled: bool) -> Iterator[None]:
    """Turn ``quantizers`` on or off (and out of calibration) inside the block; restore their flags after."""
    quantizers = list(quantizers)
    saved = [(q.enabled, q.calibrating) for q in quantizers]
    for quantizer in quantizers:
        quantizer.enabled, quantizer.calibrating = enabled, False
    try:
        yield
    finally:
        for quantizer, (was_enabled, was_calibrating) in zip(quantizers, saved, strict=True):
            quantizer.enabled, quantizer.calibrating = was_enabled, was_calibrating


def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """Run a (simulated) model in float: every `Quantizer` in it passes its input through unchanged."""
    return quantizers_enabled((m for m in model.modules() if isinstance(m, Quantizer)), False)


@contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put every module of ``model`` in train/eval mode inside the block; restore each module's mode after."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was_training in saved:
            module.training = was_training
