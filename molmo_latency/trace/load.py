"""Read any trace the package knows, told apart by its content: a Kineto JSON trace
(``torch.profiler``) or an Nsight Systems SQLite export (``nsys export --type sqlite``).

    >>> import tempfile
    >>> from molmo_latency.trace import load_trace
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> from molmo_latency.trace._nsys_demo import write_demo_export
    >>> tmp = tempfile.mkdtemp()
    >>> load_trace(write_demo_trace(tmp)).layout, load_trace(write_demo_export(tmp)).layout
    ('relative', 'nsys')
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NSYS_SUFFIXES", "load_trace", "trace_format"]

#: File names read as nsys exports even when their content is not SQLite (to say so clearly).
NSYS_SUFFIXES = (".sqlite", ".sqlite3", ".db", ".nsys-rep")


def trace_format(path: str | os.PathLike) -> str:
    """``"nsys"`` for a SQLite file (plain or gzipped) or a name ending in .sqlite / .db /
    .nsys-rep (``.gz`` or not), else ``"kineto"``. Reads at most the first bytes of the file.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace_format(write_demo_trace(tempfile.mkdtemp())), trace_format("report.sqlite.gz")
        ('kineto', 'nsys')
    """
    from molmo_latency.trace.nsys_sql import is_sqlite

    if is_sqlite(path):
        return "nsys"
    name = Path(path).name.lower().removesuffix(".gz")
    return "nsys" if name.endswith(NSYS_SUFFIXES) else "kineto"


def load_trace(path: str | os.PathLike):
    """The :class:`~molmo_latency.trace.KinetoTrace` of a Kineto trace or an nsys export
    (:func:`~molmo_latency.trace.read_kineto` or :func:`~molmo_latency.trace.read_nsys`, chosen by
    :func:`trace_format`). Errors and warnings are theirs.

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._nsys_demo import write_demo_export
        >>> trace = load_trace(write_demo_export(tempfile.mkdtemp()))
        >>> trace.layout, trace.gpu.height
        ('nsys', 9)
    """
    if trace_format(path) == "nsys":
        from molmo_latency.trace.nsys import read_nsys

        return read_nsys(path)
    from molmo_latency.trace.reader import read_kineto

    return read_kineto(path)
