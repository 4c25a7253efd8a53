"""The GPU kit (issue 28) cannot rot: its rehearsal (CPU, tiny model, fake CUDA clock, FakeGpu)
runs through the same one-line shell entry a GPU holder runs, and every stage and key the issue
asks for is checked here, from the issue's list, not the script's."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# issue 28, "What to build": every stage, and the keys gpu.json holds at least
STAGES = ["env", "build", "overhead", "stability", "event_vs_kineto", "nvml", "compile", "gpu_tests", "sweep"]
KEYS = ["device", "overhead_decode_step_pct", "decode_per_token_cv_pct_median",
        "event_vs_kineto_phase_diff_pct_max", "nvml_achieved_hz"]


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_truth")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_truth.sh"), str(out), "--rehearsal"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    wall_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu.json").read_text()), wall_s


@pytest.mark.slow  # the rehearsal (module fixture, shared by the tests below) runs for tens of seconds
def test_rehearsal_runs_every_stage_and_writes_every_key(rehearsal):
    out, data, wall_s = rehearsal
    assert data["rehearsal"] is True and data["finished"] is True
    assert list(data["stages"]) == STAGES
    for name in STAGES:
        assert data["stages"][name]["status"] == "ok", (name, data["stages"][name])
    assert isinstance(data["device"], str) and data["device"].startswith("cpu")
    for key in KEYS[1:]:
        assert isinstance(data[key], float) and math.isfinite(data[key]), (key, data[key])
    # the run stops itself at its deadline; the rehearsal ends well before it
    assert data["elapsed_s"] < data["deadline_s"] and wall_s < data["deadline_s"] + 30


@pytest.mark.slow
def test_overhead_is_interleaved_with_a_confidence_interval(rehearsal):
    _, data, _ = rehearsal
    arms = data["overhead"]["arms"]
    assert set(arms) == {"none", "profile_phases", "profile_phases+nvml", "torch.profiler"}
    rounds = data["overhead"]["rounds"]
    assert rounds >= 3 and all(a["n"] == rounds for a in arms.values())
    lo, hi = data["overhead_decode_step_pct_ci95"]
    assert lo <= hi
    # the decode steps each request made: new_tokens - 1 of the plan's request
    assert data["overhead"]["decode_steps_per_request"] == data["plan"]["new_tokens"] - 1


@pytest.mark.slow
def test_stability_has_30_repeats_after_warmup_and_its_conditions(rehearsal):
    _, data, _ = rehearsal
    st = data["stability"]
    assert st["conditions"]["repeats"] >= 30 and st["invalid_requests"] == 0
    assert st["conditions"]["torch_threads"] >= 1 and st["conditions"]["sm_clock_mean_mhz"] == 1410.0  # FakeGpu
    steps = [row["step"] for row in st["decode_step_cv_pct_by_step"]]
    assert steps == list(range(data["plan"]["new_tokens"] - 1))
    assert all(row["n"] == st["conditions"]["repeats"] for row in st["decode_step_cv_pct_by_step"])


@pytest.mark.slow
def test_the_kineto_trace_is_kept_and_every_phase_compared(rehearsal):
    from molmo_latency.trace import phase_of, read_kineto

    out, data, _ = rehearsal
    ek = data["event_vs_kineto"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU trace: "no GPU activities" is expected
        trace = read_kineto(out / ek["trace"])
    phases = [p for p in (phase_of(n) for n in trace.annotations["name"].to_list()) if p is not None]
    # two requests of 1 vision, 1 projector, 1 prefill and new_tokens - 1 decode steps each
    per_request = 3 + data["plan"]["kineto_new_tokens"] - 1
    assert len(phases) == 2 * per_request
    assert ek["compared_instances"] == ek["phase_instances"] == 2 * per_request
    assert {row["phase"] for row in ek["per_phase"]} == {"vision", "projector", "prefill", "decode"}
    assert data["event_vs_kineto_phase_diff_pct_max"] == pytest.approx(
        max(row["diff_pct_abs_max"] for row in ek["per_phase"]), rel=1e-9)


@pytest.mark.slow
def test_nvml_compile_gpu_tests_and_sweep_stages_report(rehearsal):
    import transformers

    _, data, _ = rehearsal
    nv = data["nvml"]
    assert nv["source"].startswith("FakeGpu") and nv["samples"] > 0
    # The rate is the median over requests of >= 5 sampling intervals, or over all requests when none
    # was that long. A rehearsal's tiny requests may be shorter than one interval (0 samples inside is
    # then a true reading, not an error), so the test recomputes the figure from the per-request rows
    # instead of asserting a rate that depends on how fast this machine ran them.
    rows = nv["achieved_hz_per_request"]
    assert rows and all(r["telemetry_hz"] is None or 0 <= r["telemetry_hz"] for r in rows)
    long_rows = [r for r in rows if r["total_ms"] >= 5 * nv["interval_ms"]]
    rated = long_rows or rows
    assert nv["rate_from"] == ("requests of >= 5 intervals" if long_rows else "all requests (none was >= 5 intervals)")
    rates = [r["telemetry_hz"] for r in rated if r["telemetry_hz"] is not None]
    assert data["nvml_achieved_hz"] == pytest.approx(statistics.median(rates), rel=1e-9)
    assert data["nvml_achieved_hz"] <= 1000 / 5  # never above the sampler's floor interval
    assert {row["phase"] for row in nv["per_phase"]} == {"vision", "projector", "prefill", "decode"}
    sc = data["compile"]["static_cache"]
    if transformers.__version__.startswith("4."):
        assert sc["ok"] is None and "refuses" in sc["skipped"]
    else:
        assert sc["ok"] is True and {"prefill", "decode"} <= set(sc["phases"]) and sc["decode_steps"] == 4
    tests = data["gpu_tests"]
    assert {"tests/test_telemetry_gpu.py", "tests/test_profiler.py"} <= set(tests["files"])
    assert tests["failed"] == tests["error"] == 0 and tests["cases"]
    if not torch.cuda.is_available():  # gpu-marked tests stay skipped without CUDA
        assert tests["skipped"] == len(tests["cases"]) and tests["passed"] == 0
    sw = data["sweep"]
    spec = sw["spec"]
    configs = len(spec["crops"]) * len(spec["top_k"]) * len(spec["blocks"])
    assert sw["configs"] == configs and sw["counts"]["measured"] == configs * spec["repeats"]
    assert sw["counts"]["failed_configs"] == 0 and sw["fit"]["status"] == "ok"
    assert sw["rc"] == 0 and sw["timed_out"] is False  # ran as a child process, as on the GPU
    assert sw["gpu_plan_configs"] == 3 * 2 * 2  # crops {1,4,12} x top-k {2,8} x blocks {8,16}


@pytest.mark.slow
def test_the_results_section_names_every_stage(rehearsal):
    out, _, _ = rehearsal
    text = (out / "RESULTS-section.md").read_text()
    assert text.startswith("**Rehearsal on CPU")
    for name in STAGES:
        assert f"| {name} | ok |" in text


@pytest.mark.slow
def test_a_run_cut_short_still_returns_what_it_measured(tmp_path):
    deadline_s = 8
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_truth.py"), "--rehearsal",
                           "--out", str(tmp_path), "--deadline-s", str(deadline_s)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    wall_s = time.monotonic() - t0
    data = json.loads((tmp_path / "gpu.json").read_text())
    statuses = {n: s["status"] for n, s in data["stages"].items()}
    assert list(statuses) == STAGES
    assert wall_s < deadline_s + 15, "the run must stop itself at its deadline"
    # cut short: the deadline stopped a stage (watchdog, exit 3) or later stages were skipped
    assert proc.returncode == 3 or "skipped" in statuses.values(), (proc.returncode, statuses)
    assert data["finished"] is False or "skipped" in statuses.values()
    assert set(statuses.values()) <= {"ok", "cut_short", "killed", "skipped", "pending", "failed"}
    done = [n for n in STAGES if statuses[n] in ("ok", "cut_short")]
    if "env" in done:  # what was measured before the cut is in the file
        assert data["device"] is not None and data["env"]["torch"] == torch.__version__
    if "build" in done:
        assert data["model"]["preset"] == "tiny"


def test_on_a_gpu_trace_event_times_are_compared_with_gpu_spans_and_kernels_charged(tmp_path):
    """The GPU branch of the event-vs-Kineto stage, which the CPU rehearsal cannot reach, on the
    package's demo GPU trace (9 GPU activities; per phase instance: vision 2, projector 1,
    prefill 3, decode[0] 1, decode[1] 1)."""
    import polars as pl

    from benchmarks.gpu_truth import compare_event_to_trace, kernels_per_phase
    from molmo_latency.trace import phase_gpu_table, read_kineto
    from molmo_latency.trace._demo import write_demo_trace

    trace = read_kineto(write_demo_trace(tmp_path))
    gpu = phase_gpu_table(trace)
    assert gpu["phase"].to_list() == ["vision", "projector", "prefill", "decode", "decode"]
    # the report's phases: each event-timed ms 1% above its GPU span, the last decode step 2% below
    phases = gpu.with_columns(ms=pl.col("gpu_span_ms") * pl.Series([1.01, 1.01, 1.01, 1.01, 0.98]))
    compared, reference = compare_event_to_trace(phases, trace)
    assert reference == "gpu_span"
    assert compared["diff_pct"].to_list() == pytest.approx([1, 1, 1, 1, -2], abs=1e-9)
    kernels = kernels_per_phase(phases, trace)
    assert {r["phase"]: r["gpu_activities"] for r in kernels["per_phase"]} == {
        "vision": 2, "projector": 1, "prefill": 3, "decode": 2}
    assert kernels["uncharged_gpu_activities"] == 9 - 8
    assert sum(r["gpu_activities"] for r in kernels["per_phase_category"]) == 8


@pytest.mark.slow
def test_apply_refuses_a_rehearsal_and_leaves_the_repository_alone(rehearsal):
    out, _, _ = rehearsal
    results_md = ROOT / "benchmarks" / "RESULTS.md"
    before = results_md.read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_truth.py"), "--apply", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "rehearsal" in proc.stderr
    assert results_md.read_bytes() == before and not (ROOT / "benchmarks" / "results" / "gpu.json").exists()
