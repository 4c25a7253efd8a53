"""The one JSON writer (show): every ``--json`` of every command prints through :func:`print_json`.

:func:`jsonable` turns what the analysis hands back into plain JSON values first: NaN and
infinities become ``null`` (valid JSON, and a value we cannot trust is not printed as a number),
polars frames become lists of rows, paths and other objects their text; the document is then
written with two-space indentation and nothing left that JSON cannot hold.

Example:
    >>> import polars as pl
    >>> print(json_text({"ms": float("nan"), "rows": pl.DataFrame({"a": [1.5, float("inf")]})}))
    {
      "ms": null,
      "rows": [
        {
          "a": 1.5
        },
        {
          "a": null
        }
      ]
    }
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - a value can only be a polars frame once polars is imported
    import polars as pl


def frame_records(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with NaN/inf turned into null (valid JSON).

    >>> import polars as pl
    >>> frame_records(pl.DataFrame({"x": [1.0, float("nan")]}))
    [{'x': 1.0}, {'x': None}]
    """
    return [{k: jsonable(v) for k, v in row.items()} for row in df.iter_rows(named=True)]


def jsonable(value: Any) -> Any:
    """`value` as plain JSON values (dict, list, str, int, float, bool, None), recursively.

    >>> jsonable({"a": (1, float("-inf")), 2: {"b": float("nan")}})
    {'a': [1, None], '2': {'b': None}}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    pl = sys.modules.get("polars")  # not imported: no value is a polars frame (and --json needs no polars)
    if pl is not None and isinstance(value, pl.DataFrame):
        return frame_records(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
        return jsonable(value.item())
    if pl is not None and isinstance(value, pl.Series):
        return jsonable(value.to_list())
    if hasattr(value, "tolist"):  # a numpy array
        return jsonable(value.tolist())
    return str(value)


def json_text(obj: Any) -> str:
    """The JSON document of `obj` (two-space indent; NaN/inf as null)."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def print_json(obj: Any) -> None:
    """Print `obj` as one JSON document on standard output."""
    sys.stdout.write(json_text(obj) + "\n")


def write_json(path: str | os.PathLike, obj: Any, *, compact: bool = False) -> None:
    """Write `obj` as one JSON document to `path`, atomically (a temporary file in the same
    folder, then renamed over it): a reader never sees half a file, a failure leaves no file."""
    import tempfile

    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if compact:
                json.dump(jsonable(obj), fh, separators=(",", ":"), allow_nan=False)
            else:
                fh.write(json_text(obj) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
