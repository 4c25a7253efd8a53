"""Read Chrome/Kineto JSON traces (``torch.profiler`` ``export_chrome_trace``) into polars tables.

This module collects and holds; it does no analysis (see :mod:`molmo_latency.trace.attribution`).

Two layouts are read:

- the newer one (PyTorch 2.4 and later): a top-level ``baseTimeNanoseconds`` and event ``ts`` /
  ``dur`` in *fractional* microseconds relative to it (``"ts": 4203669604595.407``);
- the older one: ``ts`` / ``dur`` in absolute integer microseconds since the Unix epoch.

Either way every time in the tables is int64 nanoseconds since the Unix epoch
(``base_time_ns + ts`` in ns), so traces of both layouts compare directly.

Exact microsecond -> nanosecond conversion: a JSON number with at most three decimals (what
Kineto writes) is converted exactly. On the fast path the number is decoded as a double and the
integer and fractional parts are scaled separately, which is exact while ``|ts| < 2**43`` us
(about 101 days, true of every newer-layout trace: Kineto keeps ``ts`` relative for that reason)
and for integers up to 2**53. A chunk of events holding a fractional value beyond 2**43 us is
decoded again with the JSON number text parsed as a decimal (slow path, still exact).

Speed and memory: the file is read (and gunzipped) in ~1 MiB blocks; the ``traceEvents`` array
is cut into ~2 MiB chunks between two events (a candidate cut that falls inside a string or a
nested object leaves unbalanced brackets, fails to decode and is replaced by the next one) and
each chunk is decoded by msgspec into small structs tagged on ``ph``: flow, metadata and
instant events become empty structs, and of complete ("X") events only the fields we keep are
built. Each chunk becomes a polars frame per table at once, so memory holds about one chunk of
text and objects plus the tables, never the whole text or a Python object per event; its event
names are UInt32 codes into one dictionary per read, turned back into strings (views into the
distinct names, 16 bytes a row) when each table is put together from the chunks, column by
column, every chunk column freed once gathered. The text
around the array (header and tail) is decoded last as the metadata. Anything this streaming path
cannot read (a bare event list, an odd layout, any error) is read again from the whole text,
by a path that also splits per event when needed and names the offending event in its error.

Layout: this module holds the tables (:class:`KinetoTrace`) and puts them together;
``_text`` cuts the text into chunks of whole events; ``_events`` decodes a chunk into per-table
frames (msgspec shapes, category routing, exact nanoseconds).
"""

from __future__ import annotations

import gc
import os
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import polars as pl

from molmo_latency.errors import TraceError, TraceWarning  # noqa: F401 (TraceWarning: exported here too)
from molmo_latency.safe_fs import read_head as _read_file, regular_file
from molmo_latency.trace._checks import drop_impossible, median_start_ns, warn_skipped
from molmo_latency.trace._events import (
    _EXACT,
    _INT64_MAX,
    _INT64_MIN,
    _MISSING,
    _SKIPPED,
    _TABLES,
    _TIME_LIMIT_NS,
    _TOP_DECODER,
    GPU_ACTIVITY_KINDS,
    RUNTIME_KINDS,
    _one_line,
    _Top,
    names_column,
)
from molmo_latency.trace._text import _WHITESPACE, _decode_fast, _decode_slow, _NotFast, _stream

__all__ = [
    "GPU_ACTIVITY_KINDS",
    "RUNTIME_KINDS",
    "KinetoTrace",
    "TraceWarning",
    "read_kineto",
]


# --------------------------------------------------------------------------------------------
# What a trace holds.

_TABLE_SCHEMA = {  # every column a table can have; times int64 ns
    "name": pl.String,
    "kind": pl.String,
    "pid": pl.Int64,
    "tid": pl.Int64,
    "device": pl.Int64,
    "stream": pl.Int64,
    "correlation": pl.Int64,
    "external_id": pl.Int64,
    "start_ns": pl.Int64,
    "end_ns": pl.Int64,
    "dur_ns": pl.Int64,
    "grid": pl.Array(pl.Int64, 3),
    "block": pl.Array(pl.Int64, 3),
}

