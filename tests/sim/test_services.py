"""The sim's public services: roles, state_dict, in-place encodings, calibration context, batches, modes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from edgequant import CalibrationError, Encoding, QuantSim
from edgequant.quantization import MinMaxAnalyzer, PercentileAnalyzer, PerChannel, SqnrAnalyzer
from edgequant.sim.modes import training_mode


@pytest.fixture
def calibrated(digits_cnn: nn.Module, digits_train: torch.Tensor) -> QuantSim:
    sim = QuantSim(digits_cnn, digits_train[:1], config="per_channel")
    sim.calibrate(digits_train[:256].split(64), progress=False)
    return sim


def test_quantizers_know_their_role_and_owner(calibrated: QuantSim) -> None:
    params = calibrated.quantizers(role="param")
    assert params and all(q.role == "param" for q in params.values())
    for name, quantizer in params.items():
        layer = calibrated.layer_of(quantizer)
        assert isinstance(getattr(layer, quantizer.key), nn.Parameter)
        assert name == quantizer.name == f"{quantizer.owner}.param_quantizers.{quantizer.key}"
    roles = {q.role for q in calibrated.quantizers().values()}
    assert roles == {"model_input", "param", "output"}
    every = calibrated.quantizers()
    by_role = {r: calibrated.quantizers(role=r) for r in ("model_input", "input", "param", "output")}
    assert sum(len(v) for v in by_role.values()) == len(every)
    with pytest.raises(ValueError, match="unknown quantizer role"):
        calibrated.quantizers(role="weights")


def test_state_dict_round_trip_into_an_uncalibrated_sim(calibrated: QuantSim, digits_cnn: nn.Module,
                                                        digits_train: torch.Tensor, tmp_path: Path) -> None:
    calibrated.set_enabled(False, pattern="fc*", kinds=("output",))
    torch.save(calibrated.model.state_dict(), tmp_path / "sd.pt")
    fresh = QuantSim(digits_cnn, digits_train[:1], config="per_channel")
    assert all(q.encoding is None for q in fresh.quantizers().values())
    fresh.model.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    for name, quantizer in calibrated.quantizers().items():
        loaded = fresh.quantizer(name)
        assert loaded.enabled == quantizer.enabled and loaded.axis == quantizer.axis
        assert loaded.encoding.equals(quantizer.encoding)
    x = digits_train[300:400]
    with torch.no_grad():
        assert torch.equal(fresh.model(x), calibrated.model(x))


def test_set_encoding_updates_trainable_tensors_in_place(calibrated: QuantSim) -> None:
    quantizer = next(iter(calibrated.quantizers(role="output").values()))
    quantizer.enable_range_learning()
    scale_param = quantizer.scale
    optimizer = torch.optim.SGD([scale_param], lr=0.1)
    quantizer.set_encoding(Encoding(torch.tensor(0.5), torch.tensor(-3.0), quantizer.bitwidth, False))
    assert quantizer.scale is scale_param and float(scale_param.detach()) == 0.5
    scale_param.grad = torch.tensor(1.0)
    optimizer.step()
    assert float(quantizer.encoding.scale) == pytest.approx(0.4)  # the optimizer trains the live tensor
    with pytest.raises(RuntimeError, match="orphan"):
        quantizer.set_encoding(Encoding(torch.ones(3), torch.zeros(3), 8, False, granularity=PerChannel(0)))


def test_calibrating_context_equals_calibrate(digits_cnn: nn.Module, digits_train: torch.Tensor) -> None:
    batches = digits_train[:256].split(64)
    reference = QuantSim(copy.deepcopy(digits_cnn), digits_train[:1], quant_scheme="sqnr")
    reference.calibrate(batches, progress=False)
    sim = QuantSim(digits_cnn, digits_train[:1], quant_scheme="sqnr")
    with sim.calibrating():
        for batch in batches:  # the user's own loop
            sim.model(batch)
    for name, quantizer in reference.quantizers().items():
        assert sim.quantizer(name).encoding.equals(quantizer.encoding), name


@pytest.mark.parametrize("analyzer_type", [MinMaxAnalyzer, SqnrAnalyzer, PercentileAnalyzer])
def test_merged_statistics_equal_one_analyzer_that_saw_everything(analyzer_type: type) -> None:
    torch.manual_seed(0)
    first, second = torch.randn(4000), torch.randn(4000) * 3 + 1  # the second shard widens the range
    whole, left, right = analyzer_type(), analyzer_type(), analyzer_type()
    whole.observe(first)
    whole.observe(second)
    left.observe(first)
    right.observe(second)
    left.merge(right)
    assert torch.equal(left.min, whole.min) and torch.equal(left.max, whole.max)
    if hasattr(whole, "hist"):
        # both widen the first histogram once to the same range, then add the second shard's counts
        assert float(left.hist.sum()) == float(whole.hist.sum()) == 8000
        assert torch.equal(left.hist_min, whole.hist_min) and torch.equal(left.hist_max, whole.hist_max)
        bin_width = float(whole.hist_max - whole.hist_min) / whole.num_bins
        low_l, high_l = left.compute_range(8, False)
        low_w, high_w = whole.compute_range(8, False)
        # the second shard is binned on its own grid, then moved whole into the merged grid: at most a bin off
        assert abs(float(high_l - high_w)) <= 2 * bin_width and abs(float(low_l - low_w)) <= 2 * bin_width
    with pytest.raises(TypeError, match="cannot merge"):
        left.merge(MinMaxAnalyzer(granularity=PerChannel(0)) if analyzer_type is MinMaxAnalyzer else MinMaxAnalyzer())


def test_batches_limit_adapt_and_refuse(calibrated: QuantSim, digits_train: torch.Tensor) -> None:
    labels = torch.zeros(64, dtype=torch.long)
    batches = [(digits_train[:64], labels)] * 5
    seen = list(calibrated.batches(batches, num_batches=3))
    assert len(seen) == 3 and all(args[0].shape == (64, 1, 8, 8) and kwargs == {} for args, kwargs in seen)
    with pytest.raises(ValueError, match="yielded no batch"):
        list(calibrated.batches([]))
    bad = digits_train[:4].clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="batch 0 contains NaN"):
        list(calibrated.batches([bad], error=CalibrationError))


def test_quantizers_enabled_and_training_mode_restore_state(calibrated: QuantSim, digits_train: torch.Tensor) -> None:
    calibrated.set_enabled(False, pattern="fc*")
    before = {n: q.enabled for n, q in calibrated.quantizers().items()}
    x = digits_train[:32]
    with torch.no_grad():
        quantized = calibrated.model(x)
        with calibrated.quantizers_enabled(False):
            float_out = calibrated.model(x)
        assert not torch.equal(quantized, float_out)
    assert {n: q.enabled for n, q in calibrated.quantizers().items()} == before
    calibrated.model.train()
    next(m for m in calibrated.model.modules() if isinstance(m, nn.Linear)).eval()  # mixed modes
    modes = {n: m.training for n, m in calibrated.model.named_modules()}
    with training_mode(calibrated.model, False):
        assert not any(m.training for m in calibrated.model.modules())
    assert {n: m.training for n, m in calibrated.model.named_modules()} == modes


def test_select_that_matches_nothing_is_an_error(calibrated: QuantSim) -> None:
    with pytest.raises(KeyError, match="no quantizer"):
        calibrated.set_enabled(False, pattern="conv9*")


def test_coverage_lists_gaps_before_float_by_design() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Hardshrink())  # no rule: a gap
    sim = QuantSim(model, torch.randn(1, 1, 8, 8))
    categories = {e.tensor: e.category for e in sim.coverage()}
    assert categories["3"] == "left in float"
    assert categories["0"] == "by design" and categories["0.bias"] == "by design"  # fused; float bias
    assert categories["2.output_quantizers.0"] == "quantized"
    lines = sim.coverage_summary().splitlines()
    assert "1 left in float" in lines[0]
    assert lines.index("left in float (gaps):") < lines.index("float by design:")
    assert lines[lines.index("left in float (gaps):") + 1].split()[0] == "3"
