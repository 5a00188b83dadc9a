"""Encoding analyzers against brute-force references."""

import numpy as np
import pytest
import torch

from edgequant.quantization import (
    CalibrationError,
    Encoding,
    MinMaxAnalyzer,
    MseAnalyzer,
    PercentileAnalyzer,
    PerChannel,
    SqnrAnalyzer,
    quantize_dequantize,
)


def test_minmax_accumulates_over_batches_and_channels():
    analyzer = MinMaxAnalyzer(granularity=PerChannel(1))
    analyzer.observe(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    analyzer.observe(torch.tensor([[-4.0, 7.0]]))
    low, high = analyzer.compute_range(8, False)
    assert low.tolist() == [-4.0, -2.0]
    assert high.tolist() == [3.0, 7.0]


def test_percentile_matches_numpy_within_a_bin():
    torch.manual_seed(0)
    batches = [torch.randn(10_000) * (1 + i) for i in range(5)]  # range grows: histogram is widened
    analyzer = PercentileAnalyzer(percentile=99.0)
    for batch in batches:
        analyzer.observe(batch)
    low, high = analyzer.compute_range(8, False)
    values = torch.cat(batches).numpy()
    # the final bin width w bounds the error: each of the 4 widenings moves a count by at most half an older
    # (narrower) bin (2 w in all), and the quantile is read off the edge of its bin (w)
    bin_width = float(values.max() - values.min()) / analyzer.num_bins
    assert high.item() == pytest.approx(float(np.percentile(values, 99.0)), abs=3 * bin_width)
    assert low.item() == pytest.approx(float(np.percentile(values, 1.0)), abs=3 * bin_width)


def _expected_noise(values: torch.Tensor, encoding: Encoding, gamma: float) -> float:
    """Brute-force version of the SQNR objective on the raw values."""
    clipped = values.clamp(encoding.min.item(), encoding.max.item())
    inside = clipped == values
    rounding = inside.sum() * encoding.scale.item() ** 2 / 12
    clipping = gamma * (values - clipped)[~inside].square().sum()
    return float(rounding + clipping)


def test_sqnr_beats_every_other_symmetric_candidate_on_a_heavy_tailed_tensor():
    torch.manual_seed(1)
    values = torch.distributions.Laplace(0.0, 1.0).sample((20_000,))
    analyzer = SqnrAnalyzer(num_bins=2048)
    analyzer.observe(values)
    low, high = analyzer.compute_range(4, symmetric=True)
    chosen_noise = _expected_noise(values, Encoding.from_range(low, high, 4, True), analyzer.gamma)
    abs_max = values.abs().max().item()
    for fraction in np.linspace(0.02, 1.0, 60):
        candidate = Encoding.from_range(-abs_max * fraction, abs_max * fraction, 4, True)
        assert chosen_noise <= _expected_noise(values, candidate, analyzer.gamma) * 1.05
    minmax = Encoding.from_range(values.min(), values.max(), 4, True)
    assert chosen_noise < 0.7 * _expected_noise(values, minmax, analyzer.gamma)  # clipping the tails pays off


def test_sqnr_asymmetric_search_beats_brute_force_grid():
    torch.manual_seed(3)
    values = torch.distributions.Exponential(1.0).sample((20_000,)) - 0.3
    analyzer = SqnrAnalyzer(num_bins=2048)
    analyzer.observe(values)
    low, high = analyzer.compute_range(4, symmetric=False)
    assert low.item() <= 0.0 < high.item() < values.max().item()
    chosen_noise = _expected_noise(values, Encoding.from_range(low, high, 4, False), analyzer.gamma)
    for top in np.linspace(0.5, values.max().item(), 40):
        candidate = Encoding.from_range(values.min(), top, 4, False)
        assert chosen_noise <= _expected_noise(values, candidate, analyzer.gamma) * 1.05


def test_mse_per_channel_is_the_brute_force_optimum():
    torch.manual_seed(2)
    weight = torch.randn(4, 256) * torch.tensor([[0.1], [1.0], [5.0], [0.01]])
    weight[1, 0] = 12.0  # an outlier worth clipping in channel 1
    analyzer = MseAnalyzer(granularity=PerChannel(0))
    analyzer.observe(weight)
    low, high = analyzer.compute_range(4, symmetric=True)
    chosen = Encoding.from_range(low, high, 4, True, granularity=PerChannel(0))

    def mse(encoding: Encoding) -> torch.Tensor:
        approx = quantize_dequantize(weight, encoding.scale[:, None], encoding.offset[:, None], 4)
        return (approx - weight).square().mean(dim=1)

    chosen_error = mse(chosen)
    abs_max = weight.abs().amax(dim=1)
    for ratio in np.linspace(0.2, 1.0, 33):
        candidate = Encoding.from_range(-abs_max * ratio, abs_max * ratio, 4, True, granularity=PerChannel(0))
        assert (chosen_error <= mse(candidate) * 1.001 + 1e-12).all()
    minmax = Encoding.from_range(weight.amin(1), weight.amax(1), 4, True, granularity=PerChannel(0))
    assert chosen_error[1] < 0.8 * mse(minmax)[1]


def test_histogram_memory_is_bounded():
    analyzer = SqnrAnalyzer(num_bins=512)
    for i in range(50):
        analyzer.observe(torch.randn(4096) * (i + 1))
    assert analyzer.hist.shape == (1, 512)
    assert analyzer.hist.sum().item() == 50 * 4096  # no count lost while widening


def test_non_finite_values_are_ignored_and_counted():
    analyzer = MinMaxAnalyzer()
    analyzer.observe(torch.tensor([1.0, float("nan"), -2.0, float("inf")]))
    low, high = analyzer.compute_range(8, False)
    assert (low.item(), high.item()) == (-2.0, 1.0)
    assert analyzer.num_nonfinite == 2


def test_no_data_is_a_clear_error():
    analyzer = PercentileAnalyzer()
    analyzer.observe(torch.tensor([float("nan")]))
    with pytest.raises(CalibrationError, match="no finite data"):
        analyzer.compute_range(8, False)


def test_attention_mask_sentinels_do_not_stretch_the_grid():
    sentinel = torch.finfo(torch.float32).min
    scores = torch.tensor([-3.0, 0.5, 2.0, sentinel, -0.25])
    data = torch.tensor([-3.0, 0.5, 2.0, -0.25])
    for make in (MinMaxAnalyzer, SqnrAnalyzer, lambda: PercentileAnalyzer(percentile=100.0)):
        analyzer, reference = make(), make()
        analyzer.observe(scores)
        reference.observe(data)  # the same scores without the mask
        assert analyzer.num_sentinels == 1 and analyzer.num_nonfinite == 0
        assert (analyzer.min.item(), analyzer.max.item()) == (-3.0, 2.0)
        if hasattr(analyzer, "hist"):  # the sentinel is not a count either
            assert (analyzer.hist_min.item(), analyzer.hist_max.item()) == (-3.0, 2.0)
            assert torch.equal(analyzer.hist, reference.hist) and analyzer.hist.sum() == 4
        for symmetric in (False, True):
            low, high = analyzer.compute_range(8, symmetric)
            expected_low, expected_high = reference.compute_range(8, symmetric)
            assert torch.equal(low, expected_low) and torch.equal(high, expected_high), (make, symmetric)
        if not isinstance(analyzer, SqnrAnalyzer):  # min-max and the 100th percentile: exactly the data's range
            assert (low.item(), high.item()) == (-3.0, 2.0)
    # at run time the sentinel saturates to the grid's low end: the min-max grid of [-3, 2], scale 5/255, offset -153
    encoding = Encoding.from_range(-3.0, 2.0, 8, False)
    assert (encoding.scale.item(), encoding.offset.item()) == (pytest.approx(5 / 255), -153)
    saturated = quantize_dequantize(torch.tensor([sentinel]), encoding.scale, encoding.offset, 8)
    assert saturated.item() == encoding.min.item() == pytest.approx(-3.0, abs=1e-6)
