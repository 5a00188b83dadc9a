"""``report.html``: one self-contained, interactive page (the shared `edgequant.report.Page` kit, Plotly figures)
with the sensitivity ranking, the SQNR along the network, per-channel weight ranges, histograms with clipping
ranges, the weights-vs-activations summary and what to try."""

from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go
import torch

from edgequant.analysis.advice import what_to_try
from edgequant.analysis.result import AnalysisResult, LayerAnalysis
from edgequant.analysis.tensor_stats import Histogram
from edgequant.analysis.weights import channel_spread
from edgequant.report import Column, Page

FIGURE_IDS = ("sensitivity", "sqnr", "weight-ranges", "histograms")
"""Element ids of the figures (the browser test looks for them)."""


def write_report(result: AnalysisResult, path: Path) -> Path:
    page = Page("edgequant quantization analysis")
    settings = result.settings
    page.paragraph(
        f"W{settings['param_bw']}A{settings['output_bw']}, scheme {settings['quant_scheme']}, config "
        f"{settings['config']}; metric: {result.metric_name} on {result.num_batches} batches (higher is better)."
    )
    gap = result.fp32_metric - result.quantized_metric
    page.verdict(f"FP32 {result.fp32_metric:.4f} → quantized {result.quantized_metric:.4f} (gap {gap:.4g}).",
                 ok=gap <= 0)
    page.heading("Weights or activations?")
    page.table([
        Column("configuration", lambda row: row[0]),
        Column("metric", lambda row: row[1], "{:.4f}", numeric=True),
        Column("loss vs FP32", lambda row: result.fp32_metric - row[1], "{:.4g}", numeric=True),
    ], [("FP32 (all quantizers off)", result.fp32_metric), ("quantized (all on)", result.quantized_metric),
        ("weights only quantized", result.weights_only_metric),
        ("activations only quantized", result.activations_only_metric)])
    page.heading("What to try")
    for line in what_to_try(result):
        page.paragraph(line)
    page.heading("Per-layer sensitivity")
    page.paragraph("Gain: metric with every quantizer on except this layer's, minus the quantized metric (what keeping "
                   "this layer in float recovers). Loss: FP32 metric minus the metric with only this layer quantized.")
    page.figure(_sensitivity_figure(result), FIGURE_IDS[0])
    page.heading("Output SQNR along the network")
    page.paragraph("Each layer's output, sim vs FP32, with every quantizer up to it on (in execution order).")
    page.figure(_sqnr_figure(result), FIGURE_IDS[1])
    page.heading("Per-channel weight ranges")
    page.figure(_weight_range_figure(result), FIGURE_IDS[2])
    page.heading("Histograms and clipping ranges")
    page.paragraph("FP32 values each quantizer sees (activations: subsampled on the analysis batches); dashed lines: "
                   "the encoding's clipping range.")
    page.figure(_histogram_figure(result), FIGURE_IDS[3])
    page.heading("Layers")
    page.table([
        Column("layer", lambda layer: layer.name),
        Column("op", lambda layer: layer.op_type),
        Column("only this quantized", lambda layer: layer.only_this_quantized, "{:.4f}", numeric=True),
        Column("all but this quantized", lambda layer: layer.all_but_this_quantized, "{:.4f}", numeric=True),
        Column("output SQNR (dB)", lambda layer: _finite(layer.output_sqnr_db), "{:.1f}", numeric=True),
        Column("max clipped", lambda layer: max((a.clipped_fraction for a in layer.activation_ranges), default=None),
               "{:.2%}", numeric=True),
        Column("weight channel spread", lambda layer: max((channel_spread(w) for w in layer.weight_ranges),
                                                          default=None), "{:.1f}", numeric=True),
        Column("ONNX output", lambda layer: ", ".join(layer.onnx_outputs)),
    ], result.layers)
    page.heading("Reproduce a figure")
    page.preformatted(
        "sim = analyzer.sim; metric = analyzer.metric\n"
        "sim.set_enabled(False); sim.set_enabled(True, pattern=layer_name)      # only this layer quantized\n"
        "metric(sim.model)\n"
        "sim.set_enabled(True); sim.set_enabled(False, pattern=layer_name)      # all but this layer\n"
        "metric(sim.model)"
    )
    return page.write(path)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _sensitivity_figure(result: AnalysisResult) -> go.Figure:
    ranked = result.ranking()
    names = [layer.name for layer in ranked]
    figure = go.Figure([
        go.Bar(name="gain if kept in float", y=names, orientation="h",
               x=[layer.gain_if_kept_in_float(result.quantized_metric) for layer in ranked]),
        go.Bar(name="loss if only this is quantized", y=names, orientation="h",
               x=[result.fp32_metric - layer.only_this_quantized for layer in ranked]),
    ])
    figure.update_layout(barmode="group", height=max(320, 22 * len(names) + 120), xaxis_title=result.metric_name,
                         yaxis={"autorange": "reversed"}, margin={"l": 180})
    return figure


