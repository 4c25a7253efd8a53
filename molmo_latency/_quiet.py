"""Silence the lines Kineto's C++ code writes straight to the process's file descriptors.

``torch.profiler`` start and stop print ``USDT:... SyncActivityProfilerHandler.cpp:52]
profiler_start`` (and ``profiler_stop``) from C++ onto fd 2, through any progress bar; no Python
logging setting reaches them. :func:`quiet_kineto` points fd 1 and fd 2 at temporary files
around the profiler's start/stop only, then writes back everything that was written there except
those lines, so our own output and real errors are kept (in order, per descriptor).

Example:
    >>> import os, sys
    >>> with quiet_kineto():
    ...     _ = os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\\n")
    ...     print("kept")
    kept
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from typing import Iterator

# One Kineto marker line: "USDT:<date> <time> <pid>:<tid> <File>.cpp:<line>] <event>".
KINETO_LINE = re.compile(rb"^USDT:[^\n]*\.cpp:\d+\] profiler_\w+\r?\n?", re.MULTILINE)

_libc = None


def _flush_c_stdio() -> None:
    """fflush(NULL): push what C code buffered in stdio onto the descriptors before they move back."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
        _libc.fflush(None)
    except (OSError, AttributeError):  # no libc symbol table (unusual platform): nothing to flush
        pass


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


def drop_kineto_lines(data: bytes) -> bytes:
    """`data` without Kineto's ``USDT ... profiler_start/stop`` lines.

    >>> drop_kineto_lines(b"a\\nUSDT:2026 1:1 SyncActivityProfilerHandler.cpp:59] profiler_stop\\nb\\n")
    b'a\\nb\\n'
    """
    return KINETO_LINE.sub(b"", data)


@contextlib.contextmanager
def quiet_kineto(fds: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """Within the block, Kineto's marker lines on `fds` are dropped; everything else written to
    those descriptors is written back to them when the block ends. A descriptor that cannot be
    duplicated (closed) is left alone."""
    _flush_python()
    moved: list[tuple[int, int, tempfile._TemporaryFileWrapper]] = []  # type: ignore[name-defined]
    try:
        for fd in fds:
            try:
                saved = os.dup(fd)
            except OSError:
                continue
            tmp = tempfile.TemporaryFile()
            os.dup2(tmp.fileno(), fd)
            moved.append((fd, saved, tmp))
    except BaseException:
        _restore(moved)
        raise
    try:
        yield
    finally:
        _flush_python()
        _flush_c_stdio()
        _restore(moved)


def _restore(moved: list) -> None:
    for fd, saved, tmp in moved:
        os.dup2(saved, fd)
        os.close(saved)
        tmp.seek(0)
        data = drop_kineto_lines(tmp.read())
        tmp.close()
        while data:
            try:
                n = os.write(fd, data)
            except OSError:  # the reader went away (a closed pipe): nothing to keep it for
                break
            data = data[n:]
