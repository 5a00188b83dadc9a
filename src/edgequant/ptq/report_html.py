"""AutoQuant's diagnostics page: one self-contained HTML file (inline CSS, no scripts, no CDN).

It has to open on an air-gapped workstation and be attachable to a ticket, hence no external resources;
``<details>`` elements give collapsible layer lists without JavaScript.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgequant.ptq.autoquant import AutoQuantResult

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.met td { background: #e6f6e6; }
tr.best td { font-weight: bold; }
tr.diagnostic td { color: #666; font-style: italic; }
.verdict { padding: 0.8em; border-radius: 4px; }
.ok { background: #e6f6e6; } .fail { background: #fbeaea; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
"""


def _metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def render_report(result: AutoQuantResult) -> str:
    """The whole page as a string."""
    verdict_class = "ok" if result.target_met else "fail"
    verdict = (
        f"Target met by <b>{escape(result.best_step)}</b>: {_metric(result.best_metric)} "
        f"(FP32 {_metric(result.fp32_metric)}, target ≥ {_metric(result.target_metric)})."
        if result.target_met else
        f"No configuration met the target {_metric(result.target_metric)}; best was "
        f"<b>{escape(result.best_step)}</b> with {_metric(result.best_metric)} (FP32 {_metric(result.fp32_metric)})."
    )
    rows = []
    for step in result.steps:
        classes = [c for c, on in (("met", step.meets_target), ("best", step.name == result.best_step),
                                   ("diagnostic", step.diagnostic)) if on]
        layers = ""
        if step.layers:
            items = "".join(f"<li>{escape(layer)}</li>" for layer in step.layers)
            layers = f"<details><summary>{len(step.layers)} layers</summary><ul>{items}</ul></details>"
        drop = "—" if step.metric is None else f"{result.fp32_metric - step.metric:+.4f}"
        rows.append(
            f"<tr class='{' '.join(classes)}'><td>{escape(step.name)}</td><td>{escape(step.description)}</td>"
            f"<td class='num'>{_metric(step.metric)}</td><td class='num'>{drop}</td>"
            f"<td class='num'>{step.seconds:.2f}</td><td>{'cached' if step.cached else 'computed'}</td>"
            f"<td>{layers}</td></tr>"
        )
    sections = [
        f"<h1>edgequant AutoQuant report</h1><p class='verdict {verdict_class}'>{verdict}</p>",
        "<h2>Steps</h2><table><tr><th>step</th><th>what was done</th><th>metric</th><th>drop vs FP32</th>"
        "<th>time (s)</th><th>run</th><th>layers affected</th></tr>" + "".join(rows) + "</table>",
        "<p>Rows in italics are diagnostics (not candidates); green rows meet the target.</p>",
    ]
    if result.sensitivity:
        sens_rows = "".join(
            f"<tr><td>{escape(name)}</td><td class='num'>{_metric(metric)}</td>"
            f"<td class='num'>{metric - result.best_metric:+.4f}</td></tr>"
            for name, metric in result.sensitivity
        )
        sections.append(
            "<h2>Per-layer sensitivity</h2><p>Metric of the best sim with one layer's quantizers disabled "
            "(most sensitive first).</p><table><tr><th>layer kept in float</th><th>metric</th><th>gain</th></tr>"
            + sens_rows + "</table>"
        )
    if result.recommendation:
        sections.append(f"<h2>What to try next</h2><pre>{escape(result.recommendation)}</pre>")
    sections.append(
        f"<h2>Outputs</h2><p>Best sim state (encodings and weights, <code>QuantSim.load</code>): "
        f"<code>{escape(str(result.encodings_path))}</code></p>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>AutoQuant report</title>"
        f"<style>{_STYLE}</style></head><body>" + "\n".join(sections) + "</body></html>\n"
    )


def write_report(result: AutoQuantResult, path: Path) -> Path:
    path.write_text(render_report(result), encoding="utf-8")
    return path
