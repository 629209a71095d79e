"""Object storage against a real S3 API (SeaweedFS): listing S3 sources with ETags, streaming them, multipart
uploads of data files with their metadata and tags, staging files removed whatever happens."""

from __future__ import annotations

import io
import random
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import BucketTransform
from pyiceberg.types import LongType, NestedField, StringType

import dativo_dagster.storage as storage_module
import dativo_dagster.write as write_module
from dativo_dagster.assets import verify_written
from dativo_dagster.errors import SourceError, StorageError
from dativo_dagster.sources.csv import FileReport, list_source_files, read_source_file
from dativo_dagster.pipeline import PipelineOutcome
from dativo_dagster.spec import CsvOptions, FieldSpec, LoadedSpec, load_specs
from dativo_dagster.storage import (
    MAX_USER_METADATA_BYTES,
    S3Settings,
    StorageAccessError,
    object_metadata,
    object_tags,
    upload_s3_file,
)
from dativo_dagster.table_schema import Partitioner
from dativo_dagster.write import PartitionedParquetWriter, WrittenFile, write_batches
from dativo_dagster_tests.conftest import Project, base_spec

from .deployment import CONTRACT_METADATA_KEYS, CONTRACT_TAG_KEYS, list_keys, unique
from .servers import SeaweedFS


@pytest.fixture
def s3(seaweedfs: SeaweedFS) -> S3Settings:
    return S3Settings(seaweedfs.s3_endpoint, seaweedfs.region, seaweedfs.access_key, seaweedfs.secret_key)


def loaded_with(tmp_path: Path, *paths: str) -> LoadedSpec:
    project = Project(tmp_path / unique("p"))
    project.write_spec(base_spec("people", source={"type": "csv", "files": [{"path": p} for p in paths]}))
    [loaded] = load_specs(project.specs_dir)
    return loaded


def test_s3_globs_match_keys_level_by_level_and_versions_are_etags(
    seaweedfs: SeaweedFS, s3: S3Settings, tmp_path: Path
) -> None:
    bucket = unique("src-")
    seaweedfs.create_bucket(bucket)
    client = seaweedfs.boto3_client()
    keys = ["in/a.csv", "in/b.csv", "in/b.csv.bak", "in/notes.txt", "in/2025/c.csv", "in/2025/01/d.csv", "inbox/e.csv"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=f"id,name\n1,{key}\n".encode())
    before = datetime.now(UTC) - timedelta(minutes=5)

    def uris(*patterns: str) -> list[str]:
        return [f.uri for f in list_source_files(loaded_with(tmp_path, *patterns), s3)]

    base = f"s3://{bucket}"
    assert uris(f"{base}/in/*.csv") == [f"{base}/in/a.csv", f"{base}/in/b.csv"]
    assert uris(f"{base}/in/?.csv") == [f"{base}/in/a.csv", f"{base}/in/b.csv"]
    assert uris(f"{base}/in/*/*.csv") == [f"{base}/in/2025/c.csv"]
    assert uris(f"{base}/in/**/*.csv") == [
        f"{base}/in/2025/01/d.csv", f"{base}/in/2025/c.csv", f"{base}/in/a.csv", f"{base}/in/b.csv"
    ]
    assert uris(f"{base}/in*/*.csv") == [f"{base}/in/a.csv", f"{base}/in/b.csv", f"{base}/inbox/e.csv"]
    assert uris(f"{base}/in/[ab].csv", f"{base}/in/a.csv") == [f"{base}/in/a.csv", f"{base}/in/b.csv"]  # once each

    [listed] = list_source_files(loaded_with(tmp_path, f"{base}/in/a.csv"), s3)
    head = client.head_object(Bucket=bucket, Key="in/a.csv")
    assert listed.version == head["ETag"].strip('"') and listed.size == head["ContentLength"]
    modified = datetime.fromtimestamp(listed.modified_ns / 1e9, UTC)
    assert before < modified <= datetime.now(UTC) + timedelta(seconds=5)
    [globbed] = [f for f in list_source_files(loaded_with(tmp_path, f"{base}/in/*.csv"), s3) if f.uri == listed.uri]
    assert globbed == listed

    # a changed object has a new version
    client.put_object(Bucket=bucket, Key="in/a.csv", Body=b"id,name\n2,changed\n")
    [changed] = list_source_files(loaded_with(tmp_path, f"{base}/in/a.csv"), s3)
    assert changed.version != listed.version

    with pytest.raises(SourceError, match="source file not found"):
        list_source_files(loaded_with(tmp_path, f"{base}/in/missing.csv"), s3)
    with pytest.raises(SourceError, match="not in bucket names"):
        list_source_files(loaded_with(tmp_path, f"s3://{bucket[:-1]}*/in/a.csv"), s3)
    wrong = S3Settings(s3.endpoint, s3.region, s3.access_key_id, "wrong")
    with pytest.raises(StorageAccessError, match="SignatureDoesNotMatch"):
        list_source_files(loaded_with(tmp_path, f"{base}/in/*.csv"), wrong)


