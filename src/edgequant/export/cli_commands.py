"""``edgequant export`` and ``edgequant verify`` (click commands; the CLI registers them on its group).

Both rebuild the sim from the model and the ``sim_state.pt`` that ``edgequant quantize`` writes (the state holds
the config, bitwidths and encodings), so no calibration is repeated.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import click
import torch

from edgequant.cli_inputs import dummy_from_batch, load_batches, load_model, parse_shape, peek
from edgequant.export.encodings_io import SUPPORTED_VERSIONS
from edgequant.export.onnx_export import export_onnx
from edgequant.export.verify import verify as verify_parity
from edgequant.sim import QuantSim
from edgequant.sim.emulation import RUNTIME_MODELS


def _sim_from_state(model_spec: str, state_path: Path, input_shape: str) -> QuantSim:
    """The sim ``edgequant quantize`` saved: same config and bitwidths, encodings restored."""
    dummy = torch.randn(parse_shape(input_shape))
    model = load_model(model_spec, lambda: (dummy,))
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state:
        raise click.BadParameter(
            f"{state_path} is not a sim state written by 'edgequant quantize'", param_hint="--sim-state"
        )
    sim = QuantSim(
        model, dummy, param_bw=state["param_bw"], output_bw=state["output_bw"], quant_scheme=state["quant_scheme"],
        config=state["config"],
    )
    sim.load(state_path)
    return sim


_model_option = click.option("--model", "-m", "model_spec", metavar="SPEC", help="The float model (as for quantize).")
_state_option = click.option(
    "--sim-state", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="sim_state.pt from quantize."
)
_shape_option = click.option("--input-shape", default="1,3,224,224", show_default=True, metavar="N,C,H,W")


@click.command()
@_model_option
@_state_option
@_shape_option
@click.option("--name", default="model", show_default=True, help="File name stem of the exported files.")
@click.option("--encoding-version", type=click.Choice(SUPPORTED_VERSIONS), default="1.0.0", show_default=True)
@click.option("--opset", type=int, help="ONNX opset (default 17, or 21 where int4/int16 tensors need it).")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def export(
    model_spec: str, sim_state: Path, input_shape: str, name: str, encoding_version: str, opset: int | None,
    out_dir: Path,
) -> None:
    """Write OUT_DIR/{name}.onnx, {name}.encodings (AIMET format) and {name}_qdq.onnx for a quantized model."""
    if not model_spec or sim_state is None:
        raise click.UsageError(
            "export needs --model and --sim-state (the sim_state.pt written by 'edgequant quantize')"
        )
    sim = _sim_from_state(model_spec, sim_state, input_shape)
    click.echo(export_onnx(sim, out_dir, name=name, encoding_version=encoding_version, opset=opset).summary())


@click.command()
@click.option("--data", "-d", "data_spec", required=True, metavar="SPEC",
              help="Inputs to compare on: an image folder, a tensor file (.pt/.npy) or module:function.")
@_model_option
@_state_option
@_shape_option
@click.option("--name", default="model", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--num-batches", type=click.IntRange(min=1), help="Compare on at most this many batches.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--emulate", type=click.Choice(sorted(RUNTIME_MODELS)),
              help="Compare with the sim emulating this runtime's integer kernels (needs --model/--sim-state).")
@click.option("--tensors", "show_tensors", is_flag=True, help="Print the parity of every quantized tensor.")
@click.argument("out_dir", type=click.Path(exists=True, path_type=Path))
def verify(
    data_spec: str, model_spec: str | None, sim_state: Path | None, input_shape: str, name: str, batch_size: int,
    num_batches: int | None, quiet: bool, emulate: str | None, show_tensors: bool, out_dir: Path,
) -> None:
    """Run OUT_DIR's QDQ model in ONNX Runtime's integer kernels and compare it with the sim (given --model and
    --sim-state) or with the QDQ graph computed in float."""
    sim = _sim_from_state(model_spec, sim_state, input_shape) if model_spec and sim_state else None
    if emulate and sim is None:
        raise click.UsageError("--emulate needs the sim: pass --model and --sim-state")
    if emulate:
        sim.emulate(emulate)
    batches = load_batches(data_spec, batch_size, parse_shape(input_shape))
    _, batches = peek(batches)
    inputs = (dummy_from_batch(b) for b in itertools.islice(batches, num_batches))  # stop reading after num_batches
    report = verify_parity(out_dir, sim, inputs, name=name, batch_size=batch_size, progress=not quiet)
    click.echo(report.summary())
    if show_tensors:
        click.echo(report.tensor_table())
