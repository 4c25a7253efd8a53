"""The one table renderer (show): every terminal table of every command goes through
:func:`print_frame`, and every cell is written by :func:`format_cell`.

:func:`print_frame` is width-aware: by default it shows a command's compact columns and, when
even those do not fit, wraps the widest text column, then leaves out the rightmost columns and
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
err_console = Console(stderr=True, soft_wrap=True)  # messages stay one line in a log

_state = {"wide": False}


def set_wide(wide: bool) -> None:
    """``--wide``: every table shows all its columns at their natural width."""
    _state["wide"] = bool(wide)


def set_width(width: int | None) -> None:
    """Render into `width` columns (None: back to :func:`terminal_width`)."""
    console.width = terminal_width() if width is None else width


def format_cell(value: Any, digits: int = 3, *, thousands: bool = False) -> str:
    """One table cell: ``-`` for a missing value, floats with `digits` decimals (``nan``, ``inf``
    spelled out), everything else as its text; `thousands` puts separators into numbers.

    >>> format_cell(None), format_cell(1234.5678), format_cell(1234.5678, 1, thousands=True), format_cell(12345, thousands=True)
    ('-', '1234.568', '1,234.6', '12,345')
    >>> format_cell(float("nan")), format_cell(float("-inf")), format_cell("x"), format_cell(-0.0001, 2)
    ('nan', '-inf', 'x', '0.00')
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"
        if text.startswith("-") and not text.strip("-0.,"):
            text = text[1:]  # a value that rounds to zero is 0, not -0
        return text
    if thousands and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)



MAX_WORD_KEPT = 30  # words up to this long are kept whole when a text column wraps


def plural(n: int, singular: str, many: str | None = None) -> str:
    """``n`` and the noun, singular for 1: ``1 run directory``, ``2 run directories``.

    >>> plural(1, "run directory", "run directories"), plural(3, "GPU activity", "GPU activities")
    ('1 run directory', '3 GPU activities')
    """
    return f"{n:,} {singular if n == 1 else (many or singular + 's')}"


def _table(df: pl.DataFrame, cols: list[str], title: str, digits: int, max_rows: int,
           caption: str | None, squeeze: dict[str, int] | None = None) -> Table:
    """The rich table; `squeeze` maps a text column to the width its cells wrap at."""
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    squeeze = squeeze or {}
    for c in cols:
        numeric = df.schema[c].is_numeric()
        if c in squeeze:  # free text (a cause, a name): wraps inside its cell, nothing is cut
            table.add_column(c, justify="left", no_wrap=False, overflow="fold", width=squeeze[c])
        else:  # numbers and the rest keep their full width
            table.add_column(c, justify="right" if numeric else "left", no_wrap=True)
    for row in df.select(cols).head(max_rows).iter_rows():
        table.add_row(*[Text(format_cell(v, digits)) for v in row])  # plain text: names like [param|x] stay
    notes = [caption] if caption else []
    if df.height > max_rows:
        notes.append(f"... {df.height - max_rows} more rows (use --json for all)")
    table.caption = "; ".join(notes) or None
    table.caption_justify = "left"
    return table


def _natural_width(table: Table) -> int:
    """The width `table` takes when nothing limits it."""
    return console.measure(table, options=console.options.update(max_width=100_000)).maximum


# A text column is wrapped, rather than the table cut, only down to this many characters.
MIN_TEXT_WIDTH = 16


def _squeeze(df: pl.DataFrame, cols: list[str], digits: int, max_rows: int, excess: int) -> dict[str, int] | None:
    """Wrap the widest text column so that the table loses `excess` columns of width, or None
    when that would leave it narrower than MIN_TEXT_WIDTH (or its header)."""
    best, best_width, best_word = None, 0, 0
    for c in cols:
        if df.schema[c] != pl.String:
            continue
        cells = [format_cell(v, digits) for v in df[c].head(max_rows).to_list()]
        width = max([len(c), *map(len, cells)])
        if width > best_width:
            word = max((len(w) for cell in cells for w in cell.split()), default=0)
            best, best_width, best_word = c, width, word
    # a word no longer than MAX_WORD_KEPT (e.g. ProfilerStep#100) is never cut in the middle
    if best is None or best_width - excess < max(MIN_TEXT_WIDTH, len(best), min(best_word, MAX_WORD_KEPT)):
        return None
    return {best: best_width - excess}


def print_frame(df: pl.DataFrame, title: str, *, columns: Sequence[str] | None = None,
                digits: int = 3, max_rows: int = 60, compact: Sequence[str] | None = None) -> None:
    """A polars frame as a table (the first `max_rows` rows), fitted to the terminal.

    `columns` picks and orders the columns (default: all); `compact` is the subset shown unless
    ``--wide`` is on. Without ``--wide`` a table wider than the terminal first wraps its widest
    text column, then leaves out columns from the right and names them in the caption; numbers
    are never cut. With ``--wide`` the table is printed at its natural width."""
    cols = [c for c in (columns or df.columns) if c in df.columns]
    if compact is not None and not _state["wide"]:
        keep = set(compact)
        cols = [c for c in cols if c in keep]
    table = _table(df, cols, title, digits, max_rows, None)
    natural = _natural_width(table)
    if _state["wide"]:
        Console(width=max(natural, console.width), soft_wrap=False,
                force_terminal=console.is_terminal).print(table)
        return
    hidden: list[str] = [] if compact is None else [c for c in (columns or df.columns)
                                                    if c in df.columns and c not in cols]
    squeeze = None
    while natural > console.width and len(cols) > 1:
        squeeze = _squeeze(df, cols, digits, max_rows, natural - console.width)
        if squeeze is not None:
            break
        hidden.insert(0, cols.pop())
        natural = _natural_width(_table(df, cols, title, digits, max_rows, None))
    caption = None
    if hidden:
        caption = (f"{len(hidden)} more column{'s' if len(hidden) > 1 else ''} with --wide "
                   f"({', '.join(hidden[:6])}{', ...' if len(hidden) > 6 else ''}) or --json")
    console.print(_table(df, cols, title, digits, max_rows, caption, squeeze))
