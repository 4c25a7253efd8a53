"""`profile_phases`: every phase of every generate() call, on one timeline, in the same run.

Collection only. :class:`PhaseProfiler` is a small collector: forward hooks mark time with a
timer policy (CUDA events on GPU, perf_counter_ns on CPU) and open NVTX / record_function ranges;
the generate() wrapper brackets each request. Nothing synchronises inside generate(); each
request's marks are resolved once, after generate() returned. Its policies are values given once:

- the timer (:mod:`molmo_latency.timers`);
- NVML telemetry as one :class:`~molmo_latency.telemetry.NvmlSettings` (mode, interval, device),
  opened once on the GPU that :func:`~molmo_latency.telemetry.source.resolve_gpu` names by UUID;
- trace capture as one :class:`~molmo_latency.capture.TraceCapture` (a torch.profiler schedule
  over requests plus the handler that exports each trace and writes the NVML counter tracks).

A running generate() is a :class:`RunningRequest` (its LLM call an :class:`LlmCall`, its open
phases :class:`OpenPhase`); when it returns it becomes a
:class:`~molmo_latency.records.RequestRecord`. :meth:`PhaseProfiler.session` hands out a plain
:class:`~molmo_latency.session.Session` (records, samples, trace paths); the tables are built from
it by :func:`molmo_latency.records.session_report` (``prof.report()`` is that call), GPU time
joined from the traces there too. Nothing here reads a trace back.

Where the marks come from:

- Each LLM call generate() makes is a call of the model itself (``model(**inputs)``): hooks on
  the top-level module run in ``Module.__call__``, outside any compiled ``model.forward``, so a
  model compiled before or inside the block still gets every call. The call is classified from
  SHAPES only (no device sync): the sequence length it feeds, against the prompt length and the
  tokens fed so far. ``prefill`` until the prompt is in the cache (several calls = prefill
  chunks), then ``decode`` (one new token per row), ``recompute`` (a whole sequence again, no
  KV cache: ``use_cache=False``) or ``verify`` (several new tokens per row with a cache:
  assisted / prompt-lookup decoding).
- Inside a call, hooks on the vision, projector and LLM modules (found by an adapter) split it:
  the LLM span (decoder + LM head) takes the call's label. When the LLM hook did not fire during
  a call (it ran inside compiled code, which the profiler never traces into), the call is timed
  as its LLM phase instead (from the end of its image phases where those were timed) and the
  request names the region in ``unsplit_regions``.
- transformers compiles the model's whole ``__call__`` for its decode loop in some modes
  (static-cache auto-compile; chunked prefill on 4.5x), where even the model's own hooks run
  inside compiled code: the compiled callable that ``get_compiled_call`` hands out is wrapped, so
  those calls are marked from outside too.
- The hooks check ``torch.compiler.is_compiling()`` first and do nothing while Dynamo traces
  them, so they add no graph breaks to a compiled region.
- Requests are per thread: each thread has its own active request and range stack, each request
  its own marks; a nested call of an entry point (generate() inside generate_from_batch()) is
  part of the running request. Several profilers of one model share one wrapper per entry
  point, so they can be closed in any order and the model is restored exactly when the last one
  closes; a closed profiler records nothing.

Example:
    >>> from molmo_latency import profile_phases
    >>> from molmo_latency.models import reference_vlm
    >>> ref = reference_vlm("tiny")
    >>> with profile_phases(ref.model) as prof:
    ...     _ = ref.model.generate(**ref.request(crops=2, new_tokens=4))
    >>> r = prof.report().requests
    >>> r["decode_steps"].to_list(), r["valid"].to_list()
    ([3], [True])
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import polars as pl
import torch

from molmo_latency.adapters import PathSpec, PhaseMap, find_phases
from molmo_latency.capture import TraceCapture, TraceRecorder
from molmo_latency.conditions import RequestProbe
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.ranges import RangeEmitter
from molmo_latency.ranges import MODULE_RANGE_PREFIX
from molmo_latency.records import ModuleSpan, PhaseReport, RequestRecord, Span, session_report
from molmo_latency.session import Session
from molmo_latency.telemetry.policy import DEFAULT_INTERVAL_MS, NvmlSettings, stop_telemetry
from molmo_latency.telemetry.sampler import NvmlSampler
from molmo_latency.telemetry.source import open_telemetry
from molmo_latency.timers import Timer, timer_for


ENTRY_POINTS = ("generate", "generate_from_batch")
#: How much a profile_phases block records: "phases" (default: hooks on the phase modules only)
#: or "modules" (also each block's attention, MLP / MoE router and experts, norms, the vision
#: layers, the projector and the LM head: see :mod:`molmo_latency.modules`).
DETAILS = ("phases", "modules")
_DISPATCH_ATTR = "_molmo_latency_dispatch"

try:  # torch >= 2.3
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # pragma: no cover - older torch
    def _is_compiling() -> bool:
        return False


class _Dispatch:
    """The one wrapper of a model's entry point shared by every open profiler of that model.

    Each open profiler is a layer around the original method, outermost = entered first. Closing
    a profiler removes its layer; the last one out puts the original back (or removes the
    instance attribute it never had), whatever the order the profilers were closed in."""

    def __init__(self, model: torch.nn.Module, name: str, layer: str = "_request"):
        self.model, self.name, self.layer = model, name, layer
        self.own = name in vars(model)
        self.original = getattr(model, name)
        self.profilers: list[PhaseProfiler] = []
        dispatch = self

        @functools.wraps(self.original)
        def entry(*args: Any, **kwargs: Any) -> Any:
            layers = list(dispatch.profilers)

            def run(i: int) -> Any:
                if i == len(layers):
                    return dispatch.original(*args, **kwargs)
                return getattr(layers[i], dispatch.layer)(lambda: run(i + 1), args, kwargs)

            return run(0)

        setattr(entry, _DISPATCH_ATTR, self)
        self.entry = entry

    @classmethod
    def join(cls, model: torch.nn.Module, name: str, profiler: "PhaseProfiler",
             layer: str = "_request") -> "_Dispatch":
        current = vars(model).get(name)
        dispatch = getattr(current, _DISPATCH_ATTR, None) if current is not None else None
        if dispatch is None or dispatch.model is not model:
            dispatch = cls(model, name, layer)
            setattr(model, name, dispatch.entry)
        dispatch.profilers.append(profiler)
        return dispatch

    def leave(self, profiler: "PhaseProfiler") -> None:
        if profiler in self.profilers:
            self.profilers.remove(profiler)
        if self.profilers or vars(self.model).get(self.name) is not self.entry:
            return  # others still profile (or someone wrapped over us: ours passes through)
        if self.own:
            setattr(self.model, self.name, self.original)
        else:
            delattr(self.model, self.name)


@dataclass(slots=True)
class LlmCall:
    """The LLM call (a call of the model itself) running in a request: its label, where it
    started, and what the hooks inside it saw."""

    kind: str  # prefill | decode | recompute | verify (see _classify)
    step: int
    start_mark: int
    range_pushed: bool = False  # its range is opened at the call (the LLM hook is not firing)
    llm_seen: bool = False  # the LLM phase hook fired inside it
    image_end_mark: int | None = None  # where its last vision/projector phase ended


class OpenModule(NamedTuple):
    """A module (detail="modules") whose pre-hook fired and whose forward hook has not yet."""

    kind: str
    block: int
    start_mark: int


class OpenPhase(NamedTuple):
    """A phase whose start hook fired and whose end hook has not yet."""

    phase: str
    step: int
    start_mark: int
    hook: str  # the hook's phase name ("llm" for an LLM phase)


@dataclass
class RunningRequest:
    """The scratch state of one running generate(): timer marks and what the hooks saw so far.
    It becomes a :class:`~molmo_latency.records.RequestRecord` when generate() returns."""

    index: int
    thread_id: int | None = None
    wall_start_ns: int = 0
    marks: list[Any] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    open: list[OpenPhase] = field(default_factory=list)
    call: LlmCall | None = None
    occurrences: dict[str, int] = field(default_factory=dict)  # vision/projector phases so far
    llm_calls: int = 0  # LLM phase hooks so far
    anomalies: list[str] = field(default_factory=list)
    unsplit: set[str] = field(default_factory=set)
    # read by _classify, from the shapes each LLM call feeds
    input_tokens: int | None = None
    kind_counts: dict[str, int] = field(default_factory=dict)  # LLM calls per kind so far
    fed: int = 0  # prompt tokens fed to the LLM so far (prefill chunks)
    llm_first_positions: int | None = None  # sequence length at the LLM phase's first start (positional)
    decode_rows: list[int] = field(default_factory=list)  # rows fed by each decode step
    # from the call's arguments; input_ids and image_input_idx are held and counted only after
    # generate() returned (no device sync before)
    batch_size: int | None = None
    input_ids: Any = None
    image_input_idx: Any = None  # Molmo's image positions
    num_beams: int | None = None
    eos_token_id: Any = None
    probe: RequestProbe | None = None  # the conditions the request runs under
    warm: bool = True  # False: the first request of its model in this process
    # what the request's row says about the model as it runs (see _model_facts)
    projector_inside_vision: bool | None = None
    blocks_run: int | None = None
    returned_prefix_tokens: int | None = None
    # detail="modules": the module spans so far and the modules open now
    module_spans: list[ModuleSpan] = field(default_factory=list)
    module_open: list[OpenModule] = field(default_factory=list)
    top_k: int | None = None  # the MoE top-k when the request began (FLOPs of the modules table)


# Models that finished a request in this process: the first request of a model is measured cold
# (lazy initialisation, empty caches) and says so (``warm`` False; `report` leaves it out).
_WARM_MODELS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


class PhaseProfiler:
    """The collector of one `profile_phases` block: hooks and entry-point wrappers that turn each
    generate() into a :class:`~molmo_latency.records.RequestRecord`, under the policies it is
    given (timer, NVML settings, trace capture). :meth:`session` hands out what it holds."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        nvtx: bool = True,
        trace: TraceCapture | None = None,
        phases: Mapping[str, PathSpec] | None = None,
        timer: Timer | None = None,
        nvml: NvmlSettings = NvmlSettings(),
        entry_points: tuple[str, ...] | list[str] = ENTRY_POINTS,
        detail: str = "phases",
    ):
        if detail not in DETAILS:
            raise MolmoLatencyError(f"detail={detail!r} is not known; use one of {', '.join(DETAILS)}")
        refused = generate_refusal(model, entry_points)
        if refused is not None:
            raise MolmoLatencyError(refused)
        self.model = model
        self.detail = detail
        self.phase_map: PhaseMap = find_phases(model, phases)
        # detail="modules": every site found (and checked) before any hook goes on
        self.sites = _checked_sites(model, self.phase_map) if detail == "modules" else []
        self.text_shape = _text_shape(model) if detail == "modules" else None
        self.timer: Timer = timer if timer is not None else timer_for(model)
        self.ranges = RangeEmitter(nvtx=nvtx)
        self.nvml = nvml
        self.entry_points = tuple(entry_points)
        self.records: list[RequestRecord] = []  # finished requests, in request order
        self.traces: list[dict[str, Any]] = []  # {"path": str, "requests": [int]}
        self._trace = TraceRecorder(trace, self.traces) if trace is not None else None
        self._sampler: NvmlSampler | None = None
        self._undo = contextlib.ExitStack()  # hooks, wrappers, sampler, torch.profiler
        self._lock = threading.Lock()
        self._local = threading.local()  # .active: this thread's running request
        self._requests_seen = 0
        self._popped_until_ns: int | None = None
        self._orphan_hooks = 0
        self._entered = False
        self._closed = False
        self._unsplit_seen = False  # a call ran with no inner hook: ranges go on calls from now

    @property
    def _active(self) -> RunningRequest | None:
        """The request running in the calling thread (None outside generate())."""
        return getattr(self._local, "active", None)

    @_active.setter
    def _active(self, req: RunningRequest | None) -> None:
        self._local.active = req

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "PhaseProfiler":
        if self._entered:
            raise MolmoLatencyError("a profile_phases block cannot be entered twice")
        self._entered = True
        try:
            self._install_hooks()
            self._wrap_generate()
            self._sampler = open_telemetry(self.nvml, self.model)
            if self._sampler is not None:  # "required": stopping raises if the sampler failed
                self._undo.callback(stop_telemetry, self._sampler, self.nvml.mode)
            if self._trace is not None:
                cuda = torch.cuda.is_available() and next(self.model.parameters()).is_cuda
                self._trace.start(cuda, samples=self._sampler.samples if self._sampler is not None else None)
                self._undo.callback(self._trace.stop)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        """Leave the model exactly as it was: hooks off, generate restored, ranges closed."""
        self._closed = True
        self.ranges.pop_all()
        self._active = None
        self._undo.close()  # in reverse: torch.profiler, sampler, wrappers, hooks
        if self._orphan_hooks and not self._requests_seen:
            warnings.warn(
                f"{self._orphan_hooks} phase hooks fired outside any profiled request: the model was "
                f"run through an entry point other than {', '.join(self.entry_points)}; pass it with "
                "profile_phases(model, entry_points=[...])", stacklevel=3)
            self._orphan_hooks = 0

    # ---------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        undo = self._undo.callback  # each hook is removed on close, even if a later one fails
        undo(self.model.register_forward_pre_hook(self._on_call_start, with_kwargs=True).remove)
        undo(self.model.register_forward_hook(self._on_call_end).remove)
        for name, span in self.phase_map.spans.items():
            on_start, on_end = self._on_start, self._on_end
            undo(span.start.register_forward_pre_hook(lambda _m, _a, _name=name: on_start(_name, _a)).remove)
            undo(span.end.register_forward_hook(lambda _m, _a, _o, _name=name: on_end(_name)).remove)
        on_module_start, on_module_end = self._on_module_start, self._on_module_end
        for site in self.sites:
            kind, block = MODULE_RANGE_PREFIX + site.kind, -1 if site.block is None else site.block
            undo(site.module.register_forward_pre_hook(
                lambda _m, _a, _k=kind, _b=block: on_module_start(_k, _b)).remove)
            # prepended: a module that is also a phase's end (the LM head, the projector) closes
            # its module range before the phase's end hook closes the phase range
            undo(site.module.register_forward_hook(
                lambda _m, _a, _o, _k=kind, _b=block: on_module_end(_k, _b), prepend=True).remove)

    def _on_call_start(self, module: Any, args: tuple, kwargs: dict) -> None:
        """One LLM call of generate(): classified from the shapes it feeds, then marked."""
        if _is_compiling():  # traced by Dynamo: add nothing to the graph
            return None
        req = self._active
        if req is None or self._closed:
            return None
        kind, step = _classify(req, args, kwargs)
        pushed = self._unsplit_seen
        if pushed:
            self.ranges.push(kind, step)
        req.call = LlmCall(kind, step, len(req.marks), pushed)  # positional: the hot path
        req.marks.append(self.timer.mark())
        return None

    def _on_call_end(self, module: Any, args: tuple, output: Any) -> None:
        if _is_compiling():
            return None
        req = self._active
        if req is None or self._closed or req.call is None:
            return None
        call, req.call = req.call, None
        end_mark = len(req.marks)
        req.marks.append(self.timer.mark())
        if call.range_pushed:
            self.ranges.pop()
        if not call.llm_seen:  # the LLM ran where no hook fires (compiled): time the call instead
            region = f"{type(self.model).__name__}.forward"
            if call.image_end_mark is None:
                req.spans.append(Span(call.kind, call.step, call.start_mark, end_mark))
                req.unsplit.add(region)
            else:  # vision/projector were timed: the LLM phase is the rest of the call
                req.spans.append(Span(call.kind, call.step, call.image_end_mark, end_mark))
                req.unsplit.add(f"{region} (LLM part, timed from the end of the image phases)")
            self._unsplit_seen = True
        return None

    def _on_start(self, name: str, args: tuple = ()) -> None:
        if _is_compiling():
            return
        req = self._active
        if req is None or self._closed:
            self._orphan_hooks += not self._closed
            return
        if name == "llm":
            if req.call is not None:
                phase, step = req.call.kind, req.call.step
                req.call.llm_seen = True
            else:  # an LLM forward outside a call of the model itself: count-based labels
                phase = "prefill" if req.llm_calls == 0 else "decode"
                step = 0 if req.llm_calls == 0 else req.llm_calls - 1
            if req.llm_calls == 0:  # the positions the text model's first pass sees (a shape, no sync)
                req.llm_first_positions = _call_shape(args, {})[0]
            req.llm_calls += 1
        else:
            phase = name
            step = req.occurrences.get(name, 0)
            req.occurrences[name] = step + 1
        if req.open:
            req.anomalies.append(f"{phase} started while {req.open[-1].phase} was open (nested phases)")
        self.ranges.push(phase, step)
        req.open.append(OpenPhase(phase, step, len(req.marks), name))
        req.marks.append(self.timer.mark())

    def _on_end(self, name: str) -> None:
        if _is_compiling():
            return
        req = self._active
        if req is None or self._closed:
            return
        for i in range(len(req.open) - 1, -1, -1):
            if req.open[i].hook == name:
                break
        else:
            req.anomalies.append(f"{name} ended without a start")
            return
        end_mark = len(req.marks)
        req.marks.append(self.timer.mark())
        opened = req.open.pop(i)
        self.ranges.pop()
        req.spans.append(Span(opened.phase, opened.step, opened.start_mark, end_mark))
        if name != "llm" and req.call is not None:
            req.call.image_end_mark = end_mark

    def _on_module_start(self, kind: str, block: int) -> None:
        """detail="modules": a module site starts (kind carries the range prefix)."""
        if _is_compiling():
            return
        req = self._active
        if req is None or self._closed:
            return
        self.ranges.push(kind, block)
        req.module_open.append(OpenModule(kind, block, len(req.marks)))
        req.marks.append(self.timer.mark())

    def _on_module_end(self, kind: str, block: int) -> None:
        if _is_compiling():
            return
        req = self._active
        if req is None or self._closed:
            return
        if not req.module_open or req.module_open[-1][:2] != (kind, block):
            req.anomalies.append(f"{kind}[{block}] ended without a start")
            return
        opened = req.module_open.pop()
        end_mark = len(req.marks)
        req.marks.append(self.timer.mark())
        self.ranges.pop()
        req.module_spans.append(ModuleSpan(kind[len(MODULE_RANGE_PREFIX):], opened.block, opened.start_mark,
                                           end_mark))

    # ------------------------------------------------------------------------- generate
    def _wrap_generate(self) -> None:
        """Wrap each generation entry point (generate, and Molmo's generate_from_batch, which
        calls ``super().generate`` and so bypasses an instance-level wrapper of generate)."""
        found = [n for n in self.entry_points if callable(getattr(self.model, n, None))]
        if not found:
            raise MolmoLatencyError(
                f"{type(self.model).__name__} has none of the entry points {list(self.entry_points)}; "
                "pass the method that generates with profile_phases(model, entry_points=[...])")
        layers = [(name, "_request") for name in found]
        if callable(getattr(self.model, "get_compiled_call", None)):
            # transformers compiles the model's whole __call__ for its decode loop (static cache
            # auto-compile, chunked prefill on 4.5x): the hooks then run inside compiled code,
            # so the compiled callable it hands out is timed from outside instead
            layers.append(("get_compiled_call", "_compiled_call_layer"))
        for name, layer in layers:
            self._undo.callback(_Dispatch.join(self.model, name, self, layer=layer).leave, self)

    def _compiled_call_layer(self, inner: Any, args: tuple, kwargs: dict) -> Any:
        """Wrap the compiled model call that ``get_compiled_call`` returns, so that each call is
        marked at its boundary (outside the compiled code) like a hooked call."""
        compiled = inner()
        if getattr(compiled, "_molmo_latency_profiler", None) is self:
            return compiled
        profiler = self

        @functools.wraps(compiled)
        def timed_call(*call_args: Any, **call_kwargs: Any) -> Any:
            profiler._on_call_start(None, call_args, call_kwargs)
            out = compiled(*call_args, **call_kwargs)
            profiler._on_call_end(None, call_args, out)
            return out

        timed_call._molmo_latency_profiler = self
        return timed_call

    def _request(self, inner: Any, args: tuple, kwargs: dict) -> Any:
        """Run one entry-point call (`inner`) as a request of this profiler."""
        if self._closed or self._active is not None:  # e.g. generate() inside generate_from_batch()
            return inner()
        req = self._begin(args, kwargs)
        try:
            out = inner()
        except BaseException as exc:
            self._finish(req, None, exc)
            raise
        self._finish(req, out, None)
        return out

    def _begin(self, args: tuple, kwargs: dict) -> RunningRequest:
        ids = _input_ids(args, kwargs)
        with self._lock:
            req = RunningRequest(index=self._requests_seen)
            self._requests_seen += 1
        req.thread_id = threading.get_ident()
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            req.batch_size, req.input_tokens = int(ids.shape[0]), int(ids.shape[1])
            req.input_ids = ids  # image tokens are counted after generate(): no sync before it
        req.image_input_idx = _image_input_idx(args, kwargs)
        _model_facts(req, self.model, self.phase_map)
        beams = _generation_setting(self.model, args, kwargs, "num_beams")
        req.num_beams = int(beams) if isinstance(beams, int) else 1  # unset: generate()'s default, 1
        req.eos_token_id = _generation_setting(self.model, args, kwargs, "eos_token_id")
        req.warm = self.model in _WARM_MODELS
        if self.sites:
            req.top_k = _current_top_k(self.model)
        req.probe = RequestProbe.start(torch.get_num_threads())
        self.timer.begin()
        req.wall_start_ns = time.perf_counter_ns()
        if self._trace is not None:
            with self._lock:
                self._trace.request_started(req.index, req.wall_start_ns)
        self.ranges.push("request", req.index)
        req.marks.append(self.timer.mark())
        self._active = req
        return req

    def _finish(self, req: RunningRequest, out: Any, exc: BaseException | None) -> None:
        req.marks.append(self.timer.mark())
        self._active = None
        req.anomalies.extend(f"{opened.phase} never ended" for opened in req.open)
        req.anomalies.extend(f"{o.kind}[{o.block}] never ended" for o in req.module_open)
        self.ranges.pop_all()
        wall_end_ns = time.perf_counter_ns()
        conditions = req.probe.stop(warm=req.warm) if req.probe is not None else {}
        if exc is None:
            _WARM_MODELS.add(self.model)
        output_tokens = output_rows = None
        if exc is None:
            output_rows = _output_tokens_per_row(out, _returned_prefix(req), req.eos_token_id)
            if output_rows is not None:
                output_tokens = _generated_length(out, _returned_prefix(req))
        image_rows = _image_tokens_per_row(req, self.phase_map.image_token_id)
        try:
            times_ns = self.timer.resolve(req.marks)
        except Exception as resolve_exc:  # e.g. CUDA error after a failed generate()
            req.anomalies.append(f"timing could not be resolved: {resolve_exc}")
            times_ns = None
        release = getattr(self.timer, "release", None)
        if release is not None:
            release(req.marks)  # CUDA events back to the free list
        record = RequestRecord(
            index=req.index, spans=req.spans, times_ns=times_ns, anomalies=req.anomalies,
            complete=exc is None, error=None if exc is None else f"{type(exc).__name__}: {exc}",
            input_tokens=req.input_tokens, image_tokens=max(image_rows) if image_rows else None,
            output_tokens=output_tokens, batch_size=req.batch_size, num_beams=req.num_beams,
            output_tokens_per_row=output_rows, image_tokens_per_row=image_rows,
            decode_rows=req.decode_rows, unsplit=frozenset(req.unsplit), thread_id=req.thread_id,
            wall_start_ns=req.wall_start_ns, wall_end_ns=wall_end_ns, conditions=conditions,
            projector_inside_vision=req.projector_inside_vision, blocks_run=req.blocks_run,
            returned_prefix_tokens=req.returned_prefix_tokens, detail=self.detail,
            module_spans=req.module_spans, text_shape=self.text_shape, top_k=req.top_k)
        with self._lock:
            self.records.append(record)
            self.records.sort(key=lambda r: r.index)
            if self._trace is not None:
                self._trace.step()

    # ------------------------------------------------------------------------ results
    def session(self) -> Session:
        """What the block holds so far: finished requests, NVML samples and trace files."""
        with self._lock:
            records = list(self.records)
        samples = self._sampler.samples() if self._sampler is not None else None
        return Session(records, self.timer.kind, samples=samples, traces=list(self.traces))

    def pop_session(self) -> Session:
        """The requests since the last pop, which the profiler then forgets, with the samples not
        handed out before (``new_samples``; the profiler keeps only the one in effect now).

        For long sweeps: memory stays bounded, and telemetry samples are handed out once each.
        """
        if self._active is not None:
            raise MolmoLatencyError("pop_session() and pop_report() cannot run inside generate()")
        with self._lock:  # finished requests only; requests running in other threads stay
            records, self.records = self.records, []
        if self._sampler is None:
            return Session(records, self.timer.kind, traces=list(self.traces))
        samples = self._sampler.samples()  # all of them: a phase may hold an earlier sample
        new = samples
        if self._popped_until_ns is not None:
            new = samples.filter(pl.col("t_ns") > self._popped_until_ns)
        if new.height:
            self._popped_until_ns = int(new["t_ns"].max())
            # handed out: keep only the sample in effect now, so a long sweep stays bounded
            self._sampler.discard_before(self._popped_until_ns)
        return Session(records, self.timer.kind, samples=samples, traces=list(self.traces), new_samples=new)

    def report(self) -> PhaseReport:
        """The `requests` and `phases` tables (polars) of every request held so far."""
        return session_report(self.session())

    def pop_report(self) -> PhaseReport:
        """The tables of the requests since the last pop (:meth:`pop_session`)."""
        return session_report(self.pop_session())


