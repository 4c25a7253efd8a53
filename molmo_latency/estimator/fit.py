"""Fitting and honest evaluation of the latency estimator (transform: requests -> Estimator).

Whole configurations are split three ways (never single requests: repeats of one configuration
would sit on both sides): *train* configurations fit the linear costs, *calibration*
configurations set the P50/P95 factors (split-conformal on the relative residuals y / mu), and
*test* configurations, used for nothing else, give the reported metrics.

The linear costs are fitted to the median of each training configuration (a P50 target that a
few slow repeats cannot drag), with relative weights (latency noise scales with latency).
Candidates (for cost features: non-negative least squares on relative and absolute errors, and
least absolute relative deviations with costs >= 0; otherwise relative ridge at several strengths
and unconstrained least absolute relative deviations)
are chosen by grouped K-fold cross-validation over the training configurations.

Example:
    >>> from molmo_latency.estimator import example_requests, fit_estimator
    >>> est = fit_estimator(example_requests(seed=0))
    >>> m = est.metrics["decode_per_token_ms"]["requests"]
    >>> sorted(m)[:4], m["r2"] > 0.9
    (['mae_ms', 'mape_pct', 'n', 'p50_below_share'], True)
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
from scipy.optimize import linprog, nnls

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator.data import config_key, load_requests
from molmo_latency.estimator.features import KNOBS, TARGETS, TOKENS, FeatureSet, TokenMap, config_arrays, feature_set
from molmo_latency.estimator.model import FLOOR_MS, FORMAT_VERSION, Estimator, output_names

Regressor = Callable[[np.ndarray, np.ndarray], np.ndarray]
MIN_TRAIN_CONFIGS = 2


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
        a_eq = np.hstack([z, np.eye(n), -np.eye(n)])
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
    """MAE, RMSE, MAPE, R^2, share within +-10% of P50 against measured `y`; with `p95`, the share
    of measurements at or below it (coverage) and below the P50.

    Example:
        >>> import numpy as np
        >>> m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0]))
        >>> m["mae_ms"], m["within_10pct_share"], m["r2"]
        (0.25, 0.75, 0.8)
    """
    y, p50 = np.asarray(y, float), np.asarray(p50, float)
    err = p50 - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    out = {
        "n": int(y.size),
        "mae_ms": float(np.mean(np.abs(err))),
        "rmse_ms": float(np.sqrt(np.mean(err ** 2))),
        "mape_pct": float(100 * np.mean(np.abs(err) / y)),
        "r2": float(1 - np.sum(err ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
        "within_10pct_share": float(np.mean(np.abs(err) <= 0.1 * y)),
    }
    if p95 is not None:
        out["p95_coverage"] = float(np.mean(y <= np.asarray(p95, float)))
        out["p50_below_share"] = float(np.mean(y <= p50))
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
    """Assign each configuration to "train", "calib" or "test" (whole configurations, seeded).

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
        raise EstimatorError(f"{len(keys)} configurations cannot be split into train/calibration/test "
                             f"({counts}); at least {MIN_TRAIN_CONFIGS + 2} distinct configurations are needed "
                             "(with a holdout, some must stay outside it): run a larger sweep")
    return roles


