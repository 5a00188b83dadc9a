"""AutoQuant on the bundled digits CNN: the ladder runs, reports, recommends, and a rerun resumes from cache."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edgequant.cli.autoquant_command import autoquant as autoquant_command
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.quantization import Percentile
from edgequant.sim import QuantSim
from edgequant.workflows import AutoQuantSettings, QuantSimSettings, autoquant
from edgequant.workflows.autoquant import _recommend
from edgequant.workflows.autoquant_result import AutoQuantResult, StepRecord


@pytest.fixture(scope="module")
def digits() -> tuple:
    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    return load_pretrained("digits_cnn"), train_images, list(train_images[:256].split(64)), test_images, test_labels


def test_full_ladder_reports_recommends_and_resumes(digits, tmp_path) -> None:
    model, train_images, batches, test_images, test_labels = digits
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    def accuracy(m: torch.nn.Module) -> float:
        return evaluate_accuracy(m, test_images, test_labels)

    # 3-bit weights per tensor with no allowed drop: no step can meet the target, so every step runs.
    kwargs = {"allowed_accuracy_drop": 0.0, "param_bw": 3, "results_dir": tmp_path, "adaround_iterations": 10,
              "schemes": ("minmax", "sqnr"), "progress": False}
    first = autoquant(model, train_images[:2], batches, accuracy, **kwargs)

    names = [step.name for step in first.steps]
    assert names[:6] == ["fp32", "calibration:minmax", "calibration:sqnr", "w32", "a32", "bn_fold"]
    assert names[-1] == "adaround"
    assert first.fp32_metric == pytest.approx(accuracy(model))
    assert not first.target_met and first.best_metric < first.target_metric
    best_candidate = max((s for s in first.steps if not s.diagnostic and s.metric is not None), key=lambda s: s.metric)
    assert first.best_step == best_candidate.name
    assert accuracy(first.sim.model) == pytest.approx(first.best_metric)  # the returned sim is the best one
    assert first.recommendation and "Quantization-aware training" in first.recommendation
    assert "Weights are the problem" in first.recommendation  # W32 meets the target at 3-bit weights
    assert first.sensitivity and first.sensitivity[0][1] >= first.sensitivity[-1][1]
    html = first.report_path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html
    for name in ("calibration:sqnr", "bn_fold", "adaround", "Per-layer sensitivity"):
        assert name in html
    assert first.sim_state_path.exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())  # user's model untouched

    second = autoquant(model, train_images[:2], batches, accuracy, **kwargs)
    assert all(step.cached for step in second.steps)
    assert (second.best_step, second.best_metric) == (first.best_step, first.best_metric)
    with torch.no_grad():
        assert torch.equal(second.sim.model(test_images), first.sim.model(test_images))


def test_stops_at_calibration_when_target_met(digits, tmp_path) -> None:
    model, train_images, batches, test_images, test_labels = digits
    result = autoquant(model, train_images[:2], batches, lambda m: evaluate_accuracy(m, test_images, test_labels),
                       allowed_accuracy_drop=0.01, results_dir=tmp_path, schemes=("minmax",), progress=False)
    assert result.target_met and result.recommendation is None
    assert result.best_step.startswith("calibration:")
    assert "bn_fold" not in [step.name for step in result.steps]


def test_a_method_with_settings_is_logged_and_restored_from_the_cache(digits, tmp_path) -> None:
    model, train_images, batches, test_images, test_labels = digits

    def run(method: Percentile):
        return autoquant(model, train_images[:2], batches, lambda m: evaluate_accuracy(m, test_images, test_labels),
                         allowed_accuracy_drop=1.0, results_dir=tmp_path, schemes=(method,), progress=False)

    first = run(Percentile(99.9))
    assert first.best_step == "calibration:percentile(percentile=99.9)"
    assert first.steps[1].scheme == {"name": "percentile", "percentile": 99.9}
    assert first.sim.quant_scheme == Percentile(99.9)
    second = run(Percentile(99.9))
    assert all(step.cached for step in second.steps) and second.sim.quant_scheme == Percentile(99.9)
    with torch.no_grad():
        assert torch.equal(second.sim.model(test_images), first.sim.model(test_images))
    assert not any(step.cached for step in run(Percentile(99.5)).steps)  # other settings, other cache entry


def test_a_settings_object_and_the_same_keywords_share_one_cache_entry(digits, tmp_path) -> None:
    model, train_images, batches, test_images, test_labels = digits
    settings = AutoQuantSettings.build(allowed_accuracy_drop=1.0, schemes=("minmax",), param_bw=4, progress=False)
    assert settings.sim == QuantSimSettings(param_bw=4) and settings.schemes == ("minmax",)

    def accuracy(m: torch.nn.Module) -> float:
        return evaluate_accuracy(m, test_images, test_labels)

    first = autoquant(model, train_images[:2], batches, accuracy, settings, results_dir=tmp_path)
    assert first.target_met and not any(step.cached for step in first.steps)
    assert first.sim.model.get_submodule("fc").param_quantizers["weight"].bitwidth == 4
    second = autoquant(model, train_images[:2], batches, accuracy, allowed_accuracy_drop=1.0, schemes=("minmax",),
                       param_bw=4, results_dir=tmp_path, progress=False)
    assert all(step.cached for step in second.steps)


@pytest.mark.parametrize(("keywords", "error", "message"), [
    ({"allowed_accuracy_drop": -0.1}, ValueError, "allowed_accuracy_drop must be >= 0"),
    ({"schemes": ()}, ValueError, "schemes must name at least one calibration scheme"),
    ({"scheme": "minmax"}, TypeError, "unexpected keyword argument 'scheme'"),
])
def test_settings_are_checked_when_built(keywords: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        AutoQuantSettings.build(**keywords)


@pytest.mark.parametrize("config", ["default", "per_channel"])
def test_the_recommendation_starts_from_the_settings_it_ran_with(digits, config: str, tmp_path) -> None:
    model, train_images, batches, *_ = digits
    sim = QuantSim(model, train_images[:1], param_bw=4, config=config)
    sim.calibrate(batches[:1], progress=False)
    steps = [StepRecord("w32", "", 0.995, 0.0, diagnostic=True), StepRecord("a32", "", 0.6, 0.0, diagnostic=True)]
    result = AutoQuantResult(sim, 1.0, 0.99, "calibration:minmax", 0.5, False, tmp_path / "s.pt", tmp_path / "r.html",
                             steps, sensitivity=[("conv2.1", 0.8), ("conv3.0", 0.7), ("fc", 0.4)])
    lines = _recommend(result, param_bw=4, output_bw=8).splitlines()
    weights = "Weights are the problem (activations alone, W32A8: 0.9950): try "
    assert lines[1] == weights + ("a per-channel config (config='per_channel') or param_bw > 4." if config == "default"
                                  else "param_bw > 4.")
    assert lines[2].startswith("conv2.1 is a BatchNorm simulated unfolded")  # not "keep conv2.1 at 16 bits"
    assert lines[3] == "Keep the most sensitive layers at a higher bitwidth (e.g. 16-bit): conv3.0 (+0.2000)."


def test_cli_runs_the_digits_demo(tmp_path) -> None:
    outcome = CliRunner().invoke(autoquant_command, ["--out", str(tmp_path), "--quiet", "--num-batches", "2",
                                                     "--scheme", "minmax"])
    assert outcome.exit_code == 0, outcome.output
    assert "target met" in outcome.output and "report:" in outcome.output
    assert list(tmp_path.rglob("autoquant_report.html"))
