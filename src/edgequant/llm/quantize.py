"""Build and calibrate the sim of a Hugging Face causal language model for a recipe."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgequant.llm.attention import is_llama_attention, make_quantizable
from edgequant.llm.block_calibration import BlockCalibrationSettings, calibrate_by_block
from edgequant.llm.block_inputs import BLOCK_INPUTS_MEMORY_MB
from edgequant.llm.gptq import GptqSettings, gptq
from edgequant.llm.recipes import Recipe, recipe_named
from edgequant.llm.rotation import RotationSettings, rotate_causal_lm
from edgequant.llm.sequential_mse import SequentialMseSettings, sequential_mse
from edgequant.llm.smoothing import AwqSettings, SmoothingSettings, awq_causal_lm, smooth_causal_lm
from edgequant.quantization import Quantizer
from edgequant.quantization.granularity import Lpbq, PerBlock, PerChannel
from edgequant.quantization.number_format import IntegerFormat
from edgequant.sim import QuantSim
from edgequant.sim.batches import split_model_input
from edgequant.sim.emulation.provenance import RecordedTensor, record_calls

NORM_OP_TYPE = "RMSNormalization"  # ONNX's name for the op (opset 23); the hardware runs a norm as one op


@dataclass(frozen=True)
class MemorySettings:
    """How `quantize` bounds its memory. ``in_place``: prepare and quantize the given model itself (it becomes
    ``sim.model``, its attention and tied weights changed), instead of a copy: one float model in memory instead
    of two. ``block_inputs_mb``: calibration runs one decoder block at a time (`calibrate_by_block`), keeping the
    blocks' inputs in memory up to this many MiB and in a temporary folder beyond."""

    in_place: bool = False
    block_inputs_mb: float = BLOCK_INPUTS_MEMORY_MB


@dataclass(frozen=True)
class KvCacheQuantizers:
    """The names of the quantizers whose outputs one decoder layer's KV cache stores."""

    key: str
    value: str


def quantize(model: nn.Module, calibration_ids: torch.Tensor | Iterable[torch.Tensor], *, recipe: str = "w4a16-lpbq",
             block_size: int = 64, kv_cache_bw: int | None = None, lm_head_bw: int | None = None,
             config: str = "htp", batch_size: int = 1, technique_batches: int | None = 4,
             progress: bool = True, resume_dir: str | Path | None = None,
             memory: MemorySettings = MemorySettings()) -> QuantSim:
    """A calibrated `QuantSim` of the causal LM ``model`` (not modified unless ``memory.in_place``) for the named
    ``recipe``.

    ``calibration_ids`` is a LongTensor ``[N, T]`` of token ids (run ``batch_size`` sequences at a time) or an
    iterable of such tensors (each one batch). ``kv_cache_bw`` quantizes the keys and values the cache stores to
    that many bits (None: the activations' bitwidth). ``lm_head_bw`` gives ``lm_head`` per-channel weights of that
    many bits instead of the recipe's (targets often keep it at 8 bits). The recipe's transforms (rotation,
    smoothing, AWQ) and techniques (sequential MSE, GPTQ) use the first ``technique_batches`` batches (None: all);
    the activations are calibrated again after the techniques. With ``resume_dir``, each technique keeps its finished
    layers in a folder of that name there, so that the same call run again after an interruption goes on from the
    next layer (`edgequant.llm.resume`). Calibration holds one decoder block's activations at a time, with the
    encodings of a whole-model pass (`calibrate_by_block`; ``memory`` sets its budget and whether the model is
    copied)."""
    chosen = recipe_named(recipe)
    batches = list(_id_batches(calibration_ids, batch_size))
    if not batches:
        raise ValueError("calibration_ids holds no token sequence: pass a LongTensor [N, T] with N >= 1")
    prepared = prepare_causal_lm(model, in_place=memory.in_place)
    for transform in chosen.transforms:
        TRANSFORMS[transform](prepared, torch.cat(batches[:technique_batches]), chosen, block_size, progress)
    sim = QuantSim(prepared, (batches[0],), config=config, param_bw=8, output_bw=chosen.activation_bw,
                   in_place=True)
    apply_recipe(sim, chosen, block_size=block_size, kv_cache_bw=kv_cache_bw)
    if lm_head_bw is not None:
        sim.set_granularity("lm_head", PerChannel())
        sim.set_format("lm_head", IntegerFormat(lm_head_bw, True), kinds=("param",))
    calibration = BlockCalibrationSettings(memory_budget_mb=memory.block_inputs_mb, progress=progress)
    calibrate_by_block(sim, batches, calibration)
    if chosen.techniques:
        for technique in chosen.techniques:
            TECHNIQUES[technique](sim, batches[:technique_batches], progress,
                                  None if resume_dir is None else Path(resume_dir) / technique)
        calibrate_by_block(sim, batches, calibration)  # the activations of the new weights
    return sim


