"""`molmo-latency trace summary`, the command itself without the Typer machinery: what it shows
(the JSON document, the tables and their cells) and :func:`run_summary`; :mod:`.trace_cmd`
declares it to Typer, and :func:`direct_summary` runs it straight from the command line (the
command users wait for most: neither Typer, click nor pydantic is imported on its way).

This module only shows: cells are formatted here (thousands separators, long kernel names cut
after their meaningful part) and every table goes through the one renderer,
:func:`molmo_latency.show.print_frame`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl

    from molmo_latency.trace.nsys_sql import ExportSummary
    from molmo_latency.trace.summary import TraceSummary

#: Longest name shown in a table cell (``--wide``: no limit); ``--json`` always has full names.
NAME_WIDTH = 60


def _us(ns: int | float | None) -> float | None:
    return None if ns is None else ns / 1000


def summary_document(summary: TraceSummary, warned: list[str]) -> dict[str, Any]:
    """The JSON document of `trace summary --json` (times in microseconds, names in full).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto, summarize
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> doc = summary_document(summarize(read_kineto(write_demo_trace(tempfile.mkdtemp()))), [])
        >>> doc["gpu"][0]["busy_us"], doc["kernels"][0]["name"], doc["annotations"][0]["kernels"]
        (43.375, 'flash_fwd_kernel', 3)
    """
    trace = summary.trace
    names = {d.get("id"): d.get("name") for d in trace.device_properties}

    def part(key: str, rows):  # a part not computed is null (``computed`` lists those that were)
        return None if key not in summary.computed else rows()

    return {
        "trace": {
            "path": trace.path,
            "layout": trace.layout,
            "base_time_ns": trace.base_time_ns,
            "events": trace.events,
            "gpu_activities": trace.gpu.height,
            "runtime_calls": trace.runtime.height,
            "cpu_ops": trace.cpu_ops.height,
            "annotations": trace.annotations.height,
            "skipped_events": trace.skipped,
            "skipped_reasons": dict(trace.skipped_reasons),
            "metadata": trace.metadata,
        },
        "computed": list(summary.computed),
        "gpu": part("gpu", lambda: [_device_json(r, names) for r in summary.devices.iter_rows(named=True)]),
        "categories": part("categories", lambda: [_category_json(r) for r in summary.categories.iter_rows(named=True)]),
        "kernels": part("kernels", lambda: [_kernel_json(r) for r in summary.kernels.iter_rows(named=True)]),
        "annotations": part("annotations", lambda: [
            {
                "name": r["name"],
                "instances": r["instances"],
                "kernels": r["gpu_activities"],
                "gpu_kernel_us": _us(r["gpu_kernel_ns"]),
                "gpu_busy_us": _us(r["gpu_busy_ns"]),
                "gpu_span_us": _us(r["gpu_span_ns"]),
                "gpu_idle_us": _us(r["gpu_idle_ns"]),
                "launch_delay_mean_us": _us(r["launch_delay_mean_ns"]),
            }
            for r in summary.annotations.iter_rows(named=True)
        ]),
        "cpu_ops": part("cpu_ops", lambda: [
            {
                "name": r["name"],
                "category": r["category"],
                "count": r["count"],
                "total_us": _us(r["total_ns"]),
                "mean_us": _us(r["total_ns"] / r["count"]),
            }
            for r in summary.cpu_ops.iter_rows(named=True)
        ]),
        "modules": None if summary.modules is None else [
            {"phase": r["phase"], "module_kind": r["module_kind"], "instances": r["instances"],
             "kernels": r["gpu_activities"], "gpu_kernel_us": r["gpu_kernel_ms"] * 1000}
            for r in summary.modules.iter_rows(named=True)
        ],
        "unattributed_activities": summary.unattributed,
        "unlinked_activities": summary.unlinked,
        "warnings": warned,
    }


def _device_json(r: dict, names: dict) -> dict[str, Any]:
    return {"device": r["device"], "name": names.get(r["device"]), "activities": r["gpu_activities"],
            "kernel_us": _us(r["gpu_kernel_ns"]), "busy_us": _us(r["gpu_busy_ns"]), "span_us": _us(r["gpu_span_ns"]),
            "idle_us": _us(r["gpu_idle_ns"])}


def _category_json(r: dict) -> dict[str, Any]:
    return {"category": r["category"], "count": r["count"], "total_us": _us(r["total_ns"])}


def _kernel_json(r: dict) -> dict[str, Any]:
    return {"name": r["name"], "kind": r["kind"], "category": r["category"], "count": r["count"],
            "total_us": _us(r["total_ns"]), "mean_us": _us(r["total_ns"] / r["count"]),
            "min_us": _us(r["min_ns"]), "max_us": _us(r["max_ns"])}


def export_summary_document(summary: ExportSummary, warned: list[str]) -> dict[str, Any]:
    """The JSON document of `trace summary --json --parts ...` of an nsys export computed by SQLite
    (:func:`molmo_latency.trace.nsys_sql.summarize_export`): the keys of :func:`summary_document`
    for the parts in ``computed``, and counts of the tables not read (runtime calls, NVTX ranges)
    null; ``skipped_reasons`` counts GPU activities (``tables_checked``).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace.nsys_sql import summarize_export
        >>> from molmo_latency.trace._nsys_demo import write_demo_export
        >>> doc = export_summary_document(summarize_export(write_demo_export(tempfile.mkdtemp())), [])
        >>> doc["computed"], doc["kernels"][0]["name"], doc["trace"]["annotations"]
        (['gpu', 'categories', 'kernels'], 'flash_fwd_kernel', None)
    """
    names = {d.get("id"): d.get("name") for d in summary.device_properties}
    doc: dict[str, Any] = {
        "trace": {
            "path": summary.path,
            "layout": summary.layout,
            "base_time_ns": summary.base_time_ns,
            "events": summary.events,
            "gpu_activities": summary.gpu_activities,
            "runtime_calls": None,
            "cpu_ops": None,
            "annotations": None,
            "skipped_events": summary.skipped,
            "skipped_reasons": dict(summary.skipped_reasons),
            "tables_checked": list(summary.tables_checked),
            "metadata": summary.metadata,
        },
        "computed": list(summary.computed),
    }
    if "gpu" in summary.computed:
        doc["gpu"] = [_device_json(r, names) for r in summary.devices]
    if "categories" in summary.computed:
        doc["categories"] = [_category_json(r) for r in summary.categories]
    if "kernels" in summary.computed:
        doc["kernels"] = [_kernel_json(r) for r in summary.kernels]
    doc["warnings"] = warned
    return doc


# ------------------------------------------------------------------------------------------
# Cells.

_RETURN_TYPE = re.compile(r"^(?:void|int|float|double|unsigned|auto)\s+(?=[\w:<(])")


_OPEN, _CLOSE = "<([", ">)]"


def _strip_arguments(text: str) -> str:
    """`text` without a trailing ``(...)`` argument list (balanced; kept when it is the whole text)."""
    if not text.endswith(")"):
        return text
    depth = 0
    for i in range(len(text) - 1, -1, -1):
        depth += (text[i] in _CLOSE) - (text[i] in _OPEN)
        if depth == 0:
            return text[:i].rstrip() if i > 0 else text
    return text


def _collapse_nested(text: str) -> str:
    """Template arguments nested inside other template arguments shown as ``<…>``."""
    out, depth = [], 0
    for ch in text:
        if ch == "<":
            depth += 1
            if depth == 2:
                out.append("<\u2026")
            if depth >= 2:
                continue
        elif ch == ">" and depth:
            depth -= 1
            if depth >= 1:
                if depth == 1:
                    out.append(">")
                continue
        elif depth >= 2:
            continue
        out.append(ch)
    return "".join(out) if depth == 0 else text


def _drop_last_arguments(text: str, width: int) -> str:
    """Of a name ending in a template ``f<a, b, c>``, keep the first arguments that fit: ``f<a, …>``."""
    if not text.endswith(">"):
        return text
    depth, start = 0, None
    for i in range(len(text) - 1, -1, -1):
        depth += (text[i] in _CLOSE) - (text[i] in _OPEN)
        if depth == 0:
            start = i
            break
    if not start:
        return text
    args, depth, current = [], 0, []
    for ch in text[start + 1:-1]:
        depth += (ch in _OPEN) - (ch in _CLOSE)
        if ch == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    args.append("".join(current).strip())
    head = text[:start]
    while len(args) > 1 and len(text) > width:
        args.pop()
        text = f"{head}<{', '.join(args)}, \u2026>"
    return text


def short_name(name: str | None, width: int = NAME_WIDTH) -> str:
    """A kernel or range name cut after its meaningful part, at most `width` characters.

    A longer name loses, in turn, until it fits: the return type, the argument list, template
    arguments nested in template arguments (shown ``<…>``), the last template arguments (``, …``);
    only then is its end cut (``…``). A name that fits is left as is.

    Example:
        >>> short_name("void at::native::vectorized_elementwise_kernel<(int)4, "
        ...            "at::native::FillFunctor<float>, std::array<char *, 1>>(int, T2, T3)", 60)
        'at::native::vectorized_elementwise_kernel<(int)4, …>'
        >>> short_name("flash_fwd_kernel"), short_name("x" * 70, 10)
        ('flash_fwd_kernel', 'xxxxxxxxx…')
    """
    if name is None:
        return "-"
    text = name
    for step in (
        lambda t: _RETURN_TYPE.sub("", t),
        _strip_arguments,
        _collapse_nested,
        lambda t: _drop_last_arguments(t, width),
    ):
        if len(text) <= width:
            return text
        text = step(text) or text
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _cells(frame: pl.DataFrame, name_width: int | None) -> pl.DataFrame:
    """Every column as display strings (the one cell formatter,
    :func:`molmo_latency.show.format_cell`): numbers with thousands separators, floats with 3
    decimals, names cut by :func:`short_name` (when `name_width` is set), nulls as ``-``."""
    import polars as pl

    from molmo_latency.show import format_cell

    out = {}
    for column in frame.columns:
        values = frame[column].to_list()
        if column == "name" and name_width:
            cells = [short_name(v, name_width) for v in values]
        else:
            cells = [format_cell(v, 3, thousands=True) for v in values]
        out[column] = pl.Series(column, cells, dtype=pl.String)
    return pl.DataFrame(out)


def _show(frame: pl.DataFrame, title: str, name_width: int | None, max_rows: int = 60) -> None:
    from molmo_latency.show import print_frame

    print_frame(_cells(frame.head(max_rows), name_width), title, max_rows=max_rows)
    if frame.height > max_rows:
        from molmo_latency.show import console

        console.print(f"... {frame.height - max_rows} more rows (--top N, or --json for all)", highlight=False)


def _us_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """`*_ns` columns shown as `*_us`."""
    import polars as pl

    return frame.with_columns(
        (pl.col(c) / 1000).alias(c[:-3] + "_us") for c in frame.columns if c.endswith("_ns")
    ).drop([c for c in frame.columns if c.endswith("_ns")])




# ------------------------------------------------------------------------------------------
# The command.

#: The options of `trace summary`: flag -> (parameter, kind, default); :mod:`.trace_cmd` declares
#: the same to Typer (a test keeps them equal).
SUMMARY_OPTIONS = {
    "--json": ("as_json", "flag", False),
    "--top": ("top", "int", 25),
    "--wide": ("wide", "flag", False),
    "--parts": ("parts", "str", None),
    "--no-cache": ("no_cache", "flag", False),
    "--cache-dir": ("cache_dir", "path", None),
}
TOP_MIN = 1


def run_summary(path: Path, as_json: bool = False, top: int = 25, wide: bool = False, parts: str | None = None,
                no_cache: bool = False, cache_dir: Path | None = None) -> None:
    """`molmo-latency trace summary PATH [--json [--parts P,..]] [--top N] [--wide] [--no-cache] [--cache-dir D]`.

    Example:
        >>> import contextlib, io, json, tempfile
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> path = write_demo_trace(tempfile.mkdtemp())
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     run_summary(path, as_json=True, parts="kernels", no_cache=True)
        >>> doc = json.loads(out.getvalue())
        >>> doc["computed"], len(doc["kernels"]), doc["annotations"]
        (['kernels'], 8, None)
    """
    import warnings

    from molmo_latency.trace.load import load_trace, trace_format
    from molmo_latency.errors import TraceWarning

    chosen = _parse_parts(parts)
    fmt = trace_format(path)
    if not {"annotations", "cpu_ops"} & set(chosen) and fmt == "nsys":
        _export_summary(path, chosen, as_json, top, wide)  # SQLite alone: the GPU tables, aggregated there
        return

    def read():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TraceWarning)
            trace = load_trace(path, cache=False if no_cache else None, cache_dir=cache_dir,
                               tables=_tables_of(chosen))
        return trace, [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]

    if as_json:  # the whole document kept beside the trace's tables: a repeat prints it again
        import sys

        from molmo_latency.trace.cache import cached_document

        def document() -> str:
            from molmo_latency.show.json_doc import json_text
            from molmo_latency.trace.summary import summarize

            trace, warned = read()
            return json_text(summary_document(summarize(trace, list(chosen)), warned))

        text, _ = cached_document(path, fmt, f"trace summary --json --parts {','.join(chosen)} of {path}", document,
                                  version=summary_version(), cache_dir=cache_dir, enabled=False if no_cache else None)
        sys.stdout.write(text + "\n")
        return
    from molmo_latency.trace.summary import summarize

    trace, warned = read()
    # what the tables below show, and nothing else
    shown = ["gpu", "categories", "kernels", "annotations"] if trace.gpu.height else ["cpu_ops"]
    summary = summarize(trace, [p for p in shown if p in chosen])
    from molmo_latency.show import console, err_console, plural

    for message in warned:
        if "no GPU activities" in message and summary.trace.gpu.height == 0:
            continue  # the first line (and the CPU-op table's title) says so (--json keeps the warning)
        err_console.print(f"warning: {message}", highlight=False, soft_wrap=True)
    nsys = trace.layout == "nsys"
    ranges = "NVTX ranges" if nsys else "annotations"
    source = (f"nsys export, schema {trace.metadata.get('schema_version') or 'unknown'}" if nsys
              else f"{trace.layout} layout")
    console.print(
        f"[bold]{trace.path}[/bold]: {plural(trace.events, 'event')}, "
        f"{plural(trace.gpu.height, 'GPU activity', 'GPU activities')}"
        f"{'' if trace.gpu.height else ' (a CPU-only trace, or recorded without ProfilerActivity.CUDA)'}, "
        f"{trace.annotations.height:,} {ranges} ({source})",
        highlight=False,
    )
    width = None if wide else NAME_WIDTH
    from molmo_latency.show import set_wide

    set_wide(wide)  # --wide: every column too, not only whole names
    if trace.gpu.height:
        if "gpu" in chosen:
            _show(_us_columns(summary.devices.drop("gpu_start_ns", "gpu_end_ns")), "GPU per device (us)", width)
        if "categories" in chosen:
            _show(_us_columns(summary.categories), "GPU time per kernel category (us)", width)
        if "kernels" in chosen:
            _show(_us_columns(summary.kernels.drop("kind")),
                  f"Top kernels by total time (us, of {summary.kernels.height:,})", width, max_rows=top)
    elif "cpu_ops" in chosen and summary.cpu_ops.height:
        _show(_us_columns(summary.cpu_ops),
              f"No GPU activity: top CPU ops by total time (us, inclusive of nested ops; of "
              f"{summary.cpu_ops.height:,})", width, max_rows=top)
    if not trace.gpu.height:
        from molmo_latency.trace.summary import cpu_op_breakdown

        if trace.annotations.height:
            per_name = cpu_op_breakdown(trace.annotations)  # one row per annotation name
            _show(_us_columns(per_name.drop("category")),
                  f"{ranges.capitalize()} by total host time (us, inclusive of nested ones; of "
                  f"{per_name.height:,})", width, max_rows=top)
        return
    if "annotations" not in chosen:
        return
    shown = summary.annotations.drop("launch_delay_sum_ns", "launch_delay_max_ns")
    _show(
        _us_columns(shown).rename({"gpu_activities": "kernels"}),
        f"GPU activities charged to the innermost of the {ranges} that launched them (us)",
        width,
        max_rows=top,
    )
    if summary.modules is not None:
        import polars as pl

        _show(summary.modules.with_columns((pl.col("gpu_kernel_ms") * 1000).alias("gpu_kernel_us"))
              .drop("gpu_kernel_ms").rename({"gpu_activities": "kernels"}),
              "GPU time per phase and module kind (detail=\"modules\" ranges; other = in the phase, outside every "
              "module range; us)", width)
    console.print(
        f"{summary.unattributed:,} GPU activities outside every one of the {ranges}; "
        f"{summary.unlinked:,} without their launch call in the trace",
        highlight=False,
    )


def summary_version() -> str:
    """The version of what `trace summary --json` prints: a hash of the trace package's code (the
    readers, the summary, the attribution), of this module and of the JSON writer. A kept
    document is printed again only while this is the one it was computed with."""
    import pkgutil

    import molmo_latency.trace as trace
    from molmo_latency.trace.cache import reader_version

    modules = [f"{trace.__name__}.{m.name}" for m in pkgutil.iter_modules(trace.__path__)]
    return reader_version(*modules, "molmo_latency.cli.trace_summary", "molmo_latency.show.json_doc")


def _tables_of(parts: tuple[str, ...]) -> tuple[str, ...]:
    """The tables a cached read decodes at once for `parts` (the others only if used).

    Example:
        >>> _tables_of(("kernels",)), _tables_of(("kernels", "cpu_ops"))
        (('gpu',), ('gpu', 'cpu_ops'))
    """
    from molmo_latency.trace.parts import PART_TABLES

    return tuple(dict.fromkeys(t for p in parts for t in PART_TABLES[p]))


def _parse_parts(text: str | None) -> tuple[str, ...]:
    """``--parts``: None or ``all`` (every part) or a comma list of the summary's parts (in their order)."""
    from molmo_latency.errors import MolmoLatencyError
    from molmo_latency.trace.parts import SUMMARY_PARTS

    if text is None:
        return SUMMARY_PARTS
    words = [w.strip() for w in text.split(",") if w.strip()]
    if words == ["all"]:
        return SUMMARY_PARTS
    unknown = [w for w in words if w not in SUMMARY_PARTS]
    if unknown or not words:
        raise MolmoLatencyError(f"--parts {text}: not a part of the summary ({', '.join(unknown) or 'none given'}); "
                                f"pass all or a comma list of {', '.join(SUMMARY_PARTS)}")
    return tuple(p for p in SUMMARY_PARTS if p in words)


