"""Jobs, schedules and sensors derived from the specs, and the maintenance job."""

# no ``from __future__ import annotations``: Dagster reads the op's annotations at definition time
import functools
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
from pydantic import Field
from pyiceberg.table import Table

from dativo_dagster.executors import many_assets_executor
from dativo_dagster.logging import logging_run_config
from dativo_dagster.partitions import partitions_definition
from dativo_dagster.maintenance import (
    MIN_AGE_HOURS,
    current_references,
    expire_snapshots,
    iceberg_referenced_files,
    marker_referenced_files,
    remove_stale_merge_keys,
    remove_stale_staging,
    remove_unreferenced,
    remove_unreferenced_metadata,
)
from dativo_dagster.resources import CatalogResource, StagingResource, StorageResource
from dativo_dagster.sensors import build_sensor
from dativo_dagster.spec import CatalogKind, LoadedSpec

MAINTENANCE_JOB = "dativo_maintenance"


def asset_job(loaded: LoadedSpec):
    """The job that materializes one spec's asset."""
    return dg.define_asset_job(
        f"{loaded.spec.name}__job", selection=dg.AssetSelection.assets(loaded.spec.name), config=logging_run_config()
    )


def group_jobs(loaded: Sequence[LoadedSpec], executor_def: dg.ExecutorDefinition = many_assets_executor) -> list:
    """One job per dataProduct group; its assets' steps run in parallel, by default forked from a preloaded
    forkserver (``DATIVO_EXECUTOR=celery``: on Celery workers)."""
    groups = sorted({item.spec.data_product for item in loaded})
    return [
        dg.define_asset_job(
            f"{group}__group_job",
            selection=dg.AssetSelection.groups(group),
            config=logging_run_config(),
            executor_def=executor_def,
        )
        for group in groups
    ]


def asset_jobs(loaded: Sequence[LoadedSpec]) -> dict[str, Any]:
    """Every spec's own job ``<name>__job``, by spec name."""
    return {item.spec.name: asset_job(item) for item in loaded}


def build_schedules(
    loaded: Sequence[LoadedSpec], jobs: Mapping[str, Any] | None = None
) -> list[dg.ScheduleDefinition]:
    """One schedule (on the spec's own job, from ``jobs`` when given) per spec that has ``schedule``; created
    stopped."""
    schedules = []
    for item in loaded:
        spec = item.spec
        if spec.schedule is None:
            continue
        if spec.partitions is not None:
            schedules.append(partitioned_schedule(item, jobs[spec.name] if jobs is not None else asset_job(item)))
            continue
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{spec.name}__schedule",
                job=jobs[spec.name] if jobs is not None else asset_job(item),
                cron_schedule=spec.schedule.cron,
                execution_timezone=spec.schedule.timezone,
                default_status=dg.DefaultScheduleStatus.STOPPED,
            )
        )
    return schedules


