"""The estimator on simulated sweeps with a known cost (fast, deterministic): it recovers the
costs (per request and per decode position), predicts whole requests for any N, calibrates P95,
evaluates on held-out configurations and held-out N, and splits whole settings."""

import ast
import doctest
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import molmo_latency.estimator as estimator_pkg
from molmo_latency.errors import EstimatorError
from molmo_latency.estimator import Estimator, OutputLengths, example_requests, fit_estimator, load_requests
from molmo_latency.estimator import data, example, features, fit, model
from molmo_latency.estimator.example import DECODE_STEP_COST_MS, OTHER_COST_MS, PREFILL_COST_MS
from molmo_latency.estimator.fit import conformal_factors, split_configs
from molmo_latency.show import estimator_plots as parity
from molmo_latency.show.estimator_plots import use_log_axes, write_estimator_plots


@pytest.fixture(scope="module")
def est():
    return fit_estimator(example_requests(seed=0))


@pytest.mark.parametrize("module", [estimator_pkg, data, features, fit, model, parity, example])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_costs_are_recovered_from_noisy_requests():
    e = fit_estimator(example_requests(seed=3, noise=0.02, repeats=6))
    sel = e.meta["selection"]
    for target, truth in (("prefill_total_ms", PREFILL_COST_MS), ("decode_step_ms", DECODE_STEP_COST_MS)):
        coef = sel[target]["coefficients"]
        # the costs that carry most of the time come back within 15%
        for name in ("const", "blocks", "blocks_x_top_k"):
            assert coef[name] == pytest.approx(truth[name], rel=0.15), (target, name, coef[name])
    assert sel["other_ms"]["coefficients"]["decode_steps"] == pytest.approx(OTHER_COST_MS["decode_steps"], rel=0.15)
    m = e.metrics["held_out_configs"]
    assert m["request_ms"]["config_medians"]["r2"] > 0.99 and m["request_ms"]["requests"]["mape_pct"] < 3
    assert m["decode_step_ms"]["steps"]["mape_pct"] < 3


def _true_step_ms(blocks, top_k, input_tokens, step):
    # the simulated truth, written out by hand (example.py's cost table, not features.py)
    c = DECODE_STEP_COST_MS
    return (c["const"] + c["blocks"] * blocks + c["blocks_x_top_k"] * blocks * top_k
            + c["blocks_x_kv_tokens"] * blocks * (input_tokens + step + 1)
            + c["first_steps"] * np.exp(-step / 4.0) + c["blocks_x_ramp"] * blocks * (1 - np.exp(-step / 16.0)))


def test_decode_steps_are_predicted_by_position(est):
    steps = np.arange(15)
    p = est.predict_positions(crops=2, top_k=2, blocks=4, prompt_tokens=8, steps=steps)
    truth = _true_step_ms(4, 2, 1 + 16 * 2 + 8, steps)
    mu = p["decode_step_p50_ms"] / est.factors["decode_step_ms"][0]
    np.testing.assert_allclose(mu, truth, rtol=0.03)
    # the shape over positions is learned, not only the level: first step and step 14 differ as they should
    assert (mu[0] - mu[14]) == pytest.approx(truth[0] - truth[14], rel=0.25)
    by_pos = est.metrics["held_out_configs"]["decode_step_ms"]["by_position"]
    assert [b["positions"] for b in by_pos] == ["0", "1-3", "4-15"]
    ev = est.steps_evaluation.filter(pl.col("split") == "held_out_configs")
    for b in by_pos:
        part = ev.filter((pl.col("step") >= b["first_step"]) & (pl.col("step") <= b["last_step"]))
        assert b["n"] == part.height
        assert b["coverage_p95"] == pytest.approx(float((part["decode_step_ms"] <= part["decode_step_p95_ms"]).mean()))


