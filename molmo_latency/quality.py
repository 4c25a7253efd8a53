"""Judge the conditions and the spread of a set of labels (transform: frames in, a verdict out).

Per configuration a noise verdict (spread of decode steps and of prefill, drift between
interleaved rounds, outliers, contention seen in the recorded conditions), and one run-level
verdict with its reasons, each saying what to do. Where a sweep recorded the host's speed beside
each request (``reference_ms``), the spread it explains is shown apart (``reference_cv_pct``,
``decode_step_cv_adjusted_pct``) and a machine whose speed varied is named as the cause. The thresholds are a value
(:class:`NoisePolicy`), not constants spread through the code.

Verdicts, worst first: ``contended`` (other processes took the CPU the measurement needed),
``noisy`` (repeats of a configuration disagree more than the policy allows), ``incomplete`` (the
run holds fewer requests than its sweep asks for), ``clean``. Requests measured cold
(``warm`` False) and invalid requests are left out of every figure here and counted in the
reasons.

Example:
    >>> import polars as pl
    >>> rows = pl.DataFrame({"config_id": ["a"] * 4, "order": [0, 1, 2, 3], "valid": [True] * 4,
    ...                      "decode_per_token_ms": [2.0, 2.02, 1.98, 2.0], "prefill_total_ms": [9.0, 9.1, 8.9, 9.0],
    ...                      "total_ms": [20.0, 20.1, 19.9, 20.0], "torch_threads": [1] * 4,
    ...                      "cpu_time_ratio": [0.98] * 4, "host_load_1m": [0.9] * 4, "warm": [True] * 4})
    >>> q = judge(rows, usable_cpus=2)
    >>> q.verdict, q.reasons
    ('clean', [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

VERDICTS = ("contended", "noisy", "incomplete", "clean")  # worst first


@dataclass(frozen=True)
class NoisePolicy:
    """When a configuration's labels are noisy or contended."""

    max_cv_pct: float = 5.0           # decode-step (and prefill) CV across repeats
    max_drift_pct: float = 5.0        # first vs second half of the interleaved rounds, of the median
    outlier_mads: float = 6.0         # a request this many scaled MADs from its configuration's median
    min_cpu_share: float = 0.75       # cpu_time_ratio / torch_threads below this: the CPU was taken
    load_margin: float = 0.5          # host load above usable CPUs + this margin: contended
    contended_share: float = 0.2      # a configuration with this share of contended requests is contended
    min_repeats: int = 3              # fewer valid warm repeats: too few to judge the spread


@dataclass
class Quality:
    """The verdict on a set of labels: one word, the reasons (each says what to do), and the
    per-configuration table it was drawn from."""

    verdict: str
    reasons: list[str]
    configs: pl.DataFrame = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons)}


def _has(frame: pl.DataFrame, *names: str) -> bool:
    return all(n in frame.columns for n in names)


def contention_flags(requests: pl.DataFrame, usable_cpus: int, policy: NoisePolicy = NoisePolicy()) -> pl.Series:
    """Per request: did other processes take the CPU it needed (from the recorded conditions)?

    On a CPU device the process's CPU share (``cpu_time_ratio / torch_threads``) below the policy's
    floor: measured inside the request itself, it is the direct signal (on this 2-core machine:
    1.00 quiet, 0.52 with two busy processes). On a GPU, where the host thread mostly waits, a
    host load above the usable CPUs (plus a margin); the 1-minute load average lags by a minute
    or more, so on a CPU it is recorded, not judged. False where nothing was recorded."""
    flag = pl.lit(False)
    on_cpu = (pl.col("device").cast(pl.Utf8).fill_null("cpu").str.starts_with("cpu")
              if "device" in requests.columns else pl.lit(True))
    if _has(requests, "cpu_time_ratio", "torch_threads"):
        share = pl.col("cpu_time_ratio") / pl.col("torch_threads").clip(lower_bound=1)
        flag = flag | (on_cpu & (share < policy.min_cpu_share)).fill_null(False)
    if "host_load_1m" in requests.columns:
        flag = flag | (~on_cpu & (pl.col("host_load_1m") > usable_cpus + policy.load_margin)).fill_null(False)
    return requests.with_columns(flag.alias("contended"))["contended"]


