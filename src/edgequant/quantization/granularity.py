"""Granularity: which elements of a tensor share one scale/offset, as a value (never ``axis: int | None``).

* `PerTensor`: one scale for the whole tensor (activations; weights under the default config).
* `PerChannel`: one scale per index of ``axis`` (one or more axes), e.g. per output channel of a weight.
* `PerBlock`: one scale per ``block_size`` consecutive elements of ``block_axis`` within each index of
  ``channel_axis``: for a Linear weight (out, in) with ``block_size=64``, one scale per output channel per 64 inputs.
* `Lpbq`: low-power blockwise quantization (AIMET's ``GroupedBlockQuantizeDequantize``): per-block scales that are
  integer multiples ``q in [1, 2**(decompressed_bw - bitwidth)]`` of one per-channel scale, so that a per-channel
  kernel on the ``decompressed_bw`` grid runs them.

Layouts. A per-tensor scale has shape ``()``; a per-channel scale the sizes of its axes, in axis order (``(C,)`` for
one axis); a per-block scale the tensor's rank, with the channels on ``channel_axis``, the blocks on ``block_axis``
and 1 elsewhere (AIMET's encoding shape: ``(O, I/B)`` for a Linear weight, ``(O, I/B, 1, 1)`` for a Conv weight).

Grouped quantization is a reshape: a per-block tensor is viewed with its block axis split in two, ``(O, I)`` as
``(O, I/B, B)``, against its scale viewed as ``(O, I/B, 1)``; statistics are per-channel statistics of that view.

``PerChannel()`` and ``PerBlock(64)`` without axes are requests that the sim completes from the layer (`bind`): the
output channels become the channels, the input channels the blocked axis. Quantizers and encodings hold bound values.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch


class Granularity(ABC):
    """Base of the granularities: everything the quantizer math asks instead of branching on an axis."""

    kind: ClassVar[str]
    code: ClassVar[int]

    def bind(self, output_axis: int, input_axis: int) -> Granularity:
        """This granularity with the axes it leaves open taken from a weight's output and input channel axes."""
        return self

    @property
    def bound(self) -> bool:
        """Whether every axis is known (quantizers and encodings hold bound granularities only)."""
        return True

    @abstractmethod
    def scale_shape(self, shape: Sequence[int], what: str = "tensor") -> tuple[int, ...]:
        """Shape of the scale (and offset) of a tensor of ``shape``; a shape that does not fit is a ValueError naming
        ``what`` (the quantizer or layer)."""

    def grouped(self, x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """``x`` viewed so that `group_scale` broadcasts against it (a block axis split in two)."""
        return x

    def ungrouped(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Undo `grouped` on a result of the grouped view's shape."""
        return y

    @abstractmethod
    def group_scale(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        """``scale`` (or offset) viewed to broadcast against `grouped` of a rank-``ndim`` tensor."""

    @abstractmethod
    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        """The dims of `grouped` of a rank-``ndim`` tensor that one scale's statistics reduce over."""

    def rows(self, x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """``x`` as (scales, values of each scale), the rows in the order of the flattened scale (for analyzers)."""
        grouped = self.grouped(x, what)
        reduced = self.reduce_dims(x.dim())
        kept = [d for d in range(grouped.dim()) if d not in reduced]
        rows = math.prod(grouped.shape[d] for d in kept)
        return grouped.permute(*kept, *reduced).reshape(rows, -1)

    def broadcast(self, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """``scale`` (or offset) shaped to broadcast element for element against a tensor of ``shape`` (blocks
        repeated), for code that works on whole tensors (AdaRound, export's integer weights, emulation)."""
        return self.group_scale(scale, len(shape))

    def values_per_scale(self, shape: Sequence[int]) -> int:
        """How many values of a tensor of ``shape`` one scale quantizes (LSQ's ``N``)."""
        return math.prod(shape) // max(math.prod(self.scale_shape(shape)), 1)

    def separates(self, axis: int) -> bool:
        """Whether each index of ``axis`` has scales of its own (e.g. per output channel, so a fold may rescale)."""
        return False

    def project(self, scale: torch.Tensor, bitwidth: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The scale the grid uses: the stored one, except where the format constrains it (`Lpbq`). With ``out``
        the result is written there."""
        return scale if out is None else out.copy_(scale)

    def check_grid(self, bitwidth: int, symmetric: bool, what: str) -> None:  # noqa: B027 - most allow every grid
        """Refuse grids this granularity cannot have (`Lpbq`: symmetric, narrower than ``decompressed_bw``)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for reports and coverage summaries."""

    def __str__(self) -> str:
        return self.describe()

    def to_ints(self) -> list[int]:
        """Small-integer form for the quantizer's ``state_dict`` extra state (-1 for an axis left open)."""
        return [self.code, *(-1 if v is None else v for f in fields(self) for v in _flat(getattr(self, f.name)))]

    def to_json(self) -> dict[str, Any]:
        """JSON form for encodings dicts and reports."""
        return {"kind": self.kind} | {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _flat(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_axis(value: Any, owner: str, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{owner}: {name} must be an axis >= 0 (or None: the layer's), got {value!r}")


def _check_rank(shape: Sequence[int], axes: Sequence[int], granularity: Granularity, what: str) -> None:
    if any(a >= len(shape) for a in axes):
        raise ValueError(f"{what}: {granularity.describe()} does not fit a tensor of shape {tuple(shape)}")


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    kind: ClassVar[str] = "per_tensor"
    code: ClassVar[int] = 0

    def scale_shape(self, shape: Sequence[int], what: str = "tensor") -> tuple[int, ...]:
        return ()

    def group_scale(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        return scale

    def broadcast(self, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return scale.reshape(())

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim))

    def rows(self, x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        return x.reshape(1, -1)

    def describe(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per index of ``axis`` (an int, or a tuple of axes for one scale per index combination); None: the
    layer's output-channel axis, filled in by the sim."""

    axis: int | tuple[int, ...] | None = None
    kind: ClassVar[str] = "per_channel"
    code: ClassVar[int] = 1

    def __post_init__(self) -> None:
        axis = self.axis
        if isinstance(axis, (list, tuple)):
            if not axis:
                raise ValueError("PerChannel: axis must name at least one axis")
            for a in axis:
                _check_axis(a, "PerChannel", "axis")
            if len(set(axis)) != len(axis):
                raise ValueError(f"PerChannel: axes {tuple(axis)} repeat an axis")
            axis = tuple(sorted(axis)) if len(axis) > 1 else axis[0]
            object.__setattr__(self, "axis", axis)
        else:
            _check_axis(axis, "PerChannel", "axis")

    @property
    def axes(self) -> tuple[int, ...]:
        return _flat(self.axis)

    @property
    def bound(self) -> bool:
        return self.axis is not None

    def bind(self, output_axis: int, input_axis: int) -> Granularity:
        return self if self.bound else PerChannel(output_axis)

    def scale_shape(self, shape: Sequence[int], what: str = "tensor") -> tuple[int, ...]:
        _check_rank(shape, self.axes, self, what)
        return tuple(shape[a] for a in self.axes)

    def group_scale(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        axes = self.axes
        return scale.reshape([scale.shape[axes.index(d)] if d in axes else 1 for d in range(ndim)])

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        return tuple(d for d in range(ndim) if d not in self.axes)

    def separates(self, axis: int) -> bool:
        return axis in self.axes

    def describe(self) -> str:
        return f"per-channel(axis={self.axis})" if self.bound else "per-channel(output channels)"

    def to_ints(self) -> list[int]:
        return [self.code, *((-1,) if self.axis is None else self.axes)]


@dataclass(frozen=True)
class PerBlock(Granularity):
    """One scale per ``block_size`` consecutive elements of ``block_axis`` within each index of ``channel_axis``.
    Axes left None are the layer's (channels: its output channels, blocks: along its input channels)."""

    block_size: int
    channel_axis: int | None = None
    block_axis: int | None = None
    kind: ClassVar[str] = "per_block"
    code: ClassVar[int] = 2

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{name}: block_size must be an integer >= 1, got {self.block_size!r}")
        _check_axis(self.channel_axis, name, "channel_axis")
        _check_axis(self.block_axis, name, "block_axis")
        if self.channel_axis is not None and self.channel_axis == self.block_axis:
            raise ValueError(f"{name}: channel_axis and block_axis must differ, both are {self.channel_axis}")

    @property
    def bound(self) -> bool:
        return self.channel_axis is not None and self.block_axis is not None

    def bind(self, output_axis: int, input_axis: int) -> Granularity:
        channel_axis = output_axis if self.channel_axis is None else self.channel_axis
        block_axis = input_axis if self.block_axis is None else self.block_axis
        return self._with(channel_axis=channel_axis, block_axis=block_axis)

    def _with(self, **changes: Any) -> PerBlock:
        return type(self)(**({f.name: getattr(self, f.name) for f in fields(self)} | changes))

    def num_blocks(self, shape: Sequence[int], what: str = "tensor") -> int:
        """Blocks along ``block_axis``; a dimension that does not divide into blocks is a ValueError naming ``what``."""
        if not self.bound:
            raise ValueError(f"{what}: {self.describe()} leaves its axes to the layer; bind it first")
        _check_rank(shape, (self.channel_axis, self.block_axis), self, what)
        size = shape[self.block_axis]
        if size % self.block_size:
            raise ValueError(
                f"{what}: dimension {self.block_axis} of shape {tuple(shape)} ({size}) does not divide into blocks of "
                f"{self.block_size}; choose a block size that divides {size}"
            )
        return size // self.block_size

    def scale_shape(self, shape: Sequence[int], what: str = "tensor") -> tuple[int, ...]:
        blocks = self.num_blocks(shape, what)
        return tuple(size if d == self.channel_axis else blocks if d == self.block_axis else 1
                     for d, size in enumerate(shape))

    def grouped(self, x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        blocks = self.num_blocks(x.shape, what)
        axis = self.block_axis
        return x.reshape(*x.shape[:axis], blocks, self.block_size, *x.shape[axis + 1:])

    def ungrouped(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return y.reshape(shape)

    def group_scale(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        if scale.dim() != ndim:
            raise ValueError(f"a {self.describe()} scale has the tensor's rank {ndim}, got shape {tuple(scale.shape)}")
        return scale.unsqueeze(self.block_axis + 1)

    def broadcast(self, scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return self.group_scale(scale, len(shape)).squeeze(self.block_axis + 1).repeat_interleave(
            self.block_size, dim=self.block_axis)

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        channel = self.channel_axis + (self.channel_axis > self.block_axis)
        return tuple(d for d in range(ndim + 1) if d not in (channel, self.block_axis))

    def separates(self, axis: int) -> bool:
        return axis == self.channel_axis

    def channel_major(self, scale: torch.Tensor) -> torch.Tensor:
        """A scale (or offset) as (channels, blocks): the order of flat per-block lists in encodings files."""
        return scale.movedim((self.channel_axis, self.block_axis), (0, 1)).reshape(
            scale.shape[self.channel_axis], scale.shape[self.block_axis])

    def from_channel_major(self, values: torch.Tensor, shape: Sequence[int], what: str = "tensor") -> torch.Tensor:
        """Inverse of `channel_major`: (channels, blocks) values, or the same flattened, laid out for ``shape``."""
        scale_shape = self.scale_shape(shape, what)
        channels, blocks = scale_shape[self.channel_axis], scale_shape[self.block_axis]
        if values.numel() != channels * blocks:
            raise ValueError(f"{what}: {values.numel()} per-block values do not fit {channels} channels x {blocks} "
                             f"blocks of shape {tuple(shape)}")
        order = sorted((self.channel_axis, self.block_axis))
        rows = values.reshape(channels, blocks)
        return (rows if order[0] == self.channel_axis else rows.T).reshape(scale_shape)

    def describe(self) -> str:
        where = (f" on axis {self.block_axis}, channels on axis {self.channel_axis}" if self.bound
                 else " along the input channels")
        return f"per-block({self.block_size}{where})"


@dataclass(frozen=True)
class Lpbq(PerBlock):
    """Low-power blockwise quantization: per-block scales stored as integer multiples ``q`` of a per-channel scale on
    the ``decompressed_bw`` grid (AIMET's ``GroupedBlockQuantizeDequantize``, one group per channel):

    * the per-channel scale is the channel's largest block scale / ``2**(decompressed_bw - bitwidth)``;
    * ``q = clamp(round(block scale / channel scale), 1, 2**(decompressed_bw - bitwidth))``, rounding half to even;
    * the block's scale becomes ``channel scale * q``.

    Encodings and quantizers store those effective block scales (the projection is idempotent)."""

    decompressed_bw: int = 8
    kind: ClassVar[str] = "lpbq"
    code: ClassVar[int] = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decompressed_bw, bool) or not isinstance(self.decompressed_bw, int) or not (
                2 <= self.decompressed_bw <= 32):
            raise ValueError(f"Lpbq: decompressed_bw must be an integer from 2 to 32, got {self.decompressed_bw!r}")

    def check_grid(self, bitwidth: int, symmetric: bool, what: str) -> None:
        if not symmetric:
            raise ValueError(f"{what}: LPBQ is symmetric only (its blocks share the per-channel zero point)")
        if bitwidth >= self.decompressed_bw:
            raise ValueError(f"{what}: LPBQ needs a bitwidth below decompressed_bw={self.decompressed_bw}, got "
                             f"{bitwidth}")

    def multiplier_levels(self, bitwidth: int) -> int:
        """``2**(decompressed_bw - bitwidth)``: the largest integer multiplier, that of the widest block."""
        return 2 ** (self.decompressed_bw - bitwidth)

    def channel_scale(self, scale: torch.Tensor, bitwidth: int) -> torch.Tensor:
        """Per-channel scale (the scale's shape with 1 on ``block_axis``): largest block scale / `multiplier_levels`."""
        return scale.amax(dim=self.block_axis, keepdim=True) / self.multiplier_levels(bitwidth)

    def multipliers(self, scale: torch.Tensor, bitwidth: int) -> torch.Tensor:
        """Each block's integer multiplier of its channel scale (float tensor holding integers)."""
        levels = self.multiplier_levels(bitwidth)
        return torch.clamp(torch.round(scale / self.channel_scale(scale, bitwidth)), 1, levels)

    def project(self, scale: torch.Tensor, bitwidth: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Channel scale x multiplier; a learned scale keeps a straight-through gradient."""
        projected = self.multipliers(scale.detach(), bitwidth) * self.channel_scale(scale.detach(), bitwidth)
        if out is not None:
            return out.copy_(projected)
        return scale + (projected - scale).detach() if scale.requires_grad else projected

    def describe(self) -> str:
        return f"LPBQ{super().describe().removeprefix('per-block')} with int{self.decompressed_bw} channel grid"


PER_TENSOR = PerTensor()
"""The default granularity (activations, and weights the config keeps per tensor)."""

GRANULARITIES: dict[int, type[Granularity]] = {cls.code: cls for cls in (PerTensor, PerChannel, PerBlock, Lpbq)}
_BY_KIND = {cls.kind: cls for cls in GRANULARITIES.values()}


def as_granularity(value: Granularity | int | None) -> Granularity:
    """A granularity from a value, or from the ``axis: int | None`` of older code and files (None: per tensor, an
    int: per channel on that axis)."""
    if isinstance(value, Granularity):
        return value
    if value is None:
        return PerTensor()
    if isinstance(value, int) and not isinstance(value, bool):
        return PerChannel(value)
    raise TypeError(f"granularity must be PerTensor(), PerChannel(axis), PerBlock(...) or Lpbq(...), got {value!r}")


def legacy_axis(granularity: Granularity) -> int | None:
    """The ``axis: int | None`` older code reads: None per tensor, the axis of a one-axis per-channel granularity;
    other granularities have no such form."""
    if isinstance(granularity, PerTensor):
        return None
    if isinstance(granularity, PerChannel) and isinstance(granularity.axis, int):
        return granularity.axis
    raise ValueError(f"a {granularity.describe()} granularity has no single channel axis; read .granularity")


def granularity_from_ints(values: Sequence[int]) -> Granularity:
    """Inverse of `Granularity.to_ints`."""
    code, *rest = (int(v) for v in values)
    cls = GRANULARITIES.get(code)
    if cls is None:
        raise ValueError(f"unknown granularity code {code} (known: {sorted(GRANULARITIES)})")
    if cls is PerChannel:
        return PerChannel(None if rest == [-1] else tuple(rest))
    return cls(*(None if v == -1 else v for v in rest))


def granularity_from_json(data: Any) -> Granularity:
    """Inverse of `Granularity.to_json`; anything else is a ValueError."""
    if not isinstance(data, dict) or data.get("kind") not in _BY_KIND:
        raise ValueError(f"not a granularity: {data!r} (expected {{'kind': one of {', '.join(_BY_KIND)}, ...}})")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "kind"}
    try:
        return _BY_KIND[data["kind"]](**settings)
    except TypeError as error:
        raise ValueError(f"not a granularity: {data!r} ({error})") from None
