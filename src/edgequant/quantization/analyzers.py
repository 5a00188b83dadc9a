"""Encoding analyzers: the statistics a quantizer keeps and turns into a range (the engines behind the
calibration methods of `calibration_methods`).

Every analyzer keeps statistics of fixed size (min/max, or a histogram of ``num_bins`` bins per channel), so
calibrating on 10x more batches costs 10x the time but not 10x the memory.

Non-finite values (NaN, +-inf) are left out of the statistics and counted in ``num_nonfinite``; the
simulation warns about them. Magnitudes of at least ``SENTINEL_MAGNITUDE`` (``torch.finfo(float32).min`` in
attention masks) are sentinels, not data: they are left out as well (counted in ``num_sentinels``, no
warning) so that they do not stretch the grid; at run time they saturate to the grid's ends, as on the device.
An analyzer that saw no usable value at all raises `CalibrationError`.

Searching analyzers (SQNR, MSE) score each candidate on the grid the quantizer will use: `compute_range` takes
``strict_symmetric`` (the ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` grid), which the quantizer passes when its grid is strict.

Statistics are kept per row of `Granularity.rows`: one row per scale (per tensor: one row; per channel: one per
channel; per block: one per block of each channel, the per-channel statistics of the grouped view), so every
analyzer computes per-block ranges with its per-channel code.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from edgequant.quantization.encoding import MIN_RANGE, grid_steps, strict_symmetric_offset
from edgequant.quantization.granularity import PER_TENSOR, Granularity, PerChannel, as_granularity

SENTINEL_MAGNITUDE = 1e30


class CalibrationError(RuntimeError):
    """Calibration could not produce an encoding (no data, or only non-finite data)."""


class EncodingAnalyzer:
    """Base class: tracks the running min/max per row (scale) and the count of non-finite values.

    ``granularity`` also takes the ``axis: int | None`` of older code. ``scale_shape`` is the shape of the scale the
    observed tensors need (set by `observe`); ``tensor_name`` names the tensor in errors (the quantizer sets it)."""

    tensor_name = "analyzer"
    large_statistics: ClassVar[bool] = False
    """Whether the statistics of one scale are large (a histogram, the values), so that `Quantizer.encode_from` takes
    a tensor of many scales (blocks) a chunk at a time."""

    def __init__(self, granularity: Granularity | int | None = PER_TENSOR) -> None:
        self.granularity = as_granularity(granularity)
        self.scale_shape: tuple[int, ...] = ()
        self.reset()

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (scales, values) float rows; remembers the scale shape."""
        self.scale_shape = self.granularity.scale_shape(x.shape, self.tensor_name)
        return self.granularity.rows(x.detach().float(), self.tensor_name)

    def reset(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.num_nonfinite = 0
        self.num_sentinels = 0

    def observe(self, x: torch.Tensor) -> None:
        values = self._rows(x)
        batch_min, batch_max = self._extremes(values)
        if not ((batch_min > -SENTINEL_MAGNITUDE).all() and (batch_max < SENTINEL_MAGNITUDE).all()):  # NaN fails too
            finite = values.abs() < SENTINEL_MAGNITUDE
            nonfinite = int((~torch.isfinite(values)).sum())
            self.num_nonfinite += nonfinite
            self.num_sentinels += int((~finite).sum()) - nonfinite
            if not finite.any(dim=1).all():
                return  # a channel with no finite value contributes nothing
            batch_min = torch.where(finite, values, torch.inf).amin(dim=1)
            batch_max = torch.where(finite, values, -torch.inf).amax(dim=1)
            if values.shape[0] == 1:
                values = values[finite][None]
            else:  # per-channel: keep the shape; the excluded entries count as the channel minimum
                values = torch.where(finite, values, batch_min[:, None])
        self._update(values, batch_min, batch_max)

    def observe_alone(self, x: torch.Tensor) -> bool:
        """`reset`, then `observe` ``x``, in fewer passes where these statistics allow it (QAT recomputes every
        weight's encoding at every step). Returns False, with nothing done, where `observe` is needed."""
        return False

    def _extremes(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row min and max of a (rows, values) view."""
        if values.shape[0] == 1:  # a full reduction is ~20x faster than aminmax over dim 1 of a (1, N) view
            low, high = torch.aminmax(values)
            return low.reshape(1), high.reshape(1)
        return values.amin(dim=1), values.amax(dim=1)  # 5-60x faster than aminmax over dim 1 on the CPU

    def _update(self, values: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        self._merge_min_max(batch_min, batch_max)

    def _merge_min_max(self, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        if self.min is None:
            self.min, self.max = batch_min, batch_max
        else:
            self.min = torch.minimum(self.min, batch_min)
            self.max = torch.maximum(self.max, batch_max)

    def merge(self, other: EncodingAnalyzer) -> None:
        """Add ``other``'s statistics to these, as if this analyzer had also seen ``other``'s tensors.

        This is the seam for distributed calibration: each process observes its shard, then the statistics of
        all processes are merged in rank order, so every process computes the same encoding."""
        if type(other) is not type(self) or other.granularity != self.granularity:
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self.num_nonfinite += other.num_nonfinite
        self.num_sentinels += other.num_sentinels
        if other.min is not None:
            self._merge_statistics(other)

    def _merge_statistics(self, other: EncodingAnalyzer) -> None:
        self._merge_min_max(other.min.to(self._device(other)), other.max.to(self._device(other)))

    def _device(self, other: EncodingAnalyzer) -> torch.device:
        return self.min.device if self.min is not None else other.min.device

    def compute_range(
        self, bitwidth: int, symmetric: bool, *, strict_symmetric: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) the encoding should cover, on the grid of ``bitwidth``, ``symmetric`` and
        ``strict_symmetric`` (applies when symmetric)."""
        self._require_data()
        return self.min, self.max

    def _require_data(self) -> None:
        if self.min is None:
            detail = f" ({self.num_nonfinite} non-finite values were ignored)" if self.num_nonfinite else ""
            raise CalibrationError("no finite data was observed" + detail)


class MinMaxAnalyzer(EncodingAnalyzer):
    """The observed extremes (AIMET's ``tf`` / ``min_max``)."""

    def observe_alone(self, x: torch.Tensor) -> bool:
        """One min/max pass and one check where every value is data (no non-finite value, no sentinel)."""
        low, high = self._extremes(self._rows(x))
        if not float(torch.maximum(-low, high).max()) < SENTINEL_MAGNITUDE:  # NaN fails too
            return False
        self.reset()
        self.min, self.max = low, high
        return True


class HistogramAnalyzer(EncodingAnalyzer):
    """Keeps a ``num_bins`` histogram per channel whose range grows to cover every observed value.

    When a batch falls outside the current range the old counts are moved to the bins of the widened
    range (each old bin lands whole in the new bin holding its centre), so memory stays fixed.
    """

    large_statistics = True

    def __init__(self, granularity: Granularity | int | None = PER_TENSOR, num_bins: int = 512) -> None:
        self.num_bins = num_bins
        super().__init__(granularity)

    def reset(self) -> None:
        super().reset()
        self.hist: torch.Tensor | None = None
        self.hist_min: torch.Tensor | None = None
        self.hist_max: torch.Tensor | None = None

    def _update(self, values: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        self._merge_min_max(batch_min, batch_max)
        if self.hist is None:
            self.hist_min = self.min.clone()
            self.hist_max = torch.maximum(self.max, self.min + MIN_RANGE)
            self.hist = torch.zeros(values.shape[0], self.num_bins, dtype=torch.float64, device=values.device)
        elif (self.min < self.hist_min).any() or (self.max > self.hist_max).any():
            self._widen(torch.minimum(self.min, self.hist_min), torch.maximum(self.max, self.hist_max))
        self.hist += self._histogram(values, self.hist_min, self.hist_max)

    def _merge_statistics(self, other: EncodingAnalyzer) -> None:
        device = self._device(other)
        if self.hist is None:
            self.min, self.max = other.min.to(device), other.max.to(device)
            self.hist = other.hist.to(device).clone()
            self.hist_min, self.hist_max = other.hist_min.to(device), other.hist_max.to(device)
            return
        other_min, other_max = other.hist_min.to(device), other.hist_max.to(device)
        super()._merge_statistics(other)
        if (other_min < self.hist_min).any() or (other_max > self.hist_max).any():
            self._widen(torch.minimum(other_min, self.hist_min), torch.maximum(other_max, self.hist_max))
        self.hist += self._rebinned(other.hist.to(device), other.bin_centres().to(device))

    def _rebinned(self, counts: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """``counts`` at bin ``centres`` moved whole into this histogram's bins (the rule `_widen` follows)."""
        width = (self.hist_max - self.hist_min) / self.num_bins
        index = ((centres - self.hist_min[:, None]) / width[:, None]).long().clamp_(0, self.num_bins - 1)
        return torch.zeros_like(self.hist).scatter_add_(1, index, counts)

    def _histogram(self, values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if values.shape[0] == 1:
            counts = torch.histc(values, self.num_bins, float(low), float(high))
            return counts.to(torch.float64)[None]
        width = (high - low) / self.num_bins
        index = ((values - low[:, None]) / width[:, None]).long().clamp_(0, self.num_bins - 1)
        index += torch.arange(values.shape[0], device=values.device)[:, None] * self.num_bins
        counts = torch.bincount(index.flatten(), minlength=values.shape[0] * self.num_bins)
        return counts.view(values.shape[0], self.num_bins).to(torch.float64)

    def _widen(self, new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        counts, centres = self.hist, self.bin_centres()
        self.hist_min, self.hist_max = new_min, new_max
        self.hist = self._rebinned(counts, centres)

    def bin_centres(self) -> torch.Tensor:
        width = (self.hist_max - self.hist_min) / self.num_bins
        steps = torch.arange(self.num_bins, device=width.device, dtype=torch.float32) + 0.5
        return self.hist_min[:, None] + steps[None] * width[:, None]


class PercentileAnalyzer(HistogramAnalyzer):
    """Clips the ``(100 - percentile)`` and ``percentile`` tails of the observed distribution."""

    def __init__(
        self, granularity: Granularity | int | None = PER_TENSOR, num_bins: int = 2048, percentile: float = 99.99
    ) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(granularity, num_bins)

    def compute_range(
        self, bitwidth: int, symmetric: bool, *, strict_symmetric: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        cdf = self.hist.cumsum(dim=1)
        total = cdf[:, -1:]
        tail = (100.0 - self.percentile) / 100.0
        low_bin = torch.searchsorted(cdf, total * tail, right=True).clamp(max=self.num_bins - 1)
        high_bin = torch.searchsorted(cdf, total * (1.0 - tail)).clamp(max=self.num_bins - 1)
        width = (self.hist_max - self.hist_min) / self.num_bins
        low = self.hist_min + low_bin.squeeze(1) * width
        high = self.hist_min + (high_bin.squeeze(1) + 1) * width
        return torch.maximum(low, self.min), torch.minimum(high, self.max)


class SqnrAnalyzer(HistogramAnalyzer):
    """Grid search for the encoding with the least expected quantization noise (AIMET's ``tf_enhanced``).

    Noise of a candidate grid, from the histogram: values inside the grid cost the rounding noise
    ``scale**2 / 12``; clipped values cost their squared clipping error weighted by ``gamma``
    (``gamma = 1`` is a plain MSE search).
    """

    def __init__(
        self,
        granularity: Granularity | int | None = PER_TENSOR,
        num_bins: int = 512,
        gamma: float = 3.0,
        num_scales: int = 100,
        num_offsets: int = 21,
    ) -> None:
        self.gamma = gamma
        self.num_scales = num_scales
        self.num_offsets = num_offsets
        super().__init__(granularity, num_bins)

    def compute_range(
        self, bitwidth: int, symmetric: bool, *, strict_symmetric: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        num_steps = grid_steps(bitwidth, symmetric and strict_symmetric)
        low = torch.minimum(self.min, torch.zeros_like(self.min))
        high = torch.maximum(self.max, torch.zeros_like(self.max))
        fractions = torch.arange(1, self.num_scales + 1, device=low.device) / self.num_scales
        if symmetric:
            abs_max = torch.maximum(-low, high).clamp_min(MIN_RANGE)
            scales = abs_max[:, None] * fractions[None] / (num_steps // 2)  # (C, S); 2**(b-1) - 1 steps, strict or not
            lowest = strict_symmetric_offset(bitwidth) if strict_symmetric else -(2 ** (bitwidth - 1))
            offsets = torch.full_like(scales, float(lowest))[..., None]  # (C, S, 1)
        else:
            scales = (high - low).clamp_min(MIN_RANGE)[:, None] * fractions[None] / num_steps
            spread = torch.linspace(-num_steps, 0, self.num_offsets, device=low.device).round()
            offsets = torch.cat(
                [spread.expand(*scales.shape, -1), torch.round(low[:, None] / scales)[..., None]], dim=-1
            ).clamp(-num_steps, 0)  # (C, S, O)
        noise = self._expected_noise(scales, offsets, num_steps)  # (C, S, O)
        flat = noise.flatten(1).argmin(dim=1)
        scale_idx, offset_idx = flat // offsets.shape[2], flat % offsets.shape[2]
        rows = torch.arange(flat.shape[0], device=flat.device)
        best_scale = scales[rows, scale_idx]
        best_offset = offsets[rows, scale_idx, offset_idx]
        if symmetric:  # Encoding.from_range maps +-abs_max back to this scale
            abs_max = best_scale * (num_steps // 2)
            return -abs_max, abs_max
        return best_offset * best_scale, (best_offset + num_steps) * best_scale

    def _expected_noise(self, scales: torch.Tensor, offsets: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Noise of every candidate grid in O(channels x candidates), from prefix sums over the histogram:
        the clipping error below ``low`` is ``sum n (low - c)^2 = low^2 N - 2 low S1 + S2`` over bins left of it."""
        counts = self.hist
        centres = self.bin_centres().double()
        zero = torch.zeros_like(counts[:, :1])
        prefix = [torch.cat([zero, (counts * centres**k).cumsum(dim=1)], dim=1) for k in range(3)]  # N, S1, S2
        width = ((self.hist_max - self.hist_min) / self.num_bins).double()[:, None, None]
        grid_min = (offsets * scales[..., None]).double()  # (C, S, O)
        grid_max = ((offsets + num_steps) * scales[..., None]).double()
        start = self.hist_min.double()[:, None, None]
        below_end = torch.ceil((grid_min - start) / width - 0.5).clamp(0, self.num_bins).long()
        above_start = (torch.floor((grid_max - start) / width - 0.5) + 1).clamp(0, self.num_bins).long()

        def prefix_at(k: int, index: torch.Tensor) -> torch.Tensor:
            return prefix[k].gather(1, index.flatten(1)).view(index.shape)

        total = [p[:, -1:, None] for p in prefix]
        below = [prefix_at(k, below_end) for k in range(3)]
        above = [total[k] - prefix_at(k, above_start) for k in range(3)]
        clip_below = grid_min**2 * below[0] - 2 * grid_min * below[1] + below[2]
        clip_above = grid_max**2 * above[0] - 2 * grid_max * above[1] + above[2]
        inside = total[0] - below[0] - above[0]
        rounding = inside * (scales.double()[..., None] ** 2) / 12.0
        return (rounding + self.gamma * (clip_below + clip_above).clamp_min(0)).float()


class MseAnalyzer(EncodingAnalyzer):
    """Per-channel search over clipping ratios that minimises the exact quantization MSE of the tensor.

    Coarse to fine: ``num_candidates`` ratios over ``[min_ratio, 1]``, then as many again within one coarse
    step around each channel's best, so the search costs 2 x ``num_candidates`` passes over the values.
    It keeps the observed values, so it is meant for weights (observed once); the ``mse`` calibration method
    gives activations a histogram-based search instead (`SqnrAnalyzer` with ``gamma=1``).
    """

    large_statistics = True

    def __init__(
        self, granularity: Granularity | int | None = PER_TENSOR, num_candidates: int = 24, min_ratio: float = 0.2
    ) -> None:
        self.num_candidates = num_candidates
        self.min_ratio = min_ratio
        super().__init__(granularity)

    def reset(self) -> None:
        super().reset()
        self.values: torch.Tensor | None = None

    def _update(self, values: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        self._merge_min_max(batch_min, batch_max)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=1)

    def _merge_statistics(self, other: EncodingAnalyzer) -> None:
        super()._merge_statistics(other)
        values = other.values.to(self.min.device)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=1)

    def compute_range(
        self, bitwidth: int, symmetric: bool, *, strict_symmetric: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        strict = symmetric and strict_symmetric
        coarse = torch.linspace(self.min_ratio, 1.0, self.num_candidates, device=self.min.device)
        step = float(coarse[1] - coarse[0]) if self.num_candidates > 1 else 0.0
        best_ratio, best_error = self._search(coarse[:, None].expand(-1, self.min.shape[0]), bitwidth, symmetric,
                                              strict)
        offsets = torch.linspace(-step, step, self.num_candidates, device=self.min.device)
        fine = (best_ratio[None] + offsets[:, None]).clamp(1e-3, 1.0)
        fine_ratio, fine_error = self._search(fine, bitwidth, symmetric, strict)
        ratio = torch.where(fine_error < best_error, fine_ratio, best_ratio)
        return self.min * ratio, self.max * ratio

    def _search(
        self, ratios: torch.Tensor, bitwidth: int, symmetric: bool, strict_symmetric: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best of ``ratios`` (candidates x channels) per channel, and its error on the grid the quantizer uses."""
        from edgequant.quantization.affine import quantize_dequantize
        from edgequant.quantization.encoding import Encoding

        best_error = torch.full_like(self.min, torch.inf)
        best_ratio = torch.ones_like(self.min)
        for ratio in ratios:
            encoding = Encoding.from_range(self.min * ratio, self.max * ratio, bitwidth, symmetric, PerChannel(0),
                                           strict_symmetric=strict_symmetric)
            scale, offset = encoding.scale[:, None], encoding.offset[:, None]
            quantized = quantize_dequantize(self.values, scale, offset, bitwidth, strict_symmetric=strict_symmetric)
            error = (quantized - self.values).square().mean(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, ratio, best_ratio)
        return best_ratio, best_error

