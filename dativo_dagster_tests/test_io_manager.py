"""Downstream assets read an ingested asset: the committed branch head as pyarrow or pandas."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pytest

from dativo_dagster.definitions import build_definitions
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows


def run_downstream(project: Project, *extra: dg.AssetsDefinition) -> dg.ExecuteInProcessResult:
    """Materialize only ``extra`` assets, next to the project's own assets and resources."""
    defs = build_definitions(project.specs_dir)
    return dg.materialize(
        [*(defs.assets or []), *extra],
        resources=defs.resources,
        selection=dg.AssetSelection.assets(*(a.key for a in extra)),
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )


def downstream_assets(received: dict[str, Any]) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition]:
    @dg.asset(ins={"people": dg.AssetIn(key="people")})
    def people_arrow(people: pa.Table) -> None:
        received["arrow"] = people

    @dg.asset(ins={"people": dg.AssetIn(key="people")})
    def people_pandas(people: pd.DataFrame) -> None:
        received["pandas"] = people

    return people_arrow, people_pandas


def test_downstream_assets_get_the_branch_head_as_arrow_and_pandas(project: Project) -> None:
    project.write_spec(base_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    first = project.materialize()
    project.write_data("people.csv", "id,name\n3,Cy\n")
    second = project.materialize()
    assert first.success and second.success

    received: dict[str, Any] = {}
    result = run_downstream(project, *downstream_assets(received))
    assert result.success

    arrow = received["arrow"]
    assert isinstance(arrow, pa.Table)
    assert arrow.column_names == ["id", "name", "_ingested_at", "_source_file", "_run_id"]
    assert arrow.schema.field("id").type == pa.int64()
    assert arrow.schema.field("_ingested_at").type == pa.timestamp("us", tz="UTC")
    assert sorted(zip(arrow["id"].to_pylist(), arrow["_run_id"].to_pylist())) == [
        (1, first.run_id), (2, first.run_id), (3, second.run_id)
    ]
    assert sorted(r["id"] for r in branch_rows(project.table("testdomain.people"), "acme")) == [1, 2, 3]

    frame = received["pandas"]
    assert isinstance(frame, pd.DataFrame)
    assert sorted(frame["id"].tolist()) == [1, 2, 3]
    assert sorted(frame["name"].tolist()) == ["Ann", "Bob", "Cy"]
    assert str(frame["_ingested_at"].dt.tz) == "UTC"


def test_downstream_of_a_catalog_none_asset_reads_the_marked_files(project: Project) -> None:
    project.write_spec(base_spec(target={"catalog": "none", "partitioning": ["ingest_date"]}))
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    run = project.materialize()
    assert run.success

    received: dict[str, Any] = {}
    result = run_downstream(project, *downstream_assets(received))
    assert result.success
    assert received["arrow"].column_names == ["id", "name", "_ingested_at", "_source_file", "_run_id"]
    assert sorted(received["arrow"]["id"].to_pylist()) == [1, 2]
    assert set(received["arrow"]["_run_id"].to_pylist()) == {run.run_id}
    assert sorted(received["pandas"]["name"].tolist()) == ["Ann", "Bob"]


def test_downstream_of_an_unmaterialized_asset_fails_clearly(project: Project) -> None:
    project.write_spec(base_spec())
    received: dict[str, Any] = {}
    arrow_asset, _ = downstream_assets(received)
    result = run_downstream(project, arrow_asset)
    assert not result.success
    [failure] = result.get_step_failure_events()
    assert "table testdomain.people does not exist" in failure.event_specific_data.error.to_string()
    assert received == {}


# Run as `python -c`: pandas cannot be imported (as when dativo-dagster is installed without its pandas extra),
# then the CLI ingests and the script reports whether pandas got imported anyway and which Arrow pool was used.
WITHOUT_PANDAS = """
import importlib.abc, sys
class NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "pandas":
            raise ModuleNotFoundError("No module named 'pandas'", name=name)
sys.meta_path.insert(0, NoPandas())
from dativo_dagster.cli import main
code = main()
import pyarrow
print("pool", pyarrow.default_memory_pool().backend_name)
print("pandas imported", "pandas" in sys.modules)
sys.exit(code)
"""


def test_ingestion_needs_no_pandas_and_allocates_with_jemalloc(project: Project) -> None:
    project.write_spec(base_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    args = ["materialize", "--specs", str(project.specs_dir), "--log-level", "ERROR"]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PANDAS, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("people: ok rows_read=2 committed=2 rejected=0 files=1 "), lines
    assert lines[1:] == ["pool jemalloc", "pandas imported False"]
    assert sorted(r["id"] for r in branch_rows(project.table("testdomain.people"), "acme")) == [1, 2]


def test_a_dataframe_input_without_pandas_names_the_extra(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_spec(base_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n")
    assert project.materialize().success
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "pandas" else find_spec(name, *args)
    )
    received: dict[str, Any] = {}
    _, pandas_asset = downstream_assets(received)
    result = run_downstream(project, pandas_asset)
    assert not result.success
    [failure] = result.get_step_failure_events()
    message = failure.event_specific_data.error.to_string()
    assert "input 'people' of people_pandas asks for people as a pandas DataFrame" in message
    assert "install dativo-dagster[pandas]" in message
    assert received == {}
