"""explain on requests whose answer is known by construction, and the `explain` command."""

import json

import numpy as np
import polars as pl
import pytest

from molmo_latency.cli.main import main
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.explain import (
    PHASE_MS_COLUMNS,
    explain,
    find_outliers,
    hardware_share,
    phase_stats,
    prepare_requests,
)

S = 1_000_000_000


def synthetic(bases=None, n=30, effect=True, seed=0, noise=0.002, clock_range=(1100.0, 1410.0),
              bounded=False):
    """Requests of a few configurations; decode per token = base * 1410 / clock when `effect`.

    Noise is normal, or with `bounded` a deterministic wiggle of at most +-noise (its robust z
    stays below 1.5, so no request of it can be an outlier)."""
    bases = bases or {"a": 10.0, "b": 14.0, "c": 25.0}
    rng = np.random.default_rng(seed)
    rows, order = [], 0
    for config_id, base in bases.items():
        for rep in range(n):
            clock = rng.uniform(*clock_range)
            temp = 40 + (1410 - clock) * 0.08 + rng.normal(0, 1.5)
            wiggle = np.sin(1.7 * rep + 0.3) if bounded else rng.normal()
            decode = base * (1410 / clock if effect else 1.0) * (1 + noise * wiggle)
            prefill = 3 * base * (1 + (0.01 * np.cos(2.3 * rep) if bounded else 0.01 * rng.normal()))
            row = {c: 1.0 for c in PHASE_MS_COLUMNS}
            row.update(config_id=config_id, request=order, repeat=rep, order=order,
                       decode_per_token_ms=decode, prefill_ms=prefill, decode_ms=decode * 7,
                       total_ms=prefill + decode * 7 + 1.0, sm_clock_mean_mhz=clock, temp_max_c=temp,
                       throttle_reasons=0, valid=True, invalid_reason=None, complete=True,
                       start_ns=order * S, end_ns=order * S + S // 2)
            rows.append(row)
            order += 1
    # interleave the configurations like the sweep runner does
    df = pl.DataFrame(rows).with_columns(
        (pl.col("repeat") * len(bases) + pl.col("config_id").rank("dense").cast(pl.Int64) - 1).alias("order"))
    return df.with_columns((pl.col("order") * S).alias("start_ns"),
                           (pl.col("order") * S + S // 2).alias("end_ns"))


def hw(df):
    return {r["target"]: r for r in hardware_share(prepare_requests(df)).iter_rows(named=True)}


# --------------------------------------------------------------------------- hardware share


def test_a_planted_clock_effect_explains_almost_all_decode_variance():
    out = hw(synthetic(bases={"a": 10.0, "b": 11.0, "c": 12.0}, effect=True))
    dec, pre = out["decode_per_token_ms"], out["prefill_ms"]
    assert dec["n"] == 90 and dec["n_configs"] == 3 and dec["note"] is None
    assert dec["r2"] > 0.95 and dec["r2_adj"] > 0.95 and dec["r2_relative"] > 0.98
    assert dec["coef_ms_per_mhz"] < 0                  # higher clock, faster decode
    assert pre["r2"] < 0.15                            # prefill was given no clock effect


def test_without_an_effect_the_hardware_explains_next_to_nothing():
    dec = hw(synthetic(effect=False, noise=0.02))["decode_per_token_ms"]
    assert dec["r2"] < 0.12 and dec["r2_adj"] < 0.05


def test_configurations_of_very_different_size():
    """time ~ base / clock: one common slope in ms/MHz cannot fit a 5 ms and a 120 ms
    configuration; the relative residual can, and says the clock explains it all."""
    for bases in ({"a": 10.0, "b": 14.0, "c": 25.0}, {"small": 5.0, "big": 120.0}):
        dec = hw(synthetic(bases=bases))["decode_per_token_ms"]
        assert dec["r2_relative"] > 0.98
        assert 0.5 < dec["r2"] < dec["r2_relative"]


def test_throttle_flag_alone_explains_a_planted_throttling_effect():
    df = synthetic(bases={"a": 10.0, "b": 11.0}, effect=False, noise=0.005).with_columns(
        pl.lit(1410.0).alias("sm_clock_mean_mhz"), pl.lit(50.0).alias("temp_max_c"),
        pl.when(pl.col("repeat") % 5 == 0).then(0x4 | 0x1).otherwise(0x1).alias("throttle_reasons"))
    df = df.with_columns(pl.when(pl.col("repeat") % 5 == 0).then(pl.col("decode_per_token_ms") * 1.2)
                         .otherwise(pl.col("decode_per_token_ms")).alias("decode_per_token_ms"))
    dec = hw(df)["decode_per_token_ms"]
    assert dec["regressors"] == "throttled"           # clock and temperature constant: left out
    assert dec["r2"] > 0.9 and dec["coef_ms_throttled"] > 0


def test_no_telemetry_is_said_not_guessed():
    df = synthetic().with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in
                                  ("sm_clock_mean_mhz", "temp_max_c")).with_columns(
        pl.lit(None, dtype=pl.Int64).alias("throttle_reasons"))
    for row in hw(df).values():
        assert row["note"] == "no telemetry" and row["r2"] is None and row["n"] == 0
    result = explain(df.drop("sm_clock_mean_mhz", "temp_max_c", "throttle_reasons"))
    assert not result.has_telemetry and any("no telemetry" in n for n in result.notes)


# --------------------------------------------------------------------------- phase statistics


def test_phase_statistics_match_numpy_and_leave_invalid_requests_out():
    df = synthetic(noise=0.05).with_columns(
        pl.when(pl.col("repeat") == 3).then(False).otherwise(True).alias("valid"))
    stats = phase_stats(prepare_requests(df))
    assert stats.height == 3 * len(PHASE_MS_COLUMNS)
    assert stats["phase"].to_list()[:len(PHASE_MS_COLUMNS)] == list(PHASE_MS_COLUMNS)
    for config_id in ("a", "b", "c"):
        x = df.filter((pl.col("config_id") == config_id) & pl.col("valid"))["decode_per_token_ms"].to_numpy()
        row = stats.filter((pl.col("config_id") == config_id)
                           & (pl.col("phase") == "decode_per_token_ms")).row(0, named=True)
        assert row["n"] == 29
        assert row["median_ms"] == pytest.approx(np.median(x))
        assert row["p95_ms"] == pytest.approx(np.percentile(x, 95))
        assert row["cv"] == pytest.approx(np.std(x, ddof=1) / np.mean(x))


# --------------------------------------------------------------------------- outliers


def planted_outliers():
    """Config "a": 30 steady requests at 1410 MHz, then one planted outlier per cause."""
    df = synthetic(bases={"a": 10.0, "b": 20.0}, effect=False, noise=0.005,
                   clock_range=(1400.0, 1410.0), bounded=True).with_columns(pl.lit(50.0).alias("temp_max_c"))
    first = df.filter(pl.col("config_id") == "a")["order"].min()
    plant = {
        # order: (decode factor, changes, expected cause)
        first + 2 * 10: (1.5, {"throttle_reasons": 0x20 | 0x1}, "throttling"),
        first + 2 * 11: (1.4, {"sm_clock_mean_mhz": 1100.0}, "clock drop"),
        first: (1.3, {}, "first run after idle"),
        first + 2 * 13: (1.3, {"gap": 5 * S}, "first run after idle"),
        first + 2 * 14: (2.0, {"valid": False, "invalid_reason": "other_ms < 0"}, "invalid measurement"),
        first + 2 * 15: (1.6, {}, "unexplained"),
        first + 2 * 16: (1.5, {"throttle_reasons": 0x1}, "unexplained"),   # idle is no slowdown
        first + 2 * 17: (0.5, {}, "unexplained"),                          # faster
    }
    rows = df.sort("order").to_dicts()
    shift = 0
    for row in rows:
        spec = plant.get(row["order"])
        if spec is not None:
            factor, changes, _ = spec
            row["decode_per_token_ms"] *= factor
            shift += changes.get("gap", 0)
            row.update({k: v for k, v in changes.items() if k != "gap"})
        row["start_ns"] += shift
        row["end_ns"] += shift
    return pl.DataFrame(rows), {o: cause for o, (_, _, cause) in plant.items()}


def test_planted_outliers_are_found_with_their_cause():
    df, expected = planted_outliers()
    out = find_outliers(prepare_requests(df)).filter(pl.col("metric") == "decode_per_token_ms")
    found = dict(zip(out["order"].to_list(), out["cause"].to_list()))
    assert found == expected
    detail = dict(zip(out["order"].to_list(), out["detail"].to_list()))
    by_cause = {c: detail[o] for o, c in expected.items() if c in ("throttling", "clock drop", "invalid measurement")}
    assert by_cause["throttling"] == "SwThermalSlowdown"
    assert by_cause["clock drop"].startswith("SM clock 1100 MHz vs 14") and "-22%" in by_cause["clock drop"]
    assert by_cause["invalid measurement"] == "other_ms < 0"
    assert "5.5 s idle before it" in detail.values()     # 5 s planted + the usual 0.5 s
    assert "faster than its configuration" in detail.values()
    assert (out["config_id"] == "a").all()
    assert out["robust_z"].abs().min() > 3.5


def test_no_outliers_in_steady_data_and_tiny_configurations_are_skipped():
    steady = synthetic(effect=False, noise=0.01, bounded=True)
    assert find_outliers(prepare_requests(steady)).height == 0
    two = synthetic(n=2, noise=0.01).with_columns(
        pl.when(pl.col("repeat") == 1).then(100.0).otherwise(pl.col("decode_per_token_ms"))
        .alias("decode_per_token_ms"))
    assert find_outliers(prepare_requests(two)).height == 0


def test_identical_values_make_any_difference_an_outlier():
    df = synthetic(effect=False, noise=0.0, bases={"a": 10.0}, n=10).with_columns(
        pl.when(pl.col("repeat") == 6).then(11.0).otherwise(10.0).alias("decode_per_token_ms"))
    out = find_outliers(prepare_requests(df)).filter(pl.col("metric") == "decode_per_token_ms")
    assert out["repeat"].to_list() == [6]


# --------------------------------------------------------------------------- input checks


def test_missing_columns_and_empty_tables_are_user_errors():
    df = synthetic(n=3)
    with pytest.raises(MolmoLatencyError, match="lacks the phase column.*decode_per_token_ms, total_ms"):
        explain(df.drop("decode_per_token_ms", "total_ms"))
    with pytest.raises(MolmoLatencyError, match="no rows"):
        explain(df.clear())


def test_a_bare_requests_table_gets_configurations_from_its_knobs():
    df = synthetic(n=5).drop("config_id", "order", "repeat").with_columns(
        pl.when(pl.col("request") < 5).then(1).otherwise(2).alias("crops"), pl.lit(8).alias("new_tokens"))
    prepared = prepare_requests(df)
    assert prepared["config_id"].unique(maintain_order=True).to_list() == [
        "crops=1,new_tokens=8", "crops=2,new_tokens=8"]
    assert prepared.sort("start_ns")["order"].to_list() == list(range(df.height))
    result = explain(df)
    assert result.configs.columns == ["config_id", "crops", "new_tokens", "n_requests", "n_valid",
                                      "n_with_telemetry"]


# --------------------------------------------------------------------------- the command


def write_run(tmp_path, df):
    run = tmp_path / "run"
    run.mkdir()
    df.write_parquet(run / "requests.parquet")
    return run


def test_explain_command_prints_tables_and_writes_the_plot(tmp_path, capsys):
    df, _ = planted_outliers()
    run = write_run(tmp_path, df)
    assert main(["explain", str(run)]) == 0
    out = capsys.readouterr().out
    for words in ("Phases per configuration", "decode_per_token_ms", "explained by the hardware",
                  "Outliers and their likely cause", "throttling", "clock drop", "SwThermalSlowdown"):
        assert words in out
    png = run / "report" / "explain_decode_vs_clock.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_explain_json(tmp_path, capsys):
    run = write_run(tmp_path, synthetic(bases={"a": 10.0, "b": 11.0, "c": 12.0}))
    assert main(["explain", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"phase_stats", "hardware", "outliers", "configs", "notes", "has_telemetry", "plot"}
    dec = next(h for h in doc["hardware"] if h["target"] == "decode_per_token_ms")
    assert dec["r2"] > 0.95 and doc["has_telemetry"] is True
    assert len(doc["phase_stats"]) == 3 * len(PHASE_MS_COLUMNS)


def test_explain_a_parquet_file_without_telemetry(tmp_path, capsys):
    df = synthetic(n=4).drop("sm_clock_mean_mhz", "temp_max_c", "throttle_reasons")
    path = tmp_path / "my_requests.parquet"
    df.write_parquet(path)
    plot = tmp_path / "elsewhere" / "p.png"
    assert main(["explain", str(path), "--json", "--plot", str(plot)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["has_telemetry"] is False and doc["plot"] is None
    assert [h["note"] for h in doc["hardware"]] == ["no telemetry", "no telemetry"]
    assert not plot.exists() and "NVML" in doc["plot_skipped"]  # no blank image; the reason instead


def test_inf_z_is_valid_json(tmp_path, capsys):
    """All valid requests equal (MAD 0): an invalid one that differs is infinitely far."""
    df = synthetic(effect=False, noise=0.0, bases={"a": 10.0}, n=10).with_columns(
        pl.when(pl.col("repeat") == 6).then(11.0).otherwise(10.0).alias("decode_per_token_ms"),
        (pl.col("repeat") != 6).alias("valid"))
    assert main(["explain", str(write_run(tmp_path, df)), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [o["robust_z"] for o in doc["outliers"] if o["metric"] == "decode_per_token_ms"] == [None]


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "is not a run directory: it has no requests.parquet"),
    (lambda tmp: (tmp / "x.parquet").write_text("not parquet") and tmp / "x.parquet", "cannot read"),
    (lambda tmp: pl.DataFrame({"total_ms": [1.0]}).write_parquet(tmp / "r.parquet") or tmp / "r.parquet",
     "lacks the phase column"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make, words):
    assert main(["explain", str(make(tmp_path))]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("molmo-latency: error: ")


def test_without_telemetry_an_outlier_says_what_could_not_be_checked():
    df = synthetic(effect=False, noise=0.01, bounded=True, bases={"a": 10.0}, n=10).drop(
        "sm_clock_mean_mhz", "temp_max_c", "throttle_reasons").with_columns(
        pl.when(pl.col("repeat") == 4).then(30.0).otherwise(pl.col("decode_per_token_ms"))
        .alias("decode_per_token_ms"))
    out = find_outliers(prepare_requests(df)).filter(pl.col("metric") == "decode_per_token_ms")
    assert out.select("repeat", "cause", "detail").rows() == [
        (4, "unexplained", "no telemetry to check throttling or clocks")]


def test_host_contention_explains_the_variance_it_caused_and_names_its_outliers():
    """Decode steps planted to slow down in proportion to the CPU share the process lost: the host
    fit explains nearly all of it, the hardware fit has no telemetry, and the slowest request's
    cause is host contention."""
    from molmo_latency.explain import PHASE_MS_COLUMNS, explain

    share = [0.99, 0.98, 0.97, 0.99, 0.98, 0.97, 0.99, 0.3]
    n = len(share)
    df = pl.DataFrame({**{c: [1.0] * n for c in PHASE_MS_COLUMNS},
                       "decode_per_token_ms": [2.0 / s for s in share], "config_id": ["a"] * n,
                       "cpu_time_ratio": share, "torch_threads": [1] * n, "order": list(range(n)),
                       "involuntary_switches": [3] * n, "host_load_1m": [1.0] * n})
    e = explain(df)
    host = e.host.filter(pl.col("target") == "decode_per_token_ms").row(0, named=True)
    assert host["regressors"] == "cpu_share" and host["r2"] > 0.99
    assert e.hardware["note"].to_list() == ["no telemetry", "no telemetry"]
    slow = e.outliers.filter(pl.col("metric") == "decode_per_token_ms").row(0, named=True)
    assert slow["order"] == 7 and slow["cause"] == "host contention" and "30%" in slow["detail"]
    assert "host" in e.to_dict()


def test_without_recorded_conditions_the_host_fit_says_so():
    from molmo_latency.explain import NO_CONDITIONS, PHASE_MS_COLUMNS, explain

    df = pl.DataFrame({**{c: [1.0, 1.1, 0.9] for c in PHASE_MS_COLUMNS}, "config_id": ["a"] * 3})
    assert explain(df).host["note"].to_list() == [NO_CONDITIONS, NO_CONDITIONS]


def test_a_host_whose_speed_varies_explains_the_spread_and_names_its_slow_request():
    """Decode steps planted to follow the host's speed (the reference workload beside each request
    takes as much longer as the step): the host fit explains it through reference_ms, and the
    slowest request's cause is the slow machine, with its reference against the median."""
    from molmo_latency.explain import PHASE_MS_COLUMNS, explain

    speed = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 1.6]
    n = len(speed)
    df = pl.DataFrame({**{c: [1.0] * n for c in PHASE_MS_COLUMNS},
                       "decode_per_token_ms": [2.0 * s for s in speed], "config_id": ["a"] * n,
                       "cpu_time_ratio": [0.99] * n, "torch_threads": [1] * n, "order": list(range(n)),
                       "involuntary_switches": [0] * n, "host_load_1m": [1.0] * n,
                       "reference_ms": [0.8 * s for s in speed]})
    e = explain(df)
    host = e.host.filter(pl.col("target") == "decode_per_token_ms").row(0, named=True)
    assert "reference_ms" in host["regressors"] and host["r2"] > 0.99
    assert host["coef_ms_per_reference_ms"] == pytest.approx(2.0 / 0.8, rel=1e-6)
    slow = e.outliers.filter(pl.col("metric") == "decode_per_token_ms").row(0, named=True)
    assert slow["order"] == 7 and slow["cause"] == "slow machine"
    assert f"{0.8 * 1.6:.2f} ms vs {0.8 * 1.005:.2f} ms median" in slow["detail"]
