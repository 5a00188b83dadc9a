"""Checkpoints of a QAT run: everything that decides the rest of the run, so a resumed run ends bit-identical.

A checkpoint holds ``sim.model.state_dict()`` (weights, quantizer encodings with unrounded learned offsets,
quantizer flags), the optimizer and learning-rate schedule states, the position in the data (epoch, batch),
the best metric so far, the count of training forwards (for BatchNorm freezing) and the random number
generator states (dropout, shuffling). It is written to a temporary file and renamed, so a run killed while
writing leaves the previous checkpoint intact. Resuming reads it without running code from it (tensors and plain
values only) and checks its format and the checksum of its model tensors before anything is restored.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgequant.sim.state_file import load_without_code, tensors_checksum, tensors_of

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
    state["checksum"] = tensors_checksum(tensors_of(state["model"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainingProgress:
    """Restore a checkpoint into the live model/optimizer/scheduler (tensors are copied in place)."""
    state = load_without_code(path, "QAT checkpoint", "delete it to start over")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an edgequant QAT checkpoint; delete it to start over")
    if not isinstance(state.get("model"), dict) or tensors_checksum(tensors_of(state["model"])) != state.get(
            "checksum"):
        raise ValueError(f"{path} is corrupted: its model tensors do not match the checksum written with them; "
                         "delete it to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return TrainingProgress(**state["progress"])