def profile_phases(
    model: torch.nn.Module,
    *,
    nvtx: bool = True,
    torch_profiler: Any = None,
    trace_dir: str | os.PathLike | None = None,
    phases: Mapping[str, PathSpec] | None = None,
    timer: Timer | None = None,
    nvml: str = "auto",
    nvml_interval_ms: float = DEFAULT_INTERVAL_MS,
    nvml_device: Any = None,
    entry_points: tuple[str, ...] | list[str] = ENTRY_POINTS,
    detail: str = "phases",
) -> PhaseProfiler:
    """Profile every `model.generate()` call inside a `with` block, phase by phase.

    Args:
        model: an HF VLM (LLaVA-style, Molmo2, Molmo remote code) or any model with `phases`.
        nvtx: emit NVTX ranges (domain ``molmo_latency``) for Nsight Systems.
        torch_profiler: None; True (record every request); a ``torch.profiler.schedule(...)``;
            a dict of ``torch.profiler.profile`` arguments; or your own started profile object
            (we call ``.step()`` after each request). Traces go to `trace_dir`. Checked once, as
            a :class:`~molmo_latency.capture.TraceCapture`.
        trace_dir: where Chrome/Kineto traces are written (implies ``torch_profiler=True``).
        phases: explicit mapping ``{"vision": path, "projector": path, "llm": (start, end)}``.
        timer: a timer policy; default CUDA events for a CUDA model, perf_counter_ns otherwise.
        nvml: "auto" | "off" | "required": GPU clocks, temperature, power, throttle reasons
            per phase and request (null columns when off or unavailable; "auto" warns once).
        nvml_interval_ms: the sampling interval of the NVML thread (default
            ``DEFAULT_INTERVAL_MS``; below ``MIN_INTERVAL_MS`` is refused: the sampler thread
            would slow the loop it measures). Each request reports the rate achieved
            (``telemetry_hz``).
        nvml_device: the NVML index/UUID to read (default: the model's GPU, by UUID, see
            :func:`~molmo_latency.telemetry.source.resolve_gpu`) or a
            :class:`~molmo_latency.telemetry.GpuDevice` (e.g. ``FakeGpu`` in tests). The three
            ``nvml*`` arguments are checked once, as a :class:`~molmo_latency.telemetry.NvmlSettings`.
        entry_points: the model's methods whose calls are requests (default ``generate`` and
            Molmo's ``generate_from_batch``; nested calls count once).
        detail: ``"phases"`` (default: no hook beyond the phases') or ``"modules"``: also time
            each decoder block's attention, MLP / MoE router / experts and norms, the vision
            layers, the projector and the LM head (found structurally, all checked before any
            hook goes on), with the same timer and as ``module/KIND[B]`` ranges nested in the
            phases; the report then has a ``modules`` table (per phase instance and module kind:
            ``ms``, ``calls``, ``flops``; ``other`` = the phase outside every module).

    Example:
        >>> from molmo_latency.models import reference_vlm
        >>> ref = reference_vlm("tiny")
        >>> with profile_phases(ref.model) as prof:
        ...     _ = ref.model.generate(**ref.request(crops=1, new_tokens=3))
        >>> prof.report().phases["phase"].to_list()
        ['vision', 'projector', 'prefill', 'decode', 'decode']
    """
    settings = NvmlSettings(nvml, nvml_interval_ms, nvml_device)
    return PhaseProfiler(model, nvtx=nvtx, trace=TraceCapture.from_args(torch_profiler, trace_dir),
                         phases=phases, timer=timer, nvml=settings, entry_points=entry_points, detail=detail)


