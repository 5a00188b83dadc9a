"""Export of a sim built from an ONNX file: Q/DQ go into the user's own graph, under its names, and ONNX Runtime
computes what the emulating sim computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx_models import branching_cnn, conv_batch_norm, save
from torch import nn

from edgequant import QuantSim
from edgequant.export import quantize_bias_int32, read_encodings
from edgequant.onnx import load_onnx
from edgequant.ptq import correct_bias, fold_batch_norms
from edgequant.quantization import FloatFormat, IntegerFormat


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _emulated(sim: QuantSim, x: torch.Tensor) -> np.ndarray | list[np.ndarray]:
    """The emulating sim's output (each output of a model with several)."""
    sim.emulate("onnxruntime")
    try:
        with torch.no_grad():
            outputs = sim.model(x)
    finally:
        sim.emulate(None)
    return [t.numpy() for t in outputs] if isinstance(outputs, (tuple, list)) else outputs.numpy()


@pytest.fixture
def calibrated(tmp_path: Path) -> tuple[QuantSim, Path, torch.Tensor]:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sim.compute_encodings(lambda m: m(data))
    return sim, path, data


def test_qdq_model_is_the_users_graph_with_qdq_added(calibrated: tuple, tmp_path: Path) -> None:
    sim, path, _ = calibrated
    original = onnx.load(path)
    result = sim.export(tmp_path / "out")
    float_model, qdq = onnx.load(result.float_model), onnx.load(result.qdq_model)
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in float_model.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in original.graph.node]
    assert {i.name for i in float_model.graph.initializer} == {i.name for i in original.graph.initializer}
    kept = {n.name: n.op_type for n in qdq.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    assert kept == {n.name: n.op_type for n in original.graph.node}
    assert [i.name for i in qdq.graph.input] == ["image"] and [o.name for o in qdq.graph.output] == ["logits"]
    _, entries = read_encodings(result.encodings)
    names = {entry.name: entry for entry in entries}
    assert {"conv_a.weight", "conv_b.weight", "head.weight", "image", "relu_a", "sum", "joined", "logits"} <= set(names)
    # the Gemm stores its weight [in, out]: one scale per output channel, along axis 1 of the stored tensor
    assert names["head.weight"].encoding.scale.numel() == 10
    dequantize = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith("head.w"))
    assert next(a.i for a in dequantize.attribute if a.name == "axis") == 1


def test_onnx_runtime_computes_the_emulating_sims_outputs(calibrated: tuple, tmp_path: Path) -> None:
    sim, _, _ = calibrated
    result = sim.export(tmp_path / "out")
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(sim, x))


def test_weights_changed_by_a_technique_are_written_into_the_graph(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sim.compute_encodings(lambda m: m(data))
    correct_bias(sim, [data[:16]], progress=False)
    head_bias = sim.model.get_submodule("head").bias.detach().numpy()
    conv_b_bias = sim.model.get_submodule("conv_b").bias  # conv_b had no bias: correction adds one
    assert conv_b_bias is not None
    result = sim.export(tmp_path / "out")
    exported = {i.name: numpy_helper.to_array(i) for i in onnx.load(result.float_model).graph.initializer}
    np.testing.assert_array_equal(exported["head.bias"], head_bias)
    conv_b = next(n for n in onnx.load(result.float_model).graph.node if n.name == "conv_b")
    np.testing.assert_array_equal(exported[conv_b.input[2]], conv_b_bias.detach().numpy())
    x = torch.randn(16, 3, 8, 8)
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(sim, x))


