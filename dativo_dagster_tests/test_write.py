"""Write: partitioned snappy Parquet files near the target size, inside the table location, with metadata."""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.partitioning import _to_partition_representation

from dativo_dagster import write as write_module
from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import HIVE_NULL, Partitioner, arrow_schema, iceberg_schema, partition_spec
from dativo_dagster.write import (
    MAX_TAGS,
    PartitionedParquetWriter,
    WrittenFile,
    governance_metadata,
    object_tags,
    write_batches,
)
from dativo_dagster_tests.conftest import base_spec

MIB = 1 << 20
INGESTED_AT = datetime(2025, 11, 7, 9, 30, tzinfo=UTC)
COLUMNS = [
    {"name": "id", "type": "integer", "required": True},
    {"name": "name", "type": "string"},
    {"name": "amount", "type": "double"},
    {"name": "cat", "type": "string"},
    {"name": "ts", "type": "timestamp"},
]
SAFE_SEGMENT = re.compile(r"^[a-z0-9_.-]+=([a-z0-9_.-]+|__HIVE_DEFAULT_PARTITION__)$")
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -", dtype=np.uint8)


def make_spec(partitioning: list[str], columns: list[dict[str, Any]] = COLUMNS) -> AssetSpecModel:
    return AssetSpecModel.model_validate(base_spec(schema=columns, target={"partitioning": partitioning}))


def make_writer(
    location: Path,
    partitioning: list[str],
    target_bytes: int,
    *,
    prefix: str = "20251107T093000-run1",
    columns: list[dict[str, Any]] = COLUMNS,
) -> PartitionedParquetWriter:
    spec = make_spec(partitioning, columns)
    schema = iceberg_schema(spec.fields)
    return PartitionedParquetWriter(
        location=str(location),
        schema=arrow_schema(schema),
        partitioner=Partitioner(partition_spec(spec, schema), schema),
        target_bytes=target_bytes,
        file_prefix=prefix,
        metadata=governance_metadata(spec, branch="acme", run_id="run-1", ingested_at=INGESTED_AT),
        s3=S3Settings(),
    )


def random_strings(rng: np.random.Generator, n: int, low: int, high: int) -> pa.Array:
    lengths = rng.integers(low, high, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    data = ALPHABET[rng.integers(0, len(ALPHABET), int(offsets[-1]))]
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data.tobytes()))


def realistic_table(
    writer: PartitionedParquetWriter, n: int, *, seed: int = 0, categories: int = 3, constant: bool = False
) -> pa.Table:
    """Rows with real entropy (random ids, text, amounts), categories interleaved row by row."""
    rng = np.random.default_rng(seed)
    start = int(datetime(2025, 11, 1).timestamp() * 1e6)
    if constant:
        ids, names, amounts = np.zeros(n, np.int64), pa.array(["same"] * n), np.zeros(n)
        times = np.full(n, start)
    else:
        ids, names, amounts = rng.integers(0, 2**40, n), random_strings(rng, n, 4, 24), rng.random(n).round(2) * 1000
        times = start + rng.integers(0, 3 * 86_400_000_000, n)
    cats = np.array([f"cat{i}" for i in range(categories)])[rng.integers(0, categories, n)]
    table = pa.table(
        {
            "id": ids,
            "name": names,
            "amount": amounts,
            "cat": pa.array(cats),
            "ts": pa.array(times, pa.timestamp("us")),
            "_ingested_at": pa.repeat(pa.scalar(INGESTED_AT, pa.timestamp("us", tz="UTC")), n),
            "_source_file": pa.repeat(pa.scalar("/data/people.csv"), n),
            "_run_id": pa.repeat(pa.scalar("run-1"), n),
        }
    )
    return table.cast(writer.schema)


def write_all(writer: PartitionedParquetWriter, table: pa.Table, batch_rows: int = 50_000) -> list[WrittenFile]:
    for batch in table.to_batches(max_chunksize=batch_rows):
        writer.write(pa.Table.from_batches([batch]))
    return writer.close()


def by_partition(files: list[WrittenFile]) -> dict[str, list[WrittenFile]]:
    out: dict[str, list[WrittenFile]] = defaultdict(list)
    for f in files:
        out[f.partition_path].append(f)
    return out


def partition_of_rows(writer: PartitionedParquetWriter, table: pa.Table) -> set[tuple[Any, ...]]:
    """Partition values of every row, by pyiceberg's pure Python transforms."""
    partitioner = writer.partitioner
    out = set()
    for row in table.to_pylist():
        values = []
        for field, source in zip(partitioner.fields, partitioner._sources, strict=True):
            value = row[source.name]
            rep = None if value is None else _to_partition_representation(source.field_type, value)
            values.append(None if rep is None else field.transform.transform(source.field_type)(rep))
        out.add(tuple(values))
    return out