# ---------------------------------------------------------------------------- fit
def _arrays(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    return config_arrays(**{c: frame[c].to_numpy() for c in (*KNOBS, *TOKENS)})


def _medians(frame: pl.DataFrame, target: str) -> pl.DataFrame:
    return (frame.group_by("config_key", maintain_order=True)
            .agg(*[pl.col(c).first() for c in (*KNOBS, *TOKENS)], pl.col(target).median(), pl.len().alias("n"))
            .sort("config_key"))


def _cv_mape(fs: FeatureSet, target: str, med: pl.DataFrame, regs: dict[str, Regressor], seed: int) -> dict[str, float]:
    """Grouped K-fold over training configurations: MAPE of config medians per candidate."""
    n = med.height
    if n < 3:
        return {}
    k = min(5, n)
    folds = np.random.default_rng(seed + 1).permutation(n) % k
    x = fs.build(_arrays(med))[target]
    y = med[target].to_numpy()
    out = {}
    for name, reg in regs.items():
        pred = np.empty(n)
        for f in range(k):
            tr, te = folds != f, folds == f
            pred[te] = np.maximum(x[te] @ reg(x[tr], y[tr]), FLOOR_MS)
        out[name] = float(100 * np.mean(np.abs(pred - y) / y))
    return out


def _prepare(data: pl.DataFrame | Sequence[str | Path] | str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    if isinstance(data, (str, Path)):
        data = [data]
    if not isinstance(data, pl.DataFrame):
        return load_requests(list(data))
    missing = [c for c in (*KNOBS, *TOKENS) if c not in data.columns]
    if missing or not any(t in data.columns for t in TARGETS):
        raise EstimatorError(f"the requests frame lacks {missing or list(TARGETS)}; give a requests table of a "
                             "run directory")
    rows = data
    if "valid" in rows.columns:
        rows = rows.filter(pl.col("valid").fill_null(False))
    rows = rows.with_columns(*[pl.col(c).cast(pl.Int64) for c in (*KNOBS, *TOKENS)],
                             *[pl.col(t).cast(pl.Float64) for t in TARGETS if t in rows.columns])
    if "config_key" not in rows.columns:
        rows = rows.with_columns(config_key())
    info = {"run_dirs": [], "rows_read": data.height, "invalid_rows": data.height - rows.height,
            "rows": rows.height, "configs": rows["config_key"].n_unique(), "model": None, "device_type": None,
            "gpu_name": None, "dtype": None, "blocks_total": None, "top_k_default": None}
    if rows.height == 0:
        raise EstimatorError("no valid request in the frame given")
    return rows, info


def fit_estimator(
    data: pl.DataFrame | Sequence[str | Path] | str | Path,
    *,
    feature_set: str = "physical",
    test_fraction: float = 0.25,
    calib_fraction: float = 0.25,
    coverage: float = 0.95,
    seed: int = 0,
    holdout: pl.Expr | None = None,
) -> Estimator:
    """Fit P50/P95 of prefill_total_ms and decode_per_token_ms on run directories (or a requests
    frame), evaluated on held-out whole configurations.

    `holdout`, a polars expression over the knob columns, picks the test configurations instead
    of a random `test_fraction` (e.g. ``pl.col("crops") >= 16`` to test extrapolation). The
    returned Estimator holds the metrics (``est.metrics``) and the held-out predictions
    (``est.evaluation``); the model saved is the one the metrics describe.

    Example:
        >>> import polars as pl
        >>> from molmo_latency.estimator import example_requests, fit_estimator
        >>> est = fit_estimator(example_requests(seed=1), holdout=pl.col("crops") == 8)
        >>> est.meta["split"]["configs"]["test"], est.metrics["prefill_total_ms"]["requests"]["r2"] > 0.9
        (18, True)
    """
    fs = _feature_set(feature_set)
    if not 0.5 < coverage < 1:
        raise EstimatorError(f"coverage must be between 0.5 and 1, got {coverage}")
    started = time.perf_counter()
    rows, info = _prepare(data)
    keys = rows["config_key"].unique().to_list()
    test_keys = None
    if holdout is not None:
        per_config = rows.group_by("config_key").agg(*[pl.col(c).first() for c in (*KNOBS, *TOKENS)])
        try:
            test_keys = set(per_config.filter(holdout)["config_key"].to_list())
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds
            raise EstimatorError(f"holdout {holdout} cannot select configurations: {exc}") from None
    roles = split_configs(keys, test_fraction=test_fraction, calib_fraction=calib_fraction, seed=seed,
                          test_keys=test_keys)
    rows = rows.with_columns(pl.col("config_key").replace_strict(roles).alias("role"))
    train = rows.filter(pl.col("role") == "train")
    tm = TokenMap.learn(train["crops"].to_numpy(), train["prompt_tokens"].to_numpy(),
                        train["image_tokens"].to_numpy(), train["input_tokens"].to_numpy())

    coef, factors, selection, calibration, metrics = {}, {}, {}, {}, {}
    targets = [t for t in TARGETS if t in rows.columns]
    usable = {t: rows.filter(pl.col(t).is_not_null() & pl.col(t).is_finite() & (pl.col(t) > 0)) for t in targets}
    regs = candidates(fs)
    for t in targets:
        part = {r: usable[t].filter(pl.col("role") == r) for r in ("train", "calib", "test")}
        empty = [r for r, f in part.items() if f.height == 0]
        if empty:
            raise EstimatorError(f"no usable {t} in the {'/'.join(empty)} configurations (null or <= 0: e.g. "
                                 "decode_per_token_ms needs new_tokens >= 2); run a sweep with more configurations")
        med = _medians(part["train"], t)
        cv = _cv_mape(fs, t, med, regs, seed)
        chosen = min(cv, key=cv.get) if cv else next(iter(regs))
        x_train = fs.build(_arrays(med))[t]
        coef[t] = regs[chosen](x_train, med[t].to_numpy())
        mu_cal = np.maximum(fs.build(_arrays(part["calib"]))[t] @ coef[t], FLOOR_MS)
        f50, f95, guaranteed = conformal_factors(part["calib"][t].to_numpy() / mu_cal, coverage)
        factors[t] = (f50, f95)
        selection[t] = {"chosen": chosen, "cv_config_median_mape_pct": cv, "train_configs": med.height,
                        "coefficients": dict(zip(fs.names[t], coef[t].tolist()))}
        calibration[t] = {"method": "split-conformal on relative residuals y / mu of calibration requests",
                          "p50_factor": f50, "p95_factor": f95, "rows": part["calib"].height,
                          "configs": part["calib"]["config_key"].n_unique(), "finite_sample_guarantee": guaranteed}

    est = Estimator(fs, coef, factors, tm, defaults=_defaults(rows), knob_ranges=_ranges(train), meta={})
    evaluation, metrics = _evaluate(est, rows.filter(pl.col("role") == "test"), targets)
    n_roles = {r: sum(1 for v in roles.values() if v == r) for r in ("train", "calib", "test")}
    est.meta = {
        "format_version": FORMAT_VERSION,
        "created_unix": time.time(),
        "fit_seconds": round(time.perf_counter() - started, 3),
        "feature_set": {"name": fs.name, "digest": fs.digest(), "description": fs.description,
                        "names": {t: list(fs.names[t]) for t in targets}},
        "targets": targets,
        "outputs": {t: list(output_names(t)) for t in targets},
        "coverage": coverage,
        "token_map": tm.as_dict(),
        "defaults": est.defaults,
        "knob_ranges": est.knob_ranges,
        "model": {k: info.get(k) for k in ("model", "device_type", "gpu_name", "dtype", "blocks_total", "top_k_default")},
        "training": {"run_dirs": info["run_dirs"], "rows_read": info["rows_read"], "invalid_rows_excluded":
                     info["invalid_rows"], "rows": info["rows"], "configs": info["configs"]},
        "split": {"unit": "configuration", "seed": seed, "test_fraction": None if holdout is not None else test_fraction,
                  "calib_fraction": calib_fraction, "holdout": None if holdout is None else str(holdout),
                  "configs": n_roles, "rows": {r: rows.filter(pl.col("role") == r).height for r in n_roles},
                  "test_configs": sorted(k for k, v in roles.items() if v == "test"),
                  "calib_configs": sorted(k for k, v in roles.items() if v == "calib")},
        "selection": selection,
        "calibration": calibration,
        "metrics": metrics,
        "versions": _versions(),
    }
    est.evaluation = evaluation
    return est


def _evaluate(est: Estimator, test: pl.DataFrame, targets: list[str]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Held-out requests with their predictions, and the metrics per target: per request, and per
    configuration (median of its requests against the P50)."""
    pred = est.predict_arrays(**{c: test[c].to_numpy() for c in (*KNOBS, *TOKENS)})
    evaluation = test.select("config_key", *KNOBS, *TOKENS, *targets).with_columns(
        *[pl.Series(k, v) for k, v in pred.items()])
    metrics = {}
    for t in targets:
        p50, p95 = output_names(t)
        ok = evaluation.filter(pl.col(t).is_not_null() & pl.col(t).is_finite() & (pl.col(t) > 0))
        per_config = ok.group_by("config_key").agg(pl.col(t).median(), pl.col(p50).first())
        metrics[t] = {
            "configs": per_config.height,
            "requests": regression_metrics(ok[t].to_numpy(), ok[p50].to_numpy(), ok[p95].to_numpy()),
            "config_medians": regression_metrics(per_config[t].to_numpy(), per_config[p50].to_numpy()),
        }
    return evaluation, metrics


def _feature_set(name: str) -> FeatureSet:
    return feature_set(name)


def _defaults(rows: pl.DataFrame) -> dict[str, int]:
    out = {}
    for k in ("new_tokens", "batch_size"):
        out[k] = int(rows[k].mode().sort()[0])
    return out


def _ranges(rows: pl.DataFrame) -> dict[str, list[float]]:
    return {k: [float(rows[k].min()), float(rows[k].max())] for k in KNOBS}


def _versions() -> dict[str, str]:
    import scipy

    from molmo_latency import __version__

    return {"molmo_latency": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "polars": pl.__version__, "scipy": scipy.__version__}
