"""An independent reading of Nsight Systems exports in plain SQL, for the nsys tests.

Nothing here imports the reader: names, counts, durations, per-device busy time and the
innermost-NVTX-range attribution are computed by SQLite from the raw tables, as the nsys README
(/work/shared/traces/nsys/README.md) describes them.
"""

from __future__ import annotations

import gzip
import shutil
import sqlite3
from pathlib import Path

SHARED = Path("/work/shared/traces/nsys")
EXPORTS = ("nvfuser_cross_entropy_h200", "fsdp_2gpu_h100_window", "torch_zeros_sum_no_nvtx")


def gunzip(src: Path, directory: Path) -> Path:
    out = directory / src.name.removesuffix(".gz")
    if not out.exists():
        with gzip.open(src, "rb") as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)
    return out


def tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def activities_sql(db: sqlite3.Connection) -> str:
    """Every GPU activity: (aid, name, device, start, end, corr, gpid), names built like Kineto's."""
    have = tables(db)
    parts = []
    if "CUPTI_ACTIVITY_KIND_KERNEL" in have:
        parts.append(
            "SELECT 'k' || k.rowid AS aid, s.value AS name, k.deviceId AS device, k.start, k.end, "
            "k.correlationId AS corr, k.globalPid AS gpid FROM CUPTI_ACTIVITY_KIND_KERNEL k "
            "JOIN StringIds s ON s.id = k.demangledName"
        )
    if "CUPTI_ACTIVITY_KIND_MEMCPY" in have:
        # "Host-to-Device" -> "HtoD"; memory kinds by their nsys labels.
        parts.append(
            "SELECT 'c' || m.rowid, 'Memcpy ' || substr(o.label, 1, 1) || 'to' || "
            "substr(o.label, instr(o.label, '-to-') + 4, 1) || ' (' || sk.label || ' -> ' || dk.label || ')', "
            "m.deviceId, m.start, m.end, m.correlationId, m.globalPid FROM CUPTI_ACTIVITY_KIND_MEMCPY m "
            "JOIN ENUM_CUDA_MEMCPY_OPER o ON o.id = m.copyKind JOIN ENUM_CUDA_MEM_KIND sk ON sk.id = m.srcKind "
            "JOIN ENUM_CUDA_MEM_KIND dk ON dk.id = m.dstKind"
        )
    if "CUPTI_ACTIVITY_KIND_MEMSET" in have:
        parts.append(
            "SELECT 's' || m.rowid, 'Memset (' || k.label || ')', m.deviceId, m.start, m.end, m.correlationId, "
            "m.globalPid FROM CUPTI_ACTIVITY_KIND_MEMSET m JOIN ENUM_CUDA_MEM_KIND k ON k.id = m.memKind"
        )
    return " UNION ALL ".join(parts)


def kernels(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """name -> (count, total ns) over every GPU activity."""
    rows = db.execute(f"SELECT name, count(*), sum(end - start) FROM ({activities_sql(db)}) GROUP BY name")
    return {name: (n, total) for name, n, total in rows}


def devices(db: sqlite3.Connection) -> dict[int, tuple[int, int, int, int]]:
    """device -> (activities, summed ns, busy ns (union of intervals), span ns), in SQL window functions."""
    rows = db.execute(
        f"""
        WITH a AS ({activities_sql(db)}),
        o AS (SELECT device, start, end,
                     MAX(end) OVER (PARTITION BY device ORDER BY start, end
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before FROM a)
        SELECT device, count(*), sum(end - start),
               sum(MAX(0, end - MAX(start, COALESCE(before, start)))), max(end) - min(start)
        FROM o GROUP BY device
        """
    )
    return {d: (n, total, busy, span) for d, n, total, busy, span in rows}


def ranges_sql(db: sqlite3.Connection) -> str:
    text = "COALESCE(n.text, s.value)" if "textId" in {r[1] for r in db.execute("PRAGMA table_info(NVTX_EVENTS)")} \
        else "n.text"
    join = "LEFT JOIN StringIds s ON s.id = n.textId" if text.startswith("COALESCE") else ""
    return (f"SELECT n.rowid AS rid, {text} AS name, n.start, n.end, n.globalTid AS gtid FROM NVTX_EVENTS n {join} "
            "WHERE n.eventType IN (59, 60, 70, 71) AND n.end IS NOT NULL")


def launches_sql(db: sqlite3.Connection) -> str:
    """Each activity with its launching runtime call of the same process: (globalPid, correlationId)."""
    return (
        f"SELECT a.aid, a.name, a.start, a.end, r.globalTid AS gtid, r.start AS rs, r.end AS re "
        f"FROM ({activities_sql(db)}) a JOIN CUPTI_ACTIVITY_KIND_RUNTIME r "
        "ON r.correlationId = a.corr AND (r.globalTid >> 24) = (a.gpid >> 24)"
    )


def unlinked(db: sqlite3.Connection) -> int:
    total = db.execute(f"SELECT count(*) FROM ({activities_sql(db)})").fetchone()[0]
    linked = db.execute(f"SELECT count(DISTINCT aid) FROM ({launches_sql(db)})").fetchone()[0]
    return total - linked


def attribution(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Range name -> (activities, summed ns) charged to it: the innermost NVTX range (latest start,
    then earliest end, then first row) on the launching call's thread containing the call."""
    if "NVTX_EVENTS" not in tables(db):
        return {}
    rows = db.execute(
        f"""
        WITH l AS ({launches_sql(db)}), g AS ({ranges_sql(db)}),
        c AS (SELECT l.aid, l.end - l.start AS dur, g.name,
                     ROW_NUMBER() OVER (PARTITION BY l.aid ORDER BY g.start DESC, g.end ASC, g.rid ASC) AS rn
              FROM l JOIN g ON g.gtid = l.gtid AND g.start <= l.rs AND l.re <= g.end)
        SELECT name, count(*), sum(dur) FROM c WHERE rn = 1 GROUP BY name
        """
    )
    return {name: (n, total) for name, n, total in rows}


def range_instances(db: sqlite3.Connection) -> dict[str, int]:
    if "NVTX_EVENTS" not in tables(db):
        return {}
    return dict(db.execute(f"SELECT name, count(*) FROM ({ranges_sql(db)}) GROUP BY name").fetchall())