def test_a_whole_request_is_prefill_plus_every_decode_step_plus_the_gaps(est):
    cfg = {"crops": 4, "top_k": 2, "blocks": 2, "prompt_tokens": 32}
    n = 40
    lin = est.predict_linear(**cfg, new_tokens=n)
    f = est.factors
    steps = est.predict_positions(**cfg, steps=np.arange(n - 1))["decode_step_p50_ms"] / f["decode_step_ms"][0]
    assert lin["decode_total_ms"][0] == pytest.approx(steps.sum(), rel=1e-9)  # closed-form sum == sum over positions
    co = est.meta["selection"]["other_ms"]["coefficients"]
    other = co["const"] + co["decode_steps"] * (n - 1) + co["batch_x_decode_steps"] * (n - 1)
    assert lin["other_ms"][0] == pytest.approx(other, rel=1e-9)
    assert lin["request_ms"][0] == pytest.approx(lin["prefill_total_ms"][0] + steps.sum() + other, rel=1e-9)
    out = est.predict_arrays(**cfg, new_tokens=n)
    assert out["prefill_total_p50_ms"][0] == pytest.approx(lin["prefill_total_ms"][0] * f["prefill_total_ms"][0])
    # the whole request's P50/P95: a log-normal with the modelled mean and variance of prefill + steps +
    # gaps (steps: mean ratio to their medians, variance shrinking with the steps' count), at the scores
    nz = est.noise
    pre, dec = lin["prefill_total_ms"][0], lin["decode_total_ms"][0]
    mean = pre * nz["prefill_mean_ratio"] + dec * nz["step_mean_ratio"] + other
    var = (pre ** 2 * nz["prefill_ratio_var"] + 2 * pre * dec * nz["prefill_step_cov"]
           + dec ** 2 * nz["step_ratio_var"] * (nz["step_correlation"] + (1 - nz["step_correlation"]) / (n - 1)))
    log_sd = np.sqrt(np.log(1 + var / mean ** 2))
    median = mean / np.sqrt(1 + var / mean ** 2)
    for i, col in enumerate(("request_p50_ms", "request_p95_ms")):
        assert out[col][0] == pytest.approx(median * np.exp(f["request_ms"][i] * log_sd), rel=1e-9)
    assert out["decode_per_token_p50_ms"][0] == pytest.approx(out["decode_total_p50_ms"][0] / (n - 1))
    one = est.predict_arrays(**cfg, new_tokens=1)  # no decode step at all
    assert one["decode_total_p50_ms"][0] == 0 and np.isnan(one["decode_per_token_p50_ms"][0])


def test_p95_coverage_is_about_95_percent_for_short_and_long_requests_alike():
    # independent step noise: a long request's total spreads less (relatively) than a short one's;
    # normalized calibration gives each N its own width, so coverage holds per N, not only overall
    rows = example_requests(seed=5, noise=0.05, repeats=6, crops=(1, 2, 3, 4, 6, 8), top_k=(1, 2, 4, 8),
                            blocks=(1, 2, 3, 4), prompt_tokens=(8, 32, 64), new_tokens=(4, 32))
    e = fit_estimator(rows, test_fraction=0.3, calib_fraction=0.3, seed=5)
    # log-normal steps of sigma 0.05: ratio to the median with mean exp(sigma^2 / 2), variance ~ sigma^2
    assert e.noise["step_correlation"] < 0.2 and np.sqrt(e.noise["step_ratio_var"]) == pytest.approx(0.05, rel=0.2)
    assert e.noise["step_mean_ratio"] == pytest.approx(np.exp(0.05 ** 2 / 2), abs=0.005)
    for b in e.metrics["held_out_configs"]["request_ms"]["by_output_tokens"]:
        assert b["n"] > 500 and 0.92 <= b["coverage_p95"] <= 0.98, b
    short, long = (e.predict_arrays(crops=2, top_k=2, blocks=2, prompt_tokens=32, new_tokens=n) for n in (4, 32))
    width = [float(o["request_p95_ms"][0] / o["request_p50_ms"][0]) for o in (short, long)]
    assert width[1] < width[0]  # the long request's P95 is relatively closer to its P50


