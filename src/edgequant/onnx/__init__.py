"""ONNX models as input: convert a user's ONNX file to a module the sim quantizes, remembering the original graph
so that export writes Q/DQ into it under the user's own names."""

from edgequant.onnx.conversion import load_onnx
from edgequant.onnx.inputs import onnx_dummy_input
from edgequant.onnx.op_types import DATA_MOVEMENT_OPS
from edgequant.onnx.reading import OnnxModelError, read_onnx
from edgequant.onnx.source import ONNX_NODE_ATTRIBUTE, ONNX_SOURCE_ATTRIBUTE, OnnxNodeRef, OnnxSource

__all__ = [
    "DATA_MOVEMENT_OPS",
    "ONNX_NODE_ATTRIBUTE",
    "ONNX_SOURCE_ATTRIBUTE",
    "OnnxModelError",
    "OnnxNodeRef",
    "OnnxSource",
    "load_onnx",
    "onnx_dummy_input",
    "read_onnx",
]
