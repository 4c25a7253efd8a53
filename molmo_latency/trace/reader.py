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
"""

from __future__ import annotations

import gc
import gzip
import mmap
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, Union

import msgspec
import polars as pl

from molmo_latency.errors import TraceError

__all__ = [
    "GPU_ACTIVITY_KINDS",
    "RUNTIME_KINDS",
    "KinetoTrace",
    "TraceWarning",
    "read_kineto",
]

#: Event categories of GPU activities (what the device executed).
GPU_ACTIVITY_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
#: Event categories of host-side launch calls. ROCm traces (MI250, ROCm 6.2) also use
#: ``cuda_runtime`` for their ``hip*`` calls, with the same ``correlation`` ids.
RUNTIME_KINDS = ("cuda_runtime", "cuda_driver")

# Trace category -> (table, kind). Kineto before PyTorch 1.10 wrote capitalised categories.
_ROUTE = {
    "kernel": ("gpu", "kernel"),
    "gpu_memcpy": ("gpu", "gpu_memcpy"),
    "gpu_memset": ("gpu", "gpu_memset"),
    "Kernel": ("gpu", "kernel"),
    "Memcpy": ("gpu", "gpu_memcpy"),
    "Memset": ("gpu", "gpu_memset"),
    "cuda_runtime": ("runtime", "cuda_runtime"),
    "cuda_driver": ("runtime", "cuda_driver"),
    "Runtime": ("runtime", "cuda_runtime"),
    "cpu_op": ("cpu_ops", "cpu_op"),
    "Operator": ("cpu_ops", "cpu_op"),
    "user_annotation": ("annotations", "user_annotation"),
    "gpu_user_annotation": ("gpu_annotations", "gpu_user_annotation"),
}
_TABLES = ("gpu", "runtime", "cpu_ops", "annotations", "gpu_annotations")
_CATEGORIES_OF = {t: tuple(c for c, (table, _) in _ROUTE.items() if table == t) for t in _TABLES}

_CHUNK_EVENTS = 32_768
_EXACT_FLOAT_US = 2.0**43  # below this a double holds a 3-decimal microsecond value to < 0.5 ns
_MAX_US = 2**53  # beyond this a microsecond time in ns overflows int64 (9.2e18)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TIME_LIMIT_NS = 2**62  # |start|, |dur| below this keep start + dur inside int64

_Int64 = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]
_Micros = Annotated[int, msgspec.Meta(ge=-_MAX_US, le=_MAX_US)]


class TraceWarning(UserWarning):
    """A trace was read but something in it is missing or was skipped (e.g. no GPU events)."""


# --------------------------------------------------------------------------------------------
# msgspec shapes: only the fields we keep; everything else is skipped without building objects.


# `args` is free-form: a cpu_op from torch.compile carries "grid": "grid(100,)" and "stream": 0.
# Any JSON value is accepted; a non-integer becomes null when the column is built. Integers are
# still bounded to int64, so an out-of-range one is an error and never silently dropped.
_Loose = _Int64 | float | str | bool | list | dict | None


class _Args(msgspec.Struct, frozen=True, gc=False, rename={"external_id": "External id"}):
    correlation: _Loose = None
    device: _Loose = None
    stream: _Loose = None
    external_id: _Loose = None
    grid: _Loose = None
    block: _Loose = None


_NO_ARGS = _Args()
_Id = _Int64 | str | None  # pid / tid: "Spans", "Traces" in Kineto's own bookkeeping events


# Fast path: events are a union tagged on "ph", so the ~30% that are flows ("s"/"f"), metadata
# ("M") or instants ("i") are skipped into empty structs instead of being built field by field.
class _X(msgspec.Struct, tag_field="ph", tag="X", gc=False):
    cat: str | None = None
    name: str | None = None
    pid: _Id = None
    tid: _Id = None
    ts: _Micros | float | None = None
    dur: _Micros | float | None = None
    args: _Args | None = None


class _XExact(msgspec.Struct, tag_field="ph", tag="X", gc=False):
    """`_X` with untyped times, so JSON floats arrive as Decimal (the exact path)."""

    cat: str | None = None
    name: str | None = None
    pid: _Id = None
    tid: _Id = None
    ts: Any = None
    dur: Any = None
    args: _Args | None = None


# Every other Chrome trace event phase (trace-event format spec, incl. deprecated S/T/p/F).
_OTHER_PHASES = "BEiIbnestfCPNODMVvRcSTpF()"
_SKIPS = tuple(
    msgspec.defstruct(f"_Skip{ord(ph)}", [], tag_field="ph", tag=ph, gc=False) for ph in _OTHER_PHASES
)


# Slow path (an event without "ph", an unknown phase, or any error): untagged events, decoded
# from a per-event split so errors name the event index.
class _Event(msgspec.Struct, gc=False):
    ph: Any = None
    cat: str | None = None
    name: str | None = None
    pid: _Id = None
    tid: _Id = None
    ts: _Micros | float | None = None
    dur: _Micros | float | None = None
    args: _Args | None = None


class _ExactEvent(msgspec.Struct, gc=False):
    ph: Any = None
    cat: str | None = None
    name: str | None = None
    pid: _Id = None
    tid: _Id = None
    ts: Any = None
    dur: Any = None
    args: _Args | None = None


class _Top(msgspec.Struct, gc=False):
    traceEvents: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    baseTimeNanoseconds: Any = None
    deviceProperties: Any = None
    distributedInfo: Any = None
    schemaVersion: Any = None
    traceName: Any = None


_TOP_DECODER = msgspec.json.Decoder(_Top)
_FAST_DECODER = msgspec.json.Decoder(list[Union[(_X, *_SKIPS)]])  # noqa: UP007
_FAST_EXACT_DECODER = msgspec.json.Decoder(list[Union[(_XExact, *_SKIPS)]], float_hook=Decimal)  # noqa: UP007
_RAW_LIST_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_SLOW_DECODER = msgspec.json.Decoder(list[_Event])
_SLOW_EXACT_DECODER = msgspec.json.Decoder(list[_ExactEvent], float_hook=Decimal)

# A candidate boundary between two events of the traceEvents array: `}` `,` `{` with JSON
# whitespace between (Kineto writes "},\n  {"). A candidate inside a string or a nested object
# leaves a chunk with unbalanced brackets, which fails to decode; we then try the next one.
_BOUNDARY = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_CHUNK_BYTES = 2 << 20
_WHITESPACE = b" \t\r\n"


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


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file; pass the path of a .json or .json.gz trace") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory; pass one .json or .json.gz trace file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and permissions") from None
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


_EVENTS_KEY = re.compile(rb'"traceEvents"[ \t\r\n]*:[ \t\r\n]*\[')
_ARRAY_END = re.compile(rb"\}[ \t\r\n]*\]")
_READ_BYTES = 1 << 20
_HEADER_LIMIT = 64 << 20  # a header this long before traceEvents: not a Kineto trace, read it whole


_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_RELEASE_BYTES = 8 << 20  # hand consumed pages of a mapped file back every this many bytes


class _MappedText:
    """A plain file, memory-mapped: no copy of the text; consumed pages are handed back."""

    eof = True

    def __init__(self, f, size: int) -> None:
        self.buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        self.pos = self.released = 0

    def need(self, size: int) -> None:
        pass

    def avail(self) -> int:
        return len(self.buf) - self.pos

    def consume(self, size: int) -> None:
        self.pos += size
        if self.pos - self.released >= _RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            upto = self.pos - self.pos % mmap.PAGESIZE
            self.buf.madvise(mmap.MADV_DONTNEED, self.released, upto - self.released)
            self.released = upto

    def close(self) -> None:
        self.buf.close()


class _GzipText:
    """A gzipped file, inflated block by block; only the unconsumed text is kept."""

    def __init__(self, f) -> None:
        self.f, self.buf, self.pos, self.eof = f, b"", 0, False
        self.inflate = zlib.decompressobj(wbits=31)

    def need(self, size: int) -> None:
        if self.eof or len(self.buf) - self.pos >= size:
            return
        parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
        while have < size and not self.eof:
            block = self._inflated()
            parts.append(block)
            have += len(block)
        self.buf, self.pos = b"".join(parts), 0

    def _inflated(self) -> bytes:
        try:
            while True:
                if self.inflate.eof:  # a member ended: another may follow (gzip allows several)
                    data = self.inflate.unused_data or self.f.read(_READ_BYTES)
                    if not data:
                        self.eof = True
                        return b""
                    self.inflate = zlib.decompressobj(wbits=31)
                else:
                    data = self.inflate.unconsumed_tail or self.f.read(_READ_BYTES)
                    if not data:
                        raise _NotFast  # truncated gzip: the whole-text path says so
                out = self.inflate.decompress(data, _READ_BYTES)
                if out:
                    return out
        except (OSError, zlib.error, EOFError):
            raise _NotFast from None

    def avail(self) -> int:
        return len(self.buf) - self.pos

    def consume(self, size: int) -> None:
        self.pos += size

    def close(self) -> None:
        pass


def _open_text(f):
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return _GzipText(f)
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise _NotFast
    try:
        return _MappedText(f, size)
    except (OSError, ValueError):
        raise _NotFast from None


def _stream(path: Path) -> tuple[_Top, list[dict[str, pl.DataFrame]], int]:
    """Read a trace holding only ~one chunk of its text at a time (plain: mapped; gzip: inflated
    block by block).

    The text before ``"traceEvents": [`` is the header; chunks are cut between events as in
    :func:`_decode_fast`; after the last event comes ``]`` and the tail. Header, ``null`` and
    tail must then decode as the trace's metadata object. Anything else (a bare event list, an
    odd layout, a decode error) raises _NotFast and the caller reads the file whole.
    """
    try:
        f = open(path, "rb")
    except OSError:
        raise _NotFast from None
    with f:
        try:
            text = _open_text(f)
        except OSError:
            raise _NotFast from None
        try:
            return _stream_text(text)
        finally:
            text.close()


def _stream_text(text) -> tuple[_Top, list[dict[str, pl.DataFrame]], int]:
    def find(pattern: re.Pattern, start: int):
        """`pattern` in the unconsumed text from `start` (relative); the match's relative span."""
        match = pattern.search(text.buf, text.pos + start)
        return None if match is None else (match.start() - text.pos, match.end() - text.pos)

    def copy(start: int, end: int) -> bytes:
        with memoryview(text.buf) as view:
            return bytes(view[text.pos + start:text.pos + end])

    key = None
    while key is None:
        text.need(text.avail() + _READ_BYTES)
        key = find(_EVENTS_KEY, 0)
        if key is None and (text.eof or text.avail() > _HEADER_LIMIT):
            raise _NotFast
    header = copy(0, key[0])
    if not header.lstrip(_WHITESPACE).startswith(b"{"):
        raise _NotFast
    text.consume(key[1])

    chunks, count = [], 0
    search_from, end_from, attempts, done = None, 0, 0, False
    while not done:
        text.need(_CHUNK_BYTES + _READ_BYTES)
        if search_from is None:
            first = find(_NON_SPACE, 0)
            if first is None:
                raise _NotFast
            if text.buf[text.pos + first[0]] == ord("]"):  # an empty array (or, after a cut, malformed)
                if count:
                    raise _NotFast
                tail = copy(first[1], text.avail())
                break
            search_from = min(_CHUNK_BYTES, text.avail())
        match = find(_BOUNDARY, search_from)
        if match is None and not text.eof:
            text.need(text.avail() + _READ_BYTES)  # an event longer than a chunk: read on
            continue
        if match is not None:
            events, buf = _try_decode(text, match[0] + 1)
            consumed = match[1] - 1
        else:  # the last chunk: find the `]` that closes the array
            end = find(_ARRAY_END, end_from)
            if end is None:
                raise _NotFast
            events, buf = _try_decode(text, end[0] + 1)
            consumed, done = end[1], events is not None
        if events is None:  # a cut inside a string or an object (or in the tail): try the next one
            attempts += 1
            if attempts > 16:
                raise _NotFast
            if match is not None:
                search_from = match[1]
            else:
                end_from = end[1]
            continue
        if done:
            tail = copy(consumed, text.avail())
        count += len(events)
        try:
            chunks.append(_checked_frames(events, buf, fast=True))
        except _OutOfRange:
            raise _NotFast from None
        del events, buf
        text.consume(consumed)
        search_from, end_from, attempts = None, 0, 0
    try:
        meta = _TOP_DECODER.decode(header + b'"traceEvents": null' + tail)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise _NotFast from None
    return meta, chunks, count


