"""One sweep driver: the schedule as data, one writer of its outcomes, typed results.

A sweep is a list of units (configuration, repeat) in measurement order. :class:`Schedule` says
which unit runs next, what is done and what failed; it does no I/O. :class:`SweepRecorder` is
what every executor does with an outcome: write the unit (or the failure) into the run
directory, consolidate what is new every ``consolidate_every_s``, report progress. Two
executors drive the same schedule: the in-process loop of :func:`molmo_latency.sweep.run_sweep`
and the Ray driver of :func:`molmo_latency.scale.run_sweep_ray`. Each returns a typed result
(:class:`SweepResult`, :class:`RaySweepResult`) that also reads like the dict it used to be
(``result["measured"]``).

Example:
    >>> from molmo_latency.sweep import SweepSpec
    >>> spec = SweepSpec.from_dict({"crops": [1, 2], "repeats": 2})
    >>> schedule = Schedule.of(spec, done={("c1-kdef-ball-p32-n8-bs1", 0)}, failed=set())
    >>> schedule.skipped, schedule.done_count, schedule.total
    (1, 1, 4)
    >>> [schedule.units[i][0].config_id for i in (schedule.next(), schedule.next())]
    ['c2-kdef-ball-p32-n8-bs1', 'c1-kdef-ball-p32-n8-bs1']
    >>> schedule.fail("c2-kdef-ball-p32-n8-bs1")  # its two units count as done for progress
    True
    >>> schedule.done_count, schedule.configs_done, schedule.next()
    (3, 1, None)
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import polars as pl

from molmo_latency.hold.rundir import RunDir
from molmo_latency.sweep.spec import Config, SweepSpec


@dataclass
class Progress:
    """What the runner tells a progress display after each warm-up and each measured request.

    ``done`` counts units with nothing left to do (measured, already done, or of a failed
    configuration), so it reaches ``total`` when the sweep ends; ``configs_done`` likewise counts
    configurations with no unit left (all measured, or failed)."""

    done: int
    total: int
    configs_done: int
    configs_total: int
    last_ms: float | None
    last_config: str
    stage: str  # "warmup" | "measure" | "kineto"


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    pass


@dataclass
class Schedule:
    """Which unit runs next, what is done, what failed: a sweep's state, no I/O.

    Units are indices into ``units`` (the sweep's measurement order); the queue hands them out
    lowest first, and a unit given back (:meth:`retry`) is handed out again before later ones.
    """

    units: list[tuple[Config, int]]
    configs: list[Config]
    done: set[tuple[str, int]]
    failed: set[str]
    remaining: dict[str, int]  # units still to measure per configuration (0 once done or failed)
    skipped: int               # units done before this sweep started (resumed)
    done_count: int            # units with nothing left to do, for progress
    queue: list[int] = field(default_factory=list)
    attempts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: SweepSpec, done: set[tuple[str, int]], failed: set[str]) -> "Schedule":
        """The schedule of `spec` given the units already `done` and configurations already `failed`."""
        units = spec.units()
        configs = spec.configs()
        pending = [i for i, (c, r) in enumerate(units) if (c.config_id, r) not in done and c.config_id not in failed]
        remaining = {c.config_id: 0 for c in configs}
        for i in pending:
            remaining[units[i][0].config_id] += 1
        skipped = len(units) - len(pending)
        return cls(units=units, configs=configs, done=set(done), failed=set(failed), remaining=remaining,
                   skipped=skipped, done_count=skipped, queue=pending)

    @property
    def total(self) -> int:
        return len(self.units)

    @property
    def configs_done(self) -> int:
        """Configurations with no unit left to measure (all done, or failed)."""
        return sum(1 for n in self.remaining.values() if n == 0)

    @property
    def pending(self) -> int:
        """Units still queued (in measurement order, those of failed configurations not counted)."""
        return sum(1 for i in self.queue if self._wanted(i))

    def configs_with_work(self) -> list[Config]:
        """Configurations that still have a unit to measure and have not failed."""
        return [c for c in self.configs if self.remaining[c.config_id] > 0 and c.config_id not in self.failed]

    def _wanted(self, unit: int) -> bool:
        config, repeat = self.units[unit]
        return (config.config_id, repeat) not in self.done and config.config_id not in self.failed

    def next(self) -> int | None:
        """The next unit to measure (taken off the queue), or None when none is left."""
        while self.queue:
            unit = heapq.heappop(self.queue)
            if self._wanted(unit):
                return unit
        return None

    def has_next(self) -> bool:
        while self.queue and not self._wanted(self.queue[0]):
            heapq.heappop(self.queue)
        return bool(self.queue)

    def retry(self, unit: int, max_attempts: int) -> bool:
        """Queue `unit` again (its worker was lost); False, and not queued, once it has been lost
        `max_attempts` times (``attempts[unit]`` counts them)."""
        self.attempts[unit] = self.attempts.get(unit, 0) + 1
        if self.attempts[unit] >= max_attempts:
            return False
        heapq.heappush(self.queue, unit)
        return True

    def wanted(self, unit: int) -> bool:
        """Whether `unit` still needs a measurement (not done, its configuration not failed)."""
        return self._wanted(unit)

    def finish(self, unit: int) -> bool:
        """Mark `unit` measured; False (and nothing changes) if it already was or its configuration failed."""
        if not self._wanted(unit):
            return False
        config, repeat = self.units[unit]
        self.done.add((config.config_id, repeat))
        self.remaining[config.config_id] -= 1
        self.done_count += 1
        return True

    def fail(self, config_id: str) -> bool:
        """Mark a configuration failed: its units left count as done. False if it already had failed."""
        if config_id in self.failed:
            return False
        self.failed.add(config_id)
        self.done_count += self.remaining[config_id]
        self.remaining[config_id] = 0
        return True


class SweepRecorder:
    """What every executor does with a unit's outcome: write it, consolidate, report progress.

    The only writer of the run directory while a sweep runs. ``consolidate_every_s``: the
    top-level tables take in the new parts at least this often (a killed sweep's report then
    sees its data)."""

    def __init__(self, rd: RunDir, schedule: Schedule, progress: ProgressFn = no_progress,
                 consolidate_every_s: float = 30.0):
        self.rd = rd
        self.schedule = schedule
        self.progress = progress
        self.consolidate_every_s = consolidate_every_s
        self.measured = 0
        self._last_consolidated = time.monotonic()

    def _progress(self, last_ms: float | None, config_id: str, stage: str, cls=Progress, **extra: Any) -> None:
        s = self.schedule
        self.progress(cls(s.done_count, s.total, s.configs_done, len(s.configs), last_ms, config_id, stage, **extra))

    def warmed_up(self, config: Config) -> None:
        self._progress(None, config.config_id, "warmup")

    def measured_unit(self, unit: int, tables: dict[str, pl.DataFrame], cls=Progress, **extra: Any) -> bool:
        """Write a measured unit (once: a duplicate, or a unit of a failed configuration, is
        dropped and False returned), consolidate when due, report progress."""
        if not self.schedule.finish(unit):
            return False
        config, repeat = self.schedule.units[unit]
        self.rd.write_unit(config.config_id, repeat, tables)
        self.measured += 1
        if time.monotonic() - self._last_consolidated >= self.consolidate_every_s:
            self.rd.consolidate()  # report/explain of a killed sweep then see its data
            self._last_consolidated = time.monotonic()
        self._progress(tables["requests"]["total_ms"][0], config.config_id, "measure", cls=cls, **extra)
        return True

    def failed(self, config: Config, exc: BaseException, stage: str, cls=Progress, **extra: Any) -> bool:
        """Record that `config` failed at `stage` (once: a second failure is ignored, False) and
        report progress: the configuration's units left now count as done."""
        if not self.schedule.fail(config.config_id):
            return False
        self.rd.record_failure(config.as_dict(), config.config_id, exc, stage)
        self._progress(None, config.config_id, "warmup" if stage == "warmup" else "measure", cls=cls, **extra)
        return True


@dataclass
class SweepResult(Mapping):
    """What a sweep did: ``measured`` now, ``skipped`` (done before: resumed), ``failed_configs``
    (configurations recorded as failed in the run directory), ``rows`` of requests.parquet.

    A read-only mapping too, so ``result["measured"]`` and ``dict(result)`` work.

    >>> r = SweepResult(run_dir="runs/x", measured=4, skipped=0, failed_configs=0, rows=4, resumed=False)
    >>> r.measured, r["measured"], sorted(r)[:3]
    (4, 4, ['failed_configs', 'measured', 'resumed'])
    """

    run_dir: str
    measured: int
    skipped: int
    failed_configs: int
    rows: int
    resumed: bool

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, Any]:
        return dict(self)


@dataclass
class LocalSweepResult(SweepResult):
    """A sweep in this process: also ``post_failure_warmups`` (unmeasured requests run after a
    failed one, before the next measurement)."""

    post_failure_warmups: int = 0


@dataclass
class RaySweepResult(SweepResult):
    """A sweep on Ray: also ``workers``, ``actors_started`` (workers plus replacements),
    ``worker_deaths``, ``units_redone`` (handed out again after their worker died) and
    ``duplicates_dropped``."""

    workers: int = 0
    actors_started: int = 0
    worker_deaths: int = 0
    units_redone: int = 0
    duplicates_dropped: int = 0
