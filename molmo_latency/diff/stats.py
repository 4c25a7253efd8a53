"""Two samples of one timing, told apart from noise (transform only).

The verdict rule (one comparison of sample A against sample B, e.g. the total latency of the
requests of two configurations):

1. the samples must be large enough for the test to detect anything: with fewer than
   ``MIN_SAMPLES`` (2) values a side, or when even complete separation of A and B could not
   bring the (Holm-adjusted) p-value below ``alpha`` (:func:`smallest_p`), the verdict is
   ``too few samples`` (``reason`` says how many repeats per side would do);
2. a two-sided Mann-Whitney U test (``scipy.stats.mannwhitneyu``) of B against A: it uses the
   whole repeat-to-repeat spread and no normality assumption. Its p-value is Holm-adjusted over
   the rows of one family (see :func:`holm`) and must be below ``alpha`` (default 0.05);
3. the seeded bootstrap confidence interval (``ci_level``, default 95 %, percentile method,
   ``resamples`` = 2,000 independent resamples of each side) of the difference of medians
   ``median(B) - median(A)`` must exclude 0;
4. the difference of medians must be at least ``min_effect_pct`` (default 1 %) of A's median:
   a change smaller than that is not worth a verdict even when it is real.

All four hold: ``slower`` (B's median above A's) or ``faster``; otherwise ``no significant
change``. With few repeats the test cannot reach ``alpha``: 3 against 3 repeats give at best
p = 0.1, so use at least 4 repeats per side (4 against 4: p >= 0.029).

Example:
    >>> a = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.1]
    >>> row = compare_samples(a, [x + 1.0 for x in a])
    >>> row["verdict"], round(row["delta_ms"], 2), row["ci_low_ms"] > 0
    ('slower', 1.0, True)
    >>> compare_samples(a, list(reversed(a)))["verdict"]
    'no significant change'
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Sequence

import numpy as np

SLOWER, FASTER, SAME, TOO_FEW = "slower", "faster", "no significant change", "too few samples"
VERDICTS = (FASTER, SLOWER, SAME, TOO_FEW)
MIN_SAMPLES = 2

DEFAULTS: dict[str, Any] = {"alpha": 0.05, "ci_level": 0.95, "resamples": 2000, "min_effect_pct": 1.0,
                            "seed": 0}

RULE = ("slower/faster when all hold: at least {min_samples} samples per side; two-sided "
        "Mann-Whitney U p-value, Holm-adjusted within its family of rows, below {alpha}; the "
        "{ci_pct:g}% bootstrap CI ({resamples} seeded resamples) of median(B) - median(A) excludes 0; "
        "|median(B) - median(A)| >= {min_effect_pct:g}% of median(A). Otherwise: no significant change "
        "(or too few samples, where the test could not reach {alpha} even if every B differed from every A).")


def describe_rule(alpha: float = 0.05, ci_level: float = 0.95, resamples: int = 2000,
                  min_effect_pct: float = 1.0) -> str:
    """The verdict rule in one sentence, with the thresholds in use.

    Example:
        >>> describe_rule().startswith("slower/faster when all hold")
        True
    """
    return RULE.format(min_samples=MIN_SAMPLES, alpha=alpha, ci_pct=100 * ci_level, resamples=resamples,
                       min_effect_pct=min_effect_pct)


def p95(values: np.ndarray) -> float:
    """95th percentile with linear interpolation (as :func:`molmo_latency.stats.summarize`).

    Example:
        >>> p95(np.arange(1.0, 21.0))
        19.05
    """
    return float(np.quantile(values, 0.95, method="linear"))


def bootstrap_median_diff_ci(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000,
                             ci_level: float = 0.95, seed: int | Sequence[int] = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``median(b) - median(a)``, each side resampled on its own.

    Seeded (``numpy.random.default_rng(seed)``), so the same inputs give the same interval.

    Example:
        >>> lo, hi = bootstrap_median_diff_ci([1.0, 2.0, 3.0, 4.0], [11.0, 12.0, 13.0, 14.0])
        >>> 7.0 <= lo <= 10.0 <= hi <= 13.0
        True
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    med_a = np.median(xa[rng.integers(0, xa.size, size=(resamples, xa.size))], axis=1)
    med_b = np.median(xb[rng.integers(0, xb.size, size=(resamples, xb.size))], axis=1)
    tail = (1.0 - ci_level) / 2.0
    lo, hi = np.quantile(med_b - med_a, [tail, 1.0 - tail], method="linear")
    return (float(lo), float(hi))


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Mann-Whitney U p-value of b against a; None with fewer than MIN_SAMPLES a side.

    Example:
        >>> round(mann_whitney_p([1, 2, 3, 4], [5, 6, 7, 8]), 4)
        0.0286
    """
    from scipy.stats import mannwhitneyu

    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size < MIN_SAMPLES or xb.size < MIN_SAMPLES:
        return None
    if np.ptp(np.concatenate([xa, xb])) == 0.0:  # every value equal: nothing to tell apart
        return 1.0
    return float(mannwhitneyu(xb, xa, alternative="two-sided").pvalue)


