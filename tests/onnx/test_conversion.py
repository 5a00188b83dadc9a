"""Reading and converting a user's ONNX file: what converts, what runs in ONNX Runtime, and the refusals."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_models import branching_cnn, save
from torch import nn

from edgequant import QuantSim
from edgequant.onnx import ONNX_NODE_ATTRIBUTE, OnnxModelError, load_onnx, onnx_dummy_input


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_converted_model_computes_what_onnx_runtime_computes(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    model = load_onnx(path)
    x = torch.randn(4, 3, 8, 8)
    np.testing.assert_allclose(model(x).detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-5)


def test_every_layer_knows_its_node_and_constant_weights_become_layers(tmp_path: Path) -> None:
    model = load_onnx(save(branching_cnn(), tmp_path / "model.onnx"))
    refs = {m.__dict__[ONNX_NODE_ATTRIBUTE].name: m for m in model.modules() if ONNX_NODE_ATTRIBUTE in m.__dict__}
    assert {"conv_a", "relu_a", "conv_b", "add", "concat", "custom", "flatten", "head"} <= set(refs)
    head = refs["head"].__dict__[ONNX_NODE_ATTRIBUTE]
    assert isinstance(refs["head"], nn.Linear)
    assert head.params == {"weight": "head.weight", "bias": "head.bias"} and head.transposed == {"weight"}
    assert refs["conv_a"].__dict__[ONNX_NODE_ATTRIBUTE].inputs == ("image",)
    assert refs["add"].__dict__[ONNX_NODE_ATTRIBUTE].outputs == ("sum",)
    assert refs["flatten"].holds_input_values  # data movement: shares its input's encoding


def test_a_copy_of_the_converted_model_is_still_a_model_of_the_file(tmp_path: Path) -> None:
    """fx's deepcopy rebuilds a GraphModule from its graph: the copy (edgequant quantize folds BatchNorms in one)
    must still export into the user's graph and calibrate in ONNX Runtime."""
    model = load_onnx(save(branching_cnn(), tmp_path / "model.onnx"))
    copied = copy.deepcopy(model)
    assert copied.onnx_source is model.onnx_source  # shared, not copied: the graph can be large
    assert QuantSim(copied, torch.randn(1, 3, 8, 8)).onnx_source is model.onnx_source


def test_node_without_converter_runs_in_onnx_runtime_and_is_reported_float(tmp_path: Path) -> None:
    sim = QuantSim.from_onnx(save(branching_cnn(), tmp_path / "model.onnx"))
    custom = [e for e in sim.coverage() if e.tensor.endswith("/custom")]
    assert len(custom) == 1 and custom[0].category == "left in float"
    assert "ONNX Runtime" in custom[0].reason


def test_op_neither_converter_nor_runtime_knows_is_one_line_naming_the_node(tmp_path: Path) -> None:
    path = save(branching_cnn(custom_op=("com.acme", "Sharpen")), tmp_path / "model.onnx")
    with pytest.raises(OnnxModelError) as error:
        load_onnx(path)
    message = str(error.value)
    assert "node 'custom' (com.acme:Sharpen)" in message and "add_converter" in message and "\n" not in message


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x00\x01not a protobuf at all" * 10)
    with pytest.raises(OnnxModelError, match="is not an ONNX model"):
        load_onnx(path)
    with pytest.raises(OnnxModelError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_a_model_failing_the_checker_is_refused(tmp_path: Path) -> None:
    model = branching_cnn()
    model.graph.node[1].input[0] = "no_such_tensor"  # Relu reads a tensor nothing produces
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxModelError, match="fails onnx.checker"):
        load_onnx(path)


def test_the_users_file_is_never_written(tmp_path: Path) -> None:
    path = save(branching_cnn(), tmp_path / "model.onnx")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sim = QuantSim.from_onnx(path)
    sim.compute_encodings(lambda m: m(torch.randn(8, 3, 8, 8)))
    sim.export(tmp_path / "out")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_dummy_input_follows_the_declared_shapes(tmp_path: Path) -> None:
    model = load_onnx(save(branching_cnn(), tmp_path / "model.onnx"))
    (x,) = onnx_dummy_input(model.onnx_source, batch_size=3)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    sequence = branching_cnn()
    sequence.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(OnnxModelError, match="dynamic dimension 'height' on axis 2"):
        onnx_dummy_input(load_onnx(sequence).onnx_source)
    (x,) = onnx_dummy_input(load_onnx(sequence).onnx_source, dims={"height": 8})
    assert x.shape == (1, 3, 8, 8)


