"""W8A8 per-tensor accuracy of a depthwise-separable model before/after BN folding, CLE and bias correction.

Models: the bundled depthwise digits CNN (accuracy on its test split) and ImageNet-pretrained
EfficientNet-Lite0 (top-1 agreement with FP32 on natural-image crops; needs benchmarks/requirements.txt).
Default config: symmetric per-tensor int8 weights, asymmetric per-tensor int8 activations, min-max ranges.

    python benchmarks/bench_cle.py [--skip-efficientnet] [--eval-crops 64] [--calib-crops 32]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgequant import QuantSim
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.ptq import correct_bias, equalize, fold_batch_norms

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def run_steps(
    model: nn.Module, dummy: torch.Tensor, calib: torch.Tensor, bc_data: torch.Tensor, metric: Callable
) -> list[tuple[str, float, float]]:
    """(step, metric, seconds spent in the PTQ step itself) for each pipeline."""
    rows = []

    def simulate(float_model: nn.Module) -> QuantSim:
        sim = QuantSim(float_model, dummy)
        sim.calibrate(_batches(calib, 16), progress=False)
        return sim

    rows.append(("FP32", metric(model), 0.0))
    rows.append(("W8A8 naive (BNs unfolded)", metric(simulate(model).model), 0.0))
    folded = copy.deepcopy(model)
    start = time.perf_counter()
    fold_batch_norms(folded, dummy)
    rows.append(("W8A8 after BN fold", metric(simulate(folded).model), time.perf_counter() - start))
    variants = (
        ("CLE, paper's weight-only scales", False, False),
        ("CLE (activation-aware), no high-bias absorption", True, False),
        ("CLE (activation-aware) + high-bias absorption", True, True),
    )
    for label, aware, absorb in variants:
        equalized = copy.deepcopy(model)
        start = time.perf_counter()
        equalize(equalized, dummy, absorb_high_bias=absorb, activation_aware=aware)
        seconds = time.perf_counter() - start
        rows.append((f"W8A8 after BN fold + {label}", metric(simulate(equalized).model), seconds))
    sim = simulate(equalized)
    start = time.perf_counter()
    correct_bias(sim, _batches(bc_data, 16), progress=False)
    rows.append(("W8A8 after BN fold + CLE + HBA + empirical bias correction", metric(sim.model),
                 time.perf_counter() - start))
    return rows


def _print(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(f"\n{title}")
    for step, value, seconds in rows:
        print(f"  {step:<72} {100 * value:6.2f}%   (step {seconds:5.1f} s)")


def digits() -> None:
    model = load_pretrained("digits_dwcnn")
    images, labels = load_digits_tensors("test")
    calib, _ = load_digits_tensors("train")
    rows = run_steps(model, images[:1], calib[:256], calib[:256], lambda m: evaluate_accuracy(m, images, labels))
    _print("digits_dwcnn, test accuracy (450 images), calibration 256 train images", rows)


def efficientnet(eval_crops: int, calib_crops: int) -> None:
    from real_models import load_efficientnet_lite0, natural_image_crops

    model = load_efficientnet_lite0()
    evaluation = natural_image_crops(eval_crops, seed=0)
    calib = natural_image_crops(calib_crops, seed=1)
    with torch.no_grad():
        reference = model(evaluation).argmax(1)

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            return float((torch.cat([m(b) for b in _batches(evaluation, 32)]).argmax(1) == reference).float().mean())

    rows = run_steps(model, evaluation[:1], calib, calib[:16], agreement)
    _print(f"EfficientNet-Lite0, top-1 agreement with FP32 on {eval_crops} crops at 224, "
           f"calibration {calib_crops} other crops, bias correction on 16", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument("--eval-crops", type=int, default=64)
    parser.add_argument("--calib-crops", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    digits()
    if not args.skip_efficientnet:
        efficientnet(args.eval_crops, args.calib_crops)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
