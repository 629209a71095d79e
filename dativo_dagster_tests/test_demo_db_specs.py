"""The database demo's specs (asset_specs_db/, run by `make run-db`) stay out of `make run` and `make dev`, and a
database spec whose URL variable is unset breaks neither the loading of a code location nor its other assets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dativo_dagster.spec import SCHEMA_FILE_NAME, DatabaseSourceSpec, load_specs, spec_json_schema
from dativo_dagster_tests.test_cli_materialize import clean_env

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
URL_ENV = "ADVENTUREWORKS_DB_URL"


def test_database_specs_are_shipped_apart_from_the_server_free_demo() -> None:
    demo = load_specs(ROOT / "asset_specs_db")
    assert sorted(s.spec.name for s in demo) == [
        "pg_dim_currency", "pg_dim_product_category", "pg_dim_sales_reason", "pg_fact_sales_quota", "pg_person",
    ]
    assert all(isinstance(s.spec.source, DatabaseSourceSpec) and s.spec.source.connection.url_env == URL_ENV
               for s in demo)
    # `make run` and `make dev` load asset_specs/: no spec there needs a server
    assert not [s.path for s in load_specs(ROOT / "asset_specs") if isinstance(s.spec.source, DatabaseSourceSpec)]
    # the demo's tables never collide with `make run`'s in the shared catalog
    assert not {s.spec.table_identifier for s in demo} & {s.spec.table_identifier for s in load_specs(ROOT / "asset_specs")}


def test_an_unset_database_url_fails_only_that_asset(tmp_path: Path) -> None:
    """A code location with the demo's pg_person spec beside a CSV spec, ADVENTUREWORKS_DB_URL unset: definitions
    load, the CSV asset commits its rows, the database asset fails naming the variable (exit code 2)."""
    project = tmp_path / "project"
    specs = project / "asset_specs"
    (specs / "db").mkdir(parents=True)
    shutil.copy2(ROOT / "asset_specs" / "adventureworks" / "person.yaml", specs / "person.yaml")
    shutil.copy2(ROOT / "asset_specs_db" / "adventureworks" / "pg_person.yaml", specs / "db" / "pg_person.yaml")
    shutil.copytree(ROOT / "data", project / "data")
    env = {k: v for k, v in clean_env().items() if k != URL_ENV}

    validate = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-m", "dativo_dagster.definitions"],
        capture_output=True, text=True, timeout=300, env={**env, "DATIVO_ASSET_SPECS_DIR": str(specs)}, check=False,
        cwd=tmp_path,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr

    run = subprocess.run(
        [str(VENV_BIN / "dativo-dagster"), "materialize", "--specs", str(specs), "--log-level", "ERROR"],
        capture_output=True, text=True, timeout=300, env=env, check=False, cwd=tmp_path,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    lines = {line.split(":", 1)[0]: line for line in run.stdout.splitlines() if ":" in line}
    assert " ok rows_read=10 committed=10 " in lines["csv_person"], run.stdout
    assert lines["pg_person"] == (
        "pg_person: FAILED at extract: asset_specs/db/pg_person.yaml: source.connection.url_env: environment variable"
        f" {URL_ENV} is not set; it must hold the database URL (postgresql://user:***@host:5432/db)"
    ), run.stdout


def test_database_specs_pass_the_json_schema_they_point_editors_at() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the test dependencies")
    for path in sorted((ROOT / "asset_specs_db").rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first == f"# yaml-language-server: $schema=../../asset_specs/{SCHEMA_FILE_NAME}", path
        assert (path.parent / first.split("=", 1)[1]).resolve() == ROOT / "asset_specs" / SCHEMA_FILE_NAME
        jsonschema.validate(yaml.safe_load(path.read_text()), spec_json_schema())
