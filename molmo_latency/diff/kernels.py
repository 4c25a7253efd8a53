"""Kernel-level tables of a trace and the kernel diff of two traces (transform only).

An *ops* frame has one row per executed kernel (or CPU op): ``name``, ``category``, ``phase``
(``vision``, ``projector``, ``prefill``, ``decode`` or ``other``), ``dur_ns`` (its duration) and
``self_ns`` (its own time: the duration for a GPU activity; for a CPU op, the duration minus
that of the CPU ops nested in it, so self times add up to the time spent in ops).

Two levels:

- ``gpu``: the trace's GPU activities (kernels, memcpy, memset), each charged to a phase by
  the trace reader's attribution (innermost annotation on the launching thread);
- ``cpu_op``: the ``cpu_op`` events (``aten::mm``, ...), each charged to the innermost phase
  range (``vision``, ``prefill``, ``decode[k]``, ...) that encloses it on its thread. This is
  the level of CPU-only traces, which have no GPU kernels.

Example:
    >>> import polars as pl
    >>> a = pl.DataFrame({"name": ["k1", "k1", "k2"], "category": ["gemm", "gemm", "norm"],
    ...                   "phase": ["prefill", "decode", "decode"], "dur_ns": [3000, 1000, 500],
    ...                   "self_ns": [3000, 1000, 500]})
    >>> b = a.filter(pl.col("name") == "k1")
    >>> kernel_diff(a, b).select("name", "a_count", "b_count", "delta_us", "presence").rows()
    [('k2', 1, 0, -0.5, 'only_a'), ('k1', 2, 2, 0.0, 'both')]
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from molmo_latency.trace.categories import cpu_op_category

LEVELS = ("gpu", "cpu_op")
PHASE_BUCKETS = ("vision", "projector", "prefill", "decode", "other")
OPS_SCHEMA = {"name": pl.String, "category": pl.String, "phase": pl.String, "dur_ns": pl.Int64,
              "self_ns": pl.Int64}

# ------------------------------------------------------------------------------ names

_HEX = re.compile(r"0x[0-9a-fA-F]+")
_TRAILING_NUMBER = re.compile(r"(?:_\d+)+$")        # triton_poi_fused_add_0 -> triton_poi_fused_add
_HASH_NUMBER = re.compile(r"#\d+")                  # ProfilerStep#1009 -> ProfilerStep#
_INDEX = re.compile(r"\[\d+\]")                     # decode[3] -> decode[]
_SPACES = re.compile(r"\s+")


def _strip_balanced(name: str, open_: str, close: str, keep_delims: bool) -> str:
    """Remove the contents of every top-level open_...close pair (nested pairs included)."""
    out, depth = [], 0
    for ch in name:
        if ch == open_:
            if depth == 0:
                out.append(ch if keep_delims else "")
            depth += 1
        elif ch == close and depth > 0:
            depth -= 1
            if depth == 0 and keep_delims:
                out.append(ch)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def normalize_kernel_name(name: str) -> str:
    """A kernel name without what changes from build to build or launch to launch.

    Template arguments become ``<>`` (``gemm<float, 128>`` -> ``gemm<>``), a C++ parameter list
    glued to the name is dropped (``k<4>(int, float*)`` -> ``k<>``), a leading ``void`` goes,
    hex addresses become ``0x``, numeric suffixes (``triton_poi_fused_add_0``, ``_1_2``),
    ``#N`` counters and ``[N]`` indices are dropped or emptied. Names such as
    ``Memcpy HtoD (Pinned -> Device)`` keep their spaced parenthesis.

    Example:
        >>> normalize_kernel_name("void at::native::vectorized_elementwise_kernel<4, "
        ...     "at::native::CUDAFunctor_add<float>, at::detail::Array<char*, 3> >(int, "
        ...     "at::native::CUDAFunctor_add<float>, at::detail::Array<char*, 3>)")
        'at::native::vectorized_elementwise_kernel<>'
        >>> normalize_kernel_name("triton_red_fused_add_mean_rsqrt_12")
        'triton_red_fused_add_mean_rsqrt'
        >>> normalize_kernel_name("Memcpy HtoD (Pinned -> Device)")
        'Memcpy HtoD (Pinned -> Device)'
    """
    s = name
    for _ in range(8):  # until nothing changes: normalising a normalised name changes nothing
        before = s
        s = _normalize_once(s)
        if s == before:
            break
    return s or name


def _normalize_once(name: str) -> str:
    s = _SPACES.sub(" ", name).strip()
    if s.startswith("void "):
        s = s[5:]
    s = _strip_balanced(s, "<", ">", keep_delims=True)
    if s.endswith(")"):  # a parameter list glued to the name: strip it; "name (x)" is kept
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                if i > 0 and not s[i - 1].isspace():
                    s = s[:i]
                break
    s = _HEX.sub("0x", s)
    s = _HASH_NUMBER.sub("#", s)
    s = _INDEX.sub("[]", s)
    s = _TRAILING_NUMBER.sub("", s)
    return _SPACES.sub(" ", s).strip()


# ------------------------------------------------------------------------------ ops tables

def cpu_self_ns(cpu_ops: pl.DataFrame) -> pl.Series:
    """Own time of each CPU op: its duration minus that of the CPU ops nested directly in it.

    `cpu_ops` is the trace reader's table (``pid, tid, start_ns, end_ns, dur_ns``). An op is
    nested in the op of the same (pid, tid) that starts no later and ends after it starts (the
    innermost such); a child reaching past its parent's end is charged only up to that end.
    Own times add up to the time spent in ops, with nothing counted twice.

    Example:
        >>> import polars as pl
        >>> ops = pl.DataFrame({"pid": [1, 1, 1], "tid": [1, 1, 1], "start_ns": [100, 110, 185],
        ...                     "end_ns": [200, 180, 195], "dur_ns": [100, 70, 10]})
        >>> cpu_self_ns(ops).to_list()
        [20, 70, 10]
    """
    n = cpu_ops.height
    self_ns = cpu_ops["dur_ns"].to_numpy().astype(np.int64).copy() if n else np.zeros(0, np.int64)
    if n:
        order = cpu_ops.select(pl.col("pid").fill_null(-1), pl.col("tid").fill_null(-1), "start_ns", "end_ns",
                               idx=pl.int_range(n, dtype=pl.Int64))
        # Parents before children: by thread, then start, then the longer first.
        order = order.sort("pid", "tid", "start_ns", "end_ns", descending=[False, False, False, True])
        pid, tid = order["pid"].to_numpy(), order["tid"].to_numpy()
        start, end, idx = order["start_ns"].to_numpy(), order["end_ns"].to_numpy(), order["idx"].to_numpy()
        stack: list[tuple[int, int]] = []  # (end_ns, op index) of the open ops
        thread = None
        for i in range(n):
            if (pid[i], tid[i]) != thread:
                thread, stack = (pid[i], tid[i]), []
            s, e = int(start[i]), int(end[i])
            while stack and stack[-1][0] <= s:
                stack.pop()
            if stack:
                parent_end, parent = stack[-1]
                self_ns[parent] -= min(e, parent_end) - s
            stack.append((e, int(idx[i])))
    return pl.Series("self_ns", self_ns, dtype=pl.Int64)


def _phase_ranges(annotations: pl.DataFrame) -> pl.DataFrame:
    """The phase ranges of a trace (``vision``, ``projector``, ``prefill``, ``decode[k]``) with a
    ``phase`` column, by the trace reader's :func:`~molmo_latency.trace.phase_of`."""
    from molmo_latency.trace import phase_of

    names = annotations["name"].to_list()
    phases = [(phase_of(n) or (None,))[0] for n in names]
    return annotations.with_columns(phase=pl.Series(phases, dtype=pl.String)).filter(
        pl.col("phase").is_in(PHASE_BUCKETS[:-1]))


