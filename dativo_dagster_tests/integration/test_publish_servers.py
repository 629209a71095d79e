"""Publishing to main (CONTRACT 9) on real servers: PostgreSQL's SQL catalog and SeaweedFS's Iceberg REST catalog,
warehouse on SeaweedFS S3. A run killed with SIGKILL around its publishing commit leaves both refs moved or neither;
readers of main (pyiceberg, DuckDB, no snapshot id) see the branch's rows; the catalog itself refuses a commit whose
main moved meanwhile, and a main written to directly makes the run refuse with the table unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table.update import AssertRefSnapshotId, SetSnapshotRefUpdate

from dativo_dagster_tests.conftest import Project, base_spec
from dativo_dagster_tests.publish_kill import (
    KILL_POINTS,
    assert_both_refs_or_neither,
    refs,
    start_killed_publish,
    wait_killed,
)
from dativo_dagster_tests.table_checks import failures

from .deployment import Deployment, make_deployment, unique
from .servers import PostgresCluster, SeaweedFS
from .test_servers import duckdb_for

BRANCH = "acme"
KINDS = ["postgres", "rest"]


def published_project(root: Path, domain: str) -> Project:
    project = Project(root)
    project.write_spec(base_spec(
        "people",
        domain=domain,
        source={"type": "csv", "files": [{"path": "data/*.csv"}], "incremental": {"strategy": "file_modified_time"}},
        target={"partitioning": ["ingest_date"], "publish": True},
    ))
    project.write_data("a.csv", "id,name\n1,Ann\n2,Bob\n")
    return project


def rows_of_branch(table: Any) -> list[tuple[int, str]]:
    head = table.snapshot_by_name(BRANCH)
    return sorted((r["id"], r["_run_id"]) for r in table.scan(snapshot_id=head.snapshot_id).to_arrow().to_pylist())


def rows_of_main(table: Any, con: Any) -> list[tuple[int, str]]:
    """main as pyiceberg and DuckDB read it without naming a snapshot; both must agree."""
    read = sorted((r["id"], r["_run_id"]) for r in table.scan().to_arrow().to_pylist())
    duck = sorted(con.execute(f"SELECT id, _run_id FROM iceberg_scan('{table.metadata_location}')").fetchall())
    assert duck == read
    return read


def deploy(kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Deployment:
    deployment = make_deployment(kind, seaweedfs, postgres, tmp_path)
    deployment.apply(monkeypatch)
    return deployment


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_killed_around_its_publishing_commit_moves_both_refs_or_neither(
    kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    staging: Path,
) -> None:
    deployment = deploy(kind, seaweedfs, postgres, tmp_path, monkeypatch)
    con = duckdb_for(seaweedfs)
    started = {}
    for point in KILL_POINTS:
        domain = unique("publish_")
        project = published_project(tmp_path / point / "project", domain)
        first = project.materialize()
        assert first.success, failures(first)
        project.write_data("b.csv", "id,name\n3,Cy\n")
        before = refs(deployment.catalog().load_table(f"{domain}.people"), BRANCH)
        assert before[BRANCH] == before["main"]
        process = start_killed_publish(tmp_path / point, point, project.specs_dir, deployment.env)
        started[point] = (project, domain, before, process)

    for point, (project, domain, before, process) in started.items():
        killed = wait_killed(tmp_path / point, point, process)
        table = deployment.catalog().load_table(f"{domain}.people")
        assert_both_refs_or_neither(killed, table, BRANCH, before)
        assert rows_of_main(table, con) == rows_of_branch(table)

        again = project.materialize()
        assert again.success, failures(again)
        table = deployment.catalog().load_table(f"{domain}.people")
        assert sorted(id_ for id_, _ in rows_of_branch(table)) == [1, 2, 3]
        assert rows_of_main(table, con) == rows_of_branch(table)
        now = refs(table, BRANCH)
        assert now[BRANCH] == now["main"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_catalog_refuses_a_publish_whose_main_moved_and_a_diverged_main_fails_the_run(
    kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    staging: Path,
) -> None:
    deployment = deploy(kind, seaweedfs, postgres, tmp_path, monkeypatch)
    domain = unique("publish_")
    project = published_project(tmp_path / "project", domain)
    assert project.materialize().success
    catalog = deployment.catalog()
    stale = catalog.load_table(f"{domain}.people")
    published = refs(stale, BRANCH)

    other = catalog.load_table(f"{domain}.people")  # a writer of main, not of the branch
    other.append(pa.Table.from_pylist([], schema=other.schema().as_arrow()))
    moved = catalog.load_table(f"{domain}.people")
    assert refs(moved, BRANCH)["main"] != published["main"]

    # the catalog itself holds main's requirement: a publish planned before that write is refused
    with pytest.raises(CommitFailedException, match="main"):
        catalog.commit_table(
            stale,
            (AssertRefSnapshotId(ref="main", snapshot_id=published["main"]),),
            (SetSnapshotRefUpdate(ref_name="main", type="branch", snapshot_id=published[BRANCH]),),
        )
    assert catalog.load_table(f"{domain}.people").metadata_location == moved.metadata_location

    # and the next run sees main diverged and commits nothing
    project.write_data("b.csv", "id,name\n3,Cy\n")
    failed = project.materialize()
    messages = failures(failed)
    assert not failed.success and len(messages) == 1 and "cannot publish acme to main" in messages[0]
    table = catalog.load_table(f"{domain}.people")
    assert table.metadata_location == moved.metadata_location
    assert refs(table, BRANCH) == refs(moved, BRANCH)
