"""PTQ details found by mutation testing (benchmarks/mutation.py): AdaRound's schedule and loss by hand,
BN folding edge cases, fold-to-scale checks, equalization reports, activation ranges and dead channels,
absorption through Hardtanh and functional ReLUs, bias correction options and reasons."""

from __future__ import annotations

import copy
import json
import math
from importlib import resources

import pytest
import torch
from references import FLOAT32_EPS, assert_within, bn_factor_and_shift, set_batch_norm
from torch import nn

from edgequant import QuantSim
from edgequant.ptq import correct_bias, equalize, fold_batch_norms, fold_batch_norms_to_scale
from edgequant.ptq.adaround import _beta, _reconstruction_loss, adaround, rectified_sigmoid
from edgequant.ptq.cross_layer_equalization import (
    EqualizationReport,
    _activation_ranges,
    _ChannelRanges,
    _replace_clamps,
)
from edgequant.ptq.graph_patterns import find_equalization_candidates
from edgequant.quantization import Encoding, PerChannel
from edgequant.sim.graph import build_graph


# -- AdaRound -------------------------------------------------------------------------------------------------
def test_rectified_sigmoid_reaches_exactly_0_and_1() -> None:
    h = rectified_sigmoid(torch.tensor([-100.0, 0.0, 100.0, math.log(1 / 11)]))
    assert h.tolist() == [0.0, pytest.approx(0.5), 1.0, pytest.approx(0.0, abs=1e-7)]


def test_beta_anneals_by_cosine_after_the_warm_start() -> None:
    # 100 iterations, 20 % warm start: beta is 20 at iteration 20, 11 half-way (60), 2 at the end
    assert _beta(20, 100, 0.2, (20.0, 2.0)) == pytest.approx(20.0)
    assert _beta(60, 100, 0.2, (20.0, 2.0)) == pytest.approx(11.0)
    assert _beta(100, 100, 0.2, (20.0, 2.0)) == pytest.approx(2.0)
    assert _beta(40, 100, 0.2, (20.0, 2.0)) == pytest.approx(2 + 9 * (1 + math.cos(math.pi / 4)))
    assert _beta(0, 0, 0.0, (8.0, 4.0)) == pytest.approx(8.0)  # no division by zero without iterations


def test_reconstruction_loss_sums_over_output_channels() -> None:
    out, target = torch.arange(24.0).view(2, 3, 4), torch.zeros(2, 3, 4)
    squares = out.square()
    conv1d = _reconstruction_loss(out, target, nn.Conv1d(1, 3, 1))  # channels on dim 1: sum over 3
    assert conv1d.item() == pytest.approx(float(squares.sum(dim=1).mean()))
    linear = _reconstruction_loss(out, target, nn.Linear(2, 4))  # tokens x features: channels last
    assert linear.item() == pytest.approx(float(squares.sum(dim=-1).mean()))
    flat = _reconstruction_loss(out[0], target[0], nn.Conv2d(1, 4, 1))  # 2-D output: channels last
    assert flat.item() == pytest.approx(float(squares[0].sum(dim=-1).mean()))


