"""read_nsys and `trace summary` of the three real nsys exports against plain SQL (tests/nsys_sql.py)."""

from __future__ import annotations

import json
import sqlite3

import polars as pl
import pytest

from molmo_latency.cli.main import main
from molmo_latency.trace import (
    KinetoTrace,
    TraceWarning,
    load_trace,
    read_kineto,
    read_nsys,
    summarize,
    trace_format,
)
from tests import nsys_sql
from tests.nsys_sql import EXPORTS, SHARED

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs the shared nsys exports")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Each shared export decompressed once (the SQL oracle reads these)."""
    directory = tmp_path_factory.mktemp("nsys")
    return {name: nsys_sql.gunzip(SHARED / f"{name}.sqlite.gz", directory) for name in EXPORTS}


@pytest.fixture(scope="module")
def summaries(plain):
    """`trace summary --json` of each export (the gzipped file: the reader decompresses it)."""
    out = {}
    for name in EXPORTS:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["trace", "summary", str(SHARED / f"{name}.sqlite.gz"), "--json"])
        assert code == 0
        out[name] = json.loads(buf.getvalue())
    return out


@pytest.mark.parametrize("name", EXPORTS)
def test_kernels_count_and_total_per_name(plain, summaries, name):
    db = sqlite3.connect(plain[name])
    expected = nsys_sql.kernels(db)
    got = {k["name"]: k for k in summaries[name]["kernels"]}
    assert set(got) == set(expected)
    for kernel, (count, total_ns) in expected.items():
        assert got[kernel]["count"] == count
        assert got[kernel]["total_us"] == total_ns / 1000  # exact ns, so exact us


@pytest.mark.parametrize("name", EXPORTS)
def test_gpu_per_device(plain, summaries, name):
    expected = nsys_sql.devices(sqlite3.connect(plain[name]))
    got = {d["device"]: d for d in summaries[name]["gpu"]}
    assert set(got) == set(expected)
    for device, (n, total, busy, span) in expected.items():
        assert (got[device]["activities"], got[device]["kernel_us"]) == (n, total / 1000)
        assert (got[device]["busy_us"], got[device]["span_us"], got[device]["idle_us"]) == (
            busy / 1000, span / 1000, (span - busy) / 1000)


@pytest.mark.parametrize("name", EXPORTS)
def test_innermost_range_attribution(plain, summaries, name):
    db = sqlite3.connect(plain[name])
    expected = nsys_sql.attribution(db)
    instances = nsys_sql.range_instances(db)
    got = {a["name"]: a for a in summaries[name]["annotations"]}
    assert {n: a["instances"] for n, a in got.items()} == instances
    for range_name in instances:
        count, total_ns = expected.get(range_name, (0, 0))
        assert (got[range_name]["kernels"], got[range_name]["gpu_kernel_us"]) == (count, total_ns / 1000)
    assert summaries[name]["unlinked_activities"] == nsys_sql.unlinked(db)
    charged = sum(n for n, _ in expected.values())
    total = sum(d["activities"] for d in summaries[name]["gpu"])
    assert summaries[name]["unattributed_activities"] == total - charged


def test_the_real_exports_exercise_what_they_should(plain):
    """The oracle is not vacuous: nested ranges take kernels, and the 2-process capture repeats
    correlation ids, so a join on correlationId alone would link kernels to the wrong process."""
    nvfuser = nsys_sql.attribution(sqlite3.connect(plain["nvfuser_cross_entropy_h200"]))
    assert sum(n for n, _ in nvfuser.values()) == 8  # README: 8 kernels launched inside ranges
    db = sqlite3.connect(plain["fsdp_2gpu_h100_window"])
    by_process = db.execute(f"SELECT count(*) FROM ({nsys_sql.launches_sql(db)})").fetchone()[0]
    by_id_only = db.execute(
        "SELECT count(*) FROM CUPTI_ACTIVITY_KIND_KERNEL k JOIN CUPTI_ACTIVITY_KIND_RUNTIME r "
        "ON r.correlationId = k.correlationId").fetchone()[0]
    kernels_linked = db.execute(
        f"SELECT count(*) FROM ({nsys_sql.launches_sql(db)}) WHERE aid LIKE 'k%'").fetchone()[0]
    assert kernels_linked == 1632  # README: 1,632 kernels still have their launching call
    assert by_id_only > kernels_linked and by_process > kernels_linked


