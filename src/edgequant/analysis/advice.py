"""The "what to try" paragraph: which side of quantization loses the metric, and which layers to keep wider."""

from __future__ import annotations

import math

from edgequant.analysis.result import AnalysisResult, LayerAnalysis

TOP_LAYERS = 3
DOMINANCE = 2.0
"""One side (weights or activations) "dominates" when its loss alone is this many times the other's."""


def what_to_try(result: AnalysisResult) -> list[str]:
    """Short, concrete suggestions derived from the measured figures."""
    gap = result.fp32_metric - result.quantized_metric
    if gap <= 0:
        return ["The quantized model matches FP32 on this metric; nothing to fix."]
    weight_loss = result.fp32_metric - result.weights_only_metric
    activation_loss = result.fp32_metric - result.activations_only_metric
    settings = result.settings
    lines = []
    if weight_loss > DOMINANCE * max(activation_loss, 0.0):
        lines.append(
            f"Weights dominate (weights alone lose {weight_loss:.4g}, activations alone {activation_loss:.4g}): "
            f"try config='per_channel', param_bw above {settings['param_bw']} for the layers below, cross-layer "
            "equalization (after folding BatchNorms yourself) or AdaRound."
        )
    elif activation_loss > DOMINANCE * max(weight_loss, 0.0):
        lines.append(
            f"Activations dominate (activations alone lose {activation_loss:.4g}, weights alone {weight_loss:.4g}): "
            f"try output_bw 16 for the layers below, or quant_scheme 'percentile'/'sqnr' where ranges have outliers."
        )
    else:
        lines.append(f"Weights (loss {weight_loss:.4g}) and activations (loss {activation_loss:.4g}) both contribute.")
    helpful = [layer for layer in result.ranking()[:TOP_LAYERS]
               if layer.gain_if_kept_in_float(result.quantized_metric) > 0]
    if helpful:
        listed = ", ".join(
            f"{layer.name} ({_wider(layer)}: +{layer.gain_if_kept_in_float(result.quantized_metric):.4g} of the "
            f"{gap:.4g} gap if kept in float)" for layer in helpful)
        lines.append(f"Keep the most sensitive layers wider: {listed}.")
    drop = _largest_sqnr_drop(result)
    if drop is not None:
        lines.append(f"The output SQNR falls most at {drop[0]} ({drop[1]:.1f} dB lost there): look at its ranges "
                     "below.")
    clipped = [(a.quantizer, a.clipped_fraction) for layer in result.layers for a in layer.activation_ranges
               if a.clipped_fraction > 0.01]
    if clipped:
        worst = max(clipped, key=lambda item: item[1])
        lines.append(f"{worst[0]} clips {worst[1]:.1%} of its FP32 values: its encoding range is too narrow for "
                     "this data (recalibrate on representative data, or use a wider scheme).")
    return lines


def _wider(layer: LayerAnalysis) -> str:
    """What "keep it wider" means for this layer: 8/16-bit weights, 16-bit activations, or both."""
    has_weights, has_activations = bool(layer.weight_ranges), bool(layer.activation_ranges)
    if has_weights and has_activations:
        return "8-bit weights, 16-bit activations"
    return "8/16-bit weights" if has_weights else "16-bit activations"


def _largest_sqnr_drop(result: AnalysisResult) -> tuple[str, float] | None:
    previous, largest = math.inf, None
    for layer in result.layers:
        value = layer.output_sqnr_db
        if value is None or not math.isfinite(value):
            continue
        if math.isfinite(previous) and (largest is None or previous - value > largest[1]):
            largest = (layer.name, previous - value)
        previous = value
    return largest if largest is not None and largest[1] > 0 else None
