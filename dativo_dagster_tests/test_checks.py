"""Asset checks beyond validation (schema drift, reconciliation) and progress logging."""

from __future__ import annotations

import dagster as dg

from dativo_dagster_tests.conftest import base_spec


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
