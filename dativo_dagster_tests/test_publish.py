"""Publishing to main (CONTRACT 9, dativo_dagster.publish): the run's change moves the branch and main in one catalog
commit, readers of main (pyiceberg, DuckDB, no snapshot id) see the branch's rows, main that someone wrote to directly
is never moved, and a run that fails publishes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.table.update import AssertRefSnapshotId, RemoveSnapshotRefUpdate, SetSnapshotRefUpdate

from dativo_dagster import cli
from dativo_dagster.assets import build_asset
from dativo_dagster.commit import RUN_ID_KEY, commit_files
from dativo_dagster.errors import MainDivergedError
from dativo_dagster.spec import AssetSpecModel, LoadedSpec
from dativo_dagster.table_schema import Partitioner
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.publish_kill import (
    KILL_POINTS,
    assert_both_refs_or_neither,
    refs,
    start_killed_publish,
    wait_killed,
)
from dativo_dagster_tests.table_checks import failures, materialization, touch
from dativo_dagster_tests.test_commit import BRANCH, catalog, spec, table, write_files  # noqa: F401 - fixtures

TABLE = "testdomain.people"


def publish(table: Table, run_id: str, ids: list[int], *, overwrite: bool = False, publish: bool = True) -> Any:
    return commit_files(
        table,
        branch=BRANCH,
        files=write_files(table, run_id, ids),
        partitioner=Partitioner(table.spec(), table.schema()),
        run_id=run_id,
        properties={"dativo.source-state": json.dumps({"/src/people.csv": run_id})},
        overwrite=overwrite,
        publish=publish,
    )


def main_rows(table: Table) -> list[tuple[int, str]]:
    """What a reader of main sees with pyiceberg, without naming a snapshot."""
    return sorted((r["id"], r["_run_id"]) for r in table.scan().to_arrow().to_pylist())


def duckdb_main_rows(con: Any, table: Table) -> list[tuple[int, str]]:
    """What DuckDB sees reading the table's metadata file, without naming a snapshot."""
    return sorted(con.execute(f"SELECT id, _run_id FROM iceberg_scan('{table.metadata_location}')").fetchall())


