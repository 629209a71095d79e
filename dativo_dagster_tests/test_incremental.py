"""Incremental ingestion (CONTRACT 5) end to end: nothing new, new files, changed files, lookback, catalog: none."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dativo_dagster.sources import csv as extract_module
from dativo_dagster import markers as markers_module
from dativo_dagster.sources.csv import SourceFile
from dativo_dagster.incremental import (
    SOURCE_STATE_KEY,
    marker_source_state,
    parse_source_state,
    select_files,
    table_source_state,
)
from dativo_dagster.markers import cache_uri, read_commit_markers
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.table_checks import (
    assert_written_by_project,
    branch_snapshot_ids,
    csv_text,
    data_files,
    duckdb_marker_rows,
    duckdb_rows,
    expected_rows,
    iceberg_rows,
    incremental_spec,
    marker_rows,
    materialization,
    touch,
)

BRANCH = "acme"
TABLE = "testdomain.events"
NOW = datetime(2026, 1, 10, 12, tzinfo=timezone.utc)
DAY_NS = 86_400 * 10**9


def run(project: Project) -> dg.ExecuteInProcessResult:
    result = project.materialize()
    assert result.success, [e.message for e in result.get_step_failure_events()]
    return result


def run_ids(project: Project) -> dict[str, set[str]]:
    """Source file name -> the run ids its rows on the branch carry."""
    out: dict[str, set[str]] = {}
    for row in branch_rows(project.table(TABLE), BRANCH):
        out.setdefault(row["_source_file"].rsplit("/", 1)[-1], set()).add(row["_run_id"])
    return out


# ---- the pure selection rules -------------------------------------------------------------------------------


def source(uri: str, version: str, days_old: float = 0) -> SourceFile:
    modified = int((NOW - timedelta(days=days_old)).timestamp() * 1e9)
    return SourceFile(uri=uri, size=1, version=version, modified_ns=modified)


def test_select_files_sorts_new_changed_unchanged_and_too_old() -> None:
    listed = [source("/a", "1"), source("/b", "2"), source("/c", "3"), source("/old", "4", days_old=3)]
    selection = select_files(listed, {"/a": "1", "/b": "1", "/gone": "9"}, lookback_days=2, now=NOW)

    assert [f.uri for f in selection.to_read] == ["/b", "/c"]
    assert (selection.new, selection.changed, selection.unchanged) == (["/c"], ["/b"], ["/a"])
    assert selection.too_old == ["/old"]
    assert not selection.nothing_new
    assert selection.describe() == "1 new, 1 changed, 1 unchanged, 1 outside the lookback window"
    # lookback 0: no age limit at all
    assert [f.uri for f in select_files(listed, {}, lookback_days=0, now=NOW).to_read] == ["/a", "/b", "/c", "/old"]
    assert select_files(listed[:1], {"/a": "1"}, lookback_days=0, now=NOW).nothing_new


def test_source_state_parsing_tolerates_garbage() -> None:
    assert parse_source_state('{"/a": 1}') == {"/a": "1"}
    assert parse_source_state(None) == parse_source_state("") == parse_source_state("[1]") == {}
    assert parse_source_state("{not json") == {}
    markers = [
        {"properties": {SOURCE_STATE_KEY: '{"/a": "1", "/b": "1"}'}},
        {"properties": {}},
        {"properties": {SOURCE_STATE_KEY: '{"/a": "2"}'}},
    ]
    assert marker_source_state(markers) == {"/a": "2", "/b": "1"}


# ---- end to end on the embedded default ---------------------------------------------------------------------


def test_a_run_with_nothing_new_succeeds_says_so_and_adds_no_snapshot(project: Project) -> None:
    project.write_spec(incremental_spec())
    project.write_data("events/a.csv", csv_text([1, 2]))
    first = materialization(run(project), "events")
    table = project.table(TABLE)
    snapshots = branch_snapshot_ids(table, BRANCH)
    metadata_location = table.metadata_location

    second = materialization(run(project), "events")
    table = project.table(TABLE)

    assert first["nothing_new"] is False and first["rows_committed"] == 2
    assert second["nothing_new"] is True
    assert (second["rows_read"], second["rows_committed"], second["files_written"]) == (0, 0, 0)
    assert second["snapshot_id"] == ""
    assert second["dagster/row_count"] == 2
    assert branch_snapshot_ids(table, BRANCH) == snapshots
    assert table.metadata_location == metadata_location
    assert len(table.metadata.snapshots) == len(snapshots)
    assert not list((project.root / ".dativo" / "staging").glob("*/*")), "staging left behind"


def test_a_new_file_adds_only_its_rows(project: Project, duckdb_connection: Any) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    run(project)
    first_runs = run_ids(project)
    b = project.write_data("events/b.csv", csv_text([3, 4, 5]))

    metadata = materialization(run(project), "events")
    table = project.table(TABLE)

    assert (metadata["rows_read"], metadata["rows_committed"], metadata["nothing_new"]) == (3, 3, False)
    assert metadata["source_files"] == [str(b)]
    assert metadata["replaced_sources"] == []
    assert iceberg_rows(table, BRANCH) == expected_rows([a, b])
    assert duckdb_rows(duckdb_connection, table, BRANCH) == expected_rows([a, b])
    runs = run_ids(project)
    assert runs["a.csv"] == first_runs["a.csv"], "a.csv was loaded again"
    assert len(runs["b.csv"]) == 1 and runs["b.csv"] != runs["a.csv"]
    state = table_source_state(table, BRANCH)
    assert state == {str(f): f"{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in (a, b)}


def test_a_changed_file_replaces_its_rows_once(project: Project, duckdb_connection: Any) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2, 3]))
    b = project.write_data("events/b.csv", csv_text([10, 11]))
    run(project)
    runs_before = run_ids(project)
    before = project.table(TABLE)
    [shared] = data_files(before, BRANCH)  # one run, one partition: a and b share a data file
    versions_before = len(before.metadata.metadata_log)
    project.write_data("events/a.csv", csv_text([2, 3, 4, 5], tag="v2"))
    touch(a, 5)

    result = run(project)
    metadata = materialization(result, "events")
    table = project.table(TABLE)
    # one commit: the metadata log grew by exactly one version (file names are unique, so counting them cannot tell)
    assert len(table.metadata.metadata_log) == versions_before + 1
    assert table.metadata.metadata_log[-1].metadata_file == before.metadata_location
    # the shared file was rewritten by the project's writer (CONTRACT 4 footers and names), not by pyiceberg's
    files = data_files(table, BRANCH)
    assert shared not in files and len(files) == 2
    for uri in files:
        assert_written_by_project(table, uri, run_id=result.run_id)

    expected = expected_rows([a, b])
    assert sum(expected.values()) == 6
    assert iceberg_rows(table, BRANCH) == expected
    assert duckdb_rows(duckdb_connection, table, BRANCH) == expected
    assert not any(name.startswith("v1") for (_, name, src) in iceberg_rows(table, BRANCH) if src == str(a))
    assert metadata["replaced_sources"] == [str(a)]
    assert (metadata["rows_read"], metadata["rows_committed"], metadata["dagster/row_count"]) == (4, 4, 6)
    runs = run_ids(project)
    assert runs["b.csv"] == runs_before["b.csv"], "b.csv's rows must survive the rewrite of the shared data file"
    assert runs["a.csv"] == {result.run_id}
    assert table_source_state(table, BRANCH)[str(a)] == f"{a.stat().st_mtime_ns}:{a.stat().st_size}"
    # the delete and the append are one commit: no snapshot of the branch shows a without rows
    head = table.snapshot_by_name(BRANCH)
    parent = table.snapshot_by_id(head.parent_snapshot_id)
    assert parent.summary.additional_properties["dativo.run-id"] == result.run_id  # the replacing half
    assert parent.summary.operation.value == "overwrite" and head.summary.operation.value == "append"
    assert len([s for s in table.metadata.snapshots if s.summary.additional_properties.get("dativo.run-id")
                == result.run_id]) == 2
    history = [entry.metadata_file for entry in table.metadata.metadata_log]
    assert len(history) == len(set(history))

    # rewriting with the same content again still counts as changed (mtime), and still lands once
    project.write_data("events/a.csv", csv_text([2, 3, 4, 5], tag="v2"))
    touch(a, 10)
    run(project)
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected


def test_a_rewrite_that_keeps_the_mtime_but_changes_the_size_is_read_again(project: Project) -> None:
    # cp -p, rsync -t and touch -r put the old modification time back on new content
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    mtime_ns = a.stat().st_mtime_ns
    run(project)
    project.write_data("events/a.csv", csv_text([1, 2, 3], tag="v2"))
    os.utime(a, ns=(mtime_ns, mtime_ns))
    assert a.stat().st_mtime_ns == mtime_ns

    metadata = materialization(run(project), "events")
    table = project.table(TABLE)

    assert metadata["nothing_new"] is False and metadata["replaced_sources"] == [str(a)]
    assert iceberg_rows(table, BRANCH) == expected_rows([a])
    assert sum(iceberg_rows(table, BRANCH).values()) == 3
    assert table_source_state(table, BRANCH) == {str(a): f"{mtime_ns}:{a.stat().st_size}"}


def test_a_version_committed_before_sizes_were_recorded_still_matches_its_file(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tables committed by earlier releases hold the modification time alone: the upgrade reads nothing again
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    listed = extract_module._list_local

    def mtime_only(pattern: str, has_glob: bool) -> list[SourceFile]:
        return [dataclasses.replace(f, version=str(f.modified_ns)) for f in listed(pattern, has_glob)]

    monkeypatch.setattr(extract_module, "_list_local", mtime_only)
    run(project)
    assert table_source_state(project.table(TABLE), BRANCH) == {str(a): str(a.stat().st_mtime_ns)}
    monkeypatch.setattr(extract_module, "_list_local", listed)
    snapshots = branch_snapshot_ids(project.table(TABLE), BRANCH)

    metadata = materialization(run(project), "events")

    assert metadata["nothing_new"] is True and metadata["rows_read"] == 0
    assert branch_snapshot_ids(project.table(TABLE), BRANCH) == snapshots
    # a real change after the upgrade is still seen (a new modification time)
    project.write_data("events/a.csv", csv_text([1, 2, 3], tag="v2"))
    touch(a, 5)
    metadata = materialization(run(project), "events")
    assert metadata["replaced_sources"] == [str(a)]
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected_rows([a])
    assert table_source_state(project.table(TABLE), BRANCH) == {str(a): f"{a.stat().st_mtime_ns}:{a.stat().st_size}"}


def test_select_files_matches_an_mtime_only_version_to_the_same_mtime_at_any_size() -> None:
    committed = {"/a": "100", "/b": "100", "/c": "100:7", "/s3": '"etag1"'}
    listed = [SourceFile("/a", 7, "100:7", 100), SourceFile("/b", 7, "101:7", 101), SourceFile("/c", 8, "100:8", 100),
              SourceFile("/s3", 7, '"etag1"', 100)]

    selection = select_files(listed, committed, lookback_days=0, now=NOW)

    assert (selection.unchanged, selection.changed) == (["/a", "/s3"], ["/b", "/c"])


def test_the_quarantined_rows_of_a_changed_file_are_replaced_too(project: Project) -> None:
    project.write_spec(incremental_spec(schema_validation_mode="warn"))
    a = project.write_data("events/a.csv", "id,name\n1,ok\nx,bad-1\ny,bad-2\n")
    b = project.write_data("events/b.csv", "id,name\nz,bad-b\n")
    run(project)

    def quarantined() -> Counter[tuple[str, str]]:
        rows = branch_rows(project.table(f"{TABLE}__rejects"), BRANCH)
        return Counter((r["id"], r["_source_file"].rsplit("/", 1)[-1]) for r in rows)

    assert quarantined() == Counter({("x", "a.csv"): 1, ("y", "a.csv"): 1, ("z", "b.csv"): 1})

    project.write_data("events/a.csv", "id,name\n1,ok\nq,bad-3\n")
    touch(a, 5)
    metadata = materialization(run(project), "events")
    assert metadata["rows_rejected"] == 1
    assert quarantined() == Counter({("q", "a.csv"): 1, ("z", "b.csv"): 1})

    # a new version without any bad row empties a's quarantine, though the run writes no reject file
    project.write_data("events/a.csv", "id,name\n1,ok\n2,fine\n")
    touch(a, 10)
    metadata = materialization(run(project), "events")
    assert metadata["rows_rejected"] == 0
    assert quarantined() == Counter({("z", "b.csv"): 1})
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected_rows([a])
    assert str(b) in table_source_state(project.table(TABLE), BRANCH)

    # a new file without bad rows leaves the quarantine table alone: no empty snapshot there
    rejects_snapshots = len(project.table(f"{TABLE}__rejects").metadata.snapshots)
    c = project.write_data("events/c.csv", "id,name\n7,seven\n")
    run(project)
    assert len(project.table(f"{TABLE}__rejects").metadata.snapshots) == rejects_snapshots
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected_rows([a, c])


def test_files_whose_rows_are_all_quarantined_are_not_read_again(project: Project) -> None:
    project.write_spec(incremental_spec(schema_validation_mode="warn"))
    project.write_data("events/a.csv", "id,name\nx,bad\n")
    project.write_data("events/empty.csv", "id,name\n")
    first = materialization(run(project), "events")
    second = materialization(run(project), "events")

    assert first["rows_rejected"] == 1
    assert second["nothing_new"] is True, "a file that brought no valid row must still count as committed"
    rejects = branch_rows(project.table(f"{TABLE}__rejects"), BRANCH)
    assert [r["id"] for r in rejects] == ["x"]
    assert branch_rows(project.table(TABLE), BRANCH) == []


def test_lookback_days_leaves_old_files_unread(project: Project) -> None:
    spec = incremental_spec()
    spec["source"]["incremental"]["lookback_days"] = 2
    project.write_spec(spec)
    old = project.write_data("events/old.csv", csv_text([1]))
    touch(old, -3 * 86_400)
    recent = project.write_data("events/recent.csv", csv_text([2]))
    touch(recent, -1 * 86_400)

    metadata = materialization(run(project), "events")
    assert metadata["source_files"] == [str(recent)]
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected_rows([recent])
    assert materialization(run(project), "events")["nothing_new"] is True

    # the old file, touched again, is inside the window and read
    touch(old, 0)
    run(project)
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected_rows([old, recent])


def test_overwrite_specs_read_everything_every_run(project: Project) -> None:
    spec = incremental_spec()
    spec["target"] = {"partitioning": ["ingest_date"], "write_mode": "overwrite"}
    project.write_spec(spec)
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    run(project)
    metadata = materialization(run(project), "events")

    assert metadata["nothing_new"] is False and metadata["rows_committed"] == 2
    assert iceberg_rows(project.table(TABLE), BRANCH) == expected_rows([a])


@pytest.mark.parametrize("cached", [False, True], ids=["markers", "marker-cache"])
def test_catalog_none_reads_only_new_and_changed_files_and_shows_each_once(
    project: Project, monkeypatch: pytest.MonkeyPatch, cached: bool, duckdb_connection: Any
) -> None:
    if cached:  # every read that fetched a marker rewrites the cache, so the runs decide from the cache
        monkeypatch.setattr(markers_module, "CACHE_AFTER_FETCHED", 1)
    spec = incremental_spec()
    spec["target"] = {"catalog": "none", "partitioning": ["ingest_date"]}
    project.write_spec(spec)
    a = project.write_data("events/a.csv", csv_text([1, 2, 3]))
    b = project.write_data("events/b.csv", csv_text([10]))
    location = str(project.warehouse / "testdomain" / "testproduct" / "events")
    run(project)
    assert marker_rows(location) == expected_rows([a, b])

    project.write_data("events/a.csv", csv_text([3, 4], tag="v2"))
    touch(a, 5)
    c = project.write_data("events/c.csv", csv_text([20, 21]))
    metadata = materialization(run(project), "events")

    assert metadata["source_files"] == sorted([str(a), str(c)])
    assert metadata["rows_read"] == 4
    assert marker_rows(location) == expected_rows([a, b, c])
    # the documented DuckDB query over the markers sees each file's latest content exactly once too
    assert duckdb_marker_rows(duckdb_connection, location) == expected_rows([a, b, c])
    assert metadata["dagster/row_count"] == sum(expected_rows([a, b, c]).values())
    markers = read_commit_markers(location, S3Settings())
    assert len(markers) == 2
    assert set(json.loads(markers[-1]["properties"][SOURCE_STATE_KEY])) == {str(a), str(c)}

    # nothing new: no marker
    assert materialization(run(project), "events")["nothing_new"] is True
    assert len(read_commit_markers(location, S3Settings())) == 2
    assert marker_rows(location) == expected_rows([a, b, c])
    assert Path(cache_uri(location)).is_file() == cached
