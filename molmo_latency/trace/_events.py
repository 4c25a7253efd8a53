"""Decode slices of a Kineto ``traceEvents`` array into one polars frame per table.

Part of the trace reader (collect/hold): the msgspec shapes of an event (only the fields we keep,
tagged on ``ph`` so flow, metadata and instant events are skipped cheaply), the routing of event
categories to tables, and the exact microsecond -> nanosecond conversion. See
:mod:`molmo_latency.trace.reader` for the whole picture.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from itertools import chain
from typing import Annotated, Any, Union

import msgspec
import polars as pl

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
#: Categories of complete events Kineto writes that no table keeps (libkineto's ActivityType
#: names, and the profiler's own bookkeeping): read past without a word. A complete event of
#: any other category, or of none, is counted as skipped.
_IGNORED_CATEGORIES = frozenset({
    "Trace", "cuda_sync", "cuda_profiler_range", "python_function", "overhead", "external_correlation",
    "cpu_instant_event", "mtia_runtime", "mtia_ccp_events", "mtia_insight", "glow_runtime", "hpu_op",
    "xpu_runtime", "xpu_driver", "privateuse1_runtime", "privateuse1_driver", "collective_comm",
    "gpu_pm_counter", "cuda_event", "ac2g", "fwdbwd", "Python", "Memory", "Record Window End",
})
#: Key of the per-chunk counts of events set aside while decoding (see ``_checks.SKIP_REASONS``).
_SKIPPED = "_skipped"
_CATEGORIES_OF = {t: tuple(c for c, (table, _) in _ROUTE.items() if table == t) for t in _TABLES}

_EXACT_FLOAT_US = 2.0**43  # below this a double holds a 3-decimal microsecond value to < 0.5 ns
_MAX_US = 2**53  # beyond this a microsecond time in ns overflows int64 (9.2e18)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TIME_LIMIT_NS = 2**62  # |start|, |dur| below this keep start + dur inside int64

_Int64 = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]
_Micros = Annotated[int, msgspec.Meta(ge=-_MAX_US, le=_MAX_US)]


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
_PHASES = frozenset(_OTHER_PHASES) | {"X"}
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


class _OutOfRange(ValueError):
    pass


#: Key of the per-chunk counts, per table, of events without a numeric ts / dur (dropped).
_MISSING = "_missing"
#: Key set (True) in a chunk decoded exactly (times parsed as decimals): the reader puts such
#: chunks after the others, as it always has, so equal start times keep their order.
_EXACT = "_exact"
#: The columns a chunk's frame keeps per table: the tables' own (``ts``/``dur``: int64 ns relative
#: to ``baseTimeNanoseconds``; the reader adds the base and sorts once every chunk is in).
_KEEP = {
    "gpu": ("name", "kind", "device", "stream", "correlation", "external_id", "ts", "dur", "grid", "block"),
    "runtime": ("name", "kind", "pid", "tid", "correlation", "external_id", "ts", "dur"),
    "cpu_ops": ("name", "pid", "tid", "external_id", "ts", "dur"),
    "annotations": ("name", "pid", "tid", "external_id", "ts", "dur"),
    "gpu_annotations": ("name", "device", "stream", "external_id", "ts", "dur"),
}


def _checked_frames(events: list, buf: bytes, fast: bool, names: dict) -> dict[str, pl.DataFrame]:
    """A frame per table of the kept events, settled (:func:`_settle`): int64 ns times, the
    tables' columns only, events without times dropped (counted under ``_MISSING``); names as
    codes into `names` (:func:`_codes`)."""
    return _settle(_decoded_frames(events, buf, fast, names))


class _Chunks(list):
    """The settled chunks of one read, and ``names``: every distinct event name met in them
    (name -> code), the dictionary their ``name`` codes index (:func:`_codes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict = {}


class _Settled(_Chunks):
    """The chunks of a read, settled in batches: the decoded frames of consecutive chunks wait
    until ~:data:`_BATCH_BYTES` of text is in, then are settled together (a few polars calls per
    batch instead of per 2 MiB chunk). Exactly decoded chunks are settled alone, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[dict] = []
        self.pending_bytes = 0

    def add(self, events: list, buf: bytes, fast: bool) -> None:
        frames = _decoded_frames(events, buf, fast, self.names)
        if any(f["ts"].dtype != pl.Float64 for n, f in frames.items() if n != _SKIPPED):
            self.flush()
            self.append(_settle(frames))
            return
        self.pending.append(frames)
        self.pending_bytes += len(buf)
        if self.pending_bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        merged: dict = {}
        skipped: dict = {}
        for frames in self.pending:
            for reason, count in frames.pop(_SKIPPED, {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
            for name, frame in frames.items():
                merged.setdefault(name, []).append(frame)
        self.pending, self.pending_bytes = [], 0
        batch = {name: pl.concat(parts, how="vertical", rechunk=False) if len(parts) > 1 else parts[0]
                 for name, parts in merged.items()}
        if skipped:
            batch[_SKIPPED] = skipped
        self.append(_settle(batch))


_BATCH_BYTES = 8 << 20


def _settle(frames: dict) -> dict:
    """Each chunk in the tables' final form at once (all but the time base and the sort), so a
    read holds the tables' columns only, never the raw per-event fields of every chunk:
    microseconds -> exact int64 ns (chunks decoded as doubles), events without a ts / dur
    dropped and counted, device / stream from pid / tid when args lack them, grid / block of
    anything but three integers null."""
    exact = any(f["ts"].dtype != pl.Float64 for n, f in frames.items() if n != _SKIPPED)
    missing = {}
    for name in _TABLES:
        frame = frames.get(name)
        if frame is None:
            continue
        query = frame.lazy()  # one polars query per table and batch: every step is row by row
        if frame["ts"].dtype == pl.Float64:
            query = query.with_columns(ts=_us_to_ns(pl.col("ts")), dur=_us_to_ns(pl.col("dur")))
        if name in ("gpu", "gpu_annotations"):  # in args; Kineto also writes them as pid / tid
            query = query.with_columns(device=pl.coalesce("device", "pid"), stream=pl.coalesce("stream", "tid"))
        if name == "gpu":  # rows without three integer dims: null, not [null, null, null]
            query = query.with_columns(
                pl.when(pl.col(c).arr.get(0).is_not_null()).then(pl.col(c)).alias(c) for c in ("grid", "block")
            )
        frame = query.select(_KEEP[name]).collect()
        if frame["ts"].null_count() or frame["dur"].null_count():
            without = frame["ts"].is_null() | frame["dur"].is_null()
            frame = frame.filter(~without)
            missing[name] = int(without.sum())
        frames[name] = frame
    if missing:
        frames[_MISSING] = missing
    if exact:
        frames[_EXACT] = True
    return frames


def _decoded_frames(events: list, buf: bytes, fast: bool, names: dict) -> dict[str, pl.DataFrame]:
    """A frame per table of the kept events (``ts``/``dur``: float us, or int ns if exact)."""
    frames = _frames(events, fast=fast, exact=False, names=names)
    for name, frame in frames.items():
        if name == _SKIPPED:
            continue
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
                return _frames(decoder.decode(buf), fast=fast, exact=True, names=names)
    return frames


def _us_to_ns(us: pl.Expr) -> pl.Expr:
    """Microseconds (double holding a <=3-decimal value) -> int64 ns, exact below 2**43 us."""
    whole = us.floor()
    return whole.cast(pl.Int64) * 1000 + ((us - whole) * 1000).round().cast(pl.Int64)


def _frames(events: list, fast: bool, exact: bool, names: dict) -> dict[str, pl.DataFrame]:
    """Route the kept events to their tables in one pass, then one pass per column per table.

    Complete events of no or an unknown category, and (slow path) events of a missing or
    unknown phase, are counted under ``frames[_SKIPPED]`` (a dict reason -> count).
    """
    buckets: dict[str, list] = {category: [] for category in _ROUTE}
    get = buckets.get
    odd = []  # complete events no table keeps
    bad_phase = 0
    if fast:
        x = _XExact if exact else _X
        for event in events:
            if event.__class__ is x:
                bucket = get(event.cat)
                if bucket is not None:
                    bucket.append(event)
                else:
                    odd.append(event.cat)
    else:
        for event in events:
            ph = event.ph
            if ph == "X":
                bucket = get(event.cat)
                if bucket is not None:
                    bucket.append(event)
                else:
                    odd.append(event.cat)
            elif type(ph) is not str or ph not in _PHASES:
                bad_phase += 1
    frames = {}
    for table in _TABLES:
        kept, kinds = [], []
        for category in _CATEGORIES_OF[table]:
            bucket = buckets[category]
            if bucket:
                kept += bucket
                kinds += [_ROUTE[category][1]] * len(bucket)
        if kept:
            frames[table] = _table_frame(table, kept, kinds, exact, names)
    skipped = {}
    if odd:
        missing = sum(1 for cat in odd if cat is None)
        unknown = sum(1 for cat in odd if cat is not None and cat not in _IGNORED_CATEGORIES)
        skipped = {k: v for k, v in (("missing_category", missing), ("unknown_category", unknown)) if v}
    if bad_phase:
        skipped["bad_phase"] = bad_phase
    if skipped:
        frames[_SKIPPED] = skipped
    return frames


def _table_frame(table: str, kept: list, kinds: list[str], exact: bool, names: dict) -> pl.DataFrame:
    ts = [e.ts for e in kept]
    dur = [e.dur for e in kept]
    if exact:
        ts = [_exact_ns(v) for v in ts]
        dur = [_exact_ns(v) for v in dur]
    times = pl.Int64 if exact else pl.Float64
    columns = {
        "name": _codes([e.name for e in kept], names),
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


def _codes(values: list, names: dict) -> pl.Series:
    """The names `values` as UInt32 codes into `names` (name -> code, shared by every chunk of a
    read, grown here): the reader turns them back into one string column per table
    (:func:`names_column`), whose rows share the bytes of equal names. Kernel names are long
    (often 200+ bytes) and few: a chunk holds 4 bytes a row for them, a table 16 (a string view
    into one buffer of the distinct names), never their whole length per row or per chunk."""
    for value in dict.fromkeys(values):  # the chunk's distinct names (few): new ones get the next codes
        if value not in names:
            names[value] = len(names)
    return pl.Series(list(map(names.__getitem__, values)), dtype=pl.UInt32)


def names_column(names: dict) -> pl.Series:
    """The distinct names of a read as a string column, row i the name of code i.

    Example:
        >>> names = {}
        >>> codes = _codes(["gemm", "add", "gemm", None], names)
        >>> codes.to_list(), names_column(names).gather(codes).to_list()
        ([0, 1, 0, 2], ['gemm', 'add', 'gemm', None])
    """
    return pl.Series(list(names), dtype=pl.String)


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

