"""Merge runs killed with SIGKILL at each step (CONTRACT 8 and 9, issue 18): while the rows stream into the merge
buffer, after it wrote the run's files and keys file, just before and just after the catalog commit; with and without
publishing. The next run, or Dagster's re-execution of the killed run, leaves every key exactly once with the last
values, ``main`` equal to the branch when publishing, only existing files referenced; the maintenance job removes
what the killed run left behind, its merge keys file included."""

from __future__ import annotations

import importlib
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dagster as dg
import pytest
from pyiceberg.table import Table

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster.merge import KEYS_FOLDER
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.fault_injection import IN_PROCESS, write_job_module
from dativo_dagster_tests.publish_kill import (
    MERGE_KILL_POINTS,
    REWRITE_POINT,
    KilledPublish,
    refs,
    start_killed_publish,
    wait_killed,
)
from dativo_dagster_tests.table_checks import failures, materialization, parquet_files, referenced_files, run_maintenance
from dativo_dagster_tests.test_merge import BRANCH, TABLE, merge_spec

FIRST = {i: f"v1-{i}" for i in range(1, 301)}


def change_csv() -> str:
    """The killed run's source: 100..199 changed (150 read twice, the last wins), 200..209 deleted, 301..350 new."""
    lines = ["150,first-of-two,false"]
    lines += [f"{i},v2-{i},false" for i in range(100, 200)]
    lines += [f"{i},,true" for i in range(200, 210)]
    lines += [f"{i},v2-{i},false" for i in range(301, 351)]
    return "id,name,deleted\n" + "\n".join(lines) + "\n"


CHANGED = {**{i: v for i, v in FIRST.items() if not 200 <= i < 210}, **{i: f"v2-{i}" for i in range(100, 200)},
           **{i: f"v2-{i}" for i in range(301, 351)}}
# a later run, after the killed one: 100..104 changed again, 1 deleted
LATER_CSV = "id,name,deleted\n" + "".join(f"{i},v3-{i},false\n" for i in range(100, 105)) + "1,,true\n"
LATER = {**{i: v for i, v in CHANGED.items() if i != 1}, **{i: f"v3-{i}" for i in range(100, 105)}}


def key_values(table: Table, branch: str) -> dict[int, str]:
    """The branch's rows as key -> name, asserting that no key occurs twice."""
    rows = branch_rows(table, branch)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a key occurs {len(ids) - len(set(ids))} time(s) too often on {branch}"
    return {r["id"]: r["name"] for r in rows}


def main_key_values(table: Table) -> dict[int, str]:
    """What a reader of main sees without naming a snapshot."""
    rows = table.scan().to_arrow().to_pylist()
    assert len(rows) == len({r["id"] for r in rows})
    return {r["id"]: r["name"] for r in rows}


def on_disk(table: Table) -> set[str]:
    return parquet_files(table.location().removeprefix("file://"))


def keys_files(table: Table) -> set[str]:
    return {str(p) for p in Path(table.location().removeprefix("file://"), KEYS_FOLDER).glob("*.parquet")}


class MergeStore(Protocol):
    """Where a kill case's table lives: the embedded default here, S3 with a server catalog in the integration
    tests. Files are named as ``table_checks.referenced_files`` names them (local paths, ``s3://`` URIs)."""

    def table(self) -> Table:
        """The table, freshly loaded."""
        ...

    def stored_files(self, table: Table) -> set[str]:
        """Every Parquet file under the table's ``data/`` folder, committed or not."""
        ...

    def keys_files(self, table: Table) -> set[str]:
        """Every merge keys file under the table's ``_dativo_merge/`` folder."""
        ...


@dataclass
class LocalStore:
    """The embedded default: a local warehouse and the project's SQLite catalog."""

    project: Project
    identifier: str = TABLE

    def table(self) -> Table:
        return self.project.table(self.identifier)

    def stored_files(self, table: Table) -> set[str]:
        return on_disk(table)

    def keys_files(self, table: Table) -> set[str]:
        return keys_files(table)


def assert_references_exist(table: Table, store: MergeStore) -> None:
    missing = referenced_files(table) - store.stored_files(table)
    assert not missing, f"the table references files that do not exist: {sorted(missing)[:3]}"


def assert_consistent(table: Table, expected: dict[int, str], publish: bool, duckdb_connection: Any,
                      store: MergeStore) -> None:
    """Every key once with ``expected`` values on the branch; with ``publish``, main is the branch (pyiceberg and
    DuckDB, no snapshot id); every referenced file exists."""
    assert key_values(table, BRANCH) == expected
    if publish:
        now = refs(table, BRANCH)
        assert now[BRANCH] == now["main"]
        assert main_key_values(table) == expected
        read = duckdb_connection.execute(f"SELECT id, name FROM iceberg_scan('{table.metadata_location}')").fetchall()
        assert dict(read) == expected and len(read) == len(expected)
    assert_references_exist(table, store)


