"""Sensors: start a run when a spec's source has new or changed files (cursor = file -> version)."""

# no ``from __future__ import annotations``: Dagster reads the sensor's annotations at definition time
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import dagster as dg

from dativo_dagster.errors import DativoError, NothingToReadError
from dativo_dagster.extract import SourceFile, list_source_files
from dativo_dagster.incremental import select_files
from dativo_dagster.resources import StorageResource
from dativo_dagster.spec import LoadedSpec


def parse_cursor(cursor: str | None) -> dict[str, str]:
    """The sensor cursor: every file seen at the last tick and its version."""
    if not cursor:
        return {}
    try:
        value = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def run_key_for(asset: str, files: Sequence[SourceFile]) -> str:
    """A key that names exactly this set of file versions: a repeated tick asks for nothing twice."""
    digest = hashlib.sha256()
    for source in sorted(files):
        digest.update(f"{source.uri}\0{source.version}\n".encode())
    return f"{asset}:{digest.hexdigest()[:32]}"


def evaluate(
    loaded: LoadedSpec, listed: Sequence[SourceFile], cursor: Mapping[str, str], now: datetime
) -> tuple[list[SourceFile], dict[str, str]]:
    """The files that are new or changed since the cursor, and the next cursor (deleted files drop out)."""
    incremental = loaded.spec.source.incremental
    lookback = incremental.lookback_days if incremental is not None else 0
    selection = select_files(listed, cursor, lookback_days=lookback, now=now)
    return selection.to_read, {f.uri: f.version for f in listed}


def build_sensor(loaded: LoadedSpec) -> dg.SensorDefinition:
    """The sensor of a spec with ``sensor:``; it only triggers runs, the run decides what to read."""
    spec = loaded.spec
    assert spec.sensor is not None

    @dg.sensor(
        name=f"{spec.name}__sensor",
        asset_selection=dg.AssetSelection.assets(spec.name),
        minimum_interval_seconds=spec.sensor.minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Runs {spec.name} when a source file of {loaded.display_path} is new or changed.",
    )
    def source_sensor(context: dg.SensorEvaluationContext, dativo_storage: StorageResource):
        try:
            listed = list_source_files(loaded, dativo_storage.s3_settings())
        except NothingToReadError:
            listed = []
        except DativoError as exc:
            return dg.SkipReason(f"cannot list the source of {spec.name}: {exc}")
        pending, next_cursor = evaluate(loaded, listed, parse_cursor(context.cursor), datetime.now(timezone.utc))
        context.update_cursor(json.dumps(next_cursor, sort_keys=True, separators=(",", ":")))
        if not pending:
            return dg.SkipReason(f"no new or changed file among {len(listed)} source file(s) of {spec.name}")
        return dg.RunRequest(
            run_key=run_key_for(spec.name, pending),
            tags={"dativo/trigger": "sensor", "dativo/files": str(len(pending))},
        )

    return source_sensor
