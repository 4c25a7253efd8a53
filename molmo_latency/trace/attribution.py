"""Charge GPU time to the annotation (``record_function`` range) whose code launched it.

Pure functions from polars frames to polars frames (the "transform" step); no Python loop runs
over events.

The rule. A GPU activity (kernel, memcpy, memset) is joined to its launching runtime call on
``correlation`` (the id CUPTI / roctracer give both; true of the A100 and the MI250 traces we
test on: ``hipMemcpyWithStream`` and its ``Memcpy HtoD`` share it too). It belongs to the
*innermost* CPU ``user_annotation`` range, on the launching thread (same ``pid`` and ``tid`` as
the launch call), that contains the whole launch call: ``annotation.start <= call.start`` and
``call.end <= annotation.end``. Innermost means the latest start; ties go to the earliest end,
then to the first annotation in table order. Activities whose launch is missing from the trace,
or that were launched outside every annotation, are unattributed (``annotation_id`` null).

Per annotation instance (and summed per annotation name) we report:

- ``gpu_activities``: how many activities it launched; ``gpu_kernel_ns``: their summed duration;
- ``gpu_busy_ns``: the union of their intervals (overlapping streams counted once);
- ``gpu_span_ns``: first activity start to last activity end; ``gpu_idle_ns`` = span - busy;
- ``launch_delay_*_ns``: activity start minus its launch call start (queueing + launch latency).

Phases. :func:`phase_of` reads the names the profiler gives its ranges (``vision``,
``projector``, ``prefill``, ``decode[N]``, inside ``request[N]``), and :func:`phase_gpu_table`
gives one row per phase instance with GPU columns that ``prof.report()`` joins on
(``request``, ``phase``, ``step``).

Modules. With ``profile_phases(model, detail="modules")`` the trace also holds module ranges
(``module/attention[B]``, ``module/moe_experts[B]``, ... nested inside the phases). Phase
attribution reads only the phase names, so they never take a kernel from its phase;
:func:`module_gpu_table` (kernels) and :func:`module_op_table` (CPU ops) charge each activity to
its phase as above *and* to the innermost module range containing it (``other``: inside the
phase, outside every module range).
"""

from __future__ import annotations

import re

import polars as pl

from molmo_latency.trace.categories import with_category
from molmo_latency.trace.reader import KinetoTrace

__all__ = [
    "PHASE_GPU_COLUMNS",
    "annotation_gpu_stats",
    "annotation_name_stats",
    "charged_name_stats",
    "attribute",
    "busy_ns",
    "device_gpu_stats",
    "grouped",
    "innermost_range",
    "kernel_breakdown",
    "link_launches",
    "module_gpu_table",
    "module_op_table",
    "phase_category_table",
    "phase_gpu_table",
    "phase_of",
    "request_of",
]

# "vision", "decode[3]", "decode#3", "molmo_latency/decode#3", "molmo_latency::prefill".
PHASE_PATTERN = r"^(?:molmo_latency[/:.]+)?(vision|projector|prefill|decode)(?:\[(\d+)\]|#(\d+))?$"
REQUEST_PATTERN = r"^(?:molmo_latency[/:.]+)?request(?:\[(\d+)\]|#(\d+))$"
# "module/attention[3]", "module/lm_head", "molmo_latency/module/moe_experts" (NVTX: payload apart)
MODULE_PATTERN = r"^(?:molmo_latency[/:.]+)?module/([a-z_]+)(?:\[(-?\d+)\]|#(-?\d+))?$"
_PHASE_RE = re.compile(PHASE_PATTERN)
_REQUEST_RE = re.compile(REQUEST_PATTERN)

#: Columns (and dtypes) of :func:`phase_gpu_table`.
PHASE_GPU_COLUMNS = {
    "phase": pl.String,
    "step": pl.Int64,
    "request": pl.Int64,
    "gpu_busy_ms": pl.Float64,
    "gpu_span_ms": pl.Float64,
    "gpu_kernel_ms": pl.Float64,
    "gpu_activities": pl.Int64,
    "launch_delay_mean_us": pl.Float64,
    "gpu_idle_ms": pl.Float64,
}