def _sequential_mse(sim: QuantSim, batches: list[torch.Tensor], progress: bool, resume_dir: Path | None) -> None:
    sequential_mse(sim, batches, SequentialMseSettings(progress=progress, resume_dir=resume_dir))


def _gptq(sim: QuantSim, batches: list[torch.Tensor], progress: bool, resume_dir: Path | None) -> None:
    gptq(sim, batches, GptqSettings(progress=progress, resume_dir=resume_dir))


TECHNIQUES = {"seqmse": _sequential_mse, "gptq": _gptq}
"""A recipe's technique names and what they run on the calibrated sim."""


def _rotate(model: nn.Module, ids: torch.Tensor, recipe: Recipe, block_size: int, progress: bool) -> None:
    rotate_causal_lm(model, RotationSettings())


def _rotate_online(model: nn.Module, ids: torch.Tensor, recipe: Recipe, block_size: int, progress: bool) -> None:
    rotate_causal_lm(model, RotationSettings(mlp_online=True))


def _smooth(model: nn.Module, ids: torch.Tensor, recipe: Recipe, block_size: int, progress: bool) -> None:
    smooth_causal_lm(model, ids, SmoothingSettings(alpha=None, weight_bw=4, weight_block_size=block_size,
                                                   mlp_down=recipe.smooth_down_proj, progress=progress))


def _awq(model: nn.Module, ids: torch.Tensor, recipe: Recipe, block_size: int, progress: bool) -> None:
    awq_causal_lm(model, ids, AwqSettings(bits=4, block_size=block_size, progress=progress))


TRANSFORMS = {"rotate": _rotate, "rotate-online": _rotate_online, "smooth": _smooth, "awq": _awq}
"""A recipe's transform names and what they do to the float copy of the model before it is quantized."""


def prepare_causal_lm(model: nn.Module, *, in_place: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``in_place``) whose attention and norms the sim quantizes op by op
    (see `edgequant.llm.attention`)."""
    prepared = (model if in_place else copy.deepcopy(model)).eval()
    set_attention = getattr(prepared, "set_attn_implementation", None)
    if set_attention is not None:  # additive float masks: the quantized attention adds them to its scores
        set_attention("eager")
    elif hasattr(prepared, "config"):
        prepared.config._attn_implementation = "eager"
    attentions = [m for m in prepared.modules() if is_llama_attention(m)]
    if not attentions:
        raise ValueError(
            f"{type(model).__name__} has no Llama-family attention (q_proj, k_proj, v_proj, o_proj and rotary "
            "positions): edgequant.llm supports Llama, Mistral, Qwen2, Qwen3 and SmolLM models; quantize other "
            "models with edgequant.QuantSim"
        )
    for attention in attentions:
        make_quantizable(attention)
    _untie_weights(prepared)
    for module in prepared.modules():
        if type(module).__name__.endswith("RMSNorm") and not any(True for _ in module.children()):
            module.onnx_op_type = NORM_OP_TYPE
    return prepared


def _untie_weights(model: nn.Module) -> None:
    """Give each layer its own copy of a shared weight (tied embedding and ``lm_head``): the device stores the two
    tensors on different grids (an int8 embedding table, a 4-bit ``lm_head``), as the leading toolkit does, and
    the recipes' techniques (GPTQ, rotations, AWQ) change one without the other."""
    seen: set[int] = set()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in seen:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            seen.add(id(param))