#: Columns of each table (all times int64 ns since the Unix epoch).
GPU_COLUMNS = ("name", "kind", "device", "stream", "correlation", "external_id",
               "start_ns", "end_ns", "dur_ns", "grid", "block")
RUNTIME_COLUMNS = ("name", "kind", "pid", "tid", "correlation", "external_id",
                   "start_ns", "end_ns", "dur_ns")
CPU_COLUMNS = ("name", "pid", "tid", "external_id", "start_ns", "end_ns", "dur_ns")
GPU_ANNOTATION_COLUMNS = ("name", "device", "stream", "external_id", "start_ns", "end_ns", "dur_ns")
_COLUMNS = {
    "gpu": GPU_COLUMNS,
    "runtime": RUNTIME_COLUMNS,
    "cpu_ops": CPU_COLUMNS,
    "annotations": CPU_COLUMNS,
    "gpu_annotations": GPU_ANNOTATION_COLUMNS,
}


@dataclass(frozen=True)
class KinetoTrace:
    """One Kineto trace as polars tables; every time is int64 ns since the Unix epoch.

    Tables (one row per event, sorted by ``start_ns``):

    - ``gpu``: GPU activities (kernels, memcpy, memset): ``name, kind, device, stream,
      correlation, external_id, start_ns, end_ns, dur_ns, grid, block``;
    - ``runtime``: host launch calls (``cuda_runtime`` / ``cuda_driver``; ``hip*`` on ROCm):
      ``name, kind, pid, tid, correlation, external_id, start_ns, end_ns, dur_ns``;
    - ``cpu_ops``: ``cpu_op`` events; ``annotations``: CPU ``user_annotation`` events
      (``record_function`` ranges); both ``name, pid, tid, external_id, start_ns, end_ns, dur_ns``;
    - ``gpu_annotations``: ``gpu_user_annotation`` events: ``name, device, stream, external_id,
      start_ns, end_ns, dur_ns``.

    Metadata: ``path``, ``layout`` (``"relative"``: newer, ``baseTimeNanoseconds`` +
    fractional us; ``"absolute"``: older, integer us since the epoch), ``base_time_ns`` (0 for
    the older layout), ``device_properties`` (tuple of dicts as written by Kineto),
    ``distributed_info`` (dict or None), ``trace_name``, ``events`` (how many events the file
    holds), ``skipped`` (events set aside, never summed) and ``skipped_reasons`` (how many for
    each reason, keys of :data:`molmo_latency.trace._checks.SKIP_REASONS`: ``missing_time``,
    ``negative_duration``, ``negative_time``, ``outside_time_span``, ``duplicate``,
    ``bad_phase``, ``missing_category``, ``unknown_category``, ...).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> trace.gpu.height, trace.layout, trace.gpu["dur_ns"].dtype
        (9, 'relative', Int64)
    """

    path: str
    layout: str
    base_time_ns: int
    gpu: pl.DataFrame
    runtime: pl.DataFrame
    cpu_ops: pl.DataFrame
    annotations: pl.DataFrame
    gpu_annotations: pl.DataFrame
    device_properties: tuple[dict, ...] = ()
    distributed_info: dict | None = None
    trace_name: str | None = None
    events: int = 0
    skipped: int = 0
    metadata: dict = field(default_factory=dict)
    skipped_reasons: dict = field(default_factory=dict)

    @property
    def devices(self) -> list[int]:
        """Device indices that ran at least one GPU activity.

        Example:
            >>> import tempfile
            >>> from molmo_latency.trace._demo import write_demo_trace
            >>> read_kineto(write_demo_trace(tempfile.mkdtemp())).devices
            [0]
        """
        return sorted(self.gpu["device"].drop_nulls().unique().to_list())


# --------------------------------------------------------------------------------------------
# Reading.