def phase_of(annotation_name: str) -> tuple[str, int | None] | None:
    """(phase, step) of a profiler range name; step is None when the name carries none.

    Example:
        >>> phase_of("decode[3]"), phase_of("molmo_latency/decode#7"), phase_of("prefill")
        (('decode', 3), ('decode', 7), ('prefill', None))
        >>> phase_of("ProfilerStep#2") is None
        True
    """
    match = _PHASE_RE.match(annotation_name)
    if match is None:
        return None
    step = match.group(2) or match.group(3)
    return match.group(1), (int(step) if step is not None else None)


def request_of(annotation_name: str) -> int | None:
    """The request index of a ``request[N]`` range name, else None.

    Example:
        >>> request_of("request[12]"), request_of("vision")
        (12, None)
    """
    match = _REQUEST_RE.match(annotation_name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


# --------------------------------------------------------------------------------------------
# Joins.


def link_launches(gpu: pl.DataFrame, runtime: pl.DataFrame) -> pl.DataFrame:
    """`gpu` plus its launch call: ``launch_name``, ``launch_pid``, ``launch_tid``,
    ``launch_start_ns``, ``launch_end_ns`` and ``launch_delay_ns`` (activity start minus launch
    start), joined on ``correlation``. Activities without a launch in the trace get nulls. When
    several runtime events share a correlation id (not seen in real traces) the earliest wins.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> linked = link_launches(trace.gpu, trace.runtime)
        >>> linked.select("name", "launch_name", "launch_delay_ns").row(0)
        ('vision_patch_embed_gemm', 'cudaLaunchKernel', 1000)
    """
    # The earliest call of each correlation id that some activity has: a mask over the runtime
    # table (sorted by start already, so the sort is free) and one gather of the six columns
    # joined, not a filtered, re-sorted and de-duplicated copy of the whole table.
    calls = runtime.select("correlation", "name", "pid", "tid", "start_ns", "end_ns").sort(
        "start_ns", maintain_order=True)
    correlation = pl.col("correlation")
    wanted = gpu["correlation"].drop_nulls().unique()
    launches = calls.filter(correlation.is_not_null() & correlation.is_first_distinct()
                            & correlation.is_in(wanted.implode())).select(
        "correlation",
        launch_name="name",
        launch_pid="pid",
        launch_tid="tid",
        launch_start_ns="start_ns",
        launch_end_ns="end_ns",
    )
    return gpu.join(launches, on="correlation", how="left", maintain_order="left").with_columns(
        launch_delay_ns=pl.col("start_ns") - pl.col("launch_start_ns")
    )


def innermost_range(queries: pl.DataFrame, ranges: pl.DataFrame) -> pl.Series:
    """For each query interval, the row index in `ranges` of the innermost range containing it.

    Both frames have ``pid``, ``tid``, ``start_ns``, ``end_ns``. A range contains a query when
    they share pid and tid and ``range.start <= query.start`` and ``query.end <= range.end``;
    innermost is the latest start, then the earliest end, then the lowest row index. Returns a
    UInt32 series (null: no range contains it), aligned with `queries`.

    Vectorised as one inequality join (polars ``join_where``, an IEJoin): each thread's times are
    moved onto their own stretch of one axis, so "same thread" needs no equality predicate.

    Example:
        >>> import polars as pl
        >>> ranges = pl.DataFrame({"pid": [1, 1, 1], "tid": [1, 1, 2],
        ...                        "start_ns": [0, 10, 0], "end_ns": [100, 20, 100]})
        >>> queries = pl.DataFrame({"pid": [1, 1, 1], "tid": [1, 1, 3],
        ...                         "start_ns": [12, 30, 12], "end_ns": [13, 31, 13]})
        >>> innermost_range(queries, ranges).to_list()
        [1, 0, None]
    """
    n = queries.height
    if n == 0 or ranges.height == 0:
        return pl.Series("range", [None] * n, dtype=pl.UInt32)
    cols = ["pid", "tid", "start_ns", "end_ns"]
    q = queries.select(cols).with_row_index("_q")
    r = ranges.select(cols).with_row_index("_r")
    both = pl.concat([q.select(cols), r.select(cols)])
    t0 = both["start_ns"].min()
    stretch = max(both["end_ns"].max(), both["start_ns"].max()) - t0 + 1
    threads = both.select(pl.col("pid").fill_null(-1), pl.col("tid").fill_null(-1)).unique().sort(["pid", "tid"])
    threads = threads.with_row_index("_thread")
    if threads.height * stretch >= 2**62:  # pragma: no cover - traces spanning centuries
        raise ValueError("trace times span too long to place threads on one axis")

    def placed(frame: pl.DataFrame, prefix: str) -> pl.DataFrame:
        frame = frame.with_columns(pl.col("pid").fill_null(-1), pl.col("tid").fill_null(-1))
        frame = frame.join(threads, on=["pid", "tid"], how="left")
        offset = pl.col("_thread").cast(pl.Int64) * stretch - t0
        return frame.select(
            f"_{prefix}",
            (pl.col("start_ns") + offset).alias(f"{prefix}_start"),
            (pl.col("end_ns") + offset).alias(f"{prefix}_end"),
        )

    pq, pr = placed(q, "q"), placed(r, "r")
    pairs = pq.join_where(pr, pl.col("r_start") <= pl.col("q_start"), pl.col("r_end") >= pl.col("q_end")).select(
        "_q", "_r", "r_start", "r_end")  # what picks the innermost: a pair is held 24 bytes, not 40
    best = (
        pairs.sort(["_q", "r_start", "r_end", "_r"], descending=[False, True, False, False])
        .unique("_q", keep="first")
        .select("_q", range="_r")
    )
    out = q.select("_q").join(best, on="_q", how="left", maintain_order="left")
    return out["range"]


def attribute(gpu: pl.DataFrame, runtime: pl.DataFrame, annotations: pl.DataFrame) -> pl.DataFrame:
    """`gpu` with its launch call (:func:`link_launches`) and the innermost annotation that
    contains that call on the launching thread: ``annotation_id`` (row index into
    `annotations`, null when none) and ``annotation`` (its name).

    Pass a subset of the annotations to attribute among those only (for example the phase
    ranges; :func:`phase_gpu_table` does).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> out = attribute(trace.gpu, trace.runtime, trace.annotations)
        >>> out.select("name", "annotation").rows()[:3]
        [('vision_patch_embed_gemm', 'vision'), ('flash_fwd_kernel', 'vision'), ('projector_gemm', 'projector')]
        >>> out["annotation"][-1] is None  # launched after request[0] ended
        True
    """
    linked = link_launches(gpu, runtime)
    calls = linked.select(
        pid="launch_pid", tid="launch_tid", start_ns="launch_start_ns", end_ns="launch_end_ns"
    )
    has_call = calls["start_ns"].is_not_null() & calls["end_ns"].is_not_null()
    ids = innermost_range(calls.filter(has_call), annotations)
    annotation_id = pl.Series("annotation_id", [None] * linked.height, dtype=pl.UInt32)
    if ids.len():
        annotation_id = annotation_id.scatter(has_call.arg_true(), ids)
    if annotations.height:
        names = annotations["name"].gather(annotation_id)
    else:
        names = pl.Series([None] * linked.height, dtype=pl.String)
    return linked.with_columns(annotation_id=annotation_id, annotation=names)


# --------------------------------------------------------------------------------------------
# Aggregates.


def grouped(query: pl.LazyFrame) -> pl.DataFrame:
    """A group-by over a whole table (few groups, millions of rows) run by polars' streaming
    engine: it reads the rows in morsels, so it never copies the grouped columns (a string
    group-by in memory first lays out every row's key: ~100-400 MB on a 2 GB trace's tables).
    Same result as the in-memory engine (order-observing aggregations such as ``first`` and
    ``maintain_order`` keep the rows' order; sums and means of integer nanoseconds are exact in
    any order while a group's sum stays below 2**53 ns, 104 days); without ``maintain_order``
    its rows' order is arbitrary: callers sort, as before.

    Example:
        >>> f = pl.DataFrame({"name": ["a", "b", "a"], "dur_ns": [1, 2, 3]})
        >>> grouped(f.lazy().group_by("name").agg(pl.col("dur_ns").sum())).sort("name").rows()
        [('a', 4), ('b', 2)]
    """
    return query.collect(engine="streaming")


def busy_ns(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Union length (ns) of the ``[start_ns, end_ns)`` intervals of each group of `by`.

    Sorted by start within the group, each interval adds only what lies beyond the furthest end
    seen so far, so overlapping activities (several streams) count once.

    Example:
        >>> import polars as pl
        >>> f = pl.DataFrame({"g": [1, 1, 1, 2], "start_ns": [0, 5, 20, 0], "end_ns": [10, 12, 25, 3]})
        >>> busy_ns(f, ["g"]).sort("g").rows()
        [(1, 17), (2, 3)]
    """
    if frame.height == 0:
        return frame.select(*by).with_columns(busy_ns=pl.lit(0, dtype=pl.Int64)).clear()
    rows = frame.select(*by, "start_ns", "end_ns").sort([*by, "start_ns"])
    low, high = rows.select(pl.min_horizontal(pl.col("start_ns").min(), pl.col("end_ns").min()).alias("low"),
                            pl.max_horizontal(pl.col("start_ns").max(), pl.col("end_ns").max()).alias("high")).row(0)
    stretch = None if low is None else high - low + 1
    if stretch is not None and rows.height * stretch < 2**62:
        # Each group's times moved onto their own stretch of one axis, in group order: one running
        # maximum over the whole table then never carries an end from one group into the next (a
        # window over each group, the same figure, costs ~10x more).
        group = (pl.struct(by) if len(by) > 1 else pl.col(by[0])).rle_id().cast(pl.Int64)
        offset = group * stretch - low
        start, end = pl.col("start_ns") + offset, pl.col("end_ns") + offset
        before = end.cum_max().shift(1)
    else:  # times spread too far to lay the groups end to end: a running maximum per group
        start, end = pl.col("start_ns"), pl.col("end_ns")
        before = end.cum_max().shift(1).over(by)
    return (
        rows.with_columns(_add=(end - pl.max_horizontal(start, before.fill_null(start))).clip(lower_bound=0))
        .group_by(by, maintain_order=True)
        .agg(busy_ns=pl.col("_add").sum())
    )


def _gpu_aggregates(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    stats = grouped(frame.lazy().group_by(by, maintain_order=True).agg(
        gpu_activities=pl.len().cast(pl.Int64),
        gpu_kernel_ns=pl.col("dur_ns").sum(),
        gpu_start_ns=pl.col("start_ns").min(),
        gpu_end_ns=pl.col("end_ns").max(),
        launch_delay_sum_ns=pl.col("launch_delay_ns").sum(),
        launch_delay_mean_ns=pl.col("launch_delay_ns").mean(),
        launch_delay_max_ns=pl.col("launch_delay_ns").max(),
    ))
    stats = stats.join(busy_ns(frame, by), on=by, how="left", maintain_order="left")
    return stats.with_columns(gpu_span_ns=pl.col("gpu_end_ns") - pl.col("gpu_start_ns")).with_columns(
        gpu_idle_ns=pl.col("gpu_span_ns") - pl.col("busy_ns")
    ).rename({"busy_ns": "gpu_busy_ns"})


_ZERO_STATS = {
    "gpu_activities": 0,
    "gpu_kernel_ns": 0,
    "gpu_busy_ns": 0,
    "gpu_span_ns": 0,
    "gpu_idle_ns": 0,
    "launch_delay_sum_ns": 0,
}


def annotation_gpu_stats(attributed: pl.DataFrame, annotations: pl.DataFrame) -> pl.DataFrame:
    """One row per annotation instance (the rows of `annotations`, same order) with the GPU
    activities :func:`attribute` charged to it: ``annotation_id, name, pid, tid, start_ns,
    end_ns, gpu_activities, gpu_kernel_ns, gpu_busy_ns, gpu_span_ns, gpu_idle_ns, gpu_start_ns,
    gpu_end_ns, launch_delay_sum_ns, launch_delay_mean_ns, launch_delay_max_ns``. An instance
    that launched nothing has zeros (and null start/end/delay mean/max).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> stats = annotation_gpu_stats(attribute(trace.gpu, trace.runtime, trace.annotations),
        ...                              trace.annotations)
        >>> stats.filter(pl.col("name") == "vision").select(
        ...     "gpu_activities", "gpu_kernel_ns", "gpu_busy_ns", "gpu_span_ns", "gpu_idle_ns").row(0)
        (2, 14250, 14250, 14500, 250)
    """
    instances = annotations.select("name", "pid", "tid", "start_ns", "end_ns").with_row_index("annotation_id")
    out = instances.join(_charged_stats(attributed), on="annotation_id", how="left", maintain_order="left")
    return out.with_columns(pl.col(c).fill_null(v) for c, v in _ZERO_STATS.items())


def annotation_name_stats(instance_stats: pl.DataFrame) -> pl.DataFrame:
    """Per annotation name: ``instances`` and the per-instance GPU figures summed over them
    (``gpu_activities``, ``gpu_kernel_ns``, ``gpu_busy_ns``, ``gpu_span_ns``, ``gpu_idle_ns``),
    with ``launch_delay_mean_ns`` over all their activities and ``launch_delay_max_ns``.
    Sorted by ``gpu_kernel_ns``, largest first.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> t = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> per = annotation_gpu_stats(attribute(t.gpu, t.runtime, t.annotations), t.annotations)
        >>> annotation_name_stats(per).select("name", "instances", "gpu_activities").row(0)
        ('prefill', 1, 3)
    """
    return _per_name(instance_stats.select("name"), instance_stats)


def charged_name_stats(attributed: pl.DataFrame, annotations: pl.DataFrame) -> pl.DataFrame:
    """:func:`annotation_name_stats` of :func:`annotation_gpu_stats` (the same frame), without the
    table of every instance: the figures are summed over the instances charged with a GPU activity
    only (an instance that launched nothing adds zeros and no maximum), and every name of
    `annotations` counts its instances. What ``trace summary`` uses: a trace of a million ranges,
    few of which launch kernels, does not hold a row of sixteen columns per range.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> t = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> attributed = attribute(t.gpu, t.runtime, t.annotations)
        >>> charged_name_stats(attributed, t.annotations).equals(
        ...     annotation_name_stats(annotation_gpu_stats(attributed, t.annotations)))
        True
    """
    names = annotations.select("name").with_row_index("annotation_id")
    # every charged id is a row of `annotations`
    stats = _charged_stats(attributed).join(names, on="annotation_id", how="left")
    return _per_name(annotations.select("name"), stats)


def _charged_stats(attributed: pl.DataFrame) -> pl.DataFrame:
    """The GPU figures of each annotation instance :func:`attribute` charged an activity to, by
    ``annotation_id`` (instances charged with nothing have no row)."""
    return _gpu_aggregates(attributed.filter(pl.col("annotation_id").is_not_null()), ["annotation_id"])


#: The per-instance figures a name sums (zero for an instance charged with nothing).
_NAME_SUMS = ("gpu_activities", "gpu_kernel_ns", "gpu_busy_ns", "gpu_span_ns", "gpu_idle_ns", "launch_delay_sum_ns")


def _per_name(names: pl.DataFrame, stats: pl.DataFrame) -> pl.DataFrame:
    """Per name of `names` (one row per instance): ``instances``, and the figures of `stats` (rows
    of some of those instances, with their ``name``) summed, their launch delay maximum, mean."""
    counts = names.group_by("name", maintain_order=True).agg(instances=pl.len().cast(pl.Int64))
    sums = stats.group_by("name").agg(*(pl.col(c).sum() for c in _NAME_SUMS),
                                      launch_delay_max_ns=pl.col("launch_delay_max_ns").max())
    return (
        counts.join(sums, on="name", how="left", nulls_equal=True, maintain_order="left")
        .with_columns(pl.col(c).fill_null(0) for c in _NAME_SUMS)
        .with_columns(
            launch_delay_mean_ns=pl.when(pl.col("gpu_activities") > 0).then(
                pl.col("launch_delay_sum_ns") / pl.col("gpu_activities"))
        )
        .sort(["gpu_kernel_ns", "name"], descending=[True, False], maintain_order=True)
    )


def device_gpu_stats(gpu: pl.DataFrame) -> pl.DataFrame:
    """Per device: ``device, gpu_activities, gpu_kernel_ns, gpu_busy_ns, gpu_span_ns,
    gpu_idle_ns, gpu_start_ns, gpu_end_ns`` over all its GPU activities.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> t = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> device_gpu_stats(t.gpu).select("device", "gpu_activities", "gpu_busy_ns").row(0)
        (0, 9, 43375)
    """
    frame = gpu.with_columns(launch_delay_ns=pl.lit(None, dtype=pl.Int64))
    stats = _gpu_aggregates(frame, ["device"]).sort("device")
    return stats.select(
        "device", "gpu_activities", "gpu_kernel_ns", "gpu_busy_ns", "gpu_span_ns", "gpu_idle_ns",
        "gpu_start_ns", "gpu_end_ns",
    )


def kernel_breakdown(gpu: pl.DataFrame) -> pl.DataFrame:
    """Per exact activity name: ``name, kind, category, count, total_ns, mean_ns, min_ns,
    max_ns``, largest total first. Covers every GPU activity (kernels, memcpy, memset).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> t = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> kernel_breakdown(t.gpu).select("name", "category", "count", "total_ns").row(0)
        ('flash_fwd_kernel', 'attention', 2, 16000)
    """
    per_name = grouped(gpu.lazy().group_by("name").agg(
        kind=pl.col("kind").first(),
        count=pl.len().cast(pl.Int64),
        total_ns=pl.col("dur_ns").sum(),
        mean_ns=pl.col("dur_ns").mean(),
        min_ns=pl.col("dur_ns").min(),
        max_ns=pl.col("dur_ns").max(),
    ))
    per_name = with_category(per_name)
    return per_name.select(
        "name", "kind", "category", "count", "total_ns", "mean_ns", "min_ns", "max_ns"
    ).sort(["total_ns", "name"], descending=[True, False])


# --------------------------------------------------------------------------------------------
# Phases.


def _phase_annotations(annotations: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(phase ranges with phase / named step, request ranges with request), both with row ids."""
    ann = annotations.with_row_index("annotation_id")
    name = pl.col("name")
    phases = ann.with_columns(
        phase=name.str.extract(PHASE_PATTERN, 1),
        named_step=pl.coalesce(name.str.extract(PHASE_PATTERN, 2), name.str.extract(PHASE_PATTERN, 3))
        .cast(pl.Int64),
    ).filter(pl.col("phase").is_not_null())
    requests = ann.with_columns(
        request=pl.coalesce(name.str.extract(REQUEST_PATTERN, 1), name.str.extract(REQUEST_PATTERN, 2))
        .cast(pl.Int64)
    ).filter(pl.col("request").is_not_null())
    return phases, requests


def _phase_instances(trace: KinetoTrace) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(phase instances with request and step, GPU activities attributed among the phases)."""
    phases, requests = _phase_annotations(trace.annotations)
    enclosing = innermost_range(phases, requests)
    phases = phases.with_columns(
        request=requests["request"].gather(enclosing) if requests.height else pl.lit(None, dtype=pl.Int64)
    )
    # Steps: decode[N] names carry N; otherwise the occurrence index in its request.
    phases = phases.sort("start_ns", maintain_order=True).with_columns(
        step=pl.coalesce(
            "named_step",
            pl.int_range(pl.len(), dtype=pl.Int64).over(["request", "phase"]),
        )
    )
    phase_ranges = phases.select("name", "pid", "tid", "start_ns", "end_ns")
    attributed = attribute(trace.gpu, trace.runtime, phase_ranges)
    attributed = attributed.with_columns(
        phase_row=pl.col("annotation_id")
    ).drop("annotation", "annotation_id")
    return phases.with_row_index("phase_row"), attributed


def phase_gpu_table(trace: KinetoTrace) -> pl.DataFrame:
    """One row per phase instance of a trace recorded by ``profile_phases``, with its GPU time.

    Phase ranges are the CPU annotations named ``vision``, ``projector``, ``prefill`` and
    ``decode[N]`` (see :func:`phase_of`); each GPU activity is charged to the innermost phase
    range containing its launch call on the launching thread (other annotations nested inside
    a phase do not take its kernels here). ``request`` comes from the enclosing ``request[N]``
    range (null without one); ``step`` is N for ``decode[N]``, else the occurrence index of the
    phase within its request. Columns: ``phase, step, request, gpu_busy_ms, gpu_span_ms,
    gpu_kernel_ms, gpu_activities, launch_delay_mean_us, gpu_idle_ms`` (see
    :data:`PHASE_GPU_COLUMNS`), in trace order.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> table = phase_gpu_table(read_kineto(write_demo_trace(tempfile.mkdtemp())))
        >>> table.select("phase", "step", "request", "gpu_activities", pl.col("gpu_kernel_ms").round(6)).rows()
        [('vision', 0, 0, 2, 0.01425), ('projector', 0, 0, 1, 0.004125), ('prefill', 0, 0, 3, 0.0145), ('decode', 0, 0, 1, 0.004), ('decode', 1, 0, 1, 0.0055)]
    """
    phases, attributed = _phase_instances(trace)
    charged = attributed.filter(pl.col("phase_row").is_not_null())
    stats = _gpu_aggregates(charged, ["phase_row"])
    out = phases.join(stats, on="phase_row", how="left", maintain_order="left").with_columns(
        pl.col(c).fill_null(v) for c, v in _ZERO_STATS.items()
    )
    ns_per_ms, ns_per_us = 1e6, 1e3
    return out.select(
        pl.col("phase"),
        pl.col("step"),
        pl.col("request"),
        (pl.col("gpu_busy_ns") / ns_per_ms).alias("gpu_busy_ms"),
        (pl.col("gpu_span_ns") / ns_per_ms).alias("gpu_span_ms"),
        (pl.col("gpu_kernel_ns") / ns_per_ms).alias("gpu_kernel_ms"),
        pl.col("gpu_activities"),
        (pl.col("launch_delay_mean_ns") / ns_per_us).alias("launch_delay_mean_us"),
        (pl.col("gpu_idle_ns") / ns_per_ms).alias("gpu_idle_ms"),
    ).cast(PHASE_GPU_COLUMNS)


def phase_category_table(trace: KinetoTrace) -> pl.DataFrame:
    """GPU time per phase instance and kernel category (attention vs FFN vs MoE in prefill and
    decode): ``phase, step, request, category, gpu_activities, gpu_kernel_ms``. Only
    (instance, category) pairs with activity appear.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> table = phase_category_table(read_kineto(write_demo_trace(tempfile.mkdtemp())))
        >>> table.filter(pl.col("phase") == "prefill").select("category", "gpu_activities").rows()
        [('attention', 1), ('memory', 1), ('norm', 1)]
    """
    phases, attributed = _phase_instances(trace)
    charged = with_category(attributed.filter(pl.col("phase_row").is_not_null()))
    per = charged.group_by("phase_row", "category").agg(
        gpu_activities=pl.len().cast(pl.Int64), gpu_kernel_ns=pl.col("dur_ns").sum()
    )
    out = phases.select("phase_row", "phase", "step", "request").join(per, on="phase_row", how="inner")
    return out.sort(["phase_row", "category"]).select(
        "phase", "step", "request", "category", "gpu_activities",
        (pl.col("gpu_kernel_ns") / 1e6).alias("gpu_kernel_ms"),
    )


# --------------------------------------------------------------------------------------------
# Modules (detail="modules").


def _module_of(frame: pl.DataFrame, queries: pl.DataFrame, annotations: pl.DataFrame) -> pl.DataFrame:
    """`frame` with ``module_kind``: the kind of the innermost module range containing each
    query interval (aligned rows), ``other`` where none does."""
    modules = annotations.with_columns(module_kind=pl.col("name").str.extract(MODULE_PATTERN, 1)).filter(
        pl.col("module_kind").is_not_null())
    has = queries["start_ns"].is_not_null() & queries["end_ns"].is_not_null()
    ids = pl.Series("m", [None] * frame.height, dtype=pl.UInt32)
    if modules.height and has.any():
        ids = ids.scatter(has.arg_true(), innermost_range(queries.filter(has), modules))
    kinds = modules["module_kind"].gather(ids) if modules.height else pl.Series([None] * frame.height, dtype=pl.String)
    return frame.with_columns(module_kind=kinds.fill_null("other"))


def module_gpu_table(trace: KinetoTrace) -> pl.DataFrame:
    """GPU time per phase instance and module kind of a ``detail="modules"`` trace: each GPU
    activity goes to its phase instance exactly as :func:`phase_gpu_table` charges it, and to
    the innermost ``module/KIND[B]`` range containing its launch call (``other``: launched in
    the phase outside every module range). Columns: ``phase, step, request, module_kind,
    gpu_activities, gpu_kernel_ms, gpu_busy_ms``; per phase instance the kinds add up to its
    ``gpu_kernel_ms``.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> module_gpu_table(read_kineto(write_demo_trace(tempfile.mkdtemp()))).select("phase", "module_kind").row(0)
        ('vision', 'other')
    """
    phases, attributed = _phase_instances(trace)
    calls = attributed.select(pid="launch_pid", tid="launch_tid", start_ns="launch_start_ns", end_ns="launch_end_ns")
    charged = _module_of(attributed, calls, trace.annotations).filter(pl.col("phase_row").is_not_null())
    stats = _gpu_aggregates(charged, ["phase_row", "module_kind"])
    out = phases.select("phase_row", "phase", "step", "request").join(stats, on="phase_row", how="inner")
    return out.sort(["phase_row", "module_kind"]).select(
        "phase", "step", "request", "module_kind", "gpu_activities",
        (pl.col("gpu_kernel_ns") / 1e6).alias("gpu_kernel_ms"), (pl.col("gpu_busy_ns") / 1e6).alias("gpu_busy_ms"))


def module_op_table(trace: KinetoTrace, names: list[str] | None = None) -> pl.DataFrame:
    """CPU ops per phase instance, module kind and op name (``ops``: how many; ``op_ms``: their
    summed inclusive durations, so nested ops of different names overlap), each op charged to the
    innermost phase range and the innermost module range containing it on its thread (``other``:
    inside the phase, outside every module range); `names` keeps only those op names.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> module_op_table(read_kineto(write_demo_trace(tempfile.mkdtemp()))).select("phase", "module_kind", "name", "ops").rows()
        [('vision', 'other', 'aten::linear', 1)]
    """
    ops = trace.cpu_ops if names is None else trace.cpu_ops.filter(pl.col("name").is_in(names))
    phases, _ = _phase_instances(trace)
    ranges = phases.select("pid", "tid", "start_ns", "end_ns")
    queries = ops.select("pid", "tid", "start_ns", "end_ns")
    row = innermost_range(queries, ranges) if ops.height else pl.Series([], dtype=pl.UInt32)
    ops = ops.with_columns(phase_row=phases["phase_row"].gather(row) if phases.height and ops.height
                           else pl.lit(None, dtype=pl.UInt32))
    charged = _module_of(ops, queries, trace.annotations).filter(pl.col("phase_row").is_not_null())
    per = charged.group_by("phase_row", "module_kind", "name").agg(
        ops=pl.len().cast(pl.Int64), op_ms=pl.col("dur_ns").sum() / 1e6)
    out = phases.select("phase_row", "phase", "step", "request").join(per, on="phase_row", how="inner")
    return out.sort(["phase_row", "module_kind", "name"]).select(
        "phase", "step", "request", "module_kind", "name", "ops", "op_ms")
