"""The ``edgequant`` command line: bundled demo, the quantize job's outputs, and error reporting."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from edgequant import QuantSim
from edgequant.cli import main
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.ptq import fold_batch_norms


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _percent(output: str, label: str) -> float:
    match = re.search(rf"^{label} accuracy: ([0-9.]+)%$", output, re.MULTILINE)
    assert match, f"no '{label} accuracy' line in:\n{output}"
    return float(match.group(1))


def test_quantize_without_arguments_runs_the_digits_demo(runner: CliRunner, tmp_path) -> None:
    result = runner.invoke(main, ["quantize", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    fp32, w8a8 = _percent(result.output, "FP32"), _percent(result.output, "W8A8")
    assert fp32 > 90.0  # the bundled weights are trained
    assert abs(fp32 - w8a8) <= 3.0
    assert "tensors quantized" in result.output  # the coverage report is printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metric"]["name"] == "accuracy"
    assert summary["metric"]["quantized"] == pytest.approx(w8a8 / 100, abs=1e-4)


def test_quantize_tensor_file_and_factory_writes_loadable_outputs(runner: CliRunner, tmp_path) -> None:
    images, _ = load_digits_tensors("train")
    torch.save(images[:100], tmp_path / "calib.pt")
    (tmp_path / "evaluation.py").write_text(
        "from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors\n"
        "def accuracy(model):\n"
        "    images, labels = load_digits_tensors('test')\n"
        "    return evaluate_accuracy(model, images[:200], labels[:200])\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(main, [
        "quantize", "--model", "edgequant.demo.digits:load_pretrained", "--data", str(tmp_path / "calib.pt"),
        "--batch-size", "32", "--eval", f"{tmp_path / 'evaluation.py'}:accuracy", "--scheme", "percentile",
        "--config", "per_channel", "--param-bw", "4", "--quiet", "--out", str(out),
        "--device", "cpu",  # the bit-exact comparison below runs on the CPU (auto would pick a GPU)
    ])
    assert result.exit_code == 0, result.output
    assert "W4A8 metric:" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert {"model", "calibration_data", "num_calibration_batches", "settings", "quantized", "coverage",
            "timings", "metric"} <= set(summary)
    assert summary["num_calibration_batches"] == 4  # 100 samples in batches of 32
    assert summary["settings"] == {"param_bw": 4, "output_bw": 8, "scheme": "percentile", "config": "per_channel",
                                   "weight_granularity": []}
    assert summary["quantized"]["modules"]["conv1.0"] == "Conv"
    assert {"fp32", "quantized", "delta"} <= set(summary["metric"])
    assert {"build_sim_s", "calibrate_s"} <= set(summary["timings"])
    assert all({"tensor", "quantized", "reason"} <= set(entry) for entry in summary["coverage"])

    encodings = json.loads((out / "quantizer_encodings.json").read_text())
    weight = encodings["conv1.0.param_quantizers.weight"]
    assert weight["bitwidth"] == 4 and weight["axis"] == 0  # per-channel preset, --param-bw 4
    assert weight["format"] == "int4 sym"

    # the saved state reproduces the CLI's simulation bit for bit in a fresh sim
    spec = json.loads((out / "input_spec.json").read_text())
    assert spec["shape"] == [1, 1, 8, 8] and spec["batch_size"] == 32 and spec["fold_bn"] is True
    fresh_model = load_pretrained("digits_cnn")
    fold_batch_norms(fresh_model, images[:1])
    fresh = QuantSim(fresh_model, images[:1], param_bw=4, quant_scheme="percentile", config="per_channel")
    fresh.load(out / "sim_state.pt")
    folded = load_pretrained("digits_cnn")
    assert fold_batch_norms(folded, images[:1])  # quantize folds BatchNorm by default, as deployment does
    reference = QuantSim(folded, images[:1], param_bw=4, quant_scheme="percentile", config="per_channel")
    reference.calibrate(images[:100].split(32), progress=False)
    with torch.no_grad():
        assert torch.equal(fresh.model(images[:50]), reference.model(images[:50]))


def test_bad_model_path_is_one_line_error_without_traceback(runner: CliRunner, tmp_path) -> None:
    torch.save(torch.zeros(4, 1, 8, 8), tmp_path / "calib.pt")
    result = runner.invoke(main, ["quantize", "-m", str(tmp_path / "missing.pt2"), "-d", str(tmp_path / "calib.pt")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "missing.pt2" in lines[0]
    assert "Traceback" not in result.output


def test_debug_flag_lets_the_traceback_through(runner: CliRunner, tmp_path) -> None:
    torch.save(torch.zeros(4, 1, 8, 8), tmp_path / "calib.pt")
    args = ["-m", "no_such_package.models:factory", "-d", str(tmp_path / "calib.pt")]
    quiet = runner.invoke(main, ["quantize", *args])
    assert quiet.exit_code == 1 and "no_such_package" in quiet.output and "Traceback" not in quiet.output
    for command in (["quantize", *args, "--debug"], ["--debug", "quantize", *args]):
        loud = runner.invoke(main, command)
        assert isinstance(loud.exception, ValueError)  # raised, not turned into a one-line message
        assert loud.exc_info[2] is not None  # with its traceback


def test_quantize_needs_data_with_a_model(runner: CliRunner) -> None:
    result = runner.invoke(main, ["quantize", "--model", "edgequant.demo.digits:load_pretrained"])
    assert result.exit_code == 2
    assert "--model needs --data" in result.output


def test_the_demo_takes_the_shared_data_options(runner: CliRunner, tmp_path) -> None:
    result = runner.invoke(main, ["quantize", "--batch-size", "16", "--num-batches", "3", "--quiet",
                                  "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_calibration_batches"] == 3 and summary["input_spec"]["batch_size"] == 16
    assert summary["model"] == "edgequant.demo.digits:load_pretrained (bundled digits_cnn)"
