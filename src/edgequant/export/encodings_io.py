"""AIMET encodings files (versions 0.6.1, 1.0.0, 2.0.0): field names and types exactly as AIMET 2.42 writes them.

* 0.6.1: ``activation_encodings`` / ``param_encodings`` map a tensor name to a list (one dict per channel) of
  ``min, max, scale, offset, bitwidth, dtype ("int"), is_symmetric ("True"/"False" strings)``; no per-block form.
* 1.0.0: the same two sections as lists of ``{name, dtype "INT", bw, is_sym, scale [..], offset [..],
  enc_type "PER_TENSOR"|"PER_CHANNEL"|"PER_BLOCK"|"LPBQ"}``. PER_BLOCK adds ``block_size``, its flat scales and offsets
  in (channel, block) order; LPBQ is ``{compressed_bw (the block grid's bitwidth), bw (the decompressed grid's),
  block_size, scale and offset per channel (offset -2**(bw-1)), per_block_int_scale (channel, block) order}``.
* 2.0.0: one ``encodings`` list in ONNX QuantizeLinear terms: ``{name, output_dtype "int8"|"uint8"|..., y_scale,
  y_zero_point (omitted when 0), axis (per-channel: the channel axis)}``. Per block: ``y_scale`` (and ``y_zero_point``)
  nested with the tensor's rank, ``axis`` the blocked axis, ``block_size``; LPBQ: ``per_channel_float_scale`` and
  ``per_block_int_scale`` nested instead of ``y_scale``, its decompressed bitwidth twice ``output_dtype``'s (as AIMET
  writes it; other LPBQ grids are refused in 2.0.0).

Neither format states a per-block entry's channel axis (nor 1.0.0 its layout): entries read back leave it open, and
`edgequant.export.load_encodings` takes it from the layer, as for per-channel entries of 0.6.1/1.0.0.

Offsets follow edgequant's (= AIMET's) convention, see `edgequant.quantization.encoding`. The symmetric variants
are marked as AIMET marks them (its ``get_symmetric_properties``): a symmetric entry whose offset is
``-(2**(bw-1) - 1)`` is strict symmetric, one with offset 0 unsigned symmetric. 2.0.0 has no way to state the
strict grid (QuantizeLinear's int8 range is [-128, 127]): writing a strict encoding in it is refused.

Float tensors are written as AIMET writes them (its ``FloatEncoding``). Float16 (a `FloatFormat` in place of an
`Encoding`): 0.6.1 ``[{"bitwidth": 16, "dtype": "float"}]``, 1.0.0 ``{name, dtype "FLOAT", bw 16, enc_type
"PER_TENSOR"}``; float16 and bfloat16 have no 2.0.0 entry (the tensor stays float in that QuantizeLinear view). Fp8
(`Fp8Encoding`, the format with its scale) is a 2.0.0 QuantizeLinear entry ``{name, output_dtype "float8e4m3fn" |
"float8e5m2", y_scale, axis (per channel)}`` with no zero point (0). 0.6.1 and 1.0.0 have no bfloat16 or fp8 form
(AIMET refuses to write one; its 16-bit float entry reads back as float16): those tensors are left out of the file,
with one warning naming them. Files with fp8 entries are written, not read back.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgequant.quantization import Encoding, Granularity, Lpbq, PerBlock, PerChannel, PerTensor
from edgequant.quantization.encoding import strict_symmetric_offset
from edgequant.quantization.granularity import PER_TENSOR
from edgequant.quantization.number_format import FloatFormat

SUPPORTED_VERSIONS = ("0.6.1", "1.0.0", "2.0.0")
PRODUCER = {"package": "edgequant", "version": "0.1.0"}


_AIMET_FP8_DTYPES = {"float8_e4m3": "float8e4m3fn", "float8_e5m2": "float8e5m2"}
"""AIMET's 2.0.0 ``output_dtype`` of each fp8 format (ONNX's type name, lower case)."""


@dataclass(frozen=True, eq=False)
class Fp8Encoding:
    """An fp8 tensor's format with its calibrated scale (per tensor, or per channel of ``granularity``): what export
    states as QuantizeLinear to float8 with zero point 0 (the `FloatFormat` alone has no scale)."""

    number_format: FloatFormat
    scale: torch.Tensor
    granularity: PerTensor | PerChannel

    def equals(self, other: object) -> bool:
        """`Encoding.equals`'s counterpart: same format, layout and scale."""
        return (isinstance(other, Fp8Encoding) and other.number_format == self.number_format
                and other.granularity == self.granularity and torch.equal(other.scale.cpu(), self.scale.cpu()))


