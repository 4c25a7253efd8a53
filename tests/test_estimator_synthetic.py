"""The estimator on simulated sweeps with a known cost (fast, deterministic): it recovers the
costs, calibrates P95, extrapolates where plain knobs do not, and splits whole configurations."""

import doctest
import json

import numpy as np
import polars as pl
import pytest

import molmo_latency.estimator as estimator_pkg
from molmo_latency.errors import EstimatorError
from molmo_latency.estimator import Estimator, example_requests, fit_estimator, load_requests
from molmo_latency.estimator import example, features, fit, model, parity
from molmo_latency.estimator.example import DECODE_COST_MS, PREFILL_COST_MS
from molmo_latency.estimator.fit import conformal_factors, split_configs


@pytest.mark.parametrize("module", [estimator_pkg, features, fit, model, parity, example])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_costs_are_recovered_from_noisy_requests():
    est = fit_estimator(example_requests(seed=3, noise=0.02, repeats=6))
    for target, truth in (("prefill_total_ms", PREFILL_COST_MS), ("decode_per_token_ms", DECODE_COST_MS)):
        coef = est.meta["selection"][target]["coefficients"]
        # the costs that carry most of the time come back within 15%
        for name in ("const", "blocks", "blocks_x_top_k"):
            assert coef[name] == pytest.approx(truth[name], rel=0.15), (target, name, coef[name])
        m = est.metrics[target]
        assert m["config_medians"]["r2"] > 0.99 and m["requests"]["mape_pct"] < 3


def test_p95_is_exceeded_about_5_percent_of_the_time_on_held_out_configurations():
    rows = example_requests(seed=5, noise=0.05, repeats=8, crops=(1, 2, 3, 4, 6, 8), top_k=(1, 2, 4, 8),
                            blocks=(1, 2, 3, 4), prompt_tokens=(8, 32, 64))
    est = fit_estimator(rows, test_fraction=0.3, calib_fraction=0.3, seed=5)
    for target in ("prefill_total_ms", "decode_per_token_ms"):
        m = est.metrics[target]["requests"]
        assert m["n"] > 600
        assert 0.92 <= m["p95_coverage"] <= 0.98, (target, m["p95_coverage"])
        assert 0.40 <= m["p50_below_share"] <= 0.60, (target, m["p50_below_share"])
    cal = est.meta["calibration"]["decode_per_token_ms"]
    assert cal["finite_sample_guarantee"] and cal["p95_factor"] > cal["p50_factor"]
    # held-out predictions are for test configurations only
    assert set(est.evaluation["config_key"]) == set(est.meta["split"]["test_configs"])


def test_physical_features_extrapolate_to_unseen_token_counts_and_plain_knobs_do_not():
    rows = example_requests(seed=2, crops=(1, 2, 4, 8, 16), prompt_tokens=(8, 32, 128))
    unseen = (pl.col("crops") == 16) | (pl.col("prompt_tokens") == 128)
    phys = fit_estimator(rows, holdout=unseen)
    base = fit_estimator(rows, holdout=unseen, feature_set="knobs")
    assert phys.meta["split"]["holdout"] is not None
    test_keys = set(phys.meta["split"]["test_configs"])
    assert all(("-c16-" in f"-{k}" or "-p128-" in k) for k in test_keys)
    assert phys.knob_ranges["crops"][1] < 16 and phys.knob_ranges["prompt_tokens"][1] < 128
    for target in ("prefill_total_ms", "decode_per_token_ms"):
        p, b = phys.metrics[target]["requests"], base.metrics[target]["requests"]
        assert p["r2"] > 0.97 and p["mape_pct"] < 5, (target, p)
        assert p["mape_pct"] < b["mape_pct"] / 2, (target, p["mape_pct"], b["mape_pct"])


def test_configurations_are_never_split_across_train_calibration_and_test():
    rows = example_requests(seed=0)
    est = fit_estimator(rows, seed=11)
    sp = est.meta["split"]
    test, calib = set(sp["test_configs"]), set(sp["calib_configs"])
    assert not test & calib
    assert sp["configs"]["train"] + len(test) + len(calib) == rows.filter("valid")["config_id"].n_unique()
    assert sum(sp["rows"].values()) == rows.filter("valid").height
    roles = split_configs([f"k{i}" for i in range(40)], test_fraction=0.25, calib_fraction=0.25, seed=1)
    assert sorted(roles) == sorted(f"k{i}" for i in range(40))
    assert list(roles.values()).count("test") == 10 and list(roles.values()).count("calib") == 10
    assert roles == split_configs([f"k{i}" for i in reversed(range(40))], test_fraction=0.25,
                                  calib_fraction=0.25, seed=1)  # same seed, same split


def test_invalid_requests_are_excluded_and_counted():
    rows = example_requests(seed=0)
    est = fit_estimator(rows)
    tr = est.meta["training"]
    assert tr["invalid_rows_excluded"] == 3 and tr["rows"] == rows.height - 3


