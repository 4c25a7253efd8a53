"""Fitting and honest evaluation of the latency estimator (transform: requests -> Estimator).

Three linear models are fitted: ``prefill_total_ms`` per request, ``decode_step_ms`` per decode
step and position (every step of every valid request, from phases.parquet), and ``other_ms``
(the measured gaps). A whole request of N output tokens is prefill + the N - 1 decode steps +
the gaps.

Configurations are split three ways by their *setting* (crops, top-k, blocks, prompt tokens,
batch size; all N of one setting go together, so a held-out configuration was never seen at any
N, and repeats never sit on both sides): *train* settings fit the linear costs, *calibration*
settings set the P50/P95 factors (split conformal on the relative residuals y / mu, separately
for prefill, one decode step, the decode total and the whole request), and *test* settings,
used for nothing else, give the reported metrics. A second fit holds out the longest outputs
(every request whose N is at or above a threshold, of every setting) and is evaluated on them:
the error when predicting an N the model has not seen.

The linear costs are fitted to the median of each training configuration (per position for
decode steps: a P50 target that a few slow repeats cannot drag), with relative weights (latency
noise scales with latency). Candidates (for cost features: non-negative least squares on relative
and absolute errors, and least absolute relative deviations with costs >= 0; otherwise relative
ridge at several strengths and unconstrained least absolute relative deviations) are chosen by
grouped K-fold cross-validation over the training configurations.

Example:
    >>> from molmo_latency.estimator import example_requests, fit_estimator
    >>> est = fit_estimator(example_requests(seed=0))
    >>> m = est.metrics["held_out_configs"]["request_ms"]["requests"]
    >>> sorted(m)[:4], m["r2"] > 0.9
    (['coverage_p50', 'coverage_p95', 'mae_ms', 'mape_pct'], True)
    >>> [b["positions"] for b in est.metrics["held_out_configs"]["decode_step_ms"]["by_position"]]
    ['0', '1-3', '4-15']
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
from scipy import sparse
from scipy.optimize import linprog, nnls

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator.data import MEASURES, load_requests, with_keys
from molmo_latency.estimator.features import (KNOBS, OUTPUTS, SETTING, TARGETS, TOKENS, FeatureSet, TokenMap,
                                              config_arrays, feature_set, output_names)
from molmo_latency.estimator.model import FLOOR_MS, FORMAT_VERSION, MIXED, Estimator

Regressor = Callable[[np.ndarray, np.ndarray], np.ndarray]
MIN_TRAIN_CONFIGS = 2
# decode positions are reported in these buckets (first step, early steps, then by powers of 4)
POSITION_EDGES = (0, 1, 4, 16, 64, 256)


# ---------------------------------------------------------------------------- regressors
def _scaled(x: np.ndarray, y: np.ndarray, relative: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = 1.0 / y if relative else np.ones_like(y)
    xw, yw = x * w[:, None], y * w
    scale = np.linalg.norm(xw, axis=0)
    scale[scale == 0] = 1.0
    return xw / scale, yw, scale


def nnls_fit(relative: bool) -> Regressor:
    """Non-negative least squares (every coefficient is a cost), on relative or absolute errors.

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
        >>> nnls_fit(relative=True)(x, x @ np.array([0.5, 2.0])).round(6).tolist()
        [0.5, 2.0]
    """
    def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        z, yw, scale = _scaled(x, y, relative)
        coef, _ = nnls(z, yw, maxiter=50 * z.shape[1])
        return coef / scale
    return fit


def ridge_fit(alpha: float) -> Regressor:
    """Ridge on relative errors with unit-norm columns (unconstrained signs).

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
        >>> ridge_fit(1e-9)(x, x @ np.array([-0.5, 2.0])).round(4).tolist()
        [-0.5, 2.0]
    """
    def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        z, yw, scale = _scaled(x, y, relative=True)
        gram = z.T @ z + alpha * np.eye(z.shape[1])
        return np.linalg.solve(gram, z.T @ yw) / scale
    return fit


def lad_fit(nonnegative: bool) -> Regressor:
    """Least absolute relative deviations (a median regression: a few slow outliers pull it little),
    as a linear program; coefficients >= 0 when `nonnegative`.

    Example:
        >>> import numpy as np
        >>> x = np.column_stack([np.ones(5), np.arange(1.0, 6.0)])
        >>> y = x @ np.array([1.0, 1.0])
        >>> y[4] *= 5  # one request 5x slower
        >>> lad_fit(nonnegative=True)(x, y).round(6).tolist()
        [1.0, 1.0]
    """
    def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        z, yw, scale = _scaled(x, y, relative=True)
        n, f = z.shape
        # variables: coef (f), u+ (n), u- (n); z coef + u+ - u- = yw; minimise sum(u+ + u-)
        cost = np.concatenate([np.zeros(f), np.ones(2 * n)])
        eye = sparse.identity(n, format="csr")
        a_eq = sparse.hstack([sparse.csr_matrix(z), eye, -eye], format="csr")
        bounds = [(0, None) if nonnegative else (None, None)] * f + [(0, None)] * (2 * n)
        res = linprog(cost, A_eq=a_eq, b_eq=yw, bounds=bounds, method="highs")
        if res.status != 0:  # infeasible cannot happen (u free to absorb); numerical trouble: fall back
            return nnls_fit(relative=True)(x, y) if nonnegative else ridge_fit(1e-6)(x, y)
        return res.x[:f] / scale
    return fit


def candidates(fs: FeatureSet) -> dict[str, Regressor]:
    """The regressors tried for a feature set. Where the columns are costs, only non-negative fits:
    every prediction then grows with every cost term, as latency does.

    Example:
        >>> from molmo_latency.estimator.features import FEATURE_SETS
        >>> sorted(candidates(FEATURE_SETS["physical"]))
        ['lad_relative', 'nnls_absolute', 'nnls_relative']
    """
    if fs.nonnegative:
        return {"nnls_relative": nnls_fit(relative=True), "nnls_absolute": nnls_fit(relative=False),
                "lad_relative": lad_fit(nonnegative=True)}
    out: dict[str, Regressor] = {"lad_relative": lad_fit(nonnegative=False)}
    for alpha in (1e-6, 1e-3, 1e-1):
        out[f"ridge_relative_{alpha:g}"] = ridge_fit(alpha)
    return out


# ---------------------------------------------------------------------------- metrics
def regression_metrics(y: np.ndarray, p50: np.ndarray, p95: np.ndarray | None = None) -> dict[str, float]:
    """MAE, RMSE, MAPE, R^2, share within +-10% of P50 against measured `y`, the share of
    measurements at or below the P50 (``coverage_p50``, 0.5 when the P50 is a median) and, with
    `p95`, at or below it (``coverage_p95``).

    Example:
        >>> import numpy as np
        >>> m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
        >>> m["mae_ms"], m["within_10pct_share"], m["r2"]
        (0.25, 0.75, 0.8)
    """
    y, p50 = np.asarray(y, float), np.asarray(p50, float)
    if y.size == 0:
        return {"n": 0}
    err = p50 - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    out = {
        "n": int(y.size),
        "mae_ms": float(np.mean(np.abs(err))),
        "rmse_ms": float(np.sqrt(np.mean(err ** 2))),
        "mape_pct": float(100 * np.mean(np.abs(err) / y)),
        "r2": float(1 - np.sum(err ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
        "within_10pct_share": float(np.mean(np.abs(err) <= 0.1 * y)),
        "coverage_p50": float(np.mean(y <= p50)),
    }
    if p95 is not None:
        out["coverage_p95"] = float(np.mean(y <= np.asarray(p95, float)))
    return out


def conformal_factors(ratio: np.ndarray, coverage: float) -> tuple[float, float, bool]:
    """Split-conformal multipliers from calibration ratios y / mu: the median, and the
    ceil((n + 1) * coverage)-th smallest ratio (the largest when n is too small; then the
    finite-sample guarantee does not hold: third value False).

    Example:
        >>> import numpy as np
        >>> conformal_factors(np.linspace(0.9, 1.3, 41), 0.95)
        (1.1, 1.29, True)
    """
    r = np.sort(np.asarray(ratio, float))
    n = r.size
    k = math.ceil((n + 1) * coverage)
    guaranteed = k <= n
    p95 = float(r[min(k, n) - 1])
    p50 = float(np.median(r))
    return round(p50, 12), round(max(p95, p50), 12), guaranteed


# ---------------------------------------------------------------------------- splits
def split_configs(keys: Sequence[str], *, test_fraction: float, calib_fraction: float, seed: int,
                  test_keys: set[str] | None = None) -> dict[str, str]:
    """Assign each key (a setting) to "train", "calib" or "test" (whole settings, seeded).

    Example:
        >>> roles = split_configs([f"c{i}" for i in range(8)], test_fraction=0.25, calib_fraction=0.25, seed=0)
        >>> sorted(roles.values()).count("test"), sorted(roles.values()).count("calib")
        (2, 2)
    """
    for name, v in (("test_fraction", test_fraction), ("calib_fraction", calib_fraction)):
        if not 0 < v < 1:
            raise EstimatorError(f"{name} must be between 0 and 1, got {v}")
    if test_keys is None and test_fraction + calib_fraction >= 1:
        raise EstimatorError(f"test_fraction + calib_fraction must leave configurations to fit on, got "
                             f"{test_fraction} + {calib_fraction}")
    keys = sorted(set(keys))
    rng = np.random.default_rng(seed)
    if test_keys is not None:
        test = [k for k in keys if k in test_keys]
        rest = [k for k in keys if k not in test_keys]
        rest = [rest[i] for i in rng.permutation(len(rest))]
        n_calib = max(1, round(len(rest) * calib_fraction))
        roles = {k: "test" for k in test}
        roles.update({k: "calib" for k in rest[:n_calib]})
        roles.update({k: "train" for k in rest[n_calib:]})
    else:
        order = [keys[i] for i in rng.permutation(len(keys))]
        n_test = max(1, round(len(keys) * test_fraction))
        n_calib = max(1, round(len(keys) * calib_fraction))
        roles = {k: "test" for k in order[:n_test]}
        roles.update({k: "calib" for k in order[n_test:n_test + n_calib]})
        roles.update({k: "train" for k in order[n_test + n_calib:]})
    counts = {r: sum(1 for v in roles.values() if v == r) for r in ("train", "calib", "test")}
    if counts["train"] < MIN_TRAIN_CONFIGS or counts["calib"] < 1 or counts["test"] < 1:
        raise EstimatorError(f"{len(keys)} configurations (settings of crops, top-k, blocks, prompt tokens) cannot be "
                             f"split into train/calibration/test ({counts}); at least {MIN_TRAIN_CONFIGS + 2} distinct "
                             "settings are needed (with a holdout, some must stay outside it): run a larger sweep")
    return roles


# ---------------------------------------------------------------------------- data shapes
def _arrays(frame: pl.DataFrame, *extra: str) -> dict[str, np.ndarray]:
    return config_arrays(**{c: frame[c].to_numpy() for c in (*KNOBS, *TOKENS, *extra)})


def _request_medians(frame: pl.DataFrame, target: str, by_steps: bool = False) -> pl.DataFrame:
    """Median of `target` per configuration (and per decode-step count, where free generation
    gives one configuration several output lengths)."""
    keys = ["config_key", "decode_steps"] if by_steps else ["config_key"]
    return (frame.group_by(keys, maintain_order=True)
            .agg(*[pl.col(c).first() for c in (*KNOBS, *TOKENS, "decode_steps") if c not in keys],
                 pl.col(target).median(), pl.len().alias("n"))
            .sort(keys))


def explode_steps(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per decode step: the request's columns, ``step`` and ``decode_step_ms``.

    Example:
        >>> from molmo_latency.estimator import example_requests
        >>> r = example_requests(seed=0).head(2)
        >>> explode_steps(r).height == int(r["decode_steps"].sum())
        True
    """
    cols = [c for c in rows.columns if c != "decode_step_ms"]
    return (rows.with_row_index("request_index").select("request_index", *cols, "decode_step_ms")
            .filter(pl.col("decode_step_ms").list.len() > 0)
            .with_columns(pl.int_ranges(0, pl.col("decode_step_ms").list.len()).alias("step"))
            .explode("decode_step_ms", "step")
            .with_columns(pl.col("step").cast(pl.Int64), pl.col("decode_step_ms").cast(pl.Float64))
            .filter(pl.col("decode_step_ms").is_finite() & (pl.col("decode_step_ms") > 0)))


