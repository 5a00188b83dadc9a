"""Property-based tests of the file readers: whatever JSON a user hands edgequant as a hardware config or an
encodings file, the reader returns a result or raises its own clear error (`ConfigError`, `EncodingsFileError`)
— never a TypeError/KeyError/IndexError from deep inside, and never an encoding with a NaN or non-positive scale.
What they read must also mean what the file says: valid encodings survive write → read in every format, read →
write → read is stable, a hand-written entry reads as the format defines it, and configs and input specs read back
what was written (a reader that flips a sign still returns something and passes "no exception" alone)."""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from aimet_fixtures import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgequant as eq
from edgequant.cli.data import InputSpec
from edgequant.config import ConfigError, HardwareConfig, TensorRule
from edgequant.export import EncodingsFileError, read_encodings
from edgequant.export.encodings_io import SUPPORTED_VERSIONS, TensorEncoding, write_encodings
from edgequant.quantization import Encoding, PerChannel, PerTensor

FUZZ = settings(
    max_examples=int(os.environ.get("EDGEQUANT_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
    derandomize="EDGEQUANT_FUZZ_EXAMPLES" not in os.environ,  # the suite: the same examples every run
    suppress_health_check=[HealthCheck.too_slow],
)
"""150 fixed examples per property in the suite; EDGEQUANT_FUZZ_EXAMPLES=5000 for a longer, random hunt."""
ROUND_TRIP = settings(
    max_examples=int(os.environ.get("EDGEQUANT_FUZZ_EXAMPLES", 100)), deadline=None, database=None,
    derandomize="EDGEQUANT_FUZZ_EXAMPLES" not in os.environ, suppress_health_check=[HealthCheck.too_slow],
)
"""Fewer examples for the round trips (each writes and reads whole files): the file stays at a few seconds."""

scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "True", "False", "int", "INT", "float", "uint8", "int8", "int4", "PER_CHANNEL",
                       "PER_TENSOR", "Conv", "Relu", "min", "max", "-1", "1e400", "nan"])
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

CONFIG_DOCUMENTS = [json.loads(p.read_text()) for p in sorted((FIXTURES / "configs").glob("*.json"))]
ENCODINGS_DOCUMENTS = [
    json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*/model.encodings"))
] + [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("mobilenet_v2_digits/*/model.encodings"))][:1]


