"""The ``edgequant`` command line: ``quantize`` (the main job), ``demo``, and the export / PTQ commands.

``edgequant quantize`` with no arguments runs the bundled digits demo, so a fresh install can be checked
with one command and no data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import torch

from edgequant import __version__
from edgequant.analysis.fidelity import OutputFidelity, float_leaves, power, sqnr_db
from edgequant.cli.analyze_command import analyze
from edgequant.cli.autoquant_command import autoquant
from edgequant.cli.data import InputSpec, bitwidth_options, data_options, device_option, fold_bn_option, quiet_option
from edgequant.cli.errors import ErrorHandlingGroup, debug_option
from edgequant.cli.export_commands import export, verify
from edgequant.cli.job import Job, JobOptions, SimSettings, build_job, pass_job_options
from edgequant.cli.llm_command import llm
from edgequant.cli.qat_command import qat
from edgequant.cli.sim_state import sources
from edgequant.quantization import QUANT_SCHEMES
from edgequant.quantization.granularity import PerChannel
from edgequant.sim import QuantSim
from edgequant.sim.modes import quantizers_disabled, training_mode

DEMO_BATCH_SIZE = 64
MAX_PRINTED_COVERAGE_LINES = 30
PER_CHANNEL_HINT_GAIN_DB = 3.0
"""Output SQNR that per-channel weights must add (half the noise power) before the default config gets a hint."""


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgequant")
@debug_option
def main() -> None:
    """edgequant: simulate, calibrate and export fixed-point (int8/int16/int4) versions of PyTorch models."""


def _settings_options(command: Callable) -> Callable:
    """Options every quantizing command takes (bit widths, scheme, config, output, verbosity)."""
    options = [
        bitwidth_options,
        click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default="minmax", show_default=True,
                     help="Calibration method (encoding analyzer)."),
        fold_bn_option,
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                     default=Path("edgequant_out"), show_default=True, help="Output folder."),
        quiet_option,
        debug_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.option("--model", "-m", "model_spec", metavar="SPEC",
              help="'package.module:factory', 'file.py:factory', a torch.export .pt2 file or a TorchScript file.")
@data_options
@click.option("--eval", "eval_spec", metavar="SPEC",
              help="'module:function' called as function(model) -> float, on the FP32 model and the sim.")
@device_option
@_settings_options
@pass_job_options
def quantize(options: JobOptions, settings: SimSettings, fold_bn: bool, out_dir: Path, quiet: bool) -> None:
    """Build a quantization simulation of a model, calibrate it and write its encodings.

    With no --model and no --data, runs the bundled digits demo.
    """
    _run(build_job(options, settings, demo_batch_size=DEMO_BATCH_SIZE, single_pass=True), options, fold_bn, out_dir,
         quiet)


@main.command()
@_settings_options
@pass_job_options
def demo(options: JobOptions, settings: SimSettings, fold_bn: bool, out_dir: Path, quiet: bool) -> None:
    """Quantize the bundled digits CNN and print FP32 vs quantized accuracy (no data or download needed)."""
    _run(build_job(options, settings, demo_batch_size=DEMO_BATCH_SIZE), options, fold_bn, out_dir, quiet)


def _run(job: Job, options: JobOptions, fold_bn: bool, out_dir: Path, quiet: bool) -> dict[str, Any]:
    """Build the sim (BatchNorms folded first with ``fold_bn``), calibrate, evaluate, write the output folder (its
    summary records the sources in ``options`` for ``--from``) and print what happened."""
    settings, timings = job.settings, {"load_s": job.load_s}
    click.echo(f"model: {job.model_name}  |  {settings.label}, scheme {settings.scheme}, config {settings.config}")

    started = time.perf_counter()
    sim = settings.sim(job.float_model(fold_bn), job.dummy_input)
    timings["build_sim_s"] = time.perf_counter() - started

    limit = job.num_batches
    if limit is None and isinstance(job.batches, Sized):
        limit = len(job.batches)
    yielded = 0
    first_batches: list[Any] = []

    def counted() -> Iterable[Any]:
        nonlocal yielded
        for batch in job.batches:
            if not first_batches:
                first_batches.append(batch)
            yielded += 1
            yield batch

    started = time.perf_counter()
    sim.calibrate(counted(), num_batches=limit, progress=not quiet)
    timings["calibrate_s"] = time.perf_counter() - started
    num_calibrated = min(yielded, limit) if limit is not None else yielded
    click.echo(f"calibrated on {num_calibrated} batches of {job.data_name} in {timings['calibrate_s']:.2f} s")

    metric = None
    if job.evaluate is not None:
        metric = {"name": job.metric_name}
        for key, model in (("fp32", job.model), ("quantized", sim.model)):
            started = time.perf_counter()
            metric[key] = job.evaluate(model)
            timings[f"evaluate_{key}_s"] = time.perf_counter() - started
        metric["delta"] = metric["quantized"] - metric["fp32"]

    click.echo(_coverage_text(sim))
    if settings.config == "default" and first_batches:
        started = time.perf_counter()
        hint = _per_channel_hint(sim, first_batches[0])
        timings["per_channel_check_s"] = time.perf_counter() - started
        if hint:
            click.echo(hint)
    if metric is not None:
        click.echo(_metric_line("FP32", metric["fp32"], job.metric_name))
        click.echo(_metric_line(settings.label, metric["quantized"], job.metric_name))
    summary = {**_summary(job, sim, metric, timings, num_calibrated), **sources(options)}
    files = _write_outputs(sim, summary, job.spec, out_dir)
    click.echo(f"wrote {', '.join(str(f) for f in files)}")
    return summary


def _per_channel_hint(sim: QuantSim, batch: Any) -> str | None:
    """A line suggesting ``--config per_channel`` when per-channel weights would raise the output SQNR on ``batch``
    by `PER_CHANNEL_HINT_GAIN_DB` or more, else None.

    Per-tensor weights are the default config's one difference from ``per_channel``; a layer whose output channels
    have very different weight ranges (a BatchNorm folded into a depthwise conv) loses its small channels to them.
    The estimate needs no second calibration: the calibrated activation encodings stay, only the weights get
    per-channel encodings, for the one forward.
    """
    weights = [q for q in sim.quantizers(role="param").values()
               if q.enabled and getattr(sim.layer_of(q), q.key).dim() >= 2]
    if not weights or any(q.granularity.kind != "per_tensor" for q in weights):  # none, or granularity chosen
        return None
    call = next(sim.batches([batch], 1))
    with torch.no_grad(), training_mode(sim.model, False), quantizers_disabled(sim.model):
        reference = sim.model(*call[0], **call[1])
    signal = sum(power(leaf) for leaf in float_leaves(reference))
    if signal == 0.0:
        return None
    fidelity = OutputFidelity([call], [reference])
    default_db = sqnr_db(signal, fidelity.noise_power(sim.model))
    with _per_channel_weights(sim):
        per_channel_db = sqnr_db(signal, fidelity.noise_power(sim.model))
    if per_channel_db - default_db < PER_CHANNEL_HINT_GAIN_DB:
        return None
    return (f"hint: per-channel weights raise the output SQNR on the first calibration batch from {default_db:.1f} dB "
            f"to {per_channel_db:.1f} dB; try --config per_channel")


@contextmanager
def _per_channel_weights(sim: QuantSim) -> Iterator[None]:
    """Every weight quantizer per channel (encoded from its weight) inside the block; the sim's own ones after."""
    originals = [(sim.layer_of(q), q) for q in sim.quantizers(role="param").values()]
    sim.set_granularity("*", PerChannel())
    try:
        yield
    finally:
        for layer, quantizer in originals:
            layer.param_quantizers[quantizer.key] = quantizer


