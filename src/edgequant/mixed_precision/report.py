"""HTML page of a mixed-precision search on the shared report kit: the front, the sensitivities, the choice."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from edgequant.analysis.fidelity import fidelity_to_sqnr_db
from edgequant.mixed_precision.result import MixedPrecisionResult
from edgequant.report import Column, Page

FIGURE_IDS = ("mp-pareto", "mp-sensitivity")


def write_report(result: MixedPrecisionResult, path: Path) -> Path:
    page = Page("edgequant mixed precision")
    page.paragraph(
        f"Candidates (param_bw, output_bw): {result.candidates}; cost model: {result.cost}; {len(result.groups)} "
        f"quantizer groups; {result.eval_calls} eval_fn calls."
    )
    page.verdict(
        f"Chosen: metric {result.metric:.4f} (FP32 {result.fp32_metric:.4f}, target {result.target:.4f}), relative "
        f"BitOps {result.relative_bitops:.3f}, relative memory {result.relative_memory:.3f}; effective bits: "
        f"{result.effective_bits['bitops']:.2f} (BitOps: sqrt of the MAC-weighted weight x activation bits), "
        f"{result.effective_bits['memory']:.2f} (memory: bits per stored weight and activation value).",
        ok=result.met_target,
    )
    if result.tie_break:
        taken = next(i for i, p in enumerate(result.tie_break) if p.choice == result.choice)
        page.paragraph(f"Tie-break at equal {result.cost}: from the front's pick, {len(result.tie_break) - 1} moves "
                       f"save only the other cost; the first {taken} kept the target and were taken.")
    page.heading("Pareto front")
    page.paragraph("Greedy front from the sensitivities (predicted output fidelity to FP32, right axis) and the points "
                   "the bisection evaluated with eval_fn (left axis); the star is the chosen configuration.")
    page.figure(_pareto_figure(result), FIGURE_IDS[0])
    page.heading("Per-group sensitivity")
    page.paragraph("Output fidelity to FP32 (1 - NMSE) with only this group lowered to the candidate, every other "
                   "group at the most accurate candidate; lower means more sensitive.")
    page.figure(_sensitivity_figure(result), FIGURE_IDS[1])
    rows = [(s.group, c, f) for s in result.sensitivities for c, f in s.fidelity.items()]
    page.table([
        Column("group", lambda row: row[0]),
        Column("candidate", lambda row: f"W{row[1][0]}A{row[1][1]}"),
        Column("fidelity", lambda row: row[2], "{:.5f}", numeric=True),
        Column("SQNR (dB)", lambda row: min(fidelity_to_sqnr_db(row[2]), 999.0), "{:.1f}", numeric=True),
    ], rows)
    page.heading("Chosen bit widths per layer")
    page.table([
        Column("layer", lambda row: row[0]),
        Column("group", lambda row: result.layer_groups.get(row[0], "")),
        Column("param bits", lambda row: row[1].get("param_bw"), numeric=True),
        Column("output bits", lambda row: row[1].get("output_bw"), numeric=True),
    ], sorted(result.layer_bitwidths.items()))
    return page.write(path)


def _pareto_figure(result: MixedPrecisionResult) -> go.Figure:
    figure = go.Figure()
    front = result.front
    figure.add_trace(go.Scatter(x=[p.relative_cost for p in front], y=[p.predicted_fidelity for p in front],
                                mode="lines+markers", name="greedy front (predicted fidelity)", yaxis="y2"))
    figure.add_trace(go.Scatter(x=[c for c, _ in result.pareto], y=[m for _, m in result.pareto], mode="markers",
                                name="evaluated (eval_fn)", marker={"size": 10}))
    figure.add_trace(go.Scatter(x=[result.relative_bitops if result.cost == "bitops" else result.relative_memory],
                                y=[result.metric], mode="markers", name="chosen",
                                marker={"symbol": "star", "size": 16, "color": "red"}))
    figure.add_hline(y=result.target, line_dash="dash", annotation_text="target")
    figure.update_layout(xaxis_title=f"relative {result.cost}", yaxis_title="eval_fn",
                         yaxis2={"title": "predicted fidelity", "overlaying": "y", "side": "right"})
    return figure


def _sensitivity_figure(result: MixedPrecisionResult) -> go.Figure:
    figure = go.Figure()
    for candidate in result.candidates:
        groups = [s.group for s in result.sensitivities if candidate in s.fidelity]
        values = [s.fidelity[candidate] for s in result.sensitivities if candidate in s.fidelity]
        figure.add_trace(go.Bar(x=groups, y=values, name=f"W{candidate[0]}A{candidate[1]}"))
    figure.update_layout(barmode="group", yaxis_title="output fidelity to FP32", xaxis_title="group")
    return figure