def _try_decode(text, cut: int) -> tuple[list | None, bytes]:
    with memoryview(text.buf) as view:
        buf = b"".join((b"[", view[text.pos:text.pos + cut], b"]"))
    try:
        return _FAST_DECODER.decode(buf), buf
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None, buf


class _NotFast(Exception):
    """The fast path cannot read this array; the slow path will (or will say precisely why not)."""


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


def _decode_fast(array: memoryview) -> tuple[list[dict[str, pl.DataFrame]], int]:
    """Decode the traceEvents array in ~8 MiB chunks cut between events, without a per-event split."""
    end = len(array)
    while end and array[end - 1] in _WHITESPACE:
        end -= 1
    if end < 2 or array[end - 1] != ord("]"):
        raise _NotFast
    pos, end = 1, end - 1  # inside the brackets
    chunks, count = [], 0
    while pos < end:
        search_from = pos + _CHUNK_BYTES
        for _attempt in range(4):
            match = _BOUNDARY.search(array, search_from, end) if search_from < end else None
            cut, following = (match.start() + 1, match.end() - 1) if match else (end, end)
            buf = b"".join((b"[", array[pos:cut], b"]"))
            try:
                events = _FAST_DECODER.decode(buf)
            except msgspec.DecodeError:  # malformed: the cut may be inside a string or an object
                if match is None:
                    raise _NotFast from None
                search_from = match.end()
                continue
            except (msgspec.ValidationError, UnicodeDecodeError):  # the text itself: slow path
                raise _NotFast from None
            break
        else:
            raise _NotFast
        count += len(events)
        try:
            chunks.append(_checked_frames(events, buf, fast=True))
        except _OutOfRange:
            raise _NotFast from None  # the slow path reports it with the event index
        del events, buf
        pos = following
    return chunks, count


