"""Resuming a long layer-by-layer technique (GPTQ, sequential MSE) after an interruption.

On a language model these techniques run for many minutes, one layer (or group of layers reading the same input)
after another, each layer's result depending on the layers before it. With a progress directory, each finished
layer's state (its weights and its quantizers' encodings, as ``state_dict`` tensors) is written as soon as it is
known; a rerun with the same directory loads the finished layers instead of computing them and goes on from the
next one, so the interrupted run and the resumed one end with the same bits as an uninterrupted run.

A layer is reused only by the run that wrote it: the directory records a fingerprint of everything that determines
the results (the technique and its settings, the layers in order, the calibration batches, and the sim's state at
the start), and a directory written by another run is refused in one line. The files hold tensors and numbers only
and are read with ``torch.load(weights_only=True)``, which runs no code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from edgequant.sim import QuantSim

MANIFEST = "progress.json"
T = TypeVar("T")


class ResumeError(ValueError):
    """A progress directory that this run cannot resume from."""


def run_fingerprint(technique: str, settings: Any, layers: Iterable[str], batches: Iterable[Any],
                    sim: QuantSim) -> str:
    """A digest of what determines a technique's per-layer results: its name, its settings (progress display and
    the directory left out), the layer names in order, the batches' tensors and the sim's state before it runs."""
    digest = hashlib.sha256(technique.encode())
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
              if f.name not in ("progress", "resume_dir")}
    digest.update(repr(sorted(fields.items())).encode())
    digest.update("\n".join(layers).encode())
    for batch in batches:
        _hash_tensors(digest, batch)
    for name, value in sim.model.state_dict().items():
        digest.update(name.encode())
        _hash_tensors(digest, value)
    return digest.hexdigest()


def _hash_tensors(digest: Any, value: Any) -> None:
    """Feed every tensor in a nested batch or state entry (dtype, shape, bytes) and any other value's repr."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _hash_tensors(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _hash_tensors(digest, item)
    else:
        digest.update(repr(value).encode())


def open_progress(technique: str, settings: Any, layers: Iterable[str], batches: Iterable[Any],
                  sim: QuantSim) -> LayerProgress:
    """The progress of a technique run with ``settings`` (whose ``resume_dir`` may be None: nothing kept), checked
    against the run's fingerprint (`run_fingerprint`, computed only when there is a directory)."""
    if settings.resume_dir is None:
        return LayerProgress(None, technique, "")
    return LayerProgress(settings.resume_dir, technique, run_fingerprint(technique, settings, layers, batches, sim))


class LayerProgress:
    """The finished layers of one run in ``directory`` (None: nothing is kept, nothing is resumed).

    `restore` loads a finished layer into the sim and returns its report entry; `save` records a layer the run
    has just finished."""

    def __init__(self, directory: str | Path | None, technique: str, fingerprint: str) -> None:
        self.directory = None if directory is None else Path(directory)
        self.finished: dict[str, str] = {}  # layer name -> its file in the directory
        if self.directory is None:
            return
        manifest = self.directory / MANIFEST
        if manifest.exists():
            recorded = _read_manifest(manifest)
            if recorded.get("technique") != technique or recorded.get("fingerprint") != fingerprint:
                raise ResumeError(
                    f"progress directory {self.directory} holds layers of another run ({recorded.get('technique')}"
                    f" with other settings, data or starting weights): delete it to start over, or pass another "
                    f"directory")
            self.finished = dict(recorded.get("layers", {}))
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._manifest = {"technique": technique, "fingerprint": fingerprint, "layers": self.finished}
        self._write_manifest()

    def restore(self, name: str, layer: nn.Module) -> dict[str, Any] | None:
        """Load the finished layer ``name`` into ``layer`` and return its report fields; None if not finished."""
        if name not in self.finished:
            return None
        path = self.directory / self.finished[name]
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            layer.load_state_dict(saved["state"])
        except Exception as error:
            raise ResumeError(f"progress file {path} cannot be read ({type(error).__name__}: {error}); delete "
                              f"{self.directory} to start over") from error
        return saved["report"]

    def unfinished(self, items: list[T], name: Callable[[T], str], layer: Callable[[T], nn.Module]
                   ) -> tuple[list[T], list[dict[str, Any]]]:
        """Load the finished ones of ``items`` into their layers; return the others, in order, and the report fields
        of the finished ones."""
        pending, reports = [], []
        for item in items:
            report = self.restore(name(item), layer(item))
            if report is None:
                pending.append(item)
            else:
                reports.append(report)
        return pending, reports

    def save(self, name: str, layer: nn.Module, report: dict[str, Any]) -> None:
        """Record the finished layer ``name``: its state and its report fields (numbers, strings, lists)."""
        if self.directory is None:
            return
        file = f"layer_{len(self.finished):05d}.pt"
        state = {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                 for key, value in layer.state_dict().items()}
        _atomic(self.directory / file, lambda path: torch.save({"state": state, "report": report}, path))
        self.finished[name] = file
        self._write_manifest()

    def _write_manifest(self) -> None:
        text = json.dumps(self._manifest, indent=1)
        _atomic(self.directory / MANIFEST, lambda path: path.write_text(text))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"progress file {path} is not readable ({error}); delete {path.parent} to start over") \
            from error
    if not isinstance(recorded, dict) or not isinstance(recorded.get("layers", {}), dict):
        raise ResumeError(f"progress file {path} is not a progress manifest; delete {path.parent} to start over")
    return recorded


def _atomic(path: Path, write: Any) -> None:
    """Write through a temporary file and rename it, so that an interruption leaves the old file or the new one."""
    temporary = path.with_name(path.name + ".partial")
    write(temporary)
    os.replace(temporary, path)
