"""Runs killed with SIGKILL at every step, then run again or re-executed: every source file lands exactly once,
in the table and in the quarantine table, read by pyiceberg and by DuckDB; the maintenance job removes what the
killed run left behind and nothing else (CONTRACT 5, issue 4)."""

from __future__ import annotations

import importlib
import json
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pyiceberg.table import Table

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.fault_injection import (
    IN_PROCESS,
    KILL_POINTS,
    start_killed_run,
    write_job_module,
    write_wrapper,
)
from dativo_dagster_tests.table_checks import (
    as_rows,
    content_hash,
    duckdb_rows,
    incremental_spec,
    materialization,
    parquet_files,
    referenced_files,
    run_maintenance,
)

TABLE = "testdomain.events"
REJECTS = "testdomain.events__rejects"
BRANCH = "acme"
FILES = 4
ROWS_PER_FILE = 3000


def write_sources(project: Project) -> None:
    """Warn-mode spec, four source files of 3000 rows (two of them invalid each), small target file size."""
    project.write_spec(
        incremental_spec(
            schema_validation_mode="warn",
            target={"partitioning": ["ingest_date"], "parquet_target_size_mb": 0.02},
        )
    )
    for f in range(FILES):
        lines = [f"{f * 100_000 + i},name-{f}-{i * 7919 % 10007}" for i in range(ROWS_PER_FILE)]
        lines[10] = f"bad-{f}-a,broken"
        lines[2000] = f"bad-{f}-b,broken"
        project.write_data(f"events/part-{f}.csv", "id,name\n" + "\n".join(lines) + "\n")


def expected(project: Project) -> tuple[Counter[Any], Counter[Any]]:
    """The valid rows (id, name, file) and the rejected ids (id, file) that the source files hold."""
    valid: Counter[Any] = Counter()
    rejected: Counter[Any] = Counter()
    for path in sorted((project.data_dir / "events").glob("*.csv")):
        for line in path.read_text().splitlines()[1:]:
            key, name = line.split(",")
            if key.isdigit():
                valid[(int(key), name, str(path))] += 1
            else:
                rejected[(key, str(path))] += 1
    assert sum(valid.values()) == FILES * (ROWS_PER_FILE - 2) and sum(rejected.values()) == FILES * 2
    return valid, rejected


def rejected_rows(table: Table) -> Counter[Any]:
    return Counter((r["id"], r["_source_file"]) for r in branch_rows(table, BRANCH))


def on_disk(table: Table) -> set[str]:
    return parquet_files(table.location().removeprefix("file://"))


def assert_exactly_once(project: Project, con: Any) -> None:
    """Every valid row once in the table, every invalid one once in quarantine, for pyiceberg and DuckDB."""
    valid, rejected = expected(project)
    catalog = project.catalog()
    table, rejects = catalog.load_table(TABLE), catalog.load_table(REJECTS)
    read = as_rows(branch_rows(table, BRANCH))
    assert sum(read.values()) == sum(valid.values())
    assert content_hash(read) == content_hash(valid)
    assert read == valid
    assert duckdb_rows(con, table, BRANCH) == valid
    assert rejected_rows(rejects) == rejected


@dataclass
class KilledRun:
    point: str
    project: Project
    returncode: int
    report: dict[str, Any]
    stderr: str
    job_module: str = ""  # for runs of the group job in a persistent instance
    dagster_home: Path | None = None