def _sqnr_figure(result: AnalysisResult) -> go.Figure:
    layers = [layer for layer in result.layers if _finite(layer.output_sqnr_db) is not None]
    figure = go.Figure(go.Scatter(
        x=[layer.name for layer in layers], y=[layer.output_sqnr_db for layer in layers], mode="lines+markers",
        customdata=[layer.op_type for layer in layers],
        hovertemplate="%{x} (%{customdata}): %{y:.1f} dB<extra></extra>",
    ))
    figure.update_layout(yaxis_title="output SQNR (dB)", height=420)
    return figure


def _dropdown(figure: go.Figure, labels: list[str], traces_per_option: int) -> None:
    """Show one option's traces at a time, chosen in a dropdown."""
    total = traces_per_option * len(labels)
    buttons = []
    for index, label in enumerate(labels):
        visible = [index * traces_per_option <= t < (index + 1) * traces_per_option for t in range(total)]
        buttons.append({"label": label, "method": "update", "args": [{"visible": visible}, {"title.text": label}]})
    for trace_index, trace in enumerate(figure.data):
        trace.visible = trace_index < traces_per_option
    figure.update_layout(updatemenus=[{"buttons": buttons, "x": 0, "xanchor": "left", "y": 1.15, "yanchor": "top"}],
                         title={"text": labels[0] if labels else "", "x": 0.5})


def _weight_range_figure(result: AnalysisResult) -> go.Figure:
    figure = go.Figure()
    labels = []
    for layer in result.layers:
        for ranges in layer.weight_ranges:
            encoding = layer.encodings.get(ranges.quantizer)
            channels = list(range(len(ranges.channel_min)))
            figure.add_trace(go.Bar(x=channels, base=ranges.channel_min,
                                    y=[hi - lo for lo, hi in zip(ranges.channel_min, ranges.channel_max, strict=True)],
                                    name="channel min..max", customdata=list(zip(ranges.channel_min,
                                                                                  ranges.channel_max, strict=True)),
                                    hovertemplate="channel %{x}: %{customdata[0]:.4g} .. %{customdata[1]:.4g}"
                                                  "<extra></extra>"))
            low, high = _per_channel(encoding, "min", len(channels)), _per_channel(encoding, "max", len(channels))
            figure.add_trace(go.Scatter(x=channels, y=low, name="encoding min", mode="lines",
                                        line={"dash": "dash", "color": "firebrick"}))
            figure.add_trace(go.Scatter(x=channels, y=high, name="encoding max", mode="lines",
                                        line={"dash": "dash", "color": "firebrick"}))
            labels.append(f"{ranges.quantizer} {tuple(ranges.shape)}")
    _dropdown(figure, labels, 3)
    figure.update_layout(xaxis_title="output channel", yaxis_title="value", height=460)
    return figure


def _per_channel(encoding: dict | None, key: str, channels: int) -> list[float | None]:
    """The encoding's ``min`` or ``max`` per output channel; per block, the channel's widest block range."""
    if encoding is None:
        return [None] * channels
    value = encoding[key]
    if not isinstance(value, list):
        return [value] * channels
    if encoding.get("granularity", {}).get("kind") not in ("per_block", "lpbq"):
        return value if len(value) == channels else [value] * channels
    rows = torch.tensor(value).movedim(encoding["granularity"]["channel_axis"], 0).reshape(channels, -1)
    return (rows.amin(dim=1) if key == "min" else rows.amax(dim=1)).tolist()


def _histogram_figure(result: AnalysisResult) -> go.Figure:
    figure = go.Figure()
    labels = []
    entries: list[tuple[str, Histogram, dict | None]] = []
    for layer in _with_input(result):
        entries += [(a.quantizer, a.histogram, layer.encodings.get(a.quantizer)) for a in layer.activation_ranges]
        entries += [(w.quantizer, w.histogram, layer.encodings.get(w.quantizer)) for w in layer.weight_ranges]
    for quantizer, histogram, encoding in entries:
        centers = [(a + b) / 2 for a, b in zip(histogram.edges[:-1], histogram.edges[1:], strict=True)]
        figure.add_trace(go.Bar(x=centers, y=histogram.counts, name="values", marker_color="steelblue",
                                width=histogram.edges[1] - histogram.edges[0]))
        peak = max(histogram.counts, default=1)
        low = min(_as_list(encoding["min"])) if encoding else None
        high = max(_as_list(encoding["max"])) if encoding else None
        figure.add_trace(go.Scatter(x=[low, low, None, high, high], y=[0, peak, None, 0, peak], mode="lines",
                                    name="clipping range", line={"dash": "dash", "color": "firebrick"}))
        labels.append(quantizer)
    _dropdown(figure, labels, 2)
    figure.update_layout(xaxis_title="value", yaxis_title="count", height=460, bargap=0)
    return figure


def _with_input(result: AnalysisResult) -> list[LayerAnalysis]:
    return ([result.model_input] if result.model_input is not None else []) + result.layers


def _as_list(value: float | list[float]) -> list[float]:
    return value if isinstance(value, list) else [value]
