"""The code location: every asset spec becomes an asset, with its resources, jobs, schedules and sensors."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from dativo_dagster.assets import STAGING_IO, TABLE_IO, build_asset
from dativo_dagster.executors import executors_from_env
from dativo_dagster.freshness import build_freshness_checks, build_freshness_sensor
from dativo_dagster.io_managers import IcebergTableIOManager, StagingIOManager
from dativo_dagster.jobs import (
    asset_jobs,
    build_maintenance_job,
    build_schedules,
    build_sensors,
    group_jobs,
    maintenance_schedule,
)
from dativo_dagster.logging import loggers_from_env
from dativo_dagster.resources import DEFAULT_SPECS_DIR, resources_from_env
from dativo_dagster.spec import load_specs


def specs_dir_from_env() -> Path:
    """``DATIVO_ASSET_SPECS_DIR`` or the project's ``asset_specs/``."""
    return Path(os.environ.get("DATIVO_ASSET_SPECS_DIR") or DEFAULT_SPECS_DIR).resolve()


def build_definitions(specs_dir: Path, project_dir: Path | None = None) -> dg.Definitions:
    """Definitions for every spec under ``specs_dir``; raises ``SpecError`` listing every problem.

    The one factory of the code location (``defs`` below) and of the ``dg`` Component (component.py).
    ``project_dir`` holds the embedded default's ``.dativo/`` (default: the parent of ``specs_dir``).

    ``DATIVO_LOG_FORMAT=json`` makes the console logger write one JSON object per line. Every job runs its steps
    in the run's process unless it says otherwise (the group jobs) or its run config does (executors.py): this
    executor is also the one of the implicit asset job that `dagster asset materialize` and the UI run.
    ``DATIVO_EXECUTOR=celery`` puts every job on Celery workers instead (executors.py).
    """
    loaded = load_specs(specs_dir)
    resources = resources_from_env(specs_dir, project_dir)
    executors = executors_from_env()
    maintenance = build_maintenance_job(loaded)
    jobs = asset_jobs(loaded)
    freshness_checks = build_freshness_checks(loaded)
    freshness_sensor = build_freshness_sensor(freshness_checks)
    return dg.Definitions(
        assets=[build_asset(item) for item in loaded],
        asset_checks=freshness_checks,
        jobs=[*jobs.values(), *group_jobs(loaded, executors.many_assets), maintenance],
        schedules=[*build_schedules(loaded, jobs), maintenance_schedule(maintenance)],
        sensors=[*build_sensors(loaded), *([freshness_sensor] if freshness_sensor else [])],
        resources={
            **resources,
            STAGING_IO: StagingIOManager(staging=resources["dativo_staging"]),
            TABLE_IO: IcebergTableIOManager(catalog=resources["dativo_catalog"]),
        },
        loggers=loggers_from_env(),
        executor=executors.one_asset,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(specs_dir_from_env())