def test_two_processes_keep_their_own_correlation_ids(plain):
    from molmo_latency.trace import link_launches

    trace = read_nsys(plain["fsdp_2gpu_h100_window"])
    db = sqlite3.connect(plain["fsdp_2gpu_h100_window"])
    pids = sorted(r[0] for r in db.execute(
        "SELECT DISTINCT (globalTid >> 24) & 16777215 FROM CUPTI_ACTIVITY_KIND_RUNTIME"))
    assert sorted(trace.runtime["pid"].unique().to_list()) == pids == [111, 112]
    linked = link_launches(trace.gpu, trace.runtime)
    same_process = db.execute(f"SELECT count(DISTINCT aid) FROM ({nsys_sql.launches_sql(db)})").fetchone()[0]
    any_process = db.execute(
        f"SELECT count(DISTINCT a.aid) FROM ({nsys_sql.activities_sql(db)}) a "
        "JOIN CUPTI_ACTIVITY_KIND_RUNTIME r ON r.correlationId = a.corr").fetchone()[0]
    assert int(linked["launch_start_ns"].is_not_null().sum()) == same_process < any_process


@pytest.mark.parametrize("name", EXPORTS)
def test_tables_have_read_kinetos_shape(plain, name):
    trace = read_nsys(plain[name])
    kineto = read_kineto(SHARED.parent / "kineto" / "alexnet_a100_forward.json.gz")
    assert isinstance(trace, KinetoTrace) and trace.layout == "nsys"
    for table in ("gpu", "runtime", "cpu_ops", "gpu_annotations"):
        assert getattr(trace, table).schema == getattr(kineto, table).schema, table
    assert trace.annotations.drop("domain").schema == kineto.annotations.schema
    for table in (trace.gpu, trace.runtime, trace.annotations):
        assert table["start_ns"].is_sorted()
        assert (table["end_ns"] - table["start_ns"] == table["dur_ns"]).all()


def test_times_are_exact_ns_since_the_epoch(plain):
    db = sqlite3.connect(plain["nvfuser_cross_entropy_h200"])
    epoch = db.execute("SELECT utcEpochNs FROM TARGET_INFO_SESSION_START_TIME").fetchone()[0]
    first = db.execute("SELECT min(start) FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchone()[0]
    trace = read_nsys(plain["nvfuser_cross_entropy_h200"])
    assert trace.base_time_ns == epoch
    assert trace.gpu.filter(pl.col("kind") == "kernel")["start_ns"].min() == epoch + first


def test_runtime_names_drop_the_version_suffix(plain):
    trace = read_nsys(plain["nvfuser_cross_entropy_h200"])
    names = set(trace.runtime["name"].to_list())
    assert "cudaLaunchKernel" in names and not any(n.endswith("_v7000") for n in names)
    assert set(trace.runtime["kind"].to_list()) == {"cuda_runtime", "cuda_driver"}


def test_gzipped_and_plain_read_the_same(plain):
    a = read_nsys(SHARED / "torch_zeros_sum_no_nvtx.sqlite.gz")
    b = read_nsys(plain["torch_zeros_sum_no_nvtx"])
    assert a.gpu.equals(b.gpu) and a.runtime.equals(b.runtime)
    assert a.annotations.height == 0  # no NVTX_EVENTS table: no ranges, not an error


def test_load_trace_picks_the_reader_by_content(plain, tmp_path):
    renamed = tmp_path / "capture.json"  # an nsys export with a Kineto-looking name
    renamed.write_bytes(plain["torch_zeros_sum_no_nvtx"].read_bytes())
    assert trace_format(renamed) == "nsys"
    assert load_trace(renamed).layout == "nsys"
    assert trace_format(SHARED.parent / "kineto" / "cpu_only.json.gz") == "kineto"


def test_summarize_of_an_export_without_nvtx(plain):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceWarning)  # GPU activity and no open range: no warning
        summary = summarize(read_nsys(plain["torch_zeros_sum_no_nvtx"]))
    assert summary.annotations.height == 0 and summary.unattributed == 3


@pytest.mark.parametrize("name", EXPORTS)
def test_tables_render(capsys, name):
    code = main(["trace", "summary", str(SHARED / f"{name}.sqlite.gz"), "--top", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "nsys export, schema 3." in out and "Top kernels by total time" in out
