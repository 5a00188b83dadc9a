"""Emulation switched on and off: the forward of every planned op is replaced by one that recovers the integer
operands and runs the op's `Kernel`, falling back to the default forward where the runtime would not fuse."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgequant.quantization import Quantizer
from edgequant.sim.emulation.arithmetic import Grid, RuntimeModel
from edgequant.sim.emulation.kernels import KERNELS, Kernel
from edgequant.sim.emulation.planning import EmulatedOp, EmulationPlan, clip_bounds


def _ready(quantizers: list[Quantizer]) -> bool:
    """Enabled, calibrated integer grids only: a float format (fp8 has a scale too) is left to the sim."""
    return all(q.enabled and not q.calibrating and q.tensor_values("scale") is not None and q.float_format is None
               for q in quantizers)


def _activation_implied(module: nn.Module, grid: Grid) -> bool:
    """Does the output grid already clamp what ``module`` clamps (so the runtime drops the activation)?"""
    bounds = clip_bounds(module)
    if bounds is None:
        return False
    low = float(grid.offset * grid.scale)
    high = float((grid.offset + grid.num_steps) * grid.scale)
    half = float(grid.scale) / 2
    return bounds[0] <= low + half and (bounds[0] >= low - half) and high <= bounds[1] + half


def _bound(kernel: Kernel, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The call's arguments by position: the keywords follow the positional ones in the kernel's order (planned
    so); with defaults, an omitted keyword is its default, so that every argument keeps its position."""
    if not kernel.defaults:
        return (*args, *(kwargs[k] for k in kernel.keywords if k in kwargs))
    given = len(args) - (kernel.num_inputs or 1)
    return (*args, *(kwargs.get(k, default) for k, default in zip(kernel.keywords[given:], kernel.defaults[given:],
                                                                   strict=True)))


def _emulated_forward(op: EmulatedOp, runtime: RuntimeModel, default: Callable[..., Any]) -> Callable[..., Any]:
    kernel = KERNELS[op.kind]
    weight = op.module.param_quantizers["weight"] if kernel.weighted else None
    quantizers = [q for q in (*op.inputs, op.output, weight) if q is not None]
    own_output = op.module.output_quantizers["0"] if "0" in op.module.output_quantizers else None

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not _ready(quantizers) or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return default(*args, **kwargs)
        output = Grid.of(op.output) if op.output is not None else None
        if op.activation is not None and not kernel.float_inputs and not _activation_implied(op.activation, output):
            return default(*args, **kwargs)  # the runtime keeps this activation in float, and the op with it
        positional = _bound(kernel, args, kwargs)
        with torch.no_grad():
            values = kernel.compute(op.module, runtime, positional, [Grid.of(q) for q in op.inputs], output)
        if values is None:
            return default(*args, **kwargs)
        return own_output(values) if own_output is not None else values

    return forward


def install(plan: EmulationPlan) -> None:
    """Replace the forward of every planned op by its emulating forward (an instance attribute); warns in one
    line (`EmulationPlan.coverage`) when an op the runtime computes with its own arithmetic is not emulated."""
    if plan.skipped:
        warnings.warn(plan.coverage(), stacklevel=3)
    for op in plan.ops:
        default = types.MethodType(type(op.module).forward, op.module)
        op.module.forward = types.MethodType(_emulated_forward(op, plan.runtime, default), op.module)


def uninstall(plan: EmulationPlan) -> None:
    """Back to the default sim: drop the instance attributes `install` set."""
    for op in plan.ops:
        op.module.__dict__.pop("forward", None)
