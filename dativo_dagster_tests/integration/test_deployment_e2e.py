"""The real deployment end to end: S3 sources and warehouse on SeaweedFS, each catalog kind (SQLite, PostgreSQL,
Iceberg REST), materialized through Dagster with the project's own resources; results read back with boto3,
pyiceberg and DuckDB."""

from __future__ import annotations

import json
import tempfile
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster.definitions import build_definitions
from dativo_dagster.table_state import STATE_FILE_KEY, STATE_FILE_PREFIX, STATE_FOLDER, read_branch_state
from dativo_dagster_tests.conftest import Project, base_spec

from .deployment import (
    CONTRACT_METADATA_KEYS,
    CONTRACT_TAG_KEYS,
    TAG_CHARSET,
    branch_head,
    make_deployment,
    run,
    run_text,
    s3_object_text,
    unique,
)
from .servers import PostgresCluster, SeaweedFS
from .test_servers import duckdb_for

SOURCE_A = "id,name,amount,updated\n1,Ann,10.50,2025-01-01 10:00:00\n2,Bob,not-a-number,2025-01-02 11:00:00\n"
SOURCE_B = "id,name,amount,updated\n3,Cy,3.25,2025-01-03 12:30:00\n"


def people_spec(name: str, domain: str, source: str) -> dict[str, Any]:
    return base_spec(
        name,
        domain=domain,
        dataProduct="crm",
        tenant="acme",
        team={"owner": "Équipe Données, Paris"},  # non-ASCII and a comma: not tag-safe as is
        compliance={"classification": ["internal", "pii"], "retention_days": 30},
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "name", "type": "string"},
            {"name": "amount", "type": "decimal(10,2)"},
            {"name": "updated", "type": "timestamp", "required": True},
        ],
        source={"type": "csv", "files": [{"path": source}]},
        target={"partitioning": ["ingest_date"]},
        schema_validation_mode="warn",
    )


