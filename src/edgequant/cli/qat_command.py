"""``edgequant qat``: calibrate, fine-tune with quantization-aware training, write the sim state, export, summary.

Label-free: the data needs no labels (the quantized model is distilled from the FP32 one). With no --model and
no --data it runs on the bundled digits CNN and reports its test accuracy before and after.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgequant import __version__
from edgequant.cli.data import bitwidth_options, data_options, demo_model_option, device_option, quiet_option
from edgequant.cli.errors import debug_option
from edgequant.cli.job import JobOptions, SimSettings, build_job, pass_job_options
from edgequant.cli.sim_state import from_option, options_from_run, sources
from edgequant.quantization import QUANT_SCHEMES


@click.command()
@from_option
@demo_model_option
@data_options
@click.option("--eval", "eval_spec", metavar="SPEC",
              help="'module:function' called as function(model) -> float (higher is better), before and after QAT "
                   "and after each epoch (the best epoch is kept).")
@bitwidth_options
@click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default="minmax", show_default=True,
              help="Calibration method of the initial encodings.")
@click.option("--mode", type=click.Choice(["regular", "range_learning"]), default="range_learning",
              show_default=True, help="regular: weights train, weight encodings follow them; range_learning: "
                                      "scales/offsets train too (LSQ).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Training epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Learning rate of the weights (Adam).")
@click.option("--batch-norm", type=click.Choice(["fold", "keep"]), default="fold", show_default=True,
              help="fold: train with BatchNorms folded; keep: train them, re-estimate and fold after training.")
@click.option("--freeze-bn-after", type=click.IntRange(min=0), help="With --batch-norm keep: freeze BN statistics "
                                                                    "after this many steps.")
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in OUT/checkpoints.")
@device_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("edgequant_qat"),
              show_default=True, help="Output folder.")
@quiet_option
@debug_option
@pass_job_options
def qat(
    options: JobOptions, settings: SimSettings, mode: str, epochs: int, lr: float, batch_norm: str,
    freeze_bn_after: int | None, resume: bool, out_dir: Path, quiet: bool, from_dir: Path | None,
) -> None:
    """Quantization-aware training: calibrate, fine-tune, and write the sim state, the export and a summary."""
    from edgequant.qat import finalize, finetune, prepare_qat

    options, settings, _ = options_from_run(from_dir, options, settings, takes_weight_granularity=True)
    job = build_job(options, settings, demo_batch_size=64)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    sim = settings.sim(job.model, job.dummy_input)
    sim.calibrate(job.batches, num_batches=job.num_batches, progress=not quiet)
    timings["calibrate_s"] = time.perf_counter() - started
    metrics: dict[str, Any] = {}
    if job.evaluate is not None:
        metrics["fp32"] = float(job.evaluate(job.model))
        metrics["ptq"] = float(job.evaluate(sim.model))
    setup = prepare_qat(sim, mode, batch_norm=batch_norm, freeze_bn_after=freeze_bn_after)
    click.echo(setup.describe().splitlines()[0])

    started = time.perf_counter()
    training = job.batches if job.num_batches is None else list(itertools.islice(job.batches, job.num_batches))
    result = finetune(sim, training, epochs=epochs, lr=lr, eval_fn=job.evaluate,
                      checkpoint_dir=out_dir / "checkpoints", resume=resume, progress=not quiet)
    folded = finalize(sim, job.batches, num_batches=job.num_batches or 100, progress=not quiet)
    timings["qat_s"] = time.perf_counter() - started
    if job.evaluate is not None:
        metrics["qat"] = float(job.evaluate(sim.model))
        click.echo(f"metric: FP32 {metrics['fp32']:.4f}  PTQ {metrics['ptq']:.4f}  QAT ({mode}) {metrics['qat']:.4f}")
        if result.kept_start:
            click.echo(f"QAT did not improve --eval over its start ({result.start_metric:.4f}): the calibrated start "
                       "is kept and written")

    out_dir.mkdir(parents=True, exist_ok=True)
    sim.save(out_dir / "sim_state.pt")
    job.spec.fold_bn = True  # BNs are folded after QAT whatever --batch-norm says: export/verify rebuild it folded
    job.spec.save(out_dir)

    exported = sim.export(out_dir / "export")
    summary = {
        "edgequant_version": __version__, "model": job.model_name, "data": job.data_name,
        "settings": {**asdict(settings), "mode": mode, "epochs": epochs, "lr": lr, "batch_norm": batch_norm},
        "input_spec": asdict(job.spec),
        "quantizers": {"learned": {n: r.grad_scale for n, r in setup.learned.items()},
                       "recomputed_each_step": list(setup.recomputed), "constant": list(setup.constant)},
        "batch_norms_folded": [bn for _, bn in setup.folded_batch_norms + folded],
        "steps": result.steps, "history": result.history, "best_metric": result.best_metric,
        "start_metric": result.start_metric, "kept_start": result.kept_start,
        "metric": metrics or None, "timings": timings, **sources(options),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    click.echo(f"wrote {out_dir / 'sim_state.pt'}, {exported.qdq_model}, {out_dir / 'summary.json'}")