def test_a_batch_norm_is_folded_in_the_graph_only_when_the_sim_folded_it(tmp_path: Path) -> None:
    path = save(conv_batch_norm(), tmp_path / "model.onnx")
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kept = QuantSim.from_onnx(path, config="per_channel")
    kept.compute_encodings(lambda m: m(data))
    kept_export = kept.export(tmp_path / "kept")
    assert "BatchNormalization" in {n.op_type for n in onnx.load(kept_export.float_model).graph.node}

    model = load_onnx(path)
    assert len(fold_batch_norms(model, data[:1])) == 1
    folded = QuantSim(model, data[:1], config="per_channel")
    folded.compute_encodings(lambda m: m(data))
    result = folded.export(tmp_path / "folded")
    nodes = onnx.load(result.float_model).graph.node
    assert [n.name for n in nodes] == ["conv1", "relu", "conv2"]
    assert list(nodes[1].input) == ["c1"]  # the Relu reads the Conv's own output
    x = torch.randn(16, 3, 8, 8)
    np.testing.assert_allclose(_run(result.float_model, x), _run(path, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(folded, x))


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.branch(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def test_onnx_path_gives_the_torch_paths_encodings_and_outputs(tmp_path: Path) -> None:
    """The same weights (BatchNorms folded before torch's exporter runs) give bit-identical encodings and outputs."""
    torch.manual_seed(0)
    net = _SmallNet().eval()
    for bn in (net.stem[1], net.branch[1]):  # statistics a trained net would have
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    data = torch.randn(32, 3, 12, 12)
    fold_batch_norms(net, data[:1])
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (data[:1],), path, dynamo=False, opset_version=17, input_names=["pixels"],
                      output_names=["scores"], dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}})
    torch_sim = QuantSim(net, data[:1], config="per_channel")
    onnx_sim = QuantSim.from_onnx(path, config="per_channel")
    for sim in (torch_sim, onnx_sim):
        sim.compute_encodings(lambda m: m(data))

    def scales(sim: QuantSim) -> list[list[float]]:
        return sorted(q.encoding.scale.flatten().tolist() for q in sim.quantizers().values())

    assert scales(torch_sim) == scales(onnx_sim)
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        np.testing.assert_array_equal(torch_sim.model(x).numpy(), onnx_sim.model(x).numpy())
    result = onnx_sim.export(tmp_path / "out")
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(onnx_sim, x))


def test_encodings_written_under_original_names_load_back_into_a_new_sim(calibrated: tuple, tmp_path: Path) -> None:
    sim, path, _ = calibrated
    result = sim.export(tmp_path / "out")
    fresh = QuantSim.from_onnx(path, config="per_channel")
    report = fresh.load_encodings(result.encodings)
    assert not report.skipped
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh.model(x).numpy(), sim.model(x).numpy())


def test_a_model_with_external_data_is_exported_with_external_data(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(branching_cnn(width=64), path, save_as_external_data=True, location="model.weights")
    sim = QuantSim.from_onnx(path, config="per_channel")
    sim.compute_encodings(lambda m: m(torch.randn(32, 3, 8, 8)))
    result = sim.export(tmp_path / "out")
    for written in (result.float_model, result.qdq_model):
        assert written.with_name(written.name + ".data").is_file()
        assert any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(written, load_external_data=False).graph.initializer)
    x = torch.randn(8, 3, 8, 8)
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(sim, x))


@pytest.mark.parametrize("opset", [13, 21])
def test_the_graph_keeps_its_opset(opset: int, tmp_path: Path) -> None:
    model = branching_cnn()
    model.opset_import[0].version = opset
    path = save(model, tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    sim.compute_encodings(lambda m: m(torch.randn(32, 3, 8, 8)))
    result = sim.export(tmp_path / "out")
    assert result.opset == opset
    x = torch.randn(8, 3, 8, 8)
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(sim, x))


def test_int16_activations_in_an_opset_17_graph_are_refused_with_the_fix(calibrated: tuple, tmp_path: Path) -> None:
    sim, _, _ = calibrated
    sim.set_format("*", IntegerFormat(16, False), kinds=("output",))
    with pytest.raises(ValueError, match="convert_version"):
        sim.export(tmp_path / "out")


def test_nodes_without_names_and_weights_in_constant_nodes(tmp_path: Path) -> None:
    """Exporters may leave node names empty, and Paddle's writes weights as Constant nodes: nodes are found by their
    outputs, and a quantized weight's Constant becomes an initializer of the same name."""
    model = branching_cnn()
    for node in model.graph.node:
        node.name = ""
    weight = next(i for i in model.graph.initializer if i.name == "conv_a.weight")
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["conv_a.weight"], value=weight))
    model.graph.initializer.remove(weight)
    path = save(model, tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    sim.compute_encodings(lambda m: m(torch.randn(32, 3, 8, 8)))
    result = sim.export(tmp_path / "out")
    _, entries = read_encodings(result.encodings)
    assert "conv_a.weight" in {entry.name for entry in entries}
    x = torch.randn(8, 3, 8, 8)
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(sim, x))