@dataclass
class TensorEncoding:
    """The encoding of one named ONNX tensor; ``is_param`` is None where the format does not say (2.0.0)."""

    name: str
    encoding: Encoding | FloatFormat | Fp8Encoding
    is_param: bool | None


class EncodingsFileError(ValueError):
    """An encodings file that cannot be read; the message names the file, the entry and what is wrong."""


# -- writing -----------------------------------------------------------------------------------------------
def onnx_dtype_name(encoding: Encoding) -> str:
    """``int8`` for signed symmetric grids (zero point 0), ``uint8`` for the others; the bitwidth as is."""
    return f"{'int' if encoding.signed else 'uint'}{encoding.bitwidth}"


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.reshape(-1).tolist()]


def _ints(values: torch.Tensor) -> list[int]:
    return [int(v) for v in values.reshape(-1).tolist()]


_FLOAT16 = FloatFormat("float16")


def _entry_0_6_1(name: str, encoding: Encoding | FloatFormat) -> list[dict[str, Any]]:
    if isinstance(encoding, FloatFormat):  # float16: the only float format this version states
        return [{"bitwidth": 16, "dtype": "float"}]
    if isinstance(encoding.granularity, PerBlock):
        raise ValueError(f"tensor '{name}' is quantized {encoding.granularity.describe()}, which encodings version "
                         "0.6.1 cannot state; write version 1.0.0 or 2.0.0")
    return [
        {
            "min": low, "max": high, "scale": scale, "offset": offset, "bitwidth": encoding.bitwidth, "dtype": "int",
            "is_symmetric": str(encoding.symmetric),
        }
        for low, high, scale, offset in zip(
            _floats(encoding.min), _floats(encoding.max), _floats(encoding.scale), _ints(encoding.offset), strict=True
        )
    ]


def _lpbq_parts(name: str, encoding: Encoding) -> tuple[Lpbq, torch.Tensor, torch.Tensor]:
    """An LPBQ encoding's granularity, per-channel scale and integer multipliers; it must be signed symmetric."""
    granularity = encoding.granularity
    if not encoding.signed or encoding.strict_symmetric:
        raise ValueError(f"tensor '{name}': an LPBQ encoding must be signed symmetric (offset "
                         f"{-(2 ** (encoding.bitwidth - 1))}), got offsets {sorted(set(_ints(encoding.offset)))}")
    return (granularity, granularity.channel_scale(encoding.scale, encoding.bitwidth),
            granularity.multipliers(encoding.scale, encoding.bitwidth))


def _entry_1_0_0(name: str, encoding: Encoding | FloatFormat) -> dict[str, Any]:
    if isinstance(encoding, FloatFormat):  # float16: the only float format this version states
        return {"name": name, "dtype": "FLOAT", "bw": 16, "enc_type": "PER_TENSOR"}
    entry = {"name": name, "dtype": "INT", "bw": encoding.bitwidth, "is_sym": encoding.symmetric}
    match encoding.granularity:
        case Lpbq() as granularity:
            _, channel_scale, multipliers = _lpbq_parts(name, encoding)
            channels = channel_scale.numel()
            return entry | {
                "enc_type": "LPBQ", "bw": granularity.decompressed_bw, "compressed_bw": encoding.bitwidth,
                "block_size": granularity.block_size, "scale": _floats(channel_scale),
                "offset": [-(2 ** (granularity.decompressed_bw - 1))] * channels,
                "per_block_int_scale": _ints(granularity.channel_major(multipliers)),
            }
        case PerBlock() as granularity:
            return entry | {
                "enc_type": "PER_BLOCK", "block_size": granularity.block_size,
                "scale": _floats(granularity.channel_major(encoding.scale)),
                "offset": _ints(granularity.channel_major(encoding.offset)),
            }
    enc_type = "PER_TENSOR" if encoding.granularity == PER_TENSOR else "PER_CHANNEL"
    return entry | {"scale": _floats(encoding.scale), "offset": _ints(encoding.offset), "enc_type": enc_type}