def phase_instances(annotations: pl.DataFrame) -> dict[str, int]:
    """How many ranges of each phase a trace holds (decode: one per ``decode[k]`` step).

    Example:
        >>> import polars as pl
        >>> phase_instances(pl.DataFrame({"name": ["request[0]", "prefill", "decode[0]", "decode[1]"]}))
        {'vision': 0, 'projector': 0, 'prefill': 1, 'decode': 2, 'other': 0}
    """
    counts = dict.fromkeys(PHASE_BUCKETS, 0)
    for phase, n in _phase_ranges(annotations).group_by("phase").len().iter_rows():
        counts[phase] = n
    return counts


# CPU op names the kernel rules do not cover (those are written for GPU kernel names): checked
# first, then the trace reader's kernel rules (molmo_latency.trace.categories).
def ops_table(trace, level: str) -> pl.DataFrame:
    """One row per kernel (``gpu``) or CPU op (``cpu_op``) of a :class:`~molmo_latency.trace.KinetoTrace`,
    with its category, phase, duration and own time.

    GPU activities are charged by the trace reader's :func:`~molmo_latency.trace.attribute` to
    the innermost phase range containing their launch call; CPU ops to the innermost phase
    range containing them on their thread (:func:`~molmo_latency.trace.innermost_range`).
    Anything outside every phase range is ``other``.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> ops = ops_table(read_kineto(write_demo_trace(tempfile.mkdtemp())), "gpu")
        >>> ops.filter(pl.col("name") == "flash_fwd_kernel").select("category", "phase").rows()
        [('attention', 'vision'), ('attention', 'prefill')]
    """
    from molmo_latency.trace import attribute, innermost_range, with_category

    ranges = _phase_ranges(trace.annotations)
    if level == "gpu":
        gpu = with_category(attribute(trace.gpu, trace.runtime, ranges))
        ops = gpu.select("name", "category", pl.col("annotation_id").alias("_range"), "dur_ns",
                         pl.col("dur_ns").alias("self_ns"))
    elif level == "cpu_op":
        cpu = trace.cpu_ops
        names = cpu.select("name").unique()
        names = names.with_columns(category=pl.Series([cpu_op_category(n) for n in names["name"].to_list()],
                                                      dtype=pl.String))
        ops = cpu.select("name", "dur_ns").with_columns(
            _range=innermost_range(cpu, ranges), self_ns=cpu_self_ns(cpu)
        ).join(names, on="name", how="left", maintain_order="left")
    else:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    phase = ranges["phase"].gather(ops["_range"]) if ranges.height else pl.Series([None] * ops.height,
                                                                                   dtype=pl.String)
    return ops.with_columns(phase=phase.fill_null("other")).select(list(OPS_SCHEMA)).cast(OPS_SCHEMA)


