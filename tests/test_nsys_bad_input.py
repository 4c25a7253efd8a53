"""Bad nsys input: one line naming the file, the problem and what to do; the CLI exits 2."""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from molmo_latency.errors import TraceError
from molmo_latency.trace import read_nsys
from molmo_latency.trace._nsys_demo import write_demo_export

REPO = Path(__file__).resolve().parent.parent


def demo_bytes(tmp_path) -> bytes:
    return write_demo_export(tmp_path / "src").read_bytes()


def not_sqlite(tmp_path):
    path = tmp_path / "report.sqlite"
    path.write_text("name,value\nnot,sqlite\n")
    return path, "not a SQLite database"


def not_nsys(tmp_path):
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    db.commit()
    db.close()
    return path, "not an Nsight Systems export"


def truncated_gzip(tmp_path):
    path = tmp_path / "report.sqlite.gz"
    packed = gzip.compress(demo_bytes(tmp_path))
    path.write_bytes(packed[: len(packed) // 2])
    return path, "truncated or corrupt gzip"


def truncated_sqlite(tmp_path):
    path = tmp_path / "cut.sqlite"
    data = demo_bytes(tmp_path)
    path.write_bytes(data[: len(data) // 2])
    return path, "SQLite error while reading"


def a_report_not_its_export(tmp_path):
    path = tmp_path / "report.nsys-rep"
    path.write_bytes(b"\x00\x01binary report")
    return path, "nsys export --type sqlite report.nsys-rep"


def no_string_ids(tmp_path):
    path = write_demo_export(tmp_path)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE StringIds")
    db.commit()
    db.close()
    return path, "no StringIds table"


def kernels_without_start(tmp_path):
    path = write_demo_export(tmp_path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE CUPTI_ACTIVITY_KIND_KERNEL RENAME COLUMN start TO begin")
    db.commit()
    db.close()
    return path, "CUPTI_ACTIVITY_KIND_KERNEL has no column start"


def missing(tmp_path):
    return tmp_path / "nope.sqlite", "no such file"


CASES = [not_sqlite, not_nsys, truncated_gzip, truncated_sqlite, a_report_not_its_export, no_string_ids,
         kernels_without_start, missing]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_reader_raises_one_line(tmp_path, case):
    path, words = case(tmp_path)
    with pytest.raises(TraceError) as info:
        read_nsys(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and words in message


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_exits_2_with_one_line(tmp_path, capsys, case, as_json):
    from molmo_latency.cli.main import main

    path, words = case(tmp_path)
    code = main(["trace", "summary", str(path), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("molmo-latency: error: ") and words in lines[0], err


def test_in_a_real_process_without_traceback(tmp_path):
    path, _ = truncated_gzip(tmp_path)
    result = subprocess.run([sys.executable, "-m", "molmo_latency", "trace", "summary", str(path)],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"molmo-latency: error: {path}: truncated or corrupt gzip")


def test_an_export_in_a_read_only_folder(tmp_path):
    path = write_demo_export(tmp_path / "ro")
    os.chmod(path, 0o444)
    os.chmod(path.parent, 0o555)
    try:
        assert read_nsys(path).gpu.height == 9
        assert sorted(os.listdir(path.parent)) == ["demo.sqlite"]  # no journal or lock file left
    finally:
        os.chmod(path.parent, 0o755)


def test_a_table_the_reader_needs_missing_only_matters_when_needed(tmp_path):
    path = write_demo_export(tmp_path)
    db = sqlite3.connect(path)
    for table in ("CUPTI_ACTIVITY_KIND_MEMCPY", "CUPTI_ACTIVITY_KIND_RUNTIME", "TARGET_INFO_GPU",
                  "ENUM_CUDA_MEM_KIND", "META_DATA_EXPORT"):
        db.execute(f"DROP TABLE {table}")
    db.commit()
    db.close()
    trace = read_nsys(path)
    assert trace.gpu.height == 8 and trace.runtime.height == 0 and trace.device_properties == ()
