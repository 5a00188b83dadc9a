"""PTQ math against independent references: BN folding with near-zero variances and negative gammas, high-bias
absorption equal to max(0, beta - 3 |gamma|), AdaRound on a problem with a known optimum and under clipping
(MSE) weight grids, bias correction against closed forms (scipy) and hand-computed means.

Tolerances are float32 rounding bounds: ``FLOAT32_EPS`` (2^-23, twice the unit roundoff) times the magnitudes
that enter each rounded operation, so one rounding per operation passes and a wrong formula does not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from references import FLOAT32_EPS, assert_within, bn_factor_and_shift, grid_from_encoding, set_batch_norm
from scipy import stats
from torch import nn

from edgequant import QuantSim
from edgequant.ptq import ChannelClamp, correct_bias, equalize, fold_batch_norms, fold_batch_norms_to_scale
from edgequant.ptq.adaround import adaround
from edgequant.ptq.batch_norm_fold import fold_batch_norm_records
from edgequant.ptq.bias_correction import clipped_normal_mean
from edgequant.quantization import Encoding, PerChannel

EDGE_BN = {"mean": [0.3, -2.0, 0.1, 5.0], "var": [0.0, 1e-7, 0.5, 2.0], "gamma": [-1.5, 0.3, -0.01, 2.0],
           "beta": [0.2, -0.1, 0.05, 1.0]}


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_fold_into_preceding_layer_with_near_zero_variance_and_negative_gamma(eps: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=eps))
    set_batch_norm(model[1], **EDGE_BN)
    weight, bias = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    factor, shift = bn_factor_and_shift(model[1])
    x = torch.randn(16, 3)
    with torch.no_grad():
        reference = model(x).double()
    records = fold_batch_norm_records(model, x)
    assert isinstance(model[1], nn.Identity)
    # weights: one rounding of the float64 product
    assert_within(model[0].weight, weight * factor[:, None], FLOAT32_EPS * np.abs(weight * factor[:, None]))
    # bias: (b - mean) f + beta, as b f + t: two float32 roundings of the parts, one of the sum
    assert_within(model[0].bias, bias * factor + shift, FLOAT32_EPS * (np.abs(bias * factor) + np.abs(shift)))
    assert np.sign(model[0].weight.detach().numpy()).tolist() == np.sign(weight * factor[:, None]).tolist()
    (record,) = records
    assert (record.layer, record.bn, record.direction) == ("0", "1", "preceding")
    assert record.gamma.tolist() == np.abs(EDGE_BN["gamma"]).astype(np.float32).astype(np.float64).tolist()
    assert record.beta.tolist() == np.float32(EDGE_BN["beta"]).astype(np.float64).tolist()
    with torch.no_grad():
        folded = model(x).double()
    # the folded layer is a 3-term dot product plus bias: bound by the magnitudes it sums
    magnitude = (x.abs().double() @ model[0].weight.detach().abs().double().T + model[0].bias.detach().abs()).numpy()
    assert_within(folded, reference.numpy(), 4 * FLOAT32_EPS * magnitude + 2 * FLOAT32_EPS * np.abs(reference.numpy()))


def test_fold_into_following_layer_adds_w_times_shift() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    set_batch_norm(model[0], **EDGE_BN)
    weight, bias = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    factor, shift = bn_factor_and_shift(model[0])
    (pair,) = fold_batch_norms(model, torch.randn(2, 4))
    assert pair[0] is model[1] and isinstance(model[0], nn.Identity)
    assert_within(model[1].weight, weight * factor[None, :], FLOAT32_EPS * np.abs(weight * factor[None, :]))
    assert_within(model[1].bias, bias + weight @ shift, FLOAT32_EPS * (np.abs(bias) + np.abs(weight) @ np.abs(shift)))


def test_fold_to_scale_maps_negative_channels_exactly() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    set_batch_norm(model[1], mean=[0.1, 0.2, -0.3, 0.0], var=[1.0, 0.25, 4.0, 1e-7], gamma=[-2.0, 0.5, -0.25, 1.0],
                   beta=[0.0, 0.1, 0.2, 0.3])
    x = torch.randn(2, 2, 3, 3)
    sim = QuantSim(model, x, param_bw=4, config="per_channel")
    sim.compute_encodings(lambda m: m(x))
    conv = sim.model.get_submodule("0")
    with torch.no_grad():  # in steps of 1/8: -8 (the grid's lowest step) and 7.2, 2.4, -3.6, 4.8
        conv.weight.copy_(torch.tensor([[-1.0, 0.9], [-1.0, 0.3], [-1.0, -0.45], [-1.0, 0.6]]).view(4, 2, 1, 1))
    scale = torch.full((4,), 0.125)
    sim.set_encoding("0.param_quantizers.weight", Encoding(scale, torch.full((4,), -8.0), 4, True, PerChannel(0)))
    steps_before = torch.clamp(torch.round(conv.weight.detach() / scale.view(-1, 1, 1, 1)), -8, 7)
    assert steps_before.view(4, 2).tolist() == [[-8, 7], [-8, 2], [-8, -4], [-8, 5]]
    factor, _ = bn_factor_and_shift(model[1])
    fold_batch_norms_to_scale(sim)
    quantized = conv.param_quantizers["weight"](conv.weight).detach().double()
    # negative factor: step k becomes -k, and the lowest step -8 saturates at 7 (the symmetric grid's asymmetry)
    signs = torch.from_numpy(np.sign(factor)).view(-1, 1, 1, 1)
    steps_after = torch.clamp(steps_before.double() * signs, -8, 7)
    expected = (steps_after * scale.double().view(-1, 1, 1, 1) * torch.from_numpy(np.abs(factor)).view(-1, 1, 1, 1))
    assert_within(quantized, expected.numpy(), 2 * FLOAT32_EPS * np.abs(expected.numpy()))
    assert (steps_after == 7).sum() > 0 and bool((steps_after[factor < 0] != -8).all())


# -- high-bias absorption ------------------------------------------------------------------------------------
def balanced_pair(activation: nn.Module, beta: list, gamma: list) -> nn.Sequential:
    """Conv 1x1 -> BN -> activation -> Conv 1x1, with layer 2's input ranges equal to layer 1's folded output
    ranges, so equalization's scales are exactly 1 and absorption can be checked against the BN alone."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), activation, nn.Conv2d(4, 2, 1))
    set_batch_norm(model[1], mean=[0.5, -0.2, 0.0, 1.0], var=[1.0, 0.5, 2.0, 0.1], gamma=gamma, beta=beta)
    folded = copy.deepcopy(model)
    fold_batch_norms(folded, torch.randn(1, 3, 2, 2))
    ranges = folded[0].weight.detach().abs().amax(dim=(1, 2, 3))
    with torch.no_grad():
        model[3].weight.copy_(torch.stack([ranges, -0.5 * ranges]).view(2, 4, 1, 1))
    return model


