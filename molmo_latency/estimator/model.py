"""A fitted latency estimator (hold): predict, save and load with no pickle.

A model directory holds ``model.json`` (feature set, targets, calibration, token map, training
runs, split, metrics, versions and the SHA-256 of the weights), ``weights.safetensors`` (one
coefficient vector per target), ``evaluation.parquet`` (held-out requests with their predictions)
and ``parity.png``.

Example:
    >>> import tempfile
    >>> from molmo_latency.estimator import Estimator, example_requests, fit_estimator
    >>> est = fit_estimator(example_requests(seed=0))
    >>> d = est.save(tempfile.mkdtemp())
    >>> again = Estimator.load(d)
    >>> p = again.predict({"crops": [1, 8], "top_k": 2, "blocks": 4, "prompt_tokens": 32})
    >>> p.columns[-5:]
    ['prefill_total_p50_ms', 'prefill_total_p95_ms', 'decode_per_token_p50_ms', 'decode_per_token_p95_ms', 'in_training_range']
    >>> bool((p["prefill_total_p95_ms"] > p["prefill_total_p50_ms"]).all())
    True
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import msgspec
import numpy as np
import polars as pl

from molmo_latency.errors import EstimatorError
from molmo_latency.estimator.features import KNOB_MIN, KNOBS, TOKENS, FeatureSet, TokenMap, config_arrays

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
EVALUATION = "evaluation.parquet"
PARITY_PNG = "parity.png"
FLOOR_MS = 1e-6  # a linear model may go to 0 or below far outside its data; predictions stay positive
REQUIRED = ("crops", "top_k", "blocks", "prompt_tokens")


def output_names(target: str) -> tuple[str, str]:
    """The P50 and P95 column names of a target.

    Example:
        >>> output_names("prefill_total_ms")
        ('prefill_total_p50_ms', 'prefill_total_p95_ms')
    """
    stem = target.removesuffix("_ms")
    return f"{stem}_p50_ms", f"{stem}_p95_ms"


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


class Estimator:
    """P50/P95 of prefill_total_ms and decode_per_token_ms for configurations.

    `coef[target]` are the linear costs of the feature set's columns (ms per unit);
    `factors[target]` = (p50, p95) multiply the linear prediction (split-conformal on relative
    residuals of calibration configurations).
    """

    def __init__(self, features: FeatureSet, coef: dict[str, np.ndarray], factors: dict[str, tuple[float, float]],
                 token_map: TokenMap, defaults: dict[str, int], knob_ranges: dict[str, list[float]],
                 meta: dict[str, Any], evaluation: pl.DataFrame | None = None):
        self.features = features
        self.coef = {t: np.ascontiguousarray(c, dtype=np.float64) for t, c in coef.items()}
        self.factors = {t: (float(a), float(b)) for t, (a, b) in factors.items()}
        self.token_map = token_map
        self.defaults = dict(defaults)
        self.knob_ranges = {k: [float(v[0]), float(v[1])] for k, v in knob_ranges.items()}
        self.meta = meta
        self.evaluation = evaluation
        self.targets = tuple(coef)

    @property
    def _blocks_total(self) -> int | None:
        return (self.meta.get("model") or {}).get("blocks_total")

    # ------------------------------------------------------------------ predict
    @property
    def metrics(self) -> dict[str, Any]:
        """Held-out metrics per target (see fit_estimator)."""
        return self.meta.get("metrics", {})

    def predict_arrays(self, *, crops, top_k, blocks, prompt_tokens, new_tokens=None, batch_size=None,
                       image_tokens=None, input_tokens=None) -> dict[str, np.ndarray]:
        """The fast batched path: numpy arrays (or scalars) in, {output column: float64 array} out.

        Image and input tokens follow from crops and prompt tokens through the model's token map
        unless given; new_tokens and batch_size default to the training data's values.

        Example:
            >>> import numpy as np
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> est = fit_estimator(example_requests(seed=0))
            >>> out = est.predict_arrays(crops=np.array([1, 4, 8]), top_k=2, blocks=np.array([2, 4, 4]),
            ...                          prompt_tokens=32)
            >>> sorted(out), out["prefill_total_p50_ms"].shape
            (['decode_per_token_p50_ms', 'decode_per_token_p95_ms', 'prefill_total_p50_ms', 'prefill_total_p95_ms'], (3,))
        """
        tm = self.token_map
        x = config_arrays(crops=crops, top_k=top_k, blocks=blocks, prompt_tokens=prompt_tokens,
                          new_tokens=self.defaults["new_tokens"] if new_tokens is None else new_tokens,
                          batch_size=self.defaults["batch_size"] if batch_size is None else batch_size,
                          **({} if image_tokens is None else {"image_tokens": image_tokens}),
                          **({} if input_tokens is None else {"input_tokens": input_tokens}))
        if "image_tokens" not in x:
            x["image_tokens"] = tm.image_tokens(x["crops"])
        if "input_tokens" not in x:
            x["input_tokens"] = tm.input_tokens(x["image_tokens"], x["prompt_tokens"])
        for key, low in KNOB_MIN.items():
            bad = ~(x[key] >= low)  # also catches NaN
            if bad.any():
                raise EstimatorError(f"{key} must be >= {low} (and not NaN); got {x[key][bad][0]!r} "
                                     f"at position {int(np.argmax(bad))}")
        if self._blocks_total is not None and (x["blocks"] > self._blocks_total).any():
            raise EstimatorError(f"blocks must be <= {self._blocks_total}, the model's number of blocks; got "
                                 f"{int(x['blocks'].max())}")
        mats = self.features.build(x)
        out: dict[str, np.ndarray] = {}
        for target in self.targets:
            mu = mats[target] @ self.coef[target]
            np.maximum(mu, FLOOR_MS, out=mu)
            f50, f95 = self.factors[target]
            p50, p95 = output_names(target)
            out[p50] = mu * f50
            out[p95] = mu * f95
        return out

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
    def save(self, model_dir: str | Path) -> Path:
        """Write model.json, weights.safetensors, evaluation.parquet and parity.png; returns the directory.

        Example:
            >>> import tempfile
            >>> from molmo_latency.estimator import example_requests, fit_estimator
            >>> d = fit_estimator(example_requests(seed=0)).save(tempfile.mkdtemp())
            >>> sorted(p.name for p in d.iterdir())
            ['evaluation.parquet', 'model.json', 'parity.png', 'weights.safetensors']
        """
        from safetensors.numpy import save as st_save

        from molmo_latency.estimator.parity import write_parity_plot
        from molmo_latency.sweep.rundir import atomic_write_bytes, atomic_write_parquet

        d = Path(model_dir)
        if d.exists() and not d.is_dir():
            raise EstimatorError(f"--out {d} exists and is not a directory; choose a directory")
        d.mkdir(parents=True, exist_ok=True)
        blob = st_save({f"{t}.coef": self.coef[t] for t in self.targets},
                       metadata={"format": "molmo-latency-estimator", "format_version": str(FORMAT_VERSION)})
        atomic_write_bytes(d / WEIGHTS, blob)
        meta = {**self.meta, "weights_sha256": hashlib.sha256(blob).hexdigest(),
                "files": {"weights": WEIGHTS, "evaluation": EVALUATION if self.evaluation is not None else None,
                          "parity_plot": PARITY_PNG if self.evaluation is not None else None}}
        self.meta = meta
        atomic_write_bytes(d / MODEL_JSON, (json.dumps(_jsonable(meta), indent=2, allow_nan=False) + "\n").encode())
        if self.evaluation is not None:
            atomic_write_parquet(self.evaluation, d / EVALUATION)
            write_parity_plot(self.evaluation, meta.get("metrics", {}), d / PARITY_PNG)
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
        if not d.is_dir():
            raise EstimatorError(f"model directory {d} does not exist; create it with `molmo-latency fit ... --out {d}`")
        mj, wp = d / MODEL_JSON, d / WEIGHTS
        for p in (mj, wp):
            if not p.is_file():
                raise EstimatorError(f"{d} is not a complete estimator model: {p.name} is missing; "
                                     "refit with `molmo-latency fit`")
        try:
            raw = json.loads(mj.read_text(encoding="utf-8"))
            meta = msgspec.convert(raw, type=_ModelMeta)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EstimatorError(f"{mj} is not valid JSON ({exc}); the file is corrupted: refit") from None
        except msgspec.ValidationError as exc:
            raise EstimatorError(f"{mj} is not an estimator model description ({exc}); the file was edited "
                                 "or written by something else: refit") from None
        if meta.format_version != FORMAT_VERSION:
            raise EstimatorError(f"{mj} has format_version {meta.format_version}; this molmo-latency reads "
                                 f"{FORMAT_VERSION}: refit with this version")
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
        for t in meta.targets:
            if t not in ours or ours[t] != theirs.get(t):
                raise EstimatorError(f"{d}: feature set {fs.name!r} of the model has features {theirs.get(t)} for {t}, "
                                     f"but this molmo-latency's {fs.name!r} has {ours.get(t)}; the model was fitted "
                                     "with another feature set: refit")
        if fs_meta.digest != fs.digest():
            raise EstimatorError(f"{d}: feature set digest {fs_meta.digest} differs from this molmo-latency's "
                                 f"{fs.name!r} ({fs.digest()}); refit")
        coef, factors = {}, {}
        for t in meta.targets:
            key = f"{t}.coef"
            if key not in arrays:
                raise EstimatorError(f"{wp} has no array {key!r} (has {sorted(arrays)}); refit")
            c = arrays[key]
            if c.shape != (len(theirs[t]),) or not np.all(np.isfinite(c)):
                raise EstimatorError(f"{wp}: {key} has shape {c.shape}, expected ({len(theirs[t])},) finite values "
                                     f"for the features {theirs[t]}; refit")
            if t not in meta.calibration:
                raise EstimatorError(f"{mj} has no calibration for {t}; refit")
            cal = meta.calibration[t]
            if not (0 < cal.p50_factor <= cal.p95_factor and math.isfinite(cal.p95_factor)):
                raise EstimatorError(f"{mj}: calibration of {t} must have 0 < p50_factor <= p95_factor, got "
                                     f"{cal.p50_factor}, {cal.p95_factor}; refit")
            coef[t], factors[t] = c, (cal.p50_factor, cal.p95_factor)
        for k in ("new_tokens", "batch_size"):
            if k not in meta.defaults:
                raise EstimatorError(f"{mj}: defaults lack {k!r}; refit")
        tm = TokenMap(**msgspec.structs.asdict(meta.token_map))
        evaluation = None
        if (d / EVALUATION).is_file():
            try:
                evaluation = pl.read_parquet(d / EVALUATION)
            except Exception:  # noqa: BLE001 - the evaluation is information only
                evaluation = None
        return cls(fs, coef, factors, tm, meta.defaults, meta.knob_ranges, raw, evaluation)

    def __repr__(self) -> str:
        return f"Estimator(feature_set={self.features.name!r}, targets={list(self.targets)})"


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
