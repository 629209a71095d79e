"""Write: typed batches become snappy Parquet files, one Hive folder per partition, near a target size."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from dativo_dagster.storage import S3Settings, filesystem_for, is_s3_uri, split_s3_uri
from dativo_dagster.table_schema import Partitioner

log = logging.getLogger(__name__)

MIB = 1 << 20
ROW_GROUP_MAX_BYTES = 64 * MIB  # in-memory bytes buffered per row group
TOTAL_BUFFER_BYTES = 192 * MIB  # in-memory bytes buffered across all partitions
INITIAL_RATIO = 1.0  # compressed/in-memory before the first row group tells us better
CLOSE_FRACTION = 0.92  # a file is finished once it holds this share of the target
MAX_TAGS = 10
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/=+\-@]")


class WrittenFile(BaseModel):
    """One finished data file."""

    uri: str
    size_bytes: int
    record_count: int
    partition_path: str
    partition_values: list[Any]


def tag_safe(value: str, limit: int) -> str:
    """A value S3 accepts as a tag key or value: its character set and length."""
    return _TAG_UNSAFE.sub("_", value)[:limit]


def object_tags(metadata: Mapping[str, str]) -> dict[str, str]:
    """At most 10 object tags drawn from the governance metadata."""
    names = {"domain": "domain", "data-product": "data-product", "tenant": "tenant-id", "owner": "owner",
             "classification": "classification"}
    tags = {tag_safe(k, 128): tag_safe(metadata.get(src, ""), 256) for k, src in names.items() if metadata.get(src)}
    return dict(list(tags.items())[:MAX_TAGS])


class _Sink:
    """Where one file's bytes go: straight to a local path, or a temporary file uploaded to S3."""

    def __init__(self, uri: str, s3: S3Settings):
        self.uri = uri
        self.s3 = s3
        if is_s3_uri(uri):
            handle, self.local_path = tempfile.mkstemp(prefix="dativo-", suffix=".parquet")
            os.close(handle)
        else:
            self.local_path = uri
            os.makedirs(os.path.dirname(uri), exist_ok=True)
        self.stream = pa.OSFile(self.local_path, "wb")

    def publish(self, metadata: Mapping[str, str]) -> None:
        """Make the closed file visible at its URI with its object metadata and tags."""
        if not is_s3_uri(self.uri):
            return
        import boto3  # noqa: PLC0415
        from urllib.parse import urlencode  # noqa: PLC0415

        bucket, key = split_s3_uri(self.uri)
        client = boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint,
            region_name=self.s3.region or "us-east-1",
            aws_access_key_id=self.s3.access_key_id,
            aws_secret_access_key=self.s3.secret_access_key,
        )
        try:
            client.upload_file(
                self.local_path,
                bucket,
                key,
                ExtraArgs={
                    "Metadata": {k: tag_safe(v, 1024) for k, v in metadata.items()},
                    "Tagging": urlencode(object_tags(metadata)),
                    "ContentType": "application/vnd.apache.parquet",
                },
            )
        finally:
            os.unlink(self.local_path)

    def discard(self) -> None:
        if is_s3_uri(self.uri) or os.path.exists(self.local_path):
            try:
                os.unlink(self.local_path)
            except FileNotFoundError:
                pass


@dataclass
class _PartitionState:
    values: tuple[Any, ...]
    path: str
    buffer: list[pa.Table] = field(default_factory=list)
    buffered_bytes: int = 0
    writer: pq.ParquetWriter | None = None
    sink: _Sink | None = None
    written: int = 0
    rows_in_file: int = 0


