"""Jobs, schedules and sensors derived from the specs, and the maintenance job."""

# no ``from __future__ import annotations``: Dagster reads the op's annotations at definition time
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from dativo_dagster.logging import logging_run_config
from dativo_dagster.maintenance import (
    iceberg_referenced_files,
    marker_referenced_files,
    remove_stale_staging,
    remove_unreferenced,
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


def group_jobs(loaded: Sequence[LoadedSpec]) -> list:
    """One job per dataProduct group."""
    groups = sorted({item.spec.data_product for item in loaded})
    return [
        dg.define_asset_job(f"{group}__group_job", selection=dg.AssetSelection.groups(group), config=logging_run_config())
        for group in groups
    ]


def build_schedules(loaded: Sequence[LoadedSpec]) -> list[dg.ScheduleDefinition]:
    """One schedule (on the spec's own job) per spec that has ``schedule``; created stopped."""
    schedules = []
    for item in loaded:
        spec = item.spec
        if spec.schedule is None:
            continue
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{spec.name}__schedule",
                job=asset_job(item),
                cron_schedule=spec.schedule.cron,
                execution_timezone=spec.schedule.timezone,
                default_status=dg.DefaultScheduleStatus.STOPPED,
            )
        )
    return schedules


def build_sensors(loaded: Sequence[LoadedSpec]) -> list[dg.SensorDefinition]:
    """One sensor per spec that has ``sensor``; created stopped."""
    return [build_sensor(item) for item in loaded if item.spec.sensor is not None]


class MaintenanceConfig(dg.Config):
    """How old an unreferenced file must be before it is removed (files of running runs are younger)."""

    older_than_hours: float = 24.0
    dry_run: bool = False


def build_maintenance_job(loaded: Sequence[LoadedSpec]) -> dg.JobDefinition:
    """A job that removes data files no commit references (runs killed mid-way) and stale staging."""
    specs = list(loaded)

    @dg.op(name="remove_orphan_files")
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
        catalog = None
        for item in specs:
            spec = item.spec
            for identifier, suffix in ((spec.table_identifier, ""), (spec.rejects_identifier, "__rejects")):
                name = ".".join(identifier)
                if spec.target.catalog is CatalogKind.NONE:
                    location = dativo_storage.table_location(spec, suffix)
                    referenced = marker_referenced_files(location, s3)
                else:
                    catalog = catalog or dativo_catalog.load_catalog()
                    if not catalog.table_exists(name):
                        continue
                    table = catalog.load_table(name)
                    location, referenced = table.location(), iceberg_referenced_files(table)
                report = remove_unreferenced(location, referenced, s3, older_than_seconds=seconds, dry_run=config.dry_run)
                if report.removed:
                    context.log.info(f"{name}: removed {len(report.removed)} unreferenced file(s): {report.removed[:5]}")
                removed[name] = len(report.removed)
        stale = [] if config.dry_run else remove_stale_staging(Path(dativo_staging.root), seconds)
        return dg.Output(
            sum(removed.values()),
            metadata={"removed_per_table": dg.MetadataValue.json(removed), "staging_folders_removed": len(stale)},
        )

    @dg.job(name=MAINTENANCE_JOB, description="Remove data files that no commit references, and stale staging.")
    def maintenance():
        remove_orphan_files()

    return maintenance


def maintenance_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    """Daily clean-up at 03:00 UTC; created stopped."""
    return dg.ScheduleDefinition(
        name=f"{MAINTENANCE_JOB}__daily",
        job=job,
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
