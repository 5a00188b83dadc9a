"""Int32 bias grids of blocked weights, as AIMET 2.42 states them in its 2.0.0 encodings
(tests/fixtures/aimet-2.42/per_block): input scale x the LPBQ weight's per-channel scale, or x the channel's largest
block scale for a per-block weight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from aimet_fixtures import FIXTURES, BlockModel
from onnx import numpy_helper

import edgequant as eq
from edgequant.export import quantize_bias_int32
from edgequant.export.bias import derived_bias_encoding
from edgequant.quantization import Encoding, Lpbq, PerBlock, PerChannel

PER_BLOCK = FIXTURES / "per_block"

# two output channels of two blocks; LPBQ 4 in 8 bits: channel scales [1/16, 1/32], multipliers [[16, 4], [16, 1]]
BLOCK_SCALES = torch.tensor([[1.0, 0.25], [0.5, 0.03125]])
INPUT = Encoding(torch.tensor(0.5), torch.tensor(0.0), 8, False)


def test_lpbq_bias_scale_is_input_scale_times_the_channel_scale() -> None:
    weight = Encoding(BLOCK_SCALES, torch.full((2, 2), -8.0), 4, True, Lpbq(64, 0, 1, decompressed_bw=8))
    bias = derived_bias_encoding(INPUT, weight)
    assert torch.equal(bias.scale, torch.tensor([0.5 / 16, 0.25 / 16]))  # 0.5 x [1/16, 1/32]
    assert bias.granularity == PerChannel(0) and bias.bitwidth == 32 and bias.signed


def test_per_block_bias_scale_is_input_scale_times_the_largest_block_scale() -> None:
    weight = Encoding(BLOCK_SCALES, torch.full((2, 2), -8.0), 4, True, PerBlock(64, 0, 1))
    assert torch.equal(derived_bias_encoding(INPUT, weight).scale, torch.tensor([0.5, 0.25]))  # 0.5 x [1, 0.5]


def _aimet_sim(kind: str) -> tuple[eq.QuantSim, torch.Tensor]:
    model = BlockModel()
    model.load_state_dict(torch.load(PER_BLOCK / "float_state_dict.pt", weights_only=True))
    inputs = torch.load(PER_BLOCK / "input.pt", weights_only=True)
    sim = eq.QuantSim(model.eval(), inputs[:1], config="per_channel")
    sim.load_encodings(PER_BLOCK / f"{kind}_2.0.0/model.encodings")
    return sim, inputs


@pytest.mark.parametrize("kind", ["per_block", "lpbq"])
def test_export_writes_aimets_int32_bias_entries(tmp_path: Path, kind: str) -> None:
    """AIMET's blocked encodings loaded and exported again as 2.0.0: every entry is AIMET's, the int32 bias grids
    of the (float) biases included."""
    sim, inputs = _aimet_sim(kind)
    ours = json.loads(sim.export(tmp_path, inputs[:1], encoding_version="2.0.0").encodings.read_text())
    aimets = json.loads((PER_BLOCK / f"{kind}_2.0.0/model.encodings").read_text())
    assert {e["name"]: e for e in ours["encodings"]} == {e["name"]: e for e in aimets["encodings"]}
    assert {e["name"] for e in ours["encodings"]} >= {"conv.bias", "fc.bias"}


@pytest.mark.parametrize("kind", ["per_block", "lpbq"])
def test_int32_biases_of_blocked_layers_are_aimets_and_run_in_onnx_runtime(tmp_path: Path, kind: str) -> None:
    """quantize_bias_int32 rounds each blocked layer's bias onto AIMET's grid (AIMET's ONNX holds the same rounded
    biases), and the QDQ export, an int32 DequantizeLinear per bias, gives the sim's outputs in ONNX Runtime."""
    sim, inputs = _aimet_sim(kind)
    assert quantize_bias_int32(sim) == ["conv.bias", "fc.bias"]
    aimet_graph = onnx.load(str(PER_BLOCK / f"{kind}_2.0.0/model.onnx")).graph
    aimet_biases = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in aimet_graph.initializer}
    for layer in ("conv", "fc"):
        module = sim.model.get_submodule(layer)
        with torch.no_grad():
            bias = sim.quantizer(f"{layer}.param_quantizers.bias")(module.bias)
        assert torch.equal(bias, aimet_biases[f"{layer}.bias"])
    with torch.no_grad():
        expected = sim.model(inputs).numpy()
    result = sim.export(tmp_path, inputs[:1], encoding_version="2.0.0")
    graph = onnx.load(str(result.qdq_model)).graph
    bias_types = {i.name: i.data_type for i in graph.initializer if i.name.endswith("bias_quantized")}
    assert bias_types == {"conv.bias_quantized": onnx.TensorProto.INT32, "fc.bias_quantized": onnx.TensorProto.INT32}
    session = ort.InferenceSession(str(result.qdq_model), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"input": inputs.numpy()})[0], expected)
