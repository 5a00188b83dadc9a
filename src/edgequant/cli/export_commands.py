"""``edgequant export`` and ``edgequant verify`` (click commands; the CLI registers them on its group).

Both rebuild the sim from the model and the ``sim_state.pt`` that ``edgequant quantize`` writes (with the
``input_spec.json`` beside it: input shape, preprocessing, BN folding), so nothing is repeated or re-typed.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import onnx
import torch

from edgequant.cli.data import InputSpec, data_options, quiet_option, resolve_data
from edgequant.cli.errors import debug_option
from edgequant.cli.inputs import dummy_from_batch
from edgequant.cli.sim_state import recorded_source, sim_from_state
from edgequant.export.encodings_io import SUPPORTED_VERSIONS
from edgequant.export.onnx_export import export_onnx
from edgequant.export.qdq import QDQ_METADATA_KEY
from edgequant.export.verify import verify as verify_parity
from edgequant.sim import QuantSim
from edgequant.sim.emulation import RUNTIME_MODELS

_model_option = click.option("--model", "-m", "model_spec", metavar="SPEC",
                             help="The float model, as given to quantize (a factory spec runs that Python code).")
_state_option = click.option(
    "--sim-state", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="sim_state.pt written by quantize (its input_spec.json beside it gives shape and preprocessing); read "
         "without running code from it, its checksum checked first.",
)
_name_option = click.option("--name", default="model", show_default=True, help="File name stem of the exported files.")


@click.command()
@_model_option
@_state_option
@click.option("--input-shape", metavar="N,C,H,W", help="Export input shape [default: the recorded spec].")
@_name_option
@click.option("--encoding-version", type=click.Choice(SUPPORTED_VERSIONS), default="1.0.0", show_default=True,
              help="AIMET encodings file format version.")
@click.option("--opset", type=int, help="ONNX opset (default 17, or 21 where int4/int16 tensors need it).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder [default: the sim state's folder].")
@quiet_option
@debug_option
def export(model_spec: str | None, sim_state: Path | None, input_shape: str | None, name: str,
           encoding_version: str, opset: int | None, out_dir: Path | None, quiet: bool) -> None:
    """Write {name}.onnx, {name}.encodings (AIMET format) and {name}_qdq.onnx for a quantized model."""
    sim, _ = sim_from_state(model_spec, sim_state, input_shape)
    out_dir = out_dir or sim_state.parent
    click.echo(export_onnx(sim, out_dir, name=name, encoding_version=encoding_version, opset=opset).summary())


@click.command()
@_model_option
@_state_option
@data_options
@click.option("--export-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding {name}_qdq.onnx from export [default: the sim state's folder].")
@_name_option
@click.option("--max-lsb", type=click.IntRange(min=0), default=1, show_default=True,
              help="Fail (exit 1) when an output differs from the sim by more than this many LSBs.")
@click.option("--min-identical", type=click.FloatRange(0, 100), default=0.0, show_default=True,
              help="Fail (exit 1) when fewer than this percentage of outputs are identical to the sim.")
@click.option("--emulate", type=click.Choice(sorted(RUNTIME_MODELS)),
              help="Compare with the sim emulating this runtime's integer kernels (needs --model/--sim-state).")
@click.option("--tensors", "show_tensors", is_flag=True, help="Print the parity of every quantized tensor.")
@quiet_option
@debug_option
def verify(model_spec: str | None, sim_state: Path | None, data_spec: str | None, input_shape: str | None,
           batch_size: int | None, num_batches: int | None, mean: str | None, std: str | None,
           export_dir: Path | None, name: str, max_lsb: int, min_identical: float, emulate: str | None,
           show_tensors: bool, quiet: bool) -> None:
    """Run the exported QDQ model in ONNX Runtime's integer kernels and compare it with the sim (given --model and
    --sim-state) or with the QDQ graph computed in float; exits 1 when the thresholds are missed."""
    sim, spec = sim_from_state(model_spec, sim_state, input_shape) if model_spec or sim_state else (None, None)
    if emulate and sim is None:
        raise click.UsageError("--emulate needs the sim: pass --model and --sim-state")
    if emulate:
        with warnings.catch_warnings():  # the report prints the plan's coverage line
            warnings.simplefilter("ignore")
            sim.emulate(emulate)
    export_dir = export_dir or (_export_beside(sim_state, name) if sim_state is not None else None)
    if export_dir is None:
        raise click.UsageError("verify needs --export-dir (or --sim-state, whose folder holds the export)")
    recorded = spec or InputSpec.beside(sim_state)
    data_spec = data_spec or recorded_source(sim_state, "data")  # the calibration data of the run, by default
    data = resolve_data(data_spec, input_shape, batch_size, num_batches, mean, std, recorded)
    _check_export_fits(export_dir / f"{name}_qdq.onnx", sim, data.dummy_input, data_spec)
    inputs = (dummy_from_batch(b) for b in itertools.islice(data.batches, num_batches))  # stop reading early
    report = verify_parity(export_dir, sim, inputs, name=name, batch_size=data.spec.batch_size, progress=not quiet)
    click.echo(report.summary())
    if show_tensors:
        click.echo(report.tensor_table())
    failures = report.threshold_failures(max_lsb, min_identical)
    if failures:
        click.echo("FAILED: " + "; ".join(failures), err=True)
        sys.exit(1)


def _export_beside(sim_state: Path, name: str) -> Path:
    """Where the export of ``sim_state`` is: its folder (``edgequant export``), or ``export/`` in it (``qat``)."""
    qat_export = sim_state.parent / "export"
    if not (sim_state.parent / f"{name}_qdq.onnx").is_file() and (qat_export / f"{name}_qdq.onnx").is_file():
        return qat_export
    return sim_state.parent


def _check_export_fits(path: Path, sim: QuantSim | None, example: Any, data_spec: str) -> None:
    """The QDQ model must be the export of this sim and take this data; otherwise one line naming the file and
    what differs, instead of ONNX Runtime's INVALID_ARGUMENT or a parity report of two unrelated models."""
    if not path.is_file():
        raise click.BadParameter(f"{path} does not exist; pass the folder 'edgequant export' wrote (and its --name)",
                                 param_hint="--export-dir")
    model = onnx.load(path, load_external_data=False)
    where = f"--export-dir {path.parent} ({path.name})"
    if sim is not None:
        sites = json.loads({p.key: p.value for p in model.metadata_props}.get(QDQ_METADATA_KEY, "{}"))
        exported = {q for site in sites.values() for q in site["quantizers"]}
        foreign = sorted(exported - set(sim.quantizers()))
        if foreign:
            raise ValueError(
                f"{where} was exported from a different model than --model/--sim-state: {len(foreign)} of its "
                f"{len(exported)} quantizers are not in this sim (e.g. {foreign[0]}); pass the folder 'edgequant "
                "export' wrote for this --sim-state"
            )
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    examples = [example] if isinstance(example, torch.Tensor) else []
    for graph_input, tensor in zip(inputs, examples, strict=False):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
        sample = list(tensor.shape)
        if len(dims) != len(sample) or any(d is not None and d != s for d, s in zip(dims[1:], sample[1:], strict=True)):
            raise ValueError(
                f"{where} takes input {graph_input.name!r} of shape {dims}, but --data {data_spec} gives samples of "
                f"shape {sample[1:]}: it is the export of another model or input size; pass the export of this "
                "model, or data of that shape"
            )
