"""Issue 27, trace readers: every measured way a trace summary went wrong with exit 0, a traceback
or a hang has its own test. Expected values come from the raw files (JSON events, SQL on the
export), never from the reader; the reader must set the bad events aside, count them under a
reason and sum only the others."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import sqlite3
import warnings
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.errors import SweepError, TraceError
from molmo_latency.trace import TraceWarning, load_trace, read_kineto, read_nsys
from tests.nsys_sql import SHARED, gunzip
from tests.test_fuzz_inputs import no_hang

DATA = Path(__file__).resolve().parent / "data" / "kineto"
SMALL = DATA / "event_sync_multi_stream.json.gz"  # older layout: absolute integer us
NSYS = SHARED / "torch_zeros_sum_no_nvtx.sqlite.gz"
KERNELS = "CUPTI_ACTIVITY_KIND_KERNEL"


def doc_of(path: Path = SMALL) -> dict:
    return json.loads(gzip.decompress(path.read_bytes()))


def kernels_of(doc: dict) -> list[dict]:
    return [e for e in doc["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]


def write(tmp_path: Path, doc: dict | bytes | str, name: str = "trace.json") -> Path:
    path = tmp_path / name
    data = json.dumps(doc).encode() if isinstance(doc, dict) else doc
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def read_quietly(path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        trace = load_trace(path)
    return trace, [str(w.message) for w in caught]


def summary_json(path: Path) -> tuple[int, dict | None, str]:
    from molmo_latency.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["trace", "summary", str(path), "--json"])
    return code, (json.loads(out.getvalue()) if code == 0 else None), err.getvalue()


def kernel_us_of(doc: dict, skip: set[int] = frozenset()) -> float:
    """Sum of the kernels' 'dur' (us) straight from the JSON, leaving out the indices in `skip`."""
    return sum(e["dur"] for i, e in enumerate(kernels_of(doc)) if i not in skip)


# ------------------------------------------------------------------------------------------
# Kineto: impossible times are set aside, counted and never summed.


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("ts", -1_000, "negative_time"),       # measured: span 3.4e15 us (107 years)
    ("dur", -50, "negative_duration"),     # measured: negative kernel_us and category totals
    ("ts", 0, "outside_time_span"),        # the epoch, 54 years before the other events
    ("dur", 3 * 86_400 * 10**6, "outside_time_span"),  # a 3-day kernel in a 62 ms trace
])
def test_a_kineto_kernel_with_an_impossible_time_is_skipped_not_summed(tmp_path, field, value, reason):
    doc = doc_of()
    original = kernels_of(doc)
    first_ts = min(e["ts"] for e in doc["traceEvents"] if e.get("ph") == "X")
    last_end = max(e["ts"] + e["dur"] for e in doc["traceEvents"] if e.get("ph") == "X")
    expected_kernel_us = kernel_us_of(doc, skip={0})
    original[0][field] = value
    code, out, err = summary_json(write(tmp_path, doc))
    assert code == 0, err
    assert out["trace"]["skipped_events"] == 1 and out["trace"]["skipped_reasons"] == {reason: 1}
    assert sum(r["total_us"] for r in out["kernels"] if r["kind"] == "kernel") == pytest.approx(
        expected_kernel_us, abs=1e-6)
    assert all(r["total_us"] >= 0 for r in out["categories"])
    for device in out["gpu"]:
        assert 0 <= device["span_us"] <= last_end - first_ts
        assert device["busy_us"] >= 0 and device["kernel_us"] >= 0
    assert any("skipped 1 event" in w for w in out["warnings"])


def test_times_spread_over_years_on_purpose_are_kept(tmp_path):
    """No majority near the median: nothing is taken for an outlier (exactness test of the reader)."""
    body = ",".join(f'{{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": {ts}, "dur": 1}}'
                    for ts in (1, 10**12, 10**15))
    trace, warned = read_quietly(write(tmp_path, '{"traceEvents": [' + body + "]}"))
    assert trace.gpu.height == 3 and trace.skipped == 0 and not warned


