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
    ['request_p50_ms', 'request_p95_ms', 'in_range']
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
                                              as_numpy, config_arrays, output_names)

__all__ = ["Estimator", "OutputLengths", "output_names"]

FORMAT_VERSION = 4
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
EVALUATION = "evaluation.parquet"
EVALUATION_STEPS = "evaluation_steps.parquet"
FLOOR_MS = 1e-6  # a linear model may go to 0 or below far outside its data; predictions stay positive
REQUIRED = ("crops", "top_k", "blocks", "prompt_tokens")
MIXED = ("decode_total_ms", "request_ms")  # outputs whose calibration ratios are kept for N distributions
# what the fit measures of the noise (ratios of measured to the median model, on training data; see spread)
NOISE = ("prefill_mean_ratio", "prefill_ratio_var", "step_mean_ratio", "step_ratio_var", "step_correlation",
         "prefill_step_cov")


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
    scale: str = "ratio"  # "ratio": P = mu * factor; "log_sd": P = median(N) * exp(factor * log_sd(N))


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
    files_sha256: dict[str, str]
    content_sha256: str
    model: dict[str, Any]
    noise: dict[str, float] | None = None


class Estimator:
    """P50/P95 of a whole request (prefill, decode total, request) for configurations and N.

    `coef[target]` are the linear costs of the feature set's columns (ms per unit) for
    prefill_total_ms, decode_step_ms and other_ms; `factors[output]` = (p50, p95) multiply the
    linear prediction (split-conformal on relative residuals of calibration configurations);
    `ratios[output]` are the sorted calibration ratios (for distributions of N). With `noise`
    (mean and variance of the ratio of prefill and of one decode step to their median models, the
    correlation of the steps of one request and their covariance with prefill, from the training
    residuals), decode_total and request are calibrated on the normalized score
    (log y - log median(N)) / log_sd(N) of a log-normal with the modelled mean and variance (see
    :meth:`spread`), so that short and long requests each get their own centre and width:
    P = median(N) exp(score log_sd(N)); their factors and ratios are then scores.
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
        self.knob_ranges = knob_ranges
        self.meta = meta
        self.evaluation = evaluation
        self.steps_evaluation = steps_evaluation
        self.targets = tuple(coef)
        # with `noise`, decode_total and request are calibrated on (log y - log median) / log_sd
        # (normalized conformal, see spread) and their factors and ratios are in those units;
        # without, plain ratios y / mu
        self.noise = None if noise is None else {k: float(v) for k, v in noise.items()}
        self._bounds: dict[tuple, tuple] = {}  # check_possible's limits per knob set (built once)
        self._ranges: dict[tuple, tuple] = {}  # in_range's fitted ranges per knob set

    @property
    def knob_ranges(self) -> dict[str, list[float]]:
        """The fitted range [min, max] of every knob (and of N, as ``new_tokens``)."""
        return self._knob_ranges

    @knob_ranges.setter
    def knob_ranges(self, ranges: Mapping[str, Sequence[float]]) -> None:
        self._knob_ranges = {k: [float(v[0]), float(v[1])] for k, v in ranges.items()}
        self._ranges = {}

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

    @property
    def _experts(self) -> int | None:
        return (self.meta.get("model") or {}).get("experts")

    # ------------------------------------------------------------------ the range check (every path)
    def check_possible(self, x: Mapping[str, np.ndarray]) -> None:
        """Refuse knob values this model cannot take (the same EstimatorError on every path:
        predict, predict_arrays, predict_grid, plan, the controller's calls and the CLI): below
        the knob's minimum, not a whole number, more blocks than the model has, a top-k above its
        experts per MoE layer.

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0), model={"blocks_total": 4, "experts": 8})
            >>> est.predict_arrays(crops=1, top_k=[2, 9], blocks=4, prompt_tokens=8)
            Traceback (most recent call last):
            ...
            molmo_latency.errors.EstimatorError: top_k must be between 1 and 8 (the model's experts per MoE layer); got 9 (configuration 1 of 2)
        """
        limits = {"blocks": (self._blocks_total, "the model's blocks"),
                  "top_k": (self._experts, "the model's experts per MoE layer")}
        keys = tuple(k for k in KNOB_MIN if k in x)
        values = _rows([x[k] for k in keys])  # one pass over every knob
        key = (keys, limits["blocks"][0], limits["top_k"][0])
        if key not in self._bounds:
            # the largest float stands for "no limit", so that infinities fail the comparison as NaN does
            self._bounds[key] = (np.array([KNOB_MIN[k] for k in keys], dtype=np.float64)[:, None],
                                 np.array([limits.get(k, (None,))[0] or np.finfo(np.float64).max for k in keys],
                                          dtype=np.float64)[:, None],
                                 sum(k in KNOBS for k in keys))  # the knobs come first in KNOB_MIN
        low, high, n_whole = self._bounds[key]
        with np.errstate(invalid="ignore"):
            knobs = values[:n_whole]
            if ((values >= low) & (values <= high)).all() and (knobs == np.floor(knobs)).all():
                return
            outside = ~(values >= low) | ~(values <= high)  # NaN and infinities too
            fraction = (np.arange(len(keys)) < n_whole)[:, None] & (values != np.round(values))
        for row, key in enumerate(keys):
            v = values[row]
            hi, what = limits.get(key, (None, ""))
            span = f">= {KNOB_MIN[key]}" if hi is None else f"between {KNOB_MIN[key]} and {hi} ({what})"
            for bad, rule in ((outside[row], span), (fraction[row], "a whole number")):
                if bad.any():
                    i = int(np.argmax(bad))
                    where = f" (configuration {i} of {bad.size})" if bad.size > 1 else ""
                    raise EstimatorError(f"{key} must be {rule}; got {_num(v[i])}{where}")

    def in_range(self, x: Mapping[str, Any]) -> np.ndarray:
        """Per row: is every knob (and N, when given) within the values the model was fitted on?
        Outside is extrapolation: answered, and flagged with this False.

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> est.in_range({"crops": np.array([1, 16]), "new_tokens": 4}).tolist()
            [True, False]
        """
        given = {k: v for k, v in x.items() if k in self.knob_ranges}
        if not given:
            return np.ones(1, dtype=bool)
        shapes = {v.shape for v in given.values() if isinstance(v, np.ndarray) and v.ndim == 1}
        if not (len(shapes) == 1 and all(isinstance(v, np.ndarray) and v.ndim == 1 for v in given.values())):
            given = config_arrays(**given)  # otherwise: already the broadcast float arrays of _configs
        keys = tuple(given)
        if keys not in self._ranges:
            self._ranges[keys] = tuple(np.array([self.knob_ranges[k][i] for k in keys])[:, None] for i in (0, 1))
        lo, hi = self._ranges[keys]
        values = _rows(list(given.values()))
        return ((values >= lo) & (values <= hi)).all(axis=0)

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
        self.check_possible(x)
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

    def spread(self, name: str, mu: Mapping[str, np.ndarray], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The modelled distribution of `name` (decode_total_ms or request_ms) for rows with linear
        predictions `mu` and `steps` decode steps, as a log-normal: (median_ms, log_sd).

        The linear costs are fitted to medians, and the median of a sum of skewed step times is not
        the sum of their medians: it moves from the step median (one step) towards the sum of the
        step *means* as steps add up (the mean of a sum is the sum of the means, and its spread
        shrinks). So the decode total's mean is ``mu * step_mean_ratio``, its variance
        ``(mu)^2 step_ratio_var (rho + (1 - rho) / S)`` (S steps whose ratios to their medians are
        correlated by rho within a request); the request adds prefill (mean and variance of its
        ratio, and its covariance with the request's steps) and the gaps. A log-normal with that
        mean and variance gives the median and the log-spread; calibration scores are
        ``(log y - log median) / log_sd``, comparable across N.

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> mu = est.predict_linear(crops=1, top_k=2, blocks=4, prompt_tokens=32, new_tokens=np.array([2, 64]))
            >>> med, sd = est.spread("decode_total_ms", mu, np.array([1.0, 63.0]))
            >>> bool(sd[1] < sd[0])  # a long request's total spreads relatively less
            True
        """
        nz = self.noise or {}
        ms, vs = nz.get("step_mean_ratio", 1.0), nz.get("step_ratio_var", 0.0)
        rho = nz.get("step_correlation", 1.0)
        d = mu["decode_total_ms"]
        var = d * d * (vs * (rho + (1.0 - rho) / np.maximum(steps, 1.0)))
        mean = d * ms
        if name == "request_ms":
            p = mu["prefill_total_ms"]
            mean = mean + p * nz.get("prefill_mean_ratio", 1.0) + (mu["request_ms"] - p - d)
            var = var + p * p * nz.get("prefill_ratio_var", 0.0) + 2.0 * p * d * nz.get("prefill_step_cov", 0.0)
        mean = np.maximum(mean, FLOOR_MS)
        rel = 1.0 + np.maximum(var, 0.0) / (mean * mean)
        return mean / np.sqrt(rel), np.maximum(np.sqrt(np.log(rel)), 1e-6)

    def _scaled(self, name: str) -> bool:
        return self.noise is not None and name in MIXED

    def _at(self, name: str, mu: Mapping[str, np.ndarray], steps: np.ndarray, *factors: float) -> list[np.ndarray]:
        """Output `name` at calibrated factors (ratios, or scores in units of the modelled log-spread)."""
        if not self._scaled(name):
            return [mu[name] * f for f in factors]
        median, sd = self.spread(name, mu, steps)
        keep = mu[name] > 0  # a request without decode steps has a decode total of 0
        return [np.where(keep, median * np.exp(f * sd), 0.0) for f in factors]

    def _calibrated(self, name: str, mu: Mapping[str, np.ndarray], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P50 and P95 of output `name` from the linear predictions."""
        p50, p95 = self._at(name, mu, steps, *self.factors[name])
        return p50, p95

    def _level(self, name: str, quantile: float) -> float:
        """The calibration-score level that gives `quantile` (split conformal: the ceil((k + 1) q)-th
        of k scores), 0.5 for the median."""
        if quantile == 0.5:
            return 0.5
        k = self._scores(name).size
        return min(1.0, math.ceil((k + 1) * quantile) / k)

    def _scores(self, name: str) -> np.ndarray:
        r = self.ratios.get(name)
        return r if r is not None and r.size else np.array(self.factors[name])  # no scores kept: the two factors

    def factor_at(self, name: str, quantile: float) -> float:
        """The calibrated factor of output `name` (decode_total_ms or request_ms) at `quantile`:
        the P50 and P95 factors at 0.5 and at the fitted coverage, otherwise the split-conformal
        quantile of the kept calibration scores (refused when there are too few for it).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> est.factor_at("request_ms", 0.95) == est.factors["request_ms"][1], est.factor_at("request_ms", 0.9) < est.factor_at("request_ms", 0.95)
            (True, True)
        """
        q = check_quantile(quantile)
        f50, f95 = self.factors[name]
        if q == 0.5:
            return f50
        if abs(q - self.coverage) < 1e-12:
            return f95
        r = self.ratios.get(name)
        if r is None or r.size == 0:
            raise EstimatorError(f"this model kept no calibration scores of {name}: only quantiles 0.5 and "
                                 f"{self.coverage:g} are calibrated; use one of them or refit")
        k = math.ceil((r.size + 1) * q)
        if k > r.size:
            raise EstimatorError(f"quantile {q:g} needs at least {math.ceil(q / (1 - q))} calibration requests, the "
                                 f"model has {r.size}; use a lower quantile or fit on a larger sweep")
        return float(r[max(k, 1) - 1])

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
        """The fast batched path: numpy arrays (or scalars, or torch tensors) in, {output column:
        array} out, with ``in_range`` per row (every knob and N within what the model was fitted
        on; False is extrapolation, answered but flagged). Values the model cannot take are refused
        (see :meth:`check_possible`).

        `new_tokens` (N, output tokens, so N - 1 decode steps) is a scalar or an array matching
        the configurations, or an :class:`OutputLengths` distribution: then the P50/P95 of
        decode_total and request are quantiles of the mixture over N, and there is no per-step
        figure (a quantile of a mixture of totals divided by a mean step count describes no step).
        Image and input tokens follow from crops and prompt tokens through the model's token map
        unless given; new_tokens and batch_size default to the training data's values.

        Example:
            >>> import numpy as np
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> out = est.predict_arrays(crops=np.array([1, 4, 8]), top_k=2, blocks=np.array([2, 4, 4]),
            ...                          prompt_tokens=32, new_tokens=np.array([8, 8, 64]))
            >>> out["request_p50_ms"].shape, bool((out["request_p95_ms"] >= out["request_p50_ms"]).all())
            ((3,), True)
            >>> out["in_range"].tolist()  # fitted on N = 4 and 16: 64 is extrapolation
            [True, True, False]
            >>> budget = est.predict_arrays(crops=1, top_k=2, blocks=4, prompt_tokens=32,
            ...                             new_tokens=OutputLengths([4, 8, 16, 64]))
            >>> bool(budget["request_p95_ms"][0] > est.predict_arrays(crops=1, top_k=2, blocks=4, prompt_tokens=32,
            ...                                                       new_tokens=16)["request_p95_ms"][0])
            True
            >>> "decode_per_token_p50_ms" in budget
            False
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
        return {**{k: out[k] for k in _ordered_outputs()}, "in_range": self.in_range(x)}

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

    def _mixture(self, x: dict[str, np.ndarray], dist: OutputLengths,
                 quantiles: Sequence[float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Quantiles of decode_total and request of the mixture over the distribution's N (each N
        with its calibration scores): ({name: (configs, len(quantiles))}, the linear predictions)."""
        n, m = len(x["crops"]), dist.values.size
        rep = {k: np.repeat(v, m) for k, v in x.items()}
        steps = np.tile(dist.values - 1.0, n)
        mu = self._mu(rep, steps)
        out = {}
        for name in MIXED:
            r = self._scores(name)
            k = r.size
            if self._scaled(name):
                median, sd = (v.reshape(n, m)[:, :, None] for v in self.spread(name, mu, steps))
                keep = mu[name].reshape(n, m)[:, :, None] > 0
                values = np.where(keep, median * np.exp(r[None, None, :] * sd), 0.0).reshape(n, m * k)
            else:
                values = (mu[name].reshape(n, m)[:, :, None] * r[None, None, :]).reshape(n, m * k)
            weights = np.repeat(dist.weights / k, k)
            out[name] = weighted_quantiles(values, weights, [self._level(name, q) for q in quantiles])
        return out, mu

    def _predict_distribution(self, x: dict[str, np.ndarray], dist: OutputLengths) -> dict[str, np.ndarray]:
        m = dist.values.size
        q, mu = self._mixture(x, dist, [0.5, self.coverage])
        out: dict[str, np.ndarray] = {}
        f50, f95 = self.factors["prefill_total_ms"]
        out["prefill_total_p50_ms"] = mu["prefill_total_ms"][::m] * f50
        out["prefill_total_p95_ms"] = mu["prefill_total_ms"][::m] * f95
        for name in MIXED:
            p50, p95 = output_names(name)
            out[p50], out[p95] = q[name][:, 0], np.maximum(q[name][:, 1], q[name][:, 0])
        return {**{k: out[k] for k in _ordered_outputs() if k in out}, "in_range": self._in_range_lengths(x, dist)}

    def _in_range_lengths(self, x: Mapping[str, np.ndarray], dist: OutputLengths) -> np.ndarray:
        lo, hi = self.knob_ranges.get("new_tokens", (-math.inf, math.inf))
        return self.in_range({k: v for k, v in x.items() if k != "new_tokens"}) & bool(
            dist.values.min() >= lo and dist.values.max() <= hi)

    def predict_grid(self, *, crops, top_k, blocks, prompt_tokens, new_tokens, batch_size=None) -> dict[str, np.ndarray]:
        """Every configuration at every N of the vector `new_tokens`: {output: (configs, len(N))},
        with ``in_range`` of the same shape.

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> g = est.predict_grid(crops=[1, 4], top_k=2, blocks=4, prompt_tokens=32, new_tokens=np.arange(1, 129))
            >>> g["request_p50_ms"].shape, bool((np.diff(g["request_p50_ms"], axis=1) > 0).all())
            ((2, 128), True)
            >>> g["in_range"][0, [3, 15, 16]].tolist()  # fitted on N = 4 .. 16
            [True, True, False]
        """
        grid = np.atleast_1d(np.asarray(as_numpy(new_tokens), dtype=np.float64))
        if grid.ndim != 1:
            raise EstimatorError(f"new_tokens must be a 1-D vector of N for predict_grid, got shape {grid.shape}")
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size)
        self.check_possible({"new_tokens": grid})
        n, m = len(x["crops"]), grid.size
        prefill = np.maximum(self.features.design({**x, "decode_steps": np.zeros(n)})["prefill_total_ms"]
                             @ self.coef["prefill_total_ms"], FLOOR_MS)
        steps = np.tile(grid - 1.0, n)
        mu = self._mu({k: np.repeat(v, m) for k, v in x.items()}, steps, prefill=np.repeat(prefill, m))
        out = self._quantiles(mu, steps)
        lo, hi = self.knob_ranges.get("new_tokens", (-math.inf, math.inf))
        inside = self.in_range(x)[:, None] & ((grid >= lo) & (grid <= hi))[None, :]
        return {**{k: out[k].reshape(n, m) for k in _ordered_outputs()}, "in_range": inside}

    def predict_positions(self, *, crops, top_k, blocks, prompt_tokens, steps, batch_size=None, image_tokens=None,
                          input_tokens=None) -> dict[str, np.ndarray]:
        """P50/P95 of single decode steps at positions `steps` (0 = the first decode step), one per
        row (configurations and steps broadcast together), with ``in_range`` (the knobs and the
        position within what the model was fitted on).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> est.predict_positions(crops=1, top_k=2, blocks=4, prompt_tokens=32, steps=np.arange(4))["decode_step_p50_ms"].shape
            (4,)
        """
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens,
                          batch_size=batch_size, image_tokens=image_tokens, input_tokens=input_tokens, step=steps)
        step = x.pop("step")
        if not (step >= 0).all() or (step != np.round(step)).any():
            raise EstimatorError(f"decode step positions must be whole numbers >= 0; got "
                                 f"{_num(step[~(step >= 0) | (step != np.round(step))][0])}")
        mu = np.maximum(self.features.step(x, step) @ self.coef["decode_step_ms"], FLOOR_MS)
        f50, f95 = self.factors["decode_step_ms"]
        hi = self.knob_ranges.get("new_tokens", (0, math.inf))[1] - 2.0  # the last position of the longest output
        return {"decode_step_p50_ms": mu * f50, "decode_step_p95_ms": mu * f95,
                "in_range": self.in_range(x) & (step <= hi)}

    # ------------------------------------------------------------------ the controller's calls
    def latency_at(self, quantile: float = 0.95, *, crops, top_k, blocks, prompt_tokens, new_tokens=None,
                   batch_size=None) -> dict[str, np.ndarray]:
        """The whole request's latency at `quantile` (``latency_ms``) per configuration, with
        ``in_range``; `new_tokens` as in :meth:`predict_arrays` (an :class:`OutputLengths` gives the
        quantile of the mixture over N).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> a = est.latency_at(0.95, crops=[1, 8], top_k=2, blocks=4, prompt_tokens=32, new_tokens=16)
            >>> b = est.predict_arrays(crops=[1, 8], top_k=2, blocks=4, prompt_tokens=32, new_tokens=16)
            >>> bool(np.array_equal(a["latency_ms"], b["request_p95_ms"]))
            True
        """
        q = check_quantile(quantile)
        config = dict(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size)
        if isinstance(new_tokens, OutputLengths):
            x = self._configs(**config)
            qs, _ = self._mixture(x, new_tokens, [q])
            return {"latency_ms": qs["request_ms"][:, 0], "in_range": self._in_range_lengths(x, new_tokens)}
        x = self._configs(**config, new_tokens=self.defaults["new_tokens"] if new_tokens is None else new_tokens)
        steps = x["new_tokens"] - 1.0
        return {"latency_ms": self._at("request_ms", self._mu(x, steps), steps, self.factor_at("request_ms", q))[0],
                "in_range": self.in_range(x)}

    def check_budget_feasibility(self, budget_ms, *, crops, top_k, blocks, prompt_tokens, new_tokens=None,
                                 batch_size=None, quantile: float = 0.95) -> dict[str, np.ndarray]:
        """Per row: does the whole request of this configuration (at its expected N, or the model's
        default N, or over an :class:`OutputLengths` distribution) fit `budget_ms` at `quantile`?
        Arrays (numpy or torch) in, numpy out: ``feasible``, ``latency_ms`` (at the quantile),
        ``slack_ms`` (budget - latency) and ``in_range``.

        Example:
            >>> import numpy as np
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> r = est.check_budget_feasibility(np.array([5.0, 50.0]), crops=np.array([8, 1]), top_k=2, blocks=4,
            ...                                  prompt_tokens=32, new_tokens=np.array([16, 4]))
            >>> r["feasible"].tolist(), r["in_range"].tolist()
            ([False, True], [True, True])
        """
        budget = check_budget(budget_ms)
        lat = self.latency_at(quantile, crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens,
                              new_tokens=new_tokens, batch_size=batch_size)
        try:
            budget, latency = np.broadcast_arrays(budget, lat["latency_ms"])
        except ValueError:
            raise EstimatorError(f"budget_ms has {budget.size} values for {lat['latency_ms'].size} configurations; "
                                 "give one budget or one per configuration") from None
        return {"feasible": latency <= budget, "latency_ms": latency, "slack_ms": budget - latency,
                "in_range": np.broadcast_to(lat["in_range"], latency.shape).copy()}

    def estimate_max_output_tokens(self, budget_ms, *, crops, top_k, blocks, prompt_tokens, batch_size=None,
                                   quantile: float = 0.95, max_new_tokens: int = 4096) -> dict[str, np.ndarray]:
        """Per row: the largest N (output tokens) whose whole request still fits `budget_ms` at
        `quantile` (0 when not even one token fits), by a vectorised bisection over N (the
        request's quantile rises with N). Returns ``max_new_tokens`` (int64), ``latency_ms`` (at
        that N; NaN for 0), ``capped`` (the answer is `max_new_tokens`: more may fit) and
        ``in_range`` (the configuration and that N within what the model was fitted on).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> r = est.estimate_max_output_tokens([1.0, 30.0, 1e6], crops=1, top_k=2, blocks=4, prompt_tokens=32)
            >>> r["max_new_tokens"][:1].tolist(), r["capped"].tolist()
            ([0], [False, False, True])
        """
        budget = check_budget(budget_ms)
        if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
            raise EstimatorError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        x = self._configs(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size,
                          budget_ms=budget)
        budget = x.pop("budget_ms")
        n = budget.size
        f = self.factor_at("request_ms", quantile)
        prefill = np.maximum(self.features.design({**x, "decode_steps": np.zeros(n)})["prefill_total_ms"]
                             @ self.coef["prefill_total_ms"], FLOOR_MS)

        def latency(tokens: np.ndarray) -> np.ndarray:
            steps = tokens - 1.0
            return self._at("request_ms", self._mu(x, steps, prefill=prefill), steps, f)[0]

        lo = np.zeros(n)                                 # the largest N known to fit (0: none)
        hi = np.full(n, float(max_new_tokens) + 1.0)     # the smallest N known not to fit
        while (hi - lo > 1).any():
            mid = np.maximum(np.floor((lo + hi) / 2.0), 1.0)
            ok = latency(mid) <= budget
            active = hi - lo > 1
            lo = np.where(active & ok, mid, lo)
            hi = np.where(active & ~ok, mid, hi)
        found = lo >= 1
        lat = np.where(found, latency(np.maximum(lo, 1.0)), np.nan)
        inside = self.in_range({**x, "new_tokens": np.maximum(lo, 1.0)})
        return {"max_new_tokens": lo.astype(np.int64), "latency_ms": lat, "capped": lo >= max_new_tokens,
                "in_range": inside}

    def plan_arrays(self, budget_ms, *, crops, top_k, blocks, prompt_tokens, new_tokens=None, batch_size=None,
                    quantile: float = 0.95, score=None) -> dict[str, np.ndarray]:
        """The planner on arrays: for n configurations (and one N per configuration, or an
        :class:`OutputLengths`) and B budgets, ``fits`` (B, n): the whole request's latency at
        `quantile` is within the budget; ``latency_ms``, ``request_p50_ms``, ``request_p95_ms``,
        ``in_range`` (n,). With `score` (an accuracy per configuration): ``pareto`` (n,), the
        configurations no other beats on both latency and score, and ``best`` (B,), the index of
        the highest-scoring configuration that fits each budget (ties: the faster; -1: none fits).

        Example:
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> p = est.plan_arrays([5.0, 10.0, 40.0], crops=[0, 1, 8], top_k=2, blocks=4, prompt_tokens=8,
            ...                     new_tokens=4, score=[0.5, 0.6, 0.9])
            >>> p["fits"].shape, p["best"].tolist(), p["pareto"].tolist()
            ((3, 3), [-1, 0, 2], [True, True, True])
        """
        budget = check_budget(budget_ms)
        if budget.ndim != 1:
            raise EstimatorError(f"budget_ms must be one number or a 1-D vector of budgets, got shape {budget.shape}")
        config = dict(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens, batch_size=batch_size)
        q = check_quantile(quantile)
        if isinstance(new_tokens, OutputLengths):
            x = self._configs(**config)
            qs, _ = self._mixture(x, new_tokens, [0.5, self.coverage, q])
            p50, p95, lat = qs["request_ms"][:, 0], np.maximum(qs["request_ms"][:, 1], qs["request_ms"][:, 0]), \
                qs["request_ms"][:, 2]
            inside = self._in_range_lengths(x, new_tokens)
        else:
            x = self._configs(**config, new_tokens=self.defaults["new_tokens"] if new_tokens is None else new_tokens)
            steps = x["new_tokens"] - 1.0
            p50, p95, lat = self._at("request_ms", self._mu(x, steps), steps, *self.factors["request_ms"],
                                     self.factor_at("request_ms", q))
            inside = self.in_range(x)
        out = {"latency_ms": lat, "request_p50_ms": p50, "request_p95_ms": p95, "in_range": inside,
               "fits": lat[None, :] <= budget[:, None]}
        if score is not None:
            s = np.asarray(as_numpy(score), dtype=np.float64).ravel()
            if s.shape != lat.shape or not np.isfinite(s).all():
                raise EstimatorError(f"score must be one finite number per configuration ({lat.size}), got "
                                     f"{s.size} values{'' if np.isfinite(s).all() else ' with NaN or infinity'}")
            order = np.lexsort((-s, lat))              # by latency, then the higher score first
            ss = s[order]
            before = np.concatenate([[-np.inf], np.maximum.accumulate(ss)[:-1]])
            front = ss > before                        # better than everything at most as fast
            pareto = np.zeros(lat.size, dtype=bool)
            pareto[order] = front
            last = np.maximum.accumulate(np.where(front, np.arange(ss.size), -1))
            k = np.searchsorted(lat[order], budget, side="right") - 1
            out["pareto"] = pareto
            out["best"] = np.where(k >= 0, order[last[np.maximum(k, 0)]], -1)
        return out

    def plan(self, budget_ms, *, quantile: float = 0.95, configs: pl.DataFrame | Mapping[str, Any] | None = None,
             new_tokens=None, accuracy: pl.DataFrame | str | Path | None = None) -> pl.DataFrame:
        """What fits the budget: one row per (budget, configuration) whose whole request at
        `quantile` is within ``budget_ms`` (one budget or a vector: a budget sweep), fastest first,
        with ``request_p50_ms``, ``request_p95_ms``, ``latency_ms`` (at the quantile) and
        ``in_range``. `configs` (a frame or dict of knob columns) defaults to every combination of
        the knob values the model was fitted on (or, with `accuracy` alone, the configurations it
        scores). `accuracy` (a frame, CSV or Parquet: knob columns -> ``score``) adds ``score``,
        ``pareto`` (on the accuracy-latency frontier) and ``best`` (the highest score that fits).

        Example:
            >>> import polars as pl
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> acc = pl.DataFrame({"crops": [0, 1, 2, 4, 8], "score": [0.2, 0.5, 0.6, 0.7, 0.8]})
            >>> p = est.plan(20.0, accuracy=acc, new_tokens=4)
            >>> p.filter(pl.col("best")).select("crops", "top_k", "blocks", "prompt_tokens").rows()
            [(8, 1, 1, 8)]
        """
        frame = plan_configs(self, configs, accuracy)
        cols = {k: frame[k].to_numpy() for k in REQUIRED + ("batch_size",) if k in frame.columns}
        if "new_tokens" in frame.columns and new_tokens is None:
            new_tokens = frame["new_tokens"].to_numpy()
        budget = check_budget(budget_ms)
        res = self.plan_arrays(budget, **cols, new_tokens=new_tokens, quantile=quantile,
                               score=frame["score"].to_numpy() if "score" in frame.columns else None)
        b_idx, c_idx = np.nonzero(res["fits"])
        n_col = (np.full(frame.height, -1) if isinstance(new_tokens, OutputLengths) else
                 np.broadcast_to(as_numpy(self.defaults["new_tokens"] if new_tokens is None else new_tokens),
                                 (frame.height,)))
        out = pl.DataFrame({"budget_ms": budget[b_idx],
                            **{k: frame[k].to_numpy()[c_idx] for k in REQUIRED},
                            "new_tokens": np.asarray(n_col, dtype=np.int64)[c_idx],
                            "request_p50_ms": res["request_p50_ms"][c_idx],
                            "request_p95_ms": res["request_p95_ms"][c_idx],
                            "latency_ms": res["latency_ms"][c_idx], "in_range": res["in_range"][c_idx]})
        if isinstance(new_tokens, OutputLengths):
            out = out.with_columns(pl.lit(None, pl.Int64).alias("new_tokens"))
        if "score" in frame.columns:
            out = out.with_columns(pl.Series("score", frame["score"].to_numpy()[c_idx]),
                                   pl.Series("pareto", res["pareto"][c_idx]),
                                   pl.Series("best", res["best"][b_idx] == c_idx))
        return out.sort("budget_ms", "latency_ms", maintain_order=True)

    def predict(self, configs: pl.DataFrame | Mapping[str, Any]) -> pl.DataFrame:
        """Predictions for configurations given as a polars frame or a dict of columns/scalars.

        Needs crops, top_k, blocks and prompt_tokens; new_tokens (a number, one per row, or an
        :class:`OutputLengths`), batch_size, image_tokens and input_tokens are optional. Returns
        the configuration columns, the P50/P95 columns and ``in_range`` (every knob within the
        values the model was fitted on).

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
        dist = isinstance(cols.get("new_tokens"), OutputLengths)
        knobs = [k for k in KNOBS if not (dist and k == "new_tokens")]
        x = config_arrays(**{k: cols.get(k, self.defaults.get(k)) for k in knobs})
        n = len(out["in_range"])
        x = {k: np.broadcast_to(v, (n,)) for k, v in x.items()}
        frame = pl.DataFrame({k: x[k].astype(np.int64) for k in knobs})
        return frame.with_columns(*[pl.Series(k, v) for k, v in out.items()])

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
        sums = {name: hashlib.sha256((d / name).read_bytes()).hexdigest()
                for name in (WEIGHTS, EVALUATION, EVALUATION_STEPS) if name in files.values()}
        meta = {k: v for k, v in self.meta.items() if k != "content_sha256"}
        meta = _jsonable({**meta, "weights_sha256": sums[WEIGHTS], "files": files, "files_sha256": sums})
        self.meta = {**meta, "content_sha256": content_digest(meta)}
        atomic_write_bytes(d / MODEL_JSON, (json.dumps(self.meta, indent=2, allow_nan=False) + "\n").encode())
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
            _check_integrity(d, raw)
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
            want = "log_sd" if (meta.noise is not None and name in MIXED) else "ratio"
            if cal.scale != want:
                raise EstimatorError(f"{mj}: calibration of {name} has scale {cal.scale!r}, expected {want!r}; refit")
            low = -math.inf if want == "log_sd" else 0.0
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
            bad = {k: v for k, v in meta.noise.items() if not (math.isfinite(v) and (v >= 0 or k == "prefill_step_cov"))}
            if set(meta.noise) != set(NOISE) or bad:
                raise EstimatorError(f"{mj}: noise must give finite {', '.join(NOISE)} (all but the covariance "
                                     f">= 0), got {meta.noise}; refit")
        return cls(fs, coef, factors, tm, meta.defaults, meta.knob_ranges, raw, evaluation, ratios, steps_evaluation,
                   noise=meta.noise)

    def __repr__(self) -> str:
        return f"Estimator(feature_set={self.features.name!r}, targets={list(self.targets)})"


def content_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of model.json's content (canonical JSON, without the digest itself).

    Example:
        >>> content_digest({"b": 1, "a": [0.5]}) == content_digest({"a": [0.5], "b": 1})
        True
    """
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _check_integrity(d: Path, raw: Any) -> None:
    """Every file that makes a prediction (model.json itself, the weights) and the evaluations
    as written: one EstimatorError naming the first that differs."""
    def fail(detail: str) -> None:
        raise EstimatorError(f"{d} fails its integrity check: {detail}; the model directory was edited, truncated or "
                             "mixed with another model's files: refit, or restore it as `molmo-latency fit` wrote it")

    if not isinstance(raw, dict) or not isinstance(raw.get("content_sha256"), str):
        fail(f"{MODEL_JSON} has no content_sha256")
    if content_digest(raw) != raw["content_sha256"]:
        fail(f"the content of {MODEL_JSON} does not match its content_sha256")
    sums = raw.get("files_sha256")
    if not isinstance(sums, dict) or WEIGHTS not in sums:
        fail(f"{MODEL_JSON} lists no checksum of {WEIGHTS}")
    for name, want in sums.items():
        path = d / str(name)
        if not path.is_file():
            fail(f"{name} is missing")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            fail(f"{name} has SHA-256 {got[:12]}..., expected {str(want)[:12]}...")


def _rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """1-D arrays (or scalars) as the rows of one 2-D array (broadcast to a common length)."""
    first = np.shape(arrays[0])
    if all(np.shape(a) == first for a in arrays):
        return np.stack(arrays)
    return np.stack(np.broadcast_arrays(*arrays))


def check_quantile(quantile: float) -> float:
    """A quantile level strictly between 0 and 1 (EstimatorError otherwise).

    Example:
        >>> check_quantile(0.95)
        0.95
    """
    try:
        q = float(quantile)
    except (TypeError, ValueError):
        q = math.nan
    if not 0 < q < 1:
        raise EstimatorError(f"quantile must be a number between 0 and 1 (e.g. 0.5 or 0.95), got {quantile!r}")
    return q


def check_budget(budget_ms) -> np.ndarray:
    """Budgets in ms (a number, a list, a numpy array or a torch tensor) as a 1-D float64 array of
    finite values > 0 (EstimatorError otherwise).

    Example:
        >>> check_budget(50).tolist()
        [50.0]
    """
    try:
        b = np.atleast_1d(np.asarray(as_numpy(budget_ms), dtype=np.float64))
    except (TypeError, ValueError):
        raise EstimatorError(f"budget_ms must be a number or an array of numbers (ms), got {budget_ms!r}") from None
    bad = ~np.isfinite(b) | ~(b > 0)
    if b.ndim != 1 or b.size == 0 or bad.any():
        got = _num(b[bad][0]) if b.ndim == 1 and bad.any() else f"shape {b.shape}"
        raise EstimatorError(f"budget_ms must be finite numbers > 0 (ms) in a scalar or 1-D array; got {got}")
    return b


ACCURACY_SCORE = "score"


def load_accuracy(accuracy: pl.DataFrame | str | Path) -> pl.DataFrame:
    """An accuracy table (configuration -> ``score``): a polars frame, or a CSV or Parquet file,
    with one or more knob columns (crops, top_k, blocks, prompt_tokens, new_tokens, batch_size)
    and a finite ``score`` per row, one row per configuration.

    Example:
        >>> load_accuracy(pl.DataFrame({"crops": [1, 2], "score": [0.5, 0.7]})).columns
        ['crops', 'score']
    """
    if not isinstance(accuracy, pl.DataFrame):
        p = Path(accuracy)
        if not p.is_file():
            raise EstimatorError(f"accuracy table {p} does not exist or is not a file; give a CSV or Parquet file "
                                 "with knob columns and a score column")
        try:
            frame = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_csv(p)
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds
            raise EstimatorError(f"{p} cannot be read as {'Parquet' if p.suffix == '.parquet' else 'CSV'} ({exc})") from None
        where = str(p)
    else:
        frame, where = accuracy, "the accuracy table"
    keys = [c for c in KNOBS if c in frame.columns]
    if ACCURACY_SCORE not in frame.columns or not keys:
        raise EstimatorError(f"{where} needs a {ACCURACY_SCORE!r} column and at least one knob column "
                             f"({', '.join(KNOBS)}); it has {frame.columns}")
    try:
        frame = frame.select(*[pl.col(k).cast(pl.Int64) for k in keys], pl.col(ACCURACY_SCORE).cast(pl.Float64))
    except Exception:  # noqa: BLE001 - polars raises several kinds
        raise EstimatorError(f"{where}: the knob columns must be whole numbers and {ACCURACY_SCORE!r} a number") from None
    bad = frame.filter(pl.any_horizontal(pl.all().is_null()) | ~pl.col(ACCURACY_SCORE).is_finite())
    if bad.height:
        raise EstimatorError(f"{where}: {bad.height} rows have a missing value or a non-finite score, e.g. "
                             f"{bad.row(0, named=True)}; fill or remove them")
    dup = frame.group_by(keys).len().filter(pl.col("len") > 1)
    if dup.height:
        raise EstimatorError(f"{where}: configuration {dup.drop('len').row(0, named=True)} has {dup['len'][0]} "
                             "scores; give one score per configuration")
    return frame


def plan_configs(est: "Estimator", configs: pl.DataFrame | Mapping[str, Any] | None,
                 accuracy: pl.DataFrame | str | Path | None) -> pl.DataFrame:
    """The configurations `plan` considers (knob columns, and ``score`` with an accuracy table):
    `configs`; or every combination of the knob values the model was fitted on; with an accuracy
    table alone, its configurations (knobs it does not name: every fitted value). Given both,
    every configuration must have a score.

    Example:
        >>> from molmo_latency.estimator import example_requests, fit_estimator
        >>> est = fit_estimator(example_requests(seed=0))
        >>> plan_configs(est, None, None).height  # 5 crops x 3 top-k x 3 blocks x 2 prompt lengths
        90
    """
    values = est.meta.get("knob_values") or {}
    acc = None if accuracy is None else load_accuracy(accuracy)
    if configs is not None:
        cols = ({c: configs[c].to_numpy() for c in configs.columns} if isinstance(configs, pl.DataFrame)
                else dict(configs))
        missing = [k for k in REQUIRED if k not in cols]
        if missing:
            raise EstimatorError(f"configurations lack {missing}; give crops, top_k, blocks and prompt_tokens")
        arrays = config_arrays(**{k: v for k, v in cols.items() if k in KNOBS})
        est.check_possible(arrays)  # refused before anything is cast to whole numbers
        frame = pl.DataFrame({k: v.astype(np.int64) for k, v in arrays.items()})
        if acc is not None:
            keys = [k for k in acc.columns if k != ACCURACY_SCORE]
            lacking = [k for k in keys if k not in frame.columns]
            if lacking:
                raise EstimatorError(f"the accuracy table is keyed by {lacking}, which the configurations lack")
            frame = frame.join(acc, on=keys, how="left")
            unscored = frame.filter(pl.col(ACCURACY_SCORE).is_null())
            if unscored.height:
                raise EstimatorError(f"{unscored.height} of {frame.height} configurations have no score in the accuracy "
                                     f"table, e.g. {unscored.drop(ACCURACY_SCORE).row(0, named=True)}; score them or "
                                     "leave them out of the configurations")
        return frame
    need = [k for k in REQUIRED if acc is None or k not in acc.columns]
    lacking = [k for k in need if k not in values]
    if lacking:
        raise EstimatorError(f"this model does not record the fitted values of {lacking}; give the configurations "
                             "(configs=...) or refit with this molmo-latency")
    frame = acc if acc is not None else pl.DataFrame({"_": [0]})
    for k in need:
        frame = frame.join(pl.DataFrame({k: [int(v) for v in values[k]]}), how="cross")
    return frame.select([k for k in (*KNOBS, ACCURACY_SCORE) if k in frame.columns])


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
