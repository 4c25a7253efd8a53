"""A tiny synthetic Nsight Systems SQLite export for docstring examples and tests.

It holds the same program as the Kineto demo (:mod:`molmo_latency.trace._demo`), as nsys would
export a capture of ``profile_phases``: our ranges are NVTX push/pop ranges in the
``molmo_latency`` domain with registered names (``textId``) and the request or step index as an
int64 payload; launches are ``CUPTI_ACTIVITY_KIND_RUNTIME`` rows (``cudaLaunchKernel_v7000``)
joined to kernels and memcpy on ``correlationId``. Times are ns from the session start, and
``TARGET_INFO_SESSION_START_TIME.utcEpochNs`` equals the Kineto demo's ``baseTimeNanoseconds``,
so both read into the same nanoseconds. The tables carry the columns real exports have (nsys
2025.1, schema 3.17), not all of them. No real capture of our ranges was available: this file is
built to the nsys schema, not recorded.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from molmo_latency.trace._demo import _ANNOTATIONS, _LAUNCHES, _PID, _TID, BASE_TIME_NS

DOMAIN_ID = 1
_HW = 1 << 48  # the bits above the process id in a real globalTid

SCHEMA = """
CREATE TABLE StringIds (id INTEGER NOT NULL PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE META_DATA_EXPORT (name TEXT NOT NULL, value TEXT);
CREATE TABLE TARGET_INFO_SESSION_START_TIME (utcEpochNs INTEGER, utcTime TEXT, localTime TEXT);
CREATE TABLE TARGET_INFO_GPU (vmId INTEGER NOT NULL, id INTEGER NOT NULL, name TEXT, cuDevice INTEGER);
CREATE TABLE ENUM_CUDA_MEMCPY_OPER (id INTEGER NOT NULL PRIMARY KEY, name TEXT, label TEXT);
CREATE TABLE ENUM_CUDA_MEM_KIND (id INTEGER NOT NULL PRIMARY KEY, name TEXT, label TEXT);
CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (
    start INTEGER NOT NULL, end INTEGER NOT NULL, eventClass INTEGER NOT NULL, globalTid INTEGER,
    correlationId INTEGER, nameId INTEGER NOT NULL, returnValue INTEGER NOT NULL, callchainId INTEGER);
CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (
    start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL, contextId INTEGER NOT NULL,
    greenContextId INTEGER, streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER,
    demangledName INTEGER NOT NULL, shortName INTEGER NOT NULL, mangledName INTEGER, launchType INTEGER,
    cacheConfig INTEGER, registersPerThread INTEGER NOT NULL, gridX INTEGER NOT NULL, gridY INTEGER NOT NULL,
    gridZ INTEGER NOT NULL, blockX INTEGER NOT NULL, blockY INTEGER NOT NULL, blockZ INTEGER NOT NULL,
    staticSharedMemory INTEGER NOT NULL, dynamicSharedMemory INTEGER NOT NULL,
    localMemoryPerThread INTEGER NOT NULL, localMemoryTotal INTEGER NOT NULL, gridId INTEGER NOT NULL,
    sharedMemoryExecuted INTEGER, graphNodeId INTEGER, sharedMemoryLimitConfig INTEGER);
CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (
    start INTEGER NOT NULL, end INTEGER NOT NULL, deviceId INTEGER NOT NULL, contextId INTEGER NOT NULL,
    greenContextId INTEGER, streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER,
    bytes INTEGER NOT NULL, copyKind INTEGER NOT NULL, deprecatedSrcId INTEGER, srcKind INTEGER,
    dstKind INTEGER, srcDeviceId INTEGER, srcContextId INTEGER, dstDeviceId INTEGER, dstContextId INTEGER,
    migrationCause INTEGER, graphNodeId INTEGER, virtualAddress INTEGER);
CREATE TABLE NVTX_EVENTS (
    start INTEGER NOT NULL, end INTEGER, eventType INTEGER NOT NULL, rangeId INTEGER, category INTEGER,
    color INTEGER, text TEXT, globalTid INTEGER, endGlobalTid INTEGER, textId INTEGER, domainId INTEGER,
    uint64Value INTEGER, int64Value INTEGER, doubleValue REAL, uint32Value INTEGER, int32Value INTEGER,
    floatValue REAL, jsonTextId INTEGER, jsonText TEXT, binaryData TEXT);
"""


def global_tid(pid: int, tid: int) -> int:
    """nsys' serialized globalTid of an OS process and thread (``globalPid``: tid 0).

    Example:
        >>> global_tid(111, 0)
        281476838981632
    """
    return _HW | (pid << 24) | tid


def _ns(us: float) -> int:
    return round(us * 1000)


def write_demo_export(directory: str | os.PathLike, name: str = "demo.sqlite") -> Path:
    """Write the demo export into `directory` (replacing one of the same name); returns its path.

    Example:
        >>> import sqlite3, tempfile
        >>> path = write_demo_export(tempfile.mkdtemp())
        >>> sqlite3.connect(path).execute("select count(*) from CUPTI_ACTIVITY_KIND_KERNEL").fetchone()
        (8,)
    """
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
        fill_demo(db)
        db.commit()
    finally:
        db.close()
    return path


def fill_demo(db: sqlite3.Connection, pid: int = _PID, tid: int = _TID, shift_ns: int = 0,
              strings_from: int = 1, metadata: bool = True) -> None:
    """Insert the demo program's rows for process `pid` / thread `tid`, `shift_ns` later (so tests
    can add a second process with the same correlation ids; ``metadata=False`` for the second).

    Example:
        >>> db = sqlite3.connect(":memory:")
        >>> db.executescript(SCHEMA) and None
        >>> fill_demo(db); fill_demo(db, pid=5151, tid=5152, shift_ns=10**6, metadata=False)
        >>> db.execute("select count(distinct globalTid) from CUPTI_ACTIVITY_KIND_RUNTIME").fetchone()
        (2,)
    """
    strings: dict[str, int] = {}

    def sid(value: str) -> int:
        if value not in strings:
            row = db.execute("SELECT id FROM StringIds WHERE value = ?", (value,)).fetchone()
            if row is None:
                new = max(strings_from, (db.execute("SELECT max(id) FROM StringIds").fetchone()[0] or 0) + 1)
                db.execute("INSERT INTO StringIds VALUES (?, ?)", (new, value))
                row = (new,)
            strings[value] = row[0]
        return strings[value]

    if metadata:
        db.executemany("INSERT INTO META_DATA_EXPORT VALUES (?, ?)", [
            ("EXPORT_PRODUCT_NAME", "NVIDIA Nsight Systems"), ("EXPORT_PRODUCT_VERSION", "2025.1.1.110"),
            ("EXPORT_SCHEMA_VERSION", "3.17.1"), ("EXPORT_PARAM_INPUT_FILE", "demo.nsys-rep"),
        ])
        db.execute("INSERT INTO TARGET_INFO_SESSION_START_TIME VALUES (?, ?, ?)",
                   (BASE_TIME_NS, "2023-11-14T22:13:20", "2023-11-14T22:13:20"))
        db.execute("INSERT INTO TARGET_INFO_GPU VALUES (0, 0, 'Demo GPU', 0)")
        db.executemany("INSERT INTO ENUM_CUDA_MEMCPY_OPER VALUES (?, ?, ?)", [
            (0, "CUDA_MEMCPY_KIND_UNKNOWN", "Unknown"), (1, "CUDA_MEMCPY_KIND_HTOD", "Host-to-Device"),
            (2, "CUDA_MEMCPY_KIND_DTOH", "Device-to-Host"), (8, "CUDA_MEMCPY_KIND_DTOD", "Device-to-Device"),
        ])
        db.executemany("INSERT INTO ENUM_CUDA_MEM_KIND VALUES (?, ?, ?)", [
            (0, "CUDA_MEMOPR_MEMORY_KIND_PAGEABLE", "Pageable"), (1, "CUDA_MEMOPR_MEMORY_KIND_PINNED", "Pinned"),
            (2, "CUDA_MEMOPR_MEMORY_KIND_DEVICE", "Device"),
        ])
    # nvtxDomainCreateA("molmo_latency"): an NvtxDomainCreate event names the domain id in this process.
    db.execute("INSERT INTO NVTX_EVENTS (start, eventType, text, globalTid, domainId) VALUES (?, 75, ?, ?, ?)",
               (_ns(900.0) + shift_ns, "molmo_latency", global_tid(pid, tid), DOMAIN_ID))
    thread = global_tid(pid, tid)
    for name, ts, dur in _ANNOTATIONS:
        phase, _, index = name.partition("[")
        step = int(index.rstrip("]")) if index else 0
        db.execute(
            "INSERT INTO NVTX_EVENTS (start, end, eventType, globalTid, textId, domainId, int64Value) "
            "VALUES (?, ?, 59, ?, ?, ?, ?)",
            (_ns(ts) + shift_ns, _ns(ts + dur) + shift_ns, thread, sid(phase), DOMAIN_ID, step),
        )
    # A range of the default domain (inline text) and a mark, as other libraries write them.
    db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid, domainId) VALUES (?, ?, 59, ?, ?, 0)",
               (_ns(1031.5) + shift_ns, _ns(1060.0) + shift_ns, "user range", thread))
    db.execute("INSERT INTO NVTX_EVENTS (start, eventType, text, globalTid, domainId) VALUES (?, 34, ?, ?, 0)",
               (_ns(1032.0) + shift_ns, "a mark", thread))
    for corr, rname, rts, rdur, cat, gname, gts, gdur in _LAUNCHES:
        api = {"cudaLaunchKernel": "cudaLaunchKernel_v7000", "cudaMemcpyAsync": "cudaMemcpyAsync_v3020"}[rname]
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, 0, ?, ?, ?, 0, NULL)",
                   (_ns(rts) + shift_ns, _ns(rts + rdur) + shift_ns, thread, corr, sid(api)))
        start, end = _ns(gts) + shift_ns, _ns(gts + gdur) + shift_ns
        if cat == "kernel":
            name_id = sid(gname)
            db.execute(
                "INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL (start, end, deviceId, contextId, streamId, correlationId, "
                "globalPid, demangledName, shortName, registersPerThread, gridX, gridY, gridZ, blockX, blockY, "
                "blockZ, staticSharedMemory, dynamicSharedMemory, localMemoryPerThread, localMemoryTotal, gridId) "
                "VALUES (?, ?, 0, 1, 7, ?, ?, ?, ?, 32, 128, 1, 1, 256, 1, 1, 0, 0, 0, 0, ?)",
                (start, end, corr, global_tid(pid, 0), name_id, name_id, corr),
            )
        else:
            db.execute(
                "INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY (start, end, deviceId, contextId, streamId, correlationId, "
                "globalPid, bytes, copyKind, srcKind, dstKind) VALUES (?, ?, 0, 1, 7, ?, ?, 4096, 1, 0, 2)",
                (start, end, corr, global_tid(pid, 0)),
            )
