"""The sweep's schedule as data (which unit next, what is done, what failed) and the recorder
both executors share: counted by hand from the sweep's own units, no model loaded."""

import polars as pl

from molmo_latency.hold import RunDir
from molmo_latency.sweep.schedule import (LocalSweepResult, RaySweepResult, Schedule, SweepRecorder,
                                          SweepResult)
from molmo_latency.sweep.spec import SweepSpec

SPEC = SweepSpec.from_dict({"crops": [1, 2, 3], "repeats": 2})  # 6 units: c1 c2 c3 c1 c2 c3


def _ids(schedule, units):
    return [(schedule.units[u][0].config_id[:2], schedule.units[u][1]) for u in units]


def test_units_come_in_measurement_order_skipping_done_and_failed():
    c1, c2, c3 = (c.config_id for c in SPEC.configs())
    schedule = Schedule.of(SPEC, done={(c1, 0)}, failed={c3})
    assert (schedule.skipped, schedule.done_count, schedule.total, schedule.pending) == (3, 3, 6, 3)
    assert schedule.configs_done == 1  # c3 (failed) has no unit left
    order = []
    while (unit := schedule.next()) is not None:
        order.append(unit)
    assert _ids(schedule, order) == [("c2", 0), ("c1", 1), ("c2", 1)]


def test_a_configuration_failed_before_measuring_counts_all_its_units_done():
    """The local runner used not to count a warm-up failure: progress stopped short of total."""
    c1, c2, _ = (c.config_id for c in SPEC.configs())
    schedule = Schedule.of(SPEC, done=set(), failed=set())
    assert schedule.fail(c2) is True
    assert schedule.done_count == 2 and schedule.configs_done == 1
    assert schedule.fail(c2) is False and schedule.done_count == 2  # a second failure changes nothing
    assert [c.config_id for c in schedule.configs_with_work()] == [c1, SPEC.configs()[2].config_id]
    while (unit := schedule.next()) is not None:
        assert schedule.finish(unit)
    assert schedule.done_count == schedule.total == 6 and schedule.configs_done == 3


def test_a_unit_is_finished_once_and_a_lost_unit_is_queued_again_until_the_limit():
    schedule = Schedule.of(SPEC, done=set(), failed=set())
    first = schedule.next()
    assert schedule.finish(first) and not schedule.finish(first)  # a duplicate is dropped
    lost = schedule.next()
    assert schedule.retry(lost, max_attempts=3) and schedule.next() == lost  # before the later ones
    assert schedule.retry(lost, max_attempts=3) and schedule.next() == lost
    assert not schedule.retry(lost, max_attempts=3) and schedule.attempts[lost] == 3
    assert schedule.next() == 2  # the lost unit is not queued a third time


def test_the_recorder_writes_each_unit_once_and_progress_ends_at_total(tmp_path):
    rd, _ = RunDir.create_or_resume(tmp_path / "run", {"sweep_digest": SPEC.digest()}, {})
    schedule = Schedule.of(SPEC, rd.done_units(), rd.failed_configs())
    seen = []
    recorder = SweepRecorder(rd, schedule, seen.append, consolidate_every_s=3600)
    c2 = SPEC.configs()[1]
    assert recorder.failed(c2, RuntimeError("out of memory"), "warmup")
    assert not recorder.failed(c2, RuntimeError("again"), "measure")  # recorded once
    while (unit := schedule.next()) is not None:
        config, repeat = schedule.units[unit]
        tables = {"requests": pl.DataFrame({"config_id": [config.config_id], "repeat": [repeat],
                                            "order": [unit], "total_ms": [10.0 + unit]})}
        assert recorder.measured_unit(unit, tables)
        assert not recorder.measured_unit(unit, tables)
    assert recorder.measured == 4
    assert [(p.stage, p.done, p.configs_done) for p in seen] == [
        ("warmup", 2, 1), ("measure", 3, 1), ("measure", 4, 1), ("measure", 5, 2), ("measure", 6, 3)]
    assert seen[-1].total == 6 and seen[-1].last_ms == 15.0
    assert rd.consolidate()["requests"] == 4
    failures = pl.read_parquet(rd.path / "failures.parquet")
    assert failures["stage"].to_list() == ["warmup"] and failures["message"].to_list() == ["out of memory"]


def test_results_are_typed_and_read_like_the_dicts_they_were():
    local = LocalSweepResult(run_dir="r", measured=3, skipped=1, failed_configs=0, rows=4, resumed=True,
                             post_failure_warmups=2)
    assert local["measured"] == local.measured == 3 and local.get("nope") is None
    assert dict(local) == {"run_dir": "r", "measured": 3, "skipped": 1, "failed_configs": 0, "rows": 4,
                           "resumed": True, "post_failure_warmups": 2}
    ray = RaySweepResult(run_dir="r", measured=0, skipped=0, failed_configs=0, rows=0, resumed=False)
    assert set(ray) - set(SweepResult.__dataclass_fields__) == {
        "workers", "actors_started", "worker_deaths", "units_redone", "duplicates_dropped"}
    assert "post_failure_warmups" not in ray
