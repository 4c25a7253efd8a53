"""A content-addressed Parquet cache of the tables read from a trace (hold): the second
``trace summary``, ``diff`` or attribution of the same trace reads typed columns instead of
parsing JSON or SQL again.

One entry per (trace content, table set, reader version):

- the key is the SHA-256 of the trace file's bytes (as stored: a ``.json.gz`` is hashed
  compressed), the table set's name (``"kineto"``, ``"nsys"``) and the reader's version (a hash
  of the reader's own source files, :func:`reader_version`, so a changed reader never trusts an
  older entry). SHA-256 runs on the CPU's SHA extensions here: about 0.5-1 s of one core per GB
  of trace (1-2 GB/s), outside the GIL; on a first read it runs in a thread beside the parse.
  A trace whose size, mtime, ctime, inode and device are those recorded when it was hashed
  (and that had not been written in the 2 s before: the "racy" rule git uses) is not hashed
  again; any write changes its ctime, so the recorded digest is then recomputed;
- the entry is a folder of one Parquet file per table plus ``manifest.json`` (rows, size and
  CRC-32 of every file), in ``.molmo-latency-cache/`` beside the trace, or in the folder named
  by ``cache_dir`` (``--cache-dir``; the environment variable ``MOLMO_LATENCY_CACHE_DIR``);
- it is written whole into a temporary folder, then renamed into place (atomic): a reader never
  sees half an entry. A folder that cannot be written (read-only) is not written: the trace is
  read without the cache and one line on stderr says so, once per folder;
- an entry whose manifest or files do not check out (truncated, bit flips, a missing table, a
  schema that is not the one recorded) is never trusted: it is rebuilt from the trace;
- entries for older contents of the same trace file name (and older reader versions) are
  removed when a new one is written, so the cache holds one entry per trace and table set.

``enabled=False`` (``--no-cache``; ``MOLMO_LATENCY_NO_CACHE=1``) reads and writes nothing.

Example:
    >>> import tempfile
    >>> import polars as pl
    >>> from pathlib import Path
    >>> trace = Path(tempfile.mkdtemp()) / "t.json"
    >>> _ = trace.write_text('{"traceEvents": []}')
    >>> calls = []
    >>> def build():
    ...     calls.append(1)
    ...     return {"gpu": pl.DataFrame({"dur_ns": [5, 7]})}
    >>> first = cached_tables(trace, "demo", build, version="1")
    >>> again = cached_tables(trace, "demo", build, version="1")
    >>> again["gpu"]["dur_ns"].to_list(), len(calls), first.status, again.status
    ([5, 7], 1, 'written', 'hit')
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat as stat_module
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_FOLDER",
    "NO_CACHE_ENV",
    "CachedTables",
    "cache_enabled",
    "cached_document",
    "cached_tables",
    "reader_version",
    "trace_digest",
]

#: The folder beside a trace that holds its cache entries.
CACHE_FOLDER = ".molmo-latency-cache"
#: Environment variable naming a cache folder (instead of the one beside each trace).
CACHE_DIR_ENV = "MOLMO_LATENCY_CACHE_DIR"
#: Environment variable that turns the cache off when set to 1 / true / yes / on.
NO_CACHE_ENV = "MOLMO_LATENCY_NO_CACHE"

_MANIFEST = "manifest.json"
_FORMAT = 1  # layout of an entry (bump when the manifest or the file naming changes)
#: Bytes the hashing thread reads and hashes per step. Each step takes the GIL twice (the read and
#: the hash release it while they work), and each time the parsing thread, which holds it, must hand
#: it over: with hashlib's 256 KiB steps a 2 GB trace's first read lost ~1.7 s of parsing to those
#: hand-overs; with 16 MiB steps there are 128 per GB.
_HASH_CHUNK = 16 << 20
_RACY_NS = 2 * 10**9  # a file written this close to its hashing is hashed again next time
_noted: set[str] = set()


class CachedTables(dict):
    """The tables (name -> polars frame) and how the cache served them: ``status`` is
    ``"hit"`` (read from the cache), ``"written"`` (read from the trace, then cached),
    ``"rebuilt"`` (the entry was corrupt: read from the trace and cached again), ``"off"``
    (cache disabled) or ``"unwritable"`` (read from the trace; the cache folder cannot be
    written); ``entry`` is the entry's folder (None when off)."""

    status: str = "off"
    entry: Path | None = None


