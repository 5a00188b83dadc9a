"""The command-line chain a new user runs (quantize / analyze / autoquant -> export -> verify) never silently does the
wrong thing: BatchNorms are folded as deployment folds them."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from edgequant.cli import main
from edgequant.demo.digits import load_digits_tensors

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


REFERENCE = bn_net()(IMAGES[:64]).detach()


def fidelity(model):
    """Higher is better: minus the mean squared error to the float bn_net's outputs."""
    with torch.no_grad():
        return -float(((model(IMAGES[:64]) - REFERENCE) ** 2).mean())
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chain")
    (folder / "nets.py").write_text(NETS)
    images, _ = load_digits_tensors("train")
    torch.save(images[:64], folder / "calib.pt")
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
