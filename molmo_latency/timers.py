"""Timers: how a point in time is marked inside generate() and resolved after it.

A timer is a policy passed to the profiler (like torch.profiler's `schedule`): `mark()` is called
in the hot path and must be cheap and never synchronise; `resolve(marks)` runs once per request,
after generate() returned, and turns the marks into int64 nanoseconds on the host
`perf_counter_ns` clock.

- :class:`PerfCounterTimer`: CPU execution; a mark is ``time.perf_counter_ns()``.
- :class:`CudaEventTimer`: GPU execution; a mark records a CUDA event on the current stream
  (taken from a shared free list) and notes the host clock. Resolution waits for the events once,
  then places every event at ``anchor + elapsed_time(first, event)``, where the anchor is the
  host clock when the request's first event was recorded. Differences between marks are GPU-side
  durations; the absolute position is the host time of the request start (queueing delay before
  the first GPU work is not included).

Marks belong to their request (the caller holds them), so requests running at the same time in
several threads never share or re-record an event; :meth:`release` hands a resolved request's
events back for reuse.

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
    def release(self, marks: Sequence[Any]) -> None: ...


class PerfCounterTimer:
    """Host clock marks, for models that run on the CPU."""

    kind = "perf_counter"

    def begin(self) -> None:
        pass

    def mark(self) -> int:
        return time.perf_counter_ns()

    def resolve(self, marks: Sequence[int]) -> list[int]:
        return list(marks)

    def release(self, marks: Sequence[int]) -> None:
        pass


class CudaEventTimer:
    """CUDA events on the current stream; no synchronisation until :meth:`resolve`.

    A mark is ``(event, host_ns)``: the event and the host clock when it was recorded. Events come
    from a free list shared by all requests (``list.pop``/``list.extend`` are atomic under the
    GIL), so concurrent requests in several threads each hold their own events.
    """

    kind = "cuda_event"

    def __init__(self, device: torch.device | int | None = None, pool_size: int = 256):
        if device is None:
            index = torch.cuda.current_device()
        elif isinstance(device, int):
            index = device
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self._free: list[torch.cuda.Event] = [torch.cuda.Event(enable_timing=True)
                                               for _ in range(pool_size)]
        self.created = pool_size  # events created so far (the free list grows on demand)

    def begin(self) -> None:
        """Kept for the Timer protocol: marks are per request, nothing to reset."""

    def mark(self) -> tuple[torch.cuda.Event, int]:
        try:
            event = self._free.pop()
        except IndexError:
            event = torch.cuda.Event(enable_timing=True)
            self.created += 1
        host_ns = time.perf_counter_ns()
        # the current stream of the model's device (not of whatever device is current)
        event.record(torch.cuda.current_stream(self.device))
        return event, host_ns

    def resolve(self, marks: Sequence[tuple[torch.cuda.Event, int]]) -> list[int]:
        """Wait for the marks (once, after the request), then place them on the host clock.

        Times accumulate the float64 sum of consecutive ``elapsed_time`` gaps, so a long request
        keeps sub-microsecond steps (one float32 offset from the first event would lose them).
        """
        if not marks:
            return []
        for event, _host in marks:
            event.synchronize()
        anchor = marks[0][1]
        out = [anchor]
        total_ms = 0.0
        for (previous, _), (event, _) in zip(marks, marks[1:]):
            total_ms += float(previous.elapsed_time(event))
            out.append(anchor + round(total_ms * 1e6))
        return out

    def release(self, marks: Sequence[tuple[torch.cuda.Event, int]]) -> None:
        """Give a resolved request's events back to the free list."""
        self._free.extend(event for event, _host in marks)


def timer_for(model: torch.nn.Module) -> Timer:
    """CUDA events when the model's parameters are on a CUDA device, else the host clock."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return CudaEventTimer(param.device)
    return PerfCounterTimer()
