"""Peak memory of calibrating a randomly initialised Llama with the shape of Llama-3.2-1B (1.2 B parameters) for
the w4a16-lpbq recipe: the float model, the sim's copy and the calibration activations together must fit a 24 GB
machine.

    python benchmarks/bench_llm_memory.py [--sequences 2] [--seq-len 256] [--layers 16]"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant.llm as llm


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--recipe", default="w4a16-lpbq")
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=500000.0)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"random Llama, {parameters / 1e9:.2f} B parameters ({parameters * 4 / 2**30:.1f} GiB float32), "
          f"built in {time.perf_counter() - started:.0f} s, peak RSS {rss_gib():.1f} GiB")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.sequences, args.seq_len), generator=generator)
    started = time.perf_counter()
    sim = llm.quantize(model, ids, recipe=args.recipe, progress=False)
    print(f"{args.recipe} on {args.sequences} x {args.seq_len} tokens: {time.perf_counter() - started:.0f} s, "
          f"peak RSS {rss_gib():.1f} GiB")
    del model  # evaluation folds the quantized weights in: a third copy, where the float original is not needed
    started = time.perf_counter()
    ppl = llm.perplexity(sim, ids[:1], progress=False)
    print(f"one sequence through the sim: {time.perf_counter() - started:.0f} s (perplexity {ppl:.0f}), "
          f"peak RSS {rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