def _step_medians(steps: pl.DataFrame) -> pl.DataFrame:
    return (steps.group_by("config_key", "step", maintain_order=True)
            .agg(*[pl.col(c).first() for c in (*KNOBS, *TOKENS)], pl.col("decode_step_ms").median(), pl.len().alias("n"))
            .sort("config_key", "step"))


def _cv_mape(x: np.ndarray, y: np.ndarray, groups: np.ndarray, regs: dict[str, Regressor], seed: int) -> dict[str, float]:
    """Grouped K-fold (a configuration's rows stay together): MAPE per candidate."""
    uniq, inv = np.unique(groups, return_inverse=True)
    if uniq.size < 3:
        return {}
    k = min(5, uniq.size)
    folds = (np.random.default_rng(seed + 1).permutation(uniq.size) % k)[inv]
    out = {}
    for name, reg in regs.items():
        pred = np.empty(y.size)
        for f in range(k):
            tr, te = folds != f, folds == f
            pred[te] = np.maximum(x[te] @ reg(x[tr], y[tr]), FLOOR_MS)
        out[name] = float(100 * np.mean(np.abs(pred - y) / y))
    return out


def _choose(x: np.ndarray, y: np.ndarray, groups: np.ndarray, regs: dict[str, Regressor], seed: int):
    cv = _cv_mape(x, y, groups, regs, seed)
    chosen = min(cv, key=cv.get) if cv else next(iter(regs))
    return regs[chosen](x, y), chosen, cv


