"""Statistics of the FP32 values a quantizer sees: exact range and clipping, plus a subsample for histograms.

A value is *clipped* when it lies more than half a grid step outside the encoding's range (nearer values
are only rounded onto the end of the grid).

Keeping every activation of every batch to draw a histogram would cost the model's whole activation memory;
an evenly strided subsample (a fixed budget per batch) draws the same picture, while the range and the
fraction of values outside the encoding's grid are counted exactly on all values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from edgequant.quantization import Encoding

HISTOGRAM_BINS = 80


@dataclass
class Histogram:
    counts: list[int]
    edges: list[float]

    def to_dict(self) -> dict:
        return {"counts": self.counts, "edges": self.edges}


def histogram_of(values: np.ndarray, encoding: Encoding | None, bins: int = HISTOGRAM_BINS) -> Histogram:
    """Histogram over the values' range widened to the encoding's clipping range (so both are visible)."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if encoding is not None:
        low, high = min(low, float(encoding.min.min())), max(high, float(encoding.max.max()))
    if high <= low:
        high = low + 1e-6
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return Histogram(counts.tolist(), edges.tolist())


@dataclass
class ActivationStats:
    """Running statistics of one activation quantizer's FP32 input over the analysed batches."""

    samples_per_batch: int
    minimum: float = math.inf
    maximum: float = -math.inf
    count: int = 0
    clipped: int = 0
    samples: list[np.ndarray] = field(default_factory=list)

    def observe(self, tensor: torch.Tensor, encoding: Encoding | None) -> None:
        values = tensor.detach().reshape(-1)
        if not values.is_floating_point() or values.numel() == 0:
            return
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        self.count += values.numel()
        if encoding is not None:  # beyond the grid by more than half a step: clipped, not merely rounded
            half_step = encoding.scale.to(values.device) / 2
            low, high = encoding.min.to(values.device) - half_step, encoding.max.to(values.device) + half_step
            self.clipped += int(((values < low) | (values > high)).sum())
        stride = max(1, values.numel() // self.samples_per_batch)
        self.samples.append(values[::stride].float().cpu().numpy())

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / self.count if self.count else 0.0

    def histogram(self, encoding: Encoding | None) -> Histogram:
        values = np.concatenate(self.samples) if self.samples else np.zeros(0, dtype=np.float32)
        return histogram_of(values, encoding)
