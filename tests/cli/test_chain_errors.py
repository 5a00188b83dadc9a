"""The command-line chain a new user runs (quantize / analyze / autoquant -> export -> verify) never silently does the
wrong thing: BatchNorms are folded as deployment folds them, every data option takes effect or is refused, images
are scaled by their own type's range, and each error is one line naming the user's own option or file."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from edgequant.cli import main
from edgequant.cli.inputs import ImageFolderBatches
from edgequant.demo.digits import load_digits_tensors, load_pretrained

DIGITS = "edgequant.demo.digits:load_pretrained"

NETS = '''
import torch
from torch import nn
from edgequant.demo.digits import load_digits_tensors

IMAGES, _ = load_digits_tensors("test")


def bn_net():
    """Conv -> BatchNorm -> ReLU -> Linear on the 8x8 digits, with BN statistics that change the output."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def wide_net():
    """Another model, on 16x16 inputs."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(768, 10)).eval()


REFERENCE = bn_net()(IMAGES[:64]).detach()


def fidelity(model):
    """Higher is better: minus the mean squared error to the float bn_net's outputs."""
    with torch.no_grad():
        return -float(((model(IMAGES[:64]) - REFERENCE) ** 2).mean())


def failing_eval(model):
    raise KeyError("labels")


def sixteen_batches():
    return list(IMAGES[:64].split(16))
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chain")
    (folder / "nets.py").write_text(NETS)
    images, labels = load_digits_tensors("train")
    x = images[:64]
    torch.save(x, folder / "calib.pt")
    torch.save((x * 255).round().clamp(0, 255).to(torch.uint8), folder / "uint8.pt")
    torch.save(x.double(), folder / "float64.pt")
    torch.save(x.permute(0, 2, 3, 1).contiguous(), folder / "nhwc.pt")
    torch.save((labels[:64], x), folder / "labels_first.pt")
    torch.save(torch.rand(64, 1, 16, 16), folder / "wide.pt")
    torch.save(load_pretrained("digits_cnn"), folder / "whole_model.pt")
    return {p.stem: p for p in folder.iterdir()}


def _invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def _ok(*args: str | Path) -> str:
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


# -- analyze and autoquant fold BatchNorm by default, as quantize does -----------------------------------------
def _analysis(files: dict[str, Path], out: Path, *options: str) -> dict:
    _ok("analyze", "--model", f"{files['nets']}:bn_net", "--data", files["calib"], "--quiet", "--device", "cpu",
        "--out", out, *options)
    return json.loads((out / "analysis.json").read_text())


def test_analyze_folds_batch_norms_unless_told_not_to(files: dict[str, Path], tmp_path: Path) -> None:
    folded = _analysis(files, tmp_path / "folded")
    assert folded["settings"]["batch_norms_unfolded"] == []
    assert [layer["op_type"] for layer in folded["layers"]] == ["Conv", "Relu", "Gemm"]
    assert "1" not in folded["ranking"]  # the BN, as nn.Sequential names it

    kept = _analysis(files, tmp_path / "kept", "--no-fold-bn")
    assert kept["settings"]["batch_norms_unfolded"] == ["1"]
    assert "BatchNormalization" in [layer["op_type"] for layer in kept["layers"]]
    assert "1 BatchNorm layers (1) are simulated on their own" in (tmp_path / "kept" / "report.html").read_text()


def test_analyze_advice_checks_the_settings_it_ran_with(files: dict[str, Path], tmp_path: Path) -> None:
    narrow_weights = ("--param-bw", "2", "--output-bw", "16")  # the weights dominate the loss
    _analysis(files, tmp_path / "per_tensor", *narrow_weights)
    _analysis(files, tmp_path / "per_channel", *narrow_weights, "--config", "per_channel")
    per_tensor, per_channel = (html.unescape((tmp_path / run / "report.html").read_text())
                               for run in ("per_tensor", "per_channel"))
    assert "Weights dominate" in per_tensor and "Weights dominate" in per_channel
    assert "try config='per_channel' (some weights have one scale for all their channels)" in per_tensor
    assert "config='per_channel'" not in per_channel and "cross-layer equalization" not in per_channel
    assert "try param_bw above 2 for the layers below or AdaRound." in per_channel


def _autoquant(files: dict[str, Path], out: Path, *options: str) -> tuple[str, dict]:
    output = _ok("autoquant", "--model", f"{files['nets']}:bn_net", "--data", files["calib"], "--eval",
                 f"{files['nets']}:fidelity", "--allowed-drop", "0", "--scheme", "minmax", "--adaround-iterations",
                 "1", "--quiet", "--device", "cpu", "--out", out, *options)
    (log,) = out.rglob("autoquant_log.json")
    return output, json.loads(log.read_text())


