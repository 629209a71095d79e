"""Asset checks beyond validation (schema drift, reconciliation) and progress logging."""

from __future__ import annotations

import os

import dagster as dg

from dativo_dagster import commit as commit_module
from dativo_dagster_tests.conftest import base_spec, branch_rows


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
