"""`dativo-dagster materialize` exit codes and summary lines, and `dagster asset materialize` (in process by default,
multiprocess on request)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from dativo_dagster.executors import FORKSERVER_CONFIG
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

VENV_BIN = Path(sys.executable).parent
DATIVO_DAGSTER = VENV_BIN / "dativo-dagster"
DAGSTER = VENV_BIN / "dagster"
DEPLOYMENT_VARS = ("DATIVO_ASSET_SPECS_DIR", "DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI", "DATIVO_CATALOG_CREDENTIAL",
                   "DATIVO_S3_ENDPOINT", "DATIVO_STAGING_DIR", "DAGSTER_HOME")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DEPLOYMENT_VARS}
    env.update(extra)
    return env


def make_project(root: Path, *names: str) -> Project:
    """A project with one spec per name: ``good`` (valid rows), ``warned`` (warn mode, one reject),
    ``strict`` (strict mode, two rejects), ``missing`` (its file does not exist)."""
    project = Project(root)
    for name in names:
        mode = "warn" if name == "warned" else "strict"
        project.write_spec(base_spec(name, schema_validation_mode=mode))
    contents = {"good": "id,name\n1,Ann\n2,Bob\n", "warned": "id,name\n1,Ann\nx,Bob\n", "strict": "id,name\n1,A\nx,B\ny,C\n"}
    for name in names:
        if name in contents:
            project.write_data(f"{name}.csv", contents[name])
    return project


def start(specs: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(DATIVO_DAGSTER), "materialize", "--specs", str(specs), "--log-level", "ERROR", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd="/",  # relative source paths must not depend on the working directory
    )


def test_exit_codes_and_summary_lines(tmp_path: Path) -> None:
    good = make_project(tmp_path / "good", "good", "warned")
    warned = make_project(tmp_path / "warned", "good", "warned")
    strict = make_project(tmp_path / "strict", "good", "strict")
    bad = make_project(tmp_path / "bad", "good")
    bad.write_spec({**base_spec("broken"), "schema": [{"name": "id", "type": "integr"}], "colour": "red"})
    # independent projects, so the runs can go in parallel
    runs = {
        "good": start(good.specs_dir, "--select", "good"),
        "warned": start(warned.specs_dir),
        "strict": start(strict.specs_dir, "--select", "strict"),
        "bad": start(bad.specs_dir),
    }
    out = {name: proc.communicate(timeout=120) for name, proc in runs.items()}
    codes = {name: proc.returncode for name, proc in runs.items()}
    assert codes == {"good": 0, "warned": 1, "strict": 2, "bad": 2}, out

    # 0: all rows valid and committed; --select ran only the selected asset
    stdout = out["good"][0]
    head = good.table("testdomain.good").snapshot_by_name("acme")
    assert stdout.splitlines() == [
        f"good: ok rows_read=2 committed=2 rejected=0 files=1 snapshot={head.snapshot_id} table=testdomain.good"
        " branch=acme"
    ], out["good"]
    assert not good.catalog().table_exists("testdomain.warned")

    # 1: warn mode committed with rejects (and a clean asset beside it does not lower the code)
    lines = sorted(out["warned"][0].splitlines())
    assert len(lines) == 2, out["warned"]
    assert lines[0].startswith("good: ok rows_read=2 committed=2 rejected=0 ")
    assert re.fullmatch(
        r"warned: WARN rows_read=2 committed=1 rejected=1 files=1 snapshot=\d+ table=testdomain\.warned branch=acme"
        r" rejects=testdomain\.warned__rejects",
        lines[1],
    ), lines[1]
    assert [r["id"] for r in branch_rows(warned.table("testdomain.warned__rejects"), "acme")] == ["x"]

    # 2: strict rejection; nothing committed
    assert out["strict"][0].splitlines() == [
        "strict: FAILED at validate rows_read=3 rows_rejected=2: strict validation failed; nothing was committed."
    ], out["strict"]
    assert "id: invalid_integer x2" in out["strict"][1]
    assert f"{strict.data_dir / 'strict.csv'}, line 3: 'x'" in out["strict"][1]
    assert not strict.catalog().table_exists("testdomain.good")

    # 2: a bad spec stops everything before any run, naming file, key and problem
    assert out["bad"][0] == ""
    assert "asset_specs/broken.yaml: schema[0].type: unknown type 'integr'" in out["bad"][1]
    assert "asset_specs/broken.yaml: colour: unknown key" in out["bad"][1]
    assert not (bad.root / ".dativo").exists()


def test_nothing_readable_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same code path as the console script, in process (a subprocess costs seconds of imports)."""
    from dativo_dagster.cli import main

    project = make_project(tmp_path / "p", "missing", "good")
    assert main(["materialize", "--specs", str(project.specs_dir), "--log-level", "ERROR"]) == 2
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines[0].startswith("good: ok rows_read=2 committed=2 ")
    assert lines[1] == f"missing: FAILED at extract: {project.data_dir / 'missing.csv'}: source file not found"


