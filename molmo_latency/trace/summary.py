"""What ``molmo-latency trace summary`` shows, as frames: per-kernel, per-annotation, per-device
and per-category GPU time of one trace (transform only; the CLI renders it).

Only the parts asked for are computed (:data:`SUMMARY_PARTS`): the per-kernel table alone does
not pay for the launch join and the annotation attribution, nor for the CPU-op table."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from molmo_latency.trace.attribution import (
    MODULE_PATTERN,
    attribute,
    charged_name_stats,
    device_gpu_stats,
    grouped,
    kernel_breakdown,
    module_gpu_table,
)
from molmo_latency.trace.categories import cpu_op_category, with_category
from molmo_latency.trace.parts import SUMMARY_PARTS
from molmo_latency.trace.reader import KinetoTrace

__all__ = ["SUMMARY_PARTS", "TraceSummary", "cpu_op_breakdown", "summarize"]

#: The parts of a summary, each computed only when asked for: ``devices``, ``categories``,
#: ``kernels`` (GPU activities alone), ``annotations`` (the launch join and the attribution to
#: annotations: also gives ``unattributed`` and ``unlinked``) and ``cpu_ops``.


@dataclass(frozen=True)
class TraceSummary:
    """Summary tables of one trace (times in ns).

    - ``kernels``: :func:`~molmo_latency.trace.attribution.kernel_breakdown`, every GPU activity
      grouped by exact name;
    - ``annotations``: :func:`~molmo_latency.trace.attribution.annotation_name_stats` over all
      CPU user annotations (``instances``, ``gpu_activities``, ``gpu_kernel_ns``, ...), computed
      by :func:`~molmo_latency.trace.attribution.charged_name_stats`;
    - ``devices``: :func:`~molmo_latency.trace.attribution.device_gpu_stats`;
    - ``categories``: ``category, count, total_ns`` over every GPU activity;
    - ``unattributed``: GPU activities charged to no annotation; ``unlinked``: those whose
      launch call is not in the trace;
    - ``cpu_ops``: per CPU op name (``cpu_op`` events): ``name, category, count, total_ns`` (inclusive:
      an op's time includes the ops nested in it), ``mean_ns``, largest total first;
    - ``modules``: for a trace with ``detail="modules"`` ranges and GPU activity, per phase and
      module kind (:func:`~molmo_latency.trace.attribution.module_gpu_table` summed over the
      phase's instances): ``phase, module_kind, instances, gpu_activities, gpu_kernel_ms``;
      None otherwise (and when ``annotations`` is not computed: it needs the same attribution).
    - ``computed``: the parts computed (of :data:`SUMMARY_PARTS`); a part not computed is None
      (``unattributed`` and ``unlinked`` too, without ``annotations``).
    """

    trace: KinetoTrace
    kernels: pl.DataFrame | None
    annotations: pl.DataFrame | None
    devices: pl.DataFrame | None
    categories: pl.DataFrame | None
    unattributed: int | None
    unlinked: int | None
    cpu_ops: pl.DataFrame | None
    computed: tuple[str, ...] = SUMMARY_PARTS
    modules: pl.DataFrame | None = None


def summarize(trace: KinetoTrace, parts: tuple[str, ...] | list[str] | None = None) -> TraceSummary:
    """Per-kernel, per-annotation, per-device and per-category GPU time of `trace`: the `parts`
    of :data:`SUMMARY_PARTS` asked for (all when None); the others are None.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace import read_kineto
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace = read_kineto(write_demo_trace(tempfile.mkdtemp()))
        >>> s = summarize(trace)
        >>> s.devices.select("device", "gpu_activities").row(0), s.unattributed
        ((0, 9), 1)
        >>> only = summarize(trace, ["kernels"])
        >>> only.computed, only.kernels.height, only.annotations, only.unattributed
        (('kernels',), 8, None, None)
    """
    asked = SUMMARY_PARTS if parts is None else tuple(parts)
    unknown = [p for p in asked if p not in SUMMARY_PARTS]
    if unknown:
        raise ValueError(f"unknown summary part(s) {unknown}; choose from {', '.join(SUMMARY_PARTS)}")
    computed = tuple(p for p in SUMMARY_PARTS if p in asked)
    annotations = unattributed = unlinked = categories = None
    if "annotations" in computed:
        # only the columns the figures below read: the join then carries 4 of the GPU table's 11
        attributed = attribute(trace.gpu.select("correlation", "start_ns", "end_ns", "dur_ns"), trace.runtime,
                               trace.annotations)
        annotations = charged_name_stats(attributed, trace.annotations)
        unattributed = int(attributed["annotation_id"].is_null().sum())
        unlinked = int(attributed["launch_start_ns"].is_null().sum())
    if "categories" in computed:
        # categories named once per distinct (name, kind), not joined back onto every activity
        per_name = grouped(trace.gpu.lazy().group_by("name", "kind").agg(
            count=pl.len().cast(pl.Int64), total_ns=pl.col("dur_ns").sum()))
        categories = (
            with_category(per_name)
            .group_by("category")
            .agg(count=pl.col("count").sum(), total_ns=pl.col("total_ns").sum())
            .sort(["total_ns", "category"], descending=[True, False])
        )
    return TraceSummary(
        trace=trace,
        kernels=kernel_breakdown(trace.gpu) if "kernels" in computed else None,
        annotations=annotations,
        devices=device_gpu_stats(trace.gpu) if "gpu" in computed else None,
        categories=categories,
        unattributed=unattributed,
        unlinked=unlinked,
        cpu_ops=cpu_op_breakdown(trace.cpu_ops) if "cpu_ops" in computed else None,
        computed=computed,
        modules=_module_totals(trace) if "annotations" in computed else None,
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
    per_name = grouped(cpu_ops.lazy().group_by("name").agg(
        count=pl.len().cast(pl.Int64), total_ns=pl.col("dur_ns").sum(), mean_ns=pl.col("dur_ns").mean()
    ))
    category = pl.col("name").map_elements(cpu_op_category, return_dtype=pl.String)  # once per distinct name
    return per_name.with_columns(category=category).select(
        "name", "category", "count", "total_ns", "mean_ns"
    ).sort(["total_ns", "name"], descending=[True, False])
