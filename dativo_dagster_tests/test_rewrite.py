"""Replacing a source file's rows: whole files deleted, mixed files rewritten by the project's writer, one commit."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table

import dativo_dagster.commit as commit_module
from dativo_dagster.commit import commit_files
from dativo_dagster.errors import CommitError, TerminalError
from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import Partitioner, arrow_schema
from dativo_dagster.write import WriterSettings, WrittenFile, run_writer_settings, write_batches
from dativo_dagster_tests.conftest import branch_rows
from dativo_dagster_tests.table_checks import assert_written_by_project, data_files
from dativo_dagster_tests.test_commit import (  # noqa: F401 - fixtures
    BRANCH,
    catalog,
    commit_source,
    spec,
    table,
    write_files,
)

TABLE = "testdomain.people"
RUN_1 = "11111111-aaaa-4aaa-8aaa-000000000001"
RUN_2 = "22222222-bbbb-4bbb-8bbb-000000000002"
RUN_3 = "33333333-cccc-4ccc-8ccc-000000000003"
WHEN = datetime(2025, 11, 7, 12, tzinfo=timezone.utc)


def settings(spec: AssetSpecModel, run_id: str) -> WriterSettings:
    return run_writer_settings(spec, branch=BRANCH, run_id=run_id, ingested_at=WHEN, s3=S3Settings())


def commit_run(
    table: Table, spec: AssetSpecModel, run_id: str, files: list[WrittenFile], sources: dict[str, str]
) -> Any:
    """Commit as the asset's commit step does for an incremental run that read ``sources``."""
    return commit_source(table, run_id, files, sources, writer=settings(spec, run_id))


def rows(table: Table) -> list[tuple[int, str, str]]:
    return sorted((r["id"], r["_source_file"], r["_run_id"]) for r in branch_rows(table, BRANCH))


def parquet_on_disk(table: Table) -> set[str]:
    return {str(p) for p in Path(table.location().removeprefix("file://")).rglob("*.parquet")}


@pytest.fixture
def loaded(catalog: SqlCatalog, table: Table, spec: AssetSpecModel) -> Table:
    """Run 1 loaded a.csv and b.csv into one data file; run 2 loaded c.csv into a file of its own."""
    mixed = write_files(table, RUN_1, [1, 2, 3], when=WHEN, source=["/src/a.csv", "/src/b.csv", "/src/b.csv"])
    commit_run(table, spec, RUN_1, mixed, {"/src/a.csv": "1", "/src/b.csv": "1"})
    table = catalog.load_table(TABLE)
    commit_run(table, spec, RUN_2, write_files(table, RUN_2, [7], when=WHEN, source="/src/c.csv"), {"/src/c.csv": "1"})
    return catalog.load_table(TABLE)


def test_a_mixed_file_is_rewritten_by_the_project_writer_and_a_whole_one_deleted(
    catalog: SqlCatalog, loaded: Table, spec: AssetSpecModel
) -> None:
    table = loaded
    [mixed, only_c] = sorted(data_files(table, BRANCH), key=lambda uri: RUN_2[:8] in uri)
    versions = len(table.metadata.metadata_log)
    new_b = write_files(table, RUN_3, [4, 5], when=WHEN, source="/src/b.csv")
    new_c = write_files(table, RUN_3, [8], when=WHEN, source="/src/c.csv")

    result = commit_run(table, spec, RUN_3, new_b + new_c, {"/src/b.csv": "2", "/src/c.csv": "2"})

    table = catalog.load_table(TABLE)
    assert len(table.metadata.metadata_log) == versions + 1  # one commit
    assert result.replaced_sources == ["/src/b.csv", "/src/c.csv"]
    # each source's latest content exactly once; a.csv's row survives with its own run id
    assert rows(table) == [
        (1, "/src/a.csv", RUN_1), (4, "/src/b.csv", RUN_3), (5, "/src/b.csv", RUN_3), (8, "/src/c.csv", RUN_3)
    ]
    files = data_files(table, BRANCH)
    assert mixed not in files and only_c not in files
    [survivor] = [uri for uri in files if uri not in {f.uri for f in new_b + new_c}]
    keys = assert_written_by_project(table, survivor, run_id=RUN_3)  # name, folder and footer of our writer
    assert (keys["asset-name"], keys["owner"], keys["classification"], keys["record-count"]) == (
        spec.name, spec.team.owner, "internal,pii", "1"
    )
    assert keys["partition"] == "ingest_date=2025-11-07"
    # the delete and the survivors' file in one overwrite snapshot, then the run's append
    head = table.snapshot_by_name(BRANCH)
    exchange = table.snapshot_by_id(head.parent_snapshot_id)
    assert (exchange.summary.operation.value, head.summary.operation.value) == ("overwrite", "append")
    assert exchange.summary["deleted-data-files"] == "2" and exchange.summary["added-data-files"] == "1"
    assert exchange.summary.additional_properties["dativo.run-id"] == RUN_3


