"""`Quantizer`: the one module the simulation inserts wherever the hardware quantizes a tensor.

It has three modes, chosen by plain attributes so other features plug in without subclassing:

* ``calibrating``: observe the tensor with the encoding analyzer and pass it through in float;
* ``enabled`` with an encoding: fake-quantize (STE/LSQ gradients, see `affine`);
* disabled: identity (used by analysis to isolate one layer, or for ops the config leaves in float).

A quantizer knows what it quantizes: ``role`` (one of `ROLES`), ``owner`` (the sim layer's name, ``""`` for
the model's own inputs) and ``key`` (input/output position or parameter name), so no code parses names.

``scale``/``offset`` are buffers; `enable_range_learning` turns them into parameters for QAT with range
learning. A new encoding is copied into them in place, so an optimizer built earlier keeps training the live
tensors. ``frozen`` encodings are not recomputed by calibration (AdaRound, loaded or edited encodings).
Everything that defines the quantizer (encoding, bitwidth, symmetry, granularity, flags) is in its ``state_dict``.

``granularity`` (`edgequant.quantization.granularity`) says which elements share a scale: per tensor, per channel,
per block or LPBQ; a per-block quantizer quantizes its tensor through the grouped view (``(O, I)`` as
``(O, I/B, B)``), which only the eager passes take (the fused loops are for one scale).

A symmetric quantizer follows the config's ``strict_symmetric`` (its grid has one level fewer, symmetric around
zero) and ``unsigned_symmetric`` (calibrated on non-negative data it takes the unsigned grid, offset 0); see
`edgequant.quantization.encoding`.

``number_format`` (`edgequant.quantization.number_format`) is the integer grid above (``IntegerFormat``, the
default) or a float dtype (``FloatFormat``): float16/bfloat16 quantize by a cast round trip and calibrate nothing
(no scale, ``encoding`` is None); fp8 formats keep a calibrated per-tensor or per-channel scale (``amax / dtype
max``) in ``scale`` with a zero ``offset``. Techniques that need an integer grid call `require_integer_grid`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgequant.quantization import fused_cpu
from edgequant.quantization.affine import quantize_dequantize
from edgequant.quantization.analyzers import CalibrationError, EncodingAnalyzer
from edgequant.quantization.calibration_methods import CalibrationMethod, MethodSpec, calibration_method
from edgequant.quantization.encoding import Encoding, check_bitwidth, grid_from_range
from edgequant.quantization.granularity import (
    PER_TENSOR,
    Granularity,
    PerChannel,
    PerTensor,
    as_granularity,
    granularity_from_ints,
    legacy_axis,
)
from edgequant.quantization.number_format import (
    FloatFormat,
    IntegerFormat,
    NumberFormat,
    float_format_from_ints,
    float_format_ints,
)
from edgequant.quantization.sealing import Sealable

ROLES = ("model_input", "input", "param", "output")
"""What a quantizer quantizes: a model input, a layer's input, a layer's parameter, or a layer's output."""

_GROUP_OF_ROLE = {"model_input": "model_input_quantizers", "input": "input_quantizers",
                  "param": "param_quantizers", "output": "output_quantizers"}

ENCODE_CHUNK_VALUES = 2**16
"""About how many values of a tensor `Quantizer.encode_from` searches at a time with a large-statistics analyzer."""

EXTRA_STATE_VERSION = 3
"""Extra state ``[-3, enabled, frozen, bitwidth, symmetric, strict, unsigned, float format (0: integer grid, see
`float_format_ints`), *granularity.to_ints()]``; version 2 had no float format code; version 1 (no marker) was
``[enabled, frozen, bitwidth, symmetric, axis (-1: per tensor)]`` with ``[strict, unsigned]``
appended by later writers."""