def _prepare(data: pl.DataFrame | Sequence[str | Path] | str | Path,
             allow_mixed: bool = False) -> tuple[pl.DataFrame, dict[str, Any]]:
    if isinstance(data, (str, Path)):
        data = [data]
    if not isinstance(data, pl.DataFrame):
        return load_requests(list(data), allow_mixed=allow_mixed)
    need = (*KNOBS, *TOKENS, *MEASURES, "decode_steps", "decode_step_ms")
    missing = [c for c in need if c not in data.columns]
    if missing:
        raise EstimatorError(f"the requests frame lacks {missing}; give the requests of a run directory as "
                             "`load_requests` returns them (with decode_step_ms, the decode steps of each request)")
    rows = data
    if "valid" in rows.columns:
        rows = rows.filter(pl.col("valid").fill_null(False))
    rows = rows.with_columns(*[pl.col(c).cast(pl.Int64) for c in (*KNOBS, *TOKENS, "decode_steps")],
                             *[pl.col(t).cast(pl.Float64) for t in MEASURES],
                             pl.col("decode_step_ms").cast(pl.List(pl.Float64)))
    rows = with_keys(rows)
    info = {"run_dirs": [], "rows_read": data.height, "invalid_rows": data.height - rows.height,
            "rows": rows.height, "configs": rows["config_key"].n_unique(), "model": None, "device_type": None,
            "gpu_name": None, "dtype": None, "blocks_total": None, "top_k_default": None}
    if rows.height == 0:
        raise EstimatorError("no valid request in the frame given")
    return rows, info


