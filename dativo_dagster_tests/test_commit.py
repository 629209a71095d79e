"""The commit step without Dagster: exactly once per run, on a branch made from main, atomic overwrite; markers."""

from __future__ import annotations

import gzip
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.types import LongType, StringType

from dativo_dagster import markers
from dativo_dagster.commit import (
    RUN_ID_KEY,
    TABLE_PROPERTIES,
    commit_files,
    ensure_table,
    find_run_commit,
)
from dativo_dagster.errors import CommitError, TerminalError
from dativo_dagster.maintenance import expire_snapshots
from dativo_dagster.markers import (
    CACHE_AFTER_FETCHED,
    cache_uri,
    committed_files,
    committed_records,
    marker_uri,
    read_commit_markers,
    write_commit_marker,
)
from dativo_dagster.spec import AssetSpecModel, FieldSpec
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import Partitioner, arrow_schema, iceberg_schema, partition_spec
from dativo_dagster.write import PartitionedParquetWriter, WrittenFile, write_batches
from dativo_dagster_tests.conftest import base_spec, branch_rows, duckdb_branch_rows

BRANCH = "acme"


@pytest.fixture
def spec() -> AssetSpecModel:
    return AssetSpecModel.model_validate(base_spec(target={"partitioning": ["ingest_date"]}))


@pytest.fixture
def catalog(tmp_path: Path) -> SqlCatalog:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    return SqlCatalog("dativo", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=warehouse.as_uri())


@pytest.fixture
def table(catalog: SqlCatalog, spec: AssetSpecModel, tmp_path: Path) -> Table:
    location = str(tmp_path / "warehouse" / spec.table_path)
    return ensure_table(
        catalog, spec.table_identifier, iceberg_schema(spec.fields), lambda s: partition_spec(spec, s), location
    )


def write_files(
    table: Table, run_id: str, ids: list[int], when: datetime | None = None, source: str | list[str] = "/src/people.csv"
) -> list[WrittenFile]:
    """Parquet files of ``ids`` as the write step would make them for ``run_id`` (``source``: one source file for
    all rows, or one per row)."""
    schema = arrow_schema(table.schema())
    ingested_at = when or datetime(2025, 11, 7, 12, tzinfo=timezone.utc)
    batch = pa.RecordBatch.from_pydict(
        {
            "id": ids,
            "name": [f"n{i}" for i in ids],
            "_ingested_at": [ingested_at] * len(ids),
            "_source_file": [source] * len(ids) if isinstance(source, str) else source,
            "_run_id": [run_id] * len(ids),
        },
        schema=schema,
    )
    writer = PartitionedParquetWriter(
        location=f"{table.location()}/data",
        schema=schema,
        partitioner=Partitioner(table.spec(), table.schema()),
        target_bytes=1 << 20,
        file_prefix=run_id[:8],
        metadata={},
        s3=S3Settings(),
    )
    return write_batches([batch], writer)


def commit(table: Table, run_id: str, files: list[WrittenFile], overwrite: bool = False) -> Any:
    return commit_files(
        table,
        branch=BRANCH,
        files=files,
        partitioner=Partitioner(table.spec(), table.schema()),
        run_id=run_id,
        properties={"dativo.source-state": json.dumps({"/src/people.csv": "1"})},
        overwrite=overwrite,
    )


def ids_on(table: Table, branch: str) -> list[int]:
    return sorted(r["id"] for r in branch_rows(table, branch))


def test_the_same_run_commits_once(catalog: SqlCatalog, table: Table) -> None:
    files = write_files(table, "run-a", [1, 2])
    first = commit(table, "run-a", files)
    table = catalog.load_table("testdomain.people")
    metadata_after_first = table.metadata_location
    second = commit(table, "run-a", files)
    table = catalog.load_table("testdomain.people")

    assert not first.already_committed and second.already_committed
    assert second.snapshot_id == first.snapshot_id
    assert table.metadata_location == metadata_after_first
    assert ids_on(table, BRANCH) == [1, 2]
    assert first.table_rows == second.table_rows == 2
    summary = table.snapshot_by_name(BRANCH).summary.additional_properties
    assert summary[RUN_ID_KEY] == "run-a"
    assert json.loads(summary["dativo.source-state"]) == {"/src/people.csv": "1"}