def generate_refusal(model: torch.nn.Module, entry_points: tuple[str, ...] | list[str]) -> str | None:
    """Why a transformers model's generate() cannot be split into a prefill and one decode step
    per new token, or None: its generate() is not transformers' decoding loop (the model is no
    ``GenerationMixin``) but one of its own (DiffusionGemma's block diffusion: each canvas of
    tokens denoised over several decoder passes). A model outside transformers (remote code,
    MolmoE's own) is not judged here."""
    generate = getattr(model, "generate", None)
    if "generate" not in entry_points or not callable(generate) or \
            not type(model).__module__.startswith("transformers."):
        return None
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if isinstance(model, GenerationMixin):
        return None
    owner = next((c.__name__ for c in type(model).__mro__ if "generate" in vars(c)), type(model).__name__)
    doc = (getattr(generate, "__doc__", None) or "").strip().splitlines()
    said = f" (its docstring: {doc[0].strip()!r})" if doc else ""
    return (f"cannot profile {type(model).__name__}.generate(): it is {owner}.generate{said}, not transformers' "
            "token-by-token loop (GenerationMixin), so a prefill and one decode step per new token do not "
            "describe it; time generate() as a whole instead, or pass a method that decodes token by token "
            "with profile_phases(model, entry_points=[...])")