# ---------------------------------------------------------------------------- fit
def _fit_core(fs: FeatureSet, rows: pl.DataFrame, steps: pl.DataFrame, coverage: float, seed: int) -> dict[str, Any]:
    """Fit the three linear models on role == train, calibrate on role == calib."""
    regs = candidates(fs)
    train = rows.with_row_index("request_index").filter(pl.col("role") == "train")  # the index explode_steps gives
    calib = rows.filter(pl.col("role") == "calib")
    coef, selection = {}, {}
    # prefill: per-configuration medians
    ok = train.filter(pl.col("prefill_total_ms").is_finite() & (pl.col("prefill_total_ms") > 0))
    if ok.height == 0 or calib.height == 0:
        raise EstimatorError("no usable prefill_total_ms in the training or calibration configurations; "
                             "run a sweep with more configurations")
    med = _request_medians(ok, "prefill_total_ms")
    x = fs.design(_arrays(med, "decode_steps"))["prefill_total_ms"]
    coef["prefill_total_ms"], chosen, cv = _choose(x, med["prefill_total_ms"].to_numpy(), med["config_key"].to_numpy(),
                                                   regs, seed)
    selection["prefill_total_ms"] = {"chosen": chosen, "cv_config_median_mape_pct": cv, "train_configs": med.height}
    # decode steps: per-configuration, per-position medians
    st_train = steps.filter(pl.col("role") == "train")
    if st_train.height == 0:
        raise EstimatorError("no decode step in the training configurations (every request has new_tokens = 1?); "
                             "sweep new_tokens >= 2 so there are decode steps to learn from")
    smed = _step_medians(st_train)
    xs = fs.step(_arrays(smed), smed["step"].to_numpy())
    coef["decode_step_ms"], chosen, cv = _choose(xs, smed["decode_step_ms"].to_numpy(), smed["config_key"].to_numpy(),
                                                 regs, seed)
    selection["decode_step_ms"] = {"chosen": chosen, "cv_config_position_median_mape_pct": cv,
                                   "train_configs": smed["config_key"].n_unique(), "train_positions": smed.height}
    # other_ms (gaps): per-configuration medians, absolute least squares (values may be near 0)
    ok = train.filter(pl.col("other_ms").is_finite() & (pl.col("other_ms") >= 0))
    omed = _request_medians(ok, "other_ms", by_steps=True)
    xo = fs.design(_arrays(omed, "decode_steps"))["other_ms"]
    yo = omed["other_ms"].to_numpy()
    if fs.nonnegative:
        coef["other_ms"] = nnls_fit(relative=False)(xo, yo)
    else:
        coef["other_ms"] = np.linalg.lstsq(xo, yo, rcond=None)[0]
    selection["other_ms"] = {"chosen": "nnls_absolute" if fs.nonnegative else "least_squares",
                             "train_configs": omed.height}
    for t in TARGETS:
        selection[t]["coefficients"] = dict(zip(fs.names[t], coef[t].tolist()))
    tm = TokenMap.learn(train["crops"].to_numpy(), train["prompt_tokens"].to_numpy(),
                        train["image_tokens"].to_numpy(), train["input_tokens"].to_numpy())
    est = Estimator(fs, coef, {o: (1.0, 1.0) for o in OUTPUTS}, tm, defaults=_defaults(rows),
                    knob_ranges=_ranges(train), meta={"coverage": coverage})
    est.noise, excluded = _noise(est, train, st_train)
    # calibration: ratios of measured to the linear prediction, per output, on calibration requests
    # (for decode total and request: the normalized score (log y - log median(N)) / log_sd(N), see
    # Estimator.spread)
    mu = _mu_rows(est, calib)
    cal_n = calib["decode_steps"].to_numpy().astype(np.float64)
    cal_steps = steps.filter(pl.col("role") == "calib")
    step_mu = _mu_steps(est, cal_steps)
    measured = {"prefill_total_ms": calib["prefill_total_ms"].to_numpy(), "decode_total_ms": calib["decode_ms"].to_numpy(),
                "request_ms": calib["total_ms"].to_numpy()}
    factors, ratios, calibration = {}, {}, {}
    for name in OUTPUTS:
        if name == "decode_step_ms":
            y, m, keys = cal_steps["decode_step_ms"].to_numpy(), step_mu, cal_steps["config_key"]
        else:
            y, m, keys = measured[name], mu[name], calib["config_key"]
            if name == "decode_total_ms":
                has = calib["decode_steps"].to_numpy() > 0
                y, m, keys = y[has], m[has], keys.filter(pl.Series(has))
        good = np.isfinite(y) & (y > 0) & (m > 0)
        if not good.any():
            raise EstimatorError(f"no usable {name} in the calibration configurations; run a sweep with more "
                                 "configurations (and new_tokens >= 2)")
        r = y[good] / m[good]
        if name in MIXED:  # normalized: each request's log residual from its modelled median, in its log-spreads
            has = np.ones(calib.height, bool) if name == "request_ms" else calib["decode_steps"].to_numpy() > 0
            median, sd = est.spread(name, {k: v[has][good] for k, v in mu.items()}, cal_n[has][good])
            r = (np.log(y[good]) - np.log(median)) / sd
        f50, f95, guaranteed = conformal_factors(r, coverage)
        factors[name] = (f50, f95)
        if name in MIXED:
            ratios[name] = np.sort(r)
        calibration[name] = {"method": ("normalized split-conformal on (log y - log median(N)) / log_sd(N) of "
                                        "calibration requests (a log-normal with the mean and variance of the "
                                        "request's steps and prefill, see noise)")
                             if name in MIXED else
                             "split-conformal on relative residuals y / mu of calibration "
                             + ("decode steps" if name == "decode_step_ms" else "requests"),
                             "scale": "log_sd" if name in MIXED else "ratio",
                             "p50_factor": f50, "p95_factor": f95, "rows": int(good.sum()),
                             "configs": int(keys.filter(pl.Series(good)).n_unique()),
                             "finite_sample_guarantee": guaranteed}
    est.factors = factors
    est.ratios = ratios
    return {"estimator": est, "selection": selection, "calibration": calibration, "noise_excluded": excluded}


