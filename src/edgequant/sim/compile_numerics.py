"""Keeping `torch.compile`'s division IEEE-exact, so that a compiled sim reproduces the eager one bit for bit.

The grid convention divides by the scale with IEEE round-to-nearest (see `edgequant.quantization.affine`).
Inductor's C++ (CPU) code keeps that division exact, but its Triton (GPU) code lowers ``x / y`` to the
approximate ``div.full`` unless ``torch._inductor.config.eager_numerics.division_rounding`` is set, which makes
it emit ``div_rn`` as eager CUDA does. Inductor reads the flag when it generates code, long after the user
called ``torch.compile``, so the sim sets it once where CUDA exists (importing inductor costs seconds, which
CPU-only processes do not need to pay). It changes only float32 division in the process's compiled Triton
code, to the eager result.
"""

from __future__ import annotations

import torch


def use_eager_division_when_compiled() -> None:
    """Make Inductor's Triton code divide like eager CUDA (IEEE round-to-nearest); a no-op without CUDA."""
    if not torch.cuda.is_available():
        return
    import torch._inductor.config as inductor_config

    inductor_config.eager_numerics.division_rounding = True
