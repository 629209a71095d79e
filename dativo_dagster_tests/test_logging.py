"""Structured logs: ``DATIVO_LOG_FORMAT=json`` makes runs log one JSON object per line; the default is Dagster's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from dativo_dagster.cli import main
from dativo_dagster.definitions import build_definitions
from dativo_dagster.logging import LOG_FORMAT_VAR, json_lines_logger, logging_run_config
from dativo_dagster_tests.conftest import DEPLOYMENT_VARS, Project, base_spec, branch_rows

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parent.parent
LINE_KEYS = {"timestamp", "level", "run_id", "job", "asset", "step", "op", "event", "message"}
# Dagster's default console format: "2026-01-01 10:00:00 +0000 - dagster - INFO - ..."
DAGSTER_TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - dagster - [A-Z]+ - ")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*DEPLOYMENT_VARS, "DAGSTER_HOME", LOG_FORMAT_VAR)}
    env.update(extra)
    return env


def _project(root: Path, *names: str) -> Project:
    """``good``: two valid rows; ``warned``: warn mode, one of two rows rejected; ``strict``: two of three."""
    project = Project(root)
    contents = {
        "good": "id,name\n1,Ann\n2,Bob\n",
        "warned": "id,name\n1,Ann\nx,Bob\n",
        "strict": "id,name\n1,A\nx,B\ny,C\n",
    }
    for name in names:
        project.write_spec(base_spec(name, schema_validation_mode="warn" if name == "warned" else "strict"))
        project.write_data(f"{name}.csv", contents[name])
    return project


def _materialize(project: Project, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VENV_BIN / "dativo-dagster"), "materialize", "--specs", str(project.specs_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        cwd="/",
    )


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line as a JSON object (fails on the first line that is not one)."""
    lines = []
    for number, line in enumerate(stderr.splitlines(), 1):
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}\n{stderr}")
        assert isinstance(parsed, dict), line
        assert parsed.keys() >= LINE_KEYS, line
        lines.append(parsed)
    return lines


def _json_objects_in(mixed: str) -> list[dict[str, Any]]:
    """The JSON log lines in stderr that several processes (a run's orchestrator and its step processes) fill
    with Dagster's text lines too. A pipe write above 4 KiB is not atomic, so a short JSON line can land inside
    a long text line: objects are looked for anywhere, not only at line starts."""
    decoder = json.JSONDecoder()
    found = []
    start = mixed.find('{"')
    while start >= 0:
        try:
            parsed, end = decoder.raw_decode(mixed, start)
        except json.JSONDecodeError:
            start = mixed.find('{"', start + 1)
            continue
        if isinstance(parsed, dict) and parsed.keys() >= LINE_KEYS:
            found.append(parsed)
            start = mixed.find('{"', end)
        else:
            start = mixed.find('{"', start + 1)
    return found


