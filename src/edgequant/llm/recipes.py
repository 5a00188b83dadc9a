"""Named quantization recipes for causal language models: which bits and grids each tensor gets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """What a recipe quantizes how. Every Linear layer (``lm_head`` included) gets ``linear_bw``-bit symmetric
    weights on ``linear_grid`` (``"per_channel"``, ``"per_block"`` or ``"lpbq"``: blocks of ``block_size`` along
    the input features, LPBQ's block scales on an 8-bit per-channel grid); embedding and norm weights are 8-bit,
    activations ``activation_bw``-bit, all from min-max statistics, except that ``linear_input_bw`` (None: no
    exception) gives its bits to the activation quantizers whose output a Linear layer reads: the operands of the
    integer matmuls, which is what QuaRot and SpinQuant count as a model's activation bits (W4A8 there: 8-bit Linear
    inputs, a 16-bit residual stream, Linear outputs, element-wise ops and attention). ``transforms`` change the
    float model (the sim's copy) before it is quantized, keeping its function (``"rotate"``: QuaRot's Hadamard
    rotations R1 and R2, ``"rotate-online"``: those and R4, an online rotation of down_proj's input, ``"smooth"``:
    SmoothQuant, ``"awq"``: AWQ's weight scaling); ``smooth_down_proj``: SmoothQuant also scales down_proj's input
    (up_proj's rows into down_proj's columns, before R4's rotation), where an attention sink's product puts
    thousands in a few channels against tens elsewhere and sets the static 8-bit grid; ``techniques`` then refine
    the weight encodings or the weights of the calibrated sim, in order."""

    name: str
    linear_bw: int
    linear_grid: str
    activation_bw: int = 16
    linear_input_bw: int | None = None
    techniques: tuple[str, ...] = ()
    transforms: tuple[str, ...] = ()
    smooth_down_proj: bool = False
    summary: str = ""


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("w8a16", 8, "per_channel", summary="8-bit per-channel Linear weights, 16-bit activations"),
        Recipe("w8a16-rotated", 8, "per_channel", transforms=("rotate",),
               summary="w8a16 on the model rotated by Hadamard matrices (QuaRot R1 and R2)"),
        Recipe("w4a16", 4, "per_channel", summary="4-bit per-channel Linear weights, 16-bit activations"),
        Recipe("w4a16-block", 4, "per_block", summary="4-bit Linear weights per block, 16-bit activations"),
        Recipe("w4a16-lpbq", 4, "lpbq",
               summary="4-bit Linear weights per block on an 8-bit per-channel grid (LPBQ), 16-bit activations"),
        Recipe("w4a16-lpbq-seqmse", 4, "lpbq", techniques=("seqmse",),
               summary="w4a16-lpbq with block scales chosen by sequential MSE"),
        Recipe("w4a16-lpbq-gptq", 4, "lpbq", techniques=("gptq",),
               summary="w4a16-lpbq with weights rounded by GPTQ"),
        Recipe("w4a16-lpbq-seqmse-gptq", 4, "lpbq", techniques=("seqmse", "gptq"),
               summary="w4a16-lpbq, block scales by sequential MSE, then weights rounded by GPTQ"),
        Recipe("w4a16-block-gptq", 4, "per_block", techniques=("gptq",),
               summary="w4a16-block with weights rounded by GPTQ"),
        Recipe("w4a16-rotated-lpbq", 4, "lpbq", transforms=("rotate",),
               summary="w4a16-lpbq on the model rotated by Hadamard matrices (QuaRot R1 and R2)"),
        Recipe("w4a16-rotated-gptq", 4, "lpbq", transforms=("rotate",), techniques=("gptq",),
               summary="w4a16-lpbq on the rotated model, weights rounded by GPTQ"),
        Recipe("w4a16-rotated-seqmse-gptq", 4, "lpbq", transforms=("rotate",), techniques=("seqmse", "gptq"),
               summary="w4a16-lpbq on the rotated model, block scales by sequential MSE, then weights rounded by GPTQ"),
        Recipe("w4a16-lpbq-awq", 4, "lpbq", transforms=("awq",),
               summary="w4a16-lpbq after AWQ's activation-aware weight scaling"),
        Recipe("w4a16-lpbq-awq-gptq", 4, "lpbq", transforms=("awq",), techniques=("gptq",),
               summary="w4a16-lpbq after AWQ's scaling, weights rounded by GPTQ"),
        Recipe("w4a8", 4, "lpbq", linear_input_bw=8, transforms=("rotate", "smooth"), techniques=("gptq",),
               smooth_down_proj=True,
               summary="4-bit LPBQ weights, 8-bit Linear inputs (QuaRot's A8; the rest 16-bit): rotation, "
                       "SmoothQuant (down_proj's input too), then GPTQ"),
        Recipe("w4a8-r4", 4, "lpbq", linear_input_bw=8, transforms=("rotate-online", "smooth"),
               techniques=("gptq",), smooth_down_proj=True,
               summary="w4a8 with QuaRot's online Hadamard rotation of down_proj's input (R4)"),
        Recipe("w4a8-r4-seqmse-gptq", 4, "lpbq", linear_input_bw=8, transforms=("rotate-online", "smooth"),
               techniques=("seqmse", "gptq"), smooth_down_proj=True,
               summary="w4a8-r4, block scales by sequential MSE, then weights rounded by GPTQ"),
        Recipe("w4a8-strict", 4, "lpbq", activation_bw=8, transforms=("rotate", "smooth"), techniques=("gptq",),
               summary="4-bit LPBQ weights, 8-bit outputs of every op the htp config does not keep at 16 bits "
                       "(Linear layers, norms, SiLU, attention's matmuls): rotation, SmoothQuant, then GPTQ"),
        Recipe("w4a8-strict-r4", 4, "lpbq", activation_bw=8, transforms=("rotate-online", "smooth"),
               techniques=("gptq",),
               summary="w4a8-strict with QuaRot's online Hadamard rotation of down_proj's input (R4)"),
        Recipe("w4a8-strict-r4-seqmse-gptq", 4, "lpbq", activation_bw=8, transforms=("rotate-online", "smooth"),
               techniques=("seqmse", "gptq"),
               summary="w4a8-strict-r4, block scales by sequential MSE, then weights rounded by GPTQ"),
    )
}


def recipe_named(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is one line listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
