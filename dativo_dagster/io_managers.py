"""IO managers: Arrow streams staged as IPC files between ops, and Iceberg tables for downstream assets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
from pydantic import BaseModel

from dativo_dagster.resources import CatalogResource, StagingResource


def open_staged(path: Path) -> pa.RecordBatchReader:
    """A reader over a staged IPC file, memory-mapped so batches are not copied."""
    source = pa.memory_map(str(path), "r")
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


class StagingIOManager(dg.ConfigurableIOManager):
    """Passes Arrow record-batch streams (as IPC files) and small typed records (as JSON) between ops.

    Streams are never materialised as one table, so memory stays bounded and the ops also work
    under the multiprocess executor.
    """

    staging: StagingResource

    def _path(self, run_id: str, step_key: str, name: str, suffix: str) -> Path:
        return self.staging.run_dir(run_id) / step_key / f"{name}{suffix}"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if isinstance(obj, pa.RecordBatchReader):
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
            return typ.model_validate_json(path.read_text())
        path = self._path(upstream.run_id, upstream.step_key, upstream.name, ".arrow")
        if not path.exists():
            raise FileNotFoundError(f"staged input {upstream.step_key}.{upstream.name} missing at {path}")
        return open_staged(path)


class IcebergTableIOManager(dg.ConfigurableIOManager):
    """Downstream assets receive an ingested table as a ``pyarrow.Table`` or ``pandas.DataFrame``.

    The ingesting asset commits in its own op; storing its output records nothing more.
    Loading reads the head of the asset's branch, so downstream code sees committed data only.
    """

    catalog: CatalogResource

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        return None

    def load_input(self, context: dg.InputContext) -> Any:
        metadata = context.upstream_output.definition_metadata if context.upstream_output else {}
        identifier = _meta_value(metadata.get("dativo/table"))
        branch = _meta_value(metadata.get("dativo/branch")) or "main"
        if not identifier:
            raise ValueError(f"{context.asset_key.to_user_string()} is not an ingested dativo asset")
        table = self.catalog.load_catalog().load_table(identifier)
        snapshot = table.snapshot_by_name(branch) or table.current_snapshot()
        if snapshot is None:
            data = table.schema().as_arrow().empty_table()
        else:
            data = table.scan(snapshot_id=snapshot.snapshot_id).to_arrow()
        typ = context.dagster_type.typing_type
        if getattr(typ, "__name__", "") == "DataFrame":
            return data.to_pandas()
        return data


def _meta_value(value: Any) -> Any:
    return getattr(value, "value", value)


__all__ = ["IcebergTableIOManager", "StagingIOManager", "open_staged", "stage_stream"]