def _decode_slow(path: Path, array: memoryview) -> tuple[list[dict[str, pl.DataFrame]], int]:
    """Split per event, decode untagged events in chunks; errors name the event index."""
    try:
        raws = _RAW_LIST_DECODER.decode(array)
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not valid UTF-8 ({exc.reason}); the file is corrupt") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise TraceError(
            f"{path}: traceEvents is not valid JSON ({_one_line(exc)}); the file is truncated or corrupt"
        ) from None
    chunks = []
    for offset in range(0, len(raws), _CHUNK_EVENTS):
        buf = b"".join((b"[", b",".join(raws[offset:offset + _CHUNK_EVENTS]), b"]"))
        try:
            events = _SLOW_DECODER.decode(buf)
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not valid UTF-8 ({exc.reason}); the file is corrupt") from None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise TraceError(
                f"{path}: {_event_error(exc, offset)}; the trace is corrupt or not from torch.profiler"
            ) from None
        try:
            chunks.append(_checked_frames(events, buf, fast=False))
        except _OutOfRange as exc:
            raise TraceError(
                f"{path}: {exc} (in traceEvents[{offset}:{offset + len(events)}]); the trace is corrupt"
            ) from None
    return chunks, len(raws)


class _OutOfRange(ValueError):
    pass