def test_autoquant_folds_batch_norms_unless_told_not_to(files: dict[str, Path], tmp_path: Path) -> None:
    output, log = _autoquant(files, tmp_path / "folded")
    assert "folded 1 BatchNorm layers (--no-fold-bn keeps them)" in output
    assert log["settings"]["fold_bn"] is True
    assert log["steps"]["fp32"]["layers"] == ["1 -> 0"] and "bn_fold" not in log["steps"]
    assert "cle" in log["steps"]  # the ladder went on past the calibration, from the folded model
    sensitivity = next(value for key, value in log.items() if key.startswith("sensitivity:"))
    assert [name for name, _ in sensitivity] and "1" not in [name for name, _ in sensitivity]

    output, log = _autoquant(files, tmp_path / "kept", "--no-fold-bn")
    assert "folded" not in output and log["settings"]["fold_bn"] is False
    assert log["steps"]["fp32"]["layers"] == [] and log["steps"]["bn_fold"]["layers"] == ["1 -> 0"]


# -- data options take effect as recorded; images are scaled by their own type's range ---------------------------
def test_a_tensor_file_records_the_shape_it_has(files: dict[str, Path], tmp_path: Path) -> None:
    _ok("quantize", "--model", DIGITS, "--data", files["calib"], "--input-shape", "1,1,8,8", "--quiet",
        "--out", tmp_path)
    spec = json.loads((tmp_path / "input_spec.json").read_text())
    assert (spec["shape"], spec["mean"], spec["std"]) == ([1, 1, 8, 8], [0.0], [1.0])


@pytest.mark.parametrize(("dtype", "value", "expected"), [
    (np.uint8, 255, 1.0), (np.uint16, 65535, 1.0), (np.uint16, 32768, 32768 / 65535), (np.uint16, 255, 255 / 65535),
])
def test_images_are_scaled_by_their_own_types_maximum(dtype: type, value: int, expected: float,
                                                      tmp_path: Path) -> None:
    Image.fromarray(np.full((6, 6), value, dtype=dtype)).save(tmp_path / "flat.png")
    (image,) = list(ImageFolderBatches(tmp_path, channels=1, size=(6, 6), batch_size=1))
    torch.testing.assert_close(image, torch.full((1, 1, 6, 6), expected), rtol=0, atol=1e-6)


# -- every error is one line naming the user's own option or file, what was expected and what to do ----------
@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> dict[str, Path]:
    """Quantized and exported output folders of three models: the digits CNN, bn_net and the 16x16 wide_net."""
    folder = files["calib"].parent
    made = {}
    for key, model, data in (("digits", DIGITS, files["calib"]), ("bn", f"{files['nets']}:bn_net", files["calib"]),
                             ("wide", f"{files['nets']}:wide_net", files["wide"])):
        out = folder / f"out_{key}"
        _ok("quantize", "--model", model, "--data", data, "--quiet", "--device", "cpu", "--out", out)
        _ok("export", "--model", model, "--sim-state", out / "sim_state.pt", "--quiet")
        made[key] = out
    return made