def apply_recipe(sim: QuantSim, recipe: Recipe, *, block_size: int, kv_cache_bw: int | None) -> None:
    """Set the weight grids, the bits of the Linear layers' inputs, the KV cache bits and the float-by-design ops of
    ``recipe`` on ``sim``."""
    sim.set_format("*", IntegerFormat(recipe.linear_bw, True), kinds=("param",), module_types=(nn.Linear,))
    grids = {"per_channel": PerChannel(), "per_block": PerBlock(block_size),
             "lpbq": Lpbq(block_size, decompressed_bw=8)}
    sim.set_granularity("*", grids[recipe.linear_grid], module_types=(nn.Linear,))
    sim.set_granularity("*", PerChannel(axis=0), module_types=(nn.Embedding,))
    norms = [name for name, module in sim.model.named_modules()
             if getattr(module, "onnx_op_type", None) == NORM_OP_TYPE]
    for name in norms:
        sim.set_format(name, IntegerFormat(8, False), kinds=("param",))
    if recipe.linear_input_bw is not None:
        for quantizer in {q.name: q for q in linear_input_quantizers(sim).values()}.values():
            sim.set_format(quantizer.owner, IntegerFormat(recipe.linear_input_bw, quantizer.symmetric),
                           kinds=(quantizer.role,))
    if kv_cache_bw is not None:
        for names in kv_cache_quantizers(sim).values():
            for name in (names.key, names.value):
                quantizer = sim.quantizer(name)
                sim.set_format(quantizer.owner, IntegerFormat(kv_cache_bw, quantizer.symmetric), kinds=("output",))


def linear_input_quantizers(sim: QuantSim) -> dict[str, Quantizer]:
    """For each Linear layer of ``sim`` (by name), the enabled quantizer whose grid its input is on: the layer's own
    input quantizer where it has one, else the one whose output it reads, through reshapes and other data movement,
    as one float forward of the sim's dummy input records it (`edgequant.sim.emulation.provenance`). Layers that
    read a float tensor are left out. These are the operands of the integer matmuls, the activations QuaRot counts."""
    calls = record_calls(sim.model, *split_model_input(sim.dummy_input))
    own = {q.owner: q for q in sim.quantizers(role="input").values() if q.key == "0" and q.enabled}
    found = {}
    for name, layer in sim.quantized_modules().items():
        if not isinstance(layer, nn.Linear) or name not in calls:
            continue
        argument = calls[name].args[0] if calls[name].args else None
        upstream = argument.quantizer if isinstance(argument, RecordedTensor) else None
        if name in own:
            found[name] = own[name]
        elif upstream is not None and upstream.enabled:
            found[name] = upstream
    return found


def kv_cache_quantizers(sim: QuantSim) -> dict[int, KvCacheQuantizers]:
    """For each decoder layer index, the quantizers of the keys (after the rotary embedding) and the values its
    KV cache stores."""
    found = {}
    for name, module in sim.model.named_modules():
        if hasattr(module, "cache_write") and hasattr(module, "layer_idx"):
            found[module.layer_idx] = KvCacheQuantizers(
                f"{name}.rope_k.add.output_quantizers.0", f"{name}.v_proj.output_quantizers.0"
            )
    return found


def _id_batches(ids: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration_ids must be a LongTensor [N, T] of token ids, got {ids.dtype} "
                             f"{list(ids.shape)}")
        yield from ids.long().split(batch_size)
        return
    for batch in ids:
        yield from _id_batches(batch if batch.dim() == 2 else batch.unsqueeze(0), batch.shape[0] or 1)
