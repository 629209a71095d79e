"""The committed branch state: compacted into a state file at every commit, read from the head alone, and still
read (by walking the history) for tables written before state files existed."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

from dativo_dagster import commit as commit_module
from dativo_dagster import maintenance, table_state
from dativo_dagster.commit import CommitResult, commit_files, ensure_table
from dativo_dagster.errors import TerminalError
from dativo_dagster.maintenance import MIN_AGE_HOURS, expire_snapshots, remove_unreferenced_metadata
from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import Partitioner, arrow_schema, iceberg_schema, partition_spec
from dativo_dagster.table_state import (
    RUN_ID_KEY,
    SOURCE_STATE_KEY,
    STATE_FILE_PREFIX,
    STATE_FOLDER,
    read_branch_state,
    source_state_of,
    state_file_of,
)
from dativo_dagster.write import WrittenFile
from dativo_dagster_tests.conftest import base_spec, branch_rows

BRANCH = "acme"
NAME = "testdomain.people"


@pytest.fixture
def catalog(tmp_path: Path) -> SqlCatalog:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=warehouse.as_uri())
    spec = AssetSpecModel.model_validate(base_spec(target={"partitioning": []}))
    ensure_table(catalog, spec.table_identifier, iceberg_schema(spec.fields), lambda s: partition_spec(spec, s),
                 str(warehouse / spec.table_path))
    return catalog


def tiny_file(table: Table, source: str, ids: list[int]) -> WrittenFile:
    """One Parquet file of ``ids`` read from ``source``, as the write step makes it."""
    path = f"{table.location()}/data/{uuid.uuid4().hex}.parquet"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "name": [f"n{i}" for i in ids],
                             "_ingested_at": [datetime(2025, 1, 1, tzinfo=timezone.utc)] * len(ids),
                             "_source_file": [source] * len(ids), "_run_id": ["r"] * len(ids)},
                            schema=arrow_schema(table.schema())), path)
    return WrittenFile(uri=path, size_bytes=Path(path).stat().st_size, record_count=len(ids), partition_path="",
                       partition_values=[])


def load(catalog: SqlCatalog, run_id: str, sources: dict[str, str], *, ids: int = 0, overwrite: bool = False
         ) -> CommitResult:
    """An incremental run ``run_id`` that read ``sources`` (one row per id from the first, if any)."""
    table = catalog.load_table(NAME)
    files = [tiny_file(table, next(iter(sources)), list(range(ids)))] if ids else []
    return commit_files(table, branch=BRANCH, files=files, partitioner=Partitioner(table.spec(), table.schema()),
                        run_id=run_id, properties={SOURCE_STATE_KEY: json.dumps(sources)}, overwrite=overwrite,
                        sources=sources, replace_sources=not overwrite, record_sources=not overwrite)


def walked_state(table: Table, branch: str) -> dict[str, str]:
    """The source state as tables without state files are read: every snapshot's own share, the newest winning."""
    state: dict[str, str] = {}
    for snapshot in ancestors_of(table.snapshot_by_name(branch), table.metadata):
        for uri, version in source_state_of(snapshot).items():
            state.setdefault(uri, version)
    return state


def state_files(table: Table) -> set[str]:
    return {str(p) for p in Path(table.location_provider().metadata_path).glob(f"{STATE_FILE_PREFIX}*.json")}


def legacy_commit(catalog: SqlCatalog, run_id: str, sources: dict[str, str]) -> None:
    """A commit as made before state files existed: its summary names its run and sources, and no state file."""
    table = catalog.load_table(NAME)
    properties = {RUN_ID_KEY: run_id, SOURCE_STATE_KEY: json.dumps(sources)}
    if table.metadata.refs.get(BRANCH) is None:
        with table.transaction() as tx:
            tx.update_snapshot(snapshot_properties={}, branch="main").fast_append().commit()
        table = table.refresh()
        table.manage_snapshots().create_branch(table.current_snapshot().snapshot_id, BRANCH).commit()
        table = table.refresh()
    with table.transaction() as tx:
        tx.update_snapshot(snapshot_properties=properties, branch=BRANCH).fast_append().commit()


