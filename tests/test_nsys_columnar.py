"""read_nsys reads a clean table a column at a time (each column joined into one string by SQLite,
split by polars; names looked up per StringIds id). These tests hold it to the row-by-row read it
replaced, on the real exports and the demo export (domains, registered names, payloads), and check
that text it cannot carry in a joined string (a NUL inside a name, a name equal to its NULL mark)
and a StringIds value that is not text still come back as the export stores them."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import warnings

import polars as pl
import pytest

from molmo_latency.trace import TraceWarning, read_nsys
from molmo_latency.trace import nsys as nsys_module
from molmo_latency.trace._nsys_demo import write_demo_export
from tests import nsys_sql
from tests.nsys_sql import EXPORTS, SHARED

TABLES = ("gpu", "runtime", "annotations")


def _read(path, rows: bool, monkeypatch=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceWarning)
        if not rows:
            return read_nsys(path)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(nsys_module._Export, "_columnar_named", lambda *a, **k: None)  # every table by rows
            return read_nsys(path)


def _same(a, b):
    for table in TABLES:
        x, y = getattr(a, table), getattr(b, table)
        assert x.schema == y.schema, table
        assert x.equals(y), table
    assert (a.events, a.skipped, a.skipped_reasons) == (b.events, b.skipped, b.skipped_reasons)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared nsys exports")
@pytest.mark.parametrize("name", EXPORTS)
def test_real_exports_read_by_column_as_by_row(tmp_path, name):
    path = nsys_sql.gunzip(SHARED / f"{name}.sqlite.gz", tmp_path)
    _same(_read(path, rows=False), _read(path, rows=True))


def test_demo_export_with_domains_registered_names_and_payloads(tmp_path):
    path = write_demo_export(tmp_path)
    by_column = _read(path, rows=False)
    _same(by_column, _read(path, rows=True))
    # registered names of our domain with their payload, read through StringIds per id
    assert "request[0]" in by_column.annotations["name"].to_list()


def _copy_demo(tmp_path, *sql: str):
    path = write_demo_export(tempfile.mkdtemp(dir=tmp_path))
    out = tmp_path / "changed.sqlite"
    shutil.copy(path, out)
    db = sqlite3.connect(out)
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()
    return out


@pytest.mark.parametrize("text", ["a\x00b", "\x01", "", "comma, and\nnewline", "\x01\x01"])
def test_any_nvtx_text_comes_back_as_stored(tmp_path, text):
    path = _copy_demo(tmp_path, "UPDATE NVTX_EVENTS SET text = 'x', textId = NULL, domainId = NULL "
                                "WHERE rowid = (SELECT MAX(rowid) FROM NVTX_EVENTS WHERE eventType = 59)")
    db = sqlite3.connect(path)
    db.execute("UPDATE NVTX_EVENTS SET text = ? WHERE rowid = (SELECT MAX(rowid) FROM NVTX_EVENTS "
               "WHERE eventType = 59)", (text,))
    db.commit()
    start, end = db.execute("SELECT start, end FROM NVTX_EVENTS WHERE rowid = (SELECT MAX(rowid) FROM NVTX_EVENTS "
                            "WHERE eventType = 59)").fetchone()
    db.close()
    trace = _read(path, rows=False)
    _same(trace, _read(path, rows=True))
    mine = trace.annotations.filter(pl.col("start_ns") == start + trace.base_time_ns,
                                    pl.col("end_ns") == end + trace.base_time_ns)
    assert mine["name"].to_list() == [text]


def test_a_kernel_named_by_a_value_that_is_not_text_is_set_aside(tmp_path):
    # a blob (a number would be stored as text: the column's affinity is TEXT)
    path = _copy_demo(tmp_path, "UPDATE StringIds SET value = x'2a' WHERE id = (SELECT demangledName FROM "
                                "CUPTI_ACTIVITY_KIND_KERNEL WHERE rowid = 1)")
    db = sqlite3.connect(path)
    n = db.execute("SELECT COUNT(*) FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE demangledName = "
                   "(SELECT demangledName FROM CUPTI_ACTIVITY_KIND_KERNEL WHERE rowid = 1)").fetchone()[0]
    total = db.execute("SELECT COUNT(*) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()[0]
    db.close()
    trace = _read(path, rows=False)
    _same(trace, _read(path, rows=True))
    assert trace.skipped_reasons.get("non_text_name") == n
    assert trace.gpu.filter(pl.col("kind") == "kernel").height == total - n


def test_a_name_id_missing_from_stringids_gives_a_null_name(tmp_path):
    path = _copy_demo(tmp_path, "UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET nameId = 987654 WHERE rowid = 1")
    trace = _read(path, rows=False)
    _same(trace, _read(path, rows=True))
    assert trace.runtime["name"].null_count() == 1


def test_ranges_never_closed_are_counted_apart_and_the_rest_read_by_column(tmp_path, monkeypatch):
    """Captures often end with NVTX ranges still open: those are set aside (as the row read does),
    and the other ranges are still read a column at a time (no row read happens at all here)."""
    path = _copy_demo(tmp_path, "UPDATE NVTX_EVENTS SET end = NULL WHERE rowid IN (SELECT rowid FROM NVTX_EVENTS "
                                "WHERE eventType = 59 ORDER BY rowid LIMIT 2)")
    by_rows = _read(path, rows=True)
    assert by_rows.skipped_reasons == {"unclosed_range": 2}

    def no_rows(*args, **kwargs):
        raise AssertionError("a row read")

    monkeypatch.setattr(nsys_module._Export, "_frame", no_rows)
    _same(_read(path, rows=False), by_rows)


_ONE_RANGE = "(SELECT MIN(rowid) FROM NVTX_EVENTS WHERE eventType = 59)"


@pytest.mark.parametrize("sql", [
    # columns the reason checks (their per-value check is left out of the column read's SQL)
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET correlationId = 'x' WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET gridY = 2.5 WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET start = start + 0.5 WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET end = 4611686018427387905 WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_MEMCPY SET copyKind = x'01' WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET deviceId = x'30' WHERE rowid = 2",  # a blob spelling 0
    "UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET globalTid = 'main' WHERE rowid = 1",
    f"UPDATE NVTX_EVENTS SET int64Value = 'x' WHERE rowid = {_ONE_RANGE}",
    f"UPDATE NVTX_EVENTS SET domainId = 1.5 WHERE rowid = {_ONE_RANGE}",
    # a name's id that is not an integer (not a column the reason checks: read with its check; a
    # blob spelling digits would pass for one in the joined text)
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET demangledName = 'x' WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_KERNEL SET demangledName = x'31' WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET nameId = 2.5 WHERE rowid = 1",
    "UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET nameId = x'31' WHERE rowid = 1",
    f"UPDATE NVTX_EVENTS SET text = NULL, textId = x'31' WHERE rowid = {_ONE_RANGE}",
])
def test_a_value_of_another_type_reads_as_the_row_read_gives_it(tmp_path, sql):
    """The column read drops the per-value type checks of the columns the row's reason checks (one
    typeof per value instead of two): any such value still sends the table to the row read; a
    name's id, which the reason does not check, keeps its own."""
    path = _copy_demo(tmp_path, sql)
    by_rows = _read(path, rows=True)
    _same(_read(path, rows=False), by_rows)
