"""A synthetic requests table for examples and tests of the estimator (collect, simulated).

Latencies follow a known physical cost (a per-crop vision cost, per-block and per-expert fixed
costs, per-token and attention work, a KV-length term in decode) times log-normal noise, on the
grid crops x top-k x blocks x prompt tokens, with a few requests marked invalid like the profiler
does. It stands in for a sweep where one would take too long (docstrings).

Example:
    >>> rows = example_requests(seed=0)
    >>> rows.height, rows["config_id"].n_unique(), int((~rows["valid"]).sum())
    (360, 90, 3)
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
DECODE_COST_MS = {"const": 0.4, "blocks": 0.25, "blocks_x_top_k": 0.06, "blocks_x_kv_tokens": 2e-4}


def example_requests(seed: int = 0, *, noise: float = 0.03, repeats: int = 4, crops=(0, 1, 2, 4, 8),
                     top_k=(1, 2, 4), blocks=(1, 2, 4), prompt_tokens=(8, 32), new_tokens: int = 8) -> pl.DataFrame:
    """Requests of a simulated sweep: the columns the estimator reads from requests.parquet."""
    from molmo_latency.estimator.features import FEATURE_SETS, config_arrays

    rng = np.random.default_rng(seed)
    grid = list(itertools.product(crops, top_k, blocks, prompt_tokens))
    n = len(grid) * repeats
    c, k, b, p = (np.array([g[i] for g in grid] * repeats) for i in range(4))
    img = TOKENS_PER_CROP * c
    inp = 1 + img + p
    x = config_arrays(crops=c, top_k=k, blocks=b, prompt_tokens=p, new_tokens=new_tokens, batch_size=1,
                      image_tokens=img, input_tokens=inp)
    fs = FEATURE_SETS["physical"]
    m = fs.build(x)
    prefill = m["prefill_total_ms"] @ np.array([PREFILL_COST_MS[f] for f in fs.names["prefill_total_ms"]])
    decode = m["decode_per_token_ms"] @ np.array([DECODE_COST_MS[f] for f in fs.names["decode_per_token_ms"]])
    valid = np.ones(n, dtype=bool)
    valid[rng.choice(n, size=3, replace=False)] = False
    return pl.DataFrame({
        "config_id": [f"c{a}-k{bb}-b{cc}-p{d}-n{new_tokens}-bs1" for a, bb, cc, d in zip(c, k, b, p)],
        "repeat": np.repeat(np.arange(repeats), len(grid)),
        "crops": c, "top_k": k, "blocks": b, "prompt_tokens": p, "new_tokens": np.full(n, new_tokens),
        "batch_size": np.ones(n, dtype=np.int64), "image_tokens": img, "input_tokens": inp,
        "prefill_total_ms": prefill * rng.lognormal(0, noise, n),
        "decode_per_token_ms": decode * rng.lognormal(0, noise, n),
        "valid": valid,
    })
