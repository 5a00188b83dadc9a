"""Quantizer math: encodings, affine quantize-dequantize, calibration analyzers and the Quantizer module."""

from edgequant.quantization.affine import dequantize, quantize, quantize_dequantize
from edgequant.quantization.analyzers import (
    QUANT_SCHEMES,
    CalibrationError,
    EncodingAnalyzer,
    MinMaxAnalyzer,
    MseAnalyzer,
    PercentileAnalyzer,
    SqnrAnalyzer,
    make_analyzer,
)
from edgequant.quantization.encoding import Encoding
from edgequant.quantization.quantizer import Quantizer

__all__ = [
    "QUANT_SCHEMES",
    "CalibrationError",
    "Encoding",
    "EncodingAnalyzer",
    "MinMaxAnalyzer",
    "MseAnalyzer",
    "PercentileAnalyzer",
    "Quantizer",
    "SqnrAnalyzer",
    "dequantize",
    "make_analyzer",
    "quantize",
    "quantize_dequantize",
]
