"""Jobs and schedules from the specs, the maintenance job, and the Dagster instance settings (run retries)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pyiceberg.table.snapshots as pyiceberg_snapshots
import pytest
import yaml
from pyiceberg.table import Table

from dativo_dagster import assets, maintenance
from dativo_dagster.definitions import build_definitions
from dativo_dagster.jobs import MAINTENANCE_JOB
from dativo_dagster.maintenance import MIN_AGE_HOURS, remove_stale_staging, remove_unreferenced
from dativo_dagster.markers import committed_files
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_state import RUN_ID_KEY, STATE_FILE_KEY, STATE_FILE_PREFIX
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.table_checks import (
    as_rows,
    branch_snapshot_ids,
    csv_text,
    expected_rows,
    failures,
    iceberg_rows,
    incremental_spec,
    marker_rows,
    materialization,
    parquet_files,
    referenced_files,
    touch,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve(defs: dg.Definitions, selection: dg.AssetSelection | None) -> set[dg.AssetKey]:
    assert selection is not None
    return set(selection.resolve(defs.get_repository_def().asset_graph))


def test_schedules_run_the_spec_s_own_job(project: Project) -> None:
    project.write_spec(base_spec("hourly", schedule={"cron": "15 * * * *", "timezone": "Europe/Berlin"}))
    project.write_spec(base_spec("unscheduled"))
    defs = build_definitions(project.specs_dir)

    schedules = {s.name: s for s in defs.schedules or []}
    assert set(schedules) == {"hourly__schedule", f"{MAINTENANCE_JOB}__daily"}
    schedule = schedules["hourly__schedule"]
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("15 * * * *", "Europe/Berlin")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "hourly__job"
    job = defs.resolve_job_def("hourly__job")
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("hourly")}
    maintenance = schedules[f"{MAINTENANCE_JOB}__daily"]
    assert (maintenance.job_name, maintenance.cron_schedule) == (MAINTENANCE_JOB, "0 3 * * *")
    assert maintenance.default_status == dg.DefaultScheduleStatus.STOPPED

    data = schedule.evaluate_tick(dg.build_schedule_context())
    assert len(data.run_requests or []) == 1


def test_every_spec_has_its_own_job_targeting_exactly_its_asset(project: Project) -> None:
    """README: every asset gets a job ``<name>__job``, with or without a schedule or sensor."""
    project.write_spec(base_spec("hourly", schedule={"cron": "15 * * * *"}))
    project.write_spec(base_spec("plain"))
    project.write_spec(base_spec("other", dataProduct="other"))
    sensed = incremental_spec()
    sensed["sensor"] = {"minimum_interval_seconds": 60}
    project.write_spec(sensed)
    project.write_data("plain.csv", csv_text([1, 2]))
    defs = build_definitions(project.specs_dir)

    names = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert names == {"hourly", "plain", "other", "events"}
    jobs = {job.name: job for job in defs.resolve_all_job_defs()}
    for name in names:
        assert f"{name}__job" in jobs, f"no job for {name}: {sorted(jobs)}"
        assert jobs[f"{name}__job"].asset_layer.executable_asset_keys == {dg.AssetKey(name)}
    assert {s.name: s.job_name for s in defs.schedules or []}["hourly__schedule"] == "hourly__job"

    with dg.instance_for_test() as instance:
        result = jobs["plain__job"].execute_in_process(instance=instance)
    assert result.success
    assert len(iceberg_rows(project.table("testdomain.plain"), "acme")) == 2


def test_one_job_per_data_product_materializes_its_group(project: Project) -> None:
    project.write_spec(base_spec("alpha", dataProduct="sales"))
    project.write_spec(base_spec("beta", dataProduct="sales"))
    project.write_spec(base_spec("gamma", dataProduct="hr"))
    for name in ("alpha", "beta", "gamma"):
        project.write_data(f"{name}.csv", csv_text([1, 2]))
    defs = build_definitions(project.specs_dir)

    jobs = {job.name for job in defs.resolve_all_job_defs()}
    assert {"sales__group_job", "hr__group_job", MAINTENANCE_JOB} <= jobs
    sales = defs.resolve_job_def("sales__group_job")
    assert sales.asset_layer.executable_asset_keys == {dg.AssetKey("alpha"), dg.AssetKey("beta")}

    with dg.instance_for_test() as instance:
        result = sales.execute_in_process(instance=instance)
    assert result.success
    catalog = project.catalog()
    assert {".".join(t) for t in catalog.list_tables("testdomain")} == {"testdomain.alpha", "testdomain.beta"}
    assert len(iceberg_rows(catalog.load_table("testdomain.alpha"), "acme")) == 2


def write_orphan(folder: Path, name: str, age_hours: float) -> Path:
    """A Parquet file no commit references, last modified ``age_hours`` ago."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    pq.write_table(pa.table({"id": [1]}), path)
    when = time.time() - age_hours * 3600
    os.utime(path, (when, when))
    return path