ERRORS = {
    "uint8 data": (["quantize", "--model", DIGITS, "--data", "{uint8}"],
                   r"--model \S+ does not run on the samples of --data \S+uint8\.pt \(shape \[1, 1, 8, 8\], uint8\): "
                   r"RuntimeError: .*; the samples are uint8: save them as float32, scaled and normalised as in "
                   r"training \(8-bit images: x\.float\(\) / 255 first\)"),
    "float64 data": (["quantize", "--model", DIGITS, "--data", "{float64}"],
                     r"--data \S+float64\.pt \(shape \[1, 1, 8, 8\], float64\): .*the samples are float64, the "
                     r"model's weights float32: save x\.to\(torch\.float32\)"),
    "NHWC data": (["quantize", "--model", DIGITS, "--data", "{nhwc}"],
                  r"--data \S+nhwc\.pt \(shape \[1, 8, 8, 1\], float32\): .*the samples look channels-last "
                  r"\(N, H, W, C\): save x\.permute\(0, 3, 1, 2\)"),
    "(labels, images) tuple": (["quantize", "--model", DIGITS, "--data", "{labels_first}"],
                               r"--data \S+labels_first\.pt holds a tuple whose first item \(shape \(64,\), int64\) "
                               r"looks like labels and a later one \(shape \(64, 1, 8, 8\)\) like inputs; the first "
                               r"item is what the model receives: save \(inputs, labels\)"),
    "raising --eval": (["quantize", "--model", DIGITS, "--data", "{calib}", "--eval", "{nets}:failing_eval"],
                       r"--eval \S+nets\.py:failing_eval raised KeyError: 'labels'; it is called as "
                       r"function\(model\) -> float"),
    "another model's sim state": (["export", "--model", DIGITS, "--sim-state", "{out_bn}/sim_state.pt"],
                                  r"--sim-state \S+out_bn/sim_state\.pt was saved from a different model than --model "
                                  r"edgequant\.demo\.digits:load_pretrained \(summary\.json beside it records --model "
                                  r"\S+nets\.py:bn_net\); pass the --model that 'edgequant quantize' ran with "
                                  r"\(quantizers missing in the file"),
    "another model's sim state, another input shape": (
        ["export", "--model", "{nets}:wide_net", "--sim-state", "{out_digits}/sim_state.pt"],
        r"--sim-state \S+out_digits/sim_state\.pt was saved from a different model than --model \S+:wide_net "
        r"\(summary\.json beside it records --model edgequant\.demo\.digits:load_pretrained\); .*: the model does not "
        r"run at the input shape recorded with it, \[1, 1, 8, 8\]"),
    "whole model as --sim-state": (["export", "--model", DIGITS, "--sim-state", "{whole_model}",
                                    "--input-shape", "1,1,8,8"],
                                   r"whole_model\.pt holds a whole model saved with torch\.save\(model\) "
                                   r"\(edgequant\.demo\.digits\.DigitsCNN\), not a sim state; pass the sim_state\.pt "
                                   r"that 'edgequant quantize' wrote"),
    "verify against another model's export": (
        ["verify", "--model", DIGITS, "--sim-state", "{out_digits}/sim_state.pt", "--export-dir", "{out_bn}",
         "--data", "{calib}", "--quiet"],
        r"--export-dir \S+out_bn \(model_qdq\.onnx\) was exported from a different model than --model/--sim-state: "
        r"\d+ of its \d+ quantizers are not in this sim"),
    "verify against an export of another input size": (
        ["verify", "--export-dir", "{out_wide}", "--data", "{calib}", "--quiet"],
        r"--export-dir \S+out_wide \(model_qdq\.onnx\) takes input 'input' of shape \[None, 1, 16, 16\], but --data "
        r"\S+calib\.pt gives samples of shape \[1, 8, 8\]"),
    # data options a source cannot take are refused, never recorded and ignored
    "--input-shape on a tensor file": (["quantize", "--model", DIGITS, "--data", "{calib}", "--input-shape",
                                        "1,1,16,16"],
                                       r"--data \S+calib\.pt holds samples of shape \(1, 8, 8\) but --input-shape "
                                       r"1,1,16,16 says \(1, 16, 16\); only image folders are resized"),
    "--mean/--std on a tensor file": (["quantize", "--model", DIGITS, "--data", "{calib}", "--mean", "0.5",
                                       "--std", "0.2"],
                                      r"--mean and --std do not apply to --data \S+calib\.pt: a tensor file is used "
                                      r"as saved \(save the tensors preprocessed\); leave them out"),
    "verify on data of another shape than quantize's": (
        ["verify", "--model", DIGITS, "--sim-state", "{out_digits}/sim_state.pt", "--data", "{wide}", "--quiet"],
        r"--data \S+wide\.pt holds samples of shape \(1, 16, 16\) but the input shape recorded in input_spec\.json "
        r"says \(1, 8, 8\); only image folders are resized: pass data of the shape the model was quantized at"),
    "--batch-size on a function's batches": (["quantize", "--model", DIGITS, "--data", "{nets}:sixteen_batches",
                                              "--batch-size", "8"],
                                             r"--batch-size does not apply to --data \S+:sixteen_batches: its batches "
                                             r"are used as the function yields them"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_each_error_is_one_line_naming_the_users_option(case: str, files: dict[str, Path],
                                                       runs: dict[str, Path]) -> None:
    args, expected = ERRORS[case]
    names = {**files, **{f"out_{key}": path for key, path in runs.items()}}
    result = _invoke(*(arg.format(**names) for arg in args))
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and "dummy_input" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert re.search(expected, lines[0]), lines[0]


def test_the_matching_export_still_verifies(files: dict[str, Path], runs: dict[str, Path]) -> None:
    output = _ok("verify", "--model", DIGITS, "--sim-state", runs["digits"] / "sim_state.pt", "--data",
                 files["calib"], "--quiet")
    assert "ONNX Runtime" in output
