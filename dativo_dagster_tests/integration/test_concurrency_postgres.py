"""Concurrent runs of one asset against a PostgreSQL catalog (pyiceberg SqlCatalog): every run succeeds and every
source file is held exactly once, on the first runs of a new catalog and with new and changed files later. The runs'
commits are released together, and the commit loop's "conflicted (attempt N of M)" lines show that they raced."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster_tests.conftest import Project
from dativo_dagster_tests.table_checks import (
    CONFLICT_LINE,
    commit_conflicts,
    csv_text,
    duckdb_rows,
    expected_rows,
    failures,
    iceberg_rows,
    incremental_spec,
    materialization,
    materialize_concurrently,
    touch,
)

from .servers import PostgresCluster

RUNS = 4
TABLE = "testdomain.events"
BRANCH = "acme"


@pytest.fixture
def catalog_uri(postgres: PostgresCluster, project: Project, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL database as the deployment's catalog (``DATIVO_CATALOG_URI``), with the project's local
    warehouse (``DATIVO_WAREHOUSE``: a deployment sets both, CONTRACT 6)."""
    uri = postgres.create_database(f"concurrency_{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("DATIVO_CATALOG_URI", uri)
    monkeypatch.setenv("DATIVO_WAREHOUSE", str(project.warehouse))
    yield uri
    # the runs' catalog clients keep pooled connections until they are garbage: close them while the server
    # still runs, or their finalizers log errors (with tracebacks) whenever the collector gets to them later
    gc.collect()


def test_concurrent_runs_on_a_postgresql_catalog_hold_each_file_once(
    project: Project, catalog_uri: str, duckdb_connection: Any
) -> None:
    # max_retries 2: the first runs of a new catalog race to create pyiceberg's own catalog tables (transient)
    project.write_spec(incremental_spec(retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    first = [project.write_data(f"events/f{i}.csv", csv_text(range(i * 100, i * 100 + 40))) for i in range(3)]
    catalog = SqlCatalog("dativo", uri=catalog_uri, warehouse=project.warehouse.as_uri())

    with commit_conflicts() as conflicts:
        results = materialize_concurrently(project, RUNS, commit_together=True)

    assert all(r.success for r in results), [failures(r) for r in results]
    assert conflicts.lines, "no commit conflicted: the runs committed one after the other"
    table = catalog.load_table(TABLE)
    assert iceberg_rows(table, BRANCH) == expected_rows(first)
    assert duckdb_rows(duckdb_connection, table, BRANCH) == expected_rows(first)

    # a second wave: one file changed, two new; the same number of runs at once
    project.write_data("events/f0.csv", csv_text(range(900, 905), tag="v2"))
    touch(first[0], 5)
    added = [project.write_data(f"events/n{i}.csv", csv_text(range(1000 + i * 10, 1005 + i * 10))) for i in range(2)]

    with commit_conflicts() as conflicts:
        results = materialize_concurrently(project, RUNS, commit_together=True)

    assert all(r.success for r in results), [failures(r) for r in results]
    # all runs planned their first attempt on the same branch head: one won it, every other one conflicted
    first_attempts = [m for m in conflicts.lines if CONFLICT_LINE.search(m).group(1) == "1"]  # type: ignore[union-attr]
    assert len(first_attempts) == RUNS - 1, conflicts.lines
    table = catalog.load_table(TABLE)
    assert iceberg_rows(table, BRANCH) == expected_rows(first + added)
    assert duckdb_rows(duckdb_connection, table, BRANCH) == expected_rows(first + added)
    committers = {s.summary.additional_properties.get(RUN_ID_KEY) for s in table.metadata.snapshots} - {None}
    assert committers & {r.run_id for r in results}, "the second wave committed"
    assert materialization(project.materialize(), "events")["nothing_new"] is True
