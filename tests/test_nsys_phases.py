"""Our own NVTX ranges (domain molmo_latency) in an nsys export give the per-phase GPU table that
Kineto's record_function ranges give, and diff works across nsys and Kineto.

No real nsys capture of profile_phases exists: the export is synthetic (molmo_latency.trace.
_nsys_demo), built to the nsys schema with the same program as the Kineto demo trace.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import warnings

import polars as pl
import pytest

from molmo_latency.cli.main import main
from molmo_latency.trace import TraceWarning, phase_gpu_table, read_kineto, read_nsys
from molmo_latency.trace._demo import _ANNOTATIONS, _LAUNCHES, write_demo_trace
from molmo_latency.trace._nsys_demo import SCHEMA, fill_demo, write_demo_export


@pytest.fixture
def export(tmp_path):
    return write_demo_export(tmp_path)


def sql_phase_kernels(path) -> list[tuple[str, int, int]]:
    """(range text, kernels, summed ns) per molmo_latency range, innermost on the launching thread, in SQL."""
    db = sqlite3.connect(path)
    return db.execute(
        """
        WITH d AS (SELECT domainId, globalTid >> 24 AS proc FROM NVTX_EVENTS
                   WHERE eventType = 75 AND text = 'molmo_latency'),
        g AS (SELECT n.rowid AS rid, s.value || COALESCE('[' || n.int64Value || ']', '') AS name, n.start, n.end,
                     n.globalTid FROM NVTX_EVENTS n JOIN StringIds s ON s.id = n.textId
              WHERE (n.domainId, n.globalTid >> 24) IN (SELECT domainId, proc FROM d) AND n.eventType IN (59, 60)
                    AND s.value IN ('vision', 'projector', 'prefill', 'decode')),
        a AS (SELECT 'k' || rowid AS aid, start, end, correlationId AS corr, globalPid FROM CUPTI_ACTIVITY_KIND_KERNEL
              UNION ALL SELECT 'c' || rowid, start, end, correlationId, globalPid FROM CUPTI_ACTIVITY_KIND_MEMCPY),
        l AS (SELECT a.aid, a.end - a.start AS dur, r.start AS rs, r.end AS re, r.globalTid
              FROM a JOIN CUPTI_ACTIVITY_KIND_RUNTIME r
              ON r.correlationId = a.corr AND r.globalTid >> 24 = a.globalPid >> 24),
        c AS (SELECT l.dur, g.rid, g.name, ROW_NUMBER() OVER (PARTITION BY l.aid, l.rs
                     ORDER BY g.start DESC, g.end, g.rid) AS rn
              FROM l JOIN g ON g.globalTid = l.globalTid AND g.start <= l.rs AND l.re <= g.end)
        SELECT g.name, count(c.rid), COALESCE(sum(c.dur), 0) FROM g LEFT JOIN c ON c.rid = g.rid AND c.rn = 1
        GROUP BY g.rid ORDER BY g.start
        """
    ).fetchall()


def test_phase_table_equals_kinetos(export, tmp_path):
    nsys = phase_gpu_table(read_nsys(export))
    kineto = phase_gpu_table(read_kineto(write_demo_trace(tmp_path)))
    assert nsys.equals(kineto)
    assert nsys.select("phase", "step", "request").rows() == [
        ("vision", 0, 0), ("projector", 0, 0), ("prefill", 0, 0), ("decode", 0, 0), ("decode", 1, 0)]


def test_phase_table_against_sql(export):
    table = phase_gpu_table(read_nsys(export))
    expected = sql_phase_kernels(export)  # names: vision[0], decode[1], ... (payload appended)
    assert [(n, k) for n, k, _ in expected] == [
        ("vision[0]", 2), ("projector[0]", 1), ("prefill[0]", 3), ("decode[0]", 1), ("decode[1]", 1)]
    assert table["gpu_activities"].to_list() == [k for _, k, _ in expected]
    assert table["gpu_kernel_ms"].to_list() == pytest.approx([ns / 1e6 for _, _, ns in expected], rel=1e-12)


def test_our_ranges_are_named_like_record_function(export):
    from molmo_latency.ranges import NVTX_DOMAIN, record_function_name

    trace = read_nsys(export)
    ours = trace.annotations.filter(pl.col("domain") == NVTX_DOMAIN)
    assert ours["name"].to_list() == [name for name, _, _ in _ANNOTATIONS]
    db = sqlite3.connect(export)
    raw = db.execute("SELECT s.value, n.int64Value FROM NVTX_EVENTS n JOIN StringIds s ON s.id = n.textId "
                     "WHERE n.eventType = 59 ORDER BY n.start").fetchall()
    assert ours["name"].to_list() == [record_function_name(p, i) for p, i in raw]
    other = trace.annotations.filter(pl.col("domain").is_null())
    assert other["name"].to_list() == ["user range"]  # default domain: text as is; the mark is no range


def two_processes(tmp_path):
    """The demo program run by two processes (pids 4242 and 5151) with the same correlation ids."""
    path = tmp_path / "two.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    fill_demo(db)
    fill_demo(db, pid=5151, tid=5152, shift_ns=1_000_000, metadata=False)
    db.commit()
    db.close()
    return path


def test_two_processes_charge_their_own_phases(tmp_path):
    table = phase_gpu_table(read_nsys(two_processes(tmp_path)))
    assert table.height == 10
    first, second = table.head(5), table.tail(5)
    # a join on correlationId alone would give the first process both processes' kernels. (Both
    # processes have request[0], so phase_gpu_table numbers the second one's vision etc. step 1.)
    assert first.drop("step").equals(second.drop("step"))
    assert first["gpu_activities"].to_list() == [2, 1, 3, 1, 1]


def test_domain_ids_are_per_process(tmp_path):
    """Domain 1 is molmo_latency in one process and another library's in the other: only the first's
    ranges are ours (named decode[N]); the other's are named other_lib:decode and are no phase."""
    path = two_processes(tmp_path)
    db = sqlite3.connect(path)
    db.execute("UPDATE NVTX_EVENTS SET text = 'other_lib' WHERE eventType = 75 AND (globalTid >> 24) & 16777215 = 5151")
    db.commit()
    db.close()
    trace = read_nsys(path)
    second = trace.annotations.filter(pl.col("pid") == 5151)
    assert set(second["domain"].to_list()) == {"other_lib", None}
    assert "other_lib:decode" in second["name"].to_list() and "decode[0]" not in second["name"].to_list()
    assert phase_gpu_table(trace).height == 5  # the first process's phases only
    first = trace.annotations.filter(pl.col("pid") == 4242)
    assert first.filter(pl.col("domain") == "molmo_latency")["name"].to_list() == [n for n, _, _ in _ANNOTATIONS]


