"""Read any trace the package knows, told apart by its content: a Kineto JSON trace
(``torch.profiler``) or an Nsight Systems SQLite export (``nsys export --type sqlite``).

    >>> import tempfile
    >>> from molmo_latency.trace import load_trace
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> from molmo_latency.trace._nsys_demo import write_demo_export
    >>> tmp = tempfile.mkdtemp()
    >>> load_trace(write_demo_trace(tmp)).layout, load_trace(write_demo_export(tmp)).layout
    ('relative', 'nsys')
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NSYS_SUFFIXES", "cached_trace", "load_trace", "trace_format"]

#: File names read as nsys exports even when their content is not SQLite (to say so clearly).
NSYS_SUFFIXES = (".sqlite", ".sqlite3", ".db", ".nsys-rep")


def trace_format(path: str | os.PathLike) -> str:
    """``"nsys"`` for a SQLite file (plain or gzipped) or a name ending in .sqlite / .db /
    .nsys-rep (``.gz`` or not), else ``"kineto"``. Reads at most the first bytes of the file.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace_format(write_demo_trace(tempfile.mkdtemp())), trace_format("report.sqlite.gz")
        ('kineto', 'nsys')
    """
    from molmo_latency.trace._format import is_sqlite

    if is_sqlite(path):
        return "nsys"
    name = Path(path).name.lower().removesuffix(".gz")
    return "nsys" if name.endswith(NSYS_SUFFIXES) else "kineto"


def load_trace(path: str | os.PathLike, *, cache: bool | None = False, cache_dir: str | os.PathLike | None = None,
               tables: tuple[str, ...] | None = None):
    """The :class:`~molmo_latency.trace.KinetoTrace` of a Kineto trace or an nsys export
    (:func:`~molmo_latency.trace.read_kineto` or :func:`~molmo_latency.trace.read_nsys`, chosen by
    :func:`trace_format`). Errors and warnings are theirs.

    `cache`: read the tables through the Parquet cache (:mod:`molmo_latency.trace.cache`):
    True, False, or None (on unless ``MOLMO_LATENCY_NO_CACHE`` is set); `cache_dir`: the cache
    folder (default ``.molmo-latency-cache`` beside the trace, or ``MOLMO_LATENCY_CACHE_DIR``);
    `tables`: the tables a cached read decodes at once (None: all); the others are decoded from
    the cache when first used (:class:`~molmo_latency.trace._deferred.DeferredFrame`; their
    ``height`` needs nothing read), so the trace is the same, only what is never used is not read.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._nsys_demo import write_demo_export
        >>> trace = load_trace(write_demo_export(tempfile.mkdtemp()))
        >>> trace.layout, trace.gpu.height
        ('nsys', 9)
    """
    if trace_format(path) == "nsys":
        from molmo_latency.trace.nsys import read_nsys

        if cache is False:
            return read_nsys(path)
        return cached_trace(path, "nsys", read_nsys, ("molmo_latency.trace.nsys",), cache_dir=cache_dir,
                            enabled=cache, tables=tables)
    from molmo_latency.trace.reader import read_kineto

    if cache is False:
        return read_kineto(path)
    return cached_trace(path, "kineto", read_kineto, _KINETO_MODULES, cache_dir=cache_dir, enabled=cache,
                        tables=tables)


#: The modules whose code decides what the Kineto reader returns (their source hashes version
#: its cache entries); the nsys reader's entries also hash these (it builds the same tables).
_KINETO_MODULES = ("molmo_latency.trace.reader", "molmo_latency.trace._events", "molmo_latency.trace._text",
                   "molmo_latency.trace._checks", "molmo_latency.trace.load")


def cached_trace(path: str | os.PathLike, name: str, read, modules: tuple[str, ...] = (), *,
                 cache_dir: str | os.PathLike | None = None, enabled: bool | None = None,
                 tables: tuple[str, ...] | None = None):
    """``read(path)`` (a trace reader returning a :class:`~molmo_latency.trace.KinetoTrace`-like
    dataclass of polars frames and JSON-able metadata) through the Parquet cache, as entry `name`
    versioned by the source of `modules` (and of the Kineto reader's). The reader's
    :class:`~molmo_latency.trace.TraceWarning` s are kept with the entry and warned again on
    every read, hit or not, so a cached read says what a fresh one says. `tables`: as in
    :func:`load_trace`.

    Example:
        >>> import tempfile, warnings
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> path = write_demo_trace(tempfile.mkdtemp())
        >>> cold = cached_trace(path, "kineto", read_kineto)
        >>> hit = cached_trace(path, "kineto", read_kineto)
        >>> hit.gpu.equals(cold.gpu), hit.events == cold.events, hit.path == str(path)
        (True, True, True)
    """
    import warnings

    from molmo_latency.trace.cache import cached_tables, reader_version
    from molmo_latency.trace.reader import TraceWarning

    path_text = str(Path(path))

    def build() -> dict:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trace = read(path)
        said = []
        for w in caught:
            if issubclass(w.category, TraceWarning):
                said.append(str(w.message).replace(path_text, "\0PATH\0"))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return _trace_tables(trace, said)

    version = reader_version(*dict.fromkeys(_KINETO_MODULES + tuple(modules)))
    load = None if tables is None else (*tables, _META)
    found = cached_tables(path, name, build, version=version, cache_dir=cache_dir, enabled=enabled, load=load)
    trace, said = _trace_from_tables(path_text, found)
    for message in said:
        warnings.warn(message.replace("\0PATH\0", path_text), TraceWarning, stacklevel=3)
    return trace


_META = "_meta"


def _trace_tables(trace, said: list[str]) -> dict:
    """A trace dataclass as tables: its frames, and one ``_meta`` row holding the rest as JSON."""
    import dataclasses
    import json

    import polars as pl

    tables, meta = {}, {}
    for f in dataclasses.fields(trace):
        value = getattr(trace, f.name)
        if isinstance(value, pl.DataFrame):
            tables[f.name] = value
        elif f.name != "path":
            meta[f.name] = [type(value).__name__, value]
    cls = type(trace)
    document = {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": meta, "warnings": said}
    tables[_META] = pl.DataFrame({"json": [json.dumps(document)]})
    return tables


def _trace_from_tables(path: str, tables: dict):
    import importlib
    import json

    from molmo_latency.trace._deferred import DeferredFrame

    document = json.loads(tables[_META]["json"][0])
    module, qualname = document["class"].split(":")
    cls = getattr(importlib.import_module(module), qualname)
    kwargs = {"path": path}
    for field, (kind, value) in document["fields"].items():
        kwargs[field] = tuple(value) if kind == "tuple" else value
    for name, frame in tables.items():
        if name == _META:
            continue
        kwargs[name] = frame.then(_sorted_flag) if isinstance(frame, DeferredFrame) else _sorted_flag(frame)
    return cls(**kwargs), document["warnings"]


def _sorted_flag(frame):
    """`frame` with the sorted flag of ``start_ns`` set when it is sorted (Parquet keeps no flag)."""
    if "start_ns" in frame.columns and frame["start_ns"].null_count() == 0 and frame["start_ns"].is_sorted():
        frame = frame.with_columns(frame["start_ns"].set_sorted())
    return frame
