"""The run directory: what a sweep holds on disk, written so that nothing is lost.

Each measured (configuration, repeat) is written as its own Parquet parts under ``parts/``
(phases and telemetry first, the request row last), each atomically (temporary file, then
rename). A unit is done when its request part exists, so a sweep killed at any moment and
started again skips exactly the done units. The consolidated tables (``requests.parquet``,
``phases.parquet``, ``telemetry.parquet``, ``failures.parquet``) are rebuilt from the parts,
also atomically, every ~30 s of a sweep, at its end, and whenever :meth:`RunDir.table` finds parts
newer than a table. ``run.json`` fixes the sweep and the model; a different sweep or model into
the same directory is refused. A sweep holds an exclusive lock on ``RUN_DIR/.lock`` while it
writes (:meth:`RunDir.locked`), so a second sweep into the same directory is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from molmo_latency.errors import SweepError
from molmo_latency.safe_fs import inside, is_write_fault, regular_file

TABLES = ("requests", "phases", "telemetry")
ALL_TABLES = (*TABLES, "failures")
LOCK_NAME = ".lock"
IDENTITY_LABELS = {"model_config_sha256": "the model's config.json (sha256)"}
_UNIT_RE = re.compile(r"^(?P<config>.+)__r(?P<repeat>\d+)\.parquet$")


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write `path` via a temporary file in the same folder: fsync, chmod, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; the run directory is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_parquet(frame: pl.DataFrame, path: Path) -> None:
    _atomic_write(path, frame.write_parquet)


def read_part(path: Path) -> pl.DataFrame:
    """One part file; a corrupt or empty one is a SweepError that says to delete it."""
    regular_file(path, "a Parquet part (delete what is there)", SweepError)  # a FIFO would hang the read
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds for a bad file
        raise SweepError(_bad_part(path, exc)) from None


def check_part_name(path: Path, frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` when the part file `path` holds what its name says (``CONFIG__rREPEAT.parquet``:
    that configuration and repeat only; ``failures/CONFIG.parquet``: that configuration), else a
    SweepError naming the misnamed (copied, renamed) part."""
    m = _UNIT_RE.match(path.name)
    expected = {"config_id": m["config"], "repeat": int(m["repeat"])} if m else {
        "config_id": path.name.removesuffix(".parquet")}
    for column, value in expected.items():
        if column in frame.columns and frame.height and frame[column].drop_nulls().unique().to_list() != [value]:
            held = sorted(str(v) for v in frame[column].unique().to_list())[:3]
            raise SweepError(
                f"part file {path} holds {column} {', '.join(held)}, not the {value} its name says (a part "
                "copied over another or renamed); delete it and run the same `molmo-latency profile` command "
                "again: that unit is then measured again")
    return frame