def _checked_sites(model: torch.nn.Module, phase_map: PhaseMap) -> list:
    """The module sites of detail="modules", every one checked to take hooks (one line naming
    the first that does not)."""
    from molmo_latency.modules import module_sites

    sites = module_sites(model, phase_map)
    for site in sites:
        if not callable(getattr(site.module, "register_forward_pre_hook", None)):
            raise MolmoLatencyError(f"detail='modules': {site.name} ({type(site.module).__name__}) takes no "
                                    "forward hooks; profile with detail='phases'")
    if not any(s.kind in ("attention", "mlp", "moe_experts") for s in sites):
        raise MolmoLatencyError(f"detail='modules': no attention or MLP found in the blocks of "
                                f"{type(model).__name__}; profile with detail='phases'")
    return sites


def _text_shape(model: torch.nn.Module) -> Any:
    """The decoder's dimensions for the FLOPs of the modules table (None where the config does
    not say them: the flops column is then null)."""
    from molmo_latency.flops import TextShape

    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is None:
            continue
        try:
            return TextShape.from_config(cfg)
        except (AttributeError, TypeError, ValueError):
            continue
    return None


def _current_top_k(model: torch.nn.Module) -> int | None:
    from molmo_latency.knobs import get_top_k

    try:
        return int(get_top_k(model))
    except MolmoLatencyError:
        return None


