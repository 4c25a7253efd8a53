"""`trace summary --parts gpu,categories,kernels` of an nsys export, computed by SQLite
(molmo_latency/trace/nsys_sql.py, issue 29), against two independent readings: plain SQL written
here and in tests/nsys_sql.py, and the full reader (read_nsys + the summary's frames), on the three
real exports, the demo export, a replicated export (as benchmarks/nsys_read.py builds it) and
damaged exports; the same rows set aside under the same reasons."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import polars as pl
import pytest

from molmo_latency.cli.main import main
from molmo_latency.trace import TraceWarning, device_gpu_stats, kernel_breakdown, read_nsys, with_category
from molmo_latency.trace._checks import MAX_TRACE_SPAN_NS
from molmo_latency.trace._nsys_demo import write_demo_export
from molmo_latency.trace.nsys_sql import _MAX_TRACE_SPAN_NS, summarize_export
from tests import nsys_sql
from tests.nsys_sql import EXPORTS, SHARED, gunzip

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared nsys exports")

REPO = Path(__file__).resolve().parent.parent
KERNELS = "CUPTI_ACTIVITY_KIND_KERNEL"
FAST = ["--parts", "gpu,categories,kernels"]


def quietly(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        out = fn(*args)
    return out, [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]


def summary_json(*args: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["trace", "summary", *args, "--json"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


def full_reading(path: Path) -> dict:
    """What the full reader gives: per-kernel, per-device and per-category rows, skipped rows."""
    trace, warned = quietly(read_nsys, path)
    categories = (with_category(trace.gpu).group_by("category")
                  .agg(count=pl.len().cast(pl.Int64), total_ns=pl.col("dur_ns").sum())
                  .sort(["total_ns", "category"], descending=[True, False]))
    return {"kernels": kernel_breakdown(trace.gpu).to_dicts(), "devices": device_gpu_stats(trace.gpu).to_dicts(),
            "categories": categories.to_dicts(), "skipped": trace.skipped_reasons, "gpu": trace.gpu.height,
            "warned": warned}


def assert_same_as_full_reader(path: Path, expected_skipped: dict | None = None) -> None:
    got, warned = quietly(summarize_export, path)
    full = full_reading(path)
    means = [(k.pop("mean_ns"), f.pop("mean_ns")) for k, f in zip(got.kernels, full["kernels"])]
    assert got.kernels == full["kernels"]
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in means)
    assert got.devices == full["devices"]
    assert got.categories == full["categories"]
    assert got.gpu_activities == full["gpu"]
    skipped = full["skipped"] if expected_skipped is None else expected_skipped
    assert got.skipped_reasons == skipped and got.skipped == sum(skipped.values())
    if skipped:
        assert any("skipped" in w for w in warned)


# ------------------------------------------------------------------------------------------
# Clean exports: plain SQL and the full reader agree with the SQL summary.


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nsys_sql_summary")
    return {name: gunzip(SHARED / f"{name}.sqlite.gz", directory) for name in EXPORTS}


@pytest.mark.parametrize("name", EXPORTS)
def test_per_kernel_and_per_device_equal_plain_sql(plain, name):
    db = sqlite3.connect(plain[name])
    kernels = nsys_sql.kernels(db)
    devices = nsys_sql.devices(db)
    # min and max per name, in SQL written here
    extremes = dict((n, (lo, hi)) for n, lo, hi in db.execute(
        f"SELECT name, MIN(end - start), MAX(end - start) FROM ({nsys_sql.activities_sql(db)}) GROUP BY name"))
    db.close()
    doc = summary_json(str(SHARED / f"{name}.sqlite.gz"), *FAST)
    assert doc["computed"] == ["gpu", "categories", "kernels"]
    got = {k["name"]: k for k in doc["kernels"]}
    assert set(got) == set(kernels)
    for kernel, (count, total_ns) in kernels.items():
        assert (got[kernel]["count"], got[kernel]["total_us"]) == (count, total_ns / 1000)
        assert (got[kernel]["min_us"], got[kernel]["max_us"]) == tuple(v / 1000 for v in extremes[kernel])
        assert got[kernel]["mean_us"] == pytest.approx(total_ns / count / 1000, rel=1e-12)
    gpu = {d["device"]: d for d in doc["gpu"]}
    assert set(gpu) == set(devices)
    for device, (n, total, busy, span) in devices.items():
        assert (gpu[device]["activities"], gpu[device]["kernel_us"], gpu[device]["busy_us"],
                gpu[device]["span_us"], gpu[device]["idle_us"]) == (n, total / 1000, busy / 1000, span / 1000,
                                                                     (span - busy) / 1000)
    assert doc["trace"]["skipped_events"] == 0 and doc["trace"]["tables_checked"] == ["gpu"]
    assert doc["trace"]["gpu_activities"] == sum(c for c, _ in kernels.values())
    assert "annotations" not in doc and doc["trace"]["annotations"] is None  # not computed, not claimed


@pytest.mark.parametrize("name", EXPORTS)
def test_the_same_as_the_full_summary(plain, name):
    assert_same_as_full_reader(plain[name])
    fast = summary_json(str(plain[name]), *FAST)
    full = summary_json(str(plain[name]))
    assert full["computed"] == ["gpu", "categories", "kernels", "annotations", "cpu_ops"]
    for part in ("gpu", "categories"):
        assert fast[part] == full[part]
    assert len(fast["kernels"]) == len(full["kernels"])
    for a, b in zip(fast["kernels"], full["kernels"]):
        assert {k: v for k, v in a.items() if k != "mean_us"} == {k: v for k, v in b.items() if k != "mean_us"}
        assert a["mean_us"] == pytest.approx(b["mean_us"], rel=1e-12)
    for key in ("path", "layout", "base_time_ns", "gpu_activities", "metadata", "skipped_events"):
        assert fast["trace"][key] == full["trace"][key]


def test_the_demo_export_and_a_replicated_one(tmp_path):
    assert_same_as_full_reader(write_demo_export(tmp_path / "demo"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import nsys_read
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    path = tmp_path / "replicated.sqlite"
    built = nsys_read.build_export(path, 8_000_000)
    assert built["copies"] >= 3
    assert_same_as_full_reader(path)
    db = sqlite3.connect(path)
    kernels = nsys_sql.kernels(db)
    db.close()
    got = {k["name"]: (k["count"], k["total_ns"]) for k in summarize_export(path).kernels}
    assert got == kernels


def test_parts_are_computed_only_when_asked(plain):
    path = str(plain["fsdp_2gpu_h100_window"])
    doc = summary_json(path, "--parts", "kernels")
    assert doc["computed"] == ["kernels"] and "gpu" not in doc and "categories" not in doc and doc["kernels"]
    s = summarize_export(path, ("kernels",))
    assert s.devices == [] and s.categories == [] and s.computed == ("kernels",)


def test_unknown_parts_exit_2_in_one_line(capsys):
    code = main(["trace", "summary", str(SHARED / "torch_zeros_sum_no_nvtx.sqlite.gz"), "--parts", "kernels,nvtx"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--parts kernels,nvtx" in err and len(err.splitlines()) == 1


def test_tables_render(capsys):
    code = main(["trace", "summary", str(SHARED / "fsdp_2gpu_h100_window.sqlite.gz"), *FAST, "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "GPU per device" in out and "Top kernels by total time (us, of 46)" in out
    assert "GPU tables only" in out and "NVTX ranges" not in out


def test_the_span_constant_is_the_readers():
    assert _MAX_TRACE_SPAN_NS == MAX_TRACE_SPAN_NS


# ------------------------------------------------------------------------------------------
# Damaged exports: the same rows set aside, under the same reasons, as the full reader.


def damaged(tmp_path: Path, *sql: str, source: str = "torch_zeros_sum_no_nvtx") -> Path:
    """A shared export, its kernel table rebuilt without constraints (as a damaged export may
    be), then `sql` run on it."""
    path = gunzip(SHARED / f"{source}.sqlite.gz", tmp_path)
    db = sqlite3.connect(path)
    db.executescript(f"CREATE TABLE k2 AS SELECT * FROM {KERNELS}; DROP TABLE {KERNELS}; "
                     f"ALTER TABLE k2 RENAME TO {KERNELS};")
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()
    return path


@pytest.mark.parametrize(("sql", "reason"), [
    (f"UPDATE {KERNELS} SET start = 'abc' WHERE rowid = 1", "non_numeric_time"),
    (f"UPDATE {KERNELS} SET start = NULL WHERE rowid = 1", "missing_time"),
    (f"UPDATE {KERNELS} SET end = start - 10 WHERE rowid = 1", "negative_duration"),
    (f"UPDATE {KERNELS} SET end = {2**63 - 1} WHERE rowid = 1", "time_out_of_range"),
    (f"UPDATE {KERNELS} SET end = 1e300 WHERE rowid = 1", "non_numeric_time"),
    (f"UPDATE {KERNELS} SET deviceId = 'gpu0' WHERE rowid = 1", "non_integer_id"),
    (f"UPDATE {KERNELS} SET gridX = 2.5 WHERE rowid = 1", "non_integer_id"),
    (f"UPDATE {KERNELS} SET deviceId = NULL WHERE rowid = 1", "missing_device"),
    (f"UPDATE {KERNELS} SET end = start + 2 * 86400000000000 WHERE rowid = 1", "outside_time_span"),
    (f"UPDATE {KERNELS} SET start = -(SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME) - 5000, "
     "end = -(SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME) - 4000 WHERE rowid = 1", "negative_time"),
    (f"ALTER TABLE {KERNELS} DROP COLUMN deviceId", "missing_device"),
    # a start three days before the rest: the median decides (the full reader's tables are used)
    (f"UPDATE {KERNELS} SET start = start - 3 * 86400000000000 WHERE rowid = 1", "outside_time_span"),
])
def test_a_damaged_kernel_row_is_set_aside_as_the_reader_does(tmp_path, sql, reason):
    path = damaged(tmp_path, sql)
    if "DROP COLUMN" in sql:  # every kernel
        db = sqlite3.connect(path)
        n = db.execute(f"SELECT COUNT(*) FROM {KERNELS}").fetchone()[0]
        db.close()
        assert_same_as_full_reader(path, {reason: n})
        return
    assert_same_as_full_reader(path, {reason: 1})
    clean = sqlite3.connect(path)
    count, total = clean.execute(f"SELECT COUNT(*), SUM(end - start) FROM {KERNELS} WHERE rowid != 1").fetchone()
    clean.close()
    kernels = [k for k in summarize_export(path).kernels if k["kind"] == "kernel"]
    assert (sum(k["count"] for k in kernels), sum(k["total_ns"] for k in kernels)) == (count, total)


def test_duplicates_are_counted_once(tmp_path):
    path = damaged(tmp_path, f"INSERT INTO {KERNELS} SELECT * FROM {KERNELS} WHERE rowid <= 2",
                   f"INSERT INTO {KERNELS} SELECT * FROM {KERNELS} WHERE rowid = 1")
    db = sqlite3.connect(path)  # same device, start and end on another stream: not a duplicate
    columns = [r[1] for r in db.execute(f"PRAGMA table_info({KERNELS})")]
    items = ", ".join("streamId + 1" if c == "streamId" else c for c in columns)
    db.execute(f"INSERT INTO {KERNELS} ({', '.join(columns)}) SELECT {items} FROM {KERNELS} WHERE rowid = 3")
    db.commit()
    db.close()
    assert_same_as_full_reader(path, {"duplicate": 3})


def test_a_name_that_is_not_text_and_repeated_string_ids(tmp_path):
    path = damaged(tmp_path)
    db = sqlite3.connect(path)
    name_id = db.execute(f"SELECT demangledName FROM {KERNELS} LIMIT 1").fetchone()[0]
    rows = db.execute(f"SELECT COUNT(*) FROM {KERNELS} WHERE demangledName = ?", (name_id,)).fetchone()[0]
    db.execute("UPDATE StringIds SET value = ? WHERE id = ?", (b"\xff\x00blob", name_id))
    db.commit()
    db.close()
    assert_same_as_full_reader(path, {"non_text_name": rows})
    # a name that is not text on a row that starts before the epoch too: the name's reason first
    db = sqlite3.connect(path)
    db.execute(f"UPDATE {KERNELS} SET start = -(SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME) - 5000 "
               "WHERE rowid = (SELECT MIN(rowid) FROM {KERNELS} WHERE demangledName = ?)".replace("{KERNELS}", KERNELS),
               (name_id,))
    db.commit()
    db.close()
    assert_same_as_full_reader(path, {"non_text_name": rows})
    (tmp_path / "two").mkdir()
    path = damaged(tmp_path / "two", "CREATE TABLE s2 AS SELECT * FROM StringIds", "DROP TABLE StringIds",
                   "ALTER TABLE s2 RENAME TO StringIds", "INSERT INTO StringIds SELECT id, value || '_x' FROM StringIds")
    assert_same_as_full_reader(path, {})
    _, warned = quietly(summarize_export, path)
    assert sum("repeated id" in w for w in warned) == 1


def test_rows_of_tables_not_read_are_not_counted(tmp_path):
    """A runtime call with an odd id and an NVTX range never closed: the full reader counts them;
    the SQL summary reads neither table and says so (tables_checked), with the same GPU figures."""
    path = damaged(tmp_path, "UPDATE CUPTI_ACTIVITY_KIND_RUNTIME SET globalTid = 'x' WHERE rowid = 1",
                   source="nvfuser_cross_entropy_h200")
    db = sqlite3.connect(path)
    db.execute("UPDATE NVTX_EVENTS SET end = NULL WHERE rowid IN (SELECT rowid FROM NVTX_EVENTS "
               "WHERE eventType = 59 LIMIT 2)")
    db.commit()
    db.close()
    assert full_reading(path)["skipped"] == {"non_integer_id": 1, "unclosed_range": 2}
    assert_same_as_full_reader(path, {})
    assert summarize_export(path).tables_checked == ("gpu",)


def test_nvtx_far_from_the_rest_moves_the_median(tmp_path):
    """NVTX ranges, most of the export's events, three days after the kernels: the median start is
    among them and the kernels are the odd ones out, as the full reader has it."""
    path = damaged(tmp_path, f"UPDATE NVTX_EVENTS SET start = start + 3 * 86400000000000, "
                             "end = end + 3 * 86400000000000", source="nvfuser_cross_entropy_h200")
    full = full_reading(path)
    assert full["skipped"].get("outside_time_span")
    assert_same_as_full_reader(path, full["skipped"])


# ------------------------------------------------------------------------------------------
# Read-only, bounded, light.


def test_a_read_only_folder_is_read_and_left_as_it_was(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = gunzip(SHARED / "fsdp_2gpu_h100_window.sqlite.gz", folder)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    os.chmod(path, 0o444)
    os.chmod(folder, 0o555)
    try:
        doc = summary_json(str(path), *FAST)
        assert doc["trace"]["gpu_activities"] == 4368
        assert sorted(os.listdir(folder)) == [path.name]  # no journal, lock or cache file
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    finally:
        os.chmod(folder, 0o755)


def test_json_of_an_export_imports_no_polars_rich_or_torch(tmp_path):
    path = write_demo_export(tmp_path)
    code = ("import sys, io, contextlib; from molmo_latency.cli.main import main; out = io.StringIO()\n"
            f"with contextlib.redirect_stdout(out): code = main(['trace', 'summary', {str(path)!r}, "
            "'--parts', 'gpu,categories,kernels', '--json'])\n"
            "print(code, sorted(m for m in ('polars', 'rich', 'msgspec', 'torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 []"


def test_parts_of_a_kineto_trace_are_shown_not_skipped(capsys):
    """A Kineto trace is read whole as before: `--parts` picks the tables shown and, with
    `--json`, the only parts computed (the others null)."""
    trace = str(REPO / "tests" / "data" / "kineto" / "alexnet_a100_forward.json.gz")
    code = main(["trace", "summary", trace, "--parts", "kernels"])
    out = capsys.readouterr().out
    assert code == 0 and "Top kernels by total time" in out
    assert "GPU per device" not in out and "charged to the innermost" not in out
    doc = summary_json(trace, "--parts", "kernels")
    assert doc["computed"] == ["kernels"] and doc["kernels"] and doc["annotations"] is None
