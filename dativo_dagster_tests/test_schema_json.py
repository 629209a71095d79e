"""The spec JSON Schema for editors: current, referenced by every demo spec, and agreeing with the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dativo_dagster.cli import main
from dativo_dagster.spec import SCHEMA_FILE_NAME, spec_json_schema

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "asset_specs"
CASES = Path(__file__).parent / "cases" / "specs"

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the test dependencies")


def test_checked_in_schema_is_current(capsys):
    assert main(["schema", "--specs", str(SPECS), "--check"]) == 0, capsys.readouterr().err


def test_check_fails_on_a_stale_schema(tmp_path, capsys):
    stale = tmp_path / SCHEMA_FILE_NAME
    stale.write_text("{}\n")
    assert main(["schema", "--output", str(stale), "--check"]) == 2
    assert "out of date" in capsys.readouterr().err
    assert main(["schema", "--output", str(stale)]) == 0
    assert json.loads(stale.read_text()) == spec_json_schema()


def test_every_demo_spec_points_editors_at_the_schema():
    for path in sorted(SPECS.rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first == f"# yaml-language-server: $schema={'../' * (len(path.relative_to(SPECS).parts) - 1)}{SCHEMA_FILE_NAME}"


@pytest.mark.parametrize("path", sorted((CASES / "valid").glob("*.y*ml")) + sorted(SPECS.rglob("*.yaml")), ids=str)
def test_valid_specs_pass_the_json_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), spec_json_schema())


@pytest.mark.parametrize(
    "change",
    [
        {"unknown_key": 1},
        {"schema": [{"name": "id", "type": "integr"}]},
        {"schema_validation_mode": "lenient"},
        {"target": {"write_mode": "upsert"}},
    ],
)
def test_invalid_specs_fail_the_json_schema(change):
    document = yaml.safe_load((SPECS / "adventureworks" / "person.yaml").read_text())
    document.update(change)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, spec_json_schema())
