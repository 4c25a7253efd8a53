"""Show: everything molmo-latency prints or draws, and nothing else (no analysis, no device).

- :mod:`~molmo_latency.show.table`: the one table renderer, :func:`print_frame` (width-aware,
  compact by default, ``--wide`` via :func:`set_wide`), its cell formatter :func:`format_cell`,
  and the consoles (:data:`console` for results, :data:`err_console` for messages).
- :mod:`~molmo_latency.show.json_doc`: the one JSON writer, :func:`print_json` (NaN/inf as null), and
  :func:`write_json` for documents written to a file (atomic).
- :mod:`~molmo_latency.show.html`: the one HTML page writer, :func:`render_html` (self-contained).
- :mod:`~molmo_latency.show.png`: the one PNG writer, :func:`write_png` (Agg, one style, atomic).
- The figures, one module per command: :mod:`~molmo_latency.show.report_plots` (``profile`` /
  ``report``), :mod:`~molmo_latency.show.waterfall` (``diff``), :mod:`~molmo_latency.show.explain_plot`
  (``explain``), :mod:`~molmo_latency.show.estimator_plots` (``fit``). Each takes frames (and
  plain dicts) that the analysis layer returned and imports matplotlib only when it draws.

Analysis (``diff``, ``estimator``, ``explain``, ``trace``, ``telemetry.aggregate``) never imports
this package or matplotlib; the CLI calls the analysis, then hands its result here.

Imports are lazy (a name is imported when first used): ``--json`` loads the JSON writer alone,
without rich or polars.

Example:
    >>> import polars as pl
    >>> from molmo_latency.show import print_frame, set_width
    >>> set_width(40)
    >>> print_frame(pl.DataFrame({"phase": ["decode"], "ms": [1.5]}), "Phases")  # doctest: +NORMALIZE_WHITESPACE
    Phases
    ┏━━━━━━━━┳━━━━━━━┓
    ┃ phase  ┃    ms ┃
    ┡━━━━━━━━╇━━━━━━━┩
    │ decode │ 1.500 │
    └────────┴───────┘
    >>> set_width(None)
"""

from molmo_latency._lazy import lazy_exports

#: Public name -> the module defining it (imported on first use).
_WHERE = {
    **dict.fromkeys(("frame_records", "json_text", "jsonable", "print_json", "write_json"), "json_doc"),
    "write_png": "png",
    **dict.fromkeys(("console", "err_console", "format_cell", "plural", "print_frame", "set_wide", "set_width"),
                    "table"),
}

__all__ = ["console", "err_console", "format_cell", "frame_records", "json_text", "jsonable", "print_frame",
           "plural", "print_json", "set_wide", "set_width", "write_json", "write_png"]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