def test_a_gpu_activity_without_a_device_is_counted(tmp_path):
    doc = doc_of()
    kernel = kernels_of(doc)[0]
    kernel["pid"] = "Spans"  # no integer pid, and no args.device
    kernel["args"].pop("device", None)
    trace, _ = read_quietly(write(tmp_path, doc))
    assert trace.skipped_reasons == {"missing_device": 1}
    assert trace.gpu["device"].null_count() == 0


def test_exact_duplicate_kineto_events_are_counted_once_and_reported(tmp_path):
    doc = doc_of()
    kernel = kernels_of(doc)[1]
    annotation_like = next(e for e in doc["traceEvents"] if e.get("cat") == "cuda_runtime")
    doc["traceEvents"] += [dict(kernel), dict(annotation_like), dict(annotation_like)]
    trace, warned = read_quietly(write(tmp_path, doc))
    assert trace.skipped_reasons == {"duplicate": 3}
    assert trace.gpu.height == len(kernels_of(doc_of())) + sum(
        1 for e in doc_of()["traceEvents"] if e.get("cat") in ("gpu_memcpy", "gpu_memset"))
    assert trace.gpu["dur_ns"].sum() == read_kineto(SMALL).gpu["dur_ns"].sum()
    assert any("duplicating" in w for w in warned)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda e: e.pop("cat"), "missing_category"),
    (lambda e: e.update(cat="kernal"), "unknown_category"),
    (lambda e: e.pop("ph"), "bad_phase"),
    (lambda e: e.update(ph="Q"), "bad_phase"),
    (lambda e: e.update(ph=7), "bad_phase"),
    (lambda e: e.update(ph=None), "bad_phase"),
])
def test_malformed_events_are_counted_not_silently_dropped(tmp_path, change, reason):
    doc = doc_of()
    change(kernels_of(doc)[0])
    trace, warned = read_quietly(write(tmp_path, doc))
    assert trace.skipped_reasons == {reason: 1}
    assert trace.gpu.filter(pl.col("kind") == "kernel").height == len(kernels_of(doc_of())) - 1
    assert any("skipped 1 event" in w for w in warned)
    assert not any("CPU-only" in w for w in warned)


def test_a_cat_of_the_wrong_type_is_a_one_line_error(tmp_path):
    doc = doc_of()
    kernels_of(doc)[0]["cat"] = 5
    path = write(tmp_path, doc)
    with pytest.raises(TraceError, match=r"traceEvents\[\d+\]"):
        read_kineto(path)


def test_a_trace_of_only_odd_kernels_does_not_claim_to_be_cpu_only(tmp_path):
    doc = doc_of()
    for event in doc["traceEvents"]:
        if event.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"):
            event["cat"] = "kernel_v2"
    _, warned = read_quietly(write(tmp_path, doc))
    assert any("unknown 'cat'" in w for w in warned)
    assert any("among the skipped ones" in w for w in warned)


def test_the_real_traces_lose_nothing():
    """Every shared trace reads with no event skipped (the checks never touch real data)."""
    for path in sorted([*(SHARED.parent / "kineto").glob("*.gz"), *SHARED.glob("*.gz")]):
        trace, warned = read_quietly(path)
        assert trace.skipped == 0 and trace.skipped_reasons == {}, (path, trace.skipped_reasons)
        assert not any("skipped" in w for w in warned), warned


# ------------------------------------------------------------------------------------------
# Bounds: nesting, decompressed size, event length; what a file is.


