"""choose_mixed_precision on the digits CNN: the choice is applied, costs and metrics are consistent, the
eval_fn is called logarithmically often and a rerun resumes from the cache, and the mixed model exports and
matches ONNX Runtime."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from references import assert_within_grid_steps
from torch import nn

import edgequant as eq
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.export import export_onnx, quantize_bias_int32
from edgequant.export.verify import verify
from edgequant.mixed_precision import apply_bitwidths, bitops_model, choose_mixed_precision, find_groups
from edgequant.mixed_precision.groups import current_bitwidths
from edgequant.ptq import fold_batch_norms

CANDIDATES = [(8, 8), (8, 16), (4, 8)]


class CountingAccuracy:
    """Top-1 accuracy on 400 test digits, counting its calls."""

    def __init__(self) -> None:
        self.images, self.labels = load_digits_tensors("test")
        self.images, self.labels = self.images[:400], self.labels[:400]
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> float:
        self.calls += 1
        return evaluate_accuracy(model, self.images, self.labels)


def _sim() -> eq.QuantSim:
    model = load_pretrained("digits_cnn")
    fold_batch_norms(model, torch.randn(1, 1, 8, 8))
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(model, images[:1], config="per_channel")
    sim.calibrate(images[:128].split(32), progress=False)
    return sim


def _data() -> list[torch.Tensor]:
    return list(load_digits_tensors("train")[0][:64].split(32))


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory):
    sim, accuracy = _sim(), CountingAccuracy()
    out_dir = tmp_path_factory.mktemp("mp")
    result = choose_mixed_precision(sim, _data(), accuracy, CANDIDATES, 0.01, out_dir=out_dir, progress=False)
    assert result.eval_calls == accuracy.calls  # every call counted
    return sim, accuracy, result, out_dir


def test_choice_is_applied_and_figures_are_consistent(searched) -> None:
    sim, accuracy, result, _ = searched
    assert result.met_target and result.metric >= result.fp32_metric - 0.01
    assert accuracy(sim.model) == result.metric  # the sim carries the chosen configuration
    bitwidths = current_bitwidths(sim)
    for layer, chosen in result.layer_bitwidths.items():
        for quantizer in sim.quantizers().values():
            if (quantizer.owner or "<model input>") == layer:
                expected = chosen["param_bw"] if quantizer.role == "param" else chosen["output_bw"]
                assert bitwidths[quantizer.name] == expected
    bitops = bitops_model(sim, sim.graph())
    widest = {n: (8 if q.role == "param" else 16) for n, q in sim.quantizers().items()}
    assert result.relative_bitops == pytest.approx(bitops(bitwidths) / bitops(widest))
    assert result.relative_bitops < 1.0  # some group got cheaper than W8A16
    assert any(c == (4, 8) for c in result.choice.values()) or any(c == (8, 8) for c in result.choice.values())
    costs = [p.relative_cost for p in result.front]
    assert costs == sorted(costs, reverse=True) and costs[0] == pytest.approx(1.0)
    assert (result.relative_bitops, result.metric) in result.pareto


def test_eval_calls_are_logarithmic_and_a_rerun_resumes(searched) -> None:
    _, _, result, out_dir = searched
    # FP32, the most accurate point, then a bisection over the front (one point per greedy move)
    assert len(result.front) > len(result.groups)
    assert result.eval_calls <= 2 + math.ceil(math.log2(len(result.front))) + math.ceil(
        math.log2(len(result.tie_break)))
    again, counting = _sim(), CountingAccuracy()
    rerun = choose_mixed_precision(again, _data(), counting, CANDIDATES, 0.01, out_dir=out_dir, progress=False)
    assert counting.calls == 0 and rerun.eval_calls == 0
    assert rerun.choice == result.choice and rerun.metric == result.metric
    other = _sim()
    other.calibrate(load_digits_tensors("train")[0][:64].split(32), progress=False)  # other encodings
    counting = CountingAccuracy()
    choose_mixed_precision(other, _data(), counting, CANDIDATES, 0.01, out_dir=out_dir, progress=False)
    assert counting.calls >= 2  # a different sim state does not reuse the cache


def test_allowed_drop_moves_the_pick_along_the_front() -> None:
    sim, accuracy = _sim(), CountingAccuracy()
    anything = choose_mixed_precision(sim, _data(), accuracy, CANDIDATES, 1.0, progress=False)
    assert anything.choice == anything.tie_break[-1].choice  # every drop allowed: the cheapest configuration
    assert anything.tie_break[0].choice == anything.front[-1].choice
    assert anything.relative_bitops == pytest.approx(0.25)  # W4A8 everywhere vs W8A16 everywhere
    # "add" feeds only the average pool (no MAC reads it): its 16 bits cost no BitOps, the tie-break lowers them
    assert anything.choice["add"] == (8, 8) and set(anything.choice.values()) <= {(4, 8), (8, 8)}
    smallest = choose_mixed_precision(sim, _data(), accuracy, CANDIDATES, 1.0, cost="memory", progress=False)
    assert set(smallest.choice.values()) <= {(4, 8), (8, 8)} and smallest.choice["add"] == (8, 8)
    assert smallest.cost == "memory" and smallest.relative_memory == pytest.approx(anything.relative_memory)


class ResidualNet(nn.Module):
    """``LayerNorm(fc(x) + x)``: only the Linear layer has MACs, so the outputs of fc, the add and the norm
    (read by no MAC) cost no BitOps at any bit width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x) + x)


