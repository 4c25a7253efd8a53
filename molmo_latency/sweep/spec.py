"""The sweep file: the grid of configurations and the measurement protocol.

A sweep file is TOML with these top-level keys (lists are grid axes, scalars the protocol)::

    crops = [1, 4, 12]          # image crops per request
    top_k = [2, 8]              # MoE experts per token (omit: the model's own)
    blocks = [8, 16]            # active transformer blocks: the first n (omit: all), or subsets
                                # of block indices, e.g. [[0, 1, 2, 15], [0, 5, 10, 15]]
    block_importance = "scores.json"  # optional: counts in `blocks` pick the top-n blocks by these
                                # scores (first and last always kept); path relative to this file
    prompt_tokens = [32]        # text tokens after the image
    new_tokens = [16]           # generated tokens (decode steps = new_tokens - 1)
    batch_size = [1]
    repeats = 12                # measured requests per configuration (enough for a diff verdict)
    warmup = 1                  # unmeasured requests per configuration before measuring
    warmup_window = 3           # ... then more until the last 3 agree
    warmup_tolerance_pct = 10   # ... within 10% ((max - min) / median; 0: a fixed count only)
    warmup_max = 5              # ... at most this many warm-up requests per configuration
    seed = 0                    # model init and inputs
    order = "interleaved"       # A B C A B C (default) or "blocked" (A A B B C C)
    cache_policy = "keep"       # "keep" or "empty_before_each": the same for every request
    free_generation = false     # true: let EOS stop generation (decode steps vary)
    kineto_per_config = 1       # with --kineto: extra traced requests per config (not measured)
    cooldown_ms = 0             # host sleep between requests (outside the measurement)
    detail = "phases"           # "modules": also time attention / MLP / MoE router / experts /
                                # norms inside each phase (a modules table; see profile_phases)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from molmo_latency.errors import SweepError
from molmo_latency.safe_fs import regular_file

GRID_KEYS = ("crops", "top_k", "blocks", "prompt_tokens", "new_tokens", "batch_size")
GRID_MIN = {"crops": 0, "top_k": 1, "blocks": 1, "prompt_tokens": 0, "new_tokens": 1, "batch_size": 1}
GRID_DEFAULTS = {"crops": [1], "top_k": [None], "blocks": [None], "prompt_tokens": [32],
                 "new_tokens": [8], "batch_size": [1]}
PROTOCOL_DEFAULTS: dict[str, Any] = {
    "repeats": 12, "warmup": 1, "seed": 0, "order": "interleaved", "cache_policy": "keep",
    "free_generation": False, "kineto_per_config": 1, "cooldown_ms": 0, "block_importance": "",
    # warm-up until steady: after `warmup` requests, more until the last `warmup_window` agree
    # within `warmup_tolerance_pct` ((max - min) / median), at most `warmup_max` in all (0: off)
    "warmup_window": 3, "warmup_tolerance_pct": 10, "warmup_max": 5,
    # on a GPU: before each measured request, wait (at most gpu_wait_max_s) until the GPU is idle
    # and at most this hot (0: off), as nsight-python's thermal mode does
    "gpu_max_temp_c": 0, "gpu_wait_max_s": 60,
    # what the profiler records in each request: "phases" or "modules" (profile_phases' detail)
    "detail": "phases",
}
CHOICES = {"order": ("interleaved", "blocked"), "cache_policy": ("keep", "empty_before_each"),
           "detail": ("phases", "modules")}
# protocol keys left out of as_dict() (and so of the digest and run.json) at their default, so that
# sweeps made before the key existed keep their digest and resume
_OMITTED_AT_DEFAULT = ("detail",)
PROTOCOL_MIN = {"repeats": 1, "warmup": 0, "seed": 0, "kineto_per_config": 0, "cooldown_ms": 0,
                "warmup_window": 2, "warmup_tolerance_pct": 0, "warmup_max": 0, "gpu_max_temp_c": 0,
                "gpu_wait_max_s": 0}


@dataclass(frozen=True)
class Config:
    """One point of the grid. `top_k`/`blocks` None means the model's own value."""

    crops: int
    top_k: int | None
    blocks: int | tuple[int, ...] | None  # the first n blocks, or these block indices
    prompt_tokens: int
    new_tokens: int
    batch_size: int = 1

    @property
    def config_id(self) -> str:
        k = "def" if self.top_k is None else self.top_k
        if self.blocks is None:
            b = "all"
        elif isinstance(self.blocks, tuple):
            b = ".".join(map(str, self.blocks))  # a subset: c1-k2-b0.5.10.15-...
        else:
            b = self.blocks
        return (f"c{self.crops}-k{k}-b{b}-p{self.prompt_tokens}-n{self.new_tokens}"
                f"-bs{self.batch_size}")

    @property
    def block_count(self) -> int | None:
        """How many blocks run (None: the model's own, all of them)."""
        return len(self.blocks) if isinstance(self.blocks, tuple) else self.blocks

    def as_dict(self) -> dict[str, Any]:
        """The knobs as columns: `blocks` is the count; a subset's indices are `block_indices`."""
        out = asdict(self)
        out["blocks"] = self.block_count
        return out