def test_request_p50_rises_with_n_and_p95_is_above_p50(est):
    grid = np.array([1, 2, 4, 8, 16, 64, 256])
    g = est.predict_grid(crops=[0, 1, 8], top_k=[1, 2, 4], blocks=[1, 2, 4], prompt_tokens=[8, 32, 8], new_tokens=grid)
    assert g["request_p50_ms"].shape == (3, grid.size)
    assert (np.diff(g["request_p50_ms"], axis=1) > 0).all() and (np.diff(g["request_p95_ms"], axis=1) > 0).all()
    for name in ("prefill_total", "decode_total", "request"):
        assert (g[f"{name}_p95_ms"] >= g[f"{name}_p50_ms"]).all()
    # the grid is the batched path, element by element
    flat = est.predict_arrays(crops=8, top_k=4, blocks=4, prompt_tokens=8, new_tokens=grid)
    np.testing.assert_allclose(flat["request_p95_ms"], g["request_p95_ms"][2], rtol=1e-12)  # float order may differ


def test_p95_is_exceeded_about_5_percent_of_the_time_on_held_out_configurations():
    rows = example_requests(seed=5, noise=0.05, repeats=6, crops=(1, 2, 3, 4, 6, 8), top_k=(1, 2, 4, 8),
                            blocks=(1, 2, 3, 4), prompt_tokens=(8, 32, 64), new_tokens=(4, 8))
    e = fit_estimator(rows, test_fraction=0.3, calib_fraction=0.3, seed=5)
    m = e.metrics["held_out_configs"]
    for name in ("prefill_total_ms", "decode_total_ms", "request_ms"):
        r = m[name]["requests"]
        assert r["n"] > 1000
        assert 0.92 <= r["coverage_p95"] <= 0.98, (name, r["coverage_p95"])
        assert 0.40 <= r["coverage_p50"] <= 0.60, (name, r["coverage_p50"])
        if name != "prefill_total_ms":  # coverage is reported by N
            assert [b["output_tokens"] for b in m[name]["by_output_tokens"]] == [4, 8]
            assert sum(b["n"] for b in m[name]["by_output_tokens"]) == r["n"]
    assert 0.92 <= m["decode_step_ms"]["steps"]["coverage_p95"] <= 0.98
    cal = e.meta["calibration"]["request_ms"]
    assert cal["finite_sample_guarantee"] and cal["p95_factor"] > cal["p50_factor"]
    ev = e.evaluation.filter(pl.col("split") == "held_out_configs")
    assert set(ev["config_key"]) == set(e.meta["split"]["test_configs"])


def test_held_out_n_is_never_fitted_on(est):
    hn = est.metrics["held_out_new_tokens"]
    assert hn["holdout"] == "output tokens >= 16" and hn["trained_on_output_tokens"] == [4]
    ev = est.evaluation.filter(pl.col("split") == "held_out_new_tokens")
    assert set(ev["decode_steps"].to_list()) == {15} and ev.height == hn["request_ms"]["requests"]["n"]
    steps = est.steps_evaluation.filter(pl.col("split") == "held_out_new_tokens")
    assert steps["step"].max() == 14 and [b["positions"] for b in hn["decode_step_ms"]["by_position"]][-1] == "4-15"
    # the physical decode model extrapolates from 3 positions to 15 within a few percent
    assert hn["request_ms"]["requests"]["mape_pct"] < 8
    one_n = example_requests(seed=0, new_tokens=(8,))
    assert "skipped" in fit_estimator(one_n).metrics["held_out_new_tokens"]


