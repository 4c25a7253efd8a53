"""What ``molmo-latency trace summary`` shows, as frames: per-kernel, per-annotation, per-device
and per-category GPU time of one trace (transform only; the CLI renders it)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from molmo_latency.trace.attribution import (
    MODULE_PATTERN,
    annotation_gpu_stats,
    annotation_name_stats,
    attribute,
    device_gpu_stats,
    kernel_breakdown,
    module_gpu_table,
)
from molmo_latency.trace.categories import cpu_op_category, with_category
from molmo_latency.trace.reader import KinetoTrace

__all__ = ["TraceSummary", "cpu_op_breakdown", "summarize"]


@dataclass(frozen=True)
class TraceSummary:
    """Summary tables of one trace (times in ns).

    - ``kernels``: :func:`~molmo_latency.trace.attribution.kernel_breakdown`, every GPU activity
      grouped by exact name;
    - ``annotations``: :func:`~molmo_latency.trace.attribution.annotation_name_stats` over all
      CPU user annotations (``instances``, ``gpu_activities``, ``gpu_kernel_ns``, ...);
    - ``devices``: :func:`~molmo_latency.trace.attribution.device_gpu_stats`;
    - ``categories``: ``category, count, total_ns`` over every GPU activity;
    - ``unattributed``: GPU activities charged to no annotation; ``unlinked``: those whose
      launch call is not in the trace;
    - ``cpu_ops``: per CPU op name (``cpu_op`` events): ``name, category, count, total_ns`` (inclusive:
      an op's time includes the ops nested in it), ``mean_ns``, largest total first;
    - ``modules``: for a trace with ``detail="modules"`` ranges and GPU activity, per phase and
      module kind (:func:`~molmo_latency.trace.attribution.module_gpu_table` summed over the
      phase's instances): ``phase, module_kind, instances, gpu_activities, gpu_kernel_ms``;
      None otherwise.
    """

    trace: KinetoTrace
    kernels: pl.DataFrame
    annotations: pl.DataFrame
    devices: pl.DataFrame
    categories: pl.DataFrame
    unattributed: int
    unlinked: int
    cpu_ops: pl.DataFrame
    modules: pl.DataFrame | None = None


def summarize(trace: KinetoTrace) -> TraceSummary:
    """Per-kernel, per-annotation, per-device and per-category GPU time of `trace`.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> s = summarize(read_kineto(write_demo_trace(tempfile.mkdtemp())))
        >>> s.devices.select("device", "gpu_activities").row(0), s.unattributed
        ((0, 9), 1)
    """
    attributed = attribute(trace.gpu, trace.runtime, trace.annotations)
    per_instance = annotation_gpu_stats(attributed, trace.annotations)
    categories = (
        with_category(trace.gpu)
        .group_by("category")
        .agg(count=pl.len().cast(pl.Int64), total_ns=pl.col("dur_ns").sum())
        .sort(["total_ns", "category"], descending=[True, False])
    )
    return TraceSummary(
        trace=trace,
        kernels=kernel_breakdown(trace.gpu),
        annotations=annotation_name_stats(per_instance),
        devices=device_gpu_stats(trace.gpu),
        categories=categories,
        unattributed=int(attributed["annotation_id"].is_null().sum()),
        unlinked=int(attributed["launch_start_ns"].is_null().sum()),
        cpu_ops=cpu_op_breakdown(trace.cpu_ops),
        modules=_module_totals(trace),
    )


def _module_totals(trace: KinetoTrace) -> pl.DataFrame | None:
    if not trace.gpu.height or not trace.annotations.height \
            or not trace.annotations["name"].str.contains(MODULE_PATTERN).any():
        return None
    return module_gpu_table(trace).group_by("phase", "module_kind", maintain_order=True).agg(
        instances=pl.len().cast(pl.Int64), gpu_activities=pl.col("gpu_activities").sum(),
        gpu_kernel_ms=pl.col("gpu_kernel_ms").sum())


def cpu_op_breakdown(cpu_ops: pl.DataFrame) -> pl.DataFrame:
    """Per CPU op name: ``name, category, count, total_ns, mean_ns`` (inclusive times), largest first.

    Example:
        >>> ops = pl.DataFrame({"name": ["aten::mm", "aten::add", "aten::mm"], "dur_ns": [30, 5, 10]})
        >>> cpu_op_breakdown(ops).rows()
        [('aten::mm', 'gemm', 2, 40, 20.0), ('aten::add', 'elementwise', 1, 5, 5.0)]
    """
    per_name = cpu_ops.group_by("name").agg(
        count=pl.len().cast(pl.Int64), total_ns=pl.col("dur_ns").sum(), mean_ns=pl.col("dur_ns").mean()
    )
    category = pl.col("name").map_elements(cpu_op_category, return_dtype=pl.String)  # once per distinct name
    return per_name.with_columns(category=category).select(
        "name", "category", "count", "total_ns", "mean_ns"
    ).sort(["total_ns", "name"], descending=[True, False])
