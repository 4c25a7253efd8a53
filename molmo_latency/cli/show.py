"""Terminal output helpers shared by the commands (show only)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Sequence

import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

import os

def _width() -> int | None:
    """Wide tables when writing to a file or pipe (rich would assume 80 columns)."""
    if sys.stdout.isatty():
        return None
    return max(200, int(os.environ.get("COLUMNS", "0") or 0))


console = Console(stderr=False, soft_wrap=False, width=_width())
err_console = Console(stderr=True)


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def print_frame(df: pl.DataFrame, title: str, *, columns: Sequence[str] | None = None,
                digits: int = 3, max_rows: int = 60) -> None:
    """A polars frame as a rich table (the first `max_rows` rows)."""
    cols = [c for c in (columns or df.columns) if c in df.columns]
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for c in cols:
        numeric = df.schema[c].is_numeric()
        table.add_column(c, justify="right" if numeric else "left", no_wrap=True)
    for row in df.select(cols).head(max_rows).iter_rows():
        table.add_row(*[Text(_cell(v, digits)) for v in row])  # plain text: names like [param|x] stay
    if df.height > max_rows:
        table.caption = f"... {df.height - max_rows} more rows (use --json for all)"
    console.print(table)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_default, allow_nan=False) + "\n")


def _default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pl.DataFrame):
        return frame_records(value)
    return str(value)


def frame_records(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with NaN/inf turned into null (valid JSON)."""
    out = []
    for row in df.iter_rows(named=True):
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return out
