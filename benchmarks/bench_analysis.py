"""QuantAnalyzer figures: sensitivity ranking and gap recovery, wall time and files as FP32 evaluations.

* ``digits``: digits CNN at W4A8 (default per-tensor config), eval_fn = test-set accuracy. Ranks the layers,
  then keeps the top-k (and, as a control, the bottom-k) ranked layers wider (weights 8-bit, activations
  16-bit) in a fresh sim and measures how much of the FP32 gap that recovers.
* ``resnet18``: torchvision resnet18, random init, 8 calibration batches (default 4 at 224x224), default metric (output
  fidelity on the 8 batches); one FP32 evaluation = the FP32 model on those 8 batches.
* ``effnet``: EfficientNet-Lite0 (ImageNet weights, BN folded first, explicitly) at W8A8 per-tensor, ranked with
  the default metric (output fidelity on the calibration batches: its sweeps start at each layer's cut); the
  recovery of keeping the top-k (and bottom-k) layers at 16 bit (weights and activations) is measured with
  top-1 agreement with FP32 on separate natural-image crops and with the fidelity. Needs the bench extras.

Usage: ``python -m benchmarks.bench_analysis digits|resnet18|effnet [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from torch import nn

from benchmarks.timing import interleaved_medians
from edgequant import QuantSim
from edgequant.analysis import AnalysisResult, OutputFidelity, QuantAnalyzer


def run_analysis(model: nn.Module, dummy: Any, batches: list, eval_fn: Callable | None, fp32_eval: Callable,
                 **settings: Any) -> AnalysisResult:
    """Analyse, then print wall time and files as a multiple of one FP32 evaluation (``fp32_eval``); the
    output folder is kept where ``EDGEQUANT_ANALYSIS_OUT`` points."""
    one_eval = interleaved_medians({"fp32": fp32_eval}, repeats=3)["fp32"]
    cpu_started = time.process_time()
    for _ in range(3):
        fp32_eval()
    one_eval_cpu = (time.process_time() - cpu_started) / 3
    keep = os.environ.get("EDGEQUANT_ANALYSIS_OUT")
    with TemporaryDirectory() as temporary:
        out_dir = keep or temporary
        started, cpu_started = time.perf_counter(), time.process_time()
        analyzer = QuantAnalyzer(model, dummy, batches, eval_fn, progress=False, **settings)
        result = analyzer.analyze(out_dir)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        segmented = analyzer.sim.split_at_layers(analyzer.layers()) if eval_fn is None else None
        files = list(Path(out_dir).iterdir())
        size = sum(path.stat().st_size for path in files)
    print(f"  one FP32 evaluation {one_eval:.3f} s; analysis {wall:.1f} s = {wall / one_eval:.0f} FP32 evaluations; "
          f"{len(files)} files, {size / 1e6:.1f} MB ({', '.join(sorted(p.name for p in files))})")
    print(f"  CPU time: one FP32 evaluation {one_eval_cpu:.3f} s; analysis {cpu:.1f} s = {cpu / one_eval_cpu:.0f} "
          "FP32 evaluations")
    print(f"  phases: {', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())}")
    print(f"  per-layer sweeps from the layer's cut: {len(segmented.layers) if segmented else 0} of "
          f"{len(analyzer.layers())} layers (the rest: full evaluations)")
    print(f"  metric: FP32 {result.fp32_metric:.4f}, quantized {result.quantized_metric:.4f}, weights only "
          f"{result.weights_only_metric:.4f}, activations only {result.activations_only_metric:.4f}")
    print("  ranking (gain if kept in float): " + ", ".join(
        f"{layer.name} {layer.gain_if_kept_in_float(result.quantized_metric):+.4f}" for layer in result.ranking()[:6]))
    return result


def recovery(model: nn.Module, dummy: Any, batches: list, metrics: dict[str, Callable], result: AnalysisResult,
             wide_param_bw: int, ks: tuple[int, ...], **settings: Any) -> None:
    """Each metric of fresh sims with the top-k (and bottom-k) ranked layers' quantizers wider (weights
    ``wide_param_bw``, activations 16 bit), then calibrated; the gap is FP32's metric minus the plain sim's."""
    ranked = [layer for layer in result.ranking() if layer.name != "<model input>"]
    runs = [("plain", [])] + [(f"{label}-{k}", chosen) for k in ks
                              for label, chosen in (("top", ranked[:k]), ("bottom", ranked[-k:]))]
    fp32 = {name: metric(model) for name, metric in metrics.items()}
    baseline: dict[str, float] = {}
    for label, chosen in runs:
        sim = QuantSim(model, dummy, **settings)
        for layer in chosen:
            for name in layer.quantizers:
                quantizer = sim.quantizer(name)
                quantizer.bitwidth = wide_param_bw if quantizer.role == "param" else 16
        sim.calibrate(batches, progress=False)
        figures = []
        for name, metric in metrics.items():
            value = metric(sim.model)
            baseline.setdefault(name, value)  # the plain sim runs first
            gap = fp32[name] - baseline[name]
            recovered = (value - baseline[name]) / gap if gap > 0 else float("nan")
            figures.append(f"{name} {value:.4f} " + (f"({recovered:.0%} of the gap)" if chosen else
                                                     f"(FP32 {fp32[name]:.4f})"))
        print(f"  {label} wider ({', '.join(layer.name for layer in chosen) or 'none'}): {'; '.join(figures)}")


def fp32_on_batches(model: nn.Module, batches: list) -> Callable[[], None]:
    """One FP32 evaluation of the default metric: the FP32 model on the analysis batches."""
    def fp32_eval() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    return fp32_eval


def digits() -> None:
    from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained

    model = load_pretrained("digits_cnn")
    train, _ = load_digits_tensors("train")
    test, labels = load_digits_tensors("test")
    batches = list(train.split(64))

    def accuracy(m: nn.Module) -> float:
        return evaluate_accuracy(m, test, labels)

    print("digits CNN, W4A8 per-tensor (default config), eval_fn = test accuracy (449 images), "
          f"{len(batches)} calibration batches of 64")
    result = run_analysis(model, train[:1], batches, accuracy, lambda: accuracy(model), param_bw=4, output_bw=8)
    recovery(model, train[:1], batches, {"accuracy": accuracy}, result, 8, (1, 2, 3), param_bw=4, output_bw=8)


def resnet18(batch_size: int, size: int, full_sweeps: bool) -> None:
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    model = build().eval()
    batches = [torch.randn(batch_size, 3, size, size) for _ in range(8)]

    fp32_eval = fp32_on_batches(model, batches)
    print(f"resnet18 (random init), W8A8 default config, default metric, 8 calibration batches of {batch_size} at "
          f"{size}x{size}" + (" passed as a plain eval_fn (full evaluations, for comparison)" if full_sweeps else ""))
    eval_fn = None
    if full_sweeps:  # the same metric, but a callable the analyzer cannot look into
        with torch.no_grad():
            fidelity = OutputFidelity([((batch,), {}) for batch in batches], [model(batch) for batch in batches])

        def eval_fn(m: nn.Module) -> float:
            return fidelity(m)
    run_analysis(model, batches[0][:1], batches, eval_fn, fp32_eval)


def effnet(crops: int, calibration_crops: int, ks: tuple[int, ...]) -> None:
    from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops
    from edgequant.ptq.batch_norm_fold import fold_batch_norms

    model = load_efficientnet_lite0().eval()
    calibration = natural_image_crops(calibration_crops, seed=1)
    evaluation = natural_image_crops(crops, seed=0)
    fold_batch_norms(model, calibration[:1])
    with torch.no_grad():
        reference = torch.cat([model(batch) for batch in evaluation.split(32)]).argmax(1)

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            predictions = torch.cat([m(batch) for batch in evaluation.split(32)]).argmax(1)
        return (predictions == reference).float().mean().item()

    batches = list(calibration.split(16))
    print(f"EfficientNet-Lite0 (BN folded), W8A8 per-tensor (default config), default metric (output fidelity on "
          f"{len(batches)} calibration batches of 16); recovery also as top-1 agreement with FP32 on {crops} crops")
    analyzed = run_analysis(model, calibration[:1], batches, None, fp32_on_batches(model, batches))
    with torch.no_grad():
        fidelity = OutputFidelity([((batch,), {}) for batch in batches], [model(batch) for batch in batches])
    recovery(model, calibration[:1], batches, {"agreement": agreement, "fidelity": fidelity}, analyzed, 16, ks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("digits", "resnet18", "effnet"))
    parser.add_argument("--crops", type=int, default=64, help="effnet: evaluation crops")
    parser.add_argument("--calibration-crops", type=int, default=64, help="effnet: calibration crops")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10], help="effnet: top/bottom-k to widen")
    parser.add_argument("--batch-size", type=int, default=4, help="resnet18: calibration batch size")
    parser.add_argument("--size", type=int, default=224, help="resnet18: input height and width")
    parser.add_argument("--full-sweeps", action="store_true",
                        help="resnet18: pass the default metric as a plain eval_fn (every sweep a full evaluation)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "digits":
        digits()
    elif args.model == "resnet18":
        resnet18(args.batch_size, args.size, args.full_sweeps)
    else:
        effnet(args.crops, args.calibration_crops, tuple(args.ks))


if __name__ == "__main__":
    main()