def test_a_large_s3_source_is_streamed_in_ranged_reads(
    seaweedfs: SeaweedFS, s3: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = unique("big-")
    seaweedfs.create_bucket(bucket)
    rows = 150_000
    text = "id,name\n" + "".join(f"{i},name-{i:08d}-{'x' * 20}\n" for i in range(rows))
    assert len(text) > 5 << 20
    seaweedfs.boto3_client().put_object(Bucket=bucket, Key="big.csv", Body=text.encode())
    monkeypatch.setattr("dativo_dagster.sources.csv.READ_BUFFER", 1 << 20)  # several reads, each bounded

    [source] = list_source_files(loaded_with(Path(tempfile.mkdtemp()), f"s3://{bucket}/big.csv"), s3)
    fields = [FieldSpec(name="id", type="integer"), FieldSpec(name="name", type="string")]
    report = FileReport(uri=source.uri)
    batches = list(read_source_file(source, fields, CsvOptions(), s3, report))
    assert len(batches) > 1  # streamed batch by batch, not read whole
    table = pa.Table.from_batches(batches)
    assert report.rows == table.num_rows == rows
    assert table.column("id").to_pylist()[:3] == ["0", "1", "2"]
    assert table.column("name")[rows - 1].as_py() == f"name-{rows - 1:08d}-{'x' * 20}"
    assert table.column("_source_line")[rows - 1].as_py() == rows + 1
    assert set(table.column("_source_file").to_pylist()) == {f"s3://{bucket}/big.csv"}


SCHEMA = Schema(
    NestedField(1, "id", LongType(), required=False), NestedField(2, "payload", StringType(), required=False)
)


def writer_for(location: str, s3: S3Settings, target_bytes: int) -> PartitionedParquetWriter:
    partitioner = Partitioner(UNPARTITIONED_PARTITION_SPEC, SCHEMA)
    metadata = {
        "asset-name": "big", "asset-version": "1", "domain": "d", "data-product": "p", "tenant-id": "t",
        "branch": "t", "owner": "o@example.com", "retention-days": "7", "classification": "internal",
        "ingest-timestamp": "2025-11-07T09:30:00Z", "run-id": "run-1",
    }
    return PartitionedParquetWriter(
        location=location, schema=pa.schema([("id", pa.int64()), ("payload", pa.string())]), partitioner=partitioner,
        target_bytes=target_bytes, file_prefix="test", metadata=metadata, s3=s3,
    )


def random_batches(rows: int, seed: int = 1) -> Iterator[pa.RecordBatch]:
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 20_000):
        n = min(20_000, rows - start)
        payload = [rng.bytes(300).hex() for _ in range(n)]  # incompressible
        yield pa.record_batch([pa.array(np.arange(start, start + n)), pa.array(payload)], names=["id", "payload"])


