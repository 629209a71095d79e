"""Fan-out (``source.fan_out``): a run's files split into groups by size, each streamed in a mapped step
(``<name>__extract[g0]`` ...), collected, and committed once; exactly once under strict/warn validation, retries of a
group and the multiprocess executor (issue 19 item 5, docs/fan-out.md)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from dativo_dagster import assets
from dativo_dagster.cli import main
from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster.fanout import group_files
from dativo_dagster.incremental import table_source_state
from dativo_dagster.markers import committed_files
from dativo_dagster.sources import SourceFile
from dativo_dagster.spec import load_spec_file
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.fault_injection import IN_PROCESS, write_job_module
from dativo_dagster_tests.table_checks import (
    as_rows,
    branch_snapshot_ids,
    expected_rows,
    incremental_spec,
    marker_rows,
    materialization,
    parquet_files,
)

TABLE = "testdomain.events"
REJECTS = "testdomain.events__rejects"
BRANCH = "acme"
MIB = 1 << 20
# rows per source file: with ~30-byte rows and 1 MiB steps, 7 files of different sizes make several groups, one
# of them a single file larger than a step
FILE_ROWS = (30_000, 100, 70_000, 10, 50_000, 5, 20_000)
DAGSTER = Path(sys.executable).parent / "dagster"


def fan_out_spec(step_size_mb: int = 1, **overrides: Any) -> dict[str, Any]:
    spec = incremental_spec(**overrides)
    spec["source"]["fan_out"] = {"step_size_mb": step_size_mb}
    return spec


def daily_fan_out_spec(**source: Any) -> dict[str, Any]:
    """A daily-partitioned, fanned-out spec (1 MiB steps) over ``data/events/<day>/*.csv``, the table partitioned
    by the event's day; ``source`` adds to its source block."""
    return base_spec(
        "events",
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "event_date", "type": "date", "required": True},
            {"name": "name", "type": "string"},
        ],
        source={"type": "csv", "files": [{"path": "data/events/{partition}/*.csv"}], "fan_out": {"step_size_mb": 1},
                **source},
        target={"partitioning": ["day(event_date)"]},
        partitions={"type": "daily", "start": "2024-01-01", "field": "event_date"},
    )


def write_files(project: Project, rows: tuple[int, ...] = FILE_ROWS, bad: dict[int, int] | None = None) -> list[Path]:
    """One CSV per entry of ``rows`` under data/events/, ids unique across files; ``bad`` puts that many invalid
    ids at the start of the file of that index."""
    paths = []
    start = 0
    for index, count in enumerate(rows):
        lines = [f"{start + i},name-{start + i}-padding-text" for i in range(count)]
        for i in range((bad or {}).get(index, 0)):
            lines[i] = f"bad-{index}-{i},broken"
        paths.append(project.write_data(f"events/f{index}.csv", "id,name\n" + "\n".join(lines) + "\n"))
        start += count
    return paths


def planned_groups(paths: list[Path], step_size_mb: int = 1) -> list[list[str]]:
    listed = [SourceFile(uri=str(p), size=p.stat().st_size, version="") for p in sorted(paths)]
    return [[f.uri for f in group] for group in group_files(listed, step_size_mb)]


def step_keys(result: dg.ExecuteInProcessResult, kind: dg.DagsterEventType = dg.DagsterEventType.STEP_START) -> list[str]:
    return sorted(e.step_key for e in result.all_events if e.event_type == kind and e.step_key)


def run_snapshots(project: Project, run_id: str) -> list[int]:
    table = project.table(TABLE)
    return [
        sid for sid in branch_snapshot_ids(table, BRANCH)
        if (table.snapshot_by_id(sid).summary or {}).get(RUN_ID_KEY) == run_id  # type: ignore[union-attr]
    ]


def valid_rows(paths: list[Path]) -> Counter[Any]:
    rows = expected_rows([])
    for path in paths:
        for line in path.read_text().splitlines()[1:]:
            key, name = line.split(",")
            if key.isdigit():
                rows[(int(key), name, str(path))] += 1
    return rows


# -- grouping ---------------------------------------------------------------------------------------------------


def _files(*sizes_mib: float) -> list[SourceFile]:
    return [SourceFile(uri=f"f{i}", size=int(s * MIB), version="") for i, s in enumerate(sizes_mib)]


@pytest.mark.parametrize(
    ("sizes", "groups"),
    [
        ((0.3, 0.3, 0.5, 0.2), [["f0", "f1", "f2"], ["f3"]]),  # until a group reaches the step size
        ((0.5, 3, 0.2), [["f0"], ["f1"], ["f2"]]),  # a larger file alone, the group before it closed
        ((1, 1), [["f0"], ["f1"]]),  # exactly a step: a group of its own
        ((0.1, 0.1), [["f0", "f1"]]),
        ((), [[]]),  # nothing to read: one empty group
    ],
)
def test_files_are_grouped_in_listing_order_until_a_group_reaches_the_step_size(
    sizes: tuple[float, ...], groups: list[list[str]]
) -> None:
    assert [[f.uri for f in g] for g in group_files(_files(*sizes), 1)] == groups


# -- the spec ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "problem"),
    [
        ({"fan_out": {"step_size_mb": 0}}, {}, "source.fan_out.step_size_mb: expected a number of at least 1; got 0"),
        ({"fan_out": {"size": 3}}, {}, "source.fan_out.size: unknown key; expected one of step_size_mb"),
        ({"type": "postgres", "connection": {"url_env": "SHOP_DB_URL"}, "table": "orders", "files": None,
          "fan_out": {}}, {}, "source.fan_out: a database source is read as one consistent snapshot"),
        ({"fan_out": {}}, {"write_mode": "merge"}, "source.fan_out: a merge keeps the last row of each key"),
    ],
)
def test_spec_errors_name_source_fan_out(
    project: Project, source: dict[str, Any], target: dict[str, Any], problem: str
) -> None:
    spec = base_spec("events", target={"partitioning": ["ingest_date"], **target})
    spec["schema"][0]["primary_key"] = True
    spec["source"] = {k: v for k, v in {**spec["source"], **source}.items() if v is not None}
    path = project.write_spec(spec)
    loaded, problems = load_spec_file(path, project.root)
    assert loaded is None
    assert any(p.startswith(f"asset_specs/events.yaml: {problem}") for p in problems), problems


def test_the_default_step_size_is_512_mib_and_no_fan_out_keeps_the_four_steps(project: Project) -> None:
    project.write_spec(fan_out_spec())
    project.write_spec({**fan_out_spec(), "name": "plain", "source": {"type": "csv", "files": [{"path": "x.csv"}]}})
    spec = fan_out_spec()
    spec["source"]["fan_out"] = {}
    loaded, problems = load_spec_file(project.write_spec(spec), project.root)
    assert problems == [] and loaded is not None
    assert loaded.spec.source.fan_out is not None and loaded.spec.source.fan_out.step_size_mb == 512
    write_files(project, (3,))
    project.write_data("../x.csv", "id,name\n1,a\n")
    result = project.materialize(["plain"])
    assert result.success
    assert step_keys(result) == [f"plain.plain__{op}" for op in ("commit", "extract", "validate", "write")]


# -- runs ---------------------------------------------------------------------------------------------------------


def test_a_fanned_out_run_streams_each_group_in_a_mapped_step_and_commits_every_row_once(project: Project) -> None:
    project.write_spec(fan_out_spec(step_size_mb=1))
    paths = write_files(project)
    groups = planned_groups(paths)
    assert len(groups) >= 3 and any(len(g) == 1 for g in groups) and any(len(g) > 1 for g in groups)

    result = project.materialize()

    assert result.success
    started = step_keys(result)
    assert started == sorted(
        ["events.events__plan", "events.events__validate", "events.events__write", "events.events__commit"]
        + [f"events.events__extract[g{i}]" for i in range(len(groups))]
    )
    # each mapped step streamed its own group's files, and only them
    messages = [e.message for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_OUTPUT]
    assert len(messages) >= len(groups)
    outputs = {
        e.step_key: e.event_specific_data.metadata for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_OUTPUT and (e.step_key or "").startswith("events.events__extract[")
    }
    assert {k: v["files"].value for k, v in outputs.items()} == {
        f"events.events__extract[g{i}]": len(g) for i, g in enumerate(groups)
    }
    # every row exactly once, stamped with the run's one id and one ingestion time
    table = project.table(TABLE)
    rows = branch_rows(table, BRANCH)
    assert as_rows(rows) == valid_rows(paths)
    assert sum(FILE_ROWS) == len(rows)
    assert {r["_run_id"] for r in rows} == {result.run_id}
    assert len({r["_ingested_at"] for r in rows}) == 1
    # one commit of the run, holding every group's files and every file's version
    assert len(run_snapshots(project, result.run_id)) == 1
    assert set(table_source_state(table, BRANCH)) == {str(p) for p in paths}
    meta = materialization(result, "events")
    assert meta["rows_committed"] == sum(FILE_ROWS) and sorted(meta["source_files"]) == sorted(map(str, paths))
    # no uncommitted file left behind
    head = table.snapshot_by_name(BRANCH)
    assert head is not None
    committed = {t.file.file_path.removeprefix("file://") for t in table.scan(snapshot_id=head.snapshot_id).plan_files()}
    assert parquet_files(table.location().removeprefix("file://")) == committed

    again = project.materialize()

    assert again.success
    assert materialization(again, "events")["nothing_new"] is True
    assert step_keys(again) == sorted(["events.events__plan", "events.events__extract[g0]", "events.events__validate",
                                       "events.events__write", "events.events__commit"])
    assert branch_snapshot_ids(project.table(TABLE), BRANCH) == branch_snapshot_ids(table, BRANCH)
    assert as_rows(branch_rows(project.table(TABLE), BRANCH)) == valid_rows(paths)


def test_a_changed_file_replaces_its_rows_from_whichever_group_reads_it(project: Project) -> None:
    project.write_spec(fan_out_spec(step_size_mb=1))
    paths = write_files(project)
    assert project.materialize().success
    # rewrite a file of the last group with other ids, add a new one
    paths[-1].write_text("id,name\n" + "".join(f"{900_000 + i},changed-{i}\n" for i in range(7)))
    os.utime(paths[-1], (paths[-1].stat().st_mtime + 5, paths[-1].stat().st_mtime + 5))
    paths.append(project.write_data("events/f9.csv", "id,name\n999999,new\n"))

    result = project.materialize()

    assert result.success
    assert as_rows(branch_rows(project.table(TABLE), BRANCH)) == valid_rows(paths)
    assert len(run_snapshots(project, result.run_id)) >= 1


def test_warn_mode_quarantines_the_rejects_of_every_group(project: Project) -> None:
    project.write_spec(fan_out_spec(step_size_mb=1, schema_validation_mode="warn"))
    bad = {0: 2, 2: 3, 4: 1, 6: 4}
    paths = write_files(project, bad=bad)
    groups = planned_groups(paths)
    with_rejects = {i for i, g in enumerate(groups) if any(str(paths[f]) in g for f in bad)}
    assert len(with_rejects) >= 3

    result = project.materialize()

    assert result.success
    assert as_rows(branch_rows(project.table(TABLE), BRANCH)) == valid_rows(paths)
    rejected = Counter((r["id"], r["_source_file"]) for r in branch_rows(project.table(REJECTS), BRANCH))
    assert rejected == Counter({(f"bad-{f}-{i}", str(paths[f])): 1 for f, n in bad.items() for i in range(n)})
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "validation"]
    assert not check.passed and check.severity is dg.AssetCheckSeverity.WARN
    assert check.metadata["rows_rejected"].value == sum(bad.values())
    assert check.metadata["rows_read"].value == sum(FILE_ROWS)


def test_a_strict_rejection_in_one_group_commits_nothing_and_leaves_no_file(project: Project) -> None:
    project.write_spec(fan_out_spec(step_size_mb=1))
    write_files(project, (10, 20))
    assert project.materialize().success
    table = project.table(TABLE)
    before = (branch_snapshot_ids(table, BRANCH), as_rows(branch_rows(table, BRANCH)))
    location = table.location().removeprefix("file://")
    files_before = parquet_files(location)
    for path in list((project.data_dir / "events").glob("*.csv")):
        path.unlink()
    paths = write_files(project, bad={4: 1})  # one bad row in one group; the other groups write their files
    assert len(planned_groups(paths)) >= 3

    result = project.materialize()

    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "events.events__validate"
    text = failure.event_specific_data.error.message
    assert "strict validation failed; nothing was committed" in text and "f4.csv, line 2" in text
    after = project.table(TABLE)
    assert (branch_snapshot_ids(after, BRANCH), as_rows(branch_rows(after, BRANCH))) == before
    assert parquet_files(location) == files_before  # the other groups' files were removed


def test_a_strict_rejection_on_a_first_run_leaves_no_table(project: Project) -> None:
    project.write_spec(fan_out_spec(step_size_mb=1))
    write_files(project, bad={6: 1})

    result = project.materialize()

    assert not result.success
    assert not project.catalog().table_exists(TABLE)
    assert [p for p in project.warehouse.rglob("*.parquet")] == []


def test_a_group_step_that_fails_once_is_retried_and_its_first_attempts_files_are_not_committed(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(fan_out_spec(step_size_mb=1, retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    paths = write_files(project)
    groups = planned_groups(paths)
    target = groups[1][0]  # a file of the second group
    verify = assets.verify_written
    failed_attempt: list[str] = []

    def verify_once(outcome: Any, s3: Any) -> None:
        # after the group's stream wrote its files: a transient storage error, once
        if target in outcome.files_read and not failed_attempt:
            failed_attempt.extend(f.uri for f in outcome.data_files)
            raise OSError(5, "Input/output error")
        verify(outcome, s3)

    monkeypatch.setattr(assets, "verify_written", verify_once)

    result = project.materialize()

    assert result.success
    assert failed_attempt, "the fault never fired"
    assert step_keys(result, dg.DagsterEventType.STEP_UP_FOR_RETRY) == ["events.events__extract[g1]"]
    assert step_keys(result, dg.DagsterEventType.STEP_RESTARTED) == ["events.events__extract[g1]"]
    table = project.table(TABLE)
    assert as_rows(branch_rows(table, BRANCH)) == valid_rows(paths)
    head = table.snapshot_by_name(BRANCH)
    assert head is not None
    committed = {t.file.file_path for t in table.scan(snapshot_id=head.snapshot_id).plan_files()}
    assert not committed & set(failed_attempt)
    assert not any(Path(uri.removeprefix("file://")).exists() for uri in failed_attempt)
    assert len(run_snapshots(project, result.run_id)) == 1


def test_the_multiprocess_executor_runs_the_groups_in_separate_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(fan_out_spec(step_size_mb=1))
    paths = write_files(project)
    groups = planned_groups(paths)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
    env.update(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(home))
    config = '{"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}}'
    proc = subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "events",
         "--config-json", config],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    try:
        [run] = instance.get_runs()
        events = list(instance.all_logs(run.run_id))
    finally:
        instance.dispose()
    assert run.status == dg.DagsterRunStatus.SUCCESS
    starts = {e.step_key: e.dagster_event.pid for e in events if e.dagster_event_type == dg.DagsterEventType.STEP_START}
    group_pids = {k: pid for k, pid in starts.items() if "__extract[" in (k or "")}
    assert set(group_pids) == {f"events.events__extract[g{i}]" for i in range(len(groups))}
    assert len(set(group_pids.values())) == len(groups) >= 2
    # each group's step logged the process it streamed in, the validate step the processes it collected from
    logged = [e.user_message for e in events if "streaming" in e.user_message and "in process" in e.user_message]
    assert {int(m.rsplit("in process ", 1)[1].split()[0].rstrip(",")) for m in logged} == set(group_pids.values())
    collected = [e.user_message for e in events if "group(s) streamed" in e.user_message]
    assert len(collected) == 1 and all(str(pid) in collected[0] for pid in group_pids.values())
    rows = branch_rows(project.table(TABLE), BRANCH)
    assert as_rows(rows) == valid_rows(paths)
    assert {r["_run_id"] for r in rows} == {run.run_id} and len({r["_ingested_at"] for r in rows}) == 1
    assert len(run_snapshots(project, run.run_id)) == 1


def test_a_partition_run_fans_out_over_its_partitions_files_and_replaces_only_its_window(project: Project) -> None:
    project.write_spec(daily_fan_out_spec())
    expected: Counter[Any] = Counter()
    for day, parts in (("2024-01-30", (1,)), ("2024-01-31", (40_000, 40_000, 5))):
        start = 0
        for index, count in enumerate(parts):
            project.write_data(
                f"events/{day}/part-{index}.csv",
                "id,event_date,name\n" + "".join(f"{start + i},{day},n-{start + i}-padding\n" for i in range(count)),
            )
            expected.update((start + i, day) for i in range(count))
            start += count

    results = [project.materialize(partition_key=day) for day in ("2024-01-30", "2024-01-31", "2024-01-31")]

    assert all(r.success for r in results)
    groups = len(planned_groups(sorted((project.data_dir / "events" / "2024-01-31").glob("*.csv"))))
    assert groups >= 2
    assert [len([k for k in step_keys(r) if "__extract[" in k]) for r in results] == [1, groups, groups]
    table = project.table(TABLE)
    assert Counter((r["id"], r["event_date"].isoformat()) for r in branch_rows(table, BRANCH)) == expected
    head = table.snapshot_by_name(BRANCH)
    assert head is not None and head.summary is not None
    assert head.summary.get("dativo.partition") == "2024-01-31" and head.summary.get(RUN_ID_KEY) == results[2].run_id


def test_an_incremental_partition_fans_out_from_its_own_state_nothing_new_then_a_removed_file(
    project: Project,
) -> None:
    """The plan selects as the one extract step does: a partition's run from the partition's own committed state,
    so that running it again reads nothing, and a file gone from the partition takes its rows away."""
    project.write_spec(daily_fan_out_spec(incremental={"strategy": "file_modified_time"}))
    day = "2024-01-31"
    for index in range(2):
        project.write_data(f"events/{day}/part-{index}.csv",
                           "id,event_date,name\n" + "".join(f"{index * 10 + i},{day},n\n" for i in range(3)))

    first = project.materialize(partition_key=day)
    head = project.table(TABLE).snapshot_by_name(BRANCH)
    again = project.materialize(partition_key=day)

    assert first.success and again.success
    assert project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id == head.snapshot_id
    assert materialization(again, "events")["nothing_new"] is True

    (project.data_dir / "events" / day / "part-1.csv").unlink()
    removed = project.materialize(partition_key=day)

    assert removed.success
    assert sorted(r["id"] for r in branch_rows(project.table(TABLE), BRANCH)) == [0, 1, 2]


def test_reexecuting_a_run_whose_group_failed_commits_every_group_once_under_the_planning_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group step that failed for good fails the run (nothing committed); re-executed from failure, only that
    group streams again, and the commit holds every group's files once, recorded under the run that planned."""
    project = Project(tmp_path / "project")
    project.write_spec(fan_out_spec(step_size_mb=1))
    paths = write_files(project)
    groups = planned_groups(paths)
    module = write_job_module(tmp_path, project.specs_dir)
    monkeypatch.syspath_prepend(str(tmp_path))
    job = dg.reconstructable(importlib.import_module(module).ingest_job)
    verify = assets.verify_written
    target = groups[1][0]

    def refuse(outcome: Any, s3: Any) -> None:
        if target in outcome.files_read:
            raise PermissionError(13, "Permission denied")  # terminal: not retried
        verify(outcome, s3)

    monkeypatch.setattr(assets, "verify_written", refuse)
    (tmp_path / "home").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "home")) as instance:
        failed = dg.execute_job(job, instance, run_config=IN_PROCESS)
        assert not failed.success
        assert [e.step_key for e in failed.all_events if e.is_step_failure] == ["events.events__extract[g1]"]
        assert not project.catalog().table_exists(TABLE) or project.table(TABLE).snapshot_by_name(BRANCH) is None
        monkeypatch.setattr(assets, "verify_written", verify)

        again = dg.execute_job(
            job, instance, run_config=IN_PROCESS,
            reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance),
        )

        assert again.success
        executed = sorted(e.step_key for e in again.all_events if e.event_type == dg.DagsterEventType.STEP_START)
    assert executed == ["events.events__commit", "events.events__extract[g1]", "events.events__validate",
                        "events.events__write"]
    table = project.table(TABLE)
    rows = branch_rows(table, BRANCH)
    assert as_rows(rows) == valid_rows(paths)
    assert {r["_run_id"] for r in rows} == {failed.run_id} and len({r["_ingested_at"] for r in rows}) == 1
    assert len(run_snapshots(project, failed.run_id)) == 1 and run_snapshots(project, again.run_id) == []


def test_catalog_none_and_the_command_line_with_fan_out(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    """``catalog: none``: one commit marker lists every group's files; ``dativo-dagster materialize`` prints the one
    summary line and exits 1 for warn rejects from several groups, then reports nothing new."""
    project.write_spec(fan_out_spec(step_size_mb=1, schema_validation_mode="warn", target={"catalog": "none"}))
    paths = write_files(project, bad={0: 1, 6: 2})
    assert len(planned_groups(paths)) >= 3

    assert main(["materialize", "--specs", str(project.specs_dir), "--log-level", "ERROR"]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"events: WARN rows_read={sum(FILE_ROWS)} committed={sum(FILE_ROWS) - 3} rejected=3 ")

    location = str(project.warehouse / "testdomain" / "testproduct" / "events")
    assert marker_rows(location) == valid_rows(paths)
    assert len(list(Path(location, "_commits").glob("*.json"))) == 1
    assert sorted(committed_files(location, S3Settings())) == sorted(parquet_files(location))
    assert sum(len(pq.read_table(f)) for f in committed_files(location + "__rejects", S3Settings())) == 3

    assert main(["materialize", "--specs", str(project.specs_dir), "--log-level", "ERROR"]) == 0
    assert "nothing_new" in capsys.readouterr().out
    assert len(list(Path(location, "_commits").glob("*.json"))) == 1


def test_overwrite_with_fan_out_replaces_the_table_with_every_group_of_the_run(project: Project) -> None:
    spec = fan_out_spec(step_size_mb=1, target={"partitioning": ["ingest_date"], "write_mode": "overwrite"})
    del spec["source"]["incremental"]  # overwrite reads every file on every run
    project.write_spec(spec)
    paths = write_files(project)
    assert project.materialize().success
    paths[0].unlink()
    paths = paths[1:]

    result = project.materialize()

    assert result.success
    assert len([k for k in step_keys(result) if "__extract[" in k]) >= 2
    rows = branch_rows(project.table(TABLE), BRANCH)
    assert as_rows(rows) == valid_rows(paths) and {r["_run_id"] for r in rows} == {result.run_id}
