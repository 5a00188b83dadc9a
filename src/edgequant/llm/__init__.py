"""Language models on fixed-point hardware: causal LMs in the sim, their evaluation and their techniques."""

from edgequant.llm.evaluation import (
    GenerationMatch,
    TokenAgreement,
    generation_match,
    greedy_generate,
    next_token_agreement,
    perplexity,
)
from edgequant.llm.quantize import KvCacheQuantizers, kv_cache_quantizers, prepare_causal_lm, quantize
from edgequant.llm.recipes import RECIPES, Recipe

__all__ = [
    "RECIPES",
    "GenerationMatch",
    "KvCacheQuantizers",
    "Recipe",
    "TokenAgreement",
    "generation_match",
    "greedy_generate",
    "kv_cache_quantizers",
    "next_token_agreement",
    "perplexity",
    "prepare_causal_lm",
    "quantize",
]
