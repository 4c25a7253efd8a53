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
text and objects plus the tables, never the whole text or a Python object per event. The text
around the array (header and tail) is decoded last as the metadata. Anything this streaming path
cannot read (a bare event list, an odd layout, any error) is read again from the whole text,
by a path that also splits per event when needed and names the offending event in its error.

Layout: this module holds the tables (:class:`KinetoTrace`) and puts them together;
``_text`` cuts the text into chunks of whole events; ``_events`` decodes a chunk into per-table
frames (msgspec shapes, category routing, exact nanoseconds).
"""

from __future__ import annotations

import gc
import gzip
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import polars as pl

from molmo_latency.errors import TraceError
from molmo_latency.trace._events import (
    _INT64_MAX,
    _INT64_MIN,
    _TABLES,
    _TIME_LIMIT_NS,
    _TOP_DECODER,
    GPU_ACTIVITY_KINDS,
    RUNTIME_KINDS,
    _one_line,
    _Top,
    _us_to_ns,
)
from molmo_latency.trace._text import _WHITESPACE, _decode_fast, _decode_slow, _NotFast, _stream

__all__ = [
    "GPU_ACTIVITY_KINDS",
    "RUNTIME_KINDS",
    "KinetoTrace",
    "TraceWarning",
    "read_kineto",
]


class TraceWarning(UserWarning):
    """A trace was read but something in it is missing or was skipped (e.g. no GPU events)."""


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
    holds) and ``skipped`` (events of kept categories dropped for lacking ``ts``/``dur``).

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
    do) for a file that cannot be read as a trace: missing, empty, truncated or corrupt gzip,
    invalid UTF-8 or JSON, no ``traceEvents``, a field of the wrong type or an integer beyond
    int64. A valid trace without GPU activity (CPU-only) gives empty GPU tables and a
    :class:`TraceWarning`; events of kept categories without ``ts``/``dur`` are skipped with a
    warning.

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
    path = Path(path)
    was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived containers: the cyclic GC would dominate decoding
    try:
        try:
            meta, chunks, n_events = _stream(path)
        except _NotFast:  # anything unusual: read it whole; that path also words every error
            meta, chunks, n_events = _parse(path, [_read_bytes(path)])
        return _assemble(path, meta, chunks, n_events)
    finally:
        if was_enabled:
            gc.enable()


def _read_file(path: Path, kind: str, article: str, limit: int = -1) -> bytes:
    """The first `limit` bytes of a trace file (all with -1); a missing file, a directory or an
    unreadable file is a one-line TraceError saying what to pass (`article` `kind`)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file; pass the path of {article} {kind}") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory; pass one {kind} file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and permissions") from None


def _read_bytes(path: Path) -> bytes:
    data = _read_file(path, ".json or .json.gz trace", "a")
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise TraceError(
                f"{path}: truncated or corrupt gzip ({exc}); re-export or re-copy the trace"
            ) from None
    if not data.strip():
        raise TraceError(f"{path}: is empty; export the trace again (torch.profiler export_chrome_trace)")
    return data


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

    skipped = 0
    tables = {}
    for name in _TABLES:
        parts = [chunk.pop(name) for chunk in chunks if name in chunk]
        table, missing = _finish(path, name, parts, base_time_ns)
        del parts
        tables[name] = table
        skipped += missing
    gpu = tables["gpu"]

    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} event(s) without a numeric 'ts' or 'dur'", TraceWarning,
            stacklevel=3,
        )
    if gpu.height == 0:
        warnings.warn(
            f"{path}: no GPU activities (kernel, gpu_memcpy, gpu_memset); a CPU-only trace, or one "
            "recorded without ProfilerActivity.CUDA: GPU tables are empty",
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
        skipped=skipped,
        metadata={"schemaVersion": meta.schemaVersion},
    )



def _finish(path: Path, name: str, parts: list[pl.DataFrame], base_time_ns: int) -> tuple[pl.DataFrame, int]:
    """One table from its per-chunk frames: drop events without times, ns since the epoch, sort."""
    columns = _COLUMNS[name]
    if not parts:
        return pl.DataFrame(schema={c: _TABLE_SCHEMA[c] for c in columns}), 0
    # Chunks decoded as doubles hold microseconds; those decoded exactly hold nanoseconds already.
    in_us = [p for p in parts if p["ts"].dtype == pl.Float64]
    in_ns = [p for p in parts if p["ts"].dtype != pl.Float64]
    if in_us:
        converted = pl.concat(in_us, how="vertical").with_columns(
            ts=_us_to_ns(pl.col("ts")), dur=_us_to_ns(pl.col("dur")))
        in_ns.insert(0, converted)
    del in_us, parts[:]
    frame = pl.concat(in_ns, how="vertical") if len(in_ns) > 1 else in_ns[0]
    del in_ns
    missing = frame["ts"].is_null() | frame["dur"].is_null()
    n_missing = int(missing.sum())
    if n_missing:
        frame = frame.filter(~missing)
    if frame.height:  # checked with Python ints, so nothing below can overflow int64
        lo, hi = frame["ts"].min() + base_time_ns, frame["ts"].max() + base_time_ns
        longest = max(abs(frame["dur"].min()), abs(frame["dur"].max()))
        if lo < -_TIME_LIMIT_NS or hi > _TIME_LIMIT_NS or longest > _TIME_LIMIT_NS:
            raise TraceError(
                f"{path}: event times beyond the int64 nanosecond range (base + ts up to {hi} ns); "
                "the trace is corrupt"
            )
    out = frame.with_columns(
        start_ns=pl.col("ts") + base_time_ns,
        end_ns=pl.col("ts") + base_time_ns + pl.col("dur"),
        dur_ns=pl.col("dur"),
    )
    if "device" in columns:  # device and stream are in args; Kineto also writes them as pid / tid
        out = out.with_columns(device=pl.coalesce("device", "pid"), stream=pl.coalesce("stream", "tid"))
    if "grid" in columns:  # rows without three integer dims: null, not [null, null, null]
        out = out.with_columns(
            pl.when(pl.col(c).arr.get(0).is_not_null()).then(pl.col(c)).alias(c) for c in ("grid", "block")
        )
    return out.select(columns).sort("start_ns", maintain_order=True), n_missing


