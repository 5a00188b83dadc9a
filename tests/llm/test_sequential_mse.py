"""Sequential MSE: each scale gets the candidate range of least output error (checked by brute force on the layer's
own forward), LPBQ stays on its grid, the model gets closer to float than with min-max, later layers see the
quantized earlier ones, and the chosen encodings survive calibration."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from tiny_llm import sharing_check_sim
from torch import nn

from edgequant import QuantSim
from edgequant.llm.sequential_mse import SequentialMseSettings, sequential_mse
from edgequant.quantization import Encoding, Lpbq, PerBlock, PerChannel, PerTensor, quantize_dequantize

QUIET = SequentialMseSettings(progress=False)


def _sim(model: nn.Module, data: list[torch.Tensor], granularity: object, param_bw: int = 4,
         symmetric: bool = True, calibrate: bool = False, inputs_quantized: bool = False) -> QuantSim:
    config = json.loads(resources.files("edgequant").joinpath("configs/default.json").read_text())
    config["defaults"]["params"]["is_symmetric"] = str(symmetric)
    if inputs_quantized:
        config["defaults"]["ops"]["is_input_quantized"] = "True"
    sim = QuantSim(model.eval(), data[0][:2], param_bw=param_bw, config=config)
    sim.set_granularity("*", granularity)
    if calibrate:
        sim.calibrate(data, progress=False)
    return sim


def _candidate(weight: torch.Tensor, fraction: float, granularity: PerChannel | PerBlock, quantizer: object
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented candidate: the min-max range of each scale times ``fraction``; (quantized weight, scale)."""
    rows = granularity.rows(weight)
    shape = granularity.scale_shape(weight.shape)
    low, high = rows.amin(1).reshape(shape), rows.amax(1).reshape(shape)
    encoding = Encoding.from_range(low * fraction, high * fraction, quantizer.bitwidth, quantizer.symmetric,
                                   granularity)
    scale, offset = encoding.broadcast_to(weight.shape)
    return quantize_dequantize(weight, scale, offset, encoding.bitwidth), encoding.scale


def _installed(layer: nn.Module) -> torch.Tensor:
    encoding = layer.param_quantizers["weight"].encoding
    scale, offset = encoding.broadcast_to(layer.weight.shape)
    return quantize_dequantize(layer.weight.detach(), scale, offset, encoding.bitwidth)