def read_kineto(path: str | os.PathLike) -> KinetoTrace:
    """Read a Chrome/Kineto trace (``.json`` or ``.json.gz``) written by ``torch.profiler``.

    Raises :class:`~molmo_latency.errors.TraceError` (one line: the file, the problem, what to
    do) for a file that cannot be read as a trace: missing, not a regular file (a FIFO or a
    device, refused before it is opened), empty, truncated or corrupt gzip, invalid UTF-8 or JSON,
    JSON nested thousands deep, more than :data:`MAX_WHOLE_TEXT_BYTES` of text that cannot be
    streamed (a gzip bomb), no ``traceEvents``, a field of the wrong type or an integer beyond
    int64; a file that is plainly something else is named for what it looks like (TOML/text,
    XML/HTML, binary data, ...). A valid trace without GPU activity (CPU-only) gives empty GPU
    tables and a :class:`TraceWarning`. Events whose times cannot be true, duplicates and complete
    events of a missing or unknown phase or category are set aside, counted by reason in
    ``skipped_reasons`` (:mod:`molmo_latency.trace._checks`) and listed in one warning.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> trace.gpu.select("name", "start_ns", "dur_ns").row(0)
        ('vision_patch_embed_gemm', 1700000000001002500, 8250)
        >>> trace.annotations["name"].to_list()[:3]
        ['request[0]', 'vision', 'projector']
    """
    path = regular_file(path, "a .json or .json.gz trace file", TraceError)
    was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived containers: the cyclic GC would dominate decoding
    try:
        try:
            meta, chunks, n_events = _stream(path)
        except _NotFast:  # anything unusual: read it whole; that path also words every error
            meta, chunks, n_events = _parse(path, [_read_bytes(path)])
        return _assemble(path, meta, chunks, n_events)
    except RecursionError:  # msgspec's own depth limit (JSON nested thousands deep)
        raise TraceError(f"{path}: JSON nested too deeply to be a trace (thousands of levels); the file is "
                         "corrupt or not from torch.profiler") from None
    finally:
        if was_enabled:
            gc.enable()


#: The most text the whole-text path holds in memory (after gunzip): a trace that is larger and
#: cannot be streamed (a bare event list, an odd layout), or a gzip bomb, is refused.
MAX_WHOLE_TEXT_BYTES = 512 << 20


def _read_bytes(path: Path) -> bytes:
    data = _read_file(path, ".json or .json.gz trace", "a", MAX_WHOLE_TEXT_BYTES + 1)
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(path, data)
    if len(data) > MAX_WHOLE_TEXT_BYTES:
        raise TraceError(f"{path}: over {MAX_WHOLE_TEXT_BYTES >> 20} MiB of JSON that cannot be read in "
                         "pieces (truncated, or not the layout torch.profiler writes); re-copy or export the trace again")
    if not data.strip():
        raise TraceError(f"{path}: is empty; export the trace again (torch.profiler export_chrome_trace)")
    looks = _looks_like(data)
    if looks:
        raise TraceError(f"{path}: looks like {looks}, not a Kineto JSON trace or an nsys SQLite export; pass a "
                         "trace written by torch.profiler (export_chrome_trace) or `nsys export --type sqlite`")
    return data


def _gunzip(path: Path, data: bytes) -> bytes:
    """`data` gunzipped (every member), refused past MAX_WHOLE_TEXT_BYTES (a gzip bomb)."""
    out, size = [], 0
    try:
        while data:
            inflate = zlib.decompressobj(wbits=31)
            while True:
                block = inflate.decompress(data, 1 << 24)
                out.append(block)
                size += len(block)
                if size > MAX_WHOLE_TEXT_BYTES:
                    raise TraceError(
                        f"{path}: expands to over {MAX_WHOLE_TEXT_BYTES >> 20} MiB of text that cannot be read "
                        "in pieces (a gzip bomb, or not the layout torch.profiler writes); pass the trace torch "
                        "wrote"
                    )
                data = inflate.unconsumed_tail
                if inflate.eof or not data:
                    break
            if not inflate.eof:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            data = inflate.unused_data
    except (EOFError, zlib.error) as exc:
        raise TraceError(f"{path}: truncated or corrupt gzip ({exc}); re-export or re-copy the trace") from None
    return b"".join(out)


