"""The latency estimator: how long a whole request takes for N output tokens, at P50 and P95,
for a configuration (crops, top-k, active blocks, prompt tokens, ...), learned from sweep run
directories (every decode step of every valid request), evaluated on held-out whole
configurations and held-out N, saved with no pickle.

- :func:`fit_estimator` (transform): requests of run directories -> :class:`Estimator`.
- :class:`Estimator` (hold): ``predict(frame_or_dict) -> polars.DataFrame``,
  ``predict_arrays(**numpy arrays, new_tokens=N) -> dict`` (the fast batched path),
  ``predict_grid`` (every configuration at a vector of N), ``predict_positions`` (single decode
  steps), ``save`` / ``load`` (every file checksummed); every path answers ``in_range`` per row
  and refuses values the model cannot take (``check_possible``).
- The controller's calls on :class:`Estimator`: ``plan`` / ``plan_arrays`` (what fits a budget at
  a quantile; with accuracy scores the Pareto frontier and the best per budget),
  ``check_budget_feasibility`` and ``estimate_max_output_tokens`` (numpy or torch in, numpy out).
- :class:`OutputLengths`: a distribution of N (the budget when N is not known in advance).
- :func:`load_requests` (hold): valid requests of one or more run directories.
- :func:`quality_gate`: the verdict on a fit (``est.meta["quality"]``).

Example:
    >>> import numpy as np
    >>> est = fit_estimator(example_requests(seed=0))
    >>> out = est.predict_arrays(crops=np.arange(1, 1001) % 8 + 1, top_k=2, blocks=4, prompt_tokens=32, new_tokens=64)
    >>> out["request_p95_ms"].shape
    (1000,)
"""

from molmo_latency.estimator.data import load_requests
from molmo_latency.estimator.example import example_requests
from molmo_latency.estimator.features import FEATURE_SETS, OUTPUTS, TARGETS, FeatureSet, TokenMap, output_names
from molmo_latency.estimator.fit import fit_estimator, quality_gate, regression_metrics
from molmo_latency.estimator.model import Estimator, OutputLengths, load_accuracy

__all__ = ["Estimator", "FEATURE_SETS", "FeatureSet", "OUTPUTS", "OutputLengths", "TARGETS", "TokenMap",
           "example_requests", "fit_estimator", "load_accuracy", "load_requests", "output_names", "quality_gate",
           "regression_metrics"]