def assert_size_rule(files: list[WrittenFile], target: int) -> None:
    """CONTRACT 4: all but the last file of each partition are between half and 110 % of the target."""
    for path, group in by_partition(files).items():
        for f in group:
            assert os.path.getsize(f.uri) == f.size_bytes
        sizes = [f.size_bytes / target for f in group[:-1]]
        assert all(0.5 <= s <= 1.1 for s in sizes), (path, sizes)
        if sizes:
            assert float(np.median(sizes)) >= 0.85, (path, sizes)  # close to the target, not just inside the rule


@pytest.mark.parametrize("target_mb", [1, 8])
def test_file_sizes_follow_the_rule_with_interleaved_partitions(tmp_path, target_mb):
    target = target_mb * MIB
    writer = make_writer(tmp_path / "table" / "data", ["cat"], target)
    table = realistic_table(writer, 2_000_000, seed=target_mb)
    assert table.nbytes > 60 * MIB
    files = write_all(writer, table)
    assert sum(f.record_count for f in files) == table.num_rows
    assert sorted(by_partition(files)) == ["cat=cat0", "cat=cat1", "cat=cat2"]
    assert all(len(group) >= 2 for group in by_partition(files).values())
    assert_size_rule(files, target)


def test_file_sizes_hold_when_compressibility_changes_mid_stream(tmp_path):
    target = 1 * MIB
    writer = make_writer(tmp_path / "data", [], target)
    # nearly free to store first (the ratio learned is tiny), then incompressible, then cheap again
    parts = [
        realistic_table(writer, 400_000, constant=True),
        realistic_table(writer, 300_000, seed=5),
        realistic_table(writer, 400_000, constant=True),
        realistic_table(writer, 100_000, seed=6),
    ]
    files = write_all(writer, pa.concat_tables(parts), batch_rows=20_000)
    assert sum(f.record_count for f in files) == 1_200_000
    assert len(files) > 5
    assert_size_rule(files, target)


def test_a_single_partition_of_unique_short_values_stays_under_the_bound(tmp_path):
    """Dictionary pages of never-repeating short values make written bytes exceed in-memory bytes: the first
    file's sample repeats (so its dates get dictionary pages), every later date is new."""
    columns = [{"name": "d", "type": "date"}, {"name": "i", "type": "integer"}]
    writer = make_writer(tmp_path / "data", [], 1 * MIB, columns=columns)
    n = 600_000
    rng = np.random.default_rng(2)
    days = rng.permutation(n).astype(np.int32) - n // 2
    days[: write_module.DICTIONARY_SAMPLE_ROWS + 5_000] %= 100
    table = pa.table(
        {
            "d": pa.array(days, pa.int32()).cast(pa.date32()),
            "i": rng.integers(0, 2**62, n),
            "_ingested_at": pa.repeat(pa.scalar(INGESTED_AT, pa.timestamp("us", tz="UTC")), n),
            "_source_file": pa.repeat(pa.scalar("/x.csv"), n),
            "_run_id": pa.repeat(pa.scalar("r"), n),
        }
    ).cast(writer.schema)
    files = write_all(writer, table)
    assert len(files) > 3
    assert_size_rule(files, 1 * MIB)
    # the worst case was reached: dictionary pages that outweigh the dates' own 4 bytes
    first = pq.ParquetFile(files[0].uri).metadata
    chunks = [first.row_group(i).column(0) for i in range(first.num_row_groups)]
    assert chunks[0].path_in_schema == "d" and chunks[0].has_dictionary_page
    assert max(c.total_compressed_size / (c.num_values * 4) for c in chunks) > 1.2


def test_files_land_in_hive_folders_and_hold_one_partition_each(tmp_path):
    location = tmp_path / "table" / "data"
    writer = make_writer(location, ["cat", "day(ts)"], 1 * MIB)
    table = realistic_table(writer, 200_000, seed=3)
    files = write_all(writer, table, batch_rows=7_000)
    assert len(by_partition(files)) == 3 * 3  # three categories over three days
    total = 0
    for f in files:
        path = Path(f.uri)
        assert path.parent.parent.parent == location
        assert f"{path.parent.parent.name}/{path.parent.name}" == f.partition_path
        rows = pq.read_table(path)
        total += rows.num_rows
        assert rows.num_rows == f.record_count
        values = writer.partitioner.from_json(f.partition_values)
        assert partition_of_rows(writer, rows) == {values}
        assert writer.partitioner.hive_path(values) == f.partition_path
        cat, day = values
        assert f.partition_path == f"cat={cat}/ts_day={datetime.fromtimestamp(day * 86400, UTC):%Y-%m-%d}"
    assert total == table.num_rows


