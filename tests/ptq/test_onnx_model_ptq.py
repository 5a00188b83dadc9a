"""Post-training techniques and mixed precision on a sim of an ONNX file, exported back into that file's graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnx_models import branching_cnn, conv_batch_norm, save

from edgequant import QuantSim, load_onnx
from edgequant.mixed_precision import choose_mixed_precision
from edgequant.onnx.calibration import onnxruntime_calibration_plan
from edgequant.ptq import adaround, equalize, fold_batch_norms


def _ort_equals_emulation(sim: QuantSim, qdq: Path, x: torch.Tensor) -> None:
    session = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
    sim.emulate("onnxruntime")
    try:
        with torch.no_grad():
            np.testing.assert_array_equal(session.run(None, {"image": x.numpy()})[0], sim.model(x).numpy())
    finally:
        sim.emulate(None)


def test_cross_layer_equalization_and_adaround_write_their_weights_into_the_graph(tmp_path: Path) -> None:
    path = save(conv_batch_norm(), tmp_path / "model.onnx")
    data = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = load_onnx(path)
    fold_batch_norms(model, data[:1])
    report = equalize(model, data[:1])
    assert report.pairs  # conv1 -> relu -> conv2 is a pair
    sim = QuantSim(model, data[:1], config="per_channel")
    sim.compute_encodings(lambda m: m(data))
    adaround(sim, [data[:32], data[32:]], num_iterations=20, progress=False)
    result = sim.export(tmp_path / "out")
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(result.float_model).graph.initializer}
    np.testing.assert_array_equal(written["conv1.weight"], sim.model.get_submodule("conv1").weight.detach().numpy())
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    assert not np.array_equal(written["conv2.weight"], original["conv2.weight"])  # equalized
    _ort_equals_emulation(sim, result.qdq_model, data)


def test_a_model_folded_in_eval_mode_stays_in_eval_mode_and_calibrates_in_onnxruntime(tmp_path: Path) -> None:
    data = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = load_onnx(save(conv_batch_norm(), tmp_path / "model.onnx"))
    assert len(fold_batch_norms(model, data[:1])) == 1
    assert not any(module.training for module in model.modules())
    plan = onnxruntime_calibration_plan(QuantSim(model, data[:1], config="per_channel"))
    assert plan.served and not plan.torch_pass  # a training-mode Identity sent every quantizer to the torch pass


def test_mixed_precision_on_an_onnx_model_exports_its_choice(tmp_path: Path) -> None:
    model = branching_cnn()
    model.opset_import[0].version = 21  # 16-bit activations need Q/DQ of opset 21
    path = save(model, tmp_path / "model.onnx")
    data = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    float_model = load_onnx(path)
    with torch.no_grad():
        reference = float_model(data)

    def fidelity(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return -float((model(data) - reference).pow(2).mean())

    sim = QuantSim.from_onnx(path, config="per_channel", param_bw=4, output_bw=8)
    sim.compute_encodings(lambda m: m(data))
    result = choose_mixed_precision(sim, [data[:32], data[32:]], fidelity, [(4, 8), (8, 16)],
                                    allowed_accuracy_drop=abs(fidelity(sim.model)) / 4, progress=False)
    assert result.choice and result.met_target
    export = sim.export(tmp_path / "out")
    assert {q.bitwidth for q in sim.quantizers().values() if q.enabled} & {8, 16}
    names = {n.name for n in onnx.load(export.qdq_model).graph.node}
    assert {"conv_a", "conv_b", "add", "concat", "head"} <= names
