"""A tiny synthetic Kineto trace (newer layout) for docstring examples and smoke tests.

It has the shape of a trace written while ``profile_phases`` recorded one request on a GPU:
``request[0]`` around ``vision``, ``projector``, ``prefill``, ``decode[0]`` and ``decode[1]``,
each launching kernels (``cudaLaunchKernel`` -> ``kernel`` joined on ``correlation``), one
memcpy, and one kernel launched outside every annotation. Times are fractional microseconds
relative to ``baseTimeNanoseconds``, as PyTorch >= 2.4 writes them.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

BASE_TIME_NS = 1_700_000_000_000_000_000
_PID = _TID = 4242

# (name, ts_us, dur_us) CPU user annotations on the launching thread.
_ANNOTATIONS = [
    ("request[0]", 1000.0, 200.0),
    ("vision", 1001.0, 20.0),
    ("projector", 1022.0, 8.0),
    ("prefill", 1031.0, 60.0),
    ("decode[0]", 1095.0, 30.0),
    ("decode[1]", 1130.0, 30.0),
]
# (correlation, runtime name, runtime ts, runtime dur, gpu cat, gpu name, gpu ts, gpu dur)
_LAUNCHES = [
    (1, "cudaLaunchKernel", 1001.5, 3.0, "kernel", "vision_patch_embed_gemm", 1002.5, 8.25),
    (2, "cudaLaunchKernel", 1006.0, 2.5, "kernel", "flash_fwd_kernel", 1011.0, 6.0),
    (3, "cudaLaunchKernel", 1023.0, 2.0, "kernel", "projector_gemm", 1025.0, 4.125),
    (4, "cudaMemcpyAsync", 1032.0, 2.0, "gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 1033.0, 1.5),
    (5, "cudaLaunchKernel", 1036.0, 2.0, "kernel", "rms_norm_kernel", 1038.0, 3.0),
    (6, "cudaLaunchKernel", 1039.0, 2.0, "kernel", "flash_fwd_kernel", 1042.0, 10.0),
    (7, "cudaLaunchKernel", 1096.0, 2.0, "kernel", "gemv_kernel", 1099.0, 4.0),
    (8, "cudaLaunchKernel", 1131.0, 2.0, "kernel", "fused_moe_kernel", 1134.0, 5.5),
    (9, "cudaLaunchKernel", 1250.0, 2.0, "kernel", "elementwise_kernel", 1252.0, 1.0),
]


def demo_trace_dict() -> dict:
    """The demo trace as a Python dict (JSON-ready).

    Example:
        >>> doc = demo_trace_dict()
        >>> doc["baseTimeNanoseconds"], len(doc["traceEvents"])
        (1700000000000000000, 45)
    """
    events: list[dict] = [
        {"name": "process_name", "ph": "M", "ts": 999.0, "pid": _PID, "tid": 0, "args": {"name": "python3"}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": _PID, "tid": _TID,
         "ts": 1001.2, "dur": 5.0, "args": {"External id": 10, "Ev Idx": 0}},
    ]
    for name, ts, dur in _ANNOTATIONS:
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": _PID, "tid": _TID,
                       "ts": ts, "dur": dur, "args": {"External id": 1, "Ev Idx": 1}})
    for corr, rname, rts, rdur, cat, gname, gts, gdur in _LAUNCHES:
        events.append({"ph": "X", "cat": "cuda_runtime", "name": rname, "pid": _PID, "tid": _TID,
                       "ts": rts, "dur": rdur, "args": {"External id": corr, "cbid": 211, "correlation": corr}})
        gargs = {"External id": corr, "device": 0, "context": 1, "stream": 7, "correlation": corr}
        if cat == "kernel":
            gargs.update({"grid": [128, 1, 1], "block": [256, 1, 1]})
        events.append({"ph": "X", "cat": cat, "name": gname, "pid": 0, "tid": 7, "ts": gts,
                       "dur": gdur, "args": gargs})
        events.append({"ph": "s", "id": corr, "pid": _PID, "tid": _TID, "ts": rts, "cat": "ac2g", "name": "ac2g"})
        events.append({"ph": "f", "id": corr, "pid": 0, "tid": 7, "ts": gts, "cat": "ac2g", "name": "ac2g", "bp": "e"})
    events.append({"ph": "X", "cat": "gpu_user_annotation", "name": "prefill", "pid": 0, "tid": 7,
                   "ts": 1033.0, "dur": 19.0, "args": {"External id": 1}})
    return {
        "schemaVersion": 1,
        "deviceProperties": [{"id": 0, "name": "Demo GPU", "totalGlobalMem": 80 * 2**30}],
        "traceEvents": events,
        "traceName": "demo.pt.trace.json",
        "displayTimeUnit": "ms",
        "baseTimeNanoseconds": BASE_TIME_NS,
    }


def write_demo_trace(directory: str | os.PathLike) -> Path:
    """Write the demo trace as ``demo.pt.trace.json.gz`` into `directory`; returns its path.

    Example:
        >>> import tempfile
        >>> write_demo_trace(tempfile.mkdtemp()).name
        'demo.pt.trace.json.gz'
    """
    path = Path(directory) / "demo.pt.trace.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(demo_trace_dict(), f)
    return path
