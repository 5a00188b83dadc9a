"""The whole command-line chain on the pretrained digits CNN (BatchNorms included) from a folder of 16-bit PNGs,
as a user runs it: quantize -> analyze -> autoquant -> export of AutoQuant's best -> verify -> qat -> export ->
verify, each step reading what the previous one recorded, no option typed twice."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgequant.cli import main
from edgequant.cli.inputs import ImageFolderBatches
from edgequant.demo.digits import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

MODEL = "edgequant.demo.digits:load_pretrained"
PIXEL_MAX = 16  # sklearn's digits are 0..16
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision's, per image


POINTERS = {"--from", "--sim-state", "--out", "--quiet"}
"""Options naming the previous step's output folder or this step's, and verbosity: expected in every step."""


def _ok(*args: str | Path, typed: Counter | None = None) -> str:
    """Run one command; count the options it was given (with their values) in ``typed``."""
    args = [str(arg) for arg in args]
    if typed is not None:
        typed.update((option, value) for option, value in zip(args, [*args[1:], ""], strict=True)
                     if option.startswith("--") and option not in POINTERS)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def _metric(output: str, label: str) -> float:
    match = re.search(rf"^{label} metric: ([0-9.]+)$", output, re.MULTILINE)
    assert match, output
    return float(match.group(1))


def test_png_folder_to_a_verified_export(tmp_path: Path) -> None:
    train, _ = load_digits_tensors("train")
    pixels = (train[:128, 0] * DIGITS_STD + DIGITS_MEAN).round().clamp(0, PIXEL_MAX)
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(pixels):  # 16-bit PNGs: 0..16 spread over 0..65535
        levels = (image.numpy() * (65535 / PIXEL_MAX)).round().astype(np.uint16)
        Image.fromarray(levels).save(images / f"{index:03d}.png")
    (tmp_path / "metric.py").write_text(
        "from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors\n"
        "def accuracy(model):\n"
        "    return evaluate_accuracy(model, *load_digits_tensors('test'))\n"
    )
    # the training normalisation, (pixel - mean) / std, for pixels read into [0, 1]
    data = ["--data", images, "--input-shape", "1,1,8,8", "--mean", str(DIGITS_MEAN / PIXEL_MAX),
            "--std", str(DIGITS_STD / PIXEL_MAX)]
    read = torch.cat(list(ImageFolderBatches(images, 1, (8, 8), 64, (DIGITS_MEAN / PIXEL_MAX,),
                                             (DIGITS_STD / PIXEL_MAX,))))
    step = 1 / 65535 / (DIGITS_STD / PIXEL_MAX)  # one 16-bit level, normalised
    torch.testing.assert_close(read, (pixels.unsqueeze(1) - DIGITS_MEAN) / DIGITS_STD, rtol=0, atol=step / 2 + 1e-6)

    typed: Counter = Counter()
    out = tmp_path / "out"
    quantized = _ok("quantize", "--model", MODEL, *data, "--eval", f"{tmp_path / 'metric.py'}:accuracy",
                    "--param-bw", "4", "--quiet", "--device", "cpu", "--out", out, typed=typed)
    assert "folded 3 BatchNorm layers" in quantized
    fp32, w4a8 = _metric(quantized, "FP32"), _metric(quantized, "W4A8")
    assert fp32 > 0.9 and fp32 - w4a8 > 0.01  # calibrated on correctly scaled images; W4 loses a little
    spec = json.loads((out / "input_spec.json").read_text())
    assert spec["mean"] == [DIGITS_MEAN / PIXEL_MAX] and spec["fold_bn"] is True

    _ok("analyze", "--from", out, "--quiet", "--out", tmp_path / "analysis", typed=typed)
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["settings"]["batch_norms_unfolded"] == []
    assert analysis["settings"]["param_bw"] == 4
    assert "BatchNormalization" not in {layer["op_type"] for layer in analysis["layers"]}

    searched = _ok("autoquant", "--from", out, "--scheme", "minmax", "--adaround-iterations", "20", "--quiet",
                   "--out", tmp_path / "autoquant", typed=typed)
    best = tmp_path / "autoquant" / "best"
    summary = json.loads((best / "summary.json").read_text())
    assert f"sim state: {best / 'sim_state.pt'}" in searched and summary["settings"]["param_bw"] == 4
    assert summary["autoquant"]["best_metric"] > w4a8  # a step past plain calibration won
    log = json.loads((Path(summary["autoquant"]["candidate"]).parent / "autoquant_log.json").read_text())
    assert summary["cross_layer_equalized"] == (log["steps"][summary["autoquant"]["best_step"]]["stage"] == "cle")

    _ok("export", "--sim-state", best / "sim_state.pt", "--quiet", typed=typed)
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(best / "model_qdq.onnx").graph.node}
    verified = _ok("verify", "--sim-state", best / "sim_state.pt", "--quiet", typed=typed)
    assert "on 128 samples" in verified  # data as recorded; shape, mean and std from input_spec.json

    trained = _ok("qat", "--from", best, "--quiet", "--out", tmp_path / "qat", typed=typed)
    qat_summary = json.loads((tmp_path / "qat" / "summary.json").read_text())
    assert qat_summary["input_spec"]["mean"] == [DIGITS_MEAN / PIXEL_MAX] and qat_summary["settings"]["param_bw"] == 4
    assert _metric_after(trained, "QAT") > 0.9
    _ok("export", "--sim-state", tmp_path / "qat" / "sim_state.pt", "--quiet", typed=typed)
    verified = _ok("verify", "--sim-state", tmp_path / "qat" / "sim_state.pt", "--quiet", typed=typed)
    assert "on 128 samples" in verified
    assert not {option for (option, _), count in typed.items() if count > 1}, typed  # nothing typed twice


def _metric_after(output: str, label: str) -> float:
    match = re.search(rf"{label} \([a-z_]+\) ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))