def test_free_generation_requests_of_any_length_are_used_step_by_step():
    # EOS stops each request somewhere: cut every request's decode steps at a random length
    rng = np.random.default_rng(7)
    rows = example_requests(seed=7, new_tokens=(24,))
    keep = rng.integers(1, 24, rows.height)
    cut = rows.with_columns(pl.Series("keep", keep)).with_columns(
        pl.col("decode_step_ms").list.head(pl.col("keep")).alias("decode_step_ms"),
        (pl.col("keep")).alias("decode_steps"), (pl.col("keep") + 1).alias("output_tokens"))
    cut = cut.with_columns(pl.col("decode_step_ms").list.sum().alias("decode_ms")).with_columns(
        (pl.col("prefill_total_ms") + pl.col("decode_ms") + pl.col("other_ms")).alias("total_ms")).drop("keep")
    e = fit_estimator(cut)
    valid = cut.filter("valid")
    assert e.meta["training"]["decode_steps"] == int(valid["decode_steps"].sum())
    hn = e.metrics["held_out_new_tokens"]
    threshold = int(hn["holdout"].split(">= ")[1])
    held = e.evaluation.filter(pl.col("split") == "held_out_new_tokens")
    assert held.height > 0 and (held["decode_steps"] + 1 >= threshold).all()
    assert all(n < threshold for n in hn["trained_on_output_tokens"])
    assert e.metrics["held_out_configs"]["request_ms"]["requests"]["mape_pct"] < 5


def test_an_output_length_distribution_gives_the_budget_for_an_unknown_n(est):
    cfg = {"crops": 1, "top_k": 2, "blocks": 4, "prompt_tokens": 32}
    point = est.predict_arrays(**cfg, new_tokens=64)
    single = est.predict_arrays(**cfg, new_tokens=OutputLengths([64, 64]))
    assert single["request_p95_ms"][0] == pytest.approx(point["request_p95_ms"][0], rel=1e-9)
    assert single["request_p50_ms"][0] == pytest.approx(point["request_p50_ms"][0], rel=0.01)
    short, long = est.predict_arrays(**cfg, new_tokens=8), point
    mix = est.predict_arrays(**cfg, new_tokens=OutputLengths([8, 64]))
    assert short["request_p50_ms"][0] < mix["request_p50_ms"][0] < long["request_p50_ms"][0]
    assert short["request_p95_ms"][0] < mix["request_p95_ms"][0] <= long["request_p95_ms"][0] * (1 + 1e-9)
    # mostly short outputs: the P50 budget is near the short one, the P95 still pays for the long tail
    skew = est.predict_arrays(**cfg, new_tokens=OutputLengths([8] * 90 + [64] * 10))
    assert skew["request_p50_ms"][0] == pytest.approx(short["request_p50_ms"][0], rel=0.05)
    assert skew["request_p95_ms"][0] > 2 * short["request_p95_ms"][0]
    assert skew["prefill_total_p95_ms"][0] == pytest.approx(short["prefill_total_p95_ms"][0], rel=1e-12)
    with pytest.raises(EstimatorError, match="whole numbers >= 1; got 0.5"):
        OutputLengths([0.5, 3])


def test_output_lengths_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("8\n16, 16\n")
    (tmp_path / "b.json").write_text("[8, 16, 16]")
    pl.DataFrame({"output_tokens": [8, 16, 16]}).write_parquet(tmp_path / "c.parquet")
    for name in ("a.txt", "b.json", "c.parquet"):
        d = OutputLengths.from_file(tmp_path / name)
        assert d.values.tolist() == [8, 16] and d.weights.tolist() == pytest.approx([1 / 3, 2 / 3])
    (tmp_path / "bad.txt").write_text("eight")
    with pytest.raises(EstimatorError, match="not a list of output lengths"):
        OutputLengths.from_file(tmp_path / "bad.txt")
    with pytest.raises(EstimatorError, match="does not exist"):
        OutputLengths.from_file(tmp_path / "none.txt")


def test_settings_are_never_split_across_train_calibration_and_test():
    rows = example_requests(seed=0)
    e = fit_estimator(rows, seed=11)
    sp = e.meta["split"]
    test, calib = set(sp["test_configs"]), set(sp["calib_configs"])
    assert not test & calib
    strip = lambda keys: {k.rsplit("-n", 1)[0] for k in keys}  # noqa: E731 - the setting of a config key
    assert not strip(test) & strip(calib)
    # both N of every held-out setting are held out
    assert len(test) == 2 * len(strip(test))
    assert sum(sp["rows"].values()) == rows.filter("valid").height
    roles = split_configs([f"k{i}" for i in range(40)], test_fraction=0.25, calib_fraction=0.25, seed=1)
    assert list(roles.values()).count("test") == 10 and list(roles.values()).count("calib") == 10
    assert roles == split_configs([f"k{i}" for i in reversed(range(40))], test_fraction=0.25,
                                  calib_fraction=0.25, seed=1)  # same seed, same split


