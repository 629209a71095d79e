"""Table schema: Iceberg schema and partition spec from a spec, partition values equal pyiceberg's, safe folders."""

from __future__ import annotations

import json
import math
import random
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from pyiceberg.partitioning import _to_partition_representation
from pyiceberg.types import LongType, StringType, TimestamptzType

from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.table_schema import (
    HIVE_NULL,
    MAX_FOLDER_VALUE,
    Partitioner,
    arrow_schema,
    iceberg_schema,
    partition_spec,
    rejects_iceberg_schema,
    safe_folder_value,
)
from dativo_dagster_tests.conftest import base_spec

SAFE_FOLDER = re.compile(r"^[a-z0-9_.-]+$")
COLUMNS = [
    {"name": "ts", "type": "timestamp"},
    {"name": "tz", "type": "timestamptz"},
    {"name": "d", "type": "date"},
    {"name": "s", "type": "string"},
    {"name": "i", "type": "integer"},
    {"name": "dec", "type": "decimal(10,2)"},
    {"name": "f", "type": "double"},
]


def make_partitioner(partitioning: list[str], columns: list[dict[str, Any]] = COLUMNS) -> tuple[Partitioner, pa.Schema]:
    spec = AssetSpecModel.model_validate(base_spec(schema=columns, target={"partitioning": partitioning}))
    schema = iceberg_schema(spec.fields)
    return Partitioner(partition_spec(spec, schema), schema), arrow_schema(schema)


def random_table(file_schema: pa.Schema, n: int, seed: int = 1) -> pa.Table:
    """Rows with values on both sides of the epoch, boundaries, nulls and non-ASCII text."""
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    epoch = datetime(1970, 1, 1)

    def maybe(value: Any) -> Any:
        return None if rnd.random() < 0.05 else value

    def moment() -> datetime:
        edge = [epoch - timedelta(microseconds=1), epoch, datetime(2000, 2, 29, 23, 59, 59, 999999)]
        return rnd.choice(edge) if rnd.random() < 0.1 else epoch + timedelta(microseconds=rnd.randint(-(2**55), 2**55))

    moments = [maybe(moment()) for _ in range(n)]
    columns = {
        "ts": pa.array(moments, pa.timestamp("us")),
        "tz": pa.array([m.replace(tzinfo=UTC) if m else None for m in moments], pa.timestamp("us", tz="UTC")),
        "d": pa.array([maybe(date(1970, 1, 1) + timedelta(days=rnd.randint(-40000, 40000))) for _ in range(n)]),
        "s": pa.array([maybe("".join(rnd.choice("aé日 Z/.") for _ in range(rnd.randint(0, 6)))) for _ in range(n)]),
        "i": pa.array([maybe(rnd.randint(-(2**40), 2**40)) for _ in range(n)], pa.int64()),
        "dec": pa.array(
            [maybe(Decimal(rnd.randint(-(10**9), 10**9)).scaleb(-2)) for _ in range(n)], pa.decimal128(10, 2)
        ),
        "f": pa.array([maybe(rnd.choice([0.5, -1.25, float("nan")])) for _ in range(n)]),
        "_ingested_at": pa.array([datetime(2025, 11, 7, 13, 5, tzinfo=UTC)] * n, pa.timestamp("us", tz="UTC")),
        "_source_file": pa.array(["/data/x.csv"] * n),
        "_run_id": pa.array(["run"] * n),
    }
    return pa.table(columns).cast(file_schema)


def python_partition_values(partitioner: Partitioner, row: dict[str, Any]) -> tuple[Any, ...]:
    """The partition record pyiceberg's own (pure Python) transforms compute for one row."""
    out = []
    for field, source in zip(partitioner.fields, partitioner._sources, strict=True):
        value = row[source.name]
        if value is None:
            out.append(None)
            continue
        out.append(field.transform.transform(source.field_type)(_to_partition_representation(source.field_type, value)))
    return tuple(out)


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return all(_both_nan(x, y) or x == y for x, y in zip(a, b, strict=True))


def _both_nan(x: Any, y: Any) -> bool:
    return isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)


def test_iceberg_schema_has_spec_columns_then_system_columns_with_ids():
    spec = AssetSpecModel.model_validate(base_spec(schema=COLUMNS))
    schema = iceberg_schema(spec.fields)
    assert [f.name for f in schema.fields] == [c["name"] for c in COLUMNS] + ["_ingested_at", "_source_file", "_run_id"]
    assert [f.field_id for f in schema.fields] == list(range(1, len(COLUMNS) + 4))
    assert schema.find_field("_ingested_at").field_type == TimestamptzType()
    assert schema.find_field("i").field_type == LongType()
    assert not any(f.required for f in schema.fields)


