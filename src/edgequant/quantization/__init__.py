"""Quantizer math: encodings and their granularities, affine quantize-dequantize, calibration methods and analyzers,
the Quantizer module."""

from edgequant.quantization.affine import dequantize, quantize, quantize_dequantize
from edgequant.quantization.analyzers import (
    CalibrationError,
    EncodingAnalyzer,
    MinMaxAnalyzer,
    MseAnalyzer,
    PercentileAnalyzer,
    SqnrAnalyzer,
)
from edgequant.quantization.calibration_methods import (
    CALIBRATION_METHODS,
    QUANT_SCHEMES,
    CalibrationMethod,
    MethodSpec,
    MinMax,
    Mse,
    Percentile,
    Sqnr,
    calibration_method,
    make_analyzer,
    register,
)
from edgequant.quantization.encoding import Encoding
from edgequant.quantization.granularity import Granularity, Lpbq, PerBlock, PerChannel, PerTensor
from edgequant.quantization.number_format import FloatFormat, IntegerFormat
from edgequant.quantization.quantizer import Quantizer

__all__ = [
    "CALIBRATION_METHODS",
    "QUANT_SCHEMES",
    "CalibrationError",
    "CalibrationMethod",
    "Encoding",
    "EncodingAnalyzer",
    "FloatFormat",
    "Granularity",
    "IntegerFormat",
    "Lpbq",
    "MethodSpec",
    "MinMax",
    "MinMaxAnalyzer",
    "Mse",
    "MseAnalyzer",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "Percentile",
    "PercentileAnalyzer",
    "Quantizer",
    "Sqnr",
    "SqnrAnalyzer",
    "calibration_method",
    "dequantize",
    "make_analyzer",
    "quantize",
    "quantize_dequantize",
    "register",
]