# ------------------------------------------------------------------------------ diff

def _stats(ops: pl.DataFrame, key: str) -> pl.DataFrame:
    return ops.group_by(key).agg(
        pl.len().cast(pl.Int64).alias("count"),
        pl.col("dur_ns").sum().alias("total_ns"),
        pl.col("self_ns").sum().alias("self_ns"),
        pl.col("category").drop_nulls().first().alias("category"),
        pl.col("name").n_unique().alias("variants"),
        *[pl.col("self_ns").filter(pl.col("phase") == p).sum().alias(f"{p}_ns") for p in PHASE_BUCKETS],
    )


def _ns_to_us(ns: pl.Expr) -> pl.Expr:
    """Integer ns -> float us, correctly rounded (exact for whole and 3-decimal microseconds).

    Not ``ns / 1000``: polars divides a column by a scalar through its reciprocal, which is one
    ulp off for values such as 323162 / 1000 (323.16200000000003).
    """
    return ns.map_batches(lambda s: pl.Series(s.to_numpy().astype(np.float64) / 1000.0), return_dtype=pl.Float64)


def kernel_diff(a: pl.DataFrame, b: pl.DataFrame, *, normalize: bool = False) -> pl.DataFrame:
    """Kernels of A and B aligned by name (or by :func:`normalize_kernel_name` when `normalize`).

    One row per name: ``a_count, b_count, a_total_us, b_total_us, delta_us`` (totals of the
    durations), ``a_mean_us, b_mean_us``, ``a_self_us, b_self_us, delta_self_us`` (own time; the
    same as the totals at GPU level), ``a_share_<phase>, b_share_<phase>`` (the share of its own
    time spent in each phase), ``share_of_change`` (its ``delta_self_us`` over the sum of all
    of them), ``presence`` (``both``, ``only_a``, ``only_b``) and ``variants`` (how many exact
    names the row merges). Rows are ranked by ``|delta_self_us|``, largest first, so the top
    rows explain the change of the total time spent in kernels.

    Example:
        >>> import polars as pl
        >>> a = pl.DataFrame({"name": ["gemm<1>", "gemm<2>"], "category": ["gemm"] * 2,
        ...                   "phase": ["decode"] * 2, "dur_ns": [1000, 2000], "self_ns": [1000, 2000]})
        >>> kernel_diff(a, a, normalize=True).select("name", "a_count", "delta_us", "variants").row(0)
        ('gemm<>', 2, 0.0, 2)
    """
    key = "kernel"
    sides = []
    names = pl.concat([a.select("name"), b.select("name")]).unique()
    if normalize:  # once per distinct name: a trace has many launches of few kernels
        names = names.with_columns(pl.Series(key, [normalize_kernel_name(n) for n in names["name"].to_list()],
                                             dtype=pl.String))
    else:
        names = names.with_columns(pl.col("name").alias(key))
    for side, ops in (("a", a), ("b", b)):
        ops = ops.join(names, on="name", how="left")
        stats = _stats(ops, key)
        sides.append(stats.rename({c: f"{side}_{c}" for c in stats.columns if c != key}))
    joined = sides[0].join(sides[1], on=key, how="full", coalesce=True)
    zero = [f"{s}_{c}" for s in "ab" for c in ("count", "total_ns", "self_ns", *[f"{p}_ns" for p in PHASE_BUCKETS])]
    joined = joined.with_columns([pl.col(c).fill_null(0) for c in zero])
    us = _ns_to_us
    out = joined.select(
        pl.col(key).alias("name"),
        pl.coalesce("a_category", "b_category").fill_null("other").alias("category"),
        "a_count", "b_count",
        us(pl.col("a_total_ns")).alias("a_total_us"), us(pl.col("b_total_ns")).alias("b_total_us"),
        us(pl.col("b_total_ns") - pl.col("a_total_ns")).alias("delta_us"),
        (us(pl.col("a_total_ns")) / pl.col("a_count")).alias("a_mean_us"),
        (us(pl.col("b_total_ns")) / pl.col("b_count")).alias("b_mean_us"),
        us(pl.col("a_self_ns")).alias("a_self_us"), us(pl.col("b_self_ns")).alias("b_self_us"),
        us(pl.col("b_self_ns") - pl.col("a_self_ns")).alias("delta_self_us"),
        *[(pl.col(f"{s}_{p}_ns") / pl.col(f"{s}_self_ns")).alias(f"{s}_share_{p}")
          for s in "ab" for p in PHASE_BUCKETS],
        pl.when((pl.col("a_count") > 0) & (pl.col("b_count") > 0)).then(pl.lit("both"))
        .when(pl.col("a_count") > 0).then(pl.lit("only_a")).otherwise(pl.lit("only_b")).alias("presence"),
        pl.max_horizontal(pl.col("a_variants").fill_null(0), pl.col("b_variants").fill_null(0))
        .cast(pl.Int64).alias("variants"),
    )
    net = out["delta_self_us"].sum()
    out = out.with_columns(
        (pl.col("delta_self_us") / net if net else pl.lit(None, dtype=pl.Float64)).alias("share_of_change"))
    out = out.with_columns([pl.col(c).fill_nan(None) for c in out.columns
                            if c.startswith(("a_share", "b_share")) or c.endswith("_mean_us")])
    return out.sort(pl.col("delta_self_us").abs(), "name", descending=[True, False])


