"""The latency estimator: P50 and P95 of prefill_total_ms and decode_per_token_ms from a
configuration (crops, top-k, active blocks, prompt tokens, ...), learned from sweep run
directories, evaluated on held-out whole configurations, saved with no pickle.

- :func:`fit_estimator` (transform): requests of run directories -> :class:`Estimator`.
- :class:`Estimator` (hold): ``predict(frame_or_dict) -> polars.DataFrame``,
  ``predict_arrays(**numpy arrays) -> dict`` (the fast batched path), ``save`` / ``load``.
- :func:`load_requests` (hold): valid requests of one or more run directories.

Example:
    >>> import numpy as np
    >>> est = fit_estimator(example_requests(seed=0))
    >>> out = est.predict_arrays(crops=np.arange(1, 1001) % 8 + 1, top_k=2, blocks=4, prompt_tokens=32)
    >>> out["decode_per_token_p95_ms"].shape
    (1000,)
"""

from molmo_latency.estimator.data import load_requests
from molmo_latency.estimator.example import example_requests
from molmo_latency.estimator.features import FEATURE_SETS, TARGETS, FeatureSet, TokenMap
from molmo_latency.estimator.fit import fit_estimator, regression_metrics
from molmo_latency.estimator.model import Estimator, output_names
from molmo_latency.estimator.parity import write_parity_plot

__all__ = ["Estimator", "FEATURE_SETS", "FeatureSet", "TARGETS", "TokenMap", "example_requests", "fit_estimator",
           "load_requests", "output_names", "regression_metrics", "write_parity_plot"]
