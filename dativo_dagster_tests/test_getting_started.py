"""A newcomer's first hour: the README's two commands (`make run`, `make test`) install what they need and no
more, `make test` brings the system packages its tests drive, and the shipped dev instance (`dagster.yaml`)
gives a quiet console: no "dagster.yaml not used" warning at `make dev`, no BetaWarning in a run.

The Makefile tests run the real Makefile on a copy of the project with ``PIP_INSTALL`` replaced by ``echo``, so
what make decides to install is read from its output without touching a virtualenv."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dativo_dagster_tests.conftest import DEPLOYMENT_VARS, Project, base_spec, branch_rows
from dativo_dagster_tests.integration.browser import CHROMIUM

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
INSTALL_SCRIPT = ROOT / ".ci" / "install-system-packages"
# pip replaced by a line that names what would be installed
ECHO_PIP = "PIP_INSTALL=echo INSTALL"


def _clean_env(**extra: str) -> dict[str, str]:
    # PYTHONWARNINGS: this test process imported the package, which sets it (a user's shell does not have it)
    drop = (*DEPLOYMENT_VARS, "DAGSTER_HOME", "DATIVO_LOG_FORMAT", "MAKEFLAGS", "MAKELEVEL", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(project), *args],
        capture_output=True, text=True, timeout=600, env=_clean_env(), check=False,
    )


def _makefile_project(root: Path) -> Path:
    """The Makefile and pyproject.toml in a folder of their own, with an empty virtualenv folder."""
    root.mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "dagster.yaml"):
        shutil.copy2(ROOT / name, root / name)
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    return root


def _installs(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.removeprefix("INSTALL ").strip() for line in result.stdout.splitlines() if line.startswith("INSTALL")]


def test_make_run_installs_the_runtime_dependencies_only_and_make_test_adds_the_test_extras(tmp_path: Path) -> None:
    project = _makefile_project(tmp_path / "project")
    # `make run` on a fresh clone: the package and its runtime dependencies, no test extras
    assert _installs(_make(project, "venv-run", ECHO_PIP)) == ["-e ."]
    assert _installs(_make(project, "venv-run", ECHO_PIP)) == []
    # `make test` after `make run`: the test extras on top, once
    assert _installs(_make(project, "venv", ECHO_PIP)) == ["-e .[test]"]
    assert _installs(_make(project, "venv", ECHO_PIP)) == []
    assert _installs(_make(project, "venv-run", ECHO_PIP)) == []


def test_make_run_after_make_test_installs_nothing(tmp_path: Path) -> None:
    project = _makefile_project(tmp_path / "project")
    assert _installs(_make(project, "venv", ECHO_PIP)) == ["-e .[test]"]
    assert _installs(_make(project, "venv-run", ECHO_PIP)) == []
    # and the targets a user types: their dry runs show no install, only the command itself
    run = _make(project, "-n", "run", ECHO_PIP)
    assert _installs(run) == [] and "dativo-dagster materialize" in run.stdout, run.stdout
    # a change of the dependencies installs again
    os.utime(project / "pyproject.toml", (time.time() + 5, time.time() + 5))
    assert _installs(_make(project, "venv-run", ECHO_PIP)) == ["-e ."]


def test_make_test_installs_the_system_packages_before_the_tests(tmp_path: Path) -> None:
    project = _makefile_project(tmp_path / "project")
    assert _installs(_make(project, "venv", ECHO_PIP)) == ["-e .[test]"]
    commands = _make(project, "-n", "test", ECHO_PIP).stdout.splitlines()
    script = next(i for i, line in enumerate(commands) if ".ci/install-system-packages" in line)
    pytest_line = next(i for i, line in enumerate(commands) if "-m pytest" in line)
    assert script < pytest_line, commands
    # CI goes through the same script (directly and through `make test`)
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/install-system-packages" in ci and "make test" in ci
    assert not [line for line in ci.splitlines() if "apt-get" in line and not line.lstrip().startswith("#")]


def test_the_system_packages_script_installs_nothing_when_everything_is_there(tmp_path: Path) -> None:
    """Idempotent: on a machine that has the packages (this one, after `make test` ran it) it neither updates
    nor installs. An ``apt-get`` and a ``sudo`` that fail loudly come first on the PATH to prove it."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name in ("apt-get", "sudo"):
        (shims / name).write_text(f"#!/bin/sh\necho '{name} called:' \"$@\" >&2\nexit 97\n")
        (shims / name).chmod(0o755)
    result = subprocess.run(
        [str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=60, check=False,
        env=_clean_env(PATH=f"{shims}:{os.environ['PATH']}"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "called" not in result.stderr, result.stderr
    assert re.search(r"system packages: all present \(.*chromium.*postgresql.*\)", result.stdout), result.stdout
    # what the script checks is what the tests use: the browser test's Chromium
    assert f"test -x {CHROMIUM}" in INSTALL_SCRIPT.read_text()


def test_the_shipped_dev_instance_turns_the_community_dialog_off() -> None:
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    assert config["nux"] == {"enabled": False}
    assert config["telemetry"] == {"enabled": False}


def _demo_copy(root: Path) -> Path:
    """The demo (specs, data, Makefile, instance settings) in a folder of its own, on this test's virtualenv."""
    root.mkdir(parents=True)
    for folder in ("asset_specs", "data"):
        shutil.copytree(ROOT / folder, root / folder)
    for name in ("Makefile", "pyproject.toml", "dagster.yaml"):
        shutil.copy2(ROOT / name, root / name)
    (root / ".venv").symlink_to(VENV)
    return root


# make arguments that keep make from installing into this test's virtualenv: its markers count as done (named
# as the Makefile names them; make takes an absolute path for another file) and pip, if still asked, fails
NO_INSTALL = ("--assume-old=.venv/.installed-run", "--assume-old=.venv/.installed-test", "PIP_INSTALL=false")


def test_a_run_on_the_shipped_instance_prints_no_beta_warning(tmp_path: Path) -> None:
    """`dagster asset materialize` as a user types it (default executor, empty run config) on an instance made
    from the shipped dagster.yaml: no BetaWarning about its logging handler in any of the run's processes."""
    project = _demo_copy(tmp_path / "project")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy2(ROOT / "dagster.yaml", home / "dagster.yaml")
    result = subprocess.run(
        [str(VENV / "bin" / "dagster"), "asset", "materialize", "-m", "dativo_dagster.definitions",
         "--select", "csv_person"],
        capture_output=True, text=True, timeout=600, check=False, cwd=project,
        env=_clean_env(DAGSTER_HOME=str(home), DATIVO_ASSET_SPECS_DIR=str(project / "asset_specs")),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "RUN_SUCCESS" in result.stderr, result.stderr[-4000:]
    assert "BetaWarning" not in result.stderr, result.stderr
    assert "yaml-defined logging" not in result.stderr, result.stderr
    from pyiceberg.catalog.sql import SqlCatalog

    dativo = project / ".dativo"
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=str(dativo / "warehouse"))
    assert len(branch_rows(catalog.load_table("adventureworks.csv_person"), "demo_tenant")) == 10


def test_make_dev_starts_on_the_shipped_instance_without_warnings(tmp_path: Path) -> None:
    """`make dev` copies dagster.yaml into .dagster_home and serves the UI; Dagster does not warn that the
    project's dagster.yaml is not used."""
    from dativo_dagster_tests.integration.servers import free_ports

    project = _demo_copy(tmp_path / "project")
    port = free_ports(1)[0]
    log = tmp_path / "make-dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(project), "dev", f"DEV_PORT={port}", *NO_INSTALL],
            stdout=out, stderr=subprocess.STDOUT, env=_clean_env(), start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while "Serving dagster-webserver" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
    text = log.read_text(errors="replace")
    assert f"the asset graph: http://127.0.0.1:{port}/asset-groups" in text, text
    assert f"Serving dagster-webserver on http://127.0.0.1:{port}" in text, text
    assert "will not be used" not in text, text
    assert "BetaWarning" not in text, text
    assert (project / ".dagster_home" / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text()


def test_a_spec_with_target_branch_main_commits_where_plain_readers_look(project: Project) -> None:
    """README 'Rows on main': `target: {branch: main}` puts the rows on main, which `table.scan()` reads."""
    spec = base_spec("people", target={"partitioning": ["ingest_date"], "branch": "main"})
    project.write_spec(spec)
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    assert project.materialize().success
    table = project.table("testdomain.people")
    assert sorted(table.scan().to_arrow().column("name").to_pylist()) == ["Ann", "Bob"]
    assert table.snapshot_by_name("acme") is None  # nothing went to the tenant's branch