def test_large_data_files_go_up_in_parts_with_metadata_and_the_staging_file_goes(
    seaweedfs: SeaweedFS, s3: S3Settings, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(storage_module, "MULTIPART_CHUNK", 5 << 20)  # S3's smallest part
    bucket = unique("mp-")
    seaweedfs.create_bucket(bucket)
    writer = writer_for(f"s3://{bucket}/t/data", s3, target_bytes=12 << 20)
    files = write_batches(random_batches(40_000), writer)
    assert files and not list(staging.iterdir())

    client = seaweedfs.boto3_client()
    total = 0
    for written in files:
        key = written.uri.removeprefix(f"s3://{bucket}/")
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ContentLength"] == written.size_bytes
        assert head["Metadata"]["record-count"] == str(written.record_count)
        assert head["Metadata"]["file-size-bytes"] == str(written.size_bytes)
        if written.size_bytes > 5 << 20:
            parts = int(head["ETag"].strip('"').rsplit("-", 1)[1])  # a multipart ETag ends in -<parts>
            assert parts == -(-written.size_bytes // (5 << 20))
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        table = pq.read_table(io.BytesIO(body))
        assert table.num_rows == written.record_count
        total += table.num_rows
    assert total == 40_000
    assert any(f.size_bytes > 5 << 20 for f in files)


def test_a_failed_upload_removes_the_staging_file_and_leaves_nothing(
    seaweedfs: SeaweedFS, s3: S3Settings, staging: Path
) -> None:
    bucket = unique("fail-")
    seaweedfs.create_bucket(bucket)
    wrong = S3Settings(s3.endpoint, s3.region, s3.access_key_id, "wrong-secret")
    writer = writer_for(f"s3://{bucket}/t/data", wrong, target_bytes=1 << 20)
    with pytest.raises(StorageAccessError, match="SignatureDoesNotMatch") as refused:
        write_batches(random_batches(5_000), writer)
    assert "wrong-secret" not in str(refused.value)
    assert not list(staging.iterdir())
    assert list_keys(seaweedfs, bucket) == []

    # a failure in the middle of a run (after some files were uploaded) removes the uploaded ones too
    writer = writer_for(f"s3://{bucket}/t/data", s3, target_bytes=1 << 20)

    def then_fail() -> Iterator[pa.RecordBatch]:
        yield from random_batches(40_000)  # more than the writer buffers before it writes files
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_batches(then_fail(), writer)
    assert writer.files  # some files had been finished and uploaded before the failure
    assert list_keys(seaweedfs, bucket) == []
    assert not list(staging.iterdir())



def partitioned_writer(location: str, s3: S3Settings) -> PartitionedParquetWriter:
    spec = PartitionSpec(PartitionField(source_id=1, field_id=1000, transform=BucketTransform(16), name="id_bucket"))
    plain = writer_for(location, s3, target_bytes=128 << 20)
    return PartitionedParquetWriter(
        location=location, schema=plain.schema, partitioner=Partitioner(spec, SCHEMA), target_bytes=128 << 20,
        file_prefix="test", metadata=plain.metadata, s3=s3,
    )


def test_the_files_open_at_the_end_go_up_together_and_a_failed_upload_leaves_nothing(
    seaweedfs: SeaweedFS, s3: S3Settings, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = unique("many-")
    seaweedfs.create_bucket(bucket)
    client = seaweedfs.boto3_client()
    upload = write_module.upload_s3_file
    threads: set[str] = set()
    attempts: list[str] = []

    def recorded(local_path: str, uri: str, *args: Any, **kwargs: Any) -> None:
        threads.add(threading.current_thread().name)
        attempts.append(uri)
        if "fail-" in uri and "id_bucket=7/" in uri:
            raise StorageError(f"{uri}: injected upload failure")
        upload(local_path, uri, *args, **kwargs)

    monkeypatch.setattr(write_module, "upload_s3_file", recorded)
    files = write_batches(random_batches(8_000), partitioned_writer(f"s3://{bucket}/t/data", s3))
    assert len(files) == 16 and sum(f.record_count for f in files) == 8_000
    assert len(threads) > 1  # the sixteen uploads went out on the pool, not one after the other
    for written in files:
        key = written.uri.removeprefix(f"s3://{bucket}/")
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["Metadata"]["record-count"] == str(written.record_count)
        assert head["ContentLength"] == written.size_bytes
        assert written.uri.rsplit("/", 2)[-2] == written.partition_path
        # CONTRACT 4's metadata and tags on every object, uploaded on the pool as one by one
        assert set(head["Metadata"]) == CONTRACT_METADATA_KEYS
        assert head["Metadata"]["partition"] == written.partition_path
        tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
        assert set(tags) == CONTRACT_TAG_KEYS and tags["domain"] == "d"
    assert not list(staging.iterdir())

    # one upload fails: the error comes out, no upload starts after it, and abort() removes those that went up
    bucket = unique("fail-")
    seaweedfs.create_bucket(bucket)
    attempts.clear()
    writer = partitioned_writer(f"s3://{bucket}/t/data", s3)
    with pytest.raises(StorageError, match=r"id_bucket=7/.*injected upload failure"):
        write_batches(random_batches(8_000), writer)
    assert any("id_bucket=7/" in uri for uri in attempts)
    assert len(writer.files) == len(attempts) - 1  # every upload that started, but the failed one, was recorded
    assert list_keys(seaweedfs, bucket) == []
    assert not list(staging.iterdir())

def test_long_and_non_ascii_governance_values_are_accepted_by_s3(
    seaweedfs: SeaweedFS, s3: S3Settings, tmp_path: Path
) -> None:
    bucket = unique("meta-")
    seaweedfs.create_bucket(bucket)
    rnd = random.Random(3)  # noqa: S311 - reproducible test data
    values = {
        "asset-name": "a" * 300, "owner": "Équipe « données » <team@example.com>",
        "classification": ",".join(f"class{i}" for i in range(200)), "partition": "k=" + "é" * 400,
        "run-id": "r" * 36, "domain": "".join(rnd.choice("abc/é%") for _ in range(500)),
    }
    metadata = object_metadata(values)
    tags = object_tags(values)
    assert sum(len(k) + len(v) for k, v in metadata.items()) <= MAX_USER_METADATA_BYTES
    local = tmp_path / "file"
    local.write_bytes(b"x")
    upload_s3_file(str(local), f"s3://{bucket}/k", s3, metadata=metadata, tags=tags)

    client = seaweedfs.boto3_client()
    head = client.head_object(Bucket=bucket, Key="k")
    assert head["Metadata"] == metadata
    assert head["Metadata"]["run-id"] == "r" * 36  # short values are kept whole
    assert unquote(head["Metadata"]["owner"]) == values["owner"]  # percent-encoding is reversible
    stored = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key="k")["TagSet"]}
    assert stored == tags and len(stored) <= 10 and all(len(v) <= 256 for v in stored.values())


def test_the_write_step_finds_a_file_gone_or_changed_among_many_on_s3(seaweedfs: SeaweedFS, s3: S3Settings) -> None:
    bucket = unique("verify-")
    seaweedfs.create_bucket(bucket)
    client = seaweedfs.boto3_client()
    files = []
    for i in range(12):
        key = f"t/data/day={i:02d}/f.parquet"
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * (100 + i))
        files.append(WrittenFile(uri=f"s3://{bucket}/{key}", size_bytes=100 + i, record_count=1,
                                 partition_path=f"day={i:02d}", partition_values=[i]))
    outcome = PipelineOutcome(run_id="r", ingested_at="", data_files=files[:10], reject_files=files[10:])
    verify_written(outcome, s3)  # every file there at its size: no error

    client.put_object(Bucket=bucket, Key="t/data/day=07/f.parquet", Body=b"short")
    with pytest.raises(StorageError, match=r"s3://.*/t/data/day=07/f.parquet: written with 107 bytes, now 5 bytes"):
        verify_written(outcome, s3)
    client.put_object(Bucket=bucket, Key="t/data/day=07/f.parquet", Body=b"x" * 107)
    client.delete_object(Bucket=bucket, Key="t/data/day=11/f.parquet")  # a quarantine file
    with pytest.raises(StorageError, match=r"s3://.*/t/data/day=11/f.parquet: written with 111 bytes, now missing"):
        verify_written(outcome, s3)
