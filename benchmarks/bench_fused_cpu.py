"""One ReLU6 and the 8-bit quantizer after it, on the CPU: why `edgequant.quantization.fused_cpu` is a C loop.

For each tensor size, round-robin in one process (`benchmarks.timing`), in place as the sim runs them:

* ``relu6 alone``: the float model's pass (``F.hardtanh_``), the floor for any fused version;
* ``eager passes``: ReLU6, then divide, round, clamp and multiply as separate ATen ops (the fallback);
* ``inductor``: the same expression compiled by ``torch.compile`` into one loop (the previous implementation);
* ``C loop``: `fused_cpu.quantize_dequantize` with ``clamp_first`` (what the sim runs now).

All four give the same values bit for bit (checked here before timing).

    python -m benchmarks.bench_fused_cpu [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved_medians
from edgequant.quantization import Encoding, fused_cpu

SIZES = {"4 K": 1 << 12, "64 K": 1 << 16, "1 M": 1 << 20,
         "12.8 M (mobilenet_v2's first ReLU6, batch 32)": 32 * 32 * 112 * 112}


def eager_passes(x: torch.Tensor, scale: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return F.hardtanh_(x, 0.0, 6.0).div_(scale).round_().clamp_(low, high).mul_(scale)


def one_expression(x: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return x.copy_(torch.clamp(torch.round(torch.clamp(x, 0.0, 6.0) / scale), low, high) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    encoding = Encoding.from_range(0.0, 6.0, 8, symmetric=False)
    scale, offset = encoding.scale, encoding.offset
    low, high = offset.item(), offset.item() + 255
    inductor = torch.compile(one_expression, dynamic=True)
    print(f"ReLU6 + 8-bit quantizer, in place, {options.threads} threads, median of {options.repeats}, "
          f"torch {torch.__version__}")
    for label, numel in SIZES.items():
        x = torch.randn(numel) * 4
        if not fused_cpu.can_fuse(x, scale):
            raise SystemExit("the fused CPU loops are unavailable here (see the warning above: is a C compiler "
                             "installed?)")
        functions = {
            "relu6 alone": lambda t=x: F.hardtanh_(t, 0.0, 6.0),
            "eager passes": lambda t=x: eager_passes(t, scale, low, high),
            "inductor": lambda t=x: inductor(t, scale, offset, offset + 255),
            "C loop": lambda t=x: fused_cpu.quantize_dequantize(t, scale, offset, 255, True, (0.0, 6.0)),
        }
        results = [function(x.clone()) for name, function in functions.items() if name != "relu6 alone"]
        assert all(torch.equal(result, results[0]) for result in results), "the fused versions disagree"
        medians = interleaved_medians(functions, repeats=options.repeats, warmup=2)
        floor = medians["relu6 alone"]
        print(f"{label:48s} " + "   ".join(
            f"{name} {seconds * 1e3:8.3f} ms ({seconds / floor:4.2f}x)" for name, seconds in medians.items()))


if __name__ == "__main__":
    main()