def _input_ids(args: tuple, kwargs: dict) -> Any:
    """The prompt ids of a generate()-like call: input_ids=, a first tensor argument, or a
    batch dict (Molmo's generate_from_batch) holding "input_ids"."""
    if isinstance(kwargs.get("input_ids"), torch.Tensor):
        return kwargs["input_ids"]
    for value in (*args[:1], kwargs.get("batch")):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, Mapping) and isinstance(value.get("input_ids"), torch.Tensor):
            return value["input_ids"]
    return None


def _model_facts(req: RunningRequest, model: torch.nn.Module, phase_map: PhaseMap) -> None:
    """What a request's row says about the model as it runs: whether the projector runs inside the
    vision module (from the phase map), how many text-model blocks are configured now (after the
    blocks knob; None where the blocks cannot be found), and, for an encoder-decoder model, that
    the returned sequences start with the decoder start token (not an output token)."""
    from molmo_latency.knobs import blocks_run

    req.projector_inside_vision = phase_map.projector_inside_vision
    req.blocks_run = blocks_run(model)
    if phase_map.encoder_decoder or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        req.returned_prefix_tokens = 1
    elif type(model).__name__ in _PROMPT_TRIMMED and req.input_tokens is not None:
        req.returned_prefix_tokens = req.input_tokens - _PROMPT_TRIMMED[type(model).__name__]


