"""Calibration cost per analyzer: wall time per batch against one FP32 forward, and peak memory for 10 vs 100
batches.

Time: ``sim.calibrate`` over ``--batches`` batches (including the final encoding computation, which for
sqnr/percentile/mse is the histogram search) divided by the number of batches, over the median FP32
forward of the same batch. Targets: minmax <= 1.5x, sqnr <= 3x.

Memory: each (scheme, number of batches) runs in a fresh subprocess that reports how much its peak RSS
(``ru_maxrss``) and its resident RSS (what calibration keeps, e.g. histograms) grew during calibration;
batches are generated on the fly so the data itself takes no memory. Target: flat from 10 to 100 batches.

    python -m benchmarks.bench_calibration [--model resnet18] [--batches 4]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
import torchvision

from benchmarks.timing import interleaved_medians
from edgequant import QuantSim
from edgequant.quantization import QUANT_SCHEMES

MEMORY_SCHEMES = ("minmax", "sqnr", "percentile")


def time_calibration(model_name: str, batch_size: int, num_batches: int, repeats: int, device: str = "cpu") -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval().to(device)
    batches = [torch.randn(batch_size, 3, 224, 224, device=device) for _ in range(num_batches)]
    forward_s = interleaved_medians({"fp32": lambda: model(batches[0])}, repeats=repeats)["fp32"]
    print(f"{model_name}, batch {batch_size}x3x224x224, {num_batches} batches, FP32 forward {forward_s * 1e3:.0f} ms")
    for scheme in QUANT_SCHEMES:
        sim = QuantSim(model, batches[0][:1], quant_scheme=scheme)
        observed_s = 0.0

        def run(sim_model: torch.nn.Module) -> None:
            nonlocal observed_s
            started = time.perf_counter()
            for batch in batches:
                sim_model(batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            observed_s = time.perf_counter() - started

        started = time.perf_counter()
        sim.compute_encodings(run)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total_s = time.perf_counter() - started
        per_batch = total_s / num_batches
        print(f"  {scheme:<11} {per_batch * 1e3:6.0f} ms/batch = {per_batch / forward_s:.2f}x FP32 forward "
              f"(observing {observed_s / num_batches / forward_s:.2f}x, final encodings {total_s - observed_s:.2f} s)",
              flush=True)


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def memory_child(scheme: str, num_batches: int) -> None:
    """Runs in a subprocess: calibrate on ``num_batches`` generated batches; prints MiB of peak and resident
    RSS growth, and the peak."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    sim = QuantSim(model, torch.randn(1, 3, 96, 96), quant_scheme=scheme)
    sim.calibrate((torch.randn(8, 3, 96, 96) for _ in range(2)), progress=False)  # allocator warm-up
    peak_before, resident_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resident_mib()
    sim.calibrate((torch.randn(8, 3, 96, 96) for _ in range(num_batches)), progress=False)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print((peak_after - peak_before) / 1024, resident_mib() - resident_before, peak_after / 1024)


def measure_memory() -> None:
    print("peak RSS growth during calibration (mobilenet_v2, batch 8x3x96x96, fresh process each)")
    for scheme in MEMORY_SCHEMES:
        growth = {}
        for num_batches in (10, 100):
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_calibration", "--memory-child", scheme, str(num_batches)],
                check=True, capture_output=True, text=True,
            ).stdout.split()
            growth[num_batches] = [float(value) for value in output]
        shown = "   ".join(f"{n} batches: peak +{g[0]:.1f} MiB, resident {g[1]:+.1f} MiB (peak {g[2]:.0f} MiB)"
                           for n, g in growth.items())
        print(f"  {scheme:<11} {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=("time", "memory", "all"), default="all")
    parser.add_argument("--memory-child", nargs=2, metavar=("SCHEME", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    if args.part in ("time", "all"):
        with torch.no_grad():
            time_calibration(args.model, args.batch_size, args.batches, args.repeats, args.device)
    if args.part in ("memory", "all"):
        measure_memory()


if __name__ == "__main__":
    main()
