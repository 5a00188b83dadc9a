"""GPTQ: the same integers as a direct implementation of the paper's update, a lower output error than nearest
rounding, inputs as the sim computes them, and weights that stay on their grid."""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
import torch
from tiny_llm import sharing_check_sim
from torch import nn

from edgequant import QuantSim
from edgequant.llm.gptq import GptqSettings, gptq
from edgequant.quantization import Lpbq, PerBlock, PerChannel


def _correlated(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features (white noise has a diagonal Hessian, where nearest rounding is optimal)."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, max(features // 4, 2), generator=generator)
    mixing = torch.randn(latent.shape[1], features, generator=generator)
    return latent @ mixing + 0.1 * torch.randn(tokens, features, generator=generator)


def _linear_sim(inputs: torch.Tensor, out_features: int, param_bw: int, granularity: object = None,
                config: str | dict = "per_channel", output_bw: int = 8) -> QuantSim:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(inputs.shape[1], out_features)).eval()
    sim = QuantSim(model, inputs[:2], param_bw=param_bw, output_bw=output_bw, config=config)
    sim.calibrate([inputs], progress=False)
    if granularity is not None:
        sim.set_granularity("*", granularity)
    return sim


def _layer_inputs(sim: QuantSim, name: str, batches: list) -> torch.Tensor:
    """What the layer receives in the sim, captured here independently of gptq's own collection."""
    captured = []
    layer = sim.model.get_submodule(name)
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for batch in batches:
                sim.model(batch[0] if isinstance(batch, tuple) else batch)
    finally:
        handle.remove()
    return torch.cat(captured).reshape(-1, layer.in_features)


def _per_channel_config(**changes: dict) -> dict:
    config = json.loads((resources.files("edgequant") / "configs" / "per_channel.json").read_text(encoding="utf-8"))
    return config | changes