def _noise(est: Estimator, train: pl.DataFrame, steps: pl.DataFrame) -> tuple[dict[str, float], dict[str, int]]:
    """How measurements scatter around the median models, on the training data: the mean and
    variance of the ratio measured / predicted of prefill and of one decode step (their means are
    above 1 when the times are skewed: a sum of many steps is then above the sum of their medians),
    how strongly the step ratios of one request move together (the correlation rho: 0 independent,
    1 together), and the covariance of a request's prefill ratio with the mean of its step ratios.

    rho and the covariance are moment estimates over requests: the mean of a request's S step
    ratios has variance var (rho + (1 - rho) / S). Requests and steps whose linear prediction is
    clipped at the floor (a model far outside its data) have no meaningful ratio: they are left out
    of these moments and counted in ``excluded``."""
    mu = _mu_rows(est, train)
    y = train["prefill_total_ms"].to_numpy()
    ok = np.isfinite(y) & (y > 0)
    ok &= mu["prefill_total_ms"] > FLOOR_MS  # a prediction clipped at the floor has no meaningful ratio
    rp = y / mu["prefill_total_ms"]
    mp, vp = float(np.mean(rp[ok])), float(np.var(rp[ok]))
    mus = _mu_steps(est, steps)
    rs = steps["decode_step_ms"].to_numpy() / mus
    fine = mus > FLOOR_MS
    ms, vs = float(np.mean(rs[fine])), float(np.var(rs[fine]))
    per = (steps.select("request_index").with_columns(pl.Series("r", rs)).filter(pl.Series(fine))
           .group_by("request_index").agg(pl.col("r").mean(), pl.len().alias("s")))
    rho, cov = 1.0, 0.0
    if vs > 0 and per.height >= 3:
        inv = float(np.mean(1.0 / per["s"].to_numpy()))
        spread = float(np.mean((per["r"].to_numpy() - ms) ** 2))
        rho = float(np.clip((spread / vs - inv) / (1.0 - inv), 0.0, 1.0)) if inv < 1 else 1.0
        both = (pl.DataFrame({"request_index": train["request_index"], "rp": rp, "ok": ok})
                .join(per, on="request_index").filter(pl.col("ok")))
        if both.height >= 3:
            cov = float(np.mean((both["rp"].to_numpy() - mp) * (both["r"].to_numpy() - ms)))
            bound = math.sqrt(vp * vs * rho)  # keeps the request's variance >= 0 at every N
            cov = float(np.clip(cov, -bound, bound))
    excluded = {"prefill_requests": int((np.isfinite(y) & (y > 0) & ~ok).sum()), "decode_steps": int((~fine).sum())}
    return {"prefill_mean_ratio": mp, "prefill_ratio_var": vp, "step_mean_ratio": ms, "step_ratio_var": vs,
            "step_correlation": rho, "prefill_step_cov": cov}, excluded


def _mu_rows(est: Estimator, frame: pl.DataFrame) -> dict[str, np.ndarray]:
    x = _arrays(frame)
    return est._mu(x, frame["decode_steps"].to_numpy().astype(np.float64))


def _mu_steps(est: Estimator, steps: pl.DataFrame) -> np.ndarray:
    if steps.height == 0:
        return np.empty(0)
    return np.maximum(est.features.step(_arrays(steps), steps["step"].to_numpy()) @ est.coef["decode_step_ms"], FLOOR_MS)