def test_a_run_is_recognised_below_the_branch_head(catalog: SqlCatalog, table: Table) -> None:
    files_a = write_files(table, "run-a", [1])
    commit(table, "run-a", files_a)
    commit(catalog.load_table("testdomain.people"), "run-b", write_files(table, "run-b", [2]))
    table = catalog.load_table("testdomain.people")

    found = find_run_commit(table, BRANCH, "run-a")
    assert found is not None and found.snapshot_id != table.snapshot_by_name(BRANCH).snapshot_id
    assert commit(table, "run-a", files_a).already_committed
    assert ids_on(catalog.load_table("testdomain.people"), BRANCH) == [1, 2]


def test_a_run_is_recognised_after_its_snapshot_expired(catalog: SqlCatalog, table: Table) -> None:
    """A re-executed commit step of a run whose snapshot was expired adds nothing: the branch's state
    file remembers the run (the commit here is not incremental, so only the run id can tell)."""
    files_a = write_files(table, "run-a", [1])
    first = commit(table, "run-a", files_a)
    for run, ids in (("run-b", [2]), ("run-c", [3])):
        commit(catalog.load_table("testdomain.people"), run, write_files(table, run, ids))
    table = catalog.load_table("testdomain.people")
    report = expire_snapshots(table, older_than=datetime.now(timezone.utc) + timedelta(minutes=1), keep_last=1)
    table = catalog.load_table("testdomain.people")
    assert first.snapshot_id in report.expired and table.snapshot_by_id(first.snapshot_id) is None
    metadata_location = table.metadata_location

    again = commit(table, "run-a", files_a)

    assert again.already_committed and again.snapshot_id == first.snapshot_id
    assert catalog.load_table("testdomain.people").metadata_location == metadata_location
    assert ids_on(catalog.load_table("testdomain.people"), BRANCH) == [1, 2, 3]


def test_the_branch_starts_at_main_and_main_gets_no_data(catalog: SqlCatalog, table: Table) -> None:
    created = table.metadata_location
    result = commit(table, "run-a", write_files(table, "run-a", [1]))
    table = catalog.load_table("testdomain.people")
    # a new table's first run: main's empty snapshot and the branch in one metadata version, then the append
    earlier = [entry.metadata_file for entry in table.metadata.metadata_log]
    assert len(earlier) == 2 and earlier[0] == created
    assert table.metadata.snapshots[0].summary.additional_properties["dativo.operation"] == "init"

    main = table.snapshot_by_name("main")
    head = table.snapshot_by_name(BRANCH)
    assert head.snapshot_id == result.snapshot_id
    assert [s.snapshot_id for s in ancestors_of(head, table.metadata)] == [head.snapshot_id, main.snapshot_id]
    assert ids_on(table, "main") == []
    assert list(table.scan(snapshot_id=main.snapshot_id).plan_files()) == []


def test_overwrite_replaces_everything_in_one_metadata_version(catalog: SqlCatalog, table: Table) -> None:
    commit(table, "run-a", write_files(table, "run-a", [1, 2]))
    commit(catalog.load_table("testdomain.people"), "run-b", write_files(table, "run-b", [3]))
    table = catalog.load_table("testdomain.people")
    versions = len(table.metadata.metadata_log)

    result = commit(table, "run-c", write_files(table, "run-c", [7, 8]), overwrite=True)
    table = catalog.load_table("testdomain.people")
    assert ids_on(table, BRANCH) == [7, 8]
    assert len(table.metadata.metadata_log) == versions + 1
    assert result.table_rows == 2
    head = table.snapshot_by_name(BRANCH)
    run_c = [s for s in ancestors_of(head, table.metadata) if s.summary.additional_properties.get(RUN_ID_KEY) == "run-c"]
    assert [s.summary.operation.value for s in run_c] == ["append", "delete"]
    # the same overwrite again is recognised and deletes nothing
    again = commit(table, "run-c", write_files(table, "run-c", [9]), overwrite=True)
    assert again.already_committed
    assert ids_on(catalog.load_table("testdomain.people"), BRANCH) == [7, 8]


