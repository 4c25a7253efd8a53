"""Telemetry per interval: hand-computed alignments, the documented rule against a naive
reference, and attaching the columns to a profiler report."""


import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.schema import TELEMETRY_AGG_COLUMNS
from molmo_latency.telemetry import aggregate_intervals, attach_telemetry, empty_telemetry_columns

MS = 1_000_000
AGG = list(TELEMETRY_AGG_COLUMNS)


def samples_frame(**cols):
    n = len(cols["t_ns"])
    base = {"gpu_index": [0] * n, "mem_clock_mhz": [2619.0] * n, "util_gpu_pct": [100.0] * n,
            "util_mem_pct": [50.0] * n, "read_cost_ns": [1000] * n}
    base.update(cols)
    return pl.DataFrame(base, schema_overrides={"throttle_reasons": pl.Int64,
                                                "energy_mj": pl.Float64, "power_w": pl.Float64,
                                                "sm_clock_mhz": pl.Float64, "temp_c": pl.Float64})


# Samples every 10 ms.
SAMPLES = samples_frame(
    t_ns=[0, 10 * MS, 20 * MS, 30 * MS, 40 * MS],
    sm_clock_mhz=[1980.0, 1980.0, 1410.0, 1410.0, 1755.0],
    temp_c=[40.0, 45.0, 60.0, 62.0, 50.0],
    power_w=[100.0, 200.0, 400.0, 400.0, 300.0],
    energy_mj=[0.0, 1500.0, 4500.0, 8500.0, 12000.0],
    throttle_reasons=[0, 0x1, 0x4, 0, 0x40],
)


def intervals(*spans):
    return pl.DataFrame({"phase": [f"p{i}" for i in range(len(spans))],
                         "step": list(range(len(spans))),
                         "start_ns": [s for s, _ in spans], "end_ns": [e for _, e in spans]},
                        schema_overrides={"start_ns": pl.Int64, "end_ns": pl.Int64})


def rows(df):
    return {r["phase"]: r for r in df.iter_rows(named=True)}


def test_hand_computed_alignment():
    iv = intervals(
        (12 * MS, 14 * MS),   # p0: a 2 ms decode step between two samples: the held one
        (5 * MS, 25 * MS),    # p1: held sample 5 ms, one inside 10 ms, one inside 5 ms
        (20 * MS, 20 * MS),   # p2: zero-length, exactly at a sample
        (-5 * MS, 3 * MS),    # p3: starts before the first sample: no counter at its start
        (45 * MS, 50 * MS),   # p4: after the last sample, within the hold
        (500 * MS, 600 * MS), # p5: long after the last sample: nothing holds that long
    )
    out = aggregate_intervals(iv, SAMPLES)
    assert out.columns == ["phase", "step", "start_ns", "end_ns", *AGG]
    assert out["phase"].to_list() == ["p0", "p1", "p2", "p3", "p4", "p5"]
    r = rows(out)

    p0 = r["p0"]
    assert (p0["sm_clock_mean_mhz"], p0["sm_clock_min_mhz"], p0["sm_clock_max_mhz"]) == (1980.0,) * 3
    assert (p0["temp_max_c"], p0["power_mean_w"], p0["throttle_reasons"]) == (45.0, 200.0, 0x1)
    # counter 1500 + 3000 * 0.2 at 12 ms and 1500 + 3000 * 0.4 at 14 ms: 600 mJ
    assert p0["energy_j"] == pytest.approx(0.6) and p0["telemetry_samples"] == 1

    p1 = r["p1"]
    assert p1["sm_clock_mean_mhz"] == pytest.approx((1980 * 5 + 1980 * 10 + 1410 * 5) / 20)
    assert (p1["sm_clock_min_mhz"], p1["sm_clock_max_mhz"]) == (1410.0, 1980.0)
    assert p1["mem_clock_mean_mhz"] == 2619.0 and p1["temp_max_c"] == 60.0
    assert p1["power_mean_w"] == pytest.approx((100 * 5 + 200 * 10 + 400 * 5) / 20)
    assert p1["energy_j"] == pytest.approx((6500 - 750) / 1000)
    assert p1["throttle_reasons"] == 0x1 | 0x4 and p1["telemetry_samples"] == 3

    p2 = r["p2"]
    assert (p2["sm_clock_mean_mhz"], p2["power_mean_w"], p2["energy_j"]) == (1410.0, 400.0, 0.0)
    assert (p2["throttle_reasons"], p2["telemetry_samples"]) == (0x4, 1)

    p3 = r["p3"]  # no counter value at -5 ms: mean power x duration
    assert p3["sm_clock_mean_mhz"] == 1980.0 and p3["telemetry_samples"] == 1
    assert p3["energy_j"] == pytest.approx(100.0 * 0.008)

    p4 = r["p4"]
    assert (p4["sm_clock_mean_mhz"], p4["temp_max_c"], p4["throttle_reasons"]) == (1755.0, 50.0, 0x40)
    assert p4["energy_j"] == pytest.approx(300.0 * 0.005)

    p5 = r["p5"]
    assert p5["telemetry_samples"] == 0
    assert all(p5[c] is None for c in AGG if c != "telemetry_samples")