class Quantizer(Sealable):
    def __init__(
        self,
        bitwidth: int = 8,
        symmetric: bool = False,
        granularity: Granularity | int | None = PER_TENSOR,
        scheme: MethodSpec = "minmax",
        role: str = "output",
        owner: str = "",
        key: str = "0",
        min_constraint: float | None = None,
        max_constraint: float | None = None,
        strict_symmetric: bool = False,
        unsigned_symmetric: bool = False,
        float_format: FloatFormat | None = None,
    ) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"quantizer role {role!r} is not one of {', '.join(ROLES)}")
        self.role, self.owner, self.key = role, owner, key
        check_bitwidth(bitwidth, f"quantizer {self.name} bitwidth")
        self.bitwidth = bitwidth
        self.symmetric = symmetric
        self.min_constraint = min_constraint
        self.max_constraint = max_constraint
        if strict_symmetric and unsigned_symmetric:
            raise ValueError(f"quantizer {self.name}: strict_symmetric and unsigned_symmetric are exclusive")
        self.strict_symmetric = strict_symmetric  # both apply while `symmetric` only
        self.unsigned_symmetric = unsigned_symmetric
        self.enabled = True
        self.frozen = False
        self.reuse_input_memory = False  # set by the sim for op outputs, which nothing else holds
        self.calibrating = False
        self.calibration: CalibrationMethod = calibration_method(scheme)
        self.analyzer: EncodingAnalyzer
        self.float_format: FloatFormat | None = None  # None: the integer grid
        self.granularity = granularity
        self.register_buffer("scale", None)
        self.register_buffer("offset", None)
        if float_format is not None:
            self.number_format = float_format

    @property
    def number_format(self) -> NumberFormat:
        """The format this quantizer rounds onto: a `FloatFormat`, or the `IntegerFormat` of its bitwidth/symmetry."""
        return self.float_format or IntegerFormat(self.bitwidth, self.symmetric)

    @number_format.setter
    def number_format(self, value: NumberFormat) -> None:
        """A new format drops the encoding (it was for the old grid) but keeps the calibration statistics, which do
        not depend on the format; a float format's bitwidth becomes this one's."""
        self.check_format(value)
        if isinstance(value, IntegerFormat):
            self.float_format, self.bitwidth, self.symmetric = None, value.bitwidth, value.symmetric
        else:
            self.float_format, self.bitwidth = value, value.bitwidth
        self.scale = self.offset = None

    def check_format(self, value: NumberFormat) -> None:
        """Raise unless this quantizer can take ``value`` (lets callers check many before changing any)."""
        if self.range_learning:
            raise RuntimeError(f"quantizer '{self.name}' learns its range; its number format cannot change")
        if isinstance(value, IntegerFormat):
            check_bitwidth(value.bitwidth, f"quantizer {self.name} bitwidth")
            self.granularity.check_grid(value.bitwidth, value.symmetric, f"quantizer {self.name}")
        elif not isinstance(value, FloatFormat):
            raise TypeError(f"quantizer {self.name}: number format must be an IntegerFormat or a FloatFormat, got "
                            f"{type(value).__name__}")
        else:
            _check_float_layout(value, self.granularity, self.name)

    def require_integer_grid(self, technique: str) -> None:
        """Refuse a float-format quantizer in ``technique``, which assumes an integer grid (no silent wrong result)."""
        if self.float_format is not None:
            raise ValueError(f"{technique} needs an integer grid; quantizer '{self.name}' has format "
                             f"{self.float_format.name}")

    @property
    def granularity(self) -> Granularity:
        return self._granularity

    @granularity.setter
    def granularity(self, value: Granularity | int | None) -> None:
        """A new granularity gets an analyzer of its own (statistics of the old layout would not fit)."""
        value = as_granularity(value)
        if not value.bound:
            raise ValueError(f"quantizer {self.name}: {value.describe()} leaves its axes to the layer; give them "
                             "(QuantSim.set_granularity fills them from the layer)")
        if self.float_format is None:
            value.check_grid(self.bitwidth, self.symmetric, f"quantizer {self.name}")
        else:
            _check_float_layout(self.float_format, value, self.name)
        if getattr(self, "_granularity", None) != value:
            self._granularity = value
            self.analyzer = self.calibration.analyzer(value, self.role)
            self.analyzer.tensor_name = self.name

    @property
    def axis(self) -> int | None:
        """The ``axis: int | None`` of older code (per tensor or one-axis per channel only; see `legacy_axis`)."""
        return legacy_axis(self.granularity)

    @property
    def name(self) -> str:
        """Full name in the sim, e.g. ``layer1.0.conv1.param_quantizers.weight``."""
        group = f"{_GROUP_OF_ROLE[self.role]}.{self.key}"
        return f"{self.owner}.{group}" if self.owner else group

    def extra_repr(self) -> str:
        granularity = self.granularity.describe()
        state = "enabled" if self.enabled else "disabled"
        if self.float_format is not None:
            return f"{self.role}, {self.float_format.name}, {granularity}, {state}"
        symmetry = "asym"
        if self.symmetric:
            symmetry = "strict sym" if self.strict_symmetric else "unsigned sym" if self.unsigned_symmetric else "sym"
        return f"{self.role}, bw={self.bitwidth}, {symmetry}, {granularity}, {state}"

    # -- encodings ---------------------------------------------------------------------------------------
    @property
    def strict_grid(self) -> bool:
        """Whether the grid is the strict symmetric one (one step fewer)."""
        return self.symmetric and self.strict_symmetric

    @property
    def encoding(self) -> Encoding | None:
        """The grid the forward uses (a learned LPBQ scale is stored as trained and projected where used); None
        before calibration and for a float format (which has no integer grid; an fp8 scale is ``scale``)."""
        if self.scale is None or self.float_format is not None:
            return None
        scale = self.granularity.project(self.scale.detach(), self.bitwidth)
        return Encoding(scale, self.offset, self.bitwidth, self.symmetric, self.granularity, self.strict_grid)

    @property
    def ready(self) -> bool:
        """Whether the forward can quantize: it has its encoding (fp8: its scale), or its format needs none."""
        return self.scale is not None or (self.float_format is not None and not self.float_format.scaled)

    @property
    def range_learning(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def set_encoding(self, encoding: Encoding | None) -> None:
        """Install an encoding (its bitwidth/symmetry/strictness/granularity become this quantizer's, and so does
        the integer format: a float quantizer given an integer encoding becomes an integer one).

        The values are copied into the existing scale/offset tensors when the shapes agree, so trainable
        (range-learning) parameters stay the same objects."""
        if encoding is None:
            if self.range_learning:
                raise RuntimeError(f"quantizer '{self.name}' learns its range; it cannot drop its encoding")
            self.scale = self.offset = None
            return
        self.float_format = None
        self.bitwidth, self.symmetric = encoding.bitwidth, encoding.symmetric
        self.granularity = encoding.granularity
        if encoding.symmetric:
            self.strict_symmetric = encoding.strict_symmetric
            self.unsigned_symmetric = self.unsigned_symmetric and not encoding.strict_symmetric
        device = self.scale.device if self.scale is not None else encoding.scale.device
        scale, offset = encoding.scale.to(device), encoding.offset.to(device)
        if self.scale is not None and self.scale.shape == scale.shape:
            with torch.no_grad():
                self.scale.copy_(scale)
                self.offset.copy_(offset)
        elif self.range_learning:
            raise RuntimeError(
                f"quantizer '{self.name}' learns its range with shape {tuple(self.scale.shape)}; an encoding of "
                f"shape {tuple(scale.shape)} would orphan the optimizer's tensors"
            )
        else:
            self.scale, self.offset = scale.clone(), offset.clone()

    def compute_encoding(self) -> Encoding | None:
        """Turn the analyzer's statistics into an encoding, honouring the config's range constraints. A float format
        has none: float16/bfloat16 calibrate nothing, fp8 sets its scale from the range's absolute maximum."""
        if self.float_format is not None and not self.float_format.scaled:
            return None
        low, high = self._analyzer_range(self.analyzer)
        return self._encode_range(low.reshape(self.analyzer.scale_shape), high.reshape(self.analyzer.scale_shape))

    def _encode_range(self, low: torch.Tensor, high: torch.Tensor) -> Encoding | None:
        """Install the encoding (fp8: the scale) of the searched range (``low``/``high`` shaped like the scale), after
        the config's range constraints."""
        if self.min_constraint is not None and self.max_constraint is not None:
            # a fixed output range (e.g. Softmax in [0, 1]) that the hardware kernel assumes
            low, high = torch.full_like(low, self.min_constraint), torch.full_like(high, self.max_constraint)
        elif self.min_constraint is not None:  # data wholly below the bound: an empty range at the bound
            low = low.clamp_min(self.min_constraint)
            high = torch.maximum(high, low)
        elif self.max_constraint is not None:
            high = high.clamp_max(self.max_constraint)
            low = torch.minimum(low, high)
        if self.float_format is not None:
            self.scale = self.float_format.scale_from_amax(torch.maximum(-low, high))
            self.offset = torch.zeros_like(self.scale)
            return None
        encoding = Encoding.from_range(
            low, high, self.bitwidth, self.symmetric, self.granularity, strict_symmetric=self.strict_symmetric,
            unsigned_symmetric=self.unsigned_symmetric,
        )
        self.set_encoding(encoding)
        return encoding

    def _analyzer_range(self, analyzer: EncodingAnalyzer) -> tuple[torch.Tensor, torch.Tensor]:
        """``analyzer``'s (low, high) per scale, an error naming this quantizer when it saw no data."""
        try:
            return self._searched_range(analyzer)
        except CalibrationError as error:
            raise CalibrationError(
                f"quantizer '{self.name}': {error}. Check that the calibration data reaches this layer "
                "and contains finite values, or disable this quantizer."
            ) from None

    def _searched_range(self, analyzer: EncodingAnalyzer) -> tuple[torch.Tensor, torch.Tensor]:
        """An unsigned symmetric quantizer searches the channels whose data is all non-negative as asymmetric ranges
        starting at 0 (AIMET: such a range gets the unsigned grid); a strict symmetric one searches on its strict
        grid."""
        if self.strict_grid:
            return analyzer.compute_range(self.bitwidth, True, strict_symmetric=True)
        if not (self.symmetric and self.unsigned_symmetric) or analyzer.min is None:
            return analyzer.compute_range(self.bitwidth, self.symmetric)
        unsigned = analyzer.min >= 0
        if not bool(unsigned.any()):
            return analyzer.compute_range(self.bitwidth, True)
        low, high = analyzer.compute_range(self.bitwidth, False)
        if not bool(unsigned.all()):
            signed_low, signed_high = analyzer.compute_range(self.bitwidth, True)
            low, high = torch.where(unsigned, low, signed_low), torch.where(unsigned, high, signed_high)
        return torch.where(unsigned, low.clamp_min(0.0), low), high

    def encode_from(self, tensor: torch.Tensor) -> Encoding | None:
        """(Re)compute the encoding from ``tensor`` alone (a weight, or a tensor chosen by a technique).

        An analyzer whose statistics of one scale are large (`EncodingAnalyzer.large_statistics`: a histogram, the
        values) takes a tensor of many scales a chunk of scales at a time (about `ENCODE_CHUNK_VALUES` values), each
        chunk by a fresh analyzer of the same method: scales are searched independently, so the encoding is the same,
        and only one chunk's statistics exist at a time (one histogram per block of an LLM-sized weight would take
        gigabytes). Such an analyzer keeps no statistics of ``tensor`` afterwards."""
        self.analyzer.reset()
        tensor = tensor.detach()
        scale_shape = self.granularity.scale_shape(tensor.shape, self.name)
        unscaled_float = self.float_format is not None and not self.float_format.scaled  # no range to search
        if not self.analyzer.large_statistics or math.prod(scale_shape) < 2 or unscaled_float:
            self.analyzer.observe(tensor)
            return self.compute_encoding()
        low, high = self._range_in_chunks(self.granularity.rows(tensor, self.name))
        return self._encode_range(low.reshape(scale_shape), high.reshape(scale_shape))

    def _range_in_chunks(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) of each row of ``rows`` (scales, values), searched about `ENCODE_CHUNK_VALUES` values at a time
        by one analyzer of this quantizer's method, reset between chunks."""
        num_rows = rows.shape[0]
        starts = list(range(0, num_rows, max(2, ENCODE_CHUNK_VALUES // max(rows.shape[1], 1))))
        if len(starts) > 1 and num_rows - starts[-1] == 1:
            starts.pop()  # no one-row chunk: the analyzers take a single row by their whole-tensor path
        analyzer = self.calibration.analyzer(PerChannel(0), self.role)
        analyzer.tensor_name = self.name
        ranges = []
        for start, end in zip(starts, [*starts[1:], num_rows], strict=True):
            analyzer.reset()
            analyzer.observe(rows[start:end])
            self.analyzer.num_nonfinite += analyzer.num_nonfinite  # the counts stay, as `observe` keeps them
            ranges.append(self._analyzer_range(analyzer))
        low, high = (torch.cat(bounds) for bounds in zip(*ranges, strict=True))
        return low, high

    def refresh_from(self, tensor: torch.Tensor) -> None:
        """`encode_from` without returning an `Encoding`, for a tensor that changes at every step (QAT's weights).

        Where the analyzer can observe ``tensor`` in one pass (min-max, finite values), no range constraint
        applies and the grid keeps its shape, dtype and device, the new scale/offset are written into the
        existing tensors by the ops `Encoding.from_range` uses, so the result is the same bit for bit; anything
        else takes `encode_from`."""
        if not self._refreshed_in_place(tensor):
            self.encode_from(tensor)

    def _refreshed_in_place(self, tensor: torch.Tensor) -> bool:
        scale, offset = self.scale, self.offset
        if (scale is None or self.float_format is not None or self.min_constraint is not None
                or self.max_constraint is not None
                or scale.dtype != torch.float32 or offset.dtype != torch.float32 or scale.device != tensor.device
                or not self.analyzer.observe_alone(tensor)):
            return False
        if self.analyzer.scale_shape != scale.shape:
            return False
        low, high = self.analyzer.min.reshape(scale.shape), self.analyzer.max.reshape(scale.shape)
        with torch.no_grad():
            grid_from_range(
                low, high, self.bitwidth, self.symmetric, out=(scale, offset), strict_symmetric=self.strict_symmetric,
                unsigned_symmetric=self.unsigned_symmetric,
            )
            self.granularity.project(scale, self.bitwidth, out=scale)
        return True

    def enable_range_learning(self) -> None:
        """Make scale and offset trainable (QAT with range learning, LSQ gradients)."""
        self.require_integer_grid("range learning (LSQ)")
        if self.scale is None:
            raise RuntimeError(f"quantizer '{self.name}' has no encoding to learn; calibrate first")
        scale, offset = self.scale.detach(), self.offset.detach()
        del self.scale, self.offset
        self.scale = nn.Parameter(scale)
        self.offset = nn.Parameter(offset)

    # -- state_dict --------------------------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """Flags and grid as one small integer tensor (every state_dict value stays a tensor, which
        TorchScript tracing, ONNX export and ``torch.load(weights_only=True)`` expect); see `EXTRA_STATE_VERSION`."""
        return torch.tensor(
            [-EXTRA_STATE_VERSION, self.enabled, self.frozen, self.bitwidth, self.symmetric, self.strict_symmetric,
             self.unsigned_symmetric, float_format_ints(self.float_format), *self.granularity.to_ints()],
            dtype=torch.int64,
        )

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Reads every version: the current one, version 2 (integer grids only), and version 1 with or without the
        strict/unsigned flags."""
        values = [int(v) for v in state.tolist()]
        float_format = None
        if values[0] >= 0:  # version 1: enabled (0 or 1) comes first
            enabled, frozen, bitwidth, symmetric, axis, *variants = values
            strict, unsigned = variants if variants else (0, 0)
            granularity = as_granularity(None if axis < 0 else axis)
        elif values[0] == -2:
            enabled, frozen, bitwidth, symmetric, strict, unsigned, *granularity_ints = values[1:]
            granularity = granularity_from_ints(granularity_ints)
        elif values[0] == -EXTRA_STATE_VERSION:
            enabled, frozen, bitwidth, symmetric, strict, unsigned, float_code, *granularity_ints = values[1:]
            granularity = granularity_from_ints(granularity_ints)
            float_format = float_format_from_ints(float_code)
        else:
            raise ValueError(f"quantizer {self.name}: extra state version {-values[0]} is newer than this edgequant "
                             f"reads (up to {EXTRA_STATE_VERSION})")
        self.enabled, self.frozen, self.symmetric = bool(enabled), bool(frozen), bool(symmetric)
        self.strict_symmetric, self.unsigned_symmetric = bool(strict), bool(unsigned)
        self.bitwidth = bitwidth
        self.float_format = float_format
        self.granularity = granularity

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Make room for a saved encoding (an uncalibrated quantizer has no scale/offset tensors yet), or
        drop ours when the saved quantizer had none; the base class then copies values and extra state."""
        saved_scale, saved_offset = state_dict.get(prefix + "scale"), state_dict.get(prefix + "offset")
        if saved_scale is not None and saved_offset is not None:
            if self.scale is None or self.scale.shape != saved_scale.shape:
                device = self.scale.device if self.scale is not None else saved_scale.device
                if self.range_learning:
                    self.scale = nn.Parameter(torch.empty_like(saved_scale, device=device))
                    self.offset = nn.Parameter(torch.empty_like(saved_offset, device=device))
                else:
                    self.scale = torch.empty_like(saved_scale, device=device)
                    self.offset = torch.empty_like(saved_offset, device=device)
        elif saved_scale is None and not self.range_learning:
            self.scale = self.offset = None
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.offset is not None and not self.range_learning:  # a learned offset is saved unrounded
            with torch.no_grad():
                self.offset.round_()

    # -- forward -----------------------------------------------------------------------------------------
    def absorbs_clamp(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x, clamp_first=...)`` runs the clamp of the activation that produced ``x`` (ReLU,
        ReLU6) and this quantizer in one fused pass: evaluation without autograd, one scale, a contiguous float32
        CPU tensor. Elsewhere the activation runs on its own, as the model wrote it."""
        return (self.enabled and not self.calibrating and self.scale is not None and self.float_format is None
                and not torch.is_grad_enabled()
                and fused_cpu.can_fuse(x, self.scale))

    def forward(
        self, x: torch.Tensor, clamp_first: tuple[float, float] | None = None, clamp_in_place: bool = False
    ) -> torch.Tensor:
        """Fake-quantize (or observe) ``x``. With ``clamp_first`` (only where the caller found `absorbs_clamp`),
        ``x`` is the input of a clamping activation, clamped in the same pass; ``clamp_in_place``: into ``x``, as
        the activation would."""
        strict = self.strict_grid
        if clamp_first is not None:
            return quantize_dequantize(
                x, self.scale, self.offset, self.bitwidth, clamp_in_place, clamp_first, strict_symmetric=strict
            )
        if self.calibrating:
            self.analyzer.observe(x)
            return x
        if not self.enabled or not x.is_floating_point():  # integer tensors (indices, masks) are not data
            return x
        if self.float_format is not None and not self.float_format.scaled:
            return self.float_format.quantize_dequantize(x)
        if self.scale is None:
            raise RuntimeError(
                f"quantizer '{self.name}' has no encoding: call sim.compute_encodings(...) or sim.calibrate(...) "
                "first, or disable it."
            )
        # an op's output may still be a view of its input (indexing, Reshape, Transpose), which other readers hold
        inplace = self.reuse_input_memory and not torch.compiler.is_compiling() and not torch.is_grad_enabled() and (
            torch.is_inference_mode_enabled() or not x.is_inference()
        ) and not x._is_view()
        granularity, ndim = self.granularity, x.dim()
        if self.float_format is not None:
            return self.float_format.quantize_dequantize(x, granularity.group_scale(self.scale, ndim))
        scale = granularity.project(self.scale, self.bitwidth)
        out = quantize_dequantize(
            granularity.grouped(x, self.name), granularity.group_scale(scale, ndim),
            granularity.group_scale(self.offset, ndim), self.bitwidth, inplace, strict_symmetric=strict,
        )
        return granularity.ungrouped(out, x.shape)


def _check_float_layout(number_format: FloatFormat, granularity: Granularity, name: str) -> None:
    """A float format's scale (fp8) is per tensor or per channel; blocks are an integer-grid layout."""
    if not isinstance(granularity, (PerTensor, PerChannel)):
        raise ValueError(f"quantizer {name}: {number_format.name} takes a per-tensor or per-channel scale, not "
                         f"{granularity.describe()}")