def _export_summary(path: Path, parts: tuple[str, ...], as_json: bool, top: int, wide: bool) -> None:
    """`trace summary` of an nsys export computed by SQLite (:func:`molmo_latency.trace.nsys_sql.summarize_export`):
    only the GPU tables are read; polars is imported only to render tables, never for ``--json``."""
    import warnings

    from molmo_latency.errors import TraceWarning
    from molmo_latency.trace.nsys_sql import summarize_export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        summary = summarize_export(path, parts)
    warned = [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]
    if as_json:
        from molmo_latency.show.json_doc import print_json

        print_json(export_summary_document(summary, warned))
        return
    import polars as pl

    from molmo_latency.show import console, err_console, plural, set_wide

    for message in warned:
        err_console.print(f"warning: {message}", highlight=False, soft_wrap=True)
    console.print(
        f"[bold]{summary.path}[/bold]: {plural(summary.gpu_activities, 'GPU activity', 'GPU activities')} "
        f"(nsys export, schema {summary.metadata.get('schema_version') or 'unknown'}; GPU tables only: "
        f"{', '.join(parts)})",
        highlight=False,
    )
    width = None if wide else NAME_WIDTH
    set_wide(wide)
    if not summary.gpu_activities:
        return
    if "gpu" in parts:
        devices = pl.DataFrame(summary.devices).drop("gpu_start_ns", "gpu_end_ns")
        _show(_us_columns(devices), "GPU per device (us)", width)
    if "categories" in parts:
        _show(_us_columns(pl.DataFrame(summary.categories)), "GPU time per kernel category (us)", width)
    if "kernels" in parts:
        kernels = pl.DataFrame(summary.kernels).drop("kind")
        _show(_us_columns(kernels), f"Top kernels by total time (us, of {kernels.height:,})", width, max_rows=top)


