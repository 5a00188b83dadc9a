"""Quantization analysis: which layers and which side (weights or activations) lose accuracy, and why."""

from edgequant.analysis.analyzer import QuantAnalyzer
from edgequant.analysis.fidelity import OutputFidelity
from edgequant.analysis.result import AnalysisResult, LayerAnalysis

__all__ = ["AnalysisResult", "LayerAnalysis", "OutputFidelity", "QuantAnalyzer"]