def test_a_zero_byte_file_is_nothing_readable_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CONTRACT 3: zero bytes where a header is expected fails the run naming the file; the table stays as it was."""
    from dativo_dagster.cli import main

    project = make_project(tmp_path / "p", "good")
    project.write_spec(base_spec("good", source={"type": "csv", "files": [{"path": "data/*.csv"}]}))
    assert main(["materialize", "--specs", str(project.specs_dir), "--log-level", "ERROR"]) == 0
    head = project.table("testdomain.good").snapshot_by_name("acme").snapshot_id
    capsys.readouterr()
    project.write_data("empty.csv", "")
    project.write_data("more.csv", "id,name\n3,Cy\n")
    assert main(["materialize", "--specs", str(project.specs_dir), "--log-level", "ERROR"]) == 2
    out = capsys.readouterr().out
    assert f"good: FAILED at extract: {project.data_dir / 'empty.csv'}: nothing readable" in out, out
    table = project.table("testdomain.good")
    assert table.snapshot_by_name("acme").snapshot_id == head
    assert sorted(row["id"] for row in branch_rows(table, "acme")) == [1, 2]


SECRET_SSN = "987-65-4320"
SECRET_BIRTH = "1984-13-01"


def pii_project(root: Path, mode: str) -> Project:
    """One spec whose PII fields (classification in two spellings) get values that are rejected."""
    project = Project(root)
    schema = [
        {"name": "id", "type": "integer", "required": True},
        {"name": "ssn", "type": "integer", "classification": "PII"},
        {"name": "born", "type": "date", "classification": "pii"},
        {"name": "name", "type": "string"},
    ]
    project.write_spec(base_spec("people", schema=schema, schema_validation_mode=mode))
    project.write_data("people.csv", f"id,ssn,born,name\n1,{SECRET_SSN},1980-01-01,Ann\n2,7,{SECRET_BIRTH},Bob\n"
                                     "x3,8,1990-02-02,Cy\n4,9,1970-03-03,Dee,{SECRET_SSN}\n")
    return project


def test_pii_values_never_reach_the_command_line_output_or_logs(tmp_path: Path) -> None:
    """CONTRACT 3 / classification: a PII field's rejected value shows its kind, file and line, never the value."""
    projects = {mode: pii_project(tmp_path / mode, mode) for mode in ("strict", "warn")}
    runs = {mode: start(p.specs_dir, "--log-level", "DEBUG") for mode, p in projects.items()}
    out = {mode: proc.communicate(timeout=120) for mode, proc in runs.items()}
    assert {mode: proc.returncode for mode, proc in runs.items()} == {"strict": 2, "warn": 1}, out
    where = projects["strict"].data_dir / "people.csv"
    strict = out["strict"][0] + out["strict"][1]
    assert f"ssn: invalid_integer x1 (e.g. {where}, line 2: PII value withheld, 11 characters)" in strict, strict
    assert f"born: invalid_date x1 (e.g. {where}, line 3: PII value withheld, 10 characters)" in strict, strict
    assert f"(record): unparseable_record x1 (e.g. {where}, line 5: PII value withheld," in strict, strict
    assert f"id: invalid_integer x1 (e.g. {where}, line 4: 'x3')" in strict, strict  # not PII: shown
    for mode in ("strict", "warn"):
        both = out[mode][0] + out[mode][1]
        assert "DEBUG" in both or "INFO" in both, both  # the logs were there to be searched
        assert SECRET_SSN not in both and SECRET_BIRTH not in both, both
    # the quarantine keeps the records as written
    rejects = branch_rows(projects["warn"].table("testdomain.people__rejects"), "acme")
    assert sorted((r["_source_line"], r["ssn"], r["born"]) for r in rejects) == [
        (2, SECRET_SSN, "1980-01-01"), (3, "7", SECRET_BIRTH), (4, "8", "1990-02-02"), (5, None, None)
    ]


