"""Consolidation takes in only the parts that are new, and gives the same tables as reading every
part (the expectation is computed here from the part files with polars, not by the run directory)."""

import polars as pl

from molmo_latency.hold import RunDir, rundir

CONFIGS = 5


def _unit(i: int) -> tuple[str, int, dict[str, pl.DataFrame]]:
    config_id, repeat = f"c{i % CONFIGS}", i // CONFIGS
    return config_id, repeat, {
        "requests": pl.DataFrame({"config_id": [config_id], "repeat": [repeat], "order": [i], "total_ms": [i / 10]}),
        "phases": pl.DataFrame({"config_id": [config_id] * 2, "repeat": [repeat] * 2, "phase": ["vision", "decode"],
                                "start_ns": [1000 * i, 1000 * i + 5]}),
        "telemetry": pl.DataFrame({"t_ns": [1000 * i + 1, 1000 * i + 2], "sm_clock_mhz": [1980.0, 1410.0]}),
    }


def _every_part(path, table: str, key: str) -> pl.DataFrame:
    frame = pl.concat([pl.read_parquet(p) for p in sorted((path / "parts" / table).glob("*.parquet"))],
                      how="diagonal_relaxed")
    return frame.sort(key)


def _run(tmp_path) -> RunDir:
    rd, _ = RunDir.create_or_resume(tmp_path / "run", {"sweep_digest": "x"}, {})
    return rd


def test_incremental_consolidation_gives_what_reading_every_part_gives(tmp_path):
    rd = _run(tmp_path)
    written = [13, 2, 7, 0, 19, 4, 11, 1, 8, 3, 17, 5, 6, 9, 10, 12, 14, 15, 16, 18]  # not in order
    for n, i in enumerate(written):
        rd.write_unit(*_unit(i))
        if n % 6 == 5:
            rd.consolidate()
            rd = RunDir(rd.path)  # a later reader (or a resumed sweep) reads the manifest back
    assert rd.consolidate() == {"requests": 20, "phases": 40, "telemetry": 40}
    for table, key in (("requests", "order"), ("phases", "start_ns"), ("telemetry", "t_ns")):
        expected = _every_part(rd.path, table, key)
        assert pl.read_parquet(rd.path / f"{table}.parquet").equals(expected), table
        assert RunDir(rd.path).table(table).equals(expected), table
    assert pl.read_parquet(rd.path / "requests.parquet")["order"].to_list() == list(range(20))


def test_a_consolidation_reads_only_the_parts_new_since_the_last(tmp_path, monkeypatch):
    rd = _run(tmp_path)
    for i in range(30):
        rd.write_unit(*_unit(i))
    reads = []
    real = rundir.read_part
    monkeypatch.setattr(rundir, "read_part", lambda path: reads.append(path.name) or real(path))
    rd.consolidate()
    assert len(reads) == 30 * 3  # the first one reads every part of the three tables
    reads.clear()
    for i in range(30, 34):
        rd.write_unit(*_unit(i))
    assert rd.consolidate()["requests"] == 34
    assert sorted(set(reads)) == sorted({f"c{i % CONFIGS}__r{i // CONFIGS}.parquet" for i in range(30, 34)})
    assert len(reads) == 4 * 3
    reads.clear()
    assert RunDir(rd.path).consolidate()["requests"] == 34 and reads == []  # nothing new: no part read


def test_a_consolidation_killed_before_its_manifest_is_rebuilt_not_doubled(tmp_path):
    rd = _run(tmp_path)
    for i in range(10):
        rd.write_unit(*_unit(i))
    rd.consolidate()
    manifest = rd.path / "parts" / "requests.consolidated.parquet"
    before = manifest.read_bytes()
    rd.write_unit(*_unit(10))
    rd.consolidate()
    manifest.write_bytes(before)  # as if killed after writing the table, before its manifest
    assert RunDir(rd.path).consolidate(("requests",)) == {"requests": 11}
    assert pl.read_parquet(rd.path / "requests.parquet")["order"].to_list() == list(range(11))


def test_a_part_rewritten_after_consolidation_is_taken_in_again(tmp_path):
    rd = _run(tmp_path)
    for i in range(6):
        rd.write_unit(*_unit(i))
    rd.consolidate()
    config_id, repeat, tables = _unit(3)
    tables["requests"] = tables["requests"].with_columns(pl.lit(99.0).alias("total_ms"))
    rd.write_unit(config_id, repeat, tables)  # e.g. a corrupt part deleted and measured again
    RunDir(rd.path).consolidate()
    req = pl.read_parquet(rd.path / "requests.parquet")
    assert req.height == 6 and req.filter(pl.col("order") == 3)["total_ms"].to_list() == [99.0]
