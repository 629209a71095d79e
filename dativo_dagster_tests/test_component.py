"""The dg Component ``dativo_dagster.IngestionComponent`` in process: it builds what the code location builds for
its specs folder, refuses bad specs with ``dativo-dagster validate``'s messages, scaffolds a spec that
materializes, and stays out of the command line's imports. integration/test_dg_component.py drives ``dg`` itself."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster.components.testing import DefsFolderSandbox, create_defs_folder_sandbox
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster.component import IngestionComponent
from dativo_dagster.definitions import build_definitions
from dativo_dagster.errors import DeploymentError, SpecError
from dativo_dagster_tests.conftest import base_spec, branch_rows

ROOT = Path(__file__).resolve().parent.parent
COMPONENT_TYPE = "dativo_dagster.IngestionComponent"


@pytest.fixture
def sandbox() -> Iterator[DefsFolderSandbox]:
    with create_defs_folder_sandbox() as box:
        yield box


def _component_folder(sandbox: DefsFolderSandbox, specs_dir: str = "asset_specs", name: str = "ingest") -> Path:
    folder = sandbox.defs_folder_path / name
    folder.mkdir(parents=True)
    (folder / "defs.yaml").write_text(yaml.safe_dump({"type": COMPONENT_TYPE, "attributes": {"specs_dir": specs_dir}}))
    return folder


def _spec_error(exc: BaseException) -> SpecError | None:
    """The SpecError in an exception's chain (Dagster wraps what build_defs raises)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SpecError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _names(defs: dg.Definitions) -> dict[str, list[str]]:
    repo = defs.get_repository_def()
    return {
        "assets": sorted(key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()),
        "checks": sorted(key.to_user_string() for key in repo.asset_graph.asset_check_keys),
        "jobs": sorted(job.name for job in repo.get_all_jobs()),
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "resources": sorted(defs.resources or {}),
    }


def test_the_component_builds_what_the_code_location_builds_for_the_same_folder(sandbox: DefsFolderSandbox) -> None:
    folder = _component_folder(sandbox)
    # the project's own demo: overwrite and append assets, a warn-mode asset, schedules and a sensor
    shutil.copytree(ROOT / "asset_specs", folder / "asset_specs")
    shutil.copytree(ROOT / "data", folder / "data")
    with sandbox.load_component_and_build_defs(defs_path=folder) as (component, defs):
        assert isinstance(component, IngestionComponent)
        got = _names(defs)
    expected = _names(build_definitions(folder / "asset_specs"))
    assert got == expected
    assert {"csv_person", "dim_currency", "listening_history"} <= set(got["assets"])
    assert got["schedules"] and got["sensors"] and got["checks"]


def test_the_embedded_default_lives_under_the_dg_project_root_and_sources_resolve_beside_the_specs(
    sandbox: DefsFolderSandbox,
) -> None:
    folder = sandbox.scaffold_component(component_cls=IngestionComponent, defs_path="ingest")
    with sandbox.load_component_and_build_defs(defs_path=folder) as (_, defs):
        storage = defs.resources["dativo_storage"]
        catalog = defs.resources["dativo_catalog"]
        result = dg.materialize(list(defs.assets or []), resources=defs.resources, raise_on_error=False)
    assert result.success
    dativo = sandbox.project_root.resolve() / ".dativo"
    assert storage.warehouse == str(dativo / "warehouse")  # type: ignore[attr-defined]
    assert catalog.uri == f"sqlite:///{dativo / 'catalog.db'}"  # type: ignore[attr-defined]
    assert not (folder / ".dativo").exists()  # nothing inside the project's Python package
    sql_catalog = SqlCatalog(
        "dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=(dativo / "warehouse").as_uri()
    )
    table = sql_catalog.load_table("example.example_people")
    rows = sorted(branch_rows(table, "example_tenant"), key=lambda row: row["id"])
    assert [(r["id"], r["name"], str(r["joined_on"])) for r in rows] == [
        (1, "Ada", "2024-01-02"),
        (2, "Grace", "2024-02-03"),
        (3, "Linus", "None"),
    ]
    assert {r["_source_file"] for r in rows} == {str((folder / "data" / "example_people.csv").resolve())}