def pairs(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted((r["id"], r["_run_id"]) for r in rows)


def ref_ids(table: Table) -> dict[str, int]:
    return {name: ref.snapshot_id for name, ref in table.metadata.refs.items()}


@pytest.fixture
def commits(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """Every catalog commit of the test: (requirements, updates)."""
    seen: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
    commit_table = SqlCatalog.commit_table

    def recording(self: SqlCatalog, table: Table, requirements: Any, updates: Any) -> Any:
        seen.append((tuple(requirements), tuple(updates)))
        return commit_table(self, table, requirements, updates)

    monkeypatch.setattr(SqlCatalog, "commit_table", recording)
    return seen


def test_each_run_moves_branch_and_main_in_one_catalog_commit(
    catalog: SqlCatalog, table: Table, commits: list[Any], duckdb_connection: Any
) -> None:
    publish(table, "run-a", [1, 2])  # a new table: main's empty snapshot and the branch first, then the run
    before = catalog.load_table(TABLE)
    before_location, refs_before = before.metadata_location, ref_ids(before)
    commits.clear()

    result = publish(before, "run-b", [3])
    table = catalog.load_table(TABLE)

    assert len(commits) == 1  # one catalog commit
    requirements, updates = commits[0]
    moved = {u.ref_name: u.snapshot_id for u in updates if isinstance(u, SetSnapshotRefUpdate)}
    assert moved == {BRANCH: result.snapshot_id, "main": result.snapshot_id}
    asserted = {r.ref: r.snapshot_id for r in requirements if isinstance(r, AssertRefSnapshotId)}
    assert asserted == refs_before
    # the metadata file before this one has both refs where they were: no version shows one without the other
    assert ref_ids(table) == {BRANCH: result.snapshot_id, "main": result.snapshot_id}
    assert table.metadata.metadata_log[-1].metadata_file == before_location
    assert result.main_snapshot_id == result.snapshot_id
    expected = [(1, "run-a"), (2, "run-a"), (3, "run-b")]
    assert pairs(branch_rows(table, BRANCH)) == expected
    assert main_rows(table) == expected
    assert duckdb_main_rows(duckdb_connection, table) == expected


def test_overwrite_and_append_publish_alike_and_main_always_reads_as_the_branch(
    catalog: SqlCatalog, table: Table, duckdb_connection: Any
) -> None:
    steps = [("run-a", [1, 2], False), ("run-b", [3], False), ("run-c", [7], True), ("run-d", [8, 9], False)]
    for run_id, ids, overwrite in steps:
        result = publish(catalog.load_table(TABLE), run_id, ids, overwrite=overwrite)
        table = catalog.load_table(TABLE)
        on_branch = pairs(branch_rows(table, BRANCH))
        assert main_rows(table) == on_branch
        assert duckdb_main_rows(duckdb_connection, table) == on_branch
        assert table.snapshot_by_name("main").snapshot_id == result.snapshot_id == result.main_snapshot_id
    assert on_branch == [(7, "run-c"), (8, "run-d"), (9, "run-d")]


def test_without_publish_main_stays_empty_and_the_first_publish_fast_forwards_it(
    catalog: SqlCatalog, table: Table
) -> None:
    publish(table, "run-a", [1], publish=False)
    publish(catalog.load_table(TABLE), "run-b", [2], publish=False)
    table = catalog.load_table(TABLE)
    assert main_rows(table) == []

    result = publish(table, "run-c", [3])
    table = catalog.load_table(TABLE)
    assert main_rows(table) == [(1, "run-a"), (2, "run-b"), (3, "run-c")]
    assert ref_ids(table) == {BRANCH: result.snapshot_id, "main": result.snapshot_id}


def test_a_run_that_commits_nothing_still_brings_main_up_to_the_branch(catalog: SqlCatalog, table: Table) -> None:
    publish(table, "run-a", [1], publish=False)
    table = catalog.load_table(TABLE)
    head = table.snapshot_by_name(BRANCH).snapshot_id

    result = commit_files(
        table, branch=BRANCH, files=[], partitioner=Partitioner(table.spec(), table.schema()),
        run_id="run-b", properties={}, publish=True,
    )
    table = catalog.load_table(TABLE)
    assert result.snapshot_id is None  # no snapshot added (CONTRACT 5) ...
    assert ref_ids(table) == {BRANCH: head, "main": head}  # ... but main now shows what the branch holds
    assert result.main_snapshot_id == head
    assert main_rows(table) == [(1, "run-a")]


def test_main_written_to_directly_is_never_moved(catalog: SqlCatalog, table: Table) -> None:
    publish(table, "run-a", [1])
    table = catalog.load_table(TABLE)
    table.append(pa.Table.from_pylist([], schema=table.schema().as_arrow()))  # a writer of main, not of the branch
    table = catalog.load_table(TABLE)
    main, branch = table.snapshot_by_name("main").snapshot_id, table.snapshot_by_name(BRANCH).snapshot_id
    assert main != branch
    metadata = table.metadata_location

    with pytest.raises(MainDivergedError) as info:
        publish(table, "run-b", [2])

    message = str(info.value)
    assert f"main is at snapshot {main}" in message and f"head: snapshot {branch}" in message
    assert "testdomain.people" in message and "set_current_snapshot" in message and "Nothing was committed" in message
    table = catalog.load_table(TABLE)
    assert table.metadata_location == metadata  # the table is exactly as it was
    assert ref_ids(table) == {BRANCH: branch, "main": main}


def test_a_writer_moving_main_during_the_commit_makes_the_publish_refuse_cleanly(
    catalog: SqlCatalog, table: Table, commits: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The run plans on a view where main is at the branch's head; another writer appends to main before the run's
    catalog commit. The catalog refuses the commit (main's requirement), the retry sees main diverged and refuses."""
    publish(table, "run-a", [1])
    stale = catalog.load_table(TABLE)
    branch = stale.snapshot_by_name(BRANCH).snapshot_id
    other = catalog.load_table(TABLE)
    other.append(pa.Table.from_pylist([], schema=other.schema().as_arrow()))
    after_other = catalog.load_table(TABLE)
    moved_main = after_other.snapshot_by_name("main").snapshot_id
    commits.clear()

    with caplog.at_level("WARNING", logger="dativo_dagster.commit"), pytest.raises(MainDivergedError):
        publish(stale, "run-b", [2])

    # the race happened: one commit was sent, asserting main where the stale view had it, and was refused
    conflicts = [r.getMessage() for r in caplog.records if "conflicted" in r.getMessage()]
    assert len(commits) == 1 and len(conflicts) == 1 and "main" in conflicts[0]
    asserted = {r.ref: r.snapshot_id for r in commits[0][0] if isinstance(r, AssertRefSnapshotId)}
    assert asserted["main"] == branch != moved_main
    table = catalog.load_table(TABLE)
    assert table.metadata_location == after_other.metadata_location  # nothing of run-b landed
    assert ref_ids(table) == {BRANCH: branch, "main": moved_main}
    assert pairs(branch_rows(table, BRANCH)) == [(1, "run-a")]


def test_the_first_publish_creates_main_when_there_is_none(catalog: SqlCatalog, table: Table) -> None:
    publish(table, "run-a", [1], publish=False)
    table = catalog.load_table(TABLE)
    catalog.commit_table(table, (), (RemoveSnapshotRefUpdate(ref_name="main"),))
    table = catalog.load_table(TABLE)
    assert table.snapshot_by_name("main") is None

    result = publish(table, "run-b", [2])
    table = catalog.load_table(TABLE)
    assert ref_ids(table) == {BRANCH: result.snapshot_id, "main": result.snapshot_id}
    assert main_rows(table) == [(1, "run-a"), (2, "run-b")]


# --- through the asset: metadata, quarantine, strict rejection -------------------------------------------------


def published_spec(**overrides: Any) -> dict[str, Any]:
    return base_spec("people", target={"partitioning": ["ingest_date"], "publish": True}, **overrides)


def test_the_materialization_shows_both_refs_and_the_quarantine_stays_on_the_branch(
    project: Project, duckdb_connection: Any
) -> None:
    project.write_spec(published_spec(schema_validation_mode="warn"))
    project.write_data("people.csv", "id,name\n1,Ann\nbad,Bob\n2,Cy\n")

    result = project.materialize()

    assert result.success, failures(result)
    metadata = materialization(result, "people")
    table = project.table(TABLE)
    head = table.snapshot_by_name(BRANCH).snapshot_id
    assert (metadata["snapshot_id"], metadata["main_snapshot_id"]) == (str(head), str(head))
    assert (metadata["branch"], metadata["published_to_main"]) == (BRANCH, True)
    assert main_rows(table) == pairs(branch_rows(table, BRANCH)) == [(1, result.run_id), (2, result.run_id)]
    assert duckdb_main_rows(duckdb_connection, table) == main_rows(table)
    rejects = project.table(f"{TABLE}__rejects")
    assert [r["id"] for r in branch_rows(rejects, BRANCH)] == ["bad"]
    main = rejects.snapshot_by_name("main")
    assert main is not None and main.snapshot_id != rejects.snapshot_by_name(BRANCH).snapshot_id
    assert rejects.scan().to_arrow().num_rows == 0  # readers of main see no quarantined row


def test_a_strict_rejection_publishes_nothing(project: Project) -> None:
    project.write_spec(published_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n")
    first = project.materialize()
    assert first.success, failures(first)
    table = project.table(TABLE)
    metadata_location, refs = table.metadata_location, ref_ids(table)

    project.write_data("people.csv", "id,name\n2,Bob\nbad,Cy\n")
    failed = project.materialize()

    table = project.table(TABLE)
    assert ref_ids(table) == refs and main_rows(table) == [(1, first.run_id)]
    assert table.metadata_location == metadata_location
    assert not failed.success and any("strict validation failed" in f for f in failures(failed))


def test_a_publish_refused_because_main_diverged_fails_the_run_without_retries(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project.write_spec(published_spec(retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    project.write_data("people.csv", "id,name\n1,Ann\n")
    assert project.materialize().success
    table = project.table(TABLE)
    table.append(pa.Table.from_pylist([], schema=table.schema().as_arrow()))
    table = project.table(TABLE)
    metadata_location = table.metadata_location

    failed = project.materialize()

    messages = failures(failed)
    assert not failed.success and len(messages) == 1  # terminal: not retried
    assert "cannot publish acme to main" in messages[0]
    assert str(table.snapshot_by_name("main").snapshot_id) in messages[0]
    assert project.table(TABLE).metadata_location == metadata_location
    capsys.readouterr()
    assert cli.main(["materialize", "--specs", str(project.specs_dir)]) == 2  # for CI: a failure
    assert "people: FAILED at commit" in capsys.readouterr().out
    assert project.table(TABLE).metadata_location == metadata_location


# --- SIGKILL around the publishing commit (embedded SQLite catalog; the servers' in integration/) ----------------


def test_a_run_killed_around_its_publishing_commit_moves_both_refs_or_neither(
    tmp_path: Path, duckdb_connection: Any
) -> None:
    started = {}
    for point in KILL_POINTS:
        project = Project(tmp_path / point / "project")
        project.write_spec(published_spec(source={"type": "csv", "files": [{"path": "data/*.csv"}],
                                                  "incremental": {"strategy": "file_modified_time"}}))
        project.write_data("a.csv", "id,name\n1,Ann\n2,Bob\n")
        first = project.materialize()
        assert first.success, failures(first)
        project.write_data("b.csv", "id,name\n3,Cy\n")
        before = refs(project.table(TABLE), BRANCH)
        assert before[BRANCH] == before["main"]
        started[point] = (project, before, start_killed_publish(tmp_path / point, point, project.specs_dir))

    for point, (project, before, process) in started.items():
        killed = wait_killed(tmp_path / point, point, process)
        table = project.table(TABLE)
        assert_both_refs_or_neither(killed, table, BRANCH, before)
        assert main_rows(table) == pairs(branch_rows(table, BRANCH))

        again = project.materialize()  # the next run: every file once, on both refs
        assert again.success, failures(again)
        table = project.table(TABLE)
        ids = sorted(r["id"] for r in branch_rows(table, BRANCH))
        assert ids == [1, 2, 3]
        assert main_rows(table) == pairs(branch_rows(table, BRANCH))
        assert duckdb_main_rows(duckdb_connection, table) == main_rows(table)
        assert refs(table, BRANCH)[BRANCH] == refs(table, BRANCH)["main"]


def test_the_command_line_summary_names_mains_snapshot(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    project.write_spec(published_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n")

    code = cli.main(["materialize", "--specs", str(project.specs_dir)])

    head = project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("people: "))
    assert code == 0 and f" snapshot={head} " in line and f" branch={BRANCH} main={head}" in line


@pytest.mark.parametrize("mode", ["strict", "warn"])
def test_every_blocking_check_is_evaluated_before_the_publishing_commit(mode: str) -> None:
    """main must never show rows that a blocking check rejected: each blocking check of a publishing asset comes out of
    a step upstream of the commit step, so its failure stops the run before anything is committed or published. A
    blocking check added later that reads the committed table would have to be evaluated inside the commit (on the
    transaction's staged state) instead, as merge's unique_key is (test_merge.py::
    test_a_merge_onto_a_branch_holding_a_duplicate_key_commits_and_publishes_nothing); this test names such a check."""
    spec = AssetSpecModel.model_validate(published_spec(schema_validation_mode=mode))
    asset = build_asset(LoadedSpec(spec=spec, path=Path("/p/asset_specs/people.yaml"), base_dir=Path("/p")))
    graph = asset.node_def
    produced_by = {m.graph_output_name: m.maps_from.node_name for m in graph.output_mappings}
    upstream_of_commit: set[str] = set()
    pending = ["people__commit"]
    while pending:
        for output in graph.dependency_structure.all_upstream_outputs_from_node(pending.pop()):
            if output.node_name not in upstream_of_commit:
                upstream_of_commit.add(output.node_name)
                pending.append(output.node_name)
    blocking = {name: check for name, check in asset.check_specs_by_output_name.items() if check.blocking}
    assert bool(blocking) is (mode == "strict")  # the validation check blocks in strict mode
    for output_name, check in blocking.items():
        assert produced_by[output_name] in upstream_of_commit, f"blocking check {check.name} runs after the commit"


def test_a_changed_file_replaces_its_rows_on_main_too(project: Project, duckdb_connection: Any) -> None:
    """Incremental: the changed file's earlier rows are deleted (a shared data file rewritten) and its new rows
    appended on the branch, and main moves with it in the same commit."""
    project.write_spec(base_spec(
        "people",
        source={"type": "csv", "files": [{"path": "data/*.csv"}], "incremental": {"strategy": "file_modified_time"}},
        target={"publish": True},  # unpartitioned: both files' rows share one data file, which the change rewrites
    ))
    project.write_data("a.csv", "id,name\n1,Ann\n2,Bob\n")
    project.write_data("b.csv", "id,name\n3,Cy\n")
    assert project.materialize().success
    changed = project.write_data("a.csv", "id,name\n1,Ann\n4,Dee\n")
    touch(changed, 60)

    second = project.materialize()

    assert second.success, failures(second)
    assert materialization(second, "people")["replaced_sources"] == [str(changed)]
    table = project.table(TABLE)
    assert sorted(r["id"] for r in branch_rows(table, BRANCH)) == [1, 3, 4]
    run_snapshots = [s for s in ancestors_of(table.snapshot_by_name("main"), table.metadata)
                     if s.summary.additional_properties.get(RUN_ID_KEY) == second.run_id]
    assert [s.summary.operation.value for s in run_snapshots] == ["append", "overwrite"]  # the shared file rewritten
    assert main_rows(table) == pairs(branch_rows(table, BRANCH))
    assert duckdb_main_rows(duckdb_connection, table) == main_rows(table)
    assert refs(table, BRANCH)[BRANCH] == refs(table, BRANCH)["main"]


def test_two_publishing_runs_racing_both_land_and_main_ends_at_the_branch(
    catalog: SqlCatalog, table: Table, caplog: pytest.LogCaptureFixture
) -> None:
    """Run B publishes first; run A, planned on the view before B, is refused by the catalog (both refs moved), plans
    again on the fresh head, where main is the branch's head again, and publishes on top of B."""
    publish(table, "run-0", [0])
    handle_a, handle_b = catalog.load_table(TABLE), catalog.load_table(TABLE)
    files_a = write_files(handle_a, "run-a", [1])
    won = publish(handle_b, "run-b", [2])

    with caplog.at_level("WARNING", logger="dativo_dagster.commit"):
        lost = commit_files(
            handle_a, branch=BRANCH, files=files_a, partitioner=Partitioner(handle_a.spec(), handle_a.schema()),
            run_id="run-a", properties={}, publish=True,
        )

    assert len([r for r in caplog.records if "conflicted" in r.getMessage()]) == 1  # the race happened
    table = catalog.load_table(TABLE)
    assert table.snapshot_by_id(lost.snapshot_id).parent_snapshot_id == won.snapshot_id
    assert ref_ids(table) == {BRANCH: lost.snapshot_id, "main": lost.snapshot_id}
    assert main_rows(table) == pairs(branch_rows(table, BRANCH)) == [(0, "run-0"), (1, "run-a"), (2, "run-b")]


def test_a_run_without_rows_on_a_table_without_the_branch_changes_nothing(catalog: SqlCatalog, table: Table) -> None:
    table.append(pa.Table.from_pylist([], schema=table.schema().as_arrow()))  # main has a snapshot, no branch yet
    table = catalog.load_table(TABLE)
    metadata_location = table.metadata_location

    result = commit_files(
        table, branch=BRANCH, files=[], partitioner=Partitioner(table.spec(), table.schema()),
        run_id="run-a", properties={}, publish=True,
    )

    assert result.snapshot_id is None
    assert catalog.load_table(TABLE).metadata_location == metadata_location
