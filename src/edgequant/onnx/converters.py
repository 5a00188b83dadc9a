"""onnx2torch converters for the op versions of opsets 16 to 21 it lacks (torch's dynamo exporter writes opset 18+).

Most of those versions only widened the accepted types, so the converter of the previous version applies as it is.
Others added an input or an attribute: their converter delegates to the previous version where the node leaves the
addition at its default, and refuses otherwise (the node then runs in ONNX Runtime, reported in float). Reductions
of opset 18 take their axes as an input, which must be a constant. Registered once, at import, only where
onnx2torch has no converter of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnx2torch.node_converters import add_converter, get_converter
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value
from torch import nn

from edgequant.onnx.modules import ReshapeAllowingZero

TORCH_DOMAIN = "edgequant_torch"  # no dot: onnx2torch names modules after the domain
"""Domain the conversion copy moves nodes to whose onnx2torch converter departs from ONNX (their op type kept)."""

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]

TYPE_ONLY_VERSIONS: dict[str, tuple[int, tuple[int, ...]]] = {
    "Reshape": (14, (19, 21)), "Unsqueeze": (13, (21,)), "Flatten": (13, (21,)), "Transpose": (13, (21,)),
    "Identity": (16, (19, 21)), "Shape": (15, (19, 21)), "Cast": (13, (19, 21)), "Constant": (13, (19, 21)),
    "ConstantOfShape": (9, (20, 21)), "Equal": (13, (19,)), "GreaterOrEqual": (12, (16,)),
    "LessOrEqual": (12, (16,)), "IsNaN": (13, (20,)), "IsInf": (10, (20,)),
}
"""op -> (the version onnx2torch converts, later versions that changed only the types the op accepts)."""

ADDED_ATTRIBUTE_VERSIONS: dict[str, tuple[int, tuple[int, ...], dict[str, object]]] = {
    "Resize": (13, (18, 19), {"antialias": 0, "keep_aspect_ratio_policy": "stretch", "axes": None}),
    "AveragePool": (11, (19,), {"dilations": None}),
    "Split": (13, (18,), {"num_outputs": None}),
    "Pad": (13, (18, 19, 21), {}),
}
"""op -> (the version onnx2torch converts, later versions, the attributes they added with their defaults)."""

REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")


def _missing(op_type: str, version: int) -> bool:
    try:
        get_converter(operation_type=op_type, version=version)
    except NotImplementedError:
        return True
    return False


def _register(op_type: str, versions: tuple[int, ...], converter: Converter) -> None:
    for version in versions:
        if _missing(op_type, version):
            add_converter(operation_type=op_type, version=version)(converter)


def _at_defaults(op_type: str, previous: Converter, added: dict[str, object]) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for name, default in added.items():
            if node.attributes.get(name, default) != default:
                raise NotImplementedError(f"{op_type} with {name}={node.attributes[name]!r}")
        if op_type == "Pad" and (len(node.input_values) > 3 or node.attributes.get("mode") == "wrap"):
            raise NotImplementedError("Pad with axes or wrap mode")
        return previous(node, graph)
    return convert


def _reduction(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Opset-18 reductions: axes as an optional (constant) input; none reduces everything, unless
    ``noop_with_empty_axes`` says to pass the input through."""
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = torch.as_tensor(get_const_value(node.input_values[1], graph)).reshape(-1).tolist()
        except KeyError as error:
            raise NotImplementedError(f"{node.operation_type} with computed axes") from error
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes")
    module = OnnxReduceStaticAxes(node.operation_type, axes or None, node.attributes.get("keepdims", 1))
    return OperationConverterResult(module, OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))


def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = node.attributes.get("approximate", "none")
    return OperationConverterResult(nn.GELU(approximate=approximate),
                                    OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))


for _op, (_known, _versions) in TYPE_ONLY_VERSIONS.items():
    _register(_op, _versions, get_converter(operation_type=_op, version=_known))
for _op, (_known, _versions, _added) in ADDED_ATTRIBUTE_VERSIONS.items():
    _register(_op, _versions, _at_defaults(_op, get_converter(operation_type=_op, version=_known), _added))
for _op in REDUCTIONS:
    _register(_op, (18, 20) if _op in ("ReduceMax", "ReduceMin") else (18,), _reduction)
_register("Gelu", (20,), _gelu)
add_converter(operation_type="Reshape", version=1, domain=TORCH_DOMAIN)(
    lambda node, graph: OperationConverterResult(ReshapeAllowingZero(), OnnxMapping(
        inputs=tuple(node.input_values[:2]), outputs=node.output_values)))