def test_the_hold_is_capped():
    iv = intervals((12 * MS, 14 * MS), (14 * MS, 16 * MS))
    out = rows(aggregate_intervals(iv, SAMPLES, max_hold_ns=3 * MS))
    assert out["p0"]["sm_clock_mean_mhz"] == 1980.0  # the 10 ms sample holds until 13 ms
    assert out["p1"]["telemetry_samples"] == 0 and out["p1"]["sm_clock_mean_mhz"] is None


def test_energy_without_a_counter_or_with_a_reset_is_mean_power_times_duration():
    no_counter = SAMPLES.with_columns(pl.lit(None, dtype=pl.Float64).alias("energy_mj"))
    reset = SAMPLES.with_columns(pl.Series("energy_mj", [0.0, 1500.0, 10.0, 4000.0, 7500.0]))
    iv = intervals((5 * MS, 25 * MS))
    for samples in (no_counter, reset):
        assert aggregate_intervals(iv, samples)["energy_j"][0] == pytest.approx(225.0 * 0.020)


def test_a_missing_sensor_is_null_and_partly_missing_values_are_skipped():
    samples = SAMPLES.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("temp_c"),
        pl.Series("power_w", [100.0, None, 400.0, 400.0, 300.0]),
        pl.lit(None, dtype=pl.Int64).alias("throttle_reasons"))
    out = aggregate_intervals(intervals((5 * MS, 25 * MS)), samples).row(0, named=True)
    assert out["temp_max_c"] is None and out["throttle_reasons"] is None
    assert out["power_mean_w"] == pytest.approx((100 * 5 + 400 * 5) / 10)
    assert out["sm_clock_mean_mhz"] is not None and out["telemetry_samples"] == 3


def test_null_or_reversed_intervals_do_not_break_the_table():
    iv = pl.DataFrame({"phase": ["a", "b", "c"], "start_ns": [None, 12 * MS, 12 * MS],
                       "end_ns": [14 * MS, None, 11 * MS]}, schema_overrides={"start_ns": pl.Int64})
    out = rows(aggregate_intervals(iv, SAMPLES))
    assert out["a"]["telemetry_samples"] == 0 and out["b"]["sm_clock_mean_mhz"] is None
    assert out["c"]["sm_clock_mean_mhz"] == 1980.0  # end before start: treated as zero length
    assert out["c"]["energy_j"] == 0.0


def test_no_samples_gives_zero_samples_and_nulls():
    empty = SAMPLES.clear()
    out = aggregate_intervals(intervals((0, 10 * MS)), empty).row(0, named=True)
    assert out["telemetry_samples"] == 0 and out["sm_clock_mean_mhz"] is None


def test_missing_columns_are_user_errors():
    with pytest.raises(MolmoLatencyError, match="interval table lacks the column.*end_ns"):
        aggregate_intervals(pl.DataFrame({"start_ns": [0]}), SAMPLES)
    with pytest.raises(MolmoLatencyError, match="sample table lacks the column.*temp_c"):
        aggregate_intervals(intervals((0, 1)), SAMPLES.drop("temp_c"))


# ---------------------------------------------------------------- the rule, against a naive loop


def reference(spans, samples, hold):
    """The module's documented rule, written the slow obvious way."""
    s_rows = sorted(samples.iter_rows(named=True), key=lambda r: r["t_ns"])
    out = []
    for s, e in spans:
        e_eff = max(e, s + 1)
        used = []
        for i, r in enumerate(s_rows):
            seg_end = r["t_ns"] + hold
            if i + 1 < len(s_rows):
                seg_end = min(seg_end, s_rows[i + 1]["t_ns"])
            w = min(e_eff, seg_end) - max(s, r["t_ns"])
            if w > 0:
                used.append((w, r))
        if not used:
            out.append((None, None, None, 0))
        else:
            mean = sum(w * r["sm_clock_mhz"] for w, r in used) / sum(w for w, _ in used)
            temp = max(r["temp_c"] for _, r in used)
            thr = 0
            for _, r in used:
                thr |= r["throttle_reasons"]
            out.append((mean, temp, thr, len(used)))
    return out


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 30), min_size=1, max_size=25),
    spans=st.lists(st.tuples(st.integers(-20, 400), st.integers(0, 60)), min_size=1, max_size=20),
    hold=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