def test_the_scaffolder_writes_defs_yaml_an_example_spec_and_its_csv(sandbox: DefsFolderSandbox) -> None:
    folder = sandbox.scaffold_component(component_cls=IngestionComponent, defs_path="ingest")
    defs_yaml = yaml.safe_load((folder / "defs.yaml").read_text())
    # the sandbox names the type by the module that declares it; dg scaffold defs by the name it was given
    assert defs_yaml == {
        "type": "dativo_dagster.component.IngestionComponent",
        "attributes": {"specs_dir": "asset_specs"},
    }
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "asset_specs/example_people.yaml",
        "data/example_people.csv",
        "defs.yaml",
    ]
    validate = subprocess.run(
        [sys.executable, "-m", "dativo_dagster.cli", "validate", "--specs", str(folder / "asset_specs")],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert validate.returncode == 0, validate.stderr
    assert "asset_specs/example_people.yaml: ok (example_people -> example.example_people)" in validate.stdout


def test_a_broken_spec_fails_the_load_with_the_messages_of_dativo_dagster_validate(sandbox: DefsFolderSandbox) -> None:
    folder = _component_folder(sandbox)
    specs = folder / "asset_specs"
    specs.mkdir()
    broken = base_spec("people")
    broken["schema"][1]["type"] = "integr"
    (specs / "people.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    (specs / "orders.yaml").write_text(yaml.safe_dump(base_spec("orders", surprise=1), sort_keys=False))
    with pytest.raises(Exception) as caught, sandbox.load_component_and_build_defs(defs_path=folder):
        pass
    error = _spec_error(caught.value)
    assert error is not None, f"no SpecError in {caught.value!r}"
    validate = subprocess.run(
        [sys.executable, "-m", "dativo_dagster.cli", "validate", "--specs", str(specs)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert validate.returncode == 2
    assert error.problems == validate.stderr.splitlines()[: len(error.problems)]
    assert any(p.startswith("asset_specs/people.yaml: schema[1].type: unknown type 'integr'") for p in error.problems)
    assert any(p.startswith("asset_specs/orders.yaml: surprise:") for p in error.problems)


def test_a_missing_specs_folder_is_named(sandbox: DefsFolderSandbox) -> None:
    folder = _component_folder(sandbox, specs_dir="no_such_folder")
    with pytest.raises(Exception) as caught, sandbox.load_component_and_build_defs(defs_path=folder):
        pass
    error = _spec_error(caught.value)
    assert error is not None
    assert error.problems == [f"{(folder / 'no_such_folder').resolve()}: asset specs folder does not exist"]


def test_the_attributes_schema_that_dg_check_yaml_applies_wants_specs_dir_and_nothing_else() -> None:
    schema = IngestionComponent.get_model_cls().model_json_schema()  # type: ignore[union-attr]
    assert schema["required"] == ["specs_dir"]
    assert set(schema["properties"]) == {"specs_dir"}
    assert schema["additionalProperties"] is False


def test_importing_the_package_leaves_dagster_out_and_dg_finds_the_component_through_the_entry_point() -> None:
    code = (
        "import sys, dativo_dagster\n"
        "assert 'dagster' not in sys.modules, 'dagster imported by the package itself'\n"
        "assert 'IngestionComponent' in dir(dativo_dagster)\n"
        "from dativo_dagster import IngestionComponent\n"
        "from dativo_dagster.component import IngestionComponent as Declared\n"
        "assert IngestionComponent is Declared and 'dagster' in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    points = importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
    assert [(p.name, p.value) for p in points if p.value.startswith("dativo_dagster")] == [
        ("dativo_dagster", "dativo_dagster")
    ]


def test_a_partial_deployment_fails_the_load_naming_the_missing_variable(
    sandbox: DefsFolderSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = sandbox.scaffold_component(component_cls=IngestionComponent, defs_path="ingest")
    monkeypatch.setenv("DATIVO_WAREHOUSE", "s3://lake/warehouse")
    with pytest.raises(Exception) as caught, sandbox.load_component_and_build_defs(defs_path=folder):
        pass
    chain = []
    seen: BaseException | None = caught.value
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    errors = [e for e in chain if isinstance(e, DeploymentError)]
    assert errors and errors[0].missing == ["DATIVO_CATALOG_URI"]
    assert "lake" not in str(errors[0])  # names variables, never their values


def test_an_absolute_specs_dir_is_taken_as_it_is(sandbox: DefsFolderSandbox, tmp_path: Path) -> None:
    elsewhere = tmp_path / "team_specs"
    (elsewhere / "asset_specs").mkdir(parents=True)
    spec = base_spec("orders", source={"type": "csv", "files": [{"path": "data/orders.csv"}]})
    (elsewhere / "asset_specs" / "orders.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    folder = _component_folder(sandbox, specs_dir=str(elsewhere / "asset_specs"))
    with sandbox.load_component_and_build_defs(defs_path=folder) as (_, defs):
        [asset] = list(defs.assets or [])
    assert asset.key == dg.AssetKey("orders")  # type: ignore[union-attr]


def test_the_python_format_scaffolds_a_component_py_that_builds_the_example(sandbox: DefsFolderSandbox) -> None:
    folder = sandbox.scaffold_component(component_cls=IngestionComponent, defs_path="ingest", scaffold_format="python")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "asset_specs/example_people.yaml",
        "component.py",
        "data/example_people.csv",
    ]
    with sandbox.load_component_and_build_defs(defs_path=folder) as (_, defs):
        assert [a.key for a in defs.assets or []] == [dg.AssetKey("example_people")]  # type: ignore[union-attr]
        storage = defs.resources["dativo_storage"]
    warehouse = sandbox.project_root.resolve() / ".dativo" / "warehouse"
    assert storage.warehouse == str(warehouse)  # type: ignore[attr-defined]