def cache_enabled(enabled: bool | None = None) -> bool:
    """`enabled` when given, else False when :data:`NO_CACHE_ENV` is set to a true value.

    Example:
        >>> cache_enabled(False), cache_enabled(True)
        (False, True)
    """
    if enabled is not None:
        return enabled
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def reader_version(*modules: str) -> str:
    """A short hash of the source files of `modules` (dotted names) and of the cache format:
    any change to a reader's code gives a new version, so older entries are never trusted.

    Example:
        >>> len(reader_version("molmo_latency.trace.reader"))
        16
    """
    import importlib.util

    digest = hashlib.sha256(f"format {_FORMAT}".encode())
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        try:
            digest.update(Path(origin).read_bytes() if origin else name.encode())
        except OSError:  # no source (a frozen install): the package version stands for it
            from importlib.metadata import version

            digest.update(f"{name} {version('molmo-latency')}".encode())
    return digest.hexdigest()[:16]


def trace_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the bytes of the file at `path` (about 0.5-1 s per GB on one core).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "t.json"
        >>> _ = p.write_bytes(b"abc")
        >>> trace_digest(p)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _stat_record(path: Path) -> list[int] | None:
    """Size, mtime, ctime, inode and device of a regular file; None for anything else (missing,
    a folder, a FIFO or a device: never opened here, the reader says what is wrong)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat_module.S_ISREG(st.st_mode):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _cache_root(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or None
    return Path(cache_dir) if cache_dir is not None else path.parent / CACHE_FOLDER


def _note(key: str, message: str) -> None:
    """One line on stderr, once per `key` in this process."""
    if key in _noted:
        return
    _noted.add(key)
    print(f"molmo-latency: {message}", file=sys.stderr, flush=True)


def _writable(root: Path) -> bool:
    """Whether `root` exists (or can be made in its parent) and can be written. A folder whose
    mode lets nobody write (``chmod a-w``) counts as read-only even for root, who could."""

    def open_to_writes(folder: Path) -> bool:
        try:
            mode = folder.stat().st_mode
        except OSError:
            return False
        return bool(mode & 0o222) and os.access(folder, os.W_OK | os.X_OK)

    if not root.is_dir():
        existing = next((p for p in root.absolute().parents if p.exists()), None)
        if existing is None or not open_to_writes(existing):
            return False
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
    return open_to_writes(root)


def cached_tables(
    path: str | os.PathLike,
    name: str,
    build: Callable[[], dict],
    *,
    version: str,
    cache_dir: str | os.PathLike | None = None,
    enabled: bool | None = None,
    load: tuple[str, ...] | None = None,
) -> CachedTables:
    """The tables `build()` returns for the trace at `path` (name -> polars DataFrame), read
    from the cache when an entry for this content, `name` and `version` checks out; else built,
    then cached (atomically). See the module's docstring for the key, the folder and what is
    never trusted.

    `build` must be a pure function of the file's bytes (it is not called on a hit): anything it
    reports besides tables (warnings, metadata) must be in the tables it returns. Errors of
    `build` propagate and nothing is written. `enabled` None: on unless :data:`NO_CACHE_ENV`.

    `load`: on a hit, the tables decoded at once; every other table (when `load` is given) is a
    :class:`~molmo_latency.trace._deferred.DeferredFrame`, decoded from its file on first use,
    its ``height`` the manifest's. Every file of the entry is still checked (size, CRC-32) first.

    Example:
        >>> import tempfile, polars as pl
        >>> trace = Path(tempfile.mkdtemp()) / "t.json"
        >>> _ = trace.write_text("{}")
        >>> out = cached_tables(trace, "demo", lambda: {"t": pl.DataFrame({"a": [1]})}, version="1",
        ...                     enabled=False)
        >>> out.status, out["t"].height
        ('off', 1)
    """
    path = Path(path)
    if not cache_enabled(enabled):
        return _built(build, "off", None)
    root = _cache_root(path, cache_dir)
    stat = _stat_record(path)
    if stat is None:  # not a regular file: the reader says what is wrong
        return _built(build, "off", None)
    prefix = f"{path.name}.{name}."

    # 1. A recorded digest for this very file (same stat, not racy): no hashing at all.
    digest = _recorded_digest(root, prefix, stat)
    hasher: _Hasher | None = None
    if digest is None:
        hasher = _Hasher(path)
    status = "written"
    if digest is None and _has_entries(root, prefix):  # else nothing to look up: hash beside the parse
        digest = hasher.result()
    if digest is not None:
        entry = root / f"{prefix}{_key(digest, name, version)}"
        if entry.is_dir():
            tables = _read_entry(entry, digest, name, version, load)
            if tables is not None:
                out = CachedTables(tables)
                out.status, out.entry = "hit", entry
                if hasher is not None:
                    _refresh_stat(entry, stat, hasher.started_ns)
                return out
            status = "rebuilt"
            _note(str(entry), f"cache entry {entry} did not check out (corrupt or incomplete); rebuilding it "
                              f"from {path}")
    if not _writable(root):
        _note(str(root), f"{root} cannot be written; reading {path} without the cache (pass --cache-dir DIR "
                         "to keep one elsewhere, or --no-cache)")
        if hasher is not None:
            hasher.cancel()
        return _built(build, "unwritable", None)
    if hasher is None:  # the digest recorded for this stat, and when it was hashed
        hasher = _Hasher(path, digest, _recorded_at(root, prefix, digest))
    tables = build()  # the parse, while the hash runs in its thread (it releases the GIL)
    digest = hasher.result()
    if digest is None or stat != _stat_record(path):  # unreadable, or changed while read: not cached
        out = CachedTables(tables)
        out.status = "off"
        return out
    entry = root / f"{prefix}{_key(digest, name, version)}"
    try:
        _write_entry(root, entry, tables, digest, name, version, stat, hasher.started_ns)
    except Exception as exc:  # noqa: BLE001 - a full disk, a folder made read-only meanwhile: the tables stand
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        _note(str(root), f"could not write the cache entry {entry} ({reason}); continuing without it")
        out = CachedTables(tables)
        out.status = "unwritable"
        return out
    _prune(root, prefix, entry.name)
    out = CachedTables(tables)
    out.status, out.entry = status, entry
    return out


def cached_document(
    path: str | os.PathLike,
    name: str,
    key: str,
    build: Callable[[], str],
    *,
    version: str,
    cache_dir: str | os.PathLike | None = None,
    enabled: bool | None = None,
) -> tuple[str, str]:
    """``(text, status)``: a text `build()` computes from the trace at `path` (a command's whole
    output, such as ``trace summary --json`` of some parts: `key` says which, the path as given
    included), kept beside the tables of entry `name` and returned from there while the trace's
    content, `key` and `version` are the same, so a repeat command reads one small file and
    prints exactly what the first printed.

    The trace's content is the digest its table entry recorded for the file's current stat (size,
    mtime, ctime, inode, device, hashed well after its last write: see the module's docstring);
    with none recorded (the first read, a file just written, the cache off or unwritable) the
    text is built and, once `build()` has recorded one, kept. A kept text whose size or CRC-32 is
    not the one recorded is never trusted: it is built again. `status`: ``"hit"``, ``"written"``
    or ``"off"`` (built, not kept).

    Example:
        >>> import tempfile
        >>> trace = Path(tempfile.mkdtemp()) / "t.json"
        >>> _ = trace.write_text("{}")
        >>> calls = []
        >>> def build():
        ...     calls.append(1)
        ...     return "summary"
        >>> cached_document(trace, "demo", "all", build, version="1", enabled=False), len(calls)
        (('summary', 'off'), 1)
    """
    path = Path(path)
    if not cache_enabled(enabled):
        return build(), "off"
    root = _cache_root(path, cache_dir)
    stat = _stat_record(path)
    if stat is None:
        return build(), "off"
    tables_prefix, doc_prefix = f"{path.name}.{name}.", f"{path.name}.{name}-doc."

    def file_of(digest: str) -> Path:
        token = hashlib.sha256("\0".join((digest, key, version)).encode()).hexdigest()[:32]
        return root / f"{doc_prefix}{token}"

    digest = _recorded_digest(root, tables_prefix, stat)
    if digest is not None:
        text = _read_doc(file_of(digest), digest)
        if text is not None:
            return text, "hit"
    text = build()
    digest = _recorded_digest(root, tables_prefix, stat)
    if digest is None or stat != _stat_record(path) or not _writable(root):
        return text, "off"
    target = file_of(digest)
    body = text.encode()
    header = json.dumps({"digest": digest, "size": len(body), "crc32": zlib.crc32(body)}).encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-doc-", dir=root)
        with os.fdopen(fd, "wb") as f:
            f.write(header + b"\n" + body)
        os.chmod(tmp, 0o644)  # as the table entries' files (mkstemp makes it private)
        os.replace(tmp, target)
    except OSError:
        return text, "off"
    _prune_docs(root, doc_prefix, digest)
    return text, "written"


def _read_doc(file: Path, digest: str) -> str | None:
    """The text kept in `file` for `digest`, or None (missing, or not what its header says)."""
    try:
        raw = file.read_bytes()
    except OSError:
        return None
    head, sep, body = raw.partition(b"\n")
    try:
        info = json.loads(head) if sep else None
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("digest") != digest or info.get("size") != len(body) \
            or info.get("crc32") != zlib.crc32(body):
        return None
    try:
        return body.decode()
    except UnicodeDecodeError:
        return None


def _prune_docs(root: Path, prefix: str, digest: str) -> None:
    """Remove the kept texts of the same trace file name computed from other contents."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix)]
    except OSError:
        return
    for doc_name in names:
        try:
            with open(root / doc_name, "rb") as f:
                head = json.loads(f.readline())
        except (OSError, ValueError):
            head = None
        if not isinstance(head, dict) or head.get("digest") != digest:
            try:
                os.remove(root / doc_name)
            except OSError:
                pass


def _built(build: Callable[[], dict], status: str, entry: Path | None) -> CachedTables:
    out = CachedTables(build())
    out.status, out.entry = status, entry
    return out


def _key(digest: str, name: str, version: str) -> str:
    return hashlib.sha256(f"{digest}\0{name}\0{version}\0{_FORMAT}".encode()).hexdigest()[:32]


class _Hasher:
    """The trace's digest computed in a thread (hashlib releases the GIL on large buffers)."""

    def __init__(self, path: Path, known: str | None = None, hashed_at_ns: int = 0) -> None:
        self.value, self.error = known, None
        self.thread = None
        self.started_ns = hashed_at_ns or time.time_ns()
        if known is None:
            self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
            self.thread.start()

    def _run(self, path: Path) -> None:
        try:
            self.value = trace_digest(path)
        except OSError as exc:
            self.error = exc

    def result(self) -> str | None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        return self.value

    def cancel(self) -> None:  # nothing to stop: a daemon thread that ends with the file
        pass


def _load_manifest(entry: Path) -> dict | None:
    try:
        manifest = json.loads((entry / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _has_entries(root: Path, prefix: str) -> bool:
    try:
        return any(n.startswith(prefix) for n in os.listdir(root))
    except OSError:
        return False


def _recorded_digest(root: Path, prefix: str, stat: list[int]) -> str | None:
    """The digest an entry recorded for a file with exactly this stat, hashed well after it
    was last written; None when no entry qualifies."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix)]
    except OSError:
        return None
    for entry_name in names:
        manifest = _load_manifest(root / entry_name)
        if not manifest:
            continue
        seen = manifest.get("source_stat")
        hashed_at = manifest.get("hashed_at_ns")
        digest = manifest.get("digest")
        if seen != stat or not isinstance(hashed_at, int) or not isinstance(digest, str):
            continue
        mtime_ns, ctime_ns = stat[1], stat[2]
        if hashed_at - max(mtime_ns, ctime_ns) > _RACY_NS:
            return digest
    return None


def _recorded_at(root: Path, prefix: str, digest: str) -> int:
    """When the entry that recorded `digest` hashed the trace (0 when unknown)."""
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix)]
    except OSError:
        return 0
    for entry_name in names:
        manifest = _load_manifest(root / entry_name) or {}
        if manifest.get("digest") == digest and isinstance(manifest.get("hashed_at_ns"), int):
            return manifest["hashed_at_ns"]
    return 0


def _crc_file(file: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return crc, size


def _read_entry(entry: Path, digest: str, name: str, version: str, load: tuple[str, ...] | None = None) -> dict | None:
    """The tables of `entry` when its manifest and every file check out; else None. With `load`,
    the tables not in it are deferred (decoded on first use, checked again then)."""
    import polars as pl

    manifest = _load_manifest(entry)
    if (not manifest or manifest.get("format") != _FORMAT or manifest.get("digest") != digest
            or manifest.get("name") != name or manifest.get("version") != version
            or not isinstance(manifest.get("tables"), dict)):
        return None
    tables = {}
    for table, info in manifest["tables"].items():
        file = entry / f"{table}.parquet"
        try:
            if not isinstance(info, dict) or _crc_file(file) != (info.get("crc32"), info.get("bytes")):
                return None
            if load is not None and table not in load and isinstance(info.get("rows"), int):
                from molmo_latency.trace._deferred import DeferredFrame

                tables[table] = DeferredFrame(file, info["rows"], lambda frame, info=info: _mismatch(frame, info))
                continue
            frame = pl.read_parquet(file)
        except Exception:  # noqa: BLE001 - any failure to read a cache file: rebuild, never trust
            return None
        if _mismatch(frame, info) is not None:
            return None
        tables[table] = frame
    return tables


def _mismatch(frame, info: dict) -> str | None:
    """Why a table read from an entry is not the one its manifest records (rows, schema); None when it is."""
    if frame.height != info.get("rows"):
        return f"{frame.height} rows, the manifest says {info.get('rows')}"
    if [[c, str(t)] for c, t in frame.schema.items()] != info.get("schema"):
        return "its columns differ from the manifest's"
    return None


def _write_entry(root: Path, entry: Path, tables: dict, digest: str, name: str, version: str,
                 stat: list[int], hashed_at_ns: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        files = {}
        for table, frame in tables.items():
            file = tmp / f"{table}.parquet"
            frame.write_parquet(file, compression="lz4", statistics=False)
            crc, size = _crc_file(file)
            files[table] = {"rows": frame.height, "bytes": size, "crc32": crc,
                            "schema": [[c, str(t)] for c, t in frame.schema.items()]}
        manifest = {"format": _FORMAT, "digest": digest, "name": name, "version": version,
                    "source_stat": stat, "hashed_at_ns": hashed_at_ns, "tables": files}
        (tmp / _MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        mode = (tmp / _MANIFEST).stat().st_mode & 0o777  # the umask's file mode: readable alike
        os.chmod(tmp, mode | (mode & 0o444) >> 2 | 0o700)
        if entry.exists():  # a corrupt entry (or one a concurrent reader just wrote): replace it
            trash = Path(tempfile.mkdtemp(prefix=".old-", dir=root))
            os.rename(entry, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process put the same entry in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refresh_stat(entry: Path, stat: list[int], hashed_at_ns: int) -> None:
    """Record the stat of the trace (taken before it was hashed at `hashed_at_ns`) in a hit entry
    whose content it matched (a copy or a touched file), so the next read need not hash it; best
    effort, atomic."""
    manifest = _load_manifest(entry)
    if manifest is None or manifest.get("source_stat") == stat and manifest.get("hashed_at_ns", 0) >= hashed_at_ns:
        return
    manifest["source_stat"], manifest["hashed_at_ns"] = stat, hashed_at_ns
    try:
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=entry)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest))
        os.replace(tmp, entry / _MANIFEST)
    except OSError:
        pass


def _prune(root: Path, prefix: str, keep: str) -> None:
    """Remove the other entries of the same trace file name and table set (older contents or
    reader versions), and temporary folders older than a day (left by a killed process)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    now = time.time()
    for entry_name in names:
        target = root / entry_name
        if entry_name.startswith(prefix) and entry_name != keep:
            shutil.rmtree(target, ignore_errors=True)
        elif entry_name.startswith((".tmp-", ".old-")):
            try:
                if now - target.stat().st_mtime > 86400:
                    shutil.rmtree(target, ignore_errors=True)
            except OSError:
                pass