def _summary(job: Job, sim: QuantSim, metric: dict | None, timings: dict, num_calibrated: int) -> dict[str, Any]:
    coverage = sim.coverage()
    return {
        "edgequant_version": __version__,
        "model": job.model_name,
        "calibration_data": job.data_name,
        "num_calibration_batches": num_calibrated,
        "settings": asdict(job.settings),
        "input_spec": asdict(job.spec),
        "quantized": {
            "tensors": len(coverage),
            "tensors_quantized": sum(entry.quantized for entry in coverage),
            "quantizers_enabled": sum(q.enabled for q in sim.quantizers().values()),
            "modules": {name: module.onnx_op_type for name, module in sim.quantized_modules().items()},
        },
        "coverage": [asdict(entry) for entry in coverage],
        "timings": timings,
        "metric": metric,
    }


def _write_outputs(sim: QuantSim, summary: dict[str, Any], spec: InputSpec, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, encodings_path, summary_path = (out_dir / name for name in
                                                ("sim_state.pt", "quantizer_encodings.json", "summary.json"))
    sim.save(state_path)
    # keyed by quantizer name, for reading; AIMET encodings files (ONNX tensor names) come from `edgequant export`
    encodings = {
        name: {"role": q.role, "layer": q.owner, "enabled": q.enabled, "format": q.number_format.describe(),
               **(q.encoding.to_dict() if q.encoding is not None else {"bitwidth": q.bitwidth})}
        for name, q in sim.quantizers().items()
    }
    encodings_path.write_text(json.dumps(encodings, indent=1))
    summary_path.write_text(json.dumps(summary, indent=1))
    return [state_path, encodings_path, summary_path, spec.save(out_dir)]


def _coverage_text(sim: QuantSim) -> str:
    lines = sim.coverage_summary().splitlines()
    if len(lines) > MAX_PRINTED_COVERAGE_LINES + 1:
        hidden = len(lines) - MAX_PRINTED_COVERAGE_LINES - 1
        lines = lines[: MAX_PRINTED_COVERAGE_LINES + 1] + [f"  ... {hidden} more in summary.json"]
    return "\n".join(lines)


def _metric_line(label: str, value: float, name: str) -> str:
    shown = f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.6g}"
    return f"{label} {name}: {shown}"


# Commands contributed by the export and PTQ packages.
main.add_command(export)
main.add_command(verify)
main.add_command(autoquant)
main.add_command(qat)
main.add_command(analyze)
main.add_command(llm)