def test_a_refused_commit_removes_the_rewritten_files_and_a_retry_rewrites_again(
    catalog: SqlCatalog, loaded: Table, spec: AssetSpecModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = loaded
    before = parquet_on_disk(table)
    metadata_location = table.metadata_location
    new_b = write_files(table, RUN_3, [4], when=WHEN, source="/src/b.csv")
    ours = {f.uri for f in new_b}
    monkeypatch.setattr(commit_module, "COMMIT_ATTEMPTS", 2)
    monkeypatch.setattr(commit_module, "COMMIT_BACKOFF_SECONDS", (0.0, 0.0))
    real = catalog.commit_table
    attempts: list[set[str]] = []

    def refuse(table: Table, requirements: Any, updates: Any) -> Any:
        attempts.append(parquet_on_disk(table) - before - ours)  # the survivors' files of this attempt
        raise CommitFailedException("another writer won")

    monkeypatch.setattr(catalog, "commit_table", refuse)
    with pytest.raises(CommitError, match="after 2 attempts"):
        commit_run(table, spec, RUN_3, new_b, {"/src/b.csv": "2"})
    # every attempt rewrote the mixed file, and removed its new file once refused: the storage is as it was
    assert [len(new) for new in attempts] == [1, 1] and attempts[0] != attempts[1]
    assert parquet_on_disk(table) == before | ours
    table = catalog.load_table(TABLE)
    assert table.metadata_location == metadata_location

    monkeypatch.setattr(catalog, "commit_table", real)
    commit_run(table, spec, RUN_3, new_b, {"/src/b.csv": "2"})
    table = catalog.load_table(TABLE)
    assert rows(table) == [(1, "/src/a.csv", RUN_1), (4, "/src/b.csv", RUN_3), (7, "/src/c.csv", RUN_2)]


def test_an_overwrite_deletes_whole_files_and_writes_none(
    catalog: SqlCatalog, loaded: Table, spec: AssetSpecModel
) -> None:
    table = loaded
    before = parquet_on_disk(table)
    files = write_files(table, RUN_3, [9], when=WHEN, source="/src/a.csv")
    commit_files(
        table, branch=BRANCH, files=files, partitioner=Partitioner(table.spec(), table.schema()), run_id=RUN_3,
        properties={}, overwrite=True, writer=settings(spec, RUN_3),
    )
    table = catalog.load_table(TABLE)
    assert data_files(table, BRANCH) == [f.uri for f in files]
    assert parquet_on_disk(table) == before | {f.uri for f in files}  # no file written by pyiceberg
    assert rows(table) == [(9, "/src/a.csv", RUN_3)]


def test_replacing_a_source_without_writer_settings_fails_clearly_and_changes_nothing(
    catalog: SqlCatalog, loaded: Table
) -> None:
    table = loaded
    metadata_location = table.metadata_location
    files = write_files(table, RUN_3, [4], when=WHEN, source="/src/b.csv")
    with pytest.raises(TerminalError, match=r"testdomain.people@acme: replacing the rows of 1 source file\(s\)"):
        commit_files(
            table, branch=BRANCH, files=files, partitioner=Partitioner(table.spec(), table.schema()), run_id=RUN_3,
            properties={}, sources={"/src/b.csv": "2"}, replace_sources=True,
        )
    assert catalog.load_table(TABLE).metadata_location == metadata_location


def test_rewritten_files_keep_the_target_size_rule(catalog: SqlCatalog, table: Table, spec: AssetSpecModel) -> None:
    """CONTRACT 4: the survivors of many mixed files go through one writer with the run's target size, so every
    rewritten file but the partition's last is between half and 110 % of the target."""
    rng = np.random.default_rng(7)
    n = 60_000
    names = [rng.bytes(48).hex() for _ in range(n)]  # incompressible text: about 6 MB in all
    sources = np.where(np.arange(n) % 2 == 0, "/src/a.csv", "/src/b.csv").tolist()
    schema = arrow_schema(table.schema())
    batch = pa.RecordBatch.from_pydict(
        {"id": list(range(n)), "name": names, "_ingested_at": [WHEN] * n, "_source_file": sources,
         "_run_id": [RUN_1] * n},
        schema=schema,
    )
    target = 1 << 20
    first = dataclasses.replace(settings(spec, RUN_1), target_bytes=target)
    written = write_batches(
        [batch], first.writer(f"{table.location()}/data", schema, Partitioner(table.spec(), table.schema()))
    )
    assert len(written) >= 4  # every one of them mixes a.csv and b.csv
    commit_files(
        table, branch=BRANCH, files=written, partitioner=Partitioner(table.spec(), table.schema()), run_id=RUN_1,
        properties={"dativo.source-state": json.dumps({"/src/a.csv": "1", "/src/b.csv": "1"})},
        sources={"/src/a.csv": "1", "/src/b.csv": "1"}, replace_sources=True, record_sources=True,
    )
    table = catalog.load_table(TABLE)

    third = dataclasses.replace(settings(spec, RUN_3), target_bytes=target)
    commit_files(
        table, branch=BRANCH, files=[], partitioner=Partitioner(table.spec(), table.schema()), run_id=RUN_3,
        properties={"dativo.source-state": json.dumps({"/src/b.csv": "2"})}, sources={"/src/b.csv": "2"},
        replace_sources=True, record_sources=True, writer=third,
    )
    table = catalog.load_table(TABLE)
    files = data_files(table, BRANCH)
    assert not set(files) & {f.uri for f in written} and len(files) >= 2
    sizes = sorted(Path(uri.removeprefix("file://")).stat().st_size for uri in files)
    assert all(target / 2 <= size <= target * 1.1 for size in sizes[1:]), sizes  # the smallest may be the last
    assert sizes[0] <= target * 1.1
    for uri in files:
        assert_written_by_project(table, uri, run_id=RUN_3)
    ids = sorted(r["id"] for r in branch_rows(table, BRANCH))
    assert ids == list(range(0, n, 2))  # a.csv's rows, each once
