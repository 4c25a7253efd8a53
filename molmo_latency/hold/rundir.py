"""The run directory: what a sweep holds on disk, written so that nothing is lost.

Each measured (configuration, repeat) is written as its own Parquet parts under ``parts/``
(phases and telemetry first, the request row last), each atomically (temporary file, then
rename). A unit is done when its request part exists, so a sweep killed at any moment and
started again skips exactly the done units. The consolidated tables (``requests.parquet``,
``phases.parquet``, ``telemetry.parquet``, ``failures.parquet``) are brought up to date with
the parts, also atomically, every ~30 s of a sweep, at its end, and whenever :meth:`RunDir.table`
finds parts newer than a table; each takes in only the parts new since the last time (listed in
``parts/<table>.consolidated.parquet``), so consolidating grows with what is new, not with the run.

``run.json`` fixes the sweep and the model; a different sweep or model into the same directory
is refused. A sweep holds an exclusive lock on ``RUN_DIR/.lock`` while it writes
(:meth:`RunDir.locked`), so a second sweep into the same directory is refused.
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

TABLES = ("requests", "phases", "telemetry", "modules")
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


# Tables consolidated incrementally; each keeps a manifest of the parts it holds.
INCREMENTAL = TABLES
MANIFEST_SUFFIX = ".consolidated.parquet"
MANIFEST_SCHEMA = {"part": pl.String, "inode": pl.UInt64, "size_bytes": pl.Int64, "mtime_ns": pl.Int64, "rows": pl.Int64}


def _file_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _in_table_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows by measurement order (requests), start (phases) or sample time (telemetry), ties by
    configuration and repeat; a table with none of these keeps its order."""
    for key in ("order", "start_ns", "t_ns"):
        if key in frame.columns:
            by = [key, *[c for c in ("config_id", "repeat") if c in frame.columns]]
            return frame.sort(by, maintain_order=True)
    return frame


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


class RunDir:
    """A sweep's run directory. `RunDir.create_or_resume(path, identity)` checks run.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # table -> (file key, frame, manifest) of the last consolidation by this object, so that the
        # next one need not read the table back
        self._cache: dict[str, tuple[tuple[int, int, int], pl.DataFrame, pl.DataFrame]] = {}

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
        for table in ("phases", "telemetry", "modules"):
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
        return _in_table_order(pl.concat([check_part_name(f, read_part(f)) for f in files], how="diagonal_relaxed"))

    def _manifest_path(self, table: str) -> Path:
        return self.path / "parts" / f"{table}{MANIFEST_SUFFIX}"

    def _part_stats(self, table: str) -> dict[str, tuple[int, int, int]]:
        """Part file name -> (inode, size_bytes, mtime_ns) of every part of `table` (a part
        written again is a new file: atomic writes rename a new inode into place)."""
        try:
            entries = os.scandir(self.path / "parts" / table)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        with entries:
            stats = {}
            for entry in entries:
                if entry.name.endswith(".parquet"):
                    st = entry.stat()
                    stats[entry.name] = (entry.inode(), st.st_size, st.st_mtime_ns)
            return stats

    def _consolidated_so_far(self, table: str, parts: dict[str, tuple[int, int, int]]):
        """(table, manifest) as the last consolidation left them, or None when they cannot be
        trusted: either missing or unreadable, their row counts disagree (a consolidation killed
        between writing the table and its manifest), or a part in the manifest changed or is gone."""
        top, manifest_path = self.path / f"{table}.parquet", self._manifest_path(table)
        try:
            key = _file_key(top)
            cached = self._cache.get(table)
            if cached is not None and cached[0] == key:
                frame, manifest = cached[1], cached[2]
            else:
                frame, manifest = pl.read_parquet(top), pl.read_parquet(manifest_path)
        except Exception:  # noqa: BLE001 - missing, or written by a version without manifests: rebuild
            return None
        if frame.height != manifest["rows"].sum():
            return None
        for name, *stat in manifest.select("part", "inode", "size_bytes", "mtime_ns").iter_rows():
            if parts.get(name) != tuple(stat):
                return None
        return frame, manifest

    def _consolidate_one(self, table: str) -> int | None:
        """Bring `table` up to date with its parts: the consolidated table plus only the parts not
        in it yet (listed in ``parts/<table>.consolidated.parquet``), or rebuilt from every part
        when there is nothing to trust. Returns its row count (None: no parts)."""
        parts = self._part_stats(table)
        if not parts:
            return None
        folder = self.path / "parts" / table
        so_far = None if table not in INCREMENTAL else self._consolidated_so_far(table, parts)
        if so_far is None:
            frame, manifest, new = None, None, sorted(parts)
        else:
            frame, manifest = so_far
            known = set(manifest["part"].to_list())
            new = sorted(n for n in parts if n not in known)
        top = self.path / f"{table}.parquet"
        if not new:
            os.utime(top)  # up to date: newer than every part again (see stale_tables)
            self._cache[table] = (_file_key(top), frame, manifest)
            return frame.height
        frames = [check_part_name(folder / name, read_part(folder / name)) for name in new]
        added = pl.DataFrame({"part": new, "inode": [parts[n][0] for n in new],
                              "size_bytes": [parts[n][1] for n in new], "mtime_ns": [parts[n][2] for n in new],
                              "rows": [f.height for f in frames]},
                             schema=MANIFEST_SCHEMA)
        frame = _in_table_order(pl.concat(frames if frame is None else [frame, *frames], how="diagonal_relaxed"))
        manifest = added if manifest is None else pl.concat([manifest, added])
        atomic_write_parquet(frame, top)  # the table first: a kill before the manifest is caught by the row count
        if table in INCREMENTAL:
            atomic_write_parquet(manifest, self._manifest_path(table))
            self._cache[table] = (_file_key(top), frame, manifest)
        return frame.height

    def consolidate(self, tables: tuple[str, ...] = ALL_TABLES) -> dict[str, int]:
        """Bring the top-level tables up to date with the parts; returns row counts.

        Each table takes in only the parts that are new since the last consolidation (so its cost
        grows with what is new, plus one read and one write of the table), and is rebuilt from
        every part when its manifest cannot be trusted. The failures table (one part per failed
        configuration) is always rebuilt."""
        counts = {}
        for table in tables:
            rows = self._consolidate_one(table)
            if rows is not None:
                counts[table] = rows
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
