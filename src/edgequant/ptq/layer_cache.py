"""`LayerCache`: per-layer tensors collected in one pass, kept in memory up to a budget and spilled to disk beyond.

AdaRound needs every target layer's inputs and reference outputs over the whole calibration set. Collecting
them in a single forward pass means holding all of them at once, which for a real network can exceed memory
(EfficientNet-Lite0 on 128 crops: several GB). Chunks are therefore kept on the device where they were
produced until ``memory_budget_mb`` is used, and every further chunk is written to a temporary directory with
`torch.save` and read back memory-mapped only when its layer is optimised.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import defaultdict
from pathlib import Path

import torch


class LayerCache:
    """Append-only store of tensor chunks by key (e.g. ``("conv1", "input")``); use as a context manager."""

    def __init__(self, memory_budget_mb: float) -> None:
        if memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0, got {memory_budget_mb}")
        self.budget_bytes = int(memory_budget_mb * 2**20)
        self.bytes_in_memory = 0
        self.bytes_spilled = 0  # total ever written to disk (a statistic for reports)
        self._chunks: dict[object, list[torch.Tensor | Path]] = defaultdict(list)
        self._spill_dir: Path | None = None
        self._removal: weakref.finalize | None = None  # removes the folder of a cache dropped without close()
        self._num_files = 0

    def __enter__(self) -> LayerCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, key: object, tensor: torch.Tensor) -> None:
        """Store one chunk (a batch of samples) under ``key``, in memory or on disk depending on the budget."""
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.bytes_in_memory + size <= self.budget_bytes:
            self._chunks[key].append(tensor.clone())
            self.bytes_in_memory += size
            return
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="edgequant-layer-cache-"))
            self._removal = weakref.finalize(self, shutil.rmtree, self._spill_dir, ignore_errors=True)
        path = self._spill_dir / f"chunk{self._num_files}.pt"
        self._num_files += 1
        torch.save(tensor.cpu(), path)
        self._chunks[key].append(path)
        self.bytes_spilled += size

    def get(self, key: object, device: torch.device | str) -> torch.Tensor:
        """All chunks of ``key`` concatenated along the batch dimension, on ``device``."""
        if key not in self._chunks:
            raise KeyError(f"nothing cached for {key!r}")
        parts = [
            torch.load(chunk, mmap=True, weights_only=True) if isinstance(chunk, Path) else chunk
            for chunk in self._chunks[key]
        ]
        return torch.cat([part.to(device) for part in parts])

    def drop(self, key: object) -> None:
        """Release ``key``'s chunks (memory and files) once its layer is done."""
        for chunk in self._chunks.pop(key, []):
            if isinstance(chunk, Path):
                chunk.unlink(missing_ok=True)
            else:
                self.bytes_in_memory -= chunk.numel() * chunk.element_size()

    def close(self) -> None:
        self._chunks.clear()
        self.bytes_in_memory = 0
        if self._removal is not None:
            self._removal()
            self._spill_dir = self._removal = None