def _one(lines: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [line for line in lines if all(line.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_json_logs_of_a_run_carry_asset_run_step_event_and_counts(tmp_path: Path) -> None:
    json_project = _project(tmp_path / "json", "good", "warned")
    text_project = _project(tmp_path / "text", "good")
    runs = {"json": _materialize(json_project, **{LOG_FORMAT_VAR: "json"}), "text": _materialize(text_project)}
    out = {name: proc.communicate(timeout=180) for name, proc in runs.items()}
    assert runs["json"].returncode == 1, out["json"]
    assert runs["text"].returncode == 0, out["text"]

    lines = _json_lines(out["json"][1])
    # one run: the id the rows carry in _run_id
    warned_rows = branch_rows(json_project.table("testdomain.warned"), "acme")
    assert {line["run_id"] for line in lines} == {warned_rows[0]["_run_id"]}
    assert {line["job"] for line in lines} == {"__ephemeral_asset_job__"}
    # the run's end is the one line about no asset and no step
    run_end = _one(lines, event="RUN_SUCCESS")
    assert (run_end["asset"], run_end["step"], run_end["level"]) == (None, None, "INFO")
    step_lines = [line for line in lines if line is not run_end]
    assert {line["asset"] for line in step_lines} == {"good", "warned"}
    for line in step_lines:
        assert line["step"].startswith(f"{line['asset']}.{line['asset']}__"), line
        assert line["op"] == line["step"].split(".", 1)[1], line
        assert line["level"] in ("INFO", "WARNING", "ERROR"), line

    # the materialization: counts, table, snapshot and branch, as committed
    head = json_project.table("testdomain.warned").snapshot_by_name("acme")
    materialized = _one(lines, asset="warned", event="ASSET_MATERIALIZATION")
    assert materialized["step"] == "warned.warned__commit"
    assert materialized["table"] == "testdomain.warned"
    assert materialized["snapshot_id"] == str(head.snapshot_id)
    assert materialized["branch"] == "acme"
    assert materialized["counts"]["rows_read"] == 2
    assert materialized["counts"]["rows_committed"] == 1
    assert materialized["counts"]["rows_rejected"] == 1
    assert materialized["counts"]["files_written"] == 1
    assert materialized["counts"]["dagster/row_count"] == len(warned_rows) == 1
    assert materialized["counts"]["bytes_written"] > 0

    # check results, with their counts
    validation = _one(lines, asset="warned", event="ASSET_CHECK_EVALUATION", check="validation")
    assert (validation["passed"], validation["severity"]) == (False, "WARN")
    assert validation["counts"]["rows_rejected"] == 1
    assert validation["counts"]["id:invalid_integer"] == 1
    reconciliation = _one(lines, asset="good", event="ASSET_CHECK_EVALUATION", check="reconciliation")
    assert reconciliation["passed"] is True
    assert reconciliation["counts"] == {"rows_read": 2, "rows_written": 2, "rows_committed": 2, "rows_rejected": 0,
                                        "records_added_by_commit": 2, "records_removed_by_commit": 0,
                                        "table_rows_before": 0, "table_rows_after": 2}

    # every step's success with its duration; the progress messages of extract as plain log events
    for asset in ("good", "warned"):
        for op in ("extract", "validate", "write", "commit"):
            success = _one(lines, event="STEP_SUCCESS", step=f"{asset}.{asset}__{op}")
            assert success["duration_ms"] >= 0
        progress = [line for line in lines if line["asset"] == asset and line["event"] == "LOG"]
        assert any(re.search(rf"{asset}: file 1 of 1: .*{asset}\.csv$", line["message"]) for line in progress), progress

    # the default stays Dagster's own format
    text_lines = out["text"][1].splitlines()
    assert text_lines and all(DAGSTER_TEXT_LINE.match(line) for line in text_lines), out["text"][1]


def test_a_failed_step_logs_its_error_and_counts(tmp_path: Path) -> None:
    project = _project(tmp_path, "strict")
    proc = _materialize(project, **{LOG_FORMAT_VAR: "json"})
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, (stdout, stderr)
    # the run's lines come first; the command's own failure detail ("strict: ...") follows them
    run_lines = _json_lines("\n".join(line for line in stderr.splitlines() if line.startswith("{")))
    failure = _one(run_lines, event="STEP_FAILURE")
    assert failure["level"] == "ERROR"
    assert (failure["asset"], failure["step"]) == ("strict", "strict.strict__validate")
    assert failure["error"].startswith("strict: strict validation failed; nothing was committed.")
    assert failure["counts"] == {"rows_read": 3, "rows_rejected": 2}
    check = _one(run_lines, event="ASSET_CHECK_EVALUATION", check="validation")
    assert (check["passed"], check["severity"]) == (False, "ERROR")


def test_the_code_location_logs_json_in_runs_that_name_its_console_logger(tmp_path: Path) -> None:
    """``dagster asset materialize`` against the code location, as a deployment would run it."""
    project = _project(tmp_path / "project", "good")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_config = {"loggers": {"console": {}}, "execution": {"config": {"in_process": {}}}}
    proc = subprocess.run(
        [str(VENV_BIN / "dagster"), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "good",
         "--config-json", json.dumps(run_config)],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(home), **{LOG_FORMAT_VAR: "json"}),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # Dagster's command line prints its own warnings too: the run's log lines are the JSON ones
    assert not [line for line in proc.stderr.splitlines() if DAGSTER_TEXT_LINE.match(line)], proc.stderr
    lines = _json_lines("\n".join(line for line in proc.stderr.splitlines() if line.startswith("{")))
    assert {line["job"] for line in lines} == {"__ASSET_JOB"}
    assert {"STEP_SUCCESS", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION"} <= {line["event"] for line in lines}
    assert _one(lines, event="ASSET_MATERIALIZATION")["counts"]["rows_committed"] == 2


def _dagster_materialize(project: Project, home: Path, run_config: dict[str, Any] | None) -> subprocess.Popen[str]:
    """``dagster asset materialize`` of the asset ``good`` against the code location, in its own process."""
    args = [str(VENV_BIN / "dagster"), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "good"]
    if run_config is not None:
        args += ["--config-json", json.dumps(run_config)]
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(home), **{LOG_FORMAT_VAR: "json"}),
    )


def test_runs_with_an_empty_run_config_log_json_through_the_instance_s_handler(tmp_path: Path) -> None:
    """The UI's Materialize button launches the implicit asset job with an empty run config: Dagster then uses
    its default console logger, never the code location's. The ``python_logs`` handler of the project's
    dagster.yaml writes the JSON lines of such runs; a run that names the JSON logger gets each line once."""
    instance_config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    runs = {}
    for name, run_config in (
        ("ui", None),  # as the UI does: no run config at all
        ("named", {"loggers": {"console": {}}, "execution": {"config": {"in_process": {}}}}),
    ):
        home = tmp_path / name / "dagster_home"
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text(yaml.safe_dump({"python_logs": instance_config["python_logs"]}))
        runs[name] = _dagster_materialize(_project(tmp_path / name / "project", "good"), home, run_config)
    out = {name: proc.communicate(timeout=300) for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, out[name]

    # Dagster's default console logger still writes its text lines in a run without logger config
    ui_lines = _json_objects_in(out["ui"][1])
    # pytest shows this only when an assertion below fails: the raw stderr the run's step processes shared
    # (the parsed lines alone could not tell whether a line was lost or mangled when this test failed once)
    print(out["ui"][1])
    assert {line["job"] for line in ui_lines} == {"__ASSET_JOB"}
    [run_id] = {line["run_id"] for line in ui_lines}
    assert re.fullmatch(r"[0-9a-f-]{36}", run_id)
    materialized = _one(ui_lines, event="ASSET_MATERIALIZATION", asset="good")
    assert materialized["step"] == "good.good__commit"
    assert materialized["counts"]["rows_committed"] == 2
    assert _one(ui_lines, event="ASSET_CHECK_EVALUATION", check="validation")["passed"] is True
    for op in ("extract", "validate", "write", "commit"):
        assert _one(ui_lines, event="STEP_SUCCESS", step=f"good.good__{op}")["asset"] == "good"
    assert _one(ui_lines, event="RUN_SUCCESS")["level"] == "INFO"
    assert any(line["event"] == "LOG" and line["asset"] == "good" for line in ui_lines)

    # the run's own JSON logger and the instance's handler: every line once, and no text line
    named_stderr = out["named"][1]
    assert not [line for line in named_stderr.splitlines() if DAGSTER_TEXT_LINE.match(line)], named_stderr
    named_lines = _json_lines("\n".join(line for line in named_stderr.splitlines() if line.startswith("{")))
    assert _one(named_lines, event="ASSET_MATERIALIZATION")["counts"]["rows_committed"] == 2
    assert _one(named_lines, event="RUN_SUCCESS")["job"] == "__ASSET_JOB"
    keys = [(line["event"], line["step"], line["message"]) for line in named_lines]
    assert len(keys) == len(set(keys))


@pytest.mark.filterwarnings("ignore:Handling yaml-defined logging configuration")
def test_the_instance_handler_writes_nothing_unless_the_format_is_json(
    project: Project, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    project.write_spec(base_spec("good"))
    project.write_data("good.csv", "id,name\n1,Ann\n")
    handlers = {"handlers": {"dativo_json": {"class": "dativo_dagster.logging.JsonLinesHandler"}}}
    job = build_definitions(project.specs_dir).resolve_implicit_global_asset_job_def()
    for value in ("", "text", "json"):
        monkeypatch.setenv(LOG_FORMAT_VAR, value)
        capfd.readouterr()
        with dg.instance_for_test(overrides={"python_logs": {"dagster_handler_config": handlers}}) as instance:
            result = job.execute_in_process(instance=instance)
        assert result.success
        stderr = capfd.readouterr().err
        json_lines = [line for line in stderr.splitlines() if line.startswith("{")]
        if value == "json":
            assert {json.loads(line)["run_id"] for line in json_lines} == {result.run_id}
        else:
            assert json_lines == [], value


def test_the_setting_replaces_the_console_logger(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_spec(base_spec("good"))
    assert build_definitions(project.specs_dir).loggers == {}
    assert logging_run_config() == {}
    monkeypatch.setenv(LOG_FORMAT_VAR, "JSON")
    assert build_definitions(project.specs_dir).loggers == {"console": json_lines_logger}
    assert logging_run_config() == {"loggers": {"console": {}}}
    monkeypatch.setenv(LOG_FORMAT_VAR, "text")
    assert build_definitions(project.specs_dir).loggers == {}


def test_an_unknown_log_format_is_refused(
    project: Project, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    project.write_spec(base_spec("good"))
    project.write_data("good.csv", "id,name\n1,Ann\n")
    monkeypatch.setenv(LOG_FORMAT_VAR, "xml")
    with pytest.raises(ValueError, match="DATIVO_LOG_FORMAT='xml' is not a log format; expected one of text, json"):
        build_definitions(project.specs_dir)
    assert main(["materialize", "--specs", str(project.specs_dir)]) == 2
    assert "DATIVO_LOG_FORMAT='xml' is not a log format" in caplog.text
