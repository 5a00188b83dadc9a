"""``edgequant analyze``: QuantAnalyzer from the command line (registered by `edgequant.cli`)."""

from __future__ import annotations

from pathlib import Path

import click

from edgequant.cli.data import (
    bitwidth_options,
    data_options,
    demo_model_option,
    device_option,
    fold_bn_option,
    quiet_option,
)
from edgequant.cli.errors import debug_option
from edgequant.cli.job import JobOptions, SimSettings, build_job, pass_job_options
from edgequant.cli.sim_state import from_option, options_from_run
from edgequant.quantization import QUANT_SCHEMES

RANKED_LINES = 5


@click.command()
@from_option
@demo_model_option
@data_options
@click.option("--eval", "eval_spec", metavar="SPEC",
              help="'module:function' called as function(model) -> float (higher is better); default: fidelity "
                   "of the model outputs to FP32 on the calibration data.")
@bitwidth_options
@click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default="minmax", show_default=True,
              help="Calibration method (encoding analyzer).")
@fold_bn_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("edgequant_analysis"), show_default=True,
              help="Output folder (analysis.json, report.html, layer_outputs.npz).")
@device_option
@quiet_option
@debug_option
@pass_job_options
def analyze(options: JobOptions, settings: SimSettings, fold_bn: bool, out_dir: Path, quiet: bool,
            from_dir: Path | None) -> None:
    """Find where quantization loses accuracy: per-layer sensitivity, output SQNR along the network, ranges.

    Writes analysis.json (its settings list the BatchNorms left unfolded), an interactive report.html and the
    per-layer outputs (FP32 and sim) of the first batch under their ONNX tensor names.
    """
    from edgequant.analysis import QuantAnalyzer

    options, settings, fold_bn = options_from_run(from_dir, options, settings, fold_bn)
    job = build_job(options, settings, demo_batch_size=32)
    analyzer = QuantAnalyzer(job.float_model(fold_bn), job.dummy_input, job.batches, job.evaluate,
                             **settings.quantsim_kwargs(), progress=not quiet)
    result = analyzer.analyze(out_dir, num_batches=job.num_batches)  # the analysis only: calibration uses every batch
    click.echo(f"metric: {result.metric_name}")
    for label, value in (("FP32", result.fp32_metric), ("quantized", result.quantized_metric),
                         ("weights only", result.weights_only_metric),
                         ("activations only", result.activations_only_metric)):
        click.echo(f"  {label:<17} {value:.4f}")
    click.echo("most sensitive (metric gain if kept in float):")
    for layer in result.ranking()[:RANKED_LINES]:
        click.echo(f"  {layer.name:<30} {layer.gain_if_kept_in_float(result.quantized_metric):+.4f}")
    click.echo(f"wrote {', '.join(str(path) for path in result.files)}")
