"""Integer-kernel emulation: does the sim predict ONNX Runtime output for output, and at what cost?

For each model (W8A8, ``per_channel`` config, BN folded, min-max calibration) the QDQ export runs in ONNX Runtime
(CPU, ``ORT_ENABLE_ALL``, i.e. its integer kernels) and the sim runs in its default mode and emulating
``onnxruntime``. Printed per model and mode: share of final outputs identical on the output grid, top-1 agreement
sim vs ORT, the metric the sim predicts vs the metric ORT gets (accuracy on labels for digits-trained models,
top-1 agreement with FP32 otherwise), and the sim's forward time in both modes (interleaved medians).

Run from the repository root: ``python -m benchmarks.bench_emulation [--samples 256] [--train-epochs 4]
[--effnet-crops 64]`` (``--effnet-crops 0`` skips EfficientNet-Lite0, ``--train-epochs 0`` the digits-trained
ResNet-18 / MobileNetV2).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper

import edgequant as eq
from benchmarks.timing import interleaved_medians
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx
from edgequant.export.runtime_cpu import ORT_SESSION_CONFIG
from edgequant.ptq.batch_norm_fold import fold_batch_norms


def run_ort(qdq_path: Path, data: torch.Tensor, batch_size: int) -> tuple[np.ndarray, float]:
    """ORT's outputs on ``data`` and the output grid's step (the scale of the DequantizeLinear producing it, or
    the one before a data-movement op such as SqueezeNet's final Flatten)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in ORT_SESSION_CONFIG.items():  # fused weight-only MatMuls multiply their input as given
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(qdq_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = np.concatenate([session.run(None, {name: b.numpy()})[0] for b in data.split(batch_size)])
    model = onnx.load(qdq_path)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {output: n for n in model.graph.node for output in n.output}
    final = producers["output"]
    while final.op_type in ("Flatten", "Reshape", "Squeeze", "Transpose"):
        final = producers[final.input[0]]
    return outputs, float(values[final.input[1]].reshape(-1)[0])


@torch.no_grad()
def run_model(model: torch.nn.Module, data: torch.Tensor, batch_size: int) -> np.ndarray:
    return torch.cat([model(b) for b in data.split(batch_size)]).numpy()


def metric(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())


def bench(name: str, model: torch.nn.Module, calibration: torch.Tensor, data: torch.Tensor,
          labels: torch.Tensor | None, batch_size: int) -> None:
    model.eval()
    fold_batch_norms(model, calibration[:1])
    fp32 = run_model(model, data, batch_size)
    reference = labels.numpy() if labels is not None else fp32.argmax(1)
    metric_name = "accuracy" if labels is not None else "top-1 agr. with FP32"
    sim = eq.QuantSim(model, calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(batch_size), progress=False)
    with tempfile.TemporaryDirectory() as out:
        export_onnx(sim, out, calibration[:1])
        runtime, lsb = run_ort(Path(out) / "model_qdq.onnx", data, batch_size)
    # a second sim with the same state (copy.deepcopy of a traced sim drops its model-input quantizer hook)
    emulating = eq.QuantSim(copy.deepcopy(model), calibration[:1], config="per_channel")
    with tempfile.TemporaryDirectory() as folder:
        sim.save(Path(folder) / "sim.pt")
        emulating.load(Path(folder) / "sim.pt")
    plan = emulating.emulate("onnxruntime")
    print(f"{name}: {plan.summary()}; FP32 {metric_name} {metric(fp32, reference):.2%}; "
          f"ORT {metric_name} {metric(runtime, reference):.2%}")
    for mode, candidate in (("default", sim), ("emulating", emulating)):
        started = time.perf_counter()
        predicted = run_model(candidate.model, data, batch_size)
        elapsed = time.perf_counter() - started
        identical = float((np.round(predicted / lsb) == np.round(runtime / lsb)).mean())
        agreement = float((predicted.argmax(1) == runtime.argmax(1)).mean())
        print(f"  {mode:<9} identical outputs {identical:8.3%}  top-1 agreement with ORT {agreement:8.3%}  "
              f"predicted {metric_name} {metric(predicted, reference):.2%} (ORT {metric(runtime, reference):.2%})"
              f"  [{len(data)} samples in {elapsed:.1f}s]")
    batch = data[:batch_size]
    times = interleaved_medians({"default": lambda: sim.model(batch), "emulating": lambda: emulating.model(batch)},
                                repeats=3)
    print(f"  forward of {tuple(batch.shape)}: default {times['default'] * 1e3:.0f} ms, emulating "
          f"{times['emulating'] * 1e3:.0f} ms: {times['emulating'] / times['default']:.2f}x")


def digits_upsampled(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits at 32×32, three channels (input for torchvision architectures)."""
    images, labels = load_digits_tensors(split)
    upsampled = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return upsampled.repeat(1, 3, 1, 1), labels


def train_on_digits(model: torch.nn.Module, epochs: int) -> torch.nn.Module:
    """A few epochs of Adam on the digits train split (trained weights, so that logits are not nearly tied)."""
    images, labels = digits_upsampled("train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256, help="random inputs for the random-weight models")
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--effnet-crops", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    images, labels = load_digits_tensors("test")
    train_images, _ = load_digits_tensors("train")
    for name in ("digits_cnn", "digits_dwcnn"):
        bench(name, load_pretrained(name), train_images[:128], images, labels, 64)
    torch.manual_seed(0)
    random_inputs = torch.randn(args.samples + 64, 3, 64, 64)
    for arch in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(num_classes=1000)
        bench(f"{arch} (random, 64x64)", model, random_inputs[:64], random_inputs[64:], None, 16)
    if args.train_epochs:
        test_images, test_labels = digits_upsampled("test")
        calibration, _ = digits_upsampled("train")
        for arch in ("resnet18", "mobilenet_v2"):
            torch.manual_seed(0)
            started = time.perf_counter()
            model = train_on_digits(getattr(torchvision.models, arch)(num_classes=10), args.train_epochs)
            elapsed = time.perf_counter() - started
            print(f"trained {arch} on digits 32x32 for {args.train_epochs} epochs in {elapsed:.0f}s")
            bench(f"{arch} (digits-trained, 32x32)", model, calibration[:128], test_images, test_labels, 64)
    if args.effnet_crops:
        from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops

        bench("EfficientNet-Lite0 (ImageNet)", load_efficientnet_lite0(), natural_image_crops(32, seed=1),
              natural_image_crops(args.effnet_crops, seed=0), None, 8)


if __name__ == "__main__":
    main()
