"""The asset factory: one spec becomes one graph-backed asset, extract -> validate -> write -> commit."""

# no ``from __future__ import annotations``: Dagster reads the ops' annotations at definition time
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, NamedTuple

import dagster as dg
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, Field
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionSpec
from pyiceberg.schema import Schema

from dativo_dagster.commit import ASSET_KEY, CommitResult, commit_files, ensure_table, source_state_json
from dativo_dagster.cursor import cursor_read, cursor_run_found_nothing, is_cursor_run, units_with_marks
from dativo_dagster.errors import DuplicateKeysError, StorageError, is_transient
from dativo_dagster.fanout import FileGroup, GroupOutcome, combine_outcomes, plan_groups
from dativo_dagster.sources import SourceFile, source_for
from dativo_dagster.incremental import (
    SOURCE_STATE_KEY,
    Selection,
    marker_source_state,
    select_files,
    table_source_state,
)
from dativo_dagster.io_managers import (
    BRANCH_META,
    CATALOG_META,
    TABLE_META,
    TABLE_PATH_META,
    WAREHOUSE_META,
)
from dativo_dagster.merge import (
    DuplicateKeys,
    MergeBuffer,
    MergeKeys,
    duplicate_keys_among,
    ensure_key,
    keyed_schema,
    keys_uri,
    run_added_keys,
)
from dativo_dagster.markers import committed_records, read_commit_markers, write_commit_marker
from dativo_dagster.partitions import (
    PARTITION_KEY_PROPERTY,
    PartitionRejects,
    WindowSelection,
    for_partition,
    partition_source_state,
    partition_window,
    partitions_definition,
    select_partition_files,
)
from dativo_dagster.pipeline import (
    LOGGED_FILES,
    PipelineOutcome,
    Sinks,
    StageError,
    StageFailure,
    file_findings,
    run_pipeline,
    stage_error,
)
from dativo_dagster.resources import CatalogResource, StagingResource, StorageResource
from dativo_dagster.run_queue import table_pool
from dativo_dagster.spec import CatalogKind, LoadedSpec, ValidationMode, WriteMode
from dativo_dagster.storage import filesystem_for, map_per_object
from dativo_dagster.table_schema import (
    INGESTED_AT,
    PARTITION_KEY_COLUMN,
    RUN_ID,
    SOURCE_FILE,
    Partitioner,
    arrow_schema,
    iceberg_schema,
    partition_spec,
    rejects_iceberg_schema,
    with_partition_key_column,
)
from dativo_dagster.validate import ValidationReport
from dativo_dagster.write import PartitionedParquetWriter, WrittenFile, remove_file, run_writer_settings

log = logging.getLogger(__name__)

STAGING_IO = "dativo_staging_io"
TABLE_IO = "dativo_table_io"
VALIDATION_CHECK = "validation"
SCHEMA_DRIFT_CHECK = "schema_drift"
RECONCILIATION_CHECK = "reconciliation"
UNIQUE_KEY_CHECK = "unique_key"
# a run that finds nothing new records its checks' last evaluations again, naming the run that made them
CARRIED_FROM_META = "carried_from_run"
CARRY_LOOKBACK = 20


class ExtractReport(BaseModel):
    """Which files a run read, at which version, and what reading them found."""

    files: list[dict[str, Any]] = Field(default_factory=list)
    file_reports: list[dict[str, Any]] = Field(default_factory=list)
    incremental: bool = False
    new: list[str] = Field(default_factory=list)
    changed: list[str] = Field(default_factory=list)
    unchanged: list[str] = Field(default_factory=list)
    too_old: list[str] = Field(default_factory=list)
    partition_key: str = ""  # a partitioned asset's run: the partition it reads and replaces
    removed: list[str] = Field(default_factory=list)  # an incremental partition's committed files now gone

    @property
    def nothing_new(self) -> bool:
        return self.incremental and not self.files and not self.removed

    @property
    def source_state(self) -> dict[str, str]:
        files = {f["uri"]: f["version"] for f in self.files}
        # a partition's run commits its files under its own key (partitions.partition_state_key)
        return partition_source_state(self.partition_key, files, self.removed) if self.partition_key else files


class WriteResult(BaseModel):
    """What the write step produced, for the commit step.

    ``run_id`` is the run that wrote the files (and stamped their ``_run_id``): the commit is
    recorded under it, so re-executing only the commit step of a failed run cannot add the files twice.
    """

    run_id: str
    ingested_at: str
    data_files: list[WrittenFile] = Field(default_factory=list)
    reject_files: list[WrittenFile] = Field(default_factory=list)
    source_state: dict[str, str] = Field(default_factory=dict)
    rows_read: int = 0
    rows_rejected: int = 0
    location: str = ""
    rejects_location: str = ""
    columns_not_loaded: dict[str, list[str]] = Field(default_factory=dict)
    columns_missing: dict[str, list[str]] = Field(default_factory=dict)
    incremental: bool = False
    nothing_new: bool = False
    seconds: dict[str, float] = Field(default_factory=dict)  # busy time of each stage of the stream
    merge_keys: str = ""  # write_mode: merge: the file of the keys the run brought (merge.MergeKeys)
    rows_not_loaded: int = 0  # write_mode: merge: earlier rows of a key read again later in the run, and deletes
    cursor_read_from: dict[str, str] = Field(default_factory=dict)  # a cursor run: the marks it read from
    partition_key: str = ""  # a partitioned asset's run: the commit replaces this partition's window


def retry_policy(loaded: LoadedSpec) -> dg.RetryPolicy:
    """The spec's ``retry_config`` as a Dagster ``RetryPolicy``."""
    config = loaded.spec.retry_config
    backoff = {"exponential": dg.Backoff.EXPONENTIAL, "linear": dg.Backoff.LINEAR}.get(config.backoff)
    return dg.RetryPolicy(
        max_retries=config.max_retries,
        delay=config.retry_delay_seconds,
        backoff=backoff,
        jitter=dg.Jitter.PLUS_MINUS if backoff is not None else None,
    )


def to_failure(
    exc: BaseException, loaded: LoadedSpec, step: str, secrets: Sequence[str | None], where: str = ""
) -> dg.Failure:
    """A Dagster failure that the RetryPolicy retries only when the error is transient.

    The original exception is not chained (its text may hold credentials): its redacted traceback
    goes into the failure's metadata instead.
    """
    retryable = loaded.spec.retry_config.retryable_errors
    return _stage_failure(stage_error(step, exc, secrets, lambda e: is_transient(e, retryable), where))


@contextmanager
def failures(loaded: LoadedSpec, step: str, secrets: Sequence[str | None], where: str = "") -> Iterator[None]:
    """Turn any error of a step into a classified, redacted ``dg.Failure`` (``where`` prefixes its text)."""
    try:
        yield
    except dg.Failure:
        raise
    except Exception as exc:  # noqa: BLE001 - every error is classified, none is swallowed
        raise to_failure(exc, loaded, step, secrets, where) from None


def _secrets(*resources: Any) -> list[str | None]:
    """Secret values of the resources, to redact from messages (URI passwords are masked by pattern)."""
    return [
        getattr(resource, attribute, None)
        for resource in resources
        for attribute in ("aws_secret_access_key", "credential")
    ]


