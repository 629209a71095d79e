"""One streaming pass over a run's source files: read -> validate -> write, on both cores.

The asset's data moves through three stages that run at once, joined by small bounded queues:

    reader thread:     source -> text batches                   (sources: Source.read, one module per kind)
    validator thread:  text batches -> typed rows and rejects   (validate.validate_batch)
    calling thread:    typed rows -> Parquet data files, rejects -> quarantine files (write.PartitionedParquetWriter)

pyarrow releases the GIL in its CSV parser, its compute kernels and its Parquet writer, so the stages overlap
on separate cores; the queues hold a few batches each, so memory stays flat whatever the input size. Nothing
is staged on disk in between. Each stage's busy time is measured and reported.

Failures keep their stage: a reading error stops everything and is raised as ``extract``; an unexpected
validation error as ``validate``. A writing error (object store down, disk full) is *recorded* rather than
raised: the stream is drained so that the validation report is complete, the files written so far are
removed, and the caller reports the error from its write step (where Dagster's retry policy re-runs the
stream). In strict mode, once a row is rejected no more rows are written and everything written is removed
at the end; the validation report still counts every row.
"""

from __future__ import annotations

import gc
import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import BaseModel, Field

from dativo_dagster.cursor import CursorRead, format_mark
from dativo_dagster.errors import DativoError, redact
from dativo_dagster.merge import MergeBuffer
from dativo_dagster.sources import FileReport, Source, SourceFile, source_for
from dativo_dagster.spec import LoadedSpec, ValidationMode
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import INGESTED_AT, PARTITION_KEY_COLUMN, RUN_ID, repeated
from dativo_dagster.validate import ValidationReport, validate_batch
from dativo_dagster.write import PartitionedParquetWriter, WrittenFile

if TYPE_CHECKING:
    from dativo_dagster.partitions import PartitionWindow

log = logging.getLogger(__name__)

# Batches waiting between two stages. The reader also gathers up to COMBINE_BYTES before it hands a batch on,
# so one waiting text batch keeps the validator fed (measured: ~8 MB less at the same speed than two).
TEXT_QUEUE_BATCHES = 1
TYPED_QUEUE_BATCHES = 2
COMBINE_BYTES = 4 << 20  # text batches (about 1 MiB of CSV each) are combined up to this size for validation
PROGRESS_SECONDS = 10.0
# Files named one by one in the run's log as their reading starts; beyond these only the progress line (every
# PROGRESS_SECONDS) names the file being read: a Dagster log call costs about a millisecond, a run may read 10,000.
LOGGED_FILES = 20
# While the stages run, a thread waiting for the GIL gets it after this long at most (Python's default: 5 ms).
# The stages hand the GIL back and forth around every pyarrow call; with the default a stage that finished a
# kernel could wait a whole interval for the glue code of another (measured: person5m's pass ~5 % faster).
SWITCH_INTERVAL = 0.001
_POLL_SECONDS = 0.5


class StageError(BaseModel):
    """An error of one stage, kept as text (redacted) so that it can be reported by a later step."""

    stage: str
    error_class: str
    message: str
    traceback: str = ""
    retryable: bool = False


class PipelineOutcome(BaseModel):
    """What one streaming pass did: the validation report, the files written, per-stage times."""

    run_id: str
    ingested_at: str
    files_read: list[str] = Field(default_factory=list)
    file_reports: list[dict[str, Any]] = Field(default_factory=list)
    validation: ValidationReport = Field(default_factory=ValidationReport)
    data_files: list[WrittenFile] = Field(default_factory=list)
    reject_files: list[WrittenFile] = Field(default_factory=list)
    location: str = ""
    rejects_location: str = ""
    write_error: StageError | None = None
    strict_failed: bool = False  # strict mode and a row was rejected: nothing was written
    merge_keys: str = ""  # write_mode: merge: the file of the keys the run read (merge.MergeBuffer)
    rows_not_loaded: int = 0  # write_mode: merge: rows read but superseded by a later row of their key, or deletes
    # cursor incremental (cursor.py): the mark to commit per unit, and the boundary rows skipped as committed already
    cursor_marks: dict[str, str] = Field(default_factory=dict)
    rows_skipped: int = 0
    seconds: dict[str, float] = Field(default_factory=dict)  # busy time per stage and the wall time

    @property
    def rows_written(self) -> int:
        return sum(f.record_count for f in self.data_files)


