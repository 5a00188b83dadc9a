"""Property-based tests of the file readers: whatever JSON a user hands edgequant as a hardware config or an
encodings file, the reader returns a result or raises its own clear error (`ConfigError`, `EncodingsFileError`)
— never a TypeError/KeyError/IndexError from deep inside, and never an encoding with a NaN or non-positive scale."""

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
from edgequant.config import ConfigError, HardwareConfig
from edgequant.export import EncodingsFileError, read_encodings
from edgequant.quantization import Encoding

FUZZ = settings(
    max_examples=int(os.environ.get("EDGEQUANT_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
    derandomize="EDGEQUANT_FUZZ_EXAMPLES" not in os.environ,  # the suite: the same examples every run
    suppress_health_check=[HealthCheck.too_slow],
)
"""150 fixed examples per property in the suite; EDGEQUANT_FUZZ_EXAMPLES=5000 for a longer, random hunt."""

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


# -- encodings from a range ----------------------------------------------------------------------------------------
def test_from_range_refuses_min_above_max() -> None:
    with pytest.raises(ValueError, match=r"min 1\.0 > max -1\.0"):
        Encoding.from_range(1.0, -1.0, 8, symmetric=False)
    with pytest.raises(ValueError, match="channel 1"):
        Encoding.from_range(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), 8, False, axis=0)
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
