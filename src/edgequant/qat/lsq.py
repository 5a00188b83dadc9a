"""Range learning (LSQ, Esser et al. 2020; LSQ+ offsets, Bhalgat et al. 2020): which quantizers learn, the
gradient scale of their scale/offset, and the constraints that keep a learned grid valid.

Gradient scale. LSQ multiplies the step-size gradient by ``g = 1 / sqrt(N * Qp)`` so that the scale's update
is of the same relative size as the weights' updates: ``N`` is the number of values one scale quantizes (the
weights of one output channel per channel, of one block per block, all of them per tensor; the features of one
sample for an activation) and ``Qp`` the largest positive integer of the grid: ``2**(b-1) - 1`` on the signed
symmetric grid (strict or not), ``2**b - 1`` on an asymmetric grid and on the unsigned symmetric one (offset 0,
levels ``0 .. 2**b - 1``, which ``unsigned_symmetric`` gives non-negative data). The same ``g`` scales the offset's
gradient (LSQ+). It is applied by a gradient hook on the parameter, before accumulation, so any optimizer and
``DistributedDataParallel`` see the scaled gradient.

Constraints. Whatever the optimizer does, a learned scale stays ``>= floor`` (``min_scale_fraction`` times the
calibrated scale, and never below ``MIN_RANGE / num_steps``) and a learned offset stays in
``[-num_steps, 0]`` so that zero remains on the grid. After a clamping activation the grid stays inside its range:
offset 0 after ReLU, and at most 6 at the top after ReLU6, so that ONNX Runtime still fuses the activation into
the integer convolution before it (a grid reaching past 6 leaves the convolution in float). The stored offset is a
real number (so that small updates accumulate); the quantizer always uses it rounded, with a straight-through
gradient, so the offset that simulates, exports and runs on the device is an integer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgequant.quantization import Quantizer
from edgequant.quantization.encoding import MIN_RANGE

MAX_LEARNED_BITWIDTH = 16
"""Wider grids (int32 biases) are not learned: their rounding error is negligible."""

DEFAULT_MIN_SCALE_FRACTION = 1e-3


def lsq_grad_scale(values_per_scale: int, bitwidth: int, symmetric: bool, *, unsigned: bool = False) -> float:
    """``1 / sqrt(N * Qp)``, the LSQ gradient scale for one scale quantizing ``N`` values (see module doc);
    ``unsigned``: a symmetric grid at offset 0, whose ``Qp`` is that of the whole grid."""
    positive_max = 2 ** (bitwidth - 1) - 1 if symmetric and not unsigned else 2**bitwidth - 1
    return 1.0 / math.sqrt(max(values_per_scale, 1) * positive_max)


def has_unsigned_grid(quantizer: Quantizer) -> bool:
    """Whether a symmetric quantizer sits on the unsigned grid (``unsigned_symmetric`` calibrated on non-negative
    data: offset 0 on every channel). Its offset does not train, so the grid stays unsigned. One factor serves the
    quantizer: a weight whose channels mix signed and unsigned grids counts as signed (the smaller ``Qp``)."""
    return (quantizer.symmetric and quantizer.unsigned_symmetric and quantizer.offset is not None
            and bool((quantizer.offset == 0).all()))


def values_per_scale(quantizer: Quantizer, shape: torch.Size, batched: bool) -> int:
    """How many values of a tensor of ``shape`` one of the quantizer's scales covers (per sample if
    ``batched``: activations have a batch dimension, parameters do not; per block: the block's values)."""
    return quantizer.granularity.values_per_scale(shape[1:] if batched and len(shape) > 1 else shape)


@dataclass
class LearnedRange:
    """One quantizer whose scale (and, when asymmetric, offset) trains, with its gradient scale and floor."""

    quantizer: Quantizer
    grad_scale: float
    initial_scale: torch.Tensor
    """The calibrated scale the training started from."""
    scale_floor: torch.Tensor
    learns_offset: bool
    fixed_offset: torch.Tensor
    """The offset a quantizer that does not learn it keeps (a symmetric grid's ``-2**(b-1)``)."""

    value_range: tuple[float, float] | None = None
    """What the op before the quantizer can output (ReLU: [0, inf), ReLU6: [0, 6]): the learned grid stays inside,
    so that ORT still fuses the activation into the integer kernel before it."""

    _checked_versions: tuple[int, int] = (-1, -1)

    def constrain(self) -> None:
        """Project scale/offset back onto valid values, in place (the optimizer keeps the same tensors). Cheap
        when nothing changed since the last call: the tensors' version counters are compared first."""
        scale, offset = self.quantizer.scale, self.quantizer.offset
        if (scale._version, offset._version) == self._checked_versions:
            return
        num_steps = 2**self.quantizer.bitwidth - 1
        with torch.no_grad():
            torch.fmax(scale, self.scale_floor.to(scale.device), out=scale)  # fmax also replaces NaN
            if self.learns_offset:
                lowest = 0.0 if self.value_range is not None and self.value_range[0] >= 0 else -float(num_steps)
                offset.nan_to_num_(nan=0.0).clamp_(lowest, 0.0)  # a grid from 0 after a ReLU
            elif offset._version != self._checked_versions[1]:
                offset.copy_(self.fixed_offset.to(offset.device))
            if self.value_range is not None and math.isfinite(self.value_range[1]):
                top = offset.detach().round() + num_steps
                torch.minimum(scale, self.value_range[1] / top.clamp_min(1), out=scale)  # a grid up to 6 after ReLU6
        self._checked_versions = (scale._version, offset._version)


def learn_range(
    quantizer: Quantizer, grad_scale: float, min_scale_fraction: float = DEFAULT_MIN_SCALE_FRACTION,
    value_range: tuple[float, float] | None = None,
) -> tuple[LearnedRange, list[torch.utils.hooks.RemovableHandle]]:
    """Turn ``quantizer``'s scale (and asymmetric offset) into trained parameters with the LSQ gradient scale;
    ``value_range``: what the op before it outputs, which the learned grid must not exceed."""
    if not quantizer.range_learning:
        quantizer.enable_range_learning()
    learns_offset = not quantizer.symmetric
    quantizer.scale.requires_grad_(True)
    quantizer.offset.requires_grad_(learns_offset)  # a symmetric grid's offset is fixed at -2**(b-1)
    num_steps = 2**quantizer.bitwidth - 1
    floor = (quantizer.scale.detach() * min_scale_fraction).clamp_min(MIN_RANGE / num_steps)
    handles = [quantizer.scale.register_hook(_times(grad_scale))]
    if learns_offset:
        handles.append(quantizer.offset.register_hook(_times(grad_scale)))
    learned = LearnedRange(quantizer, grad_scale, quantizer.scale.detach().clone(), floor, learns_offset,
                           quantizer.offset.detach().clone(), value_range)
    learned.constrain()
    return learned, handles


def _times(factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def scale_gradient(grad: torch.Tensor) -> torch.Tensor:
        return grad * factor

    return scale_gradient
