"""Failures of the real deployment: wrong S3 credentials, a catalog that refuses the commit, a catalog that goes
down before the commit. Each fails the run with a clear message (credentials masked), retried only when retrying
can help, and leaves no visible data."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pyiceberg.catalog.sql import SqlCatalog

import dativo_dagster.assets as assets_module
from dativo_dagster.errors import CommitError, TerminalError, is_transient
from dativo_dagster.resources import CatalogResource, StorageResource
from dativo_dagster_tests.conftest import Project, base_spec

from .deployment import failure_messages, list_keys, make_deployment, run, run_text, unique
from .servers import PostgresCluster, SeaweedFS, free_ports

RETRIES = 2


def retries_of(result: dg.ExecuteInProcessResult, step_suffix: str) -> int:
    return sum(
        1 for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY and (e.step_key or "").endswith(step_suffix)
    )


def spec(name: str, **overrides: Any) -> dict[str, Any]:
    return base_spec(name, retry_config={"max_retries": RETRIES, "retry_delay_seconds": 0}, **overrides)


def test_wrong_s3_credentials_fail_at_once_with_a_clear_error_and_leave_nothing(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    wrong_secret = unique("wrong-secret-")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    landing = unique("landing-")
    seaweedfs.create_bucket(landing)
    seaweedfs.boto3_client().put_object(Bucket=landing, Key="in/people.csv", Body=b"id,name\n1,Ann\n")

    project = Project(tmp_path / "project")
    project.write_spec(spec("local_source"))
    project.write_data("local_source.csv", "id,name\n1,Ann\n")
    project.write_spec(spec("s3_source", source={"type": "csv", "files": [{"path": f"s3://{landing}/in/*.csv"}]}))
    instance = dg.DagsterInstance.ephemeral()
    result = run(project, instance=instance)
    assert not result.success

    messages = failure_messages(result)
    assert len(messages) == 2
    [write_failure] = [m for m in messages if "local_source" in m or deployment.bucket in m]
    [extract_failure] = [m for m in messages if landing in m]
    # the local source was read; writing to the warehouse bucket was refused before anything was created
    assert f"s3://{deployment.bucket}/warehouse" in write_failure
    assert "SignatureDoesNotMatch" in write_failure and "AWS_SECRET_ACCESS_KEY" in write_failure
    # the S3 source could not even be listed
    assert f"s3://{landing}/in/" in extract_failure and "SignatureDoesNotMatch" in extract_failure
    # refused credentials are terminal: no retry
    assert retries_of(result, "__write") == 0 and retries_of(result, "__extract") == 0

    assert list_keys(seaweedfs, deployment.bucket) == []
    catalog = SqlCatalog("dativo", uri=deployment.catalog_uri, warehouse=deployment.warehouse)
    assert catalog.list_namespaces() == []
    assert wrong_secret not in run_text(instance, result.run_id)


def _limited_catalog_uri(postgres: PostgresCluster, seaweedfs: SeaweedFS, warehouse: str) -> tuple[str, str]:
    """A catalog database whose login may read and insert rows but not update them: it can create tables, and
    refuses every commit to them. Returns the URI (with a password) and the password."""
    database = unique("refusing_")
    admin_uri = postgres.create_database(database)
    SqlCatalog("dativo", uri=admin_uri, warehouse=warehouse, **seaweedfs.pyiceberg_s3_properties())  # its tables
    role, password = unique("writer_"), unique("pw-")
    conn = postgres.connect(database)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
            cur.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
            cur.execute(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}")
    finally:
        conn.close()
    return admin_uri.replace(f"//{postgres.user}@", f"//{role}:{password}@"), password


def test_catalog_refusing_the_commit_is_retried_then_fails_naming_the_masked_uri(
    seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    uri, password = _limited_catalog_uri(postgres, seaweedfs, deployment.warehouse)
    deployment.apply(monkeypatch)
    monkeypatch.setenv("DATIVO_CATALOG_URI", uri)
    project = Project(tmp_path / "project")
    project.write_spec(spec("people"))
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    instance = dg.DagsterInstance.ephemeral()
    result = run(project, instance=instance)

    assert not result.success
    assert retries_of(result, "__commit") == RETRIES  # transient: retried per retry_config
    [message] = failure_messages(result)
    masked = uri.replace(password, "***")
    assert masked in message and "permission denied" in message
    assert password not in run_text(instance, result.run_id)
    # the table was created by the write step, but nothing became visible
    admin = SqlCatalog(
        "dativo", uri=uri.replace(uri.split("//")[1].split("@")[0], postgres.user), warehouse=deployment.warehouse,
        **seaweedfs.pyiceberg_s3_properties(),
    )
    table = admin.load_table("testdomain.people")
    assert table.current_snapshot() is None and table.snapshot_by_name("acme") is None
    assert table.scan().to_arrow().num_rows == 0


def test_catalog_down_before_the_commit_is_retried_then_fails_and_the_table_is_unchanged(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    # a folder of our own (the postgres user can enter it), kept across the stop and the restart below
    base_dir = Path(tempfile.mkdtemp(prefix="dativo-pg-down-"))
    cluster = PostgresCluster(base_dir)
    cluster.start()
    try:
        password = unique("pw-")
        uri = cluster.create_database("catalog").replace(f"//{cluster.user}@", f"//{cluster.user}:{password}@")
        monkeypatch.setenv("DATIVO_CATALOG_URI", uri)
        project = Project(tmp_path / "project")
        project.write_spec(spec("people"))
        project.write_data("people.csv", "id,name\n1,Ann\n")
        assert run(project).success  # a first run commits normally
        project.write_data("people.csv", "id,name\n2,Bob\n")

        write = assets_module._write_result  # what the write step returns, once its files are in place

        def write_then_lose_the_catalog(*args: Any, **kwargs: Any) -> Any:
            written = write(*args, **kwargs)
            cluster.stop()  # the real server goes away between the write and the commit
            return written

        monkeypatch.setattr(assets_module, "_write_result", write_then_lose_the_catalog)
        instance = dg.DagsterInstance.ephemeral()
        result = run(project, instance=instance)
        assert not result.success
        assert retries_of(result, "__commit") == RETRIES
        [message] = failure_messages(result)
        assert uri.replace(password, "***") in message
        assert "could not be reached" in message and "Connection refused" in message
        assert password not in run_text(instance, result.run_id)

        cluster.start()  # back, on a new port: the table holds the first run's rows only
        catalog = SqlCatalog(
            "dativo", uri=cluster.sqlalchemy_uri("catalog"), warehouse=deployment.warehouse,
            **seaweedfs.pyiceberg_s3_properties(),
        )
        table = catalog.load_table("testdomain.people")
        head = table.snapshot_by_name("acme")
        assert head is not None
        assert table.scan(snapshot_id=head.snapshot_id).to_arrow().column("id").to_pylist() == [1]
    finally:
        cluster.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def test_rest_catalog_refusing_the_credential_is_terminal_and_one_that_is_down_transient(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = StorageResource(
        warehouse=seaweedfs.warehouse, s3_endpoint=seaweedfs.s3_endpoint, aws_region=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key,
    )
    wrong = unique("wrong-")
    refused = CatalogResource(
        uri=seaweedfs.iceberg_rest_uri, credential=f"{seaweedfs.access_key}:{wrong}", storage=storage
    )
    # the catalog's token endpoint refuses the secret: retrying cannot make it accept it
    with pytest.raises(TerminalError) as denied:
        refused.load_catalog()
    assert not is_transient(denied.value)
    assert f"Iceberg catalog {seaweedfs.iceberg_rest_uri} refused the credentials (connect)" in str(denied.value)
    assert wrong not in str(denied.value)

    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(CommitError, match=r"could not be reached \(connect\): ConnectionError") as down:
        CatalogResource(uri=dead, credential=seaweedfs.credential, storage=storage).load_catalog()
    assert is_transient(down.value)
    assert dead in str(down.value) and seaweedfs.secret_key not in str(down.value)

    # the right credential works
    catalog = CatalogResource(uri=seaweedfs.iceberg_rest_uri, credential=seaweedfs.credential, storage=storage)
    assert catalog.is_rest
    assert catalog.load_catalog().list_namespaces() is not None

    # a run with the refused credential fails at once: no step is retried, whatever retry_config allows
    deployment = make_deployment("rest", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    monkeypatch.setenv("DATIVO_CATALOG_CREDENTIAL", f"{seaweedfs.access_key}:{wrong}")
    project = Project(tmp_path / "project")
    name = unique("refused_")
    project.write_spec(spec(name))
    project.write_data(f"{name}.csv", "id,name\n1,Ann\n")
    instance = dg.DagsterInstance.ephemeral()
    result = run(project, instance=instance)
    assert not result.success
    assert sum(retries_of(result, step) for step in ("__extract", "__write", "__commit")) == 0
    [message] = failure_messages(result)
    assert "refused the credentials" in message
    assert wrong not in run_text(instance, result.run_id)


def _password_role(postgres: PostgresCluster, database: str) -> tuple[str, str]:
    """A login that must give its password (scram-sha-256, ahead of the cluster's trust rules) on ``database``;
    returns the role and its password."""
    role, password = unique("pwrole_"), unique("pw-")
    conn = postgres.connect(database)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET password_encryption = 'scram-sha-256'")
            cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
            cur.execute(f"GRANT ALL ON SCHEMA public TO {role}")
            hba = postgres.data_dir / "pg_hba.conf"
            rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
            hba.write_text(rule + hba.read_text())
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()
    return role, password


def test_postgresql_catalog_refusing_the_password_is_terminal_and_the_right_one_works(
    seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path
) -> None:
    database = unique("pwcheck_")
    admin_uri = postgres.create_database(database)
    role, password = _password_role(postgres, database)
    storage = StorageResource(
        warehouse=seaweedfs.create_bucket(unique("lake-")) + "/warehouse", s3_endpoint=seaweedfs.s3_endpoint,
        aws_region=seaweedfs.region, aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    at = admin_uri.split("@", 1)[1]
    wrong = unique("wrong-")
    refused = CatalogResource(uri=f"postgresql+psycopg2://{role}:{wrong}@{at}", storage=storage)
    with pytest.raises(TerminalError) as denied:
        refused.load_catalog()
    assert not is_transient(denied.value)
    message = str(denied.value)
    assert "refused the credentials (connect)" in message and "password authentication failed" in message
    assert refused.display_uri in message and wrong not in message

    # the same login with its password: the rule really asks for it, and accepts the right one
    catalog = CatalogResource(uri=f"postgresql+psycopg2://{role}:{password}@{at}", storage=storage).load_catalog()
    assert catalog.list_namespaces() == []

    # and a server that is not there is transient
    gone = CatalogResource(uri=f"postgresql+psycopg2://{role}:{password}@127.0.0.1:{free_ports(1)[0]}/x",
                           storage=storage)
    with pytest.raises(CommitError) as down:
        gone.load_catalog()
    assert is_transient(down.value) and password not in str(down.value)
