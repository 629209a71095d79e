"""IO managers: small records staged as JSON between ops, and ingested tables for downstream assets."""

from __future__ import annotations

import importlib.util
import typing
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


class StagingIOManager(dg.ConfigurableIOManager):
    """Passes the small typed records between an asset's ops (pydantic models, as JSON files).

    The rows themselves never pass through here: they stream from the source into Parquet files within
    one step (pipeline.py), and the ops exchange what the stream did. JSON files under the staging folder
    also work under the multiprocess executor and for re-execution of a failed run.
    """

    staging: StagingResource

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not isinstance(obj, BaseModel):
            raise TypeError(f"{context.step_key}.{context.name}: cannot stage {type(obj).__name__}")
        self.staging.write(context.run_id, context.step_key, _record_name(context), obj.model_dump_json())

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        assert upstream is not None
        typ = context.dagster_type.typing_type
        if typing.get_origin(typ) is list:  # a fan-in (``.collect()``): Dagster loads each mapped step's record
            [typ] = typing.get_args(typ)
        if not (isinstance(typ, type) and issubclass(typ, BaseModel)):
            raise TypeError(f"{upstream.step_key}.{upstream.name}: cannot load a staged {typ}")
        return typ.model_validate_json(self.staging.read(upstream.run_id, upstream.step_key, _record_name(upstream)))


def _record_name(output: dg.OutputContext) -> str:
    """The staged record's name: the output's, and for one of a dynamic output's records its mapping key too."""
    return f"{output.name}-{output.mapping_key}" if output.mapping_key else output.name


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
            return _to_pandas(data, context)
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


def _to_pandas(data: pa.Table, context: dg.InputContext) -> Any:
    if importlib.util.find_spec("pandas") is None:
        raise ImportError(
            f"input {context.name!r} of {context.op_def.name} asks for {context.asset_key.to_user_string()} as a"
            " pandas DataFrame, but pandas is not installed: install dativo-dagster[pandas]"
        )
    return data.to_pandas()


def _meta_value(value: Any) -> Any:
    return getattr(value, "value", value)


__all__ = ["IcebergTableIOManager", "StagingIOManager"]
