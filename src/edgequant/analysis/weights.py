"""Per-channel ranges and histograms of the quantized parameters, next to the encodings chosen for them.

One channel with a much wider range than the others forces a coarse per-tensor grid on all of them; plotting
each output channel's min/max against the clipping range shows that at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgequant.analysis.tensor_stats import Histogram, histogram_of
from edgequant.quantization import Quantizer
from edgequant.sim import QuantSim
from edgequant.sim.ops import weight_output_axis


@dataclass
class WeightRanges:
    """Per output channel min/max of one quantized parameter (1-D parameters: one value per channel)."""

    quantizer: str
    layer: str
    param: str
    shape: list[int]
    channel_axis: int
    channel_min: list[float]
    channel_max: list[float]
    histogram: Histogram

    def to_dict(self) -> dict:
        return {"quantizer": self.quantizer, "param": self.param, "shape": self.shape,
                "channel_axis": self.channel_axis, "channel_min": self.channel_min, "channel_max": self.channel_max}


def weight_ranges(sim: QuantSim, quantizer: Quantizer) -> WeightRanges:
    layer = sim.layer_of(quantizer)
    param = getattr(layer, quantizer.key).detach().float().cpu()
    axis = weight_output_axis(layer, param) or 0
    channels = param.reshape(1) if param.dim() == 0 else param.movedim(axis, 0).reshape(param.shape[axis], -1)
    if param.dim() <= 1:
        low = high = channels.reshape(-1)
    else:
        low, high = channels.min(dim=1).values, channels.max(dim=1).values
    return WeightRanges(
        quantizer.name, quantizer.owner, quantizer.key, list(param.shape), axis, low.tolist(), high.tolist(),
        histogram_of(param.reshape(-1).numpy(), quantizer.encoding),
    )


def channel_spread(ranges: WeightRanges) -> float:
    """Largest channel |value| over the median channel's (1 = balanced; large = one channel sets the grid)."""
    widths = torch.maximum(torch.tensor(ranges.channel_max).abs(), torch.tensor(ranges.channel_min).abs())
    if widths.numel() <= 1:
        return 1.0
    median = float(widths.median())
    return float(widths.max()) / median if median > 0 else float("inf")