def _fp8_entry_2_0_0(name: str, encoding: Fp8Encoding) -> dict[str, Any]:
    """AIMET's 2.0.0 fp8 entry: QuantizeLinear to float8 with zero point 0 (written by none), ``axis`` per channel."""
    entry: dict[str, Any] = {"name": name, "output_dtype": _AIMET_FP8_DTYPES[encoding.number_format.name]}
    if isinstance(encoding.granularity, PerChannel):
        return entry | {"y_scale": _floats(encoding.scale), "axis": encoding.granularity.axis}
    return entry | {"y_scale": float(encoding.scale)}


def _entry_2_0_0(name: str, encoding: Encoding | FloatFormat | Fp8Encoding) -> dict[str, Any]:
    if isinstance(encoding, Fp8Encoding):
        return _fp8_entry_2_0_0(name, encoding)
    if isinstance(encoding, FloatFormat):
        raise ValueError(f"tensor '{name}' has format {encoding.name} without its scale; give an Fp8Encoding (format "
                         "and scale) to write it")
    if encoding.strict_symmetric:
        raise ValueError(
            f"tensor '{name}' has a strict symmetric encoding ([-{2 ** (encoding.bitwidth - 1) - 1}, "
            f"{2 ** (encoding.bitwidth - 1) - 1}]), which encodings version 2.0.0 (ONNX QuantizeLinear terms) cannot "
            "state; write version 1.0.0 or 0.6.1"
        )
    entry: dict[str, Any] = {"name": name, "output_dtype": onnx_dtype_name(encoding)}
    zero_points = _ints(encoding.onnx_zero_point)
    match encoding.granularity:
        case Lpbq() as granularity:
            _, channel_scale, multipliers = _lpbq_parts(name, encoding)
            if granularity.decompressed_bw != 2 * encoding.bitwidth:
                raise ValueError(
                    f"tensor '{name}': encodings version 2.0.0 states LPBQ only with decompressed_bw twice the "
                    f"bitwidth (as AIMET), got {granularity.decompressed_bw} for {encoding.bitwidth} bits; write "
                    "version 1.0.0"
                )
            return entry | {
                "per_channel_float_scale": channel_scale.tolist(),
                "per_block_int_scale": multipliers.long().tolist(), "axis": granularity.block_axis,
                "block_size": granularity.block_size,
            }
        case PerBlock() as granularity:
            entry["y_scale"] = encoding.scale.tolist()
            if any(zero_points):
                entry["y_zero_point"] = encoding.onnx_zero_point.long().tolist()
            return entry | {"axis": granularity.block_axis, "block_size": granularity.block_size}
        case PerTensor():
            entry["y_scale"] = float(encoding.scale)
            if zero_points[0] != 0:
                entry["y_zero_point"] = zero_points[0]
            return entry
    entry["y_scale"] = _floats(encoding.scale)
    if any(zero_points):
        entry["y_zero_point"] = zero_points
    entry["axis"] = encoding.axis
    return entry