def _column_schema(loaded: LoadedSpec) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=f.name,
                type=str(f.type),
                description=f.description,
                constraints=dg.TableColumnConstraints(nullable=not f.required),
                tags={"classification": f.classification} if f.classification else {},
            )
            for f in loaded.spec.fields
        ]
        + [
            dg.TableColumn(name=INGESTED_AT, type="timestamptz", description="when the run ingested the row"),
            dg.TableColumn(name=SOURCE_FILE, type="string", description="the file the row came from"),
            dg.TableColumn(name=RUN_ID, type="string", description="the Dagster run that loaded the row"),
        ]
    )


def build_asset(loaded: LoadedSpec) -> dg.AssetsDefinition:
    """Build the graph-backed asset for one spec."""
    spec = loaded.spec
    name = spec.name
    policy = retry_policy(loaded)
    op_tags = {"dativo/asset": name}
    pool = table_pool(spec)  # the run queue's limit per table (run_queue.py)
    check_spec = dg.AssetCheckSpec(
        VALIDATION_CHECK,
        asset=name,
        description=f"rows against the spec's schema ({spec.schema_validation_mode.value} mode)",
        blocking=spec.schema_validation_mode is ValidationMode.STRICT,
    )
    check_key = check_spec.key
    drift_spec = dg.AssetCheckSpec(
        SCHEMA_DRIFT_CHECK,
        asset=name,
        description="source columns that the spec lacks, and spec columns missing from the source files",
    )
    # a key on an Iceberg table: no key occurs twice on the branch (blocking for a merge, which promises it)
    unique_key_spec = (
        dg.AssetCheckSpec(
            UNIQUE_KEY_CHECK,
            asset=name,
            description=f"no key ({', '.join(spec.primary_key)}) occurs twice on the branch, counted from its"
            " committed data files",
            blocking=spec.target.write_mode is WriteMode.MERGE,
        )
        if spec.primary_key and spec.target.catalog is CatalogKind.ICEBERG
        else None
    )
    reconciliation_spec = dg.AssetCheckSpec(
        RECONCILIATION_CHECK,
        asset=name,
        description="rows read = rows written + rows rejected, and the commit added exactly the rows written to the"
        " branch (snapshot summary: added records, and the branch's total before and after)",
    )

    @dg.op(
        name=f"{name}__extract",
        out={
            "stream": dg.Out(PipelineOutcome, io_manager_key=STAGING_IO),
            "extract_report": dg.Out(ExtractReport, io_manager_key=STAGING_IO),
        },
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def extract(context: dg.OpExecutionContext, dativo_storage: StorageResource, dativo_catalog: CatalogResource):
        tables: dict[str, Any] = {}  # the target table, loaded once for the whole step
        partition_key, selection = _select_run_files(context, loaded, dativo_storage, dativo_catalog, tables)
        files = selection.to_read
        if selection.nothing_new:
            context.log.info(f"{name}: nothing new to read; the table stays as it is")
        else:
            named = ", ".join(f.uri for f in files[:LOGGED_FILES]) + (", ..." if len(files) > LOGGED_FILES else "")
            context.log.info(f"{name}: reading {len(files)} source file(s): {named}")
        extract_report = _extract_report(
            loaded,
            selection,
            [{"uri": f.uri, "size": f.size, "version": f.version, "modified_ns": f.modified_ns} for f in files],
            partition_key,
        )
        outcome = stream_sources(context, loaded, files, extract_report, dativo_storage, dativo_catalog, tables=tables)
        extract_report.file_reports = outcome.file_reports
        if is_cursor_run(loaded):
            context.log.info(f"{name}: {outcome.validation.rows_read} new row(s) read past the committed mark,"
                             f" {outcome.rows_skipped} boundary row(s) already committed skipped")
            if cursor_run_found_nothing(files, outcome):
                context.log.info(f"{name}: nothing new past the committed mark; the table stays as it is")
                extract_report.files = []  # reported as nothing new, as an incremental run that found no file
        for message in file_findings(outcome.file_reports):
            context.log.warning(message)
        yield dg.Output(
            outcome,
            "stream",
            metadata={
                "files": len(files),
                "rows": sum(r["rows"] for r in outcome.file_reports),
                "nothing_new": selection.nothing_new,
                **_stage_seconds(outcome.seconds),
            },
        )
        yield dg.Output(extract_report, "extract_report")

    @dg.op(
        name=f"{name}__validate",
        ins={"stream": dg.In(PipelineOutcome), "extract_report": dg.In(ExtractReport)},
        out={
            "validated": dg.Out(PipelineOutcome, io_manager_key=STAGING_IO),
            "validation_check": dg.Out(dg.Nothing, is_required=False),
            "schema_drift_check": dg.Out(dg.Nothing, is_required=False),
        },
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def validate(
        context: dg.OpExecutionContext,
        stream: PipelineOutcome,
        extract_report: ExtractReport,
        dativo_staging: StagingResource,
    ):
        # the rows were validated as they streamed past (pipeline.py): this step judges the report
        report = stream.validation
        strict = spec.schema_validation_mode is ValidationMode.STRICT
        yield dg.Output(
            stream,
            "validated",
            metadata={"rows_read": report.rows_read, "rows_rejected": report.rows_rejected},
        )
        if extract_report.nothing_new:
            # the table is as the last run that read data left it, and so are its checks (CONTRACT 5)
            yield _carried_result(context, check_key) or _check_result(check_key, report, extract_report, strict)
            yield _carried_result(context, drift_spec.key) or _drift_result(drift_spec.key, extract_report)
        else:
            yield _check_result(check_key, report, extract_report, strict)
            yield _drift_result(drift_spec.key, extract_report)
        if strict and report.rows_rejected:
            # terminal: a re-execution would stream the same rows, so this run's staging goes now
            dativo_staging.remove_steps(context.run_id, f"{name}.")
            raise _strict_failure(name, report)

    @dg.op(
        name=f"{name}__write",
        ins={"validated": dg.In(PipelineOutcome), "extract_report": dg.In(ExtractReport)},
        out=dg.Out(WriteResult, io_manager_key=STAGING_IO),
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def write(
        context: dg.OpExecutionContext,
        validated: PipelineOutcome,
        extract_report: ExtractReport,
        dativo_storage: StorageResource,
        dativo_catalog: CatalogResource,
    ) -> WriteResult:
        outcome = validated
        if outcome.write_error is not None:
            if context.retry_number == 0 and outcome.run_id == context.run_id:
                raise _stage_failure(outcome.write_error)
            # a retry of this step, or a re-execution of a run whose write failed: stream the same files again
            context.log.info(f"{name}: writing failed before ({outcome.write_error.message}); streaming the files again")
            files = [SourceFile(**f) for f in extract_report.files]
            outcome = stream_sources(context, loaded, files, extract_report, dativo_storage, dativo_catalog)
            if outcome.strict_failed:
                raise _strict_failure(name, outcome.validation)
            if outcome.write_error is not None:
                raise _stage_failure(outcome.write_error)
        with failures(loaded, "write", _secrets(dativo_storage, dativo_catalog)):
            verify_written(outcome, dativo_storage.s3_settings())
        context.log.info(
            f"{name}: wrote {len(outcome.data_files)} data file(s), {outcome.rows_written} rows"
            + (f"; {len(outcome.reject_files)} quarantine file(s)" if outcome.reject_files else "")
        )
        return _write_result(outcome, extract_report)

    @dg.op(
        name=f"{name}__commit",
        ins={"written": dg.In(WriteResult)},
        out={
            "result": dg.Out(CommitResult, io_manager_key=TABLE_IO),
            "reconciliation_check": dg.Out(dg.Nothing, is_required=False),
            "unique_key_check": dg.Out(dg.Nothing, is_required=False),
        },
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def commit(
        context: dg.OpExecutionContext,
        written: WriteResult,
        dativo_storage: StorageResource,
        dativo_catalog: CatalogResource,
        dativo_staging: StagingResource,
    ):
        secrets = _secrets(dativo_storage, dativo_catalog)
        started = time.perf_counter()
        refused: DuplicateKeysError | None = None
        with failures(loaded, "commit", secrets, where=f"catalog {dativo_catalog.display_uri}: "):
            try:
                result = _commit(context, loaded, written, dativo_storage, dativo_catalog)
            except DuplicateKeysError as exc:
                refused = exc  # a merge's staged snapshot failed unique_key: nothing was committed or published
        if refused is not None:
            if unique_key_spec is not None:
                yield _unique_key_check(unique_key_spec.key, loaded, refused.found)
            with failures(loaded, "commit", secrets, where=f"catalog {dativo_catalog.display_uri}: "):
                raise refused
        dativo_staging.remove_steps(context.run_id, f"{name}.")
        metadata = _materialization_metadata(loaded, written, result, dativo_catalog)
        metadata["commit_seconds"] = round(time.perf_counter() - started, 3)
        yield dg.Output(result, "result", metadata=metadata)
        if written.nothing_new:
            yield _carried_result(context, reconciliation_spec.key) or _reconciliation_result(
                reconciliation_spec.key, written, result
            )
        else:
            yield _reconciliation_result(reconciliation_spec.key, written, result)
        if unique_key_spec is not None:
            carried = _carried_result(context, unique_key_spec.key) if written.nothing_new else None
            if carried is None and result.unique_key is not None:
                # a merge's commit counted the keys of its staged snapshot (the committed files) before committing
                carried = _unique_key_check(unique_key_spec.key, loaded, DuplicateKeys(**result.unique_key))
            with failures(loaded, "commit", secrets, where=f"catalog {dativo_catalog.display_uri}: "):
                yield carried or _unique_key_result(unique_key_spec.key, loaded, dativo_catalog, context.run_id)

    fan_out = (
        _fan_out_ops(loaded, policy, op_tags, check_key, drift_spec.key)
        if spec.source.type == "csv" and spec.source.fan_out is not None
        else None
    )

    @dg.graph_asset(
        name=name,
        group_name=spec.data_product,
        owners=[_owner(spec.team.owner)],
        tags={**{_tag_key(t): "" for t in spec.tags}, "dativo/domain": spec.domain, "dativo/tenant": spec.tenant},
        kinds={"csv", "parquet", "iceberg"} if spec.target.catalog is CatalogKind.ICEBERG else {"csv", "parquet", "s3"},
        description=_description(loaded),
        metadata={
            "dagster/column_schema": _column_schema(loaded),
            "dagster/table_name": f"{spec.domain}.{spec.name}",
            TABLE_META: f"{spec.domain}.{spec.name}",
            BRANCH_META: spec.branch,
            CATALOG_META: spec.target.catalog.value,
            TABLE_PATH_META: spec.table_path,
            **({WAREHOUSE_META: spec.target.warehouse} if spec.target.warehouse else {}),
            "dativo/spec_file": loaded.display_path,
            "dativo/version": spec.version,
            "dativo/validation_mode": spec.schema_validation_mode.value,
            "dativo/write_mode": spec.target.write_mode.value,
        },
        check_specs=[check_spec, drift_spec, reconciliation_spec, *([unique_key_spec] if unique_key_spec else [])],
        partitions_def=partitions_definition(spec),
    )
    def asset():
        if fan_out is not None:  # the files fan out over mapped steps, collected for one validate/write/commit
            groups, plan_report = fan_out.plan()
            streams = groups.map(fan_out.extract)
            validated, extract_report, validation_check, drift_check = fan_out.validate(streams.collect(), plan_report)
        else:
            stream, extract_report = extract()
            validated, validation_check, drift_check = validate(stream, extract_report)
        result, reconciliation_check, unique_key_check = commit(write(validated, extract_report))
        return {
            "result": result,
            check_spec.get_python_identifier(): validation_check,
            drift_spec.get_python_identifier(): drift_check,
            reconciliation_spec.get_python_identifier(): reconciliation_check,
            **({unique_key_spec.get_python_identifier(): unique_key_check} if unique_key_spec else {}),
        }

    return asset


class FanOutOps(NamedTuple):
    """The ops of a fanned-out asset's graph before its write and commit (docs/fan-out.md)."""

    plan: dg.OpDefinition
    extract: dg.OpDefinition
    validate: dg.OpDefinition


def _fan_out_ops(
    loaded: LoadedSpec,
    policy: dg.RetryPolicy,
    op_tags: dict[str, str],
    check_key: dg.AssetCheckKey,
    drift_key: dg.AssetCheckKey,
) -> FanOutOps:
    """``<name>__plan`` lists and selects the files and groups them by size (one dynamic output per group);
    ``<name>__extract`` is mapped over the groups, each streaming its files as the one extract step does;
    ``<name>__validate`` collects them and judges the combined report. Everything passes through the staging IO
    manager, so each group's step may run in another process or on another machine."""
    spec = loaded.spec
    name = spec.name
    pool = table_pool(spec)  # the run queue's limit per table counts the fan-out's steps too
    assert spec.source.type == "csv" and spec.source.fan_out is not None
    step_size_mb = spec.source.fan_out.step_size_mb

    @dg.op(
        name=f"{name}__plan",
        out={
            "groups": dg.DynamicOut(FileGroup, io_manager_key=STAGING_IO),
            "extract_report": dg.Out(ExtractReport, io_manager_key=STAGING_IO),
        },
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def plan(context: dg.OpExecutionContext, dativo_storage: StorageResource, dativo_catalog: CatalogResource):
        partition_key, selection = _select_run_files(context, loaded, dativo_storage, dativo_catalog)
        files = selection.to_read
        groups = plan_groups(
            files,
            step_size_mb,
            run_id=context.run_id,
            ingested_at=datetime.now(timezone.utc).isoformat(),
            partition_key=partition_key,
            incremental=is_incremental(loaded),
        )
        if selection.nothing_new:
            context.log.info(f"{name}: nothing new to read; the table stays as it is")
        else:
            context.log.info(
                f"{name}: {len(files)} source file(s) in {len(groups)} group(s) of up to {step_size_mb} MiB: "
                + ", ".join(f"{g.key} {len(g.files)} file(s) {g.bytes} bytes" for g in groups[:LOGGED_FILES])
                + (", ..." if len(groups) > LOGGED_FILES else "")
            )
        yield dg.Output(
            _extract_report(loaded, selection, [f for g in groups for f in g.files], partition_key),
            "extract_report",
            metadata={"files": len(files), "groups": len(groups), "nothing_new": selection.nothing_new},
        )
        for group in groups:
            yield dg.DynamicOutput(group, mapping_key=group.key, output_name="groups")

    @dg.op(
        name=f"{name}__extract",
        ins={"group": dg.In(FileGroup)},
        out={"stream": dg.Out(GroupOutcome, io_manager_key=STAGING_IO)},
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def extract_group(
        context: dg.OpExecutionContext, group: FileGroup, dativo_storage: StorageResource, dativo_catalog: CatalogResource
    ):
        files = group.source_files()
        context.log.info(
            f"{name}: group {group.key}: streaming {len(files)} file(s), {group.bytes} bytes, in process {os.getpid()}"
            + (f" (attempt {context.retry_number + 1})" if context.retry_number else "")
        )
        report = ExtractReport(files=group.files, incremental=group.incremental, partition_key=group.partition_key)
        created: list[tuple[Any, str]] = []
        stamp = (group.run_id, datetime.fromisoformat(group.ingested_at))
        outcome = stream_sources(context, loaded, files, report, dativo_storage, dativo_catalog, stamp=stamp, created=created)
        if outcome.write_error is not None:
            # the stream removed what it wrote: a retry of this step streams the group again
            raise _stage_failure(outcome.write_error)
        s3 = dativo_storage.s3_settings()
        try:
            with failures(loaded, "write", _secrets(dativo_storage, dativo_catalog)):
                verify_written(outcome, s3)
        except dg.Failure:
            _remove_written(outcome, s3)  # this attempt's files never reach the commit: a retry writes its own
            raise
        for file_report in outcome.file_reports:
            _log_file_report(context, file_report)
        yield dg.Output(
            GroupOutcome(key=group.key, outcome=outcome, tables_created=[n for _, n in created], pid=os.getpid()),
            "stream",
            metadata={
                "group": group.key,
                "files": len(files),
                "rows": outcome.validation.rows_read,
                "pid": os.getpid(),
                **_stage_seconds(outcome.seconds),
            },
        )

    @dg.op(
        name=f"{name}__validate",
        ins={"streams": dg.In(list[GroupOutcome]), "plan_report": dg.In(ExtractReport)},
        out={
            "validated": dg.Out(PipelineOutcome, io_manager_key=STAGING_IO),
            "extract_report": dg.Out(ExtractReport, io_manager_key=STAGING_IO),
            "validation_check": dg.Out(dg.Nothing, is_required=False),
            "schema_drift_check": dg.Out(dg.Nothing, is_required=False),
        },
        retry_policy=policy,
        tags=op_tags,
        pool=pool,
    )
    def validate_groups(
        context: dg.OpExecutionContext,
        streams: list[GroupOutcome],
        plan_report: ExtractReport,
        dativo_storage: StorageResource,
        dativo_catalog: CatalogResource,
        dativo_staging: StagingResource,
    ):
        stream = combine_outcomes(streams)
        extract_report = plan_report.model_copy(update={"file_reports": stream.file_reports})
        report = stream.validation
        strict = spec.schema_validation_mode is ValidationMode.STRICT
        context.log.info(
            f"{name}: {len(streams)} group(s) streamed {report.rows_read} row(s), {report.rows_rejected} rejected,"
            f" {len(stream.data_files)} data file(s), in process(es) {sorted({g.pid for g in streams})}"
        )
        yield dg.Output(
            stream, "validated", metadata={"rows_read": report.rows_read, "rows_rejected": report.rows_rejected}
        )
        yield dg.Output(extract_report, "extract_report")
        if extract_report.nothing_new:
            yield _carried_result(context, check_key) or _check_result(check_key, report, extract_report, strict)
            yield _carried_result(context, drift_key) or _drift_result(drift_key, extract_report)
        else:
            yield _check_result(check_key, report, extract_report, strict)
            yield _drift_result(drift_key, extract_report)
        if strict and report.rows_rejected:
            # the groups without a rejected row wrote their files: none of them is committed, all of them go now,
            # with the tables the groups created (when still empty), and this run's staging
            s3 = dativo_storage.s3_settings()
            _remove_written(stream, s3)
            catalog = dativo_catalog.load_catalog() if spec.target.catalog is CatalogKind.ICEBERG else None
            if catalog is not None:
                _drop_created([(catalog, n) for g in streams for n in g.tables_created], s3)
            dativo_staging.remove_steps(context.run_id, f"{name}.")
            raise _strict_failure(name, report)

    return FanOutOps(plan=plan, extract=extract_group, validate=validate_groups)


def _remove_written(outcome: PipelineOutcome, s3: Any) -> None:
    """Remove every file of an outcome that will not be committed (best effort: maintenance removes the rest)."""
    for written in [*outcome.data_files, *outcome.reject_files]:
        try:
            remove_file(written.uri, s3)
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("could not remove %s, written by a run that commits nothing of it", written.uri)


def _log_file_report(context: dg.OpExecutionContext, report: dict[str, Any]) -> None:
    if report["extra_columns"]:
        context.log.warning(f"{report['uri']}: columns not in the spec, not loaded: {report['extra_columns']}")
    if report["missing_columns"]:
        context.log.warning(f"{report['uri']}: spec columns missing from the file, null: {report['missing_columns']}")
    if report["blank_records"]:
        context.log.warning(f"{report['uri']}: {report['blank_records']} blank record(s) skipped")


def _select_run_files(
    context: dg.OpExecutionContext,
    loaded: LoadedSpec,
    storage: StorageResource,
    catalog_resource: CatalogResource,
    tables: dict[str, Any] | None = None,
) -> tuple[str, Selection]:
    """The run's partition key ("" when unpartitioned) and the files it reads: its source listed and selected
    (:func:`select_sources`), the partition's window and the incremental selection logged. The one extract step and
    the fan-out's plan both start here; ``tables`` keeps the target table loaded for the rest of the step."""
    name = loaded.spec.name
    partition_key = _partition_key(context, loaded)
    with failures(loaded, "extract", _secrets(storage, catalog_resource)):
        listed = source_for(run_spec(loaded, partition_key), storage.s3_settings()).list_units()
        selection = select_sources(loaded, listed, storage, catalog_resource, partition_key, tables)
    if partition_key:
        context.log.info(f"{name}: {partition_window(loaded, partition_key).describe()}")
    if is_incremental(loaded):
        context.log.info(f"{name}: {selection.describe()}")
    return partition_key, selection


def _extract_report(
    loaded: LoadedSpec, selection: Selection, files: list[dict[str, Any]], partition_key: str
) -> ExtractReport:
    """What the run reads (``files``: uri, size, version, modified_ns), from its selection."""
    return ExtractReport(
        files=files,
        incremental=is_incremental(loaded),
        new=selection.new,
        changed=selection.changed,
        unchanged=selection.unchanged,
        too_old=selection.too_old,
        partition_key=partition_key,
        removed=getattr(selection, "removed", []),
    )


def _partition_key(context: dg.OpExecutionContext, loaded: LoadedSpec) -> str:
    """The partition a partitioned asset's run reads ("" for an unpartitioned asset)."""
    if loaded.spec.partitions is None:
        return ""
    if not context.has_partition_key:
        raise dg.Failure(
            description=f"{loaded.spec.name} is partitioned ({loaded.spec.partitions.type.value}): a run needs a"
            " partition key (--partition 2024-01-31, a partitioned schedule, or a backfill)",
            allow_retries=False,
        )
    return context.partition_key


def run_spec(loaded: LoadedSpec, partition_key: str) -> LoadedSpec:
    """The spec as the run reads it: for a partition, ``{partition}`` in its source paths replaced by the key."""
    return for_partition(loaded, partition_key) if partition_key else loaded


def is_incremental(loaded: LoadedSpec) -> bool:
    """Incremental specs read only new and changed files; ``overwrite`` always reads everything."""
    spec = loaded.spec
    return spec.source.incremental is not None and spec.target.write_mode is not WriteMode.OVERWRITE


def committed_sources(
    loaded: LoadedSpec, storage: StorageResource, catalog_resource: CatalogResource, tables: dict[str, Any] | None = None
) -> dict[str, str]:
    """Every source file the asset's committed table holds, at its version (CONTRACT 5): the branch state, or the
    commit markers with ``catalog: none``; empty while the table does not exist. ``tables`` receives the table as
    loaded here, by identifier, for the rest of the step to use instead of loading it again."""
    spec = loaded.spec
    if spec.target.catalog is CatalogKind.NONE:
        return marker_source_state(read_commit_markers(storage.table_location(spec), storage.s3_settings()))
    identifier = ".".join(spec.table_identifier)
    table = load_existing_table(catalog_resource.load_catalog(), identifier)
    if table is not None and tables is not None:
        tables[identifier] = table
    return table_source_state(table, spec.branch) if table is not None else {}


def load_existing_table(catalog: Any, identifier: str) -> Any:
    """The table, or None when the catalog has no such table: one load (pyiceberg's ``table_exists`` is a load of
    its own)."""
    try:
        return catalog.load_table(identifier)
    except NoSuchTableError:
        return None


def select_sources(
    loaded: LoadedSpec, listed: list[SourceFile], storage: StorageResource, catalog_resource: CatalogResource,
    partition_key: str = "", tables: dict[str, Any] | None = None,
) -> Selection:
    """Which listed files this run reads, decided from the committed table state (CONTRACT 5); a partition's run
    from its own part of the state, all of its files or none (partitions.select_partition_files). ``tables``: as
    for :func:`committed_sources`."""
    spec = loaded.spec
    if not is_incremental(loaded):
        return Selection(to_read=list(listed), new=[f.uri for f in listed])
    if partition_key:
        return select_partition_files(listed, committed_sources(loaded, storage, catalog_resource, tables), partition_key)
    if is_cursor_run(loaded):  # each unit is read from the mark its table committed (cursor.py)
        to_read = units_with_marks(listed, committed_sources(loaded, storage, catalog_resource, tables))
        return Selection(to_read=to_read, new=[f.uri for f in to_read if not f.version],
                         changed=[f.uri for f in to_read if f.version])
    assert spec.source.incremental is not None
    return select_files(
        listed,
        committed_sources(loaded, storage, catalog_resource, tables),
        lookback_days=spec.source.incremental.lookback_days,
        now=datetime.now(timezone.utc),
    )


def _carried_result(context: dg.OpExecutionContext, key: dg.AssetCheckKey) -> dg.AssetCheckResult | None:
    """The check's last evaluation by a run that read data, recorded again for a run that found nothing new.

    A check that is planned but not evaluated shows as skipped in Dagster, and one evaluated on an empty read would
    turn a WARN about rows still in quarantine green; the table did not change, so its checks' results stand. A
    failed blocking evaluation is passed over (its run committed nothing). None when the instance holds no earlier
    evaluation (an ephemeral instance, a first run): the caller evaluates the check on this run's counts.
    """
    records = context.instance.event_log_storage.get_asset_check_execution_history(key, limit=CARRY_LOOKBACK)
    for record in records:
        evaluation = record.evaluation
        if record.run_id == context.run_id or not isinstance(evaluation, dg.AssetCheckEvaluation):
            continue  # this run's own planned entry, or a check planned and never evaluated
        if not evaluation.passed and evaluation.severity is dg.AssetCheckSeverity.ERROR and evaluation.blocking:
            continue
        origin = evaluation.metadata.get(CARRIED_FROM_META)
        return dg.AssetCheckResult(
            asset_key=key.asset_key,
            check_name=key.name,
            passed=evaluation.passed,
            severity=evaluation.severity,
            description=evaluation.description,
            metadata={**evaluation.metadata, CARRIED_FROM_META: origin or dg.MetadataValue.text(record.run_id)},
        )
    return None


def _drift_result(key: dg.AssetCheckKey, extract_report: ExtractReport) -> dg.AssetCheckResult:
    not_loaded = {r["uri"]: r["extra_columns"] for r in extract_report.file_reports if r["extra_columns"]}
    missing = {r["uri"]: r["missing_columns"] for r in extract_report.file_reports if r["missing_columns"]}
    return dg.AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=not not_loaded and not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "files_with_columns_not_in_spec": len(not_loaded),
            "files_missing_spec_columns": len(missing),
            "columns_not_in_spec": dg.MetadataValue.json(not_loaded),
            "spec_columns_missing": dg.MetadataValue.json(missing),
        },
    )


def _reconciliation_result(key: dg.AssetCheckKey, written: "WriteResult", result: CommitResult) -> dg.AssetCheckResult:
    """Rows read = rows written + rows rejected, and the commit added to the branch exactly the rows written.

    What the commit did is read back from its snapshots' summaries (``CommitResult.records_added`` ...): its append
    added as many records as the run wrote, and the branch went from its rows before, less what the commit
    deleted (all of them for an overwrite), plus what it added. ``catalog: none`` has no summaries: there the
    write step's own counts are compared.
    """
    written_rows = sum(f.record_count for f in written.data_files)
    problems = []
    if written.rows_read != written_rows + written.rows_rejected + written.rows_not_loaded:
        merged = f" + rows a merge did not load ({written.rows_not_loaded})" if written.rows_not_loaded else ""
        problems.append(
            f"rows read ({written.rows_read}) != rows written ({written_rows}) + rows rejected ({written.rows_rejected})"
            + merged
        )
    metadata: dict[str, Any] = {
        "rows_read": written.rows_read,
        "rows_written": written_rows,
        "rows_committed": written_rows,
        "rows_rejected": written.rows_rejected,
        "already_committed": result.already_committed,
        **({"rows_not_loaded_by_merge": written.rows_not_loaded} if written.rows_not_loaded else {}),
    }
    counted = (result.records_added, result.records_removed, result.table_rows_before, result.table_rows_after)
    if None not in counted:
        added, removed, before, after = counted
        metadata.update({"records_added_by_commit": added, "records_removed_by_commit": removed,
                         "table_rows_before": before, "table_rows_after": after})
        if added != written_rows:
            problems.append(f"the commit added {added} record(s) to the branch, the run wrote {written_rows}")
        if after != before - removed + added:
            problems.append(f"the branch holds {after} row(s) after the commit, expected {before} - {removed} + {added}")
        if result.overwrite and after != added:
            problems.append(f"an overwrite left {after} row(s) on the branch, expected only its own {added}")
    if problems:
        metadata["problems"] = dg.MetadataValue.md("\n".join(f"- {p}" for p in problems))
    return dg.AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems) or None,
        metadata=metadata,
    )


def _unique_key_result(
    key: dg.AssetCheckKey, loaded: LoadedSpec, catalog: CatalogResource, run_id: str
) -> dg.AssetCheckResult:
    """No key that the run's commit (its append snapshot) brought occurs twice at the head of the
    asset's branch, counted from its committed data files: only the files whose partition and key bounds can hold
    one of those keys are opened, their key columns only (``merge.duplicate_keys_among``), so the check costs what
    the run added, not the table. A duplicate among keys the run did not bring was reported by the run that brought
    it. Examples of duplicated keys are shown unless a key field is PII."""
    spec = loaded.spec
    table = catalog.load_catalog().load_table(".".join(spec.table_identifier))
    pii = any(f.is_pii for f in spec.fields if f.primary_key)
    keys = run_added_keys(table, spec.branch, run_id, spec.primary_key)
    found = (duplicate_keys_among(table, spec.branch, spec.primary_key, keys, show_examples=not pii)
             if keys is not None else DuplicateKeys(0, 0, 0, []))
    return _unique_key_check(key, loaded, found, keys.num_rows if keys is not None else 0)


def _unique_key_check(
    key: dg.AssetCheckKey, loaded: LoadedSpec, found: DuplicateKeys, keys_checked: int | None = None
) -> dg.AssetCheckResult:
    """The ``unique_key`` result for counts taken from the branch's data files (examples withheld for PII keys);
    ``keys_checked``: how many keys the run brought, when only those were looked for (None: the whole branch)."""
    spec = loaded.spec
    pii = any(f.is_pii for f in spec.fields if f.primary_key)
    metadata: dict[str, Any] = {
        "key": ", ".join(spec.primary_key),
        "rows_checked": found.rows,
        "duplicate_keys": found.duplicate_keys,
        "extra_rows": found.extra_rows,
        "scope": "the whole branch" if keys_checked is None else "the keys this run added",
    }
    if keys_checked is not None:
        metadata["keys_checked"] = keys_checked
    if found.duplicate_keys:
        metadata["examples"] = (
            dg.MetadataValue.json(found.examples) if not pii else "withheld: a key field is classified PII"
        )
    return dg.AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=not found.duplicate_keys,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{found.duplicate_keys} key(s) occur more than once on {spec.branch}" if found.duplicate_keys else None,
        metadata=metadata,
    )


_EMAIL = re.compile(r"^[^@\s<>()]+@[^@\s<>()]+\.[^@\s<>()]+$")


def _owner(owner: str) -> str:
    """Dagster accepts an email address or ``team:<name>`` as an owner."""
    owner = owner.strip()
    if _EMAIL.match(owner):
        return owner
    return "team:" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", owner).strip("_") or "unknown")


def _tag_key(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:63] or "_"


def _description(loaded: LoadedSpec) -> str:
    spec = loaded.spec
    purpose = spec.description.purpose if spec.description and spec.description.purpose else spec.name
    if spec.source.type == "csv":
        origin = "CSV from " + ", ".join(f.path for f in spec.source.files)
    else:
        read = f"table {spec.source.table}" if spec.source.table else "a query"
        origin = f"{spec.source.type} ({read}, URL from ${spec.source.connection.url_env})"
    return f"{purpose}\n\nSpec `{loaded.display_path}` v{spec.version}: {origin} into `{spec.domain}.{spec.name}`."


def _check_result(
    check_key: dg.AssetCheckKey, report: ValidationReport, extract_report: ExtractReport, strict: bool
) -> dg.AssetCheckResult:
    metadata: dict[str, Any] = {
        "rows_read": report.rows_read,
        "rows_valid": report.rows_valid,
        "rows_rejected": report.rows_rejected,
    }
    for entry in report.errors:
        metadata[f"{entry.field}:{entry.kind}"] = entry.count
    if report.errors:
        metadata["first_errors"] = dg.MetadataValue.md(
            "\n".join(
                f"- `{e.field}` {e.kind} x{e.count}: "
                + "; ".join(f"{ex.place()}: `{ex.shown()}`" for ex in e.examples)
                for e in report.errors
            )
        )
    return dg.AssetCheckResult(
        asset_key=check_key.asset_key,
        check_name=check_key.name,
        passed=report.rows_rejected == 0,
        severity=dg.AssetCheckSeverity.ERROR if strict else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


def stream_sources(
    context: dg.OpExecutionContext,
    loaded: LoadedSpec,
    files: Sequence[SourceFile],
    extract_report: "ExtractReport",
    storage: StorageResource,
    catalog_resource: CatalogResource,
    *,
    stamp: tuple[str, datetime] | None = None,
    created: list[tuple[Any, str]] | None = None,
    tables: dict[str, Any] | None = None,
) -> PipelineOutcome:
    """Read, validate and write ``files`` in one streaming pass (pipeline.py) into uncommitted files.

    A table this pass had to create is dropped again when nothing is going to be committed to it (strict
    failure, failed write), so that a failed run leaves the catalog as it was. ``stamp`` (run id, ingestion
    time) stamps the rows with another run's values than this step's (a fanned-out group: the planning run's);
    ``created`` receives the (catalog, identifier) of the tables the pass created; ``tables`` holds the tables the
    step has loaded already, by identifier (:func:`committed_sources`).
    """
    spec = loaded.spec
    window = partition_window(loaded, extract_report.partition_key) if extract_report.partition_key else None
    secrets = _secrets(storage, catalog_resource)
    run_id, ingested_at = stamp if stamp is not None else (context.run_id, datetime.now(timezone.utc))
    s3 = storage.s3_settings()
    created = [] if created is None else created  # (catalog, identifier) of the tables this pass created
    with failures(loaded, "write", secrets):
        storage.check_access(spec)  # wrong S3 credentials fail here, clearly, before anything is created
        location = storage.table_location(spec)
        rejects_location = storage.table_location(spec, "__rejects")
        data_schema = iceberg_schema(spec.fields)
        catalog = None
        if spec.target.catalog is CatalogKind.ICEBERG:
            catalog = catalog_resource.load_catalog()
            merge = spec.target.write_mode is WriteMode.MERGE
            if merge:
                data_schema = keyed_schema(data_schema, spec.primary_key)  # a new table records its key
            table = _ensure_table(catalog, spec.table_identifier, data_schema, lambda s: partition_spec(spec, s), location,
                                  created, (tables or {}).get(".".join(spec.table_identifier)))
            if merge:
                table = ensure_key(table, spec.primary_key)
            data_schema, location = table.schema(), table.location()
    settings = run_writer_settings(spec, branch=spec.branch, run_id=run_id, ingested_at=ingested_at, s3=s3)
    split_by_source = spec.target.catalog is CatalogKind.NONE and extract_report.incremental
    outcome = PipelineOutcome(
        run_id=run_id, ingested_at=ingested_at.isoformat(), location=location, rejects_location=rejects_location
    )

    def open_rejects() -> PartitionedParquetWriter:
        reject_schema = rejects_iceberg_schema(spec.fields)
        if spec.partitions is not None:  # each reject names its partition, whose re-run replaces it
            reject_schema = with_partition_key_column(reject_schema)
        rejects_at = rejects_location
        if catalog is not None:
            reject_table = _ensure_table(
                catalog, spec.rejects_identifier, reject_schema, partition_spec_for_rejects, rejects_location, created
            )
            reject_schema, rejects_at = reject_table.schema(), reject_table.location()
            outcome.rejects_location = rejects_at
        return settings.writer(
            f"{rejects_at}/data",
            arrow_schema(reject_schema),
            Partitioner(partition_spec_for_rejects(reject_schema), reject_schema),
            split_by_source=split_by_source,
        )

    data_writer = settings.writer(
        f"{location}/data",
        arrow_schema(data_schema),
        Partitioner(partition_spec(spec, data_schema), data_schema),
        split_by_source=split_by_source,
    )
    if spec.target.write_mode is WriteMode.MERGE:
        # the last row of each key, without the deletes, reaches the writer once the stream ends (merge.py)
        data_writer = MergeBuffer(
            data_writer, key=spec.primary_key, delete_field=spec.target.delete_field,
            keys_uri=keys_uri(location, run_id), s3=s3,
        )
    sinks = Sinks(
        data=data_writer,
        open_rejects=open_rejects,
        ingested_at=pa.scalar(ingested_at, pa.timestamp("us", tz="UTC")),
        run_id=run_id,
        partition_key=extract_report.partition_key,
    )
    try:
        cursor = None
        if is_cursor_run(loaded) and files:
            with failures(loaded, "extract", secrets):
                cursor = cursor_read(loaded, files, catalog, location, rejects_location, s3,
                                     table=table if catalog is not None else None)
        run_pipeline(
            run_spec(loaded, extract_report.partition_key),
            files,
            s3=s3,
            sinks=sinks,
            outcome=outcome,
            log_info=context.log.info,
            secrets=secrets,
            classify=lambda exc: is_transient(exc, spec.retry_config.retryable_errors),
            cursor=cursor,
            window=window,
        )
    except StageFailure as exc:
        _drop_created(created, s3)
        raise to_failure(exc.error, loaded, exc.stage, secrets) from None
    if outcome.strict_failed or outcome.write_error is not None:
        _drop_created(created, s3)
    elif isinstance(data_writer, MergeBuffer) and data_writer.outcome is not None:
        outcome.merge_keys = data_writer.keys_uri if data_writer.outcome.keys else ""
        outcome.rows_not_loaded = data_writer.outcome.rows_not_loaded
        if not data_writer.outcome.keys:
            MergeKeys(data_writer.keys_uri, tuple(spec.primary_key), s3).remove()
    return outcome


def _ensure_table(
    catalog: Any, identifier: tuple[str, str], schema: Schema, spec_for: Any, location: str, created: list[Any],
    table: Any = None,
) -> Any:
    """The table (``table``: as the step loaded it already), created when missing (recorded in ``created``)."""
    name = ".".join(identifier)
    existing = table if table is not None else load_existing_table(catalog, name)
    existed = existing is not None
    table = ensure_table(catalog, identifier, schema, spec_for, location, table=existing)
    if not existed:
        created.append((catalog, name))
    return table


def _drop_created(created: list[tuple[Any, str]], s3: Any) -> None:
    """Drop the tables this run created, as long as nothing was committed to them (best effort), with the
    metadata files creating them wrote: once the table is dropped no catalog names them, so nothing else
    would ever remove them (S3 objects are deleted with boto3: pyarrow's filesystem would leave a folder marker
    object in their place). A REST catalog wrote its files itself and keeps them its own way."""
    for catalog, name in created:
        try:
            table = catalog.load_table(name)
            if not table.metadata.snapshots:
                catalog.drop_table(name)
        except Exception:  # noqa: BLE001 - an empty table left behind is harmless; the run's own error matters
            log.warning("could not drop the empty table %s this run created", name)
            continue
        if isinstance(catalog, RestCatalog) or table.metadata.snapshots:
            continue
        for path in {table.metadata_location, *(entry.metadata_file for entry in table.metadata.metadata_log)}:
            try:
                remove_file(path, s3)
            except Exception:  # noqa: BLE001 - as above: a stray metadata file is harmless
                log.warning("could not remove %s of the dropped table %s", path, name)


def verify_written(outcome: PipelineOutcome, s3: Any) -> None:
    """Every file the stream wrote is there, at the size it was written with.

    Object stores are asked for all files at once (``storage.map_per_object``).

    Raises:
        StorageError: a file is missing or has another size (transient: the step streams again).
    """
    files = [*outcome.data_files, *outcome.reject_files]

    def file_info(written: WrittenFile) -> pafs.FileInfo:
        fs, path = filesystem_for(written.uri, s3)
        return fs.get_file_info(path)

    for written, info in zip(files, map_per_object(file_info, files), strict=True):
        if info.type == pafs.FileType.NotFound or info.size != written.size_bytes:
            found = "missing" if info.type == pafs.FileType.NotFound else f"{info.size} bytes"
            raise StorageError(f"{written.uri}: written with {written.size_bytes} bytes, now {found}")


def _write_result(outcome: PipelineOutcome, extract_report: "ExtractReport") -> "WriteResult":
    return WriteResult(
        run_id=outcome.run_id,
        ingested_at=outcome.ingested_at,
        data_files=outcome.data_files,
        reject_files=outcome.reject_files,
        source_state={**extract_report.source_state, **outcome.cursor_marks},
        cursor_read_from=extract_report.source_state if outcome.cursor_marks else {},
        rows_read=outcome.validation.rows_read,
        rows_rejected=outcome.validation.rows_rejected,
        location=outcome.location,
        rejects_location=outcome.rejects_location,
        columns_not_loaded={r["uri"]: r["extra_columns"] for r in outcome.file_reports if r["extra_columns"]},
        columns_missing={r["uri"]: r["missing_columns"] for r in outcome.file_reports if r["missing_columns"]},
        incremental=extract_report.incremental,
        nothing_new=extract_report.nothing_new,
        seconds=outcome.seconds,
        merge_keys=outcome.merge_keys,
        rows_not_loaded=outcome.rows_not_loaded,
        partition_key=extract_report.partition_key,
    )


def _stage_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """Busy seconds of each stage of the stream (they overlap, so their sum exceeds the wall time) and the
    stream's wall time."""
    keys = {
        "extract": "extract_seconds",
        "validate": "validate_seconds",
        "write": "write_seconds",
        "wall": "stream_seconds",
    }
    return {keys[stage]: value for stage, value in seconds.items() if stage in keys}


def _strict_failure(name: str, report: ValidationReport) -> dg.Failure:
    return dg.Failure(
        description=f"{name}: strict validation failed; nothing was committed.\n{report.describe()}",
        metadata={
            "step": "validate",
            "rows_read": report.rows_read,
            "rows_rejected": report.rows_rejected,
            "errors": dg.MetadataValue.json(
                [{"field": e.field, "kind": e.kind, "count": e.count} for e in report.errors]
            ),
        },
        allow_retries=False,
    )


def _stage_failure(error: StageError) -> dg.Failure:
    """A failure recorded by the stream, reported by the step it belongs to."""
    return dg.Failure(
        description=error.message,
        metadata={
            "step": error.stage,
            "error_class": error.error_class,
            "retryable": error.retryable,
            "traceback": dg.MetadataValue.text(error.traceback),
        },
        allow_retries=error.retryable,
    )


def partition_spec_for_rejects(schema: Schema) -> PartitionSpec:
    """The quarantine table is not partitioned: it stays small and is read whole."""
    return UNPARTITIONED_PARTITION_SPEC


def _commit(
    context: dg.OpExecutionContext,
    loaded: LoadedSpec,
    written: WriteResult,
    storage: StorageResource,
    catalog_resource: CatalogResource,
) -> CommitResult:
    spec = loaded.spec
    properties = {
        ASSET_KEY: spec.name,
        SOURCE_STATE_KEY: source_state_json(written.source_state),
        "dativo.spec-version": spec.version,
        "dativo.rows-read": str(written.rows_read),
        "dativo.rows-rejected": str(written.rows_rejected),
        **({PARTITION_KEY_PROPERTY: written.partition_key} if written.partition_key else {}),
    }
    if written.run_id != context.run_id:
        context.log.info(f"{spec.name}: committing files written by run {written.run_id} under that run's id")
    overwrite = spec.target.write_mode is WriteMode.OVERWRITE
    table_name = f"{spec.domain}.{spec.name}"
    # a cursor's unit is the same table every run: its rows are added, never replaced; its new mark is recorded
    # a partition's run replaces its whole window instead (and finds nothing new when no file of it changed)
    replace_sources = written.incremental and not is_cursor_run(loaded) and not written.partition_key
    if spec.target.catalog is CatalogKind.NONE:
        s3 = storage.s3_settings()
        # overwrite replaces the quarantine's rows too (CONTRACT 3), also when this run rejected nothing
        if written.reject_files or (overwrite and read_commit_markers(written.rejects_location, s3)):
            write_commit_marker(
                location=written.rejects_location,
                run_id=written.run_id,
                files=written.reject_files,
                properties=properties,
                s3=s3,
                table=f"{table_name}__rejects",
                overwrite=overwrite,
                replace_sources=replace_sources,
            )
        result = write_commit_marker(
            location=written.location,
            run_id=written.run_id,
            files=written.data_files,
            properties=properties,
            s3=s3,
            table=table_name,
            overwrite=overwrite,
            replace_sources=replace_sources and not written.nothing_new,
            record_sources=is_cursor_run(loaded) and not written.nothing_new,
        )
        return result.model_copy(
            update={"table_rows": committed_records(written.location, s3), "nothing_new": written.nothing_new}
        )
    catalog = catalog_resource.load_catalog()
    table = catalog.load_table(".".join(spec.table_identifier))
    rejects_name = ".".join(spec.rejects_identifier)
    # the files a commit rewrites (survivors of data files shared with a replaced source) are written as this run's
    writer = run_writer_settings(
        spec, branch=spec.branch, run_id=written.run_id, ingested_at=datetime.fromisoformat(written.ingested_at),
        s3=storage.s3_settings(),
    )
    # a changed file also replaces the rows its earlier version left in quarantine, and an overwrite replaces all of
    # them (CONTRACT 3), even with no new rejects
    replaces_rejects = overwrite or (replace_sources and written.source_state)
    # a partition's run replaces its partition's earlier rejects, also when it rejects nothing now
    partition_rejects = _partition_rejects(catalog, rejects_name, written)
    if written.reject_files or partition_rejects is not None or (replaces_rejects and catalog.table_exists(rejects_name)):
        reject_table = catalog.load_table(rejects_name)
        reject_result = commit_files(
            reject_table,
            branch=spec.branch,
            files=written.reject_files,
            partitioner=Partitioner(reject_table.spec(), reject_table.schema()),
            run_id=written.run_id,
            properties=properties,
            overwrite=overwrite,
            sources=written.source_state,
            replace_sources=replace_sources,
            writer=writer,
            window=partition_rejects,
        )
        if reject_result.rows:
            context.log.info(f"{spec.name}: quarantined {reject_result.rows} row(s) in {reject_result.table}@{spec.branch}")
    merge = MergeKeys(written.merge_keys, tuple(spec.primary_key), storage.s3_settings()) if written.merge_keys else None
    result = commit_files(
        table,
        branch=spec.branch,
        files=written.data_files,
        partitioner=Partitioner(table.spec(), table.schema()),
        run_id=written.run_id,
        properties=properties,
        overwrite=overwrite,
        sources=written.source_state,
        replace_sources=replace_sources,
        record_sources=written.incremental,
        writer=writer,
        publish=spec.target.publish,  # the data table only: the quarantine table stays on the branch (CONTRACT 9)
        merge=merge,
        # a merge promises one row per key: counted on the staged snapshot, so a failure commits and publishes nothing
        unique_key=spec.primary_key if spec.target.write_mode is WriteMode.MERGE else None,
        read_from=written.cursor_read_from if is_cursor_run(loaded) else None,
        # a partition's run replaces its window's rows (partitions.py), in the same commit
        window=WindowSelection(partition_window(loaded, written.partition_key))
        if written.partition_key and not written.nothing_new else None,
    )
    if merge is not None:
        merge.remove()  # committed (or committed before): the keys are not needed again
    if overwrite and spec.primary_key:
        # the overwrite replaced every row: the table records the spec's key from now on (a merge may follow)
        ensure_key(catalog.load_table(".".join(spec.table_identifier)), spec.primary_key, overwrite=True)
    if written.nothing_new:
        result = result.model_copy(update={"nothing_new": True})
    if result.replaced_sources:
        context.log.info(f"{spec.name}: replaced the earlier rows of {len(result.replaced_sources)} changed file(s)")
    if result.already_committed:
        context.log.info(f"{spec.name}: run already committed snapshot {result.snapshot_id}; not committing again")
    elif result.snapshot_id is None or (not written.data_files and not overwrite):
        context.log.info(f"{spec.name}: no valid rows; nothing committed to {table_name}")
    return result


def _partition_rejects(catalog: Any, rejects_name: str, written: WriteResult) -> PartitionRejects | None:
    """The earlier rejects a partition's run replaces: its key's rows of the quarantine table (None: not a
    partition's run that read data, or a quarantine table without ``_partition``, which holds none of them)."""
    if not written.partition_key or written.nothing_new or not catalog.table_exists(rejects_name):
        return None
    has_column = PARTITION_KEY_COLUMN in catalog.load_table(rejects_name).schema().column_names
    return PartitionRejects(written.partition_key) if has_column else None


def _publish_metadata(loaded: LoadedSpec, result: CommitResult) -> dict[str, Any]:
    """What a publishing asset's run published: main's head after the run (the branch's, ``snapshot_id``)."""
    if not loaded.spec.target.publish:
        return {"published_to_main": False}
    main = result.main_snapshot_id
    return {"published_to_main": main is not None, "main_snapshot_id": str(main) if main is not None else ""}


def _materialization_metadata(
    loaded: LoadedSpec, written: WriteResult, result: CommitResult, catalog: CatalogResource
) -> dict[str, Any]:
    spec = loaded.spec
    metadata: dict[str, Any] = {
        # the table's size after this run (Dagster plots it over time); this run's share is rows_committed
        "dagster/row_count": result.table_rows if result.table_rows is not None else result.rows,
        "dagster/table_name": f"{spec.domain}.{spec.name}",
        "dagster/uri": result.location or written.location,
        "rows_read": written.rows_read,
        "rows_committed": result.rows,
        "rows_rejected": written.rows_rejected,
        "files_written": result.files,
        "bytes_written": result.bytes,
        "partitions": dg.MetadataValue.json(result.partitions),
        "snapshot_id": str(result.snapshot_id) if result.snapshot_id is not None else "",
        "branch": result.branch,
        "write_mode": spec.target.write_mode.value,
        "already_committed": result.already_committed,
        "nothing_new": result.nothing_new,
        "replaced_sources": dg.MetadataValue.json(result.replaced_sources),
        "source_files": dg.MetadataValue.json(sorted(written.source_state)),
        "ingested_at": written.ingested_at,
        **_stage_seconds(written.seconds),
    }
    if spec.target.catalog is CatalogKind.ICEBERG:
        metadata["catalog"] = catalog.display_uri
        metadata["metadata_location"] = result.metadata_location
        metadata.update(_publish_metadata(loaded, result))
    else:
        metadata["commit_marker"] = result.metadata_location
    if written.rows_rejected:
        metadata["rejects_table"] = f"{spec.domain}.{spec.name}__rejects"
        metadata["rejects_files"] = len(written.reject_files)
    if written.columns_not_loaded:
        metadata["columns_not_loaded"] = dg.MetadataValue.json(written.columns_not_loaded)
    if written.columns_missing:
        metadata["columns_missing"] = dg.MetadataValue.json(written.columns_missing)
    return metadata


__all__ = ["ExtractReport", "WriteResult", "build_asset", "committed_sources"]