def _channel_errors(forward: object, x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Squared output error per output channel, summed over samples and positions, in float64."""
    error = forward(x.double(), weight.double()) - forward(x.double(), quantized.double())
    return error.square().transpose(0, 1).reshape(error.shape[1], -1).sum(1)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 3), lambda x, w: F.linear(x, w), (64, 6)),
    "grouped conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                     lambda x, w: F.conv2d(x, w, stride=2, padding=1, groups=2), (8, 4, 7, 7)),
    "same reflect conv": (lambda: nn.Conv2d(3, 4, (3, 4), padding="same", padding_mode="reflect"),
                          lambda x, w: F.conv2d(F.pad(x, (1, 2, 1, 1), mode="reflect"), w), (8, 3, 6, 6)),
}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_each_channel_gets_the_candidate_of_least_output_error(kind: str, symmetric: bool) -> None:
    make, forward, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    data = [torch.randn(shape) * torch.linspace(0.2, 2.0, shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))]
    sim = _sim(model, data, PerChannel(), symmetric=symmetric)
    report = sequential_mse(sim, data, QUIET)
    layer = sim.model.get_submodule("0")
    weight, x = layer.weight.detach(), data[0]
    granularity = layer.param_quantizers["weight"].granularity
    candidates = [_candidate(weight, i / 20, granularity, layer.param_quantizers["weight"]) for i in range(1, 21)]
    errors = torch.stack([_channel_errors(forward, x, weight, quantized) for quantized, _ in candidates])
    best = errors.argmin(0)
    chosen = layer.param_quantizers["weight"].encoding.scale
    expected = torch.stack([candidates[int(i)][1][c] for c, i in enumerate(best)])
    torch.testing.assert_close(chosen, expected, rtol=1e-6, atol=0)
    chosen_errors = _channel_errors(forward, x, weight, _installed(layer))
    torch.testing.assert_close(chosen_errors, errors.min(0).values, rtol=1e-9, atol=1e-12)
    assert (best < 19).any(), "min-max was best everywhere: the check cannot tell a search from none"
    assert report.layers[0].chosen_mse <= report.layers[0].minmax_mse
    assert sum(report.layers[0].candidate_counts) == weight.shape[0]


def test_a_per_tensor_weight_gets_the_candidate_of_least_total_output_error() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 3))
    data = [torch.randn(64, 6) * torch.linspace(0.2, 2.0, 6)]
    sim = _sim(model, data, PerTensor())
    sequential_mse(sim, data, QUIET)
    quantizer = sim.model.get_submodule("0").param_quantizers["weight"]
    weight = model[0].weight.detach()
    candidates = [_candidate(weight, i / 20, PerTensor(), quantizer) for i in range(1, 21)]
    errors = [_channel_errors(F.linear, data[0], weight, quantized).sum() for quantized, _ in candidates]
    best = int(torch.stack(errors).argmin())
    assert best < 19
    torch.testing.assert_close(quantizer.encoding.scale, candidates[best][1], rtol=1e-6, atol=0)


BLOCK_LAYERS = {  # layer, and its output from input channel block b of size 2 (of each group)
    "linear": (lambda: nn.Linear(8, 3), (64, 8),
               lambda x, w, b: F.linear(x[:, 2 * b:2 * b + 2], w[:, 2 * b:2 * b + 2])),
    "grouped conv": (lambda: nn.Conv2d(8, 4, 3, padding=1, groups=2), (8, 8, 5, 5),
                     lambda x, w, b: F.conv2d(x[:, [2 * b, 2 * b + 1, 4 + 2 * b, 5 + 2 * b]], w[:, 2 * b:2 * b + 2],
                                              padding=1, groups=2)),
}


@pytest.mark.parametrize("kind", list(BLOCK_LAYERS))
def test_each_block_gets_the_candidate_of_least_error_in_its_own_contribution(kind: str) -> None:
    make, shape, block_output = BLOCK_LAYERS[kind]
    torch.manual_seed(1)
    model = nn.Sequential(make())
    data = [torch.randn(shape) * torch.linspace(0.2, 2.0, shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))]
    sim = _sim(model, data, PerBlock(2))
    sequential_mse(sim, data, QUIET)
    layer = sim.model.get_submodule("0")
    quantizer = layer.param_quantizers["weight"]
    weight, x = layer.weight.detach(), data[0].double()
    num_blocks = weight.shape[1] // 2
    errors = []  # (candidate, channel, block): ||x_b W_cb - x_b Q(W_cb)||^2
    for i in range(1, 21):
        quantized, _ = _candidate(weight, i / 20, quantizer.granularity, quantizer)
        error = (weight - quantized).double()
        per_block = [block_output(x, error, b).square().transpose(0, 1).reshape(weight.shape[0], -1).sum(1)
                     for b in range(num_blocks)]
        errors.append(torch.stack(per_block, dim=1))
    best = torch.stack(errors).argmin(0)
    scale_shape = quantizer.encoding.scale.shape
    absmax = quantizer.granularity.rows(weight).abs().amax(1).reshape(scale_shape)
    expected_scale = absmax * (best + 1).float().reshape(scale_shape) / 20 / 7  # 4-bit symmetric: 7 steps up
    torch.testing.assert_close(quantizer.encoding.scale, expected_scale, rtol=1e-6, atol=0)
    assert (best < 19).any()


def test_lpbq_scales_stay_on_the_lpbq_grid_and_beat_minmax() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 6))
    data = [torch.randn(128, 32) * torch.linspace(0.1, 3.0, 32)]
    sim = _sim(model, data, Lpbq(8, decompressed_bw=8))
    layer, x = sim.model.get_submodule("0"), data[0]
    quantizer, weight = layer.param_quantizers["weight"], layer.weight.detach()
    minmax, minmax_scale = _candidate(weight, 1.0, quantizer.granularity, quantizer)
    report = sequential_mse(sim, data, QUIET)
    scale, granularity = quantizer.encoding.scale, quantizer.granularity
    assert isinstance(granularity, Lpbq)
    assert torch.equal(granularity.project(scale, 4), scale)  # on the grid: projecting again changes nothing
    multipliers = scale / granularity.channel_scale(scale, 4)
    torch.testing.assert_close(multipliers, multipliers.round(), rtol=0, atol=1e-4)
    assert not torch.equal(scale, minmax_scale)
    chosen_error = _channel_errors(lambda a, w: F.linear(a, w), x, weight, _installed(layer)).sum()
    minmax_error = _channel_errors(lambda a, w: F.linear(a, w), x, weight, minmax).sum()
    assert chosen_error < minmax_error
    torch.testing.assert_close(report.layers[0].chosen_mse, float(chosen_error) / (128 * 6), rtol=1e-6, atol=0)
    torch.testing.assert_close(report.layers[0].minmax_mse, float(minmax_error) / (128 * 6), rtol=1e-6, atol=0)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.dw(torch.relu(self.conv(x)))), 1))


def _heavy_tailed(shape: tuple[int, ...]) -> torch.Tensor:
    """Weights with outliers, as trained layers have: min-max wastes levels on them."""
    return torch.randn(shape) * (1 + 4 * (torch.rand(shape) > 0.97))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_model_output_is_closer_to_float_than_with_minmax(kind: str) -> None:
    torch.manual_seed(3)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        data = list(torch.randn(256, 16).split(64))
    else:
        model, data = ConvNet(), list(torch.randn(64, 3, 6, 6).split(32))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.copy_(_heavy_tailed(module.weight.shape) * module.weight.abs().mean())
    model.eval()
    x = torch.cat(data)
    with torch.no_grad():
        reference = model(x)
    sim = _sim(model, data, PerChannel(), calibrate=True)
    with torch.no_grad():
        minmax_mse = F.mse_loss(sim.model(x), reference)
    report = sequential_mse(sim, data, QUIET)
    with torch.no_grad():
        searched_mse = F.mse_loss(sim.model(x), reference)
    assert searched_mse < minmax_mse
    assert all(r.chosen_mse <= r.minmax_mse for r in report.layers)
    names = ["0", "2"] if kind == "mlp" else ["conv", "dw", "fc"]
    assert [r.name for r in report.layers] == names  # execution order
    print(f"{kind}: model output MSE min-max {float(minmax_mse):.4g}, sequential MSE {float(searched_mse):.4g}")


def _two_layer_setup() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, list(torch.randn(128, 8).split(64))


@pytest.mark.parametrize(("inputs", "inputs_quantized"), [("quantized", False), ("quantized", True), ("float", True)])
def test_later_layers_see_the_inputs_the_setting_names(inputs: str, inputs_quantized: bool) -> None:
    model, data = _two_layer_setup()
    sim = _sim(model, data, PerChannel(), param_bw=3, calibrate=True, inputs_quantized=inputs_quantized)
    if inputs_quantized:  # the layer's own input quantizer is then the only activation quantization it sees
        sim.set_enabled(False, kinds=("output",))
    report = sequential_mse(sim, data, SequentialMseSettings(inputs=inputs, progress=False))
    seen = []
    layer = sim.model.get_submodule("2")
    assert ("0" in layer.input_quantizers) == inputs_quantized
    quantize_input = layer.input_quantizers["0"] if inputs_quantized else nn.Identity()
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(quantize_input(args[0])))
    with torch.no_grad():
        for batch in data:
            sim.model(batch)
    handle.remove()
    quantized_input = torch.cat(seen)
    with torch.no_grad():
        float_input = model[1](model[0](torch.cat(data)))
    assert not torch.allclose(quantized_input, float_input, atol=1e-3)
    x = quantized_input if inputs == "quantized" else float_input
    weight = sim.model.get_submodule("2").weight.detach()
    minmax = quantize_dequantize(weight, *Encoding.from_range(-weight.abs().amax(1), weight.abs().amax(1), 3, True,
                                                              PerChannel(0)).broadcast_to(weight.shape), 3)
    expected = float(_channel_errors(lambda a, w: F.linear(a, w), x, weight, minmax).sum()) / (128 * 4)
    torch.testing.assert_close(report.layers[1].minmax_mse, expected, rtol=1e-6, atol=0)


def test_chosen_encodings_are_frozen_through_calibration() -> None:
    model, data = _two_layer_setup()
    sim = _sim(model, data, PerChannel(), calibrate=True)
    minmax = {name: q.encoding.scale.clone() for name, q in sim.quantizers("param").items() if q.enabled}
    sequential_mse(sim, data, QUIET)
    chosen = {name: sim.quantizer(name).encoding.scale.clone() for name in minmax}
    assert any(not torch.equal(chosen[name], minmax[name]) for name in minmax)
    assert all(sim.quantizer(name).frozen for name in minmax)
    sim.calibrate(data, progress=False)
    for name, scale in chosen.items():
        assert torch.equal(sim.quantizer(name).encoding.scale, scale), name


def test_only_the_named_layers_are_searched_and_modes_are_kept() -> None:
    model, data = _two_layer_setup()
    sim = _sim(model, data, PerChannel(), calibrate=True)
    sim.model.train()
    sim.freeze_weights()
    report = sequential_mse(sim, data, QUIET, layers=["2"])
    assert [r.name for r in report.layers] == ["2"]
    assert sim.weights_frozen
    assert not sim.quantizer("0.param_quantizers.weight").frozen
    assert sim.quantizer("2.param_quantizers.weight").frozen
    assert sim.model.training
    with pytest.raises(ValueError, match="not Linear/Conv2d layers"):
        sequential_mse(sim, data, QUIET, layers=["1"])


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="inputs must be one of"):
        SequentialMseSettings(inputs="symqt")
    with pytest.raises(ValueError, match="num_candidates"):
        SequentialMseSettings(num_candidates=0)


def test_layers_reading_the_same_input_share_one_pass_and_choose_as_if_alone() -> None:
    """q/k/v (and gate/up) read the very same tensor: one pass gathers all their Gram matrices, and one's choice
    cannot change another's input, so the encodings are those of searching them one call at a time."""
    together, batches, forwards, make_sim = sharing_check_sim()
    report = sequential_mse(together, batches, SequentialMseSettings(progress=False))
    assert len(report.layers) == 15
    # whole-model forwards: the order pass, the decoder-stack check, the capture of block 0's inputs, lm_head;
    # the 8 groups of the 2 decoder blocks run from their block's cached inputs
    assert len(forwards) == 1 + 1 + len(batches) + len(batches)
    alone = make_sim()
    for layer in report.layers:
        sequential_mse(alone, batches, SequentialMseSettings(progress=False), layers=[layer.name])
    for name, quantizer in together.quantizers("param").items():
        other = alone.quantizer(name)
        assert torch.equal(quantizer.scale, other.scale) and quantizer.frozen == other.frozen, name
