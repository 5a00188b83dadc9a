"""Calibration of a sim of an ONNX file inside ONNX Runtime: the statistics are the torch pass's (up to float32
rounding of ORT's kernels), quantizers ORT cannot serve fall back to the torch pass, and the export still matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_models import branching_cnn, conv_batch_norm, hard_swish_cnn, save

from edgequant import QuantSim
from edgequant.onnx import onnxruntime_calibration_plan
from edgequant.quantization import CalibrationError, PerChannel, calibration_method


def _batches(shape: tuple[int, ...], count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]


def _calibrated(path: Path, data: list, engine: str, edit=None, **options) -> tuple[QuantSim, int]:  # noqa: ANN001
    """A sim of ``path`` (``edit`` applied) calibrated on ``data`` by ``engine``, and how often ``sim.model`` ran."""
    sim = QuantSim.from_onnx(path, data[0], **options)
    if edit is not None:
        edit(sim)
    calls = []
    handle = sim.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    sim.calibrate(data, progress=False, engine=engine)
    handle.remove()
    return sim, len(calls)


def _assert_same_statistics(ort_sim: QuantSim, torch_sim: QuantSim) -> None:
    """Equal activation statistics up to float32 rounding of ORT's kernels, equal weight encodings."""
    for name, quantizer in torch_sim.quantizers().items():
        other = ort_sim.quantizers()[name]
        if quantizer.role == "param":
            assert torch.equal(quantizer.scale, other.scale), name
            continue
        # every grid holds 0: a minimum matters as min(minimum, 0), all ORT computes of a ReLU's output (its maximum)
        np.testing.assert_allclose(other.analyzer.min.clamp_max(0), quantizer.analyzer.min.clamp_max(0), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
        np.testing.assert_allclose(other.analyzer.max, quantizer.analyzer.max, rtol=1e-5, atol=1e-6, err_msg=name)
        assert other.analyzer.num_sentinels == quantizer.analyzer.num_sentinels, name
        np.testing.assert_allclose(other.scale, quantizer.scale, rtol=1e-5, err_msg=name)
        assert (other.offset - quantizer.offset).abs().max() <= 1, name  # a rounding tie may fall the other way


def test_onnx_runtime_computes_the_torch_passes_statistics_without_running_the_module(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    data = _batches((8, 3, 8, 8))
    ort_sim, ort_calls = _calibrated(path, data, "auto", config="per_channel")
    torch_sim, torch_calls = _calibrated(path, data, "torch", config="per_channel")
    assert (ort_calls, torch_calls) == (0, 3)
    plan = onnxruntime_calibration_plan(ort_sim)
    assert not plan.torch_pass and len(plan.served) == 6  # model input, relu_a, conv_b, add, concat, head
    _assert_same_statistics(ort_sim, torch_sim)


def test_hard_swish_and_gates_are_known_non_negative_and_keep_the_torch_passes_statistics(tmp_path: Path) -> None:
    from edgequant.onnx.calibration import _nonnegative_tensors
    from edgequant.onnx.graph_constants import GraphConstants

    model = hard_swish_cnn()
    # Clip(x + 3, 0, 6) / 6 and HardSigmoid cannot be negative: ORT takes only their maximum; x * gate can
    assert {"clipped", "gate", "scales"} <= _nonnegative_tensors(model, GraphConstants.of(model).values)
    assert not {"c", "shifted", "swished", "output"} & _nonnegative_tensors(model, GraphConstants.of(model).values)
    path = save(model, tmp_path / "model.onnx")
    data = [batch * 3 for batch in _batches((8, 3, 8, 8), seed=20)]  # wide enough for every clip to bite
    ort_sim, ort_calls = _calibrated(path, data, "auto", config="per_channel")
    torch_sim, _ = _calibrated(path, data, "torch", config="per_channel")
    assert ort_calls == 0
    _assert_same_statistics(ort_sim, torch_sim)


def test_sub_batches_keep_the_torch_passes_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgequant.onnx import calibration

    monkeypatch.setattr(calibration, "SUB_BATCH_BYTES", 1)  # one sample per ORT run
    runs = []
    original_run = calibration._Calibrator._run

    def counted_run(self, index: int, feeds: dict) -> None:  # noqa: ANN001
        runs.append(len(feeds["image"]))
        original_run(self, index, feeds)

    monkeypatch.setattr(calibration._Calibrator, "_run", counted_run)
    path = save(hard_swish_cnn(), tmp_path / "model.onnx")
    data = [batch * 3 for batch in _batches((4, 3, 8, 8), seed=30)]
    ort_sim, _ = _calibrated(path, data, "auto", config="per_channel")
    torch_sim, _ = _calibrated(path, data, "torch", config="per_channel")
    assert runs == [1] * 12  # 3 batches of 4 samples
    _assert_same_statistics(ort_sim, torch_sim)


def test_a_per_channel_activation_is_reduced_per_channel_in_onnx_runtime(tmp_path: Path) -> None:
    path = save(conv_batch_norm(), tmp_path / "model.onnx")
    data = _batches((4, 3, 8, 8), seed=10)

    def per_channel(sim: QuantSim) -> None:
        sim.quantizer("relu.output_quantizers.0").granularity = PerChannel(1)

    ort_sim, ort_calls = _calibrated(path, data, "auto", per_channel, config="per_channel")
    torch_sim, _ = _calibrated(path, data, "torch", per_channel, config="per_channel")
    assert ort_calls == 0 and ort_sim.quantizer("relu.output_quantizers.0").scale.shape == (6,)
    _assert_same_statistics(ort_sim, torch_sim)


def test_a_quantizer_onnx_runtime_cannot_serve_is_observed_by_the_torch_pass(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    data = _batches((8, 3, 8, 8), seed=20)

    def sqnr_on_add(sim: QuantSim) -> None:
        quantizer = sim.quantizer("add.output_quantizers.0")
        quantizer.analyzer = calibration_method("sqnr").analyzer(quantizer.granularity, quantizer.role)

    ort_sim, ort_calls = _calibrated(path, data, "auto", sqnr_on_add, config="per_channel")
    torch_sim, _ = _calibrated(path, data, "torch", sqnr_on_add, config="per_channel")
    plan = onnxruntime_calibration_plan(ort_sim)
    assert list(plan.torch_reasons) == ["add.output_quantizers.0"] and "not min-max" in plan.torch_reasons[
        "add.output_quantizers.0"]
    assert ort_calls == 3 and len(plan.served) == 5
    add = "add.output_quantizers.0"  # the torch pass computed it: exactly the torch engine's encoding
    assert torch.equal(ort_sim.quantizer(add).scale, torch_sim.quantizer(add).scale)
    _assert_same_statistics(ort_sim, torch_sim)


def _masked_attention() -> onnx.ModelProto:
    """Scores plus ``(1 - mask) * finfo.min``, a Softmax and a MatMul by a constant: BERT's mask arithmetic."""
    nodes = [
        helper.make_node("Sub", ["one", "mask"], ["inverted"], name="invert"),
        helper.make_node("Mul", ["inverted", "lowest"], ["bias"], name="scale"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "values"], ["out"], name="mix"),
    ]
    initializers = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "lowest"),
        numpy_helper.from_array(np.random.default_rng(3).normal(0, 1, (6, 4)).astype(np.float32), "values"),
    ]
    graph = helper.make_graph(
        nodes, "masked_attention",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sentinels_of_an_attention_mask_are_left_out_as_the_torch_pass_leaves_them_out(tmp_path: Path) -> None:
    path = save(_masked_attention(), tmp_path / "model.onnx")
    generator = torch.Generator().manual_seed(5)
    data = []
    for padded in (0, 2, 1):  # the first batch has no padding: the mask tensors are taken whole from the second on
        mask = torch.ones(4, 6)
        mask[:, 6 - padded:] = 0
        data.append((torch.randn(4, 6, generator=generator), mask))
    ort_sim, ort_calls = _calibrated(path, data, "auto", config="per_channel")
    torch_sim, _ = _calibrated(path, data, "torch", config="per_channel")
    assert ort_calls == 0
    assert set(onnxruntime_calibration_plan(ort_sim).raw_tensors) == {"bias", "masked"}
    assert torch_sim.quantizer("add_mask.output_quantizers.0").analyzer.num_sentinels == 4 * 2 + 4 * 1
    _assert_same_statistics(ort_sim, torch_sim)


def test_a_frozen_weight_encoding_sends_the_whole_calibration_to_the_torch_pass(tmp_path: Path) -> None:
    """A frozen weight quantizer (AdaRound, loaded encodings) quantizes during calibration: what the activations
    downstream see is not the float model ORT would run."""
    path = save(branching_cnn(), tmp_path / "model.onnx")
    data = _batches((8, 3, 8, 8), seed=50)

    def frozen_conv(sim: QuantSim) -> None:
        weight = sim.quantizer("conv_a.param_quantizers.weight")
        weight.encode_from(sim.model.get_submodule("conv_a").weight.detach() * 0.25)  # a coarse, clipping grid
        weight.frozen = True

    ort_sim, ort_calls = _calibrated(path, data, "auto", frozen_conv, config="per_channel")
    torch_sim, _ = _calibrated(path, data, "torch", frozen_conv, config="per_channel")
    plan = onnxruntime_calibration_plan(ort_sim)
    assert ort_calls == 3 and not plan.served and "frozen" in next(iter(plan.torch_reasons.values()))
    for name, quantizer in torch_sim.quantizers().items():
        assert torch.equal(ort_sim.quantizer(name).scale, quantizer.scale), name


def test_a_technique_changing_weights_gets_a_new_session(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    data = _batches((8, 3, 8, 8), seed=30)
    sim, _ = _calibrated(path, data, "auto", config="per_channel")
    before = sim.quantizer("relu_a.output_quantizers.0").analyzer.max.clone()
    with torch.no_grad():
        sim.model.get_submodule("conv_a").weight.mul_(2)
        sim.model.get_submodule("conv_a").bias.mul_(2)
    sim.calibrate(data, progress=False)
    after = sim.quantizer("relu_a.output_quantizers.0").analyzer.max
    np.testing.assert_allclose(after, 2 * before, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:emulating onnxruntime")
def test_the_qdq_export_of_an_onnx_runtime_calibration_matches_the_emulating_sim(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    sim, _ = _calibrated(path, _batches((8, 3, 8, 8), seed=40), "auto", config="per_channel")
    result = sim.export(tmp_path / "out")
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(41))
    session = ort.InferenceSession(str(result.qdq_model), providers=["CPUExecutionProvider"])
    sim.emulate("onnxruntime")
    try:
        with torch.no_grad():
            emulated = sim.model(x).numpy()
    finally:
        sim.emulate(None)
    np.testing.assert_array_equal(session.run(None, {"image": x.numpy()})[0], emulated)


def test_a_batch_onnx_runtime_cannot_run_is_one_error_and_leaves_no_statistics_behind(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    first, second = _batches((8, 3, 8, 8), count=2, seed=60)
    sim = QuantSim.from_onnx(path, first, config="per_channel")
    with pytest.raises(CalibrationError, match="batch 1 does not run in ONNX Runtime.*engine='torch'"):
        sim.calibrate([first * 10, second.double()], progress=False)
    sim.calibrate([second], progress=False)  # the first batch's (10x wider) extremes must be gone
    reference, _ = _calibrated(path, [second], "torch", config="per_channel")
    _assert_same_statistics(sim, reference)


def test_a_graph_onnx_runtime_cannot_load_is_calibrated_by_the_torch_pass(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A node only a converter registered with onnx2torch knows: ORT refuses the graph, the module still runs."""
    from edgequant.onnx import calibration

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Fatal error: vendor:Op is not a registered function/op")

    monkeypatch.setattr(calibration, "_build_session", refuse)
    path = save(conv_batch_norm(), tmp_path / "model.onnx")
    data = _batches((4, 3, 8, 8), seed=70)
    sim, calls = _calibrated(path, data, "auto", config="per_channel")
    plan = onnxruntime_calibration_plan(sim)
    assert calls == 3 and not plan.served and "cannot load" in next(iter(plan.torch_reasons.values()))
    reference, _ = _calibrated(path, data, "torch", config="per_channel")
    for name, quantizer in reference.quantizers().items():
        assert torch.equal(sim.quantizer(name).scale, quantizer.scale), name


def test_an_unknown_engine_is_refused(tmp_path: Path) -> None:
    sim = QuantSim.from_onnx(save(conv_batch_norm(), tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="engine"):
        sim.calibrate(_batches((2, 3, 8, 8)), progress=False, engine="ort")
