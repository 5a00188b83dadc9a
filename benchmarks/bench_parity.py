"""Sim-vs-ONNX Runtime parity: W8A8 per-channel, BN folded, int32 bias, ORT CPU integer kernels.

Prints, per model, the share of final-output elements within 1 LSB, identical on the integer grid, top-1
agreement, the integer kernels ORT used, and the first tensor off by more than one step. Random-weight torchvision
models (no downloads here) on random 32x32 inputs; the bundled digits CNN on its real test split.
Run: python benchmarks/bench_parity.py [--samples 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torchvision

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx, quantize_bias_int32
from edgequant.export.verify import verify
from edgequant.ptq.batch_norm_fold import fold_batch_norms


def bench(name: str, model: torch.nn.Module, calibration: torch.Tensor, data: torch.Tensor, int32_bias: bool) -> None:
    fold_batch_norms(model, calibration[:1])
    sim = eq.QuantSim(model, calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(32), progress=False)
    if int32_bias:
        quantize_bias_int32(sim)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        export_onnx(sim, out, calibration[:1])
        exported = time.perf_counter() - start
        report = verify(out, sim, data, progress=False)
    output = report.outputs[0]
    first = report.first_divergence
    print(
        f"{name:<14} bias={'int32' if int32_bias else 'float'} n={report.num_samples}: "
        f"within 1 LSB {output.share_within_1_lsb:.2%}, identical {output.share_identical:.2%}, "
        f"max {output.max_lsb_diff:g} LSB, top-1 {output.top1_agreement:.2%}; export {exported:.1f}s; "
        f"int kernels {sum(report.integer_kernels.values())}; float ops {report.float_kernels}; "
        f"first >1 LSB: {first.tensor + f' ({first.max_lsb_diff:g} LSB)' if first else 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, _ = load_digits_tensors("test")
    random_images = torch.randn(args.samples + 128, 3, 32, 32)
    for int32_bias in (False, True):
        bench("digits_cnn", load_pretrained("digits_cnn"), images[:128], images, int32_bias)
        for arch in ("resnet18", "mobilenet_v2"):
            torch.manual_seed(0)
            model = getattr(torchvision.models, arch)(num_classes=1000).eval()
            bench(arch, model, random_images[:128], random_images[128:], int32_bias)


if __name__ == "__main__":
    main()