def test_every_step_of_every_valid_request_is_used():
    rows = example_requests(seed=0)
    e = fit_estimator(rows)
    tr = e.meta["training"]
    valid = rows.filter("valid")
    assert tr["invalid_rows_excluded"] == 3 and tr["rows"] == valid.height
    assert tr["decode_steps"] == int(valid["decode_steps"].sum()) and tr["output_tokens"] == [4, 16]


def test_conformal_factor_is_the_finite_sample_quantile():
    ratios = np.arange(1, 21) / 10  # 0.1 .. 2.0, n = 20: ceil(21 * 0.95) = 20th smallest
    assert conformal_factors(ratios, 0.95) == (1.05, 2.0, True)
    f50, f95, ok = conformal_factors(np.array([1.0, 1.1, 1.2]), 0.95)  # too few: the largest, no guarantee
    assert f95 == 1.2 and not ok


def test_noise_moments_are_the_ratio_moments_and_leave_out_floored_predictions(est):
    from molmo_latency.estimator.fit import _noise, explode_steps

    rows = example_requests(seed=4, repeats=3).filter(pl.col("valid")).with_row_index("request_index")
    steps = explode_steps(rows.drop("request_index"))
    noise, excluded = _noise(est, rows, steps)
    # recomputed here from the definitions: ratio of measured to the linear (median) prediction
    lin = est.predict_linear(**{k: rows[k].to_numpy() for k in ("crops", "top_k", "blocks", "prompt_tokens")},
                             new_tokens=rows["new_tokens"].to_numpy())
    rp = rows["prefill_total_ms"].to_numpy() / lin["prefill_total_ms"]
    assert noise["prefill_mean_ratio"] == pytest.approx(rp.mean(), rel=1e-9)
    assert noise["prefill_ratio_var"] == pytest.approx(rp.var(), rel=1e-9)
    mu = est.predict_positions(**{k: steps[k].to_numpy() for k in ("crops", "top_k", "blocks", "prompt_tokens")},
                               steps=steps["step"].to_numpy())["decode_step_p50_ms"] / est.factors["decode_step_ms"][0]
    rs = steps["decode_step_ms"].to_numpy() / mu
    assert noise["step_mean_ratio"] == pytest.approx(rs.mean(), rel=1e-9) and excluded == {"prefill_requests": 0,
                                                                                             "decode_steps": 0}
    # a step model that predicts nothing (0, clipped at the floor) for one-block configurations: their
    # steps' ratios (measured / 1e-6 ms) mean nothing and are left out and counted, not averaged in
    names = est.features.names["decode_step_ms"]
    broken = Estimator(est.features, {**est.coef, "decode_step_ms": np.where(np.array(names) == "blocks", 1.0, 0.0)
                                      - np.where(np.array(names) == "const", 1.0, 0.0)},
                       est.factors, est.token_map, est.defaults, est.knob_ranges, est.meta)
    noise, excluded = _noise(broken, rows, steps)
    one_block = int((steps["blocks"] == 1).sum())
    assert excluded["decode_steps"] == one_block > 0 and np.isfinite(noise["step_mean_ratio"])
    assert noise["step_mean_ratio"] < 1e3  # measured / FLOOR_MS would be ~1e6


