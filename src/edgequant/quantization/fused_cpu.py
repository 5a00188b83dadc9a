"""One-pass quantize-dequantize for CPU tensors: the C loops of ``fused_cpu.c``, compiled at first use,
bit-identical to the eager passes of `edgequant.quantization.affine`.

On the CPU, eager fake quantization of an activation is four memory passes (divide, round, clamp, multiply) and
five Python-level op calls. These loops read and write each value once, with the grid convention intact: a true
IEEE division (not a multiplication by ``1/scale``) and round half to even, so simulation and ONNX Runtime still
agree bit for bit (tested against the eager path: ties, NaN and infinities included). The ReLU or ReLU6 whose
output is quantized runs in the same loop (``clamp_first``), as the hardware runs it inside the requantization.
In training the forward is the same loop. Without range learning it also writes the in-range mask (one byte per
value, kept for the backward as the eager forward keeps it), and the backward is one select over it; with range
learning it saves only its input, and one more loop returns the input, scale and offset gradients (the last two as
sums).

Why hand-written loops and not TorchInductor, which generated them before (`benchmarks/bench_fused_cpu.py`,
2-core EPYC, 2 threads): for a ReLU6 and its quantizer over 12.8 M values Inductor's loop takes 4.3 ms, this one
3.1 ms and the ReLU6 alone 2.9 ms; at 4 K values a compiled call costs 81 µs and this one 17 µs, so Inductor's
could only pay from about 1 M values, while here every float32 activation with one scale takes the one pass.

The library is compiled once per process (about 0.1 s, by the C compiler named in ``CC``, else ``cc``) into a
temporary directory. Where that fails (no compiler, no OpenMP) there is one warning and the eager passes;
``EDGEQUANT_FUSED_CPU=0`` in the environment keeps the eager passes from the start.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.graph import increment_version

_disabled = os.environ.get("EDGEQUANT_FUSED_CPU", "1") == "0"
_log = logging.getLogger(__name__)

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SOURCE = Path(__file__).with_name("fused_cpu.c")
_FLAGS = ("-O3", "-march=native", "-fno-fast-math", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", "-shared",
          "-fPIC")
_POINTER, _INT64, _FLOAT, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "quantize_dequantize": (_POINTER, _POINTER, _INT64, *[_FLOAT] * 5, _INT, _POINTER),
    "straight_through_grad": (_POINTER, _POINTER, _POINTER, _INT64, _INT),
    "range_learning_grads": (_POINTER, _POINTER, _POINTER, _INT64, *[_FLOAT] * 3, _INT, _POINTER),
}


def can_fuse(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Contiguous float32 CPU tensors and parameters with one scale, where the library compiled. Plain tensors
    only: tracers (TorchScript, ONNX export), the compiler and tensor subclasses (fake tensors of ``torch.export``)
    must see the eager ops, not a foreign call."""
    return (not _disabled and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and type(x) in _PLAIN_TENSORS and x.device.type == "cpu" and x.dtype == torch.float32
            and scale.numel() == 1 and x.is_contiguous() and _library() is not None)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled loops, or None (warned once) where they cannot be built."""
    command = [*shlex.split(os.environ.get("CC") or "cc"), *_FLAGS, str(_SOURCE)]
    with tempfile.TemporaryDirectory(prefix="edgequant-", ignore_cleanup_errors=True) as folder:
        path = os.path.join(folder, "fused_cpu.so")
        try:
            subprocess.run([*command, "-o", path], check=True, capture_output=True, text=True, timeout=300)
            library = ctypes.CDLL(path)  # torch is loaded: the library's OpenMP resolves to torch's own
        except (OSError, subprocess.SubprocessError) as error:
            lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines() or [type(error).__name__]
            _log.warning("edgequant: fused CPU quantization unavailable (`%s` failed: %s); using the eager passes",
                         shlex.join(command[:1]), lines[0])
            return None
    for name, argtypes in _SIGNATURES.items():
        getattr(library, name).argtypes, getattr(library, name).restype = argtypes, None
    return library


def _grid(scale: torch.Tensor, offset: torch.Tensor, num_steps: int) -> tuple[float, float, float]:
    """Scale, lowest and highest integer of the grid (integers below 2**24: exact in float32)."""
    low = offset.item()
    return scale.item(), low, low + num_steps


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_steps: int, inplace: bool,
    clamp_first: tuple[float, float] | None = None, in_range: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fake-quantized ``x`` (first clamped to ``clamp_first``, the ReLU or ReLU6 that produced it) from one
    pass, into ``x`` itself if ``inplace``. Clamping is exact, so the clamp in the loop gives the values of the
    activation run on its own. ``in_range`` (a bool tensor shaped like ``x``, for training) receives the
    straight-through mask: True where ``round(x / scale)`` lies on the grid, False where it was clipped."""
    out = x if inplace else torch.empty_like(x)
    floor, ceiling = clamp_first or (-math.inf, math.inf)  # an infinite clamp passes every value, NaN included
    mask = None if in_range is None else in_range.data_ptr()
    _library().quantize_dequantize(x.data_ptr(), out.data_ptr(), x.numel(), *_grid(scale, offset, num_steps),
                                   floor, ceiling, torch.get_num_threads(), mask)
    if inplace:
        increment_version(x)  # a write autograd must see, as an in-place op's
    return out


def straight_through_grad(in_range: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The input gradient of the fused forward's output: ``grad`` where the forward's mask ``in_range`` is set."""
    grad, grad_in = grad.contiguous(), torch.empty_like(grad, memory_format=torch.contiguous_format)
    _library().straight_through_grad(in_range.data_ptr(), grad.data_ptr(), grad_in.data_ptr(), grad.numel(),
                                     torch.get_num_threads())
    return grad_in


def range_learning_grads(
    x: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, scale and offset gradients (LSQ) of the fused forward's output, in one pass over ``x`` and
    ``grad``; scale and offset gradients in their parameters' shapes."""
    grad, grad_in = grad.contiguous(), torch.empty_like(x)
    sums = (ctypes.c_double * 2)()
    _library().range_learning_grads(x.data_ptr(), grad.data_ptr(), grad_in.data_ptr(), x.numel(),
                                    *_grid(scale, offset, num_steps), torch.get_num_threads(), sums)
    grad_scale, clipped = torch.tensor(list(sums), dtype=torch.float32)
    return grad_in, grad_scale.reshape(scale.shape), (clipped * scale.detach()).reshape(offset.shape)
