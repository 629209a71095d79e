"""The streaming pass (pipeline.py) as the asset runs it: stage times, and failures in the middle of the stream.

Rows move from the reader through validation into the Parquet writer while all three run at once. These tests
make a stage fail after files were already written and check what a user relies on: the failure is reported
by the step it belongs to, a retry streams again and loads every row once, and a failed run leaves neither
files nor a table behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dativo_dagster import write as write_module
from dativo_dagster.assets import verify_written
from dativo_dagster.errors import StorageError
from dativo_dagster.sources.csv import SourceFile
from dativo_dagster.pipeline import PipelineOutcome, Sinks, StageFailure, run_pipeline
from dativo_dagster.spec import load_specs
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import Partitioner, arrow_schema, iceberg_schema, partition_spec
from dativo_dagster.write import WrittenFile
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

ROWS = 60_000
TABLE = "testdomain.people"


def people_csv(rows: int, bad_line: int | None = None) -> str:
    """``rows`` rows of hashes (they hardly compress: about 3 MB of Parquet, several 1 MiB files)."""
    lines = ["id,name"]
    for i in range(1, rows + 1):
        lines.append(f"{'x' if i + 1 == bad_line else i},{hashlib.sha256(str(i).encode()).hexdigest()}")
    return "\n".join(lines) + "\n"


def materialization(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    [event] = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


def step_events(result: dg.ExecuteInProcessResult, kind: dg.DagsterEventType, step: str) -> list[Any]:
    return [e for e in result.all_events if e.event_type == kind and e.step_key == f"people.people__{step}"]


def parquet_files(project: Project) -> list[Path]:
    return sorted(project.warehouse.rglob("*.parquet")) if project.warehouse.exists() else []


def small_files_spec(**overrides: Any) -> dict[str, Any]:
    """Files of about 1 MiB, so that several are finished before the stream ends."""
    return base_spec(target={"partitioning": [], "parquet_target_size_mb": 1}, **overrides)


def fail_flushes(monkeypatch: pytest.MonkeyPatch, *, after: int, times: int, error: BaseException) -> list[int]:
    """Row group writes number ``after``+1 .. ``after``+``times`` raise ``error``; returns a call counter."""
    calls: list[int] = []
    original = write_module.PartitionedParquetWriter._write_row_group

    def write_row_group(self: Any, state: Any, ranges: Any, view: Any) -> None:
        calls.append(1)
        if after < len(calls) <= after + times:
            raise error
        original(self, state, ranges, view)

    monkeypatch.setattr(write_module.PartitionedParquetWriter, "_write_row_group", write_row_group)
    monkeypatch.setattr(write_module, "ROW_GROUP_MAX_BYTES", 256 * 1024)  # many row groups, several files
    return calls


def test_the_materialization_reports_each_stage_time(project: Project) -> None:
    project.write_spec(base_spec())
    project.write_data("people.csv", people_csv(5_000))

    result = project.materialize()

    assert result.success
    meta = materialization(result)
    for key in ("extract_seconds", "validate_seconds", "write_seconds", "stream_seconds", "commit_seconds"):
        assert isinstance(meta[key], float) and meta[key] >= 0, key
    # the stages overlap: each one's busy time fits in the stream's wall time (with timer slack)
    busiest = max(meta["extract_seconds"], meta["validate_seconds"], meta["write_seconds"])
    assert busiest <= meta["stream_seconds"] + 0.05
    assert meta["rows_committed"] == 5_000


def test_a_write_failure_midstream_is_the_write_steps_and_a_retry_loads_every_row_once(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(small_files_spec(retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    project.write_data("people.csv", people_csv(ROWS))
    calls = fail_flushes(monkeypatch, after=3, times=1, error=OSError(5, "Input/output error"))

    result = project.materialize()

    assert result.success
    assert len(calls) > 5
    # the stream ran in extract; its write error is the write step's, retried there
    assert len(step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "write")) == 1
    assert step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "extract") == []
    [validation] = [c for c in result.get_asset_check_evaluations() if c.check_name == "validation"]
    assert validation.passed and validation.metadata["rows_read"].value == ROWS  # drained: a complete report
    rows = branch_rows(project.table(TABLE), "acme")
    assert sorted(r["id"] for r in rows) == list(range(1, ROWS + 1))
    # the first pass's files were removed; only the committed ones remain
    table = project.table(TABLE)
    head = table.snapshot_by_name("acme")
    assert head is not None
    referenced = {Path(f.file.file_path.removeprefix("file://")) for f in table.scan(snapshot_id=head.snapshot_id).plan_files()}
    assert set(parquet_files(project)) == referenced and len(referenced) > 1


def test_a_write_failure_without_retries_leaves_no_table_and_no_files(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(small_files_spec())
    project.write_data("people.csv", people_csv(ROWS))
    fail_flushes(monkeypatch, after=3, times=100, error=OSError(28, "No space left on device"))

    result = project.materialize()

    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "people.people__write"
    description = failure.event_specific_data.error.to_string()
    assert "No space left on device" in description
    assert parquet_files(project) == []
    assert not project.catalog().table_exists(TABLE)  # created by this run, dropped as it holds nothing


def test_a_strict_failure_at_the_end_removes_the_files_already_finished(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(small_files_spec())
    project.write_data("people.csv", "id,name\n1,first\n")
    assert project.materialize().success
    before = project.table(TABLE).metadata_location
    first_files = parquet_files(project)
    rows = 4 * ROWS  # several combined batches: files are finished before the last one's bad row
    project.write_data("people.csv", people_csv(rows, bad_line=rows + 1))
    finished: list[str] = []
    close = write_module.PartitionedParquetWriter._close

    def closing(self: Any, state: Any) -> None:
        close(self, state)
        finished.extend(f.uri for f in self.files[len(finished):])

    monkeypatch.setattr(write_module.PartitionedParquetWriter, "_close", closing)
    result = project.materialize()

    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "people.people__validate"
    assert "id: invalid_integer x1" in failure.event_specific_data.error.to_string()
    assert project.table(TABLE).metadata_location == before
    assert len(finished) > 1  # the stream had finished files before it met the bad row ...
    assert parquet_files(project) == first_files  # ... and all of them were removed


def test_a_read_error_midstream_fails_extract_and_removes_what_was_written(project: Project) -> None:
    project.write_spec(small_files_spec())
    text = people_csv(ROWS).encode() + b"99,caf\xe9\n"  # not UTF-8, after about 3 MB of good rows
    project.write_data("people.csv", text)

    result = project.materialize()

    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "people.people__extract"
    message = failure.event_specific_data.error.to_string()
    assert f"line {ROWS + 2}" in message and "people.csv" in message
    assert parquet_files(project) == []
    assert not project.catalog().table_exists(TABLE)


def test_run_pipeline_hands_a_reader_error_to_the_caller_and_aborts_the_sinks(project: Project, tmp_path: Path) -> None:
    project.write_spec(small_files_spec())
    path = project.write_data("people.csv", people_csv(ROWS).encode() + b"\xff\n")
    [loaded] = load_specs(project.specs_dir)
    schema = iceberg_schema(loaded.spec.fields)
    writer = write_module.PartitionedParquetWriter(
        location=str(tmp_path / "out"),
        schema=arrow_schema(schema),
        partitioner=Partitioner(partition_spec(loaded.spec, schema), schema),
        target_bytes=1 << 20,
        file_prefix="t",
        metadata={},
        s3=S3Settings(),
    )
    sinks = Sinks(
        data=writer,
        open_rejects=lambda: pytest.fail("no rejects expected"),
        ingested_at=pa.scalar(0, pa.timestamp("us", tz="UTC")),
        run_id="run",
    )
    source = SourceFile(uri=str(path), size=path.stat().st_size, version="1")
    outcome = PipelineOutcome(run_id="run", ingested_at="now")
    logged: list[str] = []

    with pytest.raises(StageFailure) as raised:
        run_pipeline(loaded, [source], s3=S3Settings(), sinks=sinks, outcome=outcome, log_info=logged.append)

    assert raised.value.stage == "extract"
    assert list((tmp_path / "out").rglob("*.parquet")) == []
    assert logged == [f"people: file 1 of 1: {path}"]


def test_system_columns_read_back_as_plain_strings_from_the_files_and_the_table(project: Project) -> None:
    """CONTRACT 4: ``_source_file`` and ``_run_id`` are strings. They go to Parquet dictionary-encoded; every
    reader still sees plain strings with the right values, and the files carry the columns' field ids."""
    project.write_spec(small_files_spec())
    source = project.write_data("people.csv", people_csv(ROWS))

    result = project.materialize()

    assert result.success
    files = parquet_files(project)
    assert len(files) > 1
    for path in files:
        schema = pq.read_schema(path)
        for name in ("_source_file", "_run_id"):
            field = schema.field(name)
            assert field.type == pa.string(), (path, name, field.type)
            assert field.metadata and b"PARQUET:field_id" in field.metadata
        values = pq.read_table(path, columns=["_source_file", "_run_id"])
        assert set(values.column("_source_file").to_pylist()) == {str(source)}
        assert set(values.column("_run_id").to_pylist()) == {result.run_id}
    table = project.table(TABLE)
    head = table.snapshot_by_name("acme")
    assert head is not None
    scanned = table.scan(snapshot_id=head.snapshot_id, selected_fields=("_source_file", "_run_id")).to_arrow()
    assert scanned.schema.field("_source_file").type in (pa.string(), pa.large_string())
    assert scanned.num_rows == ROWS and set(scanned.column("_run_id").to_pylist()) == {result.run_id}


def test_the_write_step_finds_a_local_file_gone_or_changed(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"day={i}" / "f.parquet"
        path.parent.mkdir()
        path.write_bytes(b"x" * (10 + i))
        files.append(WrittenFile(uri=str(path), size_bytes=10 + i, record_count=1, partition_path=f"day={i}",
                                 partition_values=[i]))
    outcome = PipelineOutcome(run_id="r", ingested_at="", data_files=files)
    verify_written(outcome, S3Settings())
    (tmp_path / "day=1" / "f.parquet").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"day=1/f.parquet: written with 11 bytes, now 1 bytes"):
        verify_written(outcome, S3Settings())
    (tmp_path / "day=2" / "f.parquet").unlink()
    (tmp_path / "day=1" / "f.parquet").write_bytes(b"x" * 11)
    with pytest.raises(StorageError, match=r"day=2/f.parquet: written with 12 bytes, now missing"):
        verify_written(outcome, S3Settings())
