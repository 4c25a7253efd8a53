"""One request's phases on a timeline (molmo_latency.timeline): a real profile of the tiny model
written as a Chrome trace and read back by molmo-latency's own Kineto reader; expectations from
the profiler's phases table, which the trace must reproduce slice for slice."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from molmo_latency import profile_phases
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.timeline import chrome_trace, select_requests


@pytest.fixture(scope="module")
def report(tiny):
    with profile_phases(tiny.model) as prof:
        for crops in (1, 2):
            tiny.model.generate(**tiny.request(crops=crops, prompt_tokens=12, new_tokens=4))
    return prof.report()


def test_every_phase_is_a_slice_that_our_reader_reads_back(report, tmp_path):
    from molmo_latency.trace import read_kineto

    path = tmp_path / "timeline.json"
    path.write_text(json.dumps(chrome_trace(report.requests, report.phases)))
    back = read_kineto(path).annotations.sort("start_ns")
    phases = report.phases.sort("start_ns")
    expected = [f"{p}[{s}]" if p == "decode" else p for p, s in phases.select("phase", "step").iter_rows()]
    names = [n for n in back["name"].to_list() if not n.startswith("request[")]
    assert names == expected
    got_us = back.filter(~pl.col("name").str.starts_with("request["))["dur_ns"].to_numpy() / 1000
    want_us = ((phases["end_ns"] - phases["start_ns"]) / 1000).to_numpy()
    assert got_us == pytest.approx(want_us, abs=1.0)  # the reader keeps microseconds
    assert back.filter(pl.col("name").str.starts_with("request["))["name"].to_list() == ["request[0]", "request[1]"]


def test_requests_carry_their_facts_and_decode_steps_their_kv_length(report):
    trace = chrome_trace(report.requests, report.phases)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    first = next(e for e in slices if e["name"] == "request[0]")
    row = report.requests.row(0, named=True)
    assert first["args"]["valid"] is True and first["args"]["output_tokens"] == row["output_tokens"]
    steps = [e for e in slices if e["name"].startswith("decode[")]
    assert [e["args"]["kv_tokens"] for e in steps[:3]] == [row["input_tokens"] + 1 + i for i in range(3)]
    # every slice lies inside its request, on the same track
    for req in (e for e in slices if e["name"].startswith("request[")):
        inner = [e for e in slices if e["tid"] == req["tid"] and not e["name"].startswith("request[")
                 and req["ts"] <= e["ts"] < req["ts"] + req["dur"]]
        assert all(e["ts"] + e["dur"] <= req["ts"] + req["dur"] + 1e-6 for e in inner)


def test_nvml_samples_and_conditions_become_counter_tracks():
    req = pl.DataFrame({"request": [0], "start_ns": [10_000_000], "end_ns": [20_000_000], "thread_id": [5],
                        "cpu_time_ratio": [0.5], "torch_threads": [2], "host_load_1m": [3.0]})
    tel = pl.DataFrame({"t_ns": [9_500_000, 15_000_000, 30_000_000_000], "sm_clock_mhz": [1980.0, 1410.0, 1.0],
                        "temp_c": [50.0, 51.0, 52.0]})
    trace = chrome_trace(req, pl.DataFrame(schema={"request": pl.Int64, "phase": pl.Utf8, "step": pl.Int64,
                                                   "start_ns": pl.Int64, "end_ns": pl.Int64}), telemetry=tel)
    counters = [(e["name"], e["ts"], list(e["args"].values())[0]) for e in trace["traceEvents"] if e["ph"] == "C"]
    assert ("GPU SM clock (MHz)", -500.0, 1980.0) in counters and ("GPU SM clock (MHz)", 5000.0, 1410.0) in counters
    assert not any(v == 1.0 for _, _, v in counters)  # a sample long after the request is not shown
    # a request's own measure spans it: the same value at its start (0 us) and its end (10 ms later)
    assert [c for c in counters if c[0] == "CPU share of the threads"] == [
        ("CPU share of the threads", 0.0, 0.25), ("CPU share of the threads", 10_000.0, 0.25)]
    assert [c for c in counters if c[0] == "host load (1 min)"] == [
        ("host load (1 min)", 0.0, 3.0), ("host load (1 min)", 10_000.0, 3.0)]


def test_an_unknown_request_is_refused_naming_what_there_is(report):
    assert select_requests(report.requests, [1]).height == 1
    with pytest.raises(MolmoLatencyError, match=r"no request 7 in this run \(it holds 2 requests, numbered 0..1"):
        select_requests(report.requests, [7])


# ------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from molmo_latency.sweep import SweepSpec, run_sweep

    out = tmp_path_factory.mktemp("timeline") / "run"
    run_sweep("tiny", SweepSpec.from_dict({"crops": [1, 2], "repeats": 2, "warmup": 0, "prompt_tokens": [8],
                                           "new_tokens": [3]}), out)
    return out


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "molmo_latency", *args], capture_output=True, text=True, timeout=300)


def test_timeline_of_a_run_directory_opens_and_holds_the_chosen_requests(run_dir, tmp_path):
    from molmo_latency.trace import read_kineto

    out = tmp_path / "t.json"
    res = _cli("timeline", str(run_dir), "--request", "1", "--request", "3", "--out", str(out),
               "--png", str(tmp_path / "t.png"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "t.png").stat().st_size > 5000  # the same slices, drawn
    assert "2 requests" in res.stderr
    doc = json.loads(out.read_text())
    assert doc["otherData"]["request_numbering"] == "order" and "versions" in doc["otherData"]
    names = read_kineto(out).annotations["name"].to_list()
    assert sorted(n for n in names if n.startswith("request[")) == ["request[1]", "request[3]"]
    phases = pl.read_parquet(run_dir / "phases.parquet")
    requests = pl.read_parquet(run_dir / "requests.parquet").filter(pl.col("order").is_in([1, 3]))
    expected = phases.join(requests.select("config_id", "repeat", "request"), on=["config_id", "repeat", "request"])
    assert len(names) == 2 + expected.height


def test_timeline_refuses_an_unknown_request_in_one_line(run_dir, tmp_path):
    res = _cli("timeline", str(run_dir), "--request", "99", "--out", str(tmp_path / "x.json"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no request 99 in this run (it holds 4 requests, numbered 0..3 by order)" in res.stderr
    assert not (tmp_path / "x.json").exists()


def test_the_shipped_trace_holds_a_warm_request():
    """traces/ ships a warm request (the model warmed up first), not the cold first request of a
    process (4 s against tens of ms): its request range and its phases say so."""
    from pathlib import Path

    from molmo_latency.trace import read_kineto

    path = Path(__file__).resolve().parents[1] / "traces" / "tiny_cpu_profile_phases.pt.trace.json.gz"
    ann = read_kineto(path).annotations
    [request] = ann.filter(pl.col("name").str.starts_with("request[")).iter_rows(named=True)
    assert request["name"] != "request[0]" and request["dur_ns"] < 500e6  # tiny model: tens of ms
    names = ann["name"].to_list()
    assert {"vision", "projector", "prefill"} <= set(names) and sum(n.startswith("decode[") for n in names) == 7


def test_write_chrome_trace_merges_ours_into_the_kineto_trace_of_the_same_request(tiny, tmp_path):
    """`Report.write_chrome_trace`: with a Kineto trace of the request (profile_phases(trace_dir=)),
    our request and phases join that trace on its clock, as a process of their own, so its ops sit
    under our phases on one time axis; the trace's own ranges stay the ones our reader counts, and
    the trace file itself is not changed."""
    from molmo_latency.trace import read_kineto

    with profile_phases(tiny.model, trace_dir=tmp_path / "traces") as prof:
        tiny.model.generate(**tiny.request(crops=1, prompt_tokens=12, new_tokens=4))
    report = prof.report()
    (traced,) = report.traces
    original = Path(traced["path"]).read_bytes()
    out = report.write_chrome_trace(tmp_path / "merged.json")
    assert Path(traced["path"]).read_bytes() == original

    merged = json.loads(out.read_text())
    kineto = read_kineto(traced["path"])
    ours = [e for e in merged["traceEvents"] if e.get("cat") == "molmo_latency" and e["ph"] == "X"]
    names = [e["name"] for e in ours]
    assert names[0] == "request[0]" and "prefill" in names and "decode[2]" in names
    import gzip

    theirs = json.loads(gzip.decompress(original))["traceEvents"]
    assert len({e["pid"] for e in ours}) == 1 and ours[0]["pid"] not in {e.get("pid") for e in theirs}
    assert len(merged["traceEvents"]) > len(theirs)
    assert sum(e.get("cat") == "cpu_op" for e in merged["traceEvents"]) > 0  # the trace's own ops are there
    # on the trace's clock: our phases are moved by one offset, the median over the phases of (the
    # start of the profiler's own range of that name, as the trace file holds it, minus our start),
    # the median phase starts exactly where its range starts. The two stamps of one phase are read
    # microseconds apart on one thread, but a busy machine can preempt between them (8 ms seen at
    # load 4 on 2 cores): one phase's own distance is not a verdict, the median is.
    theirs_x = {e["name"]: e["ts"] for e in theirs if e.get("cat") == "user_annotation" and e.get("ph") == "X"}
    own_start = {(f"{p}[{s}]" if p == "decode" else p): t
                 for p, s, t in report.phases.select("phase", "step", "start_ns").iter_rows()}
    diffs = sorted(round(theirs_x[name] * 1000) - own_start[name] for name in names if name != "request[0]")
    offset = diffs[len(diffs) // 2]
    for e in ours:
        if e["name"] != "request[0]":
            assert e["ts"] == pytest.approx((own_start[e["name"]] + offset) / 1000, abs=0.002), e["name"]
    assert any(abs(e["ts"] - theirs_x[e["name"]]) <= 0.002 for e in ours if e["name"] != "request[0]")
    # our reader counts the trace's own ranges once, not ours a second time
    back = read_kineto(out)
    assert back.annotations.height == kineto.annotations.height