def fit_estimator(
    data: pl.DataFrame | Sequence[str | Path] | str | Path,
    *,
    feature_set: str = "physical",
    test_fraction: float = 0.25,
    calib_fraction: float = 0.25,
    coverage: float = 0.95,
    seed: int = 0,
    holdout: pl.Expr | None = None,
    hold_out_new_tokens: bool = True,
    model: dict[str, Any] | None = None,
    baseline: bool = True,
    allow_mixed: bool = False,
) -> Estimator:
    """Fit the whole-request estimator on run directories (or a requests frame with
    ``decode_step_ms``), evaluated on held-out whole configurations and on held-out N.

    `holdout`, a polars expression over the knob columns, picks the test configurations instead
    of a random `test_fraction` (e.g. ``pl.col("crops") >= 16`` to test extrapolation).
    `hold_out_new_tokens` adds the held-out-N evaluation (a second fit without the longest
    outputs) when the data has at least two output lengths. The returned Estimator holds the
    metrics (``est.metrics``) and the held-out predictions (``est.evaluation`` per request,
    ``est.steps_evaluation`` per decode step); the model saved is the one fitted on the
    configuration split, which the ``held_out_configs`` metrics describe.

    `model` says what a requests frame cannot (run directories say it in run.json): the model's
    ``blocks_total`` and ``experts`` per MoE layer, which bound the blocks and top-k the model
    can take. `baseline` also fits the ``knobs`` feature set on the same split for the quality
    gate. ``est.meta["quality"]`` is the gate's verdict (see :func:`quality_gate`). Run
    directories measured under different conditions are refused unless `allow_mixed`; the
    training record (``est.meta["training"]``) keeps ``mixed_conditions`` and ``allow_mixed``.

    Example:
        >>> import polars as pl
        >>> from molmo_latency.estimator import example_requests, fit_estimator
        >>> est = fit_estimator(example_requests(seed=1), holdout=pl.col("crops") == 8)
        >>> sp = est.meta["split"]
        >>> sp["configs"]["test"], len(sp["test_configs"]), est.metrics["held_out_configs"]["request_ms"]["requests"]["r2"] > 0.9
        (18, 36, True)
    """
    fs = _feature_set(feature_set)
    if not 0.5 < coverage < 1:
        raise EstimatorError(f"coverage must be between 0.5 and 1, got {coverage}")
    started = time.perf_counter()
    rows, info = _prepare(data, allow_mixed)
    info = {**info, **{k: v for k, v in (model or {}).items() if v is not None}}
    test_settings = None
    test_configs: set[str] | None = None
    if holdout is not None:
        per_config = rows.group_by("config_key").agg(*[pl.col(c).first() for c in (*KNOBS, *TOKENS, "setting_key")])
        try:
            test_configs = set(per_config.filter(holdout)["config_key"].to_list())
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds
            raise EstimatorError(f"holdout {holdout} cannot select configurations: {exc}") from None
        test_settings = set(per_config.filter(pl.col("config_key").is_in(list(test_configs)))["setting_key"].to_list())
    setting_roles = split_configs(rows["setting_key"].unique().to_list(), test_fraction=test_fraction,
                                  calib_fraction=calib_fraction, seed=seed, test_keys=test_settings)
    role = pl.col("setting_key").replace_strict(setting_roles)
    if test_configs is not None:  # a setting partly held out: only the selected configurations are tested
        role = (pl.when(pl.col("config_key").is_in(list(test_configs))).then(pl.lit("test"))
                .when(role == "test").then(pl.lit("unused")).otherwise(role))
    rows = rows.with_columns(role.alias("role"))
    steps = explode_steps(rows)
    core = _fit_core(fs, rows, steps, coverage, seed)
    est: Estimator = core["estimator"]
    ev_rows, ev_steps, metrics_cfg = _evaluate(est, rows.filter(pl.col("role") == "test"),
                                               steps.filter(pl.col("role") == "test"), "held_out_configs")
    metrics = {"held_out_configs": metrics_cfg}
    evaluations, step_evaluations = [ev_rows], [ev_steps]
    n_holdout = _new_tokens_holdout(rows) if hold_out_new_tokens else None
    if n_holdout is None:
        metrics["held_out_new_tokens"] = {"skipped": "the data has one output length; sweep several new_tokens "
                                                     "values to evaluate on held-out N"}
    else:
        try:
            nrows = _roles_for_new_tokens(rows, n_holdout, calib_fraction, seed)
            nsteps = explode_steps(nrows)
            ncore = _fit_core(fs, nrows, nsteps, coverage, seed)
            ev_r, ev_s, m = _evaluate(ncore["estimator"], nrows.filter(pl.col("role") == "test"),
                                      nsteps.filter(pl.col("role") == "test"), "held_out_new_tokens")
            train_n = sorted(nrows.filter(pl.col("role") != "test")["decode_steps"].unique().to_list())
            metrics["held_out_new_tokens"] = {"holdout": f"output tokens >= {n_holdout + 1}",
                                              "trained_on_output_tokens": [int(s) + 1 for s in train_n], **m}
            evaluations.append(ev_r)
            step_evaluations.append(ev_s)
        except EstimatorError as exc:
            metrics["held_out_new_tokens"] = {"skipped": str(exc)}
    n_roles = {r: sum(1 for v in setting_roles.values() if v == r) for r in ("train", "calib", "test")}
    base = None
    if baseline and fs.name != "knobs":
        try:
            bcore = _fit_core(_feature_set("knobs"), rows, steps, coverage, seed)
            _, _, bm = _evaluate(bcore["estimator"], rows.filter(pl.col("role") == "test"),
                                 steps.filter(pl.col("role") == "test"), "held_out_configs")
            base = {"feature_set": "knobs", **{o: bm[o]["requests"] for o in ("prefill_total_ms", "decode_total_ms",
                                                                                "request_ms")}}
        except EstimatorError as exc:
            base = {"feature_set": "knobs", "skipped": str(exc)}
    est.meta = {
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "fit_seconds": round(time.perf_counter() - started, 3),
        "feature_set": {"name": fs.name, "digest": fs.digest(), "description": fs.description,
                        "names": {t: list(fs.names[t]) for t in TARGETS}},
        "targets": list(TARGETS),
        "outputs": {o: list(output_names(o)) for o in OUTPUTS},
        "coverage": coverage,
        "token_map": est.token_map.as_dict(),
        "defaults": est.defaults,
        "knob_ranges": est.knob_ranges,
        "model": {k: info.get(k) for k in ("model", "device_type", "gpu_name", "dtype", "blocks_total", "top_k_default",
                                            "experts")},
        "knob_values": {k: sorted(int(v) for v in rows[k].unique().to_list()) for k in KNOBS if k != "new_tokens"},
        "training": {"run_dirs": info["run_dirs"], "rows_read": info["rows_read"], "invalid_rows_excluded":
                     info["invalid_rows"], "rows": info["rows"], "configs": info["configs"],
                     "decode_steps": steps.height,
                     "output_tokens": sorted(int(s) + 1 for s in rows["decode_steps"].unique().to_list()),
                     "mixed_conditions": info.get("mixed_conditions", []),
                     "allow_mixed": bool(info.get("allow_mixed", False))},
        "split": {"unit": "setting (a configuration at every N)", "seed": seed,
                  "test_fraction": None if holdout is not None else test_fraction,
                  "calib_fraction": calib_fraction, "holdout": None if holdout is None else str(holdout),
                  "configs": n_roles, "rows": {r: rows.filter(pl.col("role") == r).height for r in n_roles},
                  "test_configs": sorted(rows.filter(pl.col("role") == "test")["config_key"].unique().to_list()),
                  "calib_configs": sorted(rows.filter(pl.col("role") == "calib")["config_key"].unique().to_list())},
        "selection": core["selection"],
        "calibration": core["calibration"],
        "noise": est.noise,
        "noise_excluded": core["noise_excluded"],
        "metrics": metrics,
        "quality": quality_gate(rows, metrics, base, n_roles),
        "versions": _versions(),
    }
    est.evaluation = pl.concat(evaluations, how="vertical")
    est.steps_evaluation = pl.concat(step_evaluations, how="vertical")
    return est


# what the quality gate accepts (held-out coverage per output; see quality_gate)
GATE = {"coverage_p50": (0.40, 0.60), "coverage_p95": (0.90, 0.99), "min_repeats": 3, "max_repeat_rel_sd": 0.15,
        "min_settings": 12, "min_held_out_configs": 4, "min_held_out_requests": 40}
_GATE_OUTPUTS = {"prefill_total_ms": "prefill", "decode_total_ms": "decode total", "request_ms": "whole request",
                 "decode_step_ms": "decode step"}
_GATE_SPLITS = {"held_out_configs": "held-out configurations", "held_out_new_tokens": "held-out N"}


