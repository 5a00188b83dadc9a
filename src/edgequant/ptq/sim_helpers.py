"""Forwards that a hook ends early once its layer has been seen: how PTQ techniques collect one layer's data
without running the rest of the model."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class StopForward(Exception):
    """Raised by a forward hook once the layer of interest has run: the rest of the model need not."""


def run_until_stopped(model: nn.Module, batches: Iterable[tuple[tuple, dict]]) -> None:
    """Run every ``(args, kwargs)`` batch through ``model``; a hook raising `StopForward` ends that forward."""
    for args, kwargs in batches:
        try:
            model(*args, **kwargs)
        except StopForward:
            pass
