"""Named ranges for external tools: NVTX (Nsight Systems) and `record_function` (Kineto).

NVTX ranges go to the domain ``molmo_latency`` with registered names (``request``, ``vision``,
``projector``, ``prefill``, ``decode``) and the request or step index as the integer payload.
The `nvtx` package turns them into no-ops (~0.1 us) when no tool is attached.

`record_function` ranges are named ``request[N]``, ``vision``, ``projector``, ``prefill`` and
``decode[N]`` (N: request index, decode step). They cost ~5 us each, so they are only opened
while a torch profiler is recording (checked per range, ~0.1 us).

With ``detail="modules"`` the module ranges nest inside the phases: ``module/attention[B]``,
``module/mlp[B]``, ``module/moe_router[B]``, ``module/moe_experts[B]``, ``module/norm[B]``,
``module/vision_block[B]`` (B: the decoder block or vision layer), ``module/projector``,
``module/lm_head`` (NVTX: message ``module/KIND``, payload B or -1). Phase attribution reads only
the phase names, so a kernel inside a module range still counts for its phase; module
attribution (:func:`molmo_latency.trace.attribution.module_gpu_table`) reads these.

Example:
    >>> r = RangeEmitter(nvtx=True)
    >>> r.push("decode", 3); r.pop()
"""

from __future__ import annotations

import threading

import torch

NVTX_DOMAIN = "molmo_latency"
MODULE_RANGE_PREFIX = "module/"


def record_function_name(phase: str, step: int) -> str:
    """The Kineto annotation name of a phase instance: `decode[3]`, `request[0]`, `prefill`;
    of a module range: `module/attention[2]` (block 2), `module/lm_head` (no block: -1)."""
    if phase.startswith(MODULE_RANGE_PREFIX):
        return f"{phase}[{step}]" if step >= 0 else phase
    return f"{phase}[{step}]" if phase in ("decode", "request") else phase


class RangeEmitter:
    """Opens and closes matching NVTX and record_function ranges, one stack per thread (NVTX
    push/pop ranges are per thread too), so requests in several threads never close each
    other's ranges."""

    def __init__(self, nvtx: bool = True):
        self._domain = None
        self._attrs: dict[tuple[str, int], object] = {}
        if nvtx:
            import nvtx as _nvtx

            self._domain = _nvtx.get_domain(NVTX_DOMAIN)
            self._names = {}
        self._local = threading.local()
        self._profiler_enabled = torch.autograd._profiler_enabled

    @property
    def _stack(self) -> list[object | None]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _nvtx_attributes(self, phase: str, step: int):
        key = (phase, step)
        attrs = self._attrs.get(key)
        if attrs is None and self._domain is not None:
            name = self._names.get(phase)
            if name is None:
                name = self._names[phase] = self._domain.get_registered_string(phase)
            attrs = self._domain.get_event_attributes(message=name, payload=step)
            self._attrs[key] = attrs
        return attrs

    def push(self, phase: str, step: int) -> None:
        if self._domain is not None:
            self._domain.push_range(self._nvtx_attributes(phase, step))
        rf = None
        if self._profiler_enabled():
            rf = torch.autograd.profiler.record_function(record_function_name(phase, step))
            rf.__enter__()
        self._stack.append(rf)

    def pop(self) -> None:
        stack = self._stack
        if not stack:
            return
        rf = stack.pop()
        if rf is not None:
            rf.__exit__(None, None, None)
        if self._domain is not None:
            self._domain.pop_range()

    def pop_all(self) -> int:
        """Close every range this thread has open (after an exception); returns how many."""
        stack = self._stack
        n = len(stack)
        while stack:
            self.pop()
        return n
