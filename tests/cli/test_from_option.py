"""``--from DIR``: a command starts from what an earlier run recorded, options typed now win, and a folder that is
not a run's output is one line naming --from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from edgequant.cli import main
from edgequant.demo.digits import load_digits_tensors

MODEL = "edgequant.demo.digits:load_pretrained"


def test_recorded_options_are_defaults_and_typed_ones_win(tmp_path: Path) -> None:
    train, _ = load_digits_tensors("train")
    torch.save(train[:96], tmp_path / "digits.pt")
    runner = CliRunner()
    quantized = runner.invoke(main, ["quantize", "--model", MODEL, "--data", str(tmp_path / "digits.pt"),
                                     "--param-bw", "4", "--no-fold-bn", "--quiet", "--out", str(tmp_path / "q")])
    assert quantized.exit_code == 0, quantized.output
    analyzed = runner.invoke(main, ["analyze", "--from", str(tmp_path / "q"), "--output-bw", "16", "--quiet",
                                    "--out", str(tmp_path / "a")])
    assert analyzed.exit_code == 0, analyzed.output
    settings = json.loads((tmp_path / "a" / "analysis.json").read_text())["settings"]
    assert (settings["param_bw"], settings["output_bw"]) == (4, 16)  # recorded, typed
    assert settings["batch_norms_unfolded"]  # --no-fold-bn recorded in input_spec.json


def test_a_folder_without_a_run_is_refused_naming_from(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", "--from", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert "Invalid value for --from" in result.output and "holds no summary.json" in result.output


def test_weight_granularity_reaches_only_the_commands_that_simulate_it(tmp_path: Path) -> None:
    train, _ = load_digits_tensors("train")
    torch.save(train[:64], tmp_path / "digits.pt")
    runner = CliRunner()
    quantized = runner.invoke(main, ["quantize", "--model", MODEL, "--data", str(tmp_path / "digits.pt"),
                                     "--weight-granularity", "per-channel", "--quiet", "--out", str(tmp_path / "q")])
    assert quantized.exit_code == 0, quantized.output
    analyzed = runner.invoke(main, ["analyze", "--from", str(tmp_path / "q"), "--quiet"])
    assert analyzed.exit_code == 2 and "--weight-granularity per-channel, which analyze cannot" in analyzed.output
    searched = runner.invoke(main, ["autoquant", "--weight-granularity", "per-channel", "--quiet"])
    assert searched.exit_code == 2 and "applies to quantize, demo and qat only" in searched.output
