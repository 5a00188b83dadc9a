"""Simulated (W8A8) forward time / FP32 forward time for torchvision resnet18 and mobilenet_v2.

Batch 32, 224x224, random init (speed does not depend on the weights), 2 threads, median of interleaved
runs. Target: <= 1.3x.

    python benchmarks/bench_sim_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from benchmarks.timing import interleaved_medians
from edgequant import QuantSim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, 224, 224, device=args.device)
    print(f"batch {args.batch_size}x3x224x224 on {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name in ("resnet18", "mobilenet_v2"):
        model = getattr(torchvision.models, name)(weights=None).eval().to(args.device)
        sim = QuantSim(model, batch[:1])
        sim.calibrate([batch[:8]], progress=False)
        medians = interleaved_medians({"fp32": lambda m=model: m(batch), "sim": lambda m=sim.model: m(batch)},
                                      repeats=args.repeats)
        ratio = medians["sim"] / medians["fp32"]
        print(f"{name:<13} fp32 {medians['fp32'] * 1e3:7.0f} ms   sim {medians['sim'] * 1e3:7.0f} ms   "
              f"ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