def upload_sources(seaweedfs: SeaweedFS) -> tuple[str, str]:
    """Two matching CSVs, plus a nested one and a non-CSV object that the glob must not match."""
    bucket = unique("landing-")
    seaweedfs.create_bucket(bucket)
    client = seaweedfs.boto3_client()
    client.put_object(Bucket=bucket, Key="people/2025/a.csv", Body=SOURCE_A.encode())
    client.put_object(Bucket=bucket, Key="people/2025/b.csv", Body=SOURCE_B.encode())
    nested = b"id,name,amount,updated\n99,No,1,2025-01-01 00:00:00\n"
    client.put_object(Bucket=bucket, Key="people/2025/archive/c.csv", Body=nested)
    client.put_object(Bucket=bucket, Key="people/2025/notes.txt", Body=b"not a csv")
    return bucket, f"s3://{bucket}/people/2025/*.csv"


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "rest"])
def test_s3_deployment_end_to_end(
    kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    deployment = make_deployment(kind, seaweedfs, postgres, tmp_path)
    deployment.apply(monkeypatch)
    uploads = tmp_path / "tmp"
    uploads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(uploads))  # where the S3 sink stages each file before upload
    source_bucket, pattern = upload_sources(seaweedfs)
    domain = unique("sales_")
    project = Project(tmp_path / "project")
    project.write_spec(people_spec("people", domain, pattern))

    received: dict[str, Any] = {}

    @dg.asset(ins={"people": dg.AssetIn(key="people")})
    def people_downstream(people: pa.Table) -> None:
        received["table"] = people

    instance = dg.DagsterInstance.ephemeral()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(project, people_downstream, instance=instance)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert not [w for w in caught if "OAuth2" in str(w.message)]  # the REST client is configured fully
    run_id = result.run_id

    # ---- the table, read back with pyiceberg (a client of our own, not the project's resource)
    catalog = deployment.catalog()
    table = catalog.load_table(f"{domain}.people")
    location = deployment.expected_location(domain, "crm", "people")
    assert table.location() == location
    head = branch_head(table, "acme")
    rows = sorted(table.scan(snapshot_id=head.snapshot_id).to_arrow().to_pylist(), key=lambda r: r["id"])
    sources = {1: f"s3://{source_bucket}/people/2025/a.csv", 3: f"s3://{source_bucket}/people/2025/b.csv"}
    assert [(r["id"], r["name"], r["amount"], r["updated"]) for r in rows] == [
        (1, "Ann", Decimal("10.50"), datetime(2025, 1, 1, 10, 0)),
        (3, "Cy", Decimal("3.25"), datetime(2025, 1, 3, 12, 30)),
    ]
    assert [r["_source_file"] for r in rows] == [sources[1], sources[3]]
    assert {r["_run_id"] for r in rows} == {run_id}
    ingested_at = rows[0]["_ingested_at"]
    assert ingested_at.tzinfo is not None and {r["_ingested_at"] for r in rows} == {ingested_at}
    assert table.snapshot_by_name("main") is None or not table.scan().to_arrow().num_rows  # main stays empty

    # the snapshot records the run and the S3 versions (ETags) of what it read
    etags = {
        uri: seaweedfs.boto3_client().head_object(Bucket=source_bucket, Key=uri.split("/", 3)[3])["ETag"].strip('"')
        for uri in sources.values()
    }
    summaries = [s.summary.additional_properties for s in table.snapshots() if s.summary is not None]
    ours = [s for s in summaries if s.get(RUN_ID_KEY) == run_id]
    assert ours
    assert json.loads(ours[-1]["dativo.source-state"]) == etags
    # the head names a state file with the branch's state before it, so the next run reads the head alone; the
    # REST catalog takes only Iceberg's own files under metadata/, so there it lives in _dativo_state/
    state_file = head.summary.additional_properties[STATE_FILE_KEY]
    folder = STATE_FOLDER if kind == "rest" else "metadata"
    assert state_file.startswith(f"{location}/{folder}/{STATE_FILE_PREFIX}"), state_file
    state = read_branch_state(table, "acme")
    assert (state.compacted, state.snapshots_read, list(state.runs)) == (True, 1, [run_id])

    # ---- the same rows through DuckDB's own Iceberg reader, straight from the bucket
    con = duckdb_for(seaweedfs)
    try:
        duck = con.execute(
            f"SELECT id, name, amount, _source_file, _run_id FROM iceberg_scan('{table.metadata_location}', "  # noqa: S608
            f"snapshot_from_id={head.snapshot_id}) ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    assert duck == [(1, "Ann", Decimal("10.50"), sources[1], run_id), (3, "Cy", Decimal("3.25"), sources[3], run_id)]

    # ---- data files, metadata and the rejects table all live in the bucket, under the table location
    client = seaweedfs.boto3_client()
    data_files = [task.file for task in table.scan(snapshot_id=head.snapshot_id).plan_files()]
    assert data_files
    day = ingested_at.astimezone(UTC).date().isoformat()
    for data_file in data_files:
        assert data_file.file_path.startswith(f"{location}/data/ingest_date={day}/")
        assert data_file.file_path.endswith(".parquet")
        key = data_file.file_path.removeprefix(f"s3://{deployment.bucket}/")
        head_object = client.head_object(Bucket=deployment.bucket, Key=key)
        metadata = head_object["Metadata"]
        assert set(metadata) == CONTRACT_METADATA_KEYS
        assert metadata["asset-name"] == "people"
        assert metadata["asset-version"] == "1.0"
        assert metadata["domain"] == domain
        assert metadata["data-product"] == "crm"
        assert metadata["tenant-id"] == "acme"
        assert metadata["branch"] == "acme"
        assert metadata["owner"] == "%C3%89quipe Donn%C3%A9es, Paris"  # HTTP headers: ASCII, UTF-8 percent-encoded
        assert metadata["retention-days"] == "30"
        assert metadata["classification"] == "internal,pii"
        assert metadata["record-count"] == str(data_file.record_count)
        assert metadata["file-size-bytes"] == str(head_object["ContentLength"]) == str(data_file.file_size_in_bytes)
        assert metadata["partition"] == f"ingest_date={day}"
        assert metadata["run-id"] == run_id
        assert datetime.fromisoformat(metadata["ingest-timestamp"]) == ingested_at
        tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=deployment.bucket, Key=key)["TagSet"]}
        assert set(tags) == CONTRACT_TAG_KEYS and len(tags) <= 10
        assert tags == {
            "domain": domain, "data-product": "crm", "tenant": "acme",
            "owner": "_quipe Donn_es_ Paris", "classification": "internal_pii",
        }
        assert all(set(k) <= TAG_CHARSET and set(v) <= TAG_CHARSET for k, v in tags.items())
    assert table.metadata_location.startswith(f"{location}/metadata/")
    metadata_key = table.metadata_location.removeprefix(f"s3://{deployment.bucket}/")
    assert client.head_object(Bucket=deployment.bucket, Key=metadata_key)["ContentLength"] > 0

    rejects = catalog.load_table(f"{domain}.people__rejects")
    assert rejects.location() == deployment.expected_location(domain, "crm", "people__rejects")
    rejected = rejects.scan(snapshot_id=branch_head(rejects, "acme").snapshot_id).to_arrow().to_pylist()
    assert [(r["id"], r["amount"], r["_source_file"], r["_source_line"]) for r in rejected] == [
        ("2", "not-a-number", sources[1], 3)
    ]
    for task in rejects.scan(snapshot_id=branch_head(rejects, "acme").snapshot_id).plan_files():
        assert task.file.file_path.startswith(f"{rejects.location()}/data/")
        key = task.file.file_path.removeprefix(f"s3://{deployment.bucket}/")
        assert client.head_object(Bucket=deployment.bucket, Key=key)["Metadata"]["run-id"] == run_id

    # the S3 sink's local staging files are gone
    assert not list(uploads.glob("dativo-*"))

    # ---- the downstream asset got the committed rows through the IO manager, from S3
    downstream = received["table"]
    assert sorted(downstream["id"].to_pylist()) == [1, 3]
    assert set(downstream["_source_file"].to_pylist()) == set(sources.values())

    # ---- materialization metadata names the catalog with its credentials masked
    materialization = result.asset_materializations_for_node("people")[0]
    assert materialization.metadata["catalog"].value == deployment.catalog_uri.replace(
        next((s for s in deployment.secrets if s in deployment.catalog_uri), "\0"), "***"
    )
    assert materialization.metadata["rows_committed"].value == 2

    # ---- no secret anywhere: event log, metadata, console, Python logs, snapshot summaries, objects
    captured = capfd.readouterr()
    texts = {
        "event log": run_text(instance, run_id),
        "stdout/stderr": captured.out + captured.err,
        "python logs": caplog.text,
        "snapshot summaries": json.dumps(summaries + [
            s.summary.additional_properties for s in rejects.snapshots() if s.summary is not None
        ]),
        "table properties": json.dumps(dict(table.metadata.properties)),
        "objects": s3_object_text(seaweedfs, deployment.bucket, location.split("/", 3)[3]),
    }
    assert run_id in texts["event log"]
    for secret in deployment.secrets:
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"secret found in {leaks}"