def set_properties(table: Table, **properties: str) -> Table:
    with table.transaction() as tx:
        tx.set_properties({key.replace("__", ".").replace("_", "-"): value for key, value in properties.items()})
    return table.refresh()


def test_the_manifests_of_many_runs_are_merged_and_every_file_stays_listed_once(
    catalog: SqlCatalog, table: Table, duckdb_connection: Any
) -> None:
    table = set_properties(table, commit__manifest__min_count_to_merge="4")  # 100 unless set
    written = []
    for k in range(9):
        files = write_files(table, f"run-{k}", [k])
        written += [f.uri for f in files]
        commit(catalog.load_table("testdomain.people"), f"run-{k}", files)
        head = catalog.load_table("testdomain.people").snapshot_by_name(BRANCH)
        assert len(head.manifests(table.io)) < 4 + 1, f"after run {k}"  # a fast append would list k + 1
    table = catalog.load_table("testdomain.people")
    head = table.snapshot_by_name(BRANCH)
    listed = [task.file.file_path for task in table.scan(snapshot_id=head.snapshot_id).plan_files()]
    assert sorted(listed) == sorted(written) and len(written) == 9
    assert ids_on(table, BRANCH) == list(range(9))
    assert int(head.summary["total-data-files"]) == 9 and int(head.summary["total-records"]) == 9
    # a merged manifest lists the earlier runs' files as existing ones, under the snapshots that added them
    existing = [m for m in head.manifests(table.io) if m.existing_files_count]
    assert existing and sum(m.existing_files_count for m in existing) >= 4
    assert sorted(duckdb_branch_rows(duckdb_connection, table, BRANCH, "id")) == [(k,) for k in range(9)]


def test_old_metadata_files_are_deleted_beyond_the_newest_ones_kept(catalog: SqlCatalog, table: Table) -> None:
    table = set_properties(table, write__metadata__previous_versions_max="2")  # 100 unless set
    folder = Path(table.metadata_location.removeprefix("file://")).parent
    for k in range(6):
        commit(catalog.load_table("testdomain.people"), f"run-{k}", write_files(table, f"run-{k}", [k]))
    table = catalog.load_table("testdomain.people")
    kept = {Path(entry.metadata_file.removeprefix("file://")) for entry in table.metadata.metadata_log}
    on_disk = set(folder.glob("*.metadata.json"))
    assert len(kept) == 2 and on_disk == kept | {Path(table.metadata_location.removeprefix("file://"))}
    assert ids_on(table, BRANCH) == list(range(6))


def test_a_table_made_without_the_properties_gets_them_at_its_next_commit_and_keeps_its_own(
    catalog: SqlCatalog, table: Table
) -> None:
    with table.transaction() as tx:
        tx.remove_properties("commit.manifest-merge.enabled", "write.metadata.delete-after-commit.enabled")
        tx.set_properties({"write.metadata.previous-versions-max": "7", "commit.retry.num-retries": "4"})
    commit(table.refresh(), "run-a", write_files(table, "run-a", [1]))
    properties = catalog.load_table("testdomain.people").metadata.properties
    assert properties["commit.manifest-merge.enabled"] == "true"
    assert properties["write.metadata.delete-after-commit.enabled"] == "true"
    assert properties["write.metadata.previous-versions-max"] == "7"  # the table's own settings stay
    assert properties["commit.retry.num-retries"] == "4"
    assert {key: properties[key] for key in TABLE_PROPERTIES} == {**TABLE_PROPERTIES,
                                                                  "write.metadata.previous-versions-max": "7"}


