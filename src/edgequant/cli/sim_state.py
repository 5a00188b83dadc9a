"""Rebuilding the sim a ``quantize`` run saved, for the commands that work on its output folder."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from edgequant.cli.data import InputSpec
from edgequant.cli.inputs import load_model
from edgequant.ptq import fold_batch_norms
from edgequant.sim import QuantSim


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
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as error:  # many kinds for truncated/foreign files; QuantSim.load words it below
        state = error
    if not isinstance(state, dict) or "config" not in state:
        raise click.BadParameter(
            f"{state_path} is not a sim state written by 'edgequant quantize' (rerun quantize to write it)",
            param_hint="--sim-state",
        )
    if spec.fold_bn:
        fold_batch_norms(model, dummy)
    sim = QuantSim(model, dummy, param_bw=state["param_bw"], output_bw=state["output_bw"],
                   quant_scheme=state["quant_scheme"], config=state["config"])
    sim.load(state_path)
    return sim, spec
