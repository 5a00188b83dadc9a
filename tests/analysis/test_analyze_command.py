"""``edgequant analyze``: the figures it writes are the API's, and bad input is one line."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from edgequant.analysis import QuantAnalyzer
from edgequant.cli.main import main
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.ptq import fold_batch_norms


def test_analyze_tensor_file_writes_the_api_figures(tmp_path) -> None:
    images, _ = load_digits_tensors("train")
    torch.save(images[:96], tmp_path / "calib.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "analyze", "--model", "edgequant.demo.digits:load_pretrained", "--data", str(tmp_path / "calib.pt"),
        "--batch-size", "32", "--num-batches", "2", "--param-bw", "4", "--config", "per_channel", "--quiet",
        "--out", str(out), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "most sensitive" in result.output and "report.html" in result.output
    written = json.loads((out / "analysis.json").read_text())
    assert written["num_batches"] == 2 and written["settings"]["config"] == "per_channel"

    model = load_pretrained("digits_cnn")  # the command folds BatchNorms first, as deployment does
    assert len(fold_batch_norms(model, images[:1])) == 3
    api = QuantAnalyzer(model, images[:32], list(images[:96].split(32)), param_bw=4,
                        config="per_channel", progress=False).analyze(tmp_path / "api", num_batches=2)
    assert written["quantized_metric"] == api.quantized_metric
    assert [layer["all_but_this_quantized"] for layer in written["layers"]] == [
        layer.all_but_this_quantized for layer in api.layers]
    assert written["layers"][0]["encodings"]["conv1.0.param_quantizers.weight"]["axis"] == 0


def test_analyze_needs_data_with_a_model(tmp_path) -> None:
    result = CliRunner().invoke(main, ["analyze", "--model", "edgequant.demo.digits:load_pretrained",
                                       "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--model needs --data" in result.output
    result = CliRunner().invoke(main, ["analyze", "--model", "no_such_module:factory", "--data",
                                       str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.output.startswith("Error:")
