"""The "what to try" paragraph: which side of quantization loses the metric, and which layers to keep wider."""

from __future__ import annotations

import math

from edgequant.analysis.result import BATCH_NORM, AnalysisResult, LayerAnalysis

TOP_LAYERS = 3
MAX_BITWIDTH = 16
OUTLIER_SCHEMES = ("percentile", "sqnr")
"""Calibration schemes that clip outliers instead of covering them."""
DOMINANCE = 2.0
"""One side (weights or activations) "dominates" when its loss alone is this many times the other's."""


def what_to_try(result: AnalysisResult) -> list[str]:
    """Short, concrete suggestions derived from the measured figures, each one a change from the settings the
    analysis ran with (never "try per-channel" to a per-channel run)."""
    gap = result.fp32_metric - result.quantized_metric
    if gap <= 0:
        return ["The quantized model matches FP32 on this metric; nothing to fix."]
    weight_loss = result.fp32_metric - result.weights_only_metric
    activation_loss = result.fp32_metric - result.activations_only_metric
    settings = result.settings
    lines = []
    unfolded = settings.get("batch_norms_unfolded") or []
    if unfolded:
        named = ", ".join(unfolded[:TOP_LAYERS]) + (", ..." if len(unfolded) > TOP_LAYERS else "")
        lines.append(
            f"{len(unfolded)} BatchNorm layers ({named}) are simulated on their own, quantized apart from their conv; "
            "deployment folds them into it: fold them first (edgequant.ptq.fold_batch_norms; the CLI's --fold-bn) "
            "and analyse again."
        )
    if weight_loss > DOMINANCE * max(activation_loss, 0.0):
        lines.append(f"Weights dominate (weights alone lose {weight_loss:.4g}, activations alone "
                     f"{activation_loss:.4g}): try {_or(_weight_remedies(result))}.")
    elif activation_loss > DOMINANCE * max(weight_loss, 0.0):
        lines.append(f"Activations dominate (activations alone lose {activation_loss:.4g}, weights alone "
                     f"{weight_loss:.4g}): try {_or(_activation_remedies(settings))}.")
    else:
        lines.append(f"Weights (loss {weight_loss:.4g}) and activations (loss {activation_loss:.4g}) both contribute.")
    ranked = [layer for layer in result.ranking()[:TOP_LAYERS]
              if layer.gain_if_kept_in_float(result.quantized_metric) > 0]
    helpful = [layer for layer in ranked if layer.op_type != BATCH_NORM]  # folded away, not kept wider
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


def _weight_remedies(result: AnalysisResult) -> list[str]:
    """Per-channel scales and cross-layer equalization only where some weight has one scale for all its channels."""
    remedies = []
    if _per_tensor_weights(result):
        remedies += ["config='per_channel' (some weights have one scale for all their channels)",
                     "cross-layer equalization (edgequant.ptq.equalize)"]
    if result.settings["param_bw"] < MAX_BITWIDTH:
        remedies.append(f"param_bw above {result.settings['param_bw']} for the layers below")
    return [*remedies, "AdaRound"]


def _activation_remedies(settings: dict) -> list[str]:
    remedies = ["output_bw 16 for the layers below"] if settings["output_bw"] < MAX_BITWIDTH else []
    scheme = str(settings["quant_scheme"]).split("(")[0]
    others = [f"'{name}'" for name in OUTLIER_SCHEMES if name != scheme]
    return [*remedies, f"quant_scheme {'/'.join(others)} where ranges have outliers"]


def _per_tensor_weights(result: AnalysisResult) -> bool:
    """Whether a quantized weight with several output channels has a single scale (a per-tensor encoding)."""
    for layer in result.layers:
        for ranges in layer.weight_ranges:
            encoding = layer.encodings.get(ranges.quantizer)
            several_channels = len(ranges.shape) > 1 and ranges.shape[ranges.channel_axis] > 1
            if encoding is not None and several_channels and len(_flat(encoding["scale"])) == 1:
                return True
    return False


def _flat(value: float | list) -> list:
    return [item for part in value for item in _flat(part)] if isinstance(value, list) else [value]


def _or(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


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
