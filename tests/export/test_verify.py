"""Sim-vs-runtime parity: ONNX Runtime's integer kernels reproduce the simulation of the bundled digits CNN."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

import edgequant as eq
from edgequant.cli.export_commands import export as export_command
from edgequant.cli.export_commands import verify as verify_command
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx, quantize_bias_int32
from edgequant.export.verify import verify
from edgequant.ptq import fold_batch_norms


def _folded_digits() -> torch.nn.Module:
    model = load_pretrained("digits_cnn")
    fold_batch_norms(model, torch.randn(1, 1, 8, 8))
    return model


def test_digits_w8a8_parity_with_integer_kernels(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(_folded_digits(), images[:1], config="per_channel")
    sim.calibrate(images[:128].split(32), progress=False)
    quantize_bias_int32(sim)
    export_onnx(sim, tmp_path, images[:1])
    report = verify(tmp_path, sim, images, progress=False)
    assert report.integer_kernels.get("QLinearConv", 0) == 3  # ORT really computes the convs in int8
    (output,) = report.outputs
    assert report.num_samples == len(images)
    assert output.share_within_1_lsb >= 0.99 and output.top1_agreement >= 0.995
    assert all(t.sqnr_db > 30 for t in report.tensors)
    summary = report.summary()  # the measured figures, not just the labels
    assert f"on {len(images)} samples" in summary and "QLinearConv×3" in summary
    assert f"top-1 agreement {output.top1_agreement:.2%}" in summary
    assert f"{output.share_within_1_lsb:.2%} within 1 LSB" in summary
    # without a sim the reference is the QDQ graph computed in float: the same figures up to float op order
    float_reference = verify(tmp_path, None, images[:64], progress=False)
    assert float_reference.outputs[0].share_within_1_lsb >= 0.99


def test_cli_export_and_verify(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn"), images[:1])
    sim.calibrate(images[:64].split(32), progress=False)
    sim.save(tmp_path / "sim_state.pt")
    torch.save(images[:64], tmp_path / "data.pt")
    runner = CliRunner()
    common = ["--model", "edgequant.demo.digits:load_pretrained", "--sim-state", str(tmp_path / "sim_state.pt"),
              "--input-shape", "1,1,8,8"]
    result = runner.invoke(export_command, [*common, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/model_qdq.onnx").is_file()
    result = runner.invoke(verify_command, [*common, "--data", str(tmp_path / "data.pt"), "--quiet",
                                            "--export-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    strict = runner.invoke(verify_command, [*common, "--data", str(tmp_path / "data.pt"), "--quiet",
                                            "--export-dir", str(tmp_path / "out"), "--max-lsb", "0",
                                            "--min-identical", "100"])
    identical = float(strict.output.split(" identical")[0].rsplit(" ", 1)[-1].rstrip("%"))
    if identical < 100:  # the gate fails exactly when the report says the sim and the runtime differ
        assert strict.exit_code == 1 and "FAILED" in strict.output
    else:
        assert strict.exit_code == 0
    assert "on 64 samples" in result.output and "within 1 LSB" in result.output
