"""Read Nsight Systems SQLite exports (``nsys export --type sqlite``) into the tables of
:func:`~molmo_latency.trace.read_kineto`, so summary, attribution per phase and diff work on them.

This module collects and holds; it does no analysis. The SQL it shares (opening an export
read-only, the checks per row) is in :mod:`molmo_latency.trace.nsys_sql`, which also computes the
per-kernel, per-device and per-category tables of ``trace summary --parts`` in SQLite alone.
SQLite does the work per event (process keys, payloads, filters) in one query per table. A table
no row of which is set aside (every real export) comes back a column at a time: SQLite joins each
column's values of a chunk of rows into one string that polars splits, and names are looked up
once per distinct StringIds id instead of joined per row; a table with rows set aside comes back
in batches of rows, with the reason of each. No Python code runs per event, and memory holds one
chunk plus the tables. A gzipped export is first decompressed, streamed, into a temporary file.

What goes where (every time int64 ns; ``base_time_ns`` is the capture's start in ns since the
Unix epoch, ``TARGET_INFO_SESSION_START_TIME.utcEpochNs``, and the export's times count from it):

- ``gpu``: ``CUPTI_ACTIVITY_KIND_KERNEL`` (``name``: the demangled name, ``kind`` ``kernel``),
  ``..._MEMCPY`` (``gpu_memcpy``, named like Kineto: ``Memcpy HtoD (Pageable -> Device)``) and
  ``..._MEMSET`` (``gpu_memset``, ``Memset (Device)``); ``device`` = ``deviceId``, ``stream`` =
  ``streamId``, grid and block of kernels;
- ``runtime``: ``CUPTI_ACTIVITY_KIND_RUNTIME`` (``cuda_runtime``, or ``cuda_driver`` for driver
  calls), named without nsys' ``_v7000`` version suffix (``cudaLaunchKernel`` as in Kineto);
- ``annotations``: NVTX push/pop (event type 59) and start/end (60) ranges (and NVTXT's, 70 and
  71) on the thread that opened them, with an extra ``domain`` column (the name of the
  process's NvtxDomainCreate event of that domain id; null for the default domain); ranges never
  closed are skipped (counted in ``skipped``). Ranges of our own domain ``molmo_latency`` get the
  names the profiler gives its ``record_function`` ranges: ``request[N]`` and ``decode[N]`` from
  the registered name and the integer payload, ``vision`` / ``projector`` / ``prefill`` as is;
  ranges of another named domain are ``domain:text`` (as nsys' own reports name them, so another
  library's ``decode`` is not taken for a phase); those of the default domain are their text;
- ``cpu_ops`` and ``gpu_annotations``: empty (an nsys capture has no Kineto CPU ops).

``pid`` / ``tid`` are the OS process and thread ids inside nsys' ``globalTid``. CUPTI's
correlation ids restart in every process, so a capture of several processes repeats them: the
``correlation`` column is ``correlationId + 2**32 * k`` for the k-th process (in ``globalPid``
order), which makes the launch join of :func:`~molmo_latency.trace.attribute` pair each GPU
activity with the runtime call of its own process (``(globalPid, correlationId)``); a
single-process capture keeps nsys' ids unchanged.

Schema versions: only the columns a file has are read (:func:`_columns`); the one difference
between nsys versions that changes a query, which columns hold the NVTX payload, lives in
:data:`NVTX_PAYLOAD_COLUMNS`.
"""

from __future__ import annotations

import sqlite3
import warnings
from collections import Counter
from dataclasses import dataclass

import polars as pl

from molmo_latency.trace._checks import drop_impossible, median_start_ns, warn_skipped
from molmo_latency.trace.nsys_sql import (
    _KERNEL,
    _MEMCPY,
    _MEMSET,
    _NVTX,
    _NVTX_RANGES,
    _RUNTIME,
    _TID_BITS,
    _TID_MASK,
    _TIME_LIMIT_NS,
    SQLITE_MAGIC,
    ExportDB,
    _int,
    _reason,
    _short_copy_kind,
    _str_or_none,
    _text,
    is_sqlite,
    open_export,
)
from molmo_latency.trace.reader import (
    CPU_COLUMNS,
    GPU_ANNOTATION_COLUMNS,
    GPU_COLUMNS,
    RUNTIME_COLUMNS,
    KinetoTrace,
    TraceWarning,
    _TABLE_SCHEMA,
)