def test_flatten_follows_onnx_where_onnx2torch_does_not(tmp_path: Path) -> None:
    """ONNX Flatten is always 2-D: axis = rank gives a column (transformers' exported attention masks)."""
    nodes = [onnx.helper.make_node("Flatten", ["x"], ["column"], axis=2),
             onnx.helper.make_node("Flatten", ["x"], ["rows"], axis=1)]
    graph = onnx.helper.make_graph(
        nodes, "flatten", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s"])],
        [onnx.helper.make_tensor_value_info("column", onnx.TensorProto.FLOAT, ["bs", 1]),
         onnx.helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, ["b", "s"])])
    path = save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                tmp_path / "flatten.onnx")
    column, rows = load_onnx(path)(torch.arange(6.0).reshape(2, 3))
    assert column.shape == (6, 1) and rows.shape == (2, 3)


def test_a_node_run_by_onnx_runtime_keeps_a_scalar_output_scalar(tmp_path: Path) -> None:
    node = onnx.helper.make_node("Size", ["x"], ["count"])  # onnx2torch has no converter for it
    graph = onnx.helper.make_graph([node], "size", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                      ["n", 3])],
                                   [onnx.helper.make_tensor_value_info("count", onnx.TensorProto.INT64, [])])
    path = save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    model = load_onnx(path)
    assert model.onnx_source.float_nodes
    result = model(torch.zeros(4, 3))
    assert result.shape == () and int(result) == 12


def test_opset_21_ops_the_dynamo_exporter_writes_convert(tmp_path: Path) -> None:
    """Reductions with axes as an input, Reshape with allowzero, Gelu, Pad and Split of opsets 18 to 21 convert to
    torch (nothing left to ONNX Runtime) and compute what ONNX Runtime computes."""
    helper, tensor = onnx.helper, onnx.numpy_helper.from_array
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Gelu", ["centred"], ["gelu"], approximate="tanh"),
        helper.make_node("Pad", ["gelu", "pads"], ["padded"]),
        helper.make_node("Split", ["padded", "halves"], ["left", "right"], axis=3),
        helper.make_node("Add", ["left", "right"], ["summed"]),
        helper.make_node("Reshape", ["summed", "shape"], ["flat"], allowzero=1),
        helper.make_node("ReduceMax", ["flat", "last"], ["peak"], keepdims=0),
    ]
    initializers = [tensor(np.array([2, 3], np.int64), "axes"), tensor(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
                    "pads"), tensor(np.array([5, 5], np.int64), "halves"), tensor(np.array([-1, 60], np.int64),
                    "shape"), tensor(np.array([1], np.int64), "last")]
    graph = helper.make_graph(nodes, "opset21", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                              ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("peak", onnx.TensorProto.FLOAT, ["m"])], initializers)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "opset21.onnx")
    model = load_onnx(path)
    assert model.onnx_source.float_nodes == {}
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(model(x).detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-5)


def test_a_reshape_allowing_zero_to_a_computed_shape_converts(tmp_path: Path) -> None:
    """torch's dynamo exporter writes allowzero=1 on Reshapes whose shape it computes (Shape -> Slice -> Concat)."""
    helper, tensor = onnx.helper, onnx.numpy_helper.from_array
    nodes = [helper.make_node("Shape", ["x"], ["shape_x"]),
             helper.make_node("Slice", ["shape_x", "start", "end"], ["batch"]),
             helper.make_node("Concat", ["batch", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    initializers = [tensor(np.array([0], np.int64), "start"), tensor(np.array([1], np.int64), "end"),
                    tensor(np.array([-1], np.int64), "rest")]
    graph = helper.make_graph(nodes, "reshape", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                              ["n", 3, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 12])], initializers)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "reshape.onnx")
    model = load_onnx(path)
    assert model.onnx_source.float_nodes == {}
    x = torch.randn(2, 3, 4)
    np.testing.assert_array_equal(model(x).numpy(), _ort(path, x))
