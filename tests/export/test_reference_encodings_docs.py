"""AIMET encodings documents written by hand (0.6.1, 1.0.0, 2.0.0) with known scales and zero points: the
reader must decode them to the stated grids and the writer must reproduce them field for field. These do not
need the AIMET fixtures, so they run on a fresh clone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgequant.export import EncodingsFileError, read_encodings
from edgequant.export.encodings_io import TensorEncoding, encodings_document, onnx_dtype_name, write_encodings
from edgequant.quantization import Encoding, quantize_dequantize

# input: uint8, scale 0.25, zero point 100 (offset -100): range [-25, 38.75]
# conv.weight: int4 symmetric per channel (axis 0), scales 0.5 and 0.125: ranges [-4, 3.5] and [-1, 0.875]
# out: uint16, scale 2^-10, zero point 5 (offset -5): range [-5 * 2^-10, 65530 * 2^-10]
# bias: uint8 with zero point 0 (offset 0), scale 0.5: range [0, 127.5]
ENTRIES = [
    TensorEncoding("input", Encoding(torch.tensor(0.25), torch.tensor(-100.0), 8, False), False),
    TensorEncoding("conv.weight", Encoding(torch.tensor([0.5, 0.125]), torch.tensor([-8.0, -8.0]), 4, True, 0), True),
    TensorEncoding("out", Encoding(torch.tensor(2.0**-10), torch.tensor(-5.0), 16, False), False),
    TensorEncoding("bias", Encoding(torch.tensor(0.5), torch.tensor(0.0), 8, False), True),
]

DOCUMENTS = {
    "0.6.1": {
        "producer": {"package": "edgequant", "version": "0.1.0"},
        "version": "0.6.1",
        "activation_encodings": {
            "input": [{"min": -25.0, "max": 38.75, "scale": 0.25, "offset": -100, "bitwidth": 8, "dtype": "int",
                       "is_symmetric": "False"}],
            "out": [{"min": -5 / 1024, "max": 65530 / 1024, "scale": 1 / 1024, "offset": -5, "bitwidth": 16,
                     "dtype": "int", "is_symmetric": "False"}],
        },
        "param_encodings": {
            "conv.weight": [
                {"min": -4.0, "max": 3.5, "scale": 0.5, "offset": -8, "bitwidth": 4, "dtype": "int",
                 "is_symmetric": "True"},
                {"min": -1.0, "max": 0.875, "scale": 0.125, "offset": -8, "bitwidth": 4, "dtype": "int",
                 "is_symmetric": "True"},
            ],
            "bias": [{"min": 0.0, "max": 127.5, "scale": 0.5, "offset": 0, "bitwidth": 8, "dtype": "int",
                      "is_symmetric": "False"}],
        },
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": 8},
    },
    "1.0.0": {
        "producer": {"package": "edgequant", "version": "0.1.0"},
        "version": "1.0.0",
        "activation_encodings": [
            {"name": "input", "dtype": "INT", "bw": 8, "is_sym": False, "scale": [0.25], "offset": [-100],
             "enc_type": "PER_TENSOR"},
            {"name": "out", "dtype": "INT", "bw": 16, "is_sym": False, "scale": [1 / 1024], "offset": [-5],
             "enc_type": "PER_TENSOR"},
        ],
        "param_encodings": [
            {"name": "conv.weight", "dtype": "INT", "bw": 4, "is_sym": True, "scale": [0.5, 0.125],
             "offset": [-8, -8], "enc_type": "PER_CHANNEL"},
            {"name": "bias", "dtype": "INT", "bw": 8, "is_sym": False, "scale": [0.5], "offset": [0],
             "enc_type": "PER_TENSOR"},
        ],
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": 8},
    },
    "2.0.0": {
        "producer": {"package": "edgequant", "version": "0.1.0"},
        "version": "2.0.0",
        "encodings": [
            {"name": "input", "output_dtype": "uint8", "y_scale": 0.25, "y_zero_point": 100},
            {"name": "conv.weight", "output_dtype": "int4", "y_scale": [0.5, 0.125], "axis": 0},
            {"name": "out", "output_dtype": "uint16", "y_scale": 1 / 1024, "y_zero_point": 5},
            {"name": "bias", "output_dtype": "uint8", "y_scale": 0.5},
        ],
    },
}


@pytest.mark.parametrize("version", list(DOCUMENTS))
def test_writer_reproduces_the_hand_written_document(tmp_path: Path, version: str) -> None:
    path = write_encodings(ENTRIES, tmp_path / "model.encodings", version, quantizer_args={"activation_bitwidth": 8})
    assert path == tmp_path / "model.encodings"
    text = path.read_text()
    assert json.loads(text) == DOCUMENTS[version]
    assert text.startswith('{\n  "producer"')  # indented, producer first
    assert json.dumps(encodings_document(ENTRIES, version, {"activation_bitwidth": 8})) == json.dumps(
        DOCUMENTS[version])  # same key order as AIMET writes


@pytest.mark.parametrize("version", list(DOCUMENTS))
def test_reader_decodes_the_hand_written_document(tmp_path: Path, version: str) -> None:
    path = tmp_path / "model.encodings"
    path.write_text(json.dumps(DOCUMENTS[version]))
    read_version, entries = read_encodings(path)
    assert read_version == version
    by_name = {entry.name: entry for entry in entries}
    assert set(by_name) == {"input", "out", "conv.weight", "bias"}
    for expected in ENTRIES:
        entry = by_name[expected.name]
        assert entry.is_param is (None if version == "2.0.0" else expected.is_param), entry.name
        assert entry.encoding.equals(expected.encoding), (entry.name, entry.encoding, expected.encoding)
    if version != "2.0.0":  # activations first, then params, each in file order
        assert [e.name for e in entries] == ["input", "out", "conv.weight", "bias"]


def test_writer_defaults() -> None:
    document = encodings_document(ENTRIES[:1])
    assert document["version"] == "1.0.0" and document["quantizer_args"] == {}
    assert document["param_encodings"] == [] and document["excluded_layers"] == []
    with pytest.raises(ValueError, match=r"encoding_version '3.0.0' is not supported; choose one of 0.6.1, 1.0.0"):
        encodings_document(ENTRIES, "3.0.0")
    assert [onnx_dtype_name(e.encoding) for e in ENTRIES] == ["uint8", "int4", "uint16", "uint8"]


def onnx_qdq(x: np.ndarray, scale: float, zero_point: int, low: int, high: int) -> np.ndarray:
    """ONNX QuantizeLinear + DequantizeLinear as the operator spec defines them."""
    return ((np.clip(np.round(x / scale) + zero_point, low, high) - zero_point) * scale).astype(np.float32)


@pytest.mark.parametrize("dtype, zero_point, low, high", [
    ("uint8", 100, 0, 255), ("uint8", 0, 0, 255), ("int8", 0, -128, 127), ("int8", 5, -128, 127),
    ("int8", -20, -128, 127), ("uint4", 3, 0, 15), ("int16", 0, -32768, 32767),
])
def test_2_0_0_zero_points_decode_to_the_onnx_grid(tmp_path: Path, dtype: str, zero_point: int, low: int,
                                                   high: int) -> None:
    entry = {"name": "t", "output_dtype": dtype, "y_scale": 0.125}
    if zero_point:
        entry["y_zero_point"] = zero_point
    path = tmp_path / "t.encodings"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [entry]}))
    (decoded,) = read_encodings(path)[1]
    encoding = decoded.encoding
    assert encoding.bitwidth == int(dtype.lstrip("uint")) and encoding.axis is None
    assert encoding.symmetric is (dtype.startswith("int") and zero_point == 0)
    x = np.arange(-80000, 80000, dtype=np.float32) * np.float32(0.125 / 8)  # every eighth step, exact ties included
    ours = quantize_dequantize(torch.from_numpy(x), encoding.scale, encoding.offset, encoding.bitwidth)
    np.testing.assert_array_equal(ours.numpy(), onnx_qdq(x.astype(np.float64), 0.125, zero_point, low, high))
    written = encodings_document([decoded], "2.0.0")["encodings"][0]
    if encoding.symmetric or dtype.startswith("u"):  # signed with a zero point is written as uint (same grid)
        assert written == entry


def test_per_channel_2_0_0_with_zero_points_and_axis(tmp_path: Path) -> None:
    entry = {"name": "w", "output_dtype": "uint8", "y_scale": [0.5, 0.25, 1.0], "y_zero_point": [0, 128, 255],
             "axis": 1}
    path = tmp_path / "w.encodings"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [entry]}))
    (decoded,) = read_encodings(path)[1]
    assert decoded.encoding.axis == 1 and decoded.encoding.offset.tolist() == [0.0, -128.0, -255.0]
    assert decoded.encoding.scale.tolist() == [0.5, 0.25, 1.0] and not decoded.encoding.symmetric
    assert encodings_document([decoded], "2.0.0")["encodings"] == [entry]
    no_axis = dict(entry)
    del no_axis["axis"]
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [no_axis]}))
    assert read_encodings(path)[1][0].encoding.axis == 0  # the loader substitutes the quantizer's axis


def test_symmetric_flag_needs_the_symmetric_offset(tmp_path: Path) -> None:
    document = {"version": "1.0.0", "activation_encodings": [
        {"name": "a", "dtype": "INT", "bw": 8, "is_sym": True, "scale": [0.5], "offset": [-100]},
        {"name": "b", "dtype": "int", "bw": 8, "is_sym": True, "scale": [0.5], "offset": [-128]},
        {"name": "c", "dtype": "int", "bw": 8, "is_sym": True, "scale": [0.5], "offset": [-127]},
    ]}
    path = tmp_path / "sym.encodings"
    path.write_text(json.dumps(document))
    version, (a, b, c) = read_encodings(path)
    assert not a.encoding.symmetric and b.encoding.symmetric  # -100 is no symmetric grid of AIMET's
    assert not b.encoding.strict_symmetric
    # AIMET (get_symmetric_properties): is_sym with offset -(2**(bw-1) - 1) is the strict symmetric grid
    assert c.encoding.symmetric and c.encoding.strict_symmetric and c.encoding.num_steps == 254
    assert a.encoding.axis is None and a.is_param is False
    document_0_6_1 = {"activation_encodings": {"a": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "True",
                                                      "scale": 0.5, "offset": -128, "min": -64, "max": 63.5}]}}
    path.write_text(json.dumps(document_0_6_1))  # no version field: 0.6.1
    version, (entry,) = read_encodings(path)
    assert version == "0.6.1" and entry.encoding.symmetric and entry.encoding.axis is None


@pytest.mark.parametrize("document, message", [
    ([], "expected a JSON object at the top level"),
    ({"encodings": []}, "encodings version \"\\?\" is not supported"),
    ({"version": "1.0.0", "activation_encodings": {}}, "'activation_encodings' must be a JSON list"),
    ({"version": "0.6.1", "param_encodings": []}, "'param_encodings' must be a JSON object"),
    ({"version": "1.0.0", "activation_encodings": [3]}, "entry \"\\?\": expected a JSON object, got 3"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "FLOAT", "bw": 8, "scale": [1],
                                                    "offset": [0], "is_sym": False}]},
     "entry \"a\": a float entry's 'bw' must be 16 \\(float16\\), got 8"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "FP", "bw": 16}]},
     "entry \"a\": dtype \"FP\" is not supported"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "INT", "bw": 8, "scale": [1],
                                                    "offset": [0], "is_sym": False, "enc_type": "PER_GROUP"}]},
     "entry \"a\": enc_type \"PER_GROUP\" is not supported"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "INT", "bw": 8, "scale": [1],
                                                    "offset": [0], "is_sym": False, "enc_type": "PER_BLOCK"}]},
     "entry \"a\": missing field 'block_size'"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "INT", "bw": 8, "scale": [1, 2],
                                                    "offset": [0], "is_sym": False}]},
     "entry \"a\": 'scale' and 'offset' must be lists of the same length"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "INT", "bw": 8, "scale": [1.0],
                                                    "is_sym": False}]}, "entry \"a\": missing field 'offset'"),
    ({"version": "1.0.0", "activation_encodings": [{"name": "a", "dtype": "INT", "bw": 8, "scale": [0.0],
                                                    "offset": [0], "is_sym": False}]},
     "entry \"a\": encoding scale must be finite and > 0"),
    ({"version": "0.6.1", "activation_encodings": {"a": []}}, "entry \"a\": expected a non-empty list"),
    ({"version": "0.6.1", "activation_encodings": {"a": [{"dtype": "float", "bitwidth": 32}]}},
     "entry \"a\": a float entry's 'bitwidth' must be 16 \\(float16\\), got 32"),
    ({"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "float16", "y_scale": 1.0}]},
     "entry \"a\": output_dtype \"float16\" is not supported"),
    ({"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "int4", "y_scale": [1.0], "block_size": 32}]},
     "entry \"a\": missing field 'axis'"),
    ({"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "int4", "y_scale": [[1.0], [2.0, 3.0]],
                                         "axis": 1, "block_size": 32}]},
     "entry \"a\": 'y_scale' must be a nested list of numbers of one shape"),
    ({"version": "2.0.0", "encodings": [{"name": "a", "output_dtype": "int8", "y_scale": [1.0, 2.0],
                                         "y_zero_point": [0]}]},
     "entry \"a\": 'y_zero_point' and 'y_scale' have different lengths"),
    ({"version": "2.0.0", "encodings": {}}, "'encodings' must be a JSON list"),
])
def test_reader_errors_name_the_file_the_entry_and_the_problem(tmp_path: Path, document: object,
                                                               message: str) -> None:
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps(document))
    with pytest.raises(EncodingsFileError, match=f"^{path}: .*{message}"):
        read_encodings(path)


def test_unreadable_files(tmp_path: Path) -> None:
    path = tmp_path / "broken.encodings"
    path.write_text("{not json")
    with pytest.raises(EncodingsFileError, match=f"cannot read encodings file {path}"):
        read_encodings(path)
    with pytest.raises(EncodingsFileError, match="cannot read encodings file"):
        read_encodings(tmp_path / "missing.encodings")


def _entry_0_6_1(**fields: object) -> dict:
    channel = {"min": -1.0, "max": 1.0, "scale": 0.5, "offset": -2, "bitwidth": 2, "dtype": "int",
               "is_symmetric": "True"}
    channel.update(fields)
    return {"version": "0.6.1", "activation_encodings": {"act": [{k: v for k, v in channel.items() if v is not None}]}}


def _entry_1_0_0(**fields: object) -> dict:
    entry = {"name": "act", "dtype": "INT", "bw": 2, "is_sym": True, "scale": [0.5], "offset": [-2]}
    entry.update(fields)
    return {"version": "1.0.0", "param_encodings": [{k: v for k, v in entry.items() if v is not None}]}


def _entry_2_0_0(**fields: object) -> dict:
    entry = {"name": "act", "output_dtype": "int2", "y_scale": 0.5}
    entry.update(fields)
    return {"version": "2.0.0", "encodings": [{k: v for k, v in entry.items() if v is not None}]}


@pytest.mark.parametrize("document, message", [
    *[(_entry_0_6_1(**{key: None}), f"missing field '{key}'") for key in
      ("dtype", "bitwidth", "is_symmetric", "scale", "offset")],
    (_entry_0_6_1(scale=0.0), "encoding scale must be finite and > 0"),
    *[(_entry_1_0_0(**{key: None}), f"missing field '{key}'") for key in ("dtype", "bw", "is_sym", "scale")],
    (_entry_1_0_0(offset=-2), "'offset' must be a non-empty list of numbers, got -2"),
    *[(_entry_2_0_0(**{key: None}), f"missing field '{key}'") for key in ("output_dtype", "y_scale")],
    (_entry_2_0_0(y_scale=-0.5), "encoding scale must be finite and > 0"),
])
def test_every_field_error_names_the_entry(tmp_path: Path, document: dict, message: str) -> None:
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps(document))
    with pytest.raises(EncodingsFileError, match=f"^{path}: entry \"act\": {message}"):
        read_encodings(path)


def test_unnamed_2_0_0_entry_and_unsupported_version_messages(tmp_path: Path) -> None:
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [{"output_dtype": "int8", "y_scale": 1.0}]}))
    with pytest.raises(EncodingsFileError, match=f"^{path}: entry \"\\?\": missing field 'name'$"):
        read_encodings(path)
    path.write_text(json.dumps({"version": "0.5"}))
    with pytest.raises(EncodingsFileError, match=f"^{path}: encodings version \"0.5\" is not supported "
                       r"\(supported: 0.6.1, 1.0.0, 2.0.0\)$"):
        read_encodings(path)


def test_write_encodings_defaults_to_1_0_0(tmp_path: Path) -> None:
    path = write_encodings(ENTRIES, tmp_path / "default.encodings")
    assert json.loads(path.read_text())["version"] == "1.0.0"
    assert json.loads(path.read_text())["quantizer_args"] == {}