@pytest.mark.parametrize("text", [
    '{"traceEvents": [' + "[" * 5000 + "]" * 5000 + "]}",
    '{"traceEvents": [{"ph": "X", "cat": "kernel", "args": ' + '{"a": ' * 5000 + "1" + "}" * 5001 + "]}",
    "[" * 5000 + "]" * 5000,
])
def test_json_nested_5000_deep_is_a_one_line_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(TraceError, match="nested too deeply") as info:
        read_kineto(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_gzip_bomb_is_refused_past_the_cap(tmp_path, monkeypatch):
    from molmo_latency.trace import _text, reader

    monkeypatch.setattr(reader, "MAX_WHOLE_TEXT_BYTES", 1 << 20)
    monkeypatch.setattr(_text, "_HEADER_LIMIT", 1 << 20)
    monkeypatch.setattr(_text, "_EVENT_LIMIT", 1 << 20)
    zeros = write(tmp_path, gzip.compress(b"\0" * (8 << 20), 1), "zeros.json.gz")
    spaces = write(tmp_path, gzip.compress(b'{"traceEvents": [{"ph": "X", "name": "' + b" " * (8 << 20)
                                           + b'"}]}', 1), "spaces.json.gz")
    for path in (zeros, spaces):
        with no_hang(), pytest.raises(TraceError, match="MiB") as info:
            read_kineto(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    # a real trace under the same small caps still reads (it streams)
    assert read_kineto(SMALL).gpu.equals(reader.read_kineto(SMALL).gpu)


def test_a_sweep_toml_is_named_for_what_it_is(tmp_path):
    path = write(tmp_path, '[grid]\ncrops = [1, 2]\n\n[protocol]\nrepeats = 3\n', "sweep.toml")
    code, _, err = summary_json(path)
    assert code == 2
    assert err.strip() == (f"molmo-latency: error: {path}: looks like TOML/text, not a Kineto JSON trace or an "
                           "nsys SQLite export; pass a trace written by torch.profiler (export_chrome_trace) or "
                           "`nsys export --type sqlite`")


@pytest.mark.parametrize(("content", "looks"), [
    (b"crops = [1, 2]\n", "TOML/text"), (b"<html><body>x</body></html>", "XML/HTML"),
    (b"\x00\x01\x02binary", "binary data"), (b"PK\x03\x04zip", "a zip archive"),
    (b"hello world, not json\n", "text"),
])
def test_other_files_are_named_for_what_they_look_like(tmp_path, content, looks):
    path = write(tmp_path, content, "x.json")
    with pytest.raises(TraceError, match=f"looks like {looks},"):
        read_kineto(path)


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make", [lambda t: Path("/dev/zero"), _fifo], ids=["dev_zero", "fifo"])
def test_not_a_regular_file_is_refused_before_it_is_opened(tmp_path, make):
    path = make(tmp_path)
    with no_hang():
        code, _, err = summary_json(path)
        with pytest.raises(TraceError, match="not a regular file"):
            read_nsys(path)
    assert code == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("make", [lambda t: Path("/dev/zero"), _fifo], ids=["dev_zero", "fifo"])
def test_sweep_and_block_importance_files_must_be_regular(tmp_path, make):
    from molmo_latency.sweep.spec import load_sweep, read_block_importance

    path = make(tmp_path)
    with no_hang():
        with pytest.raises(SweepError, match="not a regular file"):
            load_sweep(path)
        with pytest.raises(SweepError, match="not a regular file"):
            read_block_importance(path)
        sweep = tmp_path / "sweep.toml"
        sweep.write_text(f'crops = [1]\nblocks = [1]\nblock_importance = "{path}"\n')
        with pytest.raises(SweepError, match="not a regular file"):
            load_sweep(sweep)


# ------------------------------------------------------------------------------------------
# nsys: the same checks, the same reason names.


def _export(tmp_path: Path, sql: str | None = None, *args) -> Path:
    """The small shared export, its kernel table rebuilt without constraints (as a damaged or
    hand-made export may be), then `sql` run on it."""
    path = gunzip(NSYS, tmp_path)
    if sql:
        db = sqlite3.connect(path)
        db.executescript(f"CREATE TABLE k2 AS SELECT * FROM {KERNELS}; DROP TABLE {KERNELS}; "
                         f"ALTER TABLE k2 RENAME TO {KERNELS};")
        db.execute(sql, args)
        db.commit()
        db.close()
    return path


def _kernel_ns(path: Path, where: str = "1") -> tuple[int, int]:
    """(count, summed end - start) of the export's integer-timed kernels, by SQL."""
    db = sqlite3.connect(path)
    row = db.execute(f"SELECT COUNT(*), SUM(end - start) FROM {KERNELS} WHERE {where}").fetchone()
    db.close()
    return row


@pytest.mark.parametrize(("sql", "args", "reason"), [
    (f"UPDATE {KERNELS} SET start = 'abc' WHERE rowid = 1", (), "non_numeric_time"),  # measured: 186x GPU time
    (f"UPDATE {KERNELS} SET start = NULL WHERE rowid = 1", (), "missing_time"),        # measured: silent drop
    (f"UPDATE {KERNELS} SET end = start - 10 WHERE rowid = 1", (), "negative_duration"),
    (f"UPDATE {KERNELS} SET end = ? WHERE rowid = 1", (2**63 - 1,), "time_out_of_range"),  # traceback
    (f"UPDATE {KERNELS} SET end = 1e300 WHERE rowid = 1", (), "non_numeric_time"),         # traceback
    (f"UPDATE {KERNELS} SET deviceId = 'gpu0' WHERE rowid = 1", (), "non_integer_id"),      # traceback
    (f"UPDATE {KERNELS} SET start = start - 3 * 86400000000000 WHERE rowid = 1", (), "outside_time_span"),
])
def test_an_nsys_kernel_row_that_cannot_be_true_is_skipped_not_summed(tmp_path, sql, args, reason):
    (tmp_path / "clean").mkdir()
    clean = gunzip(NSYS, tmp_path / "clean")
    count, total_ns = _kernel_ns(clean, "rowid != 1")
    path = _export(tmp_path, sql, *args)
    code, out, err = summary_json(path)
    assert code == 0, err
    assert out["trace"]["skipped_reasons"] == {reason: 1}
    kernels = [k for k in out["kernels"] if k["kind"] == "kernel"]
    assert sum(k["count"] for k in kernels) == count
    assert sum(k["total_us"] for k in kernels) == pytest.approx(total_ns / 1000, abs=1e-3)


def test_an_nsys_string_blob_and_repeated_string_ids_are_reported(tmp_path):
    path = _export(tmp_path)
    db = sqlite3.connect(path)
    name_id = db.execute(f"SELECT demangledName FROM {KERNELS} LIMIT 1").fetchone()[0]
    db.execute("UPDATE StringIds SET value = ? WHERE id = ?", (b"\xff\x00blob", name_id))
    rows = db.execute(f"SELECT COUNT(*) FROM {KERNELS} WHERE demangledName = ?", (name_id,)).fetchone()[0]
    db.commit()
    db.close()
    trace, _ = read_quietly(path)
    assert trace.skipped_reasons == {"non_text_name": rows}
    # a StringIds table whose ids repeat (rebuilt without its primary key)
    (tmp_path / "two").mkdir()
    path2 = _export(tmp_path / "two")
    db = sqlite3.connect(path2)
    db.executescript("CREATE TABLE s2 AS SELECT * FROM StringIds; DROP TABLE StringIds; "
                     "ALTER TABLE s2 RENAME TO StringIds;")
    db.execute("INSERT INTO StringIds SELECT id, value || '_copy' FROM StringIds")
    db.commit()
    db.close()
    trace2, warned = read_quietly(path2)
    (tmp_path / "clean").mkdir()
    clean, _ = read_quietly(gunzip(NSYS, tmp_path / "clean"))
    assert any("repeated id" in w for w in warned)
    assert trace2.gpu.height == clean.gpu.height and trace2.runtime.height == clean.runtime.height


def test_duplicate_nsys_kernel_rows_are_counted_once(tmp_path):
    path = _export(tmp_path, f"INSERT INTO {KERNELS} SELECT * FROM {KERNELS} WHERE rowid = 1")
    count, total_ns = _kernel_ns(path)
    db = sqlite3.connect(path)
    dup_ns = db.execute(f"SELECT end - start FROM {KERNELS} WHERE rowid = 1").fetchone()[0]
    db.close()
    trace, warned = read_quietly(path)
    assert trace.skipped_reasons == {"duplicate": 1}
    kernels = trace.gpu.filter(pl.col("kind") == "kernel")
    assert kernels.height == count - 1 and kernels["dur_ns"].sum() == total_ns - dup_ns
    assert any("duplicating" in w for w in warned)