def test_arrow_schema_carries_field_ids_and_plain_strings():
    spec = AssetSpecModel.model_validate(base_spec(schema=COLUMNS))
    schema = arrow_schema(iceberg_schema(spec.fields))
    assert [f.metadata[b"PARQUET:field_id"] for f in schema] == [str(i).encode() for i in range(1, len(schema) + 1)]
    assert schema.field("s").type == pa.string()
    assert schema.field("tz").type == pa.timestamp("us", tz="UTC")
    assert schema.field("dec").type == pa.decimal128(10, 2)


def test_rejects_schema_is_text_with_reason_file_line_and_raw_record():
    spec = AssetSpecModel.model_validate(base_spec(schema=COLUMNS))
    schema = rejects_iceberg_schema(spec.fields)
    assert all(schema.find_field(c["name"]).field_type == StringType() for c in COLUMNS)
    assert [f.name for f in schema.fields][len(COLUMNS) :] == [
        "_reject_reason",
        "_source_file",
        "_source_line",
        "_raw_record",
        "_ingested_at",
        "_run_id",
    ]


def test_partition_spec_names_and_ids():
    partitioner, _ = make_partitioner(["ingest_date", "s", "bucket(8, i)", "truncate(3, s)", "hour(tz)"])
    assert [(f.name, f.field_id, str(f.transform)) for f in partitioner.spec.fields] == [
        ("ingest_date", 1000, "day"),
        ("s", 1001, "identity"),
        ("i_bucket_8", 1002, "bucket[8]"),
        ("s_truncate_3", 1003, "truncate[3]"),
        ("tz_hour", 1004, "hour"),
    ]


def test_partition_spec_refuses_a_transform_the_table_column_cannot_take():
    spec = AssetSpecModel.model_validate(base_spec(schema=COLUMNS, target={"partitioning": ["day(ts)"]}))
    # e.g. a table whose column ``ts`` is text: the spec alone cannot know
    text_columns = AssetSpecModel.model_validate(base_spec(schema=[{"name": "ts", "type": "string"}])).fields
    with pytest.raises(ValueError, match=r"target.partitioning\[0\].*day"):
        partition_spec(spec, iceberg_schema(text_columns))


PARTITIONINGS = [
    ["day(ts)", "month(ts)", "year(ts)", "hour(ts)"],
    ["day(tz)", "month(tz)", "year(tz)", "hour(tz)"],
    ["day(d)", "month(d)", "year(d)"],
    ["bucket(16, s)", "bucket(7, i)", "bucket(5, dec)", "bucket(3, d)", "bucket(4, ts)", "bucket(4, tz)"],
    ["truncate(2, s)", "truncate(10, i)", "truncate(50, dec)"],
    ["s", "i", "dec", "d", "ts", "tz", "f"],
    ["ingest_date"],
]


@pytest.mark.parametrize("partitioning", PARTITIONINGS, ids=[p[0] for p in PARTITIONINGS])
def test_partition_values_equal_pyiceberg_transforms_and_each_group_holds_one_value(partitioning):
    partitioner, file_schema = make_partitioner(partitioning)
    whole = random_table(file_schema, 3000)
    # as the writer gets them: several batches in one table
    table = pa.concat_tables([whole.slice(0, 1000), whole.slice(1000, 1700), whole.slice(2700)])
    groups = partitioner.split(table)
    assert sum(part.num_rows for _, part in groups) == table.num_rows
    key = json.dumps  # rows hold dates, decimals and NaNs: compare their JSON with the default str
    assert sorted(key(r, default=str) for _, part in groups for r in part.to_pylist()) == sorted(
        key(r, default=str) for r in whole.to_pylist()
    )
    seen = []
    for values, part in groups:
        for row in part.to_pylist():
            assert same(python_partition_values(partitioner, row), values)
        seen.append(values)
    # every group is a different partition: NaNs and nulls are grouped, not split row by row
    assert len({json.dumps(partitioner.to_json(v)) for v in seen}) == len(seen)


def test_ingest_date_is_the_day_of_ingested_at_in_utc():
    partitioner, file_schema = make_partitioner(["ingest_date"])
    [(values, part)] = partitioner.split(random_table(file_schema, 10))
    assert values == ((date(2025, 11, 7) - date(1970, 1, 1)).days,)
    assert partitioner.hive_path(values) == "ingest_date=2025-11-07"
    assert part.num_rows == 10


