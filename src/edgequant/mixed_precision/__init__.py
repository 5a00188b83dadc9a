"""Automatic mixed precision: per-group bit widths at the least cost that meets an accuracy target."""

from edgequant.mixed_precision.cost import CostModel, bitops_model, memory_model
from edgequant.mixed_precision.groups import QuantizerGroup, apply_bitwidths, find_groups
from edgequant.mixed_precision.search import MixedPrecisionResult, choose_mixed_precision

__all__ = [
    "CostModel",
    "MixedPrecisionResult",
    "QuantizerGroup",
    "apply_bitwidths",
    "bitops_model",
    "choose_mixed_precision",
    "find_groups",
    "memory_model",
]
