"""S3-only mode (``target.catalog: none``) on SeaweedFS: Parquet files plus commit markers; readers (the package's
helper, the documented DuckDB query, the downstream IO manager) see exactly the committed files."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dativo_dagster import markers
from dativo_dagster.markers import (
    CACHE_AFTER_FETCHED,
    cache_uri,
    committed_files,
    committed_files_sql,
    marker_uri,
    write_commit_marker,
)
from dativo_dagster.storage import S3Settings
from dativo_dagster.write import WrittenFile
from dativo_dagster_tests.conftest import Project, base_spec

from .deployment import CONTRACT_METADATA_KEYS, list_keys, make_deployment, run
from .servers import SeaweedFS
from .test_servers import duckdb_for


def test_catalog_none_on_s3_commits_markers_that_readers_follow(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    project = Project(tmp_path / "project")
    project.write_spec(
        base_spec("events", schema_validation_mode="warn", target={"catalog": "none", "partitioning": ["ingest_date"]})
    )
    project.write_data("events.csv", "id,name\n1,Ann\nx,Bad\n")
    first = run(project)
    project.write_data("events.csv", "id,name\n2,Bob\n")
    second = run(project)
    assert first.success and second.success

    location = f"{deployment.warehouse}/testdomain/testproduct/events"
    client = seaweedfs.boto3_client()
    bucket = deployment.bucket
    prefix = location.removeprefix(f"s3://{bucket}/")

    # one marker per run, at <location>/_commits/<run id>.json, listing that run's files
    markers = {}
    for result in (first, second):
        key = marker_uri(location, result.run_id).removeprefix(f"s3://{bucket}/")
        markers[result.run_id] = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    for run_id, marker in markers.items():
        assert marker["run_id"] == run_id
        for entry in marker["files"]:
            assert entry["uri"].startswith(f"{location}/data/ingest_date=")
            metadata = client.head_object(Bucket=bucket, Key=entry["uri"].removeprefix(f"s3://{bucket}/"))["Metadata"]
            assert set(metadata) == CONTRACT_METADATA_KEYS
            assert (metadata["run-id"], metadata["record-count"]) == (run_id, str(entry["record_count"]))
    # only data files and markers under the table location: no directory placeholders, no temporary names
    keys = list_keys(seaweedfs, bucket, prefix + "/")
    assert all((k.endswith(".parquet") and "/data/" in k) or k.startswith(f"{prefix}/_commits/") for k in keys), keys
    assert sorted(k for k in keys if "/_commits/" in k) == sorted(
        f"{prefix}/_commits/{run_id}.json" for run_id in markers
    )

    # the rejects of the first run are committed the same way, next to the table
    rejects_location = f"{location}__rejects"
    s3 = S3Settings(seaweedfs.s3_endpoint, seaweedfs.region, seaweedfs.access_key, seaweedfs.secret_key)
    rejects = [pq.read_table(_body(client, bucket, uri)) for uri in committed_files(rejects_location, s3)]
    assert [r["id"] for t in rejects for r in t.to_pylist()] == ["x"]

    # a file that no marker lists (a crashed run's leftover) is there, but no reader sees it
    stray = f"{location}/data/ingest_date=2020-01-01/stray.parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [999], "name": ["stray"]}), buffer)
    client.put_object(Bucket=bucket, Key=stray.removeprefix(f"s3://{bucket}/"), Body=buffer.getvalue())

    expected_files = sorted(e["uri"] for m in markers.values() for e in m["files"])
    helper_files = committed_files(location, s3)
    assert sorted(helper_files) == expected_files
    assert stray not in helper_files
    rows = pa.concat_tables([pq.read_table(_body(client, bucket, uri)) for uri in helper_files]).to_pylist()
    assert sorted((r["id"], r["name"], r["_run_id"]) for r in rows) == [
        (1, "Ann", first.run_id), (2, "Bob", second.run_id)
    ]

    # the documented DuckDB query agrees, reading markers and files straight from S3
    con = duckdb_for(seaweedfs)
    try:
        query = committed_files_sql(location)
        assert sorted(uri for (uri,) in con.execute(query).fetchall()) == expected_files
        con.execute(f"SET VARIABLE files = (SELECT list(uri) FROM ({query}))")  # noqa: S608 - our own query
        duck = con.execute("SELECT id, name FROM read_parquet(getvariable('files')) ORDER BY id").fetchall()
    finally:
        con.close()
    assert duck == [(1, "Ann"), (2, "Bob")]

    # a downstream asset reads the same committed rows through the IO manager
    received: dict[str, Any] = {}

    @dg.asset(ins={"events": dg.AssetIn(key="events")})
    def events_downstream(events: pa.Table) -> None:
        received["table"] = events

    downstream = run(project, events_downstream, select=["events_downstream"])
    assert downstream.success
    assert sorted(received["table"]["id"].to_pylist()) == [1, 2]


def test_overwrite_marker_hides_earlier_files_for_every_reader(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    deployment.apply(monkeypatch)
    project = Project(tmp_path / "project")
    project.write_spec(base_spec("snap", target={"catalog": "none", "write_mode": "overwrite"}))
    project.write_data("snap.csv", "id,name\n1,Ann\n2,Bob\n")
    assert run(project).success
    project.write_data("snap.csv", "id,name\n3,Cy\n")
    last = run(project)
    assert last.success

    location = f"{deployment.warehouse}/testdomain/testproduct/snap"
    s3 = S3Settings(seaweedfs.s3_endpoint, seaweedfs.region, seaweedfs.access_key, seaweedfs.secret_key)
    visible = committed_files(location, s3)
    assert visible and all(last.run_id[:8] in uri for uri in visible)
    con = duckdb_for(seaweedfs)
    try:
        query = committed_files_sql(location)
        assert sorted(uri for (uri,) in con.execute(query).fetchall()) == sorted(visible)
    finally:
        con.close()



def test_marker_cache_on_s3_spares_a_run_the_markers_already_read(seaweedfs: SeaweedFS, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    location = f"{deployment.warehouse}/testdomain/testproduct/many"
    s3 = S3Settings(seaweedfs.s3_endpoint, seaweedfs.region, seaweedfs.access_key, seaweedfs.secret_key)
    runs = CACHE_AFTER_FETCHED + 1
    expected = []
    for i in range(runs):
        uri = f"{location}/data/{i:02d}.parquet"
        expected.append(uri)
        write_commit_marker(
            location=location, run_id=f"run-{i:02d}", s3=s3, table="d.many", properties={},
            files=[WrittenFile(uri=uri, size_bytes=10, record_count=1, partition_path="", partition_values=[])],
        )
    fetched: list[str] = []
    read = markers.read_small_object

    def counting(uri: str, settings: S3Settings) -> bytes | None:
        fetched.append(uri.rsplit("/", 1)[-1])
        return read(uri, settings)

    monkeypatch.setattr(markers, "read_small_object", counting)
    assert committed_files(location, s3) == expected
    assert len([name for name in fetched if name.startswith("run-")]) == runs

    # the cache is one gzip object beside the markers, holding each marker with the ETag S3 listed for it
    client = seaweedfs.boto3_client()
    bucket = deployment.bucket
    key = cache_uri(location).removeprefix(f"s3://{bucket}/")
    assert key.endswith("/many/_dativo_state/commit-markers.json.gz")
    cached = json.loads(gzip.decompress(client.get_object(Bucket=bucket, Key=key)["Body"].read()))["markers"]
    etags = {
        k.rsplit("/", 1)[-1]: client.head_object(Bucket=bucket, Key=k)["ETag"].strip('"')
        for k in list_keys(seaweedfs, bucket, key.rsplit("/_dativo_state/", 1)[0] + "/_commits/")
    }
    assert {name: entry["version"] for name, entry in cached.items()} == etags

    # the next reader fetches the cache alone
    fetched.clear()
    assert committed_files(location, s3) == expected
    assert fetched == ["commit-markers.json.gz"]

    # and DuckDB's documented query, which reads the markers themselves, agrees
    con = duckdb_for(seaweedfs)
    try:
        assert sorted(uri for (uri,) in con.execute(committed_files_sql(location)).fetchall()) == expected
    finally:
        con.close()

def _body(client: Any, bucket: str, uri: str) -> pa.BufferReader:
    return pa.BufferReader(client.get_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))["Body"].read())

