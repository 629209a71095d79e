"""The cursor's building blocks without a server: marks, row keys, the boundary skip and the new mark."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pyarrow as pa
import pytest

from dativo_dagster.cursor import CursorRead, format_mark, parse_mark, row_keys
from dativo_dagster.spec import FieldSpec
from dativo_dagster.types import TypeKind


@pytest.mark.parametrize(
    ("value", "kind", "text"),
    [
        (42, TypeKind.INTEGER, "cursor:42"),
        (date(2024, 2, 29), TypeKind.DATE, "cursor:2024-02-29"),
        (datetime(2024, 1, 2, 3, 4, 5, 123456), TypeKind.TIMESTAMP, "cursor:2024-01-02T03:04:05.123456"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc), TypeKind.TIMESTAMPTZ, "cursor:2024-01-02T03:04:05+00:00"),
    ],
)
def test_a_mark_reads_back_as_the_value_it_was_written_from(value, kind: TypeKind, text: str) -> None:
    assert format_mark(value) == text
    assert parse_mark(text, kind) == value
    assert parse_mark("", kind) is None and parse_mark("123:456", kind) is None  # no mark: a first run


def test_row_keys_tell_null_from_empty_text_and_never_join_across_columns() -> None:
    table = pa.table({
        "a": pa.array(["x\x1fy", "x", None, "", "\\N", "a\\"], pa.string()),
        "b": pa.array(["z", "y\x1fz", "", None, None, "\x1fb"], pa.string()),
    })
    keys = row_keys(table, ["a", "b"]).to_pylist()
    assert len(set(keys)) == len(keys)  # six different rows, six different keys
    assert row_keys(table, ["a", "b"]).to_pylist() == keys  # and the same rows give the same keys


def test_observe_skips_committed_rows_and_keeps_the_highest_cursor_read() -> None:
    field = FieldSpec(name="at", type="timestamp", required=True)
    at = [datetime(2024, 1, 1, h) for h in (1, 2, 2, 3)]
    valid = pa.record_batch({"id": pa.array([1, 2, 3, 4], pa.int64()), "at": pa.array(at, pa.timestamp("us"))})
    committed = row_keys(valid.slice(1, 1), ["id", "at"])  # (2, 02:00) is committed; (3, 02:00) is new
    read = CursorRead(field, ["id", "at"], committed, mark=datetime(2024, 1, 1, 2))
    rejects = pa.record_batch({"at": pa.array(["2024-01-01 05:00:00"], pa.string())})
    kept = read.observe(valid, rejects)
    assert kept.column("id").to_pylist() == [1, 3, 4] and read.skipped == 1
    assert read.new_mark == datetime(2024, 1, 1, 5)  # a rejected row's cursor counts
    never_back = CursorRead(field, ["id", "at"], committed, mark=datetime(2024, 1, 2))
    never_back.observe(valid, rejects.slice(0, 0))
    assert never_back.new_mark == datetime(2024, 1, 2)
