"""Terminal output shared by the commands (show only): the one table renderer and the one JSON
writer.

Every terminal table goes through :func:`print_frame`. It is width-aware: by default it shows a
command's compact columns and, when even those do not fit, leaves out the rightmost columns and
says which (a table is never squeezed into ``9...`` cells); ``--wide`` (:func:`set_wide`) shows
every column at its natural width. The width is the terminal's; piped, it follows ``COLUMNS``,
else :data:`DEFAULT_WIDTH`.

Example:
    >>> import polars as pl
    >>> set_width(40)
    >>> print_frame(pl.DataFrame({"config": ["c1"], "total ms": [12.3456], "n": [5]}), "Runs")  # doctest: +NORMALIZE_WHITESPACE
    Runs
    ┏━━━━━━━━┳━━━━━━━━━━┳━━━┓
    ┃ config ┃ total ms ┃ n ┃
    ┡━━━━━━━━╇━━━━━━━━━━╇━━━┩
    │ c1     │   12.346 │ 5 │
    └────────┴──────────┴───┘
    >>> set_width(None)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any, Sequence

import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

# The width of piped output when COLUMNS is not set (a terminal window, not a 540-column line).
DEFAULT_WIDTH = 100


def terminal_width() -> int:
    """Columns to render into: ``COLUMNS`` when set, else the terminal's width, else
    :data:`DEFAULT_WIDTH` (piped output)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


console = Console(stderr=False, soft_wrap=False, width=terminal_width())
err_console = Console(stderr=True)

_state = {"wide": False}


def set_wide(wide: bool) -> None:
    """``--wide``: every table shows all its columns at their natural width."""
    _state["wide"] = bool(wide)


def set_width(width: int | None) -> None:
    """Render into `width` columns (None: back to :func:`terminal_width`)."""
    console.width = terminal_width() if width is None else width


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def _table(df: pl.DataFrame, cols: list[str], title: str, digits: int, max_rows: int,
           caption: str | None, wrap_text: bool = False) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for c in cols:
        numeric = df.schema[c].is_numeric()
        # numbers never wrap; with wrap_text, free text (a cause, a message) wraps inside its cell
        table.add_column(c, justify="right" if numeric else "left",
                         no_wrap=numeric or not (wrap_text and df.schema[c] == pl.String))
    for row in df.select(cols).head(max_rows).iter_rows():
        table.add_row(*[Text(_cell(v, digits)) for v in row])  # plain text: names like [param|x] stay
    notes = [caption] if caption else []
    if df.height > max_rows:
        notes.append(f"... {df.height - max_rows} more rows (use --json for all)")
    table.caption = "; ".join(notes) or None
    table.caption_justify = "left"
    return table


def _natural_width(table: Table) -> int:
    """The width `table` takes when nothing limits it."""
    return console.measure(table, options=console.options.update(max_width=100_000)).maximum


def _min_width(table: Table) -> int:
    return console.measure(table, options=console.options.update(max_width=100_000)).minimum


def print_frame(df: pl.DataFrame, title: str, *, columns: Sequence[str] | None = None,
                digits: int = 3, max_rows: int = 60, compact: Sequence[str] | None = None) -> None:
    """A polars frame as a table (the first `max_rows` rows), fitted to the terminal.

    `columns` picks and orders the columns (default: all); `compact` is the subset shown unless
    ``--wide`` is on. Without ``--wide``, columns that do not fit are left out from the right and
    named in the caption; with it, the table is printed at its natural width."""
    cols = [c for c in (columns or df.columns) if c in df.columns]
    if compact is not None and not _state["wide"]:
        keep = set(compact)
        cols = [c for c in cols if c in keep]
    table = _table(df, cols, title, digits, max_rows, None)
    natural = _natural_width(table)
    if _state["wide"]:
        Console(width=max(natural, console.width), soft_wrap=False, color_system=console.color_system and "auto",
                force_terminal=console.is_terminal).print(table)
        return
    hidden: list[str] = [] if compact is None else [c for c in (columns or df.columns)
                                                    if c in df.columns and c not in cols]
    wrap = False
    while natural > console.width and len(cols) > 1:
        if _min_width(_table(df, cols, title, digits, max_rows, None, wrap_text=True)) <= console.width:
            wrap = True  # long text cells wrap; every column stays
            break
        hidden.insert(0, cols.pop())
        table = _table(df, cols, title, digits, max_rows, None)
        natural = _natural_width(table)
    caption = None
    if hidden:
        caption = (f"{len(hidden)} more column{'s' if len(hidden) > 1 else ''} with --wide "
                   f"({', '.join(hidden[:6])}{', ...' if len(hidden) > 6 else ''}) or --json")
    console.print(_table(df, cols, title, digits, max_rows, caption, wrap_text=wrap))


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