def _residual_sim() -> eq.QuantSim:
    torch.manual_seed(0)
    sim = eq.QuantSim(ResidualNet(), torch.randn(2, 4))
    sim.calibrate([torch.randn(8, 4) for _ in range(2)], progress=False)
    return sim


# memory by hand (bytes; biases stay float): fc.weight 16 x 8 bit, norm.weight 4 x 8 bit, 2 float biases of 4,
# 4 activation tensors (model input, fc, add, norm outputs) of 2 x 4 values each
WEIGHT_BYTES = 16 + 4 + 2 * 4 * 4


def test_outputs_free_in_bitops_are_lowered_by_the_tie_break() -> None:
    sim = _residual_sim()
    result = choose_mixed_precision(sim, [torch.randn(8, 4)], lambda m: 1.0, [(8, 8), (8, 16)], 1.0,
                                    progress=False)
    # BitOps: fc's 2 x 4 outputs x 4 inputs = 32 MACs x 8 weight bits x (8 or 16) input bits
    assert result.relative_bitops == pytest.approx(32 * 8 * 8 / (32 * 8 * 16))
    assert result.choice == dict.fromkeys(["<model input>", "fc", "add", "norm"], (8, 8))  # not just the input
    assert result.relative_memory == pytest.approx((WEIGHT_BYTES + 4 * 8) / (WEIGHT_BYTES + 4 * 8 * 2))
    assert result.effective_bits["memory"] == pytest.approx(
        8 * (WEIGHT_BYTES + 4 * 8) / (16 + 4 + 2 * 4 + 4 * 8))  # bytes x 8 / values
    assert result.effective_bits["bitops"] == pytest.approx(8.0)
    assert [p.relative_cost for p in result.tie_break] == pytest.approx([0.5] * 4)  # three free moves
    assert {q.bitwidth for q in sim.quantizers(role="output").values()} == {8}  # applied to the sim


def test_a_group_without_weights_reports_the_most_precise_of_its_equal_candidates() -> None:
    result = choose_mixed_precision(_residual_sim(), [torch.randn(8, 4)], lambda m: 1.0, [(4, 8), (8, 8), (8, 16)],
                                    1.0, progress=False)
    assert result.choice["fc"] == (4, 8) and result.choice["add"] == (8, 8)  # the add has no weight to set to 4 bits


def test_the_tie_break_keeps_the_target() -> None:
    sim = _residual_sim()
    add = next(q for q in sim.quantizers(role="output").values() if q.owner == "add")
    calls = []

    def penalises_an_8_bit_add(_model: torch.nn.Module) -> float:
        calls.append(1)
        return 0.5 if add.bitwidth == 8 else 1.0

    result = choose_mixed_precision(sim, [torch.randn(8, 4)], penalises_an_8_bit_add, [(8, 8), (8, 16)], 0.1,
                                    progress=False)
    assert result.met_target and result.metric == 1.0 and result.choice["add"] == (8, 16)
    assert result.choice["<model input>"] == (8, 8) and result.relative_bitops == pytest.approx(0.5)
    lowered = [p.choice for p in result.tie_break if p.choice["add"] == (8, 16)]
    assert result.choice == lowered[-1]  # every free move before the add's was taken
    assert add.bitwidth == 16 and len(calls) == result.eval_calls
    assert result.eval_calls <= 2 + math.ceil(math.log2(len(result.front))) + math.ceil(
        math.log2(len(result.tie_break)))