REEXECUTED = ("write", "commit-after")  # points killed in a persistent instance, then re-executed from failure


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KilledRun]:
    """One project per kill point, each killed once, all at the same time: by ``dativo-dagster materialize``
    (keys: the points), and by the group job in a persistent Dagster instance (keys: ``job:<point>``)."""
    root = tmp_path_factory.mktemp("faults")
    wrapper = write_wrapper(root)
    started = {}
    for key in [*KILL_POINTS, *(f"job:{point}" for point in REEXECUTED)]:
        point = key.removeprefix("job:")
        folder = root / key.replace(":", "-")
        project = Project(folder / "project")
        write_sources(project)
        report = folder / "report.json"
        job_module, home = "", None
        if key.startswith("job:"):
            home = folder / "dagster_home"
            home.mkdir()
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            job_module = write_job_module(root, project.specs_dir)
        process = start_killed_run(
            wrapper, point, project.specs_dir, report, job_module=job_module or None, dagster_home=home
        )
        started[key] = (point, project, report, process, job_module, home)
    runs = {}
    for key, (point, project, report, process, job_module, home) in started.items():
        _, stderr = process.communicate(timeout=300)
        runs[key] = KilledRun(
            point,
            project,
            process.returncode,
            json.loads(report.read_text()) if report.exists() else {},
            stderr,
            job_module,
            home,
        )
    return runs


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_killed_run_then_a_new_run_loads_every_file_once(
    killed_runs: dict[str, KilledRun], point: str, duckdb_connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed = killed_runs[point]
    project = killed.project
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.report.get("point") == point
    staging = project.root / ".dativo" / "staging"
    left_staging = {p.name for p in staging.iterdir()} if staging.exists() else set()
    if point in ("extract", "write"):
        # killed while streaming: nothing was staged yet (the stream passes no data through staging)
        assert left_staging == set()
    else:
        assert len(left_staging) == 1, "the killed run leaves its staging behind"

    result = project.materialize()

    assert result.success
    metadata = materialization(result, "events")
    assert_exactly_once(project, duckdb_connection)
    catalog = project.catalog()
    table, rejects = catalog.load_table(TABLE), catalog.load_table(REJECTS)
    orphans = (on_disk(table) - referenced_files(table)) | (on_disk(rejects) - referenced_files(rejects))
    reported = {f.removeprefix("file://") for f in killed.report.get("files", [])}
    if point == "extract":
        assert killed.report["batches"] == 1
        assert orphans == set() and metadata["rows_read"] == FILES * ROWS_PER_FILE
    elif point == "write":
        assert len(reported) == 1 and reported <= orphans  # the finished file of the killed run
        assert metadata["rows_read"] == FILES * ROWS_PER_FILE
    elif point == "commit-before":
        assert killed.report["table"] == REJECTS and reported and reported <= orphans
        assert len(orphans) > len(reported), "the killed run's data files are orphans too"
    elif point == "between-tables":
        assert killed.report["table"] == TABLE and len(reported) > 1 and reported == orphans
        # the killed run's quarantine commit was replaced by the new run's, in one commit
        runs = {s.summary.additional_properties.get(RUN_ID_KEY) for s in rejects.metadata.snapshots}
        assert len(runs - {None}) == 2
        assert {r["_run_id"] for r in branch_rows(rejects, BRANCH)} == {result.run_id}
    else:  # commit-after: the killed run's commit stands, the new run finds nothing new
        assert killed.report["committed"] is True and killed.report["table"] == TABLE
        assert metadata["nothing_new"] is True and metadata["snapshot_id"] == ""
        assert orphans == set()
        assert reported <= referenced_files(table)
        assert result.run_id not in {r["_run_id"] for r in branch_rows(table, BRANCH)}

    cleanup = run_maintenance(project, monkeypatch)

    assert cleanup.output_for_node("remove_orphan_files") == len(orphans)
    table, rejects = catalog.load_table(TABLE), catalog.load_table(REJECTS)
    assert on_disk(table) == referenced_files(table), "every referenced file is kept, every orphan removed"
    assert on_disk(rejects) == referenced_files(rejects)
    unreferenced = reported - referenced_files(table) - referenced_files(rejects)
    assert not [f for f in unreferenced if Path(f).exists()], "the killed run's orphans are gone"
    assert not staging.exists() or not any(staging.iterdir()), "the killed run's staging is removed"
    assert_exactly_once(project, duckdb_connection)


# ---- Dagster re-execution of the killed run, in a persistent instance ---------------------------------------


@pytest.mark.parametrize("point", REEXECUTED)
def test_reexecuting_a_killed_run_from_failure_commits_once(
    killed_runs: dict[str, KilledRun], point: str, monkeypatch: pytest.MonkeyPatch, duckdb_connection: Any
) -> None:
    killed = killed_runs[f"job:{point}"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.dagster_home is not None
    project = killed.project
    monkeypatch.setenv("DAGSTER_HOME", str(killed.dagster_home))
    monkeypatch.syspath_prepend(str(project.root.parent.parent))
    ingest_job = importlib.import_module(killed.job_module).ingest_job

    with dg.DagsterInstance.get() as instance:
        [parent] = instance.get_runs()
        assert parent.status == dg.DagsterRunStatus.STARTED  # nobody told the instance: the process just died
        instance.report_run_failed(parent, "run worker killed")  # what run monitoring does
        result = dg.execute_job(
            dg.reconstructable(ingest_job),
            instance,
            run_config=IN_PROCESS,
            reexecution_options=dg.ReexecutionOptions.from_failure(parent.run_id, instance),
        )
        assert result.success
        executed = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}
        mats = result.get_asset_materialization_events()
        metadata = {k: v.value for k, v in mats[0].step_materialization_data.materialization.metadata.items()}

    assert_exactly_once(project, duckdb_connection)
    table = project.table(TABLE)
    committed_by = [
        s.summary.additional_properties.get(RUN_ID_KEY) for s in table.metadata.snapshots
        if s.summary.additional_properties.get(RUN_ID_KEY)
    ]
    if point == "write":
        # killed while the stream wrote its files (in the extract step): every step runs again
        assert executed == {"events.events__extract", "events.events__validate", "events.events__write", "events.events__commit"}
        assert committed_by == [result.run_id]
        assert metadata["already_committed"] is False
    else:
        assert executed == {"events.events__commit"}
        # the commit recorded under the run that wrote the files is found: nothing is committed again
        assert committed_by == [parent.run_id]
        assert metadata["already_committed"] is True
