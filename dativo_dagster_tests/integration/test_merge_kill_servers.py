"""The merge kill matrix (``test_merge_kill.py``) on real servers: S3 (SeaweedFS) with its Iceberg REST catalog, and
S3 with PostgreSQL's SQL catalog (CONTRACT 8 and 9, issue 18).

The points that differ on a server: mid-way through the commit step's rewrite (a survivors' file uploaded to S3,
nothing committed), and just before and just after the catalog commit that moves both refs (``publish: true``).
After each kill and the next run, every key is on the branch once with the last values, the deleted keys are gone,
``main`` is the branch (pyiceberg and DuckDB), every referenced file exists on S3, the maintenance job removes
exactly what the killed run left, and every data file at the head (the re-run's rewritten files included) carries
CONTRACT 4's object metadata and tags (read with boto3).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import pytest
from pyiceberg.table import Table

from dativo_dagster.merge import KEYS_FOLDER
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.publish_kill import REWRITE_POINT
from dativo_dagster_tests.table_checks import assert_written_by_project, data_files
from dativo_dagster_tests.test_merge import BRANCH
from dativo_dagster_tests.test_merge_kill import (
    FIRST,
    KilledMerge,
    case_id,
    check_killed_then_run_again,
    start_killed_merge,
)

from .deployment import CONTRACT_METADATA_KEYS, CONTRACT_TAG_KEYS, Deployment, list_keys, make_deployment, unique
from .servers import PostgresCluster, SeaweedFS
from .test_servers import duckdb_for

KINDS = ["postgres", "rest"]
# killed while the rewrite uploads (branch only), and around the catalog commit that moves both refs
SERVER_CASES = [(REWRITE_POINT, False), ("before", True), ("after", True)]


@dataclass
class S3Store:
    """A kill case's table on a server deployment: the deployment's catalog, objects listed with boto3."""

    deployment: Deployment
    identifier: str

    def table(self) -> Table:
        return self.deployment.catalog().load_table(self.identifier)

    def _objects(self, table: Table, folder: str) -> set[str]:
        bucket, prefix = table.location().removeprefix("s3://").split("/", 1)
        keys = list_keys(self.deployment.seaweedfs, bucket, f"{prefix.rstrip('/')}/{folder}/")
        return {f"s3://{bucket}/{key}" for key in keys if key.endswith(".parquet")}

    def stored_files(self, table: Table) -> set[str]:
        return self._objects(table, "data")

    def keys_files(self, table: Table) -> set[str]:
        return self._objects(table, KEYS_FOLDER)


@pytest.fixture(scope="module", params=KINDS)
def server_kills(
    request: pytest.FixtureRequest, seaweedfs: SeaweedFS, postgres: PostgresCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Deployment, dict[str, KilledMerge]]]:
    """Per catalog kind, one table per case (its own domain), merged once, then a merge run of each killed at its
    point, all at the same time."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"merge-kill-{kind}")
    deployment = make_deployment(kind, seaweedfs, postgres, root)
    started = {}
    with pytest.MonkeyPatch.context() as patch:
        deployment.apply(patch)
        for point, publish in SERVER_CASES:
            key, domain = case_id(point, publish), unique("mk_")
            staging = root / key / "tmp"  # the killed run's local copies of its uploads stay in the case's folder
            staging.mkdir(parents=True)
            started[key] = start_killed_merge(
                root / key, point, publish, domain=domain, env={**deployment.env, "TMPDIR": str(staging)},
                store=lambda _project, d=domain: S3Store(deployment, f"{d}.people"),
            )
        yield deployment, {key: case.wait() for key, case in started.items()}


def assert_contract_objects(deployment: Deployment, table: Table) -> int:
    """Every data file at the branch head is the project's (name, folder, footer) with CONTRACT 4's S3 user metadata
    and tags; returns how many of them a merge rewrote (files holding rows that an earlier run loaded)."""
    client = deployment.seaweedfs.boto3_client()
    rewritten = 0
    for uri in data_files(table, BRANCH):
        footer = assert_written_by_project(table, uri)
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        head = client.head_object(Bucket=bucket, Key=key)
        assert set(head["Metadata"]) == CONTRACT_METADATA_KEYS, uri
        assert head["Metadata"]["run-id"] == footer["run-id"]
        assert head["Metadata"]["record-count"] == footer["record-count"]
        tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
        assert set(tags) == CONTRACT_TAG_KEYS and tags["domain"] == table.name()[-2], uri
        with table.io.new_input(uri).open() as stream:
            runs = set(pq.read_table(stream, columns=["_run_id"]).column("_run_id").to_pylist())
        rewritten += bool(runs - {footer["run-id"]})
    return rewritten


@pytest.mark.parametrize(("point", "publish"), SERVER_CASES, ids=[case_id(*c) for c in SERVER_CASES])
def test_a_merge_killed_on_a_server_catalog_then_run_again_holds_every_key_once_with_contract_files(
    server_kills: tuple[Deployment, dict[str, KilledMerge]], point: str, publish: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployment, cases = server_kills
    deployment.apply(monkeypatch)
    case = cases[case_id(point, publish)]
    con: Any = duckdb_for(deployment.seaweedfs)

    table = check_killed_then_run_again(case, point, con, monkeypatch)

    rows = branch_rows(table, BRANCH)
    (rerun,) = {r["_run_id"] for r in rows if r["id"] == 150}
    assert {r["id"] for r in rows}.isdisjoint(range(200, 210))  # the deleted keys stay gone
    assert {r["id"] for r in rows if r["_run_id"] != rerun} == set(FIRST) - set(range(100, 210))
    # the merge that landed (the killed run's after its commit, else the re-run's) rewrote the files holding the
    # changed and deleted keys among the first run's rows
    assert assert_contract_objects(deployment, table) > 0


def test_the_server_store_names_files_as_the_catalog_references_them(
    server_kills: tuple[Deployment, dict[str, KilledMerge]],
) -> None:
    """The listing the checks above rely on sees the committed files (it is not empty by a naming mismatch)."""
    _, cases = server_kills
    store = next(iter(cases.values())).store
    table = store.table()
    committed = set(data_files(table, BRANCH))
    assert committed and committed <= store.stored_files(table)


__all__ = ["Project"]