def _cv(col: str) -> pl.Expr:
    return (100 * pl.col(col).std() / pl.col(col).mean()).alias(f"{col.removesuffix('_ms')}_cv_pct")


def config_quality(requests: pl.DataFrame, usable_cpus: int, policy: NoisePolicy = NoisePolicy()) -> pl.DataFrame:
    """One row per configuration: n, CVs, drift, outliers, contended requests and a verdict."""
    rows = requests.with_columns(contention_flags(requests, usable_cpus, policy))
    keep = pl.col("valid").fill_null(False)
    if "warm" in rows.columns:
        keep = keep & pl.col("warm").fill_null(True)
    rows = rows.filter(keep)
    if rows.is_empty():
        return pl.DataFrame(schema={"config_id": pl.Utf8, "n": pl.UInt32, "verdict": pl.Utf8})
    order = "order" if "order" in rows.columns else "request"
    rows = rows.sort(order).with_columns(
        (pl.int_range(pl.len()).over("config_id") < pl.len().over("config_id") / 2).alias("_first_half"),
        (pl.col("total_ms") - pl.col("total_ms").median().over("config_id")).abs().alias("_dev"),
    ).with_columns(  # distance from the median in scaled MADs (0 on the median, even when the MAD is 0)
        pl.when(pl.col("_dev") == 0).then(0.0)
        .otherwise(pl.col("_dev") / (1.4826 * pl.col("_dev").median().over("config_id"))).alias("_mads"))
    step = "decode_per_token_ms" if "decode_per_token_ms" in rows.columns else "total_ms"
    if "reference_ms" in rows.columns:  # the step at the run's median host speed
        rows = rows.with_columns((pl.col(step) * pl.col("reference_ms").median() / pl.col("reference_ms"))
                                 .alias("_step_adjusted"))
    per = rows.group_by("config_id", maintain_order=True).agg(
        pl.len().alias("n"),
        _cv(step).alias("decode_step_cv_pct"),
        _cv("prefill_total_ms").alias("prefill_cv_pct") if "prefill_total_ms" in rows.columns
        else pl.lit(None, dtype=pl.Float64).alias("prefill_cv_pct"),
        (100 * (pl.col(step).filter(~pl.col("_first_half")).median()
                - pl.col(step).filter(pl.col("_first_half")).median()).abs()
         / pl.col(step).median()).alias("drift_pct"),
        (pl.col("_mads") > policy.outlier_mads).fill_null(False).sum().alias("outliers"),
        pl.col("contended").sum().alias("contended_requests"),
        *((_cv("reference_ms").alias("reference_cv_pct"), _cv("_step_adjusted").alias("decode_step_cv_adjusted_pct"))
          if "reference_ms" in rows.columns else
          (pl.lit(None, dtype=pl.Float64).alias("reference_cv_pct"),
           pl.lit(None, dtype=pl.Float64).alias("decode_step_cv_adjusted_pct"))),
    )
    few = pl.col("n") < policy.min_repeats
    noisy = ((pl.col("decode_step_cv_pct") > policy.max_cv_pct) | (pl.col("prefill_cv_pct") > policy.max_cv_pct)
             | ((pl.col("n") >= 4) & (pl.col("drift_pct") > policy.max_drift_pct))).fill_null(False)
    contended = pl.col("contended_requests") >= pl.max_horizontal(pl.lit(1), policy.contended_share * pl.col("n"))
    return per.with_columns(
        pl.when(contended).then(pl.lit("contended")).when(few).then(pl.lit("too few"))
        .when(noisy).then(pl.lit("noisy")).otherwise(pl.lit("clean")).alias("verdict"))


def _names(ids: list[str], most: int = 4) -> str:
    shown = ", ".join(ids[:most])
    return shown + (f" (+{len(ids) - most} more)" if len(ids) > most else "")