@dataclass(frozen=True)
class SweepSpec:
    grid: dict[str, list[Any]]
    protocol: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "sweep",
                  base_dir: str | Path | None = None) -> "SweepSpec":
        """Validate a sweep; `base_dir` is where a relative `block_importance` path starts."""
        unknown = sorted(set(raw) - set(GRID_KEYS) - set(PROTOCOL_DEFAULTS))
        if unknown:
            raise SweepError(f"{source}: unknown key {unknown[0]!r}; known keys: "
                             f"{', '.join(GRID_KEYS + tuple(PROTOCOL_DEFAULTS))}")
        grid: dict[str, list[Any]] = {}
        for key in GRID_KEYS:
            values = raw.get(key, GRID_DEFAULTS[key])
            if not isinstance(values, list):
                values = [values]
            if not values:
                raise SweepError(f"{source}: {key!r} is an empty list; give at least one value")
            if key == "blocks":
                values = [_block_subset(v, source) if isinstance(v, list) else v for v in values]
            for v in values:
                if v is None and GRID_DEFAULTS[key] == [None] or isinstance(v, tuple):
                    continue
                if not isinstance(v, int) or isinstance(v, bool):
                    allowed = "integers or lists of block indices" if key == "blocks" else "integers"
                    raise SweepError(f"{source}: {key!r} must hold {allowed}, got {v!r}")
                if v < GRID_MIN[key]:
                    raise SweepError(f"{source}: {key!r} must be >= {GRID_MIN[key]}, got {v}")
            if len(set(values)) != len(values):
                raise SweepError(f"{source}: {key!r} repeats a value: {values}")
            grid[key] = values
        protocol = dict(PROTOCOL_DEFAULTS)
        for key in PROTOCOL_DEFAULTS:
            if key not in raw:
                continue
            value, default = raw[key], PROTOCOL_DEFAULTS[key]
            if type(value) is not type(default):
                raise SweepError(f"{source}: {key!r} must be a {type(default).__name__}, got {value!r}")
            if key in CHOICES and value not in CHOICES[key]:
                raise SweepError(f"{source}: {key!r} must be one of {CHOICES[key]}, got {value!r}")
            if key in PROTOCOL_MIN and value < PROTOCOL_MIN[key]:
                raise SweepError(f"{source}: {key!r} must be >= {PROTOCOL_MIN[key]}, got {value}")
            protocol[key] = value
        if protocol["block_importance"]:
            scores = read_block_importance(Path(base_dir or ".") / protocol["block_importance"], source)
            grid["blocks"] = [blocks_by_importance(scores, v, source) if isinstance(v, int) else v
                              for v in grid["blocks"]]
            if len(set(grid["blocks"])) != len(grid["blocks"]):
                raise SweepError(f"{source}: 'blocks' picks the same blocks twice with block_importance")
        return cls(grid=grid, protocol=protocol)

    def configs(self) -> list[Config]:
        axes = [self.grid[k] for k in GRID_KEYS]
        return [Config(*values) for values in itertools.product(*axes)]

    def units(self) -> list[tuple[Config, int]]:
        """(configuration, repeat) in measurement order: interleaved A B C A B C by default."""
        configs, repeats = self.configs(), self.protocol["repeats"]
        if self.protocol["order"] == "blocked":
            return [(c, r) for c in configs for r in range(repeats)]
        return [(c, r) for r in range(repeats) for c in configs]

    def as_dict(self) -> dict[str, Any]:
        grid = {k: [list(v) if isinstance(v, tuple) else v for v in vals] for k, vals in self.grid.items()}
        protocol = {k: v for k, v in self.protocol.items()
                    if not (k in _OMITTED_AT_DEFAULT and v == PROTOCOL_DEFAULTS[k])}
        return {"grid": grid, "protocol": protocol}

    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file; errors name the file and the key."""
    p = regular_file(path, "the sweep TOML file itself", SweepError)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"sweep file {p} does not exist") from None
    except IsADirectoryError:
        raise SweepError(f"sweep file {p} is a directory; pass the sweep TOML file itself") from None
    except OSError as exc:
        raise SweepError(f"sweep file {p} cannot be read ({exc.strerror or exc}); pass a readable "
                         "sweep TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"sweep file {p} is not valid TOML: {exc}") from None
    return SweepSpec.from_dict(raw, source=f"sweep file {p}", base_dir=p.parent)


def _block_subset(value: list, source: str) -> tuple[int, ...]:
    if not value or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in value):
        raise SweepError(f"{source}: a block subset in 'blocks' must be a non-empty list of block "
                         f"indices >= 0, got {value!r}")
    if value != sorted(set(value)):
        raise SweepError(f"{source}: the block subset {value!r} must be sorted and unique, e.g. "
                         f"{sorted(set(value))}")
    return tuple(value)


def read_block_importance(path: Path, source: str = "sweep") -> list[float]:
    """One importance score per block, from JSON: a list, ``{"scores": [...]}`` or
    ``{"0": score, "1": score, ...}`` (every block index once)."""
    regular_file(path, f"a JSON file of block scores as block_importance ({source})", SweepError)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{source}: block_importance file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"{source}: block_importance file {path} is not readable JSON ({exc})") from None
    if isinstance(raw, dict) and "scores" in raw:
        raw = raw["scores"]
    if isinstance(raw, dict):
        try:
            keyed = {int(k): v for k, v in raw.items()}
        except ValueError:
            keyed = {}
        if sorted(keyed) != list(range(len(raw))):
            raise SweepError(f"{source}: block_importance file {path} must key its scores by every block "
                             "index 0..n-1")
        raw = [keyed[i] for i in range(len(keyed))]
    if not isinstance(raw, list) or not raw or any(
            not isinstance(v, (int, float)) or isinstance(v, bool) or v != v for v in raw):
        raise SweepError(f"{source}: block_importance file {path} must hold one number per block "
                         "(a JSON list, {\"scores\": [...]} or {\"0\": score, ...})")
    return [float(v) for v in raw]


def blocks_by_importance(scores: list[float], n: int, source: str = "sweep") -> tuple[int, ...]:
    """The `n` blocks to keep: the first and the last, then the highest scores (ties: lower index).

    Example:
        >>> blocks_by_importance([9, 0.1, 0.7, 0.2, 0.5, 1], 4)
        (0, 2, 4, 5)
    """
    total = len(scores)
    low = min(2, total)
    if not isinstance(n, int) or isinstance(n, bool) or not low <= n <= total:
        raise SweepError(f"{source}: with block_importance, each count in 'blocks' must be in {low}..{total} "
                         f"(the first and last blocks are always kept), got {n!r}")
    middle = sorted(range(1, total - 1), key=lambda i: (-scores[i], i))[: max(0, n - 2)]
    return tuple(sorted({0, total - 1, *middle}))[:n] if n < total else tuple(range(total))
