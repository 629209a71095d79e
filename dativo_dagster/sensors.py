"""Sensors: start a run when a spec's source has files its committed table does not hold at their version, or, for a
database cursor, rows past the committed mark."""

# no ``from __future__ import annotations``: Dagster reads the sensor's annotations at definition time
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import dagster as dg

from dativo_dagster.assets import committed_sources
from dativo_dagster.cursor import cursor_field, cursor_of, format_mark, parse_mark
from dativo_dagster.errors import DativoError, NothingToReadError
from dativo_dagster.sources import SourceFile, source_for
from dativo_dagster.incremental import select_files
from dativo_dagster.partitions import (
    for_all_partitions,
    partition_key_of,
    partition_path_patterns,
    partition_state_key,
    partitions_definition,
)
from dativo_dagster.sources.base import same_version
from dativo_dagster.sources.csv import list_source_files, resolve_path
from dativo_dagster.resources import CatalogResource, StorageResource
from dativo_dagster.spec import LoadedSpec

SENSOR_FILES_TAG = "dativo/sensor-files"  # run_key_for(pending files): the runs asked for these file versions
SENSOR_ATTEMPT_TAG = "dativo/sensor-attempt"
FINISHED = frozenset({dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED})


def parse_cursor(cursor: str | None) -> dict[str, str]:
    """The sensor cursor: every file seen at the last tick and its version (shown in the UI; decides nothing)."""
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


def attempt_run_key(files_key: str, attempt: int) -> str:
    """The run key of the ``attempt``-th run asked for the same file versions (0: the files' key itself).

    Dagster starts one run per run key and sensor: a run that failed, or a file reverted to a version an earlier
    run loaded (an S3 object back at an earlier ETag), needs a key of its own to be asked for again.
    """
    return files_key if attempt == 0 else f"{files_key}:{attempt}"


def evaluate(
    loaded: LoadedSpec, listed: Sequence[SourceFile], committed: Mapping[str, str], now: datetime
) -> tuple[list[SourceFile], dict[str, str]]:
    """The listed files that the committed table does not hold at their version (within the lookback window),
    and the next cursor: the listing (deleted files drop out)."""
    incremental = loaded.spec.source.incremental
    lookback = incremental.lookback_days if incremental is not None else 0
    selection = select_files(listed, committed, lookback_days=lookback, now=now)
    return selection.to_read, {f.uri: f.version for f in listed}


def request_for(
    instance: dg.DagsterInstance, asset: str, pending: Sequence[SourceFile], partition_key: str | None = None
) -> dg.RunRequest | dg.SkipReason:
    """Ask for a run of ``pending``, unless a run asked for the same file versions is queued or in progress.

    Every finished run asked for them (failed, canceled, or succeeded before the files were reverted) counts one
    attempt, so that the next request gets a run key Dagster has not used; a tick repeated from the same state
    asks with the same key (Dagster starts it once).
    """
    # a partition's run key names the partition and its files' versions
    files_key = run_key_for(f"{asset}:{partition_key}" if partition_key else asset, pending)
    runs = instance.get_runs(filters=dg.RunsFilter(tags={SENSOR_FILES_TAG: files_key}))
    in_flight = [run for run in runs if run.status not in FINISHED]
    if in_flight:
        return dg.SkipReason(
            f"run {in_flight[0].run_id} ({in_flight[0].status.value}) already loads the {len(pending)} new or changed"
            f" file(s) of {asset}" + (f" partition {partition_key}" if partition_key else "")
        )
    attempt = len(runs)
    return dg.RunRequest(
        run_key=attempt_run_key(files_key, attempt),
        partition_key=partition_key,
        tags={
            "dativo/trigger": "sensor",
            "dativo/files": str(len(pending)),
            SENSOR_FILES_TAG: files_key,
            SENSOR_ATTEMPT_TAG: str(attempt),
        },
    )


def database_tick(
    context: dg.SensorEvaluationContext, loaded: LoadedSpec, storage: StorageResource, catalog: CatalogResource
) -> dg.RunRequest | dg.SkipReason:
    """One tick for a database spec with a cursor: the source's ``max(cursor)`` (one cheap query, no rows) against
    the mark the branch committed; a run is requested for that max value, as for a file at a new version.

    The cursor, run key and tags hold the source's URI without credentials and the cursor value only.
    """
    spec = loaded.spec
    source = source_for(loaded, storage.s3_settings())
    try:
        highest = source.max_cursor()  # type: ignore[attr-defined] - database sources only
        uri = source.uri()  # type: ignore[attr-defined]
    except DativoError as exc:
        return dg.SkipReason(f"cannot query the source of {spec.name}: {exc}")
    field = cursor_field(loaded)
    committed = committed_sources(loaded, storage, catalog)
    mark = parse_mark(committed.get(uri), field.type.kind)
    context.update_cursor(json.dumps({uri: format_mark(highest) if highest is not None else ""}, separators=(",", ":")))
    if highest is None or (mark is not None and highest <= mark):
        shown = format_mark(mark) if mark is not None else "none"
        return dg.SkipReason(f"nothing past the committed mark of {spec.name} ({shown}) in {uri}")
    return request_for(context.instance, spec.name, [SourceFile(uri=uri, size=0, version=format_mark(highest))])


