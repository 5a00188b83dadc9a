"""The constant tensors of an ONNX graph (initializers and ``Constant`` nodes), and the graph without its weights.

Exporters store constants either way: TorchScript's and paddle2onnx's as ``Constant`` nodes (paddle2onnx's weights
too), the dynamo exporter's as initializers. The graph analyses of `edgequant.onnx` (which tensors cannot be
negative, which ops keep samples apart) read shapes of all and values of the small ones (shapes, axes, bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

SMALL_INITIALIZER_VALUES = 512
"""Constants up to this many values are shapes, axes, bounds and the like, not weights."""


def small_constant(tensor: onnx.TensorProto) -> bool:
    """A shape, axes, bound or other small constant, not a weight (by element count: a file may hold the values in
    ``raw_data`` or in a typed field)."""
    return math.prod(tensor.dims) <= SMALL_INITIALIZER_VALUES


@dataclass
class GraphConstants:
    """Every constant's shape, and the values of the small ones (`small_constant`)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphConstants:
        constants = cls()
        tensors = [(initializer.name, initializer) for initializer in model.graph.initializer]
        tensors += [(node.output[0], node.attribute[0].t) for node in model.graph.node
                    if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value"]
        for name, tensor in tensors:
            constants.shapes[name] = tuple(tensor.dims)
            if small_constant(tensor):
                constants.values[name] = onnx.numpy_helper.to_array(tensor)
        return constants


def light_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its large initializers as typed graph inputs: shape inference copies the model it is given
    twice, and weights' values change no shape."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    for initializer in model.graph.initializer:
        if small_constant(initializer):  # shapes, axes and other small constants: Reshape's output depends on them
            light.graph.initializer.append(initializer)
        else:
            light.graph.input.append(helper.make_tensor_value_info(initializer.name, initializer.data_type,
                                                                   initializer.dims))
    return light
