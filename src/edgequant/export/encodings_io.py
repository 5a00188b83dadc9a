"""AIMET encodings files (versions 0.6.1, 1.0.0, 2.0.0): field names and types exactly as AIMET 2.42 writes them.

* 0.6.1: ``activation_encodings`` / ``param_encodings`` map a tensor name to a list (one dict per channel) of
  ``min, max, scale, offset, bitwidth, dtype ("int"), is_symmetric ("True"/"False" strings)``.
* 1.0.0: the same two sections as lists of ``{name, dtype "INT", bw, is_sym, scale [..], offset [..],
  enc_type "PER_TENSOR"|"PER_CHANNEL"}``.
* 2.0.0: one ``encodings`` list in ONNX QuantizeLinear terms: ``{name, output_dtype "int8"|"uint8"|..., y_scale,
  y_zero_point (omitted when 0), axis (per-channel only)}``.

Offsets follow edgequant's (= AIMET's) convention, see `edgequant.quantization.encoding`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgequant.quantization import Encoding

SUPPORTED_VERSIONS = ("0.6.1", "1.0.0", "2.0.0")
PRODUCER = {"package": "edgequant", "version": "0.1.0"}


@dataclass
class TensorEncoding:
    """The encoding of one named ONNX tensor; ``is_param`` is None where the format does not say (2.0.0)."""

    name: str
    encoding: Encoding
    is_param: bool | None


class EncodingsFileError(ValueError):
    """An encodings file that cannot be read; the message names the file, the entry and what is wrong."""


# -- writing -----------------------------------------------------------------------------------------------
def onnx_dtype_name(encoding: Encoding) -> str:
    """``int8`` for symmetric (signed, zero point 0), ``uint8`` for asymmetric; the bitwidth as is."""
    return f"{'int' if encoding.symmetric else 'uint'}{encoding.bitwidth}"


def _floats(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.reshape(-1).tolist()]


def _ints(values: torch.Tensor) -> list[int]:
    return [int(v) for v in values.reshape(-1).tolist()]


def _entry_0_6_1(encoding: Encoding) -> list[dict[str, Any]]:
    return [
        {
            "min": low, "max": high, "scale": scale, "offset": offset, "bitwidth": encoding.bitwidth, "dtype": "int",
            "is_symmetric": str(encoding.symmetric),
        }
        for low, high, scale, offset in zip(
            _floats(encoding.min), _floats(encoding.max), _floats(encoding.scale), _ints(encoding.offset), strict=True
        )
    ]


def _entry_1_0_0(name: str, encoding: Encoding) -> dict[str, Any]:
    return {
        "name": name, "dtype": "INT", "bw": encoding.bitwidth, "is_sym": encoding.symmetric,
        "scale": _floats(encoding.scale), "offset": _ints(encoding.offset),
        "enc_type": "PER_TENSOR" if encoding.axis is None else "PER_CHANNEL",
    }


def _entry_2_0_0(name: str, encoding: Encoding) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "output_dtype": onnx_dtype_name(encoding)}
    zero_points = _ints(encoding.onnx_zero_point)
    if encoding.axis is None:
        entry["y_scale"] = float(encoding.scale)
        if zero_points[0] != 0:
            entry["y_zero_point"] = zero_points[0]
    else:
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
        document["encodings"] = [_entry_2_0_0(e.name, e.encoding) for e in entries]
        return document
    params = [e for e in entries if e.is_param]
    activations = [e for e in entries if not e.is_param]
    if version == "0.6.1":
        document["activation_encodings"] = {e.name: _entry_0_6_1(e.encoding) for e in activations}
        document["param_encodings"] = {e.name: _entry_0_6_1(e.encoding) for e in params}
    else:
        document["activation_encodings"] = [_entry_1_0_0(e.name, e.encoding) for e in activations]
        document["param_encodings"] = [_entry_1_0_0(e.name, e.encoding) for e in params]
    document["excluded_layers"] = []
    document["quantizer_args"] = dict(quantizer_args or {})
    return document


def write_encodings(
    entries: list[TensorEncoding], path: str | Path, version: str = "1.0.0",
    quantizer_args: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.write_text(json.dumps(encodings_document(entries, version, quantizer_args), indent=2))
    return path


# -- reading -----------------------------------------------------------------------------------------------
def read_encodings(path: str | Path) -> tuple[str, list[TensorEncoding]]:
    """(version, entries) of an AIMET-format encodings file (0.6.1, 1.0.0 or 2.0.0)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise EncodingsFileError(f"cannot read encodings file {path}: {error}") from None
    if not isinstance(document, dict):
        raise EncodingsFileError(f"{path}: expected a JSON object at the top level")
    version = str(document.get("version", "0.6.1" if "activation_encodings" in document else "?"))
    if version not in SUPPORTED_VERSIONS:
        raise EncodingsFileError(
            f"{path}: encodings version {version!r} is not supported (supported: {', '.join(SUPPORTED_VERSIONS)})"
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


_DTYPE = re.compile(r"^(u?)int(\d+)$")


class _Reader:
    """Field access with errors that name the file and the entry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, name: str, message: str) -> EncodingsFileError:
        return EncodingsFileError(f"{self.path}: entry '{name}': {message}")

    def section(self, document: dict, key: str, kind: type) -> Any:
        value = document.get(key, kind())
        if not isinstance(value, kind):
            raise EncodingsFileError(f"{self.path}: '{key}' must be a JSON {'list' if kind is list else 'object'}")
        return value

    def field(self, entry: dict, key: str, name: str) -> Any:
        if not isinstance(entry, dict):
            raise self.fail(name, f"expected a JSON object, got {type(entry).__name__}")
        if key not in entry:
            raise self.fail(name, f"missing field '{key}'")
        return entry[key]

    def entry_0_6_1(self, name: str, channels: Any) -> Encoding:
        if not isinstance(channels, list) or not channels:
            raise self.fail(name, "expected a non-empty list of per-channel encodings")
        dtype = str(self.field(channels[0], "dtype", name))
        if dtype != "int":
            raise self.fail(name, f"dtype {dtype!r} is not supported (integer encodings only)")
        bitwidth = int(self.field(channels[0], "bitwidth", name))
        symmetric = str(self.field(channels[0], "is_symmetric", name)) == "True"
        scale = [float(self.field(c, "scale", name)) for c in channels]
        offset = [float(self.field(c, "offset", name)) for c in channels]
        return self.encoding(name, scale, offset, bitwidth, symmetric, per_channel=len(channels) > 1, axis=None)

    def entry_1_0_0(self, entry: Any) -> tuple[str, Encoding]:
        name = str(self.field(entry, "name", "?"))
        if str(self.field(entry, "dtype", name)).upper() != "INT":
            raise self.fail(name, f"dtype {entry['dtype']!r} is not supported (integer encodings only)")
        enc_type = str(entry.get("enc_type", "PER_TENSOR"))
        if enc_type not in ("PER_TENSOR", "PER_CHANNEL"):
            raise self.fail(name, f"enc_type {enc_type!r} is not supported (PER_TENSOR or PER_CHANNEL)")
        scale = self.field(entry, "scale", name)
        offset = self.field(entry, "offset", name)
        if not isinstance(scale, list) or not isinstance(offset, list) or len(scale) != len(offset) or not scale:
            raise self.fail(name, "'scale' and 'offset' must be non-empty lists of the same length")
        encoding = self.encoding(
            name, scale, offset, int(self.field(entry, "bw", name)), bool(self.field(entry, "is_sym", name)),
            per_channel=enc_type == "PER_CHANNEL", axis=None,
        )
        return name, encoding

    def entry_2_0_0(self, entry: Any) -> TensorEncoding:
        name = str(self.field(entry, "name", "?"))
        dtype = str(self.field(entry, "output_dtype", name))
        match = _DTYPE.match(dtype)
        if match is None:
            raise self.fail(name, f"output_dtype {dtype!r} is not supported (int<N> or uint<N>)")
        if "block_size" in entry:
            raise self.fail(name, "block-wise encodings (block_size) are not supported")
        signed, bitwidth = not match.group(1), int(match.group(2))
        scale = self.field(entry, "y_scale", name)
        per_channel = isinstance(scale, list)
        scales = scale if per_channel else [scale]
        zero_point = entry.get("y_zero_point", 0)
        zero_points = zero_point if isinstance(zero_point, list) else [zero_point] * len(scales)
        if len(zero_points) != len(scales):
            raise self.fail(name, "'y_zero_point' and 'y_scale' have different lengths")
        # ONNX: x = (v - zp) * s with v signed or unsigned; edgequant: x = (q + offset) * s with q unsigned
        offsets = [-(zp + 2 ** (bitwidth - 1)) if signed else -zp for zp in zero_points]
        symmetric = signed and not any(zero_points)
        axis = int(entry["axis"]) if per_channel and "axis" in entry else None  # `encoding` defaults it to 0
        encoding = self.encoding(name, scales, offsets, bitwidth, symmetric, per_channel, axis)
        return TensorEncoding(name, encoding, None)

    def encoding(
        self, name: str, scale: list, offset: list, bitwidth: int, symmetric: bool, per_channel: bool,
        axis: int | None,
    ) -> Encoding:
        """Per-channel entries without an axis (0.6.1, 1.0.0) get axis 0 here; the loader uses the quantizer's."""
        try:
            return Encoding(
                torch.tensor(scale if per_channel else scale[0], dtype=torch.float32),
                torch.tensor(offset if per_channel else offset[0], dtype=torch.float32),
                bitwidth, symmetric and all(o == -(2 ** (bitwidth - 1)) for o in offset),
                (0 if axis is None else axis) if per_channel else None,
            )
        except (ValueError, TypeError) as error:
            raise self.fail(name, str(error)) from None
