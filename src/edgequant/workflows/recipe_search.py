"""AutoQuant for language models: the cheapest recipe whose perplexity stays within a budget.

Recipes are tried from the smallest weights to the largest and, at equal size, from the quickest to the slowest
(min-max before sequential MSE before GPTQ); the first whose perplexity on the evaluation sequences is within
``max_increase`` of the float model's is chosen, so the expensive techniques run only where the cheap ones fail."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from edgequant.llm import RECIPES, Recipe, perplexity, quantize
from edgequant.sim import QuantSim

_SCALE_BITS = {"per_channel": 0, "per_block": 16, "lpbq": 4}  # per block: an fp16 scale, or LPBQ's 4-bit multiplier


def weight_bits(recipe: Recipe, block_size: int) -> float:
    """Bits a Linear weight costs on the device under ``recipe``: its integer plus its share of the block scale."""
    return recipe.linear_bw + _SCALE_BITS[recipe.linear_grid] / block_size


@dataclass(frozen=True)
class RecipeTrial:
    """One recipe tried: its perplexity, the increase over float, the weight bits and the time it took."""

    recipe: str
    perplexity: float
    increase: float
    weight_bits: float
    seconds: float


@dataclass
class RecipeChoice:
    """The chosen recipe's calibrated sim (None when no recipe was tried), every trial in order, and whether the
    choice meets the budget (otherwise it is the trial with the lowest perplexity)."""

    recipe: str
    sim: QuantSim
    float_perplexity: float
    trials: list[RecipeTrial]
    within_budget: bool

    def summary(self) -> str:
        lines = [f"float perplexity {self.float_perplexity:.3f}; chosen {self.recipe}"
                 + ("" if self.within_budget else " (no recipe met the budget: the lowest perplexity)")]
        lines += [f"  {t.recipe:26s} {t.weight_bits:5.2f} bits/weight  perplexity {t.perplexity:.3f} "
                  f"({100 * t.increase:+.2f} %)  {t.seconds:.0f} s" for t in self.trials]
        return "\n".join(lines)


def choose_recipe(model: nn.Module, calibration_ids: torch.Tensor, evaluation_ids: torch.Tensor, *,
                  max_increase: float = 0.05, recipes: Iterable[str] | None = None, block_size: int = 64,
                  kv_cache_bw: int | None = None, progress: bool = True) -> RecipeChoice:
    """The cheapest of ``recipes`` (default: all of `edgequant.llm.RECIPES`) whose perplexity on
    ``evaluation_ids`` is at most ``(1 + max_increase)`` times the float model's (see the module docstring)."""
    names = list(RECIPES) if recipes is None else list(recipes)
    unknown = [name for name in names if name not in RECIPES]
    if unknown or not names:
        raise ValueError(f"recipes {unknown or names} are not known: choose among {', '.join(RECIPES)}")
    if max_increase < 0:
        raise ValueError(f"max_increase must be >= 0 (a relative perplexity increase), got {max_increase}")
    order = sorted(names, key=lambda name: (weight_bits(RECIPES[name], block_size), len(RECIPES[name].techniques),
                                            "gptq" in RECIPES[name].techniques))
    reference = perplexity(model, evaluation_ids, progress=progress)
    trials: list[RecipeTrial] = []
    best: tuple[float, str, QuantSim] | None = None
    for name in order:
        started = time.perf_counter()
        sim = quantize(model, calibration_ids, recipe=name, block_size=block_size, kv_cache_bw=kv_cache_bw,
                       progress=progress)
        value = perplexity(sim, evaluation_ids, progress=progress)
        trials.append(RecipeTrial(name, value, value / reference - 1, weight_bits(RECIPES[name], block_size),
                                  time.perf_counter() - started))
        if value <= reference * (1 + max_increase):
            return RecipeChoice(name, sim, reference, trials, True)
        if best is None or value < best[0]:
            best = (value, name, sim)
    return RecipeChoice(best[1], best[2], reference, trials, False)
