"""Small ONNX models written with onnx.helper, as a user's exporter would hand them over (no torch involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _weight(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.3) -> onnx.TensorProto:
    values = np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def branching_cnn(custom_op: tuple[str, str] = ("com.microsoft", "Gelu"), width: int = 8) -> onnx.ModelProto:
    """Conv, Relu, Add, Concat, a ``custom_op`` (domain, op type), GlobalAveragePool, Reshape and a Gemm whose
    weight is stored ``[in, out]`` (transB=0): image ``[N, 3, 8, 8]`` -> ``logits [N, 10]``; ``width`` channels."""
    domain, op_type = custom_op
    nodes = [
        helper.make_node("Conv", ["image", "conv_a.weight", "conv_a.bias"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["relu_a"], name="relu_a"),
        helper.make_node("Conv", ["image", "conv_b.weight"], ["b"], name="conv_b"),
        helper.make_node("Add", ["relu_a", "b"], ["sum"], name="add"),
        helper.make_node("Concat", ["relu_a", "sum"], ["joined"], name="concat", axis=1),
        helper.make_node(op_type, ["joined"], ["activated"], name="custom", domain=domain),
        helper.make_node("GlobalAveragePool", ["activated"], ["pooled"], name="pool"),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["logits"], name="head"),
    ]
    initializers = [
        _weight("conv_a.weight", (width, 3, 3, 3), 0), _weight("conv_a.bias", (width,), 1, 0.1),
        _weight("conv_b.weight", (width, 3, 1, 1), 2), _weight("head.weight", (2 * width, 10), 3),
        _weight("head.bias", (10,), 4, 0.1),
        numpy_helper.from_array(np.array([-1, 2 * width], np.int64), "flat_shape"),
    ]
    graph = helper.make_graph(
        nodes, "branching_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="onnx.helper")


def conv_batch_norm() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv, the BatchNormalization left unfolded as training exports keep it."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n1"], name="bn"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["output"], name="conv2"),
    ]
    channels = 6
    initializers = [
        _weight("conv1.weight", (channels, 3, 3, 3), 6), _weight("conv2.weight", (4, channels, 1, 1), 7),
        _weight("conv2.bias", (4,), 8, 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.normal(0, 0.2, channels).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.normal(0, 0.3, channels).astype(np.float32), "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.2, 1.5, channels).astype(np.float32), "bn.var"),
    ]
    return _image_model("conv_batch_norm", nodes, initializers, output_channels=4)


def hard_swish_cnn() -> onnx.ModelProto:
    """MobileNetV3's blocks as paddle2onnx writes them: Conv -> hard-swish spelled ``x * Clip(x + 3, 0, 6) / 6``, and a
    squeeze-excite gate ``HardSigmoid(Conv(GlobalAveragePool(.)))`` multiplied in: image ``[N, 3, 8, 8]`` ->
    ``output [N, 8, 8, 8]``."""
    nodes = [
        helper.make_node("Conv", ["image", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "three"], ["shifted"], name="add3"),
        helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"], name="relu6"),
        helper.make_node("Div", ["clipped", "six"], ["gate"], name="div6"),
        helper.make_node("Mul", ["c", "gate"], ["swished"], name="hard_swish"),
        helper.make_node("GlobalAveragePool", ["swished"], ["squeezed"], name="squeeze"),
        helper.make_node("Conv", ["squeezed", "excite.weight"], ["excited"], name="excite"),
        helper.make_node("HardSigmoid", ["excited"], ["scales"], name="excite_gate"),
        helper.make_node("Mul", ["swished", "scales"], ["output"], name="scale"),
    ]
    initializers = [
        _weight("conv.weight", (8, 3, 3, 3), 11), _weight("conv.bias", (8,), 12, 0.1),
        _weight("excite.weight", (8, 8, 1, 1), 13),
        *(numpy_helper.from_array(np.array(value, np.float32), name)
          for name, value in (("three", 3.0), ("zero", 0.0), ("six", 6.0))),
    ]
    return _image_model("hard_swish_cnn", nodes, initializers, output_channels=8)


def _image_model(name: str, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], output_channels: int
                 ) -> onnx.ModelProto:
    """A model of ``nodes`` from ``image [batch, 3, 8, 8]`` to ``output [batch, output_channels, 8, 8]``."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", output_channels, 8, 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path
