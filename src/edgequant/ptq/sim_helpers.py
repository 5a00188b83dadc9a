"""Small pieces the PTQ techniques share when they drive a `QuantSim`: a layer's parameter quantizer,
re-encoding a quantizer from a tensor, and forwards that a hook ends early once its layer has been seen."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from edgequant.quantization import Quantizer
from edgequant.sim.quantized_module import QuantizedModule


class StopForward(Exception):
    """Raised by a forward hook once the layer of interest has run: the rest of the model need not."""


def run_until_stopped(model: nn.Module, batches: Iterable[tuple[tuple, dict]]) -> None:
    """Run every ``(args, kwargs)`` batch through ``model``; a hook raising `StopForward` ends that forward."""
    for args, kwargs in batches:
        try:
            model(*args, **kwargs)
        except StopForward:
            pass


def param_quantizer(module: nn.Module, name: str = "weight") -> Quantizer | None:
    """The quantizer of parameter ``name`` of a sim layer, or None (not a sim layer, or not quantized)."""
    if not isinstance(module, QuantizedModule) or name not in module.param_quantizers:
        return None
    return module.param_quantizers[name]


def encode_from(quantizer: Quantizer, tensor: torch.Tensor) -> None:
    """(Re)compute ``quantizer``'s encoding from ``tensor`` alone."""
    quantizer.analyzer.reset()
    quantizer.analyzer.observe(tensor.detach())
    quantizer.compute_encoding()
