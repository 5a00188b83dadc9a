"""W4A8 (per-channel weights) on ImageNet-pretrained EfficientNet-Lite0: min-max weight encodings vs sequential MSE
(`edgequant.llm.sequential_mse`, which picks each channel's range by its output error), on the task and data of
`bench_adaround_effnet.py`, so its figures stand beside AdaRound's. Usage:

    python -m benchmarks.bench_seqmse_effnet [--calibration-crops 128] [--crops 128] [--candidates 20]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.bench_adaround_effnet import agreement, w4a8_sim
from edgequant.llm import SequentialMseSettings, sequential_mse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-crops", type=int, default=128)
    parser.add_argument("--crops", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=20)
    args = parser.parse_args()
    sim, batches, evaluation, reference = w4a8_sim(args.calibration_crops, args.crops)
    nearest = agreement(sim.model, evaluation, reference)
    started = time.perf_counter()
    report = sequential_mse(sim, batches, SequentialMseSettings(num_candidates=args.candidates, progress=False))
    wall = time.perf_counter() - started
    sim.calibrate(batches, progress=False)  # activation encodings see the new weight grids
    searched = agreement(sim.model, evaluation, reference)
    print(f"EfficientNet-Lite0 W4A8 per-channel, {args.calibration_crops} calibration crops, {args.crops} evaluation "
          f"crops, {len(report.layers)} layers, {args.candidates} candidates")
    print(f"  min-max:        top-1 agreement {nearest[0]:.1%}, KL {nearest[1]:.3f}")
    print(f"  sequential MSE: top-1 agreement {searched[0]:.1%}, KL {searched[1]:.3f}, {wall:.1f} s")


if __name__ == "__main__":
    main()
