"""The estimator as an RL controller uses it (issue 23), on simulated sweeps with a known truth:
calibrated P50 and P95 per output on held-out configurations and held-out N, the quality gate,
one range check on every path, the quantiles of a distribution of N, the integrity of the
whole model directory, `plan` against a brute-force loop over the grid, and the controller's
two batched calls against loops over rows and N."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator import Estimator, OutputLengths, example_requests, fit_estimator
from tests.test_estimator_synthetic import _fake_run, _true_step_ms

# several output lengths, so that held-out N (the longest, >= 16) is fitted on two shorter ones
GRID = dict(crops=(1, 2, 4, 8), top_k=(1, 2, 4), blocks=(1, 2, 3, 4), prompt_tokens=(8, 64), new_tokens=(4, 8, 16, 32))
LIMITS = {"blocks_total": 16, "experts": 8}  # fitted on blocks 1..4 of 16, top-k 1..4 of 8 experts


@pytest.fixture(scope="module")
def est():
    rows = example_requests(seed=5, noise=0.05, repeats=4, **GRID)
    return fit_estimator(rows, test_fraction=0.3, calib_fraction=0.3, seed=5, model=LIMITS)


@pytest.fixture(scope="module")
def model_dir(est, tmp_path_factory):
    return est.save(tmp_path_factory.mktemp("controller") / "model")


def _cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "molmo_latency", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


# ------------------------------------------------------------------ calibrated P50 and P95
def test_p50_and_p95_coverage_hold_per_output_on_held_out_configurations_and_held_out_n(est):
    for split in ("held_out_configs", "held_out_new_tokens"):
        m = est.metrics[split]
        for name in ("prefill_total_ms", "decode_total_ms", "request_ms", "decode_step_ms"):
            r = m[name]["steps" if name == "decode_step_ms" else "requests"]
            assert r["n"] > 300, (split, name)
            assert 0.40 <= r["coverage_p50"] <= 0.60, (split, name, r["coverage_p50"])
            assert 0.90 <= r["coverage_p95"] <= 0.99, (split, name, r["coverage_p95"])
    # the coverage reported is the share of held-out requests at or below each quantile, recounted here
    ev = est.evaluation.filter(pl.col("split") == "held_out_new_tokens")
    assert set(ev["decode_steps"].unique().to_list()) == {15, 31}
    r = est.metrics["held_out_new_tokens"]["request_ms"]["requests"]
    assert r["coverage_p50"] == pytest.approx(float((ev["request_ms"] <= ev["request_p50_ms"]).mean()))
    assert r["coverage_p95"] == pytest.approx(float((ev["request_ms"] <= ev["request_p95_ms"]).mean()))
    q = est.meta["quality"]
    assert q["passed"] and q["problems"] == [] and q["baseline"]["feature_set"] == "knobs"


def test_fit_tables_and_json_report_p50_and_p95_coverage_and_the_gate(tmp_path):
    run = _fake_run(tmp_path / "run", example_requests(seed=5, noise=0.05, repeats=4, **GRID))
    r = _cli("fit", run, "--out", tmp_path / "m", "--json", "--test-fraction", "0.3", "--calib-fraction", "0.3",
             "--seed", "5")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for split in ("held_out_configs", "held_out_new_tokens"):
        for name in ("prefill_total_ms", "decode_total_ms", "request_ms"):
            assert {"coverage_p50", "coverage_p95"} <= set(res["metrics"][split][name]["requests"])
    assert res["quality"]["passed"] and res["written"]
    r = _cli("fit", run, "--out", tmp_path / "m2", "--test-fraction", "0.3", "--calib-fraction", "0.3", "--seed", "5")
    assert r.returncode == 0 and "P50 coverage" in r.stdout and "P95 coverage" in r.stdout
    assert "quality gate: passed" in r.stdout and "knobs baseline" in r.stdout


# skewed step times (a few slow steps, as on a busy CPU): the median of a sum of many steps is above the
# sum of their medians, so a P50 built from per-step medians and calibrated at short N falls below
# half of the long requests (held-out N P50 coverage near 20% before the fix). The data: the
# simulated costs of example.py without its noise, then, stated here, log-normal noise of sigma
# STEP_SIGMA on every step, SHARED_SIGMA on a request's steps together, PREFILL_SIGMA on prefill.
STEP_SIGMA, SHARED_SIGMA, PREFILL_SIGMA = 0.4, 0.05, 0.1
SKEW_GRID = dict(crops=(1, 2, 4, 8), top_k=(1, 2, 4), blocks=(1, 2, 4), prompt_tokens=(8, 64), new_tokens=(4, 16, 48))


def _skewed_requests(seed: int) -> pl.DataFrame:
    rows = example_requests(seed=seed, noise=0.0, repeats=4, **SKEW_GRID)
    rng = np.random.default_rng(seed + 100)
    n = rows.height
    shared = rng.lognormal(0.0, SHARED_SIGMA, n)
    steps = [list(np.asarray(s) * shared[i] * rng.lognormal(0.0, STEP_SIGMA, len(s)))
             for i, s in enumerate(rows["decode_step_ms"].to_list())]
    prefill = rows["prefill_total_ms"].to_numpy() * rng.lognormal(0.0, PREFILL_SIGMA, n)
    decode = np.array([sum(s) for s in steps])
    return rows.with_columns(pl.Series("decode_step_ms", steps, dtype=pl.List(pl.Float64)),
                             pl.Series("prefill_total_ms", prefill), pl.Series("decode_ms", decode),
                             pl.Series("total_ms", prefill + decode + rows["other_ms"].to_numpy()))


@pytest.fixture(scope="module")
def skewed():
    return fit_estimator(_skewed_requests(seed=11), test_fraction=0.3, calib_fraction=0.3, seed=11, model=LIMITS)


def test_p50_of_long_requests_is_their_median_when_step_times_are_skewed(skewed):
    hn = skewed.metrics["held_out_new_tokens"]
    assert hn["holdout"] == "output tokens >= 48" and hn["trained_on_output_tokens"] == [4, 16]
    for split in ("held_out_configs", "held_out_new_tokens"):
        for name in ("prefill_total_ms", "decode_total_ms", "request_ms", "decode_step_ms"):
            r = skewed.metrics[split][name]["steps" if name == "decode_step_ms" else "requests"]
            assert 0.40 <= r["coverage_p50"] <= 0.60, (split, name, r["coverage_p50"])
            assert 0.90 <= r["coverage_p95"] <= 0.99, (split, name, r["coverage_p95"])
    for name in ("decode_total_ms", "request_ms"):  # per N too: short and long requests alike
        for b in skewed.metrics["held_out_configs"][name]["by_output_tokens"]:
            assert b["n"] > 80 and 0.40 <= b["coverage_p50"] <= 0.60, (name, b)
    # against the stated model: the median of a 48-token request's decode total, by simulation here
    cfg = {"crops": 2, "top_k": 2, "blocks": 4, "prompt_tokens": 8}
    position = np.arange(47)
    medians = _true_step_ms(cfg["blocks"], cfg["top_k"], 1 + 16 * cfg["crops"] + cfg["prompt_tokens"], position)
    rng = np.random.default_rng(0)
    totals = (rng.lognormal(0.0, SHARED_SIGMA, (20000, 1)) * medians
              * rng.lognormal(0.0, STEP_SIGMA, (20000, position.size))).sum(axis=1)
    truth = float(np.median(totals))
    assert truth > 1.06 * medians.sum()  # the sum of the step medians is well below the total's median
    p50 = float(skewed.predict_arrays(**cfg, new_tokens=48)["decode_total_p50_ms"][0])
    assert p50 == pytest.approx(truth, rel=0.03)


# ------------------------------------------------------------------ the quality gate
def test_a_fit_on_noisy_or_too_small_data_is_flagged_and_written_only_with_force(tmp_path):
    rows = example_requests(seed=1, noise=0.5, repeats=2, crops=(1, 4), top_k=(1, 2), blocks=(1, 2, 4),
                            prompt_tokens=(8,), new_tokens=(4, 8))
    q = fit_estimator(rows, model=LIMITS).meta["quality"]
    assert not q["passed"] and q["problems"]
    text = " ".join(q["reasons"])
    assert "too few repeats" in text and "noisy data" in text and "too few configurations" in text
    run = _fake_run(tmp_path / "run", rows)
    r = _cli("fit", run, "--out", tmp_path / "m")
    assert r.returncode == 2 and "failed its quality gate" in r.stderr and "--force" in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # the fit's own summary lines come first
    assert "Traceback" not in r.stderr and last.startswith("molmo-latency: error: the estimator failed its quality gate")
    assert "quality gate: FAILED" in r.stdout and not (tmp_path / "m").exists()
    r = _cli("fit", run, "--out", tmp_path / "m", "--force")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "m" / "model.json").read_text())
    assert saved["quality"]["passed"] is False and saved["quality"]["reasons"] == q["reasons"]
    Estimator.load(tmp_path / "m")  # a forced model loads; its verdict goes with it


def test_an_estimator_no_better_than_the_knobs_baseline_is_flagged():
    from molmo_latency.estimator.fit import quality_gate

    req = {"n": 500, "coverage_p50": 0.5, "coverage_p95": 0.95, "mape_pct": 12.0, "r2": 0.8}
    rows = pl.DataFrame({"config_key": [f"c{i // 4}" for i in range(80)], "total_ms": [10.0 + (i % 4) * 0.1
                                                                                        for i in range(80)]})
    q = quality_gate(rows, {"held_out_configs": {"request_ms": {"requests": req}}}, {"request_ms": {"mape_pct": 11.0}},
                     {"train": 10, "calib": 5, "test": 5})
    assert not q["passed"] and q["problems"] == [
        "whole request: held-out MAPE 12.0% is no better than the knobs baseline's 11.0%"]
    assert q["reasons"] and "feature set may not describe" in q["reasons"][0]


# ------------------------------------------------------------------ one range check
MESSAGE = r"top_k must be between 1 and 8 \(the model's experts per MoE layer\); got 9"


def test_impossible_knob_values_are_refused_the_same_way_on_every_path(est, model_dir):
    cfg = dict(crops=1, top_k=9, blocks=2, prompt_tokens=8)
    calls = [lambda: est.predict_arrays(**cfg, new_tokens=8),
             lambda: est.predict(cfg),
             lambda: est.predict_grid(**cfg, new_tokens=[4, 8]),
             lambda: est.predict_arrays(**cfg, new_tokens=OutputLengths([4, 8])),
             lambda: est.check_budget_feasibility(50.0, **cfg),
             lambda: est.estimate_max_output_tokens(50.0, **cfg),
             lambda: est.plan_arrays(50.0, **cfg),
             lambda: est.plan(50.0, configs=cfg)]
    for call in calls:
        with pytest.raises(EstimatorError, match=MESSAGE + "$"):
            call()
    r = _cli("predict", model_dir, "--crops", 1, "--top-k", 9, "--blocks", 2, "--prompt-tokens", 8)
    assert r.returncode == 2 and r.stderr.strip() == "molmo-latency: error: " + MESSAGE.replace("\\", "")
    r = _cli("predict", model_dir, "--crops", 1, "--top-k", 2, "--blocks", 17, "--prompt-tokens", 8)
    assert r.returncode == 2 and "blocks must be between 1 and 16 (the model's blocks); got 17" in r.stderr
    for bad, match in (({"crops": 1.5}, "crops must be a whole number; got 1.5"),
                       ({"blocks": [2, 0]}, r"blocks must be between 1 and 16 .*; got 0 \(configuration 1 of 2\)"),
                       ({"prompt_tokens": np.inf}, "prompt_tokens must be >= 0; got inf")):
        with pytest.raises(EstimatorError, match=match):
            est.predict_arrays(**{**cfg, "top_k": 2, **bad})
        with pytest.raises(EstimatorError, match=match):
            est.plan(50.0, configs={**cfg, "top_k": 2, **bad})  # never cast to a whole number first


def test_values_outside_the_fitted_range_are_answered_with_a_per_row_flag(est):
    # fitted on blocks 1..4 of the model's 16, crops 1..8, N 4..32
    out = est.predict_arrays(crops=[2, 2, 16, 2], top_k=2, blocks=[4, 16, 4, 4], prompt_tokens=8,
                             new_tokens=[8, 8, 8, 64])
    assert out["in_range"].tolist() == [True, False, False, False]
    assert np.isfinite(out["request_p95_ms"]).all() and out["request_p95_ms"][1] > out["request_p95_ms"][0]
    frame = est.predict({"crops": [2, 16], "top_k": 2, "blocks": 4, "prompt_tokens": 8, "new_tokens": 8})
    assert frame["in_range"].to_list() == [True, False]
    g = est.predict_grid(crops=[2, 16], top_k=2, blocks=4, prompt_tokens=8, new_tokens=[4, 32, 33])
    assert g["in_range"].tolist() == [[True, True, False], [False, False, False]]
    assert est.predict_arrays(crops=2, top_k=2, blocks=4, prompt_tokens=8,
                              new_tokens=OutputLengths([4, 64]))["in_range"].tolist() == [False]


# ------------------------------------------------------------------ a distribution of N
def test_a_distribution_of_n_has_mixture_quantiles_and_no_per_step_figure(est):
    cfg = dict(crops=2, top_k=2, blocks=2, prompt_tokens=8)
    lengths = OutputLengths([4, 16, 16, 32])
    out = est.predict_arrays(**cfg, new_tokens=lengths)
    assert "decode_per_token_p50_ms" not in out and "decode_per_token_p95_ms" not in out
    # against the simulated truth: requests of this configuration with N drawn from the distribution
    truth = example_requests(seed=11, noise=0.05, repeats=400, crops=(2,), top_k=(2,), blocks=(2,),
                             prompt_tokens=(8,), new_tokens=(4, 16, 32))
    w = truth["new_tokens"].replace_strict({4: 0.25, 16: 0.5, 32: 0.25}, return_dtype=pl.Float64).to_numpy()
    w = w / w.sum()
    for col, measured in (("request", truth["total_ms"]), ("decode_total", truth["decode_ms"])):
        y = measured.to_numpy()
        share50 = float(w[y <= out[f"{col}_p50_ms"][0]].sum())
        share95 = float(w[y <= out[f"{col}_p95_ms"][0]].sum())
        assert 0.40 <= share50 <= 0.60 and 0.90 <= share95 <= 0.99, (col, share50, share95)


def test_cli_predict_with_a_distribution_shows_no_per_step_row(model_dir, tmp_path):
    (tmp_path / "lengths.txt").write_text("12\n40\n40\n200\n")
    args = ["predict", model_dir, "--crops", 2, "--top-k", 2, "--blocks", 2, "--prompt-tokens", 8]
    r = _cli(*args, "--new-tokens-from", tmp_path / "lengths.txt")
    assert r.returncode == 0 and "whole request" in r.stdout and "per step" not in r.stdout
    p = json.loads(_cli(*args, "--new-tokens", "12,40,40,200", "--json").stdout)
    assert "decode_per_token_p50_ms" not in p and p["in_range"] is False  # 200 is beyond the fitted N
    one = json.loads(_cli(*args, "--new-tokens", "16", "--json").stdout)
    assert one["decode_per_token_p50_ms"] == pytest.approx(one["decode_total_p50_ms"] / 15) and one["in_range"] is True


# ------------------------------------------------------------------ integrity of the model directory
@pytest.mark.parametrize("edit", [
    lambda m: m["calibration"]["request_ms"].update(p95_factor=m["calibration"]["request_ms"]["p95_factor"] * 2),
    lambda m: m["noise"].update(step_ratio_var=0.5),
    lambda m: m["model"].update(blocks_total=64),
    lambda m: m.update(coverage=0.5),
    lambda m: m["knob_ranges"]["blocks"].__setitem__(1, 16.0),
])
def test_every_edit_of_model_json_is_refused_with_one_error(model_dir, tmp_path, edit):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    meta = json.loads((d / "model.json").read_text())
    edit(meta)
    (d / "model.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(EstimatorError, match="fails its integrity check: the content of model.json does not match"):
        Estimator.load(d)
    r = _cli("predict", d, "--crops", 1, "--top-k", 2, "--blocks", 2, "--prompt-tokens", 8)
    assert r.returncode == 2 and "fails its integrity check" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["weights.safetensors", "evaluation.parquet", "evaluation_steps.parquet"])
def test_every_file_of_the_model_directory_is_checksummed(model_dir, tmp_path, name):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    blob = bytearray((d / name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (d / name).write_bytes(bytes(blob))
    with pytest.raises(EstimatorError, match=f"fails its integrity check: {name} has SHA-256"):
        Estimator.load(d)
    (d / name).unlink()
    with pytest.raises(EstimatorError, match=f"{name} is missing"):
        Estimator.load(d)


# ------------------------------------------------------------------ plan
def _grid_loop(est, values, budget, quantile, scores=None):
    """Brute force: every combination, one prediction call per configuration."""
    fits = []
    for c, k, b, p in itertools.product(*(values[n] for n in ("crops", "top_k", "blocks", "prompt_tokens"))):
        one = est.predict_arrays(crops=c, top_k=k, blocks=b, prompt_tokens=p, new_tokens=8)
        lat = float(one["request_p95_ms" if quantile == 0.95 else "request_p50_ms"][0])
        if lat <= budget:
            fits.append(((c, k, b, p), lat, None if scores is None else scores[c]))
    return fits


@pytest.mark.parametrize("quantile", [0.5, 0.95])
def test_plan_returns_the_set_a_brute_force_loop_over_the_grid_finds(est, quantile):
    values = {k: sorted(set(v)) for k, v in GRID.items()}
    lat = [f[1] for f in _grid_loop(est, values, 1e9, quantile)]
    budgets = [float(np.quantile(lat, 0.1)), float(np.median(lat)), 1e9]
    p = est.plan(budgets, quantile=quantile, new_tokens=8)
    for budget in budgets:
        want = {f[0] for f in _grid_loop(est, values, budget, quantile)}
        got = p.filter(pl.col("budget_ms") == budget).select("crops", "top_k", "blocks", "prompt_tokens").rows()
        assert set(got) == want and len(got) == len(want)
    assert p.filter(pl.col("budget_ms") == 1e9).height == 4 * 3 * 4 * 2


def test_plan_with_accuracy_gives_the_pareto_frontier_and_the_best_per_budget(est, tmp_path):
    scores = {1: 0.40, 2: 0.55, 4: 0.70, 8: 0.72}  # accuracy by crops
    (tmp_path / "acc.csv").write_text("crops,score\n" + "".join(f"{c},{s}\n" for c, s in scores.items()))
    values = {k: sorted(set(v)) for k, v in GRID.items()}
    every = _grid_loop(est, values, 1e9, 0.95, scores)
    budgets = [float(np.quantile([f[1] for f in every], q)) for q in (0.02, 0.3, 0.7)] + [1.0]
    p = est.plan(budgets, accuracy=tmp_path / "acc.csv", new_tokens=8)
    # the frontier by an O(n^2) loop: nobody at most as slow with a score at least as high (one strictly better)
    frontier = {cfg for cfg, lat, s in every
                if not any(l2 <= lat and s2 >= s and (l2 < lat or s2 > s) for c2, l2, s2 in every if c2 != cfg)}
    for budget in budgets:
        part = p.filter(pl.col("budget_ms") == budget)
        fits = [f for f in every if f[1] <= budget]
        assert set(part.select("crops", "top_k", "blocks", "prompt_tokens").rows()) == {f[0] for f in fits}
        on = set(part.filter(pl.col("pareto")).select("crops", "top_k", "blocks", "prompt_tokens").rows())
        assert on == {f[0] for f in fits if f[0] in frontier}
        best = part.filter(pl.col("best"))
        if not fits:
            assert best.height == 0
            continue
        top = max(s for _, _, s in fits)
        want = min((f for f in fits if f[2] == top), key=lambda f: f[1])[0]
        assert best.height == 1 and best.select("crops", "top_k", "blocks", "prompt_tokens").row(0) == want


def test_cli_plan_lists_what_fits_and_the_best(est, model_dir, tmp_path):
    pl.DataFrame({"crops": [1, 2, 4, 8], "score": [0.4, 0.55, 0.7, 0.72]}).write_parquet(tmp_path / "acc.parquet")
    want = est.plan(30.0, accuracy=tmp_path / "acc.parquet")
    r = _cli("plan", model_dir, "--budget-ms", 30, "--accuracy", tmp_path / "acc.parquet", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["fitting"] == want.height and res["configurations"] == 4 * 3 * 4 * 2
    assert [(f["crops"], f["top_k"], f["blocks"], f["prompt_tokens"]) for f in res["fit"]] == want.select(
        "crops", "top_k", "blocks", "prompt_tokens").rows()
    assert res["best"] == want.filter(pl.col("best")).drop("budget_ms").to_dicts()[0]
    r = _cli("plan", model_dir, "--budget-ms", 30)
    assert r.returncode == 0 and "configurations fit 30 ms at P95" in r.stdout
    # a budget sweep: the best configuration per budget
    sweep = est.plan([12.0, 30.0, 0.5], accuracy=tmp_path / "acc.parquet")
    r = _cli("plan", model_dir, "--budget-ms", "12,30,0.5", "--accuracy", tmp_path / "acc.parquet", "--json")
    assert r.returncode == 0, r.stderr
    per = {b["budget_ms"]: b for b in json.loads(r.stdout)["budgets"]}
    for budget in (12.0, 30.0):
        best = sweep.filter((pl.col("budget_ms") == budget) & pl.col("best")).row(0, named=True)
        assert per[budget]["fitting"] == sweep.filter(pl.col("budget_ms") == budget).height
        assert {k: per[budget][k] for k in ("crops", "top_k", "blocks", "prompt_tokens", "score")} == {
            k: best[k] for k in ("crops", "top_k", "blocks", "prompt_tokens", "score")}
    assert per[0.5] == {"budget_ms": 0.5, "fitting": 0}
    (tmp_path / "bad.csv").write_text("crops,accuracy\n1,0.5\n")
    for args, message in ((["--accuracy", tmp_path / "bad.csv"], "needs a 'score' column"),
                          (["--quantile", "1.5"], "quantile must be a number between 0 and 1"),
                          (["--budget-ms", "0"], "budget_ms must be finite numbers > 0"),
                          (["--budget-ms", "fast"], "--budget-ms must be a number of ms")):
        base = ["plan", model_dir, "--budget-ms", 30]
        r = _cli(*(base if args[0] != "--budget-ms" else base[:2]), *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------ the controller's two calls
def test_check_budget_feasibility_row_by_row_against_single_predictions(est):
    import torch

    rng = np.random.default_rng(3)
    n = 50
    cfg = {"crops": rng.integers(0, 9, n), "top_k": rng.integers(1, 5, n), "blocks": rng.integers(1, 5, n),
           "prompt_tokens": rng.integers(8, 65, n)}
    tokens, budget = rng.integers(2, 40, n), rng.uniform(5, 60, n)
    got = est.check_budget_feasibility(budget, **cfg, new_tokens=tokens)
    for i in range(n):
        one = est.predict_arrays(**{k: v[i] for k, v in cfg.items()}, new_tokens=tokens[i])
        assert got["latency_ms"][i] == pytest.approx(one["request_p95_ms"][0], rel=1e-12)
        assert got["feasible"][i] == (one["request_p95_ms"][0] <= budget[i])
        assert got["in_range"][i] == one["in_range"][0]
    assert 0 < got["feasible"].sum() < n  # the budgets were drawn to split the rows
    np.testing.assert_allclose(got["slack_ms"], budget - got["latency_ms"])
    # torch tensors, as passed inside a training loop; numpy out
    t = est.check_budget_feasibility(torch.tensor(budget), **{k: torch.tensor(v) for k, v in cfg.items()},
                                     new_tokens=torch.tensor(tokens))
    assert all(isinstance(v, np.ndarray) for v in t.values())
    np.testing.assert_array_equal(t["feasible"], got["feasible"])
    med = est.check_budget_feasibility(budget, **cfg, new_tokens=tokens, quantile=0.5)
    assert (med["latency_ms"] < got["latency_ms"]).all() and (med["feasible"] >= got["feasible"]).all()
    dist = est.check_budget_feasibility(30.0, crops=[1, 8], top_k=2, blocks=2, prompt_tokens=8,
                                        new_tokens=OutputLengths([4, 16]))
    whole = est.predict_arrays(crops=[1, 8], top_k=2, blocks=2, prompt_tokens=8, new_tokens=OutputLengths([4, 16]))
    np.testing.assert_allclose(dist["latency_ms"], whole["request_p95_ms"])


def test_estimate_max_output_tokens_is_the_largest_n_a_loop_over_n_finds(est):
    import torch

    crops, top_k, blocks = np.array([1, 8, 2, 4, 1]), np.array([1, 4, 2, 2, 1]), np.array([1, 4, 2, 3, 1])
    budget = np.array([20.0, 40.0, 8.0, 60.0, 0.5])
    for q, col in ((0.95, "request_p95_ms"), (0.5, "request_p50_ms")):
        got = est.estimate_max_output_tokens(torch.tensor(budget), crops=torch.tensor(crops), top_k=top_k,
                                             blocks=blocks, prompt_tokens=8, quantile=q, max_new_tokens=300)
        for i in range(budget.size):
            lat = est.predict_grid(crops=crops[i], top_k=top_k[i], blocks=blocks[i], prompt_tokens=8,
                                   new_tokens=np.arange(1, 301))[col][0]
            ok = np.nonzero(lat <= budget[i])[0]
            want = int(ok.max()) + 1 if ok.size else 0
            assert got["max_new_tokens"][i] == want, (q, i)
            assert (ok.size == 0) or np.array_equal(ok, np.arange(want))  # the quantile rises with N
            if want:
                assert got["latency_ms"][i] == pytest.approx(lat[want - 1], rel=1e-12)
                assert got["in_range"][i] == bool(4 <= want <= 32 and blocks[i] <= 4)
        assert got["max_new_tokens"][-1] == 0 and np.isnan(got["latency_ms"][-1])
    capped = est.estimate_max_output_tokens(1e9, crops=1, top_k=1, blocks=1, prompt_tokens=8, max_new_tokens=50)
    assert capped["max_new_tokens"].tolist() == [50] and capped["capped"].tolist() == [True]


def test_plan_help_shows_its_flags_and_ends_with_examples():
    r = _cli("plan", "--help")
    assert r.returncode == 0 and "<bool>" not in r.stdout
    for flag in ("--budget-ms", "--quantile", "--accuracy", "--json"):
        assert flag in r.stdout
    assert "molmo-latency plan MODEL_DIR --budget-ms" in r.stdout[r.stdout.index("Examples:"):]
    top = _cli("--help")
    assert " plan " in top.stdout
