"""What a command was given, checked before it is used: the error names the path, what is wrong
with it in the user's terms, and what to pass instead (one line, exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

from molmo_latency.errors import MolmoLatencyError

_TRACE_NAME = re.compile(r"\.json(\.gz)?$")


def _what_file(path: Path) -> str:
    if _TRACE_NAME.search(path.name):
        return "a file (a trace?), not a directory"
    if path.suffix == ".parquet":
        return "a Parquet file, not a directory"
    return "a file, not a directory"


def run_dir_arg(path: str | Path, command: str) -> Path:
    """`path` as the run directory `command` needs: it exists, is a directory, holds run.json
    (or at least requests.parquet, as ``prof.report().write_parquet(dir)`` writes).

    >>> run_dir_arg("/no/such/run", "report")
    Traceback (most recent call last):
    ...
    molmo_latency.errors.MolmoLatencyError: report: /no/such/run does not exist; pass a run directory written by `molmo-latency profile --out DIR`
    """
    path = Path(path)
    if not path.exists():
        raise MolmoLatencyError(f"{command}: {path} does not exist; pass a run directory written by "
                                "`molmo-latency profile --out DIR`")
    if not path.is_dir():
        tip = " (`molmo-latency trace summary` reads a trace)" if _TRACE_NAME.search(path.name) else ""
        raise MolmoLatencyError(f"{command}: {path} is {_what_file(path)}; pass the run directory "
                                f"`molmo-latency profile --out DIR` wrote{tip}")
    if not (path / "run.json").is_file() and not (path / "requests.parquet").is_file():
        raise MolmoLatencyError(f"{command}: {path} is a directory but not a run directory (no run.json, no requests.parquet); "
                                "pass the directory `molmo-latency profile --out DIR` wrote")
    return path


def existing(path: str | Path, command: str, what: str) -> Path:
    """`path` exists (file or directory), else one line saying so and what to pass (`what`)."""
    path = Path(path)
    if not path.exists():
        raise MolmoLatencyError(f"{command}: {path} does not exist; pass {what}")
    return path


def file_arg(path: str | Path, command: str, what: str) -> Path:
    """`path` is an existing file (not a directory)."""
    path = existing(path, command, what)
    if path.is_dir():
        raise MolmoLatencyError(f"{command}: {path} is a directory, not a file; pass {what}")
    return path
