"""Feature sets of the latency estimator (transform only): configuration arrays -> design matrices.

A feature set turns what is known before generation (crops, image tokens, prompt tokens, input
tokens, top-k, active blocks, batch size) and, for decode, the step's position into design
matrices for three linear models:

- ``prefill_total_ms`` (vision + projector + prefill, one per request),
- ``decode_step_ms`` (one decode step at position ``step`` = 0, 1, ...; its KV length is
  ``input_tokens + step + 1``),
- ``other_ms`` (what a request spends outside the phases: sampling, logits processing, host gaps).

Because every decode feature is a closed-form function of the position, the sum over the steps
of a request of N output tokens (N - 1 decode steps) has a closed form too: ``step_sum`` gives
the design of a request's whole decode time without a loop over positions.

The ``physical`` set writes down where the time goes, so that a linear model with non-negative
costs extrapolates to token counts and positions it never saw; ``knobs`` is the plain knob
values and the position (the baseline).

Example:
    >>> import numpy as np
    >>> x = config_arrays(crops=np.array([1, 4]), top_k=2, blocks=4, prompt_tokens=8,
    ...                   batch_size=1, image_tokens=np.array([16, 64]), input_tokens=np.array([25, 73]))
    >>> fs = FEATURE_SETS["physical"]
    >>> fs.step(x, np.array([0, 9])).shape, fs.names["decode_step_ms"][:3]
    ((2, 6), ('const', 'blocks', 'blocks_x_top_k'))
    >>> bool(np.allclose(fs.step_sum(x, np.array([3, 3]))[0], sum(fs.step(x, np.full(2, s))[0] for s in range(3))))
    True
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from molmo_latency.errors import EstimatorError

# The linear models of a feature set (each has its own coefficients).
TARGETS = ("prefill_total_ms", "decode_step_ms", "other_ms")
# What the estimator predicts at P50 and P95 (calibrated separately, each on held-out requests).
OUTPUTS = ("prefill_total_ms", "decode_step_ms", "decode_total_ms", "request_ms")
# What a configuration is made of (all integers); image/input tokens derive from crops/prompt.
KNOBS = ("crops", "top_k", "blocks", "prompt_tokens", "new_tokens", "batch_size")
SETTING = ("crops", "top_k", "blocks", "prompt_tokens", "batch_size")  # a configuration without its N
TOKENS = ("image_tokens", "input_tokens")
KNOB_MIN = {"crops": 0, "top_k": 1, "blocks": 1, "prompt_tokens": 0, "new_tokens": 1, "batch_size": 1,
            "image_tokens": 0, "input_tokens": 1}
# Decay lengths (in steps) of the two position terms of the physical decode model.
FIRST_STEPS_TAU = 4.0   # one-off costs of the first steps (cache growth, allocator), fading out
RAMP_TAU = 16.0         # per-block cost that rises over the first steps and levels off


def output_names(target: str) -> tuple[str, str]:
    """The P50 and P95 column names of a target.

    Example:
        >>> output_names("prefill_total_ms")
        ('prefill_total_p50_ms', 'prefill_total_p95_ms')
    """
    stem = target.removesuffix("_ms")
    return f"{stem}_p50_ms", f"{stem}_p95_ms"


def config_arrays(**values) -> dict[str, np.ndarray]:
    """Broadcast knob and token values (scalars or 1-D arrays) to float64 arrays of one length.

    Example:
        >>> config_arrays(crops=[1, 2], top_k=2)["top_k"].tolist()
        [2.0, 2.0]
    """
    arrays = {}
    for k, v in values.items():
        try:
            arrays[k] = np.asarray(as_numpy(v), dtype=np.float64)
        except (TypeError, ValueError):
            raise EstimatorError(f"{k} must be a number or an array of numbers, got {v!r}") from None
    try:
        shaped = np.broadcast_arrays(*arrays.values())
    except ValueError:
        lengths = {k: v.shape for k, v in arrays.items()}
        raise EstimatorError(f"configuration arrays have different lengths {lengths}; give each knob "
                             "one value or arrays of one common length") from None
    out = {}
    for key, arr in zip(arrays, shaped):
        if arr.ndim > 1:
            raise EstimatorError(f"{key} must be a scalar or a 1-D array, got shape {arr.shape}")
        out[key] = np.atleast_1d(arr)
    return out


def as_numpy(value):
    """A torch tensor (on any device, with or without grad) as a numpy array, without importing
    torch; anything else unchanged.

    Example:
        >>> as_numpy([1, 2])
        [1, 2]
    """
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return value


def _geo_sum(tau: float, n: np.ndarray) -> np.ndarray:
    """sum_{s=0}^{n-1} exp(-s / tau), elementwise (0 for n = 0).

    Example:
        >>> math.isclose(float(_geo_sum(4.0, np.array([3.0]))[0]), sum(math.exp(-s / 4.0) for s in range(3)),
        ...              rel_tol=1e-12)
        True
    """
    return (1.0 - np.exp(n * (-1.0 / tau))) / (1.0 - math.exp(-1.0 / tau))


# ---------------------------------------------------------------------------- physical
def _physical_request(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    b, k, bs = x["blocks"], x["top_k"], x["batch_size"]
    tok = bs * x["input_tokens"]                   # tokens through the LLM in prefill
    one = np.ones_like(b)
    bk = b * k
    bt = b * tok
    prefill = np.stack([
        one,                        # fixed: embedding, LM head of the last token, host overhead
        (x["crops"] > 0).astype(np.float64),  # vision tower and projector called at all (one call)
        bs * x["crops"],            # vision encoder: a fixed cost per crop
        bs * x["image_tokens"],     # projector: per pooled image token
        tok,                        # per-token work outside the blocks (embedding, norms)
        b,                          # per-block fixed cost (kernel launches, norms, router)
        bk,                         # per-block, per-expert fixed cost (expert launches)
        bt,                         # per-block, per-token dense work (QKV/O projections, router)
        bk * tok,                   # expert FFN FLOPs: blocks x top-k x tokens
        bt * x["input_tokens"],     # attention scores: blocks x tokens^2
    ]).T
    return {"prefill_total_ms": prefill, "other_ms": _physical_other(x)}


def _physical_other(x: Mapping[str, np.ndarray]) -> np.ndarray:
    steps = x["decode_steps"]
    return np.stack([np.ones_like(steps), steps, x["batch_size"] * steps]).T  # per request, step, sequence-step


def _physical_step(x: Mapping[str, np.ndarray], step: np.ndarray) -> np.ndarray:
    b, k, bs = x["blocks"], x["top_k"], x["batch_size"]
    kv = bs * (x["input_tokens"] + step + 1.0)  # KV entries attended by this step's token(s)
    return np.stack([
        np.ones_like(b),                       # fixed per step: LM head, sampling, host overhead
        b,                                     # per-block fixed cost (dense weights read, launches)
        b * k,                                 # per-block, per-expert cost (expert weights read)
        b * kv,                                # attention over the KV cache
        np.exp(-step / FIRST_STEPS_TAU),       # one-off costs of the first steps, fading
        b * (1.0 - np.exp(-step / RAMP_TAU)),  # per-block cost rising over the first steps
    ]).T


def _physical_step_sum(x: Mapping[str, np.ndarray], n: np.ndarray) -> np.ndarray:
    b, k, bs = x["blocks"], x["top_k"], x["batch_size"]
    kv_sum = bs * (n * (x["input_tokens"] + 1.0) + n * (n - 1.0) / 2.0)
    return np.stack([n, b * n, b * k * n, b * kv_sum, _geo_sum(FIRST_STEPS_TAU, n),
                     b * (n - _geo_sum(RAMP_TAU, n))]).T


# ---------------------------------------------------------------------------- knobs baseline
def _knobs_request(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    one = np.ones_like(x["blocks"])
    base = [one, x["crops"], x["top_k"], x["blocks"], x["prompt_tokens"]]
    return {"prefill_total_ms": np.stack(base, axis=1), "other_ms": _knobs_other(x)}


def _knobs_other(x: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([np.ones_like(x["decode_steps"]), x["decode_steps"]], axis=1)


def _knobs_step(x: Mapping[str, np.ndarray], step: np.ndarray) -> np.ndarray:
    one = np.ones_like(x["blocks"])
    return np.stack([one, x["crops"], x["top_k"], x["blocks"], x["prompt_tokens"], step * one], axis=1)


def _knobs_step_sum(x: Mapping[str, np.ndarray], n: np.ndarray) -> np.ndarray:
    return np.stack([n, x["crops"] * n, x["top_k"] * n, x["blocks"] * n, x["prompt_tokens"] * n,
                     n * (n - 1.0) / 2.0], axis=1)


@dataclass(frozen=True)
class FeatureSet:
    """A named, versioned map from configuration arrays (and decode positions) to design matrices."""

    name: str
    description: str
    names: dict[str, tuple[str, ...]]
    request: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    step_fn: Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray]
    step_sum_fn: Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray]
    nonnegative: bool  # are the columns costs (so coefficients may be constrained >= 0)?
    other_fn: Callable[[Mapping[str, np.ndarray]], np.ndarray]

    def design(self, x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Request-level design matrices {prefill_total_ms, other_ms: (n, features)}; `x` needs
        ``decode_steps`` for other_ms.

        Example:
            >>> x = config_arrays(crops=2, top_k=1, blocks=3, prompt_tokens=4, batch_size=1,
            ...                   image_tokens=32, input_tokens=37, decode_steps=5)
            >>> FEATURE_SETS["knobs"].design(x)["prefill_total_ms"].tolist()
            [[1.0, 2.0, 1.0, 3.0, 4.0]]
        """
        return self.request(x)

    def design_other(self, x: Mapping[str, np.ndarray]) -> np.ndarray:
        """The other_ms design alone (what a request spends outside the phases)."""
        return self.other_fn(x)

    def step(self, x: Mapping[str, np.ndarray], step: np.ndarray) -> np.ndarray:
        """Design of one decode step per row, at position `step` (0 = the first decode step)."""
        return self.step_fn(x, np.asarray(step, dtype=np.float64))

    def step_sum(self, x: Mapping[str, np.ndarray], steps: np.ndarray) -> np.ndarray:
        """Design of the sum of decode steps 0 .. steps-1 per row (closed form, no loop)."""
        return self.step_sum_fn(x, np.asarray(steps, dtype=np.float64))

    def digest(self) -> str:
        blob = json.dumps({"name": self.name, "names": self.names,
                           "taus": [FIRST_STEPS_TAU, RAMP_TAU]}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


FEATURE_SETS: dict[str, FeatureSet] = {
    "physical": FeatureSet(
        name="physical",
        description="prefill: image present, crops, image tokens, tokens, blocks, blocks x top-k, blocks x tokens, "
                    "blocks x top-k x tokens, blocks x tokens^2; decode step: blocks, blocks x top-k, blocks x KV "
                    f"length, first-step costs (exp(-step/{FIRST_STEPS_TAU:g})), per-block ramp "
                    f"(1 - exp(-step/{RAMP_TAU:g})); other: per request, per step",
        names={"prefill_total_ms": ("const", "has_image", "crops", "image_tokens", "input_tokens", "blocks",
                                    "blocks_x_top_k", "blocks_x_input_tokens",
                                    "blocks_x_top_k_x_input_tokens", "blocks_x_input_tokens_sq"),
               "decode_step_ms": ("const", "blocks", "blocks_x_top_k", "blocks_x_kv_tokens", "first_steps",
                                  "blocks_x_ramp"),
               "other_ms": ("const", "decode_steps", "batch_x_decode_steps")},
        request=_physical_request, step_fn=_physical_step, step_sum_fn=_physical_step_sum,
        nonnegative=True, other_fn=_physical_other,
    ),
    "knobs": FeatureSet(
        name="knobs",
        description="the raw knob values and the decode position, linear (a baseline: no physical structure)",
        names={"prefill_total_ms": ("const", "crops", "top_k", "blocks", "prompt_tokens"),
               "decode_step_ms": ("const", "crops", "top_k", "blocks", "prompt_tokens", "step"),
               "other_ms": ("const", "decode_steps")},
        request=_knobs_request, step_fn=_knobs_step, step_sum_fn=_knobs_step_sum,
        nonnegative=False, other_fn=_knobs_other,
    ),
}


def feature_set(name: str) -> FeatureSet:
    """The feature set called `name`; an EstimatorError lists the known ones otherwise.

    Example:
        >>> feature_set("physical").names["other_ms"]
        ('const', 'decode_steps', 'batch_x_decode_steps')
    """
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise EstimatorError(f"unknown feature set {name!r}; known: {', '.join(FEATURE_SETS)}") from None


@dataclass(frozen=True)
class TokenMap:
    """How crops and prompt tokens become image and input tokens for the measured model:
    image_tokens = tokens_per_crop * crops + image_offset; input_tokens = image_tokens +
    prompt_tokens + input_offset. `exact` says whether it reproduced every training row."""

    tokens_per_crop: float
    image_offset: float
    input_offset: float
    exact: bool

    def image_tokens(self, crops: np.ndarray) -> np.ndarray:
        return self.tokens_per_crop * crops + self.image_offset

    def input_tokens(self, image_tokens: np.ndarray, prompt_tokens: np.ndarray) -> np.ndarray:
        return image_tokens + prompt_tokens + self.input_offset

    def as_dict(self) -> dict:
        return {"tokens_per_crop": self.tokens_per_crop, "image_offset": self.image_offset,
                "input_offset": self.input_offset, "exact": self.exact}

    @classmethod
    def learn(cls, crops: np.ndarray, prompt_tokens: np.ndarray, image_tokens: np.ndarray,
              input_tokens: np.ndarray) -> "TokenMap":
        """Least-squares token map from training rows (exact for the reference models).

        Example:
            >>> import numpy as np
            >>> tm = TokenMap.learn(np.array([1, 2]), np.array([8, 8]), np.array([16, 32]), np.array([25, 41]))
            >>> tm.tokens_per_crop, tm.image_offset, tm.input_offset, tm.exact
            (16.0, 0.0, 1.0, True)
        """
        crops, prompt = np.asarray(crops, float), np.asarray(prompt_tokens, float)
        img, inp = np.asarray(image_tokens, float), np.asarray(input_tokens, float)
        if np.ptp(crops) > 0:
            a = np.stack([crops, np.ones_like(crops)], axis=1)
            (per_crop, offset), *_ = np.linalg.lstsq(a, img, rcond=None)
        else:  # one crop count: all of it is per crop unless there are no crops
            per_crop = float(img.mean() / crops[0]) if crops[0] > 0 else 0.0
            offset = 0.0 if crops[0] > 0 else float(img.mean())
        per_crop, offset = _tidy(per_crop), _tidy(offset)
        input_offset = _tidy(float(np.median(inp - img - prompt)))
        tm = cls(per_crop, offset, input_offset, exact=False)
        exact = bool(np.allclose(tm.image_tokens(crops), img) and np.allclose(tm.input_tokens(img, prompt), inp))
        return cls(per_crop, offset, input_offset, exact=exact)


def _tidy(v: float) -> float:
    """Round to an integer when within float noise of one (token counts are integers)."""
    r = round(float(v))
    return float(r) if abs(v - r) < 1e-6 else float(v)
