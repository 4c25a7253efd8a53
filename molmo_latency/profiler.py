"""`profile_phases`: every phase of every generate() call, on one timeline, in the same run.

Collection only: forward hooks on the vision, projector and LLM modules (found by an adapter)
mark time with a timer policy (CUDA events on GPU, perf_counter_ns on CPU) and open NVTX /
record_function ranges; the generate() wrapper brackets each request. Nothing synchronises
inside generate(); each request's marks are resolved once, after generate() returned.
The tables are built by :mod:`molmo_latency.records`.

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

import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from molmo_latency._quiet import quiet_kineto
from molmo_latency.adapters import PathSpec, PhaseMap, find_phases
from molmo_latency.errors import MolmoLatencyError
from molmo_latency.ranges import RangeEmitter
from molmo_latency.records import PhaseReport, RequestRecord, build_report
from molmo_latency.timers import Timer, timer_for


ENTRY_POINTS = ("generate", "generate_from_batch")


class PhaseProfiler:
    """Holds the hooks and the per-request records of one `profile_phases` block."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        nvtx: bool = True,
        torch_profiler: Any = None,
        trace_dir: str | os.PathLike | None = None,
        phases: Mapping[str, PathSpec] | None = None,
        timer: Timer | None = None,
        nvml: str = "auto",
        nvml_interval_ms: float = 10.0,
        nvml_device: Any = None,
        entry_points: tuple[str, ...] | list[str] = ENTRY_POINTS,
    ):
        if nvml not in ("auto", "off", "required"):
            raise MolmoLatencyError(f"nvml must be 'auto', 'off' or 'required', got {nvml!r}")
        self.model = model
        self.phase_map: PhaseMap = find_phases(model, phases)
        self.timer: Timer = timer if timer is not None else timer_for(model)
        self.ranges = RangeEmitter(nvtx=nvtx)
        self.nvml_mode = nvml
        self.nvml_interval_ms = nvml_interval_ms
        self.nvml_device = nvml_device
        self.trace_dir = Path(trace_dir) if trace_dir is not None else None
        self._torch_profiler_arg = torch_profiler if torch_profiler is not None else (
            True if trace_dir is not None else None)
        self.records: list[RequestRecord] = []
        self._requests_seen = 0
        self._popped_until_ns: int | None = None
        self.traces: list[dict[str, Any]] = []  # {"path": str, "requests": [int]}
        self._active: RequestRecord | None = None
        self._handles: list[Any] = []
        self.entry_points = tuple(entry_points)
        self._wrapped: list[tuple[str, bool, Any]] = []  # (method, was an instance attribute, original)
        self._orphan_hooks = 0
        self._tprof: Any = None
        self._own_tprof = False
        self._trace_requests: list[int] = []
        self._trace_starts_ns: dict[int, int] = {}
        self._sampler: Any = None
        self._entered = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "PhaseProfiler":
        if self._entered:
            raise MolmoLatencyError("a profile_phases block cannot be entered twice")
        self._entered = True
        try:
            self._install_hooks()
            self._wrap_generate()
            self._start_torch_profiler()
            self._start_telemetry()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        """Leave the model exactly as it was: hooks off, generate restored, ranges closed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, own, original in reversed(self._wrapped):
            if own:
                setattr(self.model, name, original)
            elif name in vars(self.model):
                delattr(self.model, name)
        self._wrapped.clear()
        self.ranges.pop_all()
        self._active = None
        self._stop_torch_profiler()
        self._stop_telemetry()
        if self._orphan_hooks and not self._requests_seen:
            warnings.warn(
                f"{self._orphan_hooks} phase hooks fired outside any profiled request: the model was "
                f"run through an entry point other than {', '.join(self.entry_points)}; pass it with "
                "profile_phases(model, entry_points=[...])", stacklevel=3)
            self._orphan_hooks = 0

    # ---------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> None:
        for name, span in self.phase_map.spans.items():
            on_start, on_end = self._on_start, self._on_end
            self._handles.append(span.start.register_forward_pre_hook(
                lambda _m, _a, _name=name: on_start(_name)))
            self._handles.append(span.end.register_forward_hook(
                lambda _m, _a, _o, _name=name: on_end(_name)))

    def _on_start(self, name: str) -> None:
        req = self._active
        if req is None:
            self._orphan_hooks += 1
            return
        if name == "llm":
            phase = "prefill" if req.llm_calls == 0 else "decode"
            step = 0 if req.llm_calls == 0 else req.llm_calls - 1
            req.llm_calls += 1
        else:
            phase = name
            step = req.occurrences.get(name, 0)
            req.occurrences[name] = step + 1
        if req.open:
            req.anomalies.append(f"{phase} started while {req.open[-1][0]} was open (nested phases)")
        self.ranges.push(phase, step)
        req.open.append((phase, step, len(req.marks), name))
        req.marks.append(self.timer.mark())

    def _on_end(self, name: str) -> None:
        req = self._active
        if req is None:
            return
        for i in range(len(req.open) - 1, -1, -1):
            if req.open[i][3] == name:
                break
        else:
            req.anomalies.append(f"{name} ended without a start")
            return
        end_idx = len(req.marks)
        req.marks.append(self.timer.mark())
        phase, step, start_idx, _ = req.open.pop(i)
        self.ranges.pop()
        req.spans.append((phase, step, start_idx, end_idx))

    # ------------------------------------------------------------------------- generate
    def _wrap_generate(self) -> None:
        """Wrap each generation entry point (generate, and Molmo's generate_from_batch, which
        calls ``super().generate`` and so bypasses an instance-level wrapper of generate)."""
        found = [n for n in self.entry_points if callable(getattr(self.model, n, None))]
        if not found:
            raise MolmoLatencyError(
                f"{type(self.model).__name__} has none of the entry points {list(self.entry_points)}; "
                "pass the method that generates with profile_phases(model, entry_points=[...])")
        for name in found:
            self._wrap_entry(name)

    def _wrap_entry(self, name: str) -> None:
        model = self.model
        own = name in vars(model)
        original = getattr(model, name)
        self._wrapped.append((name, own, original))

        @functools.wraps(original)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if self._active is not None:  # e.g. generate() inside generate_from_batch(): one request
                return original(*args, **kwargs)
            req = self._begin(args, kwargs)
            try:
                out = original(*args, **kwargs)
            except BaseException as exc:
                self._finish(req, None, exc)
                raise
            self._finish(req, out, None)
            return out

        setattr(model, name, entry)

    def _begin(self, args: tuple, kwargs: dict) -> RequestRecord:
        ids = _input_ids(args, kwargs)
        req = RequestRecord(index=self._requests_seen)
        self._requests_seen += 1
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            req.batch_size, req.input_tokens = int(ids.shape[0]), int(ids.shape[1])
            req.input_ids = ids  # image tokens are counted after generate(): no sync before it
        self.records.append(req)
        traced = self._tprof is not None and _tprof_recording(self._tprof)
        if traced:
            self._trace_requests.append(req.index)
        self.timer.begin()
        req.wall_start_ns = time.perf_counter_ns()
        if traced:
            self._trace_starts_ns[req.index] = req.wall_start_ns
        self.ranges.push("request", req.index)
        req.marks.append(self.timer.mark())
        self._active = req
        return req

    def _finish(self, req: RequestRecord, out: Any, exc: BaseException | None) -> None:
        req.marks.append(self.timer.mark())
        self._active = None
        for phase, _step, _idx, _name in req.open:
            req.anomalies.append(f"{phase} never ended")
        req.open.clear()
        self.ranges.pop_all()
        req.wall_end_ns = time.perf_counter_ns()
        if exc is not None:
            req.complete = False
            req.error = f"{type(exc).__name__}: {exc}"
        else:
            req.output_tokens = _output_tokens(out, req.input_tokens)
        token = self.phase_map.image_token_id
        if req.input_ids is not None and token is not None:
            req.image_tokens = int((req.input_ids[0] == token).sum())
        req.input_ids = None
        try:
            req.times_ns = self.timer.resolve(req.marks)
        except Exception as resolve_exc:  # e.g. CUDA error after a failed generate()
            req.anomalies.append(f"timing could not be resolved: {resolve_exc}")
            req.times_ns = None
        req.marks = []  # release CUDA events back to the pool
        if self._tprof is not None:
            with quiet_kineto():  # a schedule starts/stops Kineto here; its C++ lines are dropped
                self._tprof.step()

    # --------------------------------------------------------------- torch.profiler
    def _start_torch_profiler(self) -> None:
        arg = self._torch_profiler_arg
        if arg is None or arg is False:
            return
        from torch.profiler import ProfilerActivity, profile

        if isinstance(arg, profile):
            self._tprof, self._own_tprof = arg, False
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available() and next(self.model.parameters()).is_cuda:
            activities.append(ProfilerActivity.CUDA)
        kwargs: dict[str, Any] = {"activities": activities}
        if callable(arg):
            kwargs["schedule"] = arg
        elif isinstance(arg, Mapping):
            kwargs.update(arg)
        elif arg is not True:
            raise MolmoLatencyError(
                "torch_profiler must be True, a torch.profiler.schedule(...), a dict of "
                f"torch.profiler.profile arguments or a profile object, got {type(arg).__name__}"
            )
        if self.trace_dir is None:
            raise MolmoLatencyError("torch_profiler needs trace_dir=... to write its traces into")
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("on_trace_ready", self._export_trace)
        self._tprof, self._own_tprof = profile(**kwargs), True
        with quiet_kineto():  # Kineto's C++ "USDT ... profiler_start" line, not our output
            self._tprof.__enter__()

    def _export_trace(self, tprof: Any) -> None:
        requests = list(self._trace_requests)
        self._trace_requests.clear()
        name = f"requests_{requests[0]}-{requests[-1]}" if requests else f"trace_{len(self.traces)}"
        path = self.trace_dir / f"{name}.pt.trace.json.gz"
        tprof.export_chrome_trace(str(path))
        self.traces.append({"path": str(path), "requests": requests})
        starts = [self._trace_starts_ns.pop(r) for r in requests if r in self._trace_starts_ns]
        if self._sampler is not None and starts:
            self._add_counter_tracks(path, requests[0], starts[0])

    def _add_counter_tracks(self, path: Path, request: int, request_start_ns: int) -> None:
        """NVML samples as counter tracks (clocks, temperature, power) under the phases."""
        import polars as pl

        from molmo_latency.errors import TraceError
        from molmo_latency.telemetry import add_counter_tracks, estimate_clock_offset_ns

        try:
            offset = estimate_clock_offset_ns(path, f"request[{request}]", request_start_ns)
        except TraceError as exc:
            warnings.warn(f"no NVML counter tracks in {path}: {exc}", stacklevel=2)
            return
        samples = self._sampler.samples().filter(pl.col("t_ns") >= request_start_ns - 1_000_000_000)
        add_counter_tracks(path, samples, clock_offset_ns=offset)

    def _stop_torch_profiler(self) -> None:
        tprof, self._tprof = self._tprof, None
        if tprof is not None and self._own_tprof:
            with quiet_kineto():
                tprof.__exit__(None, None, None)

    # -------------------------------------------------------------------- telemetry
    def _start_telemetry(self) -> None:
        if self.nvml_mode == "off":
            return
        param = next(self.model.parameters(), None)
        on_gpu = param is not None and param.device.type == "cuda"
        if not on_gpu and self.nvml_mode == "auto" and self.nvml_device is None:
            return  # a CPU model: GPU telemetry would explain nothing
        try:
            from molmo_latency.telemetry import start_telemetry
        except ImportError:  # pragma: no cover - telemetry package missing
            if self.nvml_mode == "required":
                raise
            return
        device = self.nvml_device
        if device is None:
            device = _nvml_id(param.device) if on_gpu else 0
        self._sampler = start_telemetry(self.nvml_mode, device, interval_ms=self.nvml_interval_ms)

    def _stop_telemetry(self) -> None:
        sampler = self._sampler
        if sampler is not None:
            from molmo_latency.telemetry import stop_telemetry

            stop_telemetry(sampler, self.nvml_mode)  # "required": raises if the sampler failed

    # ------------------------------------------------------------------------ results
    def report(self) -> PhaseReport:
        """The `requests` and `phases` tables (polars) of every request held so far."""
        samples = self._sampler.samples() if self._sampler is not None else None
        return build_report(self.records, self.timer.kind, samples=samples, traces=self.traces,
                            gpu_phases=self._gpu_phases())

    def _gpu_phases(self):
        """GPU time per phase instance from the Kineto traces written so far (those with GPU
        activity), read once each; None without traces."""
        if not self.traces:
            return None
        import polars as pl

        from molmo_latency.trace import phase_gpu_table, read_kineto

        for trace in self.traces:
            if "gpu_phases" not in trace:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    parsed = read_kineto(trace["path"])
                trace["gpu_phases"] = phase_gpu_table(parsed) if parsed.gpu.height else None
        tables = [t["gpu_phases"] for t in self.traces if t["gpu_phases"] is not None]
        return pl.concat(tables) if tables else None

    def pop_report(self) -> PhaseReport:
        """The tables of the requests since the last pop, which the profiler then forgets.

        For long sweeps: memory stays bounded, and telemetry samples are handed out once each.
        """
        if self._active is not None:
            raise MolmoLatencyError("pop_report() cannot run inside generate()")
        records, self.records = self.records, []
        if self._sampler is None:
            return build_report(records, self.timer.kind, traces=self.traces, gpu_phases=self._gpu_phases())
        import polars as pl

        samples = self._sampler.samples()  # all of them: a phase may hold an earlier sample
        report = build_report(records, self.timer.kind, samples=samples, traces=self.traces,
                              gpu_phases=self._gpu_phases())
        if self._popped_until_ns is not None:
            samples = samples.filter(pl.col("t_ns") > self._popped_until_ns)
        if samples.height:
            self._popped_until_ns = int(samples["t_ns"].max())
            # handed out: keep only the sample in effect now, so a long sweep stays bounded
            self._sampler.discard_before(self._popped_until_ns)
        report.telemetry = samples
        return report


def profile_phases(
    model: torch.nn.Module,
    *,
    nvtx: bool = True,
    torch_profiler: Any = None,
    trace_dir: str | os.PathLike | None = None,
    phases: Mapping[str, PathSpec] | None = None,
    timer: Timer | None = None,
    nvml: str = "auto",
    nvml_interval_ms: float = 10.0,
    nvml_device: Any = None,
    entry_points: tuple[str, ...] | list[str] = ENTRY_POINTS,
) -> PhaseProfiler:
    """Profile every `model.generate()` call inside a `with` block, phase by phase.

    Args:
        model: an HF VLM (LLaVA-style, Molmo2, Molmo remote code) or any model with `phases`.
        nvtx: emit NVTX ranges (domain ``molmo_latency``) for Nsight Systems.
        torch_profiler: None; True (record every request); a ``torch.profiler.schedule(...)``;
            a dict of ``torch.profiler.profile`` arguments; or your own started profile object
            (we call ``.step()`` after each request). Traces go to `trace_dir`.
        trace_dir: where Chrome/Kineto traces are written (implies ``torch_profiler=True``).
        phases: explicit mapping ``{"vision": path, "projector": path, "llm": (start, end)}``.
        timer: a timer policy; default CUDA events for a CUDA model, perf_counter_ns otherwise.
        nvml: "auto" | "off" | "required": GPU clocks, temperature, power, throttle reasons
            per phase and request (null columns when off or unavailable; "auto" warns once).
        nvml_interval_ms: the sampling interval of the NVML thread.
        nvml_device: the NVML index/UUID to read (default: the model's GPU) or a
            :class:`~molmo_latency.telemetry.GpuDevice` (e.g. ``FakeGpu`` in tests).
        entry_points: the model's methods whose calls are requests (default ``generate`` and
            Molmo's ``generate_from_batch``; nested calls count once).

    Example:
        >>> from molmo_latency.models import reference_vlm
        >>> ref = reference_vlm("tiny")
        >>> with profile_phases(ref.model) as prof:
        ...     _ = ref.model.generate(**ref.request(crops=1, new_tokens=3))
        >>> prof.report().phases["phase"].to_list()
        ['vision', 'projector', 'prefill', 'decode', 'decode']
    """
    return PhaseProfiler(
        model, nvtx=nvtx, torch_profiler=torch_profiler, trace_dir=trace_dir, phases=phases,
        timer=timer, nvml=nvml, nvml_interval_ms=nvml_interval_ms, nvml_device=nvml_device,
        entry_points=entry_points,
    )


def _nvml_id(device: torch.device) -> int | str:
    """The NVML name of a CUDA device: its UUID ("GPU-..."), because NVML ignores
    CUDA_VISIBLE_DEVICES and numbers every GPU of the machine; the index as a fallback."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return index


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


def _tprof_recording(tprof: Any) -> bool:
    from torch.profiler import ProfilerAction

    action = getattr(tprof, "current_action", ProfilerAction.RECORD)
    return action in (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


def _output_tokens(out: Any, input_tokens: int | None) -> int | None:
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if not isinstance(seqs, torch.Tensor) or seqs.dim() < 1:
        return None
    length = int(seqs.shape[-1])
    if input_tokens is not None and length >= input_tokens:
        return length - input_tokens
    return length  # a model whose generate() returns only the new tokens

