"""What a diff compares (collect/hold): each side is a Kineto trace or a run directory.

:func:`open_side` says what a path is, :func:`plan` pairs the configurations to compare,
:meth:`Side.table` and :meth:`Side.trace_path` give a run directory's tables and a
configuration's trace, :func:`read_trace` reads a trace. Nothing here computes a difference.

Example:
    >>> import tempfile
    >>> from molmo_latency.trace._demo import write_demo_trace
    >>> side = open_side(write_demo_trace(tempfile.mkdtemp()))
    >>> side.kind, side.configs
    ('trace', [])
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from molmo_latency.errors import MolmoLatencyError
from molmo_latency.hold.rundir import RunDir


class DiffError(MolmoLatencyError):
    """The two sides of a diff cannot be compared as asked (paths, configurations, level)."""


@dataclass
class Side:
    """One side of a diff: a trace file or a run directory (with its configuration ids)."""

    path: Path
    kind: str  # "trace" | "run"
    configs: list[str] = field(default_factory=list)
    _tables: dict[str, pl.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return str(self.path)

    def table(self, name: str) -> pl.DataFrame:
        if name not in self._tables:
            self._tables[name] = RunDir(self.path).table(name)
        return self._tables[name]

    def trace_path(self, config_id: str | None) -> Path | None:
        """The trace of `config_id` (run directory: traces/<config_id>.pt.trace.json.gz)."""
        if self.kind == "trace":
            return self.path
        path = self.path / "traces" / f"{config_id}.pt.trace.json.gz"
        return path if path.is_file() else None


def open_side(path: str | Path) -> Side:
    """A trace file, or a run directory of the sweep runner (it has run.json and requests.parquet).

    Raises :class:`DiffError` for a missing path or a directory that is not a run directory.
    """
    p = Path(path)
    if not p.exists():
        raise DiffError(f"{p}: no such file or directory; pass a Kineto trace (.json or .json.gz) "
                        "or a run directory of `molmo-latency profile`")
    if p.is_dir():
        if not (p / "run.json").is_file():
            raise DiffError(f"{p}: a directory without run.json, so not a run directory; pass a run "
                            "directory of `molmo-latency profile` or a trace file")
        side = Side(path=p, kind="run")
        requests = side.table("requests")
        if "config_id" not in requests.columns:
            raise DiffError(f"{p}/requests.parquet has no config_id column; is it a run directory "
                            "of `molmo-latency profile`?")
        side.configs = requests["config_id"].unique(maintain_order=True).to_list()
        return side
    return Side(path=p, kind="trace")


def _one_config(side: Side, option: str) -> str:
    if len(side.configs) == 1:
        return side.configs[0]
    raise DiffError(f"{side.path} holds {len(side.configs)} configurations ({_ids(side.configs)}); "
                    f"choose one with {option} ID")


def _ids(configs: list[str], limit: int = 6) -> str:
    shown = ", ".join(configs[:limit])
    return shown + (f", ... ({len(configs) - limit} more)" if len(configs) > limit else "")


def _check(side: Side, config: str, option: str) -> str:
    if config not in side.configs:
        raise DiffError(f"{option} {config!r} is not in {side.path}; its configurations are: "
                        f"{_ids(side.configs)}")
    return config


def plan(a: Side, b: Side, config: str | None = None, config_b: str | None = None) -> list[tuple[str | None, str | None]]:
    """The (A configuration, B configuration) pairs to compare; None for a trace side.

    Two run directories: the configuration ids found in both, unless ``config`` (A's id) and
    ``config_b`` (B's id, default: the same as ``config``) name the pair. A run directory
    against a trace: its only configuration, or the one named.
    """
    if a.kind == "trace" and b.kind == "trace":
        if config or config_b:
            raise DiffError("--config and --config-b choose configurations of run directories; "
                            "both sides here are trace files")
        return [(None, None)]
    if a.kind == "trace" and config:
        raise DiffError(f"--config names a configuration of A, but A ({a.path}) is a trace; "
                        "use --config-b for B's configuration")
    if b.kind == "trace" and config_b:
        raise DiffError(f"--config-b names a configuration of B, but B ({b.path}) is a trace")
    a_id = None if a.kind == "trace" else (_check(a, config, "--config") if config else None)
    b_default = config_b or (config if a.kind == "run" else None)
    b_id = None if b.kind == "trace" else (_check(b, b_default, "--config-b" if config_b else "--config")
                                           if b_default else None)
    if a.kind == "run" and b.kind == "run":
        if a_id is None and b_id is None:
            if a.path.resolve() == b.path.resolve():
                raise DiffError(f"A and B are the same run directory ({a.path}); compare two of its "
                                f"configurations with --config A_ID --config-b B_ID ({_ids(a.configs)})")
            common = [c for c in a.configs if c in set(b.configs)]
            if common:
                return [(c, c) for c in common]
            if len(a.configs) == 1 and len(b.configs) == 1:
                return [(a.configs[0], b.configs[0])]
            raise DiffError(f"{a.path} and {b.path} share no configuration id (A: {_ids(a.configs)}; "
                            f"B: {_ids(b.configs)}); choose a pair with --config A_ID --config-b B_ID")
        a_id = a_id or _one_config(a, "--config")
        b_id = b_id or _one_config(b, "--config-b")
        return [(a_id, b_id)]
    if a.kind == "run":
        return [(a_id or _one_config(a, "--config"), None)]
    return [(None, b_id or _one_config(b, "--config-b"))]


def read_trace(path: Path, *, cache: bool | None = False, cache_dir: str | Path | None = None):
    """Read a trace (Kineto JSON or nsys SQLite export, told apart by content: ``load_trace``);
    its warnings come back as notes, not printed. `cache`, `cache_dir`: the Parquet cache of the
    trace's tables (:mod:`molmo_latency.trace.cache`; None: on unless ``MOLMO_LATENCY_NO_CACHE``).

    Example:
        >>> import tempfile
        >>> from molmo_latency.trace._demo import write_demo_trace
        >>> trace, notes = read_trace(write_demo_trace(tempfile.mkdtemp()))
        >>> trace.gpu.height > 0, notes
        (True, [])
    """
    from molmo_latency.trace import TraceWarning, load_trace

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        trace = load_trace(path, cache=cache, cache_dir=cache_dir)
    notes = [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]
    for w in caught:
        if not issubclass(w.category, TraceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return trace, notes