def _committed_at(version: str | None, source: SourceFile) -> bool:
    return version is not None and same_version(version, source.version)


def partitioned_tick(
    context: dg.SensorEvaluationContext, loaded: LoadedSpec, storage: StorageResource, catalog: CatalogResource
) -> dg.SensorResult | dg.SkipReason:
    """One tick for a partitioned file spec: the files of every ``{partition}`` path, each mapped to its partition key
    through the path pattern and compared with the versions committed for that partition; one run per partition key
    with new or changed files. Files that map to no valid key (not a key, before ``start``, or a partition that has
    not ended yet) are logged and skipped."""
    spec = loaded.spec
    definition = partitions_definition(spec)
    assert definition is not None
    try:
        listed = list_source_files(for_all_partitions(loaded), storage.s3_settings())
    except NothingToReadError:
        listed = []
    except DativoError as exc:
        return dg.SkipReason(f"cannot list the source of {spec.name}: {exc}")
    patterns = partition_path_patterns(loaded, resolve_path)
    by_key: dict[str, list[SourceFile]] = {}
    unmapped = []
    for source in listed:
        key = partition_key_of(source.uri, patterns, definition)
        if key is None:
            unmapped.append(source.uri)
        else:
            by_key.setdefault(key, []).append(source)
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (", ..." if len(unmapped) > 5 else "")
        context.log.warning(f"{spec.name}: {len(unmapped)} source file(s) map to no partition key of the asset"
                            f" (not a key, before its start, or not ended yet), skipped: {shown}")
    committed = committed_sources(loaded, storage, catalog) if by_key else {}
    requests, skipped = [], []
    for key in sorted(by_key):
        pending = [f for f in by_key[key] if not _committed_at(committed.get(partition_state_key(key, f.uri)), f)]
        if not pending:
            continue
        request = request_for(context.instance, spec.name, pending, partition_key=key)
        (requests if isinstance(request, dg.RunRequest) else skipped).append(request)
    cursor = json.dumps({f.uri: f.version for f in listed}, sort_keys=True, separators=(",", ":"))
    if not requests:
        reason = skipped[0].skip_message if skipped else (
            f"no new or changed file among {len(listed)} source file(s) of {spec.name}'s partitions")
        context.update_cursor(cursor)
        return dg.SkipReason(reason)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def build_sensor(loaded: LoadedSpec) -> dg.SensorDefinition:
    """The sensor of a spec with ``sensor:``; it only triggers runs, the run decides what to read.

    What is still to load comes from the committed table (CONTRACT 5), never from the cursor: files of a run that
    failed are asked for again at the next tick, as soon as no run for them is queued or in progress.
    """
    spec = loaded.spec
    assert spec.sensor is not None

    @dg.sensor(
        name=f"{spec.name}__sensor",
        asset_selection=dg.AssetSelection.assets(spec.name),
        minimum_interval_seconds=spec.sensor.minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Runs {spec.name} when the source's max({cursor_of(loaded).cursor_field}) is past the mark its table"
            " committed (new rows, or its run failed)."
            if cursor_of(loaded) is not None
            else f"Runs {spec.name} when a source file of {loaded.display_path} is not in its table at its"
            " current version (new, changed, or its run failed)."
        ),
    )
    def source_sensor(
        context: dg.SensorEvaluationContext, dativo_storage: StorageResource, dativo_catalog: CatalogResource
    ):
        if cursor_of(loaded) is not None:
            return database_tick(context, loaded, dativo_storage, dativo_catalog)
        if spec.partitions is not None:
            return partitioned_tick(context, loaded, dativo_storage, dativo_catalog)
        try:
            listed = source_for(loaded, dativo_storage.s3_settings()).list_units()
        except NothingToReadError:
            listed = []
        except DativoError as exc:
            return dg.SkipReason(f"cannot list the source of {spec.name}: {exc}")
        committed = committed_sources(loaded, dativo_storage, dativo_catalog) if listed else {}
        pending, listing = evaluate(loaded, listed, committed, datetime.now(timezone.utc))
        context.update_cursor(json.dumps(listing, sort_keys=True, separators=(",", ":")))
        if not pending:
            return dg.SkipReason(f"no new or changed file among {len(listed)} source file(s) of {spec.name}")
        return request_for(context.instance, spec.name, pending)

    return source_sensor
