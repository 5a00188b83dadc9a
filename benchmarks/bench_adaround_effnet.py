"""W4A8 (per-channel weights) on ImageNet-pretrained EfficientNet-Lite0: nearest rounding vs AdaRound.

Metric: top-1 agreement with the FP32 model and mean KL on natural-image crops (scikit-image photos), BN folded
first. Runs on a GPU when there is one. Usage:

    python -m benchmarks.bench_adaround_effnet [--iterations 1000] [--calibration-crops 64] [--crops 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops
from edgequant import QuantSim
from edgequant.ptq.adaround import adaround
from edgequant.ptq.batch_norm_fold import fold_batch_norms


def agreement(model: torch.nn.Module, crops: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with the FP32 logits and mean KL(FP32 || quantized)."""
    with torch.no_grad():
        logits = torch.cat([model(batch) for batch in crops.split(32)])
    top1 = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    kl = F.kl_div(logits.log_softmax(1), reference.log_softmax(1), log_target=True, reduction="batchmean").item()
    return top1, kl


def w4a8_sim(calibration_crops: int, crops: int, device: str = "cpu"
             ) -> tuple[QuantSim, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The task: EfficientNet-Lite0 with BN folded, W4A8 per channel, calibrated; its calibration batches, the
    evaluation crops and the FP32 logits on them."""
    model = load_efficientnet_lite0().to(device)
    calibration = natural_image_crops(calibration_crops, seed=1).to(device)
    evaluation = natural_image_crops(crops, seed=0).to(device)
    fold_batch_norms(model, calibration[:1])
    with torch.no_grad():
        reference = torch.cat([model(batch) for batch in evaluation.split(32)])
    batches = list(calibration.split(16))
    sim = QuantSim(model, calibration[:1], param_bw=4, output_bw=8, config="per_channel")
    sim.calibrate(batches, progress=False)
    return sim, batches, evaluation, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--calibration-crops", type=int, default=64)
    parser.add_argument("--crops", type=int, default=64)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sim, batches, evaluation, reference = w4a8_sim(args.calibration_crops, args.crops, device)
    nearest = agreement(sim.model, evaluation, reference)
    started = time.perf_counter()
    result = adaround(sim, batches, num_iterations=args.iterations, progress=False)
    wall = time.perf_counter() - started
    sim.calibrate(batches, progress=False)  # activation encodings see the rounded weights
    rounded = agreement(sim.model, evaluation, reference)
    per_layer_k = result.optimize_seconds / len(result.layers) / (args.iterations / 1000)
    share = result.optimize_seconds / (result.optimize_seconds + result.collect_seconds)
    print(f"EfficientNet-Lite0 W4A8 per-channel on {device}, {args.calibration_crops} calibration crops, "
          f"{args.crops} evaluation crops, {args.iterations} iterations, {len(result.layers)} layers")
    print(f"  nearest rounding: top-1 agreement {nearest[0]:.1%}, KL {nearest[1]:.3f}")
    print(f"  AdaRound:         top-1 agreement {rounded[0]:.1%}, KL {rounded[1]:.3f}")
    print(f"  AdaRound wall {wall:.1f} s, {per_layer_k:.2f} s per layer per 1000 it, optimisation {share:.1%} "
          f"(collection {result.collect_seconds:.1f} s)")


if __name__ == "__main__":
    main()
