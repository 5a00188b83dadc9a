"""Per-block and LPBQ weights through export: blocked DequantizeLinear that ONNX Runtime runs to the sim's weights
bit for bit, AIMET encodings (1.0.0 PER_BLOCK/LPBQ, 2.0.0 block_size/per_block_int_scale) written, read by hand and
loaded back into a sim that then computes what the exported one did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from references import assert_within_grid_steps
from torch import nn

from edgequant import QuantSim
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import EncodingsFileError, read_encodings
from edgequant.export.encodings_io import TensorEncoding, encodings_document
from edgequant.quantization import Encoding, Lpbq, PerBlock, PerChannel


def _digits_sim(images: torch.Tensor) -> QuantSim:
    """The digits CNN at 4-bit weights: conv2 per block of 8 input channels, conv3 LPBQ (blocks of 8, int8 channel
    grid), fc per block of 16; conv1 (one input channel) stays per channel."""
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, config="per_channel")
    sim.set_granularity("conv2.0", PerBlock(8))
    sim.set_granularity("conv3.0", Lpbq(8, decompressed_bw=8))
    sim.set_granularity("fc", PerBlock(16))
    sim.compute_encodings(lambda model: model(images[:64]))
    return sim


BLOCKED = {"conv2.0.weight": PerBlock(8, 0, 1), "conv3.0.weight": Lpbq(8, 0, 1, decompressed_bw=8),
           "fc.weight": PerBlock(16, 0, 1)}


def _dequantized_weights(path: Path, tensors: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime's output of each weight's DequantizeLinear (graph optimisations off, so nothing is fused)."""
    model = onnx.load(path)
    outputs = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].removesuffix("_quantized") in tensors:
            outputs[node.input[0].removesuffix("_quantized")] = node.output[0]
            model.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(outputs.values())
    values = session.run(names, {"input": np.zeros((1, 1, 8, 8), dtype=np.float32)})
    by_output = dict(zip(names, values, strict=True))
    return {tensor: by_output[output] for tensor, output in outputs.items()}