def test_predict_arrays_matches_predict_and_is_vectorised(est):
    rng = np.random.default_rng(0)
    cfg = {"crops": rng.integers(0, 13, 1000), "top_k": rng.integers(1, 9, 1000), "blocks": rng.integers(1, 5, 1000),
           "prompt_tokens": rng.integers(0, 100, 1000), "new_tokens": rng.integers(2, 200, 1000)}
    arrays = est.predict_arrays(**cfg)
    frame = est.predict(pl.DataFrame(cfg))
    inside = arrays.pop("in_range")
    for name, values in arrays.items():
        assert values.shape == (1000,) and np.all(values > 0)
        np.testing.assert_array_equal(frame[name].to_numpy(), values)
    one = est.predict_arrays(**{k: v[7] for k, v in cfg.items()})
    assert all(one[k][0] == pytest.approx(arrays[k][7], rel=1e-12) for k in arrays)
    lo = est.predict_arrays(crops=4, top_k=2, blocks=1, prompt_tokens=32, new_tokens=16)
    hi = est.predict_arrays(crops=4, top_k=2, blocks=4, prompt_tokens=32, new_tokens=16)
    assert all(hi[k][0] > lo[k][0] for k in arrays)
    assert frame["in_range"].to_list() == inside.tolist() == [
        bool(0 <= c <= 8 and k <= 4 and b <= 4 and 8 <= p <= 32 and 4 <= n <= 16) for c, k, b, p, n in
        zip(cfg["crops"], cfg["top_k"], cfg["blocks"], cfg["prompt_tokens"], cfg["new_tokens"])]


@pytest.mark.parametrize("bad, match", [
    ({"crops": -1}, r"crops must be >= 0; got -1$"),
    ({"top_k": 0}, r"top_k must be >= 1; got 0 \(configuration 0 of 2\)$"),
    ({"blocks": float("nan")}, r"blocks must be >= 1; got nan \(configuration 0 of 2\)$"),
    ({"new_tokens": [3, 0]}, r"new_tokens must be >= 1; got 0 \(configuration 1 of 2\)$"),
    ({"prompt_tokens": [1, 2, 3]}, "different lengths"),
    ({"crops": "many"}, "crops must be a number"),
])
def test_bad_configurations_get_a_clear_error(est, bad, match):
    cfg = {"crops": [1, 2], "top_k": 2, "blocks": 2, "prompt_tokens": 8, **bad}
    with pytest.raises(EstimatorError, match=match):
        est.predict_arrays(**cfg)
    with pytest.raises(EstimatorError, match="lack .*prompt_tokens"):
        est.predict({"crops": 1, "top_k": 1, "blocks": 1})
    with pytest.raises(EstimatorError, match="unknown configuration keys"):
        est.predict({"crops": 1, "top_k": 1, "blocks": 1, "prompt_tokens": 1, "image_size": 3})


def test_fit_refuses_what_it_cannot_use():
    rows = example_requests(seed=0)
    with pytest.raises(EstimatorError, match="unknown feature set 'trees'"):
        fit_estimator(rows, feature_set="trees")
    few = rows.filter(pl.col("crops").is_in([0]) & pl.col("top_k").is_in([1]) & (pl.col("prompt_tokens") == 8))
    with pytest.raises(EstimatorError, match="cannot be split"):
        fit_estimator(few)
    with pytest.raises(EstimatorError, match="test_fraction"):
        fit_estimator(rows, test_fraction=1.5)
    with pytest.raises(EstimatorError, match="no valid request"):
        fit_estimator(rows.with_columns(pl.lit(False).alias("valid")))
    with pytest.raises(EstimatorError, match="lacks .*decode_step_ms"):
        fit_estimator(rows.drop("decode_step_ms"))
    with pytest.raises(EstimatorError, match="no decode step"):
        fit_estimator(rows.with_columns(pl.lit([], dtype=pl.List(pl.Float64)).alias("decode_step_ms")))


def _fake_run(path, rows, *, model="tiny", gpu_name=None, top_k_default=2, blocks_total=4):
    """A run directory holding `rows` as a sweep would: requests.parquet and phases.parquet."""
    path.mkdir(parents=True)
    rows.drop("decode_step_ms").write_parquet(path / "requests.parquet")
    phases = (rows.select("config_id", "repeat", "decode_step_ms")
              .with_columns(pl.int_ranges(0, pl.col("decode_step_ms").list.len()).alias("step"))
              .explode("decode_step_ms", "step").rename({"decode_step_ms": "ms"})
              .with_columns(pl.lit("decode").alias("phase"), pl.col("step").cast(pl.Int64)))
    phases.write_parquet(path / "phases.parquet")
    meta = {"model": {"name": model, "blocks_total": blocks_total, "top_k_default": top_k_default,
                      "dtype": "torch.float32"},
            "device": {"device": "cuda:0" if gpu_name else "cpu", "gpu_name": gpu_name}}
    (path / "run.json").write_text(json.dumps(meta))
    return path