def test_progress_false_prints_nothing(capsys: pytest.CaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(8, 3)
    sim = QuantSim(model, x[:1], param_bw=4)
    sim.compute_encodings(lambda m: m(x))
    adaround(sim, [x], num_iterations=3, progress=False)
    correct_bias(sim, [x], progress=False)
    assert capsys.readouterr().err == ""


# -- BN folding ---------------------------------------------------------------------------------------------
def test_fold_batch_norm_without_affine_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        model[1].running_var.copy_(torch.tensor([4.0, 0.25, 1e-7, 1.0]))
    weight, bias = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    var, mean = model[1].running_var.double().numpy(), model[1].running_mean.double().numpy()
    factor = 1 / (var + model[1].eps) ** 0.5
    fold_batch_norms(model, torch.randn(2, 3))
    assert_within(model[0].weight, weight * factor[:, None], FLOAT32_EPS * abs(weight * factor[:, None]))
    assert_within(model[0].bias, (bias - mean) * factor, FLOAT32_EPS * (abs(bias * factor) + abs(mean * factor)))


def test_fold_into_a_following_grouped_conv() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, groups=2)).eval()
    set_batch_norm(model[0], mean=[0.1, 0.2, 0.3, 0.4], var=[1.0, 2.0, 0.5, 0.1], gamma=[1.0, -2.0, 0.5, 3.0],
                   beta=[0.5, 0.0, -0.5, 1.0])
    x = torch.randn(3, 4, 2, 2)
    with torch.no_grad():
        reference = model(x)
    _, shift = bn_factor_and_shift(model[0])
    weight, bias = model[1].weight.detach().double().numpy().reshape(2, 2), model[1].bias.detach().double().numpy()
    fold_batch_norms(model, x)
    expected_bias = bias + (weight * shift.reshape(2, 2)).sum(axis=1)  # group g sees input channels 2g, 2g + 1
    assert_within(model[1].bias, expected_bias, FLOAT32_EPS * (abs(bias) + (abs(weight) * abs(shift.reshape(2, 2)))
                                                                 .sum(axis=1)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=64 * FLOAT32_EPS * float(reference.abs().max()))


def _bn_sim(layer: nn.Module, channels: int, config: str = "per_channel") -> tuple[QuantSim, torch.Tensor]:
    torch.manual_seed(8)
    model = nn.Sequential(layer, nn.BatchNorm2d(channels)).eval()
    set_batch_norm(model[1], mean=[0.1] * channels, var=[1.0] * channels, gamma=[-1.0] + [2.0] * (channels - 1),
                   beta=[0.0] * channels)
    x = torch.randn(2, 3, 4, 4)
    sim = QuantSim(model, x, config=config)
    sim.compute_encodings(lambda m: m(x))
    return sim, x


def test_fold_to_scale_rejects_frozen_encodings_it_cannot_scale() -> None:
    message = (r"^cannot fold 1 into the frozen weight encoding of 0: it must be per-channel \(axis of the output "
               r"channels\) and signed symmetric \(no unsigned channel, whose grid cannot hold negated weights\); "
               r"unfreeze it or use the per_channel config$")
    per_tensor, _ = _bn_sim(nn.Conv2d(3, 4, 1), 4, config="default")
    per_tensor.freeze_encodings()
    with pytest.raises(ValueError, match=message):
        fold_batch_norms_to_scale(per_tensor)
    asymmetric, _ = _bn_sim(nn.Conv2d(3, 4, 1), 4)
    quantizer = asymmetric.quantizers()["0.param_quantizers.weight"]
    asymmetric.set_encoding("0.param_quantizers.weight", Encoding(quantizer.encoding.scale, torch.full((4,), -100.0),
                                                                  8, False, granularity=PerChannel(0)))
    with pytest.raises(ValueError, match=message):
        fold_batch_norms_to_scale(asymmetric)
    unsigned, _ = _bn_sim(nn.Conv2d(3, 4, 1), 4)  # channel 0 on the unsigned grid (gamma -1 would negate it)
    quantizer = unsigned.quantizers()["0.param_quantizers.weight"]
    unsigned.set_encoding("0.param_quantizers.weight", Encoding(quantizer.encoding.scale,
                                                                torch.tensor([0.0, -128.0, -128.0, -128.0]), 8, True,
                                                                granularity=PerChannel(0)))
    with pytest.raises(ValueError, match=message):
        fold_batch_norms_to_scale(unsigned)
    unfrozen, x = _bn_sim(nn.Conv2d(3, 4, 1), 4, config="default")  # recomputed, so any encoding is fine
    assert fold_batch_norms_to_scale(unfrozen) == [("0", "1")]
    assert unfrozen.model.get_submodule("0").output_quantizers["0"].name == "0.output_quantizers.0"


def test_fold_to_scale_into_a_transposed_conv_uses_axis_1() -> None:
    sim, x = _bn_sim(nn.ConvTranspose2d(3, 4, 1), 4)
    sim.freeze_encodings()
    conv = sim.model.get_submodule("0")
    before = conv.param_quantizers["weight"](conv.weight).detach().clone()
    factor, _ = bn_factor_and_shift(sim.model.get_submodule("1"))
    assert fold_batch_norms_to_scale(sim) == [("0", "1")]
    after = conv.param_quantizers["weight"](conv.weight).detach()
    positive = torch.from_numpy(factor > 0)
    expected = before * torch.from_numpy(factor).float().view(1, -1, 1, 1)
    torch.testing.assert_close(after[:, positive], expected[:, positive], rtol=2 * FLOAT32_EPS, atol=0)


def test_fold_to_scale_leaves_a_bn_before_its_layer() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    sim = QuantSim(model, x)
    sim.compute_encodings(lambda m: m(x))
    assert fold_batch_norms_to_scale(sim) == []
    assert isinstance(sim.model.get_submodule("0").module if hasattr(sim.model.get_submodule("0"), "module")
                      else sim.model.get_submodule("0"), nn.BatchNorm2d)


# -- equalization ---------------------------------------------------------------------------------------------
def test_channel_ranges_activation_aware_formula_by_hand() -> None:
    layer = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, -1.0], [0.5, -2.0], [1.0, 0.0]]))  # output ranges 4, 2, 1
    ranges = _ChannelRanges(layer, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    ranges.divide_outputs(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    # weights / div = [4, 2, 0.5] -> normalised [1, 0.5, 0.125]; activations / div = [2, 2, 1] -> [1, 1, 0.5]
    # larger of the two, in weight units (times 4): [4, 4, 2]
    assert ranges.output_ranges().tolist() == [4.0, 4.0, 2.0]
    assert ranges.input_ranges().tolist() == [4.0, 2.0]


def _pair(model: nn.Module, x: torch.Tensor):
    graph = build_graph(model, x)
    (pair, *_) = [c for c in find_equalization_candidates(graph) if c.blocker is None]
    return graph, pair


def test_activation_ranges_through_relu_and_clamp_by_hand() -> None:
    mean = torch.tensor([1.0, -1.0, 0.1, 5.0], dtype=torch.float64)
    std = torch.tensor([0.5, 0.2, 0.01, 1.0], dtype=torch.float64)
    relu = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 2, 2)
    _, pair = _pair(relu, x)
    # [mean - 3 std, mean + 3 std] clipped to [0, inf), largest magnitude: 2.5, 0 (-> 1e-12), 0.13, 8
    ranges = _activation_ranges(relu, pair, {"0": (mean, std)})
    assert ranges.tolist() == pytest.approx([2.5, 1e-12, 0.13, 8.0], abs=1e-15)
    clamp = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardtanh(-2.0, 6.0), nn.Conv2d(4, 2, 1))
    graph, pair = _pair(clamp, x)
    _replace_clamps(clamp, graph, pair, EqualizationReport())
    # clipped to [-2, 6]: [-0.5, 2.5] -> 2.5; [-1.6, -0.4] -> 1.6; [0.07, 0.13] -> 0.13; [2, 8] -> 6
    ranges = _activation_ranges(clamp, pair, {"0": (mean, std)})
    assert ranges.tolist() == pytest.approx([2.5, 1.6, 0.13, 6.0], abs=1e-15)
    assert _activation_ranges(clamp, pair, {}) is None