def test_onnx_runtime_dequantizes_blocked_weights_as_the_sim_and_runs_the_model(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = _digits_sim(images)
    result = sim.export(tmp_path, images[:1])
    assert result.opset == 21  # DequantizeLinear's block_size
    qdq = onnx.load(result.qdq_model)
    initializers = {i.name: i for i in qdq.graph.initializer}
    conv2 = next(n for n in qdq.graph.node if n.input[:1] == ["conv2.0.weight_quantized"])
    assert {a.name: a.i for a in conv2.attribute} == {"axis": 1, "block_size": 8}
    assert list(initializers[conv2.input[1]].dims) == [32, 2, 3, 3]  # ONNX: the tensor's shape, blocks on axis 1
    assert initializers["conv2.0.weight_quantized"].data_type == TensorProto.INT4
    conv3 = next(n for n in qdq.graph.node if n.input[:1] == ["conv3.0.weight_quantized"])
    assert len(conv3.input) == 2 and conv3.input[1] not in initializers  # LPBQ: no float block scales stored
    conv3_scale = next(n for n in qdq.graph.node if n.output[0] == conv3.input[1])
    multipliers, channel_scale = (numpy_helper.to_array(initializers[name]) for name in conv3_scale.input)
    assert conv3_scale.op_type == "DequantizeLinear" and {a.name: a.i for a in conv3_scale.attribute} == {"axis": 0}
    assert multipliers.dtype == np.uint8 and multipliers.shape == (32, 4, 3, 3) and channel_scale.shape == (32,)
    assert multipliers.min() >= 1 and multipliers.max() == 16  # each channel's widest block is 16 x its scale
    dequantized = _dequantized_weights(result.qdq_model, [*BLOCKED, "conv1.0.weight"])
    for tensor, values in dequantized.items():  # 0 LSB: the runtime's weights are the sim's
        layer = tensor.removesuffix(".weight")
        quantizer = sim.quantizer(f"{layer}.param_quantizers.weight")
        assert quantizer.granularity == BLOCKED.get(tensor, PerChannel(0))
        with torch.no_grad():
            np.testing.assert_array_equal(values, quantizer(sim.model.get_submodule(layer).weight).numpy(), tensor)
    session = ort.InferenceSession(str(result.qdq_model), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": images[:256].numpy()})
    with torch.no_grad():
        expected = sim.model(images[:256])
    # float convolutions on either side: a value within rounding of a grid midpoint may land one step away
    assert_within_grid_steps(output, expected, sim.quantizer("fc.output_quantizers.0").scale, max_steps=1,
                             max_share=0.005)


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_blocked_encodings_load_back_bit_exact(tmp_path: Path, version: str) -> None:
    images, _ = load_digits_tensors("test")
    sim = _digits_sim(images)
    result = sim.export(tmp_path, images[:1], encoding_version=version)
    fresh = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, config="per_channel")
    fresh.load_encodings(result.encodings)
    for tensor, granularity in BLOCKED.items():
        name = f"{tensor.removesuffix('.weight')}.param_quantizers.weight"
        loaded, original = fresh.quantizer(name), sim.quantizer(name)
        assert loaded.granularity == granularity and loaded.encoding.equals(original.encoding), name
    with torch.no_grad():
        assert torch.equal(fresh.model(images[:128]), sim.model(images[:128]))


def test_aimet_fields_of_blocked_entries(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = _digits_sim(images)
    lpbq = sim.quantizer("conv3.0.param_quantizers.weight")
    granularity = lpbq.granularity
    channel_scale, multipliers = granularity.channel_scale(lpbq.scale, 4), granularity.multipliers(lpbq.scale, 4)
    old = {e["name"]: e for e in json.loads(sim.export(tmp_path / "v1", images[:1]).encodings.read_text())[
        "param_encodings"]}
    entry = old["conv3.0.weight"]
    assert set(entry) == {"name", "dtype", "enc_type", "bw", "compressed_bw", "is_sym", "block_size", "scale",
                          "offset", "per_block_int_scale"}
    assert (entry["enc_type"], entry["bw"], entry["compressed_bw"], entry["block_size"]) == ("LPBQ", 8, 4, 8)
    assert entry["offset"] == [-128] * 32 and entry["scale"] == channel_scale.reshape(-1).tolist()
    assert entry["per_block_int_scale"] == multipliers.reshape(32, 4).long().reshape(-1).tolist()  # (channel, block)
    assert set(entry["per_block_int_scale"]) <= set(range(1, 17)) and 16 in entry["per_block_int_scale"]
    assert old["fc.weight"]["enc_type"] == "PER_BLOCK" and old["fc.weight"]["block_size"] == 16
    assert len(old["fc.weight"]["scale"]) == 10 * 2
    new = {e["name"]: e for e in json.loads(sim.export(tmp_path / "v2", images[:1], encoding_version="2.0.0")
                                            .encodings.read_text())["encodings"]}
    assert set(new["conv3.0.weight"]) == {"name", "output_dtype", "per_channel_float_scale", "per_block_int_scale",
                                          "axis", "block_size"}
    assert np.shape(new["conv3.0.weight"]["per_channel_float_scale"]) == (32, 1, 1, 1)
    assert np.shape(new["conv3.0.weight"]["per_block_int_scale"]) == (32, 4, 1, 1)
    conv2 = new["conv2.0.weight"]
    assert (conv2["output_dtype"], conv2["axis"], conv2["block_size"], np.shape(conv2["y_scale"])) == (
        "int4", 1, 8, (32, 2, 1, 1))
    assert "y_zero_point" not in conv2


def test_hand_written_blocked_entries_read_as_stated(tmp_path: Path) -> None:
    """A (2, 4) weight in blocks of 2: per-block scales stated directly, and LPBQ scales as per-channel scale x
    integer (channel 0: 0.5 x [4, 1], channel 1: 0.25 x [16, 3])."""
    path = tmp_path / "blocked.encodings"
    path.write_text(json.dumps({"version": "1.0.0", "activation_encodings": [], "param_encodings": [
        {"name": "a.weight", "dtype": "INT", "enc_type": "PER_BLOCK", "bw": 4, "is_sym": False, "block_size": 2,
         "scale": [0.5, 0.25, 1.0, 2.0], "offset": [-8, -3, 0, -15]},
        {"name": "b.weight", "dtype": "INT", "enc_type": "LPBQ", "bw": 8, "compressed_bw": 4, "is_sym": True,
         "block_size": 2, "scale": [0.5, 0.25], "offset": [-128, -128], "per_block_int_scale": [4, 1, 16, 3]}]}))
    _, (per_block, lpbq) = read_encodings(path)
    assert per_block.encoding.granularity == PerBlock(2) and not per_block.encoding.symmetric
    assert per_block.encoding.scale.tolist() == [0.5, 0.25, 1.0, 2.0]  # flat (channel, block): laid out on loading
    assert per_block.encoding.offset.tolist() == [-8.0, -3.0, 0.0, -15.0]
    assert lpbq.encoding.granularity == Lpbq(2, decompressed_bw=8) and lpbq.encoding.bitwidth == 4
    assert lpbq.encoding.scale.tolist() == [2.0, 0.5, 4.0, 0.75] and lpbq.encoding.offset.tolist() == [-8.0] * 4
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [
        {"name": "a.weight", "output_dtype": "uint4", "y_scale": [[0.5, 0.25], [1.0, 2.0]],
         "y_zero_point": [[8, 3], [0, 15]], "axis": 1, "block_size": 2},
        {"name": "b.weight", "output_dtype": "int4", "per_channel_float_scale": [[0.5], [0.25]],
         "per_block_int_scale": [[4, 1], [16, 3]], "axis": 1, "block_size": 2}]}))
    _, (per_block, lpbq) = read_encodings(path)
    assert per_block.encoding.granularity == PerBlock(2, None, 1)  # the channel axis is the layer's
    assert per_block.encoding.scale.tolist() == [[0.5, 0.25], [1.0, 2.0]]
    assert per_block.encoding.offset.tolist() == [[-8.0, -3.0], [0.0, -15.0]]
    assert lpbq.encoding.granularity == Lpbq(2, None, 1, decompressed_bw=8)  # 2.0.0: twice the bitwidth
    assert lpbq.encoding.scale.tolist() == [[2.0, 0.5], [4.0, 0.75]]
    # loaded into a sim, the entries come out on the Linear's axes and quantize its weight with those scales
    sim = QuantSim(nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False)), torch.randn(1, 4),
                   param_bw=4)
    renamed = path.read_text().replace('"a.weight"', '"0.weight"').replace('"b.weight"', '"1.weight"')
    path.write_text(renamed)
    with pytest.raises(ValueError, match=r"'1\.weight' \(LPBQ\(2 on axis 1, channels on axis 0\).*\) does not fit"):
        sim.load_encodings(path)  # the second Linear's weight is (4, 2): one block per row, not two
    first = json.loads(renamed)
    first["encodings"] = first["encodings"][:1]
    path.write_text(json.dumps(first))
    with pytest.warns(UserWarning, match="have no encoding"):  # the sim is not calibrated
        sim.load_encodings(path, strict=False)
    quantizer = sim.quantizer("0.param_quantizers.weight")
    assert quantizer.granularity == PerBlock(2, 0, 1) and quantizer.scale.tolist() == [[0.5, 0.25], [1.0, 2.0]]
    weight = torch.tensor([[1.0, -4.0, 0.3, 0.6], [5.0, 20.0, -9.0, 31.0]])
    # steps 0.5 from -4 (offset -8): 1 -> 1, -4 -> -4; 0.25 from -0.75: 0.3 -> 0.25 (1.2), 0.6 -> 0.5 (2.4);
    # steps 1 in [0, 15]: 5 -> 5, 20 -> 15; steps 2 in [-30, 0]: -9 -> -8 (-4.5 -> -4), 31 -> 0
    assert quantizer(weight).tolist() == [[1.0, -4.0, 0.25, 0.5], [5.0, 15.0, -8.0, 0.0]]


