"""``--model model.onnx`` on the command line: quantize, export into the user's graph, verify in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx_models import conv_batch_norm, save

from edgequant.cli import main
from edgequant.onnx import OnnxCalibrationReport, calibrate_in_onnxruntime
from edgequant.sim.services import register_service


def _ok(*args: str | Path) -> str:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_onnx_file_through_quantize_export_and_verify(tmp_path: Path) -> None:
    model = save(conv_batch_norm(), tmp_path / "user_model.onnx")
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    reports: list[OnnxCalibrationReport] = []
    register_service("calibrate_in_onnxruntime", lambda *args: reports.append(calibrate_in_onnxruntime(*args)))
    try:
        quantized = _ok("quantize", "--model", model, "--data", data, "--quiet", "--device", "cpu", "--out", out)
    finally:
        register_service("calibrate_in_onnxruntime", calibrate_in_onnxruntime)
    assert "folded 1 BatchNorm" in quantized
    assert reports and reports[0].served and not reports[0].torch_pass  # the folded sim calibrates in ORT
    _ok("export", "--model", model, "--sim-state", out / "sim_state.pt", "--quiet")
    qdq = onnx.load(out / "model_qdq.onnx")
    assert {n.name: n.op_type for n in qdq.graph.node if "Linear" not in n.op_type} == {
        "conv1": "Conv", "relu": "Relu", "conv2": "Conv"}  # the user's nodes, the folded BatchNorm gone
    assert [i.name for i in qdq.graph.input] == ["image"] and [o.name for o in qdq.graph.output] == ["output"]
    verified = _ok("verify", "--model", model, "--sim-state", out / "sim_state.pt", "--data", data, "--quiet",
                   "--max-lsb", "1")
    assert "on 64 samples" in verified


def test_a_broken_onnx_file_is_one_line_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"definitely not protobuf" * 4)
    data = tmp_path / "images.npy"
    np.save(data, np.zeros((4, 3, 8, 8), np.float32))
    result = CliRunner().invoke(main, ["quantize", "--model", str(broken), "--data", str(data), "--quiet"])
    assert result.exit_code != 0
    assert "is not an ONNX model" in result.output and "Traceback" not in result.output
