"""AutoQuant's diagnostics page, on the shared report kit."""

from __future__ import annotations

from pathlib import Path

from edgequant.report import Column, Page
from edgequant.report.page import collapsible
from edgequant.workflows.autoquant_result import AutoQuantResult, StepRecord


def _metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def write_report(result: AutoQuantResult, path: Path) -> Path:
    page = Page("edgequant AutoQuant report")
    if result.target_met:
        verdict = (f"Target met by {result.best_step}: {_metric(result.best_metric)} "
                   f"(FP32 {_metric(result.fp32_metric)}, target ≥ {_metric(result.target_metric)}).")
    else:
        verdict = (f"No configuration met the target {_metric(result.target_metric)}; best was {result.best_step} "
                   f"with {_metric(result.best_metric)} (FP32 {_metric(result.fp32_metric)}).")
    page.verdict(verdict, result.target_met)

    def row_class(step: StepRecord) -> str:
        marks = (("good", step.meets_target), ("strong", step.name == result.best_step), ("muted", step.diagnostic))
        return " ".join(css for css, on in marks if on)

    page.heading("Steps")
    page.table([
        Column("step", lambda s: s.name),
        Column("what was done", lambda s: s.description),
        Column("metric", lambda s: s.metric, "{:.4f}", numeric=True),
        Column("drop vs FP32", lambda s: None if s.metric is None else result.fp32_metric - s.metric, "{:+.4f}",
               numeric=True),
        Column("time (s)", lambda s: s.seconds, "{:.2f}", numeric=True),
        Column("run", lambda s: "cached" if s.cached else "computed"),
        Column("layers affected", lambda s: collapsible(f"{len(s.layers)} layers", s.layers) if s.layers else ""),
    ], result.steps, row_class)
    page.paragraph("Rows in italics are diagnostics (not candidates); green rows meet the target.")
    if result.sensitivity:
        page.heading("Per-layer sensitivity")
        page.paragraph("Metric of the best sim with one layer's quantizers disabled (most sensitive first).")
        page.table([
            Column("layer kept in float", lambda item: item[0]),
            Column("metric", lambda item: item[1], "{:.4f}", numeric=True),
            Column("gain", lambda item: item[1] - result.best_metric, "{:+.4f}", numeric=True),
        ], result.sensitivity)
    if result.recommendation:
        page.heading("What to try next")
        page.preformatted(result.recommendation)
    page.heading("Outputs")
    page.paragraph(f"Best sim state (encodings and weights, QuantSim.load): {result.sim_state_path}")
    return page.write(path)
