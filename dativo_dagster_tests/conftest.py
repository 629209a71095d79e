"""Shared fixtures: a throwaway project (specs + data) on the embedded default, and ways to run it."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table

from dativo_dagster.definitions import build_definitions

CASES = Path(__file__).parent / "cases"
DEPLOYMENT_VARS = (
    "DATIVO_ASSET_SPECS_DIR",
    "DATIVO_WAREHOUSE",
    "DATIVO_CATALOG_URI",
    "DATIVO_CATALOG_CREDENTIAL",
    "DATIVO_S3_ENDPOINT",
    "DATIVO_STAGING_DIR",
    "DATIVO_EXECUTOR",
    "DATIVO_CELERY_BROKER_URL",
    "DATIVO_CELERY_BACKEND_URL",
)


@pytest.fixture(autouse=True)
def _clean_deployment_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from the embedded default unless they set variables themselves."""
    for name in DEPLOYMENT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def base_spec(name: str = "people", **overrides: Any) -> dict[str, Any]:
    """A valid spec as a dict; ``overrides`` replace top-level keys."""
    spec: dict[str, Any] = {
        "apiVersion": "v3.0.2",
        "kind": "DataContract",
        "name": name,
        "version": "1.0",
        "status": "active",
        "domain": "testdomain",
        "dataProduct": "testproduct",
        "tenant": "acme",
        "description": {"purpose": "test data"},
        "tags": ["test"],
        "team": {"owner": "owner@example.com"},
        "compliance": {"classification": ["internal", "pii"], "retention_days": 30},
        "schema": [
            {"name": "id", "type": "integer", "required": True},
            {"name": "name", "type": "string"},
        ],
        "source": {"type": "csv", "files": [{"path": f"data/{name}.csv"}]},
        "target": {"partitioning": ["ingest_date"]},
        "schema_validation_mode": "strict",
        "retry_config": {"max_retries": 0, "retry_delay_seconds": 0},
    }
    spec.update(overrides)
    return spec


class Project:
    """A project folder: ``asset_specs/``, ``data/`` and, after a run, ``.dativo/``."""

    def __init__(self, root: Path):
        self.root = root
        self.specs_dir = root / "asset_specs"
        self.data_dir = root / "data"
        self.specs_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def warehouse(self) -> Path:
        return self.root / ".dativo" / "warehouse"

    @property
    def catalog_uri(self) -> str:
        return f"sqlite:///{self.root / '.dativo' / 'catalog.db'}"

    def write_spec(self, spec: dict[str, Any], filename: str | None = None) -> Path:
        path = self.specs_dir / (filename or f"{spec['name']}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def write_data(self, relative: str, content: str | bytes, encoding: str = "utf-8") -> Path:
        path = self.data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = textwrap.dedent(content).lstrip("\n").encode(encoding)
        path.write_bytes(content)
        return path

    def materialize(self, select: list[str] | None = None, **kwargs: Any) -> dg.ExecuteInProcessResult:
        """Materialize (all or selected) assets in process with the project's own resources."""
        defs = build_definitions(self.specs_dir)
        assets = list(defs.assets or [])
        selection = dg.AssetSelection.assets(*select) if select else None
        return dg.materialize(
            assets,
            resources=defs.resources,
            selection=selection,
            raise_on_error=False,
            instance=kwargs.pop("instance", None) or dg.DagsterInstance.ephemeral(),
            **kwargs,
        )

    def catalog(self) -> SqlCatalog:
        return SqlCatalog("dativo", uri=self.catalog_uri, warehouse=self.warehouse.as_uri())

    def table(self, identifier: str) -> Table:
        return self.catalog().load_table(identifier)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path / "project")


def branch_rows(table: Table, branch: str) -> list[dict[str, Any]]:
    """All rows at the head of ``branch`` (empty when the branch does not exist)."""
    head = table.snapshot_by_name(branch)
    if head is None:
        return []
    return table.scan(snapshot_id=head.snapshot_id).to_arrow().to_pylist()


@pytest.fixture
def duckdb_connection() -> Iterator[Any]:
    """DuckDB with the iceberg extension loaded from the PyPI packages (no download)."""
    import duckdb

    con = duckdb.connect()
    for ext in ("avro", "iceberg"):
        module = __import__(f"duckdb_extension_{ext}")
        folder = Path(module.__file__).parent / "extensions"
        files = list(folder.rglob(f"{ext}.duckdb_extension"))
        assert files, f"no {ext} extension file under {folder}"
        con.execute(f"INSTALL '{files[0]}'")
        con.execute(f"LOAD {ext}")
    yield con
    con.close()


def duckdb_branch_rows(con: Any, table: Table, branch: str, columns: str = "*") -> list[tuple[Any, ...]]:
    """Rows (``columns``: a select list) of the branch head read by DuckDB's own Iceberg reader."""
    head = table.snapshot_by_name(branch)
    assert head is not None
    return con.execute(
        f"SELECT {columns} FROM iceberg_scan('{table.metadata_location}', snapshot_from_id={head.snapshot_id})"
    ).fetchall()


def make_project(tmp_path: Path) -> Callable[[], Project]:
    return lambda: Project(tmp_path)


__all__ = ["CASES", "Project", "base_spec", "branch_rows", "duckdb_branch_rows", "os"]