def test_pii_values_never_reach_the_check_metadata_or_the_failure(tmp_path: Path) -> None:
    for mode in ("warn", "strict"):
        project = pii_project(tmp_path / mode, mode)
        result = project.materialize()
        assert result.success is (mode == "warn")
        [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "validation"]
        shown = repr({k: v.value for k, v in check.metadata.items()})
        for failure in result.get_step_failure_events():
            data = failure.event_specific_data
            user = data.user_failure_data if data is not None else None
            shown += repr(failure.message) + (repr(user.description) + repr(user.metadata) if user else "")
            shown += repr(data.error.message if data is not None and data.error is not None else "")
        assert check.metadata["ssn:invalid_integer"].value == 1 and check.metadata["born:invalid_date"].value == 1
        assert "line 2: `PII value withheld, 11 characters`" in check.metadata["first_errors"].value
        assert "line 4: `'x3'`" in check.metadata["first_errors"].value
        assert SECRET_SSN not in shown and SECRET_BIRTH not in shown, shown


def test_unknown_selection_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dativo_dagster.cli import main

    project = make_project(tmp_path / "p", "good")
    assert main(["materialize", "--specs", str(project.specs_dir), "--select", "nope"]) == 2
    assert "unknown asset(s): nope; known: good" in capsys.readouterr().err
    empty = tmp_path / "empty" / "asset_specs"
    empty.mkdir(parents=True)
    assert main(["materialize", "--specs", str(empty)]) == 2


def test_dagster_asset_materialize_with_the_multiprocess_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code location runs one asset in process by default; run config still picks the multiprocess executor
    (here with the forkserver start method that the group jobs use), and the steps pass their records on."""
    project = make_project(tmp_path / "p", "good")
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = json.dumps({"execution": {"config": FORKSERVER_CONFIG}})
    proc = subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "*",
         "--config-json", config],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(home)),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multiprocess executor" in proc.stderr
    rows = branch_rows(project.table("testdomain.good"), "acme")
    assert sorted(r["id"] for r in rows) == [1, 2]

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    try:
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert {r["_run_id"] for r in rows} == {run.run_id}
        [record] = instance.fetch_materializations(dg.AssetKey("good"), limit=10).records
        assert record.asset_materialization.metadata["rows_committed"].value == 2
    finally:
        instance.dispose()


def test_dagster_asset_materialize_exits_non_zero_exactly_when_the_run_fails(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """CONTRACT 3: Dagster's own command fails a CI job exactly when the run fails: a strict rejection exits
    non-zero (with the code location's default executor, as a CI job runs it), a warn-mode run that quarantined rows
    succeeded and exits 0 (``dativo-dagster`` would say 1; run in process, the executor is not what it tests)."""
    projects = {"strict": make_project(tmp_path / "strict", "strict"),
                "warned": make_project(tmp_path / "warned", "warned")}
    extra = {"strict": [], "warned": ["--config-json", '{"execution": {"config": {"in_process": {}}}}']}
    homes = {name: tmp_path / name / "dagster_home" for name in projects}
    runs = {}
    for name, project in projects.items():
        homes[name].mkdir()
        runs[name] = subprocess.Popen(
            [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", name, *extra[name]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(homes[name])),
            cwd=tmp_path,
        )
    out = {name: proc.communicate(timeout=300) for name, proc in runs.items()}
    assert runs["strict"].returncode != 0, out["strict"][1][-3000:]
    assert runs["warned"].returncode == 0, out["warned"][1][-3000:]

    statuses = {}
    for name in projects:
        monkeypatch.setenv("DAGSTER_HOME", str(homes[name]))
        instance = dg.DagsterInstance.get()
        try:
            [run] = instance.get_runs()
            statuses[name] = run.status
        finally:
            instance.dispose()
    assert statuses == {"strict": dg.DagsterRunStatus.FAILURE, "warned": dg.DagsterRunStatus.SUCCESS}
    # the failed run committed nothing (strict mode fails before the table is made); the successful one committed
    # its valid row and quarantined the other
    assert 'Execution of step "strict.strict__validate" failed' in out["strict"][1]
    assert "strict validation failed" in out["strict"][1]
    assert not projects["strict"].catalog().table_exists("testdomain.strict")
    assert [r["id"] for r in branch_rows(projects["warned"].table("testdomain.warned"), "acme")] == [1]
    assert [r["id"] for r in branch_rows(projects["warned"].table("testdomain.warned__rejects"), "acme")] == ["x"]
