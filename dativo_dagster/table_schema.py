"""The Iceberg schema and partition spec of a target table, and the Arrow schema of its files."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg import transforms as tf
from pyiceberg.partitioning import PartitionField as IcebergPartitionField
from pyiceberg.partitioning import PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.types import DecimalType, DoubleType, FloatType, NestedField, StringType, TimestamptzType

from dativo_dagster.spec import AssetSpecModel, FieldSpec, PartitionField

INGESTED_AT = "_ingested_at"
SOURCE_FILE = "_source_file"
RUN_ID = "_run_id"
PARTITION_KEY_COLUMN = "_partition"  # a partitioned asset's quarantine: the key of the run that rejected
# ``_source_file`` and ``_run_id`` hold one value per source file and per run: they travel as Arrow dictionaries
# of one entry (no copy of the value per row, and the Parquet writer neither hashes nor compares every row's
# copy); readers of the files and the table see plain strings.
REPEATED_TYPE = pa.dictionary(pa.int32(), pa.string())
_ZERO = pa.scalar(0, pa.int32())
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
MAX_FOLDER_VALUE = 120
PARTITION_FIELD_ID_START = 1000
_UNSAFE = re.compile(r"[^a-z0-9_.-]")
_DOTS = re.compile(r"\.{2,}")
_NAN = float("nan")


def repeated(value: str, rows: int) -> pa.DictionaryArray:
    """``value`` on ``rows`` rows, as a dictionary of one entry (:data:`REPEATED_TYPE`)."""
    return pa.DictionaryArray.from_arrays(pa.repeat(_ZERO, rows), pa.array([value], pa.string()))


def iceberg_schema(fields: Sequence[FieldSpec]) -> Schema:
    """Spec columns in order, then ``_ingested_at``, ``_source_file`` and ``_run_id``.

    Every column is optional in Iceberg: ``required`` is enforced by validation, which keeps
    a later spec change that relaxes it from needing a schema migration.
    """
    columns = [
        NestedField(field_id=i + 1, name=f.name, field_type=f.type.iceberg_type, required=False, doc=f.description)
        for i, f in enumerate(fields)
    ]
    n = len(columns)
    columns += [
        NestedField(field_id=n + 1, name=INGESTED_AT, field_type=TimestamptzType(), required=False),
        NestedField(field_id=n + 2, name=SOURCE_FILE, field_type=StringType(), required=False),
        NestedField(field_id=n + 3, name=RUN_ID, field_type=StringType(), required=False),
    ]
    return Schema(*columns)


def with_partition_key_column(schema: Schema) -> Schema:
    """A partitioned asset's quarantine schema: ``schema`` and ``_partition``, the partition key of the run that
    quarantined the row (a partition's re-run replaces its own rejects; docs/partitions.md)."""
    if PARTITION_KEY_COLUMN in schema.column_names:
        return schema
    next_id = max(f.field_id for f in schema.fields) + 1
    return Schema(*schema.fields, NestedField(field_id=next_id, name=PARTITION_KEY_COLUMN, field_type=StringType(),
                                              required=False))


def rejects_iceberg_schema(fields: Sequence[FieldSpec]) -> Schema:
    """Quarantine table: every spec column as text, the reason, file, line and raw record."""
    names = [f.name for f in fields] + ["_reject_reason"]
    columns = [
        NestedField(field_id=i + 1, name=name, field_type=StringType(), required=False) for i, name in enumerate(names)
    ]
    from pyiceberg.types import LongType  # noqa: PLC0415

    n = len(columns)
    columns += [
        NestedField(field_id=n + 1, name=SOURCE_FILE, field_type=StringType(), required=False),
        NestedField(field_id=n + 2, name="_source_line", field_type=LongType(), required=False),
        NestedField(field_id=n + 3, name="_raw_record", field_type=StringType(), required=False),
        NestedField(field_id=n + 4, name=INGESTED_AT, field_type=TimestamptzType(), required=False),
        NestedField(field_id=n + 5, name=RUN_ID, field_type=StringType(), required=False),
    ]
    return Schema(*columns)


def _transform(part: PartitionField) -> tf.Transform[Any, Any]:
    if part.transform == "bucket":
        return tf.BucketTransform(part.width or 1)
    if part.transform == "truncate":
        return tf.TruncateTransform(part.width or 1)
    return {
        "identity": tf.IdentityTransform,
        "day": tf.DayTransform,
        "month": tf.MonthTransform,
        "year": tf.YearTransform,
        "hour": tf.HourTransform,
    }[part.transform]()


def partition_spec(spec: AssetSpecModel, schema: Schema) -> PartitionSpec:
    """The Iceberg partition spec that matches the Hive folders the writer makes."""
    fields = []
    for i, part in enumerate(spec.target.partition_fields):
        source = schema.find_field(part.source)
        transform = _transform(part)
        if not transform.can_transform(source.field_type):
            raise ValueError(
                f"target.partitioning[{i}]: {part.transform} cannot apply to {source.field_type} field {part.source!r}"
            )
        fields.append(
            IcebergPartitionField(
                source_id=source.field_id, field_id=PARTITION_FIELD_ID_START + i, transform=transform, name=part.name
            )
        )
    return PartitionSpec(*fields)


def arrow_schema(schema: Schema) -> pa.Schema:
    """Arrow schema of data files, carrying the Iceberg field ids so any reader maps columns by id."""
    out = []
    for field in schema.fields:
        arrow_type = _arrow_type(field)
        field_id = {b"PARQUET:field_id": str(field.field_id).encode()}
        out.append(pa.field(field.name, arrow_type, nullable=not field.required, metadata=field_id))
    return pa.schema(out)


def _arrow_type(field: NestedField) -> pa.DataType:
    from pyiceberg.io.pyarrow import schema_to_pyarrow  # noqa: PLC0415

    arrow_type = schema_to_pyarrow(Schema(field), include_field_ids=False).field(0).type
    return pa.string() if arrow_type == pa.large_string() else arrow_type


class Partitioner:
    """Computes each row's Iceberg partition values and the Hive folder they go to."""

    def __init__(self, spec: PartitionSpec, schema: Schema):
        self.spec = spec
        self.schema = schema
        self.fields = list(spec.fields)
        self._sources = [schema.find_field(f.source_id) for f in self.fields]
        self._functions = [
            f.transform.pyarrow_transform(src.field_type) for f, src in zip(self.fields, self._sources, strict=True)
        ]

    @property
    def partitioned(self) -> bool:
        return bool(self.fields)

    def split(self, table: pa.Table) -> list[tuple[tuple[Any, ...], pa.Table]]:
        """Group rows by partition; returns (partition record values, rows) per partition.

        The rows of each partition are zero-copy slices of one copy of ``table`` sorted by partition (see
        :meth:`sort`): together they keep that copy alive.
        """
        ordered, bounds, keys = self.sort(table)
        return [
            (values, ordered.slice(start, end - start))
            for values, start, end in zip(keys, bounds[:-1], bounds[1:], strict=True)
        ]

    def sort(
        self, table: pa.Table, extra: Sequence[pa.Array | pa.ChunkedArray] = ()
    ) -> tuple[pa.Table, list[int], list[tuple[Any, ...]]]:
        """The rows of ``table`` ordered by partition (then by the ``extra`` key columns), in one ``take``.

        Returns the ordered table, the boundaries of its groups (``bounds[i]:bounds[i + 1]`` holds group ``i``) and
        each group's key: its partition record values, followed by its ``extra`` values when there are any. One
        group (a day's rows in a batch of that day) gives ``table`` itself, with no copy.
        """
        n = table.num_rows
        if n == 0:
            return table, [0], []
        keys = [fn(_combine(table.column(src.name))) for fn, src in zip(self._functions, self._sources, strict=True)]
        keys += [_combine(column) for column in extra]
        if not keys:
            return table, [0, n], [()]
        names = [f"k{i}" for i in range(len(keys))]
        key_table = pa.table(dict(zip(names, keys, strict=True)))
        order = pc.sort_indices(key_table, sort_keys=[(name, "ascending", "at_end") for name in names])
        sorted_keys = key_table.take(order)
        change = None
        for name in names:
            differs = _differs_from_previous(_combine(sorted_keys.column(name)))
            change = differs if change is None else pc.or_(change, differs)
        starts = pa.concat_arrays([pa.array([0], pa.int64()), pc.add(pc.indices_nonzero(change), 1).cast(pa.int64())])
        bounds = [*starts.to_pylist(), n]
        firsts = [sorted_keys.column(name).take(starts).to_pylist() for name in names]
        fields = len(self.fields)
        groups = [
            tuple(self._record_value(i, column[g]) if i < fields else column[g] for i, column in enumerate(firsts))
            for g in range(len(starts))
        ]
        if len(groups) == 1:
            return table, bounds, groups
        # one contiguous copy in partition order, so that each group is a zero-copy slice of single chunks
        return table.take(order).combine_chunks(), bounds, groups

    def _record_value(self, index: int, value: Any) -> Any:
        field = self.fields[index]
        if value is None:
            return None
        if isinstance(value, float) and math.isnan(value):
            return _NAN  # one NaN object, so that partition keys holding NaN compare equal
        if isinstance(field.transform, tf.IdentityTransform):
            from pyiceberg.partitioning import _to_partition_representation  # noqa: PLC0415

            return _to_partition_representation(self._sources[index].field_type, value)
        return value

    def hive_path(self, values: tuple[Any, ...]) -> str:
        """``name=value/...`` with path-safe values; empty for an unpartitioned table."""
        parts = []
        for field, source, value in zip(self.fields, self._sources, values, strict=True):
            if value is None:
                text = HIVE_NULL
            else:
                text = safe_folder_value(field.transform.to_human_string(source.field_type, value))
            parts.append(f"{safe_folder_value(field.name)}={text}")
        return "/".join(parts)

    def result_types(self) -> list[Any]:
        return [f.transform.result_type(src.field_type) for f, src in zip(self.fields, self._sources, strict=True)]

    def to_json(self, values: tuple[Any, ...]) -> list[Any]:
        """Partition values as JSON-safe scalars (decimals, NaN and infinities as text)."""
        return [_json_scalar(v) for v in values]

    def from_json(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """Inverse of :meth:`to_json`."""
        return tuple(_from_json_scalar(v, t) for v, t in zip(values, self.result_types(), strict=True))


def _from_json_scalar(value: Any, result_type: Any) -> Any:
    if isinstance(value, str) and isinstance(result_type, DecimalType):
        return Decimal(value)
    if isinstance(value, str) and isinstance(result_type, (FloatType, DoubleType)):
        number = float(value)
        return _NAN if math.isnan(number) else number
    return value


def _json_scalar(value: Any) -> Any:
    if isinstance(value, Decimal) or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return value


def _differs_from_previous(column: pa.Array) -> pa.Array:
    """For each value after the first: whether it starts a new group (nulls and NaNs group together)."""
    prev, cur = column.slice(0, len(column) - 1), column.slice(1)
    same = pc.fill_null(pc.equal(prev, cur), False)
    same = pc.or_(same, pc.and_(prev.is_null(), cur.is_null()))
    if pa.types.is_floating(column.type):
        same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(prev), pc.is_nan(cur)), False))
    return pc.invert(same)


def _combine(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def safe_folder_value(text: str) -> str:
    """Lower case, only ``[a-z0-9_.-]``, no ``..``, bounded length: can never leave its folder."""
    out = _UNSAFE.sub("_", text.lower())
    out = _DOTS.sub("_", out)
    if out in ("", "."):
        out = "_"
    if len(out) > MAX_FOLDER_VALUE:
        import hashlib  # noqa: PLC0415

        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        out = f"{out[: MAX_FOLDER_VALUE - 17]}-{digest}"
    return out
