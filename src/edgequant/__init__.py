"""edgequant: make trained PyTorch models ready for fixed-point (int8/int4/int16) hardware."""

from edgequant import export  # noqa: F401 - registers sim.export / sim.load_encodings
from edgequant.config import ConfigError, HardwareConfig
from edgequant.onnx import OnnxModelError, load_onnx
from edgequant.quantization import (
    CalibrationError,
    CalibrationMethod,
    Encoding,
    MinMax,
    Mse,
    Percentile,
    Quantizer,
    Sqnr,
)
from edgequant.sim import QuantSim, register_module
from edgequant.workflows import autoquant

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CalibrationMethod",
    "ConfigError",
    "Encoding",
    "HardwareConfig",
    "MinMax",
    "Mse",
    "OnnxModelError",
    "Percentile",
    "QuantSim",
    "Quantizer",
    "Sqnr",
    "autoquant",
    "load_onnx",
    "register_module",
]
