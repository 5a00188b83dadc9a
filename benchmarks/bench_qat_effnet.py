"""Label-free QAT on ImageNet-pretrained EfficientNet-Lite0, W4A8 per-channel, BN folded.

Training data: ``--train-crops`` natural-image crops (scikit-image photos, seed 1), no labels: `finetune`
distils the FP32 model. Metric: top-1 agreement with FP32 and mean KL(FP32 || quantized) on the training crops
and on ``--eval-crops`` other crops (seed 0: other random crops and flips of the same photos; ImageNet is not
available offline). Each variant starts from a fresh min-max-calibrated sim, or from the AdaRound one (rounded
once, ``--adaround-iterations`` per layer, cached in ``--cache``), and prints one row when done.

    python -m benchmarks.bench_qat_effnet [--train-crops 128] [--variants ptq,default,...]  # the README run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_adaround_effnet import agreement
from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops
from edgequant import QuantSim
from edgequant.ptq.adaround import adaround
from edgequant.ptq.batch_norm_fold import fold_batch_norms
from edgequant.qat import finetune


def one_rate(lr: float) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """The leading toolkit's recipe: one Adam learning rate for weights and ranges alike."""
    return lambda groups: torch.optim.Adam([{"params": g["params"]} for g in groups], lr=lr)


# name -> (initialisation, finetune options or None for no training)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "ptq": ("minmax", None),
    "previous_default": ("minmax", {"dropout": True}),  # relative range rates, student with dropout
    "default": ("minmax", {}),  # relative range rates, student without dropout
    "one_rate": ("minmax", {"optimizer": one_rate(1e-5), "dropout": True}),
    "adaround": ("adaround", None),
    "adaround+default": ("adaround", {}),
    "adaround+range_lr_3e-3": ("adaround", {"range_lr": 3e-3}),
    "adaround+regular": ("adaround", {"mode": "regular"}),
    "default+range_lr_1e-1": ("minmax", {"range_lr": 1e-1}),
    "default+range_lr_1e-2": ("minmax", {"range_lr": 1e-2}),
    "default+T4": ("minmax", {"temperature": 4.0}),
    "default+lr_1e-4": ("minmax", {"lr": 1e-4}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-crops", type=int, default=128)
    parser.add_argument("--eval-crops", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adaround-iterations", type=int, default=100)
    parser.add_argument("--adaround-crops", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_efficientnet_lite0()
    train = natural_image_crops(args.train_crops, seed=1)
    evaluation = natural_image_crops(args.eval_crops, seed=0)
    fold_batch_norms(model, train[:1])
    with torch.no_grad():
        references = {"train": torch.cat([model(b) for b in train.split(32)]),
                      "eval": torch.cat([model(b) for b in evaluation.split(32)])}
    batches = list(train.split(32))

    def calibrated() -> QuantSim:
        sim = QuantSim(model, train[:1], param_bw=4, output_bw=8, config="per_channel")
        sim.calibrate(batches, progress=False)
        return sim

    adaround_state = args.cache / f"effnet_adaround_{args.adaround_iterations}it_{args.adaround_crops}crops.pt"

    def initialised(init: str) -> QuantSim:
        sim = calibrated()
        if init == "adaround":
            if not adaround_state.exists():
                started = time.perf_counter()
                adaround(sim, list(train[:args.adaround_crops].split(32)), num_iterations=args.adaround_iterations,
                         learning_rate=1e-2, progress=False)
                sim.calibrate(batches, progress=False)  # activation encodings see the rounded weights
                args.cache.mkdir(parents=True, exist_ok=True)
                sim.save(adaround_state)
                print(f"  (AdaRound {args.adaround_iterations} it/layer on {args.adaround_crops} crops, lr 1e-2: "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)
            else:
                sim.load(adaround_state)
        return sim

    print(f"EfficientNet-Lite0 W4A8 per-channel, BN folded, {args.train_crops} training crops, {args.eval_crops} "
          f"evaluation crops, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr} (weights), "
          f"{args.threads} thread(s)", flush=True)
    print("| variant | agreement train | KL train | agreement eval | KL eval | seconds |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for name in args.variants.split(","):
        init, options = VARIANTS[name]
        torch.manual_seed(0)
        sim = initialised(init)
        started = time.perf_counter()
        if options is not None:
            options = {"lr": args.lr, **options}
            finetune(sim, train, epochs=args.epochs, batch_size=args.batch_size, progress=False, **options)
        seconds = time.perf_counter() - started
        on_train = agreement(sim.model, train, references["train"])
        on_eval = agreement(sim.model, evaluation, references["eval"])
        print(f"| {name} | {on_train[0]:.3f} | {on_train[1]:.3f} | {on_eval[0]:.3f} | {on_eval[1]:.3f} | "
              f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
