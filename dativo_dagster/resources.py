"""Deployment settings as Dagster resources: object storage, the Iceberg catalog and op staging."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import dagster as dg
from pydantic import Field
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import S3Settings, is_s3_uri, join_uri

CATALOG_NAME = "dativo"
DEFAULT_SPECS_DIR = Path(__file__).resolve().parent.parent / "asset_specs"
_CREDENTIALS_IN_URI = re.compile(r"//([^:/@]+):([^@]+)@")


def mask_uri(uri: str) -> str:
    """The URI with any password replaced by ``***``, safe for logs and messages."""
    return _CREDENTIALS_IN_URI.sub(r"//\1:***@", uri)


def project_root(specs_dir: Path) -> Path:
    """The folder relative source paths and the embedded default resolve against."""
    return specs_dir.resolve().parent


class StorageResource(dg.ConfigurableResource):
    """Where data files go: a local folder or an S3-compatible bucket."""

    warehouse: str = Field(description="Warehouse root: a local folder or s3://bucket[/prefix] (DATIVO_WAREHOUSE).")
    s3_endpoint: str | None = Field(default=None, description="S3-compatible endpoint URL (DATIVO_S3_ENDPOINT).")
    aws_region: str | None = Field(default=None, description="Region for S3 (AWS_REGION).")
    aws_access_key_id: str | None = Field(default=None, description="Access key id (AWS_ACCESS_KEY_ID).")
    aws_secret_access_key: str | None = Field(default=None, description="Secret key (AWS_SECRET_ACCESS_KEY).")

    def s3_settings(self) -> S3Settings:
        """How to reach object storage."""
        return S3Settings(
            endpoint=self.s3_endpoint,
            region=self.aws_region,
            access_key_id=self.aws_access_key_id,
            secret_access_key=self.aws_secret_access_key,
        )

    def warehouse_for(self, spec: AssetSpecModel) -> str:
        """The warehouse root for an asset: the spec's ``target.warehouse`` or the deployment's."""
        root = spec.target.warehouse or self.warehouse
        if is_s3_uri(root):
            return root.rstrip("/")
        return str(Path(root).resolve())

    def table_location(self, spec: AssetSpecModel, suffix: str = "") -> str:
        """``<warehouse>/<domain>/<dataProduct>/<name><suffix>``."""
        return join_uri(self.warehouse_for(spec), spec.domain, spec.data_product, spec.name + suffix)


class CatalogResource(dg.ConfigurableResource):
    """The Iceberg catalog named ``dativo``: SQL (SQLite/PostgreSQL) or REST."""

    uri: str = Field(description="sqlite:///..., postgresql+psycopg2://... or http(s)://... (DATIVO_CATALOG_URI).")
    credential: str | None = Field(default=None, description="REST catalog credential id:secret (DATIVO_CATALOG_CREDENTIAL).")
    storage: StorageResource

    def load_catalog(self) -> Catalog:
        """A pyiceberg catalog client for this deployment."""
        props = self.storage.s3_settings().pyiceberg_properties()
        warehouse = self.storage.warehouse
        if not is_s3_uri(warehouse):
            warehouse = Path(warehouse).resolve().as_uri()
        if self.uri.startswith(("http://", "https://")):
            rest_props = dict(props)
            if self.credential:
                rest_props["credential"] = self.credential
            return RestCatalog(CATALOG_NAME, uri=self.uri, warehouse=self.storage.warehouse, **rest_props)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return SqlCatalog(CATALOG_NAME, uri=self.uri, warehouse=warehouse, **props)

    @property
    def display_uri(self) -> str:
        """The catalog URI with credentials masked."""
        return mask_uri(self.uri)


class StagingResource(dg.ConfigurableResource):
    """A folder for Arrow IPC files passed between the ops of one run."""

    root: str = Field(description="Local folder for staged op outputs (removed once a run commits).")

    def run_dir(self, run_id: str) -> Path:
        """This run's staging folder."""
        path = Path(self.root) / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_steps(self, run_id: str, step_prefix: str) -> None:
        """Delete the staged files of one asset's steps; the run folder goes once it is empty."""
        run_dir = Path(self.root) / run_id
        for path in run_dir.glob(f"{step_prefix}*"):
            shutil.rmtree(path, ignore_errors=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass


def _env(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None


def embedded_defaults(specs_dir: Path) -> dict[str, str]:
    """The embedded default: a warehouse folder and a SQLite catalog under ``<project>/.dativo``."""
    base = project_root(specs_dir) / ".dativo"
    return {
        "warehouse": str(base / "warehouse"),
        "catalog_uri": f"sqlite:///{base / 'catalog.db'}",
        "staging": str(base / "staging"),
    }


def resources_from_env(specs_dir: Path) -> dict[str, object]:
    """Resources for the deployment that the environment describes (CONTRACT section 6).

    Each setting is a ``dg.EnvVar`` when its variable is set, so secrets stay out of config and
    the UI; unset ones fall back to the embedded default.
    """
    defaults = embedded_defaults(specs_dir)
    storage = StorageResource(
        warehouse=_env("DATIVO_WAREHOUSE") or defaults["warehouse"],
        s3_endpoint=_env("DATIVO_S3_ENDPOINT"),
        aws_region=_env("AWS_REGION"),
        aws_access_key_id=_env("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=_env("AWS_SECRET_ACCESS_KEY"),
    )
    catalog = CatalogResource(
        uri=_env("DATIVO_CATALOG_URI") or defaults["catalog_uri"],
        credential=_env("DATIVO_CATALOG_CREDENTIAL"),
        storage=storage,
    )
    staging = StagingResource(root=_env("DATIVO_STAGING_DIR") or defaults["staging"])
    return {"dativo_storage": storage, "dativo_catalog": catalog, "dativo_staging": staging}