def _bad_part(path: Path, exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"part file {path} is corrupt or empty ({type(exc).__name__}: {first[:200]}); delete it "
            "and run the same `molmo-latency profile` command again: that unit is then measured again")


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
        regular_file(self.run_json, "the run.json a sweep wrote (move this one away)", SweepError)
        try:
            return json.loads(self.run_json.read_text())
        except FileNotFoundError:
            raise SweepError(f"{self.path} is not a run directory (no run.json); "
                             "create one with `molmo-latency profile`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SweepError(f"{self.run_json} is corrupted ({exc}); move it away or use a new --out") from None

    @classmethod
    def create_or_resume(cls, path: str | Path, identity: dict[str, Any], meta: dict[str, Any]) -> tuple["RunDir", bool]:
        """Create a new run directory, or reopen one made by the same sweep and model.

        `identity` holds what must match to resume (sweep digest, model, device, dtype).
        Returns (run_dir, resumed). Call it inside :meth:`locked` so that no other sweep writes.
        A directory whose run.json has no measured unit and no failure yet (a start that failed
        before measuring) is taken as new: its run.json is rewritten.
        """
        rd = cls(path)
        if rd.path.exists() and not rd.path.is_dir():
            raise SweepError(f"--out {rd.path} exists and is not a directory")
        if rd.run_json.exists():
            if not rd.has_measurements():
                rd._reset()
            else:
                old = rd.meta().get("identity", {})
                diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
                if diff:
                    details = ", ".join(f"{IDENTITY_LABELS.get(k, k)}: {old.get(k)!r} there, {identity.get(k)!r} now"
                                        for k in diff)
                    raise SweepError(f"{rd.path} holds a different run ({details}); resume it with the same "
                                     "sweep and model, or choose another --out")
                rd._clean_tmp()
                rd.check_parts()
                return rd, True
        elif rd.path.is_dir() and any(p.name != LOCK_NAME for p in rd.path.iterdir()):
            raise SweepError(f"--out {rd.path} is not empty and has no run.json; choose an empty or new directory")
        rd.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(rd.run_json, json.dumps({**meta, "identity": identity}, indent=2,
                                                   sort_keys=True, default=str).encode())
        return rd, False

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta()
        meta.update(fields)
        atomic_write_bytes(self.run_json, json.dumps(meta, indent=2, sort_keys=True, default=str).encode())

    def has_measurements(self) -> bool:
        """Whether any unit was measured or any configuration failed here."""
        return any(any((self.path / "parts" / t).glob("*.parquet")) for t in ("requests", "failures"))

    def _reset(self) -> None:
        """Forget a run that measured nothing: its run.json, stray parts and tables."""
        shutil.rmtree(self.path / "parts", ignore_errors=True)
        for name in ("run.json", *[f"{t}.parquet" for t in ALL_TABLES]):
            with _suppress():
                (self.path / name).unlink()

    def _clean_tmp(self) -> None:
        """Remove what a killed sweep left half-written: temporary files and Kineto folders."""
        for folder in ("parts", *[f"parts/{t}" for t in ALL_TABLES], "traces", "report"):
            inside(self.path / folder, self.path, SweepError)  # never delete or write through a link out
        for tmp in self.path.rglob(".*.tmp"):
            with _suppress():
                tmp.unlink()
        traces = self.path / "traces"
        if traces.is_dir():
            for tmp in traces.glob(".tmp-*"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)

    def check_parts(self) -> None:
        """Raise SweepError naming the first part file that cannot be read (corrupt or empty)."""
        folder = self.path / "parts"
        if not folder.is_dir():
            return
        for part in sorted(folder.glob("*/*.parquet")):
            regular_file(part, "a Parquet part (delete what is there)", SweepError)
            try:
                pl.read_parquet_schema(part)
            except Exception as exc:  # noqa: BLE001 - polars raises several kinds
                raise SweepError(_bad_part(part, exc)) from None

    # ---------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on RUN_DIR/.lock while a sweep writes into the directory.

        A second sweep into the same directory (in this or another process) gets a SweepError.

        Example:
            >>> import tempfile
            >>> rd = RunDir(tempfile.mkdtemp())
            >>> with rd.locked():
            ...     with rd.locked():
            ...         pass
            Traceback (most recent call last):
            ...
            molmo_latency.errors.SweepError: another sweep is writing into ...
        """
        fd = self._try_lock()
        if fd is None:
            raise SweepError(f"another sweep is writing into {self.path}; wait for it to finish, or "
                             "choose another --out")
        try:
            yield self
        finally:
            os.close(fd)  # closing the file releases the lock

    def _try_lock(self) -> int | None:
        """The descriptor of RUN_DIR/.lock, locked exclusively, or None if another holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise SweepError(f"--out {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

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

    def _from_parts(self, table: str) -> pl.DataFrame | None:
        files = sorted((self.path / "parts" / table).glob("*.parquet"))
        if not files:
            return None
        frame = pl.concat([check_part_name(f, read_part(f)) for f in files], how="diagonal_relaxed")
        for key in ("order", "start_ns", "t_ns"):
            if key in frame.columns:
                return frame.sort(key)
        return frame

    def consolidate(self, tables: tuple[str, ...] = ALL_TABLES) -> dict[str, int]:
        """Rebuild the top-level tables from the parts; returns row counts."""
        counts = {}
        for table in tables:
            frame = self._from_parts(table)
            if frame is None:
                continue
            atomic_write_parquet(frame, self.path / f"{table}.parquet")
            counts[table] = frame.height
        return counts

    def stale_tables(self) -> tuple[str, ...]:
        """Tables whose parts/ holds a part newer than the top-level file (or that file is missing)."""
        stale = []
        for table in ALL_TABLES:
            parts = list((self.path / "parts" / table).glob("*.parquet"))
            if not parts:
                continue
            top = self.path / f"{table}.parquet"
            try:
                top_ns = top.stat().st_mtime_ns
            except FileNotFoundError:
                stale.append(table)
                continue
            if any(p.stat().st_mtime_ns >= top_ns for p in parts):
                stale.append(table)
        return tuple(stale)

    def refresh(self) -> dict[str, int]:
        """Bring the top-level tables up to date with parts/ (after a killed sweep, or while one runs).

        Rebuilds only stale tables, and only when no sweep holds the lock (a running sweep
        consolidates by itself every ~30 s). Returns the row counts of what it rebuilt.

        Example:
            >>> import tempfile
            >>> RunDir(tempfile.mkdtemp()).refresh()
            {}
        """
        if not self.run_json.exists():
            return {}
        stale = self.stale_tables()
        if not stale:
            return {}
        try:
            fd = self._try_lock()
        except Exception as exc:  # read-only or full: table() reads the parts and writes nothing
            if not is_write_fault(exc, self.path):
                raise
            return {}
        if fd is None:
            return {}
        try:
            return self.consolidate(stale)
        except Exception as exc:  # noqa: BLE001 - the same: nothing written, nothing lost
            if not is_write_fault(exc, self.path):
                raise
            return {}
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------- reading
    def table(self, name: str) -> pl.DataFrame:
        """A top-level table; consolidated from parts/ first when parts are newer than it (or it
        is missing), so a killed or running sweep's data is there."""
        path = self.path / f"{name}.parquet"
        if self.run_json.exists() and name in self.stale_tables():
            self.refresh()
            if name in self.stale_tables():  # a sweep holds the lock: read the parts, write nothing
                frame = self._from_parts(name)
                if frame is not None:
                    return frame
        if not path.is_file():
            if not self.run_json.exists():
                raise SweepError(f"{self.path} is not a run directory (no run.json)")
            raise SweepError(f"{self.path} has no {name}.parquet (no measurement finished yet?)")
        try:
            return pl.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds
            raise SweepError(f"{path} cannot be read as Parquet: {exc}") from None