_TOML_LINE = re.compile(rb"^[ \t]*(\[[A-Za-z0-9_.\- \"']+\]|[A-Za-z0-9_\-.\"]+[ \t]*=)", re.MULTILINE)
_MAGICS = ((b"\x89PNG", "a PNG image"), (b"PK\x03\x04", "a zip archive"), (b"%PDF", "a PDF document"),
           (b"\x28\xb5\x2f\xfd", "zstd-compressed data"), (b"BZh", "bzip2-compressed data"),
           (b"\xfd7zXZ", "xz-compressed data"), (b"SQLite format 3", "a SQLite database"))


def _looks_like(data: bytes) -> str | None:
    """What a file that cannot be a JSON trace looks like (``"TOML/text"``, ``"binary data"``, ...);
    None when it starts like JSON (its own errors then say what is wrong)."""
    head = data[:4096]
    for magic, what in _MAGICS:
        if head.startswith(magic):
            return what
    text = head.lstrip(_WHITESPACE)
    if b"\x00" in head:
        return "binary data"
    if text[:1] in (b"{", b"[") and not (text[:1] == b"[" and _TOML_LINE.match(text)):
        return None
    if _TOML_LINE.search(head):
        return "TOML/text"
    if text[:1] == b"<":
        return "XML/HTML"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the 4 KiB mark
            return "binary data"
    return None if text[:1].isdigit() or text[:1] in b'"-tfn' else "text"


def _parse(path: Path, holder: list[bytes]) -> tuple[_Top, list[dict[str, pl.DataFrame]], int]:
    """The whole text in memory (the fallback): metadata, per-chunk frames, event count.

    `holder` holds the only reference to the JSON text, so it is freed once decoded.
    """
    data = holder.pop()
    first = data.lstrip(_WHITESPACE)[:1]
    if first == b"[":  # Chrome "JSON Array Format": a bare list of events
        meta, array = _Top(), memoryview(data)
    else:
        try:
            meta = _TOP_DECODER.decode(data)
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); the file is corrupt") from None
        except msgspec.ValidationError as exc:
            raise TraceError(
                f"{path}: not a Chrome/Kineto trace ({_one_line(exc)}); expected a JSON object with "
                "a 'traceEvents' list"
            ) from None
        except msgspec.DecodeError as exc:
            raise TraceError(f"{path}: not valid JSON ({_one_line(exc)}); the file is truncated or corrupt") from None
        if meta.traceEvents is msgspec.UNSET:
            raise TraceError(
                f"{path}: has no 'traceEvents' list, so it is not a Chrome/Kineto trace; pass a file "
                "written by torch.profiler (export_chrome_trace)"
            )
        array = memoryview(meta.traceEvents)
        if bytes(array[:1]) != b"[":
            array.release()
            raise TraceError(f"{path}: 'traceEvents' is not a list; the trace is corrupt or not from torch.profiler")
    del data

    try:
        chunks, n_events = _decode_fast(array)
    except _NotFast:
        chunks, n_events = _decode_slow(path, array)
    array.release()
    meta.traceEvents = msgspec.UNSET  # the last reference to the JSON text
    return meta, chunks, n_events


