"""Deployment resources without servers: settings from the environment, catalog choice, error translation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy.exc
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    ForbiddenError,
    NoSuchTableError,
    OAuthError,
    UnauthorizedError,
)

from dativo_dagster.cli import EXIT_FAILED, main
from dativo_dagster.definitions import build_definitions
from dativo_dagster.errors import CommitError, DeploymentError, StorageError, TerminalError, is_transient
from dativo_dagster.resources import (
    CatalogResource,
    GuardedRestCatalog,
    GuardedSqlCatalog,
    StorageResource,
    catalog_errors,
    embedded_defaults,
    is_catalog_tables_race,
    resources_from_env,
)
from dativo_dagster.spec import load_specs
from dativo_dagster_tests.conftest import Project, base_spec


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_resources_read_every_contract_setting_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "DATIVO_WAREHOUSE": "s3://lake/warehouse",
        "DATIVO_CATALOG_URI": "http://rest:8181",
        "DATIVO_CATALOG_CREDENTIAL": "id:secret",
        "DATIVO_S3_ENDPOINT": "http://minio:9000",
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_REGION": "eu-west-1",
        "DATIVO_STAGING_DIR": str(tmp_path / "staging"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    resources = resources_from_env(tmp_path / "asset_specs")
    storage, catalog = resources["dativo_storage"], resources["dativo_catalog"]
    # EnvVars, not values: secrets never land in run config or the UI
    assert storage.aws_secret_access_key == dg.EnvVar("AWS_SECRET_ACCESS_KEY")
    assert catalog.credential == dg.EnvVar("DATIVO_CATALOG_CREDENTIAL")
    configured = {
        "warehouse": "DATIVO_WAREHOUSE", "s3_endpoint": "DATIVO_S3_ENDPOINT", "aws_region": "AWS_REGION",
        "aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    }
    for field, variable in configured.items():
        assert getattr(storage, field) == dg.EnvVar(variable)
    assert catalog.uri == dg.EnvVar("DATIVO_CATALOG_URI")
    assert resources["dativo_staging"].root == dg.EnvVar("DATIVO_STAGING_DIR")


def test_unset_settings_fall_back_to_the_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "DATIVO_CATALOG_CREDENTIAL"):
        monkeypatch.delenv(name, raising=False)
    resources = resources_from_env(tmp_path / "asset_specs")
    defaults = embedded_defaults(tmp_path / "asset_specs")
    assert resources["dativo_storage"].warehouse == defaults["warehouse"]
    assert resources["dativo_storage"].s3_endpoint is None
    assert resources["dativo_catalog"].uri == defaults["catalog_uri"]
    assert resources["dativo_catalog"].credential is None


PARTIAL_DEPLOYMENTS = [
    ({"DATIVO_WAREHOUSE": "s3://lake/warehouse"}, ["DATIVO_CATALOG_URI"]),
    ({"DATIVO_WAREHOUSE": "/data/warehouse", "DATIVO_S3_ENDPOINT": "http://minio:9000"}, ["DATIVO_CATALOG_URI"]),
    ({"DATIVO_CATALOG_URI": "postgresql+psycopg2://dativo:pg-secret@db:5432/catalog"}, ["DATIVO_WAREHOUSE"]),
    ({"DATIVO_CATALOG_URI": "http://rest:8181", "DATIVO_CATALOG_CREDENTIAL": "id:rest-secret"}, ["DATIVO_WAREHOUSE"]),
    ({"DATIVO_S3_ENDPOINT": "http://minio:9000"}, ["DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI"]),
    ({"DATIVO_CATALOG_CREDENTIAL": "id:rest-secret"}, ["DATIVO_WAREHOUSE", "DATIVO_CATALOG_URI"]),
]


@pytest.mark.parametrize(("env", "missing"), PARTIAL_DEPLOYMENTS)
def test_a_partial_deployment_is_refused_at_definition_load_naming_what_is_missing(
    project: Project, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], missing: list[str]
) -> None:
    """CONTRACT 6: never a silent fallback to the local SQLite catalog when only part of a deployment is set."""
    project.write_spec(base_spec("people"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(DeploymentError) as raised:
        build_definitions(project.specs_dir)

    message = str(raised.value)
    assert raised.value.missing == missing
    for name in missing:
        assert f"{name} is not set" in message
    for name in env:
        assert name in message  # what was set, by name
    for secret in ("pg-secret", "rest-secret", "minio", "lake"):
        assert secret not in message  # names only, never values
    assert not (project.root / ".dativo").exists()


def test_object_storage_credentials_alone_keep_the_embedded_default(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_* may be set in any user's shell: they are not a deployment on their own."""
    project.write_spec(base_spec("people"))
    project.write_data("people.csv", "id,name\n1,Ann\n")
    for name, value in {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions(project.specs_dir)
    assert defs.resources["dativo_catalog"].uri == project.catalog_uri
    assert project.materialize().success
    assert project.table("testdomain.people").snapshot_by_name("acme") is not None


def test_the_command_line_and_dagster_refuse_a_partial_deployment(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project.write_spec(base_spec("people"))
    project.write_data("people.csv", "id,name\n1,Ann\n")
    monkeypatch.setenv("DATIVO_WAREHOUSE", "s3://lake/warehouse")

    for command in ("validate", "materialize"):
        assert main([command, "--specs", str(project.specs_dir)]) == EXIT_FAILED
        err = capsys.readouterr().err
        assert "DATIVO_CATALOG_URI is not set" in err, err
    assert not (project.root / ".dativo").exists()

    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-m", "dativo_dagster.definitions"],
        cwd=project.root, env={**env, "DATIVO_ASSET_SPECS_DIR": str(project.specs_dir)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "DATIVO_CATALOG_URI is not set" in result.stdout + result.stderr


def storage(warehouse: str = "s3://lake/warehouse", endpoint: str | None = None) -> StorageResource:
    return StorageResource(
        warehouse=warehouse, s3_endpoint=endpoint, aws_region="us-east-1",
        aws_access_key_id="AKID", aws_secret_access_key="S3-SECRET-VALUE",  # noqa: S106 - a test value
    )


def test_catalog_kind_follows_the_uri(tmp_path: Path) -> None:
    assert CatalogResource(uri="https://catalog.example.com/api", storage=storage()).is_rest
    assert not CatalogResource(uri="postgresql+psycopg2://u:p@h/db", storage=storage()).is_rest
    sqlite = CatalogResource(uri=f"sqlite:///{tmp_path / 'sub' / 'catalog.db'}", storage=storage(str(tmp_path / "wh")))
    catalog = sqlite.load_catalog()
    assert isinstance(catalog, GuardedSqlCatalog) and isinstance(catalog, SqlCatalog)
    assert (tmp_path / "sub").is_dir()
    catalog.create_namespace_if_not_exists("d")
    assert catalog.list_namespaces() == [("d",)]
    assert not catalog.table_exists("d.t")
    with pytest.raises(NoSuchTableError):  # not a connection problem: pyiceberg's own error stays
        catalog.load_table("d.t")
    assert issubclass(GuardedRestCatalog, RestCatalog)


def test_display_uri_masks_the_password() -> None:
    resource = CatalogResource(uri="postgresql+psycopg2://dativo:pg-secret@db:5432/catalog", storage=storage())
    assert resource.display_uri == "postgresql+psycopg2://dativo:***@db:5432/catalog"


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "http"])
def test_an_unreachable_catalog_is_a_transient_commit_error_naming_the_masked_uri(scheme: str) -> None:
    port = closed_port()
    if scheme == "http":
        uri, credential = f"http://127.0.0.1:{port}", "client:REST-SECRET"
    else:
        uri, credential = f"postgresql+psycopg2://dativo:PG-SECRET@127.0.0.1:{port}/catalog", None
    resource = CatalogResource(uri=uri, credential=credential, storage=storage(endpoint="http://127.0.0.1:1"))
    with pytest.raises(CommitError) as failed:
        resource.load_catalog()
    message = str(failed.value)
    assert is_transient(failed.value)  # a catalog that is down may be back for the retry
    assert resource.display_uri in message and "could not be reached (connect)" in message
    for secret in ("PG-SECRET", "REST-SECRET", "S3-SECRET-VALUE"):
        assert secret not in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # no traceback to leak through


def test_catalog_errors_translate_refusals_but_not_conflicts() -> None:
    refused = r"catalog sqlite:///x refused or could not be reached \(commit\)"
    with pytest.raises(CommitError, match=refused), catalog_errors("sqlite:///x", "commit", ["pw"]):
        raise sqlalchemy.exc.OperationalError("UPDATE iceberg_tables", {}, Exception("database is locked pw"))
    # a lost race is pyiceberg's to report, and the commit's to retry
    with pytest.raises(CommitFailedException), catalog_errors("sqlite:///x", "commit", []):
        raise CommitFailedException("Table has been updated by another process")
    with pytest.raises(CommitError) as scrubbed, catalog_errors("http://h", "load", ["pw"]):
        raise ConnectionError("refused with pw")
    assert "pw" not in str(scrubbed.value).replace("http://h", "")


# what each catalog raises for a credential it refuses (seen against SeaweedFS's REST catalog and PostgreSQL in
# integration/test_deployment_failures.py): retrying cannot make it accept them
REFUSED_CREDENTIALS = [
    OAuthError("invalid_client: Invalid client credentials for client-id pw-123"),
    UnauthorizedError("NotAuthorizedException: Not authorized"),
    ForbiddenError("ForbiddenException: access denied to namespace sales"),
    sqlalchemy.exc.OperationalError(
        "SELECT 1", {}, Exception('connection to server at "127.0.0.1", port 5432 failed: FATAL:  password'
                                  ' authentication failed for user "dativo" (pw-123)'),
    ),
]
# and what a catalog that is down or busy raises: the retry may succeed
UNREACHABLE = [
    ConnectionError("Connection refused pw-123"),
    sqlalchemy.exc.OperationalError(
        "SELECT 1", {}, Exception('connection to server at "127.0.0.1", port 5432 failed: Connection refused')
    ),
    sqlalchemy.exc.OperationalError("UPDATE iceberg_tables", {}, Exception("database is locked")),
]


@pytest.mark.parametrize("error", REFUSED_CREDENTIALS, ids=lambda e: type(e).__name__)
def test_a_catalog_refusing_the_credentials_is_terminal(error: Exception) -> None:
    with pytest.raises(TerminalError) as refused, catalog_errors("http://cat", "connect", ["pw-123"]):
        raise error
    assert not is_transient(refused.value)
    message = str(refused.value)
    assert "catalog http://cat refused the credentials (connect)" in message and type(error).__name__ in message
    assert "pw-123" not in message


@pytest.mark.parametrize("error", UNREACHABLE, ids=lambda e: str(e.orig if hasattr(e, "orig") else e)[:20])
def test_a_catalog_that_is_down_or_busy_is_transient(error: Exception) -> None:
    with pytest.raises(CommitError) as down, catalog_errors("http://cat", "connect", ["pw-123"]):
        raise error
    assert is_transient(down.value)
    assert "pw-123" not in str(down.value)


def build_at_once(resource: CatalogResource, threads: int) -> tuple[list[Catalog], list[BaseException]]:
    """``threads`` clients of ``resource`` built at the same moment: the clients, and the errors raised."""
    start = threading.Barrier(threads)
    clients: list[Catalog] = []
    errors: list[BaseException] = []

    def build() -> None:
        start.wait()
        try:
            clients.append(resource.load_catalog())
        except BaseException as exc:  # noqa: BLE001 - collected for the caller's assertion
            errors.append(exc)

    workers = [threading.Thread(target=build) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return clients, errors


@pytest.mark.parametrize("attempt", range(3))  # the race is lost in most rounds without the retry, not in all
def test_first_runs_at_once_on_a_new_sqlite_catalog_all_get_a_client(tmp_path: Path, attempt: int) -> None:
    """Clients built at the same moment on a new catalog database race to create pyiceberg's tables; the ones
    that lose build theirs again instead of failing the run."""
    resource = CatalogResource(uri=f"sqlite:///{tmp_path / 'new' / 'catalog.db'}", storage=storage(str(tmp_path)))

    clients, errors = build_at_once(resource, threads=8)

    assert errors == []
    assert len(clients) == 8
    first, last = clients[0], clients[-1]
    first.create_namespace("race")
    table = first.create_table("race.people", schema=pa.schema([pa.field("id", pa.int64())]))
    table.append(pa.table({"id": [1, 2]}))
    assert last.load_table("race.people").scan().to_arrow().column("id").to_pylist() == [1, 2]


def test_only_the_lost_table_creation_race_is_retried() -> None:
    create = "CREATE TABLE iceberg_tables"
    exists = sqlalchemy.exc.OperationalError(create, {}, Exception("table iceberg_tables already exists"))
    pg_type = 'duplicate key value violates unique constraint "pg_type_typname_nsp_index"'
    duplicate = sqlalchemy.exc.IntegrityError(create, {}, Exception(pg_type))
    relation = sqlalchemy.exc.ProgrammingError(create, {}, Exception('relation "iceberg_tables" already exists'))
    assert is_catalog_tables_race(exists) and is_catalog_tables_race(duplicate) and is_catalog_tables_race(relation)
    locked = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))
    refused = sqlalchemy.exc.OperationalError("connect", {}, Exception("connection refused"))
    assert not is_catalog_tables_race(locked) and not is_catalog_tables_race(refused)
    assert not is_catalog_tables_race(ValueError("table already exists"))


def test_check_access_only_for_s3_warehouses(tmp_path: Path) -> None:
    project = Project(tmp_path / "p")
    project.write_spec(base_spec())
    [loaded] = load_specs(project.specs_dir)
    storage(str(tmp_path / "wh")).check_access(loaded.spec)  # local: nothing to check
    with pytest.raises(StorageError, match=r"cannot access s3://lake/warehouse/ \(S3 endpoint http://127.0.0.1:1\)"):
        storage(endpoint="http://127.0.0.1:1").check_access(loaded.spec)