def absorbed_reference(beta: list, gamma: list, upper: float | None) -> np.ndarray:
    """max(0, beta - 3 |gamma|) from the BN parameters (through a clamp: at most its upper bound)."""
    amount = np.maximum(0.0, np.float32(beta).astype(np.float64) - 3 * np.abs(np.float32(gamma).astype(np.float64)))
    return amount if upper is None else np.minimum(amount, upper)


ABSORB_BETA = [2.0, 0.5, 7.5, -1.0]  # channel 2 above the ReLU6 range: absorbed up to 6
ABSORB_GAMMA = [0.25, 0.5, -0.1, 0.3]  # channel 2 has a negative gamma: 3 |gamma| counts


@pytest.mark.parametrize("activation, upper", [(nn.ReLU(), None), (nn.ReLU6(), 6.0)], ids=["relu", "relu6"])
def test_absorbed_bias_is_max_0_beta_minus_3_gamma(activation: nn.Module, upper: float | None) -> None:
    model = balanced_pair(activation, ABSORB_BETA, ABSORB_GAMMA)
    baseline = copy.deepcopy(model)
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        reference = model(x).double().numpy()
    equalize(baseline, x, absorb_high_bias=False, activation_aware=False)
    report = equalize(model, x, activation_aware=False)
    assert report.iterations == 1  # scales exactly 1
    torch.testing.assert_close(model[0].weight, baseline[0].weight, rtol=0, atol=0)
    amount = absorbed_reference(ABSORB_BETA, ABSORB_GAMMA, upper)
    assert amount.tolist() == pytest.approx([1.25, 0.0, 6.0 if upper else 7.2, 0.0], abs=1e-6)
    b1, b2 = baseline[0].bias.detach().double().numpy(), baseline[3].bias.detach().double().numpy()
    w2 = baseline[3].weight.detach().double().numpy().reshape(2, 4)
    assert_within(model[0].bias, b1 - amount, FLOAT32_EPS * (np.abs(b1) + amount))
    assert_within(model[3].bias, b2 + w2 @ amount, FLOAT32_EPS * (np.abs(b2) + np.abs(w2) @ amount))
    assert report.pairs[0].absorbed_bias == pytest.approx(amount.mean(), rel=FLOAT32_EPS)
    mean, std = report.layer_output_stats["0"]
    assert_within(mean, np.float32(ABSORB_BETA) - amount, FLOAT32_EPS * np.abs(ABSORB_BETA))
    assert std.tolist() == np.abs(np.float32(ABSORB_GAMMA)).tolist()
    if upper is not None:  # both clamp bounds move by the amount: the function is unchanged for every input
        clamp = model[2]
        assert isinstance(clamp, ChannelClamp)
        assert clamp.lower.tolist() == (-np.float32(amount)).tolist()
        assert clamp.upper.tolist() == (np.float32(6.0) - np.float32(amount)).tolist()
        with torch.no_grad():
            absorbed = model(x).double().numpy()
        # 4-term dot products of activations in [0, 6]: a few roundings of the summed magnitudes
        magnitude = np.abs(w2) @ (6.0 + amount) + np.abs(b2) + np.abs(w2) @ amount
        assert np.abs(absorbed - reference).max() <= 8 * FLOAT32_EPS * magnitude.max()


