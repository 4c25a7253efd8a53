"""Trace capture: which requests torch.profiler records, and what happens to each trace it writes.

A :class:`TraceCapture` is one value, checked once, that `profile_phases` builds from its
``torch_profiler=`` / ``trace_dir=`` arguments (:meth:`TraceCapture.from_args` takes the five
shapes ``torch_profiler`` accepts). A :class:`TraceRecorder` runs it around the requests of one
block: it starts torch.profiler, steps it after each request (the schedule counts requests, not
model steps) and, with its own handler, exports each finished trace as
``requests_<first>-<last>.pt.trace.json.gz`` into ``trace_dir``, lists it in ``traces`` and,
when NVML samples are given, writes them into it as counter tracks
(:func:`~molmo_latency.telemetry.counters.add_request_counter_tracks`).

Example:
    >>> import tempfile
    >>> capture = TraceCapture.from_args(trace_dir=tempfile.mkdtemp())
    >>> capture.schedule is None, capture.profile is None   # every request, our own profiler
    (True, True)
    >>> TraceCapture.from_args(None, None) is None            # nothing asked: no torch.profiler
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import polars as pl
from torch.profiler import ProfilerAction, ProfilerActivity, profile

from molmo_latency._quiet import quiet_kineto
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.telemetry.counters import add_request_counter_tracks

@dataclass(frozen=True)
class TraceCapture:
    """How torch.profiler records the requests of a `profile_phases` block.

    - ``schedule``: a ``torch.profiler.schedule(...)`` over requests; None records every request.
    - ``options``: further ``torch.profiler.profile`` arguments (they win over ours, including
      ``activities`` and ``on_trace_ready``).
    - ``trace_dir``: where our handler writes the traces (needed unless ``profile`` is given).
    - ``profile``: a ``torch.profiler.profile`` the caller started; it is only stepped after each
      request, and exports as the caller set it up.
    """

    trace_dir: Path | None = None
    schedule: Callable[[int], Any] | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    profile: Any = None

    @classmethod
    def from_args(cls, torch_profiler: Any = None,
                  trace_dir: str | os.PathLike | None = None) -> "TraceCapture | None":
        """The capture `profile_phases(torch_profiler=..., trace_dir=...)` asks for, or None.

        ``torch_profiler``: None (True when ``trace_dir`` is given), False, True, a schedule, a
        dict of ``torch.profiler.profile`` arguments, or a started profile object.
        """
        arg = torch_profiler if torch_profiler is not None else (True if trace_dir is not None else None)
        if arg is None or arg is False:
            return None
        if isinstance(arg, profile):
            return cls(profile=arg)
        if callable(arg):
            capture = cls(schedule=arg)
        elif isinstance(arg, Mapping):
            capture = cls(options=MappingProxyType(dict(arg)))
        elif arg is True:
            capture = cls()
        else:
            raise MolmoLatencyError(
                "torch_profiler must be True, a torch.profiler.schedule(...), a dict of "
                f"torch.profiler.profile arguments or a profile object, got {type(arg).__name__}"
            )
        if trace_dir is None:
            raise MolmoLatencyError("torch_profiler needs trace_dir=... to write its traces into")
        return cls(trace_dir=Path(trace_dir), schedule=capture.schedule, options=capture.options)


class TraceRecorder:
    """Runs a :class:`TraceCapture` around one block's requests (not thread-safe by itself: the
    profiler calls :meth:`request_started` and :meth:`step` under its request lock).

    ``traces`` receives ``{"path": str, "requests": [int]}`` per trace our handler exported."""

    def __init__(self, capture: TraceCapture, traces: list[dict[str, Any]]):
        self.capture, self.traces = capture, traces
        self._samples: Callable[[], pl.DataFrame] | None = None
        self._profile: Any = None
        self._requests: list[int] = []  # recorded since the last export
        self._starts_ns: dict[int, int] = {}

    def start(self, cuda: bool, samples: Callable[[], pl.DataFrame] | None = None) -> None:
        """Start torch.profiler (ours: CPU, plus CUDA activity for a model on a CUDA device).
        With ``samples`` (the NVML sampler's), each trace our handler exports gets the samples
        as counter tracks under its phases."""
        capture, self._samples = self.capture, samples
        if capture.profile is not None:
            self._profile = capture.profile
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        kwargs: dict[str, Any] = {"activities": activities}
        if capture.schedule is not None:
            kwargs["schedule"] = capture.schedule
        kwargs.update(capture.options)
        kwargs.setdefault("on_trace_ready", self._export)
        capture.trace_dir.mkdir(parents=True, exist_ok=True)
        self._profile = profile(**kwargs)
        with quiet_kineto():  # Kineto's C++ "USDT ... profiler_start" line, not our output
            self._profile.__enter__()

    def request_started(self, index: int, start_ns: int) -> None:
        """Note a request that starts now, if torch.profiler records it."""
        if self._profile is not None and _recording(self._profile):
            self._requests.append(index)
            self._starts_ns[index] = start_ns

    def step(self) -> None:
        """After each request: one step of the schedule (which may export a trace)."""
        if self._profile is not None:
            with quiet_kineto():  # a schedule starts/stops Kineto here; its C++ lines are dropped
                self._profile.step()

    def stop(self) -> None:
        """Stop our torch.profiler (a caller's own profile object is left running)."""
        tprof, self._profile = self._profile, None
        if tprof is not None and self.capture.profile is None:
            with quiet_kineto():
                tprof.__exit__(None, None, None)

    def _export(self, tprof: Any) -> None:
        requests, self._requests = self._requests, []
        name = f"requests_{requests[0]}-{requests[-1]}" if requests else f"trace_{len(self.traces)}"
        path = self.capture.trace_dir / f"{name}.pt.trace.json.gz"
        tprof.export_chrome_trace(str(path))
        self.traces.append({"path": str(path), "requests": requests})
        starts = [self._starts_ns.pop(r) for r in requests if r in self._starts_ns]
        if self._samples is not None and starts:
            add_request_counter_tracks(path, self._samples(), request=requests[0], request_start_ns=starts[0])


def _recording(tprof: Any) -> bool:
    action = getattr(tprof, "current_action", ProfilerAction.RECORD)
    return action in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)
