"""One QAT epoch on 1 process vs 2 DDP processes (gloo, CPU, one thread each), the digits CNN.

Each process runs `finetune` (label-free, batch 64 per process) for one epoch of the 1348-image train split,
``--repeats`` times after a warm-up epoch; with 2 processes each rank trains on half of the split (a
``DistributedSampler``), so an epoch is half the steps at twice the global batch. Printed: median wall and
process CPU seconds per epoch (the slower rank's for 2 processes), W4A4 per-channel, both QAT modes.

    python -m benchmarks.bench_qat_ddp [--repeats 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.qat import finetune
from edgequant.sim import QuantSim

MODES = ("regular", "range_learning")


def epoch_seconds(mode: str, repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of one `finetune` epoch in this process (in its process group, if any)."""
    torch.set_num_threads(1)
    images, _ = load_digits_tensors("train")
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, output_bw=4, config="per_channel")
    sim.calibrate(list(images.split(64)), progress=False)
    wall, cpu = [], []
    for repeat in range(repeats + 1):
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        finetune(sim, images, epochs=1, lr=1e-4, mode=mode, batch_size=64, seed=repeat, progress=False)
        if repeat:  # the first epoch warms up
            wall.append(time.perf_counter() - started_wall)
            cpu.append(time.process_time() - started_cpu)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def _rank(rank: int, port: int, world_size: int, repeats: int, out_dir: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save({mode: epoch_seconds(mode, repeats) for mode in MODES}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_processes(repeats: int) -> dict[str, dict[str, float]]:
    """Per mode, the slower rank's median epoch seconds with 2 DDP processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(port, 2, repeats, Path(out)), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]
    return {mode: {key: max(r[mode][key] for r in ranks) for key in ("wall_s", "cpu_s")} for mode in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    single = {mode: epoch_seconds(mode, args.repeats) for mode in MODES}
    double = two_processes(args.repeats)
    print("| mode | 1 process wall / CPU | 2 processes wall / CPU (slower rank) | wall ratio 2p/1p |")
    print("|---|---|---|---|")
    for mode in MODES:
        one, two = single[mode], double[mode]
        print(f"| {mode} | {one['wall_s']:.2f} s / {one['cpu_s']:.2f} s | {two['wall_s']:.2f} s / "
              f"{two['cpu_s']:.2f} s | {two['wall_s'] / one['wall_s']:.2f}× |")


if __name__ == "__main__":
    main()