@pytest.fixture(scope="module")
def exported_front_pick(searched, tmp_path_factory: pytest.TempPathFactory):
    """The front's pick (before the tie-break lowers the free 16 bits: int4 weights and int16 outputs both),
    exported."""
    _, _, result, _ = searched
    sim = _sim()
    pick = result.tie_break[0].choice
    assert {(4, 8), (8, 16)} <= set(pick.values())
    apply_bitwidths(sim, {name: bits for group in find_groups(sim) for name, bits in group.bitwidths(
        pick[group.name]).items()})
    quantize_bias_int32(sim)
    out_dir = tmp_path_factory.mktemp("mp_export")
    export_onnx(sim, out_dir, load_digits_tensors("test")[0][:1])
    return sim, out_dir


def test_mixed_model_exports_int16_and_int4_that_onnx_runtime_reproduces(exported_front_pick) -> None:
    sim, out_dir = exported_front_pick
    assert '"bw": 16' in (out_dir / "model.encodings").read_text()
    types = {init.data_type for init in onnx.load(out_dir / "model_qdq.onnx").graph.initializer}
    assert TensorProto.UINT16 in types and TensorProto.INT4 in types  # 16-bit Q/DQ activations, int4 weights
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written, in float
    session = ort.InferenceSession(str(out_dir / "model_qdq.onnx"), options, providers=["CPUExecutionProvider"])
    images = load_digits_tensors("test")[0][:128]
    (onnx_output,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = sim.model(images)
    # ORT's float convolutions sum in another order than torch's, and that order depends on the CPU's SIMD width
    # and the thread count: an output within rounding error of a grid midpoint may land one step apart
    assert_within_grid_steps(onnx_output, expected, sim.quantizer("fc.output_quantizers.0").scale, max_steps=1,
                             max_share=0.01)


def test_mixed_model_matches_onnx_runtime_integer_kernels(exported_front_pick) -> None:
    sim, out_dir = exported_front_pick
    images, _ = load_digits_tensors("test")
    report = verify(out_dir, sim, images, progress=False)
    (output,) = report.outputs
    assert output.top1_agreement >= 0.99 and output.share_within_1_lsb >= 0.98
    assert all(t.sqnr_db > 30 for t in report.tensors)


def test_report_is_written(searched) -> None:
    _, _, result, out_dir = searched
    html = (out_dir / "mixed_precision.html").read_text()
    assert result.report_path == out_dir / "mixed_precision.html"
    assert "mp-pareto" in html and "mp-sensitivity" in html and "conv2.0" in html
    assert f"effective bits: {result.effective_bits['bitops']:.2f}" in html and "Tie-break at equal bitops" in html


def test_bad_input_is_refused() -> None:
    sim = _sim()
    with pytest.raises(ValueError, match="pair"):
        choose_mixed_precision(sim, _data(), CountingAccuracy(), [8, 16], 0.01, progress=False)
    with pytest.raises(ValueError, match="at least two"):
        choose_mixed_precision(sim, _data(), CountingAccuracy(), [(8, 8)], 0.01, progress=False)
    with pytest.raises(ValueError, match="allowed_accuracy_drop"):
        choose_mixed_precision(sim, _data(), CountingAccuracy(), CANDIDATES, float("nan"), progress=False)
    with pytest.raises(ValueError, match="unknown cost"):
        choose_mixed_precision(sim, _data(), CountingAccuracy(), CANDIDATES, 0.01, cost="latency", progress=False)
    images, _ = load_digits_tensors("test")
    uncalibrated = eq.QuantSim(load_pretrained("digits_cnn"), images[:1])
    with pytest.raises(ValueError, match="not calibrated"):
        choose_mixed_precision(uncalibrated, _data(), CountingAccuracy(), CANDIDATES, 0.01, progress=False)


def test_autoquant_offers_mixed_precision_when_the_ladder_misses(tmp_path: Path) -> None:
    from edgequant.workflows import autoquant

    train, _ = load_digits_tensors("train")
    accuracy = CountingAccuracy()
    result = autoquant(load_pretrained("digits_cnn"), train[:2], list(train[:128].split(64)), accuracy,
                       allowed_accuracy_drop=0.01, param_bw=3, results_dir=tmp_path, schemes=("minmax",),
                       adaround_iterations=5, mixed_precision_candidates=[(3, 8), (8, 8)], progress=False)
    names = [step.name for step in result.steps]
    assert names[-1] == "mixed_precision" and "adaround" in names  # after the whole ladder missed
    assert result.target_met and result.best_step == "mixed_precision"
    bitwidths = {q.bitwidth for q in result.sim.quantizers(role="param").values()}
    assert bitwidths == {3, 8} and accuracy(result.sim.model) == pytest.approx(result.best_metric)
    assert (tmp_path / result.sim_state_path.parent.name / "mixed_precision" / "mixed_precision.html").exists()
