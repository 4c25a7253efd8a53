"""A table of a cache entry decoded from its Parquet file only when first used (hold).

:func:`molmo_latency.trace.cache.cached_tables` with ``load=`` returns the tables not named there
as :class:`DeferredFrame`: a polars DataFrame whose data is read on first use (any method,
column or operation), so a command that needs two of a trace's five tables decodes two; its
``height`` is answered from the entry's manifest without reading anything. The file was checked
(size and CRC-32) with the entry; it is checked again, with its rows and schema, when decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from molmo_latency.errors import TraceError

__all__ = ["DeferredFrame", "is_loaded"]


class DeferredFrame(pl.DataFrame):
    """A DataFrame read from `file` when first used; `check(frame)` returns None when the frame
    is what the manifest recorded (else why not), `then` functions run on it once read.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "t.parquet"
        >>> pl.DataFrame({"a": [1, 2, 3]}).write_parquet(file)
        >>> frame = DeferredFrame(file, 3, lambda f: None)
        >>> frame.height, is_loaded(frame), frame["a"].sum(), is_loaded(frame)
        (3, False, 6, True)
    """

    _pending: Path | None = None
    _rows: int | None = None
    _frame = None

    def __init__(self, file: Path, rows: int, check: Callable[[pl.DataFrame], str | None]) -> None:
        # no DataFrame.__init__: the data comes from `file`, on first use
        self._pending, self._rows, self._check, self._then = Path(file), rows, check, []

    def then(self, finish: Callable[[pl.DataFrame], pl.DataFrame]) -> DeferredFrame:
        """Run `finish` on the frame once it is read (now, if it is); returns self."""
        if self._pending is None:
            self._frame = finish(pl.DataFrame._from_pydf(self._frame))._df
        else:
            self._then.append(finish)
        return self

    @property
    def _df(self):  # every DataFrame method reaches its data through this attribute
        if self._pending is not None:
            file = self._pending
            try:
                frame = pl.read_parquet(file)
            except Exception as exc:  # noqa: BLE001 - the entry went away or changed under us
                reason = " ".join(str(exc).split())[:200]
                raise TraceError(f"{file}: cache table could not be read ({reason}); run again, or pass "
                                 "--no-cache") from None
            why = self._check(frame)
            if why is not None:
                raise TraceError(f"{file}: cache table is not what its manifest records ({why}); run again, "
                                 "or pass --no-cache")
            for finish in self._then:
                frame = finish(frame)
            self._frame, self._pending, self._then = frame._df, None, []
        return self._frame

    @_df.setter
    def _df(self, value) -> None:  # in-place DataFrame methods (and unpickling) assign it
        self._frame, self._pending = value, None

    @property
    def height(self) -> int:
        """The number of rows: the manifest's until the data is read."""
        return self._rows if self._pending is not None else self._frame.height()

    def __len__(self) -> int:
        return self.height


def is_loaded(frame: pl.DataFrame) -> bool:
    """Whether `frame` holds its data (always, but for a :class:`DeferredFrame` not used yet).

    Example:
        >>> is_loaded(pl.DataFrame({"a": [1]}))
        True
    """
    return not isinstance(frame, DeferredFrame) or frame._pending is None