def test_ingest_date_partition(tmp_path):
    location = tmp_path / "data"
    writer = make_writer(location, ["ingest_date"], 8 * MIB)
    files = write_all(writer, realistic_table(writer, 1000))
    assert [Path(f.uri).parent for f in files] == [location / "ingest_date=2025-11-07"]
    assert files[0].partition_values == [20399]


HOSTILE = [
    "../../etc",
    "..",
    ".",
    "%2e%2e",
    "a/b",
    "/abs/path",
    "nul\x00byte",
    "\u2024\u2024",  # one dot leaders that look like ".."
    "..\u2215..",  # division slash
    "x" * 500,
    "",
    None,
    "CON",
    "~root",
    "a\\..\\b",
]


def test_hostile_partition_values_stay_inside_the_location(tmp_path):
    location = tmp_path / "warehouse" / "table" / "data"
    writer = make_writer(location, ["name", "truncate(3, name)"], 8 * MIB)
    n = len(HOSTILE)
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "name": pa.array(HOSTILE, pa.string()),
            "_ingested_at": pa.repeat(pa.scalar(INGESTED_AT, pa.timestamp("us", tz="UTC")), n),
        }
    )
    table = pa.table(
        {f.name: table.column(f.name) if f.name in table.column_names else pa.nulls(n, f.type) for f in writer.schema}
    ).cast(writer.schema)
    files = write_all(writer, table)
    assert sum(f.record_count for f in files) == n
    root = location.resolve()
    back = {}
    for f in files:
        path = Path(f.uri)
        assert path.resolve().is_relative_to(root)
        segments = path.relative_to(location).parts
        assert len(segments) == 3  # two partition folders and the file
        for segment in segments[:2]:
            assert SAFE_SEGMENT.match(segment), segment
            assert ".." not in segment and len(segment) <= 130
        for row in pq.read_table(path).to_pylist():
            back[row["id"]] = (row["name"], segments[0])
    assert {i: name for i, (name, _) in back.items()} == dict(enumerate(HOSTILE))  # values themselves unchanged
    assert back[HOSTILE.index(None)][1] == f"name={HIVE_NULL}"
    assert back[HOSTILE.index("")][1] == "name=_"
    # nothing was written anywhere else
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == {Path(f.uri) for f in files}


def test_file_names_are_unique_across_writers_and_never_overwrite(tmp_path):
    location = tmp_path / "data"
    first = make_writer(location, ["cat"], 1 * MIB, prefix="same-prefix")
    table = realistic_table(first, 60_000, seed=9)
    first_files = write_all(first, table)
    digests = {f.uri: hashlib.sha256(Path(f.uri).read_bytes()).hexdigest() for f in first_files}
    second = make_writer(location, ["cat"], 1 * MIB, prefix="same-prefix")
    second_files = write_all(second, table)
    uris = [f.uri for f in first_files + second_files]
    assert len(set(uris)) == len(uris) == 2 * len(first_files)
    assert all(Path(u).name.startswith("same-prefix-") and u.endswith(".parquet") for u in uris)
    assert {u: hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in digests} == digests


def test_footer_snappy_field_ids_and_governance_metadata(tmp_path):
    writer = make_writer(tmp_path / "data", ["cat"], 1 * MIB)
    files = write_all(writer, realistic_table(writer, 80_000, seed=4))
    spec = make_spec(["cat"])
    for f in files:
        parquet = pq.ParquetFile(f.uri)
        meta = parquet.metadata
        assert meta.num_rows == f.record_count
        for i in range(meta.num_row_groups):
            for j in range(meta.num_columns):
                assert meta.row_group(i).column(j).compression == "SNAPPY"
        ids = [parquet.schema_arrow.field(name).metadata[b"PARQUET:field_id"] for name in parquet.schema_arrow.names]
        assert ids == [str(i).encode() for i in range(1, len(COLUMNS) + 4)]
        kv = {k.decode(): v.decode() for k, v in meta.metadata.items() if k.startswith(b"dativo.")}
        assert kv == {
            "dativo.asset-name": spec.name,
            "dativo.asset-version": "1.0",
            "dativo.domain": "testdomain",
            "dativo.data-product": "testproduct",
            "dativo.tenant-id": "acme",
            "dativo.branch": "acme",
            "dativo.owner": "owner@example.com",
            "dativo.retention-days": "30",
            "dativo.classification": "internal,pii",
            "dativo.ingest-timestamp": "2025-11-07T09:30:00Z",
            "dativo.run-id": "run-1",
            "dativo.partition": f.partition_path,
            "dativo.record-count": str(f.record_count),
        }


