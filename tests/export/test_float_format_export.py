"""Export of float16 tensors: Cast to float16 and back in the QDQ model (ORT computes the sim's values bit for bit),
AIMET's float16 entries in the encodings file (written, read, loaded); bfloat16 has no entry (fp8: test_fp8_export)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.export import export_onnx, read_encodings, write_encodings
from edgequant.export.encodings_io import TensorEncoding
from edgequant.quantization import Encoding, FloatFormat

FLOAT16 = FloatFormat("float16")


def _exact_linear() -> tuple[nn.Module, torch.Tensor]:
    """A Linear whose products and sums are exact in float32 (small integers times sixteenths), so that any
    accumulation order gives the same float32 result and the float16 rounding after it is all that differs from
    float; biases near 65504 push some outputs into float16's overflow."""
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-64, 65, (8, 16), generator=generator) / 16)
        layer.bias.copy_(torch.tensor([0.0, 1.0, -3.0, 65500.0, -65500.0, 65480.0, 12.5, 1000.0]))
    inputs = torch.randint(-8, 9, (32, 16), generator=generator).float()
    return nn.Sequential(layer), inputs


def _float16_sim() -> tuple[eq.QuantSim, torch.Tensor]:
    model, inputs = _exact_linear()
    sim = eq.QuantSim(model, inputs[:1])
    sim.set_format("*", FLOAT16)
    sim.compute_encodings(lambda m: m(inputs))
    return sim, inputs


def test_float16_qdq_model_runs_in_ort_bit_for_bit(tmp_path: Path) -> None:
    sim, inputs = _float16_sim()
    result = export_onnx(sim, tmp_path, inputs[:1])
    qdq = onnx.load(result.qdq_model)
    casts = [n for n in qdq.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 * sum(q.enabled for q in sim.quantizers().values())
    assert not [n for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    session = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": inputs.numpy()})
    with torch.no_grad():
        expected = sim.model(inputs).numpy()
    assert np.isinf(expected).any() and (expected != expected.astype(np.float16).astype(np.float32)).sum() == 0
    assert np.array_equal(output, expected)  # inf included
    with torch.no_grad():  # and the float16 rounding is not a no-op here: float differs
        assert not np.array_equal(_exact_linear()[0](inputs).numpy(), expected)


def test_float16_encodings_entries_as_aimet_writes_them(tmp_path: Path) -> None:
    sim, inputs = _float16_sim()
    result = export_onnx(sim, tmp_path / "v1", inputs[:1])
    document = json.loads(result.encodings.read_text())
    entries = document["param_encodings"] + document["activation_encodings"]
    assert entries and all(e.keys() == {"name", "dtype", "bw", "enc_type"} for e in entries)
    assert {(e["dtype"], e["bw"], e["enc_type"]) for e in entries} == {("FLOAT", 16, "PER_TENSOR")}
    _, read = read_encodings(result.encodings)
    assert {entry.encoding for entry in read} == {FLOAT16}

    fresh = eq.QuantSim(_exact_linear()[0], inputs[:1])
    fresh.load_encodings(result.encodings)
    assert {q.number_format for q in fresh.quantizers().values() if q.enabled} == {FLOAT16}
    with torch.no_grad():
        assert torch.equal(fresh.model(inputs), sim.model(inputs))

    version_2 = export_onnx(sim, tmp_path / "v2", inputs[:1], encoding_version="2.0.0")
    assert json.loads(version_2.encodings.read_text())["encodings"] == []  # AIMET writes no 2.0.0 float16 entry


def test_float16_entries_in_0_6_1_and_mixed_with_integer_ones(tmp_path: Path) -> None:
    integer = Encoding(torch.tensor(0.5), torch.tensor(-128.0), 8, True)
    entries = [TensorEncoding("x", FLOAT16, False), TensorEncoding("w", integer, True)]
    path = write_encodings(entries, tmp_path / "a.encodings", "0.6.1")
    assert json.loads(path.read_text())["activation_encodings"]["x"] == [{"bitwidth": 16, "dtype": "float"}]
    _, read = read_encodings(path)
    assert read[0].encoding == FLOAT16 and read[1].encoding.equals(integer)
    bfloat16 = [TensorEncoding("x", FloatFormat("bfloat16"), False), TensorEncoding("w", integer, True)]
    for version in ("0.6.1", "1.0.0"):  # no bfloat16 form: left out, with a warning naming the tensor
        with pytest.warns(UserWarning, match="bfloat16"):
            written = write_encodings(bfloat16, tmp_path / f"b{version}", version)
        assert [entry.name for entry in read_encodings(written)[1]] == ["w"]
    written = write_encodings(bfloat16, tmp_path / "b2", "2.0.0")  # like float16, no entry in 2.0.0
    assert [entry.name for entry in read_encodings(written)[1]] == ["w"]
    bad = {"version": "1.0.0", "activation_encodings": [{"name": "x", "dtype": "FLOAT", "bw": 8}],
           "param_encodings": []}
    (tmp_path / "bad.encodings").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="entry \"x\": a float entry's 'bw' must be 16"):
        read_encodings(tmp_path / "bad.encodings")


