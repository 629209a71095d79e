"""Merge by primary key (CONTRACT 8) on real servers: S3 (SeaweedFS) with its Iceberg REST catalog, and a PostgreSQL
SQL catalog. Updates, inserts and deletes land with each key once; the file the merge rewrites keeps CONTRACT 4 (name,
footer keys, S3 user metadata and tags); the table records its key as identifier fields."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from dativo_dagster.merge import recorded_key
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.table_checks import assert_written_by_project, data_files, failures

from .deployment import CONTRACT_METADATA_KEYS, CONTRACT_TAG_KEYS, branch_head, make_deployment, run, unique
from .servers import PostgresCluster, SeaweedFS
from .test_postgres_source import DB, PASSWORD, READER, db_spec, materialize, shop, url  # noqa: F401 - shop: fixture


@pytest.mark.parametrize("kind", ["postgres", "rest"])
def test_merge_on_s3_with_a_real_catalog_upserts_deletes_and_keeps_contract_metadata(
    kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment(kind, seaweedfs, postgres, tmp_path)
    deployment.apply(monkeypatch)
    bucket = unique("landing-")
    seaweedfs.create_bucket(bucket)
    client = seaweedfs.boto3_client()
    domain = unique("mg_")
    spec = base_spec(
        "customers",
        domain=domain,
        schema=[
            {"name": "id", "type": "integer", "required": True, "primary_key": True},
            {"name": "name", "type": "string"},
            {"name": "gone", "type": "boolean"},
        ],
        source={"type": "csv", "files": [{"path": f"s3://{bucket}/customers.csv"}]},
        target={"partitioning": [], "write_mode": "merge", "delete_field": "gone"},
    )
    project = Project(tmp_path / "project")
    project.write_spec(spec)
    body = "id,name,gone\n" + "".join(f"{i},v1-{i},false\n" for i in range(1, 11))
    client.put_object(Bucket=bucket, Key="customers.csv", Body=body.encode())
    first = run(project)
    assert first.success, failures(first)
    catalog = deployment.catalog()
    table = catalog.load_table(f"{domain}.customers")
    (before,) = data_files(table, "acme")
    assert recorded_key(table) == ["id"]

    client.put_object(
        Bucket=bucket, Key="customers.csv",
        Body=b"id,name,gone\n2,v2-2,false\n11,new-11,false\n3,x,false\n3,v2-3,false\n4,,true\n",
    )
    second = run(project)
    assert second.success, failures(second)

    table = catalog.load_table(f"{domain}.customers")
    rows = table.scan(snapshot_id=branch_head(table, "acme").snapshot_id).to_arrow().to_pylist()
    assert sorted((r["id"], r["name"]) for r in rows) == sorted(
        [(1, "v1-1"), (2, "v2-2"), (3, "v2-3"), *((i, f"v1-{i}") for i in range(5, 11)), (11, "new-11")]
    )
    (unique_key,) = [e for e in second.get_asset_check_evaluations() if e.check_name == "unique_key"]
    # the rows holding a key the run brought (2, 3, 11; 4 deleted), counted on the staged snapshot
    assert unique_key.passed and unique_key.metadata["rows_checked"].value == 3
    files = data_files(table, "acme")
    assert before not in files and len(files) == 2  # the first file rewritten without 2, 3, 4; the run's own file
    for uri in files:
        keys = assert_written_by_project(table, uri, run_id=second.run_id)
        data_bucket, key = uri.removeprefix("s3://").split("/", 1)
        head = client.head_object(Bucket=data_bucket, Key=key)
        expected = CONTRACT_METADATA_KEYS - ({"partition"} if keys["partition"] == "" else set())
        assert set(head["Metadata"]) == expected, uri
        assert head["Metadata"]["run-id"] == second.run_id
        tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=data_bucket, Key=key)["TagSet"]}
        assert set(tags) == CONTRACT_TAG_KEYS and tags["domain"] == domain
    # the run's keys file is gone once the commit landed
    keys_prefix = table.location().removeprefix("s3://").split("/", 1)
    leftover = client.list_objects_v2(Bucket=keys_prefix[0], Prefix=f"{keys_prefix[1]}/_dativo_merge/")
    assert leftover.get("KeyCount", 0) == 0
    gc.collect()


def test_merge_from_a_postgresql_source_needs_no_source_specific_code(shop: PostgresCluster, tmp_path: Path) -> None:
    """A database table read in full every run, merged by its key: updated and deleted rows in the database become
    updated and deleted keys on the branch (the delete flag is a column of the source)."""
    conn = shop.connect(DB)
    conn.autocommit = True
    table_name = unique("customers_")
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE sales.{table_name} (id integer PRIMARY KEY, name text, gone boolean DEFAULT false)")
        cur.execute(f"INSERT INTO sales.{table_name} (id, name) SELECT i, 'v1-' || i FROM generate_series(1, 20) i")
        cur.execute(f"GRANT SELECT ON sales.{table_name} TO {READER}")
    project = Project(tmp_path / "project")
    schema = [
        {"name": "id", "type": "integer", "required": True, "primary_key": True},
        {"name": "name", "type": "string"},
        {"name": "gone", "type": "boolean"},
    ]
    project.write_spec(db_spec("customers", {"table": f"sales.{table_name}"}, schema=schema,
                               target={"partitioning": [], "write_mode": "merge", "delete_field": "gone"}))
    done = materialize(project, url(shop))
    assert done.returncode == 0, done.stdout + done.stderr

    with conn.cursor() as cur:
        cur.execute(f"UPDATE sales.{table_name} SET name = 'v2-' || id WHERE id % 5 = 0")
        cur.execute(f"UPDATE sales.{table_name} SET gone = true WHERE id IN (1, 2)")
        cur.execute(f"INSERT INTO sales.{table_name} (id, name) VALUES (21, 'new-21')")
    conn.close()
    done = materialize(project, url(shop))
    assert done.returncode == 0, done.stdout + done.stderr

    rows = branch_rows(project.table("testdomain.customers"), "acme")
    expected = {i: (f"v2-{i}" if i % 5 == 0 else f"v1-{i}") for i in range(3, 21)} | {21: "new-21"}
    assert sorted((r["id"], r["name"]) for r in rows) == sorted(expected.items())
    assert PASSWORD not in done.stdout + done.stderr