def test_int32_biases_of_an_onnx_model_are_on_the_integer_kernels_grid(calibrated: tuple, tmp_path: Path) -> None:
    sim, _, _ = calibrated
    assert quantize_bias_int32(sim) == ["conv_a.bias"]  # the head reads the float custom op's path
    result = sim.export(tmp_path / "out")
    qdq = onnx.load(result.qdq_model)
    integer = {i.name: i.data_type for i in qdq.graph.initializer}
    assert integer["conv_a.bias_quantized"] == onnx.TensorProto.INT32
    x = torch.randn(16, 3, 8, 8)
    np.testing.assert_array_equal(_run(result.qdq_model, x), _emulated(sim, x))


def test_fp8_tensors_of_an_onnx_model_export_into_its_graph(tmp_path: Path) -> None:
    """fp8 activations and weights (the Gemm's stored transposed) at the graph's opset 21; ORT computes the sim's
    outputs with its int32 rounding of float biases after fp8 inputs switched off (see the fp8 export)."""
    model = branching_cnn()
    model.opset_import[0].version = 21
    path = save(model, tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    sim.set_format("*", FloatFormat("float8_e4m3"))
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sim.compute_encodings(lambda m: m(data))
    result = sim.export(tmp_path / "out")
    options = ort.SessionOptions()
    session = ort.InferenceSession(str(result.qdq_model), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["WeightBiasQuantization"])
    with torch.no_grad():
        np.testing.assert_array_equal(session.run(None, {"image": data.numpy()})[0], sim.model(data).numpy())



def test_a_graph_output_other_nodes_also_read_is_quantized_for_them_too(tmp_path: Path) -> None:
    """The Relu's output is a graph output and the second Conv's input: both see its quantized value, as in the
    sim, where the output quantizer feeds every reader."""
    model = conv_batch_norm()
    model.graph.output.append(onnx.helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, ["batch", 6, 8, 8]))
    path = save(model, tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    sim.compute_encodings(lambda m: m(data))
    result = sim.export(tmp_path / "out")
    session = ort.InferenceSession(str(result.qdq_model), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(["output", "r1"], {"image": data.numpy()}), _emulated(sim, data), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_graph_output_read_through_an_indexing_gather_keeps_its_own_grid(tmp_path: Path) -> None:
    """BERT's pooler: the hidden state is a graph output and a Gather takes its first token, a view of it in torch.
    Quantizing that view onto the Gather's own grid must not write into the hidden state ONNX Runtime returns."""
    nodes = [
        helper.make_node("MatMul", ["tokens", "proj.weight"], ["projected"], name="proj"),
        helper.make_node("Relu", ["projected"], ["hidden"], name="relu"),
        helper.make_node("Gather", ["hidden", "first"], ["cls"], name="pick", axis=1),
        helper.make_node("MatMul", ["cls", "head.weight"], ["head"], name="head"),
        helper.make_node("Tanh", ["head"], ["pooled"], name="tanh"),
    ]
    rng = np.random.default_rng(9)
    initializers = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "proj.weight"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "head.weight"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "first"),
    ]
    graph = helper.make_graph(
        nodes, "pooler", [helper.make_tensor_value_info("tokens", onnx.TensorProto.FLOAT, ["batch", 5, 8])],
        [helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["batch", 5, 8]),
         helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, ["batch", 4])],
        initializers,
    )
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    data = torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(3))
    data[:, 0] *= 0.3  # the first token's range, so the Gather's grid, is not the hidden state's
    sim = QuantSim.from_onnx(path, config="per_channel")
    sim.compute_encodings(lambda m: m(data))
    result = sim.export(tmp_path / "out")
    session = ort.InferenceSession(str(result.qdq_model), providers=["CPUExecutionProvider"])
    got = session.run(["hidden", "pooled"], {"tokens": data.numpy()})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ in float, as the sim
    in_float = ort.InferenceSession(str(result.qdq_model), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        default = sim.model(data)[0].numpy()
    np.testing.assert_allclose(default, in_float.run(["hidden"], {"tokens": data.numpy()})[0], rtol=1e-6, atol=1e-7)
    for runtime, emulating in zip(got, _emulated(sim, data), strict=True):
        np.testing.assert_array_equal(runtime, emulating)
