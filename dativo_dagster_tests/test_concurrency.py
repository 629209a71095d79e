"""Concurrent runs of one asset on the SQLite catalog (and with ``catalog: none``): optimistic commits retried
on a fresh view of the table, so that every run succeeds and every source file is held exactly once."""

from __future__ import annotations

from typing import Any

import pytest

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.table_checks import (
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

    results = materialize_concurrently(project, RUNS)

    assert all(r.success for r in results), [failures(r) for r in results]
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

    results = materialize_concurrently(project, RUNS)

    assert all(r.success for r in results), [failures(r) for r in results]
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

    results = materialize_concurrently(project, runs)

    assert all(r.success for r in results), [failures(r) for r in results]
    assert marker_rows(location) == expected_rows(files)
    project.write_data("events/f0.csv", csv_text([1, 2], tag="v2"))
    touch(files[0], 5)
    results = materialize_concurrently(project, runs)
    assert all(r.success for r in results), [failures(r) for r in results]
    assert marker_rows(location) == expected_rows(files)