# models whose generate() feeds (and returns) the prompt less its last tokens: how many it drops
_PROMPT_TRIMMED = {"BlipForConditionalGeneration": 1}


def _returned_prefix(req: RunningRequest) -> int | None:
    """Tokens at the start of each sequence generate() returns that are not output tokens: the
    prompt for a decoder-only model, the decoder start token for an encoder-decoder model, the
    prompt less its trimmed end where generate() trims it (BLIP)."""
    return req.returned_prefix_tokens if req.returned_prefix_tokens is not None else req.input_tokens


def _classify(req: RunningRequest, args: tuple, kwargs: dict) -> tuple[str, int]:
    """The kind of one LLM call and its index among that kind, from shapes only.

    ``prefill`` while the prompt is not yet fed (several calls: prefill chunks), then per new
    call: ``decode`` when it feeds one token per row, ``recompute`` when it feeds several without
    a KV cache (``use_cache=False`` recomputes the whole sequence each step), ``verify`` when it
    feeds several with a cache (assisted / prompt-lookup decoding checks candidate tokens).
    Whether a cache is in use comes from the call's own arguments (:func:`_cache_in_use`), not
    from one keyword's name: transformers 5.24 renamed ``past_key_values`` to ``cache``."""
    length, rows = _call_shape(args, kwargs)
    prompt = req.input_tokens
    first_call = not req.kind_counts
    if first_call and req.llm_calls:  # LLM passes before any call of the model (an encoder pass
        req.kind_counts["prefill"] = req.llm_calls  # run by generate() itself): prefill chunks
    if length is None or prompt is None:  # no shape to read: the first call is the prefill
        kind = "prefill" if first_call else "decode"
    elif req.fed < prompt:
        kind = "prefill"
        req.fed += length
    elif length == 1:
        kind = "decode"
    else:
        cached = _cache_in_use(kwargs)
        if cached is None:  # nothing says: the whole sequence again is a recompute
            cached = length <= prompt
        kind = "verify" if cached else "recompute"
    if kind == "decode" and rows is not None:
        req.decode_rows.append(rows)
    step = req.kind_counts.get(kind, 0)
    req.kind_counts[kind] = step + 1
    return kind, step


