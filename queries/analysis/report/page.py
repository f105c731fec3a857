"""The report's HTML: one self-contained page (styles, data and Vega's JavaScript inlined) that
opens from disk with no network.

Sections are built as HTML strings around chart placeholders; one script at the end draws every
chart with vega-embed's SVG renderer and marks `<body data-rendered="true">` when all are drawn
(or `data-rendered="error"` with the message in the console).
"""

from __future__ import annotations

import functools
import html
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

CSS = """
:root { --ink: #1d2430; --muted: #5b6575; --rule: #dde2ea; --accent: #2166ac; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #f6f7f9; }
header { background: #1d2430; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c9d1dc; }
nav { background: #fff; border-bottom: 1px solid var(--rule); padding: 8px 32px; }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 600; }
main { padding: 8px 32px 48px; max-width: 1500px; }
section > h2 { margin: 28px 0 6px; font-size: 19px; }
p.explain { margin: 0 0 12px; color: var(--muted); max-width: 980px; }
.card { background: #fff; border: 1px solid var(--rule); border-radius: 6px; padding: 14px 18px;
        margin: 12px 0; overflow-x: auto; }
.card h3 { margin: 0 0 4px; font-size: 15px; }
.card p.meta { margin: 0 0 10px; color: var(--muted); font-size: 12.5px; }
.note { color: #8a4b00; }
.row { display: flex; gap: 18px; align-items: flex-start; }
.row > * { flex: 0 0 auto; }
.beside table { font-size: 12px; }
.beside p.legend { margin: 0; }
p.legend { margin: 4px 0 0; color: var(--muted); font-size: 12.5px; max-width: 980px; }
.note.warning { background: #fff4e0; border-left: 3px solid #d98300; padding: 4px 8px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--rule); text-align: left;
         vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { display: inline-block; padding: 2px 8px; border-radius: 4px; font-weight: 600; }
.verdict.illusion { background: #fde2e0; color: #a12a1f; }
.verdict.clear { background: #e2f0e4; color: #22622f; }
.verdict.unknown { background: #eceff3; color: #4a5361; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 32px; }
.chart g.mark-text.role-mark text { pointer-events: none; }
#vg-tooltip-element table td { white-space: pre-wrap; max-width: 520px; }
"""

EMBED_OPTIONS = {
    "renderer": "svg",
    "actions": {"export": True, "source": False, "compiled": False, "editor": False},
}

SCRIPT = """
const charts = %s;
const options = %s;
Promise.all(Object.entries(charts).map(([id, spec]) =>
  vegaEmbed(document.getElementById(id), spec, options)))
  .then(() => { document.body.dataset.rendered = "true"; })
  .catch((error) => { document.body.dataset.rendered = "error"; console.error(error); });
"""


@functools.cache
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script, from the vl-convert package (offline),
    at the Vega-Lite version Altair writes its specifications for."""
    import altair as alt
    import vl_convert

    version = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return vl_convert.javascript_bundle(vl_version=version)


def script_json(value: Any) -> str:
    """JSON safe inside <script>: '<' escaped so no string can close the element."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def table(df: pl.DataFrame, columns: dict[str, str], numbers: Iterable[str] = ()) -> str:
    """An HTML table of `columns` (name → heading); `numbers` are right-aligned, floats
    written with 6 significant digits."""
    numeric = set(numbers)

    def cell(name: str, value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        css = ' class="num"' if name in numeric else ""
        return f"<td{css}>{esc(value)}</td>"

    head = "".join(f"<th>{esc(title)}</th>" for title in columns.values())
    body = "".join(
        "<tr>" + "".join(cell(name, row[name]) for name in columns) + "</tr>"
        for row in df.select(list(columns)).to_dicts()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Page:
    """The page being built: sections of HTML and the chart specifications they place."""

    title: str
    subtitle: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)
    charts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def chart(self, element_id: str, spec: dict[str, Any], kind: str, source: int) -> str:
        """A placeholder where `spec` is drawn; `data-kind`/`data-source` name what it shows."""
        self.charts[element_id] = spec
        return (
            f'<div class="chart" id="{esc(element_id)}" data-kind="{esc(kind)}" '
            f'data-source="{source}"></div>'
        )

    def section(
        self, anchor: str, heading: str, explain: str, parts: list[str], empty: str = ""
    ) -> None:
        """What the section shows and how to read it, then its parts, or `empty` (naming the
        command that would fill it) when it has none."""
        body = "".join(parts) or f'<p class="note">{esc(empty)}</p>'
        self.sections.append((anchor, heading, f'<p class="explain">{esc(explain)}</p>{body}'))

    def html(self, footer: str) -> str:
        nav = "".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in self.sections)
        body = "".join(
            f'<section id="{a}"><h2>{esc(h)}</h2>{content}</section>'
            for a, h, content in self.sections
        )
        script = SCRIPT % (script_json(self.charts), script_json(EMBED_OPTIONS))
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style>"
            f"<script>{vega_bundle()}</script></head>"
            f"<body><header><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main><footer>{footer}</footer>"
            f"<script>{script}</script></body></html>\n"
        )


def card(heading: str, meta: str, content: str) -> str:
    return f'<div class="card"><h3>{esc(heading)}</h3><p class="meta">{meta}</p>{content}</div>'
