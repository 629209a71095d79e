"""Asset checks beyond validation (schema drift, reconciliation) and progress logging."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from dativo_dagster import commit as commit_module
from dativo_dagster import pipeline
from dativo_dagster.sources.csv import CsvSource
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

REPO_ROOT = Path(__file__).resolve().parent.parent


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def test_schema_drift_reports_extra_and_missing_columns(project):
    spec = base_spec(
        schema=[{"name": "id", "type": "integer", "required": True}, {"name": "name", "type": "string"},
                {"name": "email", "type": "string"}],
        source={"type": "csv", "files": [{"path": "data/*.csv"}]},
    )
    project.write_spec(spec)
    project.write_data("a.csv", "id,name,email,phone\n1,Ann,a@x,555\n")
    project.write_data("b.csv", "id,name\n2,Bob\n")
    result = project.materialize()
    assert result.success
    checks = _checks(result)
    drift = checks["schema_drift"]
    assert not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN
    meta = {k: v.value for k, v in drift.metadata.items()}
    assert meta["columns_not_in_spec"] == {str(project.data_dir / "a.csv"): ["phone"]}
    assert meta["spec_columns_missing"] == {str(project.data_dir / "b.csv"): ["email"]}
    assert checks["reconciliation"].passed
    rec = {k: v.value for k, v in checks["reconciliation"].metadata.items()}
    assert (rec["rows_read"], rec["rows_committed"], rec["rows_rejected"]) == (2, 2, 0)


def test_progress_is_logged_per_file(project):
    project.write_spec(base_spec(source={"type": "csv", "files": [{"path": "data/*.csv"}]}))
    project.write_data("a.csv", "id,name\n1,Ann\n")
    project.write_data("b.csv", "id,name\n2,Bob\n3,Cy\n")
    instance = dg.DagsterInstance.ephemeral()
    result = project.materialize(instance=instance)
    assert result.success
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    a, b = project.data_dir / "a.csv", project.data_dir / "b.csv"
    assert f"people: file 1 of 2: {a}" in messages
    assert f"people: file 2 of 2: {b}" in messages
    assert any(m.startswith("people: read 3 rows from 2 file(s) in ") and m.endswith("rows/s)") for m in messages)


PROGRESS_LINE = re.compile(r"people: ([\d,]+) rows read, ([\d,]+) rows/s, reading (.+)")


def test_progress_is_logged_at_the_documented_interval_while_files_are_read(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/logging.md promises a progress line every ``PROGRESS_SECONDS`` (10 s) while a run reads. The interval is
    shortened here (0.5 s) and the reader slowed to about 4 s, so the run must log about eight such lines, spaced
    by the interval, each counting more rows than the one before."""
    documented = re.search(r"progress every (\d+) s", (REPO_ROOT / "docs" / "logging.md").read_text())
    assert documented and float(documented.group(1)) == pipeline.PROGRESS_SECONDS
    interval, chunks, pause = 0.5, 80, 0.05
    monkeypatch.setattr(pipeline, "PROGRESS_SECONDS", interval)
    read = CsvSource.read

    def slow_batches(self: CsvSource, *args: Any) -> Iterator[pa.RecordBatch]:
        for batch in read(self, *args):
            step = max(1, -(-batch.num_rows // chunks))
            for start in range(0, batch.num_rows, step):
                time.sleep(pause)
                yield batch.slice(start, step)

    monkeypatch.setattr(CsvSource, "read", slow_batches)
    project.write_spec(base_spec())
    path = project.write_data("people.csv", "id,name\n" + "".join(f"{i},n{i}\n" for i in range(4_000)))
    instance = dg.DagsterInstance.ephemeral()
    result = project.materialize(instance=instance)
    assert result.success

    logs = instance.all_logs(result.run_id)
    [began] = [e.timestamp for e in logs if e.user_message == f"people: file 1 of 1: {path}"]
    [ended] = [e.timestamp for e in logs if e.user_message.startswith("people: read 4,000 rows from 1 file(s)")]
    progress = [(e.timestamp, m) for e in logs if (m := PROGRESS_LINE.fullmatch(e.user_message))]
    # one line per interval of reading (about chunks * pause seconds), none more
    reading = ended - began
    assert reading / interval - 2 <= len(progress) <= reading / interval + 1, (reading, [m[0] for _, m in progress])
    counts = [int(m.group(1).replace(",", "")) for _, m in progress]
    assert counts == sorted(set(counts)) and counts[0] > 0 and counts[-1] <= 4_000, counts
    assert {m.group(3) for _, m in progress} == {str(path)}
    gaps = [b - a for (a, _), (b, _) in zip(progress, progress[1:])]
    assert all(interval * 0.9 <= gap <= interval + 1.5 for gap in gaps), gaps


def _meta(evaluation: dg.AssetCheckEvaluation) -> dict:
    return {k: v.value for k, v in evaluation.metadata.items()}


def test_reconciliation_fails_when_the_commit_adds_fewer_rows_than_the_run_wrote(project, monkeypatch):
    # two partitions, so two data files; the fault loses one of them at the commit boundary
    project.write_spec(base_spec(target={"partitioning": ["name"]}))
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n3,Bob\n")
    real = commit_module._data_files

    def lose_one(*args, **kwargs):
        return real(*args, **kwargs)[1:]

    monkeypatch.setattr(commit_module, "_data_files", lose_one)
    instance = dg.DagsterInstance.ephemeral()
    result = project.materialize(instance=instance)

    assert result.success  # the check is not blocking: the run ends, the check tells
    table = project.table("testdomain.people")
    committed = len(branch_rows(table, "acme"))
    assert committed in (1, 2)
    check = _checks(result)["reconciliation"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    meta = _meta(check)
    assert (meta["rows_read"], meta["rows_written"], meta["rows_rejected"]) == (3, 3, 0)
    assert meta["records_added_by_commit"] == committed
    assert meta["table_rows_after"] == committed
    # what the instance records (and the UI shows) for the check is that failure
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("people"), "reconciliation")]
    )[dg.AssetCheckKey(dg.AssetKey("people"), "reconciliation")]
    assert record.run_id == result.run_id
    assert record.evaluation is not None and record.evaluation.passed is False


