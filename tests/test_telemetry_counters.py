"""Telemetry as counter tracks in Chrome/Kineto traces, read back with json."""

import gzip
import json
import time

import polars as pl
import pytest
import torch

from molmo_latency.errors import TraceError
from molmo_latency.telemetry import (
    FakeGpu,
    NvmlSampler,
    add_counter_tracks,
    estimate_clock_offset_ns,
)
from molmo_latency.telemetry.counters import COUNTER_TRACKS

MS = 1_000_000
T0_NS = 5_000_000_000_000          # perf_counter_ns when the annotation opened
BASE_US = 1_700_000_000_000.125    # where the trace put it


def kineto_like(gpu_process=True):
    events = [
        {"ph": "M", "name": "process_name", "pid": 4242, "tid": 0, "args": {"name": "python"}},
        {"ph": "X", "cat": "user_annotation", "name": "molmo:generate", "pid": 4242, "tid": 7,
         "ts": BASE_US, "dur": 50_000.0},
        {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7, "ts": BASE_US + 10, "dur": 5},
    ]
    if gpu_process:
        events.insert(1, {"ph": "M", "name": "process_name", "pid": 0, "tid": 0,
                          "args": {"name": "GPU 0"}})
    return {"schemaVersion": 1, "traceEvents": events}


def samples(n=6):
    return pl.DataFrame({
        "t_ns": [T0_NS + i * 10 * MS for i in range(n)],
        "gpu_index": [0] * n,
        "sm_clock_mhz": [1980.0, 1980.0, 1410.0, 1410.0, 1755.0, 1980.0][:n],
        "mem_clock_mhz": [2619.0] * n,
        "temp_c": [50.0, None, 60.0, 61.0, 62.0, 55.0][:n],
        "power_w": [300.0] * n,
        "energy_mj": [float(i * 3000) for i in range(n)],
        "util_gpu_pct": [100.0] * n,
        "util_mem_pct": [40.0] * n,
        "throttle_reasons": [0, 1, 4, 4, 0x40, 0][:n],
        "read_cost_ns": [20_000] * n,
    })


def counters(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"]
    out = {}
    for ev in events:
        if ev["ph"] == "C":
            out.setdefault(ev["name"], []).append(ev)
    return trace, out


@pytest.mark.parametrize("name", ["trace.json", "trace.json.gz"])
def test_counter_tracks_land_under_the_annotation(tmp_path, name):
    path = tmp_path / name
    raw = json.dumps(kineto_like()).encode()
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    offset = estimate_clock_offset_ns(path, "molmo:generate", T0_NS)
    assert offset == round(BASE_US * 1000) - T0_NS

    assert add_counter_tracks(path, samples(), clock_offset_ns=offset) == path
    trace, tracks = counters(path)
    assert trace["schemaVersion"] == 1  # the rest of the trace is kept
    assert {"GPU SM clock (MHz)", "GPU temperature (C)", "GPU power (W)"} <= set(tracks)
    sm = tracks["GPU SM clock (MHz)"]
    assert [e["args"]["value"] for e in sm] == samples()["sm_clock_mhz"].to_list()
    ts = [e["ts"] for e in sm]
    assert ts == sorted(ts)
    assert ts[0] == pytest.approx(BASE_US, abs=1e-3)            # the first sample at the start
    assert ts[-1] <= BASE_US + 50_000                            # all inside the annotation
    assert all(e["pid"] == 0 and e["cat"] == "nvml" for evs in tracks.values() for e in evs)
    assert len(tracks["GPU temperature (C)"]) == 5               # the null reading is skipped
    slowdown = [e["args"]["value"] for e in tracks["GPU clock slowdown (0/1)"]]
    assert slowdown == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]            # idle is not a slowdown
    every = [e["ts"] for e in trace["traceEvents"] if e["ph"] == "C"]
    assert every == sorted(every)


def test_a_trace_without_a_gpu_process_gets_its_own(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(kineto_like(gpu_process=False)))
    out = add_counter_tracks(path, samples(), clock_offset_ns=0, out_path=tmp_path / "out.json")
    trace, tracks = counters(out)
    assert json.loads(path.read_text()) == kineto_like(gpu_process=False)  # input untouched
    pids = {e["pid"] for evs in tracks.values() for e in evs}
    assert pids == {4243}
    names = [e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name" and e["pid"] == 4243]
    assert names == ["GPU 0 telemetry (NVML)"]
    assert tracks["GPU SM clock (MHz)"][0]["ts"] == pytest.approx(T0_NS / 1000)


def test_a_real_torch_profiler_trace_and_the_sampler_share_a_timeline(tmp_path):
    """On CPU: the offset from one annotation puts the samples inside the profiled range."""
    x = torch.randn(256, 256)
    with NvmlSampler(device=FakeGpu(), interval_ms=5) as sampler:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start_ns = time.perf_counter_ns()
            with torch.profiler.record_function("molmo:probe"):
                t_in = time.perf_counter_ns()
                deadline = time.perf_counter() + 30  # until 5 samples landed inside, however busy the machine
                while (sampler.samples().filter(pl.col("t_ns") > t_in).height < 5
                       and time.perf_counter() < deadline):
                    x = torch.tanh(x @ x)
                t_out = time.perf_counter_ns()
    path = tmp_path / "kineto.json"
    prof.export_chrome_trace(str(path))
    offset = estimate_clock_offset_ns(path, "molmo:probe", start_ns)
    inside = sampler.samples().filter((pl.col("t_ns") > t_in) & (pl.col("t_ns") < t_out))
    assert inside.height >= 5
    add_counter_tracks(path, inside, clock_offset_ns=offset)
    trace, tracks = counters(path)
    probe = next(e for e in trace["traceEvents"] if e.get("name") == "molmo:probe")
    sm_ts = [e["ts"] for e in tracks["GPU SM clock (MHz)"]]
    # The offset takes the range to have opened at start_ns; it opened between start_ns and t_in,
    # so samples are placed late by at most that gap (measured here, not assumed: a preempted
    # process widens it); 20 us more on both sides for the trace's rounding and the two clocks' rates.
    late_us = (t_in - start_ns) / 1e3 + 20
    assert probe["ts"] - 20 <= sm_ts[0] and sm_ts[-1] <= probe["ts"] + probe["dur"] + late_us


def test_bad_traces_are_trace_errors(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        add_counter_tracks(tmp_path / "missing.json", samples(), clock_offset_ns=0)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(kineto_like())[:-40])
    with pytest.raises(TraceError, match="cannot read trace"):
        estimate_clock_offset_ns(truncated, "molmo:generate", 0)
    not_a_trace = tmp_path / "other.json"
    not_a_trace.write_text('{"hello": 1}')
    with pytest.raises(TraceError, match="not a trace"):
        add_counter_tracks(not_a_trace, samples(), clock_offset_ns=0)
    with pytest.raises(TraceError, match="0 'molmo:nothing' range"):
        estimate_clock_offset_ns(kineto_like(), "molmo:nothing", 0)
    assert [c for c, _ in COUNTER_TRACKS][:4] == ["sm_clock_mhz", "mem_clock_mhz", "temp_c", "power_w"]