def test_object_tags_are_few_and_tag_safe():
    metadata = governance_metadata(make_spec([]), branch="acme", run_id="r", ingested_at=INGESTED_AT)
    tags = object_tags({**metadata, "owner": "Team <owner@example.com>; drop"})
    assert set(tags) == {"domain", "data-product", "tenant", "owner", "classification"}
    assert len(tags) <= MAX_TAGS
    assert tags["owner"] == "Team _owner@example.com__ drop"
    assert tags["classification"] == "internal_pii"


def test_many_open_partitions_do_not_hold_file_handles(tmp_path, monkeypatch):
    # every partition opens its file and writes a row group at once
    monkeypatch.setattr(write_module, "MIN_ROW_GROUP_BYTES", 0)
    monkeypatch.setattr(write_module, "ROW_GROUP_MAX_BYTES", 0)
    monkeypatch.setattr(write_module, "MAX_OPEN_WRITERS", 5000)
    writer = make_writer(tmp_path / "data", ["id"], 8 * MIB)
    table = realistic_table(writer, 1200, seed=1)
    table = table.set_column(0, "id", pa.array(np.arange(1200), pa.int64()))
    handles_before = len(os.listdir("/proc/self/fd"))
    for batch in table.to_batches(max_chunksize=100):
        writer.write(pa.Table.from_batches([batch]))
    writer._route()
    assert sum(1 for state in writer._states.values() if state.writer is not None) == 1200
    assert len(os.listdir("/proc/self/fd")) < handles_before + 10
    files = writer.close()
    assert len(files) == 1200
    assert all(pq.read_metadata(f.uri).num_rows == 1 for f in files)