def partitioned_schedule(loaded: LoadedSpec, job: Any) -> dg.ScheduleDefinition:
    """A partitioned spec's schedule: at each tick of its cron, a run of the last partition complete by then
    (Dagster's ``build_schedule_from_partitioned_job`` would tie the cron to the partitions' own length)."""
    spec = loaded.spec
    assert spec.schedule is not None
    partitions = partitions_definition(spec)
    assert partitions is not None

    @dg.schedule(
        name=f"{spec.name}__schedule",
        job=job,
        cron_schedule=spec.schedule.cron,
        execution_timezone=spec.schedule.timezone,
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
    def request_last_partition(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        ended = partitions.get_partition_keys(current_time=context.scheduled_execution_time)
        key = ended[-1] if ended else None
        if key is None:
            return dg.SkipReason(f"no partition of {spec.name} has ended yet (the first starts {spec.partitions.start})")
        return dg.RunRequest(run_key=key, partition_key=key)

    return request_last_partition


def build_sensors(loaded: Sequence[LoadedSpec]) -> list[dg.SensorDefinition]:
    """One sensor per spec that has ``sensor``; created stopped."""
    return [build_sensor(item) for item in loaded if item.spec.sensor is not None]


class SnapshotExpiryConfig(dg.Config):
    """Which snapshots the maintenance job expires (named after Iceberg's ``history.expire.*`` table properties)."""

    max_snapshot_age_hours: float = Field(
        default=120.0,
        ge=0,
        description="Expire snapshots older than this (Iceberg's default: 5 days). Time travel reaches no further"
        " back; each snapshot kept costs every commit a little time.",
    )
    min_snapshots_to_keep: int = Field(
        default=10, ge=1, description="Every branch keeps at least its newest N snapshots (its head included)."
    )
    dry_run: bool = Field(default=False, description="Report what would be expired, expire nothing.")


class MaintenanceConfig(dg.Config):
    """How old an unreferenced file or a run's staged records must be before they are removed."""

    older_than_hours: float = Field(
        default=MIN_AGE_HOURS,
        ge=MIN_AGE_HOURS,
        description=f"Remove unreferenced data and metadata files, and runs' staged records, last modified more than"
        f" this many hours ago; at least {MIN_AGE_HOURS:g}: younger ones may belong to a run that has not committed"
        " yet (a retried step, a run re-executed from failure).",
    )
    dry_run: bool = Field(default=False, description="Report what would be removed, remove nothing.")


def _iceberg_tables(specs: Sequence[LoadedSpec], catalog_resource: CatalogResource) -> Iterator[tuple[str, Table]]:
    """Every Iceberg table (and quarantine table) of the specs that exists, by name."""
    catalog = None
    for item in specs:
        spec = item.spec
        if spec.target.catalog is CatalogKind.NONE:
            continue
        for identifier in (spec.table_identifier, spec.rejects_identifier):
            name = ".".join(identifier)
            catalog = catalog or catalog_resource.load_catalog()
            if catalog.table_exists(name):
                yield name, catalog.load_table(name)


def build_maintenance_job(loaded: Sequence[LoadedSpec]) -> dg.JobDefinition:
    """A job that expires old snapshots, then removes files no snapshot references (expired snapshots' files,
    files of runs killed mid-way) and stale staging."""
    specs = list(loaded)

    @dg.op(name="expire_snapshots")
    def expire_old_snapshots(
        context: dg.OpExecutionContext, config: SnapshotExpiryConfig, dativo_catalog: CatalogResource
    ) -> dg.Output[int]:
        older_than = datetime.now(timezone.utc) - timedelta(hours=config.max_snapshot_age_hours)
        expired: dict[str, int] = {}
        history_kept: dict[str, list[str]] = {}
        for name, table in _iceberg_tables(specs, dativo_catalog):
            report = expire_snapshots(
                table, older_than=older_than, keep_last=config.min_snapshots_to_keep, dry_run=config.dry_run
            )
            expired[name] = len(report.expired)
            if report.expired:
                verb = "would expire" if config.dry_run else "expired"
                context.log.info(f"{name}: {verb} {len(report.expired)} snapshot(s), {report.kept} kept")
            if report.history_kept:
                history_kept[name] = report.history_kept
                context.log.info(
                    f"{name}: branch(es) {report.history_kept} keep their whole history until their next commit"
                    " records its state file"
                )
        return dg.Output(
            sum(expired.values()),
            metadata={"expired_per_table": dg.MetadataValue.json(expired),
                      "history_kept": dg.MetadataValue.json(history_kept), "dry_run": config.dry_run},
        )

    @dg.op(name="remove_orphan_files", ins={"after_expiry": dg.In(dg.Nothing)})
    def remove_orphan_files(
        context: dg.OpExecutionContext,
        config: MaintenanceConfig,
        dativo_storage: StorageResource,
        dativo_catalog: CatalogResource,
        dativo_staging: StagingResource,
    ) -> dg.Output[int]:
        seconds = config.older_than_hours * 3600
        s3 = dativo_storage.s3_settings()
        removed: dict[str, int] = {}
        metadata_removed: dict[str, int] = {}
        merge_keys_removed = 0
        for item in specs:
            spec = item.spec
            if spec.target.catalog is CatalogKind.NONE:
                for identifier, suffix in ((spec.table_identifier, ""), (spec.rejects_identifier, "__rejects")):
                    location = dativo_storage.table_location(spec, suffix)
                    report = remove_unreferenced(location, functools.partial(marker_referenced_files, location, s3),
                                                 s3, older_than_seconds=seconds, dry_run=config.dry_run)
                    _log_removed(context, ".".join(identifier), report.removed)
                    removed[".".join(identifier)] = len(report.removed)
        for name, table in _iceberg_tables(specs, dativo_catalog):
            report = remove_unreferenced(table.location(), current_references(table, iceberg_referenced_files), s3,
                                         older_than_seconds=seconds, dry_run=config.dry_run)
            _log_removed(context, name, report.removed)
            removed[name] = len(report.removed)
            metadata = remove_unreferenced_metadata(table, s3, older_than_seconds=seconds, dry_run=config.dry_run)
            metadata_removed[name] = len(metadata.removed)
            # the keys file of a merge run that failed after writing it and was never re-executed
            merge_keys = remove_stale_merge_keys(table.location(), s3, older_than_seconds=seconds,
                                                 dry_run=config.dry_run)
            _log_removed(context, name, merge_keys.removed)
            merge_keys_removed += len(merge_keys.removed)
        stale = [] if config.dry_run else remove_stale_staging(dativo_staging.root, seconds, s3)
        return dg.Output(
            sum(removed.values()),
            metadata={"removed_per_table": dg.MetadataValue.json(removed),
                      "metadata_files_removed_per_table": dg.MetadataValue.json(metadata_removed),
                      "staging_folders_removed": len(stale), "merge_keys_files_removed": merge_keys_removed},
        )

    @dg.job(
        name=MAINTENANCE_JOB,
        description="Expire old snapshots, then remove data and metadata files that no snapshot references, and"
        " stale staging.",
    )
    def maintenance():
        remove_orphan_files(after_expiry=expire_old_snapshots())

    return maintenance


def _log_removed(context: dg.OpExecutionContext, name: str, removed: list[str]) -> None:
    if removed:
        context.log.info(f"{name}: removed {len(removed)} unreferenced file(s): {removed[:5]}")


def maintenance_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    """Daily clean-up at 03:00 UTC; created stopped."""
    return dg.ScheduleDefinition(
        name=f"{MAINTENANCE_JOB}__daily",
        job=job,
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