# -- AdaRound -------------------------------------------------------------------------------------------------
def test_adaround_finds_the_known_optimum_and_clamps_to_the_grid() -> None:
    # weights in steps of s = 1 on the 4-bit grid [-8, 7]; samples alternate between inputs (1, 1, 0, 0) and
    # (0, 0, 1, 1). Output 0 = w00 + w01 must approach 1.25: nearest (1 + 1) is off by 0.75, one up and one
    # down (1 + 0) by 0.25. Output 1 = w12 + w13 must approach 9.5: w12 = 9.3 clips to 7 whatever its
    # rounding, so w13 = 0.2 is best rounded up (7 + 1). Output 2: w22 = -9.6 clips to -8 at the low end.
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.7, 0.55, 0.0, 0.0], [0.0, 0.0, 9.3, 0.2], [0.0, 0.0, -9.6, 0.0]]))
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).repeat(16, 1)
    sim = QuantSim(model, x[:2], param_bw=4)
    sim.set_enabled(False, kinds=("input", "output"))
    sim.set_encoding("0.param_quantizers.weight", Encoding(1.0, -8.0, 4, True), freeze=False)
    result = adaround(sim, [x], num_iterations=400, learning_rate=0.05, progress=False)
    steps = sim.model.get_submodule("0").weight.detach()
    assert steps[0, 2:].tolist() == [0.0, 0.0] and steps[1, :2].tolist() == [0.0, 0.0]
    assert sorted(steps[0, :2].tolist()) == [0.0, 1.0]  # floor of one, ceil of the other
    assert steps[1, 2:].tolist() == [7.0, 1.0]
    assert steps[2].tolist() == [0.0, 0.0, -8.0, 0.0]
    (layer,) = result.layers
    # per sample one or two outputs are off: nearest 0.75 | 2.5 and 1.6; AdaRound 0.25 | 1.5 and 1.6
    assert layer.nearest_mse == pytest.approx(0.5 * 0.75**2 + 0.5 * (2.5**2 + 1.6**2))
    assert layer.adaround_mse == pytest.approx(0.5 * 0.25**2 + 0.5 * (1.5**2 + 1.6**2))
    assert layer.flipped_fraction == pytest.approx(2 / 12)


