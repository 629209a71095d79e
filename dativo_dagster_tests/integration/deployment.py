"""Helpers for end-to-end tests of the real deployment: a project pointed at SeaweedFS (and PostgreSQL) through
the environment variables of CONTRACT section 6, runs through Dagster, and independent readers of the results."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import Table

from dativo_dagster.definitions import build_definitions
from dativo_dagster_tests.conftest import Project

from .servers import PostgresCluster, SeaweedFS

CONTRACT_METADATA_KEYS = {
    "asset-name", "asset-version", "domain", "data-product", "tenant-id", "branch", "owner", "retention-days",
    "classification", "record-count", "file-size-bytes", "partition", "ingest-timestamp", "run-id",
}
CONTRACT_TAG_KEYS = {"domain", "data-product", "tenant", "owner", "classification"}
TAG_CHARSET = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-=._:/@")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class Deployment:
    """One deployment under test: its environment, and a catalog client of its own to read results back."""

    kind: str  # sqlite | postgres | rest
    seaweedfs: SeaweedFS
    env: dict[str, str]
    warehouse: str  # DATIVO_WAREHOUSE
    bucket: str  # the warehouse's bucket
    secrets: list[str] = field(default_factory=list)  # values that must never show up anywhere

    @property
    def catalog_uri(self) -> str:
        return self.env["DATIVO_CATALOG_URI"]

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)

    def catalog(self) -> Catalog:
        """A plain pyiceberg client (not the project's resource) for reading results back."""
        if self.kind == "rest":
            return RestCatalog("dativo", **self.seaweedfs.rest_catalog_properties())
        return SqlCatalog(
            "dativo", uri=self.catalog_uri, warehouse=self.warehouse, **self.seaweedfs.pyiceberg_s3_properties()
        )

    def expected_location(self, domain: str, data_product: str, name: str) -> str:
        """CONTRACT 4: ``<warehouse>/<domain>/<dataProduct>/<name>``; SeaweedFS's REST catalog assigns its own."""
        if self.kind == "rest":
            return f"{self.warehouse}/{domain}/{name}"
        return f"{self.warehouse}/{domain}/{data_product}/{name}"


def make_deployment(
    kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster | None, tmp_path: Path
) -> Deployment:
    """A fresh deployment of ``kind`` on the session's servers (its own bucket or database)."""
    env = dict(seaweedfs.env())
    secrets = [seaweedfs.secret_key]
    if kind == "rest":
        # SeaweedFS's Iceberg REST catalog serves the table bucket `warehouse` and places tables in it itself
        env["DATIVO_WAREHOUSE"] = seaweedfs.warehouse
        env["DATIVO_CATALOG_URI"] = seaweedfs.iceberg_rest_uri
        env["DATIVO_CATALOG_CREDENTIAL"] = seaweedfs.credential
        return Deployment(kind, seaweedfs, env, seaweedfs.warehouse, seaweedfs.table_bucket, secrets)
    bucket = unique("lake-")
    seaweedfs.create_bucket(bucket)
    warehouse = f"s3://{bucket}/warehouse"
    env["DATIVO_WAREHOUSE"] = warehouse
    if kind == "sqlite":
        env["DATIVO_CATALOG_URI"] = f"sqlite:///{tmp_path / 'catalog.db'}"
    elif kind == "postgres":
        assert postgres is not None
        database = unique("catalog_")
        uri = postgres.create_database(database)
        # the private cluster trusts loopback connections: a password in the URI is accepted and ignored, which
        # lets the tests check that it is masked everywhere
        password = unique("pg-password-")
        env["DATIVO_CATALOG_URI"] = uri.replace(f"//{postgres.user}@", f"//{postgres.user}:{password}@")
        secrets.append(password)
    else:
        raise ValueError(kind)
    return Deployment(kind, seaweedfs, env, warehouse, bucket, secrets)


def run(
    project: Project, *extra: dg.AssetsDefinition, instance: dg.DagsterInstance | None = None,
    select: Iterable[str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize the project's assets (and ``extra`` downstream ones) with the project's own resources."""
    defs = build_definitions(project.specs_dir)
    assets = [*(defs.assets or []), *extra]
    return dg.materialize(
        assets,
        resources=defs.resources,
        selection=dg.AssetSelection.assets(*select) if select else None,
        raise_on_error=False,
        instance=instance or dg.DagsterInstance.ephemeral(),
    )


def branch_head(table: Table, branch: str) -> Any:
    head = table.snapshot_by_name(branch)
    assert head is not None, f"branch {branch} missing in {table.name()}"
    return head


def run_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """Everything Dagster recorded about a run (event log entries with their metadata and errors), as text."""
    return "\n".join(repr(entry) for entry in instance.all_logs(run_id))


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """One text per failed step: its error's message and those of its causes (after retries, Dagster's own
    "Exceeded max_retries" wraps the last failure)."""
    out = []
    for event in result.all_events:
        if event.is_step_failure:
            error, parts = event.step_failure_data.error, []
            while error is not None:
                parts.append(error.message)
                error = error.cause or error.context
            out.append("\n".join(parts))
    return out


def s3_object_text(seaweedfs: SeaweedFS, bucket: str, prefix: str = "") -> str:
    """Metadata, tags and (small, text) bodies of every object under a prefix, as text."""
    client = seaweedfs.boto3_client()
    parts = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            head = client.head_object(Bucket=bucket, Key=key)
            parts.append(json.dumps(head.get("Metadata", {})))
            tags = client.get_object_tagging(Bucket=bucket, Key=key).get("TagSet", [])
            parts.append(json.dumps(tags))
            if key.endswith((".json", ".txt")):
                parts.append(client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", "replace"))
    return "\n".join(parts)


def list_keys(seaweedfs: SeaweedFS, bucket: str, prefix: str = "") -> list[str]:
    client = seaweedfs.boto3_client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return sorted(keys)