__all__ = ["NVTX_DOMAIN", "NVTX_PAYLOAD_COLUMNS", "SQLITE_MAGIC", "is_sqlite", "read_nsys"]

#: Our NVTX domain (molmo_latency.ranges.NVTX_DOMAIN; repeated here so reading needs no torch).
NVTX_DOMAIN = "molmo_latency"
#: Phases whose record_function name carries the payload (``decode[3]``, ``request[0]``); the
#: other phases are named as is (molmo_latency.ranges.record_function_name).
_INDEXED_PHASES = ("decode", "request")
_PHASES = ("request", "vision", "projector", "prefill", "decode")

#: Where an NVTX event's integer payload is, in the order looked at. Exports of every nsys
#: version we know (schemas 3.17 to 3.25) have these four; an older or newer export may lack
#: some, and only those it has are read.
NVTX_PAYLOAD_COLUMNS = ("int64Value", "uint64Value", "int32Value", "uint32Value")

_NVTX_DOMAIN_CREATE = 75
_BATCH_ROWS = 100_000
#: Rowids per query of a column-at-a-time read: each column's joined string stays a few MB.
_COLUMN_CHUNK_ROWIDS = 1 << 17


@dataclass(frozen=True)
class _Named:
    """How a table names its rows: ``text`` (SQL of an inline text, or NULL) before ``id`` (SQL of
    a StringIds id) of the StringIds table the reader joins for `table`."""

    table: str
    id: str
    text: str = "NULL"


def read_nsys(path: str | os.PathLike) -> KinetoTrace:
    """Read an Nsight Systems SQLite export (``.sqlite``, or gzipped) into the tables of
    :func:`~molmo_latency.trace.read_kineto` (see the module docstring for what goes where).

    The result is a :class:`~molmo_latency.trace.KinetoTrace` with ``layout`` ``"nsys"`` and
    ``metadata`` holding the nsys version and export schema. Raises
    :class:`~molmo_latency.errors.TraceError` (one line: the file, the problem, what to do) for
    a missing file, a truncated gzip, a file that is not SQLite, a SQLite database that is not an
    nsys export, or a table lacking a column the reader needs (and a FIFO or a device, before it is
    opened). An export without GPU activity gives empty GPU tables and a
    :class:`~molmo_latency.trace.TraceWarning`. Rows a reader cannot trust (a start or end that is
    missing, not an integer or beyond int64 ns, ``end < start``, an id that is not an integer, a
    name that is not text, a duplicate row, times far from the rest) are set aside, counted by
    reason in ``skipped_reasons`` (the same names as for Kineto) and listed in one warning.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import phase_gpu_table, read_nsys
        >>> from molmo_latency.trace._nsys_demo import write_demo_export
        >>> trace = read_nsys(write_demo_export(tempfile.mkdtemp()))
        >>> trace.layout, trace.annotations["name"].to_list()[:3]
        ('nsys', ['request[0]', 'vision', 'projector'])
        >>> phase_gpu_table(trace).select("phase", "step", "gpu_activities").row(-1)
        ('decode', 1, 1)
    """
    with open_export(path) as (path, db):
        return _Export(path, db).read()


