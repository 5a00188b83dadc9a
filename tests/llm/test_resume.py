"""Interrupted GPTQ and sequential MSE resume from their progress directory and end with the bits of an
uninterrupted run; a directory of another run is refused."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from tiny_llm import sharing_check_sim

from edgequant.llm.gptq import GptqSettings, gptq
from edgequant.llm.resume import ResumeError
from edgequant.llm.sequential_mse import SequentialMseSettings, sequential_mse

TECHNIQUES = {  # the package re-exports the functions under their modules' names: reach the modules directly
    "gptq": (gptq, GptqSettings, importlib.import_module("edgequant.llm.gptq"), "_round_layer"),
    "sequential_mse": (sequential_mse, SequentialMseSettings, importlib.import_module("edgequant.llm.sequential_mse"),
                       "_search"),
}


def _state(sim: object) -> dict[str, object]:
    return {key: value.clone() if isinstance(value, torch.Tensor) else value
            for key, value in sim.model.state_dict().items()}


def _assert_same_state(first: dict[str, object], second: dict[str, object]) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key
        else:
            assert value == second[key], key


def _interrupt_after(module: object, function: str, calls: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``module.function`` raise KeyboardInterrupt at call number ``calls + 1``; returns the call counter."""
    original, counter = getattr(module, function), []

    def counting(*args: object, **kwargs: object) -> object:
        if len(counter) == calls:
            raise KeyboardInterrupt
        counter.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function, counting)
    return counter


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(technique: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run, settings_type, module, per_layer = TECHNIQUES[technique]
    reference, batches, _, make_sim = sharing_check_sim()
    reference_report = run(reference, batches, settings_type(progress=False))
    layers = len(reference_report.layers)
    assert layers >= 8

    settings = settings_type(progress=False, resume_dir=tmp_path / "progress")
    interrupted = make_sim()
    with monkeypatch.context() as patch:
        _interrupt_after(module, per_layer, 5, patch)
        with pytest.raises(KeyboardInterrupt):
            run(interrupted, batches, settings)
    assert len(list((tmp_path / "progress").glob("layer_*.pt"))) == 5

    resumed = make_sim()
    with monkeypatch.context() as patch:
        computed = _interrupt_after(module, per_layer, layers, patch)
        report = run(resumed, batches, settings)
    assert len(computed) == layers - 5  # the five finished layers were loaded, not computed again
    assert [layer.name for layer in report.layers] == [layer.name for layer in reference_report.layers]
    _assert_same_state(_state(reference), _state(resumed))


def test_a_directory_of_another_run_is_refused(tmp_path: Path) -> None:
    sim, batches, _, make_sim = sharing_check_sim()
    gptq(sim, batches, GptqSettings(progress=False, resume_dir=tmp_path))
    with pytest.raises(ResumeError, match="another run"):
        gptq(make_sim(), batches[:2], GptqSettings(progress=False, resume_dir=tmp_path))  # other data
    with pytest.raises(ResumeError, match="another run"):
        sequential_mse(make_sim(), batches, SequentialMseSettings(progress=False, resume_dir=tmp_path))


def test_a_damaged_progress_file_is_one_clear_error(tmp_path: Path) -> None:
    sim, batches, _, make_sim = sharing_check_sim()
    sequential_mse(sim, batches, SequentialMseSettings(progress=False, resume_dir=tmp_path))
    next(tmp_path.glob("layer_*.pt")).write_bytes(b"not a tensor file")
    with pytest.raises(ResumeError, match="cannot be read"):
        sequential_mse(make_sim(), batches, SequentialMseSettings(progress=False, resume_dir=tmp_path))
