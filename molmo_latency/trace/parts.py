"""The parts of a trace summary, named as the keys of `trace summary --json` (no imports: the
command line reads ``--parts`` before it knows whether polars is needed at all)."""

SUMMARY_PARTS = ("gpu", "categories", "kernels", "annotations", "cpu_ops")

#: The tables of a trace each part reads (the annotations part: the launch join and the
#: attribution, and the module table built from the same). A cached read decodes these only.
PART_TABLES = {
    "gpu": ("gpu",),
    "categories": ("gpu",),
    "kernels": ("gpu",),
    "annotations": ("gpu", "runtime", "annotations"),
    "cpu_ops": ("cpu_ops",),
}
