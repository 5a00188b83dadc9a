"""``edgequant autoquant``: the AutoQuant ladder from the command line (registered by `edgequant.cli`)."""

from __future__ import annotations

import json
import shutil
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
from edgequant.cli.job import WEIGHT_GRANULARITY_OPTION, Job, JobOptions, SimSettings, build_job, pass_job_options
from edgequant.cli.sim_state import EQUALIZED_KEY, SUMMARY_FILE, from_option, options_from_run, sources
from edgequant.quantization import QUANT_SCHEMES
from edgequant.workflows.autoquant import DEFAULT_SCHEMES
from edgequant.workflows.autoquant_result import AutoQuantResult

BEST_FOLDER = "best"


@click.command()
@from_option
@demo_model_option
@data_options
@click.option("--eval", "eval_spec", metavar="SPEC",
              help="'module:function' called as function(model) -> float (higher is better); required with --model.")
@click.option("--allowed-drop", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Largest acceptable metric drop from FP32 (absolute, in the metric's units).")
@bitwidth_options
@click.option("--scheme", "schemes", type=click.Choice(QUANT_SCHEMES), multiple=True, default=DEFAULT_SCHEMES,
              show_default=True, help="Calibration scheme to compare (repeat the option for several).")
@fold_bn_option
@click.option("--adaround-iterations", type=click.IntRange(min=0), default=10000, show_default=True,
              help="AdaRound iterations per layer (the last, most expensive step).")
@click.option("--mixed-precision", "mixed_precision", metavar="W,A[;W,A...]",
              help="Last step when nothing else meets the target: choose per-layer bit widths among these "
                   "(param_bw, output_bw) pairs, e.g. '8,8;8,16;4,8'.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("autoquant_results"),
              show_default=True, help="Output folder: cache of finished steps (a rerun resumes) and the HTML report.")
@device_option
@quiet_option
@debug_option
@pass_job_options
def autoquant(
    options: JobOptions, settings: SimSettings, allowed_drop: float, schemes: tuple[str, ...], fold_bn: bool,
    adaround_iterations: int, mixed_precision: str | None, out_dir: Path, quiet: bool, from_dir: Path | None,
) -> None:
    """Find the cheapest PTQ recipe meeting FP32 - allowed drop; writes an HTML report and the best sim in OUT/best,
    laid out as quantize's output folder for export, verify and --from (the settings record --fold-bn; with it, the
    ladder starts from the folded model and has no bn_fold step)."""
    from edgequant.workflows import autoquant as run_autoquant

    options, settings, fold_bn = options_from_run(from_dir, options, settings, fold_bn)
    if settings.weight_granularity:  # AutoQuant's sims come from --config alone
        raise click.UsageError(f"{WEIGHT_GRANULARITY_OPTION} applies to quantize, demo and qat only; leave it out")
    job = build_job(options, settings, demo_batch_size=64, eval_required=True)
    result = run_autoquant(
        job.model, job.dummy_input, job.batches, job.evaluate, allowed_accuracy_drop=allowed_drop,
        param_bw=settings.param_bw, output_bw=settings.output_bw, config=settings.config, results_dir=out_dir,
        num_batches=job.num_batches, schemes=tuple(schemes), adaround_iterations=adaround_iterations,
        progress=not quiet, mixed_precision_candidates=_candidates(mixed_precision) if mixed_precision else None,
        fold_bn=fold_bn,
    )
    if fold_bn:
        click.echo(f"folded {len(result.steps[0].layers)} BatchNorm layers (--no-fold-bn keeps them)")
    for step in result.steps:
        metric = "skipped" if step.metric is None else f"{step.metric:.4f}"
        click.echo(f"{step.name:<24} {metric:>8}  {step.seconds:7.2f} s{'  (cached)' if step.cached else ''}")
    verdict = "target met" if result.target_met else "target NOT met"
    click.echo(f"{verdict}: best {result.best_step} {result.best_metric:.4f} (FP32 {result.fp32_metric:.4f}, "
               f"target {result.target_metric:.4f})")
    if result.recommendation:
        click.echo(result.recommendation)
    best = _write_best(result, job, options, settings, fold_bn, out_dir / BEST_FOLDER)
    click.echo(f"sim state: {best}\nreport:    {result.report_path}")


def _write_best(result: AutoQuantResult, job: Job, options: JobOptions, settings: SimSettings, fold_bn: bool,
                folder: Path) -> Path:
    """The best candidate as quantize writes a sim: ``sim_state.pt`` with the ``input_spec.json`` and
    ``summary.json`` that rebuild its float model (BNs folded at or after the bn_fold step, equalized in the cle
    stage), so that ``export --sim-state`` and ``--from`` take it as it is."""
    record = next(step for step in result.steps if step.name == result.best_step)
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "sim_state.pt"
    shutil.copyfile(result.sim_state_path, state)
    job.spec.fold_bn = fold_bn or record.stage != "original"
    job.spec.save(folder)
    scheme = {"scheme": record.scheme} if isinstance(record.scheme, str) else {}  # a dict: not an option's value
    summary = {
        "settings": {"param_bw": settings.param_bw, "output_bw": settings.output_bw, "config": settings.config,
                     **scheme},
        "autoquant": {"best_step": result.best_step, "best_metric": result.best_metric,
                      "fp32_metric": result.fp32_metric, "target_metric": result.target_metric,
                      "target_met": result.target_met, "candidate": str(result.sim_state_path)},
        EQUALIZED_KEY: record.stage == "cle", **sources(options),
    }
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return state


def _candidates(text: str) -> list[tuple[int, int]]:
    """``'8,8;8,16'`` -> [(8, 8), (8, 16)]."""
    try:
        pairs = [tuple(int(v) for v in pair.split(",")) for pair in text.split(";") if pair.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise click.BadParameter(f"{text!r}: expected param,output bit-width pairs such as '8,8;8,16;4,8'",
                                 param_hint="--mixed-precision")
    return pairs
