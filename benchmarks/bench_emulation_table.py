"""The emulation table: per model, the ops ``sim.emulate("onnxruntime")`` covers and how closely the sim then
predicts ONNX Runtime, beside the default (fake-quantized) sim, and what emulating costs.

Each model is BN-folded, quantized W8A8 with the ``per_channel`` config, calibrated (min-max) on 64 inputs,
exported (QDQ) and run in ONNX Runtime (CPU, ``ORT_ENABLE_ALL``); the sim runs on 256 other inputs in its default
mode and emulating. Columns: ops emulated / total (``plan.coverage()``), share of output elements identical to
ORT's on the output grid, top-1 agreement with ORT (per pixel for the U-Net; a tie among ORT's top logits counts
as agreement with any of them), and the emulating / default forward time on a batch of 16 (interleaved medians).
Torchvision models and the U-Net (``tests/segmentation_models.py``) take random weights (seed 0) and random
3×64×64 inputs; EfficientNet-Lite0 its ImageNet weights, every ``Conv2dStaticSamePadding`` split into an
``nn.ZeroPad2d`` and a ``Conv2d(padding=0)`` as TensorFlow ports build it, and natural-image crops (224×224).

Run from the repository root, one thread: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_emulation_table
[--models resnet50,unet] [--samples 256]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

import edgequant as eq
from benchmarks.bench_emulation import run_model, run_ort
from benchmarks.timing import interleaved_medians
from edgequant.ptq.batch_norm_fold import fold_batch_norms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from segmentation_models import UNet  # noqa: E402 - the test models live with the tests

TORCHVISION = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "googlenet")


def explicit_zero_pads(model: nn.Module) -> nn.Module:
    """Every ``Conv2dStaticSamePadding`` of ``efficientnet_lite_pytorch`` as an ``nn.ZeroPad2d`` (where it pads)
    followed by a ``Conv2d`` with ``padding=0`` holding the same weights."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv2dStaticSamePadding):
            continue
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                         module.dilation, module.groups, module.bias is not None)
        conv.load_state_dict(module.state_dict(), strict=False)
        replacement = (nn.Sequential(module.static_padding, conv) if isinstance(module.static_padding, nn.ZeroPad2d)
                       else conv)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
    return model


def load(name: str, samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (random weights, seed 0, except EfficientNet-Lite0), 64 calibration and ``samples`` inputs."""
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops

        return (explicit_zero_pads(load_efficientnet_lite0()), natural_image_crops(64, seed=1),
                natural_image_crops(samples, seed=0))
    if name == "unet":
        model: nn.Module = UNet(channels=16, classes=8)
    elif name == "googlenet":
        model = torchvision.models.googlenet(num_classes=1000, aux_logits=False, init_weights=True)
    else:
        model = getattr(torchvision.models, name)(num_classes=1000)
    inputs = torch.randn(64 + samples, 3, 64, 64)
    return model.eval(), inputs[:64], inputs[64:]


def top1_agreement(predicted: np.ndarray, runtime: np.ndarray) -> float:
    """Share of samples (pixels) whose predicted class is one of ORT's top classes (ties at ORT's maximum)."""
    chosen = np.take_along_axis(runtime, predicted.argmax(1)[:, None], axis=1)[:, 0]
    return float((chosen == runtime.max(1)).mean())


def row(name: str, samples: int, batch_size: int = 16) -> str:
    model, calibration, data = load(name, samples)
    fold_batch_norms(model, calibration[:1])
    sim = eq.QuantSim(model, calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(batch_size), progress=False)
    with tempfile.TemporaryDirectory() as folder:
        sim.export(folder, calibration[:1])
        runtime, lsb = run_ort(Path(folder) / "model_qdq.onnx", data, batch_size)
        # a second sim with the same state (a deepcopy of a traced sim drops its model-input quantizer hook)
        emulating = eq.QuantSim(copy.deepcopy(model), calibration[:1], config="per_channel")
        sim.save(Path(folder) / "sim.pt")
        emulating.load(Path(folder) / "sim.pt")
    plan = emulating.emulate("onnxruntime")
    cells = [f"{len(plan.ops)} / {len(plan.ops) + len(plan.skipped)}"]
    for candidate in (emulating, sim):
        predicted = run_model(candidate.model, data, batch_size)
        identical = float((np.round(predicted / lsb) == np.round(runtime / lsb)).mean())
        cells.append(f"{identical:.2%} / {top1_agreement(predicted, runtime):.2%}")
    batch = data[:batch_size]
    times: dict[str, float] = interleaved_medians(
        {"default": lambda: sim.model(batch), "emulating": lambda: emulating.model(batch)}, repeats=3)
    cells.append(f"{times['emulating'] / times['default']:.2f}× ({times['default'] * 1e3:.0f} ms)")
    if plan.skipped:
        print(f"  {name}: {plan.coverage()}", file=sys.stderr)
    return f"| {name} | " + " | ".join(cells) + " |"



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join((*TORCHVISION, "unet", "efficientnet_lite0")),
                        help="comma-separated rows: " + ", ".join((*TORCHVISION, "unet", "efficientnet_lite0")))
    parser.add_argument("--samples", type=int, default=256, help="evaluation inputs per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | ops emulated / total | emulating sim: identical / top-1 vs ORT | default sim: identical / "
          "top-1 vs ORT | forward emulating / default (default, batch 16) |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        started = time.perf_counter()
        print(row(name, args.samples), flush=True)
        print(f"  {name}: {time.perf_counter() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