def test_run_directories_are_concatenated_and_model_defaults_filled(tmp_path):
    rows = example_requests(seed=0)
    a = _fake_run(tmp_path / "a", rows.filter(pl.col("top_k") != 2))
    # the model's own top-k is stored as null by the sweep; run.json says it is 2
    b = _fake_run(tmp_path / "b", rows.filter(pl.col("top_k") == 2).with_columns(pl.lit(None, pl.Int64).alias("top_k")))
    both, info = load_requests([a, b])
    assert both.height == rows.height - 3 and info["invalid_rows"] == 3
    assert sorted(both["top_k"].unique()) == [1, 2, 4] and both["top_k"].null_count() == 0
    # the decode steps of each request came back from phases.parquet, in order
    want = rows.filter("valid").sort("config_id", "repeat")["decode_step_ms"].to_list()
    assert both.sort("config_id", "repeat")["decode_step_ms"].to_list() == want
    est = fit_estimator([a, b])
    assert est.meta["model"]["model"] == "tiny" and est.meta["model"]["blocks_total"] == 4
    assert len(est.meta["training"]["run_dirs"]) == 2
    with pytest.raises(EstimatorError, match=r"blocks must be between 1 and 4 \(the model.s blocks\); got 5"):
        est.predict_arrays(crops=1, top_k=1, blocks=5, prompt_tokens=8)


def test_block_subsets_keep_their_indices_and_the_count_is_the_feature(tmp_path):
    rows = example_requests(seed=0)
    subsets = {1: [0], 2: [0, 3], 4: [0, 1, 2, 3]}
    with_idx = rows.with_columns(pl.col("blocks").replace_strict(subsets, return_dtype=pl.List(pl.Int64))
                                 .alias("block_indices"))
    # the count may be missing where the indices say it
    a = _fake_run(tmp_path / "a", with_idx.with_columns(
        pl.when(pl.col("blocks") == 2).then(None).otherwise(pl.col("blocks")).alias("blocks")), blocks_total=None)
    got, _ = load_requests([a])
    assert got["blocks"].null_count() == 0
    assert all(len(i) == b for i, b in zip(got["block_indices"].to_list(), got["blocks"].to_list()))
    assert got.filter(pl.col("blocks") == 2)["block_indices"].to_list()[0] == [0, 3]
    without, _ = load_requests([_fake_run(tmp_path / "b", rows)])  # no column: tolerated, null
    assert without["block_indices"].null_count() == without.height
    e_idx, e_no = fit_estimator([a]), fit_estimator([tmp_path / "b"])
    cfg = {"crops": 2, "top_k": 2, "blocks": 3, "prompt_tokens": 8, "new_tokens": 9}
    assert e_idx.predict_arrays(**cfg)["request_p50_ms"][0] == pytest.approx(e_no.predict_arrays(**cfg)["request_p50_ms"][0])


