"""Torch modules for ONNX ops whose onnx2torch version departs from the ONNX definition."""

from __future__ import annotations

import math

import torch
from torch import nn


class FlattenToMatrix(nn.Module):
    """ONNX ``Flatten``: always 2-D, ``[prod(shape[:axis]), prod(shape[axis:])]`` (``axis`` equal to the rank gives
    a column; onnx2torch's version fails there, as transformers' exported attention masks have it)."""

    holds_input_values = True

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis if self.axis >= 0 else self.axis + x.dim()
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


class ReshapeAllowingZero(nn.Module):
    """ONNX ``Reshape`` with ``allowzero=1``: a 0 in the shape is a zero-size axis, as in ``torch.reshape`` (torch's
    dynamo exporter writes it, also for shapes computed at run time, which onnx2torch does not convert)."""

    holds_input_values = True

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, shape.tolist())