@dataclass
class KilledMerge:
    project: Project
    publish: bool
    killed: KilledPublish
    before: dict[str, int | None]
    store: MergeStore
    job_module: str = ""
    dagster_home: Path | None = None


@dataclass
class StartedMerge:
    """A kill case whose killed run is under way (:func:`start_killed_merge`); :meth:`wait` gives the case."""

    folder: Path
    point: str
    project: Project
    publish: bool
    before: dict[str, int | None]
    store: MergeStore
    process: subprocess.Popen[str]
    job_module: str = ""
    dagster_home: Path | None = None

    def wait(self) -> KilledMerge:
        killed = wait_killed(self.folder, self.point, self.process)
        return KilledMerge(self.project, self.publish, killed, self.before, self.store, self.job_module,
                           self.dagster_home)


def start_killed_merge(
    folder: Path,
    point: str,
    publish: bool,
    *,
    store: Callable[[Project], MergeStore] = LocalStore,
    domain: str | None = None,
    env: Mapping[str, str] | None = None,
    job: bool = False,
) -> StartedMerge:
    """A project merged once (``FIRST``), its source switched to ``change_csv()``, and a merge run of it started that
    SIGKILLs itself at ``point``; ``domain`` and ``env`` (the deployment's variables, applied by the caller for the
    first run too) place the table on a server deployment."""
    project = Project(folder / "project")
    spec = merge_spec(publish=publish, parquet_target_size_mb=0.002)
    if domain is not None:
        spec["domain"] = domain
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},{v},false\n" for i, v in FIRST.items()))
    first = project.materialize()
    assert first.success, failures(first)
    project.write_data("people.csv", change_csv())
    where = store(project)
    before = refs(where.table(), BRANCH)
    job_module, home = "", None
    if job:
        home = folder / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        job_module = write_job_module(folder, project.specs_dir)
    process = start_killed_publish(folder, point, project.specs_dir, env, ref="main" if publish else BRANCH,
                                   job_module=job_module or None, dagster_home=home)
    return StartedMerge(folder, point, project, publish, before, where, process, job_module, home)


def check_killed_then_run_again(case: KilledMerge, point: str, duckdb_connection: Any,
                                monkeypatch: pytest.MonkeyPatch) -> Table:
    """The killed run left the table as before it (or, killed after its commit, with its whole change); the next run
    leaves every key once with the last values; the maintenance job then removes exactly what the killed run left
    behind (its uncommitted data files and keys file). Returns the table after the next run."""
    killed, project, store, publish = case.killed, case.project, case.store, case.publish
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.report.get("point") == point, "the run did not reach the kill point"
    table = store.table()
    landed = point == "after"
    # the killed run's change is on the branch (and main) exactly when its catalog commit was accepted
    assert (refs(table, BRANCH) != case.before) is landed
    assert_consistent(table, CHANGED if landed else FIRST, publish, duckdb_connection, store)
    left_keys = store.keys_files(table)
    if point == "extract":
        assert killed.report["rows"] > 0 and left_keys == set()  # killed while rows streamed in
    else:
        assert len(left_keys) == 1, left_keys  # the killed run's keys file: nothing references it
        if "keys_uri" in killed.report:
            assert left_keys == {killed.report["keys_uri"].removeprefix("file://")}
    if point in ("staged", REWRITE_POINT):
        # the run's own files (staged), or the first survivors' file its rewrite uploaded: stored, not committed
        written = {f.removeprefix("file://") for f in killed.report["files"]}
        assert written and not written & referenced_files(table), "the killed run's files are not committed"
        assert written <= store.stored_files(table)

    again = project.materialize()  # the next run: a new run id, the same source

    assert again.success, failures(again)
    table = store.table()
    assert_consistent(table, CHANGED, publish, duckdb_connection, store)
    assert {r["_run_id"] for r in branch_rows(table, BRANCH) if r["id"] == 150} == {again.run_id}
    assert materialization(again, "people")["rows_committed"] == len(range(100, 200)) + 50
    assert store.keys_files(table) == left_keys  # the new run removed its own keys file after its commit

    cleanup = run_maintenance(project, monkeypatch)

    table = store.table()
    assert store.stored_files(table) == referenced_files(table), "the killed run's uncommitted files are removed"
    assert store.keys_files(table) == set(), "the killed run's keys file is removed"
    (output,) = [e for e in cleanup.all_node_events if e.node_name == "remove_orphan_files" and e.is_successful_output]
    assert output.event_specific_data.metadata["merge_keys_files_removed"].value == len(left_keys)
    assert_consistent(table, CHANGED, publish, duckdb_connection, store)
    return table


