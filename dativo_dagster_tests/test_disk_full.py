"""A disk that fills up while data files are written (stood in for by the process's file size limit, so that
writes fail with an OS error as on a full disk): ``dativo-dagster materialize`` fails at the write step naming
the OS error, exits 2, commits nothing and leaves no data file behind; the next run, with room again, loads
every row once."""

from __future__ import annotations

import random
import re
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

from dativo_dagster_tests.conftest import Project, base_spec, branch_rows, duckdb_branch_rows
from dativo_dagster_tests.test_cli_materialize import DATIVO_DAGSTER, clean_env
from dativo_dagster_tests.test_logging import _json_objects_in

FILE_SIZE_LIMIT = 512 << 10  # bytes: room for the catalog, table metadata and step records, not for the data
ROWS = 40_000  # 64 random hex digits each: about 3 MB of Parquet that snappy cannot shrink


def limit_file_size() -> None:
    """In the child, before exec: files cannot grow past the limit, and a write beyond it fails with EFBIG
    ("File too large") instead of the SIGXFSZ that would kill the process."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def materialize(
    project: Project, tmp: Path, *, limited: bool, log_level: str = "ERROR", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DATIVO_DAGSTER), "materialize", "--specs", str(project.specs_dir), "--log-level", log_level],
        capture_output=True,
        text=True,
        env=clean_env(TMPDIR=str(tmp), **env),
        cwd="/",
        preexec_fn=limit_file_size if limited else None,
        timeout=300,
        check=False,
    )


def test_a_full_disk_fails_the_write_step_commits_nothing_and_leaves_no_data_file(
    project: Project, tmp_path: Path, duckdb_connection: Any
) -> None:
    # max_retries 1, but a full disk is terminal: no retry streams the files into the same wall again
    project.write_spec(base_spec("people", retry_config={"max_retries": 1, "retry_delay_seconds": 0}))
    rnd = random.Random(11)  # noqa: S311 - reproducible test data
    source = project.write_data(
        "people.csv", "id,name\n" + "".join(f"{i},{rnd.getrandbits(256):064x}\n" for i in range(ROWS))
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    failed = materialize(project, tmp, limited=True, log_level="INFO", DATIVO_LOG_FORMAT="json")

    assert failed.returncode == 2, failed.stderr[-3000:]
    [line] = failed.stdout.splitlines()
    # the file that could not be written is named
    assert re.fullmatch(
        rf"people: FAILED at write: {re.escape(str(project.warehouse))}/testdomain/testproduct/people/data/"
        r"\S+\.parquet: cannot write: \[Errno 27\] File too large",
        line,
    ), line
    assert "Traceback" not in failed.stdout
    # the write step failed once and was not retried (a full disk is terminal)
    events = [(line["event"], line["step"]) for line in _json_objects_in(failed.stderr)]
    assert ("STEP_FAILURE", "people.people__write") in events, failed.stderr[-3000:]
    assert [e for e in events if e[0] in ("STEP_FAILURE", "STEP_UP_FOR_RETRY")] == [
        ("STEP_FAILURE", "people.people__write")
    ], events
    # nothing committed: the table the failed run created is dropped again, with its metadata files; no data
    # file is left (the partial one was removed)
    assert not project.catalog().table_exists("testdomain.people")
    assert [p for p in project.warehouse.rglob("*") if p.is_file()] == []
    assert list(tmp.iterdir()) == []

    done = materialize(project, tmp, limited=False)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"people: ok rows_read={ROWS} committed={ROWS} rejected=0 files=1 ")
    table = project.table("testdomain.people")
    rows = branch_rows(table, "acme")
    assert sorted(r["id"] for r in rows) == list(range(ROWS))
    assert {r["_source_file"] for r in rows} == {str(source)}
    assert len(duckdb_branch_rows(duckdb_connection, table, "acme")) == ROWS
    [data_file] = project.warehouse.rglob("*.parquet")
    assert data_file.stat().st_size > FILE_SIZE_LIMIT
