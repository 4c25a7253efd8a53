"""What a trace file is, from its first bytes, without importing a reader: the Kineto reader's
path checks this before it reads (an nsys export is told apart by content), so it must not pay
for the nsys readers' imports (sqlite3 and the SQL summary)."""

from __future__ import annotations

import gzip
import os
import stat
import zlib

__all__ = ["SQLITE_MAGIC", "is_sqlite"]

#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"


def is_sqlite(path: str | os.PathLike) -> bool:
    """Whether `path` (plain or gzipped) starts like a SQLite 3 database; False if unreadable.

    Example:
        >>> import sqlite3, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.db")
        >>> sqlite3.connect(path).execute("create table t (a)").connection.commit()
        >>> is_sqlite(path), is_sqlite(__file__)
        (True, False)
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            return False
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
            if head[:2] == b"\x1f\x8b":
                f.seek(0)
                with gzip.GzipFile(fileobj=f) as g:
                    head = g.read(len(SQLITE_MAGIC))
    except (OSError, EOFError, zlib.error):
        return False
    return head == SQLITE_MAGIC
