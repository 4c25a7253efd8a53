"""`diff(A, B)`: what changed between two traces or two runs, phase by phase and kernel by kernel.

Transform only: the sides are opened by :mod:`molmo_latency.diff.sources`, the numbers come
from :mod:`molmo_latency.diff.phases` and :mod:`molmo_latency.diff.kernels`; the CLI and the
waterfall show them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from molmo_latency.diff.kernels import (LEVELS, category_diff, kernel_diff, ops_table, phase_instances,
                                        phase_kernel_diff)
from molmo_latency.diff.phases import SAMPLE_SCHEMA, phase_diff, run_phase_samples, trace_phase_samples
from molmo_latency.hold.rundir import RunDir
from molmo_latency.diff.sources import DiffError, Side, open_side, plan, read_trace
from molmo_latency.diff.stats import describe_rule



@dataclass
class Comparison:
    """One pair compared: A's configuration (None for a trace) against B's."""

    a_config: str | None
    b_config: str | None
    a_trace: str | None = None
    b_trace: str | None = None
    level: str | None = None          # "gpu" | "cpu_op" | None (no trace on a side)
    phases: pl.DataFrame | None = None     # phase_diff(); None unless both sides carry phases
    kernels: pl.DataFrame | None = None    # kernel_diff(); None unless both sides have a trace
    categories: pl.DataFrame | None = None
    phase_ops: pl.DataFrame | None = None  # kernel time and count per phase, with per-instance counts
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.a_config is None and self.b_config is None:
            return "A vs B"
        if self.a_config == self.b_config:
            return str(self.a_config)
        return f"{self.a_config or 'A'} vs {self.b_config or 'B'}"


@dataclass
class DiffResult:
    """Everything `diff` found; `phases`, `kernels` and `categories` stack every comparison."""

    a: str
    b: str
    a_kind: str
    b_kind: str
    rule: str
    options: dict[str, Any]
    comparisons: list[Comparison]
    # one line per recorded condition that differs between A and B (run directories: device,
    # dtype, threads, model, library versions); a machine change is not a code change
    conditions: list[str] = field(default_factory=list)
    # the data-quality verdict of each run directory (``report``'s: clean, noisy, contended,
    # incomplete); a busy machine on either side can make a change that is not the code's
    quality: dict[str, str] = field(default_factory=dict)

    def _stack(self, attr: str) -> pl.DataFrame | None:
        parts = [getattr(c, attr).with_columns(pl.lit(c.a_config, dtype=pl.String).alias("a_config"),
                                               pl.lit(c.b_config, dtype=pl.String).alias("b_config"))
                 for c in self.comparisons if getattr(c, attr) is not None]
        return pl.concat(parts, how="vertical") if parts else None

    @property
    def phases(self) -> pl.DataFrame | None:
        return self._stack("phases")

    @property
    def kernels(self) -> pl.DataFrame | None:
        return self._stack("kernels")

    @property
    def categories(self) -> pl.DataFrame | None:
        return self._stack("categories")

    def summary(self) -> pl.DataFrame | None:
        """The overall answer first: per compared pair, the whole request (``total``) in A and B,
        the change with its CI and the verdict; None when no comparison has phases."""
        phases = self.phases
        if phases is None:
            return None
        return (phases.filter(pl.col("phase") == "total")
                .select("a_config", "b_config", "a_n", "b_n", "a_median_ms", "b_median_ms", "delta_ms",
                        "delta_pct", "ci_low_ms", "ci_high_ms", "verdict"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``phases`` and ``kernels`` lists (rows carry ``a_config``/``b_config``),
        ``categories``, ``only_in_a``/``only_in_b`` and one summary per comparison.

        Example:
            >>> import json, tempfile
            >>> from molmo_latency.trace._demo import write_demo_trace
            >>> t = write_demo_trace(tempfile.mkdtemp())
            >>> d = json.loads(json.dumps(diff(t, t).to_dict()))
            >>> d["levels"], d["kernels"][0]["delta_us"], d["phases"][-1]["verdict"]
            (['gpu'], 0.0, 'too few samples')
        """
        def records(df: pl.DataFrame | None) -> list[dict[str, Any]]:
            if df is None:
                return []
            return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                    for row in df.iter_rows(named=True)]

        comparisons = []
        for c in self.comparisons:
            only_a = only_b = []
            if c.kernels is not None:
                only_a = c.kernels.filter(pl.col("presence") == "only_a")["name"].to_list()
                only_b = c.kernels.filter(pl.col("presence") == "only_b")["name"].to_list()
            comparisons.append({"a_config": c.a_config, "b_config": c.b_config, "a_trace": c.a_trace,
                                "b_trace": c.b_trace, "level": c.level, "has_phases": c.phases is not None,
                                "has_kernels": c.kernels is not None, "only_in_a": only_a,
                                "only_in_b": only_b, "phase_ops": records(c.phase_ops), "notes": c.notes})
        return {
            "a": self.a, "b": self.b, "a_kind": self.a_kind, "b_kind": self.b_kind,
            "levels": sorted({c.level for c in self.comparisons if c.level}),
            "rule": self.rule, "options": self.options, "conditions_differ": list(self.conditions),
            "data_quality": dict(self.quality),
            "summary": records(self.summary()),
            "phases": records(self.phases), "kernels": records(self.kernels),
            "categories": records(self.categories),
            "only_in_a": [n for c in comparisons for n in c["only_in_a"]],
            "only_in_b": [n for c in comparisons for n in c["only_in_b"]],
            "comparisons": comparisons,
        }


