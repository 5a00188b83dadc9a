"""What `QuantAnalyzer.analyze` measured, as Python objects and as ``analysis.json``.

Non-finite numbers (the SQNR of an output the sim reproduces exactly is +inf) are written as JSON ``null``,
since JSON has no infinity.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgequant.analysis.tensor_stats import Histogram
from edgequant.analysis.weights import WeightRanges
from edgequant.quantization import Encoding

BATCH_NORM = "BatchNormalization"
"""ONNX op type of a BatchNorm simulated on its own, i.e. not folded into its Conv/Linear as deployment does."""


@dataclass
class ActivationRange:
    """FP32 range of the tensor an activation quantizer sees, and the share of it clipped by the encoding (more
    than half a step outside the grid's range)."""

    quantizer: str
    role: str
    minimum: float
    maximum: float
    clipped_fraction: float
    histogram: Histogram

    def to_dict(self) -> dict:
        return {"quantizer": self.quantizer, "role": self.role, "min": self.minimum, "max": self.maximum,
                "clipped_fraction": self.clipped_fraction}


@dataclass
class LayerAnalysis:
    """One quantized layer: its sensitivities, its output error along the network, its ranges and encodings."""

    name: str
    op_type: str
    quantizers: list[str]
    only_this_quantized: float
    all_but_this_quantized: float
    output_sqnr_db: float | None
    onnx_outputs: list[str]
    weight_ranges: list[WeightRanges]
    activation_ranges: list[ActivationRange]
    encodings: dict[str, dict | None]

    def gain_if_kept_in_float(self, quantized_metric: float) -> float:
        """How much the metric rises when only this layer is left in float (the sensitivity ranking)."""
        return self.all_but_this_quantized - quantized_metric

    def to_dict(self) -> dict:
        return {
            "name": self.name, "op_type": self.op_type, "quantizers": self.quantizers,
            "only_this_quantized": self.only_this_quantized, "all_but_this_quantized": self.all_but_this_quantized,
            "output_sqnr_db": self.output_sqnr_db, "onnx_outputs": self.onnx_outputs,
            "weight_ranges": [w.to_dict() for w in self.weight_ranges],
            "activation_ranges": [a.to_dict() for a in self.activation_ranges],
            "encodings": self.encodings,
        }


@dataclass
class AnalysisResult:
    """Figures of one analysis; ``layers`` in execution order (layers the batches never ran come last)."""

    metric_name: str
    fp32_metric: float
    quantized_metric: float
    weights_only_metric: float
    activations_only_metric: float
    layers: list[LayerAnalysis]
    model_input: LayerAnalysis | None
    settings: dict[str, Any]
    num_batches: int
    timings: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def ranking(self) -> list[LayerAnalysis]:
        """Layers (and the model input) by how much keeping them in float would recover, largest first."""
        entries = self.layers + ([self.model_input] if self.model_input is not None else [])
        return sorted(entries, key=lambda layer: -layer.gain_if_kept_in_float(self.quantized_metric))

    def layer(self, name: str) -> LayerAnalysis:
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(entry.name for entry in self.layers[:8])
        raise KeyError(f"no analysed layer named {name!r}; layers: {known}")

    def to_dict(self) -> dict:
        return {
            "metric": self.metric_name,
            "fp32_metric": self.fp32_metric,
            "quantized_metric": self.quantized_metric,
            "weights_only_metric": self.weights_only_metric,
            "activations_only_metric": self.activations_only_metric,
            "settings": self.settings,
            "num_batches": self.num_batches,
            "layers": [layer.to_dict() for layer in self.layers],
            "model_input": self.model_input.to_dict() if self.model_input is not None else None,
            "ranking": [layer.name for layer in self.ranking()],
            "timings_s": self.timings,
            "files": [path.name for path in self.files],
        }

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(_finite(self.to_dict()), indent=1, allow_nan=False))
        return path


def encoding_dict(encoding: Encoding | None) -> dict | None:
    """An encoding with its clipping range (``min``/``max``) spelled out next to scale and offset."""
    if encoding is None:
        return None
    return {**encoding.to_dict(), "min": encoding.min.cpu().tolist(), "max": encoding.max.cpu().tolist()}


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