def _bn_relu_pair(activation: nn.Module, second: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), activation, second or nn.Conv2d(4, 2, 1)).eval()
    set_batch_norm(model[1], mean=[0.0] * 4, var=[1.0] * 4, gamma=[0.1, 0.2, 0.3, 0.4], beta=[1.5, 2.0, -1.0, 3.0])
    return model


def test_equalize_report_fields_and_scaled_statistics() -> None:
    model = _bn_relu_pair(nn.ReLU())
    x = torch.randn(2, 3, 4, 4)
    folded = copy.deepcopy(model)
    fold_batch_norms(folded, x)
    report = equalize(model, x, absorb_high_bias=False)
    (pair,) = report.pairs
    assert (pair.first, pair.second, pair.activation, pair.equalized, pair.reason, pair.absorbed_bias) == (
        "0", "3", pair.activation, True, "", 0.0)
    assert isinstance(pair.activation, str) and pair.activation
    # the layer's output statistics follow its channels' scaling: both divided by s = folded / equalized ranges
    scale = (folded[0].weight.abs().amax(dim=(1, 2, 3)) / model[0].weight.abs().amax(dim=(1, 2, 3))).double()
    mean, std = report.layer_output_stats["0"]
    torch.testing.assert_close(mean.double(), torch.tensor([1.5, 2.0, -1.0, 3.0], dtype=torch.float64) / scale,
                               rtol=4 * FLOAT32_EPS, atol=0)
    torch.testing.assert_close(std.double(), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) / scale,
                               rtol=4 * FLOAT32_EPS, atol=0)
    assert "equalized  0 -> 3 (via" in report.summary() and "folded 1 BatchNorms" in report.summary()