class StageFailure(Exception):  # noqa: N818 - carries another stage's exception to the caller
    """An exception of the reader or validator stage, re-raised in the calling thread."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage}: {error}")
        self.stage = stage
        self.error = error


@dataclass
class Sinks:
    """Where the write stage puts rows: the data writer, and the quarantine writer made on first use."""

    data: PartitionedParquetWriter | MergeBuffer
    open_rejects: Callable[[], PartitionedParquetWriter]
    ingested_at: pa.Scalar
    run_id: str
    rejects: PartitionedParquetWriter | None = None
    partition_key: str = ""  # a partition's run: its rejects carry the key (``_partition``)

    def rejects_writer(self) -> PartitionedParquetWriter:
        if self.rejects is None:
            self.rejects = self.open_rejects()
        return self.rejects

    def abort(self) -> None:
        """Remove every file either writer wrote."""
        for writer in (self.data, self.rejects):
            if writer is not None:
                try:
                    writer.abort()
                except Exception:  # noqa: BLE001 - the first error is the one to report; maintenance removes the rest
                    log.warning("could not remove every file of an aborted write under %s", writer.location)


@dataclass
class _Progress:
    """Counters the stage threads update and the calling thread logs."""

    files: list[FileReport] = field(default_factory=list)  # one per file the reader started, in order
    rows_read: int = 0
    busy: dict[str, float] = field(default_factory=lambda: {"extract": 0.0, "validate": 0.0, "write": 0.0})


_DONE = object()


def run_pipeline(
    loaded: LoadedSpec,
    files: Sequence[SourceFile],
    *,
    s3: S3Settings,
    sinks: Sinks,
    outcome: PipelineOutcome,
    log_info: Callable[[str], None],
    secrets: Sequence[str | None] = (),
    classify: Callable[[BaseException], bool] = lambda exc: False,
    source: Source | None = None,
    cursor: CursorRead | None = None,
    window: PartitionWindow | None = None,
) -> PipelineOutcome:
    """Stream ``files`` (the source's units) through validation into ``sinks``; fills and returns ``outcome``.

    ``source`` reads them (default: the spec's own kind, :func:`dativo_dagster.sources.source_for`). With ``cursor``
    (a cursor incremental run) valid rows already committed at the boundary are skipped (not counted as read) and
    the highest cursor value read becomes ``outcome.cursor_marks``. With a partition ``window`` rows outside it are
    rejected (``out_of_partition``).

    Raises:
        StageFailure: reading (stage ``extract``) or validating (stage ``validate``) failed; every file
            written so far has been removed.
    """
    spec = loaded.spec
    source = source or source_for(loaded, s3)
    null_values = source.null_values
    strict = spec.schema_validation_mode is ValidationMode.STRICT
    reports: list[FileReport] = []
    report = outcome.validation
    progress = _Progress(files=reports)
    stop = threading.Event()  # set when the calling thread gives up: the stage threads end at once
    texts: queue.Queue[Any] = queue.Queue(TEXT_QUEUE_BATCHES)
    typed: queue.Queue[Any] = queue.Queue(TYPED_QUEUE_BATCHES)

    def put(q: queue.Queue[Any], item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            batches = source.read(files, reports)
            pending: list[pa.RecordBatch] = []
            size = 0
            while True:
                started = time.perf_counter()
                batch = next(batches, None)
                if batch is not None:
                    progress.rows_read += batch.num_rows
                    pending.append(batch)
                    size += batch.nbytes
                # validation costs a fixed overhead per batch and column: hand it a few reader blocks at once
                ready = pending and (batch is None or size >= COMBINE_BYTES)
                out = (pending[0] if len(pending) == 1 else pa.concat_batches(pending)) if ready else None
                progress.busy["extract"] += time.perf_counter() - started
                if out is not None:
                    pending, size = [], 0
                    if not put(texts, out):
                        return
                if batch is None:
                    break
            put(texts, _DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            put(texts, StageFailure("extract", exc))

    def validator() -> None:
        try:
            while True:
                item = _get(texts, stop)
                if item is None:
                    return
                if item is _DONE or isinstance(item, StageFailure):
                    put(typed, item)
                    return
                started = time.perf_counter()
                if cursor is not None:  # rows quarantined by an earlier run are not judged (nor counted) again
                    item = cursor.skip_quarantined(item, [f.name for f in spec.fields])
                valid, rejects, tally = validate_batch(item, spec.fields, null_values, window)
                if cursor is not None:
                    kept = cursor.observe(valid, rejects)
                    skipped = valid.num_rows - kept.num_rows
                    tally = replace(tally, rows_read=tally.rows_read - skipped, rows_valid=tally.rows_valid - skipped)
                    valid = kept
                report.add(tally)
                progress.busy["validate"] += time.perf_counter() - started
                if rejects.num_rows and not strict and not put(typed, ("rejects", rejects)):
                    return
                # strict: once a row failed nothing will be committed, so no more rows are written
                if valid.num_rows and not (strict and report.rows_rejected) and not put(typed, ("valid", valid)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            put(typed, StageFailure("validate", exc))

    # everything allocated so far (definitions, modules) lives as long as the process: keep the collector
    # from walking it again and again while the stream allocates (a full collection stalls every stage)
    gc.freeze()
    threads = [
        threading.Thread(target=reader, name=f"{spec.name}-read", daemon=True),
        threading.Thread(target=validator, name=f"{spec.name}-validate", daemon=True),
    ]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL))
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    failure: StageFailure | None = None
    try:
        failure = _write_stage(
            typed, sinks, outcome, progress, log_info, spec.name, len(files), strict, secrets, classify
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(switch_interval)
    outcome.file_reports = [vars(r) for r in reports]
    outcome.files_read = [r.uri for r in reports]
    busy = {stage: round(seconds, 3) for stage, seconds in progress.busy.items()}
    outcome.seconds = {**busy, "wall": round(time.perf_counter() - wall, 3)}
    outcome.strict_failed = strict and report.rows_rejected > 0
    if cursor is not None:
        outcome.rows_skipped = cursor.skipped
        mark = cursor.new_mark
        outcome.cursor_marks = {unit.uri: format_mark(mark) for unit in files} if mark is not None else {}
    if failure is not None or outcome.strict_failed or outcome.write_error is not None:
        sinks.abort()
        outcome.data_files, outcome.reject_files = [], []
    if failure is not None:
        raise failure
    if progress.rows_read:
        elapsed = max(outcome.seconds["wall"], 1e-9)
        log_info(
            f"{spec.name}: read {progress.rows_read:,} rows from {len(files)} file(s) in {elapsed:.1f} s"
            f" ({progress.rows_read / elapsed:,.0f} rows/s)"
        )
    return outcome


def file_findings(file_reports: Sequence[dict[str, Any]]) -> list[str]:
    """Warnings about what reading the files found besides rows (columns not in the spec, spec columns missing,
    blank records): per finding the first ``LOGGED_FILES`` files by name, then one line counting the rest (a
    Dagster log call costs about a millisecond; the schema drift check names every file)."""
    findings = (
        ("extra_columns", lambda value: f"columns not in the spec, not loaded: {value}"),
        ("missing_columns", lambda value: f"spec columns missing from the file, null: {value}"),
        ("blank_records", lambda value: f"{value} blank record(s) skipped"),
    )
    messages = []
    for key, describe in findings:
        found = [report for report in file_reports if report[key]]
        messages += [f"{report['uri']}: {describe(report[key])}" for report in found[:LOGGED_FILES]]
        if len(found) > LOGGED_FILES:
            messages.append(f"and {len(found) - LOGGED_FILES} more file(s) with {describe('...')}")
    return messages


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    """The next item, or None once ``stop`` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue
    return None


def _write_stage(
    typed: queue.Queue[Any],
    sinks: Sinks,
    outcome: PipelineOutcome,
    progress: _Progress,
    log_info: Callable[[str], None],
    name: str,
    total_files: int,
    strict: bool,
    secrets: Sequence[str | None],
    classify: Callable[[BaseException], bool],
) -> StageFailure | None:
    """Write what the validator sends until it is done; returns a reader or validator failure."""
    started = last = time.monotonic()
    logged_file = 0
    while True:
        try:
            item = typed.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            item = None
        while logged_file < min(len(progress.files), LOGGED_FILES):
            logged_file += 1
            log_info(f"{name}: file {logged_file} of {total_files}: {progress.files[logged_file - 1].uri}")
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            log_info(
                f"{name}: {progress.rows_read:,} rows read, {progress.rows_read / (now - started):,.0f} rows/s,"
                f" reading {progress.files[-1].uri if progress.files else '-'}"
            )
        if item is None:
            continue
        if item is _DONE:
            break
        if isinstance(item, StageFailure):
            return item
        if outcome.write_error is not None:
            continue  # draining: the validation report is completed, nothing more is written
        kind, batch = item
        begun = time.perf_counter()
        try:
            if kind == "valid":
                sinks.data.write(_table_with_system_columns(batch, sinks.data, sinks.ingested_at, sinks.run_id))
            else:
                writer = sinks.rejects_writer()
                writer.write(_table_with_system_columns(batch, writer, sinks.ingested_at, sinks.run_id,
                                                        sinks.partition_key))
        except Exception as exc:  # noqa: BLE001 - recorded, reported by the write step
            outcome.write_error = stage_error("write", exc, secrets, classify)
        progress.busy["write"] += time.perf_counter() - begun
    if outcome.write_error is None and not (strict and outcome.validation.rows_rejected):
        begun = time.perf_counter()
        try:
            outcome.data_files = sinks.data.close()
            outcome.reject_files = sinks.rejects.close() if sinks.rejects is not None else []
        except Exception as exc:  # noqa: BLE001 - recorded, reported by the write step
            outcome.write_error = stage_error("write", exc, secrets, classify)
        progress.busy["write"] += time.perf_counter() - begun
    return None


def stage_error(
    stage: str,
    exc: BaseException,
    secrets: Sequence[str | None],
    classify: Callable[[BaseException], bool],
    where: str = "",
) -> StageError:
    """A redacted, classified record of ``exc``; ``where`` prefixes the message unless it names the place."""
    message = str(exc) if isinstance(exc, DativoError) else f"{type(exc).__name__}: {exc}"
    if where and where.rstrip(": ").rsplit(" ", 1)[-1] in message:
        where = ""
    return StageError(
        stage=stage,
        error_class=type(exc).__name__,
        message=redact(f"{where}{message}", secrets),
        traceback=redact("".join(traceback.format_exception(exc)), secrets),
        retryable=classify(exc),
    )


def _table_with_system_columns(
    batch: pa.RecordBatch, writer: PartitionedParquetWriter, ingested_at: pa.Scalar, run_id: str,
    partition_key: str = "",
) -> pa.Table:
    """A validated batch for ``writer``: the spec's columns, then the system columns.

    ``_run_id`` is made in the writer's dictionary form at once (one value, no per-row copies) and
    ``_source_file`` comes as one from extract; the other columns keep their logical type.
    """
    n = batch.num_rows
    columns = []
    fields = []
    names = batch.schema.names
    for logical, physical in zip(writer.schema, writer.file_schema, strict=True):
        field = logical
        if logical.name == INGESTED_AT:
            columns.append(pa.repeat(ingested_at, n))
        elif logical.name == RUN_ID:
            columns.append(repeated(run_id, n))
            field = physical
        elif logical.name == PARTITION_KEY_COLUMN:
            columns.append(pa.repeat(pa.scalar(partition_key or None, logical.type), n))
        elif logical.name in names:
            column = batch.column(logical.name)
            if column.type == physical.type:
                field = physical
            elif column.type != logical.type:
                column = column.cast(logical.type)
            columns.append(column)
        else:
            columns.append(pa.nulls(n, logical.type))
        fields.append(field)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=writer.schema.metadata))


__all__ = ["LOGGED_FILES", "PipelineOutcome", "Sinks", "StageError", "StageFailure", "file_findings", "run_pipeline"]
