"""The `Encoding` value type: what a quantizer knows about its integer grid.

Convention (the same as AIMET's and, up to a sign, ONNX's):

* a tensor is quantized onto the unsigned grid ``q in [0, 2**bitwidth - 1]``::

      q = clamp(round(x / scale) - offset, 0, 2**bitwidth - 1)      # round half to even
      x_hat = (q + offset) * scale

* ``offset`` is an integer ``<= 0`` (AIMET: ``offset = round(min / scale)``); the representable range is
  ``[offset * scale, (offset + 2**bitwidth - 1) * scale]``.
* ONNX ``QuantizeLinear`` with ``uint`` output uses ``zero_point = -offset``. A symmetric encoding has
  ``offset = -2**(bitwidth - 1)`` and maps to a *signed* ONNX type with ``zero_point = 0``: the signed
  integer is ``q + offset``. Both views give the same dequantized values bit for bit.

Two symmetric variants of AIMET's quantsim config (``defaults.strict_symmetric`` / ``unsigned_symmetric``; AIMET's
grid arithmetic is ``getComputedEncodings`` in its libpymo ``quantization_utils.cpp``):

* *strict* symmetric: one level fewer, symmetric around zero: ``offset = -(2**(bitwidth - 1) - 1)`` and
  ``2**bitwidth - 2`` steps, i.e. ``[-127, 127] * scale`` at 8 bits with ``scale = max|x| / 127``;
* *unsigned* symmetric: a symmetric quantizer whose range starts at 0 (non-negative data) takes the whole unsigned
  grid: ``offset = 0``, ``scale = max / (2**bitwidth - 1)``. It is an ordinary encoding with ``symmetric=True`` and
  offset 0 (AIMET's files mark it the same way); it exports to an unsigned type with zero point 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgequant.quantization.granularity import (
    PER_TENSOR,
    Granularity,
    as_granularity,
    granularity_from_json,
    legacy_axis,
)


@dataclass
class Encoding:
    """Scale/offset of one quantizer, laid out as its `Granularity` says (see `edgequant.quantization.granularity`).

    ``granularity`` also takes the ``axis: int | None`` of older code (None: per tensor, an int: per channel)."""

    scale: torch.Tensor
    offset: torch.Tensor
    bitwidth: int
    symmetric: bool
    granularity: Granularity = PER_TENSOR
    strict_symmetric: bool = False
    """The strict symmetric grid (``2**bitwidth - 2`` steps from ``-(2**(bitwidth - 1) - 1)``); needs ``symmetric``."""

    def __post_init__(self) -> None:
        self.granularity = as_granularity(self.granularity)
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32).detach()
        self.offset = torch.as_tensor(self.offset, dtype=torch.float32).detach().round()
        if self.scale.shape != self.offset.shape:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != offset shape {tuple(self.offset.shape)}")
        check_bitwidth(self.bitwidth, "encoding bitwidth")
        if self.scale.numel() == 1:  # per tensor, the common case: Python floats, ~10x faster than tensor ops
            valid_scale, valid_offset = 0 < float(self.scale) < math.inf, math.isfinite(float(self.offset))
        else:
            valid_scale = bool(torch.isfinite(self.scale).all()) and not bool((self.scale <= 0).any())
            valid_offset = bool(torch.isfinite(self.offset).all())
        if not valid_scale:
            raise ValueError("encoding scale must be finite and > 0, got " + str(self.scale.tolist()))
        if not valid_offset:
            raise ValueError("encoding offset must be finite, got " + str(self.offset.tolist()))
        if self.strict_symmetric:
            lowest = strict_symmetric_offset(self.bitwidth)
            if not self.symmetric or not bool((self.offset == lowest).all()):
                raise ValueError(
                    f"a strict symmetric {self.bitwidth}-bit encoding is symmetric with offset {lowest}, got "
                    f"symmetric={self.symmetric}, offset {self.offset.tolist()}"
                )
        self.granularity.check_grid(self.bitwidth, self.symmetric, "encoding")

    @property
    def axis(self) -> int | None:
        """The ``axis: int | None`` of older code (per tensor or one-axis per channel only; see `legacy_axis`)."""
        return legacy_axis(self.granularity)

    @property
    def num_steps(self) -> int:
        return grid_steps(self.bitwidth, self.strict_symmetric)

    @property
    def signed(self) -> bool:
        """Whether the grid is the signed ``[-2**(b-1), 2**(b-1) - 1]`` (or strict ``[-(2**(b-1) - 1), ...]``) one,
        which exports to a signed ONNX type with zero point 0; every other grid (asymmetric, or symmetric with an
        unsigned channel) exports to an unsigned type with ``zero_point = -offset``."""
        if self.strict_symmetric:
            return True
        return self.symmetric and bool((self.offset == -(2 ** (self.bitwidth - 1))).all())

    @property
    def min(self) -> torch.Tensor:
        return self.offset * self.scale

    @property
    def max(self) -> torch.Tensor:
        return (self.offset + self.num_steps) * self.scale

    @property
    def onnx_zero_point(self) -> torch.Tensor:
        """Zero point in the ONNX type this encoding exports to (0 in the signed type, see `signed`)."""
        if self.signed:
            return torch.zeros_like(self.offset)
        return -self.offset

    @classmethod
    def from_range(
        cls,
        min_val: torch.Tensor | float,
        max_val: torch.Tensor | float,
        bitwidth: int,
        symmetric: bool,
        granularity: Granularity | int | None = PER_TENSOR,
        *,
        strict_symmetric: bool = False,
        unsigned_symmetric: bool = False,
    ) -> Encoding:
        """Encoding covering ``[min_val, max_val]`` (made to include 0 so that zero is exact), laid out as
        ``granularity`` says (the bounds already have its scale shape).

        A range narrower than ``MIN_RANGE`` (constant or all-zero tensors) is widened to ``MIN_RANGE``
        so that the scale is never zero. Non-finite bounds, or ``min_val > max_val``, are a ValueError.
        ``strict_symmetric`` and ``unsigned_symmetric`` (symmetric only, exclusive) choose the grid variants of the
        module docstring; with ``unsigned_symmetric`` each channel whose ``min_val >= 0`` takes the unsigned grid.
        """
        min_val = torch.as_tensor(min_val, dtype=torch.float32)
        max_val = torch.as_tensor(max_val, dtype=torch.float32)
        _check_range(min_val, max_val)
        granularity = as_granularity(granularity)
        granularity.check_grid(bitwidth, symmetric, "encoding")
        scale, offset = grid_from_range(
            min_val, max_val, bitwidth, symmetric, strict_symmetric=strict_symmetric,
            unsigned_symmetric=unsigned_symmetric,
        )
        scale = granularity.project(scale, bitwidth)
        return cls(scale, offset, bitwidth, symmetric, granularity, symmetric and strict_symmetric)

    def broadcast_to(self, shape: tuple[int, ...] | torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and offset shaped to broadcast element for element against a tensor of ``shape`` (blocks repeated),
        for code that works on whole tensors."""
        return self.granularity.broadcast(self.scale, shape), self.granularity.broadcast(self.offset, shape)

    def to(self, device: torch.device | str) -> Encoding:
        return Encoding(
            self.scale.to(device), self.offset.to(device), self.bitwidth, self.symmetric, self.granularity,
            self.strict_symmetric,
        )

    def equals(self, other: object) -> bool:
        return (
            isinstance(other, Encoding)
            and self.bitwidth == other.bitwidth
            and self.symmetric == other.symmetric
            and self.strict_symmetric == other.strict_symmetric
            and self.granularity == other.granularity
            and torch.equal(self.scale.cpu(), other.scale.cpu())
            and torch.equal(self.offset.cpu(), other.offset.cpu())
        )

    def to_dict(self) -> dict:
        """JSON form: the granularity, and for per-tensor and one-axis per-channel encodings also the ``axis`` older
        readers take."""
        data = {
            "scale": self.scale.cpu().tolist(),
            "offset": self.offset.cpu().tolist(),
            "bitwidth": self.bitwidth,
            "symmetric": self.symmetric,
            "granularity": self.granularity.to_json(),
            "strict_symmetric": self.strict_symmetric,
        }
        try:
            data["axis"] = legacy_axis(self.granularity)
        except ValueError:
            pass  # no axis form: readers of "axis" alone cannot take this encoding
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Encoding:
        """Reads `to_dict`'s form, and the older one with ``axis`` only."""
        granularity = (granularity_from_json(data["granularity"]) if "granularity" in data
                       else as_granularity(data.get("axis")))
        return cls(
            torch.tensor(data["scale"]),
            torch.tensor(data["offset"]),
            int(data["bitwidth"]),
            bool(data["symmetric"]),
            granularity,
            bool(data.get("strict_symmetric", False)),
        )