def test_conformal_factor_is_the_finite_sample_quantile():
    ratios = np.arange(1, 21) / 10  # 0.1 .. 2.0, n = 20: ceil(21 * 0.95) = 20th smallest
    assert conformal_factors(ratios, 0.95) == (1.05, 2.0, True)
    f50, f95, ok = conformal_factors(np.array([1.0, 1.1, 1.2]), 0.95)  # too few: the largest, no guarantee
    assert f95 == 1.2 and not ok


def test_predict_arrays_matches_predict_and_is_vectorised():
    est = fit_estimator(example_requests(seed=0))
    rng = np.random.default_rng(0)
    cfg = {"crops": rng.integers(0, 13, 1000), "top_k": rng.integers(1, 9, 1000), "blocks": rng.integers(1, 5, 1000),
           "prompt_tokens": rng.integers(0, 100, 1000)}
    arrays = est.predict_arrays(**cfg)
    frame = est.predict(pl.DataFrame(cfg))
    for name, values in arrays.items():
        assert values.shape == (1000,) and np.all(values > 0)
        np.testing.assert_array_equal(frame[name].to_numpy(), values)
    # one configuration predicted alone equals its row in the batch
    one = est.predict_arrays(**{k: v[7] for k, v in cfg.items()})
    assert all(one[k][0] == pytest.approx(arrays[k][7], rel=1e-12) for k in arrays)
    # more blocks cost more (non-negative costs)
    lo = est.predict_arrays(crops=4, top_k=2, blocks=1, prompt_tokens=32)
    hi = est.predict_arrays(crops=4, top_k=2, blocks=4, prompt_tokens=32)
    assert all(hi[k][0] > lo[k][0] for k in lo)
    assert frame["in_training_range"].to_list() == [
        bool(0 <= c <= 8 and k <= 4 and b <= 4 and 8 <= p <= 32) for c, k, b, p in
        zip(cfg["crops"], cfg["top_k"], cfg["blocks"], cfg["prompt_tokens"])]


def test_batched_prediction_of_1000_configurations_takes_under_1_ms():
    import time

    est = fit_estimator(example_requests(seed=0))
    rng = np.random.default_rng(1)
    cfg = {"crops": rng.integers(0, 13, 1000), "top_k": rng.integers(1, 9, 1000), "blocks": rng.integers(1, 5, 1000),
           "prompt_tokens": rng.integers(0, 100, 1000)}
    est.predict_arrays(**cfg)
    times = []
    for _ in range(300):
        t0 = time.perf_counter_ns()
        est.predict_arrays(**cfg)
        times.append(time.perf_counter_ns() - t0)
    assert np.median(times) < 1_000_000, f"median {np.median(times) / 1e3:.0f} us"


@pytest.mark.parametrize("bad, match", [
    ({"crops": -1}, "crops must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"blocks": float("nan")}, "blocks must be >= 1"),
    ({"prompt_tokens": [1, 2, 3]}, "different lengths"),
])
def test_bad_configurations_get_a_clear_error(bad, match):
    est = fit_estimator(example_requests(seed=0))
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
    few = rows.filter(pl.col("config_id").is_in(rows["config_id"].unique().sort()[:3].to_list()))
    with pytest.raises(EstimatorError, match="cannot be split"):
        fit_estimator(few)
    with pytest.raises(EstimatorError, match="test_fraction"):
        fit_estimator(rows, test_fraction=1.5)
    with pytest.raises(EstimatorError, match="no valid request"):
        fit_estimator(rows.with_columns(pl.lit(False).alias("valid")))
    with pytest.raises(EstimatorError, match="lacks"):
        fit_estimator(rows.drop("top_k"))


def _fake_run(path, rows, *, model="tiny", gpu_name=None, top_k_default=2, blocks_total=4):
    path.mkdir(parents=True)
    rows.write_parquet(path / "requests.parquet")
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
    assert [r["rows"] for r in info["run_dirs"]] == [rows.filter(pl.col("top_k") != 2).height,
                                                     rows.filter(pl.col("top_k") == 2).height]
    est = fit_estimator([a, b])
    assert est.meta["model"]["model"] == "tiny" and est.meta["model"]["blocks_total"] == 4
    assert len(est.meta["training"]["run_dirs"]) == 2
    with pytest.raises(EstimatorError, match="blocks must be <= 4"):
        est.predict_arrays(crops=1, top_k=1, blocks=5, prompt_tokens=8)


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
    c = _fake_run(tmp_path / "c", rows.with_columns(pl.lit(None, pl.Int64).alias("blocks")), blocks_total=None)
    with pytest.raises(EstimatorError, match="blocks is the model's default"):
        load_requests([c])


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    est = fit_estimator(example_requests(seed=4))
    est.save(tmp_path / "m")
    again = Estimator.load(tmp_path / "m")
    cfg = {"crops": np.arange(0, 9), "top_k": 2, "blocks": 3, "prompt_tokens": 17}
    a, b = est.predict_arrays(**cfg), again.predict_arrays(**cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert again.metrics == json.loads(json.dumps(est.metrics))
    assert again.evaluation.equals(est.evaluation)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["evaluation.parquet", "model.json", "parity.png", "weights.safetensors"]
    assert b"pickle" not in (tmp_path / "m" / "weights.safetensors").read_bytes()