def _with_instances(table: pl.DataFrame, a: dict[str, int], b: dict[str, int]) -> pl.DataFrame:
    a = {p: n for p, n in a.items() if n}  # "other" is no range: no per-instance figures
    b = {p: n for p, n in b.items() if n}
    return table.with_columns(
        pl.col("phase").replace_strict(a, default=None, return_dtype=pl.Int64).alias("a_instances"),
        pl.col("phase").replace_strict(b, default=None, return_dtype=pl.Int64).alias("b_instances"),
    ).with_columns(
        (pl.col("a_count") / pl.col("a_instances")).alias("a_count_per_instance"),
        (pl.col("b_count") / pl.col("b_instances")).alias("b_count_per_instance"),
        (pl.col("a_us") / pl.col("a_instances")).alias("a_us_per_instance"),
        (pl.col("b_us") / pl.col("b_instances")).alias("b_us_per_instance"),
    ).with_columns(pl.col(c).fill_nan(None) for c in ("a_count_per_instance", "b_count_per_instance",
                                                      "a_us_per_instance", "b_us_per_instance"))


# ---------------------------------------------------------------------------- the entry point

def diff(a: str | Path, b: str | Path, *, config: str | None = None, config_b: str | None = None,
         level: str = "auto", normalize: bool = False, alpha: float = 0.05, ci_level: float = 0.95,
         resamples: int = 2000, min_effect_pct: float = 1.0, seed: int = 0, trace_cache: bool | None = False,
         cache_dir: str | Path | None = None) -> DiffResult:
    """Compare B against A; each is a Kineto trace or a run directory of the sweep runner.

    Phase level (run directories, or traces written by ``profile_phases``): per phase and per
    decode step, medians and p95 of both sides, the difference of medians ``B - A`` with a
    seeded bootstrap CI, and a verdict (``faster``, ``slower``, ``no significant change``, ``too few samples``; rule
    in :mod:`molmo_latency.diff.stats`). Kernel level (a trace on both sides; a run
    directory's trace of the configuration): kernels aligned by name (``normalize``: template
    arguments and launch suffixes dropped), ranked by their contribution to the change, with
    per-category sums. ``level``: ``gpu`` (GPU activities), ``cpu_op`` (CPU ops, self time) or
    ``auto`` (``gpu`` when both traces have GPU activities, else ``cpu_op``).

    Two run directories: every configuration id found in both is compared, unless
    ``config``/``config_b`` name one pair (they may be two configurations of one run).

    ``trace_cache`` / ``cache_dir``: read traces through the Parquet cache of their tables
    (:mod:`molmo_latency.trace.cache`; the CLI turns it on, ``--no-cache`` off).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> t = write_demo_trace(tempfile.mkdtemp())
        >>> r = diff(t, t)
        >>> r.comparisons[0].level, r.kernels["delta_us"].abs().max()
        ('gpu', 0.0)
        >>> r.phases.filter(pl.col("phase") == "total").select("a_median_ms", "verdict").row(0)
        (0.2, 'too few samples')
    """
    if level not in ("auto", *LEVELS):
        raise DiffError(f"--level must be auto, {' or '.join(LEVELS)}, got {level!r}")
    if not 0 < alpha < 1 or not 0 < ci_level < 1 or resamples < 100 or min_effect_pct < 0:
        raise DiffError("need 0 < alpha < 1, 0 < ci_level < 1, resamples >= 100 and min_effect_pct >= 0; "
                        f"got alpha={alpha}, ci_level={ci_level}, resamples={resamples}, "
                        f"min_effect_pct={min_effect_pct}")
    side_a, side_b = open_side(a), open_side(b)
    pairs = plan(side_a, side_b, config, config_b)
    stats = {"alpha": alpha, "ci_level": ci_level, "resamples": resamples, "min_effect_pct": min_effect_pct,
             "seed": seed}
    cache: dict[Path, tuple[Any, list[str]]] = {}
    reading = {"cache": trace_cache, "cache_dir": cache_dir}
    comparisons = [_compare(side_a, side_b, ca, cb, level, normalize, stats, cache, reading) for ca, cb in pairs]
    return DiffResult(a=side_a.label, b=side_b.label, a_kind=side_a.kind, b_kind=side_b.kind,
                      rule=describe_rule(alpha, ci_level, resamples, min_effect_pct),
                      options={"level": level, "normalize": normalize, **stats}, comparisons=comparisons,
                      conditions=_condition_differences(side_a, side_b), quality=_quality(side_a, side_b))


