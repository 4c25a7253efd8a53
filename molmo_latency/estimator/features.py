"""Feature sets of the latency estimator (transform only): configuration arrays -> design matrices.

A feature set turns what is known before generation (crops, image tokens, prompt tokens, input
tokens, top-k, active blocks, new tokens, batch size) into one design matrix per target. The
``physical`` set writes down where the time goes, so that a linear model with non-negative costs
extrapolates to token counts it never saw; ``knobs`` is the plain knob values (the baseline).

Example:
    >>> import numpy as np
    >>> x = config_arrays(crops=np.array([1, 4]), top_k=2, blocks=4, prompt_tokens=8,
    ...                   new_tokens=8, batch_size=1, image_tokens=np.array([16, 64]),
    ...                   input_tokens=np.array([25, 73]))
    >>> m = FEATURE_SETS["physical"].design(x)
    >>> m["decode_per_token_ms"].shape, FEATURE_SETS["physical"].names["decode_per_token_ms"][:2]
    ((2, 4), ('const', 'blocks'))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from molmo_latency.errors import EstimatorError

TARGETS = ("prefill_total_ms", "decode_per_token_ms")
# What a configuration is made of (all integers); image/input tokens derive from crops/prompt.
KNOBS = ("crops", "top_k", "blocks", "prompt_tokens", "new_tokens", "batch_size")
TOKENS = ("image_tokens", "input_tokens")
KNOB_MIN = {"crops": 0, "top_k": 1, "blocks": 1, "prompt_tokens": 0, "new_tokens": 1, "batch_size": 1,
            "image_tokens": 0, "input_tokens": 1}


def config_arrays(**values) -> dict[str, np.ndarray]:
    """Broadcast knob and token values (scalars or 1-D arrays) to float64 arrays of one length.

    Example:
        >>> config_arrays(crops=[1, 2], top_k=2)["top_k"].tolist()
        [2.0, 2.0]
    """
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
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


def _physical(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    b, k, bs = x["blocks"], x["top_k"], x["batch_size"]
    tok = bs * x["input_tokens"]                   # tokens through the LLM in prefill
    kv = bs * (x["input_tokens"] + 0.5 * x["new_tokens"])  # mean KV length over the decode steps
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
    ], axis=1)
    decode = np.stack([
        one,                        # fixed per step: LM head, sampling, host overhead
        b,                          # per-block fixed cost (dense weights read, launches)
        bk,                         # per-block, per-expert cost (expert weights read)
        b * kv,                     # attention over the KV cache
    ], axis=1)
    return {"prefill_total_ms": prefill, "decode_per_token_ms": decode}


def _knobs(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    one = np.ones_like(x["blocks"])
    base = [one, x["crops"], x["top_k"], x["blocks"], x["prompt_tokens"]]
    return {"prefill_total_ms": np.stack(base, axis=1),
            "decode_per_token_ms": np.stack([*base, x["new_tokens"]], axis=1)}


@dataclass(frozen=True)
class FeatureSet:
    """A named, versioned map from configuration arrays to one design matrix per target."""

    name: str
    description: str
    names: dict[str, tuple[str, ...]]
    build: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    nonnegative: bool  # are the columns costs (so coefficients may be constrained >= 0)?

    def design(self, x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Design matrices {target: (n, features)} for configuration arrays `x`.

        Example:
            >>> x = config_arrays(crops=2, top_k=1, blocks=3, prompt_tokens=4, new_tokens=2, batch_size=1,
            ...                   image_tokens=32, input_tokens=37)
            >>> FEATURE_SETS["knobs"].design(x)["prefill_total_ms"].tolist()
            [[1.0, 2.0, 1.0, 3.0, 4.0]]
        """
        return self.build(x)

    def digest(self) -> str:
        blob = json.dumps({"name": self.name, "names": self.names}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


FEATURE_SETS: dict[str, FeatureSet] = {
    "physical": FeatureSet(
        name="physical",
        description="costs by where the time goes: image present, crops, image tokens, tokens, blocks, blocks x top-k, "
                    "blocks x tokens, blocks x top-k x tokens, blocks x tokens^2; decode: blocks, "
                    "blocks x top-k, blocks x KV length",
        names={"prefill_total_ms": ("const", "has_image", "crops", "image_tokens", "input_tokens", "blocks",
                                    "blocks_x_top_k", "blocks_x_input_tokens",
                                    "blocks_x_top_k_x_input_tokens", "blocks_x_input_tokens_sq"),
               "decode_per_token_ms": ("const", "blocks", "blocks_x_top_k", "blocks_x_kv_tokens")},
        build=_physical,
        nonnegative=True,
    ),
    "knobs": FeatureSet(
        name="knobs",
        description="the raw knob values, linear (a baseline: no physical structure)",
        names={"prefill_total_ms": ("const", "crops", "top_k", "blocks", "prompt_tokens"),
               "decode_per_token_ms": ("const", "crops", "top_k", "blocks", "prompt_tokens", "new_tokens")},
        build=_knobs,
        nonnegative=False,
    ),
}


def feature_set(name: str) -> FeatureSet:
    """The feature set called `name`; an EstimatorError lists the known ones otherwise.

    Example:
        >>> feature_set("physical").names["decode_per_token_ms"]
        ('const', 'blocks', 'blocks_x_top_k', 'blocks_x_kv_tokens')
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
