"""``edgequant analyze``: QuantAnalyzer from the command line (registered by `edgequant.cli`)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from edgequant.cli.errors import debug_option
from edgequant.cli.inputs import dummy_from_batch, load_batches, load_model, load_object, parse_shape, peek
from edgequant.config import HardwareConfig
from edgequant.quantization import QUANT_SCHEMES

RANKED_LINES = 5


@click.command()
@click.option("--model", "-m", "model_spec", metavar="SPEC",
              help="'package.module:factory', 'file.py:factory', a .pt2 or a TorchScript file; "
                   "default: the bundled digits CNN with its test-set accuracy as metric.")
@click.option("--data", "-d", "data_spec", metavar="SPEC",
              help="Calibration data: a folder of images, a .pt/.npy tensor file, or 'module:function'.")
@click.option("--eval", "eval_spec", metavar="SPEC",
              help="'module:function' called as function(model) -> float (higher is better); default: fidelity "
                   "of the model outputs to FP32 on the calibration data.")
@click.option("--input-shape", metavar="N,C,H,W", help="Shape of the dummy input; default: the first batch.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size when splitting a tensor file or an image folder.")
@click.option("--num-batches", type=click.IntRange(min=1),
              help="Analyse (per-layer pass, default metric) at most this many batches; calibration uses all.")
@click.option("--param-bw", type=click.IntRange(2, 16), default=8, show_default=True,
              help="Bit width of weights and other parameters.")
@click.option("--output-bw", type=click.IntRange(2, 16), default=8, show_default=True,
              help="Bit width of activations (layer outputs and model inputs).")
@click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default="minmax", show_default=True,
              help="Calibration method (encoding analyzer).")
@click.option("--config", default="default", show_default=True,
              help=f"Hardware config: a preset ({', '.join(HardwareConfig.preset_names())}) or a JSON file.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("edgequant_analysis"), show_default=True,
              help="Output folder (analysis.json, report.html, layer_outputs.npz).")
@click.option("--device", default="auto", show_default=True, help="'cpu', 'cuda'... ('auto': GPU if any).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@debug_option
def analyze(
    model_spec: str | None, data_spec: str | None, eval_spec: str | None, input_shape: str | None, batch_size: int,
    num_batches: int | None, param_bw: int, output_bw: int, scheme: str, config: str, out_dir: Path, device: str,
    quiet: bool,
) -> None:
    """Find where quantization loses accuracy: per-layer sensitivity, output SQNR along the network, ranges.

    Writes analysis.json, an interactive report.html and the per-layer outputs (FP32 and sim) of the first
    batch under their ONNX tensor names.
    """
    from edgequant.analysis import QuantAnalyzer

    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if model_spec is None:
        if data_spec or eval_spec:
            raise click.UsageError("--data and --eval need --model (without them, the bundled digits demo runs)")
        model, dummy, batches, evaluate = _digits_job(batch_size)
    else:
        if data_spec is None:
            raise click.UsageError("--model needs --data (calibration batches)")
        shape = parse_shape(input_shape) if input_shape else None
        first, batches = peek(load_batches(data_spec, batch_size, shape))
        dummy = torch.zeros(shape) if shape is not None else dummy_from_batch(first)
        model = load_model(model_spec, lambda: (dummy,))
        evaluate = load_object(eval_spec, "evaluation function") if eval_spec else None
        if evaluate is not None and not callable(evaluate):
            raise click.UsageError(f"--eval {eval_spec!r} is not callable")
    model = model.to(target)
    dummy = dummy.to(target) if isinstance(dummy, torch.Tensor) else dummy
    analyzer = QuantAnalyzer(model, dummy, batches, evaluate, param_bw=param_bw, output_bw=output_bw,
                             quant_scheme=scheme, config=config, progress=not quiet)
    result = analyzer.analyze(out_dir, num_batches=num_batches)
    click.echo(f"metric: {result.metric_name}")
    for label, value in (("FP32", result.fp32_metric), ("quantized", result.quantized_metric),
                         ("weights only", result.weights_only_metric),
                         ("activations only", result.activations_only_metric)):
        click.echo(f"  {label:<17} {value:.4f}")
    click.echo("most sensitive (metric gain if kept in float):")
    for layer in result.ranking()[:RANKED_LINES]:
        click.echo(f"  {layer.name:<30} {layer.gain_if_kept_in_float(result.quantized_metric):+.4f}")
    click.echo(f"wrote {', '.join(str(path) for path in result.files)}")


def _digits_job(batch_size: int) -> tuple:
    from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained

    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    return (load_pretrained("digits_cnn"), train_images[:1], list(train_images.split(batch_size)),
            lambda model: evaluate_accuracy(model, test_images, test_labels))