def _quality(a: Side, b: Side) -> dict[str, str]:
    """``{"A": verdict, "B": verdict}`` of run directories (as ``report`` judges them); nothing
    for a trace, which records no repeats to judge."""
    from molmo_latency.report import run_quality

    return {label: run_quality(RunDir(side.path), side.table("requests")).verdict
            for label, side in (("A", a), ("B", b)) if side.kind == "run"}


def _condition_differences(a: Side, b: Side) -> list[str]:
    """What differs between the conditions two run directories recorded (run.json); nothing for
    traces, which record none of them."""
    if a.kind != "run" or b.kind != "run":
        return []
    from molmo_latency.conditions import condition_differences

    return condition_differences({"A": RunDir(a.path).meta(), "B": RunDir(b.path).meta()})


def _samples(side: Side, config_id: str | None, trace) -> pl.DataFrame:
    if side.kind == "run":
        return run_phase_samples(side.table("requests"), side.table("phases"), config_id)
    if trace is None:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    return trace_phase_samples(trace.annotations)


def _trace_format(trace: Any) -> str:
    """What kind of trace was read: a Kineto trace or an Nsight Systems export."""
    return "an nsys export" if getattr(trace, "layout", None) == "nsys" else "a Kineto trace"


def _compare(a: Side, b: Side, ca: str | None, cb: str | None, level: str, normalize: bool,
             stats: dict[str, Any], cache: dict, reading: dict | None = None) -> Comparison:
    comp = Comparison(a_config=ca, b_config=cb)
    traces = []
    for side, cid, label in ((a, ca, "A"), (b, cb, "B")):
        path = side.trace_path(cid)
        trace = None
        if path is not None:
            if path not in cache:
                cache[path] = read_trace(path, **(reading or {}))
            trace, notes = cache[path]
            comp.notes.extend(f"{label}: {n}" for n in notes if "no GPU activities" not in n)
        elif side.kind == "run":
            comp.notes.append(f"{label}: no trace of {cid} in {side.path}/traces (record one with "
                              "--kineto): kernel level skipped")
        traces.append((path, trace))
    (pa, ta), (pb, tb) = traces
    comp.a_trace, comp.b_trace = (str(pa) if pa else None), (str(pb) if pb else None)

    sa, sb = _samples(a, ca, ta), _samples(b, cb, tb)
    if sa.height and sb.height:
        comp.phases = phase_diff(sa, sb, **stats)
        if a.kind == "trace" or b.kind == "trace":
            comp.notes.append("phase times of a trace are host-side record_function durations of the "
                              "traced request(s)")
    else:
        missing = [lbl for lbl, s in (("A", sa), ("B", sb)) if not s.height]
        comp.notes.append(f"{' and '.join(missing)} carr{'y' if len(missing) > 1 else 'ies'} no phases "
                          "(not a run directory, nor a trace from profile_phases): phase level skipped")

    if ta is not None and tb is not None:
        fa, fb = _trace_format(ta), _trace_format(tb)
        if fa != fb:
            comp.notes.append(f"A is {fa} and B {fb}: two tools name kernels and ranges differently and "
                              "time them from different clocks, so a difference may be the tool's; compare "
                              "traces of one kind")
        has_gpu = ta.gpu.height > 0 and tb.gpu.height > 0
        if level == "gpu" and not has_gpu:
            raise DiffError(f"--level gpu: {'A' if ta.gpu.height == 0 else 'B'} has no GPU activities "
                            "(a CPU-only trace); use --level cpu_op or auto")
        comp.level = level if level != "auto" else ("gpu" if has_gpu else "cpu_op")
        if level == "auto" and not has_gpu:
            lacking = " and ".join(lbl for lbl, t in (("A", ta), ("B", tb)) if t.gpu.height == 0)
            comp.notes.append(f"{lacking} without GPU activities (CPU-only trace): kernel level compares "
                              "CPU ops (cpu_op events, ranked by self time)")
        oa, ob = ops_table(ta, comp.level), ops_table(tb, comp.level)
        comp.kernels = kernel_diff(oa, ob, normalize=normalize)
        comp.categories = category_diff(comp.kernels)
        comp.phase_ops = _with_instances(phase_kernel_diff(oa, ob), phase_instances(ta.annotations),
                                         phase_instances(tb.annotations))
    return comp