def _checked_frames(events: list, buf: bytes, fast: bool) -> dict[str, pl.DataFrame]:
    """A frame per table of the kept events (``ts``/``dur``: float us, or int ns if exact)."""
    frames = _frames(events, fast=fast, exact=False)
    for frame in frames.values():
        for column in ("ts", "dur"):
            times = frame[column]
            if times.null_count() == times.len():
                continue
            largest = max(abs(times.min()), abs(times.max()))
            if largest > _MAX_US:
                raise _OutOfRange(f"an event '{column}' exceeds 2**53 us (beyond int64 nanoseconds)")
            if largest >= _EXACT_FLOAT_US and (times != times.floor()).any():
                # a fractional value a double cannot hold to the nanosecond: decode the text exactly
                decoder = _FAST_EXACT_DECODER if fast else _SLOW_EXACT_DECODER
                return _frames(decoder.decode(buf), fast=fast, exact=True)
    return frames


def _us_to_ns(us: pl.Expr) -> pl.Expr:
    """Microseconds (double holding a <=3-decimal value) -> int64 ns, exact below 2**43 us."""
    whole = us.floor()
    return whole.cast(pl.Int64) * 1000 + ((us - whole) * 1000).round().cast(pl.Int64)


def _frames(events: list, fast: bool, exact: bool) -> dict[str, pl.DataFrame]:
    """Route the kept events to their tables in one pass, then one pass per column per table."""
    buckets: dict[str, list] = {category: [] for category in _ROUTE}
    get = buckets.get
    if fast:
        x = _XExact if exact else _X
        for event in events:
            if event.__class__ is x:
                bucket = get(event.cat)
                if bucket is not None:
                    bucket.append(event)
    else:
        for event in events:
            if event.ph == "X":
                bucket = get(event.cat)
                if bucket is not None:
                    bucket.append(event)
    frames = {}
    for table in _TABLES:
        kept, kinds = [], []
        for category in _CATEGORIES_OF[table]:
            bucket = buckets[category]
            if bucket:
                kept += bucket
                kinds += [_ROUTE[category][1]] * len(bucket)
        if kept:
            frames[table] = _table_frame(table, kept, kinds, exact)
    return frames


