"""AdaRound: the rounding stays on the floor/ceil grid, beats nearest rounding, spills, honours overrides."""

from __future__ import annotations

import sys

import pytest
import torch
from references import grid_from_encoding
from torch import nn

from edgequant import QuantSim
from edgequant.ptq.adaround import AdaRoundSettings, LayerRounding, adaround, time_estimate

ADAROUND_MODULE = sys.modules["edgequant.ptq.adaround"]  # the package re-exports the function under this name


class SmallNet(nn.Module):
    """Conv -> ReLU (a fused activation AdaRound must include) -> depthwise conv -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.relu(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


class TransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.up = nn.ConvTranspose2d(6, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1d(x))
        return self.up(y.unsqueeze(-1))


def _calibrated_sim(model: nn.Module, batches: list[torch.Tensor]) -> QuantSim:
    sim = QuantSim(model, batches[0][:2], param_bw=4, output_bw=8, config="per_channel")
    sim.calibrate(batches, progress=False)
    return sim


@pytest.fixture(scope="module")
def small_setup() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    # Smooth, channel-correlated images: with white-noise inputs nearest rounding is already optimal (the
    # layer's Hessian is diagonal), AdaRound gains come from correlated inputs as in real data.
    smooth = nn.functional.interpolate(torch.randn(128, 3, 3, 3), size=6, mode="bilinear")
    images = smooth + 0.5 * smooth.mean(1, keepdim=True) + 0.05 * torch.randn(128, 3, 6, 6)
    return SmallNet().eval(), list(images.split(32))


def _assert_on_floor_or_ceil(sim: QuantSim, name: str, float_weight: torch.Tensor) -> None:
    """Exact check: every rounded weight is s * clamp(floor(w/s)) or s * clamp(ceil(w/s)), on the grid."""
    quantizer = sim.model.get_submodule(name).param_quantizers["weight"]
    rounded = sim.model.get_submodule(name).weight.detach()
    scale, low, high = grid_from_encoding(quantizer.encoding, float_weight)
    down = torch.clamp(torch.floor(float_weight / scale), low, high) * scale
    up = torch.clamp(torch.ceil(float_weight / scale), low, high) * scale
    assert bool(((rounded == down) | (rounded == up)).all()), name
    steps = torch.round(rounded / scale)
    assert torch.equal(steps * scale, rounded) and bool(((steps >= low) & (steps <= high)).all()), name
    assert quantizer.frozen


def test_adaround_rounds_to_floor_or_ceil_and_beats_nearest(small_setup) -> None:
    model, batches = small_setup
    sim = _calibrated_sim(model, batches)
    result = adaround(sim, batches, num_iterations=200, learning_rate=2e-2, progress=False)
    assert [layer.name for layer in result.layers] == ["conv", "dw", "fc"]
    for name in ("conv", "dw", "fc"):
        _assert_on_floor_or_ceil(sim, name, model.get_submodule(name).weight.detach())
    for layer in result.layers:
        assert layer.adaround_mse < layer.nearest_mse, layer
        assert 0.0 < layer.flipped_fraction < 0.5

    # Independent check on the first layer: reconstruction of ReLU(conv(x_q)) against the FP32 output.
    quantizer = sim.model.conv.param_quantizers["weight"]
    x = torch.cat(batches)
    x_q = sim.model.model_input_quantizers["0"](x)
    scale, low, high = grid_from_encoding(quantizer.encoding, model.conv.weight)
    nearest = torch.clamp(torch.round(model.conv.weight.detach() / scale), low, high) * scale
    target = torch.relu(model.conv(x)).detach()

    def error(weight: torch.Tensor) -> float:
        out = torch.relu(nn.functional.conv2d(x_q, weight, model.conv.bias.detach(), padding=1))
        return float((out - target).square().sum(1).mean())

    assert error(sim.model.conv.weight.detach()) < 0.95 * error(nearest)
    assert result.layers[0].adaround_mse == pytest.approx(error(sim.model.conv.weight.detach()), rel=1e-4)


def test_spill_to_disk_gives_the_same_rounding(small_setup) -> None:
    model, batches = small_setup
    in_memory, spilled = _calibrated_sim(model, batches), _calibrated_sim(model, batches)
    kwargs = {"num_iterations": 10, "progress": False, "seed": 3}
    memory_result = adaround(in_memory, batches, memory_budget_mb=64, **kwargs)
    spill_result = adaround(spilled, batches, memory_budget_mb=0, **kwargs)
    assert memory_result.bytes_spilled == 0
    assert spill_result.bytes_spilled > 0
    for name in ("conv", "dw", "fc"):
        assert torch.equal(in_memory.model.get_submodule(name).weight, spilled.model.get_submodule(name).weight)


def test_per_layer_iterations_are_honoured(small_setup) -> None:
    model, batches = small_setup
    sim = _calibrated_sim(model, batches)
    result = adaround(sim, batches, num_iterations=20, per_layer_iterations={"dw": 0, "fc": 7}, progress=False)
    assert {layer.name: layer.iterations for layer in result.layers} == {"conv": 20, "fc": 7}
    assert torch.equal(sim.model.dw.weight, model.dw.weight)  # skipped: float weight, encoding not frozen
    assert not sim.model.dw.param_quantizers["weight"].frozen
    with pytest.raises(ValueError, match="not a layer AdaRound rounds"):
        adaround(_calibrated_sim(model, batches), batches, per_layer_iterations={"nope": 3}, progress=False)


def test_conv1d_and_conv_transpose_with_one_pass_inputs() -> None:
    torch.manual_seed(1)
    model = TransposeNet().eval()
    batches = [torch.randn(16, 4, 10) for _ in range(2)]
    sim = _calibrated_sim(model, batches)
    result = adaround(sim, batches, num_iterations=50, refresh_inputs=False, progress=False)
    assert [layer.name for layer in result.layers] == ["conv1d", "up"]
    assert sim.model.up.param_quantizers["weight"].axis == 1  # transposed conv: output channels on axis 1
    for name in ("conv1d", "up"):
        _assert_on_floor_or_ceil(sim, name, model.get_submodule(name).weight.detach())


def test_a_settings_object_with_keyword_overrides_rounds_as_the_keywords_alone(small_setup) -> None:
    model, batches = small_setup
    settings = AdaRoundSettings(num_iterations=10, seed=3, progress=False)
    by_settings, by_keywords = _calibrated_sim(model, batches), _calibrated_sim(model, batches)
    result = adaround(by_settings, batches, settings, learning_rate=2e-2)
    adaround(by_keywords, batches, num_iterations=10, seed=3, learning_rate=2e-2, progress=False)
    assert [layer.iterations for layer in result.layers] == [10, 10, 10]
    assert settings.learning_rate == 1e-3  # the override made a copy; the settings are frozen
    for name in ("conv", "dw", "fc"):
        assert torch.equal(by_settings.model.get_submodule(name).weight, by_keywords.model.get_submodule(name).weight)
    with pytest.raises(TypeError, match="unexpected keyword argument 'iterations'"):
        adaround(by_settings, batches, settings, iterations=5)


@pytest.mark.parametrize(("keywords", "message"), [
    ({"num_iterations": -1}, "num_iterations must be >= 0"),
    ({"warm_start": 1.0}, r"warm_start is the unregularised fraction of iterations, in \[0, 1\)"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"beta_range": (20.0, 0.0)}, r"beta_range must be \(start, end\) with positive values"),
    ({"per_layer_iterations": {"fc": -2}}, r"per_layer_iterations\['fc'\] must be >= 0, got -2"),
])
def test_settings_are_checked_when_made(keywords: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaRoundSettings(**keywords)


class _TickingClock:
    """Stands in for the `time` module: each reading is one second after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_the_time_estimate_after_the_first_layer_projects_the_whole_run(small_setup, monkeypatch, capsys) -> None:
    model, batches = small_setup
    sim = _calibrated_sim(model, batches)
    monkeypatch.setattr(ADAROUND_MODULE, "time", _TickingClock())
    result = adaround(sim, batches, num_iterations=10, per_layer_iterations={"fc": 30}, progress=True)
    # each clocked step takes 1 s: the pass over the data 1 s, then per layer 1 s of inputs and 1 s of rounding,
    # so the first layer ends at 3 s; the others cost 0.1 s per iteration (4 s) and refreshing the inputs of the
    # 2nd and 3rd of 3 layers 1/3 and 2/3 of a pass (1 s): 8 s
    assert [r.name for r in result.layers] == ["conv", "dw", "fc"]
    assert ("adaround: first layer (conv, 10 iterations) done after 3.0 s; all 3 layers (50 iterations) will take "
            "about 8.0 s") in capsys.readouterr().out.splitlines()
    sim = _calibrated_sim(model, batches)
    adaround(sim, batches, num_iterations=10, progress=False)
    assert "adaround" not in capsys.readouterr().out


@pytest.mark.parametrize(("seconds", "shown"), [(3.04, "3.0 s"), (95, "95 s"), (1500, "25 min"), (36000, "10.0 h")])
def test_the_estimate_picks_a_readable_unit(seconds: float, shown: str) -> None:
    first = LayerRounding("conv", 100, 0.0, 0.0, 0.0, seconds)
    assert time_estimate(first, seconds, 0.0, [100]).endswith(f"about {shown}")
