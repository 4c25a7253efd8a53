"""Filesystem checks every reader and writer calls in one line: what a path is before it is
opened, whether a write stays inside its directory, and filesystem faults in the user's words.

- :func:`regular_file`: refuse a FIFO, a device (``/dev/zero``) or a socket before opening it
  (reading one hangs or never ends);
- :func:`inside`: refuse a path that leads, through a symlink, out of the run or output
  directory it must stay in (nothing is written or deleted there);
- :func:`fault_message` / :func:`translate_faults`: a full disk, a read-only filesystem or a
  permission error as one line saying what happened, that what was written so far is safe and
  what to do (the CLI prints it and exits 2).

Example:
    >>> import tempfile
    >>> regular_file("/dev/null", "a trace file")
    Traceback (most recent call last):
    ...
    molmo_latency.errors.MolmoLatencyError: /dev/null: is a character device, not a regular file; pass a trace file
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from molmo_latency.errors import MolmoLatencyError

__all__ = ["fault_line", "fault_message", "inside", "is_write_fault", "regular_file", "translate_faults"]

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(path: str | os.PathLike, what: str, error: type[Exception] = MolmoLatencyError) -> Path:
    """`path` unchanged when it is a regular file, a directory or missing (the caller words
    those); anything else (FIFO, device, socket) raises `error` naming what it is, without
    opening it.

    Example:
        >>> regular_file(__file__, "a Python file").name
        'safe_fs.py'
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return path
    kind = next((words for test, words in _KINDS if test(mode)), "not a file")
    raise error(f"{path}: is {kind}, not a regular file; pass {what}")


def inside(path: str | os.PathLike, root: str | os.PathLike, error: type[Exception] = MolmoLatencyError) -> Path:
    """`path` when it (following every symlink on the way) stays inside `root`; else `error`
    saying which symlink leads out, so nothing is written or deleted there.

    Example:
        >>> import tempfile
        >>> root, outside = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
        >>> (root / "report").symlink_to(outside)
        >>> inside(root / "report" / "a.png", root)
        Traceback (most recent call last):
        ...
        molmo_latency.errors.MolmoLatencyError: .../report is a symlink leading out of ...; ...
        >>> inside(root / "plots" / "a.png", root).name
        'a.png'
    """
    path, root = Path(path), Path(root)
    real_root = root.resolve()
    real = path.resolve()
    if real == real_root or real_root in real.parents:
        return path
    link = path  # name the first symlink on the way that leads out
    try:
        relative = path.relative_to(root)
        link = root
        for part in relative.parts:
            link = link / part
            if link.is_symlink():
                break
    except ValueError:
        pass
    raise error(f"{link} is a symlink leading out of {root} (to {real}); nothing was written or deleted "
                f"there: remove the link (or make it a real folder) and run the command again")


def fault_message(exc: OSError, where: str | os.PathLike, resume: str = "") -> str | None:
    """One line for a filesystem fault (disk full, read-only, permission), or None for another
    error. `resume` says how to carry on once fixed (e.g. the command to run again).

    Example:
        >>> fault_message(OSError(errno.ENOSPC, "No space left on device"), "runs/a", "run it again")
        'runs/a: the disk is full (No space left on device); what was written so far is safe: free space and run it again'
    """
    code = getattr(exc, "errno", None)
    then = f": {{}} and {resume}" if resume else ": {}"
    reason = exc.strerror or str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: the disk is full ({reason}); what was written so far is safe" + then.format("free space")
    if code == errno.EROFS:
        return (f"{where}: the filesystem is read-only ({reason}); nothing was changed" +
                then.format("write to a writable place (or remount it read-write)"))
    if code in (errno.EACCES, errno.EPERM):
        return (f"{where}: permission denied ({reason}); nothing was changed" +
                then.format("check the permissions (or pass another directory)"))
    return None


def _polars_disk_full(exc: BaseException) -> bool:
    text = str(exc)
    return "No space left" in text or "os error 28" in text


_WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def is_write_fault(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether `exc` is a write refused by the filesystem (full, read-only, no permission), from
    the OS or from polars (which words a full disk in its own ComputeError, sometimes only as
    ``Invalid thrift: transport error``: a polars error while the filesystem of `where` has almost
    no space left counts as a full disk too).

    Example:
        >>> is_write_fault(OSError(errno.EROFS, "Read-only file system")), is_write_fault(ValueError("x"))
        (True, False)
    """
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_FAULTS
    if _polars_disk_full(exc):
        return True
    return where is not None and type(exc).__module__.startswith("polars") and _nearly_full(where)


_NEARLY_FULL_BYTES = 1 << 20


def _nearly_full(where: str | os.PathLike) -> bool:
    """Whether the filesystem holding `where` (or its nearest existing parent) has < 1 MiB free."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def fault_line(exc: BaseException) -> str | None:
    """The one line the CLI prints for a filesystem fault no command worded itself (None for any
    other error): names the file, says what was written so far is safe and to run again.

    Example:
        >>> fault_line(OSError(errno.ENOSPC, "No space left on device", "runs/a/run.json"))
        'runs/a/run.json: the disk is full (No space left on device); what was written so far is safe: free space and run the same command again'
    """
    if not is_write_fault(exc):
        return None
    if not isinstance(exc, OSError):
        exc = OSError(errno.ENOSPC, "No space left on device")
    where = exc.filename or "a file"
    return fault_message(exc, where, "run the same command again")


@contextlib.contextmanager
def translate_faults(where: str | os.PathLike, resume: str = "", error: type[Exception] = MolmoLatencyError):
    """Run the block; a disk-full, read-only or permission fault leaves it as one-line `error`.

    Polars reports a write cut short by a full disk as a ComputeError naming no errno: a
    non-OSError whose text says ``No space left`` / ``os error 28`` is taken as disk full too.

    Example:
        >>> with translate_faults("runs/a", "run it again"):
        ...     raise OSError(errno.EROFS, "Read-only file system")
        Traceback (most recent call last):
        ...
        molmo_latency.errors.MolmoLatencyError: runs/a: the filesystem is read-only (Read-only file system); ...
    """
    try:
        yield
    except MolmoLatencyError:
        raise
    except OSError as exc:
        message = fault_message(exc, where, resume)
        if message is None:
            raise
        raise error(message) from None
    except Exception as exc:  # noqa: BLE001 - polars' ComputeError for a write the disk cut short
        if not is_write_fault(exc, where):
            raise
        raise error(fault_message(OSError(errno.ENOSPC, "No space left on device"), where, resume)) from None


def read_head(path: Path, kind: str, article: str, limit: int = -1) -> bytes:
    """The first `limit` bytes of a trace file (all with -1); a missing file, a directory or an
    unreadable file is a one-line TraceError saying what to pass (`article` `kind`). Imports
    nothing heavy, so the SQLite path of an nsys export can use it without polars."""
    from molmo_latency.errors import TraceError

    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file; pass the path of {article} {kind}") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory; pass one {kind} file") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and permissions") from None
