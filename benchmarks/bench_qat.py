"""Quantization-aware training on the bundled digits: accuracy and training-epoch cost.

Recipe (the reference toolkit's): W4A4 with per-channel weights (``per_channel`` config), BN folded into the FP32 model
before building the sim, min-max initialisation on the train split, Adam lr 1e-4, batch 64, 3 epochs on the
train split; test accuracy of FP32, PTQ, regular QAT and range-learning QAT, trained with the labels
(cross-entropy, as the reference toolkit was run) and label-free (`edgequant.qat.finetune`'s default
distillation). Epoch time: one training epoch of the prepared sim vs one FP32 training epoch of the same
(folded) model, same loop (cross-entropy, Adam), one thread, interleaved, median of ``--repeats``.

Models: ``digits_cnn`` (bundled weights); ``mobilenet_v2``, torchvision's at width 0.5 with a 1-channel stem of
stride 1 and strides fitted to 8x8 inputs, trained here on the digits train split (cached in ``--cache``); and
``aimet_mobilenet_v2``, the reference toolkit's own full-width MobileNetV2 (tests/fixtures/aimet-2.42) on its
own 16x16 data (:mod:`aimet_mobilenet_digits`), so that its figures compare with the reference's on the same weights.

    python benchmarks/bench_qat.py [--models digits_cnn,mobilenet_v2,aimet_mobilenet_v2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.ptq import fold_batch_norms
from edgequant.qat import finetune, prepare_qat
from edgequant.sim import QuantSim

RECIPE = dict(param_bw=4, output_bw=4, config="per_channel")


def mobilenet_v2_digits() -> nn.Module:
    from torchvision.models import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 1], [6, 64, 2, 2], [6, 96, 1, 1], [6, 160, 1, 1]]
    model = MobileNetV2(num_classes=10, width_mult=0.5, inverted_residual_setting=setting)
    stem = model.features[0]
    stem[0] = nn.Conv2d(1, stem[0].out_channels, 3, stride=1, padding=1, bias=False)
    return model


def train_fp32(model: nn.Module, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    """Adam + cosine + random 1-pixel shifts on the digits train split (as scripts/train_digits.py trains the
    bundled models)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_digits import _augment

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensors("train")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(images) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            index = order[start:start + 64]
            loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


Split = tuple[torch.Tensor, torch.Tensor]


def load_model(name: str, cache: Path) -> tuple[nn.Module, Split, Split]:
    """The float model with its (train, test) data."""
    if name == "aimet_mobilenet_v2":
        import aimet_mobilenet_digits

        return aimet_mobilenet_digits.load_model(), *aimet_mobilenet_digits.load_data()
    digits = load_digits_tensors("train"), load_digits_tensors("test")
    if name == "digits_cnn":
        return load_pretrained("digits_cnn"), *digits
    path = cache / f"{name}.pt"
    model = mobilenet_v2_digits()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), *digits
    model = train_fp32(model, epochs=40, lr=3e-3)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, *digits


def calibrated_sim(model: nn.Module, images: torch.Tensor) -> QuantSim:
    sim = QuantSim(model, images[:1], **RECIPE)
    sim.calibrate(list(images.split(64)), progress=False)
    return sim


def one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for start in range(0, len(images), 64):
        loss = F.cross_entropy(model(images[start:start + 64]), labels[start:start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def epoch_times(folded: nn.Module, images: torch.Tensor, labels: torch.Tensor, repeats: int) -> dict[str, dict]:
    """Median wall and CPU seconds of one training epoch: FP32 vs each QAT mode (round-robin)."""
    runs = {"fp32": copy.deepcopy(folded)}
    for mode in ("regular", "range_learning"):
        sim = calibrated_sim(folded, images)
        prepare_qat(sim, mode)
        runs[mode] = sim.model
    per_tensor = QuantSim(folded, images[:1], param_bw=4, output_bw=4, config="default")
    per_tensor.calibrate(list(images.split(64)), progress=False)
    prepare_qat(per_tensor, "regular")
    runs["regular/per-tensor"] = per_tensor.model
    optimizers = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in runs.items()}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for repeat in range(repeats + 1):
        for name, model in runs.items():
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            one_epoch(model, images, labels, optimizers[name])
            if repeat:  # the first round warms up
                wall[name].append(time.perf_counter() - started_wall)
                cpu[name].append(time.process_time() - started_cpu)
    return {name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])} for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="digits_cnn,mobilenet_v2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--timing-only", action="store_true", help="Skip the accuracy runs.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        folded, (images, labels), (test_images, test_labels) = load_model(name, args.cache)
        accuracy = functools.partial(evaluate_accuracy, images=test_images, labels=test_labels)
        fold_batch_norms(folded, images[:1])
        if args.timing_only:
            print_epoch_times(name, epoch_times(folded, images, labels, args.repeats))
            continue
        row = {"fp32": accuracy(folded), "ptq": accuracy(calibrated_sim(folded, images).model)}
        for mode in ("regular", "range_learning"):
            for labelled in (True, False):
                torch.manual_seed(0)
                sim = calibrated_sim(folded, images)
                started = time.perf_counter()
                loss_fn = (lambda output, batch: F.cross_entropy(output, batch[1])) if labelled else None
                finetune(sim, TensorDataset(images, labels), epochs=args.epochs, lr=1e-4, batch_size=64, mode=mode,
                         loss_fn=loss_fn, progress=False)
                key = f"{mode}/{'labels' if labelled else 'distillation'}"
                row[key] = accuracy(sim.model)
                print(f"{name} {key}: {row[key]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        print_epoch_times(name, epoch_times(folded, images, labels, args.repeats))


def print_epoch_times(name: str, times: dict[str, dict]) -> None:
    for mode in ("regular", "range_learning", "regular/per-tensor"):
        print(f"{name} epoch {mode}: wall {times[mode]['wall_s']:.2f} s vs FP32 {times['fp32']['wall_s']:.2f} s "
              f"({times[mode]['wall_s'] / times['fp32']['wall_s']:.2f}x); CPU {times[mode]['cpu_s']:.2f} s vs "
              f"{times['fp32']['cpu_s']:.2f} s ({times[mode]['cpu_s'] / times['fp32']['cpu_s']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
