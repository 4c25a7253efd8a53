"""Which part of the latency variance is the hardware: pure functions from frames to frames.

Input is a requests table (``requests.parquet`` of a run directory, or any Parquet with
REQUEST_COLUMNS and, when NVML was on, TELEMETRY_AGG_COLUMNS). Output:

- :func:`phase_stats`: per configuration and phase, n, median, p95 and coefficient of variation.
- :func:`hardware_share`: per target (decode per token, prefill), the share of the
  *within-configuration* variance explained by the hardware columns: the R^2 of an OLS
  regression of ``value - mean(value | config)`` on the config-demeaned SM clock, max
  temperature and slowdown flag (numpy ``lstsq``, no intercept since everything is demeaned).
- :func:`host_share`: the same for the host side, from the conditions each request recorded
  (the process's CPU share of its threads, involuntary context switches per second, host load):
  how much of the variance other processes on the machine explain.
- :func:`find_outliers`: requests with ``|robust z| > 3.5`` (median/MAD within configuration)
  and their likely cause.
- :func:`decode_vs_clock`: the points of the decode-time-against-SM-clock plot.

Only valid, complete requests enter the statistics; invalid ones can still be outliers
(cause "invalid measurement").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.schema import CONFIG_COLUMNS, TELEMETRY_AGG_COLUMNS
from molmo_latency.stats import summarize
from molmo_latency.telemetry.throttle import SLOWDOWN_REASONS_MASK, throttle_reason_names

__all__ = [
    "Explanation",
    "HARDWARE_TARGETS",
    "PHASE_MS_COLUMNS",
    "decode_vs_clock",
    "explain",
    "find_outliers",
    "hardware_share",
    "host_share",
    "phase_stats",
    "prepare_requests",
]

PHASE_MS_COLUMNS: tuple[str, ...] = (
    "vision_ms", "projector_ms", "prefill_ms", "decode_per_token_ms", "decode_ms", "other_ms",
    "total_ms", "prefill_total_ms",
)
HARDWARE_TARGETS: tuple[str, ...] = ("decode_per_token_ms", "prefill_ms")
OUTLIER_METRICS: tuple[str, ...] = ("decode_per_token_ms", "prefill_ms", "total_ms")
# (regressor column, coefficient column in the hardware_share table)
_REGRESSORS = (
    ("sm_clock_mean_mhz", "coef_ms_per_mhz"),
    ("temp_max_c", "coef_ms_per_c"),
    ("throttled", "coef_ms_throttled"),
)
# the host side, from molmo_latency.conditions' columns (derived in prepare_requests)
_HOST_REGRESSORS = (
    ("cpu_share", "coef_ms_per_cpu_share"),
    ("switches_per_s", "coef_ms_per_switch_per_s"),
    ("host_load_1m", "coef_ms_per_load"),
    ("reference_ms", "coef_ms_per_reference_ms"),  # the host's speed beside the request (sweeps)
)
# a request whose reference workload took this much longer than the run's median ran on a slow host
SLOW_MACHINE_RATIO = 1.15
NO_CONDITIONS = "no host conditions recorded"
# a request whose process got less than this share of its threads' CPU time ran contended
CONTENDED_CPU_SHARE = 0.75
_DTYPES = {"int64": pl.Int64, "float64": pl.Float64, "str": pl.String, "bool": pl.Boolean}
NO_TELEMETRY = "no telemetry"


def _usable() -> pl.Expr:
    return pl.col("valid").fill_null(False) & pl.col("complete").fill_null(True)


def prepare_requests(requests: pl.DataFrame) -> pl.DataFrame:
    """Check a requests table and fill what ``explain`` needs and older tables may lack.

    Raises :class:`~molmo_latency.errors.MolmoLatencyError` when a phase column is missing or
    the table is empty. Adds null telemetry columns (NVML off), ``valid``/``complete`` = True,
    a ``config_id`` from the configuration columns (or ``"all"``), a row ``request`` index,
    ``order`` from ``start_ns`` and a boolean ``throttled`` (slowdown bit seen); casts
    ``config_id`` to text.

    >>> df = prepare_requests(pl.DataFrame({c: [1.0] for c in PHASE_MS_COLUMNS}))
    >>> df["config_id"].to_list(), df["sm_clock_mean_mhz"].to_list(), df["valid"].to_list()
    (['all'], [None], [True])
    """
    missing = [c for c in PHASE_MS_COLUMNS if c not in requests.columns]
    if missing:
        raise MolmoLatencyError(
            f"the requests table lacks the phase column(s) {', '.join(missing)}; explain needs "
            "the requests.parquet that `molmo-latency profile` writes (or prof.report().requests "
            f"saved as Parquet), with {', '.join(PHASE_MS_COLUMNS)}")
    if requests.height == 0:
        raise MolmoLatencyError("the requests table has no rows: nothing to explain; run a sweep "
                                "that measures at least one request")
    df = requests
    add = [pl.lit(None, dtype=_DTYPES[t]).alias(c)
           for c, t in TELEMETRY_AGG_COLUMNS.items() if c not in df.columns]
    for col, value in (("valid", True), ("complete", True)):
        if col not in df.columns:
            add.append(pl.lit(value).alias(col))
    if "invalid_reason" not in df.columns:
        add.append(pl.lit(None, dtype=pl.String).alias("invalid_reason"))
    if add:
        df = df.with_columns(add)
    from molmo_latency.report import with_config_id

    df = with_config_id(df)  # the same configurations as `molmo-latency report`
    if "request" not in df.columns:
        df = df.with_row_index("request").with_columns(pl.col("request").cast(pl.Int64))
    if "order" not in df.columns:
        key = "start_ns" if "start_ns" in df.columns else "request"
        df = df.with_columns(pl.col(key).rank("ordinal").cast(pl.Int64).sub(1).alias("order"))
    if "repeat" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.Int64).alias("repeat"))
    host = []
    for col in ("cpu_time_ratio", "torch_threads", "involuntary_switches", "host_load_1m", "reference_ms"):
        if col not in df.columns:
            host.append(pl.lit(None, dtype=pl.Float64).alias(col))
    if host:
        df = df.with_columns(host)
    on_cpu = (pl.col("device").cast(pl.String).fill_null("cpu").str.starts_with("cpu")
              if "device" in df.columns else pl.lit(True))
    return df.with_columns(
        pl.when(pl.col("throttle_reasons").is_null()).then(None)
        .otherwise((pl.col("throttle_reasons") & SLOWDOWN_REASONS_MASK) != 0)
        .alias("throttled"),
        # the CPU share says something only where the CPU computes (on a GPU the host thread waits)
        pl.when(on_cpu).then(pl.col("cpu_time_ratio").cast(pl.Float64)
                             / pl.col("torch_threads").cast(pl.Float64).clip(lower_bound=1.0))
        .alias("cpu_share"),
        (pl.col("involuntary_switches").cast(pl.Float64) / (pl.col("total_ms") / 1000.0)).alias("switches_per_s"),
    )


def _config_order(df: pl.DataFrame) -> pl.DataFrame:
    return df.select("config_id").unique(maintain_order=True).with_row_index("_cfg_order")


def phase_stats(requests: pl.DataFrame) -> pl.DataFrame:
    """Per configuration and phase column: ``n``, ``median_ms``, ``p95_ms``, ``mean_ms``, ``cv``.

    Over valid, complete requests; ``cv`` = sample std / mean (null below 2 values or for a zero
    mean). Rows come in configuration order of first appearance, phases in PHASE_MS_COLUMNS order.

    >>> df = prepare_requests(pl.DataFrame({**{c: [1.0, 1.0] for c in PHASE_MS_COLUMNS},
    ...                                     "total_ms": [10.0, 14.0]}))
    >>> row = phase_stats(df).filter(pl.col("phase") == "total_ms").row(0, named=True)
    >>> row["n"], row["median_ms"], round(row["cv"], 4)     # std 2.83 / mean 12
    (2, 12.0, 0.2357)
    """
    phase_order = pl.DataFrame({"phase": list(PHASE_MS_COLUMNS),
                                "_phase_order": list(range(len(PHASE_MS_COLUMNS)))})
    stats = (summarize(requests.filter(_usable()), ["config_id"], PHASE_MS_COLUMNS)
             .rename({"metric": "phase", "median": "median_ms", "p95": "p95_ms", "mean": "mean_ms"}))
    return (stats.join(_config_order(requests), on="config_id")
            .join(phase_order, on="phase")
            .sort("_cfg_order", "_phase_order")
            .select("config_id", "phase", "n", "median_ms", "p95_ms", "mean_ms", "cv"))


def hardware_share(requests: pl.DataFrame, targets: tuple[str, ...] = HARDWARE_TARGETS) -> pl.DataFrame:
    """Share of the within-configuration variance of each target explained by the hardware.

    For each target: keep valid requests with the target and the SM clock present, in
    configurations with at least 2 of them; demean the target and the regressors (SM clock
    mean, max temperature, slowdown flag; a regressor null everywhere or constant within every
    configuration is left out) by configuration; ``r2 = 1 - SS_res / SS_tot`` of the OLS fit
    (numpy lstsq). ``r2_adj`` charges one degree of freedom per configuration mean and per
    regressor. Coefficients are in ms per MHz, per degree C and for a throttled request.
    ``r2_relative`` is the same fit on the relative residual ``value / mean(value | config) - 1``:
    a clock effect is multiplicative (time ~ 1 / clock), so when configurations differ in size
    one common slope fits relative residuals better and every configuration weighs the same.
    ``note`` says ``"no telemetry"`` when no request has telemetry.

    >>> clock = [1410.0, 1300.0, 1200.0, 1410.0, 1250.0]
    >>> df = prepare_requests(pl.DataFrame({**{c: [1.0] * 5 for c in PHASE_MS_COLUMNS},
    ...     "decode_per_token_ms": [10 * 1410 / c for c in clock], "sm_clock_mean_mhz": clock}))
    >>> round(hardware_share(df).row(0, named=True)["r2"], 3)
    0.998
    """
    return _variance_share(requests, targets, _REGRESSORS, "sm_clock_mean_mhz", NO_TELEMETRY)


def host_share(requests: pl.DataFrame, targets: tuple[str, ...] = HARDWARE_TARGETS) -> pl.DataFrame:
    """Share of the within-configuration variance of each target explained by the host side:
    the process's CPU share of its threads (``cpu_share``, CPU devices only), involuntary context
    switches per second, the host's 1-minute load and, from sweeps, the time of a fixed reference
    workload beside each request (``reference_ms``: the host's own speed, which a VM changes
    unseen); the same fit as :func:`hardware_share`. A large share says the machine, not the
    configuration, moved the labels.

    >>> share = [1.0, 0.5, 0.98, 0.6, 0.99]
    >>> df = prepare_requests(pl.DataFrame({**{c: [1.0] * 5 for c in PHASE_MS_COLUMNS},
    ...     "decode_per_token_ms": [2.0 / s for s in share], "cpu_time_ratio": share, "torch_threads": [1] * 5}))
    >>> r = host_share(df).row(0, named=True)
    >>> r["regressors"], r["r2"] > 0.9
    ('cpu_share', True)
    """
    return _variance_share(requests, targets, _HOST_REGRESSORS, "cpu_share", NO_CONDITIONS,
                           any_regressor=True)


def _variance_share(requests: pl.DataFrame, targets: tuple[str, ...], regressors: tuple[tuple[str, str], ...],
                    presence: str, absent_note: str, any_regressor: bool = False) -> pl.DataFrame:
    """The demeaned OLS share of each target's within-configuration variance that `regressors`
    explain (see :func:`hardware_share`); `absent_note` when `presence` (or, with
    `any_regressor`, every regressor) is null everywhere."""
    out = []
    for target in targets:
        row: dict = {"target": target, "n": 0, "n_configs": 0, "regressors": None, "r2": None,
                     "r2_adj": None, "r2_relative": None,
                     **{coef: None for _, coef in regressors}, "note": None}
        base = requests.filter(_usable() & pl.col(target).is_not_null() & pl.col(target).is_not_nan())
        present = [c for c, _ in regressors] if any_regressor else [presence]
        if all(base.get_column(c).null_count() == base.height for c in present):
            row["note"] = absent_note
            out.append(row)
            continue
        used = [c for c, _ in regressors if base.get_column(c).null_count() < base.height]
        data = (base.select("config_id", target, *used).drop_nulls()
                .with_columns(pl.col("throttled").cast(pl.Float64) if "throttled" in used else [])
                .filter(pl.len().over("config_id") >= 2))
        demeaned = data.select(
            (pl.col(c) - pl.col(c).mean().over("config_id")).alias(c) for c in (target, *used))
        y = demeaned.get_column(target).to_numpy().astype(float)
        mean_t = data.select(pl.col(target).mean().over("config_id")).to_series().to_numpy()
        y_rel = np.divide(y, mean_t, out=np.zeros_like(y), where=mean_t != 0)
        x_cols = [c for c in used
                  if np.ptp(demeaned.get_column(c).to_numpy()) > 1e-9 * (1 + data.get_column(c).abs().max())]
        n, g, k = data.height, data.get_column("config_id").n_unique(), len(x_cols)
        row.update(n=n, n_configs=g, regressors=", ".join(x_cols) or None)
        ss_tot = float(np.sum(y * y))
        if n == 0:
            row["note"] = "too few requests with telemetry (need 2 per configuration)"
        elif ss_tot <= 0:
            row["note"] = "no within-configuration variance"
        elif k == 0:
            row.update(r2=0.0, note="the hardware columns do not vary within a configuration")
        else:
            x = demeaned.select(x_cols).to_numpy().astype(float)
            beta, *_ = np.linalg.lstsq(x, y, rcond=None)
            resid = y - x @ beta
            r2 = max(0.0, 1.0 - float(np.sum(resid * resid)) / ss_tot)
            row["r2"] = r2
            ss_rel = float(np.sum(y_rel * y_rel))
            if ss_rel > 0:
                beta_rel, *_ = np.linalg.lstsq(x, y_rel, rcond=None)
                resid_rel = y_rel - x @ beta_rel
                row["r2_relative"] = max(0.0, 1.0 - float(np.sum(resid_rel * resid_rel)) / ss_rel)
            dof = n - g - k
            row["r2_adj"] = 1.0 - (1.0 - r2) * (n - g) / dof if dof > 0 else None
            if dof <= 0:
                row["note"] = "as many parameters as requests: R^2 is not informative"
            coefs = dict(zip(x_cols, beta.tolist()))
            for col, coef in regressors:
                row[coef] = coefs.get(col)
        out.append(row)
    schema = {"target": pl.String, "n": pl.Int64, "n_configs": pl.Int64, "regressors": pl.String,
              "r2": pl.Float64, "r2_adj": pl.Float64, "r2_relative": pl.Float64,
              **{coef: pl.Float64 for _, coef in regressors}, "note": pl.String}
    return pl.DataFrame(out, schema=schema, orient="row")


def find_outliers(
    requests: pl.DataFrame,
    *,
    z: float = 3.5,
    metrics: tuple[str, ...] = OUTLIER_METRICS,
    clock_drop: float = 0.05,
    idle_gap_ms: float = 1000.0,
) -> pl.DataFrame:
    """Requests whose metric is far from their configuration's, with the likely cause.

    Robust z = 0.6745 (x - median) / MAD over the configuration's valid requests (MAD = 0:
    (x - median) / (1.2533 mean absolute deviation)); configurations with fewer than 3 valid
    values are skipped. A request is an outlier when ``|z| > z``. Cause, first that applies:

    1. ``invalid measurement``: ``valid`` is False (detail: ``invalid_reason``);
    2. ``throttling`` (slow outliers): a slowdown bit (not idle / app / display clocks) was seen;
    3. ``host contention`` (slow): the process got less than 75% of its threads' CPU time
       (recorded ``cpu_time_ratio``; CPU devices);
    4. ``slow machine`` (slow): the fixed reference workload timed beside it (``reference_ms``)
       took more than 15% longer than the run's median: the host ran slower;
    5. ``clock drop`` (slow): SM clock mean more than ``clock_drop`` below the config median;
    6. ``first run after idle`` (slow): lowest ``order`` in its configuration, or more than
       ``idle_gap_ms`` since the previous request ended;
    7. ``unexplained``.

    >>> vals = [10.0, 10.1, 9.9, 10.0, 10.2, 9.8, 10.1, 30.0]
    >>> df = prepare_requests(pl.DataFrame({**{c: [1.0] * 8 for c in PHASE_MS_COLUMNS},
    ...     "decode_per_token_ms": vals, "throttle_reasons": [0] * 7 + [0x20], "order": list(range(8))}))
    >>> find_outliers(df).select("request", "metric", "cause", "detail").row(0)
    (7, 'decode_per_token_ms', 'throttling', 'SwThermalSlowdown')
    """
    df = requests.with_row_index("_row")
    if "start_ns" in df.columns and "end_ns" in df.columns:
        gap = (df.sort("order", "_row")
               .select("_row", ((pl.col("start_ns") - pl.col("end_ns").shift(1)) / 1e6)
                       .alias("gap_before_ms")))
        df = df.join(gap, on="_row", how="left", maintain_order="left")
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Float64).alias("gap_before_ms"))
    df = df.with_columns(
        pl.col("reference_ms").filter(_usable()).median().alias("_ref_med") if "reference_ms" in df.columns
        else pl.lit(None, dtype=pl.Float64).alias("_ref_med"),
        pl.col("sm_clock_mean_mhz").filter(_usable()).median().over("config_id").alias("_clock_med"),
        (pl.col("order") == pl.col("order").min().over("config_id")).alias("_first"),
    )
    frames = []
    for metric in metrics:
        m = pl.col(metric)
        ok = _usable() & m.is_not_null() & m.is_not_nan()
        med = m.filter(ok).median().over("config_id")
        mad = (m - med).abs().filter(ok).median().over("config_id")
        mean_ad = (m - med).abs().filter(ok).mean().over("config_id")
        count = ok.sum().over("config_id")
        scored = df.with_columns(
            med.alias("median_ms"), mad.alias("_mad"), mean_ad.alias("_meanad"), count.alias("_n"),
        ).filter(m.is_not_null() & m.is_not_nan() & (pl.col("_n") >= 3)).with_columns(
            pl.when(pl.col("_mad") > 0).then(0.6745 * (m - pl.col("median_ms")) / pl.col("_mad"))
            .when(pl.col("_meanad") > 0).then((m - pl.col("median_ms")) / (1.253314 * pl.col("_meanad")))
            .when(m == pl.col("median_ms")).then(0.0)
            .otherwise(pl.lit(float("inf")) * (m - pl.col("median_ms")).sign())
            .alias("robust_z"))
        hits = scored.filter(pl.col("robust_z").abs() > z).with_columns(
            pl.lit(metric).alias("metric"), m.alias("value_ms"))
        frames.append(hits)
    hits = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    schema = {"config_id": pl.String, "request": pl.Int64, "repeat": pl.Int64, "order": pl.Int64,
              "metric": pl.String, "value_ms": pl.Float64, "median_ms": pl.Float64,
              "robust_z": pl.Float64, "cause": pl.String, "detail": pl.String}
    if hits.height == 0:
        return pl.DataFrame(schema=schema)
    rows = []
    for r in hits.iter_rows(named=True):  # only the outliers: a handful of rows
        cause, detail = _cause(r, clock_drop, idle_gap_ms)
        rows.append({k: r.get(k) for k in ("config_id", "request", "repeat", "order", "metric",
                                           "value_ms", "median_ms", "robust_z")}
                    | {"cause": cause, "detail": detail})
    out = pl.DataFrame(rows, schema=schema, orient="row")
    return out.sort(pl.col("robust_z").abs(), descending=True)


def _cause(r: dict, clock_drop: float, idle_gap_ms: float) -> tuple[str, str | None]:
    if r.get("valid") is False:
        return "invalid measurement", r.get("invalid_reason")
    if r["robust_z"] < 0:
        return "unexplained", "faster than its configuration"
    if r.get("throttled"):
        names = [n for n in throttle_reason_names(r["throttle_reasons"])
                 if n not in ("GpuIdle", "ApplicationsClocksSetting", "DisplayClockSetting")]
        return "throttling", ", ".join(names)
    share = r.get("cpu_share")
    if share is not None and share < CONTENDED_CPU_SHARE:
        return "host contention", (f"the process got {share:.0%} of its {int(r.get('torch_threads') or 1)} "
                                   "thread(s)' CPU time: other processes took the cores")
    ref, ref_med = r.get("reference_ms"), r.get("_ref_med")
    if ref is not None and ref_med and ref > SLOW_MACHINE_RATIO * ref_med:
        return "slow machine", (f"the reference workload beside it took {ref:.2f} ms vs {ref_med:.2f} ms median "
                                f"({ref / ref_med - 1:+.0%}): the host itself ran slower")
    clock, med = r.get("sm_clock_mean_mhz"), r.get("_clock_med")
    if clock is not None and med and clock < (1.0 - clock_drop) * med:
        return "clock drop", f"SM clock {clock:.0f} MHz vs {med:.0f} MHz median ({clock / med - 1:+.0%})"
    if r.get("_first"):
        return "first run after idle", f"first request of its configuration (order {r['order']})"
    gap = r.get("gap_before_ms")
    if gap is not None and gap > idle_gap_ms:
        return "first run after idle", f"{gap / 1000:.1f} s idle before it"
    if clock is None and r.get("throttle_reasons") is None:
        return "unexplained", "no telemetry to check throttling or clocks"
    return "unexplained", None


def decode_vs_clock(requests: pl.DataFrame) -> pl.DataFrame:
    """Points of the decode-per-token against SM clock plot: one per valid request with both.

    ``ratio_to_config_median`` is the decode time over its configuration's median, so that
    configurations of different sizes share one axis.

    >>> df = prepare_requests(pl.DataFrame({**{c: [1.0, 1.0] for c in PHASE_MS_COLUMNS},
    ...     "decode_per_token_ms": [10.0, 12.0], "sm_clock_mean_mhz": [1410.0, None]}))
    >>> decode_vs_clock(df).select("decode_per_token_ms", "ratio_to_config_median").rows()
    [(10.0, 0.9090909090909091)]
    """
    m = pl.col("decode_per_token_ms")
    usable = requests.filter(_usable() & m.is_not_null() & m.is_not_nan())
    return (usable.with_columns((m / m.median().over("config_id")).alias("ratio_to_config_median"))
            .filter(pl.col("sm_clock_mean_mhz").is_not_null())
            .select("config_id", "request", "sm_clock_mean_mhz", "temp_max_c", "throttled",
                    "decode_per_token_ms", "ratio_to_config_median"))


@dataclass(frozen=True)
class Explanation:
    """What ``explain`` found: the tables and notes a renderer shows."""

    configs: pl.DataFrame
    phase_stats: pl.DataFrame
    hardware: pl.DataFrame
    outliers: pl.DataFrame
    host: pl.DataFrame
    decode_points: pl.DataFrame
    has_telemetry: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain lists and dicts (JSON-ready)."""
        return {
            "has_telemetry": self.has_telemetry,
            "notes": list(self.notes),
            "configs": self.configs.to_dicts(),
            "phase_stats": self.phase_stats.to_dicts(),
            "hardware": self.hardware.to_dicts(),
            "host": self.host.to_dicts(),
            "outliers": self.outliers.to_dicts(),
        }