def test_write_batches_removes_everything_when_the_stream_fails(tmp_path):
    location = tmp_path / "data"
    writer = make_writer(location, ["cat"], 1 * MIB)
    table = realistic_table(writer, 300_000, seed=8)

    def batches() -> Iterator[pa.RecordBatch]:
        yield from table.to_batches(max_chunksize=50_000)
        raise RuntimeError("validation stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        write_batches(batches(), writer)
    assert writer.files  # some files were finished before the failure ...
    assert [p for p in location.rglob("*") if p.is_file()] == []  # ... and removed with the open ones


def test_write_batches_returns_files_of_every_partition(tmp_path):
    writer = make_writer(tmp_path / "data", ["cat"], 8 * MIB)
    table = realistic_table(writer, 10_000, seed=2)
    files = write_batches(table.to_batches(max_chunksize=999), writer)
    assert sorted(f.partition_path for f in files) == ["cat=cat0", "cat=cat1", "cat=cat2"]
    assert pa.concat_tables([pq.read_table(f.uri) for f in files]).sort_by("id").equals(table.sort_by("id"))


def test_governance_metadata_keys():
    metadata = governance_metadata(make_spec([]), branch="b1", run_id="run-9", ingested_at=INGESTED_AT)
    assert metadata == {
        "asset-name": "people",
        "asset-version": "1.0",
        "domain": "testdomain",
        "data-product": "testproduct",
        "tenant-id": "acme",
        "branch": "b1",
        "owner": "owner@example.com",
        "retention-days": "30",
        "classification": "internal,pii",
        "ingest-timestamp": "2025-11-07T09:30:00Z",
        "run-id": "run-9",
    }


def column_encodings(uri: str) -> list[dict[str, tuple[bool, set[str]]]]:
    """Per row group: column name -> (has a dictionary page, the chunk's value encodings)."""
    meta = pq.ParquetFile(uri).metadata
    groups = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        chunks = [group.column(j) for j in range(meta.num_columns)]
        groups.append(
            {c.path_in_schema: (c.has_dictionary_page, set(c.encodings) - {"RLE", "BIT_PACKED"}) for c in chunks}
        )
    return groups


def test_each_column_gets_the_encoding_that_suits_its_type_and_values(tmp_path):
    columns = [
        {"name": "id", "type": "integer"},
        {"name": "code", "type": "integer"},
        {"name": "name", "type": "string"},
        {"name": "cat", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "day", "type": "date"},
        {"name": "born", "type": "date"},
        {"name": "ts", "type": "timestamp"},
        {"name": "hour", "type": "timestamp"},
        {"name": "flag", "type": "boolean"},
    ]
    writer = make_writer(tmp_path / "data", [], 128 * MIB, columns=columns)
    n = 200_000
    rng = np.random.default_rng(7)
    start = int(datetime(2025, 11, 1).timestamp() * 1e6)
    table = pa.table(
        {
            "id": np.arange(n, dtype=np.int64) + 10_000,  # ascending ids
            "code": rng.integers(0, 40, n),  # a few codes
            "name": random_strings(rng, n, 4, 24),  # mostly unique text
            "cat": pa.array(np.array(["a", "b", "c"])[rng.integers(0, 3, n)]),
            "amount": rng.random(n).round(2) * 1000,
            "day": pa.array(rng.integers(19_000, 19_030, n).astype(np.int32), pa.int32()).cast(pa.date32()),
            "born": pa.array(rng.permutation(n).astype(np.int32), pa.int32()).cast(pa.date32()),  # every day once
            "ts": pa.array(start + np.arange(n) * 1_000_003, pa.timestamp("us")),  # ascending event times
            "hour": pa.array(start + rng.integers(0, 48, n) * 3_600_000_000, pa.timestamp("us")),
            "flag": rng.random(n) < 0.5,
            "_ingested_at": pa.repeat(pa.scalar(INGESTED_AT, pa.timestamp("us", tz="UTC")), n),
            "_source_file": pa.repeat(pa.scalar("/data/people.csv"), n),
            "_run_id": pa.repeat(pa.scalar("run-1"), n),
        }
    ).cast(writer.schema)
    [written] = write_all(writer, table)
    delta = (False, {"DELTA_BINARY_PACKED"})
    plain = (False, {"PLAIN"})
    dictionary = (True, {"PLAIN", "RLE_DICTIONARY"})  # the dictionary page itself is PLAIN
    expected = {
        "id": delta,
        "code": delta,
        "name": plain,
        "cat": dictionary,
        "amount": plain,
        "day": dictionary,
        "born": delta,
        "ts": delta,
        "hour": plain,
        "flag": plain,  # Parquet has no dictionary pages for booleans (bit-packed)
        "_ingested_at": dictionary,
        "_source_file": dictionary,
        "_run_id": dictionary,
    }
    for group in column_encodings(written.uri):
        assert group == expected
    # the delta-encoded ascending ids take next to nothing; values and statistics read back unchanged
    meta = pq.ParquetFile(written.uri).metadata
    id_bytes = sum(meta.row_group(i).column(0).total_compressed_size for i in range(meta.num_row_groups))
    assert id_bytes < n // 100
    assert meta.row_group(0).column(0).statistics.min == 10_000
    assert pq.read_table(written.uri).select(table.column_names).to_pylist() == table.to_pylist()


def interleaved_partitions(writer: PartitionedParquetWriter, n: int, partitions: int, seed: int) -> pa.Table:
    """Rows whose ``cat`` cycles through ``partitions`` values row by row: every batch touches every partition."""
    table = realistic_table(writer, n, seed=seed)
    cats = pa.array([f"p{i % partitions:04d}" for i in range(n)])
    return table.set_column(table.schema.get_field_index("cat"), writer.schema.field("cat"), cats)


def write_watching(writer: PartitionedParquetWriter, table: pa.Table, batch_rows: int) -> tuple[list[WrittenFile], int,
                                                                                                int]:
    """Write ``table`` in batches; returns the files and the most rows buffered and files open after any batch."""
    most_buffered = most_open = 0
    for batch in table.to_batches(max_chunksize=batch_rows):
        writer.write(pa.Table.from_batches([batch]))
        most_buffered = max(most_buffered, writer._buffered)
        most_open = max(most_open, writer._open_writers)
    return writer.close(), most_buffered, most_open


def test_many_partitions_under_a_small_memory_cap_spill_and_end_in_one_file_each(tmp_path, monkeypatch):
    """1,000 partitions, every batch touching all of them, under a 1 MiB buffer and 8 open files: the rows wait in
    the spill file, memory and open files stay within the caps, and each partition ends in one file holding exactly
    its rows, with its footer metadata (CONTRACT 4: a partition's only file may be any size)."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 1 * MIB)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 256 * 1024)
    monkeypatch.setattr(write_module, "MAX_OPEN_WRITERS", 8)
    writer = make_writer(tmp_path / "data", ["cat"], 8 * MIB)
    table = interleaved_partitions(writer, 200_000, 1_000, seed=11)
    assert table.nbytes > 10 * MIB  # ten times the buffer
    files, most_buffered, most_open = write_watching(writer, table, batch_rows=5_000)

    groups = by_partition(files)
    assert sorted(groups) == [f"cat=p{i:04d}" for i in range(1_000)]
    assert all(len(group) == 1 for group in groups.values())
    assert most_open <= 8
    assert most_buffered <= 1 * MIB + 256 * 1024  # the budget, plus at most one split's worth before it is relieved
    assert writer._spill.bytes_written > 5 * MIB  # the rows did go through the spill file
    back = []
    for f in files:
        rows = pq.read_table(f.uri)
        assert rows.num_rows == f.record_count == 200
        assert set(rows.column("cat").to_pylist()) == {f.partition_path.removeprefix("cat=")}
        metadata = pq.read_metadata(f.uri).metadata
        assert metadata[b"dativo.partition"] == f.partition_path.encode()
        assert metadata[b"dativo.record-count"] == b"200"
        assert metadata[b"dativo.run-id"] == b"run-1"
        back.append(rows)
    everything = pa.concat_tables(back).sort_by("id")
    assert everything.num_rows == table.num_rows
    assert everything.column("id").equals(table.sort_by("id").column("id"))
    assert everything.column("_source_file").to_pylist() == ["/data/people.csv"] * table.num_rows
    assert writer._spill._fd is None  # the spill file is closed (it was unlinked when opened)


def test_spilled_partitions_keep_the_size_rule(tmp_path, monkeypatch):
    """Three large partitions under a buffer smaller than a row group and one open file at a time: the two
    partitions that wait are written at the end, and every file but each partition's last is within the rule."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 2 * MIB)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 512 * 1024)
    monkeypatch.setattr(write_module, "MAX_OPEN_WRITERS", 1)
    target = 1 * MIB
    writer = make_writer(tmp_path / "data", ["cat"], target)
    table = realistic_table(writer, 1_000_000, seed=12)
    files, most_buffered, most_open = write_watching(writer, table, batch_rows=20_000)
    assert writer._spill.bytes_written > table.nbytes / 5  # two of the three partitions waited there
    assert most_open <= 1
    assert most_buffered <= 2 * MIB + 512 * 1024
    assert sorted(by_partition(files)) == ["cat=cat0", "cat=cat1", "cat=cat2"]
    assert all(len(group) >= 3 for group in by_partition(files).values())
    assert_size_rule(files, target)
    rows = pa.concat_tables([pq.read_table(f.uri) for f in files])
    assert rows.num_rows == table.num_rows == sum(f.record_count for f in files)
    assert rows.sort_by("id").column("name").equals(table.sort_by("id").column("name"))


def test_spilled_rows_keep_their_source_files(tmp_path, monkeypatch):
    """The dictionary columns go to the spill file as indices: each row comes back with its own source file."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 64 * 1024)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 16 * 1024)
    writer = make_writer(tmp_path / "data", ["cat"], 8 * MIB)
    parts = []
    for index in range(40):
        part = realistic_table(writer, 500, seed=100 + index)
        part = part.set_column(0, writer.schema.field("id"), pa.array(np.arange(500) + index * 500, pa.int64()))
        source = pa.repeat(pa.scalar(f"/data/file-{index:02d}.csv"), 500)
        parts.append(part.set_column(part.schema.get_field_index("_source_file"), "_source_file", source))
    for part in parts:
        writer.write(part)
    files = writer.close()
    assert writer._spill.bytes_written > 0
    rows = pa.concat_tables([pq.read_table(f.uri) for f in files]).to_pylist()
    assert len(rows) == 20_000
    assert all(row["_source_file"] == f"/data/file-{row['id'] // 500:02d}.csv" for row in rows)
    assert {row["_run_id"] for row in rows} == {"run-1"}


def test_a_failed_stream_removes_spilled_and_written_files(tmp_path, monkeypatch):
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 256 * 1024)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 64 * 1024)
    location = tmp_path / "data"
    writer = make_writer(location, ["cat"], 1 * MIB)
    table = interleaved_partitions(writer, 100_000, 300, seed=13)

    def batches() -> Iterator[pa.RecordBatch]:
        yield from table.to_batches(max_chunksize=10_000)
        raise RuntimeError("validation stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        write_batches(batches(), writer)
    assert writer._spill.bytes_written > 0
    assert [p for p in location.rglob("*") if p.is_file()] == []


def test_split_by_source_gives_each_source_file_its_own_files_in_one_pass(tmp_path):
    """catalog: none keeps each source file's rows in files of their own: 500 sources interleaved row by row in
    one batch are grouped by one sort (not a filter over the batch per source), every row with its source."""
    spec = make_spec(["cat"])
    schema = iceberg_schema(spec.fields)
    writer = PartitionedParquetWriter(
        location=str(tmp_path / "data"), schema=arrow_schema(schema),
        partitioner=Partitioner(partition_spec(spec, schema), schema), target_bytes=8 * MIB, file_prefix="p",
        metadata={}, s3=S3Settings(), split_by_source=True,
    )
    n = 20_000
    table = realistic_table(writer, n, seed=14)
    sources = pa.array([f"/data/s{i % 500:03d}.csv" for i in range(n)])
    table = table.set_column(table.schema.get_field_index("_source_file"), "_source_file", sources)
    files = write_all(writer, table, batch_rows=n)
    assert len(files) == 500 * 3  # every (partition, source) pair has a file of its own
    seen = 0
    for f in files:
        rows = pq.read_table(f.uri)
        assert set(rows.column("_source_file").to_pylist()) == set(f.sources) and len(f.sources) == 1
        assert set(rows.column("cat").to_pylist()) == {f.partition_path.removeprefix("cat=")}
        seen += rows.num_rows
    assert seen == n


def test_spills_write_a_few_messages_per_batch_not_one_per_partition(tmp_path, monkeypatch):
    """Issue 19: 2,000 partitions in every batch under a 1 MiB budget: a pressure event writes the batches it spills
    as a few messages each, not one message per partition, and every row comes back to its own partition's file."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 1 * MIB)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 256 * 1024)
    appends = []
    original = write_module._Spill._append

    def counted(self, message):
        appends.append(message.size)
        return original(self, message)

    monkeypatch.setattr(write_module._Spill, "_append", counted)
    writer = make_writer(tmp_path / "data", ["cat"], 8 * MIB)
    table = interleaved_partitions(writer, 100_000, 2_000, seed=21)
    for batch in table.to_batches(max_chunksize=5_000):
        writer.write(pa.Table.from_batches([batch]))
    files = writer.close()
    assert writer._spill.bytes_written > 2 * MIB  # most rows went through the spill file
    assert 0 < len(appends) < 200  # 2,000 partitions x every spilled batch would be tens of thousands
    assert len(files) == 2_000
    for f in files[:50] + files[-50:]:
        rows = pq.read_table(f.uri)
        assert rows.num_rows == f.record_count == 50
        assert set(rows.column("cat").to_pylist()) == {f.partition_path.removeprefix("cat=")}
    back = pa.concat_tables([pq.read_table(f.uri, columns=["id"]) for f in files])
    assert sorted(back.column("id").to_pylist()) == sorted(table.column("id").to_pylist())


def test_arrow_memory_stays_within_the_budget_whatever_the_number_of_partitions(tmp_path, monkeypatch):
    """Issue 19: 5,000 partitions of a few rows each under a 2 MiB budget: the rows Arrow holds while they stream in
    and while the partitions are finished (the spilled rows they read back included) stay near the budget: not a
    padded buffer per partition and batch, nor the whole spill file read back at once."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 2 * MIB)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 512 * 1024)
    # finishing a group of partitions reads the spill messages holding its rows: one or two of every spilled batch
    monkeypatch.setattr(write_module, "SPILL_MESSAGE_BYTES", 16 * 1024)
    writer = make_writer(tmp_path / "data", ["cat"], 8 * MIB)
    table = interleaved_partitions(writer, 200_000, 5_000, seed=22)
    assert table.nbytes > 10 * MIB
    batches = [pa.Table.from_batches([b]) for b in table.to_batches(max_chunksize=5_000)]
    del table
    baseline = pa.total_allocated_bytes()
    peak = 0
    original = pq.ParquetWriter.write_table

    def watched(self, data, *args, **kwargs):  # each row group, while rows stream in and while closing
        nonlocal peak
        peak = max(peak, pa.total_allocated_bytes() - baseline)
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", watched)
    for batch in batches:
        writer.write(batch)
        peak = max(peak, pa.total_allocated_bytes() - baseline)
    files = writer.close()
    assert len(files) == 5_000
    assert sum(f.record_count for f in files) == 200_000
    assert writer._spill.bytes_written > 5 * MIB
    assert peak < 6 * MIB, f"{peak / MIB:.1f} MiB of Arrow memory for a 2 MiB budget"


def test_closing_many_small_partitions_gathers_each_group_at_once(tmp_path, monkeypatch):
    """Issue 19: 2,000 small partitions whose rows wait in 40 batches (most spilled, some still in memory) are
    finished group by group: one gather of the group's rows sorted by partition (one ``take``), each partition's
    file from a zero-copy slice of it, not a slice and a concatenation per partition and batch, and no footer
    estimate for a file that is finished after its only row group. Every file holds exactly its partition's rows, in
    the order they came in."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 2 * MIB)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 128 * 1024)
    writer = make_writer(tmp_path / "data", ["cat"], 8 * MIB)
    n = 80_000
    table = interleaved_partitions(writer, n, 2_000, seed=23)
    table = table.set_column(0, writer.schema.field("id"), pa.array(np.arange(n), pa.int64()))
    for batch in table.to_batches(max_chunksize=2_000):
        writer.write(pa.Table.from_batches([batch]))
    writer._route()
    pending = [state for state in writer._states.values() if state.pending]
    assert len(pending) == 2_000
    assert min(len(state.pending) for state in pending) >= 40  # a range of every batch waits in each partition
    assert any(rows.table is None for rows in writer._resident) or writer._spill.bytes_written > 0
    assert any(rows.table is not None for rows in writer._resident)  # and some are still in memory

    calls = defaultdict(int)

    def counting(name, original):
        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return counted

    monkeypatch.setattr(pa, "concat_tables", counting("concat_tables", pa.concat_tables))
    seen_groups = []
    original_groups = PartitionedParquetWriter._closing_groups

    def recorded(self):
        out = original_groups(self)
        seen_groups.extend(out)
        return out

    monkeypatch.setattr(PartitionedParquetWriter, "_closing_groups", recorded)
    monkeypatch.setattr(PartitionedParquetWriter, "_row_group_footer_bytes",
                        counting("footer", PartitionedParquetWriter._row_group_footer_bytes))
    files = writer.close()

    groups = len(seen_groups)
    assert 1 <= groups <= 20
    assert calls["concat_tables"] <= 2 * groups, calls  # per group, not per partition (2,000)
    assert calls["footer"] == 0, calls
    assert len(files) == 2_000
    for f in files:
        rows = pq.read_table(f.uri)
        cat = f.partition_path.removeprefix("cat=")
        assert rows.num_rows == f.record_count == 40
        assert rows.column("id").to_pylist() == list(range(int(cat[1:]), n, 2_000))  # its rows, in arrival order
        assert set(rows.column("cat").to_pylist()) == {cat}
        assert pq.read_metadata(f.uri).metadata[b"dativo.record-count"] == b"40"
    back = pa.concat_tables([pq.read_table(f.uri) for f in files]).sort_by("id")
    assert back.column("name").equals(table.column("name"))
    assert back.column("_source_file").to_pylist() == ["/data/people.csv"] * n


def test_each_partition_folder_is_created_once_however_many_files_it_gets(tmp_path, monkeypatch):
    """A folder per partition, made once per writer: not a ``makedirs`` (a look-up and a ``mkdir``) per file."""
    made: list[str] = []
    original = os.mkdir

    def counted(path, *args, **kwargs):
        made.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", counted)
    target = 256 * 1024
    writer = make_writer(tmp_path / "data", ["cat"], target)
    files = write_all(writer, realistic_table(writer, 150_000, seed=24), batch_rows=10_000)
    folders = {os.path.dirname(f.uri) for f in files}
    assert len(folders) == 3 and len(files) >= 3 * 5  # several files in each partition folder
    assert sorted(p for p in made if p.startswith(str(tmp_path / "data" / "cat="))) == sorted(folders)
    assert_size_rule(files, target)


def test_a_failure_while_gathered_partitions_are_written_leaves_no_file(tmp_path, monkeypatch):
    """A write that fails while a gathered group's files are written (a full disk) fails the run, and
    ``write_batches`` removes every file the writer made: those finished before it and those still open."""
    monkeypatch.setattr(write_module, "TOTAL_BUFFER_BYTES", 1 * MIB)
    monkeypatch.setattr(write_module, "SPLIT_BYTES", 128 * 1024)
    location = tmp_path / "data"
    writer = make_writer(location, ["cat"], 8 * MIB)
    table = interleaved_partitions(writer, 40_000, 1_000, seed=25)
    opened = []
    original = write_module._Sink.write

    def failing(self, data):
        if self.uri not in opened:
            opened.append(self.uri)
        if len(opened) >= 600:
            raise write_module.StorageError(f"{self.local_path}: cannot write: [Errno 28] No space left on device")
        return original(self, data)

    monkeypatch.setattr(write_module._Sink, "write", failing)
    with pytest.raises(write_module.StorageError, match="No space left on device"):
        write_batches(table.to_batches(max_chunksize=2_000), writer)
    assert len(opened) >= 600  # several hundred files were written before the failure ...
    assert writer._spill.bytes_written > 0
    assert [p for p in location.rglob("*") if p.is_file()] == []  # ... and none is left
