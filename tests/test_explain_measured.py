"""explain on a real run directory of the tiny reference model (CPU), as is and with a clock
effect and a throttled outlier planted into its measured requests."""

import json

import numpy as np
import polars as pl
import pytest

from molmo_latency.cli.main import main
from molmo_latency.explain import PHASE_MS_COLUMNS, explain
from molmo_latency.sweep import SweepSpec, run_sweep

pytestmark = pytest.mark.slow

REPEATS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    spec = SweepSpec.from_dict({"crops": [1, 2], "top_k": [2], "blocks": [2], "prompt_tokens": [8],
                                "new_tokens": [10], "repeats": REPEATS, "warmup": 1, "seed": 0})
    out = tmp_path_factory.mktemp("explain") / "run"
    result = run_sweep("tiny", spec, out)
    assert result["measured"] == 2 * REPEATS
    return out


def test_explain_on_a_real_run_prints_tables_and_the_plot(run_dir, capsys):
    assert main(["explain", str(run_dir)]) == 0
    out = capsys.readouterr().out
    requests = pl.read_parquet(run_dir / "requests.parquet")
    for config_id in requests["config_id"].unique().to_list():
        assert config_id in out
    for words in ("Phases per configuration", "prefill_total_ms", "explained by the hardware",
                  "no telemetry"):
        assert words in out
    png = run_dir / "report" / "explain_decode_vs_clock.png"
    assert not png.exists() and "no plot: no SM clock readings" in out  # CPU: no blank image


def test_explain_json_on_a_real_run_agrees_with_the_table(run_dir, capsys):
    assert main(["explain", str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    requests = pl.read_parquet(run_dir / "requests.parquet")
    assert doc["has_telemetry"] is False  # CPU: NVML is not used
    stats = {(s["config_id"], s["phase"]): s for s in doc["phase_stats"]}
    for (config_id,), group in requests.filter(pl.col("valid")).group_by("config_id"):
        for phase in PHASE_MS_COLUMNS:
            x = group[phase].drop_nulls().to_numpy()
            s = stats[(config_id, phase)]
            assert s["n"] == x.size
            assert s["median_ms"] == pytest.approx(np.median(x))
            assert s["p95_ms"] == pytest.approx(np.percentile(x, 95))


def within_config_noise(requests: pl.DataFrame, column: str) -> float:
    """The measured standard deviation of `column` around its configuration's mean."""
    valid = requests.filter(pl.col("valid"))
    resid = valid.select(pl.col(column) - pl.col(column).mean().over("config_id")).to_series()
    return float(np.sqrt((resid ** 2).sum() / (valid.height - valid["config_id"].n_unique())))


def plant_clock(requests: pl.DataFrame, ms_per_mhz: float) -> pl.DataFrame:
    """Give each measured request an SM clock between 1100 and 1410 MHz and add
    ``ms_per_mhz * (1410 - clock)`` to its decode per token (the measured noise stays in)."""
    n = requests.height
    clocks = np.linspace(1100.0, 1410.0, n)[np.random.default_rng(1).permutation(n)]
    return requests.with_columns(
        pl.Series("sm_clock_mean_mhz", clocks), pl.lit(45.0).alias("temp_max_c"),
        pl.lit(0, dtype=pl.Int64).alias("throttle_reasons"),
    ).with_columns(pl.col("decode_per_token_ms") + ms_per_mhz * (1410.0 - pl.col("sm_clock_mean_mhz")))


def test_a_clock_effect_planted_into_measured_requests_is_found(run_dir):
    """The planted effect is sized from this run's own noise: its spread is 3x the measured
    within-configuration noise, so by construction the clock explains about 9/10 of the variance
    and the fitted slope is the planted one within its standard error."""
    requests = pl.read_parquet(run_dir / "requests.parquet")
    sigma = within_config_noise(requests, "decode_per_token_ms")
    clocks = plant_clock(requests, 0.0).filter(pl.col("valid"))
    clock_dev = clocks.select(pl.col("sm_clock_mean_mhz") - pl.col("sm_clock_mean_mhz").mean()
                              .over("config_id")).to_series().to_numpy()
    slope = 3 * sigma / clock_dev.std()
    planted = explain(plant_clock(requests, slope)).hardware.row(0, named=True)
    unplanted = explain(plant_clock(requests, 0.0)).hardware.row(0, named=True)
    assert planted["target"] == unplanted["target"] == "decode_per_token_ms"

    standard_error = sigma / np.sqrt(np.sum(clock_dev ** 2))
    assert abs(planted["coef_ms_per_mhz"] - (-slope)) < 4 * standard_error
    assert planted["r2"] > 0.6                       # ~0.9 expected
    assert unplanted["r2"] < 0.5                     # chance alone: ~1/(n - configs) expected
    assert planted["r2"] > unplanted["r2"] + 0.3


def test_a_throttled_request_planted_into_measured_requests_is_found(run_dir, tmp_path, capsys):
    requests = pl.read_parquet(run_dir / "requests.parquet")
    target = requests.filter(pl.col("repeat") == 5).sort("order").row(0, named=True)
    hit = (pl.col("config_id") == target["config_id"]) & (pl.col("repeat") == 5)
    # max + 10 x range of its configuration: |robust z| >= 0.6745 * 10 whatever the CPU noise
    same = requests.filter(pl.col("config_id") == target["config_id"])["decode_per_token_ms"]
    slow = same.max() + 10 * (same.max() - same.min())
    planted = requests.with_columns(
        pl.lit(1410.0).alias("sm_clock_mean_mhz"), pl.lit(50.0).alias("temp_max_c"),
        pl.when(hit).then(0x40 | 0x1).otherwise(0x1).cast(pl.Int64).alias("throttle_reasons"),
        pl.when(hit).then(slow).otherwise(pl.col("decode_per_token_ms")).alias("decode_per_token_ms"))
    path = tmp_path / "planted.parquet"
    planted.write_parquet(path)
    assert main(["explain", str(path), "--json"]) == 0
    outliers = json.loads(capsys.readouterr().out)["outliers"]
    mine = [o for o in outliers if o["config_id"] == target["config_id"] and o["repeat"] == 5
            and o["metric"] == "decode_per_token_ms"]
    assert len(mine) == 1
    assert mine[0]["cause"] == "throttling" and mine[0]["detail"] == "HwThermalSlowdown"