def test_runs_of_different_models_or_devices_are_not_mixed(tmp_path):
    rows = example_requests(seed=0)
    a = _fake_run(tmp_path / "a", rows)
    b = _fake_run(tmp_path / "b", rows, gpu_name="NVIDIA H100")
    with pytest.raises(EstimatorError, match="different models or devices"):
        load_requests([a, b])
    with pytest.raises(EstimatorError, match="no requests.parquet"):
        load_requests([tmp_path])
    with pytest.raises(EstimatorError, match="does not exist"):
        load_requests([tmp_path / "nope"])
    with pytest.raises(EstimatorError, match="requests.parquet is a file, not a run directory"):
        load_requests([a / "requests.parquet"])
    (a / "phases.parquet").unlink()
    with pytest.raises(EstimatorError, match="no phases.parquet"):
        load_requests([a])
    c = _fake_run(tmp_path / "c", rows.with_columns(pl.lit(None, pl.Int64).alias("blocks")), blocks_total=None)
    with pytest.raises(EstimatorError, match="blocks is the model's default"):
        load_requests([c])


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    e = fit_estimator(example_requests(seed=4))
    e.save(tmp_path / "m", plots=write_estimator_plots)
    again = Estimator.load(tmp_path / "m")
    cfg = {"crops": np.arange(0, 9), "top_k": 2, "blocks": 3, "prompt_tokens": 17, "new_tokens": np.arange(1, 10) * 7}
    a, b = e.predict_arrays(**cfg), again.predict_arrays(**cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    d = OutputLengths([3, 9, 9, 40])
    a, b = e.predict_arrays(crops=1, top_k=1, blocks=1, prompt_tokens=8, new_tokens=d), \
        again.predict_arrays(crops=1, top_k=1, blocks=1, prompt_tokens=8, new_tokens=d)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert again.metrics == json.loads(json.dumps(e.metrics))
    assert again.evaluation.equals(e.evaluation) and again.steps_evaluation.equals(e.steps_evaluation)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["decode_by_position.png", "evaluation.parquet", "evaluation_steps.parquet", "model.json",
                     "parity.png", "weights.safetensors"]
    assert b"pickle" not in (tmp_path / "m" / "weights.safetensors").read_bytes()
    with pytest.raises(EstimatorError, match="model.json is a file, not a model directory"):
        Estimator.load(tmp_path / "m" / "model.json")


def test_parity_plot_uses_log_axes_when_values_span_decades(tmp_path):
    assert use_log_axes(np.array([1.0, 9.0])) is False and use_log_axes(np.array([1.0, 10.0])) is True
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    e = fit_estimator(example_requests(seed=0))  # prefill 1..20 ms: one decade and more
    seen = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.append([(ax.get_xscale(), ax.get_yscale()) for ax in fig.axes])
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        parity.write_parity_plot(e.evaluation, e.metrics, tmp_path / "p.png")
        narrow = e.evaluation.filter(pl.col("split") == "held_out_configs").with_columns(
            *[pl.lit(v).alias(c) for c, v in (("prefill_total_ms", 5.0), ("prefill_total_p50_ms", 5.5),
                                              ("prefill_total_p95_ms", 6.0), ("request_ms", 7.0),
                                              ("request_p50_ms", 7.5), ("request_p95_ms", 8.0))])
        parity.write_parity_plot(narrow, {}, tmp_path / "q.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert seen[0][0] == ("log", "log") and seen[1] == [("linear", "linear")] * 2


def test_no_import_circle_between_model_and_plots():
    here = Path(model.__file__).parent

    def imports(name):
        tree = ast.parse((here / name).read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return out

    plots = set()
    for node in ast.walk(ast.parse(Path(parity.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            plots.add(node.module)
    assert "molmo_latency.estimator.model" not in plots
    assert "molmo_latency.estimator.fit" not in imports("model.py")
    assert not {"torch", "molmo_latency.telemetry", "molmo_latency.models"} & set().union(
        *[imports(p.name) for p in here.glob("*.py")])


def test_fitting_saving_and_loading_never_import_torch(tmp_path):
    import subprocess
    import sys

    rows = example_requests(seed=0)
    run = _fake_run(tmp_path / "run", rows)
    code = ("import sys\nfrom molmo_latency.estimator import Estimator, fit_estimator\n"
            f"e = fit_estimator([{str(run)!r}])\ne.save({str(tmp_path / 'm')!r})\n"
            f"Estimator.load({str(tmp_path / 'm')!r})\n"
            "print('LOADED', [m for m in ('torch', 'transformers', 'molmo_latency.telemetry') if m in sys.modules])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "LOADED []" in res.stdout, res.stdout + res.stderr
