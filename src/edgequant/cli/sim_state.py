"""Rebuilding the sim a ``quantize`` run saved, for the commands that work on its output folder."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from edgequant.cli.data import InputSpec
from edgequant.cli.inputs import forward_failure, load_model, one_line_of, parse_shape
from edgequant.ptq import fold_batch_norms
from edgequant.sim import QuantSim
from edgequant.sim.state_file import SimState, load_without_code, read_sim_state

SUMMARY_FILE = "summary.json"


def sim_from_state(
    model_spec: str | None, state_path: Path | None, input_shape: str | None
) -> tuple[QuantSim, InputSpec]:
    """The sim ``edgequant quantize`` saved (same config, bitwidths, BN folding, input spec), encodings restored."""
    if not model_spec or state_path is None:
        raise click.UsageError("needs --model and --sim-state (the sim_state.pt written by 'edgequant quantize')")
    recorded = InputSpec.beside(state_path)
    if input_shape:
        shape = list(parse_shape(input_shape))
    elif recorded is not None and recorded.shape:
        shape = recorded.shape
    else:
        raise click.UsageError(f"no input_spec.json beside {state_path}: pass --input-shape N,C,H,W")
    spec = recorded or InputSpec(shape=shape, fold_bn=False)  # a state saved by hand: the model as given
    dummy = torch.zeros(shape, dtype=getattr(torch, spec.dtype))
    model = load_model(model_spec, lambda: (dummy,))
    state = _read_state(state_path)
    _check_model_runs(model, dummy, model_spec, state_path, input_shape)
    if spec.fold_bn:
        fold_batch_norms(model, dummy)
    settings = state.settings
    sim = QuantSim(model, dummy, param_bw=settings["param_bw"], output_bw=settings["output_bw"],
                   quant_scheme=settings["quant_scheme"], config=settings["config"])
    try:
        sim.load(state)
    except (ValueError, RuntimeError) as error:  # other quantizers, or the same names with other weight shapes
        detail = one_line_of(error).removeprefix(f"{state_path} was saved from a different model: ")
        raise ValueError(f"{_different_model(state_path, model_spec)} ({detail})") from None
    return sim, spec


def _read_state(path: Path) -> SimState:
    """The sim state, no code run; a file that is something else (a whole model, a state_dict) is named as such."""
    try:
        return read_sim_state(path)  # format and checksum checked before the settings are used
    except ValueError as error:
        raise click.BadParameter(_what_else(path) or str(error), param_hint="--sim-state") from None


def _what_else(path: Path) -> str | None:
    """What a file that is not a sim state holds, when it is one of the files users confuse with it."""
    try:
        classes = get_unsafe_globals_in_checkpoint(path)  # reads the pickle's class names without loading any
    except Exception:  # not a torch zip archive at all
        return None
    modules = [name for name in classes if name.startswith("torch.nn.modules.")]
    if modules:
        named = sorted(name for name in classes if name not in modules) or sorted(modules)
        return (f"{path} holds a whole model saved with torch.save(model) ({named[0]}), not a sim state; pass the "
                "sim_state.pt that 'edgequant quantize' wrote (the model itself goes to --model, as a factory, .pt2 "
                "or TorchScript file)")
    if classes:
        return None
    try:
        data = load_without_code(path, "sim state", "")
    except ValueError:
        return None
    if isinstance(data, dict) and data and all(isinstance(value, torch.Tensor) for value in data.values()):
        return (f"{path} holds a state_dict ({len(data)} tensors: a model's weights), not a sim state; pass the "
                "sim_state.pt that 'edgequant quantize' wrote")
    return None


def _check_model_runs(model: torch.nn.Module, dummy: torch.Tensor, model_spec: str, state_path: Path,
                      input_shape: str | None) -> None:
    """The model must run at the recorded input shape; when it does not, the sim state (whose input_spec.json gave
    the shape) is another model's, or ``--input-shape`` is wrong."""
    error = forward_failure(model, dummy)
    if error is None:
        return
    failure = f"{type(error).__name__}: {one_line_of(error)}"
    if input_shape:
        raise ValueError(f"--model {model_spec} does not run at --input-shape {input_shape} ({failure}); pass "
                         "the shape the model takes") from error
    raise ValueError(
        f"{_different_model(state_path, model_spec)}: the model does not run at the input shape recorded with it, "
        f"{list(dummy.shape)} ({failure})"
    ) from error


def _different_model(state_path: Path, model_spec: str) -> str:
    """The sentence for a sim state that does not fit ``--model``, naming the model quantize recorded if it can."""
    recorded = _recorded_model(state_path)
    source = f" ({SUMMARY_FILE} beside it records --model {recorded})" if recorded else ""
    return (f"--sim-state {state_path} was saved from a different model than --model {model_spec}{source}; pass "
            "the --model that 'edgequant quantize' ran with")


def _recorded_model(state_path: Path) -> str | None:
    try:
        model = json.loads((state_path.parent / SUMMARY_FILE).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None
