"""Checkpoints of a QAT run: everything that decides the rest of the run, so a resumed run ends bit-identical.

A checkpoint holds ``sim.model.state_dict()`` (weights, quantizer encodings with unrounded learned offsets,
quantizer flags), the optimizer and learning-rate schedule states, the position in the data (epoch, batch),
the best metric so far, the count of training forwards (for BatchNorm freezing) and the random number
generator states (dropout, shuffling). It is written to a temporary file and renamed, so a run killed while
writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "edgequant-qat-checkpoint"


@dataclass
class TrainingProgress:
    """Where a run stands: completed steps, position in the data, best evaluation, per-epoch history."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    training_forwards: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: TrainingProgress) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainingProgress:
    """Restore a checkpoint into the live model/optimizer/scheduler (tensors are copied in place)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        raise ValueError(f"{path} is not a readable QAT checkpoint ({type(error).__name__}); delete it to start "
                         "over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an edgequant QAT checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return TrainingProgress(**state["progress"])