def run_maintenance(
    project: Project, expiry: dict[str, Any] | None = None, *, succeed: bool = True, **config: Any
) -> dg.ExecuteInProcessResult:
    """The maintenance job; ``expiry`` configures its ``expire_snapshots`` op, the rest ``remove_orphan_files``."""
    defs = build_definitions(project.specs_dir)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(MAINTENANCE_JOB).execute_in_process(
            run_config={"ops": {"remove_orphan_files": {"config": config},
                                "expire_snapshots": {"config": expiry or {}}}},
            instance=instance,
            raise_on_error=False,
        )
    assert result.success is succeed
    return result


def hours_later(monkeypatch: pytest.MonkeyPatch, hours: float) -> None:
    """Let the maintenance job run ``hours`` from now: every file and staged record is that much older."""
    now = time.time()
    monkeypatch.setattr(maintenance, "wall_clock", lambda: now + hours * 3600)


def test_maintenance_removes_old_unreferenced_files_only(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    table = project.table("testdomain.events")
    location = Path(table.location().removeprefix("file://"))
    committed = referenced_files(table)
    assert committed and committed <= parquet_files(str(location))
    old = write_orphan(location / "data" / "ingest_date=2025-01-01", "old-orphan.parquet", age_hours=30)
    young = write_orphan(location / "data" / "ingest_date=2025-01-01", "young-orphan.parquet", age_hours=1)
    stale_staging = project.root / ".dativo" / "staging" / "dead-run"
    stale_staging.mkdir(parents=True)
    os.utime(stale_staging, (time.time() - 48 * 3600,) * 2)

    fresh_staging = project.root / ".dativo" / "staging" / "running-run"
    (fresh_staging / "events.events__extract").mkdir(parents=True)
    os.utime(fresh_staging, (time.time() - 48 * 3600,) * 2)  # the folder is old, a record in it is not
    (fresh_staging / "events.events__extract" / "result.json").write_text("{}")

    dry = run_maintenance(project, dry_run=True)
    assert dry.output_for_node("remove_orphan_files") == 1
    assert old.exists() and stale_staging.exists()

    result = run_maintenance(project)  # default: older than 24 hours
    assert result.output_for_node("remove_orphan_files") == 1
    assert not old.exists() and young.exists() and not stale_staging.exists()
    assert fresh_staging.exists() and result.output_for_node("remove_orphan_files") == 1
    assert committed <= parquet_files(str(location))

    run_maintenance(project, older_than_hours=30)  # a real age: the 30-hour-old orphan is not older than that
    assert young.exists() and not old.exists()

    hours_later(monkeypatch, 24)  # a day later the young orphan is 25 hours old
    run_maintenance(project)
    assert not young.exists()
    assert parquet_files(str(location)) == committed
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows([a])


def test_maintenance_keeps_files_of_older_snapshots_and_other_branches(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    first_files = referenced_files(project.table("testdomain.events"))
    project.write_data("events/a.csv", csv_text([3], tag="v2"))
    os.utime(a, (time.time() + 5,) * 2)
    assert project.materialize().success  # replaces a's rows: its first data file leaves the branch head
    acme_head = referenced_files(project.table("testdomain.events")) - first_files
    # the spec moves to another tenant: its runs now go to branch globex; acme is a branch no spec names any more
    project.write_spec(incremental_spec(tenant="globex"))
    b = project.write_data("events/b.csv", csv_text([7, 8]))
    assert project.materialize().success
    table = project.table("testdomain.events")
    globex_files = {f.file.file_path for f in table.scan(snapshot_id=table.snapshot_by_name("globex").snapshot_id)
                    .plan_files()}
    acme_files = {f.file.file_path for f in table.scan(snapshot_id=table.snapshot_by_name("acme").snapshot_id)
                  .plan_files()}
    assert globex_files and not globex_files & acme_files
    orphan = write_orphan(Path(table.location().removeprefix("file://")) / "data", "orphan.parquet", age_hours=0)

    hours_later(monkeypatch, 25)  # every file is old enough to go if nothing referenced it
    result = run_maintenance(project)

    table = project.table("testdomain.events")
    location = table.location().removeprefix("file://")
    assert result.output_for_node("remove_orphan_files") == 1 and not orphan.exists()
    assert first_files <= parquet_files(location), "a file an older snapshot references is still needed"
    assert acme_head and acme_head <= parquet_files(location), "the files of a branch no spec names any more"
    assert {f.removeprefix("file://") for f in globex_files} <= parquet_files(location)
    assert parquet_files(location) == referenced_files(table)
    assert iceberg_rows(table, "acme") == expected_rows([a])
    assert iceberg_rows(table, "globex") == expected_rows([a, b])


def test_maintenance_for_catalog_none_keeps_every_marked_file(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = incremental_spec()
    spec["target"] = {"catalog": "none", "partitioning": ["ingest_date"]}
    project.write_spec(spec)
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    location = project.warehouse / "testdomain" / "testproduct" / "events"
    marked = set(committed_files(str(location), S3Settings()))
    orphan = write_orphan(location / "data" / "ingest_date=2025-01-01", "orphan.parquet", age_hours=0)

    hours_later(monkeypatch, 25)
    result = run_maintenance(project)

    assert result.output_for_node("remove_orphan_files") == 1
    assert not orphan.exists()
    assert parquet_files(str(location)) == marked
    assert marker_rows(str(location)) == expected_rows([a])


def snapshot_ids(table: Table) -> set[int]:
    return {s.snapshot_id for s in table.metadata.snapshots}


def metadata_files(table: Table) -> set[str]:
    """Manifest lists, manifests and state files in the table's metadata folder."""
    folder = Path(table.location_provider().metadata_path)
    return {str(p) for p in [*folder.glob("*.avro"), *folder.glob(f"{STATE_FILE_PREFIX}*.json")]}


def referenced_metadata(table: Table) -> set[str]:
    """What the kept snapshots reference there, found without the maintenance code."""
    out = set()
    for snapshot in table.metadata.snapshots:
        out.add(snapshot.manifest_list.removeprefix("file://"))
        out.update(m.manifest_path.removeprefix("file://") for m in snapshot.manifests(table.io))
        if state_file := snapshot.summary.additional_properties.get(STATE_FILE_KEY):
            out.add(state_file)
    return out


def test_maintenance_expires_old_snapshots_but_keeps_heads_tags_and_the_newest(project: Project) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    tagged = project.table("testdomain.events").snapshot_by_name("acme").snapshot_id
    project.table("testdomain.events").manage_snapshots().create_tag(tagged, "audit").commit()
    b = project.write_data("events/b.csv", csv_text([3]))
    assert project.materialize().success
    project.write_data("events/a.csv", csv_text([4, 5], tag="v2"))
    touch(a, 5)
    assert project.materialize().success  # replaces a's rows: a delete and an append snapshot
    table = project.table("testdomain.events")
    heads = {name: table.snapshot_by_name(name).snapshot_id for name in ("acme", "main")}
    newest_two = branch_snapshot_ids(table, "acme")[:2]
    before = snapshot_ids(table)
    assert len(before) == 5  # main's first, a, b, and a's replacement in two

    dry = run_maintenance(project, expiry={"max_snapshot_age_hours": 0, "min_snapshots_to_keep": 2, "dry_run": True})
    assert dry.output_for_node("expire_snapshots") == 1 and snapshot_ids(project.table("testdomain.events")) == before

    result = run_maintenance(project, expiry={"max_snapshot_age_hours": 0, "min_snapshots_to_keep": 2})

    table = project.table("testdomain.events")
    assert result.output_for_node("expire_snapshots") == 1
    assert snapshot_ids(table) == {*heads.values(), *newest_two, tagged}
    assert {name: table.snapshot_by_name(name).snapshot_id for name in ("acme", "main")} == heads
    assert table.snapshot_by_name("audit").snapshot_id == tagged
    assert iceberg_rows(table, "acme") == expected_rows([a, b])
    assert as_rows(table.scan(snapshot_id=tagged).to_arrow().to_pylist()) == as_rows(
        {"id": i, "name": f"v1-{i}", "_source_file": str(a)} for i in (1, 2))


def test_incremental_runs_after_expiry_skip_the_files_already_loaded(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(incremental_spec())
    files = []
    for k in range(3):  # three runs, each reading one new file
        files.append(project.write_data(f"events/{k}.csv", csv_text([k])))
        assert project.materialize().success
    hours_later(monkeypatch, 25)
    run_maintenance(project, expiry={"max_snapshot_age_hours": 0, "min_snapshots_to_keep": 1})
    table = project.table("testdomain.events")
    assert snapshot_ids(table) == {table.snapshot_by_name(n).snapshot_id for n in ("acme", "main")}

    again = project.materialize()

    assert again.success and materialization(again, "events")["nothing_new"] is True
    assert project.table("testdomain.events").metadata_location == table.metadata_location
    changed = project.write_data("events/1.csv", csv_text([10, 11], tag="v2"))
    touch(changed, 5)
    files.append(project.write_data("events/3.csv", csv_text([3])))
    result = project.materialize()
    assert result.success
    assert materialization(result, "events")["source_files"] == sorted(os.path.abspath(p) for p in (files[1], files[3]))
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows(files)


def test_maintenance_removes_the_files_of_expired_snapshots_once_they_are_old_enough(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    first_files = referenced_files(project.table("testdomain.events"))
    project.write_data("events/a.csv", csv_text([3], tag="v2"))
    touch(a, 5)
    assert project.materialize().success
    table = project.table("testdomain.events")
    location = table.location().removeprefix("file://")
    on_disk = metadata_files(table)

    run_maintenance(project, expiry={"max_snapshot_age_hours": 0, "min_snapshots_to_keep": 1})  # files: 24 h
    table = project.table("testdomain.events")
    assert len(table.metadata.snapshots) == 2  # acme's head, main's
    assert first_files <= parquet_files(location) and metadata_files(table) == on_disk, "young files stay"
    assert referenced_metadata(table) < on_disk

    hours_later(monkeypatch, 25)
    result = run_maintenance(project)

    table = project.table("testdomain.events")
    assert result.output_for_node("remove_orphan_files") == len(first_files)
    assert parquet_files(location) == referenced_files(table) and not first_files & parquet_files(location)
    assert metadata_files(table) == referenced_metadata(table)
    assert iceberg_rows(table, "acme") == expected_rows([a])
    assert project.materialize().success and iceberg_rows(project.table("testdomain.events"), "acme") == (
        expected_rows([a]))


def test_remove_unreferenced_and_stale_staging_as_plain_functions(tmp_path: Path) -> None:
    location = tmp_path / "table"
    kept = write_orphan(location / "data", "kept.parquet", age_hours=30)
    gone = write_orphan(location / "data" / "p=1", "gone.parquet", age_hours=30)
    (location / "data" / "notes.txt").write_text("not parquet")
    (location / "metadata").mkdir()
    meta = write_orphan(location / "metadata", "x.parquet", age_hours=30)

    young = write_orphan(location / "data" / "p=1", "young.parquet", age_hours=20)
    day = MIN_AGE_HOURS * 3600

    report = remove_unreferenced(str(location), lambda: [f"file://{kept}"], S3Settings(), older_than_seconds=day)

    assert report.removed == [str(gone)] and report.referenced == 1 and report.kept_recent == 1
    assert kept.exists() and young.exists() and meta.exists() and (location / "data" / "notes.txt").exists()
    assert remove_unreferenced(str(tmp_path / "missing"), list, S3Settings(), older_than_seconds=day).removed == []
    staging = tmp_path / "staging"
    (staging / "fresh").mkdir(parents=True)
    assert remove_stale_staging(staging, day) == []
    assert remove_stale_staging(tmp_path / "no-staging", day) == []
    for seconds in (0, -300, day - 1, float("nan")):  # the floor: never younger than a day
        with pytest.raises(ValueError, match=r"older_than_seconds must be at least 86400 seconds \(24 hours\)"):
            remove_unreferenced(str(location), list, S3Settings(), older_than_seconds=seconds)
        with pytest.raises(ValueError, match="at least 86400 seconds"):
            remove_stale_staging(staging, seconds)
    assert young.exists() and (staging / "fresh").exists()


@pytest.mark.parametrize("hours", [0, -1, 23.5])
def test_the_maintenance_job_refuses_an_age_below_a_day(
    project: Project, monkeypatch: pytest.MonkeyPatch, hours: float
) -> None:
    project.write_spec(incremental_spec())
    project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    location = Path(project.table("testdomain.events").location().removeprefix("file://"))
    orphan = write_orphan(location / "data", "orphan.parquet", age_hours=2)
    stale = project.root / ".dativo" / "staging" / "dead-run"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)

    result = run_maintenance(project, succeed=False, older_than_hours=hours)

    [message] = failures(result)
    assert message.startswith("remove_orphan_files: ")
    assert "older_than_hours" in message and "greater than or equal to 24" in message, message
    assert orphan.exists() and stale.exists()


def test_a_commit_landing_between_the_listing_and_the_deletion_keeps_its_file(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run re-executed long after it wrote its files commits while the maintenance job runs: the job lists the
    (then unreferenced, old) file, the commit lands, and the job must see it before deleting."""
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    table = project.table("testdomain.events")
    [committed] = referenced_files(table)
    # the late run's file: same schema and partition as a committed one, written long ago, not referenced yet
    late = Path(committed).with_name("late-run.parquet")
    late.write_bytes(Path(committed).read_bytes())
    orphan = write_orphan(late.parent, "orphan.parquet", age_hours=30)
    os.utime(late, (time.time() - 30 * 3600,) * 2)
    listed_files = maintenance._listed_files
    landed: list[str] = []

    def listing_then_a_commit(folder: str, *args: Any) -> Any:
        infos = listed_files(folder, *args)
        if folder.endswith("/data") and not landed:
            assert str(late) in {i.path for i in infos}, "the late file was listed before its commit"
            project.table("testdomain.events").add_files([str(late)])  # a real commit, on main
            landed.append(str(late))
        return infos

    monkeypatch.setattr(maintenance, "_listed_files", listing_then_a_commit)
    result = run_maintenance(project)

    assert landed == [str(late)]
    assert late.exists(), "a file a commit references was deleted"
    assert not orphan.exists() and result.output_for_node("remove_orphan_files") == 1
    table = project.table("testdomain.events")
    assert str(late) in referenced_files(table)
    assert len(table.scan().to_arrow()) == 2  # main reads the late file: it is there
    assert iceberg_rows(table, "acme") == expected_rows([a])


def test_a_commit_whose_written_file_is_gone_fails_naming_it_and_commits_nothing(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run re-executed after the maintenance job removed its (old, unreferenced) files meets."""
    project.write_spec(incremental_spec(retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    before = project.table("testdomain.events")
    project.write_data("events/b.csv", csv_text([3, 4]))
    commit_files = assets.commit_files
    removed: list[str] = []

    def files_removed_first(table: Any, **kwargs: Any) -> Any:
        for written in kwargs["files"]:
            Path(written.uri.removeprefix("file://")).unlink()
            removed.append(written.uri)
        return commit_files(table, **kwargs)

    monkeypatch.setattr(assets, "commit_files", files_removed_first)
    result = project.materialize()

    assert not result.success and removed
    [message] = failures(result)
    assert f"run {result.run_id}: data file {removed[0]} written for this commit to testdomain.events is gone" in (
        message), message
    assert "materialize the asset again in a new run" in message
    commit_starts = [e for e in result.all_events
                     if e.event_type == dg.DagsterEventType.STEP_START and e.step_key.endswith("__commit")]
    assert len(commit_starts) == 1, "terminal: not retried"
    table = project.table("testdomain.events")
    assert table.metadata_location == before.metadata_location, "the table is exactly as it was"
    assert iceberg_rows(table, "acme") == expected_rows([a])
    assert not [s for s in table.metadata.snapshots if s.summary.additional_properties.get(RUN_ID_KEY) == result.run_id]


def test_snapshot_expiry_by_age_removes_only_the_snapshots_older_than_the_limit(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs two days ago, two runs now; expiry with a one-day limit and no count to keep beyond the head."""
    project.write_spec(incremental_spec())
    files = []
    real_time = time.time
    with monkeypatch.context() as two_days_ago:  # the clock pyiceberg stamps new snapshots with
        two_days_ago.setattr(pyiceberg_snapshots, "time", SimpleNamespace(time=lambda: real_time() - 48 * 3600))
        for k in range(3):
            files.append(project.write_data(f"events/{k}.csv", csv_text([k])))
            assert project.materialize().success
    old = set(branch_snapshot_ids(project.table("testdomain.events"), "acme"))
    for k in range(3, 5):
        files.append(project.write_data(f"events/{k}.csv", csv_text([k])))
        assert project.materialize().success
    table = project.table("testdomain.events")
    by_id = {s.snapshot_id: s for s in table.metadata.snapshots}
    young = set(branch_snapshot_ids(table, "acme")) - old
    main_head = table.snapshot_by_name("main").snapshot_id
    day_ago_ms = (time.time() - 24 * 3600) * 1000
    assert len(young) == 2 and all(by_id[i].timestamp_ms > day_ago_ms for i in young)
    assert main_head in old and all(by_id[i].timestamp_ms < day_ago_ms for i in old)
    assert old - {main_head} and len(old - {main_head}) == 3

    result = run_maintenance(project, expiry={"max_snapshot_age_hours": 24, "min_snapshots_to_keep": 1})

    table = project.table("testdomain.events")
    assert result.output_for_node("expire_snapshots") == 3
    assert snapshot_ids(table) == young | {main_head}, "only the snapshots older than a day went, not the young ones"
    assert iceberg_rows(table, "acme") == expected_rows(files)
    again = project.materialize()
    assert again.success and materialization(again, "events")["nothing_new"] is True


@pytest.mark.parametrize("path", ["dagster.yaml", "deploy/dagster.docker.yaml"])
def test_instance_settings_enable_run_monitoring_and_run_retries(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load((REPO_ROOT / path).read_text())
    if "storage" in config:
        # the deployment's PostgreSQL storage needs a server (see the integration tests); the rest loads here
        config.pop("storage")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    monkeypatch.setenv("DAGSTER_HOME", str(home))

    with dg.DagsterInstance.get() as instance:  # what `dagster dev`, the daemon and the code server load
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False


def test_maintenance_removes_the_keys_file_of_a_merge_run_that_failed_and_was_never_re_executed(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dativo_dagster import commit as commit_module  # noqa: PLC0415
    from dativo_dagster_tests.test_merge import merge_spec  # noqa: PLC0415

    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n")
    assert project.materialize().success
    table = project.table("testdomain.people")
    keys_folder = Path(table.location().removeprefix("file://")) / "_dativo_merge"
    assert not list(keys_folder.glob("*.parquet"))  # a committed run removes its keys file

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("catalog refused the write (injected)")

    with monkeypatch.context() as patched:
        patched.setattr(commit_module, "_commit_once", refused)
        project.write_data("people.csv", "id,name,deleted\n1,b,false\n")
        failed = project.materialize()
    assert not failed.success
    (left,) = keys_folder.glob("*.parquet")  # the failed run's keys, kept for a re-execution of its commit step
    assert left.name.startswith(failed.run_id) and pq.read_table(left).column("id").to_pylist() == [1]
    unrelated = keys_folder / "notes.txt"  # only the keys files the merge writes are removed
    unrelated.write_text("kept")

    result = run_maintenance(project)  # the file is young: a re-execution may still need it
    assert left.exists() and result.output_for_node("remove_orphan_files") == 0

    hours_later(monkeypatch, 25)
    run_maintenance(project, dry_run=True)
    assert left.exists()
    result = run_maintenance(project)
    assert not left.exists() and unrelated.exists()
    (output,) = [e for e in result.all_node_events if e.node_name == "remove_orphan_files" and e.is_successful_output]
    assert output.event_specific_data.metadata["merge_keys_files_removed"].value == 1
    rows = branch_rows(project.table("testdomain.people"), "acme")
    assert [(r["id"], r["name"]) for r in rows] == [(1, "a")]  # the failed run changed nothing
