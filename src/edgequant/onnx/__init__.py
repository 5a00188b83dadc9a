"""ONNX models as input: convert a user's ONNX file to a module the sim quantizes, remembering the original graph
so that export writes Q/DQ into it under the user's own names."""

from edgequant.onnx.conversion import load_onnx
from edgequant.onnx.inputs import onnx_dummy_input
from edgequant.onnx.reading import OnnxModelError, read_onnx
from edgequant.sim.onnx_source import ONNX_NODE_ATTRIBUTE, ONNX_SOURCE_ATTRIBUTE, OnnxNodeRef, OnnxSource
from edgequant.sim.services import register_service

__all__ = [
    "ONNX_NODE_ATTRIBUTE",
    "ONNX_SOURCE_ATTRIBUTE",
    "OnnxModelError",
    "OnnxNodeRef",
    "OnnxSource",
    "load_onnx",
    "onnx_dummy_input",
    "read_onnx",
]

register_service("load_onnx", load_onnx)
register_service("onnx_dummy_input", onnx_dummy_input)