def test_max_iterations_is_a_hard_limit() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    report = equalize(model, torch.randn(1, 3, 2, 2), max_iterations=1)
    assert report.iterations == 1 and len(report.equalized) == 2


def test_dead_channels_are_left_alone() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight[1] = 0.0  # output channel 1 of layer 1 is dead
        model[2].weight[:, 2] = 0.0  # input channel 2 of layer 2 is unused
    before = copy.deepcopy(model)
    x = torch.randn(2, 3, 3, 3)
    equalize(model, x)
    assert torch.isfinite(model[0].weight).all() and torch.isfinite(model[2].weight).all()
    for channel in (1, 2):  # scale 1: both sides untouched
        assert torch.equal(model[0].weight[channel], before[0].weight[channel])
        assert torch.equal(model[2].weight[:, channel], before[2].weight[:, channel])


def test_hardtanh_with_a_negative_lower_bound_is_equalized_and_absorbed_exactly() -> None:
    model = _bn_relu_pair(nn.Hardtanh(-1.0, 2.5))
    x = torch.randn(4, 3, 3, 3) * 3
    with torch.no_grad():
        reference = model(x)
    report = equalize(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=64 * FLOAT32_EPS * float(reference.abs().max()))
    # amount = min(max(0, mean - 3 std - lower), upper - lower), in the scaled units of each channel
    clamp = model[2]
    lower_before = torch.full((4,), -1.0)  # scaled by 1/s with the channels
    assert report.pairs[0].absorbed_bias > 0
    assert (clamp.upper - clamp.lower > 0).all() and not torch.equal(clamp.lower, lower_before)
    (pair,) = report.pairs
    assert report.replaced_activations == {
        "2": "Hardtanh(-1, 2.5) -> ChannelClamp (per-channel bounds scaled with the channels: exact)"}
    assert report.summary() == "\n".join([
        f"folded 1 BatchNorms; equalized 1 of 1 layer pairs in {report.iterations} iterations",
        "  replaced 2: Hardtanh(-1, 2.5) -> ChannelClamp (per-channel bounds scaled with the channels: exact)",
        f"  equalized  0 -> 3 (via {pair.activation}, absorbed mean bias {pair.absorbed_bias:.3g})",
    ])
    skipped = equalize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1)), x)
    assert skipped.summary() == "\n".join([
        f"folded 0 BatchNorms; equalized 0 of 1 layer pairs in {skipped.iterations} iterations",
        f"  skipped    0 -> 2: {skipped.pairs[0].reason}",
    ]) and skipped.pairs[0].reason


def test_absorption_skips_padded_second_layers_and_prelu() -> None:
    padded = _bn_relu_pair(nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    report = equalize(padded, torch.randn(1, 3, 4, 4))
    assert report.pairs[0].equalized and report.pairs[0].absorbed_bias == 0.0
    prelu = _bn_relu_pair(nn.PReLU(4))
    report = equalize(prelu, torch.randn(1, 3, 4, 4))
    assert report.pairs[0].equalized and report.pairs[0].absorbed_bias == 0.0


class _FunctionalRelus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(x)))
        return self.c(nn.functional.relu(self.bn_b(self.b(x)), inplace=True))