def category_diff(kernels: pl.DataFrame) -> pl.DataFrame:
    """Per-category sums of a :func:`kernel_diff` table, side by side, largest change first.

    Own time (``*_self_us``) is summed, so the categories add up to the whole kernel time.

    Example:
        >>> import polars as pl
        >>> a = pl.DataFrame({"name": ["mm", "ln"], "category": ["gemm", "norm"], "phase": ["decode"] * 2,
        ...                   "dur_ns": [4000, 1000], "self_ns": [4000, 1000]})
        >>> b = a.with_columns(pl.col("dur_ns") * 2, pl.col("self_ns") * 2)
        >>> category_diff(kernel_diff(a, b)).select("category", "a_us", "b_us", "delta_us").rows()
        [('gemm', 4.0, 8.0, 4.0), ('norm', 1.0, 2.0, 1.0)]
    """
    out = kernels.group_by("category").agg(
        pl.col("a_count").sum(), pl.col("b_count").sum(),
        pl.col("a_self_us").sum().alias("a_us"), pl.col("b_self_us").sum().alias("b_us"),
        pl.col("delta_self_us").sum().alias("delta_us"),
    )
    total_a = out["a_us"].sum()
    total_b = out["b_us"].sum()
    out = out.with_columns(
        (pl.col("a_us") / total_a if total_a else pl.lit(None, dtype=pl.Float64)).alias("a_share"),
        (pl.col("b_us") / total_b if total_b else pl.lit(None, dtype=pl.Float64)).alias("b_share"))
    return out.sort(pl.col("delta_us").abs(), "category", descending=[True, False])


def phase_kernel_diff(a: pl.DataFrame, b: pl.DataFrame) -> pl.DataFrame:
    """Kernel time and count per phase bucket in A and B (own time; decode counts all steps).

    Example:
        >>> import polars as pl
        >>> a = pl.DataFrame({"name": ["mm"], "category": ["gemm"], "phase": ["decode"],
        ...                   "dur_ns": [4000], "self_ns": [4000]})
        >>> phase_kernel_diff(a, a.clear()).filter(pl.col("phase") == "decode").row(0)
        ('decode', 1, 0, 4.0, 0.0, -4.0)
    """
    rows = []
    for p in PHASE_BUCKETS:
        pa, pb = a.filter(pl.col("phase") == p), b.filter(pl.col("phase") == p)
        a_us, b_us = pa["self_ns"].sum() / 1000, pb["self_ns"].sum() / 1000
        rows.append({"phase": p, "a_count": pa.height, "b_count": pb.height, "a_us": float(a_us),
                     "b_us": float(b_us), "delta_us": float(b_us - a_us)})
    return pl.DataFrame(rows, schema={"phase": pl.String, "a_count": pl.Int64, "b_count": pl.Int64,
                                      "a_us": pl.Float64, "b_us": pl.Float64, "delta_us": pl.Float64})