def test_the_state_is_read_from_the_head_alone_and_equals_the_whole_history(catalog: SqlCatalog) -> None:
    load(catalog, "run-1", {"/a.csv": "1", "/b.csv": "1"}, ids=2)
    load(catalog, "run-2", {"/a.csv": "2"}, ids=3)  # a changed: its rows are replaced, in two snapshots
    load(catalog, "run-3", {"/c.csv": "1"})  # an empty file: recorded all the same
    table = catalog.load_table(NAME)

    state = read_branch_state(table, BRANCH)

    assert state.sources == {"/a.csv": "2", "/b.csv": "1", "/c.csv": "1"} == walked_state(table, BRANCH)
    assert (state.snapshots_read, state.compacted) == (1, True)
    newest = {}
    for snapshot in ancestors_of(table.snapshot_by_name(BRANCH), table.metadata):
        newest.setdefault(snapshot.summary.additional_properties.get(RUN_ID_KEY), snapshot.snapshot_id)
    assert list(state.runs) == ["run-3", "run-2", "run-1"]
    assert state.runs == {run: newest[run] for run in ("run-3", "run-2", "run-1")}
    assert state.head == table.snapshot_by_name(BRANCH).snapshot_id
    assert sorted(r["id"] for r in branch_rows(table, BRANCH)) == [0, 1, 2]
    # every commit names its own state file, which holds the state before it
    head_file = json.loads(Path(state_file_of(table.snapshot_by_name(BRANCH))).read_text())
    assert head_file["sources"] == {"/a.csv": "2", "/b.csv": "1"}
    assert [run for run, _ in head_file["runs"]] == ["run-2", "run-1"]


def test_a_table_written_before_state_files_is_walked_then_compacted_by_its_next_commit(catalog: SqlCatalog) -> None:
    legacy_commit(catalog, "old-1", {"/a.csv": "1"})
    legacy_commit(catalog, "old-2", {"/b.csv": "1", "/a.csv": "2"})
    table = catalog.load_table(NAME)
    walked = read_branch_state(table, BRANCH)
    assert walked.sources == {"/a.csv": "2", "/b.csv": "1"} and list(walked.runs) == ["old-2", "old-1"]
    assert (walked.snapshots_read, walked.compacted) == (3, False)  # old-2, old-1, and main's first (branch point)

    result = load(catalog, "new-1", {"/c.csv": "1"}, ids=1)
    assert load(catalog, "old-1", {"/a.csv": "1"}, ids=1).already_committed

    state = read_branch_state(catalog.load_table(NAME), BRANCH)
    assert state.sources == {"/a.csv": "2", "/b.csv": "1", "/c.csv": "1"}
    assert (state.snapshots_read, state.compacted) == (1, True)
    assert state.runs["new-1"] == result.snapshot_id and list(state.runs) == ["new-1", "old-2", "old-1"]


