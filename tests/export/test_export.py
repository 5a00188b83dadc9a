"""ONNX export: the QDQ model loads in ONNX Runtime on every supported architecture, carries a Q/DQ pair for
every quantizer, and computes what the sim computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto
from references import assert_within_grid_steps

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx, quantize_bias_int32, runtime_cpu


def _run_qdq(path: Path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """ONNX Runtime's integer execution, with int8 weights as the same uint8 + 128 where this CPU's u8×s8
    kernels saturate (see `edgequant.export.runtime_cpu`)."""
    model = onnx.load(path)
    if runtime_cpu.u8s8_saturates():
        model, _ = runtime_cpu.with_unsigned_weights(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in feed.items()})


def _calibrated(model: torch.nn.Module, dummy: torch.Tensor, **options: object) -> eq.QuantSim:
    sim = eq.QuantSim(model, dummy[:1], **options)
    sim.compute_encodings(lambda m: m(dummy))
    return sim


def _encoding_names(path: Path) -> set[str]:
    document = json.loads(path.read_text())
    return {e["name"] for e in document["param_encodings"] + document["activation_encodings"]}


def test_digits_export_matches_sim_and_covers_every_quantizer(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = _calibrated(load_pretrained("digits_cnn"), images[:64])
    result = export_onnx(sim, tmp_path, images[:1])
    float_model, qdq_model = onnx.load(result.float_model), onnx.load(result.qdq_model)
    tensors = {t for n in float_model.graph.node for t in (*n.input, *n.output)} | {
        i.name for i in float_model.graph.initializer} | {i.name for i in float_model.graph.input}
    names = _encoding_names(result.encodings)
    assert names <= tensors  # every encoding names a tensor of the float graph
    assert "add" in {n.name.split("/")[1] for n in float_model.graph.node if n.op_type == "Add"}  # functional add
    num_quantizers = sum(q.enabled for q in sim.quantizers().values())
    dequantize = [n for n in qdq_model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) >= num_quantizers and len(names) >= num_quantizers
    (output,) = _run_qdq(result.qdq_model, {"input": images[:200]})
    with torch.no_grad():
        expected = sim.model(images[:200]).numpy()
    lsbs = np.abs(output - expected) / float(sim.quantizer("fc.output_quantizers.0").encoding.scale)
    # ORT requantizes with a float32 multiplier where the sim divides: ties may land one step apart
    assert lsbs.max() <= 1.001 and (output == expected).mean() >= 0.995


def test_resnet18_per_channel_weights_and_int32_bias(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    sim = _calibrated(model, x, config="per_channel")
    assert quantize_bias_int32(sim) == ["fc.bias"]
    result = sim.export(tmp_path, x[:1])
    qdq = onnx.load(result.qdq_model)
    initializers = {i.name: i for i in qdq.graph.initializer}
    weight_dq = next(n for n in qdq.graph.node if n.input[:1] == ["conv1.weight_quantized"])
    assert [a.i for a in weight_dq.attribute if a.name == "axis"] == [0]
    assert initializers["conv1.weight_quantized"].data_type == TensorProto.INT8
    assert initializers["fc.bias_quantized"].data_type == TensorProto.INT32
    (output,) = _run_qdq(result.qdq_model, {"input": x})
    with torch.no_grad():
        reference = sim.model(x).numpy()
    lsb = float(sim.quantizers()["fc.output_quantizers.0"].scale)
    assert np.abs(output - reference).max() <= 3 * lsb  # integer kernels: a few LSB at most


def test_mobilenet_v2_exports_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    sim = _calibrated(torchvision.models.mobilenet_v2(num_classes=10).eval(), x, config="per_channel")
    result = sim.export(tmp_path, x[:1], encoding_version="2.0.0")
    (output,) = _run_qdq(result.qdq_model, {"input": x})
    with torch.no_grad():
        assert np.array_equal(output, sim.model(x).numpy())


def test_bert_exports_with_keyword_inputs(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    sim = eq.QuantSim(transformers.BertModel(config).eval(), inputs)
    sim.compute_encodings(lambda m: m(**inputs))
    result = sim.export(tmp_path, inputs)
    names = _encoding_names(result.encodings)
    assert "embeddings.word_embeddings.weight" in names
    # both embedding sums are quantized in the export as in the sim: under tracing, BERT's shape arithmetic
    # becomes tensor ops, which must not take the recorded positions of the functional adds
    assert sum(n.startswith("/embeddings/") and n.endswith("Add_output_0") for n in names) == 2
    outputs = _run_qdq(result.qdq_model, inputs)
    with torch.no_grad():
        hidden = sim.model(**inputs).last_hidden_state
    assert outputs[0].shape == tuple(hidden.shape)
    # LayerNorm, Softmax and GELU run in float in ONNX Runtime: another summation order may flip a value one step
    step = float(sim.quantizer("encoder.layer.0.output.LayerNorm.output_quantizers.0").scale)
    assert_within_grid_steps(torch.from_numpy(outputs[0]), hidden, step, max_steps=1, max_share=0.01)


def test_int4_weights_and_int16_activations_use_opset_21(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = _calibrated(load_pretrained("digits_cnn"), images[:64], param_bw=4, output_bw=16)
    result = sim.export(tmp_path, images[:1])
    assert result.opset == 21
    qdq = onnx.load(result.qdq_model)
    types = {i.data_type for i in qdq.graph.initializer}
    assert TensorProto.INT4 in types and TensorProto.UINT16 in types
    (output,) = _run_qdq(result.qdq_model, {"input": images[:32]})
    with torch.no_grad():
        reference = sim.model(images[:32]).numpy()
    lsb = float(sim.quantizers()["fc.output_quantizers.0"].scale)
    assert np.abs(output - reference).max() <= 1.01 * lsb  # ORT: at most one step apart


def test_export_refuses_what_would_mislead_the_runtime(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn"), images[:1])
    with pytest.raises(RuntimeError, match="calibrate"):
        sim.export(tmp_path)
    sim.compute_encodings(lambda m: m(images[:32]))
    quantize_bias_int32(sim)
    # a changed weight encoding makes the int32 bias stale: ORT would assume the new s_x·s_w
    sim.quantizers()["fc.param_quantizers.weight"].scale *= 2
    with pytest.raises(ValueError, match="quantize_bias_int32"):
        sim.export(tmp_path)
