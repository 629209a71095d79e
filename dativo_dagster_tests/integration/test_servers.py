"""The harness itself: real round trips against the servers the fixtures start (values read back, not just calls)."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform
from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

from .servers import MariaDBServer, PostgresCluster, SeaweedFS, ServerError

SCHEMA = Schema(
    NestedField(1, "id", LongType(), required=False),
    NestedField(2, "name", StringType(), required=False),
    NestedField(3, "ts", TimestamptzType(), required=False),
)
DAY_SPEC = PartitionSpec(PartitionField(source_id=3, field_id=1000, transform=DayTransform(), name="ts_day"))
ARROW_SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string()), ("ts", pa.timestamp("us", tz="UTC"))])
ROWS = [
    {"id": 1, "name": "ada", "ts": datetime(2024, 1, 1, 8, 0, tzinfo=UTC)},
    {"id": 2, "name": "grace", "ts": datetime(2024, 1, 1, 17, 30, tzinfo=UTC)},
    {"id": 3, "name": "édith", "ts": datetime(2024, 1, 2, 0, 0, tzinfo=UTC)},
]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def rows_table() -> pa.Table:
    return pa.Table.from_pylist(ROWS, schema=ARROW_SCHEMA)


def sorted_rows(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def rest_catalog(server: SeaweedFS) -> RestCatalog:
    return RestCatalog(
        "dativo",
        uri=server.iceberg_rest_uri,
        warehouse="s3://warehouse",
        credential=f"{server.access_key}:{server.secret_key}",
        **{
            "s3.endpoint": server.s3_endpoint,
            "s3.access-key-id": server.access_key,
            "s3.secret-access-key": server.secret_key,
            "s3.region": "us-east-1",
            "s3.path-style-access": "true",
        },
    )


def duckdb_for(server: SeaweedFS) -> Any:
    """DuckDB with avro, iceberg and httpfs loaded from the duckdb-extension-* wheels (no download) and an S3
    secret for ``server``."""
    con = duckdb.connect()
    for ext in ("avro", "iceberg", "httpfs"):  # avro before iceberg
        module = __import__(f"duckdb_extension_{ext}")
        files = sorted((Path(module.__file__).parent / "extensions").rglob(f"{ext}.duckdb_extension"))
        assert files, f"no {ext}.duckdb_extension in the duckdb-extension-{ext} package"
        con.execute(f"INSTALL '{files[-1]}'")
        con.execute(f"LOAD '{files[-1]}'")
    con.execute(
        f"CREATE SECRET seaweedfs (TYPE s3, KEY_ID '{server.access_key}', SECRET '{server.secret_key}', "
        f"REGION '{server.region}', ENDPOINT '{server.s3_host_port}', URL_STYLE 'path', USE_SSL false)"
    )
    return con


def duckdb_rows(con: Any, metadata_location: str) -> list[dict[str, Any]]:
    query = f"SELECT id, name, ts FROM iceberg_scan('{metadata_location}') ORDER BY id"  # noqa: S608 - test values
    result = con.execute(query)
    names = [column[0] for column in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


# ------------------------------------------------------------------------------------------------ S3
def test_s3_round_trip_with_metadata_and_tagging(seaweedfs: SeaweedFS) -> None:
    bucket = unique("rt-")
    assert seaweedfs.create_bucket(bucket) == f"s3://{bucket}"
    s3 = seaweedfs.boto3_client()
    body = os.urandom(2048)
    s3.put_object(
        Bucket=bucket,
        Key="in/a.bin",
        Body=body,
        Metadata={"dativo-run-id": "run-42", "dativo-rows": "3"},
        Tagging="classification=pii&tenant=acme",
    )
    s3.put_object(Bucket=bucket, Key="in/sub/b.txt", Body=b"b")
    s3.put_object(Bucket=bucket, Key="other/c.txt", Body=b"c")

    got = s3.get_object(Bucket=bucket, Key="in/a.bin")
    assert got["Body"].read() == body
    assert got["Metadata"] == {"dativo-run-id": "run-42", "dativo-rows": "3"}
    assert s3.head_object(Bucket=bucket, Key="in/a.bin")["ContentLength"] == len(body)

    tags = s3.get_object_tagging(Bucket=bucket, Key="in/a.bin")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"classification": "pii", "tenant": "acme"}
    s3.put_object_tagging(Bucket=bucket, Key="in/a.bin", Tagging={"TagSet": [{"Key": "state", "Value": "done"}]})
    tags = s3.get_object_tagging(Bucket=bucket, Key="in/a.bin")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"state": "done"}

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="in/", Delimiter="/")
    assert [o["Key"] for o in listing.get("Contents", [])] == ["in/a.bin"]
    assert [p["Prefix"] for p in listing.get("CommonPrefixes", [])] == ["in/sub/"]


def test_wrong_credentials_are_refused(seaweedfs: SeaweedFS) -> None:
    bucket = unique("auth-")
    seaweedfs.create_bucket(bucket)
    seaweedfs.boto3_client().put_object(Bucket=bucket, Key="k", Body=b"secret data")

    wrong_secret = seaweedfs.boto3_client(secret_key=seaweedfs.secret_key + "x")
    with pytest.raises(ClientError) as refused:
        wrong_secret.get_object(Bucket=bucket, Key="k")
    error = refused.value.response
    assert error["Error"]["Code"] == "SignatureDoesNotMatch"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403

    with pytest.raises(ClientError) as unknown:
        seaweedfs.boto3_client(access_key="AKUNKNOWN0000000", secret_key="not-a-secret").put_object(  # noqa: S106
            Bucket=bucket, Key="k", Body=b"overwrite"
        )
    assert unknown.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert seaweedfs.boto3_client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"secret data"


# ------------------------------------------------------------------------------------------------ Iceberg REST
@pytest.fixture(scope="module")
def rest_table(seaweedfs: SeaweedFS) -> Table:
    """A day-partitioned table in the REST catalog with ROWS appended."""
    catalog = rest_catalog(seaweedfs)
    namespace = unique("ns_")
    catalog.create_namespace(namespace)
    table = catalog.create_table(f"{namespace}.people", SCHEMA, partition_spec=DAY_SPEC)
    table.append(rows_table())
    return catalog.load_table(f"{namespace}.people")


def test_rest_catalog_namespace_table_append_scan(seaweedfs: SeaweedFS, rest_table: Table) -> None:
    namespace = rest_table.name()[0]
    catalog = rest_catalog(seaweedfs)
    assert (namespace,) in catalog.list_namespaces()
    assert (namespace, "people") in catalog.list_tables(namespace)
    # Default location: s3://warehouse/<namespace>/<table>, metadata written by the server under it.
    assert rest_table.location() == f"s3://warehouse/{namespace}/people"
    assert rest_table.metadata_location.startswith(f"s3://warehouse/{namespace}/people/metadata/")

    assert sorted_rows(rest_table.scan().to_arrow()) == ROWS
    data_files = [task.file.file_path for task in rest_table.scan().plan_files()]
    assert len(data_files) == 2  # two days, two partitions
    assert all(path.startswith(f"s3://warehouse/{namespace}/people/data/") for path in data_files)
    # The object store really holds them.
    s3 = seaweedfs.boto3_client()
    for path in data_files:
        key = path.removeprefix("s3://warehouse/")
        assert s3.head_object(Bucket="warehouse", Key=key)["ContentLength"] > 0


def test_duckdb_reads_the_rest_table(seaweedfs: SeaweedFS, rest_table: Table) -> None:
    con = duckdb_for(seaweedfs)
    try:
        assert duckdb_rows(con, rest_table.metadata_location) == ROWS
    finally:
        con.close()


def test_rest_catalog_table_locations(seaweedfs: SeaweedFS) -> None:
    """How SeaweedFS 4.48's REST catalog treats client-chosen locations (characterization: if this fails after an
    upgrade, the rules below changed).

    - A nested namespace's default location joins the levels with dots: ``s3://warehouse/ns.prod/t``.
    - An explicit two-level location inside the table bucket is honoured and writable.
    - An explicit deeper location (``s3://warehouse/ns/prod/t``) is accepted by create_table and kept as asked,
      but every data write under it is refused (S3 AccessDenied): the table bucket only accepts object writes
      whose key is ``<a>/<b>/data/...`` or ``<a>/<b>/metadata/...``. The table then exists without data.
    - A location outside the table bucket is refused at create (BadRequest).
    """
    catalog = RestCatalog("dativo", **seaweedfs.rest_catalog_properties())
    top = unique("loc_")
    catalog.create_namespace(top)
    catalog.create_namespace((top, "prod"))
    small = pa.Table.from_pylist(ROWS[:1], schema=ARROW_SCHEMA)

    nested_default = catalog.create_table(f"{top}.prod.t_default", SCHEMA)
    assert nested_default.location() == f"s3://warehouse/{top}.prod/t_default"
    nested_default.append(small)
    assert catalog.load_table(f"{top}.prod.t_default").scan().to_arrow().num_rows == 1

    two_level = catalog.create_table(f"{top}.prod.t_two", SCHEMA, location=f"s3://warehouse/{top}_custom/t_two")
    assert two_level.location() == f"s3://warehouse/{top}_custom/t_two"
    two_level.append(small)
    assert catalog.load_table(f"{top}.prod.t_two").scan().to_arrow().num_rows == 1

    deep_location = f"s3://warehouse/{top}/prod/t"
    deep = catalog.create_table(f"{top}.prod.t", SCHEMA, location=deep_location)
    assert deep.location() == deep_location
    assert deep.metadata_location.startswith(f"{deep_location}/metadata/")
    with pytest.raises(OSError, match=r"(?i)access.?denied"):
        deep.append(small)
    assert catalog.table_exists(f"{top}.prod.t")
    assert catalog.load_table(f"{top}.prod.t").current_snapshot() is None
    s3 = seaweedfs.boto3_client()
    with pytest.raises(ClientError) as denied:
        s3.put_object(Bucket="warehouse", Key=f"{top}/prod/t/data/x.parquet", Body=b"x")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    # Non-Iceberg keys are refused in a table bucket even under a valid table location.
    with pytest.raises(ClientError):
        s3.put_object(Bucket="warehouse", Key=f"{top}.prod/t_default/staging/x.parquet", Body=b"x")
    catalog.drop_table(f"{top}.prod.t")
    assert not catalog.table_exists(f"{top}.prod.t")

    other_bucket = unique("other-")
    seaweedfs.create_bucket(other_bucket)
    with pytest.raises(Exception, match="must be within bucket warehouse"):
        catalog.create_table(f"{top}.elsewhere", SCHEMA, location=f"s3://{other_bucket}/t")


# ------------------------------------------------------------------------------------------------ SqlCatalog
def test_sql_catalog_on_postgres_with_seaweedfs_warehouse(seaweedfs: SeaweedFS, postgres: PostgresCluster) -> None:
    database = unique("catalog_")
    uri = postgres.create_database(database)
    assert uri == f"postgresql+psycopg2://postgres@127.0.0.1:{postgres.port}/{database}"
    bucket = unique("lake-")
    seaweedfs.create_bucket(bucket)

    catalog = SqlCatalog("dativo", uri=uri, warehouse=f"s3://{bucket}", **seaweedfs.pyiceberg_s3_properties())
    catalog.create_namespace("sales")
    table = catalog.create_table("sales.orders", SCHEMA, partition_spec=DAY_SPEC)
    table.append(rows_table())

    reloaded = SqlCatalog(
        "dativo", uri=uri, warehouse=f"s3://{bucket}", **seaweedfs.pyiceberg_s3_properties()
    ).load_table("sales.orders")
    assert sorted_rows(reloaded.scan().to_arrow()) == ROWS
    assert reloaded.location() == f"s3://{bucket}/sales/orders"  # pyiceberg 0.12: no ".db" suffix

    # The pointer really lives in PostgreSQL, the files really live in SeaweedFS.
    conn = postgres.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT metadata_location FROM iceberg_tables WHERE table_namespace = %s AND table_name = %s",
                ("sales", "orders"),
            )
            assert cur.fetchall() == [(reloaded.metadata_location,)]
    finally:
        conn.close()
    key = reloaded.metadata_location.removeprefix(f"s3://{bucket}/")
    assert seaweedfs.boto3_client().head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    con = duckdb_for(seaweedfs)
    try:
        assert duckdb_rows(con, reloaded.metadata_location) == ROWS
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------ the harness
def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); it is not serving.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_second_instances_are_isolated_restart_and_stop_by_pid(seaweedfs: SeaweedFS, postgres: PostgresCluster) -> None:
    with SeaweedFS() as other:
        assert not set(other.ports.values()) & set(seaweedfs.ports.values())
        assert other.access_key != seaweedfs.access_key and other.secret_key != seaweedfs.secret_key
        assert other.data_dir != seaweedfs.data_dir
        # The session's credentials do not open the other instance.
        with pytest.raises(ClientError):
            other.boto3_client(access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key).list_buckets()

        other.create_bucket("keep")
        other.boto3_client().put_object(Bucket="keep", Key="k", Body=b"kept")
        old_pid = other.pid
        other.restart()  # ready again only when a GET works (volumes can be "not found" right after a restart)
        assert other.pid != old_pid and not _alive(old_pid)
        assert other.boto3_client().get_object(Bucket="keep", Key="k")["Body"].read() == b"kept"
        pid, base_dir, s3_port = other.pid, other.base_dir, other.s3_port
        grpc_sockets = other._grpc_socket_files()
    assert not _alive(pid)
    assert not _listening(s3_port)
    assert base_dir is not None and not base_dir.exists()
    assert not [path for path in grpc_sockets if path.exists()]  # weed leaves some behind; the harness does not

    with PostgresCluster() as cluster:
        assert cluster.port != postgres.port
        conn = cluster.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW listen_addresses")
                assert cur.fetchone() == ("127.0.0.1",)
        finally:
            conn.close()
        pg_pid, pg_port, pg_dir = cluster.pid, cluster.port, cluster.base_dir
    assert pg_pid is not None and not _alive(pg_pid)
    assert not _listening(pg_port)
    assert pg_dir is not None and not pg_dir.exists()

    # The session's servers were not disturbed.
    assert seaweedfs.boto3_client().list_buckets()["Buckets"]
    assert _listening(postgres.port)


def test_a_server_that_dies_at_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = SeaweedFS(weed=str(fake), timeout=20)
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*fake weed: cannot start"):
        server.start()
    assert server.process is None
    assert server.base_dir is None  # the private folder was removed


def test_mariadb_binds_loopback_answers_and_stops_by_pid(mariadb: MariaDBServer) -> None:
    assert _listening(mariadb.port)
    conn = mariadb.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT @@bind_address, @@port, @@global.time_zone, VERSION()")
        bind, port, zone, version = cur.fetchone()
    conn.close()
    assert (bind, port, zone) == ("127.0.0.1", mariadb.port, MariaDBServer.default_time_zone)
    assert "MariaDB" in version
    second = MariaDBServer().start()  # a second, isolated server: its own port and folder, stopped by its pid
    pid, port, base_dir = second.pid, second.port, second.base_dir
    assert port != mariadb.port and base_dir is not None and base_dir.is_dir()
    second.stop()
    assert pid is not None and not _alive(pid)
    assert not _listening(port) and not base_dir.exists()
    assert _listening(mariadb.port)  # the session's server is untouched