@functools.lru_cache(maxsize=512)
def smallest_p(n_a: int, n_b: int) -> float | None:
    """The smallest two-sided Mann-Whitney p-value that `n_a` against `n_b` samples can give
    (every B above every A); None below MIN_SAMPLES a side.

    Example:
        >>> round(smallest_p(3, 3), 3), round(smallest_p(4, 4), 4)
        (0.1, 0.0286)
    """
    if n_a < MIN_SAMPLES or n_b < MIN_SAMPLES:
        return None
    return mann_whitney_p(np.arange(n_a, dtype=np.float64), np.arange(n_a, n_a + n_b, dtype=np.float64))


def repeats_needed(alpha: float = 0.05, family_size: int = 1, limit: int = 200) -> int | None:
    """The fewest samples per side (equal sides) with which a verdict is possible at all: the
    smallest reachable p, times `family_size` (Holm), below `alpha`.

    Example:
        >>> repeats_needed(0.05, 1), repeats_needed(0.05, 5)
        (4, 5)
    """
    for n in range(MIN_SAMPLES, limit + 1):
        p = smallest_p(n, n)
        if p is not None and p * max(1, family_size) < alpha:
            return n
    return None


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None and does not count in the family).

    Example:
        >>> [None if p is None else round(p, 6) for p in holm([0.01, 0.04, None, 0.03])]
        [0.03, 0.06, None, 0.06]
    """
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def row_seed(seed: int, key: str) -> list[int]:
    """A per-row seed, so a row's interval does not depend on the other rows or their order.

    Example:
        >>> row_seed(0, "total") == row_seed(0, "total") != row_seed(0, "prefill")
        True
    """
    return [int(seed), zlib.crc32(key.encode())]


def compare_samples(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05, ci_level: float = 0.95,
                    resamples: int = 2000, min_effect_pct: float = 1.0, seed: int | Sequence[int] = 0,
                    p_adjusted: float | None = None, family_size: int = 1) -> dict[str, Any]:
    """Medians, p95, difference with bootstrap CI, p-value and verdict of two samples (ms).

    `p_adjusted` replaces the raw Mann-Whitney p-value in the rule (Holm over a family of
    `family_size` rows); without it the raw p-value is used. The rule is in the module docstring.

    Example:
        >>> r = compare_samples([5.0, 5.1, 4.9, 5.0], [5.0, 5.1, 4.9, 5.02])
        >>> r["verdict"], r["reason"]
        ('no significant change', 'p >= alpha')
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    row: dict[str, Any] = {
        "a_n": int(xa.size), "b_n": int(xb.size),
        "a_median_ms": float(np.median(xa)) if xa.size else None,
        "b_median_ms": float(np.median(xb)) if xb.size else None,
        "a_p95_ms": p95(xa) if xa.size else None,
        "b_p95_ms": p95(xb) if xb.size else None,
    }
    if not xa.size or not xb.size:
        return {**row, "delta_ms": None, "delta_pct": None, "ci_low_ms": None, "ci_high_ms": None,
                "p_value": None, "p_adjusted": None, "verdict": SAME, "reason": "no samples on one side"}
    delta = row["b_median_ms"] - row["a_median_ms"]
    lo, hi = bootstrap_median_diff_ci(xa, xb, resamples=resamples, ci_level=ci_level, seed=seed)
    p = mann_whitney_p(xa, xb)
    p_rule = p_adjusted if p_adjusted is not None else p
    base = abs(row["a_median_ms"])
    delta_pct = 100.0 * delta / base if base > 0 else None
    floor = smallest_p(int(xa.size), int(xb.size))
    need = repeats_needed(alpha, family_size)
    holm_note = f", Holm over {family_size} rows" if family_size > 1 else ""
    if floor is None:
        verdict, reason = TOO_FEW, (f"fewer than {MIN_SAMPLES} samples on a side (n = {xa.size} / {xb.size}); "
                                    f"measure at least {need} repeats per side")
    elif floor * max(1, family_size) >= alpha:
        verdict, reason = TOO_FEW, (f"n = {xa.size} / {xb.size} cannot reach p < {alpha:g} even if every B "
                                    f"differed from every A (smallest p {floor * max(1, family_size):.3g}"
                                    f"{holm_note}); measure at least {need} repeats per side")
    elif p_rule is None or p_rule >= alpha:
        verdict, reason = SAME, "p >= alpha"
    elif lo <= 0.0 <= hi:
        verdict, reason = SAME, "CI includes 0"
    elif abs(delta) < min_effect_pct / 100.0 * base:
        verdict, reason = SAME, f"|delta| < {min_effect_pct:g}% of A"
    else:
        verdict, reason = (SLOWER if delta > 0 else FASTER), "all criteria met"
    return {**row, "delta_ms": delta, "delta_pct": delta_pct, "ci_low_ms": lo, "ci_high_ms": hi,
            "p_value": p, "p_adjusted": p_adjusted if p_adjusted is not None else p, "verdict": verdict,
            "reason": reason}
