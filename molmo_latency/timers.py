"""Timers: how a point in time is marked inside generate() and resolved after it.

A timer is a policy passed to the profiler (like torch.profiler's `schedule`): `mark()` is called
in the hot path and must be cheap and never synchronise; `resolve(marks)` runs once per request,
after generate() returned, and turns the marks into int64 nanoseconds on the host
`perf_counter_ns` clock.

- :class:`PerfCounterTimer`: CPU execution; a mark is ``time.perf_counter_ns()``.
- :class:`CudaEventTimer`: GPU execution; a mark records a CUDA event on the current stream
  (reused from a pool). Resolution waits for the last event once, then places every event at
  ``anchor + elapsed_time(first, event)``, where the anchor is the host clock when the first
  event was recorded. Differences between marks are GPU-side durations; the absolute position is
  the host time of the request start (queueing delay before the first GPU work is not included).

Example:
    >>> t = PerfCounterTimer()
    >>> a = t.mark(); b = t.mark()
    >>> ns = t.resolve([a, b]); ns[1] >= ns[0]
    True
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

import torch


class Timer(Protocol):
    kind: str

    def begin(self) -> None: ...
    def mark(self) -> Any: ...
    def resolve(self, marks: Sequence[Any]) -> list[int]: ...


class PerfCounterTimer:
    """Host clock marks, for models that run on the CPU."""

    kind = "perf_counter"

    def begin(self) -> None:
        pass

    def mark(self) -> int:
        return time.perf_counter_ns()

    def resolve(self, marks: Sequence[int]) -> list[int]:
        return list(marks)


class CudaEventTimer:
    """CUDA events on the current stream; no synchronisation until :meth:`resolve`."""

    kind = "cuda_event"

    def __init__(self, device: torch.device | int | None = None, pool_size: int = 256):
        if device is None:
            index = torch.cuda.current_device()
        elif isinstance(device, int):
            index = device
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._pool: list[torch.cuda.Event] = []
        self._next = 0
        self._anchor_ns = 0
        self._grow(pool_size)

    def _grow(self, n: int) -> None:
        self._pool.extend(torch.cuda.Event(enable_timing=True) for _ in range(n))

    def begin(self) -> None:
        self._next = 0

    def mark(self) -> torch.cuda.Event:
        if self._next == len(self._pool):
            self._grow(len(self._pool))
        event = self._pool[self._next]
        self._next += 1
        if self._next == 1:
            self._anchor_ns = time.perf_counter_ns()
        # the current stream of the model's device (not of whatever device is current)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def resolve(self, marks: Sequence[torch.cuda.Event]) -> list[int]:
        """Wait for the marks (once, after the request), then place them on the host clock.

        Times accumulate the float64 sum of consecutive ``elapsed_time`` gaps, so a long request
        keeps sub-microsecond steps (one float32 offset from the first event would lose them).
        """
        if not marks:
            return []
        for event in marks:
            event.synchronize()
        out = [self._anchor_ns]
        total_ms = 0.0
        for previous, event in zip(marks, marks[1:]):
            total_ms += float(previous.elapsed_time(event))
            out.append(self._anchor_ns + round(total_ms * 1e6))
        return out


def timer_for(model: torch.nn.Module) -> Timer:
    """CUDA events when the model's parameters are on a CUDA device, else the host clock."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return CudaEventTimer(param.device)
    return PerfCounterTimer()
