"""`edgequant qat` end to end on the bundled digits CNN and on a user's model + tensor file."""

import json

import torch
from click.testing import CliRunner

from edgequant.cli.main import main
from edgequant.demo.digits import load_digits_tensors
from edgequant.sim import QuantSim


def test_qat_command_demo_writes_state_export_and_summary(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["qat", "--param-bw", "4", "--output-bw", "8", "--config", "per_channel",
                                       "--epochs", "1", "--lr", "1e-4", "--mode", "regular", "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["mode"] == "regular" and summary["steps"] == 22
    assert set(summary["metric"]) == {"fp32", "ptq", "qat"} and summary["metric"]["qat"] > 0.9
    assert len(summary["quantizers"]["recomputed_each_step"]) == 4
    assert summary["batch_norms_folded"] == ["conv1.1", "conv2.1", "conv3.1"]
    assert (out / "export" / "model_qdq.onnx").is_file() and (out / "export" / "model.encodings").is_file()
    assert "QAT (regular)" in result.output
    images, _ = load_digits_tensors("train")
    from edgequant.demo.digits import load_pretrained
    from edgequant.ptq import fold_batch_norms

    model = load_pretrained("digits_cnn")
    fold_batch_norms(model, images[:1])
    sim = QuantSim(model, images[:1], param_bw=4, output_bw=8, config="per_channel")
    sim.load(out / "sim_state.pt")  # the trained state loads into a sim of the BN-folded model
    assert torch.isfinite(sim.model(images[:4])).all()


def test_qat_command_with_model_and_tensor_file(tmp_path):
    images, _ = load_digits_tensors("train")
    torch.save(images[:128], tmp_path / "data.pt")
    result = CliRunner().invoke(main, ["qat", "-m", "edgequant.demo.digits:DigitsCNN", "-d", str(tmp_path / "data.pt"),
                                       "--batch-size", "32", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["steps"] == 4
    missing = CliRunner().invoke(main, ["qat", "-m", "edgequant.demo.digits:DigitsCNN"])
    assert missing.exit_code != 0 and "--model needs --data" in missing.output