def test_a_missing_state_file_falls_back_to_the_summaries(
    catalog: SqlCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    load(catalog, "run-1", {"/a.csv": "1"}, ids=1)
    load(catalog, "run-2", {"/b.csv": "1"}, ids=1)
    table = catalog.load_table(NAME)
    Path(state_file_of(table.snapshot_by_name(BRANCH))).unlink()

    with caplog.at_level(logging.WARNING, logger="dativo_dagster.table_state"):
        state = read_branch_state(table, BRANCH)

    assert state.sources == {"/a.csv": "1", "/b.csv": "1"} and list(state.runs) == ["run-2", "run-1"]
    assert state.snapshots_read == 2 and state.compacted  # run-1's own file holds the rest
    assert "is missing" in caplog.text


def test_a_state_file_of_a_newer_format_is_refused(catalog: SqlCatalog) -> None:
    load(catalog, "run-1", {"/a.csv": "1"}, ids=1)
    table = catalog.load_table(NAME)
    Path(state_file_of(table.snapshot_by_name(BRANCH))).write_text('{"format": 2, "sources": {}, "runs": []}')

    with pytest.raises(TerminalError, match="format 2"):
        read_branch_state(table, BRANCH)


def test_an_overwrite_starts_the_source_state_afresh_and_keeps_the_runs(catalog: SqlCatalog) -> None:
    load(catalog, "run-1", {"/a.csv": "1"}, ids=2)
    load(catalog, "run-2", {"/b.csv": "1"}, ids=1, overwrite=True)
    table = catalog.load_table(NAME)

    state = read_branch_state(table, BRANCH)

    assert state.sources == {"/b.csv": "1"}
    assert list(state.runs) == ["run-2", "run-1"]
    assert sorted(r["_source_file"] for r in branch_rows(table, BRANCH)) == ["/b.csv"]


def test_the_runs_remembered_are_the_newest_ones(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_state, "RUNS_REMEMBERED", 3)
    for k in range(6):
        load(catalog, f"run-{k}", {f"/f{k}.csv": "1"}, ids=1)
    table = catalog.load_table(NAME)

    state = read_branch_state(table, BRANCH)

    assert list(state.runs) == ["run-5", "run-4", "run-3", "run-2"]  # the head's own, and 3 from its file
    assert len(state.sources) == 6  # source files are never forgotten


def test_a_refused_commit_removes_its_state_file(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    load(catalog, "run-1", {"/a.csv": "1"}, ids=1)
    real = commit_module._commit_once
    calls = []

    def refused_once(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise CommitFailedException("another writer won")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(commit_module, "_commit_once", refused_once)
    monkeypatch.setattr(commit_module, "COMMIT_BACKOFF_SECONDS", (0.0, 0.0))

    load(catalog, "run-2", {"/b.csv": "1"}, ids=1)

    table = catalog.load_table(NAME)
    named = {state_file_of(s) for s in table.metadata.snapshots} - {None}
    assert len(calls) == 2 and state_files(table) == named and len(named) == 2
    assert read_branch_state(table, BRANCH).sources == {"/a.csv": "1", "/b.csv": "1"}


def test_a_metadata_folder_that_refuses_state_files_gets_them_in_the_state_folder(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SeaweedFS's REST catalog does: Iceberg's own files only under metadata/ (Access Denied for ours)."""
    io_class = type(catalog.load_table(NAME).io)
    real_new_output = io_class.new_output
    refused = []

    def new_output(self: object, location: str) -> object:
        if f"/metadata/{STATE_FILE_PREFIX}" in location:
            refused.append(location)
            raise PermissionError(f"Access Denied: {location}")
        return real_new_output(self, location)  # type: ignore[arg-type]

    monkeypatch.setattr(io_class, "new_output", new_output)
    load(catalog, "run-1", {"/a.csv": "1"}, ids=2)
    load(catalog, "run-2", {"/b.csv": "1"}, ids=1)
    load(catalog, "run-3", {"/a.csv": "2"}, ids=1)  # a changed: its rows are replaced
    table = catalog.load_table(NAME)

    folder = Path(table.location()) / STATE_FOLDER
    # one per commit (run-3's delete and append snapshots name the same one)
    named = {state_file_of(s) for s in ancestors_of(table.snapshot_by_name(BRANCH), table.metadata)} - {None}
    # the metadata folder is asked once: the next commits write next to the head's state file at once
    assert len(refused) == 1 and state_files(table) == set()
    assert {str(p) for p in folder.glob(f"{STATE_FILE_PREFIX}*.json")} == named and len(named) == 3
    state = read_branch_state(table, BRANCH)
    assert (state.snapshots_read, state.compacted) == (1, True)  # the head's file, no walk through the history
    assert state.sources == {"/a.csv": "2", "/b.csv": "1"} == walked_state(table, BRANCH)
    assert list(state.runs) == ["run-3", "run-2", "run-1"]
    assert sorted(r["id"] for r in branch_rows(table, BRANCH)) == [0, 0]

    # expiry, then the maintenance clean-up: the expired snapshots' state files go, the head's stays
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    expire_snapshots(table, older_than=later, keep_last=1)
    table = catalog.load_table(NAME)
    now = time.time()
    monkeypatch.setattr(maintenance, "wall_clock", lambda: now + MIN_AGE_HOURS * 3600 + 60)  # a day later
    report = remove_unreferenced_metadata(table, S3Settings(), older_than_seconds=MIN_AGE_HOURS * 3600)
    head_file = state_file_of(table.snapshot_by_name(BRANCH))
    assert {str(p) for p in folder.glob("*")} == {head_file}
    assert named - {head_file} <= set(report.removed)
    assert read_branch_state(table, BRANCH).sources == {"/a.csv": "2", "/b.csv": "1"}


def test_expiry_keeps_the_history_of_a_branch_until_a_commit_compacts_its_state(catalog: SqlCatalog) -> None:
    for k in range(3):
        legacy_commit(catalog, f"old-{k}", {f"/old{k}.csv": "1"})
    later = datetime.now(timezone.utc) + timedelta(minutes=1)  # every snapshot counts as old

    kept_whole = expire_snapshots(catalog.load_table(NAME), older_than=later, keep_last=1)

    assert kept_whole.expired == [] and kept_whole.history_kept == [BRANCH]
    load(catalog, "new-0", {"/new0.csv": "1"}, ids=1)
    compacted = expire_snapshots(catalog.load_table(NAME), older_than=later, keep_last=1)
    table = catalog.load_table(NAME)
    assert len(compacted.expired) == 3 and compacted.history_kept == []
    assert {s.snapshot_id for s in table.metadata.snapshots} == {
        table.snapshot_by_name(BRANCH).snapshot_id, table.snapshot_by_name("main").snapshot_id}
    state = read_branch_state(table, BRANCH)
    assert state.sources == {"/old0.csv": "1", "/old1.csv": "1", "/old2.csv": "1", "/new0.csv": "1"}
    assert set(state.runs) == {"old-0", "old-1", "old-2", "new-0"}