def refuse_every_commit(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the catalog refuse every commit as if another writer always won; returns the list of attempts."""
    from pyiceberg.exceptions import CommitFailedException

    attempts: list[int] = []

    def refuse(table: Table, requirements: Any, updates: Any) -> Any:
        attempts.append(len(updates))
        raise CommitFailedException("another writer won")

    monkeypatch.setattr(catalog, "commit_table", refuse)
    return attempts


def test_pyiceberg_never_retries_our_commits_and_a_users_retry_setting_stays(
    catalog: SqlCatalog, table: Table, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Our own loop retries a lost race, re-reading the committed state; pyiceberg's rebasing retry would re-apply a
    stale plan. The switch lives only in the transaction's in-memory metadata: other engines' jobs on the table
    (compaction, deletes) keep their retries, and a user's value on the table stays."""
    import dativo_dagster.commit as commit_module

    assert "commit.retry.num-retries" not in table.metadata.properties  # a new table has no such property
    commit(table, "run-a", write_files(table, "run-a", [1]))
    table = catalog.load_table("testdomain.people")
    assert "commit.retry.num-retries" not in table.metadata.properties
    table = set_properties(table, commit__retry__num_retries="2")  # a user's own value for other engines

    monkeypatch.setattr(commit_module, "COMMIT_ATTEMPTS", 3)
    monkeypatch.setattr(commit_module, "COMMIT_BACKOFF_SECONDS", (0.0, 0.0))
    attempts = refuse_every_commit(catalog, monkeypatch)
    files = write_files(table, "run-b", [2])
    with caplog.at_level("WARNING"), pytest.raises(CommitError, match="after 3 attempts"):
        commit(table, "run-b", files)
    # one catalog request per attempt of ours: pyiceberg with the table's "2" would have sent 3 per attempt
    assert len(attempts) == 3
    ours = [r.getMessage() for r in caplog.records if "conflicted" in r.getMessage()]
    assert len(ours) == 3 and "attempt 1 of 3" in ours[0]
    assert not [r for r in caplog.records if "retrying" in r.getMessage() and r.name.startswith("pyiceberg")]

    monkeypatch.undo()
    commit(catalog.load_table("testdomain.people"), "run-b", files)
    table = catalog.load_table("testdomain.people")
    assert ids_on(table, BRANCH) == [1, 2]
    assert table.metadata.properties["commit.retry.num-retries"] == "2"


def test_the_retry_switch_that_earlier_versions_wrote_onto_tables_is_removed_once(
    catalog: SqlCatalog, table: Table
) -> None:
    """Earlier versions wrote commit.retry.num-retries=0 onto every table and forced it back at each commit, so on a
    table without this version's mark a "0" is theirs: it is removed, once; a "0" a user sets later stays."""
    from dativo_dagster.commit import PROPERTIES_VERSION_KEY

    with table.transaction() as tx:  # a table as earlier versions left it
        tx.remove_properties(PROPERTIES_VERSION_KEY)
        tx.set_properties({"commit.retry.num-retries": "0"})
    commit(table.refresh(), "run-a", write_files(table, "run-a", [1]))
    table = catalog.load_table("testdomain.people")
    assert "commit.retry.num-retries" not in table.metadata.properties
    assert table.metadata.properties[PROPERTIES_VERSION_KEY] == TABLE_PROPERTIES[PROPERTIES_VERSION_KEY]

    table = set_properties(table, commit__retry__num_retries="0")  # now the user's own choice
    commit(table, "run-b", write_files(table, "run-b", [2]))
    table = catalog.load_table("testdomain.people")
    assert table.metadata.properties["commit.retry.num-retries"] == "0"
    assert ids_on(table, BRANCH) == [1, 2]


def test_a_run_without_files_adds_no_snapshot(catalog: SqlCatalog, table: Table) -> None:
    commit(table, "run-a", write_files(table, "run-a", [1]))
    table = catalog.load_table("testdomain.people")
    before = table.metadata_location
    result = commit(table, "run-b", [])
    assert result.snapshot_id is None and result.rows == 0 and result.table_rows == 1
    assert catalog.load_table("testdomain.people").metadata_location == before


def commit_source(
    table: Table, run_id: str, files: list[WrittenFile], sources: dict[str, str], writer: Any = None
) -> Any:
    """Commit as an incremental run that read ``sources`` (the asset's commit step does the same); ``writer`` (the
    run's ``WriterSettings``) is needed when replacing a source rewrites files it shares with others."""
    return commit_files(
        table,
        branch=BRANCH,
        files=files,
        partitioner=Partitioner(table.spec(), table.schema()),
        run_id=run_id,
        properties={"dativo.source-state": json.dumps(sources)},
        sources=sources,
        replace_sources=True,
        record_sources=True,
        writer=writer,
    )


def test_a_lost_race_is_retried_and_commits_once(
    catalog: SqlCatalog, table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    """Two runs read the same source file; run B commits it first through its own handle, then run A commits from a
    handle that predates B's commit: A's first attempt is refused, the retry sees that the branch now holds the file
    and replaces B's rows with A's, so the file's rows are on the branch exactly once."""
    source = {"/src/people.csv": "1"}
    commit_source(table, "run-0", write_files(table, "run-0", [0], source="/src/other.csv"), {"/src/other.csv": "1"})
    handle_a = catalog.load_table("testdomain.people")
    handle_b = catalog.load_table("testdomain.people")
    files_a = write_files(handle_a, "run-a", [1, 2])
    files_b = write_files(handle_b, "run-b", [1, 2])

    won = commit_source(handle_b, "run-b", files_b, source)
    stale_head = handle_a.snapshot_by_name(BRANCH).snapshot_id
    with caplog.at_level("WARNING", logger="dativo_dagster.commit"):
        lost = commit_source(handle_a, "run-a", files_a, source)

    conflicts = [r.getMessage() for r in caplog.records if "conflicted" in r.getMessage()]
    assert len(conflicts) == 1 and "attempt 1 of" in conflicts[0]  # the race happened, and was retried once
    assert stale_head != won.snapshot_id and lost.snapshot_id not in (None, won.snapshot_id)
    assert lost.replaced_sources == ["/src/people.csv"]
    table = catalog.load_table("testdomain.people")
    rows = branch_rows(table, BRANCH)
    assert sorted((r["id"], r["_source_file"], r["_run_id"]) for r in rows) == [
        (0, "/src/other.csv", "run-0"), (1, "/src/people.csv", "run-a"), (2, "/src/people.csv", "run-a")
    ]
    assert lost.table_rows == 3
    # the winner's run stays recorded: re-executing its commit adds nothing
    assert commit_source(table, "run-b", files_b, source).already_committed
    assert ids_on(catalog.load_table("testdomain.people"), BRANCH) == [0, 1, 2]


def test_ensure_table_evolves_new_columns_and_refuses_type_changes(
    catalog: SqlCatalog, table: Table, spec: AssetSpecModel
) -> None:
    wider = [*spec.fields, FieldSpec(name="email", type="string")]
    evolved = ensure_table(
        catalog, spec.table_identifier, iceberg_schema(wider), lambda s: partition_spec(spec, s), table.location()
    )
    assert isinstance(evolved.schema().find_field("email").field_type, StringType)
    assert isinstance(evolved.schema().find_field("id").field_type, LongType)

    retyped = [FieldSpec(name="id", type="string"), spec.fields[1]]
    with pytest.raises(TerminalError, match="column 'id' is long in the table but string in the spec"):
        ensure_table(
            catalog, spec.table_identifier, iceberg_schema(retyped), lambda s: partition_spec(spec, s), table.location()
        )


def written(uri: str, rows: int) -> WrittenFile:
    return WrittenFile(uri=uri, size_bytes=10, record_count=rows, partition_path="", partition_values=[])


def test_commit_markers_list_exactly_the_committed_files(tmp_path: Path) -> None:
    location = str(tmp_path / "people")
    s3 = S3Settings()
    first = write_commit_marker(
        location=location, run_id="run-a", files=[written(f"{location}/data/a.parquet", 2)], properties={},
        s3=s3, table="d.people",
    )
    assert Path(marker_uri(location, "run-a")).is_file()
    again = write_commit_marker(
        location=location, run_id="run-a", files=[written(f"{location}/data/other.parquet", 5)], properties={},
        s3=s3, table="d.people",
    )
    assert not first.already_committed and again.already_committed
    assert committed_files(location, s3) == [f"{location}/data/a.parquet"]

    write_commit_marker(
        location=location, run_id="run-b", files=[written(f"{location}/data/b.parquet", 3)], properties={},
        s3=s3, table="d.people",
    )
    assert committed_files(location, s3) == [f"{location}/data/a.parquet", f"{location}/data/b.parquet"]
    assert committed_records(location, s3) == 5

    write_commit_marker(
        location=location, run_id="run-0", files=[written(f"{location}/data/c.parquet", 1)], properties={},
        s3=s3, table="d.people", overwrite=True,
    )
    assert committed_files(location, s3) == [f"{location}/data/c.parquet"]
    assert committed_records(location, s3) == 1
    assert not list(Path(location, "_commits").glob("*.tmp"))


def test_marker_cache_saves_the_reads_of_markers_already_read_and_never_changes_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = str(tmp_path / "events")
    s3 = S3Settings()
    runs = CACHE_AFTER_FETCHED + 4
    for i in range(runs):
        write_commit_marker(
            location=location, run_id=f"run-{i:02d}", files=[written(f"{location}/data/{i:02d}.parquet", i + 1)],
            properties={}, s3=s3, table="d.events",
        )
    fetched: list[str] = []
    read = markers.read_small_object

    def counting(uri: str, s3: S3Settings) -> bytes | None:
        if "/_commits/" in uri:
            fetched.append(uri.rsplit("/", 1)[-1])
        return read(uri, s3)

    monkeypatch.setattr(markers, "read_small_object", counting)

    def files() -> list[str]:
        return [f["uri"].rsplit("/", 1)[-1] for m in read_commit_markers(location, s3) for f in m["files"]]

    # the first read fetches every marker and keeps them; readers' markers are untouched
    assert files() == [f"{i:02d}.parquet" for i in range(runs)]
    assert len(fetched) == runs
    cache = Path(cache_uri(location))
    assert cache.parent.name == "_dativo_state" and cache.parent.parent == Path(location)
    cached = json.loads(gzip.decompress(cache.read_bytes()))["markers"]
    assert sorted(cached) == [f"run-{i:02d}.json" for i in range(runs)]
    assert sorted(p.name for p in Path(location, "_commits").iterdir()) == sorted(cached)

    # the next read fetches nothing; a new marker is fetched alone
    fetched.clear()
    assert files() == [f"{i:02d}.parquet" for i in range(runs)]
    assert fetched == []
    write_commit_marker(
        location=location, run_id="run-99", files=[written(f"{location}/data/99.parquet", 7)], properties={},
        s3=s3, table="d.events",
    )
    assert files()[-1] == "99.parquet" and fetched == ["run-99.json"]

    # the listing decides: a removed marker is gone, a marker written again under its name is read again
    fetched.clear()
    Path(marker_uri(location, "run-03")).unlink()
    replaced = Path(marker_uri(location, "run-05"))
    body = json.loads(replaced.read_text())
    body["files"][0]["uri"] = f"{location}/data/05-again.parquet"
    replaced.write_text(json.dumps(body))
    os.utime(replaced, ns=(1, 1))
    names = files()
    assert "03.parquet" not in names and "05.parquet" not in names and "05-again.parquet" in names
    # (run-99 is read again too: the cache is only rewritten once a read fetched CACHE_AFTER_FETCHED markers)
    assert fetched == ["run-05.json", "run-99.json"]
    assert committed_records(location, s3) == sum(range(1, runs + 1)) - 4 + 7

    # a damaged cache is ignored (every marker read, the same answer) and replaced
    cache.write_bytes(b"not gzip")
    fetched.clear()
    assert files() == names
    assert len(fetched) == runs
    assert len(json.loads(gzip.decompress(cache.read_bytes()))["markers"]) == runs
