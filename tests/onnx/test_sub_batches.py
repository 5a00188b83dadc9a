"""A calibration batch runs through ONNX Runtime in sub-batches only where no op mixes samples."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import branching_cnn, conv_batch_norm, hard_swish_cnn

from edgequant.onnx.calibration import _ranks
from edgequant.onnx.graph_constants import GraphConstants, light_model
from edgequant.onnx.sub_batches import largest_activation_bytes, samples_independent


def _independent(model: onnx.ModelProto) -> bool:
    return samples_independent(model, _ranks(light_model(model)), GraphConstants.of(model))


def _after_conv(node: onnx.NodeProto, *initializers: onnx.TensorProto) -> onnx.ModelProto:
    """image [N, 3, 4, 4] -> Conv -> ``node`` (reading ``c``, writing ``out``)."""
    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["c"]), node], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [weight, *initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _constant(name: str, values: list | np.ndarray, dtype: type = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def test_per_sample_graphs_are_independent() -> None:
    assert _independent(conv_batch_norm()) and _independent(hard_swish_cnn())
    assert _independent(_after_conv(helper.make_node("Reshape", ["c", "s"], ["out"]), _constant("s", [-1, 32])))
    assert _independent(_after_conv(helper.make_node("ReduceMean", ["c"], ["out"], axes=[2, 3])))


@pytest.mark.parametrize("node, initializers", [
    (helper.make_node("Reshape", ["c", "s"], ["out"]), [_constant("s", [1, -1])]),  # samples into one row
    (helper.make_node("Concat", ["c", "c"], ["out"], axis=0), []),
    (helper.make_node("ReduceMean", ["c"], ["out"]), []),  # every axis
    (helper.make_node("Softmax", ["c"], ["out"], axis=0), []),
    (helper.make_node("Transpose", ["c"], ["out"], perm=[1, 0, 2, 3]), []),
    (helper.make_node("Add", ["c", "k"], ["out"]), [_constant("k", np.ones((2, 2, 4, 4)), np.float32)]),
    (helper.make_node("Shape", ["c"], ["out"]), []),
], ids=["reshape-merges-batch", "concat-axis-0", "reduce-all", "softmax-axis-0", "transpose-axis-0",
        "constant-spans-batch", "shape"])
def test_ops_that_mix_samples_keep_the_batch_whole(node: onnx.NodeProto, initializers: list) -> None:
    assert not _independent(_after_conv(node, *initializers))


def test_a_custom_domain_op_keeps_the_batch_whole() -> None:
    assert not _independent(branching_cnn())


def test_the_largest_activation_comes_from_shape_inference_with_the_batch_shape() -> None:
    model = conv_batch_norm()  # conv1 -> 6 channels of 8 x 8 is the largest
    assert largest_activation_bytes(light_model(model), {"image": (5, 3, 8, 8)}) == 5 * 6 * 8 * 8 * 4
