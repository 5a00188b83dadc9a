"""Running a calibration batch through ONNX Runtime a few samples at a time, where that is exact and faster.

A reduction reads its tensor right after the tensor is computed (see `edgequant.onnx.calibration`); when the run's
activations are larger than the CPU's cache, the tensor is already out of it. Smaller runs keep it in: in
benchmarks/README.md, 2-13 % off the calibration of resnet50, mobilenet_v3_large and EfficientNet-Lite0 and a third
or less of the memory; nothing to gain on MiniLM, whose activations already fit.

Splitting a batch is exact only where no op mixes samples: `samples_independent` accepts a graph only if every node
is an op that computes each sample on its own (convolutions, pools, element-wise ops, ...), with the attributes and
constant inputs that keep it so (no reduction, concatenation or softmax over the batch axis, no ``Reshape`` whose
shape moves it, no constant with a leading axis the size of the batch). Any other op, or anything unknown, keeps the
batch whole.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from edgequant.onnx.graph_constants import GraphConstants

SUB_BATCH_BYTES = 8 * 2**20
"""The largest activation one run should compute; a batch whose largest activation is bigger runs in sub-batches."""

_PER_SAMPLE_OPS = {
    "Abs", "Cast", "Ceil", "Clip", "Conv", "ConvTranspose", "DepthToSpace", "Dropout", "Elu", "Erf", "Exp", "Floor",
    "Gelu", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity",
    "InstanceNormalization", "LRN", "LeakyRelu", "Log", "LpPool", "MaxPool", "AveragePool", "Mish", "Neg",
    "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Softplus", "Softsign", "SpaceToDepth", "Sqrt", "Tanh",
    "BatchNormalization",
}
"""Ops whose output for a sample depends only on that sample (and on constants)."""

_ELEMENT_WISE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"}
"""Broadcasting ops: per sample unless a constant input has a leading axis the size of the batch."""

_REDUCTIONS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
               "ReduceLogSumExp", "ReduceSumSquare"}


def largest_activation_bytes(light: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Bytes of the largest tensor the graph computes from inputs of ``shapes``, by shape inference (None where it
    fails or no tensor gets a full shape)."""
    shaped = onnx.ModelProto()
    shaped.CopyFrom(light)
    for value in shaped.graph.input:
        if value.name in shapes:
            del value.type.tensor_type.shape.dim[:]
            value.type.tensor_type.shape.dim.extend(
                onnx.TensorShapeProto.Dimension(dim_value=size) for size in shapes[value.name])
    try:
        inferred = onnx.shape_inference.infer_shapes(shaped)
    except Exception:  # noqa: BLE001 - then the batch runs whole
        return None
    sizes = []
    for value in inferred.graph.value_info:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
            sizes.append(math.prod(d.dim_value for d in dims) * itemsize)
    return max(sizes, default=None)


def samples_independent(model: onnx.ModelProto, ranks: dict[str, int], constants: GraphConstants) -> bool:
    """Whether every node of ``model`` computes each sample (index of axis 0 of the graph's inputs) on its own, so
    that a batch split along axis 0 gives the same per-sample results. ``ranks``: tensor ranks from shape
    inference; ``constants``: the model's."""
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in constants.shapes:
            continue
        if node.domain not in ("", "ai.onnx") or not _per_sample(node, constants, ranks):
            return False
    return True


def _broadcasts_per_sample(constants: GraphConstants, tensor: str, rank: int) -> bool:
    """Whether input ``tensor`` of a broadcasting op with an output of ``rank`` is per sample: an activation, or a
    constant that does not span the batch axis (fewer axes than the output, or a leading axis of 1)."""
    shape = constants.shapes.get(tensor)
    return shape is None or len(shape) < rank or shape[0] == 1


def _per_sample(node: onnx.NodeProto, constants: GraphConstants, ranks: dict[str, int]) -> bool:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = ranks.get(node.output[0]) if node.output else None
    inputs = [i for i in node.input if i]
    op = node.op_type
    if op in _PER_SAMPLE_OPS:
        return not attributes.get("training_mode", 0)  # a training-mode BatchNormalization uses batch statistics
    if op in _ELEMENT_WISE_OPS:
        return rank is not None and all(_broadcasts_per_sample(constants, i, rank) for i in inputs)
    if op == "Gemm":  # A is [batch, K] unless transposed; B and C are constants, C broadcast over the rows
        return (not attributes.get("transA", 0) and all(i in constants.shapes for i in inputs[1:])
                and (len(inputs) < 3 or _broadcasts_per_sample(constants, inputs[2], 2)))
    if op == "MatMul":
        return inputs[1] in constants.shapes
    if op == "Flatten":
        return attributes.get("axis", 1) >= 1
    if op in ("Concat", "Softmax", "LogSoftmax"):
        return rank is not None and attributes.get("axis", -1) % rank != 0
    if op == "Transpose":
        return "perm" in attributes and attributes["perm"][0] == 0
    if op in ("Squeeze", "Unsqueeze") or op in _REDUCTIONS:
        axes = attributes.get("axes")
        if axes is None and len(inputs) > 1:
            axes = constants.values.get(inputs[1])
        if axes is None or len(axes) == 0:  # every axis, the batch included
            return False
        axis_rank = rank if op == "Unsqueeze" else ranks.get(inputs[0])
        return axis_rank is not None and all(int(a) % axis_rank != 0 for a in np.ravel(axes))
    if op == "Reshape":  # the batch axis kept first: -1 takes what the other (positive) sizes leave, 0 copies it
        shape = constants.values.get(inputs[1])
        first = int(shape[0]) if shape is not None and shape.size > 0 else None
        kept = first == -1 or (first == 0 and not attributes.get("allowzero", 0))  # with allowzero, 0 is a size
        return kept and bool((shape[1:] > 0).all())
    return False