def _paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as a tuple of keys/indices."""
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document[:6]):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, documents: list[Any]) -> Any:
    """A real document with one to three locations replaced by arbitrary JSON, deleted, or emptied."""
    document = copy.deepcopy(draw(st.sampled_from(documents)))
    for _ in range(draw(st.integers(1, 3))):
        locations = _paths(document)
        path = draw(st.sampled_from(locations))
        if not path:
            document = draw(json_values)
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "empty"]))
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values) if action == "replace" else type(parent[path[-1]])()
    return document


_SCRATCH = tempfile.TemporaryDirectory(prefix="edgequant-fuzz-")  # removed when the test process ends


def _write(document: Any) -> Path:
    """The document as a file; every example overwrites the same one (hypothesis runs thousands)."""
    path = Path(_SCRATCH.name) / "document.json"
    path.write_text(json.dumps(document))
    return path


# -- hardware configs ----------------------------------------------------------------------------------------------
def _config_outcome(document: Any) -> None:
    try:
        config = HardwareConfig.load(document) if isinstance(document, dict) else HardwareConfig.load(_write(document))
    except ConfigError as error:
        assert str(error) and "\n" not in str(error).strip()  # one clear line
        return
    for op_type in ("Conv", "Relu", "Gemm", "Add"):  # a config that loads answers every question
        for rule in (config.output_rule(op_type), config.input_rule(op_type), config.param_rule(op_type, "weight")):
            assert rule.bitwidth is None or 2 <= rule.bitwidth <= 32


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_config_reader_on_arbitrary_dicts(document: dict) -> None:
    _config_outcome(document)


@FUZZ
@given(mutated(CONFIG_DOCUMENTS + [HardwareConfig.load(name).raw for name in HardwareConfig.preset_names()]))
def test_config_reader_on_mutated_presets_and_aimet_configs(document: Any) -> None:
    _config_outcome(document)


@FUZZ
@given(json_values)
def test_config_file_with_any_json_content(document: Any) -> None:
    _config_outcome(document)  # written to a file: non-objects must be refused too


FLAGS = st.booleans() | st.sampled_from(["True", "False"])  # the reader takes both; AIMET writes the strings
RULE_OP_TYPES = ("Conv", "Gemm", "Relu", "Add")


def _flag(value: bool | str) -> bool:
    return value if isinstance(value, bool) else value == "True"


@st.composite
def config_documents(draw: st.DrawFn) -> dict:
    """A valid quantsim config setting any subset of the flags that decide a rule, at every level that can."""
    def some(keys: tuple[str, ...]) -> dict:
        return draw(st.fixed_dictionaries({}, optional={k: FLAGS for k in keys}))

    defaults: dict[str, Any] = {"ops": some(("is_output_quantized", "is_input_quantized", "is_symmetric")),
                                "params": some(("is_quantized", "is_symmetric"))}
    defaults.update(draw(st.fixed_dictionaries({}, optional={"per_channel_quantization": FLAGS})))
    document: dict[str, Any] = {"defaults": defaults, "params": {"weight": some(("is_quantized", "is_symmetric"))}}
    op_types = {}
    for op_type in draw(st.lists(st.sampled_from(RULE_OP_TYPES), unique=True, max_size=3)):
        entry = some(("is_output_quantized", "is_input_quantized", "is_symmetric", "per_channel_quantization"))
        if draw(st.booleans()):
            entry["params"] = {"weight": some(("is_quantized", "is_symmetric"))}
        if draw(st.booleans()):
            low = draw(st.floats(-100, 99, allow_nan=False))
            entry["encoding_constraints"] = {"min": low, "max": low + draw(st.floats(0.5, 100))}
        if draw(st.booleans()):
            entry["supported_kernels"] = [{role: {"bitwidth": draw(st.sampled_from((4, 8, 16))), "dtype": "int"}
                                           for role in ("activation", "param")}]
        op_types[op_type] = entry
    document["op_type"] = op_types
    return document


def _expected_rules(document: dict, op_type: str) -> tuple:
    """(output, input, weight) rules as the document says: the op's own setting, else the defaults, else AIMET's
    defaults (activations unquantized and asymmetric, params quantized and symmetric, per tensor)."""
    defaults, op = document["defaults"], document["op_type"].get(op_type, {})

    def pick(key: str, *levels: dict, fallback: bool) -> bool:
        return next((_flag(level[key]) for level in levels if key in level), fallback)

    kernel = op.get("supported_kernels", [{}])[0]
    bits = {role: kernel[role]["bitwidth"] if role in kernel else None for role in ("activation", "param")}
    low, high = (op["encoding_constraints"][k] if "encoding_constraints" in op else None for k in ("min", "max"))
    symmetric = pick("is_symmetric", op, defaults["ops"], fallback=False)
    output = TensorRule(pick("is_output_quantized", op, defaults["ops"], fallback=False), symmetric, PerTensor(),
                        bits["activation"], low, high)
    inputs = TensorRule(pick("is_input_quantized", op, defaults["ops"], fallback=False), symmetric, PerTensor(),
                        bits["activation"])
    weight_levels = (op.get("params", {}).get("weight", {}), document["params"]["weight"], defaults["params"])
    weight = TensorRule(pick("is_quantized", *weight_levels, fallback=True),
                        pick("is_symmetric", *weight_levels, fallback=True),
                        PerChannel() if pick("per_channel_quantization", op, defaults, fallback=False) else PerTensor(),
                        bits["param"])
    return output, inputs, weight


def _rules(config: HardwareConfig, op_type: str) -> tuple:
    return config.output_rule(op_type), config.input_rule(op_type), config.param_rule(op_type, "weight")


@ROUND_TRIP
@given(config_documents())
def test_a_config_reads_as_written_and_its_raw_document_reads_back_the_same(document: dict) -> None:
    config = HardwareConfig.load(document)
    again = HardwareConfig.load(_write(config.raw))  # the raw document, through a file
    assert json.dumps(again.raw, sort_keys=True) == json.dumps(document, sort_keys=True)
    for op_type in (*RULE_OP_TYPES, "Sigmoid"):  # Sigmoid: never in the op_type table, only the defaults apply
        assert _rules(config, op_type) == _rules(again, op_type) == _expected_rules(document, op_type), op_type


@ROUND_TRIP
@given(mutated(CONFIG_DOCUMENTS + [HardwareConfig.load(name).raw for name in HardwareConfig.preset_names()]))
def test_a_mutated_config_that_loads_reads_back_the_same_from_its_raw_document(document: Any) -> None:
    if not isinstance(document, dict):
        return
    try:
        config = HardwareConfig.load(document)
    except ConfigError:
        return
    again = HardwareConfig.load(_write(config.raw))
    for op_type in (*RULE_OP_TYPES, "Sigmoid", "BatchNormalization", "MatMul"):
        assert _rules(config, op_type) == _rules(again, op_type), op_type
    assert (again.supergroups, again.model_input_quantized, again.model_output_quantized) == (
        config.supergroups, config.model_input_quantized, config.model_output_quantized)


def test_unknown_op_type_names_it_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"op_type\.Covn: unknown op type \"Covn\".*\"Conv\""):
        HardwareConfig.load({"defaults": {}, "op_type": {"Covn": {"is_output_quantized": "False"}}})
    with pytest.raises(ConfigError, match=r"supergroups\[0\]\.op_list\[1\].*\"relu\".*\"Relu\""):
        HardwareConfig.load({"defaults": {}, "supergroups": [{"op_list": ["Conv", "relu"]}]})
    for document in CONFIG_DOCUMENTS:  # AIMET's own configs use AIMET-only names too (ChannelShuffle)
        HardwareConfig.load(document)

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    config = {"defaults": {}, "op_type": {"FuzzScale": {"is_output_quantized": "False"}}}
    with pytest.raises(ConfigError, match="FuzzScale"):
        HardwareConfig.load(config)
    eq.register_module(Scale, "FuzzScale")  # a registered module's op type becomes valid
    assert not HardwareConfig.load(config).output_rule("FuzzScale").quantized


# -- encodings files -----------------------------------------------------------------------------------------------
def _encodings_outcome(document: Any) -> None:
    path = _write(document)
    try:
        version, entries = read_encodings(path)
    except EncodingsFileError as error:
        assert str(path) in str(error) and "\n" not in str(error).strip()
        return
    assert version in ("0.6.1", "1.0.0", "2.0.0")
    for entry in entries:
        assert isinstance(entry.name, str)
        encoding = entry.encoding
        assert torch.isfinite(encoding.scale).all() and (encoding.scale > 0).all()
        assert torch.isfinite(encoding.offset).all() and 2 <= encoding.bitwidth <= 32


def _encodings_documents(version: str) -> st.SearchStrategy:
    tensor_name = st.text(max_size=6) | scalars
    if version == "0.6.1":
        channel = st.fixed_dictionaries(
            {"bitwidth": scalars, "dtype": scalars, "is_symmetric": scalars, "scale": scalars, "offset": scalars},
            optional={"min": scalars, "max": scalars},
        )
        section = st.dictionaries(st.text(max_size=6), st.lists(channel, max_size=3) | json_values, max_size=3)
    elif version == "1.0.0":
        entry = st.fixed_dictionaries(
            {"name": tensor_name, "dtype": scalars, "bw": scalars, "is_sym": scalars,
             "scale": st.lists(scalars, max_size=3) | scalars, "offset": st.lists(scalars, max_size=3) | scalars},
            optional={"enc_type": scalars},
        )
        section = st.lists(entry | json_values, max_size=3)
    else:
        entry = st.fixed_dictionaries(
            {"name": tensor_name, "output_dtype": scalars, "y_scale": st.lists(scalars, max_size=3) | scalars},
            optional={"y_zero_point": st.lists(scalars, max_size=3) | scalars, "axis": scalars,
                      "block_size": scalars},
        )
        return st.fixed_dictionaries({"version": st.just(version), "encodings": st.lists(entry | json_values,
                                                                                          max_size=3)})
    return st.fixed_dictionaries(
        {"version": st.just(version), "activation_encodings": section, "param_encodings": section}
    )


@FUZZ
@given(st.sampled_from(["0.6.1", "1.0.0", "2.0.0"]).flatmap(_encodings_documents))
def test_encodings_reader_on_generated_entries(document: dict) -> None:
    _encodings_outcome(document)


@FUZZ
@given(mutated(ENCODINGS_DOCUMENTS))
def test_encodings_reader_on_mutated_aimet_files(document: Any) -> None:
    _encodings_outcome(document)


@FUZZ
@given(json_values)
def test_encodings_reader_on_any_json(document: Any) -> None:
    _encodings_outcome(document)


def test_encodings_reader_on_bytes_that_are_not_json(tmp_path: Path) -> None:
    path = tmp_path / "model.encodings"
    path.write_bytes(b"\xff\xfe{not json")
    with pytest.raises(EncodingsFileError, match="model.encodings"):
        read_encodings(path)


# -- encodings files: round trips ---------------------------------------------------------------------------------
# Scales and offsets come back exactly, bit for bit, in every format: a scale is a float32 value, written as the
# shortest decimal that reads back as the same double (json), so its float32 is the value written; offsets and
# zero points are integers. What a format cannot hold is stated in `_as_stored`.
BITWIDTHS = (4, 8, 16)
float32_scales = st.floats(2.0**-40, 2.0**20, width=32, allow_subnormal=False)  # any scale a calibration gives


@st.composite
def valid_encodings(draw: st.DrawFn) -> Encoding:
    """Per tensor, or per channel on any axis; symmetric (offset -2**(b-1)) or asymmetric (any offset that keeps
    zero on the grid: -(2**b - 1)..0)."""
    bitwidth = draw(st.sampled_from(BITWIDTHS))
    symmetric = draw(st.booleans())
    channels = draw(st.none() | st.integers(1, 4))
    count = channels or 1
    scales = draw(st.lists(float32_scales, min_size=count, max_size=count))
    offsets = [-(2 ** (bitwidth - 1))] * count if symmetric else draw(
        st.lists(st.integers(-(2**bitwidth - 1), 0), min_size=count, max_size=count))
    if channels is None:
        return Encoding(torch.tensor(scales[0]), torch.tensor(float(offsets[0])), bitwidth, symmetric)
    return Encoding(torch.tensor(scales), torch.tensor(offsets, dtype=torch.float32), bitwidth, symmetric,
                    draw(st.integers(0, 3)))


@st.composite
def valid_entries(draw: st.DrawFn) -> list[TensorEncoding]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4, unique=True))
    return [TensorEncoding(name, draw(valid_encodings()), draw(st.booleans())) for name in names]


def _as_stored(entry: TensorEncoding, version: str) -> TensorEncoding:
    """What ``version`` holds of an entry: 2.0.0 does not say param or activation; 0.6.1 and 1.0.0 store no axis
    (per-channel reads back on axis 0, which the loader replaces by the quantizer's), and 0.6.1 marks per-channel
    only by listing more than one channel, so one channel reads back per tensor."""
    encoding = entry.encoding
    if version == "2.0.0":
        return TensorEncoding(entry.name, encoding, None)
    scale, offset, axis = encoding.scale, encoding.offset, None if encoding.axis is None else 0
    if version == "0.6.1" and axis is not None and scale.numel() == 1:
        scale, offset, axis = scale.reshape(()), offset.reshape(()), None
    return TensorEncoding(entry.name, Encoding(scale, offset, encoding.bitwidth, encoding.symmetric, axis),
                          bool(entry.is_param))


def _assert_same(read: list[TensorEncoding], expected: list[TensorEncoding]) -> None:
    assert sorted(e.name for e in read) == sorted(e.name for e in expected)
    by_name = {e.name: e for e in read}
    for want in expected:
        got = by_name[want.name]
        assert got.encoding.equals(want.encoding), (want.name, got.encoding.to_dict(), want.encoding.to_dict())
        assert got.is_param == want.is_param, want.name


def _scratch(name: str) -> Path:
    return Path(_SCRATCH.name) / name


@ROUND_TRIP
@given(valid_entries(), st.sampled_from(SUPPORTED_VERSIONS))
def test_valid_encodings_survive_write_then_read(entries: list[TensorEncoding], version: str) -> None:
    read_version, read = read_encodings(write_encodings(entries, _scratch("written.encodings"), version))
    assert read_version == version
    _assert_same(read, [_as_stored(e, version) for e in entries])
    for entry in read:  # and Encoding's own dict form (the CLI's and reports' JSON)
        assert Encoding.from_dict(entry.encoding.to_dict()).equals(entry.encoding)


@ROUND_TRIP
@given(valid_entries(), st.sampled_from(SUPPORTED_VERSIONS), st.sampled_from(SUPPORTED_VERSIONS))
def test_read_write_read_is_stable_within_and_across_versions(entries: list[TensorEncoding], first: str,
                                                              second: str) -> None:
    first_path = write_encodings(entries, _scratch("first.encodings"), first)
    _, once = read_encodings(first_path)
    second_path = write_encodings(once, _scratch("second.encodings"), second)
    _, twice = read_encodings(second_path)
    _assert_same(twice, [_as_stored(e, second) for e in once])
    if first == second:  # the document itself is a fixed point once read
        assert json.loads(second_path.read_text()) == json.loads(first_path.read_text())


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_aimets_files_read_write_read_unchanged(version: str) -> None:
    paths = sorted(FIXTURES.glob("*/model.encodings")) + sorted(FIXTURES.glob("mobilenet_v2_digits/*/model.encodings"))
    assert len(paths) >= 7
    for path in paths:
        _, once = read_encodings(path)
        _, twice = read_encodings(write_encodings(once, _scratch("aimet.encodings"), version))
        _assert_same(twice, [_as_stored(e, version) for e in once])


@st.composite
def onnx_entries(draw: st.DrawFn) -> dict:
    """A hand-written 2.0.0 entry in ONNX terms: x = (v - y_zero_point) * y_scale for v of ``output_dtype``."""
    bitwidth, signed = draw(st.sampled_from(BITWIDTHS)), draw(st.booleans())
    low, high = (-(2 ** (bitwidth - 1)), 2 ** (bitwidth - 1) - 1) if signed else (0, 2**bitwidth - 1)
    channels = draw(st.none() | st.integers(1, 4))
    count = channels or 1
    scales = draw(st.lists(float32_scales, min_size=count, max_size=count))
    zero_points = draw(st.lists(st.integers(low, high), min_size=count, max_size=count))
    entry: dict[str, Any] = {"name": "t", "output_dtype": f"{'int' if signed else 'uint'}{bitwidth}",
                             "y_scale": scales if channels else scales[0]}
    if any(zero_points) or draw(st.booleans()):  # AIMET omits a zero point of 0; written out it means the same
        entry["y_zero_point"] = zero_points if channels else zero_points[0]
    if channels:
        entry["axis"] = draw(st.integers(0, 3))
    return entry


@ROUND_TRIP
@given(onnx_entries())
def test_a_2_0_0_entry_reads_as_onnx_defines_it(entry: dict) -> None:
    signed = entry["output_dtype"].startswith("int")
    bitwidth = int(entry["output_dtype"].removeprefix("u").removeprefix("int"))
    scales = entry["y_scale"] if isinstance(entry["y_scale"], list) else [entry["y_scale"]]
    zero_points = entry.get("y_zero_point", [0] * len(scales))
    zero_points = zero_points if isinstance(zero_points, list) else [zero_points]
    _, (read,) = read_encodings(_write({"version": "2.0.0", "encodings": [entry]}))
    encoding = read.encoding
    assert encoding.scale.reshape(-1).tolist() == scales and encoding.bitwidth == bitwidth
    assert encoding.axis == entry.get("axis")
    # our grid index q = 0 is ONNX's lowest value v of the dtype, so x = (q + offset) * s must be (v - zp) * s
    lowest = -(2 ** (bitwidth - 1)) if signed else 0
    assert encoding.offset.reshape(-1).tolist() == [lowest - zp for zp in zero_points]
    assert encoding.symmetric == (signed and not any(zero_points))
    # exported again: a signed grid around zero stays signed with zero point 0, any other becomes unsigned
    assert encoding.onnx_zero_point.reshape(-1).tolist() == (zero_points if signed and not any(zero_points) else
                                                            [zp - lowest for zp in zero_points])


@ROUND_TRIP
@given(valid_encodings(), st.sampled_from(["0.6.1", "1.0.0"]))
def test_an_aimet_entry_reads_with_its_scale_and_offset_as_written(encoding: Encoding, version: str) -> None:
    scales, offsets = encoding.scale.reshape(-1).tolist(), [int(o) for o in encoding.offset.reshape(-1).tolist()]
    flag = "True" if encoding.symmetric else "False"
    if version == "0.6.1":  # min/max only informative: edgequant reads scale and offset
        section: Any = {"t": [{"min": 0.0, "max": 1.0, "scale": s, "offset": o, "bitwidth": encoding.bitwidth,
                               "dtype": "int", "is_symmetric": flag} for s, o in zip(scales, offsets, strict=True)]}
    else:
        section = [{"name": "t", "dtype": "INT", "bw": encoding.bitwidth, "is_sym": encoding.symmetric,
                    "scale": scales, "offset": offsets,
                    "enc_type": "PER_TENSOR" if encoding.axis is None else "PER_CHANNEL"}]
    _, (read,) = read_encodings(_write({"version": version, "activation_encodings": section, "param_encodings": {}
                                        if version == "0.6.1" else []}))
    assert read.encoding.scale.reshape(-1).tolist() == scales and read.encoding.bitwidth == encoding.bitwidth
    assert read.encoding.offset.reshape(-1).tolist() == offsets and read.encoding.symmetric == encoding.symmetric
    assert read.is_param is False


# -- encodings from a range ----------------------------------------------------------------------------------------
def test_from_range_refuses_min_above_max() -> None:
    with pytest.raises(ValueError, match=r"min 1\.0 > max -1\.0"):
        Encoding.from_range(1.0, -1.0, 8, symmetric=False)
    with pytest.raises(ValueError, match="channel 1"):
        Encoding.from_range(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), 8, False, granularity=PerChannel(0))
    with pytest.raises(ValueError, match="finite"):
        Encoding.from_range(float("nan"), 1.0, 8, False)


@FUZZ
@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.integers(2, 16), st.booleans())
def test_from_range_covers_the_range(low: float, high: float, bitwidth: int, symmetric: bool) -> None:
    if torch.tensor(low) > torch.tensor(high):  # as the float32 bounds from_range compares
        with pytest.raises(ValueError, match="min .* > max"):
            Encoding.from_range(low, high, bitwidth, symmetric)
        return
    encoding = Encoding.from_range(low, high, bitwidth, symmetric)
    step = float(encoding.scale)
    assert step > 0 and math.isfinite(step)
    assert float(encoding.min) <= min(low, 0.0) + step and float(encoding.max) >= max(high, 0.0) - step


# -- input_spec.json -----------------------------------------------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)


@ROUND_TRIP
@given(st.builds(
    InputSpec,
    shape=st.none() | st.lists(st.integers(1, 4096), min_size=1, max_size=5),
    dtype=st.sampled_from(["float32", "float16", "int64"]), layout=st.sampled_from(["NCHW", "NHWC"]),
    mean=st.lists(finite, min_size=1, max_size=4), std=st.lists(finite.filter(bool), min_size=1, max_size=4),
    batch_size=st.integers(1, 2**20), fold_bn=st.booleans(),
))
def test_input_spec_reads_back_what_quantize_recorded(spec: InputSpec) -> None:
    folder = Path(_SCRATCH.name)
    spec.save(folder)
    assert InputSpec.beside(folder / "sim_state.pt") == spec  # floats exactly: json writes round-trip decimals