def direct_summary(args: list[str]):
    """`args` (what follows ``trace summary`` on the command line) read by :data:`SUMMARY_OPTIONS`
    and returned as a call of :func:`run_summary`; None for anything this plain reading does not
    cover (help, an unknown or malformed option, a bad value), which then goes through Typer and
    its messages.

    Example:
        >>> direct_summary(["t.json", "--json", "--top", "3"]).keywords["top"]
        3
        >>> direct_summary(["t.json", "--top", "0"]) is None, direct_summary(["--help"]) is None
        (True, True)
    """
    import functools

    values = {name: default for name, _, default in SUMMARY_OPTIONS.values()}
    found, i = [], 0
    while i < len(args):
        arg = args[i]
        key, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if key in SUMMARY_OPTIONS:
            name, kind, _ = SUMMARY_OPTIONS[key]
            if kind == "flag":
                if inline:
                    return None
                values[name] = True
            else:
                if not inline:
                    i += 1
                    if i == len(args):
                        return None
                    inline = args[i]
                if kind == "int":
                    try:
                        values[name] = int(inline)
                    except ValueError:
                        return None
                    if values[name] < TOP_MIN:
                        return None
                else:
                    values[name] = Path(inline) if kind == "path" else inline
        elif arg.startswith("-") and arg != "-":
            return None  # --help, an unknown option, `--`: Typer words it
        else:
            found.append(arg)
        i += 1
    if len(found) != 1:
        return None
    return functools.partial(run_summary, Path(found[0]), **values)
