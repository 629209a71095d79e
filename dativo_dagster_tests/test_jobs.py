"""Jobs and schedules from the specs, the maintenance job, and the Dagster instance settings (run retries)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pyiceberg.table import Table

from dativo_dagster.definitions import build_definitions
from dativo_dagster.jobs import MAINTENANCE_JOB
from dativo_dagster.maintenance import remove_stale_staging, remove_unreferenced
from dativo_dagster.markers import committed_files
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_state import STATE_FILE_KEY, STATE_FILE_PREFIX
from dativo_dagster_tests.conftest import Project, base_spec
from dativo_dagster_tests.table_checks import (
    as_rows,
    branch_snapshot_ids,
    csv_text,
    expected_rows,
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


def run_maintenance(project: Project, expiry: dict[str, Any] | None = None, **config: Any) -> dg.ExecuteInProcessResult:
    """The maintenance job; ``expiry`` configures its ``expire_snapshots`` op, the rest ``remove_orphan_files``."""
    defs = build_definitions(project.specs_dir)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(MAINTENANCE_JOB).execute_in_process(
            run_config={"ops": {"remove_orphan_files": {"config": config},
                                "expire_snapshots": {"config": expiry or {}}}},
            instance=instance,
        )
    assert result.success
    return result


def test_maintenance_removes_old_unreferenced_files_only(project: Project) -> None:
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

    dry = run_maintenance(project, dry_run=True)
    assert dry.output_for_node("remove_orphan_files") == 1
    assert old.exists() and stale_staging.exists()

    result = run_maintenance(project)  # default: older than 24 hours
    assert result.output_for_node("remove_orphan_files") == 1
    assert not old.exists() and young.exists() and not stale_staging.exists()
    assert committed <= parquet_files(str(location))

    run_maintenance(project, older_than_hours=0)
    assert not young.exists()
    assert parquet_files(str(location)) == committed
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows([a])


def test_maintenance_keeps_files_of_older_snapshots_and_other_branches(project: Project) -> None:
    project.write_spec(incremental_spec())
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    first_files = referenced_files(project.table("testdomain.events"))
    project.write_data("events/a.csv", csv_text([3], tag="v2"))
    os.utime(a, (time.time() + 5,) * 2)
    assert project.materialize().success  # replaces a's rows: its first data file leaves the branch head

    run_maintenance(project, older_than_hours=0)

    table = project.table("testdomain.events")
    location = table.location().removeprefix("file://")
    assert first_files <= parquet_files(location), "a file an older snapshot references is still needed"
    assert parquet_files(location) == referenced_files(table)
    assert iceberg_rows(table, "acme") == expected_rows([a])


def test_maintenance_for_catalog_none_keeps_every_marked_file(project: Project) -> None:
    spec = incremental_spec()
    spec["target"] = {"catalog": "none", "partitioning": ["ingest_date"]}
    project.write_spec(spec)
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    assert project.materialize().success
    location = project.warehouse / "testdomain" / "testproduct" / "events"
    marked = set(committed_files(str(location), S3Settings()))
    orphan = write_orphan(location / "data" / "ingest_date=2025-01-01", "orphan.parquet", age_hours=0)

    result = run_maintenance(project, older_than_hours=0)

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


def test_incremental_runs_after_expiry_skip_the_files_already_loaded(project: Project) -> None:
    project.write_spec(incremental_spec())
    files = []
    for k in range(3):  # three runs, each reading one new file
        files.append(project.write_data(f"events/{k}.csv", csv_text([k])))
        assert project.materialize().success
    run_maintenance(project, expiry={"max_snapshot_age_hours": 0, "min_snapshots_to_keep": 1}, older_than_hours=0)
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


def test_maintenance_removes_the_files_of_expired_snapshots_once_they_are_old_enough(project: Project) -> None:
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

    result = run_maintenance(project, older_than_hours=0)

    table = project.table("testdomain.events")
    assert result.output_for_node("remove_orphan_files") == len(first_files)
    assert parquet_files(location) == referenced_files(table) and not first_files & parquet_files(location)
    assert metadata_files(table) == referenced_metadata(table)
    assert iceberg_rows(table, "acme") == expected_rows([a])
    assert project.materialize().success and iceberg_rows(project.table("testdomain.events"), "acme") == (
        expected_rows([a]))


def test_remove_unreferenced_and_stale_staging_as_plain_functions(tmp_path: Path) -> None:
    location = tmp_path / "table"
    kept = write_orphan(location / "data", "kept.parquet", age_hours=5)
    gone = write_orphan(location / "data" / "p=1", "gone.parquet", age_hours=5)
    (location / "data" / "notes.txt").write_text("not parquet")
    (location / "metadata").mkdir()
    meta = write_orphan(location / "metadata", "x.parquet", age_hours=5)

    report = remove_unreferenced(str(location), [f"file://{kept}"], S3Settings(), older_than_seconds=3600)

    assert report.removed == [str(gone)] and report.referenced == 1
    assert kept.exists() and meta.exists() and (location / "data" / "notes.txt").exists()
    assert remove_unreferenced(str(tmp_path / "missing"), [], S3Settings(), older_than_seconds=0).removed == []
    staging = tmp_path / "staging"
    (staging / "fresh").mkdir(parents=True)
    assert remove_stale_staging(staging, 3600) == []
    assert remove_stale_staging(tmp_path / "no-staging", 0) == []


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
