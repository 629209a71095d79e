"""The code location: every asset spec becomes an asset, with its resources and schedules."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from dativo_dagster.assets import STAGING_IO, TABLE_IO, build_asset
from dativo_dagster.io_managers import IcebergTableIOManager, StagingIOManager
from dativo_dagster.resources import DEFAULT_SPECS_DIR, resources_from_env
from dativo_dagster.spec import LoadedSpec, load_specs


def specs_dir_from_env() -> Path:
    """``DATIVO_ASSET_SPECS_DIR`` or the project's ``asset_specs/``."""
    return Path(os.environ.get("DATIVO_ASSET_SPECS_DIR") or DEFAULT_SPECS_DIR).resolve()


def build_schedules(loaded: list[LoadedSpec]) -> list[dg.ScheduleDefinition]:
    """One job and schedule per spec that has ``schedule``."""
    schedules = []
    for item in loaded:
        spec = item.spec
        if spec.schedule is None:
            continue
        job = dg.define_asset_job(f"{spec.name}__job", selection=dg.AssetSelection.assets(spec.name))
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{spec.name}__schedule",
                job=job,
                cron_schedule=spec.schedule.cron,
                execution_timezone=spec.schedule.timezone,
                default_status=dg.DefaultScheduleStatus.STOPPED,
            )
        )
    return schedules


def build_definitions(specs_dir: Path) -> dg.Definitions:
    """Definitions for every spec under ``specs_dir``; raises ``SpecError`` listing every problem."""
    loaded = load_specs(specs_dir)
    resources = resources_from_env(specs_dir)
    return dg.Definitions(
        assets=[build_asset(item) for item in loaded],
        schedules=build_schedules(loaded),
        resources={
            **resources,
            STAGING_IO: StagingIOManager(staging=resources["dativo_staging"]),
            TABLE_IO: IcebergTableIOManager(catalog=resources["dativo_catalog"]),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(specs_dir_from_env())