def test_vectorised_aggregation_matches_the_naive_rule(gaps, spans, hold, seed):
    t = [sum(gaps[:i]) for i in range(len(gaps))]
    n = len(t)
    samples = samples_frame(
        t_ns=t,
        sm_clock_mhz=[float(1000 + (seed * 7 + 13 * i) % 900) for i in range(n)],
        temp_c=[float(30 + (seed + 5 * i) % 50) for i in range(n)],
        power_w=[100.0] * n, energy_mj=[None] * n,
        throttle_reasons=[(1 << ((seed + i) % 9)) if (seed + i) % 3 == 0 else 0 for i in range(n)],
    )
    spans = [(s, s + d) for s, d in spans]
    got = aggregate_intervals(intervals(*spans), samples, max_hold_ns=hold)
    want = reference(spans, samples, hold)
    for row, (mean, temp, thr, count) in zip(got.iter_rows(named=True), want):
        assert row["telemetry_samples"] == count
        if count:
            assert row["sm_clock_mean_mhz"] == pytest.approx(mean)
            assert (row["temp_max_c"], row["throttle_reasons"]) == (temp, thr)
            assert row["energy_j"] == pytest.approx(100.0 * max(row["end_ns"] - row["start_ns"], 0) / 1e9)
        else:
            assert row["sm_clock_mean_mhz"] is None


def test_many_short_decode_steps_are_aggregated_exactly():
    """200k decode steps against 30k samples (its speed is measured in benchmarks/, not here)."""
    n_samples, n_steps = 30_000, 200_000   # 5 min at 100 Hz, 200k decode steps of 1.5 ms
    samples = samples_frame(
        t_ns=[i * 10 * MS for i in range(n_samples)],
        sm_clock_mhz=[1410.0 + (i % 7) for i in range(n_samples)], temp_c=[50.0] * n_samples,
        power_w=[300.0] * n_samples, energy_mj=[i * 3000.0 for i in range(n_samples)],
        throttle_reasons=[0] * n_samples)
    starts = [i * 1_500_000 for i in range(n_steps)]
    steps = pl.DataFrame({"start_ns": starts, "end_ns": [s + 1_400_000 for s in starts]})
    out = aggregate_intervals(steps, samples)
    assert out.height == n_steps and (out["telemetry_samples"] >= 1).all()
    assert out["energy_j"].to_numpy() == pytest.approx(0.3 * 1.4, rel=1e-9)  # 300 W x 1.4 ms


# ---------------------------------------------------------------- attaching to a report


def report():
    return {
        "requests": pl.DataFrame({"request": [0, 1], "start_ns": [0, 20 * MS],
                                  "end_ns": [20 * MS, 40 * MS], "valid": [True, True]}),
        "phases": intervals((12 * MS, 14 * MS), (5 * MS, 25 * MS)).with_columns(
            pl.Series("request", [0, 0])),
        "other": pl.DataFrame({"x": [1]}),
    }


def test_attach_adds_the_columns_to_phases_and_requests():
    out = attach_telemetry(report(), SAMPLES)
    for name in ("requests", "phases"):
        assert out[name].columns[-len(AGG):] == AGG
        assert out[name].schema["throttle_reasons"] == pl.Int64
    assert out["other"].equals(report()["other"])
    assert out["requests"]["request"].to_list() == [0, 1]
    # [0, 20 ms) uses the samples at 0 and 10 ms; the one at 20 ms starts the next request
    assert out["requests"]["temp_max_c"].to_list() == [45.0, 62.0]
    assert out["phases"]["sm_clock_mean_mhz"].to_list()[0] == 1980.0
    assert out["telemetry"].height == SAMPLES.height
    again = attach_telemetry(out, SAMPLES)  # re-attaching replaces, does not duplicate
    assert again["requests"].columns == out["requests"].columns


def test_attach_without_samples_gives_typed_null_columns():
    out = attach_telemetry(report(), None)
    assert "telemetry" not in out
    for name in ("requests", "phases"):
        df = out[name]
        assert df.columns[-len(AGG):] == AGG
        assert all(df[c].null_count() == df.height for c in AGG)
        assert {c: df.schema[c] for c in AGG} == {
            c: {"int64": pl.Int64, "float64": pl.Float64}[t] for c, t in TELEMETRY_AGG_COLUMNS.items()}
    assert empty_telemetry_columns(out["requests"]).columns == out["requests"].columns
