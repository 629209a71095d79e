"""A fresh ``dg`` project uses the Component the way docs/component.md tells a user to, step by step, with
Dagster's own command lines: ``create-dagster project``, ``dg list components``, ``dg scaffold defs``,
``dg check yaml``, ``dg check defs``, ``dg list defs``, ``dg launch``; then the rows are read back with pyiceberg.

No server is needed; it is an integration test because every ``dg`` command starts Python and Dagster anew
(minutes in all). The project is installed into this test's virtualenv (``pip install --no-deps -e``, which
fetches only its build backend from the package index) and uninstalled at the end: that virtualenv already
holds ``dativo-dagster[dg]``, which is what the docs install into a project's environment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster_tests.conftest import DEPLOYMENT_VARS, branch_rows

BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DgProject:
    """A dg project folder and the environment its commands run in (this virtualenv, DAGSTER_HOME in tmp)."""

    def __init__(self, root: Path, dagster_home: Path):
        self.root = root
        self.name = root.name
        drop = (*DEPLOYMENT_VARS, "DAGSTER_HOME", "VIRTUAL_ENV", "PYTHONWARNINGS")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            DAGSTER_HOME=str(dagster_home),
            DAGSTER_DG_UPDATE_CHECK_ENABLED="0",  # no look-up of newer dg releases
            NO_COLOR="1",
        )

    @property
    def defs(self) -> Path:
        return self.root / "src" / self.name / "defs"

    def run(self, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args), cwd=cwd or self.root, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        result.stdout, result.stderr = ANSI.sub("", result.stdout), ANSI.sub("", result.stderr)
        return result

    def ok(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, cwd=cwd)
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result


@pytest.fixture
def dg_project(tmp_path: Path) -> Iterator[DgProject]:
    """docs/component.md, steps 1-2: a new project from ``create-dagster``, installed in the environment."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    name = f"dg_ingest_{uuid.uuid4().hex[:8]}"  # the project is installed in a shared virtualenv for a while
    project = DgProject(tmp_path / name, home)
    project.ok(str(BIN / "create-dagster"), "project", "--no-uv-sync", name, cwd=tmp_path)
    assert (project.root / "pyproject.toml").is_file() and project.defs.is_dir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    project.ok(*pip, "install", "--no-deps", "-e", str(project.root))
    try:
        yield project
    finally:
        project.ok(*pip, "uninstall", "-y", name)


def test_a_fresh_dg_project_scaffolds_checks_lists_and_launches_the_component(dg_project: DgProject) -> None:
    # step 3: dg sees the Component type through the package's entry point
    listed = json.loads(dg_project.ok("dg", "list", "components", "--json").stdout)
    assert "dativo_dagster.IngestionComponent" in {item["key"] for item in listed["items"]}

    # step 4: scaffold a defs.yaml, an example spec and its CSV under defs/ingest
    dg_project.ok("dg", "scaffold", "defs", "dativo_dagster.IngestionComponent", "ingest")
    folder = dg_project.defs / "ingest"
    assert yaml.safe_load((folder / "defs.yaml").read_text()) == {
        "type": "dativo_dagster.IngestionComponent",
        "attributes": {"specs_dir": "asset_specs"},
    }
    spec_path = folder / "asset_specs" / "example_people.yaml"
    assert spec_path.is_file() and (folder / "data" / "example_people.csv").is_file()

    # step 5: both checks pass
    assert "All component YAML validated successfully." in dg_project.ok("dg", "check", "yaml").stdout
    assert "All definitions loaded successfully." in dg_project.ok("dg", "check", "defs").stdout

    # step 6: the asset, its checks and jobs are listed, each traced back to the defs.yaml
    listed_defs = json.loads(dg_project.ok("dg", "list", "defs", "--json").stdout)
    assert [a["asset_key"] for a in listed_defs["assets"]] == ["example_people"]
    assert {c["name"] for c in listed_defs["asset_checks"]} >= {"reconciliation"}
    assert "example_people__job" in {j["name"] for j in listed_defs["jobs"]}
    source = f"src/{dg_project.name}/defs/ingest/defs.yaml"
    assert all(j["source"].startswith(source) for j in listed_defs["jobs"])

    # a misspelt attribute fails dg check yaml at its line
    good_defs_yaml = (folder / "defs.yaml").read_text()
    (folder / "defs.yaml").write_text(good_defs_yaml.replace("specs_dir", "spec_dir"))
    bad_yaml = dg_project.run("dg", "check", "yaml")
    assert bad_yaml.returncode == 1
    assert f"{folder / 'defs.yaml'}:4 - dativo_dagster.IngestionComponent attributes.spec_dir" in bad_yaml.stdout
    assert "'specs_dir' is a required property" in bad_yaml.stdout
    (folder / "defs.yaml").write_text(good_defs_yaml)

    # a broken spec fails dg check defs with the message of dativo-dagster validate: file and key path
    good_spec = spec_path.read_text()
    spec_path.write_text(good_spec.replace("type: date}", "type: dat}"))
    validate = dg_project.run(str(BIN / "dativo-dagster"), "validate", "--specs", str(folder / "asset_specs"))
    assert validate.returncode == 2
    problem = validate.stderr.splitlines()[0]
    assert problem.startswith("asset_specs/example_people.yaml: schema[2].type: unknown type 'dat'; expected one of")
    broken = dg_project.run("dg", "check", "defs")
    assert broken.returncode == 1
    assert problem in [line.strip() for line in (broken.stdout + broken.stderr).splitlines()]
    spec_path.write_text(good_spec)

    # step 7: launch the asset; the rows land in the embedded default under the project root
    dg_project.ok("dg", "launch", "--assets", "example_people")
    dativo = dg_project.root / ".dativo"
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=(dativo / "warehouse").as_uri())
    table = catalog.load_table("example.example_people")
    rows = sorted(branch_rows(table, "example_tenant"), key=lambda row: row["id"])
    assert [(r["id"], r["name"], None if r["joined_on"] is None else r["joined_on"].isoformat()) for r in rows] == [
        (1, "Ada", "2024-01-02"),
        (2, "Grace", "2024-02-03"),
        (3, "Linus", None),
    ]
    assert {r["_source_file"] for r in rows} == {str((folder / "data" / "example_people.csv").resolve())}
    # the run is recorded in DAGSTER_HOME, and it is the run that wrote the rows
    with dg.DagsterInstance.from_config(dg_project.env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
    assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS]
    assert {r["_run_id"] for r in rows} == {runs[0].run_id}
