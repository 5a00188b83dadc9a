"""ONNX models as input: convert a user's ONNX file to a module the sim quantizes, remembering the original graph
so that export writes Q/DQ into it under the user's own names."""

from edgequant.onnx.calibration import OnnxCalibrationReport, calibrate_in_onnxruntime, onnxruntime_calibration_plan
from edgequant.onnx.conversion import load_onnx
from edgequant.onnx.inputs import onnx_dummy_input
from edgequant.onnx.reading import OnnxModelError, read_onnx
from edgequant.sim.onnx_source import ONNX_NODE_ATTRIBUTE, ONNX_SOURCE_ATTRIBUTE, OnnxNodeRef, OnnxSource
from edgequant.sim.services import register_service

__all__ = [
    "ONNX_NODE_ATTRIBUTE",
    "ONNX_SOURCE_ATTRIBUTE",
    "OnnxCalibrationReport",
    "OnnxModelError",
    "OnnxNodeRef",
    "OnnxSource",
    "calibrate_in_onnxruntime",
    "load_onnx",
    "onnx_dummy_input",
    "onnxruntime_calibration_plan",
    "read_onnx",
]

register_service("load_onnx", load_onnx)
register_service("onnx_dummy_input", onnx_dummy_input)
register_service("calibrate_in_onnxruntime", calibrate_in_onnxruntime)
