"""Affine quantize-dequantize on the grid described in :mod:`edgequant.quantization.encoding`.

`x / scale` is a true division (not a multiplication by ``1/scale``) and `torch.round` rounds half to even:
that is what ONNX ``QuantizeLinear`` and ONNX Runtime do, so the simulation and an exported model agree bit
for bit.

Gradients: the straight-through estimator for the input (passed where the value lies on the grid's range,
zero where it was clipped), and the LSQ gradients (Esser et al., 2020) for scale and offset, so that the
same function serves plain simulation, QAT and QAT with range learning.
"""

from __future__ import annotations

import torch

from edgequant.quantization import fused_cpu, fused_cuda
from edgequant.quantization.encoding import grid_steps


def quantize(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bitwidth: int, *, strict_symmetric: bool = False
) -> torch.Tensor:
    """Integers on the unsigned grid ``[0, 2**bitwidth - 1]`` (``- 2`` on the strict symmetric grid), returned in
    x's float dtype."""
    return torch.clamp(torch.round(x / scale) - offset, 0, grid_steps(bitwidth, strict_symmetric))


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return (q + offset) * scale


class _QuantDequant(torch.autograd.Function):
    """Fake quantization with STE/LSQ gradients.

    The in-range mask (one bool per value) is kept from the forward, so a backward for the input alone is one
    select. Where the fused CPU loops take ``x`` (`fused_cpu.can_fuse`), that forward is one pass, which writes the
    mask beside the output, and the select is a loop of theirs too. With range learning the fused forward saves
    only ``x``, and one more loop returns every gradient; elsewhere that forward allocates three full-size float
    tensors (``x / s``, its rounding — reused for the scale derivative — and the clamp, which becomes the output)
    and the backward one (the input gradient): the scale and offset gradients are reductions, not further
    element-wise products.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, num_steps):  # noqa: ANN001 - autograd signature
        learns_range = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.num_steps = num_steps
        ctx.fused = fused_cpu.can_fuse(x, scale)
        if ctx.fused and learns_range:
            ctx.save_for_backward(x, scale, offset)
            return fused_cpu.quantize_dequantize(x, scale, offset, num_steps, inplace=False)
        if ctx.fused:
            in_range = torch.empty_like(x, dtype=torch.bool)
            ctx.save_for_backward(in_range)
            return fused_cpu.quantize_dequantize(x, scale, offset, num_steps, inplace=False, in_range=in_range)
        out, *saved = _forward(x, scale, offset, num_steps, learns_range)
        ctx.save_for_backward(*saved, *((scale, offset) if learns_range else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        learns_range = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        if ctx.fused:
            if learns_range:
                x, scale, offset = ctx.saved_tensors
                return (*fused_cpu.range_learning_grads(x, grad_out, scale, offset, ctx.num_steps), None)
            return fused_cpu.straight_through_grad(ctx.saved_tensors[0], grad_out), None, None, None
        in_range = ctx.saved_tensors[0]
        grad_in_range = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:  # not `grad * mask`: that copies the mask to float
            grad_in_range = torch.where(in_range, grad_out, 0.0)
        grad_scale = grad_offset = None
        if learns_range:
            _, scale_derivative, scale, offset = ctx.saved_tensors
            if ctx.needs_input_grad[1]:
                grad_scale = _sum_of_products(grad_out, scale_derivative, scale)
            if ctx.needs_input_grad[2]:  # clipped values move by `scale` per unit of offset
                clipped = _reduce_to(grad_out, offset) - _reduce_to(grad_in_range, offset)
                grad_offset = clipped * scale
        return (grad_in_range if ctx.needs_input_grad[0] else None), grad_scale, grad_offset, None


def _forward(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_steps: int, learns_range: bool
) -> tuple[torch.Tensor, ...]:
    """``(output, in_range[, scale derivative])`` in separate passes, reusing buffers where autograd allows."""
    scaled = x / scale
    rounded = scaled.round() if learns_range else scaled.round_()
    if offset.dim() == 0 and offset.device.type == "cpu" and not torch.compiler.is_compiling():
        low = offset.item()  # scalar bounds are faster than tensor bounds on CPU; no GPU sync here
        clamped = torch.clamp(rounded, low, low + num_steps)
    else:
        clamped = torch.clamp(rounded, offset, offset + num_steps)
    in_range = rounded == clamped
    if not learns_range:
        return clamped.mul_(scale), in_range
    # d(out)/d(scale): round(x/s) - x/s in range, the grid's end where clipped; written into `rounded`
    scale_derivative = torch.where(in_range, rounded.sub_(scaled), clamped, out=rounded)
    return clamped.mul_(scale), in_range, scale_derivative


def _sum_of_products(grad: torch.Tensor, derivative: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sum(grad * derivative)`` reduced to ``like``'s shape; one dot product (no product tensor) per tensor."""
    if like.numel() == 1 and grad.is_contiguous() and derivative.is_contiguous():
        return torch.dot(grad.reshape(-1), derivative.reshape(-1)).reshape(like.shape)
    return _reduce_to(grad * derivative, like)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the (per-tensor or per-channel) parameter."""
    padded = (1,) * (grad.dim() - like.dim()) + tuple(like.shape)
    dims = [d for d, size in enumerate(padded) if size == 1 and grad.shape[d] != 1]
    reduced = grad.sum(dim=dims, keepdim=True) if dims else grad
    return reduced.reshape(like.shape)


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bitwidth: int, inplace: bool = False,
    clamp_first: tuple[float, float] | None = None, *, strict_symmetric: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x``; ``scale``/``offset`` must already broadcast against ``x``; ``strict_symmetric``: the grid
    has one step fewer (see `edgequant.quantization.encoding`).

    Without autograd (evaluation, calibration) it runs one fused pass where a fused kernel applies (CUDA; contiguous
    float32 CPU tensors), else four in-place passes; with ``inplace=True`` it also reuses ``x``'s memory (for op outputs
    that nothing else holds), which saves an allocation per tensor. ``clamp_first`` clamps ``x`` to
    ``(low, high)`` before quantizing (the ReLU or ReLU6 that produced it): inside the fused CPU pass where that
    applies (`fused_cpu.can_fuse`), else as a pass of its own.
    """
    num_steps = grid_steps(bitwidth, strict_symmetric)
    if offset.requires_grad:  # a learned offset is used as an integer (rounded with a straight-through grad)
        offset = offset.detach().round() + (offset - offset.detach())  # exactly integral in value
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or offset.requires_grad)
    if not needs_grad and fused_cpu.can_fuse(x, scale):
        return fused_cpu.quantize_dequantize(x, scale, offset, num_steps, inplace, clamp_first)
    if clamp_first is not None:
        x = x.clamp_(*clamp_first) if inplace and not needs_grad else torch.clamp(x, *clamp_first)
        inplace = not needs_grad  # the clamped tensor is ours to write into
    if needs_grad:
        return _QuantDequant.apply(x, scale, offset, num_steps)
    if torch.compiler.is_compiling():  # one graph, no .item() or in-place writes: the compiler fuses the passes
        return torch.clamp(torch.round(x / scale), offset, offset + num_steps) * scale
    if x.is_cuda and fused_cuda.can_fuse(x, scale):
        return fused_cuda.quantize_dequantize_fused(x, scale, offset, num_steps, inplace)
    out = x.div_(scale) if inplace else torch.div(x, scale)
    out.round_()
    if offset.dim() == 0 and offset.device.type == "cpu":
        low = offset.item()  # scalar bounds: 3x faster than tensor bounds on CPU; no GPU sync here
        out.clamp_(low, low + num_steps)
    else:
        out.clamp_(offset, offset + num_steps)
    return out.mul_(scale)