def _assemble(path: Path, meta: _Top, chunks: list[dict[str, pl.DataFrame]], n_events: int) -> KinetoTrace:
    """The trace from its metadata and the per-chunk frames of its events."""
    base_time_ns = meta.baseTimeNanoseconds
    if base_time_ns is None:
        base_time_ns, layout = 0, "absolute"
    elif type(base_time_ns) is int and _INT64_MIN <= base_time_ns <= _INT64_MAX:
        layout = "relative"
    else:
        raise TraceError(
            f"{path}: baseTimeNanoseconds is {str(base_time_ns)[:40]!r}, not an int64 nanosecond "
            "time; the trace header is corrupt"
        )

    names = names_column(chunks.names)  # what the chunks' name codes stand for
    skipped: Counter = Counter()
    missing: Counter = Counter()
    for chunk in chunks:
        skipped.update(chunk.pop(_SKIPPED, {}))
        missing.update(chunk.pop(_MISSING, {}))
    # chunks decoded exactly (times as decimals) come after the others, as they always have
    chunks = [c for c in chunks if not c.get(_EXACT)] + [c for c in chunks if c.get(_EXACT)]
    tables = {}
    for name in _TABLES:
        parts = [chunk.pop(name) for chunk in chunks if name in chunk]
        tables[name] = _finish(path, name, parts, base_time_ns, names)
        del parts
        if missing[name]:
            skipped["missing_time"] += missing[name]
    median_ns = median_start_ns(list(tables.values()))
    tables = {name: drop_impossible(table, median_ns, skipped, device_required=name == "gpu")
              for name, table in tables.items()}
    gpu = tables["gpu"]

    warn_skipped(path, skipped, stacklevel=3)
    if gpu.height == 0:
        cause = "a CPU-only trace, or one recorded without ProfilerActivity.CUDA" + (
            " (or its GPU events are among the skipped ones)" if skipped else "")
        warnings.warn(
            f"{path}: no GPU activities (kernel, gpu_memcpy, gpu_memset); {cause}: GPU tables are empty",
            TraceWarning,
            stacklevel=3,
        )

    device_properties = meta.deviceProperties
    device_properties = tuple(d for d in device_properties if isinstance(d, dict)) if isinstance(
        device_properties, list) else ()
    distributed = meta.distributedInfo if isinstance(meta.distributedInfo, dict) else None
    return KinetoTrace(
        path=str(path),
        layout=layout,
        base_time_ns=base_time_ns,
        gpu=gpu,
        runtime=tables["runtime"],
        cpu_ops=tables["cpu_ops"],
        annotations=tables["annotations"],
        gpu_annotations=tables["gpu_annotations"],
        device_properties=device_properties,
        distributed_info=distributed,
        trace_name=meta.traceName if isinstance(meta.traceName, str) else None,
        events=n_events,
        skipped=sum(skipped.values()),
        skipped_reasons=dict(skipped),
        metadata={"schemaVersion": meta.schemaVersion},
    )



def _finish(path: Path, name: str, parts: list[pl.DataFrame], base_time_ns: int, names: pl.Series) -> pl.DataFrame:
    """One table from its per-chunk frames (already settled by ``_events._settle``: int64 ns
    relative times, the table's columns, names as codes into `names`): times since the epoch,
    sorted by start."""
    columns = _COLUMNS[name]
    if not parts:
        return pl.DataFrame(schema={c: _TABLE_SCHEMA[c] for c in columns})
    frame = pl.concat(parts, how="vertical", rechunk=False) if len(parts) > 1 else parts[0]
    del parts[:]
    if frame.height:  # checked with Python ints, so nothing below can overflow int64
        lo, hi = frame["ts"].min() + base_time_ns, frame["ts"].max() + base_time_ns
        longest = max(abs(frame["dur"].min()), abs(frame["dur"].max()))
        if lo < -_TIME_LIMIT_NS or hi > _TIME_LIMIT_NS or longest > _TIME_LIMIT_NS:
            raise TraceError(
                f"{path}: event times beyond the int64 nanosecond range (base + ts up to {hi} ns); "
                "the trace is corrupt"
            )
    # Sorted by start (stable: equal starts keep their order), built one column at a time from
    # the chunks, each chunk column released once gathered: the read holds the table about
    # once, not the chunks and a sorted copy of every column at the same time.
    order = frame.select(pl.int_range(pl.len(), dtype=pl.Int64).sort_by("ts", maintain_order=True)).to_series()
    source = {c: frame[c] for c in frame.columns}
    del frame
    starts = (source.pop("ts").gather(order) + base_time_ns).set_sorted()  # it is: later sorts are free
    durations = source.pop("dur").gather(order)
    out = {}
    for c in columns:
        if c == "start_ns":
            out[c] = starts.alias(c)
        elif c == "end_ns":
            out[c] = (starts + durations).alias(c)
        elif c == "dur_ns":
            out[c] = durations.alias(c)
        elif c == "name":  # one string view per row into the read's distinct names
            out[c] = names.gather(source.pop(c).gather(order)).alias(c)
        else:
            column = source.pop(c)
            if isinstance(column.dtype, pl.Array):  # grid / block: gathered from many chunks, polars
                column = column.rechunk()  # holds ~2.5x the column meanwhile; from one, no more than it
            out[c] = column.gather(order)
    return pl.DataFrame(out)
