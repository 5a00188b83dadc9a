"""Bias correction removes the quantization-induced mean shift; BN re-estimation tracks quantized stats."""

from __future__ import annotations

import torch
from torch import nn

from edgequant import QuantSim
from edgequant.ptq import correct_bias, equalize, fold_batch_norms_to_scale, reestimate_bn
from edgequant.ptq.bias_correction import clipped_normal_mean


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1),
    )
    with torch.no_grad():
        model[1].bias.copy_(torch.linspace(-0.5, 1.5, 16))
        model.train()
        for _ in range(10):  # BN running statistics of the data the tests use
            model(torch.randn(32, 3, 6, 6))
    return model.eval()


def _channel_means(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.setdefault("y", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["y"].mean(dim=(0, 2, 3))


def _low_bit_sim(model: nn.Module, x: torch.Tensor, weights_only: bool = True) -> QuantSim:
    sim = QuantSim(model, x[:1], param_bw=3)
    sim.compute_encodings(lambda m: m(x))
    if weights_only:
        sim.set_enabled(False, kinds=("input", "output"))
    return sim


def _shift(sim: QuantSim, float_model: nn.Module, name: str, x: torch.Tensor) -> float:
    return float((_channel_means(sim.model, name, x) - _channel_means(float_model, name, x)).abs().mean())


def test_clipped_normal_mean_matches_sampling() -> None:
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    samples = mean + std * torch.randn(400_000, 3, generator=generator, dtype=torch.float64)
    for lower, upper in ((0.0, float("inf")), (0.0, 6.0), (-1.0, 1.0)):
        expected = samples.clamp(lower, upper).mean(0)
        actual = clipped_normal_mean(mean, std, torch.tensor(lower).double(), torch.tensor(upper).double())
        torch.testing.assert_close(actual, expected, atol=0.01, rtol=0)


def test_empirical_bias_correction_reduces_mean_output_shift() -> None:
    model = _model()
    x = torch.randn(64, 3, 6, 6)
    sim = _low_bit_sim(model, x, weights_only=False)
    before = {name: _shift(sim, model, name, x) for name in ("3", "6")}
    report = correct_bias(sim, [x[:32], x[32:]], progress=False)
    assert set(report.corrected) == {"0", "3", "6"}
    assert sim.model.get_submodule("3").bias is not None  # a layer without bias got one
    for name, shift in before.items():
        assert _shift(sim, model, name, x) < 0.3 * shift


def test_analytical_bias_correction_uses_bn_statistics() -> None:
    model = _model()
    x = torch.randn(256, 3, 6, 6)
    sim = _low_bit_sim(model, x)
    sim.set_enabled(False, pattern="0", kinds=("param",))  # isolate layer 3's own quantization error
    before = _shift(sim, model, "3", x)
    report = correct_bias(sim, data=None)
    assert "3" in report.corrected and "0" in report.skipped  # layer 0 reads the raw input: no statistics
    assert _shift(sim, model, "3", x) < 0.5 * before


def test_analytical_bias_correction_after_equalize_uses_folded_statistics() -> None:
    model = _model()
    x = torch.randn(256, 3, 6, 6)
    report = equalize(model, x[:1], absorb_high_bias=False)
    sim = _low_bit_sim(model, x)
    sim.set_enabled(False, pattern="0", kinds=("param",))
    before = _shift(sim, model, "6", x)
    result = correct_bias(sim, layer_output_stats=report.layer_output_stats)
    assert {"3", "6"} <= set(result.corrected)
    assert _shift(sim, model, "6", x) < before


def test_bn_reestimation_moves_statistics_to_quantized_activations() -> None:
    model = _model()
    x = torch.randn(64, 3, 6, 6)
    sim = QuantSim(model, x[:1], param_bw=3, output_bw=4)
    sim.compute_encodings(lambda m: m(x))
    bn = sim.model.get_submodule("4")
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    seen = {}
    handle = bn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        sim.model(x)
    handle.remove()
    target_mean, target_var = seen["x"].mean(dim=(0, 2, 3)), seen["x"].var(dim=(0, 2, 3))
    result = reestimate_bn(sim, [x[:32], x[32:]], fold_to_scale=False, progress=False)
    assert "4" in result.reestimated and result.folded == []
    assert bn.momentum == 0.1 and not bn.training
    assert (bn.running_mean - target_mean).abs().mean() < 0.5 * (old_mean - target_mean).abs().mean()
    assert (bn.running_var - target_var).abs().mean() < 0.5 * (old_var - target_var).abs().mean()


def test_bn_reestimation_then_fold_to_scale_keeps_the_sim_output() -> None:
    model = _model()
    x = torch.randn(32, 3, 6, 6)
    sim = QuantSim(model, x[:1], config="per_channel")
    sim.compute_encodings(lambda m: m(x))
    result = reestimate_bn(sim, [x], fold_to_scale=False, progress=False)
    sim.set_enabled(False, kinds=("input", "output"))
    with torch.no_grad():
        weights_only_reference = sim.model(x)
    folded = fold_batch_norms_to_scale(sim)
    assert len(folded) == 2 and len(result.reestimated) == 2
    with torch.no_grad():
        folded_output = sim.model(x)
    # Folding into the scales keeps every quantized weight (times f), so the outputs differ only by float32
    # rounding: per layer the folded weight, its scale and the quantize-dequantize, each within eps of the
    # values it produces (measured: 1.7 eps of the largest output); one weight flipped to another grid
    # step would cost a weight LSB times the input (~1e-3 here), far above this bound.
    bound = 16 * torch.finfo(torch.float32).eps * float(weights_only_reference.abs().max())
    torch.testing.assert_close(folded_output, weights_only_reference, rtol=0, atol=bound)
