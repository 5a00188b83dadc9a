"""Number formats: what grid a quantizer rounds a tensor onto, as a value.

* `IntegerFormat`: the affine integer grid of `edgequant.quantization.encoding` (bitwidth, symmetry; the scale and
  offset are calibrated, the layout is the quantizer's `Granularity`).
* `FloatFormat`: a float dtype the hardware computes in. The rounding is torch's own cast, so a quantize-dequantize
  is bit-identical to ``x.half().float()`` and friends:

  - ``float16`` and ``bfloat16`` have no scale: the QDQ is a plain cast round trip. Values beyond the dtype's range
    become +-inf and values below its smallest subnormal become (signed) zero, exactly as the cast does; nothing is
    calibrated.
  - ``float8_e4m3`` (``torch.float8_e4m3fn``) and ``float8_e5m2`` have too little range to be used unscaled: the
    tensor is divided by a calibrated scale ``amax / dtype max`` (per tensor, or per channel), cast to fp8 and back,
    and multiplied by the scale. Values beyond the calibrated amax are clamped to +-dtype max before the cast, so
    both fp8 formats saturate (torch's own cast saturates e4m3fn, which has no inf, but overflows e5m2 to inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FLOAT_DTYPES", "FloatFormat", "IntegerFormat", "NumberFormat", "float_format_from_ints",
           "float_format_ints"]

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
"""The float formats, by name, and the torch dtype that does their rounding."""

MIN_FP8_SCALE = 1e-12
"""Smallest fp8 scale, so that an all-zero tensor still has a finite, positive one."""


@dataclass(frozen=True)
class IntegerFormat:
    """The affine integer grid: ``bitwidth`` bits, symmetric around zero or not (see `Encoding`)."""

    bitwidth: int = 8
    symmetric: bool = False

    def describe(self) -> str:
        return f"int{self.bitwidth} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class FloatFormat:
    """A float dtype by name (one of `FLOAT_DTYPES`); fp8 formats carry a calibrated scale, 16-bit ones none."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in FLOAT_DTYPES:
            raise ValueError(f"float format {self.name!r} is not supported; use one of {', '.join(FLOAT_DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.name]

    @property
    def bitwidth(self) -> int:
        return torch.finfo(self.dtype).bits

    @property
    def scaled(self) -> bool:
        """Whether the format needs a calibrated scale (fp8: its range is too small for unscaled data)."""
        return self.bitwidth == 8

    @property
    def max(self) -> float:
        """Largest finite value of the dtype (448 for e4m3fn, 57344 for e5m2)."""
        return float(torch.finfo(self.dtype).max)

    def describe(self) -> str:
        return self.name

    def equals(self, other: object) -> bool:
        """`Encoding.equals`'s counterpart, for code that compares what two tensors are quantized to."""
        return self == other

    def scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The fp8 scale ``amax / dtype max`` (float32), never below `MIN_FP8_SCALE`."""
        return (amax.float() / self.max).clamp_min(MIN_FP8_SCALE)

    def quantize_dequantize(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Round ``x`` onto the format and back to ``x.dtype``, with a straight-through gradient.

        A scaled format needs ``scale`` (broadcastable to ``x``); an unscaled one takes none."""
        if not self.scaled:
            return _StraightThroughCast.apply(x, self.dtype)
        if scale is None:
            raise ValueError(f"{self.name} quantize-dequantize needs a scale (calibrate first)")
        return _StraightThroughCast.apply((x / scale).clamp(-self.max, self.max), self.dtype) * scale


class _StraightThroughCast(torch.autograd.Function):
    """Cast to ``dtype`` and back (the exact values of the cast), with the identity as gradient."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


NumberFormat = IntegerFormat | FloatFormat
"""Either format; a `Quantizer` exposes its own as ``number_format``."""


def float_format_ints(value: FloatFormat | None) -> int:
    """A float format as one integer for a quantizer's extra state: 0 for the integer grid, 1 + index otherwise."""
    return 0 if value is None else 1 + list(FLOAT_DTYPES).index(value.name)


def float_format_from_ints(code: int) -> FloatFormat | None:
    """Inverse of `float_format_ints`."""
    if code == 0:
        return None
    names = list(FLOAT_DTYPES)
    if not 1 <= code <= len(names):
        raise ValueError(f"float format code {code} is unknown (this edgequant reads 0 to {len(names)})")
    return FloatFormat(names[code - 1])
