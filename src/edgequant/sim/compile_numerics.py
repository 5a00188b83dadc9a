"""Keeping `torch.compile`'s division IEEE-exact, so that a compiled sim reproduces the eager one bit for bit.

The grid convention divides by the scale with IEEE round-to-nearest (see `edgequant.quantization.affine`).
Inductor's C++ (CPU) code keeps that division exact, but its Triton (GPU) code lowers ``x / y`` to the
approximate ``div.full`` unless ``torch._inductor.config.eager_numerics.division_rounding`` is set, which makes
it emit ``div_rn`` as eager CUDA does. Inductor reads the flag when it generates code, long after
``torch.compile`` returned, so setting it for the process would change every model the process compiles, the
user's other models included. Instead the flag travels with one compiled module, as a ``torch.compile`` option:
`compile_with_eager_division` (what `QuantSim.compile` calls), or ``options=EAGER_DIVISION`` by hand.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EAGER_DIVISION: dict[str, Any] = {"eager_numerics.division_rounding": True}
"""Inductor options under which compiled float32 division rounds as eager CUDA does (no effect on CPU code)."""


def compile_with_eager_division(
    module: nn.Module, *, mode: str | None = None, options: dict[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """``torch.compile(module, mode=..., options=..., **kwargs)`` whose Inductor code divides like eager CUDA.

    The setting is an option of this compiled module only (Inductor's process-wide config is left alone).
    ``mode`` and ``options`` combine as in ``torch.compile``, which accepts only one of them: the mode's options
    come first, then `EAGER_DIVISION`, then ``options``. A backend other than Inductor gets no options."""
    if kwargs.get("backend", "inductor") != "inductor":
        return torch.compile(module, mode=mode, options=options, **kwargs)
    merged: dict[str, Any] = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        merged.update(list_mode_options(mode, kwargs.get("dynamic")))
    merged.update(EAGER_DIVISION)
    merged.update(options or {})
    return torch.compile(module, options=merged, **kwargs)
