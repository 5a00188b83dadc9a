"""One-pass quantize-dequantize for CUDA tensors (Triton), bit-identical to the eager four-kernel version.

On a GPU a simulated forward is dominated by kernel launches and memory passes: the eager version launches
four to five small kernels per quantizer. This kernel reads and writes each element once. It keeps the grid
convention exactly: IEEE round-to-nearest division (``div_rn``, not Triton's default approximate division),
round half to even (``rint``), then the clamp and the multiply. Used for per-tensor encodings of contiguous
float32 tensors without autograd; everything else takes the eager path.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernel():  # noqa: ANN202 - a Triton JIT function
    """Compile lazily: importing Triton costs time, and CPU-only machines never need it."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def quantize_dequantize_kernel(x_ptr, out_ptr, scale_ptr, offset_ptr, n, num_steps, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n
        x = tl.load(x_ptr + index, mask=mask)
        scale = tl.load(scale_ptr)
        offset = tl.load(offset_ptr)
        q = libdevice.rint(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, offset), offset + num_steps)
        tl.store(out_ptr + index, q * scale, mask=mask)

    return quantize_dequantize_kernel


@functools.cache
def available() -> bool:
    try:
        _kernel()
    except Exception:  # no Triton, or a Triton without libdevice/div_rn: the eager path is used
        return False
    return True


def can_fuse(x: torch.Tensor, scale: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype == torch.float32 and scale.dim() == 0 and x.is_contiguous()
            and scale.is_cuda and available())


def quantize_dequantize_fused(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_steps: int, inplace: bool
) -> torch.Tensor:
    out = x if inplace else torch.empty_like(x)
    n = x.numel()
    block = 1024
    _kernel()[((n + block - 1) // block,)](x, out, scale.float(), offset.float(), n, float(num_steps), BLOCK=block)
    return out