class PartitionedParquetWriter:
    """Streams tables into per-partition Parquet files that roll over near ``target_bytes``.

    Rows are buffered per partition and written as large row groups; the compression ratio seen
    so far decides how many in-memory bytes make the rest of a file, so files land close to the
    target measured in written (compressed) bytes.
    """

    def __init__(
        self,
        *,
        location: str,
        schema: pa.Schema,
        partitioner: Partitioner,
        target_bytes: int,
        file_prefix: str,
        metadata: Mapping[str, str],
        s3: S3Settings,
    ):
        self.location = location.rstrip("/")
        self.schema = schema
        self.partitioner = partitioner
        self.target_bytes = max(int(target_bytes), 1)
        self.file_prefix = file_prefix
        self.metadata = dict(metadata)
        self.s3 = s3
        self.ratio = INITIAL_RATIO
        self.files: list[WrittenFile] = []
        self._states: dict[tuple[Any, ...], _PartitionState] = {}
        self._buffered = 0
        self._seq = 0

    def write(self, table: pa.Table) -> None:
        """Add rows (already in the file schema)."""
        for values, part in self.partitioner.split(table):
            state = self._states.get(values)
            if state is None:
                state = _PartitionState(values=values, path=self.partitioner.hive_path(values))
                self._states[values] = state
            self._add(state, part)
        while self._buffered > TOTAL_BUFFER_BYTES:
            largest = max(self._states.values(), key=lambda s: s.buffered_bytes)
            self._flush(largest)

    def _limit(self, state: _PartitionState) -> int:
        remaining = max(self.target_bytes - state.written, 1)
        return max(min(int(remaining / self.ratio), ROW_GROUP_MAX_BYTES), 1)

    def _add(self, state: _PartitionState, table: pa.Table) -> None:
        while table.num_rows:
            limit = self._limit(state)
            room = limit - state.buffered_bytes
            size = table.nbytes
            if size <= room:
                state.buffer.append(table)
                state.buffered_bytes += size
                self._buffered += size
                return
            take = max(int(table.num_rows * room / size), 1) if room > 0 else 0
            if take:
                head = table.slice(0, take)
                state.buffer.append(head)
                state.buffered_bytes += head.nbytes
                self._buffered += head.nbytes
                table = table.slice(take)
            self._flush(state)

    def _flush(self, state: _PartitionState) -> None:
        if not state.buffer:
            return
        data = pa.concat_tables(state.buffer).combine_chunks()
        in_memory = state.buffered_bytes
        self._buffered -= state.buffered_bytes
        state.buffer, state.buffered_bytes = [], 0
        if state.writer is None:
            self._open(state)
        assert state.writer is not None and state.sink is not None
        before = state.sink.stream.tell()
        state.writer.write_table(data, row_group_size=max(data.num_rows, 1))
        after = state.sink.stream.tell()
        state.written = after
        state.rows_in_file += data.num_rows
        if in_memory > 0 and after > before:
            observed = (after - before) / in_memory
            self.ratio = observed if self.ratio == INITIAL_RATIO else 0.5 * self.ratio + 0.5 * observed
        if state.written >= self.target_bytes * CLOSE_FRACTION:
            self._close(state)

    def _open(self, state: _PartitionState) -> None:
        self._seq += 1
        name = f"{self.file_prefix}-{uuid.uuid4().hex[:12]}-{self._seq:05d}.parquet"
        folder = f"{self.location}/{state.path}" if state.path else self.location
        sink = _Sink(f"{folder}/{name}", self.s3)
        state.sink = sink
        state.writer = pq.ParquetWriter(
            sink.stream,
            self.schema,
            compression="snappy",
            write_statistics=True,
            use_dictionary=True,
        )
        state.written = 0
        state.rows_in_file = 0

    def _close(self, state: _PartitionState) -> None:
        if state.writer is None or state.sink is None:
            return
        metadata = {**self.metadata, "partition": state.path, "record-count": str(state.rows_in_file)}
        state.writer.add_key_value_metadata({f"dativo.{k}": v for k, v in metadata.items()})
        state.writer.close()
        state.sink.stream.close()
        size = os.path.getsize(state.sink.local_path)
        metadata["file-size-bytes"] = str(size)
        state.sink.publish(metadata)
        self.files.append(
            WrittenFile(
                uri=state.sink.uri,
                size_bytes=size,
                record_count=state.rows_in_file,
                partition_path=state.path,
                partition_values=self.partitioner.to_json(state.values),
            )
        )
        state.writer, state.sink = None, None
        state.written, state.rows_in_file = 0, 0

    def close(self) -> list[WrittenFile]:
        """Flush every buffer, finish every file; returns all files written."""
        for state in list(self._states.values()):
            self._flush(state)
            self._close(state)
        return self.files

    def abort(self) -> None:
        """Close and remove everything this writer wrote (a failed run leaves no files)."""
        for state in self._states.values():
            if state.writer is not None and state.sink is not None:
                try:
                    state.writer.close()
                    state.sink.stream.close()
                finally:
                    state.sink.discard()
        for written in self.files:
            remove_file(written.uri, self.s3)


def remove_file(uri: str, s3: S3Settings) -> None:
    """Delete one data file; missing is fine."""
    fs, path = filesystem_for(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def governance_metadata(spec: Any, *, branch: str, run_id: str, ingested_at: datetime) -> dict[str, str]:
    """User metadata of every data object (CONTRACT section 4), except the per-file keys."""
    return {
        "asset-name": spec.name,
        "asset-version": spec.version,
        "domain": spec.domain,
        "data-product": spec.data_product,
        "tenant-id": spec.tenant,
        "branch": branch,
        "owner": spec.team.owner,
        "retention-days": "" if spec.compliance.retention_days is None else str(spec.compliance.retention_days),
        "classification": ",".join(spec.compliance.classification),
        "ingest-timestamp": ingested_at.isoformat().replace("+00:00", "Z"),
        "run-id": run_id,
    }


def write_batches(batches: Iterable[pa.RecordBatch], writer: PartitionedParquetWriter) -> list[WrittenFile]:
    """Write every batch and close; on any error remove what was written and re-raise."""
    try:
        for batch in batches:
            writer.write(pa.Table.from_batches([batch]))
        return writer.close()
    except BaseException:
        writer.abort()
        raise
