"""What a `profile_phases` block collected, held as plain data: the :class:`Session`.

The profiler hands one out (``prof.session()``, or ``prof.pop_session()`` for the requests
since the last pop); the tables are built from it by
:func:`molmo_latency.records.session_report`, which is all ``prof.report()`` does.

Example:
    >>> from molmo_latency import profile_phases
    >>> from molmo_latency.models import reference_vlm
    >>> ref = reference_vlm("tiny")
    >>> with profile_phases(ref.model) as prof:
    ...     _ = ref.model.generate(**ref.request(crops=1, new_tokens=3))
    >>> s = prof.session()
    >>> len(s.records), s.timer_kind, s.samples, s.traces
    (1, 'perf_counter', None, [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from molmo_latency.records import RequestRecord


@dataclass
class Session:
    """Finished requests, telemetry samples and trace files of one profiled block.

    - ``records``: one :class:`~molmo_latency.records.RequestRecord` per finished generate(),
      in request order;
    - ``timer_kind``: the timer policy that timed them (``"cuda_event"``, ``"perf_counter"``);
    - ``samples``: the NVML samples held (None: telemetry off or unavailable);
    - ``traces``: ``{"path": str, "requests": [int]}`` per Kineto trace written;
    - ``new_samples``: for a popped session, the samples not handed out before (the report's
      ``telemetry`` table); None: all of ``samples``.
    """

    records: list[RequestRecord]
    timer_kind: str
    samples: pl.DataFrame | None = None
    traces: list[dict[str, Any]] = field(default_factory=list)
    new_samples: pl.DataFrame | None = None
