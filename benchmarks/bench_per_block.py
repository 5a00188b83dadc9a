"""W4 weights per channel vs per block vs LPBQ: all-MiniLM-L6-v2 and the bundled digits CNN, and the per-block
MiniLM export run in ONNX Runtime.

Every sim: `per_channel` config, 8-bit activations (`--output-bw`), 4-bit weights (and a W8 per-channel reference),
min-max calibration. Weight granularity of the
layers whose input dimension the block size divides (every Linear of MiniLM, in_features 384 or 1536; conv2, conv3
and fc of the digits CNN, whose conv1 has one input channel and stays per channel) is `PerBlock(B)` or
`Lpbq(B, decompressed_bw=8)`, set before calibration; all other weights keep the config's granularity.

* MiniLM: mean (and min) cosine of the sentence embeddings (mean-pooled last hidden state, L2-normalised) to FP32,
  on generated sentences other than the calibration ones.
* digits CNN: top-1 accuracy on its 449 test digits, calibrated on 512 training digits.
* Export: one per-block MiniLM sim, `sim.export`, its QDQ ONNX run in ONNX Runtime (graph optimisations on and
  off) on the evaluation sentences padded to one length; max |ORT - sim| of the last hidden state in steps of its
  output grid, and the embedding cosine ORT vs sim.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_per_block [--calibration-sentences 32] [--sentences 64]
        [--blocks 64 32] [--digits-blocks 8 16] [--export-block 64 (0: none)] [--export-controls] [--output-bw 8]
        [--models digits minilm]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.real_models import embed, load_minilm, sentences
from edgequant import QuantSim
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.quantization import Granularity, Lpbq, PerBlock


def input_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups
    return None


def variants(blocks: list[int]) -> list[tuple[str, int, Granularity | None]]:
    """(label, weight bits, granularity of the blockable layers or None for per channel)."""
    rows: list[tuple[str, int, Granularity | None]] = [("W8 per-channel", 8, None), ("W4 per-channel", 4, None)]
    for block in blocks:
        rows += [(f"W4 PerBlock({block})", 4, PerBlock(block)),
                 (f"W4 Lpbq({block}, 8)", 4, Lpbq(block, decompressed_bw=8))]
    return rows


OUTPUT_BW = 8  # --output-bw


def build_sim(model: nn.Module, dummy: object, bits: int, granularity: Granularity | None,
              calibrate: Callable[[nn.Module], None]) -> tuple[QuantSim, int]:
    """Calibrated sim; returns it and how many weight quantizers got ``granularity``."""
    sim = QuantSim(model, dummy, param_bw=bits, output_bw=OUTPUT_BW, quant_scheme="minmax", config="per_channel")
    rebuilt = 0
    if granularity is not None:
        block = granularity.block_size
        for name, module in model.named_modules():
            dim = input_dim(module)
            if dim is not None and dim % block == 0:
                rebuilt += len(sim.set_granularity(name, granularity))
    sim.compute_encodings(calibrate)
    return sim, rebuilt


def bench_minilm(args: argparse.Namespace) -> None:
    model, tokenizer = load_minilm()
    calibration = sentences(args.calibration_sentences, seed=1)
    evaluation = sentences(args.sentences, seed=0)
    dummy = dict(tokenizer(evaluation[:2], padding=True, return_tensors="pt"))

    def calibrate(sim_model: nn.Module) -> None:
        embed(sim_model, tokenizer, calibration, batch_size=args.batch_size)

    with torch.no_grad():
        reference = embed(model, tokenizer, evaluation, batch_size=args.batch_size)
    print(f"all-MiniLM-L6-v2: calibration {len(calibration)} sentences (seed 1), evaluation {len(evaluation)} "
          "other sentences (seed 0); cosine of embeddings to FP32", flush=True)
    for label, bits, granularity in variants(args.blocks):
        started = time.perf_counter()
        sim, rebuilt = build_sim(model, dummy, bits, granularity, calibrate)
        with torch.no_grad():
            cosine = (reference * embed(sim.model, tokenizer, evaluation, batch_size=args.batch_size)).sum(-1)
        print(f"  {label:<20} mean cosine {cosine.mean():.4f}  min {cosine.min():.4f}  "
              f"({rebuilt} weights blocked, {time.perf_counter() - started:.0f} s)", flush=True)
    if args.export_block:
        exported = [("W4 PerBlock", 4, PerBlock(args.export_block))]
        if args.export_controls:
            exported += [("W4 per-channel", 4, None), ("W8 per-channel", 8, None)]
        for label, bits, granularity in exported:
            export_minilm(model, tokenizer, calibrate, evaluation, label, bits, granularity, args.batch_size)


def last_hidden_grid(sim: QuantSim, model: nn.Module) -> float:
    """Step of the output grid of the last hidden state: the last encoder LayerNorm's output quantizer."""
    layer = len(model.encoder.layer) - 1
    name = f"encoder.layer.{layer}.output.LayerNorm.output_quantizers.0"
    return float(sim.quantizers()[name].scale)