def _full_grid(sim: QuantSim, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scale and offset of every weight element, laid out by hand from the encoding, and the top integer."""
    layer = sim.model.get_submodule(name)
    encoding = layer.param_quantizers["weight"].encoding
    rows, columns = layer.weight.shape
    scale, offset = encoding.scale, encoding.offset
    if scale.dim() == 0:
        scale, offset = scale.reshape(1, 1), offset.reshape(1, 1)
    elif scale.dim() == 1:  # per output channel
        scale, offset = scale[:, None], offset[:, None]
    else:  # blocks along the input columns
        block = columns // scale.shape[1]
        scale, offset = scale.repeat_interleave(block, 1), offset.repeat_interleave(block, 1)
    return scale.expand(rows, columns).double(), offset.expand(rows, columns).double(), 2**encoding.bitwidth - 1


def _paper_gptq(weight: torch.Tensor, inputs: torch.Tensor, grid: tuple, damping: float,
                act_order: bool) -> torch.Tensor:
    """The paper's update column by column in float64: explicit inverse, each column's error spread over all the
    columns left, then that column removed from the inverse Hessian by Gaussian elimination (no Cholesky, no lazy
    batches). Returns the integers (grid indices)."""
    scale, offset, top = grid
    w = weight.double().clone()
    h = 2 * inputs.double().T @ inputs.double()
    dead = torch.diagonal(h) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
        w[:, j] = 0.0
    order = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
             else torch.arange(w.shape[1]))
    h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.linalg.inv(h)
    integers = torch.zeros_like(w)
    for j in order.tolist():
        q = torch.clamp(torch.round(w[:, j] / scale[:, j]) - offset[:, j], 0, top)
        integers[:, j] = q
        error = (w[:, j] - (q + offset[:, j]) * scale[:, j]) / inverse[j, j]
        w -= torch.outer(error, inverse[j, :])
        inverse -= torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return integers


def _integers(sim: QuantSim, name: str) -> torch.Tensor:
    scale, offset, _ = _full_grid(sim, name)
    return torch.round(sim.model.get_submodule(name).weight.detach().double() / scale) - offset


def _relative_error(inputs: torch.Tensor, weight: torch.Tensor, rounded: torch.Tensor) -> float:
    x = inputs.double()
    return float((x @ (rounded - weight).double().T).square().sum() / (x @ weight.double().T).square().sum())


@pytest.mark.parametrize("granularity", [None, PerBlock(4)], ids=["per-channel", "per-block"])
@pytest.mark.parametrize("act_order", [True, False])
def test_same_integers_as_the_papers_column_by_column_update(granularity: object, act_order: bool) -> None:
    inputs = _correlated(24, 8, seed=0)
    sim = _linear_sim(inputs, 4, param_bw=3, granularity=granularity)
    weight = sim.model.get_submodule("0").weight.detach().clone()
    layer_inputs = _layer_inputs(sim, "0", [inputs])
    grid = _full_grid(sim, "0")
    settings = GptqSettings(damping=0.05, act_order=act_order, block_size=3, progress=False)  # 3: blocks cut columns
    gptq(sim, [inputs[:10], inputs[10:]], settings)
    expected = _paper_gptq(weight, layer_inputs, grid, damping=0.05, act_order=act_order)
    nearest = torch.clamp(torch.round(weight.double() / grid[0]) - grid[1], 0, grid[2])
    assert torch.equal(_integers(sim, "0"), expected)
    assert not torch.equal(expected, nearest)  # the example is one where GPTQ rounds otherwise


@pytest.mark.parametrize(("granularity", "bits"), [(None, 4), (PerBlock(32), 3)], ids=["per-channel", "per-block"])
def test_lowers_the_output_error_below_nearest_rounding(granularity: object, bits: int) -> None:
    inputs = _correlated(512, 128, seed=2)
    sim = _linear_sim(inputs, 64, param_bw=bits, granularity=granularity)
    layer = sim.model.get_submodule("0")
    weight = layer.weight.detach().clone()
    nearest = layer.param_quantizers["weight"](weight)
    layer_inputs = _layer_inputs(sim, "0", [inputs])
    report = gptq(sim, list(inputs.split(128)), GptqSettings(progress=False))
    nearest_error = _relative_error(layer_inputs, weight, nearest)
    gptq_error = _relative_error(layer_inputs, weight, layer.weight.detach())
    assert gptq_error < 0.7 * nearest_error
    (entry,) = report.layers
    assert entry.name == "0" and entry.tokens == 512
    assert entry.nearest_error == pytest.approx(nearest_error, rel=1e-4)
    assert entry.gptq_error == pytest.approx(gptq_error, rel=1e-4)


def test_act_order_and_damping_change_the_rounding() -> None:
    inputs = _correlated(256, 64, seed=3)
    results = {}
    for settings in (GptqSettings(progress=False), GptqSettings(act_order=False, progress=False),
                     GptqSettings(damping=0.5, progress=False)):
        sim = _linear_sim(inputs, 32, param_bw=3)
        gptq(sim, [inputs], settings)
        results[settings] = sim.model.get_submodule("0").weight.detach()
    default, no_act_order, damped = results.values()
    assert not torch.equal(default, no_act_order)
    assert not torch.equal(default, damped)


def test_dead_inputs_give_zero_weights_and_no_nan() -> None:
    inputs = _correlated(64, 16, seed=4)
    inputs[:, [2, 7]] = 0.0
    sim = _linear_sim(inputs, 8, param_bw=4)
    weight = sim.model.get_submodule("0").weight.detach().clone()
    gptq(sim, [inputs], GptqSettings(progress=False))
    rounded = sim.model.get_submodule("0").weight.detach()
    assert torch.isfinite(rounded).all()
    assert torch.equal(rounded[:, [2, 7]], torch.zeros(8, 2))
    assert not torch.equal(rounded, sim.model.get_submodule("0").param_quantizers["weight"](weight))


def test_a_singular_hessian_without_damping_is_refused() -> None:
    inputs = _correlated(4, 16, seed=5)  # 4 tokens: H has rank 4 of 16
    sim = _linear_sim(inputs, 8, param_bw=4)
    with pytest.raises(ValueError, match="not positive definite after damping 0.0"):
        gptq(sim, [inputs], GptqSettings(damping=0.0, progress=False))


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_the_second_layer_sees_the_first_layers_gptq_output_quantized() -> None:
    torch.manual_seed(6)
    model = _Mlp().eval()
    original = copy.deepcopy(model.state_dict())
    inputs = _correlated(128, 16, seed=6)
    batches = [(x, torch.zeros(len(x))) for x in inputs.split(32)]  # labels trail the inputs
    sim = QuantSim(model, inputs[:2], param_bw=3, output_bw=3, config="per_channel")
    sim.calibrate(batches, progress=False)
    fc2 = sim.model.get_submodule("fc2")
    weight2, grid2 = fc2.weight.detach().clone(), _full_grid(sim, "fc2")
    nearest_inputs = _layer_inputs(sim, "fc2", batches)  # fc1 rounded to nearest
    sim.model.train()  # gptq runs in eval mode and leaves the modes as it found them
    fc2_runs = []
    handle = fc2.register_forward_hook(lambda *_: fc2_runs.append(1))
    report = gptq(sim, batches, GptqSettings(progress=False))
    handle.remove()
    assert len(fc2_runs) == 1  # the first batch, to find the order: fc1's passes stop at fc1, fc2's before fc2 runs
    assert sim.model.training and fc2.training
    assert [entry.name for entry in report.layers] == ["fc1", "fc2"]
    sim.model.eval()
    with sim.quantizers_enabled(False, [fc2.param_quantizers["weight"]]):  # fc2's own rounding cannot matter here
        gptq_inputs = _layer_inputs(sim, "fc2", batches)  # fc1 rounded by GPTQ, its output quantized at 3 bits
    with sim.quantizers_enabled(False):
        float_inputs = _layer_inputs(sim, "fc2", batches)
    assert not torch.equal(gptq_inputs, nearest_inputs)
    expected = _paper_gptq(weight2, gptq_inputs, grid2, damping=0.01, act_order=True)
    assert torch.equal(_integers(sim, "fc2"), expected)
    for other in (nearest_inputs, float_inputs):  # either would have given other integers
        assert not torch.equal(_paper_gptq(weight2, other, grid2, damping=0.01, act_order=True), expected)
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())


def test_a_linear_with_an_input_quantizer_takes_its_quantized_inputs() -> None:
    config = _per_channel_config(model_input={}, defaults={
        "ops": {"is_output_quantized": "False"}, "params": {"is_quantized": "True", "is_symmetric": "True"}},
        op_type={"Gemm": {"is_input_quantized": "True", "per_channel_quantization": "True"}})
    inputs = _correlated(48, 16, seed=9)
    sim = _linear_sim(inputs, 8, param_bw=3, config=config, output_bw=3)
    layer = sim.model.get_submodule("0")
    assert list(layer.input_quantizers) == ["0"] and not layer.output_quantizers
    weight, grid = layer.weight.detach().clone(), _full_grid(sim, "0")
    with torch.no_grad():
        quantized_inputs = layer.input_quantizers["0"](inputs)
    gptq(sim, [inputs], GptqSettings(progress=False))
    expected = _paper_gptq(weight, quantized_inputs, grid, damping=0.01, act_order=True)
    assert torch.equal(_integers(sim, "0"), expected)
    assert not torch.equal(_paper_gptq(weight, inputs, grid, damping=0.01, act_order=True), expected)


def test_activation_quantizers_without_an_encoding_are_left_off() -> None:
    inputs = _correlated(48, 16, seed=10)
    torch.manual_seed(1)
    sim = QuantSim(nn.Sequential(nn.Linear(16, 8)).eval(), inputs[:2], param_bw=3, config="per_channel")
    sim.compute_param_encodings()  # weights only: the model input quantizer has no encoding
    weight, grid = sim.model.get_submodule("0").weight.detach().clone(), _full_grid(sim, "0")
    gptq(sim, [inputs], GptqSettings(progress=False))
    assert torch.equal(_integers(sim, "0"), _paper_gptq(weight, inputs, grid, damping=0.01, act_order=True))


@pytest.mark.parametrize(
    ("config", "granularity"),
    [("default", None), ("per_channel", None), ("per_channel", PerChannel()), ("per_channel", PerBlock(8)),
     ("per_channel", Lpbq(8, decompressed_bw=8))],
    ids=["per-tensor", "per-channel", "per-channel-set", "per-block", "lpbq"],
)
def test_requantizing_the_rounded_weight_gives_it_back(config: str, granularity: object) -> None:
    inputs = _correlated(96, 32, seed=7)
    sim = _linear_sim(inputs, 16, param_bw=4, granularity=granularity, config=config)
    quantizer = sim.model.get_submodule("0").param_quantizers["weight"]
    encoding = quantizer.encoding
    gptq(sim, [inputs], GptqSettings(block_size=5, progress=False))
    rounded = sim.model.get_submodule("0").weight.detach()
    assert torch.equal(quantizer(rounded), rounded)
    sim.calibrate([inputs], progress=False)  # the encoding GPTQ rounded onto is frozen: calibration keeps it
    assert quantizer.encoding.equals(encoding)
    with sim.frozen_weights():  # frozen weights are unfrozen for the rounding and frozen again after it
        gptq(sim, [inputs], GptqSettings(progress=False))
        assert sim.weights_frozen


def test_named_layers_only_and_refusals() -> None:
    torch.manual_seed(8)
    inputs = _correlated(64, 16, seed=8)
    sim = QuantSim(_Mlp().eval(), inputs[:2], param_bw=4, config="per_channel")
    sim.calibrate([inputs], progress=False)
    fc1 = sim.model.get_submodule("fc1").weight.detach().clone()
    report = gptq(sim, iter([inputs[:32], inputs[32:]]), GptqSettings(progress=False), layers=["fc2"])
    assert [entry.name for entry in report.layers] == ["fc2"] and report.layers[0].tokens == 64
    assert torch.equal(sim.model.get_submodule("fc1").weight, fc1)
    with pytest.raises(ValueError, match="'fc3' is not a layer"):
        gptq(sim, [inputs], GptqSettings(progress=False), layers=["fc3"])
    sim.set_enabled(False, "fc1", ("param",))
    with pytest.raises(ValueError, match="'fc1' has no enabled weight quantizer"):
        gptq(sim, [inputs], GptqSettings(progress=False), layers=["fc1"])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.last = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.second(torch.relu(self.first(x))))


def test_tied_weights_are_left_alone() -> None:
    torch.manual_seed(11)
    inputs = _correlated(64, 16, seed=11)
    sim = QuantSim(_Tied().eval(), inputs[:2], param_bw=4, config="per_channel")
    sim.calibrate([inputs], progress=False)
    tied = sim.model.get_submodule("first").weight.detach().clone()
    with pytest.warns(UserWarning, match=r"weight other modules share: \['first', 'second'\]"):
        report = gptq(sim, [inputs], GptqSettings(progress=False))
    assert [entry.name for entry in report.layers] == ["last"]
    assert torch.equal(sim.model.get_submodule("first").weight, tied)
    with pytest.raises(ValueError, match="'second' shares its weight with first"):
        gptq(sim, [inputs], GptqSettings(progress=False), layers=["second"])


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="damping"):
        GptqSettings(damping=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        GptqSettings(block_size=0)


def test_layers_reading_the_same_input_share_one_pass_and_round_as_if_alone() -> None:
    """q/k/v (and gate/up) read the very same tensor: one pass gives all their Hessians, and rounding one cannot
    change another's input, so the result is that of rounding them one call at a time."""
    together, batches, forwards, make_sim = sharing_check_sim()
    report = gptq(together, batches, GptqSettings(progress=False))
    assert len(report.layers) == 15
    # whole-model forwards: the order pass, the decoder-stack check, the capture of block 0's inputs, lm_head;
    # the 8 groups of the 2 decoder blocks run from their block's cached inputs
    assert len(forwards) == 1 + 1 + len(batches) + len(batches)
    alone = make_sim()
    for layer in report.layers:
        gptq(alone, batches, GptqSettings(progress=False), layers=[layer.name])
    for name, module in together.quantized_modules().items():
        if isinstance(module, nn.Linear):
            assert torch.equal(module.weight, alone.model.get_submodule(name).weight), name
