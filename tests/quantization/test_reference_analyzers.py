"""Calibration analyzers against independent references: a brute-force SQNR search in float64 numpy, numpy's
empirical quantiles for the percentile analyzer, hand-computed histograms and scheme names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgequant.quantization import (
    Encoding,
    MinMaxAnalyzer,
    MseAnalyzer,
    PercentileAnalyzer,
    PerChannel,
    SqnrAnalyzer,
    make_analyzer,
)
from edgequant.quantization.analyzers import HistogramAnalyzer

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def brute_force_noise(counts: np.ndarray, centres: np.ndarray, scale: float, offset: float, num_steps: int,
                      gamma: float) -> float:
    """The SQNR objective evaluated bin by bin: scale^2 / 12 per value on the grid [min, max] (closed),
    gamma * squared clipping error per value outside it (each value at its bin centre). The grid's ends are
    float32 numbers, as `Encoding.min` / `Encoding.max` are."""
    grid_min, grid_max = float(np.float32(offset * scale)), float(np.float32((offset + num_steps) * scale))
    below, above = centres < grid_min, centres > grid_max
    inside = ~(below | above)
    clipping = (counts[below] * (grid_min - centres[below]) ** 2).sum() + (
        counts[above] * (centres[above] - grid_max) ** 2).sum()
    return float(counts[inside].sum() * scale**2 / 12 + gamma * clipping)


def candidates(low: float, high: float, bitwidth: int, symmetric: bool, num_scales: int, num_offsets: int):
    """The documented candidate grids: num_scales fractions of the range; asymmetric grids also try
    num_offsets offsets spread over [-num_steps, 0] and the offset that keeps the observed minimum."""
    num_steps = 2**bitwidth - 1
    low, high = min(low, 0.0), max(high, 0.0)
    for k in range(1, num_scales + 1):
        if symmetric:
            scale = max(-low, high, 1e-5) * k / num_scales / (num_steps // 2)
            yield scale, -(2.0 ** (bitwidth - 1))
            continue
        scale = max(high - low, 1e-5) * k / num_scales / num_steps
        offsets = set(np.round(np.linspace(-num_steps, 0, num_offsets)).tolist()) | {round(low / scale)}
        for offset in offsets:
            yield scale, float(min(max(offset, -num_steps), 0))


def chosen_grid(low: torch.Tensor, high: torch.Tensor, bitwidth: int, symmetric: bool) -> tuple[float, float]:
    encoding = Encoding.from_range(low.reshape(()), high.reshape(()), bitwidth, symmetric)
    return float(encoding.scale), float(encoding.offset)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gamma", [3.0, 1.0])
def test_sqnr_search_on_skewed_data_matches_brute_force(symmetric: bool, gamma: float) -> None:
    generator = torch.Generator().manual_seed(7)
    # mostly negative with a long negative tail and a short positive side: the negative side must count
    values = 0.5 - torch.empty(50_000).exponential_(1.0, generator=generator) ** 1.5
    bitwidth = 4
    analyzer = SqnrAnalyzer(num_bins=512, gamma=gamma)
    for batch in values.split(10_000):
        analyzer.observe(batch)
    counts = analyzer.hist[0].numpy()
    assert counts.sum() == len(values)
    width = (float(analyzer.hist_max[0]) - float(analyzer.hist_min[0])) / analyzer.num_bins
    centres = float(analyzer.hist_min[0]) + (np.arange(analyzer.num_bins) + 0.5) * width
    num_steps = 2**bitwidth - 1
    best = min(
        brute_force_noise(counts, centres, scale, offset, num_steps, gamma)
        for scale, offset in candidates(float(values.min()), float(values.max()), bitwidth, symmetric,
                                        analyzer.num_scales, analyzer.num_offsets)
    )
    low, high = analyzer.compute_range(bitwidth, symmetric)
    scale, offset = chosen_grid(low, high, bitwidth, symmetric)
    chosen = brute_force_noise(counts, centres, scale, offset, num_steps, gamma)
    # the analyzer ranks candidates in float32 and returns its grid through float32 encodings: a few eps.
    # Two-sided: a search over other candidates than the documented ones must not pass either.
    assert abs(chosen - best) <= 4 * FLOAT32_EPS * best, (chosen, best)
    minmax_scale, minmax_offset = chosen_grid(values.min(), values.max(), bitwidth, symmetric)
    assert chosen < brute_force_noise(counts, centres, minmax_scale, minmax_offset, num_steps, gamma)
    if symmetric:
        assert -float(low) > 2 * float(values.max())  # the grid follows the long negative side


def test_percentile_range_brackets_the_empirical_quantiles_within_one_bin() -> None:
    generator = torch.Generator().manual_seed(11)
    values = torch.randn(100_000, generator=generator) * torch.rand(100_000, generator=generator) * 3 + 0.7
    analyzer = PercentileAnalyzer(num_bins=2048, percentile=99.0)
    analyzer.observe(values)  # one batch: no widening, so the only error is the bin the quantile falls in
    low, high = (float(t) for t in analyzer.compute_range(8, False))
    width = (float(values.max()) - float(values.min())) / analyzer.num_bins
    at_or_below_high = float((values <= high).double().mean())
    below_low = float((values < low).double().mean())
    # high is the upper edge of the bin holding the 99th percentile, low the lower edge of the 1st's
    assert at_or_below_high >= 0.99 and float((values <= high - width).double().mean()) < 0.99
    assert below_low <= 0.01 and float((values < low + width).double().mean()) > 0.01
    assert np.percentile(values.numpy(), 99.0) <= high + FLOAT32_EPS * abs(high)
    assert np.percentile(values.numpy(), 1.0) >= low - FLOAT32_EPS * abs(low)


def test_percentile_100_is_the_observed_range() -> None:
    values = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0])
    analyzer = PercentileAnalyzer(num_bins=16, percentile=100.0)
    analyzer.observe(values)
    low, high = analyzer.compute_range(8, False)
    assert (low.item(), high.item()) == (-3.0, 4.0)


def test_percentile_argument_is_checked() -> None:
    for bad in (50.0, 100.5):
        with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
            PercentileAnalyzer(percentile=bad)


def test_histogram_widening_moves_whole_bins_by_their_centres() -> None:
    analyzer = HistogramAnalyzer(num_bins=4)
    analyzer.observe(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # bins of 0.75 on [0, 3]: one value each
    assert analyzer.hist[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    analyzer.observe(torch.tensor([7.0]))  # widened to [0, 7], bins of 1.75
    # old centres 0.375, 1.125, 1.875, 2.625 -> new bins 0, 0, 1, 1; the 7 goes to the last bin
    assert analyzer.hist[0].tolist() == [2.0, 2.0, 0.0, 1.0]
    assert (analyzer.hist_min.item(), analyzer.hist_max.item()) == (0.0, 7.0)
    analyzer.observe(torch.tensor([-7.0]))  # widened to [-7, 7], bins of 3.5
    # centres 0.875, 2.625, 4.375, 6.125 -> bins 2, 2, 3, 3; the -7 to bin 0
    assert analyzer.hist[0].tolist() == [1.0, 0.0, 4.0, 1.0]
    assert torch.allclose(analyzer.bin_centres(), torch.tensor([[-5.25, -1.75, 1.75, 5.25]]))


# Merging histograms of two calibration shards. Shard 1 spans [0, 8]; shard 2 widens one end only. One analyzer
# fed both shards widens its histogram once (shard 1's bins move whole to the merged bin holding their centre) and
# bins shard 2's values directly. A merge moves shard 1's bins the same way, but bins shard 2's values into shard
# 2's own histogram first and then moves each of those bins whole to the merged bin holding its centre. The two
# agree bit for bit when every bin of shard 2 lies inside one merged bin (a value and its bin's centre then share
# a merged bin); with 8 bins these ranges make it so (merged bins of 1.5 and 1.125, shard 2's of 0.75 and 0.375,
# shard 2's inner edges on merged edges, its ends at the merged range's ends or inside a merged bin).
MERGE_SHARD_1 = torch.tensor([0.0, 0.2, 1.4, 2.5, 3.3, 3.9, 4.0, 5.5, 7.1, 8.0])
MERGE_CASES = {
    # [6, 12]: merged range [0, 12]
    "upper_end": (torch.tensor([6.0, 6.4, 7.0, 8.1, 9.3, 9.3, 10.0, 11.2, 12.0]), (0.0, 12.0),
                  [2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 2.0]),
    # [-1, 2]: merged range [-1, 8]; shard 2's maximum 2 is inside merged bin 2 = [1.25, 2.375)
    "lower_end": (torch.tensor([-1.0, -0.8, -0.4, 0.3, 0.3, 0.7, 1.0, 1.5, 2.0]), (-1.0, 8.0),
                  [3.0, 6.0, 3.0, 1.0, 3.0, 1.0, 0.0, 2.0]),
}
HISTOGRAM_ANALYZERS = {
    "sqnr": lambda: SqnrAnalyzer(num_bins=8),
    "mse_activations": lambda: SqnrAnalyzer(num_bins=8, gamma=1.0),
    "percentile": lambda: PercentileAnalyzer(num_bins=8, percentile=90.0),
}


@pytest.mark.parametrize("case", MERGE_CASES)
@pytest.mark.parametrize("kind", HISTOGRAM_ANALYZERS)
def test_merging_a_shard_that_widens_one_end_equals_one_analyzer_fed_both(kind: str, case: str) -> None:
    shard_2, (low, high), expected_hist = MERGE_CASES[case]
    single = HISTOGRAM_ANALYZERS[kind]()
    single.observe(MERGE_SHARD_1)
    single.observe(shard_2)
    merged, other = HISTOGRAM_ANALYZERS[kind](), HISTOGRAM_ANALYZERS[kind]()
    merged.observe(MERGE_SHARD_1)
    other.observe(shard_2)
    merged.merge(other)
    # shard 1's bins of 1 at centres 0.5 .. 7.5 (counts 2 1 1 2 1 1 0 2) plus shard 2's values, by hand
    assert single.hist[0].tolist() == expected_hist
    assert merged.hist[0].tolist() == expected_hist
    for analyzer in (single, merged):
        assert (analyzer.hist_min.item(), analyzer.hist_max.item()) == (low, high)
        assert (analyzer.min.item(), analyzer.max.item()) == (low, high)
    for bitwidth, symmetric in ((8, False), (4, False), (4, True)):
        expected = single.compute_range(bitwidth, symmetric)
        actual = merged.compute_range(bitwidth, symmetric)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1]), (bitwidth, symmetric)


@pytest.mark.parametrize("case", ["upper_end", "lower_end"])
def test_merged_histogram_of_unaligned_shards_is_within_one_bin_of_one_analyzer(case: str) -> None:
    generator = torch.Generator().manual_seed(5)
    shard_1 = torch.randn(20_000, generator=generator)
    shard_2 = torch.randn(20_000, generator=generator)
    if case == "upper_end":
        shard_2 = (shard_2 + 2.0).clamp(min=float(shard_1.min()))
        assert shard_2.max() > shard_1.max() + 1
    else:
        shard_2 = (shard_2 - 2.0).clamp(max=float(shard_1.max()))
        assert shard_2.min() < shard_1.min() - 1
    single = SqnrAnalyzer()
    single.observe(shard_1)
    single.observe(shard_2)
    merged, other = SqnrAnalyzer(), SqnrAnalyzer()
    merged.observe(shard_1)
    other.observe(shard_2)
    merged.merge(other)
    assert torch.equal(merged.hist_min, single.hist_min) and torch.equal(merged.hist_max, single.hist_max)
    assert torch.equal(merged.min, single.min) and torch.equal(merged.max, single.max)
    # Shard 2's bins are no wider than the merged ones (its range lies inside the merged range, same bin count),
    # and a value is at most half a shard-2 bin from the centre its count moves with: every count of the merge
    # sits in the bin the single analyzer gave it or a neighbour. So the cumulative counts interleave:
    # single[k - 1] <= merged[k] <= single[k + 1].
    single_cdf, merged_cdf = single.hist[0].cumsum(0), merged.hist[0].cumsum(0)
    assert merged_cdf[-1] == single_cdf[-1] == 40_000
    assert (merged_cdf[1:] >= single_cdf[:-1]).all() and (merged_cdf[:-1] <= single_cdf[1:]).all()
    assert not torch.equal(merged.hist, single.hist)  # the ranges do not align: some counts did move a bin


def test_per_channel_histogram_by_hand_with_a_sentinel() -> None:
    analyzer = HistogramAnalyzer(granularity=PerChannel(0), num_bins=3)
    analyzer.observe(torch.tensor([[0.0, 1e31, 3.0], [0.0, 1.0, 2.0]]))
    # channel 0: the sentinel is left out (counted as the channel minimum, 0): bins of 1 on [0, 3]
    # channel 1: bins of 2/3 on [0, 2]
    assert analyzer.hist.tolist() == [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert analyzer.num_sentinels == 1 and analyzer.num_nonfinite == 0
    assert analyzer.min.tolist() == [0.0, 0.0] and analyzer.max.tolist() == [3.0, 2.0]
    analyzer.observe(torch.tensor([[6.0], [-2.0]]))  # both channels widen: [0, 6] and [-2, 2]
    assert analyzer.hist.tolist() == [[2.0, 1.0, 1.0], [1.0, 1.0, 2.0]]


def test_minmax_per_channel_skips_non_finite_and_empty_channels() -> None:
    analyzer = MinMaxAnalyzer(granularity=PerChannel(1))
    analyzer.observe(torch.tensor([[1.0, float("nan")], [-2.0, float("inf")]]))  # channel 1: nothing usable
    assert analyzer.min is None and analyzer.num_nonfinite == 2
    analyzer.observe(torch.tensor([[1.0, 5.0], [-2.0, float("-inf")], [0.5, -1e35]]))
    low, high = analyzer.compute_range(8, True)
    assert low.tolist() == [-2.0, 5.0] and high.tolist() == [1.0, 5.0]
    assert analyzer.num_nonfinite == 3 and analyzer.num_sentinels == 1
    analyzer.reset()
    assert analyzer.min is None and analyzer.num_nonfinite == 0 and analyzer.num_sentinels == 0


@pytest.mark.parametrize("scheme, for_params, expected, gamma", [
    ("minmax", False, MinMaxAnalyzer, None), ("tf", True, MinMaxAnalyzer, None),
    ("min_max", False, MinMaxAnalyzer, None), ("post_training_tf", False, MinMaxAnalyzer, None),
    ("sqnr", False, SqnrAnalyzer, 3.0), ("tf_enhanced", True, SqnrAnalyzer, 3.0),
    ("post_training_tf_enhanced", False, SqnrAnalyzer, 3.0),
    ("percentile", False, PercentileAnalyzer, None), ("post_training_percentile", False, PercentileAnalyzer, None),
    ("percentile", True, MinMaxAnalyzer, None),
    ("mse", True, MseAnalyzer, None), ("mse", False, SqnrAnalyzer, 1.0),
])
def test_scheme_names(scheme: str, for_params: bool, expected: type, gamma: float | None) -> None:
    analyzer = make_analyzer(scheme, 1, for_params)
    assert type(analyzer) is expected and analyzer.granularity == PerChannel(1)
    if gamma is not None:
        assert analyzer.gamma == gamma
    with pytest.raises(ValueError, match="unknown quant_scheme 'nope'; choose one of minmax, sqnr, percentile, mse"):
        make_analyzer("nope", None, False)


def test_no_data_message_counts_the_ignored_values() -> None:
    analyzer = MinMaxAnalyzer()
    with pytest.raises(Exception, match=r"^no finite data was observed$"):
        analyzer.compute_range(8, False)
    analyzer.observe(torch.tensor([float("nan"), float("inf")]))
    with pytest.raises(Exception, match=r"^no finite data was observed \(2 non-finite values were ignored\)$"):
        analyzer.compute_range(8, False)


def test_sentinel_threshold_and_counts_accumulate() -> None:
    analyzer = SqnrAnalyzer(num_bins=8)
    edge = float(torch.tensor(1e30))  # SENTINEL_MAGNITUDE in float32: at least that much is a sentinel
    analyzer.observe(torch.tensor([-1.0, 2.0, -edge]))
    analyzer.observe(torch.tensor([0.5, edge, 1.0]))
    assert analyzer.num_sentinels == 2 and analyzer.num_nonfinite == 0
    assert (analyzer.min.item(), analyzer.max.item()) == (-1.0, 2.0)
    assert analyzer.hist.sum().item() == 4  # the sentinels are not counted in the histogram
    just_below = float(torch.tensor(1e30).nextafter(torch.tensor(0.0)))
    analyzer.observe(torch.tensor([just_below]))
    assert analyzer.num_sentinels == 2 and analyzer.max.item() == just_below


def test_per_channel_histogram_with_a_nonzero_minimum() -> None:
    analyzer = HistogramAnalyzer(granularity=PerChannel(0), num_bins=4)
    analyzer.observe(torch.tensor([[2.0, 2.9, 3.1, 6.0], [-4.0, -3.5, -1.0, 0.0]]))
    # channel 0: [2, 6], bins of 1 -> 2, 2.9 in bin 0; 3.1 in bin 1; 6 in bin 3
    # channel 1: [-4, 0], bins of 1 -> -4, -3.5 in bin 0; -1 and 0 in bin 3
    assert analyzer.hist.tolist() == [[2.0, 1.0, 0.0, 1.0], [2.0, 0.0, 0.0, 2.0]]


def test_constant_data_gets_a_min_range_histogram() -> None:
    analyzer = PercentileAnalyzer(num_bins=16, percentile=99.0)
    analyzer.observe(torch.full((10,), 2.0))
    assert analyzer.hist_max.item() == float(torch.tensor(2.0) + 1e-5) and analyzer.hist.shape == (1, 16)
    assert analyzer.hist.sum().item() == 10
    low, high = analyzer.compute_range(8, False)
    assert (low.item(), high.item()) == (2.0, 2.0)


def test_mse_keeps_every_observed_batch() -> None:
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(3, 200, generator=generator) * torch.tensor([[0.5], [2.0], [1.0]])
    weight[0, 150] = 6.0  # an outlier only in the second batch
    whole, split = MseAnalyzer(granularity=PerChannel(0)), MseAnalyzer(granularity=PerChannel(0))
    whole.observe(weight)
    split.observe(weight[:, :100])
    split.observe(weight[:, 100:])
    assert split.values.shape == (3, 200)
    for expected, actual in zip(whole.compute_range(4, True), split.compute_range(4, True), strict=True):
        assert torch.equal(expected, actual)


def test_mse_returns_the_observed_range_when_it_is_already_exact() -> None:
    # values exactly on the 4-bit symmetric min-max grid: ratio 1 has zero error, any other ratio does not
    values = torch.arange(-7.0, 8.0)[None] * torch.tensor([[0.25], [0.5]])
    analyzer = MseAnalyzer(granularity=PerChannel(0))
    analyzer.observe(values)
    low, high = analyzer.compute_range(4, True)
    assert low.tolist() == [-1.75, -3.5] and high.tolist() == [1.75, 3.5]


@pytest.mark.parametrize("num_candidates", [1, 2])
def test_mse_with_few_candidates(num_candidates: int) -> None:
    analyzer = MseAnalyzer(num_candidates=num_candidates, min_ratio=0.5)
    analyzer.observe(torch.tensor([-1.0, 0.1, 0.3, 0.5, 2.0]))
    low, high = analyzer.compute_range(8, False)
    ratio = high.item() / 2.0
    assert low.item() == pytest.approx(-ratio) and 0.5 <= ratio <= 1.0
    if num_candidates == 1:
        assert ratio == 0.5  # the only candidate; no fine window


def test_percentile_clips_exactly_the_tail_counts() -> None:
    values = torch.arange(200.0)  # one value per bin
    analyzer = PercentileAnalyzer(num_bins=200, percentile=99.0)
    analyzer.observe(values)
    low, high = analyzer.compute_range(8, False)
    assert int((values < low).sum()) == 2 and int((values > high).sum()) == 2  # 1 % of 200 on each side
    assert 1.0 < low.item() <= 2.0 and 197.0 <= high.item() < 198.0


def test_analyzer_arguments_are_honoured() -> None:
    assert PercentileAnalyzer(percentile=50.5).percentile == 50.5
    for analyzer in (PercentileAnalyzer(num_bins=16), SqnrAnalyzer(num_bins=16)):
        analyzer.observe(torch.tensor([0.0, 1.0]))
        assert analyzer.hist.shape == (1, 16)


def _sqnr_setup(values: torch.Tensor) -> tuple[SqnrAnalyzer, np.ndarray, np.ndarray]:
    """The analyzer and its histogram, with the float32 bin centres it uses (checked by hand above), so that
    the brute force below differs from its prefix sums only in the order of float64 operations."""
    analyzer = SqnrAnalyzer(num_bins=64)
    analyzer.observe(values)
    return analyzer, analyzer.hist[0].numpy(), analyzer.bin_centres()[0].double().numpy()


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0], ids=["mixed", "all_positive", "all_negative"])
def test_expected_noise_of_each_candidate_equals_brute_force(shift: float) -> None:
    generator = torch.Generator().manual_seed(9)
    values = torch.randn(5000, generator=generator) * 0.7 + shift
    analyzer, counts, centres = _sqnr_setup(values)
    # grids that clip below only, above only, both, neither, or lie entirely beside the histogram
    candidates = [(0.05, -8.0), (0.05, -1.0), (0.05, -14.0), (0.5, -8.0), (0.01, 0.0), (0.01, -15.0),
                  (0.3, -15.0), (0.3, 0.0), (0.2, -3.0), (1.0, -15.0), (1.0, 0.0)]
    scales = torch.tensor([[s for s, _ in candidates]])
    offsets = torch.tensor([[[o] for _, o in candidates]])
    noise = analyzer._expected_noise(scales, offsets, 15)[0, :, 0].double().numpy()
    expected = np.array([brute_force_noise(counts, centres, s, o, 15, analyzer.gamma)
                         for s, (_, o) in zip(scales[0].double().tolist(), candidates, strict=True)])
    np.testing.assert_allclose(noise, expected, rtol=FLOAT32_EPS, atol=0)  # the final float32 rounding


def test_sqnr_extreme_gammas_pick_the_extreme_candidates() -> None:
    values = torch.linspace(-1.0, 3.0, 4001)
    free_clipping = SqnrAnalyzer(num_bins=256, gamma=0.0)  # only rounding noise counts: the finest grid wins
    free_clipping.observe(values)
    low, high = free_clipping.compute_range(8, True)
    assert high.item() == pytest.approx(3.0 / free_clipping.num_scales, rel=4 * FLOAT32_EPS)
    no_clipping = SqnrAnalyzer(num_bins=256, gamma=1e12)  # any clipping costs more than all rounding
    no_clipping.observe(values)
    low, high = no_clipping.compute_range(8, True)
    assert high.item() == pytest.approx(3.0, rel=4 * FLOAT32_EPS) and low.item() == -high.item()


def test_percentile_low_end_can_reach_the_last_bin() -> None:
    values = torch.cat([torch.zeros(1), torch.full((999,), 10.0)])  # 0.1 % at 0: inside the 1 % tail
    analyzer = PercentileAnalyzer(num_bins=10, percentile=99.0)
    analyzer.observe(values)
    low, high = analyzer.compute_range(8, False)
    assert (low.item(), high.item()) == (9.0, 10.0)  # the lower edge of the last bin, and the maximum
