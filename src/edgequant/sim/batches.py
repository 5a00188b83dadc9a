"""The one loop over user batches that every technique runs: limits, progress, device, (args, kwargs).

A batch is a tensor (one input), a tuple/list whose leading items are the model inputs (trailing items such
as labels are ignored), or a dict of keyword inputs, shaped like the sim's dummy input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


def split_model_input(dummy_input: Any) -> tuple[tuple, dict]:
    """A model input as (args, kwargs): a dict is keyword inputs, a tuple/list positional ones, else one input."""
    if isinstance(dummy_input, dict):
        return (), dict(dummy_input)
    if isinstance(dummy_input, (tuple, list)):
        return tuple(dummy_input), {}
    return (dummy_input,), {}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; the CPU for a model that has neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


@dataclass
class ModelInput:
    """The structure of the model's input (from the dummy input) that user batches are adapted to."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, dummy_input: Any) -> ModelInput:
        return cls(*split_model_input(dummy_input))

    @property
    def example(self) -> Any:
        """The dummy input as the user gave it: a dict for keyword inputs, else a tuple."""
        return dict(self.kwargs) if self.kwargs else self.args

    def to_call(self, batch: Any, index: int, device: torch.device | None,
                error: type[Exception] = ValueError) -> tuple[tuple, dict]:
        """``batch`` as ``(args, kwargs)`` for the model, on ``device``; NaN/inf inputs raise ``error``."""
        if isinstance(batch, dict):
            missing = [k for k in self.kwargs if k not in batch]
            if missing:
                raise error(f"batch {index} lacks the keyword inputs {missing} that the dummy input has")
            kwargs = {k: batch[k] for k in self.kwargs} if self.kwargs else dict(batch)
            args: tuple = ()
        elif isinstance(batch, (tuple, list)):
            args, kwargs = tuple(batch[: max(1, len(self.args))]), {}
        else:
            args, kwargs = (batch,), {}
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise error(f"batch {index} contains NaN or inf values; clean the data first")
        if device is not None:
            args, kwargs = move_to(args, device), move_to(kwargs, device)
        return args, kwargs


def iterate_batches(
    data: Iterable[Any],
    model_input: ModelInput,
    device: torch.device | None,
    *,
    num_batches: int | None = None,
    progress: bool = False,
    desc: str = "batches",
    error: type[Exception] = ValueError,
) -> Iterator[tuple[tuple, dict]]:
    """Yield up to ``num_batches`` batches of ``data`` as ``(args, kwargs)``; no batch at all raises ``error``."""
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"{desc}: num_batches must be at least 1, got {num_batches}")
    total = len(data) if hasattr(data, "__len__") else None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    count = 0
    for index, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, leave=False)):
        if num_batches is not None and index >= num_batches:
            break
        count += 1
        yield model_input.to_call(batch, index, device, error)
    if count == 0:
        raise error(f"{desc}: the data yielded no batch; pass at least one batch")
