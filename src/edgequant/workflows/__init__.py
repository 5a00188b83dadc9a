"""Orchestration on top of the techniques: AutoQuant, and its recipe search for language models."""

from edgequant.workflows.autoquant import AutoQuantSettings, QuantSimSettings, autoquant
from edgequant.workflows.autoquant_result import AutoQuantResult, StepRecord
from edgequant.workflows.recipe_search import RecipeChoice, RecipeTrial, choose_recipe, weight_bits

__all__ = [
    "AutoQuantResult",
    "AutoQuantSettings",
    "QuantSimSettings",
    "RecipeChoice",
    "RecipeTrial",
    "StepRecord",
    "autoquant",
    "choose_recipe",
    "weight_bits",
]