def encodings_document(
    entries: list[TensorEncoding], version: str = "1.0.0", quantizer_args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON document AIMET would write for ``entries`` in format ``version``."""
    if version not in SUPPORTED_VERSIONS:
        choices = ", ".join(SUPPORTED_VERSIONS)
        raise ValueError(f"encoding_version {version!r} is not supported; choose one of {choices}")
    document: dict[str, Any] = {"producer": dict(PRODUCER), "version": version}
    if version == "2.0.0":
        document["encodings"] = [_entry_2_0_0(e.name, e.encoding) for e in entries
                                 if not _unquantized_float(e.encoding)]
        return document
    entries = _stated_in_0_6_1_or_1_0_0(entries, version)
    params = [e for e in entries if e.is_param]
    activations = [e for e in entries if not e.is_param]
    if version == "0.6.1":
        document["activation_encodings"] = {e.name: _entry_0_6_1(e.name, e.encoding) for e in activations}
        document["param_encodings"] = {e.name: _entry_0_6_1(e.name, e.encoding) for e in params}
    else:
        document["activation_encodings"] = [_entry_1_0_0(e.name, e.encoding) for e in activations]
        document["param_encodings"] = [_entry_1_0_0(e.name, e.encoding) for e in params]
    document["excluded_layers"] = []
    document["quantizer_args"] = dict(quantizer_args or {})
    return document


def _unquantized_float(encoding: Encoding | FloatFormat | Fp8Encoding) -> bool:
    """float16/bfloat16: no 2.0.0 entry (not quantized in QuantizeLinear terms; AIMET writes none)."""
    return isinstance(encoding, FloatFormat) and not encoding.scaled


def _stated_in_0_6_1_or_1_0_0(entries: list[TensorEncoding], version: str) -> list[TensorEncoding]:
    """The entries ``version`` can state (integer and float16), with one warning naming the tensors it cannot."""
    stated = [e for e in entries if isinstance(e.encoding, Encoding) or e.encoding == _FLOAT16]
    left_out = [e.name for e in entries if not any(e is kept for kept in stated)]
    if left_out:
        warnings.warn(
            f"encodings version {version} has no form for bfloat16 or fp8 tensors; left out of the file: "
            f"{', '.join(left_out)} (version 2.0.0 states fp8)", stacklevel=4,
        )
    return stated


def write_encodings(
    entries: list[TensorEncoding], path: str | Path, version: str = "1.0.0",
    quantizer_args: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.write_text(json.dumps(encodings_document(entries, version, quantizer_args), indent=2))
    return path


# -- reading -----------------------------------------------------------------------------------------------
def read_encodings(path: str | Path) -> tuple[str, list[TensorEncoding]]:
    """(version, entries) of an AIMET-format encodings file (0.6.1, 1.0.0 or 2.0.0); anything else is an
    `EncodingsFileError` naming the file, the entry and the field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON, bad UTF-8
        raise EncodingsFileError(f"cannot read encodings file {path}: {_one_line(str(error))}") from None
    if not isinstance(document, dict):
        raise EncodingsFileError(f"{path}: expected a JSON object at the top level")
    version = document.get("version", "0.6.1" if "activation_encodings" in document else "?")
    if version not in SUPPORTED_VERSIONS:
        raise EncodingsFileError(
            f"{path}: encodings version {_show(version)} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})"
        )
    reader = _Reader(path)
    if version == "2.0.0":
        return version, [reader.entry_2_0_0(e) for e in reader.section(document, "encodings", list)]
    entries = []
    for section, is_param in (("activation_encodings", False), ("param_encodings", True)):
        if version == "0.6.1":
            for name, channels in reader.section(document, section, dict).items():
                entries.append(TensorEncoding(name, reader.entry_0_6_1(name, channels), is_param))
        else:
            for entry in reader.section(document, section, list):
                name, encoding = reader.entry_1_0_0(entry)
                entries.append(TensorEncoding(name, encoding, is_param))
    return version, entries


_DTYPE = re.compile(r"^(u?)int(\d{1,2})$")
_MIN_BITWIDTH, _MAX_BITWIDTH = 2, 32
_ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ")


def _offset(zero_point: float | torch.Tensor, signed: bool, bitwidth: int) -> float | torch.Tensor:
    """ONNX: x = (v - zp) * s with v signed or unsigned; edgequant: x = (q + offset) * s with q unsigned."""
    return -(zero_point + 2 ** (bitwidth - 1)) if signed else -zero_point


def _show(value: Any) -> str:
    """A value as it appears in JSON, on one line."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Reader:
    """Typed field access with errors that name the file, the entry and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, name: Any, message: str) -> EncodingsFileError:
        return EncodingsFileError(f"{self.path}: entry {_show(name)}: {message}")

    def section(self, document: dict, key: str, kind: type) -> Any:
        value = document.get(key, kind())
        if not isinstance(value, kind):
            raise EncodingsFileError(f"{self.path}: '{key}' must be a JSON {'list' if kind is list else 'object'}")
        return value

    def field(self, entry: Any, key: str, name: Any) -> Any:
        if not isinstance(entry, dict):
            raise self.fail(name, f"expected a JSON object, got {_show(entry)}")
        if key not in entry:
            raise self.fail(name, f"missing field '{key}'")
        return entry[key]

    def name(self, entry: Any) -> str:
        name = self.field(entry, "name", "?")
        if not isinstance(name, str) or not name:
            raise self.fail(name, "'name' must be a non-empty string (the ONNX tensor name)")
        return name

    def integer(self, value: Any, name: str, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"'{key}' must be an integer, got {_show(value)}")
        return value

    def bitwidth(self, value: Any, name: str, key: str) -> int:
        bitwidth = self.integer(value, name, key)
        if not _MIN_BITWIDTH <= bitwidth <= _MAX_BITWIDTH:
            raise self.fail(name, f"'{key}' {bitwidth} is outside the supported range {_MIN_BITWIDTH}..{_MAX_BITWIDTH}")
        return bitwidth

    def flag(self, value: Any, name: str, key: str) -> bool:
        """AIMET writes booleans as JSON true/false (1.0.0) or the strings "True"/"False" (0.6.1)."""
        if isinstance(value, bool):
            return value
        if value in ("True", "False"):
            return value == "True"
        raise self.fail(name, f"'{key}' must be true/false or \"True\"/\"False\", got {_show(value)}")

    def numbers(self, values: Any, name: str, key: str, integral: bool = False) -> list[float]:
        """A non-empty list of finite numbers (whole numbers for offsets and zero points)."""
        if not isinstance(values, list) or not values:
            raise self.fail(name, f"'{key}' must be a non-empty list of numbers, got {_show(values)}")
        found = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(name, f"'{key}' must hold numbers, got {_show(value)}")
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number) or (integral and not number.is_integer()):
                kind = "whole numbers" if integral else "finite numbers"
                raise self.fail(name, f"'{key}' must hold {kind}, got {_show(value)}")
            found.append(number)
        return found

    def float16(self, bitwidth: Any, name: str, key: str) -> FloatFormat:
        """A float entry: AIMET's files state float16 only."""
        if bitwidth != 16:
            raise self.fail(name, f"a float entry's '{key}' must be 16 (float16), got {_show(bitwidth)}")
        return _FLOAT16

    def entry_0_6_1(self, name: str, channels: Any) -> Encoding | FloatFormat:
        if not isinstance(channels, list) or not channels:
            raise self.fail(name, "expected a non-empty list of per-channel encodings")
        dtype = self.field(channels[0], "dtype", name)
        if dtype == "float":
            return self.float16(self.field(channels[0], "bitwidth", name), name, "bitwidth")
        if dtype != "int":
            raise self.fail(name, f"dtype {_show(dtype)} is not supported (\"int\" or \"float\")")
        bitwidth = self.bitwidth(self.field(channels[0], "bitwidth", name), name, "bitwidth")
        symmetric = self.flag(self.field(channels[0], "is_symmetric", name), name, "is_symmetric")
        scale = self.numbers([self.field(c, "scale", name) for c in channels], name, "scale")
        offset = self.numbers([self.field(c, "offset", name) for c in channels], name, "offset", integral=True)
        return self.encoding(name, scale, offset, bitwidth, symmetric, PerChannel(0) if len(channels) > 1 else None)

    def entry_1_0_0(self, entry: Any) -> tuple[str, Encoding | FloatFormat]:
        name = self.name(entry)
        dtype = self.field(entry, "dtype", name)
        if isinstance(dtype, str) and dtype.upper() == "FLOAT":
            return name, self.float16(self.field(entry, "bw", name), name, "bw")
        if not isinstance(dtype, str) or dtype.upper() != "INT":
            raise self.fail(name, f"dtype {_show(dtype)} is not supported (\"INT\" or \"FLOAT\")")
        enc_type = entry.get("enc_type", "PER_TENSOR")
        if enc_type not in _ENC_TYPES:
            raise self.fail(name, f"enc_type {_show(enc_type)} is not supported ({', '.join(_ENC_TYPES)})")
        scale = self.numbers(self.field(entry, "scale", name), name, "scale")
        offset = self.numbers(self.field(entry, "offset", name), name, "offset", integral=True)
        if len(scale) != len(offset):
            raise self.fail(name, "'scale' and 'offset' must be lists of the same length")
        bitwidth = self.bitwidth(self.field(entry, "bw", name), name, "bw")
        symmetric = self.flag(self.field(entry, "is_sym", name), name, "is_sym")
        if enc_type == "LPBQ":
            return name, self.lpbq_1_0_0(entry, name, scale, bitwidth, symmetric)
        granularity: Granularity | None = {"PER_TENSOR": None, "PER_CHANNEL": PerChannel(0)}.get(enc_type)
        if enc_type == "PER_BLOCK":
            granularity = PerBlock(self.block_size(entry, name))
        return name, self.encoding(name, scale, offset, bitwidth, symmetric, granularity)

    def block_size(self, entry: dict, name: str) -> int:
        block_size = self.integer(self.field(entry, "block_size", name), name, "block_size")
        if block_size < 1:
            raise self.fail(name, f"'block_size' must be >= 1, got {block_size}")
        return block_size

    def lpbq_1_0_0(
        self, entry: dict, name: str, channel_scale: list[float], bitwidth: int, symmetric: bool
    ) -> Encoding:
        """Block scales = per-channel scale x per-block integer, flat in (channel, block) order."""
        compressed = self.bitwidth(self.field(entry, "compressed_bw", name), name, "compressed_bw")
        multipliers = self.numbers(self.field(entry, "per_block_int_scale", name), name, "per_block_int_scale",
                                   integral=True)
        if not symmetric:
            raise self.fail(name, "an LPBQ entry must be symmetric ('is_sym' true)")
        if len(multipliers) % len(channel_scale):
            raise self.fail(name, f"{len(multipliers)} 'per_block_int_scale' values do not divide into "
                                  f"{len(channel_scale)} channels")
        scale = torch.tensor(channel_scale)[:, None] * torch.tensor(multipliers).reshape(len(channel_scale), -1)
        granularity = self.lpbq_granularity(name, self.block_size(entry, name), None, bitwidth, compressed)
        return self.lpbq_encoding(name, scale.reshape(-1), multipliers, compressed, granularity)

    def lpbq_granularity(
        self, name: str, block_size: int, block_axis: int | None, decompressed: int, compressed: int
    ) -> Lpbq:
        try:
            granularity = Lpbq(block_size, None, block_axis, decompressed_bw=decompressed)
            granularity.check_grid(compressed, True, "LPBQ")
        except ValueError as error:
            raise self.fail(name, str(error)) from None
        return granularity

    def lpbq_encoding(
        self, name: str, scale: torch.Tensor, multipliers: list[float], bitwidth: int, granularity: Lpbq
    ) -> Encoding:
        levels = granularity.multiplier_levels(bitwidth)
        if not all(1 <= m <= levels for m in multipliers):
            raise self.fail(name, f"'per_block_int_scale' must hold integers in [1, {levels}] "
                                  f"(2**(decompressed bw - bw)), got {min(multipliers):g}..{max(multipliers):g}")
        offset = torch.full_like(scale, -float(2 ** (bitwidth - 1)))
        return self.encoding(name, scale, offset, bitwidth, True, granularity)

    def entry_2_0_0(self, entry: Any) -> TensorEncoding:
        name = self.name(entry)
        dtype = self.field(entry, "output_dtype", name)
        match = _DTYPE.match(dtype) if isinstance(dtype, str) else None
        if dtype in _AIMET_FP8_DTYPES.values():
            raise self.fail(name, f"output_dtype {_show(dtype)} (fp8) is written but not read back; set the tensor's "
                                  "format with sim.set_format and calibrate it instead")
        if match is None:
            raise self.fail(name, f"output_dtype {_show(dtype)} is not supported (int<N> or uint<N>)")
        signed = not match.group(1)
        bitwidth = self.bitwidth(int(match.group(2)), name, "output_dtype")
        if "per_block_int_scale" in entry:
            return TensorEncoding(name, self.lpbq_2_0_0(entry, name, signed, bitwidth), None)
        if "block_size" in entry:
            return TensorEncoding(name, self.per_block_2_0_0(entry, name, signed, bitwidth), None)
        scale = self.field(entry, "y_scale", name)
        per_channel = isinstance(scale, list)
        scales = self.numbers(scale if per_channel else [scale], name, "y_scale")
        zero_point = entry.get("y_zero_point", 0)
        zero_points = self.numbers(
            zero_point if isinstance(zero_point, list) else [zero_point] * len(scales), name, "y_zero_point",
            integral=True,
        )
        if len(zero_points) != len(scales):
            raise self.fail(name, "'y_zero_point' and 'y_scale' have different lengths")
        granularity = None
        if per_channel:  # without an axis: 0, as 0.6.1/1.0.0 entries get (see `encoding`)
            axis = self.integer(entry.get("axis", 0), name, "axis")
            if axis < 0:
                raise self.fail(name, f"'axis' must be >= 0, got {axis}")
            granularity = PerChannel(axis)
        offsets = [_offset(zp, signed, bitwidth) for zp in zero_points]
        symmetric = signed and not any(zero_points)
        return TensorEncoding(name, self.encoding(name, scales, offsets, bitwidth, symmetric, granularity), None)

    def array(self, values: Any, name: str, key: str, integral: bool = False) -> torch.Tensor:
        """A nested list of numbers (one per block, with the tensor's rank) as a tensor."""
        flat: list[Any] = []
        pending = [values]
        while pending:
            value = pending.pop()
            if isinstance(value, list) and value:
                pending.extend(reversed(value))
            else:
                flat.append(value)
        self.numbers(flat, name, key, integral)
        try:
            return torch.tensor(values, dtype=torch.float64)
        except (ValueError, TypeError):
            raise self.fail(name, f"'{key}' must be a nested list of numbers of one shape") from None

    def block_axis(self, entry: dict, name: str, rank: int) -> int:
        axis = self.integer(self.field(entry, "axis", name), name, "axis")
        if not 0 <= axis < rank:
            raise self.fail(name, f"'axis' {axis} is not an axis of the {rank}-dimensional per-block scale")
        return axis

    def per_block_2_0_0(self, entry: dict, name: str, signed: bool, bitwidth: int) -> Encoding:
        scale = self.array(self.field(entry, "y_scale", name), name, "y_scale")
        zero_point = self.array(entry.get("y_zero_point", 0), name, "y_zero_point", integral=True)
        try:
            zero_point = zero_point.expand_as(scale)
        except RuntimeError:
            raise self.fail(name, f"'y_zero_point' of shape {tuple(zero_point.shape)} does not fit 'y_scale' of shape "
                                  f"{tuple(scale.shape)}") from None
        granularity = PerBlock(self.block_size(entry, name), None, self.block_axis(entry, name, scale.dim()))
        offset = _offset(zero_point, signed, bitwidth)
        symmetric = signed and not bool(zero_point.any())
        return self.encoding(name, scale, offset, bitwidth, symmetric, granularity)

    def lpbq_2_0_0(self, entry: dict, name: str, signed: bool, bitwidth: int) -> Encoding:
        """Block scales = per_channel_float_scale x per_block_int_scale (nested, the tensor's rank); 2.0.0 LPBQ
        decompresses to twice ``output_dtype``'s bitwidth."""
        if not signed or entry.get("y_zero_point") not in (None, 0):
            raise self.fail(name, "an LPBQ entry must be signed with zero point 0 (symmetric)")
        channel_scale = self.array(self.field(entry, "per_channel_float_scale", name), name, "per_channel_float_scale")
        multipliers = self.array(self.field(entry, "per_block_int_scale", name), name, "per_block_int_scale",
                                 integral=True)
        if channel_scale.dim() != multipliers.dim():
            raise self.fail(name, "'per_channel_float_scale' and 'per_block_int_scale' must have the same rank")
        axis = self.block_axis(entry, name, multipliers.dim())
        try:
            scale = channel_scale.float() * multipliers.float()
        except RuntimeError:
            raise self.fail(name, f"'per_channel_float_scale' of shape {tuple(channel_scale.shape)} does not fit "
                                  f"'per_block_int_scale' of shape {tuple(multipliers.shape)}") from None
        granularity = self.lpbq_granularity(name, self.block_size(entry, name), axis, 2 * bitwidth, bitwidth)
        return self.lpbq_encoding(name, scale, multipliers.reshape(-1).tolist(), bitwidth, granularity)

    def encoding(
        self, name: str, scale: list[float] | torch.Tensor, offset: list[float] | torch.Tensor, bitwidth: int,
        symmetric: bool, granularity: Granularity | None,
    ) -> Encoding:
        """An encoding of ``granularity`` (None: per tensor, from the first value). Per-channel entries without an
        axis (0.6.1, 1.0.0) get axis 0 here, per-block ones no channel axis (1.0.0: nor block axis, and their values
        stay flat); the loader takes them from the layer. A symmetric flag is kept where the offsets are those of a
        symmetric grid: all strict (``-(2**(bw-1) - 1)``), or each signed (``-2**(bw-1)``) or unsigned (0); other
        offsets describe an asymmetric grid."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        offset = torch.as_tensor(offset, dtype=torch.float64)  # float32 cannot tell -2**31 from -(2**31 - 1)
        strict = symmetric and bool((offset == strict_symmetric_offset(bitwidth)).all())
        symmetric = strict or (symmetric and bool(((offset == -(2 ** (bitwidth - 1))) | (offset == 0)).all()))
        if granularity is None:
            scale, offset, granularity = scale.reshape(-1)[0], offset.reshape(-1)[0], PER_TENSOR
        try:
            return Encoding(scale, offset, bitwidth, symmetric, granularity, strict)
        except (ValueError, TypeError, OverflowError) as error:
            raise self.fail(name, str(error)) from None
