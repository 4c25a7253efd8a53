"""Hold: what was collected, on disk. Run directories (:class:`RunDir`: Parquet parts and the
consolidated tables of a sweep) live here; nothing in this package imports torch, so reading a
run directory never loads it.

    >>> import tempfile
    >>> from molmo_latency.hold import RunDir
    >>> RunDir(tempfile.mkdtemp()).refresh()
    {}
"""

from molmo_latency.hold.rundir import RunDir, atomic_write_bytes, atomic_write_parquet

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_parquet"]