def explain(requests: pl.DataFrame, *, z: float = 3.5, clock_drop: float = 0.05,
            idle_gap_ms: float = 1000.0) -> Explanation:
    """All of the above over a requests table.

    >>> df = pl.DataFrame({**{c: [1.0, 1.1, 0.9] for c in PHASE_MS_COLUMNS}, "config_id": ["a"] * 3})
    >>> e = explain(df)
    >>> e.has_telemetry, e.hardware["note"].to_list(), e.configs["n_valid"].to_list()
    (False, ['no telemetry', 'no telemetry'], [3])
    """
    df = prepare_requests(requests)
    knobs = [c for c in CONFIG_COLUMNS if c in df.columns]
    configs = (df.group_by("config_id", maintain_order=True)
               .agg(*[pl.col(k).first() for k in knobs],
                    pl.len().cast(pl.Int64).alias("n_requests"),
                    _usable().sum().cast(pl.Int64).alias("n_valid"),
                    pl.col("sm_clock_mean_mhz").is_not_null().sum().cast(pl.Int64)
                    .alias("n_with_telemetry")))
    has_telemetry = df.get_column("sm_clock_mean_mhz").null_count() < df.height
    notes = []
    if not has_telemetry:
        notes.append("no telemetry: NVML was off or unavailable for this run, so the hardware "
                     "share cannot be measured; profile on a GPU with --nvml required")
    n_bad = df.height - int(df.select(_usable().sum()).item())
    if n_bad:
        notes.append(f"{n_bad} invalid or incomplete request(s) left out of the statistics")
    return Explanation(
        configs=configs,
        phase_stats=phase_stats(df),
        hardware=hardware_share(df),
        outliers=find_outliers(df, z=z, clock_drop=clock_drop, idle_gap_ms=idle_gap_ms),
        host=host_share(df),
        decode_points=decode_vs_clock(df),
        has_telemetry=has_telemetry,
        notes=notes,
    )