def export_minilm(model: nn.Module, tokenizer: object, calibrate: Callable[[nn.Module], None],
                  evaluation: list[str], label: str, bits: int, granularity: Granularity | None,
                  batch_size: int) -> None:
    import onnxruntime as ort

    feed = dict(tokenizer(evaluation, padding=True, return_tensors="pt"))  # one length: the exported shape
    # the dummy needs a padded row: without one BERT takes its no-mask code path, which the sim then records
    padded = int((feed["attention_mask"] == 0).any(-1).nonzero()[0])
    dummy = {key: value[[0, padded]] for key, value in feed.items()}
    sim, _ = build_sim(model, dummy, bits, granularity, calibrate)
    label = f"{label}({granularity.block_size})" if granularity is not None else label
    out_dir = tempfile.mkdtemp(prefix="edgequant_per_block_")
    try:
        try:
            started = time.perf_counter()
            result = sim.export(out_dir, dummy)
            print(f"  export {label}: opset {result.opset}, {time.perf_counter() - started:.0f} s",
                  flush=True)
        except Exception as error:  # noqa: BLE001 - a failure is the finding: print it whole
            print(f"  export {label} FAILED: {type(error).__name__}: {error}", flush=True)
            return
        with torch.no_grad():
            hidden = torch.cat([sim.model(**{k: v[i:i + batch_size] for k, v in feed.items()}).last_hidden_state
                                for i in range(0, len(evaluation), batch_size)]).numpy()
        step = last_hidden_grid(sim, model)
        mask = feed["attention_mask"].unsqueeze(-1).float()

        def pooled(hidden_states: np.ndarray) -> torch.Tensor:
            summed = (torch.from_numpy(hidden_states) * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            return F.normalize(summed, dim=-1)

        for level_name, level in (("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                                  ("disabled", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            try:
                session = ort.InferenceSession(str(result.qdq_model), options, providers=["CPUExecutionProvider"])
                names = [i.name for i in session.get_inputs()]
                outputs = np.concatenate([
                    session.run(None, {n: feed[n][i:i + batch_size].numpy() for n in names})[0]
                    for i in range(0, len(evaluation), batch_size)])
            except Exception as error:  # noqa: BLE001 - a failure is the finding: print it whole
                print(f"  {label}: ORT (optimisations {level_name}) FAILED: {type(error).__name__}: {error}",
                      flush=True)
                continue
            difference = np.abs(outputs - hidden)
            real = mask.numpy().astype(bool).repeat(difference.shape[-1], -1)
            cosine = (pooled(outputs) * pooled(hidden)).sum(-1)
            tokens = feed["input_ids"].shape[1]
            print(f"  {label}: ORT (optimisations {level_name}) vs sim, {len(evaluation)} sentences x {tokens} tokens: "
                  f"max |diff| {difference.max() / step:.2f} steps (real tokens {difference[real].max() / step:.2f}), "
                  f"identical {np.mean(difference < step / 2):.2%}; embedding cosine mean {cosine.mean():.6f} "
                  f"min {cosine.min():.6f}", flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def bench_digits(args: argparse.Namespace) -> None:
    train_x, _ = load_digits_tensors("train")
    test_x, test_y = load_digits_tensors("test")
    batches = list(train_x[:512].split(128))

    def calibrate(sim_model: nn.Module) -> None:
        for batch in batches:
            sim_model(batch)

    model = load_pretrained("digits_cnn")
    with torch.no_grad():
        print(f"digits CNN: FP32 accuracy {evaluate_accuracy(model, test_x, test_y):.4f} on {len(test_y)} test digits",
              flush=True)
    for label, bits, granularity in variants(args.digits_blocks):
        sim, rebuilt = build_sim(load_pretrained("digits_cnn"), train_x[:1], bits, granularity, calibrate)
        with torch.no_grad():
            accuracy = evaluate_accuracy(sim.model, test_x, test_y)
        print(f"  {label:<20} accuracy {accuracy:.4f}  ({rebuilt} weights blocked)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-sentences", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--digits-blocks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--export-block", type=int, default=64, help="0: no export")
    parser.add_argument("--export-controls", action="store_true",
                        help="also export W4 and W8 per channel, the same way, as controls")
    parser.add_argument("--models", nargs="+", default=["digits", "minilm"])
    parser.add_argument("--output-bw", type=int, default=8, help="activation bits (16: the weights' share alone)")
    args = parser.parse_args()
    global OUTPUT_BW
    OUTPUT_BW = args.output_bw
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, A{OUTPUT_BW}", flush=True)
    if "digits" in args.models:
        bench_digits(args)
    if "minilm" in args.models:
        bench_minilm(args)


if __name__ == "__main__":
    main()
