"""One self-contained HTML page of a run (show): the data-quality verdict, the run's conditions
and versions, the configuration table, every plot and the failures.

Nothing is fetched from a network: styles are inline, plots are PNGs inlined as ``data:`` URIs,
tables are HTML tables. The page is a value built from what the report already computed
(:class:`HtmlSection` items); :func:`render_html` returns the text and the caller writes it.

Example:
    >>> import polars as pl
    >>> page = render_html("run x", verdict={"verdict": "clean", "reasons": []},
    ...                    sections=[HtmlSection("Configurations", table=pl.DataFrame({"config": ["a"], "ms": [1.5]}))])
    >>> "<table" in page and "clean" in page and "http" not in page.split("<body>")[1]
    True
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#1d1d1f;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f5f5f7}
td.text,th.text{text-align:left}.verdict{display:inline-block;padding:.2em .7em;border-radius:4px;
font-weight:600;color:#fff}.clean{background:#2e7d32}.noisy{background:#ef6c00}.contended{background:#c62828}
.incomplete{background:#6a1b9a}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.note{color:#555}.scroll{overflow-x:auto;max-width:100%}pre{background:#f5f5f7;padding:.6em;overflow:auto}
td.text{white-space:nowrap}th{white-space:nowrap}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:0 1.5em;align-items:start}
.facts h3{font-size:1em;margin:.8em 0 .2em}.facts table{width:100%;font-size:.9em}
.facts td{text-align:left;overflow-wrap:anywhere}.facts td:first-child{white-space:nowrap;color:#555}
"""


@dataclass
class HtmlSection:
    """One part of the page: a heading, then a note, a table and/or a PNG."""

    title: str
    table: pl.DataFrame | None = None
    image: Path | None = None
    note: str | None = None


def _cell(value: Any) -> tuple[str, bool]:
    """(text, is_text) of one table cell; numbers get thousands separators and 3 significant
    decimals at most, text is escaped."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return ("yes" if value else "no"), True
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value), False
        return (f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.1f}"), False
    if isinstance(value, int):
        return f"{value:,}", False
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value, default=str)), True
    return html.escape(str(value)), True


def table_html(frame: pl.DataFrame) -> str:
    """An HTML table of `frame` (every row and column: a page scrolls, a terminal does not)."""
    text_cols = {c for c, t in frame.schema.items() if t in (pl.Utf8, pl.Boolean) or isinstance(t, pl.List)}
    head = "".join(f'<th class="{"text" if c in text_cols else ""}">{html.escape(c)}</th>' for c in frame.columns)
    rows = []
    for row in frame.iter_rows():
        cells = []
        for value in row:
            text, is_text = _cell(value)
            cells.append(f'<td class="text">{text}</td>' if is_text else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            '</table></div>')


def _image_html(path: Path, title: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of nested mappings; lists stay whole."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k in sorted(value, key=str):
            out += _flat(value[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, value)]


def _leaf(value: Any) -> str:
    if value is None:
        return '<span class="note">none</span>'
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value, default=str))
    return html.escape(str(value))


def facts_html(facts: dict[str, Any]) -> str:
    """The run's conditions and versions as small two-column tables side by side, one per
    top-level key (nested keys dotted, every value shown, none as "none"); a top-level text
    (the command) as one line of code.

    Example:
        >>> out = facts_html({"command": "molmo-latency profile", "versions": {"torch": "2.13", "cuda": None}})
        >>> "<code>molmo-latency profile</code>" in out and "<td>cuda</td><td><span" in out
        True
    """
    lines, groups = [], []
    for key in facts:
        value = facts[key]
        if isinstance(value, dict):
            rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_leaf(v)}</td></tr>" for k, v in _flat(value))
            groups.append(f"<div><h3>{html.escape(str(key))}</h3><table>{rows}</table></div>")
        else:
            lines.append(f"<p>{html.escape(str(key))}: <code>{html.escape(str(value))}</code></p>")
    return "".join(lines) + (f'<div class="facts">{"".join(groups)}</div>' if groups else "")


def render_html(title: str, *, verdict: dict[str, Any] | None = None, conditions: dict[str, Any] | None = None,
                sections: list[HtmlSection] = ()) -> str:
    """The page as text: title, verdict and its reasons, conditions, then each section."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if verdict is not None:
        word = str(verdict.get("verdict", "unknown"))
        parts.append(f'<p>Data quality: <span class="verdict {html.escape(word)}" id="verdict">{html.escape(word)}</span></p>')
        reasons = verdict.get("reasons") or []
        if reasons:
            parts.append("<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")
    if conditions:
        parts.append("<h2>Conditions and versions</h2>" + facts_html(conditions))
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.table is not None:
            parts.append(table_html(section.table))
        if section.image is not None:
            parts.append(_image_html(section.image, section.title))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