def test_adaround_under_clipping_mse_grids_stays_on_the_grid_and_on_floor_or_floor_plus_one() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight[:, 0].mul_(4.0)  # heavy-tailed channels: the MSE search clips them
    x = nn.functional.interpolate(torch.randn(64, 3, 3, 3), size=6, mode="bilinear")
    sim = QuantSim(model, x[:2], param_bw=4, quant_scheme="mse", config="per_channel")
    sim.calibrate([x[:32], x[32:]], progress=False)
    float_weights = {name: model.get_submodule(name).weight.detach().clone() for name in ("0", "2")}
    adaround(sim, [x[:32], x[32:]], num_iterations=60, learning_rate=0.05, progress=False)
    clipped_weights = 0
    for name, weight in float_weights.items():
        quantizer = sim.model.get_submodule(name).param_quantizers["weight"]
        scale, low, high = grid_from_encoding(quantizer.encoding, weight)
        rounded = sim.model.get_submodule(name).weight.detach()
        clipped_weights += int(((weight / scale < low) | (weight / scale > high)).sum())
        steps = torch.round(rounded / scale)
        assert torch.equal(steps * scale, rounded), name  # on the grid
        assert bool(((steps >= low) & (steps <= high)).all()), name  # inside it
        floor = torch.floor(weight / scale)
        assert bool(((steps == floor.clamp(low, high)) | (steps == (floor + 1).clamp(low, high))).all()), name
        assert quantizer.frozen
    assert clipped_weights > 0  # the grids really clip


# -- bias correction ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lower, upper", [(0.0, np.inf), (0.0, 6.0), (-1.0, 1.0), (-np.inf, 2.0), (-np.inf, np.inf)])
def test_clipped_normal_mean_against_scipy(lower: float, upper: float) -> None:
    mean = np.array([0.5, -1.0, 3.0, 7.0, -4.0])
    std = np.array([1.0, 2.0, 2.0, 0.5, 1.5])
    distribution = stats.norm(mean, std)
    inside = distribution.cdf(upper) - distribution.cdf(lower)
    truncated = stats.truncnorm((lower - mean) / std, (upper - mean) / std, loc=mean, scale=std).mean()
    expected = np.where(inside > 0, inside * np.nan_to_num(truncated), 0.0)
    if np.isfinite(lower):
        expected = expected + lower * distribution.cdf(lower)
    if np.isfinite(upper):
        expected = expected + upper * distribution.sf(upper)
    actual = clipped_normal_mean(torch.from_numpy(mean), torch.from_numpy(std), torch.tensor(lower).double(),
                                 torch.tensor(upper).double())
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-9, atol=1e-12)


def _conv_bn_relu_conv(activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), activation, nn.Conv2d(4, 3, 1))
    set_batch_norm(model[1], mean=[0.0] * 4, var=[1.0] * 4, gamma=[1.0, -0.5, 2.0, 0.1], beta=[0.5, 1.0, -1.0, 3.0])
    return model


