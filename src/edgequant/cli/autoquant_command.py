"""``edgequant autoquant``: the AutoQuant ladder from the command line (registered by `edgequant.cli`)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from edgequant.cli.inputs import dummy_from_batch, load_batches, load_model, load_object, parse_shape, peek
from edgequant.config import HardwareConfig


@click.command()
@click.option("--model", "-m", "model_spec", metavar="SPEC",
              help="'package.module:factory', 'file.py:factory', a .pt2 or a TorchScript file; "
                   "default: the bundled digits CNN with its test-set accuracy as metric.")
@click.option("--data", "-d", "data_spec", metavar="SPEC",
              help="Calibration data: a folder of images, a .pt/.npy tensor file, or 'module:function'.")
@click.option("--eval", "eval_spec", metavar="SPEC",
              help="'module:function' called as function(model) -> float (higher is better); required with --model.")
@click.option("--input-shape", metavar="N,C,H,W", help="Shape of the dummy input; default: the first batch.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--num-batches", type=click.IntRange(min=1), help="Use at most this many calibration batches.")
@click.option("--allowed-drop", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Largest acceptable metric drop from FP32 (absolute, in the metric's units).")
@click.option("--param-bw", type=click.IntRange(2, 16), default=8, show_default=True)
@click.option("--output-bw", type=click.IntRange(2, 16), default=8, show_default=True)
@click.option("--config", default="default", show_default=True,
              help=f"Hardware config: a preset ({', '.join(HardwareConfig.preset_names())}) or a JSON file.")
@click.option("--schemes", default="minmax,sqnr,percentile", show_default=True,
              help="Calibration schemes to compare, comma-separated.")
@click.option("--adaround-iterations", type=click.IntRange(min=0), default=10000, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("autoquant_results"),
              show_default=True, help="Cache of finished steps (a rerun resumes) and the HTML report.")
@click.option("--device", default="auto", show_default=True, help="'cpu', 'cuda'... ('auto': GPU if any).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def autoquant(
    model_spec: str | None, data_spec: str | None, eval_spec: str | None, input_shape: str | None, batch_size: int,
    num_batches: int | None, allowed_drop: float, param_bw: int, output_bw: int, config: str, schemes: str,
    adaround_iterations: int, results_dir: Path, device: str, quiet: bool,
) -> None:
    """Find the cheapest PTQ recipe meeting FP32 - allowed drop; writes the best sim and an HTML report."""
    from edgequant.workflows import autoquant as run_autoquant

    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if model_spec is None:
        if data_spec or eval_spec:
            raise click.UsageError("--data and --eval need --model (without them, the bundled digits demo runs)")
        model, dummy, batches, evaluate = _digits_job(batch_size)
    else:
        if data_spec is None or eval_spec is None:
            raise click.UsageError("--model needs --data and --eval")
        shape = parse_shape(input_shape) if input_shape else None
        first, batches = peek(load_batches(data_spec, batch_size, shape))
        dummy = torch.zeros(shape) if shape is not None else dummy_from_batch(first)
        batches = list(batches)  # every step iterates the data again
        model = load_model(model_spec, lambda: (dummy,))
        evaluate = load_object(eval_spec, "evaluation function")
        if not callable(evaluate):
            raise click.UsageError(f"--eval {eval_spec!r} is not callable")
    model = model.to(target)
    dummy = dummy.to(target) if isinstance(dummy, torch.Tensor) else dummy
    result = run_autoquant(
        model, dummy, batches, evaluate, allowed_accuracy_drop=allowed_drop, param_bw=param_bw,
        output_bw=output_bw, config=config, results_dir=results_dir, num_batches=num_batches,
        schemes=tuple(name.strip() for name in schemes.split(",") if name.strip()),
        adaround_iterations=adaround_iterations, progress=not quiet,
    )
    for step in result.steps:
        metric = "skipped" if step.metric is None else f"{step.metric:.4f}"
        click.echo(f"{step.name:<24} {metric:>8}  {step.seconds:7.2f} s{'  (cached)' if step.cached else ''}")
    verdict = "target met" if result.target_met else "target NOT met"
    click.echo(f"{verdict}: best {result.best_step} {result.best_metric:.4f} (FP32 {result.fp32_metric:.4f}, "
               f"target {result.target_metric:.4f})")
    if result.recommendation:
        click.echo(result.recommendation)
    click.echo(f"sim state: {result.sim_state_path}\nreport:    {result.report_path}")


def _digits_job(batch_size: int) -> tuple:
    from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained

    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    return (load_pretrained("digits_cnn"), train_images[:1], list(train_images.split(batch_size)),
            lambda model: evaluate_accuracy(model, test_images, test_labels))