class _Export(ExportDB):
    """One open export: a query per table into frames (the shared SQL: :class:`ExportDB`)."""

    events = 0

    def _checked_frame(self, items: list[str], bad: str, table: str, schema: dict[str, pl.DataType],
                       where: str = "", join: str = "", named: _Named | None = None,
                       bad_unjoined: str | None = None, aside: tuple[str, str] | None = None,
                       checked: tuple[str, ...] = ()) -> pl.DataFrame:
        """The rows of ``SELECT items FROM table AS t [join] [WHERE where]`` that `bad` (see
        :func:`_reason`) gives no reason against; the others are counted under their reason.

        A table none of whose rows has a reason (every real export) is read column by column
        (:meth:`_columnar`), checked in the same pass by `bad_unjoined` (`bad` without the checks
        of the joined StringIds value) and, with `named`, without the join: item 0, the name, is
        looked up once per distinct id (and a value that is not text found there). `aside`: (reason,
        SQL) of rows that reason alone sets aside (NVTX ranges never closed), counted apart, so that
        they do not send the whole table to the row read. `checked`: the columns (and expressions
        of them) whose type `bad_unjoined` checks, read there without their own check (see
        :meth:`_unchecked`). Otherwise, or when a value cannot be read back so, rows are read in
        batches with their reason."""
        if bad_unjoined is not None:
            also = f"{where} AND " if where else ""
            kept = where if aside is None else f"{also}NOT ({aside[1]})"
            frame = self._columnar_named(table, [self._unchecked(i, checked) for i in items], schema, kept, named,
                                         bad_unjoined)
            if frame is not None:
                self.events += frame.height
                if aside is not None:
                    n = self.db.execute(f"SELECT COUNT(*) FROM {table} AS t WHERE {also}{aside[1]}").fetchone()[0]
                    if n:
                        self.skipped[aside[0]] += n
                        self.events += n
                return frame
        source = f"{table} AS t{join}"
        tail = f" WHERE {where}" if where else ""
        frame = self._frame(f"SELECT {', '.join([*items, bad])} FROM {source}{tail}", {**schema, "_bad": pl.String})
        return self._valid(frame)

    def _unchecked(self, item: str, checked: tuple[str, ...]) -> str:
        """`item` (SQL) without the per-value type checks of the `checked` columns: ``_int(c)`` is
        ``c`` and a time item is the column plus the base. Only for the column read, whose rows are
        used only when the same query's reason gives none of them one: the reason requires each
        checked id to be an integer or NULL and each time an integer in range, where the plain
        expression has the checked one's value. A column the reason does not check keeps its
        check (a name's id: text there would be NULL, not a number).

        Example:
            >>> export = _Export.__new__(_Export)
            >>> export.base_time_ns = 5
            >>> export._unchecked(f"{_int('t.a')} + {_int('t.b')}", ("t.a",))
            "t.a + (CASE WHEN typeof(t.b) = 'integer' THEN t.b END)"
            >>> export._unchecked(export._time("t.start"), ("t.start",))
            't.start + 5'
        """
        for column in checked:
            item = item.replace(_int(column), column)
            if column in ("t.start", "t.end"):
                item = item.replace(self._time(column), f"{column} + {self.base_time_ns}")
        return item

    def _columnar_named(self, table: str, items: list[str], schema: dict[str, pl.DataType], where: str,
                        named: _Named | None, bad: str) -> pl.DataFrame | None:
        if named is None:
            return self._columnar(table, items, schema, where, bad)
        rest = dict(list(schema.items())[1:])
        if named.text == "NULL":  # named by id alone (kernels, runtime calls)
            frame = self._columnar(table, [named.id, *items[1:]], {"_id": pl.Int64, **rest}, where, bad)
            if frame is not None:
                frame = frame.with_columns(_text=pl.lit(None, dtype=pl.String))
        else:
            frame = self._columnar(table, [named.text, named.id, *items[1:]],
                                   {"_text": pl.String, "_id": pl.Int64, **rest}, where, bad)
        if frame is None:
            return None
        frame = self._named(frame, named, next(iter(schema)))
        return None if frame is None else frame.select(list(schema))

    def _valid(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` without the rows its ``_bad`` column gives a reason for (counted); no ``_bad``."""
        bad = frame["_bad"]
        if bad.null_count() != bad.len():
            for key, count in bad.drop_nulls().value_counts().iter_rows():
                self.skipped[key] += count
            frame = frame.filter(bad.is_null())
        return frame.drop("_bad")

    def _frame(self, sql: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        """The rows of `sql` as one frame, fetched in batches (memory: one batch of rows at a time)."""
        cursor = self.db.execute(sql)
        parts = []
        while rows := cursor.fetchmany(_BATCH_ROWS):
            parts.append(pl.DataFrame(rows, schema=schema, orient="row"))
        if not parts:
            return pl.DataFrame(schema=schema)
        frame = pl.concat(parts, how="vertical", rechunk=True) if len(parts) > 1 else parts[0]
        self.events += frame.height
        return frame

    def _columnar(self, table: str, items: list[str], schema: dict[str, pl.DataType],
                  where: str, bad: str) -> pl.DataFrame | None:
        """The rows of ``SELECT items FROM table AS t [WHERE where]`` (in rowid order, as a scan of the
        table gives them), read a column at a time: per chunk of rowids, SQLite joins each column's
        values into one string (``group_concat``) and polars splits it, so no Python object is made
        per value. Integers are joined by ``,`` (NULL: an empty piece), text by NUL (NULL: ``\x01``).
        None when a value cannot be read back so exactly (a NUL inside a text, a text equal to the
        NULL mark, a piece that is not an integer, a table without rowids), and when `bad` (SQL, see
        :func:`_reason`) gives a row a reason: the caller reads rows, with their reasons."""
        try:  # two queries: SQLite reads MIN or MAX of the rowid from the b-tree's ends, not both at once
            low = self.db.execute(f"SELECT MIN(rowid) FROM {table}").fetchone()[0]
            high = self.db.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0]
        except sqlite3.OperationalError:  # a WITHOUT ROWID table
            return None
        if low is None:
            return pl.DataFrame(schema=schema)
        if type(low) is not int or type(high) is not int:
            return None
        picks, nulls = [], []
        for item, dtype in zip(items, schema.values()):
            if dtype == pl.String:
                picks.append(f"group_concat(COALESCE({item}, char(1)), char(0))")
                nulls.append(f"SUM(({item}) IS NULL)")
            else:
                picks.append(f"group_concat(COALESCE({item}, ''), ',')")
        cond = f"{where} AND " if where else ""
        parts = []
        for first in range(low, high + 1, _COLUMN_CHUNK_ROWIDS):
            row = self.db.execute(
                f"SELECT COUNT(*), SUM(({bad}) IS NOT NULL), {', '.join([*picks, *nulls])} FROM {table} AS t "
                f"WHERE {cond}t.rowid BETWEEN {first} AND {first + _COLUMN_CHUNK_ROWIDS - 1}").fetchone()
            n, n_bad, joined, null_counts = row[0], row[1], row[2:2 + len(picks)], iter(row[2 + len(picks):])
            if n_bad:
                return None
            if not n:
                continue
            columns = []
            for (name, dtype), text in zip(schema.items(), joined):
                piece = pl.Series(name, [text], dtype=pl.String).str.split("\x00" if dtype == pl.String else ",")
                piece = piece.explode()
                if piece.len() != n:
                    return None
                if dtype == pl.String:
                    mark = piece == "\x01"
                    if int(mark.sum()) != next(null_counts):
                        return None
                    piece = piece.set(mark, None)
                else:
                    empty = int((piece.str.len_bytes() == 0).sum())
                    piece = piece.cast(pl.Int64, strict=False)
                    if piece.null_count() != empty:
                        return None
                columns.append(piece)
            parts.append(pl.DataFrame(columns))
        return pl.concat(parts, how="vertical", rechunk=True) if parts else pl.DataFrame(schema=schema)

    def _named(self, frame: pl.DataFrame, named: _Named, name: str) -> pl.DataFrame | None:
        """`frame` with column `name` in place of ``_text`` and ``_id``: the text where there is one,
        else the StringIds value of the id (the first string of a repeated id; NULL for an id
        StringIds lacks), as the reader's join gives it. Looked up once per distinct id. None when
        such a value is not text (the reader sets those rows aside: the caller reads rows)."""
        ids = frame.filter(pl.col("_text").is_null())["_id"].drop_nulls().unique().to_list()
        lookup: dict[int, str] = {}
        for key, value in self._string_values(named.table, ids).items():
            if value is not None and type(value) is not str:  # the reader's reason non_text_name
                return None
            if value is not None:
                lookup[key] = value
        by_id = (pl.col("_id").replace_strict(lookup, default=None, return_dtype=pl.String) if lookup
                 else pl.lit(None, dtype=pl.String))
        return frame.with_columns(pl.coalesce(pl.col("_text"), by_id).alias("_text")).drop("_id").rename(
            {"_text": name})

    # -- tables -------------------------------------------------------------------------------

    def read(self) -> KinetoTrace:
        self.base_time_ns = self._base_time_ns()
        self.processes = self._processes()
        gpu = pl.concat([self._kernels(), self._memcpy(), self._memset()], how="vertical")
        gpu = gpu.sort("start_ns", maintain_order=True)
        runtime = self._runtime().sort("start_ns", maintain_order=True)
        annotations = self._nvtx().sort("start_ns", maintain_order=True)
        median_ns = median_start_ns([gpu, runtime, annotations])
        gpu = drop_impossible(gpu, median_ns, self.skipped, device_required=True)
        runtime, annotations = (drop_impossible(t, median_ns, self.skipped) for t in (runtime, annotations))
        unclosed = self.skipped.get("unclosed_range", 0)
        if unclosed:
            warnings.warn(f"{self.path}: skipped {unclosed} NVTX range(s) never closed (no end time)",
                          TraceWarning, stacklevel=4)
        warn_skipped(self.path, Counter({k: v for k, v in self.skipped.items() if k != "unclosed_range"}),
                     stacklevel=4)
        if gpu.height == 0:
            warnings.warn(
                f"{self.path}: no GPU activities (kernel, memcpy, memset); a capture without CUDA tracing "
                "(`nsys profile -t cuda,nvtx`) or without GPU work: GPU tables are empty",
                TraceWarning, stacklevel=4,
            )
        meta = self._metadata()
        empty = {c: _TABLE_SCHEMA[c] for c in CPU_COLUMNS}
        return KinetoTrace(
            path=str(self.path),
            layout="nsys",
            base_time_ns=self.base_time_ns,
            gpu=gpu,
            runtime=runtime,
            cpu_ops=pl.DataFrame(schema=empty),
            annotations=annotations,
            gpu_annotations=pl.DataFrame(schema={c: _TABLE_SCHEMA[c] for c in GPU_ANNOTATION_COLUMNS}),
            device_properties=self._devices(),
            trace_name=_str_or_none(meta.get("EXPORT_PARAM_INPUT_FILE")),
            events=self.events,
            skipped=sum(self.skipped.values()),
            skipped_reasons=dict(self.skipped),
            metadata={
                "nsys_version": _str_or_none(meta.get("EXPORT_PRODUCT_VERSION")),
                "schema_version": _str_or_none(meta.get("EXPORT_SCHEMA_VERSION")),
            },
        )

    def _times(self) -> list[str]:
        """SQL select items start_ns, end_ns (NULL where the row's ``_bad`` reason sets it aside)."""
        return [self._time("t.start"), self._time("t.end")]

    def _time(self, column: str) -> str:
        return (f"CASE WHEN typeof({column}) = 'integer' AND {column} BETWEEN -{_TIME_LIMIT_NS} AND "
                f"{_TIME_LIMIT_NS} THEN {column} + {self.base_time_ns} END")

    def _activity_columns(self, table: str, columns: set[str], extra_ids: list[str] = ()) -> list[str]:
        """SQL select items shared by kernels, memcpy and memset: times, device, stream,
        correlation, and last the ``_bad`` reason (see :func:`_reason`)."""
        self._need(table, columns, ("start", "end"))
        correlation = "NULL"
        if "correlationId" in columns:
            correlation = _int("t.correlationId") + (
                self._process_offset("t.globalPid") if "globalPid" in columns else "")
        ids = [f"t.{c}" for c in ("deviceId", "streamId", "correlationId", "globalPid") if c in columns]
        self._bad = _reason("t.start", "t.end", [*ids, *extra_ids], self._names)
        self._bad_unjoined = _reason("t.start", "t.end", [*ids, *extra_ids], [])  # names: checked per id
        self._checked = ("t.start", "t.end", *ids, *extra_ids)
        return [
            *self._times(),
            _int("t.deviceId") if "deviceId" in columns else "NULL",
            _int("t.streamId") if "streamId" in columns else "NULL",
            correlation,
        ]

    _ACTIVITY_SCHEMA = {
        "name": pl.String, "start_ns": pl.Int64, "end_ns": pl.Int64, "device": pl.Int64,
        "stream": pl.Int64, "correlation": pl.Int64,
    }
    _names: list[str] = []
    _bad = _bad_unjoined = "NULL"
    _checked: tuple[str, ...] = ()

    def _finish_gpu(self, frame: pl.DataFrame, kind: str) -> pl.DataFrame:
        dims = ("grid", "block")
        missing = [pl.lit(None, dtype=_TABLE_SCHEMA[d]).alias(d) for d in dims if d not in frame.columns]
        return frame.with_columns(
            *missing,
            kind=pl.lit(kind, dtype=pl.String),
            external_id=pl.lit(None, dtype=pl.Int64),
            dur_ns=pl.col("end_ns") - pl.col("start_ns"),
        ).select(GPU_COLUMNS)

    def _empty_gpu(self) -> pl.DataFrame:
        return pl.DataFrame(schema={c: _TABLE_SCHEMA[c] for c in GPU_COLUMNS})

    def _kernels(self) -> pl.DataFrame:
        columns = self._columns(_KERNEL)
        if not columns:
            return self._empty_gpu()
        name_id = next((c for c in ("demangledName", "shortName", "mangledName") if c in columns), None)
        if name_id is None:
            self._need(_KERNEL, columns, ("demangledName",))
        strings = self._strings(_KERNEL)
        dims = [f"{d}{axis}" for d in ("grid", "block") for axis in "XYZ"]
        has_dims = all(d in columns for d in dims)
        self._names = ["s.value"]
        items = [_text("s.value"), *self._activity_columns(_KERNEL, columns,
                                                           [f"t.{d}" for d in dims] if has_dims else [])]
        schema = dict(self._ACTIVITY_SCHEMA)
        if has_dims:
            items += [_int(f"t.{d}") for d in dims]
            schema.update({d: pl.Int64 for d in dims})
        frame = self._checked_frame(items, self._bad, _KERNEL, schema,
                                    join=f" LEFT JOIN {strings} AS s ON s.id = t.{name_id}",
                                    named=_Named(_KERNEL, _int(f"t.{name_id}")), bad_unjoined=self._bad_unjoined,
                                    checked=self._checked)
        if has_dims:
            frame = frame.with_columns(
                grid=pl.concat_list("gridX", "gridY", "gridZ").list.to_array(3),
                block=pl.concat_list("blockX", "blockY", "blockZ").list.to_array(3),
            )
        return self._finish_gpu(frame, "kernel")

    def _memcpy(self) -> pl.DataFrame:
        columns = self._columns(_MEMCPY)
        if not columns:
            return self._empty_gpu()
        codes = [c for c in ("copyKind", "srcKind", "dstKind") if c in columns]
        self._names = []
        items = [*self._activity_columns(_MEMCPY, columns, [f"t.{c}" for c in codes])]
        schema = {k: v for k, v in self._ACTIVITY_SCHEMA.items() if k != "name"}
        items += [_int(f"t.{c}") for c in codes]
        schema.update({c: pl.Int64 for c in codes})
        frame = self._checked_frame(items, self._bad, _MEMCPY, schema, bad_unjoined=self._bad, checked=self._checked)
        return self._finish_gpu(frame.with_columns(name=self._memcpy_names(frame, codes)), "gpu_memcpy")

    def _memcpy_names(self, frame: pl.DataFrame, codes: list[str]) -> pl.Expr:
        """Kineto's names: ``Memcpy HtoD (Pageable -> Device)`` from nsys' enum labels."""
        copy = self._enum_labels("ENUM_CUDA_MEMCPY_OPER")
        kinds = self._enum_labels("ENUM_CUDA_MEM_KIND")
        copy_map = {i: _short_copy_kind(label) for i, label in copy if type(i) is int and type(label) is str}
        kind_map = {i: label for i, label in kinds if type(i) is int and type(label) is str}
        direction = (pl.col("copyKind").replace_strict(copy_map, default=None, return_dtype=pl.String)
                     if "copyKind" in codes else pl.lit(None, dtype=pl.String))
        name = pl.lit("Memcpy ") + direction.fill_null("Unknown")
        if "srcKind" in codes and "dstKind" in codes and kind_map:
            src = pl.col("srcKind").replace_strict(kind_map, default="Unknown", return_dtype=pl.String)
            dst = pl.col("dstKind").replace_strict(kind_map, default="Unknown", return_dtype=pl.String)
            name = name + pl.lit(" (") + src + pl.lit(" -> ") + dst + pl.lit(")")
        return name.alias("name")

    def _memset(self) -> pl.DataFrame:
        columns = self._columns(_MEMSET)
        if not columns:
            return self._empty_gpu()
        self._names = []
        items = [*self._activity_columns(_MEMSET, columns, ["t.memKind"] if "memKind" in columns else [])]
        schema = {k: v for k, v in self._ACTIVITY_SCHEMA.items() if k != "name"}
        if "memKind" in columns:
            items.append(_int("t.memKind"))
            schema["memKind"] = pl.Int64
        frame = self._checked_frame(items, self._bad, _MEMSET, schema, bad_unjoined=self._bad, checked=self._checked)
        kinds = {i: label for i, label in self._enum_labels("ENUM_CUDA_MEM_KIND")
                 if type(i) is int and type(label) is str}
        if "memKind" in columns and kinds:
            kind = pl.col("memKind").replace_strict(kinds, default="Unknown", return_dtype=pl.String)
            name = pl.lit("Memset (") + kind + pl.lit(")")
        else:
            name = pl.lit("Memset")
        return self._finish_gpu(frame.with_columns(name=name.alias("name")), "gpu_memset")

    def _runtime(self) -> pl.DataFrame:
        columns = self._columns(_RUNTIME)
        schema = {"name": pl.String, "kind": pl.String, "pid": pl.Int64, "tid": pl.Int64,
                  "correlation": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64}
        if not columns:
            return pl.DataFrame(schema={c: _TABLE_SCHEMA[c] for c in RUNTIME_COLUMNS})
        self._need(_RUNTIME, columns, ("start", "end", "nameId"))
        strings = self._strings(_RUNTIME)
        tid = _int("t.globalTid") if "globalTid" in columns else "NULL"
        correlation = "NULL"
        if "correlationId" in columns:
            correlation = _int("t.correlationId") + (
                self._process_offset("t.globalTid") if "globalTid" in columns else "")
        kind = ("CASE t.eventClass WHEN 1 THEN 'cuda_driver' ELSE 'cuda_runtime' END"
                if "eventClass" in columns else "'cuda_runtime'")
        ids = [f"t.{c}" for c in ("globalTid", "correlationId") if c in columns]
        bad = _reason("t.start", "t.end", ids, ["s.value"])
        start, end = self._times()
        items = [_text("s.value"), kind, f"({tid} >> {_TID_BITS}) & {_TID_MASK}", f"{tid} & {_TID_MASK}", correlation,
                 start, end]
        frame = self._checked_frame(items, bad, _RUNTIME, schema, join=f" LEFT JOIN {strings} AS s ON s.id = t.nameId",
                                    named=_Named(_RUNTIME, _int("t.nameId")),
                                    bad_unjoined=_reason("t.start", "t.end", ids, []), checked=("t.start", "t.end", *ids))
        return frame.with_columns(
            name=pl.col("name").str.replace(r"_v\d+$", ""),
            external_id=pl.lit(None, dtype=pl.Int64),
            dur_ns=pl.col("end_ns") - pl.col("start_ns"),
        ).select(RUNTIME_COLUMNS)

    def _nvtx(self) -> pl.DataFrame:
        columns = self._columns(_NVTX)
        out_columns = (*CPU_COLUMNS, "domain")
        if not columns:
            return pl.DataFrame(schema={**{c: _TABLE_SCHEMA[c] for c in CPU_COLUMNS}, "domain": pl.String})
        self._need(_NVTX, columns, ("start", "end", "eventType"))
        has_text_id = "textId" in columns
        join = ""
        if has_text_id:
            join = f" LEFT JOIN {self._strings(_NVTX)} AS s ON s.id = t.textId"
        text = "t.text" if "text" in columns else "NULL"
        if has_text_id:
            text = f"COALESCE({text}, s.value)"
        payload_columns = [f"t.{c}" for c in NVTX_PAYLOAD_COLUMNS if c in columns]
        payload = (f"COALESCE({', '.join(payload_columns)})" if len(payload_columns) > 1
                   else (payload_columns[0] if payload_columns else "NULL"))
        tid = _int("t.globalTid") if "globalTid" in columns else "NULL"
        domain = _int("t.domainId") if "domainId" in columns else "NULL"
        ranges = f"t.eventType IN {_NVTX_RANGES}"
        ids = [f"t.{c}" for c in ("globalTid", "domainId") if c in columns] + payload_columns
        bad = _reason("t.start", "t.end", ids, [text], end_missing="unclosed_range")  # no end: never closed
        start, end = self._times()
        items = [_text(text), f"({tid} >> {_TID_BITS}) & {_TID_MASK}", f"{tid} & {_TID_MASK}", start, end, domain,
                 _int(payload)]
        schema = {"name": pl.String, "pid": pl.Int64, "tid": pl.Int64, "start_ns": pl.Int64, "end_ns": pl.Int64,
                  "domain_id": pl.Int64, "payload": pl.Int64}
        named = _Named(_NVTX, _int("t.textId"), "t.text" if "text" in columns else "NULL") if has_text_id else None
        bad_unjoined = _reason("t.start", "t.end", ids, ["t.text"] if "text" in columns else [],
                               end_missing="unclosed_range")
        frame = self._checked_frame(items, bad, _NVTX, schema, where=ranges, join=join, named=named,
                                    bad_unjoined=bad_unjoined,
                                    aside=("unclosed_range", "t.start IS NOT NULL AND t.end IS NULL"),
                                    checked=("t.start", "t.end", *ids, payload))  # payload: a COALESCE of ids
        # the domain's name, looked up by (process, domainId) as one int64 key: no join, no copy of the frame
        domains = {(pid << 32) | domain_id: name for pid, domain_id, name in self._domains(text, join)}
        key = (pl.col("pid") * (1 << 32)) + pl.col("domain_id")
        frame = frame.with_columns(
            domain=key.replace_strict(domains, default=None, return_dtype=pl.String) if domains
            else pl.lit(None, dtype=pl.String)
        )
        domain_name = pl.col("domain")
        ours = (domain_name == NVTX_DOMAIN) & pl.col("name").is_in(_PHASES)
        indexed = pl.col("name").is_in(_INDEXED_PHASES) & pl.col("payload").is_not_null()
        name = (
            pl.when(ours & indexed)
            .then(pl.format("{}[{}]", pl.col("name"), pl.col("payload")))
            .when(ours | domain_name.is_null())
            .then(pl.col("name"))
            .otherwise(pl.format("{}:{}", domain_name, pl.col("name")))
        )
        return frame.with_columns(
            name=name,
            external_id=pl.lit(None, dtype=pl.Int64),
            dur_ns=pl.col("end_ns") - pl.col("start_ns"),
        ).select(out_columns)

    def _domains(self, text: str, join: str) -> list[tuple[int, int, str]]:
        """(pid, domainId, name) of the NvtxDomainCreate events. Domain ids are numbered per process
        (nsys' own scripts join them so), and domain 0, the default, has no name."""
        columns = self._columns(_NVTX)
        if "domainId" not in columns or "globalTid" not in columns:
            return []
        rows = self.db.execute(
            f"SELECT DISTINCT (t.globalTid >> {_TID_BITS}) & {_TID_MASK}, t.domainId, {text} FROM {_NVTX} AS t{join} "
            f"WHERE t.eventType = {_NVTX_DOMAIN_CREATE} AND t.domainId IS NOT NULL AND t.globalTid IS NOT NULL"
        ).fetchall()
        seen: dict[tuple[int, int], str] = {}
        for pid, domain_id, name in rows:  # one row per domain and process, not per event
            if type(name) is str and type(pid) is int and type(domain_id) is int:
                seen.setdefault((pid, domain_id), name)
        return [(pid, domain_id, name) for (pid, domain_id), name in seen.items()]
