"""A fitted latency estimator (hold): predict, save and load with no pickle.

The estimator answers "how long will this whole request take, for N output tokens, at P50 and
P95": prefill (vision + projector + prefill) from its own linear costs, every decode step 0 ..
N - 2 from the per-position decode model (summed in closed form), the measured gaps (``other_ms``)
from theirs; the P50/P95 of prefill, of the decode total and of the whole request are each
calibrated on held-out requests (split conformal on y / predicted). ``new_tokens`` may be one N,
an array of N (one per configuration) or an :class:`OutputLengths` distribution (the budget for an
unknown N: quantiles of the mixture over N).

A model directory holds ``model.json`` (feature set, calibration, token map, training runs, split,
metrics, versions and the SHA-256 of the weights), ``weights.safetensors`` (coefficients per
linear model, calibration ratios), ``evaluation.parquet`` (held-out requests with their
predictions), ``evaluation_steps.parquet`` (held-out decode steps) and the plots ``parity.png``
and ``decode_by_position.png``.

Example:
    >>> import tempfile
    >>> from molmo_latency.estimator import Estimator, example_requests, fit_estimator
    >>> est = fit_estimator(example_requests(seed=0))
    >>> again = Estimator.load(est.save(tempfile.mkdtemp()))
    >>> p = again.predict({"crops": [1, 8], "top_k": 2, "blocks": 4, "prompt_tokens": 32, "new_tokens": 64})
    >>> p.columns[-3:]
    ['request_p50_ms', 'request_p95_ms', 'in_training_range']
    >>> bool((p["request_p95_ms"] >= p["request_p50_ms"]).all())
    True
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import msgspec
import numpy as np
import polars as pl

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator.features import (KNOB_MIN, KNOBS, OUTPUTS, TARGETS, TOKENS, FeatureSet, TokenMap,
                                              config_arrays, output_names)

__all__ = ["Estimator", "OutputLengths", "output_names"]

FORMAT_VERSION = 2
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
EVALUATION = "evaluation.parquet"
EVALUATION_STEPS = "evaluation_steps.parquet"
FLOOR_MS = 1e-6  # a linear model may go to 0 or below far outside its data; predictions stay positive
REQUIRED = ("crops", "top_k", "blocks", "prompt_tokens")
MIXED = ("decode_total_ms", "request_ms")  # outputs whose calibration ratios are kept for N distributions


class OutputLengths:
    """A distribution of output lengths (new tokens), e.g. the answer lengths of a dataset: pass it
    as ``new_tokens`` to get the P50/P95 budget of a request whose N is not known in advance.

    Example:
        >>> d = OutputLengths([8, 8, 32, 64])
        >>> d.values.tolist(), d.weights.tolist()
        ([8.0, 32.0, 64.0], [0.5, 0.25, 0.25])
    """

    def __init__(self, lengths: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None):
        lengths = np.asarray(lengths, dtype=np.float64).ravel()
        if lengths.size == 0:
            raise EstimatorError("the output-length distribution is empty; give at least one length")
        w = np.ones_like(lengths) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != lengths.shape or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise EstimatorError("output-length weights must be one finite, non-negative number per length, "
                                 "not all zero")
        bad = ~(lengths >= 1) | (lengths != np.round(lengths))
        if bad.any():
            raise EstimatorError(f"output lengths must be whole numbers >= 1; got {_num(lengths[bad][0])}")
        values, inverse = np.unique(lengths, return_inverse=True)
        self.values = values
        self.weights = np.bincount(inverse, weights=w) / w.sum()

    @classmethod
    def from_file(cls, path: str | Path) -> "OutputLengths":
        """Lengths from a text file (numbers separated by spaces, commas or new lines), a JSON list,
        or a Parquet file's ``output_tokens`` (or ``new_tokens``) column."""
        p = Path(path)
        if p.is_dir():
            raise EstimatorError(f"{p} is a directory; give a file of output lengths (text, JSON list or Parquet)")
        if not p.is_file():
            raise EstimatorError(f"output-length file {p} does not exist")
        if p.suffix == ".parquet":
            try:
                frame = pl.read_parquet(p)
            except Exception as exc:  # noqa: BLE001 - polars raises several kinds
                raise EstimatorError(f"{p} cannot be read as Parquet ({exc})") from None
            col = next((c for c in ("output_tokens", "new_tokens") if c in frame.columns), None)
            if col is None:
                raise EstimatorError(f"{p} has no output_tokens or new_tokens column (has {frame.columns})")
            return cls(frame[col].drop_nulls().to_numpy())
        text = p.read_text(encoding="utf-8", errors="replace")
        try:
            values = json.loads(text) if text.lstrip().startswith("[") else [
                float(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise EstimatorError(f"{p} is not a list of output lengths (numbers separated by spaces, commas or "
                                 "new lines, or a JSON list)") from None
        return cls(values)

    def __repr__(self) -> str:
        return f"OutputLengths({len(self.values)} lengths, {self.values.min():g}..{self.values.max():g})"


def _num(v: float) -> str:
    v = float(v)
    return str(int(v)) if math.isfinite(v) and v == round(v) else repr(v)


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Per row of `values` (n, m) with weights (m,) summing to 1: the smallest value whose
    cumulative weight reaches each level. Returns (n, len(levels)).

    Example:
        >>> weighted_quantiles(np.array([[3.0, 1.0, 2.0]]), np.array([0.2, 0.5, 0.3]), [0.5, 0.9]).tolist()
        [[1.0, 3.0]]
    """
    order = np.argsort(values, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    cum = np.cumsum(weights[order], axis=1)
    out = np.empty((values.shape[0], len(levels)))
    for j, level in enumerate(levels):
        idx = np.minimum((cum < level - 1e-12).sum(axis=1), values.shape[1] - 1)
        out[:, j] = v[np.arange(values.shape[0]), idx]
    return out


class _FeatureSetMeta(msgspec.Struct):
    name: str
    digest: str
    names: dict[str, list[str]]


class _TokenMapMeta(msgspec.Struct):
    tokens_per_crop: float
    image_offset: float
    input_offset: float
    exact: bool


class _CalibrationMeta(msgspec.Struct):
    p50_factor: float
    p95_factor: float
    rows: int
    configs: int
    scale: str = "ratio"  # "ratio": P = mu * factor; "sd": P = mu * (1 + factor * sd(N))


class _ModelMeta(msgspec.Struct):
    """What load() relies on in model.json (the rest is information for people)."""

    format_version: int
    feature_set: _FeatureSetMeta
    targets: list[str]
    coverage: float
    token_map: _TokenMapMeta
    defaults: dict[str, int]
    knob_ranges: dict[str, list[float]]
    calibration: dict[str, _CalibrationMeta]
    weights_sha256: str
    model: dict[str, Any]
    noise: dict[str, float] | None = None


class Estimator:
    """P50/P95 of a whole request (prefill, decode total, request) for configurations and N.

    `coef[target]` are the linear costs of the feature set's columns (ms per unit) for
    prefill_total_ms, decode_step_ms and other_ms; `factors[output]` = (p50, p95) multiply the
    linear prediction (split-conformal on relative residuals of calibration configurations);
    `ratios[output]` are the sorted calibration ratios (for distributions of N). With `noise`
    (relative spread of prefill and of one decode step, and the correlation of the steps of one
    request, from the training residuals), decode_total and request are calibrated on the
    normalized score (y - mu) / (mu sd(N)), so that short and long requests each get their own
    width (normalized split conformal): P = mu (1 + score sd(N)); their factors and ratios are
    then scores. The width mu sd(N) grows with N, so P95 grows with N.
    """

    def __init__(self, features: FeatureSet, coef: dict[str, np.ndarray], factors: dict[str, tuple[float, float]],
                 token_map: TokenMap, defaults: dict[str, int], knob_ranges: dict[str, list[float]],
                 meta: dict[str, Any], evaluation: pl.DataFrame | None = None,
                 ratios: dict[str, np.ndarray] | None = None, steps_evaluation: pl.DataFrame | None = None,
                 noise: dict[str, float] | None = None):
        self.features = features
        self.coef = {t: np.ascontiguousarray(c, dtype=np.float64) for t, c in coef.items()}
        self.factors = {t: (float(a), float(b)) for t, (a, b) in factors.items()}
        self.ratios = {t: np.sort(np.asarray(r, dtype=np.float64)) for t, r in (ratios or {}).items()}
        self.token_map = token_map
        self.defaults = dict(defaults)
        self.knob_ranges = {k: [float(v[0]), float(v[1])] for k, v in knob_ranges.items()}
        self.meta = meta
        self.evaluation = evaluation
        self.steps_evaluation = steps_evaluation
        self.targets = tuple(coef)
        # with `noise`, decode_total and request are calibrated on (y - mu) / (mu sd(N)) (normalized
        # conformal) and their factors and ratios are in those units; without, plain ratios y / mu
        self.noise = None if noise is None else {k: float(v) for k, v in noise.items()}

    @property
    def _blocks_total(self) -> int | None:
        return (self.meta.get("model") or {}).get("blocks_total")

    @property
    def metrics(self) -> dict[str, Any]:
        """Held-out metrics (see fit_estimator)."""
        return self.meta.get("metrics", {})

    @property
    def coverage(self) -> float:
        return float(self.meta.get("coverage", 0.95))

    # ------------------------------------------------------------------ predict
    def _configs(self, *, crops, top_k, blocks, prompt_tokens, batch_size=None, image_tokens=None,
                 input_tokens=None, **extra) -> dict[str, np.ndarray]:
        tm = self.token_map
        x = config_arrays(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens,
                          batch_size=self.defaults["batch_size"] if batch_size is None else batch_size,
                          **({} if image_tokens is None else {"image_tokens": image_tokens}),
                          **({} if input_tokens is None else {"input_tokens": input_tokens}), **extra)
        if "image_tokens" not in x:
            x["image_tokens"] = tm.image_tokens(x["crops"])
        if "input_tokens" not in x:
            x["input_tokens"] = tm.input_tokens(x["image_tokens"], x["prompt_tokens"])
        for key, low in KNOB_MIN.items():
            if key not in x:
                continue
            bad = ~(x[key] >= low)  # also catches NaN
            if bad.any():
                i = int(np.argmax(bad))
                where = f" (configuration {i} of {bad.size})" if bad.size > 1 else ""
                raise EstimatorError(f"{key} must be >= {low}; got {_num(x[key][i])}{where}")
        if self._blocks_total is not None and (x["blocks"] > self._blocks_total).any():
            raise EstimatorError(f"blocks must be <= {self._blocks_total}, the model's number of blocks; got "
                                 f"{_num(x['blocks'].max())}")
        return x

    def _mu(self, x: Mapping[str, np.ndarray], steps: np.ndarray,
            prefill: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Uncalibrated (linear) predictions for configurations `x` with `steps` decode steps
        (`prefill`, when given, is the prefill prediction already computed for these rows)."""
        fs = self.features
        x = {**x, "decode_steps": steps}
        req = fs.design(x) if prefill is None else {"other_ms": fs.design_other(x)}
        if prefill is None:
            prefill = np.maximum(req["prefill_total_ms"] @ self.coef["prefill_total_ms"], FLOOR_MS)
        other = np.maximum(req["other_ms"] @ self.coef["other_ms"], 0.0)
        decode = fs.step_sum(x, steps) @ self.coef["decode_step_ms"]
        decode = np.where(steps > 0, np.maximum(decode, FLOOR_MS * steps), 0.0)
        return {"prefill_total_ms": prefill, "decode_total_ms": decode, "other_ms": other,
                "request_ms": prefill + decode + other}

    def relative_sd(self, name: str, mu: Mapping[str, np.ndarray], steps: np.ndarray) -> np.ndarray:
        """The modelled relative spread of `name` (decode_total_ms or request_ms) for rows with
        linear predictions `mu` and `steps` decode steps: prefill and steps with their relative
        spreads, the steps of one request correlated by `step_correlation`."""
        nz = self.noise or {}
        sp, ss, rho = nz.get("prefill_rel_sd", 0.0), nz.get("step_rel_sd", 0.0), nz.get("step_correlation", 1.0)
        shrink = rho + (1.0 - rho) / np.maximum(steps, 1.0)
        if name == "decode_total_ms":
            sd = ss * np.sqrt(shrink) * np.ones_like(steps)
        else:
            var = (mu["prefill_total_ms"] * sp) ** 2 + (mu["decode_total_ms"] * ss) ** 2 * shrink
            sd = np.sqrt(var) / np.maximum(mu["request_ms"], FLOOR_MS)
        return np.maximum(sd, 1e-6)

    def _scaled(self, name: str) -> bool:
        return self.noise is not None and name in MIXED

    def _calibrated(self, name: str, mu: Mapping[str, np.ndarray], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P50 and P95 of output `name` from the linear predictions."""
        f50, f95 = self.factors[name]
        if not self._scaled(name):
            return mu[name] * f50, mu[name] * f95
        sd, m = self.relative_sd(name, mu, steps), mu[name]
        floor = np.where(m > 0, FLOOR_MS, 0.0)  # a request without decode steps has a decode total of 0
        return np.maximum(m * (1.0 + f50 * sd), floor), np.maximum(m * (1.0 + f95 * sd), floor)

    def predict_linear(self, *, crops, top_k, blocks, prompt_tokens, new_tokens=None, batch_size=None,
                       image_tokens=None, input_tokens=None) -> dict[str, np.ndarray]:
        """The uncalibrated linear predictions (ms): prefill_total_ms, decode_total_ms (sum of the
        decode steps), other_ms (gaps) and request_ms, their sum, before the P50/P95 calibration.

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> m = est.predict_linear(crops=1, top_k=2, blocks=4, prompt_tokens=32, new_tokens=16)
            >>> bool(m["request_ms"][0] == m["prefill_total_ms"][0] + m["decode_total_ms"][0] + m["other_ms"][0])
            True
        """
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size,
                          image_tokens=image_tokens, input_tokens=input_tokens,
                          new_tokens=self.defaults["new_tokens"] if new_tokens is None else new_tokens)
        return self._mu(x, x["new_tokens"] - 1.0)

    def predict_arrays(self, *, crops, top_k, blocks, prompt_tokens, new_tokens=None, batch_size=None,
                       image_tokens=None, input_tokens=None) -> dict[str, np.ndarray]:
        """The fast batched path: numpy arrays (or scalars) in, {output column: float64 array} out.

        `new_tokens` (N, output tokens, so N - 1 decode steps) is a scalar or an array matching
        the configurations, or an :class:`OutputLengths` distribution (then the P50/P95 of
        decode_total and request are quantiles of the mixture over N). Image and input tokens
        follow from crops and prompt tokens through the model's token map unless given;
        new_tokens and batch_size default to the training data's values.

        Example:
            >>> import numpy as np
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> out = est.predict_arrays(crops=np.array([1, 4, 8]), top_k=2, blocks=np.array([2, 4, 4]),
            ...                          prompt_tokens=32, new_tokens=np.array([8, 8, 64]))
            >>> out["request_p50_ms"].shape, bool((out["request_p95_ms"] >= out["request_p50_ms"]).all())
            ((3,), True)
            >>> budget = est.predict_arrays(crops=1, top_k=2, blocks=4, prompt_tokens=32,
            ...                             new_tokens=OutputLengths([4, 8, 16, 64]))
            >>> bool(budget["request_p95_ms"][0] > est.predict_arrays(crops=1, top_k=2, blocks=4, prompt_tokens=32,
            ...                                                       new_tokens=16)["request_p95_ms"][0])
            True
        """
        if isinstance(new_tokens, OutputLengths):
            x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens,
                              batch_size=batch_size, image_tokens=image_tokens, input_tokens=input_tokens)
            return self._predict_distribution(x, new_tokens)
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size,
                          image_tokens=image_tokens, input_tokens=input_tokens,
                          new_tokens=self.defaults["new_tokens"] if new_tokens is None else new_tokens)
        steps = x["new_tokens"] - 1.0
        mu = self._mu(x, steps)
        out = self._quantiles(mu, steps)
        return {k: out[k] for k in (*_ordered_outputs(),)}

    def _quantiles(self, mu: dict[str, np.ndarray], steps: np.ndarray) -> dict[str, np.ndarray]:
        """Calibrated P50/P95 of prefill, decode total and request, and decode per step."""
        out: dict[str, np.ndarray] = {}
        for name in ("prefill_total_ms", "decode_total_ms", "request_ms"):
            p50, p95 = output_names(name)
            out[p50], out[p95] = self._calibrated(name, mu, steps)
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.where(steps > 0, 1.0 / steps, np.nan)
        out["decode_per_token_p50_ms"] = out["decode_total_p50_ms"] * per
        out["decode_per_token_p95_ms"] = out["decode_total_p95_ms"] * per
        return out

    def _predict_distribution(self, x: dict[str, np.ndarray], dist: OutputLengths) -> dict[str, np.ndarray]:
        n, m = len(x["crops"]), dist.values.size
        rep = {k: np.repeat(v, m) for k, v in x.items()}
        steps = np.tile(dist.values - 1.0, n)
        mu = self._mu(rep, steps)
        out: dict[str, np.ndarray] = {}
        f50, f95 = self.factors["prefill_total_ms"]
        out["prefill_total_p50_ms"] = mu["prefill_total_ms"][::m] * f50
        out["prefill_total_p95_ms"] = mu["prefill_total_ms"][::m] * f95
        for name in MIXED:
            r = self.ratios.get(name)
            if r is None or r.size == 0:
                r = np.array(self.factors[name])  # no ratios kept: the two factors as a coarse stand-in
            k = r.size
            level95 = min(1.0, math.ceil((k + 1) * self.coverage) / k)
            if self._scaled(name):
                sd = self.relative_sd(name, mu, steps).reshape(n, m)
                mm = mu[name].reshape(n, m)[:, :, None]
                values = np.maximum(mm * (1.0 + r[None, None, :] * sd[:, :, None]),
                                    np.where(mm > 0, FLOOR_MS, 0.0)).reshape(n, m * k)
            else:
                values = (mu[name].reshape(n, m)[:, :, None] * r[None, None, :]).reshape(n, m * k)
            weights = np.repeat(dist.weights / k, k)
            q = weighted_quantiles(values, weights, [0.5, level95])
            p50, p95 = output_names(name)
            out[p50], out[p95] = q[:, 0], np.maximum(q[:, 1], q[:, 0])
        mean_steps = float(np.dot(dist.weights, dist.values - 1.0))
        per = 1.0 / mean_steps if mean_steps > 0 else np.nan
        out["decode_per_token_p50_ms"] = out["decode_total_p50_ms"] * per
        out["decode_per_token_p95_ms"] = out["decode_total_p95_ms"] * per
        return {k: out[k] for k in _ordered_outputs()}

    def predict_grid(self, *, crops, top_k, blocks, prompt_tokens, new_tokens, batch_size=None) -> dict[str, np.ndarray]:
        """Every configuration at every N of the vector `new_tokens`: {output: (configs, len(N))}.

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> g = est.predict_grid(crops=[1, 4], top_k=2, blocks=4, prompt_tokens=32, new_tokens=np.arange(1, 129))
            >>> g["request_p50_ms"].shape, bool((np.diff(g["request_p50_ms"], axis=1) > 0).all())
            ((2, 128), True)
        """
        grid = np.atleast_1d(np.asarray(new_tokens, dtype=np.float64))
        if grid.ndim != 1:
            raise EstimatorError(f"new_tokens must be a 1-D vector of N for predict_grid, got shape {grid.shape}")
        bad = ~(grid >= 1)
        if bad.any():
            raise EstimatorError(f"new_tokens must be >= 1; got {_num(grid[bad][0])}")
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size)
        n, m = len(x["crops"]), grid.size
        prefill = np.maximum(self.features.design({**x, "decode_steps": np.zeros(n)})["prefill_total_ms"]
                             @ self.coef["prefill_total_ms"], FLOOR_MS)
        steps = np.tile(grid - 1.0, n)
        mu = self._mu({k: np.repeat(v, m) for k, v in x.items()}, steps, prefill=np.repeat(prefill, m))
        out = self._quantiles(mu, steps)
        return {k: out[k].reshape(n, m) for k in _ordered_outputs()}

    def predict_positions(self, *, crops, top_k, blocks, prompt_tokens, steps, batch_size=None, image_tokens=None,
                          input_tokens=None) -> dict[str, np.ndarray]:
        """P50/P95 of single decode steps at positions `steps` (0 = the first decode step), one per
        row (configurations and steps broadcast together).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> est.predict_positions(crops=1, top_k=2, blocks=4, prompt_tokens=32, steps=np.arange(4))["decode_step_p50_ms"].shape
            (4,)
        """
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens,
                          batch_size=batch_size, image_tokens=image_tokens, input_tokens=input_tokens, step=steps)
        step = x.pop("step")
        if not (step >= 0).all():
            raise EstimatorError(f"decode step positions must be >= 0; got {_num(step[~(step >= 0)][0])}")
        mu = np.maximum(self.features.step(x, step) @ self.coef["decode_step_ms"], FLOOR_MS)
        f50, f95 = self.factors["decode_step_ms"]
        return {"decode_step_p50_ms": mu * f50, "decode_step_p95_ms": mu * f95}

    def predict(self, configs: pl.DataFrame | Mapping[str, Any]) -> pl.DataFrame:
        """Predictions for configurations given as a polars frame or a dict of columns/scalars.

        Needs crops, top_k, blocks and prompt_tokens; new_tokens, batch_size, image_tokens and
        input_tokens are optional. Returns the configuration columns, the P50/P95 columns and
        ``in_training_range`` (every knob within the values the model was fitted on).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> est.predict({"crops": 2, "top_k": 1, "blocks": 3, "prompt_tokens": 16}).height
            1
        """
        if isinstance(configs, pl.DataFrame):
            cols = {c: configs[c].to_numpy() for c in (*KNOBS, *TOKENS) if c in configs.columns}
        elif isinstance(configs, Mapping):
            unknown = sorted(set(configs) - set(KNOBS) - set(TOKENS))
            if unknown:
                raise EstimatorError(f"unknown configuration keys {unknown}; known: {', '.join((*KNOBS, *TOKENS))}")
            cols = dict(configs)
        else:
            raise EstimatorError(f"predict() takes a polars DataFrame or a dict of columns, got {type(configs).__name__}")
        missing = [k for k in REQUIRED if k not in cols]
        if missing:
            raise EstimatorError(f"configurations lack {missing}; give crops, top_k, blocks and prompt_tokens")
        try:
            out = self.predict_arrays(**cols)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, EstimatorError):
                raise
            raise EstimatorError(f"configuration values must be numbers: {exc}") from None
        x = config_arrays(**{k: cols.get(k, self.defaults.get(k)) for k in KNOBS})
        n = len(next(iter(out.values())))
        x = {k: np.broadcast_to(v, (n,)) for k, v in x.items()}
        inside = np.ones(n, dtype=bool)
        for key, (lo, hi) in self.knob_ranges.items():
            if key in x:
                inside &= (x[key] >= lo) & (x[key] <= hi)
        frame = pl.DataFrame({k: x[k].astype(np.int64) if np.all(x[k] == np.round(x[k])) else x[k] for k in KNOBS})
        return frame.with_columns(*[pl.Series(k, v) for k, v in out.items()], pl.Series("in_training_range", inside))

    # ------------------------------------------------------------------ save / load
    def save(self, model_dir: str | Path, *, plots=None) -> Path:
        """Write model.json, weights.safetensors, the evaluations and, when `plots` is given, the
        plots; returns the directory.

        `plots` is the show layer's policy ``plots(evaluation, steps_evaluation, metrics, model_dir)
        -> {"parity_plot": name or None, "position_plot": name or None}`` (the CLI passes
        :func:`molmo_latency.show.estimator_plots.write_estimator_plots`); the estimator itself
        never draws.

        Example:
            >>> import tempfile
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> d = fit_estimator(example_requests(seed=0)).save(tempfile.mkdtemp())
            >>> sorted(p.name for p in d.iterdir())
            ['evaluation.parquet', 'evaluation_steps.parquet', 'model.json', 'weights.safetensors']
        """
        from safetensors.numpy import save as st_save

        from molmo_latency.hold.rundir import atomic_write_bytes, atomic_write_parquet

        d = Path(model_dir)
        if d.exists() and not d.is_dir():
            raise EstimatorError(f"--out {d} exists and is not a directory; choose a directory")
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"{t}.coef": self.coef[t] for t in self.targets}
        tensors.update({f"{t}.calib_ratios": r for t, r in self.ratios.items()})
        blob = st_save(tensors, metadata={"format": "molmo-latency-estimator", "format_version": str(FORMAT_VERSION)})
        atomic_write_bytes(d / WEIGHTS, blob)
        files = {"weights": WEIGHTS, "evaluation": None, "evaluation_steps": None, "parity_plot": None,
                 "position_plot": None}
        if self.evaluation is not None:
            atomic_write_parquet(self.evaluation, d / EVALUATION)
            files["evaluation"] = EVALUATION
        if self.steps_evaluation is not None:
            atomic_write_parquet(self.steps_evaluation, d / EVALUATION_STEPS)
            files["evaluation_steps"] = EVALUATION_STEPS
        if plots is not None:
            files.update(plots(self.evaluation, self.steps_evaluation, self.meta.get("metrics", {}), d))
        self.meta = {**self.meta, "weights_sha256": hashlib.sha256(blob).hexdigest(), "files": files}
        atomic_write_bytes(d / MODEL_JSON, (json.dumps(_jsonable(self.meta), indent=2, allow_nan=False) + "\n").encode())
        return d

    @classmethod
    def load(cls, model_dir: str | Path, *, feature_set: str | None = None) -> "Estimator":
        """Read a model directory written by save(); any corruption or mismatch is an EstimatorError.

        `feature_set`, when given, must be the one the model was fitted with.

        Example:
            >>> import tempfile
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> d = fit_estimator(example_requests(seed=0)).save(tempfile.mkdtemp())
            >>> Estimator.load(d, feature_set="knobs")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            molmo_latency.errors.EstimatorError: ... was fitted with feature set 'physical', not 'knobs'; ...
        """
        from safetensors.numpy import load as st_load

        d = Path(model_dir)
        if d.exists() and not d.is_dir():
            raise EstimatorError(f"{d} is a file, not a model directory; give the directory written by "
                                 "`molmo-latency fit ... --out MODEL_DIR`")
        if not d.is_dir():
            raise EstimatorError(f"model directory {d} does not exist; create it with `molmo-latency fit ... --out {d}`")
        mj, wp = d / MODEL_JSON, d / WEIGHTS
        for p in (mj, wp):
            if not p.is_file():
                raise EstimatorError(f"{d} is not a complete estimator model: {p.name} is missing; "
                                     "refit with `molmo-latency fit`")
        try:
            raw = json.loads(mj.read_text(encoding="utf-8"))
            version = raw.get("format_version") if isinstance(raw, dict) else None
            if isinstance(version, int) and version != FORMAT_VERSION:
                raise EstimatorError(f"{mj} has format_version {version}; this molmo-latency reads "
                                     f"{FORMAT_VERSION}: refit with this version")
            meta = msgspec.convert(raw, type=_ModelMeta)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EstimatorError(f"{mj} is not valid JSON ({exc}); the file is corrupted: refit") from None
        except msgspec.ValidationError as exc:
            raise EstimatorError(f"{mj} is not an estimator model description ({exc}); the file was edited "
                                 "or written by something else: refit") from None
        blob = wp.read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        if sha != meta.weights_sha256:
            raise EstimatorError(f"{wp} does not belong to {mj} (SHA-256 {sha[:12]}..., expected "
                                 f"{meta.weights_sha256[:12]}...): it was truncated, changed or copied from another "
                                 "model; refit or restore both files together")
        try:
            arrays = st_load(blob)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise EstimatorError(f"{wp} cannot be read as safetensors ({exc}); refit") from None
        fs_meta = meta.feature_set
        if feature_set is not None and feature_set != fs_meta.name:
            raise EstimatorError(f"{d} was fitted with feature set {fs_meta.name!r}, not {feature_set!r}; "
                                 f"predict with {fs_meta.name!r} or refit with --feature-set {feature_set}")
        from molmo_latency.estimator.features import FEATURE_SETS

        if fs_meta.name not in FEATURE_SETS:
            raise EstimatorError(f"{d} was fitted with feature set {fs_meta.name!r}, which this molmo-latency does "
                                 f"not have (known: {', '.join(FEATURE_SETS)}); refit")
        fs = FEATURE_SETS[fs_meta.name]
        ours = {t: list(v) for t, v in fs.names.items()}
        theirs = {t: v for t, v in fs_meta.names.items()}
        if sorted(meta.targets) != sorted(TARGETS):
            raise EstimatorError(f"{mj} describes the linear models {meta.targets}, not {list(TARGETS)}; refit")
        for t in meta.targets:
            if t not in ours or ours[t] != theirs.get(t):
                raise EstimatorError(f"{d}: feature set {fs.name!r} of the model has features {theirs.get(t)} for {t}, "
                                     f"but this molmo-latency's {fs.name!r} has {ours.get(t)}; the model was fitted "
                                     "with another feature set: refit")
        if fs_meta.digest != fs.digest():
            raise EstimatorError(f"{d}: feature set digest {fs_meta.digest} differs from this molmo-latency's "
                                 f"{fs.name!r} ({fs.digest()}); refit")
        coef, factors, ratios = {}, {}, {}
        for t in meta.targets:
            key = f"{t}.coef"
            if key not in arrays:
                raise EstimatorError(f"{wp} has no array {key!r} (has {sorted(arrays)}); refit")
            c = arrays[key]
            if c.shape != (len(theirs[t]),) or not np.all(np.isfinite(c)):
                raise EstimatorError(f"{wp}: {key} has shape {c.shape}, expected ({len(theirs[t])},) finite values "
                                     f"for the features {theirs[t]}; refit")
            coef[t] = c
        for name in OUTPUTS:
            if name not in meta.calibration:
                raise EstimatorError(f"{mj} has no calibration for {name}; refit")
            cal = meta.calibration[name]
            want = "sd" if (meta.noise is not None and name in MIXED) else "ratio"
            if cal.scale != want:
                raise EstimatorError(f"{mj}: calibration of {name} has scale {cal.scale!r}, expected {want!r}; refit")
            low = -math.inf if want == "sd" else 0.0
            if not (low < cal.p50_factor <= cal.p95_factor and math.isfinite(cal.p95_factor)):
                raise EstimatorError(f"{mj}: calibration of {name} must have {'' if want == 'sd' else '0 < '}"
                                     f"p50_factor <= p95_factor, got {cal.p50_factor}, {cal.p95_factor}; refit")
            factors[name] = (cal.p50_factor, cal.p95_factor)
        for name in MIXED:
            key = f"{name}.calib_ratios"
            if key in arrays:
                r = arrays[key]
                if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)) or (meta.noise is None and (r <= 0).any()):
                    raise EstimatorError(f"{wp}: {key} must be a non-empty vector of finite calibration scores; refit")
                ratios[name] = r
        for k in ("new_tokens", "batch_size"):
            if k not in meta.defaults:
                raise EstimatorError(f"{mj}: defaults lack {k!r}; refit")
        tm = TokenMap(**msgspec.structs.asdict(meta.token_map))
        evaluation = _read_optional(d / EVALUATION)
        steps_evaluation = _read_optional(d / EVALUATION_STEPS)
        if meta.noise is not None:
            bad = {k: v for k, v in meta.noise.items() if not (math.isfinite(v) and v >= 0)}
            if set(meta.noise) != {"prefill_rel_sd", "step_rel_sd", "step_correlation"} or bad:
                raise EstimatorError(f"{mj}: noise must give finite prefill_rel_sd, step_rel_sd and step_correlation "
                                     f">= 0, got {meta.noise}; refit")
        return cls(fs, coef, factors, tm, meta.defaults, meta.knob_ranges, raw, evaluation, ratios, steps_evaluation,
                   noise=meta.noise)

    def __repr__(self) -> str:
        return f"Estimator(feature_set={self.features.name!r}, targets={list(self.targets)})"


def _ordered_outputs() -> tuple[str, ...]:
    return ("prefill_total_p50_ms", "prefill_total_p95_ms", "decode_total_p50_ms", "decode_total_p95_ms",
            "decode_per_token_p50_ms", "decode_per_token_p95_ms", "request_p50_ms", "request_p95_ms")


def _read_optional(path: Path) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except Exception:  # noqa: BLE001 - the evaluation is information only
        return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
