"""The whole command-line chain on the pretrained digits CNN (BatchNorms included) from a folder of 16-bit PNGs,
as a user runs it: quantize -> analyze -> export -> verify, each step reading what the previous one recorded."""

from __future__ import annotations

import json
import re
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


def _ok(*args: str | Path) -> str:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
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

    out = tmp_path / "out"
    quantized = _ok("quantize", "--model", MODEL, *data, "--eval", f"{tmp_path / 'metric.py'}:accuracy", "--quiet",
                    "--device", "cpu", "--out", out)
    assert "folded 3 BatchNorm layers" in quantized
    fp32, w8a8 = _metric(quantized, "FP32"), _metric(quantized, "W8A8")
    assert fp32 > 0.9 and abs(fp32 - w8a8) <= 0.02  # calibrated on the ranges of correctly scaled images
    spec = json.loads((out / "input_spec.json").read_text())
    assert spec["mean"] == [DIGITS_MEAN / PIXEL_MAX] and spec["fold_bn"] is True

    _ok("analyze", "--model", MODEL, *data, "--quiet", "--device", "cpu", "--out", tmp_path / "analysis")
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["settings"]["batch_norms_unfolded"] == []
    assert "BatchNormalization" not in {layer["op_type"] for layer in analysis["layers"]}

    _ok("export", "--model", MODEL, "--sim-state", out / "sim_state.pt", "--quiet")
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(out / "model_qdq.onnx").graph.node}
    verified = _ok("verify", "--model", MODEL, "--sim-state", out / "sim_state.pt", "--data", images, "--quiet",
                   "--max-lsb", "1")  # shape, mean and std from input_spec.json
    assert "on 128 samples" in verified