def _machine_speed(requests: pl.DataFrame, per: pl.DataFrame, policy: NoisePolicy) -> str | None:
    """A reason when the host's own speed (``reference_ms``, a fixed workload timed beside each
    request) varied more than the policy allows over the run: the spread it puts into the labels
    is the machine's, not the configurations'. None when it held steady or was not recorded."""
    if "reference_ms" not in requests.columns:
        return None
    keep = pl.col("valid").fill_null(False) if "valid" in requests.columns else pl.lit(True)
    if "warm" in requests.columns:
        keep = keep & pl.col("warm").fill_null(True)
    ref = requests.filter(keep)["reference_ms"].drop_nulls()
    if ref.len() < policy.min_repeats or not ref.mean():
        return None
    cv = 100 * float(ref.std()) / float(ref.mean())
    if cv <= policy.max_cv_pct:
        return None
    raw = per["decode_step_cv_pct"].drop_nulls()
    adj = per["decode_step_cv_adjusted_pct"].drop_nulls()
    figures = (f"; with that speed taken out, decode steps of a configuration differ by {adj.median():.1f}% "
               f"(CV, median over configurations; worst {adj.max():.1f}%) instead of {raw.median():.1f}% "
               f"(worst {raw.max():.1f}%)") if adj.len() and raw.len() else ""
    return (f"machine speed: a fixed reference workload timed beside each request (reference_ms, "
            f"{ref.min():.2f}-{ref.max():.2f} ms) varied by {cv:.1f}% (CV) over the run, so the host itself ran "
            f"faster and slower while it measured (a VM whose host CPU other tenants share, frequency scaling)"
            f"{figures}. The labels are kept as measured; for repeats within {policy.max_cv_pct:g}% measure on a "
            "dedicated machine or a GPU")


def judge(requests: pl.DataFrame, *, usable_cpus: int, expected_requests: int | None = None,
          resume_command: str | None = None, policy: NoisePolicy = NoisePolicy()) -> Quality:
    """The run-level verdict on a ``requests`` table (of a run directory or a profiler report)."""
    configs = requests if "config_id" in requests.columns else requests.with_columns(pl.lit("all").alias("config_id"))
    per = config_quality(configs, usable_cpus, policy)
    reasons: list[str] = []
    found: set[str] = set()
    contended = per.filter(pl.col("verdict") == "contended")
    if contended.height:
        found.add("contended")
        hit = int(contended["contended_requests"].sum())
        reasons.append(
            f"contention: {hit} requests in {contended.height} of {per.height} configurations ran while other "
            f"processes took the CPU (CPU share below {policy.min_cpu_share:.0%} of the threads on a CPU; host load "
            f"above {usable_cpus} CPUs on a GPU); hit: {_names(contended['config_id'].to_list())}. Rerun on a quiet machine, "
            "or with --threads below the free cores")
    noisy = per.filter(pl.col("verdict") == "noisy")
    if noisy.height:
        found.add("noisy")
        worst = noisy.sort("decode_step_cv_pct", descending=True, nulls_last=True).row(0, named=True)
        reasons.append(
            f"noisy: repeats disagree by more than {policy.max_cv_pct:g}% (CV) or drift between rounds in "
            f"{noisy.height} of {per.height} configurations (worst {worst['config_id']}: decode-step CV "
            f"{worst['decode_step_cv_pct'] or 0:.1f}%, drift {worst['drift_pct'] or 0:.1f}%): "
            f"{_names(noisy['config_id'].to_list())}. Use more repeats, a longer warm-up, or a quieter machine")
    machine = _machine_speed(configs, per, policy)
    if machine:
        reasons.append(machine)
    few = per.filter(pl.col("verdict") == "too few")
    if few.height:
        reasons.append(f"{few.height} configurations have fewer than {policy.min_repeats} valid warm repeats: "
                       f"their spread cannot be judged ({_names(few['config_id'].to_list())})")
    if "warm" in requests.columns:
        cold = requests.filter(~pl.col("warm").fill_null(True)).height
        if cold:
            reasons.append(f"{cold} requests were measured cold (before steady state) and are left out of every "
                           "median and spread")
    invalid = requests.filter(~pl.col("valid").fill_null(False)).height if "valid" in requests.columns else 0
    if invalid:
        reasons.append(f"{invalid} of {requests.height} requests are invalid (see invalid_reason) and are left out")
    if expected_requests is not None and requests.height < expected_requests:
        found.add("incomplete")
        hint = f"; resume with the same command: {resume_command}" if resume_command else \
            "; resume it by running the same command again"
        reasons.append(f"incomplete: holds {requests.height} of {expected_requests} requests{hint}")
    verdict = next((v for v in VERDICTS if v in found), "clean")
    return Quality(verdict=verdict, reasons=reasons, configs=per)