def _quantized_by_hand(weight: torch.Tensor, encoding: Encoding) -> np.ndarray:
    scale = encoding.scale.double().numpy().reshape(-1, *[1] * (weight.dim() - 1)) if encoding.axis is not None \
        else float(encoding.scale)
    offset = encoding.offset.double().numpy().reshape(np.shape(scale)) if encoding.axis is not None \
        else float(encoding.offset)
    steps = np.clip(np.round(weight.detach().double().numpy() / scale) - offset, 0, 2**encoding.bitwidth - 1)
    return (steps + offset) * scale


@pytest.mark.parametrize("activation, lower, upper", [(nn.ReLU(), 0.0, np.inf), (nn.ReLU6(), 0.0, 6.0)],
                         ids=["relu", "relu6"])
def test_analytical_bias_correction_is_minus_quantization_error_times_expected_input(
    activation: nn.Module, lower: float, upper: float
) -> None:
    model = _conv_bn_relu_conv(activation)
    x = torch.randn(4, 3, 2, 2)
    sim = QuantSim(model, x, param_bw=3)
    sim.compute_encodings(lambda m: m(x))
    sim.set_enabled(False, kinds=("input", "output"))
    layer = sim.model.get_submodule("3")
    weight = layer.weight.detach().double().numpy().reshape(3, 4)
    bias_before = layer.bias.detach().double().numpy()
    quantized = _quantized_by_hand(layer.weight, layer.param_quantizers["weight"].encoding).reshape(3, 4)
    beta, gamma = np.float32([0.5, 1.0, -1.0, 3.0]).astype(float), np.abs(np.float32([1.0, -0.5, 2.0, 0.1]))
    normal = stats.norm(beta, gamma)
    expected_input = (lower * normal.cdf(lower) + (upper * normal.sf(upper) if np.isfinite(upper) else 0.0)
                      + stats.truncnorm((lower - beta) / gamma, (upper - beta) / gamma, loc=beta, scale=gamma).mean()
                      * (normal.cdf(upper) - normal.cdf(lower)))
    delta = -(quantized - weight) @ expected_input
    report = correct_bias(sim, data=None)
    assert "3" in report.corrected and report.skipped["0"] == "no BatchNorm statistics precede this layer"
    # roundings: the quantized weight (k * s in float32), W_q - W in float32, the float32 result
    bound = FLOAT32_EPS * ((np.abs(quantized) + np.abs(weight)) @ expected_input + np.abs(delta))
    assert_within(report.corrected["3"], delta, bound)
    assert_within(layer.bias, bias_before + delta, bound + FLOAT32_EPS * np.abs(bias_before + delta))


def test_empirical_bias_correction_is_the_mean_output_difference() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    x = torch.randn(64, 5) + 0.5
    sim = QuantSim(model, x[:2], param_bw=3)
    sim.compute_encodings(lambda m: m(x))
    sim.set_enabled(False, kinds=("input", "output"))
    sim.set_enabled(False, pattern="2", kinds=("param",))
    layer = sim.model.get_submodule("0")
    weight, bias = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    quantized = _quantized_by_hand(layer.weight, layer.param_quantizers["weight"].encoding)
    mean_input = x.double().mean(dim=0).numpy()
    delta = (weight - quantized) @ mean_input  # E[y] - E[y_q] of a linear layer
    report = correct_bias(sim, [x[:40], x[40:]], progress=False)
    assert set(report.corrected) == {"0"} and report.skipped == {"2": "weights are not quantized"}
    # the means are of float32 layer outputs: each output carries roundings of its 5-term dot product
    magnitude = (np.abs(x.double().numpy()) @ (np.abs(weight) + np.abs(quantized)).T).mean(axis=0) + np.abs(bias)
    assert_within(report.corrected["0"], delta, 8 * FLOAT32_EPS * magnitude)
    assert_within(layer.bias, bias + delta, 8 * FLOAT32_EPS * magnitude + FLOAT32_EPS * np.abs(bias))
    with pytest.raises(ValueError, match="the data yielded no batch"):
        correct_bias(sim, [], progress=False)
