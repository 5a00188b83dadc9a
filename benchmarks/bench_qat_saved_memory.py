"""Memory a QAT forward holds for its backward: FP32 vs regular QAT vs range learning, fused CPU loops vs eager.

Peak RSS is too noisy on a shared VM to compare quantizer implementations (hundreds of MiB between runs of the
same code), so this counts what autograd saves: the distinct storages handed to
`torch.autograd.graph.saved_tensors_hooks` during one training forward, which stay alive until the backward. The
figures are deterministic. "eager passes" runs the same code in a child process with ``EDGEQUANT_FUSED_CPU=0``.

    python -m benchmarks.bench_qat_saved_memory [--batch-size 8] [--models resnet18 mobilenet_v2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

from benchmarks.bench_sim_speed import build_model, qat_modules


def saved_mib(module: nn.Module, batch: torch.Tensor) -> float:
    """MiB of distinct storages autograd keeps from one training forward of ``module``."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        module(batch)
    return sum(storages.values()) / 2**20


def measure(model_name: str, batch_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = torch.randn(batch_size, 3, 224, 224)
    return {name: saved_mib(module, batch) for name, module in qat_modules(model, batch).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # prints one model's figures
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.models[0], args.batch_size)))
        return
    print(f"saved for backward after one training forward, batch {args.batch_size}x3x224x224, "
          f"torch {torch.__version__}")
    for model_name in args.models:
        fused = measure(model_name, args.batch_size)
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_qat_saved_memory", "--child", "--models", model_name,
             "--batch-size", str(args.batch_size)],
            env={**os.environ, "EDGEQUANT_FUSED_CPU": "0"}, check=True, capture_output=True, text=True)
        eager = json.loads(child.stdout.strip().splitlines()[-1])
        cells = [f"fp32 {fused['fp32']:5.0f} MiB"] + [
            f"{name} {fused[name]:5.0f} MiB (eager passes {eager[name]:5.0f} MiB, "
            f"fused/eager {fused[name] / eager[name]:.2f})" for name in ("qat regular", "qat range learning")]
        print(f"{model_name:14s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