def test_blocked_entries_that_a_format_cannot_state_are_refused(tmp_path: Path) -> None:
    blocked = Encoding(torch.full((2, 2), 0.5), torch.full((2, 2), -8.0), 4, True, PerBlock(2, 0, 1))
    with pytest.raises(ValueError, match="'w' is quantized per-block.*version 0.6.1 cannot state"):
        encodings_document([TensorEncoding("w", blocked, True)], "0.6.1")
    lpbq = Encoding(torch.full((2, 2), 0.5), torch.full((2, 2), -8.0), 4, True, Lpbq(2, 0, 1, decompressed_bw=6))
    with pytest.raises(ValueError, match="2.0.0 states LPBQ only with decompressed_bw twice the bitwidth"):
        encodings_document([TensorEncoding("w", lpbq, True)], "2.0.0")
    assert encodings_document([TensorEncoding("w", lpbq, True)], "1.0.0")["param_encodings"][0]["bw"] == 6
    path = tmp_path / "bad.encodings"
    entry = {"name": "w", "dtype": "INT", "enc_type": "LPBQ", "bw": 8, "compressed_bw": 4, "is_sym": True,
             "block_size": 2, "scale": [0.5], "offset": [-128], "per_block_int_scale": [17, 1]}
    path.write_text(json.dumps({"version": "1.0.0", "param_encodings": [entry]}))
    with pytest.raises(EncodingsFileError, match=r"'per_block_int_scale' must hold integers in \[1, 16\]"):
        read_encodings(path)
    path.write_text(json.dumps({"version": "1.0.0", "param_encodings": [
        dict(entry, scale=[0.5, 0.5], offset=[-128, -128], per_block_int_scale=[1, 2, 3])]}))
    with pytest.raises(EncodingsFileError, match="3 'per_block_int_scale' values do not divide into 2 channels"):
        read_encodings(path)
    path.write_text(json.dumps({"version": "1.0.0", "param_encodings": [dict(entry, compressed_bw=8)]}))
    with pytest.raises(EncodingsFileError, match="LPBQ needs a bitwidth below decompressed_bw=8, got 8"):
        read_encodings(path)
    with pytest.raises(ValueError, match="opset 21"):
        sim = _digits_sim(load_digits_tensors("test")[0])
        sim.export(tmp_path, opset=17)


def test_per_block_weights_list_their_int32_bias_grid_and_keep_the_bias_float(tmp_path: Path) -> None:
    """A blocked layer's 2.0.0 file lists the int32 bias grid AIMET 2.42 writes (s_x times the channel's largest
    block scale); the sim, not asked to quantize the bias, keeps it float in the QDQ model."""
    images, _ = load_digits_tensors("test")
    sim = _digits_sim(images)
    new = json.loads(sim.export(tmp_path, images[:1], encoding_version="2.0.0").encodings.read_text())["encodings"]
    bias = next(e for e in new if e["name"] == "fc.bias")
    assert bias["output_dtype"] == "int32" and len(bias["y_scale"]) == 10
    initializers = {i.name: i for i in onnx.load(tmp_path / "model_qdq.onnx").graph.initializer}
    assert initializers["fc.bias"].data_type == TensorProto.FLOAT
