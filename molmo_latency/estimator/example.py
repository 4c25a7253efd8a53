"""A synthetic requests table for examples and tests of the estimator (collect, simulated).

Latencies follow a known physical cost (a per-crop vision cost, per-block and per-expert fixed
costs, per-token and attention work; per decode step a KV-length term, one-off costs of the first
steps and a per-block ramp over the first steps) times log-normal noise, on the grid crops x top-k
x blocks x prompt tokens x new tokens, with a few requests marked invalid like the profiler does.
Each request carries its decode step latencies (``decode_step_ms``, a list) as a run directory's
requests do after :func:`load_requests`. It stands in for a sweep where one would take too long.

Example:
    >>> rows = example_requests(seed=0)
    >>> rows.height, rows["config_id"].n_unique(), int((~rows["valid"]).sum())
    (720, 180, 3)
    >>> rows["decode_step_ms"].list.len().unique().sort().to_list()
    [3, 15]
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

TOKENS_PER_CROP = 16
# ms per unit of the physical features (see features.py), the simulated truth
PREFILL_COST_MS = {"const": 0.8, "has_image": 0.5, "crops": 0.35, "image_tokens": 0.002, "input_tokens": 0.001, "blocks": 0.3,
                   "blocks_x_top_k": 0.05, "blocks_x_input_tokens": 0.004, "blocks_x_top_k_x_input_tokens": 0.003,
                   "blocks_x_input_tokens_sq": 2e-6}
DECODE_STEP_COST_MS = {"const": 0.4, "blocks": 0.25, "blocks_x_top_k": 0.06, "blocks_x_kv_tokens": 2e-4,
                       "first_steps": 0.3, "blocks_x_ramp": 0.1}
OTHER_COST_MS = {"const": 0.2, "decode_steps": 0.05, "batch_x_decode_steps": 0.0}


def example_requests(seed: int = 0, *, noise: float = 0.03, repeats: int = 4, crops=(0, 1, 2, 4, 8),
                     top_k=(1, 2, 4), blocks=(1, 2, 4), prompt_tokens=(8, 32), new_tokens=(4, 16)) -> pl.DataFrame:
    """Requests of a simulated sweep: the columns the estimator reads from a run directory."""
    from molmo_latency.estimator.features import FEATURE_SETS, config_arrays

    rng = np.random.default_rng(seed)
    grid = list(itertools.product(crops, top_k, blocks, prompt_tokens, np.atleast_1d(new_tokens)))
    n = len(grid) * repeats
    c, k, b, p, nt = (np.array([g[i] for g in grid] * repeats) for i in range(5))
    img = TOKENS_PER_CROP * c
    inp = 1 + img + p
    steps = nt - 1
    x = config_arrays(crops=c, top_k=k, blocks=b, prompt_tokens=p, batch_size=1, image_tokens=img,
                      input_tokens=inp, decode_steps=steps)
    fs = FEATURE_SETS["physical"]
    m = fs.design(x)
    prefill = m["prefill_total_ms"] @ np.array([PREFILL_COST_MS[f] for f in fs.names["prefill_total_ms"]])
    prefill *= rng.lognormal(0, noise, n)
    other = m["other_ms"] @ np.array([OTHER_COST_MS[f] for f in fs.names["other_ms"]]) * rng.lognormal(0, noise, n)
    step_cost = np.array([DECODE_STEP_COST_MS[f] for f in fs.names["decode_step_ms"]])
    decode_lists = []
    for i in range(n):
        xi = {key: v[i:i + 1].repeat(steps[i]) for key, v in x.items()}
        ms = fs.step(xi, np.arange(steps[i])) @ step_cost
        decode_lists.append((ms * rng.lognormal(0, noise, steps[i])).tolist())
    decode = np.array([sum(d) for d in decode_lists])
    valid = np.ones(n, dtype=bool)
    valid[rng.choice(n, size=3, replace=False)] = False
    return pl.DataFrame({
        "config_id": [f"c{a}-k{bb}-b{cc}-p{d}-n{e}-bs1" for a, bb, cc, d, e in zip(c, k, b, p, nt)],
        "repeat": np.repeat(np.arange(repeats), len(grid)),
        "crops": c, "top_k": k, "blocks": b, "prompt_tokens": p, "new_tokens": nt,
        "batch_size": np.ones(n, dtype=np.int64), "image_tokens": img, "input_tokens": inp,
        "decode_steps": steps, "output_tokens": nt,
        "prefill_total_ms": prefill, "decode_ms": decode, "other_ms": other, "total_ms": prefill + decode + other,
        "decode_step_ms": pl.Series(decode_lists, dtype=pl.List(pl.Float64)),
        "valid": valid,
    })
