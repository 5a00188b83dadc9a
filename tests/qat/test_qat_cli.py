"""`edgequant qat` end to end on the bundled digits CNN and on a user's model + tensor file."""

import json

import torch
from click.testing import CliRunner

from edgequant.cli.main import main
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.ptq import fold_batch_norms
from edgequant.sim import QuantSim
from edgequant.sim.modes import training_mode


def test_qat_command_demo_writes_state_export_and_summary(tmp_path, monkeypatch):
    images, _ = load_digits_tensors("train")
    trained = {}
    save = QuantSim.save

    def save_and_record(sim, path):  # what the command's trained sim computes, just before it is written
        with torch.no_grad(), training_mode(sim.model, False):
            trained["outputs"] = sim.model(images[:50]).clone()
        trained["grids"] = {n: (q.scale.detach().clone(), q.offset.detach().clone())
                            for n, q in sim.quantizers().items() if q.enabled}
        save(sim, path)

    monkeypatch.setattr(QuantSim, "save", save_and_record)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["qat", "--param-bw", "4", "--output-bw", "8", "--config", "per_channel",
                                       "--epochs", "1", "--lr", "1e-4", "--mode", "regular", "--out", str(out),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["mode"] == "regular" and summary["steps"] == 22
    assert set(summary["metric"]) == {"fp32", "ptq", "qat"} and summary["metric"]["qat"] > 0.9
    assert 0 < summary["start_metric"] <= summary["best_metric"]  # the prepared start competes for best
    assert summary["kept_start"] == ("did not improve --eval" in result.output)
    assert len(summary["quantizers"]["recomputed_each_step"]) == 4
    assert summary["batch_norms_folded"] == ["conv1.1", "conv2.1", "conv3.1"]
    assert (out / "export" / "model_qdq.onnx").is_file() and (out / "export" / "model.encodings").is_file()
    assert "QAT (regular)" in result.output
    model = load_pretrained("digits_cnn")
    fold_batch_norms(model, images[:1])
    sim = QuantSim(model, images[:1], param_bw=4, output_bw=8, config="per_channel")
    sim.load(out / "sim_state.pt")  # the trained state loads into a sim of the BN-folded model
    assert set(trained["grids"]) == {n for n, q in sim.quantizers().items() if q.enabled}
    for name, (scale, offset) in trained["grids"].items():
        quantizer = sim.quantizer(name)
        assert torch.equal(quantizer.scale, scale) and torch.equal(quantizer.offset, offset), name
    with torch.no_grad():
        reloaded = sim.model(images[:50])
        assert torch.equal(reloaded, trained["outputs"])  # bit for bit what the command's trained sim computed
        untrained = QuantSim(model, images[:1], param_bw=4, output_bw=8, config="per_channel")
        untrained.calibrate([images[:256]], progress=False)
        assert not torch.equal(untrained.model(images[:50]), reloaded)  # the file carries the trained weights


def test_qat_command_with_model_and_tensor_file(tmp_path):
    images, _ = load_digits_tensors("train")
    torch.save(images[:128], tmp_path / "data.pt")
    result = CliRunner().invoke(main, ["qat", "-m", "edgequant.demo.digits:DigitsCNN", "-d", str(tmp_path / "data.pt"),
                                       "--batch-size", "32", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["steps"] == 4
    missing = CliRunner().invoke(main, ["qat", "-m", "edgequant.demo.digits:DigitsCNN"])
    assert missing.exit_code != 0 and "--model needs --data" in missing.output


def test_qat_trains_on_num_batches_and_verify_finds_its_export(tmp_path):
    images, _ = load_digits_tensors("train")
    torch.save(images[:128], tmp_path / "data.pt")
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["qat", "-m", "edgequant.demo.digits:DigitsCNN", "-d", str(tmp_path / "data.pt"),
                                       "--batch-size", "32", "--num-batches", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # one epoch of the 2 batches asked for
    verified = CliRunner().invoke(main, ["verify", "--sim-state", str(out / "sim_state.pt"), "--quiet"])
    assert verified.exit_code == 0, verified.output  # the export qat wrote to OUT/export, data as recorded
    assert "on 128 samples" in verified.output
