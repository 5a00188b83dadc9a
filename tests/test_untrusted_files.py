"""Files crafted to run code when unpickled, passed through every public way edgequant reads a file a user hands
it: nothing runs, and the user gets one line naming the file.

The payload writes a marker file when unpickled; `test_the_payload_runs_under_unrestricted_unpickling` shows it
does run under ``torch.load(weights_only=False)``, so the other tests could fail.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgequant.cli import main
from edgequant.demo.digits import load_pretrained
from edgequant.qat import finetune, prepare_qat
from edgequant.sim import QuantSim
from edgequant.sim.state_file import SIM_STATE_FORMAT, SIM_STATE_VERSION, UnsafeFileError, read_sim_state

MODEL = "edgequant.demo.digits:load_pretrained"


class _Payload:
    """Unpickling this calls ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "payload_ran"
    yield path
    assert not path.exists(), "the crafted file's code ran"


def _crafted_sim_state(path: Path, marker: Path) -> Path:
    """Looks like a sim state (format and version keys) but its settings are the payload."""
    torch.save({"format": SIM_STATE_FORMAT, "version": SIM_STATE_VERSION, "settings": _Payload(marker),
                "state_dict": {}, "checksum": ""}, path)
    return path


def test_the_payload_runs_under_unrestricted_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _crafted_sim_state(tmp_path / "state.pt", marker)
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert marker.read_text() == "ran"


def test_quantsim_load_and_read_sim_state(tmp_path: Path, marker: Path, digits_train: torch.Tensor) -> None:
    path = _crafted_sim_state(tmp_path / "sim_state.pt", marker)
    sim = QuantSim(load_pretrained("digits_cnn"), digits_train[:1])
    for load in (sim.load, read_sim_state):
        with pytest.raises(UnsafeFileError, match=r"sim_state\.pt is refused: it holds Python objects \(exec\)"):
            load(path)


@pytest.mark.parametrize("command", ["export", "verify"])
def test_cli_sim_state(command: str, tmp_path: Path, marker: Path) -> None:
    path = _crafted_sim_state(tmp_path / "sim_state.pt", marker)
    result = CliRunner().invoke(main, [command, "--model", MODEL, "--sim-state", str(path),
                                       "--input-shape", "1,1,8,8"])
    assert result.exit_code == 2, result.output
    assert "sim_state.pt is refused" in result.output and "Traceback" not in result.output


@pytest.fixture
def qat_run(tmp_path: Path, digits_train: torch.Tensor) -> tuple[QuantSim, Path, dict]:
    """A finished QAT run with a checkpoint and a best state, and the options to resume it."""
    torch.manual_seed(0)
    sim = QuantSim(load_pretrained("digits_cnn"), digits_train[:1], param_bw=4, output_bw=8)
    sim.calibrate(digits_train[:128].split(64), progress=False)
    prepare_qat(sim, "regular")
    options = dict(epochs=1, lr=1e-4, batch_size=64, checkpoint_dir=tmp_path / "ckpt", progress=False,
                   eval_fn=lambda model: 1.0)
    finetune(sim, digits_train[:128], **options)
    assert (tmp_path / "ckpt" / "last.pt").exists() and (tmp_path / "ckpt" / "best_sim.pt").exists()
    return sim, tmp_path / "ckpt", options


def test_qat_resume_from_a_crafted_checkpoint(qat_run, marker: Path, digits_train: torch.Tensor) -> None:
    sim, directory, options = qat_run
    torch.save({"format": "edgequant-qat-checkpoint", "model": _Payload(marker)}, directory / "last.pt")
    with pytest.raises(UnsafeFileError, match=r"last\.pt is refused.*\(exec\).*delete it to start over"):
        finetune(sim, digits_train[:128], resume=True, **options)


def test_qat_resume_with_a_crafted_best_state(qat_run, marker: Path, digits_train: torch.Tensor) -> None:
    sim, directory, options = qat_run
    _crafted_sim_state(directory / "best_sim.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"best_sim\.pt is refused"):
        finetune(sim, digits_train[:128], resume=True, **options)


def test_qat_checkpoint_with_edited_weights_is_refused(qat_run, digits_train: torch.Tensor) -> None:
    sim, directory, options = qat_run
    state = torch.load(directory / "last.pt", weights_only=True)
    key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][key] = state["model"][key] + 1
    torch.save(state, directory / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt is corrupted"):
        finetune(sim, digits_train[:128], resume=True, **options)


def test_cli_model_pt2_with_crafted_sample_inputs(tmp_path: Path, marker: Path) -> None:
    """torch.export.load falls back to unrestricted unpickling for the example inputs a .pt2 stores."""
    program = torch.export.export(load_pretrained("digits_cnn"), (torch.zeros(1, 1, 8, 8),))
    torch.export.save(program, tmp_path / "clean.pt2")
    payload = tmp_path / "payload.pt"
    torch.save((_Payload(marker),), payload)
    with zipfile.ZipFile(tmp_path / "clean.pt2") as source, zipfile.ZipFile(tmp_path / "model.pt2", "w") as crafted:
        names = [n for n in source.namelist() if n.endswith("sample_inputs/model.pt")]
        assert names, "torch.export.save no longer stores example inputs: update the crafted file"
        for item in source.infolist():
            data = payload.read_bytes() if item.filename in names else source.read(item.filename)
            crafted.writestr(item, data)
    calibration = str(_calibration_file(tmp_path))
    result = CliRunner().invoke(main, ["quantize", "--model", str(tmp_path / "model.pt2"),
                                       "--data", calibration, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "model.pt2 is refused" in result.output and "Traceback" not in result.output
    clean = CliRunner().invoke(main, ["quantize", "--model", str(tmp_path / "clean.pt2"), "--data", calibration,
                                      "--batch-size", "1", "--num-batches", "4", "--out", str(tmp_path / "ok")])
    assert clean.exit_code == 0, clean.output  # the restriction does not refuse an honest program


def _calibration_file(tmp_path: Path) -> Path:
    from edgequant.demo.digits import load_digits_tensors

    path = tmp_path / "calib.pt"
    torch.save(load_digits_tensors("train")[0][:64], path)
    return path


@pytest.mark.parametrize("option", ["--data", "--model"])
def test_cli_tensor_and_torchscript_files(option: str, tmp_path: Path, marker: Path) -> None:
    payload = tmp_path / "payload.pt"
    torch.save({"images": _Payload(marker)}, payload)
    arguments = {"--data": ["--model", MODEL, "--data", str(payload)],
                 "--model": ["--model", str(payload), "--data", str(_calibration_file(tmp_path))]}
    result = CliRunner().invoke(main, ["quantize", *arguments[option], "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "payload.pt" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
