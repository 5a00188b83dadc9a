"""What a command's output folder records (``sim_state.pt``, ``input_spec.json``, ``summary.json``) and how the
next command reads it back: the sim rebuilt for ``export``/``verify``, and ``--from`` for the commands that start
from the model and data again (``analyze``, ``autoquant``, ``qat``), so that nothing is typed twice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import torch
from click.core import ParameterSource
from torch.serialization import get_unsafe_globals_in_checkpoint

from edgequant.cli.data import InputSpec
from edgequant.cli.inputs import forward_failure, is_object_spec, load_model, one_line_of, parse_shape
from edgequant.cli.job import JobOptions, SimSettings
from edgequant.ptq import fold_batch_norms
from edgequant.ptq.cross_layer_equalization import equalize
from edgequant.sim import QuantSim
from edgequant.sim.state_file import SimState, load_without_code, read_sim_state

SUMMARY_FILE = "summary.json"
SOURCES_KEY = "sources"
"""summary.json entry: ``--model``, ``--data`` and ``--eval`` as typed (all None: the bundled digits demo)."""
EQUALIZED_KEY = "cross_layer_equalized"
"""summary.json entry: the float model was cross-layer equalized after BN folding (an AutoQuant ``cle`` step), which
replaces ReLU6 by per-channel clamps, so the sim is rebuilt on an equalized model."""
DEMO_MODEL_SPEC = "edgequant.demo.digits:load_pretrained"
"""``--model`` of the bundled digits CNN, for the sims a demo run saved."""
RECORDED_SETTINGS = ("param_bw", "output_bw", "scheme", "config", "weight_granularity")
"""The `SimSettings` fields ``--from`` carries over (those the command takes and the user did not type)."""

from_option = click.option(
    "--from", "from_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Output folder of an earlier quantize/autoquant/qat run: its --model, --data, --eval, input spec, BN "
         "folding and quantization settings are the defaults; options typed here override them.")


def sources(options: JobOptions) -> dict[str, dict[str, str | None]]:
    """The summary.json entry recording where a run's model, data and metric came from."""
    return {SOURCES_KEY: {"model": options.model_spec, "data": options.data_spec, "eval": options.eval_spec}}


def recorded_source(sim_state: Path | None, source: str) -> str | None:
    """``source`` (``model``, ``data`` or ``eval``) as the run that wrote ``sim_state`` recorded it, if it did."""
    summary = read_summary(sim_state.parent) if sim_state is not None else None
    recorded = (summary or {}).get(SOURCES_KEY)
    return recorded.get(source) if isinstance(recorded, dict) else None


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The summary.json a command wrote into ``folder`` (None when there is none, or it is not a summary)."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def options_from_run(
    from_dir: Path | None, options: JobOptions, settings: SimSettings, fold_bn: bool | None = None,
    takes_weight_granularity: bool = False,
) -> tuple[JobOptions, SimSettings, bool | None]:
    """``options``, ``settings`` and ``fold_bn`` with what the run in ``from_dir`` recorded in place of each option
    the user did not type (the data options only where that kind of data takes them: ``resolve_data`` refuses the
    others). A recorded ``--weight-granularity`` is refused by a command that does not ``takes_weight_granularity``
    (its sim would not be the recorded one). Unchanged without ``--from``."""
    if from_dir is None:
        return options, settings, fold_bn
    summary = read_summary(from_dir)
    spec = InputSpec.beside(from_dir / "sim_state.pt")
    if summary is None or SOURCES_KEY not in summary or spec is None:
        raise click.BadParameter(f"{from_dir} holds no summary.json with its sources and input_spec.json; pass an "
                                 "output folder of quantize, autoquant (its best/ folder) or qat", param_hint="--from")
    typed = _typed_parameters()
    recorded = summary[SOURCES_KEY]
    options = replace(options, **{name: recorded[key] for name, key in
                                  (("model_spec", "model"), ("data_spec", "data"), ("eval_spec", "eval"))
                                  if name not in typed and recorded.get(key) is not None})
    data = options.data_spec
    from_spec: dict[str, Any] = {}
    if data is not None and spec.shape:
        from_spec["input_shape"] = ",".join(str(size) for size in spec.shape)
    if data is not None and not is_object_spec(data):
        from_spec["batch_size"] = spec.batch_size
    if data is not None and Path(data).is_dir():
        from_spec["mean"], from_spec["std"] = (",".join(str(v) for v in values) for values in (spec.mean, spec.std))
    options = replace(options, **{name: value for name, value in from_spec.items() if name not in typed})
    takes = set(click.get_current_context().params)
    carried = {name: summary.get("settings", {}).get(name) for name in RECORDED_SETTINGS
               if name in takes and name not in typed}
    if carried.get("weight_granularity"):
        if not takes_weight_granularity:
            raise click.BadParameter(
                f"{from_dir} was quantized with --weight-granularity {' '.join(carried['weight_granularity'])}, which "
                f"{click.get_current_context().info_name} cannot simulate; start it from --model and --data instead",
                param_hint="--from")
        carried["weight_granularity"] = tuple(carried["weight_granularity"])
    settings = replace(settings, **{name: value for name, value in carried.items() if value is not None})
    if fold_bn is not None and "fold_bn" not in typed:
        fold_bn = spec.fold_bn
    return options, settings, fold_bn


def _typed_parameters() -> set[str]:
    """The parameters of the running command given on the command line or in the environment."""
    context = click.get_current_context()
    return {name for name in context.params
            if context.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def sim_from_state(
    model_spec: str | None, state_path: Path | None, input_shape: str | None
) -> tuple[QuantSim, InputSpec]:
    """The sim ``edgequant quantize`` saved (same config, bitwidths, BN folding, input spec), encodings restored;
    without ``model_spec``, on the model the summary.json beside the state records."""
    summary = read_summary(state_path.parent) if state_path is not None else None
    if not model_spec and summary is not None and SOURCES_KEY in summary:
        model_spec = summary[SOURCES_KEY].get("model") or DEMO_MODEL_SPEC
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
    if summary is not None and summary.get(EQUALIZED_KEY):
        equalize(model, dummy)  # the structure (per-channel clamps); the state restores every value
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
