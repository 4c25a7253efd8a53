"""The parts of a trace summary, named as the keys of `trace summary --json` (no imports: the
command line reads ``--parts`` before it knows whether polars is needed at all)."""

SUMMARY_PARTS = ("gpu", "categories", "kernels", "annotations", "cpu_ops")
