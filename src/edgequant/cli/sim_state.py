"""Rebuilding the sim a ``quantize`` run saved, for the commands that work on its output folder."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from edgequant.cli.data import InputSpec
from edgequant.cli.inputs import load_model
from edgequant.ptq import fold_batch_norms
from edgequant.sim import QuantSim
from edgequant.sim.state_file import read_sim_state


def sim_from_state(
    model_spec: str | None, state_path: Path | None, input_shape: str | None
) -> tuple[QuantSim, InputSpec]:
    """The sim ``edgequant quantize`` saved (same config, bitwidths, BN folding, input spec), encodings restored."""
    if not model_spec or state_path is None:
        raise click.UsageError("needs --model and --sim-state (the sim_state.pt written by 'edgequant quantize')")
    recorded = InputSpec.beside(state_path)
    if input_shape:
        from edgequant.cli.inputs import parse_shape

        shape = list(parse_shape(input_shape))
    elif recorded is not None and recorded.shape:
        shape = recorded.shape
    else:
        raise click.UsageError(f"no input_spec.json beside {state_path}: pass --input-shape N,C,H,W")
    spec = recorded or InputSpec(shape=shape, fold_bn=False)  # a state saved by hand: the model as given
    dummy = torch.zeros(shape, dtype=getattr(torch, spec.dtype))
    model = load_model(model_spec, lambda: (dummy,))
    try:
        state = read_sim_state(state_path)  # no code runs; format and checksum checked before the settings are used
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--sim-state") from None
    if spec.fold_bn:
        fold_batch_norms(model, dummy)
    settings = state.settings
    sim = QuantSim(model, dummy, param_bw=settings["param_bw"], output_bw=settings["output_bw"],
                   quant_scheme=settings["quant_scheme"], config=settings["config"])
    sim.load(state)
    return sim, spec
