"""Waiting in tests for what a background thread does (the NVML sampler's ticks, its failure):
a busy machine may hold the thread back for a while, so a test waits for the condition it checks
instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout_s: float = 30.0, poll_s: float = 0.002) -> bool:
    """Poll `condition` until it is true or `timeout_s` passed; whether it is true at the end."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll_s)
    return bool(condition())