def quality_gate(rows: pl.DataFrame, metrics: dict[str, Any], baseline: dict[str, Any] | None,
                 configs: dict[str, int]) -> dict[str, Any]:
    """The verdict on a fit: ``passed`` when every output's held-out P50 coverage is within
    40-60% and P95 coverage within 90-99% (held-out configurations and held-out N), the whole
    request's held-out R^2 is >= 0 and its MAPE beats the ``knobs`` baseline's; otherwise
    ``problems`` says what failed and ``reasons`` what in the data explains it (too few repeats,
    noisy repeats, too few configurations or held-out requests).

    Example:
        >>> m = {"held_out_configs": {"request_ms": {"requests": {"n": 400, "coverage_p50": 0.8, "coverage_p95": 0.97,
        ...                                                        "mape_pct": 9.0, "r2": 0.7}}}}
        >>> rows = pl.DataFrame({"config_key": ["a", "a", "b", "b"], "total_ms": [10.0, 10.1, 20.0, 20.2]})
        >>> q = quality_gate(rows, m, {"request_ms": {"mape_pct": 8.0}}, {"train": 20, "calib": 10, "test": 10})
        >>> q["passed"], q["problems"][0]
        (False, 'whole request: P50 coverage 80% on held-out configurations (n=400), outside 40-60%')
        >>> q["reasons"][0]
        'too few repeats: a median of 2 requests per configuration; sweep repeats >= 3'
    """
    problems: list[str] = []
    for split, ms in metrics.items():
        if not isinstance(ms, dict) or "skipped" in ms:
            continue
        for out, label in _GATE_OUTPUTS.items():
            m = (ms.get(out) or {}).get("steps" if out == "decode_step_ms" else "requests") or {}
            if not m.get("n"):
                continue
            for key, name in (("coverage_p50", "P50"), ("coverage_p95", "P95")):
                lo, hi = GATE[key]
                v = m.get(key)
                if v is not None and not lo <= v <= hi:
                    problems.append(f"{label}: {name} coverage {100 * v:.0f}% on {_GATE_SPLITS.get(split, split)} "
                                    f"(n={m['n']}), outside {100 * lo:.0f}-{100 * hi:.0f}%")
    req = ((metrics.get("held_out_configs") or {}).get("request_ms") or {}).get("requests") or {}
    if req.get("r2") is not None and math.isfinite(req["r2"]) and req["r2"] < 0:
        problems.append(f"whole request: R^2 {req['r2']:.2f} on held-out configurations, worse than predicting "
                        "the mean")
    base = (baseline or {}).get("request_ms") or {}
    if base.get("mape_pct") is not None and req.get("mape_pct") is not None and req["mape_pct"] >= base["mape_pct"]:
        problems.append(f"whole request: held-out MAPE {req['mape_pct']:.1f}% is no better than the knobs "
                        f"baseline's {base['mape_pct']:.1f}%")
    reasons: list[str] = []
    logs = rows.filter(pl.col("total_ms") > 0).with_columns(pl.col("total_ms").log().alias("log_ms"))
    per_config = logs.group_by("config_key").agg(pl.len().alias("n"),
                                                 ((pl.col("log_ms") - pl.col("log_ms").mean()) ** 2).sum().alias("ss"))
    repeats = float(per_config["n"].median()) if per_config.height else 0.0
    if repeats < GATE["min_repeats"]:
        reasons.append(f"too few repeats: a median of {repeats:g} requests per configuration; sweep repeats >= "
                       f"{GATE['min_repeats']}")
    many = per_config.filter(pl.col("n") >= 2)  # pooled SD of log(total) within configurations
    spread = math.sqrt(float(many["ss"].sum()) / float((many["n"] - 1).sum())) if many.height else 0.0
    if spread > GATE["max_repeat_rel_sd"]:
        reasons.append(f"noisy data: repeats of one configuration differ by {100 * spread:.0f}% (SD of the log of the "
                       "whole request); measure on a quiet machine or with more repeats")
    n_settings = sum(configs.values())
    if n_settings < GATE["min_settings"] or min(configs.get("calib", 0), configs.get("test", 0)) < GATE[
            "min_held_out_configs"]:
        reasons.append(f"too few configurations: {n_settings} settings (train {configs.get('train', 0)}, calibration "
                       f"{configs.get('calib', 0)}, test {configs.get('test', 0)}); sweep more crops, top-k, blocks or "
                       f"prompt lengths (>= {GATE['min_settings']} settings, of which >= "
                       f"{GATE['min_held_out_configs']} held out for calibration and >= {GATE['min_held_out_configs']} "
                       "for test)")
    hn = metrics.get("held_out_new_tokens") or {}
    if len(hn.get("trained_on_output_tokens") or []) == 1 and any("held-out N" in p for p in problems):
        reasons.append(f"held-out N was fitted on one output length ({hn['trained_on_output_tokens'][0]}): how a "
                       "decode step changes with its position cannot be learned from one length; sweep three or "
                       "more new_tokens values")
    if req.get("n") is not None and req["n"] < GATE["min_held_out_requests"]:
        reasons.append(f"too few held-out requests ({req['n']}) to measure coverage within 10 points; sweep more "
                       "configurations or repeats")
    if problems and not reasons:
        reasons.append("none of the usual causes in the data: the feature set may not describe this model's costs, "
                       "or held-out N lies far beyond the fitted lengths; compare --feature-set knobs and parity.png")
    return {"passed": not problems, "problems": problems, "reasons": reasons if problems else [],
            "baseline": baseline, "thresholds": GATE}


def _feature_set(name: str) -> FeatureSet:  # `feature_set` is shadowed by fit_estimator's argument
    return feature_set(name)


def _new_tokens_holdout(rows: pl.DataFrame) -> int | None:
    """The decode-step count from which requests are held out for the held-out-N evaluation: the
    longest outputs, at most half of the requests, at least one shorter length left to fit on."""
    counts = rows.group_by("decode_steps").len().sort("decode_steps", descending=True)
    if counts.height < 2:
        return None
    total, acc, threshold = rows.height, 0, None
    for s, n in counts.iter_rows():
        if acc + n > total / 2 and threshold is not None:
            break
        acc += n
        threshold = s
        if acc >= total / 2:
            break
    remaining = rows.filter(pl.col("decode_steps") < threshold)
    if remaining.height == 0 or threshold is None or threshold < 1:
        return None
    return int(threshold)