def test_payload_in_another_column_and_start_end_ranges(tmp_path):
    path = write_demo_export(tmp_path)
    db = sqlite3.connect(path)
    # an nsys version storing the payload as uint64, and decode ranges opened with nvtxRangeStart
    db.execute("UPDATE NVTX_EVENTS SET uint64Value = int64Value, int64Value = NULL WHERE int64Value IS NOT NULL")
    db.execute("UPDATE NVTX_EVENTS SET eventType = 60, endGlobalTid = globalTid "
               "WHERE textId = (SELECT id FROM StringIds WHERE value = 'decode')")
    db.commit()
    db.close()
    assert phase_gpu_table(read_nsys(path)).equals(phase_gpu_table(read_nsys(write_demo_export(tmp_path, "b.sqlite"))))


def test_an_unclosed_range_is_skipped_with_a_warning(tmp_path):
    path = write_demo_export(tmp_path)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, domainId) "
               "VALUES (1, NULL, 59, 'open', 1, 0)")
    db.commit()
    db.close()
    with pytest.warns(TraceWarning, match="skipped 1 NVTX range"):
        trace = read_nsys(path)
    assert trace.skipped == 1 and "open" not in trace.annotations["name"].to_list()


def test_demo_program_matches_the_kineto_demo_exactly(export, tmp_path):
    nsys, kineto = read_nsys(export), read_kineto(write_demo_trace(tmp_path))
    assert nsys.base_time_ns == kineto.base_time_ns
    columns = ["name", "kind", "device", "stream", "correlation", "start_ns", "end_ns", "dur_ns", "grid", "block"]
    assert nsys.gpu.select(columns).equals(kineto.gpu.select(columns))
    assert nsys.runtime.drop("external_id").equals(kineto.runtime.drop("external_id"))
    assert nsys.gpu.height == len(_LAUNCHES)


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_diff_nsys_against_kineto_and_against_nsys(tmp_path):
    a = write_demo_export(tmp_path / "a")
    b = write_demo_trace(tmp_path / "b")
    (tmp_path / "c").mkdir()
    c = two_processes(tmp_path / "c")
    for other, factor in ((b, 1), (c, 2)):
        code, out, err = run(["diff", str(a), str(other), "--json"])
        assert code == 0, err
        kernels = {k["name"]: k for k in json.loads(out)["kernels"]}
        assert set(kernels) == {g for *_, g, _, _ in _LAUNCHES}
        for k in kernels.values():
            assert k["b_count"] == factor * k["a_count"] and k["presence"] == "both"
        notes = [n for c in json.loads(out)["comparisons"] for n in c["notes"]]
        mixed = any("A is an nsys export and B a Kineto trace" in n for n in notes)
        assert mixed == (other == b)  # an nsys export against a Kineto trace is said to be two tools


def test_summary_json_of_the_demo_export(export):
    code, out, err = run(["trace", "summary", str(export), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["trace"]["layout"] == "nsys" and doc["trace"]["metadata"]["schema_version"] == "3.17.1"
    assert doc["gpu"][0]["name"] == "Demo GPU"
    got = {a["name"]: a["kernels"] for a in doc["annotations"]}
    # "user range" (1031.5-1060 us) sits inside prefill and is innermost for prefill's 3 launches
    assert got == {"request[0]": 0, "vision": 2, "projector": 1, "prefill": 0, "user range": 3,
                   "decode[0]": 1, "decode[1]": 1}


def test_readme_nsys_example_runs_as_written(tmp_path):
    """The runnable block of README's nsys section (the nsys commands before it need nsys and a GPU)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "README.md").read_text()
    section = text[text.index("**Nsight Systems exports**"):]
    block = re.search(r"which runs as is:\n\n```bash\n(.*?)```", section, re.S).group(1)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONPATH": str(repo), "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "nsys export, schema 3.17.1" in result.stdout and "decode" in result.stdout
