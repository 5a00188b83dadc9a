"""Timing helpers shared by the benchmarks: interleaved medians, so that load from other processes on a
shared machine hits both sides of a ratio alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int = 5,
                        warmup: int = 1, grad: bool = False,
                        statistic: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median (or ``statistic``: ``min`` on a machine whose load only ever adds time) wall time (s) of each
    function, running them round-robin ``repeats`` times after warmup (without autograd unless ``grad``)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    with torch.set_grad_enabled(grad):
        for _ in range(warmup):
            for function in functions.values():
                function()
        for _ in range(repeats):
            for name, function in functions.items():
                _synchronize()
                started = time.perf_counter()
                function()
                _synchronize()
                times[name].append(time.perf_counter() - started)
    return {name: statistic(values) for name, values in times.items()}


def _synchronize() -> None:
    """Wait for queued GPU work, so that a CUDA forward is timed whole."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