def test_absorption_through_functional_relus_and_after_a_skipped_pair() -> None:
    model = _FunctionalRelus().eval()
    for bn in (model.bn_a, model.bn_b):
        set_batch_norm(bn, mean=[0.0] * 4, var=[1.0] * 4, gamma=[0.1] * 4, beta=[1.0, 2.0, 3.0, 4.0])
    report = equalize(model, torch.randn(1, 3, 2, 2))
    assert [(p.first, p.second) for p in report.equalized] == [("a", "b"), ("b", "c")]
    assert all(p.absorbed_bias > 0 for p in report.pairs)
    no_bn_first = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.Conv2d(4, 2, 1, groups=2)).eval()
    set_batch_norm(no_bn_first[3], mean=[0.0] * 4, var=[1.0] * 4, gamma=[0.1] * 4, beta=[1.0, 2.0, 3.0, 4.0])
    x = torch.randn(1, 3, 2, 2)
    report = equalize(no_bn_first, x)
    absorbed = {(p.first, p.second): p.absorbed_bias for p in report.pairs}
    assert absorbed[("0", "2")] == 0.0 and absorbed[("2", "5")] > 0  # no statistics for the first pair only


# -- bias correction ------------------------------------------------------------------------------------------
def _linear_sim(bias_quantized: bool = False) -> tuple[QuantSim, torch.Tensor]:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(64, 5) + 0.5
    config = json.loads(resources.files("edgequant").joinpath("configs/default.json").read_text())
    if bias_quantized:
        config["params"]["bias"]["is_quantized"] = "True"
    sim = QuantSim(model, x[:2], param_bw=3, config=config)
    sim.compute_encodings(lambda m: m(x))
    sim.set_enabled(False, kinds=("input", "output"))
    return sim, x


def test_empirical_correction_options() -> None:
    sim, x = _linear_sim()
    only = correct_bias(sim, [x[:40], x[40:]], layers=["2"], progress=False)
    assert set(only.corrected) == {"2"}
    first_batch, _ = _linear_sim()
    one = correct_bias(first_batch, [x[:40], x[40:]], num_batches=1, progress=False)
    reference, _ = _linear_sim()
    expected = correct_bias(reference, [x[:40]], progress=False)
    torch.testing.assert_close(one.corrected["0"], expected.corrected["0"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^correct_bias \(or pass data=None\): the data yielded no batch; pass at "
                       r"least one batch$"):
        correct_bias(reference, [], progress=False)


def test_bias_quantizer_follows_the_corrected_bias() -> None:
    sim, x = _linear_sim(bias_quantized=True)
    layer = sim.model.get_submodule("0")
    quantizer = layer.param_quantizers["bias"]
    frozen_layer = sim.model.get_submodule("2")
    frozen_layer.param_quantizers["bias"].frozen = True
    frozen_before = frozen_layer.param_quantizers["bias"].encoding
    report = correct_bias(sim, [x], progress=False)
    assert {"0", "2"} <= set(report.corrected)
    expected = Encoding.from_range(layer.bias.min(), layer.bias.max(), quantizer.bitwidth, quantizer.symmetric,
                                   quantizer.axis)
    assert quantizer.encoding.equals(expected)
    assert frozen_layer.param_quantizers["bias"].encoding.equals(frozen_before)


def test_analytical_reasons_and_bn_without_affine() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    x = torch.randn(2, 3, 4, 4)
    shared = QuantSim(Shared(), x)
    shared.compute_encodings(lambda m: m(x))
    assert correct_bias(shared).skipped == {"conv": "called 2 times (shared weights)"}
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False),
                          nn.MaxPool2d(2), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, affine=False), nn.ReLU(),
                          nn.Conv2d(2, 2, 1, groups=2)).eval()
    sim = QuantSim(model, x, param_bw=3)
    sim.compute_encodings(lambda m: m(x))
    report = correct_bias(sim)
    assert report.skipped == {"0": "no BatchNorm statistics precede this layer",
                              "2": "0 (QuantizedConv2d) between the statistics and the layer",
                              "5": "4 (QuantizedMaxPool2d) between the statistics and the layer"}
    # after a BN without affine parameters the input is N(0, 1) through the ReLU: E = 1 / sqrt(2 pi)
    layer = sim.model.get_submodule("8")
    weight = layer.weight.detach().double().view(2)
    quantized = layer.param_quantizers["weight"](layer.weight).detach().double().view(2)
    expected = -(quantized - weight) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(report.corrected["8"].double(), expected, rtol=4 * FLOAT32_EPS, atol=1e-12)