def test_hive_paths_of_time_and_other_transforms():
    partitioner, file_schema = make_partitioner(["day(ts)", "hour(tz)", "month(d)", "year(ts)", "s", "truncate(2, s)"])
    table = pa.table(
        {
            "ts": pa.array([datetime(1969, 12, 31, 23, 59, 59, 999999), None], pa.timestamp("us")),
            "tz": pa.array([datetime(2025, 1, 2, 3, 4, tzinfo=UTC)] * 2, pa.timestamp("us", tz="UTC")),
            "d": pa.array([date(1900, 3, 1)] * 2),
            "s": pa.array(["A/B é", ""]),
        }
    )
    table = table.append_column("_ingested_at", pa.nulls(2, pa.timestamp("us", tz="UTC")))
    full = pa.table(
        {name: table.column(name) if name in table.column_names else pa.nulls(2) for name in file_schema.names}
    )
    paths = sorted(partitioner.hive_path(values) for values, _ in partitioner.split(full.cast(file_schema)))
    assert paths == [
        "ts_day=1969-12-31/tz_hour=2025-01-02-03/d_month=1900-03/ts_year=1969/s=a_b__/s_truncate_2=a_",
        f"ts_day={HIVE_NULL}/tz_hour=2025-01-02-03/d_month=1900-03/ts_year={HIVE_NULL}/s=_/s_truncate_2=_",
    ]


def test_nan_identity_values_form_one_partition():
    partitioner, file_schema = make_partitioner(["f"], [{"name": "f", "type": "double"}])
    n = 7
    table = pa.table(
        {
            "f": pa.array([float("nan"), 1.0, float("nan"), None, float("nan"), None, -0.0]),
            "_ingested_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
            "_source_file": pa.array(["x"] * n),
            "_run_id": pa.array(["r"] * n),
        }
    ).cast(file_schema)
    groups = partitioner.split(table)
    assert sorted((partitioner.hive_path(v), p.num_rows) for v, p in groups) == [
        ("f=-0.0", 1),
        ("f=1.0", 1),
        (f"f={HIVE_NULL}", 2),
        ("f=nan", 3),
    ]


class _Carrier(BaseModel):
    values: list[Any]


def test_partition_values_survive_json_between_steps():
    partitioner, file_schema = make_partitioner(["dec", "f", "s", "d", "bucket(4, i)", "truncate(50, dec)"])
    table = random_table(file_schema, 500, seed=3)
    for values, _ in partitioner.split(table):
        carried = _Carrier.model_validate_json(_Carrier(values=partitioner.to_json(values)).model_dump_json())
        assert same(partitioner.from_json(carried.values), values)
        assert [type(v) for v in partitioner.from_json(carried.values)] == [type(v) for v in values]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("../../etc", "____etc"),
        ("%2e%2e", "_2e_2e"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("nul\x00byte", "nul_byte"),
        ("\u2024\u2024", "__"),
        ("", "_"),
        (".", "_"),
        ("..", "_"),
        ("Mixed.Case-1_2", "mixed.case-1_2"),
        ("2025-11-07", "2025-11-07"),
    ],
)
def test_safe_folder_value_examples(value, expected):
    assert safe_folder_value(value) == expected


def test_safe_folder_value_bounds_long_values_and_keeps_them_apart():
    a, b = safe_folder_value("x" * 500), safe_folder_value("x" * 499 + "y")
    assert len(a) == len(b) == MAX_FOLDER_VALUE
    assert a != b


@given(st.text(max_size=300))
def test_safe_folder_value_is_always_one_safe_path_component(text):
    out = safe_folder_value(text)
    assert SAFE_FOLDER.match(out)
    assert ".." not in out and out not in (".", "")
    assert len(out) <= MAX_FOLDER_VALUE


def test_a_batch_is_split_by_one_take_into_zero_copy_slices():
    """Issue 19: one sorted copy of the batch, then a slice per partition (not a ``take`` per partition, 0.4 ms each
    for 4,000 partitions in every batch): every group's rows share the one sorted buffer, and in order."""
    partitioner, file_schema = make_partitioner(["s"])
    whole = random_table(file_schema, 3000)
    table = pa.concat_tables([whole.slice(0, 1000), whole.slice(1000)])
    groups = partitioner.split(table)
    assert len(groups) > 10
    first_column = [part.column(0) for _, part in groups]
    assert all(column.num_chunks == 1 for column in first_column)
    data_buffers = {column.chunk(0).buffers()[1].address for column in first_column}
    assert len(data_buffers) == 1  # every group is a window on the same sorted buffer
    ordered, bounds, keys = partitioner.sort(table)
    assert [values for values, _ in groups] == [key[: len(partitioner.fields)] for key in keys]
    assert bounds[0] == 0 and bounds[-1] == table.num_rows
    assert [part.num_rows for _, part in groups] == [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
