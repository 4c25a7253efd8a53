"""The SQLite side of the Nsight Systems reader: open an export read-only, the SQL that checks its
rows, and the per-kernel, per-device and per-category GPU time of ``trace summary`` computed by
SQLite itself (GROUP BY and window functions; only aggregated rows come back to Python).

This module imports no polars: ``trace summary --parts gpu,categories,kernels`` of an export runs
on :mod:`sqlite3` alone, in memory bounded by SQLite's page cache and sorter (rows are never
loaded as a table). :mod:`molmo_latency.trace.nsys` builds the full tables (for attribution per
NVTX range and per phase) on the same SQL.

What :func:`summarize_export` computes equals what ``read_nsys`` + ``kernel_breakdown`` /
``device_gpu_stats`` / the category table give, row for row, with the same rows set aside under
the same reasons (:mod:`molmo_latency.trace._checks`), counted by SQLite:

- the per-row reasons of the reader's SQL (``missing_time``, ``non_numeric_time``,
  ``time_out_of_range``, ``non_integer_id``, ``non_text_name``), then ``negative_duration``,
  ``negative_time``, ``missing_device`` and ``outside_time_span``, the first that applies;
- ``outside_time_span`` needs the median start of every table the reader reads (GPU activities,
  runtime calls, NVTX ranges). When every start of those tables lies within
  :data:`~molmo_latency.trace._checks.MAX_TRACE_SPAN_NS` of every other (true of any real
  capture: SQLite gives the first and last start), no event can be far from the median, and only
  a duration over that span is set aside. Otherwise (a damaged export) the summary is computed
  from the full reader's tables, which is exact and slower;
- ``duplicate``: a GPU activity equal in every column to another of its table; looked for by
  sorting on (device, start, end) in the same query as the busy time, counted exactly (SQL
  ``DISTINCT`` on every column) only when two activities share device, start and end.

Only the GPU tables are read, so ``skipped_reasons`` counts GPU activities alone (runtime calls
and NVTX ranges are not read; :attr:`ExportSummary.tables_checked` says so).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import sqlite3
import tempfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from molmo_latency.errors import TraceError, TraceWarning
from molmo_latency.safe_fs import regular_file
from molmo_latency.trace._format import SQLITE_MAGIC, is_sqlite

__all__ = ["SQLITE_MAGIC", "SUMMARY_PARTS", "ExportSummary", "is_sqlite", "open_export", "summarize_export"]

#: What :func:`summarize_export` can compute (the names of ``trace summary --json``'s keys).
SUMMARY_PARTS = ("gpu", "categories", "kernels")

_KERNEL = "CUPTI_ACTIVITY_KIND_KERNEL"
_MEMCPY = "CUPTI_ACTIVITY_KIND_MEMCPY"
_MEMSET = "CUPTI_ACTIVITY_KIND_MEMSET"
_RUNTIME = "CUPTI_ACTIVITY_KIND_RUNTIME"
_NVTX = "NVTX_EVENTS"
_EVENT_TABLES = (_KERNEL, _MEMCPY, _MEMSET, _RUNTIME, _NVTX)
#: NVTX range event types: push/pop and start/end ranges of NVTX (59, 60) and of NVTXT (70, 71).
_NVTX_RANGES = (59, 60, 70, 71)
_TID_BITS = 24  # globalTid = ... | pid << 24 | tid (nsys' "Serialized GlobalId")
_TID_MASK = (1 << _TID_BITS) - 1
_CORRELATION_STRIDE = 1 << 32  # CUPTI correlation ids are 32-bit
_TIME_LIMIT_NS = 2**62
_BATCH_ROWS = 100_000
#: The longest a trace can be (molmo_latency.trace._checks.MAX_TRACE_SPAN_NS; repeated here so
#: this module imports no polars; a test keeps them equal).
_MAX_TRACE_SPAN_NS = 24 * 3600 * 10**9


# ------------------------------------------------------------------------------------------
# SQL pieces shared with the full reader.


def _int(expr: str) -> str:
    """SQL: `expr` when it is an integer, else NULL (SQLite columns hold any type in any row)."""
    return f"(CASE WHEN typeof({expr}) = 'integer' THEN {expr} END)"


def _text(expr: str) -> str:
    """SQL: `expr` when it is text, else NULL."""
    return f"(CASE WHEN typeof({expr}) = 'text' THEN {expr} END)"


def _reason(start: str, end: str, ids: list[str], names: list[str], end_missing: str = "missing_time") -> str:
    """SQL: why a row cannot be read (a key of ``_checks.SKIP_REASONS``), NULL when it can: a
    missing or non-integer time, one beyond int64 ns, an id that is not an integer, a name that is
    not text. `end_missing` is the reason for a NULL end (an NVTX range never closed)."""
    limit = _TIME_LIMIT_NS
    cases = [
        f"WHEN {start} IS NULL THEN 'missing_time'",
        f"WHEN {end} IS NULL THEN '{end_missing}'",
        f"WHEN typeof({start}) != 'integer' OR typeof({end}) != 'integer' THEN 'non_numeric_time'",
        f"WHEN {start} NOT BETWEEN -{limit} AND {limit} OR {end} NOT BETWEEN -{limit} AND {limit} "
        "THEN 'time_out_of_range'",
    ]
    if ids:
        odd = " OR ".join(f"typeof({c}) NOT IN ('integer', 'null')" for c in ids)
        cases.append(f"WHEN {odd} THEN 'non_integer_id'")
    if names:
        odd = " OR ".join(f"typeof({c}) NOT IN ('text', 'null')" for c in names)
        cases.append(f"WHEN {odd} THEN 'non_text_name'")
    return f"CASE {' '.join(cases)} END"


def _str_or_none(value) -> str | None:
    """`value` when it is text (an export's metadata may hold anything), else None."""
    return value if type(value) is str else None


def _short_copy_kind(label: str | None) -> str | None:
    """nsys' ``Host-to-Device`` -> Kineto's ``HtoD`` (``Peer-to-Peer`` -> ``PtoP``); other labels as is."""
    if label is None:
        return None
    parts = label.split("-to-")
    if len(parts) == 2 and parts[0].isalpha() and parts[1].isalpha():
        return f"{parts[0][0]}to{parts[1][0]}"
    return label


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_map(expr: str, mapping: dict[int, str], default: str | None) -> str:
    """SQL: `mapping`[`expr`] (integer keys), `default` for any other value, NULL included."""
    whens = " ".join(f"WHEN {k} THEN {_sql_str(v)}" for k, v in mapping.items())
    other = "NULL" if default is None else _sql_str(default)
    return f"(CASE {expr} {whens} ELSE {other} END)" if whens else other


# ------------------------------------------------------------------------------------------
# Opening an export.


def _head(path: Path, limit: int) -> bytes:
    """The first bytes of the export; a missing file, a directory or an unreadable file is a one-line
    TraceError (:func:`molmo_latency.safe_fs.read_head`, as the Kineto reader words it)."""
    from molmo_latency.safe_fs import read_head

    return read_head(path, "nsys SQLite export (.sqlite)", "an", limit)


@contextlib.contextmanager
def open_export(path: str | os.PathLike) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """``(path, connection)`` of an nsys export (``.sqlite``, or gzipped), opened read-only and
    immutable (no lock, no journal: a read-only folder works). A gzipped export is first
    decompressed, streamed, into a temporary file that is removed on exit. A SQLite error while
    reading becomes a one-line TraceError.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._nsys_demo import write_demo_export
        >>> with open_export(write_demo_export(tempfile.mkdtemp())) as (path, db):
        ...     db.execute("SELECT count(*) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()
        (8,)
    """
    path = regular_file(path, "an nsys SQLite export (.sqlite)", TraceError)
    head = _head(path, len(SQLITE_MAGIC))
    if head[:2] != b"\x1f\x8b":
        with _connect(path, path, head) as db:
            yield path, db
        return
    with tempfile.TemporaryDirectory(prefix="molmo_latency_nsys_") as tmp:
        plain = Path(tmp) / "export.sqlite"
        try:
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise TraceError(f"{path}: truncated or corrupt gzip ({exc}); re-export or re-copy the file") from None
        except OSError as exc:
            raise TraceError(
                f"{path}: cannot be decompressed into {tmp} ({exc.strerror or exc}); free disk space there "
                "or pass the export unzipped"
            ) from None
        with open(plain, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        with _connect(path, plain, head) as db:
            yield path, db


@contextlib.contextmanager
def _connect(path: Path, plain: Path, head: bytes) -> Iterator[sqlite3.Connection]:
    if head != SQLITE_MAGIC:
        if path.suffix == ".nsys-rep":
            raise TraceError(
                f"{path}: an Nsight Systems report, not its SQLite export; run `nsys export --type sqlite "
                f"{path.name}` and pass the .sqlite it writes"
            )
        raise TraceError(
            f"{path}: not a SQLite database (it does not start with 'SQLite format 3'); pass the export "
            "of `nsys export --type sqlite report.nsys-rep`"
        )
    uri = f"file:{quote(str(plain.resolve()))}?mode=ro&immutable=1"  # no lock or journal: works read-only
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise TraceError(f"{path}: cannot be opened as SQLite ({exc}); check the file") from None
    try:
        yield db
    except sqlite3.Error as exc:
        raise TraceError(
            f"{path}: SQLite error while reading ({' '.join(str(exc).split())}); the export is truncated or "
            "corrupt: export it again"
        ) from None
    finally:
        db.close()


class ExportDB:
    """One open export: which tables and columns it has, and the SQL both readers share."""

    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path, self.db = path, db
        rows = db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')").fetchall()
        self.tables = {r[0] for r in rows}
        self.skipped: Counter = Counter()
        self._column_cache: dict[str, set[str]] = {}
        if not self.tables & {*_EVENT_TABLES, "StringIds", "META_DATA_EXPORT", "TARGET_INFO_SESSION_START_TIME"}:
            raise TraceError(
                f"{path}: a SQLite database but not an Nsight Systems export (no CUPTI_ACTIVITY_KIND_*, "
                "NVTX_EVENTS or StringIds table); pass the export of `nsys export --type sqlite report.nsys-rep`"
            )

    def _columns(self, table: str) -> set[str]:
        """The columns `table` has (empty when it is absent): only these are read."""
        if table not in self.tables:
            return set()
        if table not in self._column_cache:
            self._column_cache[table] = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
        return self._column_cache[table]

    def _need(self, table: str, columns: set[str], needed: tuple[str, ...]) -> None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise TraceError(
                f"{self.path}: table {table} has no column {', '.join(missing)}; this nsys export is not one "
                "the reader knows: export it again with a recent `nsys export --type sqlite`"
            )

    def _strings(self, table: str) -> str:
        """The StringIds table to join (its first row of each id when an id repeats: warned once)."""
        if "StringIds" not in self.tables:
            raise TraceError(
                f"{self.path}: {table} names its events through StringIds, but the export has no StringIds "
                "table; export it again with `nsys export --type sqlite`"
            )
        if not hasattr(self, "_string_table"):
            repeated = self.db.execute("SELECT COUNT(*) - COUNT(DISTINCT id) FROM StringIds").fetchone()[0]
            self._string_table = "StringIds"
            if repeated:
                _warn(f"{self.path}: StringIds holds {repeated} repeated id(s); the first string of each "
                      "id names the events (the export is damaged: export it again)", stacklevel=5)
                self._string_table = ("(SELECT id, value FROM StringIds WHERE rowid IN "
                                      "(SELECT MIN(rowid) FROM StringIds GROUP BY id))")
        return self._string_table

    def _string_values(self, table: str, ids: list[int]) -> dict[int, object]:
        """id -> value in the StringIds table the readers join for `table` (its first string of a
        repeated id), for the integer `ids` it has, looked up 500 at a time (SQLite's limit on
        parameters is far above); the values as stored (the caller judges one that is not text)."""
        strings = self._strings(table)
        found: dict[int, object] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            found.update(self.db.execute(f"SELECT id, value FROM {strings} WHERE id IN "
                                         f"({', '.join('?' * len(chunk))})", chunk).fetchall())
        return found

    def _metadata(self) -> dict[str, str]:
        if "META_DATA_EXPORT" not in self.tables or not {"name", "value"} <= self._columns("META_DATA_EXPORT"):
            return {}
        return dict(self.db.execute("SELECT name, value FROM META_DATA_EXPORT").fetchall())

    def _base_time_ns(self) -> int:
        table = "TARGET_INFO_SESSION_START_TIME"
        if "utcEpochNs" not in self._columns(table):
            return 0
        row = self.db.execute(f"SELECT utcEpochNs FROM {table} WHERE typeof(utcEpochNs) = 'integer' LIMIT 1").fetchone()
        if row is None or type(row[0]) is not int or not 0 <= row[0] < _TIME_LIMIT_NS:
            return 0
        return row[0]

    def _processes(self) -> list[int]:
        """Process keys (``globalPid >> 24``) of every GPU activity and runtime call, sorted."""
        parts = []
        for table in (_KERNEL, _MEMCPY, _MEMSET):
            if "globalPid" in self._columns(table):
                parts.append(f"SELECT DISTINCT globalPid >> {_TID_BITS} FROM {table} "
                             "WHERE typeof(globalPid) = 'integer'")
        if "globalTid" in self._columns(_RUNTIME):
            parts.append(f"SELECT DISTINCT globalTid >> {_TID_BITS} FROM {_RUNTIME} "
                         "WHERE typeof(globalTid) = 'integer'")
        if not parts:
            return []
        rows = self.db.execute(" UNION ".join(parts)).fetchall()
        return sorted(r[0] for r in rows if type(r[0]) is int)

    def _process_offset(self, key: str) -> str:
        """SQL adding 2**32 * (rank of the event's process) to its correlation id (0 when one process)."""
        if len(self.processes) <= 1:
            return ""
        cases = " ".join(f"WHEN {p} THEN {i * _CORRELATION_STRIDE}" for i, p in enumerate(self.processes) if i)
        return f" + CASE ({key}) >> {_TID_BITS} {cases} ELSE 0 END"

    def _enum_labels(self, table: str) -> list[tuple[int, str]]:
        """(id, label) rows of a small nsys enum table (a few dozen rows); empty without it."""
        if not {"id", "label"} <= self._columns(table):
            return []
        return self.db.execute(f"SELECT id, label FROM {table}").fetchall()

    def _copy_labels(self) -> dict[int, str]:
        """copyKind -> Kineto's direction (``HtoD``)."""
        return {i: _short_copy_kind(label) for i, label in self._enum_labels("ENUM_CUDA_MEMCPY_OPER")
                if type(i) is int and type(label) is str}

    def _mem_kinds(self) -> dict[int, str]:
        """memKind / srcKind / dstKind -> nsys' label (``Pageable``, ``Device``)."""
        return {i: label for i, label in self._enum_labels("ENUM_CUDA_MEM_KIND")
                if type(i) is int and type(label) is str}

    def _devices(self) -> tuple[dict, ...]:
        """``{"id": CUDA device, "name": ...}`` per GPU of TARGET_INFO_GPU (absent in cut-out windows)."""
        columns = self._columns("TARGET_INFO_GPU")
        if "name" not in columns:
            return ()
        key = next((c for c in ("cuDevice", "id") if c in columns), None)
        if key is None:
            return ()
        rows = self.db.execute(f"SELECT {key}, name FROM TARGET_INFO_GPU").fetchall()
        return tuple({"id": i if type(i) is int else None, "name": _str_or_none(name)} for i, name in rows)

    # -- the GPU tables, as SQL -------------------------------------------------------------

    def _gpu_sources(self) -> list[_GpuSource]:
        """Each GPU table the export has, as the SQL of its name, check and columns (the same
        expressions :class:`molmo_latency.trace.nsys._Export` reads them with)."""
        out = []
        for table, kind in ((_KERNEL, "kernel"), (_MEMCPY, "gpu_memcpy"), (_MEMSET, "gpu_memset")):
            columns = self._columns(table)
            if not columns:
                continue
            self._need(table, columns, ("start", "end"))
            ids = [f"t.{c}" for c in ("deviceId", "streamId", "correlationId", "globalPid") if c in columns]
            names: list[str] = []
            extra: list[str] = []  # columns of the row beyond the shared ones (for duplicates)
            codes: list[str] = []
            namer = None
            source = f"{table} AS t"
            if kind == "kernel":
                name_id = next((c for c in ("demangledName", "shortName", "mangledName") if c in columns), None)
                if name_id is None:
                    self._need(table, columns, ("demangledName",))
                source += f" LEFT JOIN {self._strings(table)} AS s ON s.id = t.{name_id}"
                name = _text("s.value")
                names = ["s.value"]
                dims = [f"{d}{axis}" for d in ("grid", "block") for axis in "XYZ"]
                if all(d in columns for d in dims):
                    ids += [f"t.{d}" for d in dims]
                    extra = [_int(f"t.{d}") for d in dims]
            elif kind == "gpu_memcpy":
                codes = [c for c in ("copyKind", "srcKind", "dstKind") if c in columns]
                ids += [f"t.{c}" for c in codes]
                copy, kinds = self._copy_labels(), self._mem_kinds()
                direction = _sql_map(_int("t.copyKind"), copy, None) if "copyKind" in codes else "NULL"
                name = f"'Memcpy ' || COALESCE({direction}, 'Unknown')"
                both = "srcKind" in codes and "dstKind" in codes and bool(kinds)
                if both:
                    src = _sql_map(_int("t.srcKind"), kinds, "Unknown")
                    dst = _sql_map(_int("t.dstKind"), kinds, "Unknown")
                    name = f"{name} || ' (' || {src} || ' -> ' || {dst} || ')'"
                namer = _memcpy_namer(codes, copy, kinds, both)
            else:
                codes = ["memKind"] if "memKind" in columns else []
                ids += [f"t.{c}" for c in codes]
                kinds = self._mem_kinds()
                if codes and kinds:
                    name = f"'Memset (' || {_sql_map(_int('t.memKind'), kinds, 'Unknown')} || ')'"
                    namer = (lambda row, kinds=kinds: f"Memset ({kinds.get(row[0], 'Unknown')})")
                else:
                    name, namer = "'Memset'", (lambda row: "Memset")
            out.append(_GpuSource(table, kind, source, name, _reason("t.start", "t.end", ids, names), columns, extra,
                                  name_id if kind == "kernel" else None, _reason("t.start", "t.end", ids, []),
                                  () if kind == "kernel" else tuple(f"t.{c}" for c in codes),
                                  None if kind == "kernel" else namer))
        return out


@dataclass(frozen=True)
class _GpuSource:
    table: str
    kind: str
    source: str  # FROM clause (t: the table, s: its StringIds)
    name: str  # SQL of the activity's name
    reason: str  # SQL of the reader's per-row reason (NULL: readable)
    columns: set[str]
    extra: list[str]  # SQL of the other columns a duplicate must equal too (grid, block)
    name_id: str | None = None  # kernels: the column naming them through StringIds
    reason_by_id: str = "NULL"  # the reason without the name check (kernels: no StringIds join)
    codes: tuple[str, ...] = ()  # memcpy, memset: the integer columns their name is made of
    namer: Callable[[tuple], str] | None = None  # the name of those codes, as `name` makes it in SQL


def _warn(message: str, stacklevel: int) -> None:
    warnings.warn(message, TraceWarning, stacklevel=stacklevel + 1)


# ------------------------------------------------------------------------------------------
# The summary in SQL.


@dataclass(frozen=True)
class ExportSummary:
    """What ``trace summary --parts gpu,categories,kernels`` shows of an nsys export (times in ns),
    computed by SQLite. Rows are plain dicts, in the order and with the columns of the frames of
    :class:`~molmo_latency.trace.TraceSummary`:

    - ``kernels``: ``name, kind, category, count, total_ns, mean_ns, min_ns, max_ns``, largest
      total first (:func:`~molmo_latency.trace.kernel_breakdown`);
    - ``devices``: ``device, gpu_activities, gpu_kernel_ns, gpu_busy_ns, gpu_span_ns, gpu_idle_ns,
      gpu_start_ns, gpu_end_ns`` (:func:`~molmo_latency.trace.device_gpu_stats`);
    - ``categories``: ``category, count, total_ns``, largest first.

    ``computed`` names the parts computed (of :data:`SUMMARY_PARTS`); the others are empty.
    ``events`` counts the GPU activity rows read, ``gpu_activities`` those kept; ``skipped`` and
    ``skipped_reasons`` count the GPU activities set aside (``tables_checked``: ``("gpu",)``).
    """

    path: str
    base_time_ns: int
    metadata: dict
    device_properties: tuple
    trace_name: str | None
    events: int
    gpu_activities: int
    skipped: int
    skipped_reasons: dict
    computed: tuple[str, ...]
    kernels: list[dict] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)
    categories: list[dict] = field(default_factory=list)
    tables_checked: tuple[str, ...] = ("gpu",)
    layout: str = "nsys"


def summarize_export(path: str | os.PathLike, parts: tuple[str, ...] = SUMMARY_PARTS) -> ExportSummary:
    """The `parts` (of :data:`SUMMARY_PARTS`) of ``trace summary`` of an nsys export, computed by
    SQLite: per-kernel ``GROUP BY`` with names joined from StringIds in SQL, per-device busy time
    by window functions, skipped rows counted by reason in the same queries. Nothing but
    aggregated rows leaves SQLite; no polars. Warnings (TraceWarning) and errors (TraceError) are
    those of :func:`~molmo_latency.trace.read_nsys` for the GPU tables.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._nsys_demo import write_demo_export
        >>> s = summarize_export(write_demo_export(tempfile.mkdtemp()))
        >>> s.gpu_activities, s.kernels[0]["name"], s.devices[0]["gpu_activities"], s.computed
        (9, 'flash_fwd_kernel', 9, ('gpu', 'categories', 'kernels'))
    """
    unknown = [p for p in parts if p not in SUMMARY_PARTS]
    if unknown:
        raise ValueError(f"summarize_export computes {', '.join(SUMMARY_PARTS)}; not {', '.join(unknown)}")
    with open_export(path) as (path, db):
        return _Summary(path, db, tuple(p for p in SUMMARY_PARTS if p in parts)).run()


class _Summary(ExportDB):
    def __init__(self, path: Path, db: sqlite3.Connection, parts: tuple[str, ...]):
        super().__init__(path, db)
        self.parts = parts
        self._kept: dict[str, int] = {}  # rows kept per GPU table, before duplicates
        self._set_aside: dict[str, int] = {}  # rows set aside per GPU table

    def run(self) -> ExportSummary:
        self.base_time_ns = self._base_time_ns()
        sources = self._gpu_sources()
        self._check_other_tables()
        per_name, events, bound = self._per_name(sources)
        if not self._within_span(bound):
            return self._from_full_reader()
        busy, collisions = self._busy(sources)
        if collisions:  # two activities share device, start and end: count duplicates exactly
            self.processes = self._processes()
            per_name, _, _ = self._per_name(sources, dedupe=True)
        kept = sum(r[3] for r in per_name)
        self._warn_skipped()
        if kept == 0:
            _warn(f"{self.path}: no GPU activities (kernel, memcpy, memset); a capture without CUDA tracing "
                  "(`nsys profile -t cuda,nvtx`) or without GPU work: GPU tables are empty", stacklevel=4)
        meta = self._metadata()
        kernels = _kernel_rows(per_name)
        return ExportSummary(
            path=str(self.path),
            base_time_ns=self.base_time_ns,
            metadata={"nsys_version": _str_or_none(meta.get("EXPORT_PRODUCT_VERSION")),
                      "schema_version": _str_or_none(meta.get("EXPORT_SCHEMA_VERSION"))},
            device_properties=self._devices(),
            trace_name=_str_or_none(meta.get("EXPORT_PARAM_INPUT_FILE")),
            events=events,
            gpu_activities=kept,
            skipped=sum(self.skipped.values()),
            skipped_reasons=dict(self.skipped),
            computed=self.parts,
            kernels=kernels if "kernels" in self.parts else [],
            devices=self._device_rows(per_name, busy) if "gpu" in self.parts else [],
            categories=_category_rows(per_name) if "categories" in self.parts else [],
        )

    def _check_other_tables(self) -> None:
        """The schema checks the full reader makes of the runtime and NVTX tables (the same
        errors for the same export), without reading their rows."""
        runtime = self._columns(_RUNTIME)
        if runtime:
            self._need(_RUNTIME, runtime, ("start", "end", "nameId"))
            self._strings(_RUNTIME)
        nvtx = self._columns(_NVTX)
        if nvtx:
            self._need(_NVTX, nvtx, ("start", "end", "eventType"))
            if "textId" in nvtx:
                self._strings(_NVTX)

    def _shifted(self, column: str) -> str:
        return f"({column} + {self.base_time_ns})"

    def _checked(self, src: _GpuSource, by_id: bool = False) -> str:
        """SQL: the row's reason (the reader's SQL reason, then those of ``_checks.drop_impossible``
        in its order), NULL for a row that is kept. ``outside_time_span`` here is only a duration
        over the span: :meth:`_within_span` makes sure no start can be far from the median.
        `by_id`: without the name check (kernels: checked per name id, see :meth:`_per_name`)."""
        device = _int("t.deviceId") if "deviceId" in src.columns else "NULL"
        return (f"COALESCE({src.reason_by_id if by_id else src.reason}, CASE WHEN t.end < t.start THEN "
                f"'negative_duration' WHEN {self._shifted('t.start')} < 0 THEN 'negative_time' "
                f"WHEN {device} IS NULL THEN 'missing_device' "
                f"WHEN t.end - t.start > {_MAX_TRACE_SPAN_NS} THEN 'outside_time_span' END)")

    def _row_columns(self, src: _GpuSource) -> list[str]:
        """SQL of every column of the reader's GPU row but name and times: device, stream,
        correlation (with its process offset), grid and block."""
        columns = src.columns
        correlation = "NULL"
        if "correlationId" in columns:
            correlation = _int("t.correlationId") + (
                self._process_offset("t.globalPid") if "globalPid" in columns else "")
        return [_int("t.deviceId") if "deviceId" in columns else "NULL",
                _int("t.streamId") if "streamId" in columns else "NULL", correlation, *src.extra]

    def _valid(self, src: _GpuSource, dedupe: bool) -> str:
        """SQL of the kept rows of `src`: ``device, start, end`` (raw export times), and with
        `dedupe` one row per set of equal rows (the first kept, as the reader does) with ``name``.
        A table none of whose rows was set aside is read as it is (no check, no join)."""
        device = _int("t.deviceId") if "deviceId" in src.columns else "NULL"
        if not dedupe:
            if not self._set_aside[src.table]:  # every device is an integer
                return f"SELECT t.deviceId AS device, t.start AS start, t.end AS end FROM {src.table} AS t"
            return (f"SELECT {device} AS device, t.start AS start, t.end AS end "
                    f"FROM {src.source} WHERE {self._checked(src)} IS NULL")
        others = self._row_columns(src)
        return (f"SELECT DISTINCT {src.name} AS name, {', '.join(f'{c} AS c{i}' for i, c in enumerate(others))}, "
                f"t.start AS start, t.end AS end FROM {src.source} WHERE {self._checked(src)} IS NULL")

    def _per_name(self, sources: list[_GpuSource], dedupe: bool = False):
        """Rows ``(name, kind, device, count, total, min, max, first start, last end)`` per name, device
        and table (kept rows), the rows
        read, and the first and last start of the rows the reader takes its median over. Skipped
        rows are counted in ``self.skipped``; with `dedupe`, only the duplicates (the kept rows
        without `dedupe` less those with it, per table)."""
        per_name, events, lo, hi = [], 0, None, None
        for src in sources:
            if dedupe:
                rows = self.db.execute(
                    f"SELECT name, c0, COUNT(*), SUM(end - start), MIN(end - start), MAX(end - start), MIN(start), "
                    f"MAX(end) FROM ({self._valid(src, True)}) GROUP BY name, c0").fetchall()
                self.skipped["duplicate"] += self._kept[src.table] - sum(r[2] for r in rows)
                per_name += [(name, src.kind, *rest) for name, *rest in rows]
                continue
            # kernels are grouped by their name id (no join per row); the names of the few ids after
            key, source = (f"t.{src.name_id}", f"{src.table} AS t") if src.name_id else (src.name, src.source)
            checked = self._checked(src, by_id=bool(src.name_id))
            # one pass: per name and device, and how many rows a reason sets aside (none in every real
            # export); only then a second pass groups by reason too
            device = "t.deviceId" if "deviceId" in src.columns else "NULL"
            if src.namer:  # memcpy, memset: grouped by their codes, named after (per group, not per row)
                key, source = ", ".join(src.codes) or "NULL", f"{src.table} AS t"
            n_keys = max(1, len(src.codes))
            rows = self.db.execute(
                f"SELECT NULL, {key}, {device}, COUNT(*), SUM(t.end - t.start), MIN(t.end - t.start), "
                f"MAX(t.end - t.start), MIN(t.start), MAX(t.end), MIN(t.start), MAX(t.start), "
                f"SUM({checked} IS NOT NULL) FROM {source} GROUP BY {key}, {device}").fetchall()
            if not any(r[-1] for r in rows):  # every row is kept: raw columns are the reader's values
                if src.namer:
                    rows = [(None, src.namer(r[1:1 + n_keys]), *r[1 + n_keys:-1]) for r in rows]
                else:
                    rows = [r[:-1] for r in rows]
            else:
                device = _int("t.deviceId") if "deviceId" in src.columns else "NULL"
                rows = self.db.execute(
                    f"SELECT r, name, device, COUNT(*), SUM(dur), MIN(dur), MAX(dur), MIN(start), MAX(end), "
                    f"MIN(CASE WHEN shifted >= 0 THEN start END), MAX(CASE WHEN shifted >= 0 THEN start END) "
                    f"FROM (SELECT {checked} AS r, {key} AS name, {device} AS device, t.end - t.start AS dur, "
                    f"t.start AS start, t.end AS end, {self._shifted('t.start')} AS shifted FROM {source}) "
                    "GROUP BY r, name, device"
                ).fetchall()
            if src.name_id:
                rows = self._named(src, rows)
            self._kept[src.table] = 0
            self._set_aside[src.table] = 0
            for reason, name, device, n, total, shortest, longest, first, last, low, high in rows:
                events += n
                if reason in _MEDIAN_REASONS and low is not None:  # readable rows, not before the epoch
                    lo = low if lo is None else min(lo, low)
                    hi = high if hi is None else max(hi, high)
                if reason is None:
                    per_name.append((name, src.kind, device, n, total, shortest, longest, first, last))
                    self._kept[src.table] += n
                else:
                    self.skipped[reason] += n
                    self._set_aside[src.table] += n
        if dedupe:
            self.skipped = +self.skipped  # no zero counts
        return per_name, events, (lo, hi)

    def _named(self, src: _GpuSource, rows: list[tuple]) -> list[tuple]:
        """`rows` grouped by kernel name id, with the name (the reader's StringIds join) in place of
        the id; a group whose name is not text (and that no earlier reason set aside) gets the
        reader's reason ``non_text_name``."""
        names = self._string_values(src.table, sorted({r[1] for r in rows if type(r[1]) is int}))
        strings = self._strings(src.table)
        for key in {r[1] for r in rows if r[1] is not None and type(r[1]) is not int}:  # SQLite's = decides
            row = self.db.execute(f"SELECT value FROM {strings} WHERE id = ?", (key,)).fetchone()
            names[key] = row[0] if row else None
        out = []
        for reason, key, *rest in rows:
            name = names.get(key) if key is not None else None
            if type(name) is not str and name is not None:
                if reason in _AFTER_NAME_REASONS:  # the name's reason comes first
                    reason = "non_text_name"
                name = None
            out.append((reason, name, *rest))
        return out

    def _within_span(self, gpu_bound: tuple[int | None, int | None]) -> bool:
        """Whether every start the reader takes its median over (GPU activities, runtime calls,
        NVTX ranges; readable, not before the epoch) lies within the span of every other: then
        no row is far from the median. Runtime and NVTX starts are bounded from outside: first by
        the first and last start of every row (SQLite's MIN and MAX; text sorts above numbers, so
        integer MIN and MAX bound every number), and only when that is too wide by those of the
        rows the reader can read (an integer start in range, not before the epoch, an NVTX range)."""
        lo, hi = gpu_bound
        limit = _TIME_LIMIT_NS

        def widen(low, high):
            return (low if lo is None else min(lo, low)), (high if hi is None else max(hi, high))

        for table, where in ((_RUNTIME, ""), (_NVTX, f" AND eventType IN {_NVTX_RANGES}")):
            if not self._columns(table):
                continue
            low, high = self.db.execute(f"SELECT MIN(start), MAX(start) FROM {table}").fetchone()
            if low is None:  # no start at all
                continue
            if type(low) is int and type(high) is int:
                wide_lo, wide_hi = widen(low, high)
                if wide_hi - wide_lo <= _MAX_TRACE_SPAN_NS:
                    lo, hi = wide_lo, wide_hi
                    continue
            low, high = self.db.execute(
                f"SELECT MIN(start), MAX(start) FROM {table} WHERE typeof(start) = 'integer' AND "
                f"start BETWEEN {-self.base_time_ns} AND {limit}{where}").fetchone()
            if low is not None:
                lo, hi = widen(low, high)
        return lo is None or hi - lo <= _MAX_TRACE_SPAN_NS

    def _busy(self, sources: list[_GpuSource]) -> tuple[dict, int]:
        """Busy ns per device (the union of the kept activities' intervals: SQLite sorts them by
        start, a loop keeps the furthest end so far; batches of rows, bounded memory) and how many
        rows share device, start and end with the row before them (candidate duplicates)."""
        if not sources:
            return {}, 0
        union = " UNION ALL ".join(f"SELECT device, start, end FROM ({self._valid(s, False)})" for s in sources)
        cursor = self.db.execute(f"SELECT device, start, end FROM ({union}) ORDER BY device, start, end")
        busy: dict = {}
        none = object()  # before the first row
        same, device, furthest, total, last_start, last_end = 0, none, 0, 0, None, None
        while rows := cursor.fetchmany(_BATCH_ROWS):
            for d, start, end in rows:
                if d != device:
                    if device is not none:
                        busy[device] = total
                    device, furthest, total, last_start, last_end = d, start, 0, None, None
                elif start == last_start and end == last_end:
                    same += 1
                last_start, last_end = start, end
                if end > furthest:
                    total += end - (start if start > furthest else furthest)
                    furthest = end
        if device is not none:
            busy[device] = total
        return busy, same

    def _device_rows(self, per_name: list[tuple], busy: dict) -> list[dict]:
        """Per device: ``device_gpu_stats``' columns from the per-name rows and the busy time."""
        per: dict = {}
        for _, _, device, n, total, _, _, first, last in per_name:
            row = per.get(device)
            if row is None:
                per[device] = [n, total, first, last]
            else:
                row[0] += n
                row[1] += total
                row[2] = min(row[2], first)
                row[3] = max(row[3], last)
        base = self.base_time_ns
        return [
            {"device": device, "gpu_activities": n, "gpu_kernel_ns": total, "gpu_busy_ns": busy[device],
             "gpu_span_ns": last - first, "gpu_idle_ns": last - first - busy[device], "gpu_start_ns": first + base,
             "gpu_end_ns": last + base}
            for device, (n, total, first, last) in sorted(per.items())
        ]

    def _warn_skipped(self) -> None:
        total = sum(self.skipped.values())
        if not total:
            return
        from molmo_latency.trace._checks import SKIP_REASONS

        parts = ", ".join(f"{count} {SKIP_REASONS.get(key, key)}" for key, count in self.skipped.most_common())
        _warn(f"{self.path}: skipped {total} event(s), not counted in any total: {parts}", stacklevel=4)

    def _from_full_reader(self) -> ExportSummary:
        """The summary from :func:`~molmo_latency.trace.read_nsys`'s tables: for an export whose
        events are spread over more than a day (the median start decides which are set aside)."""
        import polars as pl

        from molmo_latency.trace.attribution import device_gpu_stats, kernel_breakdown
        from molmo_latency.trace.categories import with_category
        from molmo_latency.trace.nsys import _Export

        export = _Export(self.path, self.db)
        if hasattr(self, "_string_table"):  # its warning was given once already
            export._string_table = self._string_table
        trace = export.read()
        kernels = kernel_breakdown(trace.gpu)
        categories = (with_category(trace.gpu).group_by("category")
                      .agg(count=pl.len().cast(pl.Int64), total_ns=pl.col("dur_ns").sum())
                      .sort(["total_ns", "category"], descending=[True, False]))
        return ExportSummary(
            path=trace.path,
            base_time_ns=trace.base_time_ns,
            metadata=dict(trace.metadata),
            device_properties=trace.device_properties,
            trace_name=trace.trace_name,
            events=trace.events,
            gpu_activities=trace.gpu.height,
            skipped=trace.skipped,
            skipped_reasons=dict(trace.skipped_reasons),
            computed=self.parts,
            kernels=kernels.to_dicts() if "kernels" in self.parts else [],
            devices=device_gpu_stats(trace.gpu).to_dicts() if "gpu" in self.parts else [],
            categories=categories.to_dicts() if "categories" in self.parts else [],
            tables_checked=("gpu", "runtime", "annotations"),
        )


_KIND_ORDER = {"kernel": 0, "gpu_memcpy": 1, "gpu_memset": 2}
#: Reasons given after the reader's SQL reason, to rows the reader takes its median start over.
_MEDIAN_REASONS = (None, "negative_duration", "missing_device", "outside_time_span")
#: Reasons that come after the reader's SQL reasons (``_checks.drop_impossible``'s), or none.
_AFTER_NAME_REASONS = (None, "negative_duration", "negative_time", "missing_device", "outside_time_span")


def _memcpy_namer(codes: list[str], copy: dict[int, str], kinds: dict[int, str], both: bool):
    """The name of a memcpy of (copyKind, srcKind, dstKind) (those the table has), as the SQL
    ``name`` makes it: ``Memcpy HtoD (Pageable -> Device)``, ``Unknown`` for a code without a label."""
    where = {c: i for i, c in enumerate(codes)}

    def name(row: tuple) -> str:
        direction = copy.get(row[where["copyKind"]]) if "copyKind" in where else None
        text = f"Memcpy {direction if direction is not None else 'Unknown'}"
        if both:
            src, dst = row[where["srcKind"]], row[where["dstKind"]]
            text += f" ({kinds.get(src, 'Unknown')} -> {kinds.get(dst, 'Unknown')})"
        return text

    return name


def _kernel_rows(per_name: list[tuple]) -> list[dict]:
    """Per name over every table: count, total, mean, min, max, the kind of its first activity
    (earliest start; kernels before memcpy before memset at equal starts, as the reader's table
    order has them) and its category; largest total first, then by name (no name first)."""
    from molmo_latency.trace.categories import kernel_category

    merged: dict = {}
    for name, kind, _, n, total, low, high, first, _ in per_name:
        row = merged.get(name)
        if row is None:
            merged[name] = [n, total, low, high, (first, _KIND_ORDER[kind]), kind]
            continue
        row[0] += n
        row[1] += total
        row[2] = min(row[2], low)
        row[3] = max(row[3], high)
        if (first, _KIND_ORDER[kind]) < row[4]:
            row[4], row[5] = (first, _KIND_ORDER[kind]), kind
    out = [
        {"name": name, "kind": kind, "category": kernel_category(name, kind), "count": n, "total_ns": total,
         "mean_ns": total / n, "min_ns": low, "max_ns": high}
        for name, (n, total, low, high, _, kind) in merged.items()
    ]
    out.sort(key=lambda r: (-r["total_ns"], r["name"] is not None, r["name"] or ""))
    return out


def _category_rows(per_name: list[tuple]) -> list[dict]:
    """``category, count, total_ns`` over every activity (the category of its own name and kind,
    as ``with_category`` gives each row); largest total first."""
    from molmo_latency.trace.categories import kernel_category

    per: dict[str, list[int]] = {}
    for name, kind, _, n, total, *_ in per_name:
        row = per.setdefault(kernel_category(name, kind), [0, 0])
        row[0] += n
        row[1] += total
    out = [{"category": c, "count": n, "total_ns": total} for c, (n, total) in per.items()]
    out.sort(key=lambda r: (-r["total_ns"], r["category"]))
    return out
