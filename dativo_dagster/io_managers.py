"""IO managers: Arrow streams staged as IPC files between ops, and ingested tables for downstream assets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel
from pyiceberg.exceptions import NoSuchTableError

from dativo_dagster.markers import committed_files
from dativo_dagster.resources import CatalogResource, StagingResource
from dativo_dagster.storage import filesystem_for, join_uri

TABLE_META = "dativo/table"
BRANCH_META = "dativo/branch"
CATALOG_META = "dativo/catalog"
TABLE_PATH_META = "dativo/table_path"
WAREHOUSE_META = "dativo/warehouse"


def open_staged(path: Path) -> pa.RecordBatchReader:
    """A reader over a staged IPC file, one batch in memory at a time.

    Read with plain file reads rather than a memory map: mapped pages of a large staged file count
    towards the process's resident memory until the reader closes, so memory would grow with input size.
    """
    source = pa.OSFile(str(path), "r")
    reader = pa.ipc.open_file(source)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        finally:
            source.close()

    return pa.RecordBatchReader.from_batches(reader.schema, batches())


def stage_stream(stream: pa.RecordBatchReader, path: Path) -> int:
    """Write a stream of batches to an IPC file; returns the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    tmp = path.with_suffix(".partial")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, stream.schema) as writer:
        for batch in stream:
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
    tmp.replace(path)
    return rows


class ArrowSpill:
    """Batches appended to an IPC file as they arrive, so one pass over a stream can feed two outputs.

    Yield the spill itself as an op output: :class:`StagingIOManager` moves the file into place
    instead of copying it, and downstream ops read it memory-mapped.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.rows = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sink: pa.NativeFile | None = pa.OSFile(str(path), "wb")
        self._writer: pa.ipc.RecordBatchFileWriter | None = pa.ipc.new_file(self._sink, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one batch (in the spill's schema)."""
        if self._writer is None:
            raise ValueError(f"spill {self.path} is already closed")
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def close(self) -> Path:
        """Finish the file (idempotent); returns its path."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        return self.path

    def discard(self) -> None:
        """Close and delete the file."""
        self.close()
        self.path.unlink(missing_ok=True)


class StagingIOManager(dg.ConfigurableIOManager):
    """Passes Arrow record-batch streams (as IPC files) and small typed records (as JSON) between ops.

    Streams are never materialised as one table, so memory stays bounded and the ops also work
    under the multiprocess executor.
    """

    staging: StagingResource

    def _path(self, run_id: str, step_key: str, name: str, suffix: str) -> Path:
        return self.staging.run_dir(run_id) / step_key / f"{name}{suffix}"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if isinstance(obj, ArrowSpill):
            path = self._path(context.run_id, context.step_key, context.name, ".arrow")
            path.parent.mkdir(parents=True, exist_ok=True)
            obj.close().replace(path)
            context.log.debug(f"staged {obj.rows} spilled rows of {context.name} at {path}")
        elif isinstance(obj, pa.RecordBatchReader):
            path = self._path(context.run_id, context.step_key, context.name, ".arrow")
            rows = stage_stream(obj, path)
            context.log.debug(f"staged {rows} rows of {context.name} at {path}")
        elif isinstance(obj, BaseModel):
            path = self._path(context.run_id, context.step_key, context.name, ".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(obj.model_dump_json())
        else:
            raise TypeError(f"{context.step_key}.{context.name}: cannot stage {type(obj).__name__}")

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        assert upstream is not None
        typ = context.dagster_type.typing_type
        if isinstance(typ, type) and issubclass(typ, BaseModel):
            path = self._path(upstream.run_id, upstream.step_key, upstream.name, ".json")
            if not path.exists():
                raise FileNotFoundError(f"staged input {upstream.step_key}.{upstream.name} missing at {path}")
            return typ.model_validate_json(path.read_text())
        path = self._path(upstream.run_id, upstream.step_key, upstream.name, ".arrow")
        if not path.exists():
            raise FileNotFoundError(f"staged input {upstream.step_key}.{upstream.name} missing at {path}")
        return open_staged(path)


class IcebergTableIOManager(dg.ConfigurableIOManager):
    """Downstream assets receive an ingested table as a ``pyarrow.Table`` or ``pandas.DataFrame``.

    The ingesting asset commits in its own op; storing its output records nothing more.
    Loading reads the head of the asset's branch (``catalog: none``: the files of every commit
    marker), so downstream code sees committed data only.
    """

    catalog: CatalogResource

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        return None

    def load_input(self, context: dg.InputContext) -> Any:
        metadata = context.upstream_output.definition_metadata if context.upstream_output else {}
        identifier = _meta_value(metadata.get(TABLE_META))
        if not identifier:
            raise ValueError(f"{context.asset_key.to_user_string()} is not an ingested dativo asset")
        if _meta_value(metadata.get(CATALOG_META)) == "none":
            data = self._read_marked_files(metadata, identifier)
        else:
            data = self._read_branch(identifier, _meta_value(metadata.get(BRANCH_META)) or "main")
        typ = context.dagster_type.typing_type
        if getattr(typ, "__name__", "") == "DataFrame":
            return data.to_pandas()
        return data

    def _read_branch(self, identifier: str, branch: str) -> pa.Table:
        try:
            table = self.catalog.load_catalog().load_table(identifier)
        except NoSuchTableError:
            raise FileNotFoundError(
                f"table {identifier} does not exist in catalog {self.catalog.display_uri}: materialize it first"
            ) from None
        snapshot = table.snapshot_by_name(branch)
        if snapshot is None:
            # nothing was ever committed to this branch: an empty table, never main's rows
            return table.schema().as_arrow().empty_table()
        return table.scan(snapshot_id=snapshot.snapshot_id).to_arrow()

    def _read_marked_files(self, metadata: Any, identifier: str) -> pa.Table:
        storage = self.catalog.storage
        warehouse = _meta_value(metadata.get(WAREHOUSE_META)) or storage.warehouse
        if not warehouse.startswith(("s3://", "s3a://")):
            warehouse = str(Path(warehouse).resolve())
        location = join_uri(warehouse, _meta_value(metadata.get(TABLE_PATH_META)))
        s3 = storage.s3_settings()
        uris = committed_files(location, s3)
        if not uris:
            raise FileNotFoundError(f"{identifier}: no commit marker under {location}: materialize it first")
        tables = []
        for uri in uris:
            fs, path = filesystem_for(uri, s3)
            tables.append(pq.read_table(path, filesystem=fs))
        return pa.concat_tables(tables, promote_options="default")


def _meta_value(value: Any) -> Any:
    return getattr(value, "value", value)


__all__ = ["ArrowSpill", "IcebergTableIOManager", "StagingIOManager", "open_staged", "stage_stream"]
