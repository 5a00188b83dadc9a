"""A self-contained HTML page built from neutral pieces: headings, paragraphs, tables of rows, figures.

Reports must open on an air-gapped workstation and be attachable to a ticket, so the page has no external
resource: CSS is inline, and interactive figures are Plotly figures whose JavaScript is inlined once per page.
``<details>`` elements give collapsible lists without JavaScript.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.good td { background: #e6f6e6; }
tr.strong td { font-weight: bold; }
tr.muted td { color: #666; font-style: italic; }
.verdict { padding: 0.8em; border-radius: 4px; }
.ok { background: #e6f6e6; } .fail { background: #fbeaea; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
.figure { margin: 1em 0; }
"""


@dataclass
class Column:
    """A table column: header, how to read a row's cell, and how to show it (numbers right-aligned)."""

    header: str
    value: Callable[[Any], Any]
    format: str = "{}"
    numeric: bool = False

    def cell(self, row: Any) -> str:
        value = self.value(row)
        if value is None:
            text = "—"
        elif isinstance(value, Markup):
            text = value.html
        else:
            text = escape(self.format.format(value))
        return f"<td class='num'>{text}</td>" if self.numeric else f"<td>{text}</td>"


@dataclass
class Markup:
    """Trusted HTML made by this kit (e.g. a collapsible list), passed through a table cell unescaped."""

    html: str


def collapsible(summary: str, items: Iterable[str]) -> Markup:
    """A ``<details>`` list: one line until clicked."""
    entries = "".join(f"<li>{escape(item)}</li>" for item in items)
    return Markup(f"<details><summary>{escape(summary)}</summary><ul>{entries}</ul></details>")


class Page:
    """Sections appended in reading order, then written as one file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._sections: list[str] = [f"<h1>{escape(title)}</h1>"]
        self._plotly_included = False

    def heading(self, text: str) -> None:
        self._sections.append(f"<h2>{escape(text)}</h2>")

    def paragraph(self, text: str, css_class: str = "") -> None:
        self._sections.append(f"<p class='{css_class}'>{escape(text)}</p>")

    def verdict(self, text: str, ok: bool) -> None:
        self.paragraph(text, f"verdict {'ok' if ok else 'fail'}")

    def preformatted(self, text: str) -> None:
        self._sections.append(f"<pre>{escape(text)}</pre>")

    def table(self, columns: Sequence[Column], rows: Iterable[Any],
              row_class: Callable[[Any], str] | None = None) -> None:
        """One row per item of ``rows``; ``row_class`` marks rows ``good``, ``strong`` or ``muted``."""
        header = "".join(f"<th>{escape(c.header)}</th>" for c in columns)
        body = []
        for row in rows:
            css = row_class(row) if row_class else ""
            body.append(f"<tr class='{css}'>" + "".join(c.cell(row) for c in columns) + "</tr>")
        self._sections.append(f"<table><tr>{header}</tr>{''.join(body)}</table>")

    def figure(self, figure: Any, element_id: str) -> None:
        """An interactive Plotly figure (zoom, hover), its library inlined with the first figure of the page."""
        html = figure.to_html(full_html=False, include_plotlyjs=not self._plotly_included, div_id=element_id,
                              config={"displaylogo": False})
        self._plotly_included = True
        self._sections.append(f"<div class='figure'>{html}</div>")

    def render(self) -> str:
        return (
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body>" + "\n".join(self._sections) + "</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.render(), encoding="utf-8")
        return path