_CACHE_KWARGS = ("past_key_values", "cache", "cache_params", "past_key_value")


def _cache_in_use(kwargs: dict) -> bool | None:
    """Whether one LLM call runs against a KV cache, from what generate() passes (no tensor is
    read): ``use_cache`` when given, else a cache object under any of the names transformers
    lines have used (``past_key_values`` on 4.5x, ``cache`` on 5.24, ``cache_params`` for
    state-space models); None when the call says nothing either way."""
    flag = kwargs.get("use_cache")
    if isinstance(flag, bool):
        return flag
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return True
    return None


def _call_shape(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """(sequence length, rows) that one forward call feeds: input_ids, else inputs_embeds."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if not isinstance(ids, torch.Tensor):
        ids = kwargs.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return int(ids.shape[1]), int(ids.shape[0])
    return None, None


def _batch_arg(args: tuple, kwargs: dict) -> Mapping | None:
    """Molmo's generate_from_batch(batch, ...): the batch dict, as a keyword or first argument."""
    for value in (kwargs.get("batch"), *args[:1]):
        if isinstance(value, Mapping):
            return value
    return None


# generate() keywords that mark image positions in input_ids by a mask (Kosmos-2, ...)
_IMAGE_MASK_KWARGS = ("image_embeds_position_mask", "image_token_mask", "images_seq_mask", "image_mask")


def _image_input_idx(args: tuple, kwargs: dict) -> Any:
    """Image positions, as entries >= 0 of a tensor with one row per input row: Molmo's
    image_input_idx (a keyword of generate(), or inside generate_from_batch's batch), else a mask
    of image positions (``image_embeds_position_mask`` of Kosmos-2, ...), turned into 0 where
    set and -1 elsewhere (no device sync: an elementwise op)."""
    idx = kwargs.get("image_input_idx")
    if not isinstance(idx, torch.Tensor):
        batch = _batch_arg(args, kwargs)
        idx = batch.get("image_input_idx") if batch is not None else None
    if isinstance(idx, torch.Tensor):
        return idx
    for name in _IMAGE_MASK_KWARGS:
        mask = kwargs.get(name)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return torch.where(mask.bool(), 0, -1)
    return None


def _generation_setting(model: torch.nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """A generation setting as generate() will see it: the keyword, a generation_config passed
    in, then the model's generation_config."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), *args[1:2], getattr(model, "generation_config", None)):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def _image_tokens_per_row(req: RunningRequest, image_token_id: int | None) -> list[int] | None:
    """Image tokens of each row: Molmo's image_input_idx entries >= 0 where given, else the
    image token id in input_ids."""
    idx = req.image_input_idx
    if isinstance(idx, torch.Tensor):
        if idx.dim() >= 2 and req.batch_size is not None and idx.shape[0] == req.batch_size:
            return [int(n) for n in (idx >= 0).flatten(1).sum(1).tolist()]
        return [int((idx >= 0).sum())]
    if req.input_ids is not None and image_token_id is not None:
        return [int(n) for n in (req.input_ids == image_token_id).sum(1).tolist()]
    first = req.llm_first_positions
    if (req.input_tokens is not None and req.returned_prefix_tokens is None and first is not None
            and first > req.input_tokens and req.kind_counts.get("prefill") == 1):
        # no image id: image features put before the prompt with no placeholders (GIT); the text
        # model's first block saw that many positions more than the prompt holds
        return [first - req.input_tokens] * (req.batch_size or 1)
    return None


def _sequences(out: Any) -> torch.Tensor | None:
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    return seqs if isinstance(seqs, torch.Tensor) and seqs.dim() >= 1 else None


def _new_tokens(seqs: torch.Tensor, input_tokens: int | None) -> torch.Tensor:
    if input_tokens is not None and seqs.shape[-1] >= input_tokens:
        return seqs[..., input_tokens:]
    return seqs  # a model whose generate() returns only the new tokens


def _generated_length(out: Any, input_tokens: int | None) -> int | None:
    """New tokens per sequence as generate() returned them (padding after an EOS included)."""
    seqs = _sequences(out)
    return None if seqs is None else int(_new_tokens(seqs, input_tokens).shape[-1])


def _output_tokens_per_row(out: Any, input_tokens: int | None, eos: Any) -> list[int] | None:
    """New tokens of each returned row up to and including its first EOS (the padding after a
    row's EOS is not counted); all of them for a row without EOS or when no EOS id is known."""
    seqs = _sequences(out)
    if seqs is None:
        return None
    new = _new_tokens(seqs, input_tokens)
    if new.dim() == 1:
        new = new.unsqueeze(0)
    length = int(new.shape[-1])
    if eos is None or length == 0:
        return [length] * int(new.shape[0])
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=new.device)
    is_eos = torch.isin(new, eos_ids)
    first = is_eos.int().argmax(dim=-1)
    counts = torch.where(is_eos.any(dim=-1), first + 1, torch.full_like(first, length))
    return [int(n) for n in counts.tolist()]
