"""Layers that read the very same input tensor (q, k and v; gate and up), found during one forward.

Techniques that gather a layer's inputs with one pass over the calibration data per layer (GPTQ's Hessians,
sequential MSE's Gram matrices) can gather such layers together: the input exists before any of them runs, so what
the technique does to one cannot change another's input."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Item = TypeVar("Item")


def input_sharing_groups(order: list[Item], calls: Callable[[Item], int],
                         first_input: Callable[[Item], torch.Tensor]) -> list[list[Item]]:
    """``order`` (layers in execution order) cut into runs of consecutive layers called once per forward on the
    same input tensor object. Compare objects held alive during the forward: a freed tensor's memory may be
    reused by the next one."""
    groups: list[list[Item]] = []
    for item in order:
        previous = groups[-1][-1] if groups else None
        if (previous is not None and calls(item) == calls(previous) == 1
                and first_input(item) is first_input(previous)):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups
