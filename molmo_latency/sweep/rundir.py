"""The run directory: what a sweep holds on disk, written so that nothing is lost.

Each measured (configuration, repeat) is written as its own Parquet parts under ``parts/``
(phases and telemetry first, the request row last), each atomically (temporary file, then
rename). A unit is done when its request part exists, so a sweep killed at any moment and
started again skips exactly the done units. The consolidated tables (``requests.parquet``,
``phases.parquet``, ``telemetry.parquet``, ``failures.parquet``) are rebuilt from the parts,
also atomically. ``run.json`` fixes the sweep and the model; a different sweep or model into the
same directory is refused.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from molmo_latency.errors import SweepError

TABLES = ("requests", "phases", "telemetry")
_UNIT_RE = re.compile(r"^(?P<config>.+)__r(?P<repeat>\d+)\.parquet$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def atomic_write_parquet(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


class RunDir:
    """A sweep's run directory. `RunDir.create_or_resume(path, identity)` checks run.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -------------------------------------------------------------------- identity
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            raise SweepError(f"{self.path} is not a run directory (no run.json); "
                             "create one with `molmo-latency profile`") from None
        except json.JSONDecodeError as exc:
            raise SweepError(f"{self.run_json} is corrupted ({exc}); move it away or use a new --out") from None

    @classmethod
    def create_or_resume(cls, path: str | Path, identity: dict[str, Any], meta: dict[str, Any]) -> tuple["RunDir", bool]:
        """Create a new run directory, or reopen one made by the same sweep and model.

        `identity` holds what must match to resume (sweep digest, model, device, dtype).
        Returns (run_dir, resumed).
        """
        rd = cls(path)
        if rd.path.exists() and not rd.path.is_dir():
            raise SweepError(f"--out {rd.path} exists and is not a directory")
        if rd.run_json.exists():
            old = rd.meta().get("identity", {})
            diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            if diff:
                details = ", ".join(f"{k}: {old.get(k)!r} there, {identity.get(k)!r} now" for k in diff)
                raise SweepError(f"{rd.path} holds a different run ({details}); resume it with the same "
                                 "sweep and model, or choose another --out")
            rd._clean_tmp()
            return rd, True
        if rd.path.is_dir() and any(p.name not in (".", "..") for p in rd.path.iterdir()):
            raise SweepError(f"--out {rd.path} is not empty and has no run.json; choose an empty or new directory")
        rd.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(rd.run_json, json.dumps({**meta, "identity": identity}, indent=2,
                                                   sort_keys=True, default=str).encode())
        return rd, False

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta()
        meta.update(fields)
        atomic_write_bytes(self.run_json, json.dumps(meta, indent=2, sort_keys=True, default=str).encode())

    def _clean_tmp(self) -> None:
        for tmp in self.path.rglob(".*.tmp"):
            with _suppress():
                tmp.unlink()

    # ---------------------------------------------------------------------- parts
    def _part(self, table: str, config_id: str, repeat: int) -> Path:
        return self.path / "parts" / table / f"{config_id}__r{repeat}.parquet"

    def write_unit(self, config_id: str, repeat: int, tables: dict[str, pl.DataFrame | None]) -> None:
        """Write one (configuration, repeat): other tables first, the request row last."""
        for table in ("phases", "telemetry"):
            frame = tables.get(table)
            if frame is not None:
                atomic_write_parquet(frame, self._part(table, config_id, repeat))
        atomic_write_parquet(tables["requests"], self._part("requests", config_id, repeat))

    def done_units(self) -> set[tuple[str, int]]:
        folder = self.path / "parts" / "requests"
        done = set()
        if folder.is_dir():
            for p in folder.iterdir():
                m = _UNIT_RE.match(p.name)
                if m:
                    done.add((m["config"], int(m["repeat"])))
        return done

    def record_failure(self, config: dict[str, Any], config_id: str, exc: BaseException, stage: str) -> None:
        row = {"config_id": config_id, **config, "stage": stage, "error_type": type(exc).__name__,
               "message": str(exc)[:2000], "time_unix": time.time()}
        atomic_write_parquet(pl.DataFrame([row]), self.path / "parts" / "failures" / f"{config_id}.parquet")

    def failed_configs(self) -> set[str]:
        folder = self.path / "parts" / "failures"
        return {p.name[: -len(".parquet")] for p in folder.glob("*.parquet")} if folder.is_dir() else set()

    def consolidate(self) -> dict[str, int]:
        """Rebuild the top-level tables from the parts; returns row counts."""
        counts = {}
        for table in (*TABLES, "failures"):
            files = sorted((self.path / "parts" / table).glob("*.parquet"))
            if not files:
                continue
            frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
            for key in ("order", "start_ns", "t_ns"):
                if key in frame.columns:
                    frame = frame.sort(key)
                    break
            atomic_write_parquet(frame, self.path / f"{table}.parquet")
            counts[table] = frame.height
        return counts

    # ---------------------------------------------------------------------- reading
    def table(self, name: str) -> pl.DataFrame:
        path = self.path / f"{name}.parquet"
        if not path.is_file():
            if not self.run_json.exists():
                raise SweepError(f"{self.path} is not a run directory (no run.json)")
            raise SweepError(f"{self.path} has no {name}.parquet (no measurement finished yet?)")
        try:
            return pl.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds
            raise SweepError(f"{path} cannot be read as Parquet: {exc}") from None