def _table_frame(table: str, kept: list, kinds: list[str], exact: bool) -> pl.DataFrame:
    ts = [e.ts for e in kept]
    dur = [e.dur for e in kept]
    if exact:
        ts = [_exact_ns(v) for v in ts]
        dur = [_exact_ns(v) for v in dur]
    times = pl.Int64 if exact else pl.Float64
    columns = {
        "name": pl.Series([e.name for e in kept], dtype=pl.String),
        "pid": pl.Series([e.pid for e in kept], dtype=pl.Int64, strict=False),  # "Spans" -> null
        "tid": pl.Series([e.tid for e in kept], dtype=pl.Int64, strict=False),
        "ts": pl.Series(ts, dtype=times, strict=False),
        "dur": pl.Series(dur, dtype=times, strict=False),
    }
    args = [e.args or _NO_ARGS for e in kept]
    columns["external_id"] = _ints([a.external_id for a in args])
    if table in ("gpu", "runtime"):
        columns["kind"] = pl.Series(kinds, dtype=pl.String)
        columns["correlation"] = _ints([a.correlation for a in args])
    if table in ("gpu", "gpu_annotations"):
        # device and stream are in args; Kineto also writes them as the event's pid / tid.
        columns["device"] = _ints([a.device for a in args])
        columns["stream"] = _ints([a.stream for a in args])
    if table == "gpu":
        columns["grid"] = _dims([a.grid for a in args])
        columns["block"] = _dims([a.block for a in args])
    return pl.DataFrame(columns)


def _ints(values: list) -> pl.Series:
    """An int64 column; values that are not JSON integers (strings, floats, objects) -> null."""
    try:
        return pl.Series(values, dtype=pl.Int64, strict=True)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        return pl.Series([v if type(v) is int else None for v in values], dtype=pl.Int64)


_NULL3 = (None, None, None)


def _dims(values: list) -> pl.Series:
    """An array[int64, 3] column (CUDA grid / block); anything but three integers -> nulls.

    Built from one flat int64 column reshaped to rows of 3: a list of lists is ~4x slower.
    """
    flat = list(chain.from_iterable(v if type(v) is list and len(v) == 3 else _NULL3 for v in values))
    try:
        column = pl.Series(flat, dtype=pl.Int64, strict=True)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        column = pl.Series([v if type(v) is int else None for v in flat], dtype=pl.Int64)
    return column.reshape((len(values), 3))


def _exact_ns(value: Any) -> int | None:
    """A JSON number (int, or Decimal from float_hook) of microseconds -> exact int ns."""
    if value is None:
        return None
    if type(value) is int:
        if abs(value) <= _MAX_US:
            return value * 1000
        raise _OutOfRange(f"event time {value} us is out of range")
    if isinstance(value, Decimal):
        try:
            ns = int((value * 1000).to_integral_value(rounding=ROUND_HALF_EVEN))
        except (InvalidOperation, OverflowError, ValueError):
            ns = None
        if ns is not None and abs(ns) <= _TIME_LIMIT_NS:
            return ns
        raise _OutOfRange(f"event time {str(value)[:40]} us is out of range")
    raise _OutOfRange(f"an event 'ts'/'dur' is a {type(value).__name__}, not a number")


_AT = re.compile(r"`\$\[(\d+)\]")


def _event_error(exc: Exception, offset: int) -> str:
    """msgspec's message with the chunk-relative path made file-relative: `$.traceEvents[i]...`."""
    return _AT.sub(lambda m: f"`$.traceEvents[{int(m.group(1)) + offset}]", _one_line(exc))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
