"""The labels' conditions recorded (molmo_latency.conditions) and judged (molmo_latency.quality).

Each frame is built by hand with a known spread, contention or gap, so each verdict is known
before the judge runs."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

from molmo_latency.conditions import CONDITION_COLUMNS, RequestProbe, condition_differences, run_conditions
from molmo_latency.quality import NoisePolicy, config_quality, judge


def _rows(config, step_ms, *, cpu=0.97, threads=1, load=0.8, device="cpu", warm=None, valid=None):
    n = len(step_ms)
    return pl.DataFrame({
        "config_id": [config] * n, "order": list(range(n)), "device": [device] * n,
        "valid": valid if valid is not None else [True] * n,
        "decode_per_token_ms": [float(x) for x in step_ms],
        "prefill_total_ms": [10.0] * n, "total_ms": [10.0 + 8 * float(x) for x in step_ms],
        "torch_threads": [threads] * n, "cpu_time_ratio": cpu if isinstance(cpu, list) else [cpu] * n,
        "host_load_1m": [load] * n, "warm": warm if warm is not None else [True] * n})


def _quiet(config, n=8, mean=2.0, cv=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return _rows(config, mean * (1 + cv * rng.standard_normal(n)))


def test_a_quiet_run_is_clean():
    q = judge(pl.concat([_quiet("a"), _quiet("b", seed=1)]), usable_cpus=2, expected_requests=16)
    assert q.verdict == "clean" and q.reasons == []
    assert q.configs["verdict"].to_list() == ["clean", "clean"]
    assert q.as_dict() == {"verdict": "clean", "reasons": []}


def test_contention_is_named_with_the_configurations_it_hit():
    hit = _rows("b", [2.0] * 8, cpu=[0.97, 0.4, 0.97, 0.45, 0.5, 0.97, 0.97, 0.97])  # 3 of 8 lost the CPU
    q = judge(pl.concat([_quiet("a"), hit]), usable_cpus=2)
    assert q.verdict == "contended"
    assert dict(zip(q.configs["config_id"], q.configs["verdict"])) == {"a": "clean", "b": "contended"}
    assert q.reasons[0].startswith("contention: 3 requests in 1 of 2 configurations")
    assert q.reasons[0].split("hit: ")[1].split(".")[0] == "b"


def test_two_threads_at_full_share_are_not_contention_and_a_lagging_load_is_not_judged_on_a_cpu():
    two = _rows("a", [2.0] * 6, cpu=1.9, threads=2)
    assert judge(two, usable_cpus=2).verdict == "clean"
    # the 1-minute load average still counts a job that ended a minute ago: on a CPU device the
    # request's own CPU share decides (measured: 1.00 quiet right after a load of 4)
    after = _rows("a", [2.0] * 6, cpu=1.9, threads=2, load=3.9)
    assert judge(after, usable_cpus=2).verdict == "clean"
    gpu = _rows("a", [2.0] * 6, cpu=0.3, device="cuda:0", load=20.0)  # on a GPU the host load is the signal
    assert judge(gpu, usable_cpus=16).verdict == "contended"


def test_on_a_gpu_a_low_host_cpu_share_is_not_contention():
    gpu = _rows("a", [2.0] * 6, cpu=0.3, device="cuda:0")
    assert judge(gpu, usable_cpus=16).verdict == "clean"


def test_a_spread_above_the_policy_is_noisy_and_names_the_worst_configuration():
    noisy = _rows("b", [2.0, 2.6, 1.5, 2.2, 1.8, 2.9])  # CV about 24%
    q = judge(pl.concat([_quiet("a"), noisy]), usable_cpus=2)
    assert q.verdict == "noisy" and "worst b" in q.reasons[0]
    cv = float(np.std([2.0, 2.6, 1.5, 2.2, 1.8, 2.9], ddof=1) / np.mean([2.0, 2.6, 1.5, 2.2, 1.8, 2.9]) * 100)
    got = q.configs.filter(pl.col("config_id") == "b")["decode_step_cv_pct"][0]
    assert got == pytest.approx(cv, rel=1e-9)
    # a looser policy is a value passed in
    assert judge(pl.concat([_quiet("a"), noisy]), usable_cpus=2, policy=NoisePolicy(max_cv_pct=30, max_drift_pct=30)).verdict == "clean"


def test_drift_between_rounds_is_noisy_even_with_a_tight_spread_per_half():
    steps = [2.0, 2.01, 1.99, 2.0, 2.2, 2.21, 2.19, 2.2]  # +10% in the second half
    per = config_quality(_rows("a", steps), usable_cpus=2, policy=NoisePolicy(max_cv_pct=50))
    assert per["drift_pct"][0] == pytest.approx(100 * 0.2 / float(np.median(steps)), rel=1e-9)
    assert per["verdict"][0] == "noisy"


def test_cold_and_invalid_requests_are_left_out_and_counted():
    rows = _rows("a", [40.0, 2.0, 2.01, 1.99, 2.0, 2.0], warm=[False] + [True] * 5,
                 valid=[True, True, True, True, True, False])
    q = judge(rows, usable_cpus=2)
    assert q.verdict == "clean" and q.configs["n"][0] == 4
    assert any("1 requests were measured cold" in r for r in q.reasons)
    assert any("1 of 6 requests are invalid" in r for r in q.reasons)


def test_an_incomplete_run_says_how_many_of_how_many_and_how_to_resume():
    q = judge(_quiet("a", n=5), usable_cpus=2, expected_requests=192,
              resume_command="molmo-latency profile --model tiny --sweep s.toml --out runs/x")
    assert q.verdict == "incomplete"
    assert "holds 5 of 192 requests" in q.reasons[-1] and "--out runs/x" in q.reasons[-1]


def test_too_few_repeats_are_said_not_judged():
    q = judge(_rows("a", [2.0, 3.0]), usable_cpus=2)
    assert q.configs["verdict"][0] == "too few" and any("fewer than 3" in r for r in q.reasons)


# ------------------------------------------------------------------------------ conditions
def test_a_request_that_sleeps_uses_little_cpu_and_every_column_is_there():
    probe = RequestProbe.start(torch_threads=3)
    time.sleep(0.2)
    row = probe.stop(warm=False)
    assert set(row) == set(CONDITION_COLUMNS)
    assert row["torch_threads"] == 3 and row["warm"] is False
    assert 0 <= row["cpu_time_ratio"] < 0.5  # sleeping takes no CPU, however busy the machine is
    assert row["involuntary_switches"] >= 0 and row["host_load_1m"] >= 0


def test_run_conditions_record_threads_env_and_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    c = run_conditions(torch_threads=3, torch_interop_threads=1)
    assert c["torch_threads"] == 3 and c["thread_env"]["OMP_NUM_THREADS"] == "3"
    assert c["usable_cpus"] >= 1 and c["cpu_model"]


def test_runs_under_different_conditions_are_told_apart():
    a = {"identity": {"model": "tiny", "device": "cpu", "dtype": "float32"}, "conditions": {"torch_threads": 1},
         "versions": {"torch": "2.13.0", "transformers": "5.24.0"}}
    b = {**a, "conditions": {"torch_threads": 2}, "versions": {"torch": "2.13.0", "transformers": "4.51.3"}}
    assert condition_differences({"A": a, "B": a}) == []
    assert condition_differences({"A": a, "B": b}) == ["torch_threads: 1 (A), 2 (B)",
                                                       "transformers: 5.24.0 (A), 4.51.3 (B)"]


def test_the_gpu_side_of_the_run_conditions_comes_from_the_device_layer():
    from molmo_latency.telemetry import FakeGpu

    gpu = FakeGpu(temp_c=61.0, other_processes=[4242], clocks_locked=True)
    c = run_conditions(torch_threads=1, gpu=gpu)["gpu"]
    assert c["other_processes"] == [4242] and c["clocks_locked"] is True and c["temp_c"] == 61.0
    assert c["persistence_mode"] is True and c["uuid"] == gpu.uuid


def test_the_thermal_wait_waits_for_a_cool_idle_gpu_and_gives_up_saying_so():
    from molmo_latency.conditions import ThermalWait, wait_until_cool
    from molmo_latency.telemetry import FakeGpu

    now = [0.0]

    def sleep(s):
        now[0] += s

    hot = [{"temp_c": 80.0 - 5 * i, "util_gpu_pct": 0.0} for i in range(10)]  # cools 5 C per poll
    r = wait_until_cool(FakeGpu(readings=hot), ThermalWait(max_temp_c=62.0, poll_s=1.0), sleep=sleep, clock=lambda: now[0])
    assert r == {"waited_s": 4.0, "temp_c": 60.0, "util_gpu_pct": 0.0, "timed_out": False}
    now[0] = 0.0
    busy = FakeGpu(temp_c=50.0, util_gpu_pct=100.0)  # another process keeps it busy
    r = wait_until_cool(busy, ThermalWait(poll_s=1.0, timeout_s=3.0), sleep=sleep, clock=lambda: now[0])
    assert r["timed_out"] is True and r["waited_s"] == 3.0 and r["util_gpu_pct"] == 100.0


# ------------------------------------------------------------------ recorded by the profiler
def test_every_request_records_its_conditions_and_the_first_of_a_model_is_cold(tmp_path):
    import torch

    from molmo_latency import profile_phases
    from molmo_latency.models import reference_vlm
    from molmo_latency.report import run_report
    from tests.layout import phase_module

    ref = reference_vlm("tiny", seed=3)  # a model no profiler has seen in this process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool spin-waiting (it burns CPU while the request sleeps)
    with profile_phases(ref.model) as prof:
        for _ in range(3):
            ref.model.generate(**ref.request(crops=1, prompt_tokens=8, new_tokens=3))
        handle = phase_module(ref.model, "llm").register_forward_hook(lambda *_: time.sleep(0.1))
        try:  # a request that mostly sleeps: its process takes little CPU, however busy the machine
            ref.model.generate(**ref.request(crops=1, prompt_tokens=8, new_tokens=3))
        finally:
            handle.remove()
            torch.set_num_threads(threads)
    r = prof.report().requests
    assert r["warm"].to_list() == [False, True, True, True]
    assert r["torch_threads"].to_list() == [1] * 4
    assert (r["involuntary_switches"] >= 0).all() and (r["host_load_1m"] >= 0).all()
    assert r["cpu_time_ratio"][3] < 0.5
    # the cold request is counted, not used: report's medians leave it out
    prof.report().write_parquet(tmp_path / "api")
    rep = run_report(tmp_path / "api")
    assert int(rep["config"]["n_valid"].sum()) == 3
    assert any("1 requests were measured cold" in reason for reason in rep["quality"].reasons)


# ------------------------------------------------------------------ controlled by the sweep
def test_a_sweep_states_its_threads_records_its_conditions_and_waits_for_a_cool_gpu(tmp_path, monkeypatch):
    """run.json says how the labels were made: the thread count (1 unless told, on a CPU; part of
    the identity), the host and GPU conditions, the warm-up record, and the thermal waits made
    before each measured request (a scripted GPU that is hot at first)."""
    import json

    from molmo_latency.sweep import SweepSpec, run_sweep
    from molmo_latency.sweep import runner
    from molmo_latency.telemetry import FakeGpu

    gpu = FakeGpu(readings=[{"temp_c": 75.0, "util_gpu_pct": 0.0}, {"temp_c": 50.0, "util_gpu_pct": 0.0}])
    monkeypatch.setattr(runner, "_conditions_gpu", lambda model, nvml: gpu)
    spec = SweepSpec.from_dict({"crops": [1], "repeats": 3, "warmup": 1, "new_tokens": [2], "prompt_tokens": [4],
                                "gpu_max_temp_c": 60, "gpu_wait_max_s": 5})
    run_sweep("tiny", spec, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["identity"]["threads"] == 1 and meta["conditions"]["torch_threads"] == 1
    assert meta["conditions"]["gpu"]["uuid"] == gpu.uuid and meta["conditions"]["usable_cpus"] >= 1
    waits = meta["thermal_waits"]
    assert waits["waits"] == 3 and waits["timed_out"] == 0 and waits["max_s"] > 0  # the first one waited
    ref = pl.read_parquet(tmp_path / "run" / "requests.parquet")["reference_ms"]
    assert ref.len() == 3 and ref.null_count() == 0 and ref.min() > 0  # the host's speed beside each request
    record = next(iter(meta["warmup_record"].values()))
    assert 1 <= record["requests"] <= spec.protocol["warmup_max"]


def _uneven_machine(config, base_ms, speed, *, ref_ms=1.0, seed=0, noise=0.005):
    """Requests of one configuration on a host whose speed factor varies: every step and the
    reference workload beside it take `speed` times longer, plus a small noise of their own."""
    rng = np.random.default_rng(seed)
    speed = np.asarray(speed, dtype=float)
    rows = _rows(config, base_ms * speed * (1 + noise * rng.standard_normal(speed.size)))
    return rows.with_columns(pl.Series("reference_ms", ref_ms * speed * (1 + noise * rng.standard_normal(speed.size))))


def test_a_machine_whose_speed_varies_is_named_and_its_share_of_the_spread_taken_out():
    """The VM case measured on this machine: a fixed workload's time varies 1.0-1.6x over seconds
    while CPU share and switches show nothing. The labels' spread follows the reference; the judge
    says so, with the spread that remains once the speed is taken out (about the 0.5% noise)."""
    speed = [1.0, 1.3, 0.9, 1.5, 1.1, 1.0, 1.4, 0.95]
    runs = pl.concat([_uneven_machine("a", 2.0, speed), _uneven_machine("b", 3.0, speed[::-1], seed=1)])
    q = judge(runs, usable_cpus=2)
    assert q.verdict == "noisy"  # the labels are kept as measured and still judged noisy
    reason = next(r for r in q.reasons if r.startswith("machine speed:"))
    ref = runs["reference_ms"]
    assert f"varied by {100 * float(ref.std()) / float(ref.mean()):.1f}% (CV)" in reason
    per = q.configs.sort("config_id")
    raw = 100 * np.std(speed, ddof=1) / np.mean(speed)
    assert per["decode_step_cv_pct"].to_list() == pytest.approx([raw, raw], rel=0.1)
    assert all(cv < 1.5 for cv in per["decode_step_cv_adjusted_pct"])  # what is left: the 0.5% noise
    assert per["reference_cv_pct"].to_list() == pytest.approx([raw, raw], rel=0.1)


def test_a_steady_machine_adds_no_reason_and_its_adjusted_spread_is_the_raw_one():
    steady = pl.concat([_uneven_machine("a", 2.0, [1.0] * 8), _uneven_machine("b", 3.0, [1.0] * 8, seed=1)])
    q = judge(steady, usable_cpus=2)
    assert q.verdict == "clean" and not any(r.startswith("machine speed") for r in q.reasons)
    # a spread of the configuration's own (the reference steady) is not blamed on the machine
    own = _rows("c", [2.0, 2.6, 1.5, 2.2, 1.8, 2.9]).with_columns(pl.lit(1.0).alias("reference_ms"))
    q = judge(own, usable_cpus=2)
    assert q.verdict == "noisy" and not any(r.startswith("machine speed") for r in q.reasons)
    assert q.configs["decode_step_cv_adjusted_pct"][0] == pytest.approx(q.configs["decode_step_cv_pct"][0], rel=1e-9)


def test_without_a_reference_the_columns_are_null_and_nothing_is_claimed():
    q = judge(_quiet("a"), usable_cpus=2)
    assert q.configs["reference_cv_pct"].to_list() == [None]
    assert q.configs["decode_step_cv_adjusted_pct"].to_list() == [None]


def test_the_speed_reference_times_its_fixed_workload_and_refuses_an_empty_one():
    from molmo_latency.conditions import SpeedReference

    ref = SpeedReference(ops=30)
    assert all(ref.time_ms() > 0 for _ in range(3))
    with pytest.raises(ValueError, match="ops >= 1"):
        SpeedReference(ops=0)
