"""Concurrent runs of one asset on the SQLite catalog (and with ``catalog: none``): optimistic commits retried
on a fresh view of the table, so that every run succeeds and every source file is held exactly once.

The runs' commits are released together (``commits_released_together``), and each test shows that the race
happened: the commit loop logged its "conflicted (attempt N of M)" line, or every run committed the same files."""

from __future__ import annotations

from typing import Any

import pytest

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster.incremental import SOURCE_STATE_KEY, parse_source_state
from dativo_dagster.markers import read_commit_markers
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.table_checks import (
    CONFLICT_LINE,
    commit_conflicts,
    csv_text,
    duckdb_rows,
    expected_rows,
    failures,
    iceberg_rows,
    incremental_spec,
    marker_rows,
    materialization,
    materialize_concurrently,
    touch,
)

RUNS = 4
TABLE = "testdomain.events"
BRANCH = "acme"


def sources(project: Project, count: int, start: int = 0) -> list[Any]:
    return [project.write_data(f"events/f{i}.csv", csv_text(range(i * 100, i * 100 + 40))) for i in
            range(start, start + count)]


def committed_runs(project: Project) -> list[str]:
    """Run ids of the snapshots of the data table, oldest first."""
    table = project.table(TABLE)
    return [s.summary.additional_properties[RUN_ID_KEY] for s in table.metadata.snapshots
            if s.summary is not None and RUN_ID_KEY in s.summary.additional_properties]


def test_concurrent_first_runs_on_a_new_catalog_load_each_file_once(project: Project, duckdb_connection: Any) -> None:
    # max_retries 2: the very first runs of a deployment race to create the SQLite catalog's own tables
    # ("table iceberg_tables already exists"); that error is transient and the step is retried
    project.write_spec(incremental_spec(retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    files = sources(project, 4)

    with commit_conflicts() as conflicts:
        results = materialize_concurrently(project, RUNS, commit_together=True)

    assert all(r.success for r in results), [failures(r) for r in results]
    # the race happened: at least one run's commit lost and was retried by the commit loop
    assert conflicts.lines, "no commit conflicted: the runs committed one after the other"
    table = project.table(TABLE)
    assert iceberg_rows(table, BRANCH) == expected_rows(files)
    assert duckdb_rows(duckdb_connection, table, BRANCH) == expected_rows(files)
    # the first commit appended, every later one replaced the same files' rows in one transaction
    committers = set(committed_runs(project))
    assert committers <= {r.run_id for r in results} and committers
    assert len({row["_run_id"] for row in branch_rows(table, BRANCH)}) == 1


def test_concurrent_runs_with_new_and_changed_files_commit_each_once(project: Project, duckdb_connection: Any) -> None:
    # no op retries at all: conflicts between the runs are the commit loop's business alone
    project.write_spec(incremental_spec(retry_config={"max_retries": 0, "retry_delay_seconds": 0}))
    first = sources(project, 3)
    assert project.materialize().success
    project.write_data("events/f1.csv", csv_text(range(500, 530), tag="v2"))
    touch(first[1], 5)
    added = sources(project, 3, start=3)

    with commit_conflicts() as conflicts:
        results = materialize_concurrently(project, RUNS, commit_together=True)

    assert all(r.success for r in results), [failures(r) for r in results]
    # all runs planned their first attempt on the same branch head: one won it, every other one conflicted
    first_attempts = [m for m in conflicts.lines if CONFLICT_LINE.search(m).group(1) == "1"]  # type: ignore[union-attr]
    assert len(first_attempts) == RUNS - 1, conflicts.lines
    assert all(f"commit to {TABLE}@{BRANCH} conflicted" in m for m in conflicts.lines), conflicts.lines
    files = first + added
    table = project.table(TABLE)
    assert iceberg_rows(table, BRANCH) == expected_rows(files)
    assert duckdb_rows(duckdb_connection, table, BRANCH) == expected_rows(files)
    # whoever committed last holds f1 and the new files; f0 and f2 still carry the first run's id
    by_file: dict[str, set[str]] = {}
    for row in branch_rows(table, BRANCH):
        by_file.setdefault(row["_source_file"].rsplit("/", 1)[-1], set()).add(row["_run_id"])
    assert by_file["f0.csv"] == by_file["f2.csv"] and len(by_file["f0.csv"]) == 1
    assert by_file["f0.csv"].isdisjoint(r.run_id for r in results)
    assert all(len(by_file[f"f{i}.csv"]) == 1 for i in range(6))

    # and the next run finds nothing new
    assert materialization(project.materialize(), "events")["nothing_new"] is True


@pytest.mark.parametrize("runs", [3])
def test_concurrent_runs_without_a_catalog_leave_each_file_visible_once(project: Project, runs: int) -> None:
    spec = incremental_spec(retry_config={"max_retries": 0, "retry_delay_seconds": 0})
    spec["target"] = {"catalog": "none", "partitioning": ["ingest_date"]}
    project.write_spec(spec)
    files = sources(project, 3)
    location = str(project.warehouse / "testdomain" / "testproduct" / "events")

    results = materialize_concurrently(project, runs, commit_together=True)

    assert all(r.success for r in results), [failures(r) for r in results]
    # the race happened: every run read every file (none saw another's marker) and committed them
    assert marker_sources(location) == {r.run_id: {str(f) for f in files} for r in results}
    assert marker_rows(location) == expected_rows(files)
    project.write_data("events/f0.csv", csv_text([1, 2], tag="v2"))
    touch(files[0], 5)
    second = materialize_concurrently(project, runs, commit_together=True)
    assert all(r.success for r in second), [failures(r) for r in second]
    # every run of the second wave read the changed file again: the markers hide all but one copy of it
    read_again = {run: read for run, read in marker_sources(location).items() if run in {r.run_id for r in second}}
    assert read_again == {r.run_id: {str(files[0])} for r in second}
    assert marker_rows(location) == expected_rows(files)


def marker_sources(location: str) -> dict[str, set[str]]:
    """Run id -> the source files its commit marker says it read."""
    return {
        m["run_id"]: set(parse_source_state(m["properties"].get(SOURCE_STATE_KEY)))
        for m in read_commit_markers(location, S3Settings())
    }
