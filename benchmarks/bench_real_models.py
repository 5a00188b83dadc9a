"""W8A8 accuracy of edgequant on real pretrained models, per calibration scheme and hardware-config preset.

* EfficientNet-Lite0 (ImageNet): top-1 agreement with FP32 and mean KL(FP32 || quantized) on natural-image
  crops (calibration and evaluation crops are different random crops).
* all-MiniLM-L6-v2: mean cosine between FP32 and quantized sentence embeddings, and nearest-neighbour
  agreement (each sentence's most similar other sentence is the same under FP32 and quantized).

Also times the simulated forward against FP32, and each scheme's calibration time.

    python -m benchmarks.bench_real_models [--models efficientnet,minilm] [--crops 48] [--sentences 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.real_models import embed, load_efficientnet_lite0, load_minilm, natural_image_crops, sentences
from benchmarks.timing import interleaved_medians
from edgequant import QuantSim

SCHEMES = ("minmax", "sqnr", "percentile")
CONFIGS = ("default", "per_channel", "htp")


def efficientnet_scores(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    agreement = (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    kl = F.kl_div(quantized.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none")
    return {"top1_agreement": agreement, "mean_kl": kl.sum(-1).mean().item()}


def minilm_scores(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    cosine = (reference * quantized).sum(-1)  # embeddings are L2-normalised

    def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        return similarity.fill_diagonal_(-2.0).argmax(-1)

    agreement = (neighbours(reference) == neighbours(quantized)).float().mean().item()
    return {"mean_cosine": cosine.mean().item(), "min_cosine": cosine.min().item(), "nn_agreement": agreement}


def run_grid(name: str, model: torch.nn.Module, dummy: object, calibrate: Callable[[torch.nn.Module], None],
             infer: Callable[[torch.nn.Module], torch.Tensor], score: Callable, schemes: tuple[str, ...],
             configs: tuple[str, ...]) -> dict[tuple[str, str], QuantSim]:
    """Build, calibrate and score one sim per (scheme, config); prints one row each."""
    with torch.no_grad():
        reference = infer(model)
    sims = {}
    for config in configs:
        for scheme in schemes:
            sim = QuantSim(model, dummy, quant_scheme=scheme, config=config)
            started = time.perf_counter()
            sim.compute_encodings(calibrate)
            calibration_s = time.perf_counter() - started
            with torch.no_grad():
                scores = score(reference, infer(sim.model))
            shown = "  ".join(f"{key} {value:.4f}" for key, value in scores.items())
            print(f"{name:<18} {config:<12} {scheme:<11} {shown}  calibration {calibration_s:6.1f} s", flush=True)
            sims[scheme, config] = sim
    return sims


def time_forward(name: str, model: torch.nn.Module, sim: QuantSim, forward: Callable[[torch.nn.Module], object],
                 repeats: int) -> None:
    medians = interleaved_medians({"fp32": lambda: forward(model), "sim": lambda: forward(sim.model)}, repeats)
    print(f"{name:<18} forward fp32 {medians['fp32'] * 1e3:.0f} ms, sim {medians['sim'] * 1e3:.0f} ms: "
          f"{medians['sim'] / medians['fp32']:.2f}x", flush=True)


def bench_efficientnet(args: argparse.Namespace) -> None:
    model = load_efficientnet_lite0()
    calibration = natural_image_crops(args.calibration_crops, seed=1).split(args.batch_size)
    evaluation = natural_image_crops(args.crops, seed=0)

    def calibrate(sim_model: torch.nn.Module) -> None:
        for batch in calibration:
            sim_model(batch)

    def infer(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([m(batch) for batch in evaluation.split(args.batch_size)])

    sims = run_grid("EfficientNet-Lite0", model, evaluation[:1], calibrate, infer, efficientnet_scores,
                    args.schemes, args.configs)
    sim = next(iter(sims.values()))
    time_forward("EfficientNet-Lite0", model, sim, lambda m: m(evaluation[: args.batch_size]), args.repeats)


def bench_minilm(args: argparse.Namespace) -> None:
    model, tokenizer = load_minilm()
    calibration_sentences = sentences(args.calibration_sentences, seed=1)
    evaluation_sentences = sentences(args.sentences, seed=0)
    dummy = dict(tokenizer(evaluation_sentences[:2], padding=True, return_tensors="pt"))

    def calibrate(sim_model: torch.nn.Module) -> None:
        embed(sim_model, tokenizer, calibration_sentences, batch_size=args.batch_size)

    def infer(m: torch.nn.Module) -> torch.Tensor:
        return embed(m, tokenizer, evaluation_sentences, batch_size=args.batch_size)

    sims = run_grid("all-MiniLM-L6-v2", model, dummy, calibrate, infer, minilm_scores, args.schemes, args.configs)
    sim = next(iter(sims.values()))
    time_forward("all-MiniLM-L6-v2", model, sim, infer, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet,minilm")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--crops", type=int, default=48, help="evaluation crops")
    parser.add_argument("--calibration-crops", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=64, help="evaluation sentences")
    parser.add_argument("--calibration-sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.schemes, args.configs = tuple(args.schemes.split(",")), tuple(args.configs.split(","))
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = args.models.split(",")
    if "efficientnet" in models:
        bench_efficientnet(args)
    if "minilm" in models:
        bench_minilm(args)


if __name__ == "__main__":
    main()