CLI_CASES = [(point, publish) for publish in (False, True) for point in MERGE_KILL_POINTS]
REEXECUTED = ("before", "after")  # killed around the commit of the group job in a persistent instance (publishing)


def case_id(point: str, publish: bool, job: bool = False) -> str:
    return f"{'job-' if job else ''}{point}-{'publish' if publish else 'branch'}"


@pytest.fixture(scope="module")
def killed_merges(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KilledMerge]:
    """One project per case, each merged once, then a merge run of each killed at its point, all at the same time."""
    root = tmp_path_factory.mktemp("merge-kill")
    cases = [(p, pub, False) for p, pub in CLI_CASES] + [(p, True, True) for p in REEXECUTED]
    started = {case_id(*case): start_killed_merge(root / case_id(*case), case[0], case[1], job=case[2])
               for case in cases}
    return {key: case.wait() for key, case in started.items()}


@pytest.mark.parametrize(("point", "publish"), CLI_CASES, ids=[case_id(*c) for c in CLI_CASES])
def test_a_merge_killed_at_each_step_then_run_again_holds_every_key_once_with_the_last_values(
    killed_merges: dict[str, KilledMerge], point: str, publish: bool, duckdb_connection: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_killed_then_run_again(killed_merges[case_id(point, publish)], point, duckdb_connection, monkeypatch)


@pytest.mark.parametrize("point", REEXECUTED)
def test_a_killed_publishing_merge_re_executed_from_failure_applies_its_change_exactly_once(
    killed_merges: dict[str, KilledMerge], point: str, duckdb_connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = killed_merges[case_id(point, True, job=True)]
    killed, project = case.killed, case.project
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.report.get("point") == point
    assert case.dagster_home is not None
    (parent_run,) = set(killed.report["run_ids"])  # the commit's snapshots (delete + append) carry one run id
    (keys_file,) = keys_files(project.table(TABLE))
    assert Path(keys_file).name.startswith(parent_run)  # kept for the re-execution of the commit step

    # a newer run lands in between: a re-execution of the killed run must not bring its older values back
    project.write_data("people.csv", LATER_CSV)
    later = project.materialize()
    assert later.success, failures(later)
    table = project.table(TABLE)
    without_killed = {**{k: v for k, v in FIRST.items() if k != 1}, **{i: f"v3-{i}" for i in range(100, 105)}}
    assert_consistent(table, LATER if point == "after" else without_killed, True, duckdb_connection,
                      case.store)

    def snapshots_of(run_id: str) -> list[int]:
        return [s.snapshot_id for s in project.table(TABLE).metadata.snapshots
                if s.summary.additional_properties.get(RUN_ID_KEY) == run_id]

    committed_before = snapshots_of(parent_run)
    assert bool(committed_before) is (point == "after")

    monkeypatch.setenv("DAGSTER_HOME", str(case.dagster_home))
    monkeypatch.syspath_prepend(str(case.dagster_home.parent))
    ingest_job = importlib.import_module(case.job_module).ingest_job
    with dg.DagsterInstance.get() as instance:
        [parent] = instance.get_runs()
        assert parent.run_id == parent_run and parent.status == dg.DagsterRunStatus.STARTED
        instance.report_run_failed(parent, "run worker killed")  # what run monitoring does for a dead worker
        result = dg.execute_job(
            dg.reconstructable(ingest_job),
            instance,
            run_config=IN_PROCESS,
            reexecution_options=dg.ReexecutionOptions.from_failure(parent.run_id, instance),
        )
        assert result.success
        executed = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}
        (mat,) = result.get_asset_materialization_events()
        metadata = {k: v.value for k, v in mat.step_materialization_data.materialization.metadata.items()}

    assert executed == {"people.people__commit"}  # the staged outputs of the killed run are reused
    table = project.table(TABLE)
    if point == "after":
        # the killed run's commit is found by its run id: nothing is applied again, the later values stay
        assert_consistent(table, LATER, True, duckdb_connection, case.store)
        assert metadata["already_committed"] is True
        assert snapshots_of(parent_run) == committed_before
    else:
        # the killed run never committed: its change is applied once now (one commit), over the later run's
        assert metadata["already_committed"] is False
        assert table.snapshot_by_name(BRANCH).snapshot_id == snapshots_of(parent_run)[-1]
        assert_consistent(table, {k: v for k, v in CHANGED.items() if k != 1}, True, duckdb_connection,
                          case.store)
    assert keys_files(table) == set(), "the re-executed commit removed the keys file"