def grid_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    bitwidth: int,
    symmetric: bool,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    strict_symmetric: bool = False,
    unsigned_symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and offset of `Encoding.from_range`, for finite float32 bounds with ``min_val <= max_val``
    (unchecked). With ``out`` the results are written into those (scale, offset) tensors, so that QAT can refresh
    a weight's grid every step without allocating or validating an `Encoding`; both uses share these ops, so
    their results agree bit for bit."""
    if symmetric and strict_symmetric and unsigned_symmetric:
        raise ValueError("strict_symmetric and unsigned_symmetric are exclusive (AIMET's analyzers assert so too)")
    if symmetric and unsigned_symmetric:
        unsigned = min_val >= 0
        if bool(unsigned.all()):  # AIMET: a symmetric range that starts at 0 is computed as an asymmetric one
            return grid_from_range(min_val, max_val, bitwidth, False, out)
        if bool(unsigned.any()):  # per channel: the non-negative channels take the unsigned grid
            signed_grid = grid_from_range(min_val, max_val, bitwidth, True)
            unsigned_grid = grid_from_range(min_val, max_val, bitwidth, False)
            scale, offset = (torch.where(unsigned, u, s) for u, s in zip(unsigned_grid, signed_grid, strict=True))
            if out is None:
                return scale, offset
            return out[0].copy_(scale), out[1].copy_(offset)
    scale_out, offset_out = out if out is not None else (None, None)
    num_steps = 2**bitwidth - 1
    if symmetric:  # max(-min(min, 0), max(max, 0), MIN_RANGE) is max(-min, max, MIN_RANGE)
        abs_max = torch.maximum(-min_val, max_val).clamp_min_(MIN_RANGE)
        scale = torch.div(abs_max, num_steps // 2, out=scale_out)  # 2**(b-1) - 1 positive steps, strict or not
        low = float(strict_symmetric_offset(bitwidth) if strict_symmetric else -(2 ** (bitwidth - 1)))
        offset = torch.full_like(scale, low) if offset_out is None else offset_out.fill_(low)
        return scale, offset
    min_val = min_val.clamp_max(0.0)  # the range includes zero, so that zero is exact
    max_val = torch.maximum(max_val.clamp_min(0.0), min_val + MIN_RANGE)
    scale = torch.div(max_val - min_val, num_steps, out=scale_out)
    offset = torch.div(min_val, scale, out=offset_out).round_()
    return scale, offset


def grid_steps(bitwidth: int, strict_symmetric: bool = False) -> int:
    """Steps of a ``bitwidth``-bit grid: ``2**bitwidth - 1``, one fewer on the strict symmetric grid."""
    return 2**bitwidth - 1 - int(strict_symmetric)


def strict_symmetric_offset(bitwidth: int) -> int:
    """The offset of the strict symmetric grid, ``-(2**(bitwidth - 1) - 1)`` (AIMET's ``-ceil(num_steps / 2)``)."""
    return -(2 ** (bitwidth - 1) - 1)


def _check_range(min_val: torch.Tensor, max_val: torch.Tensor) -> None:
    """Refuse bounds no encoding can honour (a swapped or NaN range would give a meaningless grid)."""
    if min_val.shape != max_val.shape and min_val.dim() and max_val.dim():
        raise ValueError(f"min shape {tuple(min_val.shape)} != max shape {tuple(max_val.shape)}")
    if min_val.numel() == 1 and max_val.numel() == 1 and -math.inf < float(min_val) <= float(max_val) < math.inf:
        return  # one scale (per tensor): Python floats, ~10x faster than tensor ops on one value
    low, high = torch.broadcast_tensors(min_val, max_val)
    bad = ~(torch.isfinite(low) & torch.isfinite(high)) | (low > high)
    if not bad.any():
        return
    index = int(bad.reshape(-1).nonzero()[0])
    where = f" (channel {index})" if low.dim() else ""
    low_value, high_value = float(low.reshape(-1)[index]), float(high.reshape(-1)[index])
    if not (math.isfinite(low_value) and math.isfinite(high_value)):
        raise ValueError(f"encoding range{where} must be finite, got min {low_value} and max {high_value}")
    raise ValueError(
        f"encoding range{where} has min {low_value} > max {high_value}; pass the smaller bound as min_val"
    )


def check_bitwidth(bitwidth: object, what: str) -> None:
    """One rule for every bitwidth the package accepts (sim defaults, config kernels, quantizers, encodings)."""
    if isinstance(bitwidth, bool) or not isinstance(bitwidth, int) or not MIN_BITWIDTH <= bitwidth <= MAX_BITWIDTH:
        raise ValueError(f"{what}={bitwidth!r} is not supported; use an integer from {MIN_BITWIDTH} to {MAX_BITWIDTH}")


MIN_BITWIDTH, MAX_BITWIDTH = 2, 32
"""Supported integer widths: 2-16 for weights and activations, up to 32 for int32 biases."""

MIN_RANGE = 1e-5
"""Smallest range an encoding may cover; constant or all-zero tensors get ``[0, MIN_RANGE]``-wide grids."""