def _roles_for_new_tokens(rows: pl.DataFrame, threshold: int, calib_fraction: float, seed: int) -> pl.DataFrame:
    rest = rows.filter(pl.col("decode_steps") < threshold)
    settings = sorted(rest["setting_key"].unique().to_list())
    order = [settings[i] for i in np.random.default_rng(seed).permutation(len(settings))]
    n_calib = max(1, round(len(settings) * calib_fraction))
    if len(settings) - n_calib < MIN_TRAIN_CONFIGS:
        raise EstimatorError(f"{len(settings)} settings below {threshold + 1} output tokens are too few to fit and "
                             "calibrate the held-out-N model")
    calib = set(order[:n_calib])
    return rows.with_columns(
        pl.when(pl.col("decode_steps") >= threshold).then(pl.lit("test"))
        .when(pl.col("setting_key").is_in(list(calib))).then(pl.lit("calib")).otherwise(pl.lit("train")).alias("role"))


# ---------------------------------------------------------------------------- evaluate
def position_bucket(step: pl.Expr) -> pl.Expr:
    """A readable bucket of decode positions: 0, 1-3, 4-15, 16-63, 64-255, 256+.

    Example:
        >>> pl.DataFrame({"step": [0, 2, 20, 300]}).select(position_bucket(pl.col("step")))["positions"].to_list()
        ['0', '1-3', '16-63', '256+']
    """
    expr = pl.lit(f"{POSITION_EDGES[-1]}+")
    for lo, hi in reversed(list(zip(POSITION_EDGES[:-1], POSITION_EDGES[1:]))):
        label = str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"
        expr = pl.when(step < hi).then(pl.lit(label)).otherwise(expr)
    return expr.alias("positions")


def _evaluate(est: Estimator, test: pl.DataFrame, test_steps: pl.DataFrame,
              split: str) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any]]:
    """Held-out requests and decode steps with their predictions, and the metrics."""
    pred = est.predict_arrays(**{c: test[c].to_numpy() for c in (*KNOBS, *TOKENS) if c != "new_tokens"},
                              new_tokens=test["decode_steps"].to_numpy() + 1)
    ev = test.select("config_key", "setting_key", *KNOBS, *TOKENS, "decode_steps",
                     pl.col("decode_ms").alias("decode_total_ms"), "prefill_total_ms",
                     pl.col("total_ms").alias("request_ms"), "other_ms").with_columns(
        *[pl.Series(k, v) for k, v in pred.items()], pl.lit(split).alias("split"))
    metrics: dict[str, Any] = {"configs": ev["config_key"].n_unique(), "requests": ev.height}
    for name in ("prefill_total_ms", "decode_total_ms", "request_ms"):
        p50, p95 = output_names(name)
        ok = ev.filter(pl.col(name).is_not_null() & pl.col(name).is_finite() & (pl.col(name) > 0))
        per_config = ok.group_by("config_key").agg(pl.col(name).median(), pl.col(p50).first())
        metrics[name] = {
            "configs": per_config.height,
            "requests": regression_metrics(ok[name].to_numpy(), ok[p50].to_numpy(), ok[p95].to_numpy()),
            "config_medians": regression_metrics(per_config[name].to_numpy(), per_config[p50].to_numpy()),
        }
        if name != "prefill_total_ms":
            by_n = []
            for part in ok.partition_by("decode_steps"):
                m = regression_metrics(part[name].to_numpy(), part[p50].to_numpy(), part[p95].to_numpy())
                by_n.append({"output_tokens": int(part["decode_steps"][0]) + 1, **m})
            metrics[name]["by_output_tokens"] = sorted(by_n, key=lambda d: d["output_tokens"])
    pos = est.predict_positions(**{c: test_steps[c].to_numpy() for c in (*SETTING, *TOKENS)},
                                steps=test_steps["step"].to_numpy()) if test_steps.height else {
        "decode_step_p50_ms": np.empty(0), "decode_step_p95_ms": np.empty(0)}
    ev_steps = test_steps.select("request_index", "config_key", "setting_key", *KNOBS, *TOKENS, "decode_steps", "step",
                                 "decode_step_ms").with_columns(
        *[pl.Series(k, v) for k, v in pos.items()], pl.lit(split).alias("split"))
    by_pos = []
    for part in ev_steps.with_columns(position_bucket(pl.col("step"))).partition_by("positions", maintain_order=False):
        m = regression_metrics(part["decode_step_ms"].to_numpy(), part["decode_step_p50_ms"].to_numpy(),
                               part["decode_step_p95_ms"].to_numpy())
        by_pos.append({"positions": part["positions"][0], "first_step": int(part["step"].min()),
                       "last_step": int(part["step"].max()), **m})
    metrics["decode_step_ms"] = {
        "steps": regression_metrics(ev_steps["decode_step_ms"].to_numpy(), ev_steps["decode_step_p50_ms"].to_numpy(),
                                    ev_steps["decode_step_p95_ms"].to_numpy()),
        "by_position": sorted(by_pos, key=lambda d: d["first_step"]),
    }
    return ev, ev_steps, metrics


def _defaults(rows: pl.DataFrame) -> dict[str, int]:
    out = {}
    for k in ("new_tokens", "batch_size"):
        out[k] = int(rows[k].mode().sort()[0])
    return out


def _ranges(rows: pl.DataFrame) -> dict[str, list[float]]:
    out = {k: [float(rows[k].min()), float(rows[k].max())] for k in KNOBS if k != "new_tokens"}
    n = rows["decode_steps"] + 1  # the output lengths actually generated (free generation stops early)
    out["new_tokens"] = [float(n.min()), float(n.max())]
    return out


def _versions() -> dict[str, str]:
    import scipy

    from molmo_latency import __version__

    return {"molmo_latency": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "polars": pl.__version__, "scipy": scipy.__version__}
