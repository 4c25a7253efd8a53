"""The one PNG writer (show): every figure of every command is made by :func:`pyplot` and written
by :func:`write_png`.

One style: matplotlib's Agg backend (no display needed), :data:`DPI` dots per inch and a tight
bounding box (a legend placed outside the axes is kept, no blank margin). One way to write: the
PNG goes to a temporary file in the target's own folder, is flushed to disk, gets the normal
permissions of a new file and then replaces the target with ``os.replace``, so a reader never
sees half a PNG and a failed write leaves no stray file.

Example:
    >>> import tempfile, pathlib
    >>> plt = pyplot()
    >>> fig, ax = plt.subplots()
    >>> _ = ax.plot([0, 1], [0, 1])
    >>> out = write_png(fig, pathlib.Path(tempfile.mkdtemp()) / "sub" / "line.png")
    >>> out.read_bytes()[:4], [p.name for p in out.parent.iterdir()]
    (b'\\x89PNG', ['line.png'])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DPI = 110  # every PNG: the same resolution


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported here, when a figure is made: a command
    that draws nothing never imports matplotlib)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _file_mode() -> int:
    """What a new file gets under the current umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_png(fig, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` as a PNG, atomically, and close it; returns the path.

    The folder is created when missing. On any failure (an unwritable folder raises
    ``OSError``) the target is left as it was and the temporary file is removed; the figure is
    closed either way."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    finally:
        pyplot().close(fig)
    return path