def test_reconciliation_counts_what_the_commit_did_to_the_branch(project):
    spec = base_spec(source={"type": "csv", "files": [{"path": "data/people/*.csv"}],
                             "incremental": {"strategy": "file_modified_time"}})
    project.write_spec(spec)
    a = project.write_data("people/a.csv", "id,name\n1,Ann\n2,Bob\n")
    project.write_data("people/b.csv", "id,name\n3,Cy\n")
    first = _meta(_checks(project.materialize())["reconciliation"])
    assert (first["records_added_by_commit"], first["records_removed_by_commit"]) == (3, 0)
    assert (first["table_rows_before"], first["table_rows_after"]) == (0, 3)

    project.write_data("people/a.csv", "id,name\n1,Ann\n")  # a changed file replaces its two rows by one
    os.utime(a, (a.stat().st_mtime + 5, a.stat().st_mtime + 5))
    result = project.materialize()
    check = _checks(result)["reconciliation"]
    second = _meta(check)

    assert check.passed
    assert (second["rows_read"], second["rows_written"], second["records_added_by_commit"]) == (1, 1, 1)
    assert (second["records_removed_by_commit"], second["table_rows_before"], second["table_rows_after"]) == (2, 3, 2)
    assert len(branch_rows(project.table("testdomain.people"), "acme")) == 2


def test_reconciliation_of_an_overwrite_counts_the_whole_table(project):
    project.write_spec(base_spec(target={"partitioning": ["ingest_date"], "write_mode": "overwrite"}))
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n3,Cy\n")
    assert _checks(project.materialize())["reconciliation"].passed
    project.write_data("people.csv", "id,name\n4,Di\n")

    check = _checks(project.materialize())["reconciliation"]

    meta = _meta(check)
    assert check.passed
    assert (meta["records_added_by_commit"], meta["records_removed_by_commit"]) == (1, 3)
    assert (meta["table_rows_before"], meta["table_rows_after"]) == (3, 1)


def _latest_evaluations(instance: dg.DagsterInstance) -> dict[str, Any]:
    keys = [dg.AssetCheckKey(dg.AssetKey("people"), name) for name in ("validation", "schema_drift", "reconciliation")]
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    return {key.name: records[key] for key in keys}


def test_a_run_that_finds_nothing_new_leaves_the_checks_as_the_last_run_that_read_data(project):
    """CONTRACT 5: after a warn run that quarantined rows, a run with nothing new must not turn the WARN green (nor
    leave the checks 'skipped'): what the instance records as each check's latest evaluation is the data run's."""
    project.write_spec(base_spec(
        schema_validation_mode="warn",
        source={"type": "csv", "files": [{"path": "data/people.csv"}], "incremental": {"strategy": "file_modified_time"}},
    ))
    project.write_data("people.csv", "id,name,extra\n1,Ann,x\nabc,Bob,y\n3,Cid,z\n")
    instance = dg.DagsterInstance.ephemeral()
    first = project.materialize(instance=instance)
    assert first.success
    before = _latest_evaluations(instance)
    assert before["validation"].evaluation.passed is False
    assert before["schema_drift"].evaluation.passed is False  # 'extra' is not in the spec

    second = project.materialize(instance=instance)
    assert second.success
    assert second.output_for_node("people.people__commit", "result").nothing_new
    after = _latest_evaluations(instance)
    for name, record in after.items():
        evaluation = record.evaluation
        assert record.run_id == second.run_id, name
        assert isinstance(evaluation, dg.AssetCheckEvaluation), (name, record.status)
        original = before[name].evaluation
        assert (evaluation.passed, evaluation.severity) == (original.passed, original.severity), name
        assert evaluation.metadata["carried_from_run"].value == first.run_id, name
    assert after["validation"].evaluation.severity is dg.AssetCheckSeverity.WARN
    assert after["validation"].evaluation.metadata["rows_rejected"].value == 1
    assert len(branch_rows(project.table("testdomain.people__rejects"), "acme")) == 1

    # a third run with nothing new still names the run that read the data
    third = project.materialize(instance=instance)
    assert _latest_evaluations(instance)["validation"].evaluation.metadata["carried_from_run"].value == first.run_id
    assert third.success