def test_incremental_s3_source_reads_new_and_changed_objects_by_etag(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    source_bucket, pattern = upload_sources(seaweedfs)
    domain = unique("inc_")
    spec = people_spec("people", domain, pattern)
    spec["source"]["incremental"] = {"strategy": "file_modified_time"}
    project = Project(tmp_path / "project")
    project.write_spec(spec)
    catalog = deployment.catalog()

    def branch_ids() -> list[tuple[int, str]]:
        table = catalog.load_table(f"{domain}.people")
        head = branch_head(table, "acme")
        rows = table.scan(snapshot_id=head.snapshot_id).to_arrow().to_pylist()
        return sorted((r["id"], r["_source_file"].rsplit("/", 1)[1]) for r in rows)

    assert run(project).success
    assert branch_ids() == [(1, "a.csv"), (3, "b.csv")]
    snapshots = len(catalog.load_table(f"{domain}.people").snapshots())

    assert run(project).success  # nothing changed: nothing read, no new snapshot
    assert len(catalog.load_table(f"{domain}.people").snapshots()) == snapshots

    # b.csv is rewritten in place (same key, new ETag): its rows are replaced, a.csv's stay as they are
    seaweedfs.boto3_client().put_object(
        Bucket=source_bucket, Key="people/2025/b.csv",
        Body=b"id,name,amount,updated\n4,Di,1.00,2025-02-01 00:00:00\n5,Ed,2.00,2025-02-02 00:00:00\n",
    )
    third = run(project)
    assert third.success
    assert branch_ids() == [(1, "a.csv"), (4, "b.csv"), (5, "b.csv")]
    table = catalog.load_table(f"{domain}.people")
    state = json.loads(branch_head(table, "acme").summary.additional_properties["dativo.source-state"])
    etag = seaweedfs.boto3_client().head_object(Bucket=source_bucket, Key="people/2025/b.csv")["ETag"].strip('"')
    assert state[f"s3://{source_bucket}/people/2025/b.csv"] == etag


def test_the_sensor_asks_again_for_an_s3_object_reverted_to_an_etag_loaded_before(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONTRACT 5: a sensor never forgets a change. b.csv is loaded, rewritten (loaded), then put back to its first
    content: the same ETag as the first run's, whose run key is used. The sensor decides from the committed table
    (which holds the second ETag), asks for a run under a fresh key, and that run restores the first content."""
    from dativo_dagster_tests.test_sensors import Tick

    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    bucket, _ = upload_sources(seaweedfs)
    client = seaweedfs.boto3_client()
    domain = unique("sensor_")
    # one object, so that the reverted state is exactly the first run's: same files, same versions, same key
    spec = people_spec("people", domain, f"s3://{bucket}/people/2025/b.csv")
    spec["source"]["incremental"] = {"strategy": "file_modified_time"}
    spec["sensor"] = {"minimum_interval_seconds": 30}
    project = Project(tmp_path / "project")
    project.write_spec(spec)
    changed = b"id,name,amount,updated\n7,Gus,1.00,2025-03-01 00:00:00\n"

    def rows() -> list[tuple[int, str]]:
        table = deployment.catalog().load_table(f"{domain}.people")
        found = table.scan(snapshot_id=branch_head(table, "acme").snapshot_id).to_arrow().to_pylist()
        return sorted((r["id"], r["_source_file"].rsplit("/", 1)[1]) for r in found)

    with dg.instance_for_test() as instance:
        defs = build_definitions(project.specs_dir)

        def tick(cursor: str | None) -> Tick:
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs,
                resources={name: defs.resources[name] for name in ("dativo_storage", "dativo_catalog")},
            ) as context:
                data = defs.resolve_sensor_def("people__sensor").evaluate_tick(context)
            requests = data.run_requests or []
            return Tick([r.run_key for r in requests], [dict(r.tags) for r in requests], data.skip_message, data.cursor)

        def launch(asked: Tick) -> None:
            assert len(asked.run_keys) == 1, asked.skip
            tags = {**asked.tags[0], "dagster/run_key": asked.run_keys[0]}
            assert project.materialize(instance=instance, tags=tags).success

        first = tick(None)
        launch(first)
        original = rows()
        assert original == [(3, "b.csv")]
        first_etag = client.head_object(Bucket=bucket, Key="people/2025/b.csv")["ETag"]

        client.put_object(Bucket=bucket, Key="people/2025/b.csv", Body=changed)
        second = tick(first.cursor)
        launch(second)
        assert rows() == [(7, "b.csv")]

        client.put_object(Bucket=bucket, Key="people/2025/b.csv", Body=SOURCE_B.encode())
        assert client.head_object(Bucket=bucket, Key="people/2025/b.csv")["ETag"] == first_etag
        reverted = tick(second.cursor)
        # the daemon drops a request whose run key a run already has: the request must carry an unused one
        assert len(reverted.run_keys) == 1
        assert not instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": reverted.run_keys[0]}))
        launch(reverted)
        assert rows() == original
        assert tick(reverted.cursor).run_keys == []


@pytest.mark.parametrize("kind", ["sqlite", "rest"])
def test_a_changed_s3_source_rewrites_the_shared_data_file_with_contract_metadata_and_tags(
    kind: str, seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a.csv and b.csv are loaded by one run, so one data file (and one quarantine file) holds both; b.csv then
    changes. The files holding a.csv's rows are rewritten by the project's writer: CONTRACT 4 names, footers, S3 user
    metadata and tags, and each source's latest content exactly once."""
    from dativo_dagster_tests.table_checks import assert_written_by_project, data_files

    deployment = make_deployment(kind, seaweedfs, postgres, tmp_path)
    deployment.apply(monkeypatch)
    source_bucket, pattern = upload_sources(seaweedfs)
    domain = unique("rw_")
    spec = people_spec("people", domain, pattern)
    spec["source"]["incremental"] = {"strategy": "file_modified_time"}
    project = Project(tmp_path / "project")
    project.write_spec(spec)
    catalog = deployment.catalog()
    client = seaweedfs.boto3_client()

    assert run(project).success
    shared = {
        name: data_files(catalog.load_table(f"{domain}.{name}"), "acme") for name in ("people", "people__rejects")
    }
    assert [len(files) for files in shared.values()] == [1, 1]
    client.put_object(
        Bucket=source_bucket, Key="people/2025/a.csv",
        Body=b"id,name,amount,updated\n6,Flo,6.00,2025-02-01 00:00:00\n7,Gil,bad,2025-02-02 00:00:00\n",
    )
    third = run(project)
    assert third.success

    table = catalog.load_table(f"{domain}.people")
    rows = table.scan(snapshot_id=branch_head(table, "acme").snapshot_id).to_arrow().to_pylist()
    assert sorted((r["id"], r["_source_file"].rsplit("/", 1)[1]) for r in rows) == [(3, "b.csv"), (6, "a.csv")]
    rejects = catalog.load_table(f"{domain}.people__rejects")
    rejected = rejects.scan(snapshot_id=branch_head(rejects, "acme").snapshot_id).to_arrow().to_pylist()
    assert sorted((r["id"], r["_source_file"].rsplit("/", 1)[1]) for r in rejected) == [("7", "a.csv")]
    for name, target in (("people", table), ("people__rejects", rejects)):
        files = data_files(target, "acme")
        assert not set(files) & set(shared[name]), name
        for uri in files:
            keys = assert_written_by_project(target, uri, run_id=third.run_id)
            bucket, key = uri.removeprefix("s3://").split("/", 1)
            head = client.head_object(Bucket=bucket, Key=key)
            # an unpartitioned file's partition is empty, and S3 does not keep a header without a value
            expected = CONTRACT_METADATA_KEYS - ({"partition"} if keys["partition"] == "" else set())
            assert set(head["Metadata"]) == expected, uri
            assert head["Metadata"]["run-id"] == third.run_id
            assert head["Metadata"]["record-count"] == keys["record-count"]
            assert head["Metadata"]["file-size-bytes"] == str(head["ContentLength"])
            tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
            assert set(tags) == CONTRACT_TAG_KEYS and tags["domain"] == domain, uri
