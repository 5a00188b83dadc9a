"""The metric used when the user gives no evaluation function: how close the model's outputs stay to FP32's.

``fidelity = 1 - ||y - y_fp32||^2 / ||y_fp32||^2`` summed over every float output of every analysed batch
(``1 - 1/SNR``: 1.0 for the FP32 model, higher is better, finite unlike the SQNR of FP32 against itself, and
``SQNR_dB = -10 log10(1 - fidelity)``). It needs no labels and works for any output (logits, boxes,
embeddings), and noise powers add, so per-layer sensitivities read as shares of the output error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from edgequant.sim.modes import training_mode


def float_leaves(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a (nested) model output, in pytree order."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def power(tensor: torch.Tensor) -> float:
    """Sum of squares (one BLAS dot product: no temporary, blocked accumulation)."""
    flat = tensor.detach().reshape(-1).float()
    return float(torch.dot(flat, flat))


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10 log10(signal / noise)``; +inf when the noise is exactly zero."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def fidelity_to_sqnr_db(fidelity: float) -> float:
    """The output SQNR (dB) that a fidelity value stands for."""
    return sqnr_db(1.0, 1.0 - fidelity)


class OutputFidelity:
    """``metric(model) -> float``: fidelity of ``model``'s outputs to the FP32 outputs on fixed batches.

    ``batches`` are ``(args, kwargs)`` calls (as `QuantSim.batches` yields them) and ``reference`` the FP32
    outputs of those calls. Call it on ``sim.model`` after toggling quantizers to re-measure any figure of an
    analysis."""

    name = "output fidelity to FP32 (1 - NMSE)"

    def __init__(self, batches: Sequence[tuple[tuple, dict]], reference: Sequence[Any]) -> None:
        if len(batches) != len(reference):
            raise ValueError(f"{len(batches)} batches but {len(reference)} reference outputs")
        self.batches = list(batches)
        self.reference = [[leaf.detach() for leaf in float_leaves(output)] for output in reference]
        self.signal_power = sum(power(leaf) for leaves in self.reference for leaf in leaves)
        if self.signal_power == 0.0:
            raise ValueError(
                "the FP32 model's outputs are all zero on the analysis batches, so output fidelity is undefined; "
                "pass eval_fn (a function model -> float, higher is better)"
            )

    @torch.no_grad()
    def noise_power(self, model: nn.Module) -> float:
        """Sum of squared differences between ``model``'s outputs and the reference, over all batches."""
        noise = 0.0
        with training_mode(model, False):
            for index, (args, kwargs) in enumerate(self.batches):
                noise += self.batch_noise(index, model(*args, **kwargs))
        return noise

    def batch_noise(self, index: int, output: Any) -> float:
        """Sum of squared differences between ``output`` and the reference output of batch ``index``."""
        leaves, expected = float_leaves(output), self.reference[index]
        if len(leaves) != len(expected):
            raise ValueError(f"the model returned {len(leaves)} float outputs, the FP32 model {len(expected)}")
        return sum(power(got - ref) for got, ref in zip(leaves, expected, strict=True))

    def from_noise(self, noise_power: float) -> float:
        """The fidelity that a total noise power (over all batches) stands for."""
        return 1.0 - noise_power / self.signal_power

    def __call__(self, model: nn.Module) -> float:
        return self.from_noise(self.noise_power(model))
