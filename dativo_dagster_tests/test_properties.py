"""Property-based tests of extract + validate (and, twice, a whole run) against a reference in plain Python.

For generated schemas (1-6 columns of every type, decimal(p,s) included) and generated rows (valid and
invalid text for every type; strings full of delimiters, quotes and line breaks), written with Python's own
``csv`` module:

- every record comes out exactly once, as a valid row or a rejected one (blank records aside, see below);
- a valid row's values are what an independent reference parser (``int``, ``float``, ``Decimal``,
  ``datetime``, written from CONTRACT section 2 and nothing in ``dativo_dagster.parsing``) makes of the text,
  and a row is rejected exactly when the reference refuses one of its cells;
- a rejected row keeps every cell's original text and the physical line its record starts on;
- ``strict`` commits nothing when any row is bad; ``warn`` commits the valid rows and quarantines the rest.

A record whose fields are all empty is a blank line to the reader and is skipped (README, "Types").
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dativo_dagster.sources.csv import FileReport, SourceFile, read_source_file
from dativo_dagster.spec import CsvOptions, FieldSpec
from dativo_dagster.storage import S3Settings
from dativo_dagster.validate import validate_batch
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

# --- the reference: CONTRACT section 2 in plain Python ---------------------------------------------------------

NULL_VALUES = ("", "NULL", "null", "None")
BLANKS = " \t"
TRUE_WORDS = {"true", "t", "yes", "y", "on", "1"}
FALSE_WORDS = {"false", "f", "no", "n", "off", "0"}
INT64 = (-(2**63), 2**63 - 1)
BAD = object()  # the reference refuses the text
_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_DECIMAL = re.compile(r"[+-]?(?:(\d+)(?:\.(\d*))?|\.(\d+))")
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_TIME = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")
_OFFSET = re.compile(r"Z|([+-])(\d{2})(?::?(\d{2}))?")


def reference(text: str, type_name: str) -> Any:
    """What ``text`` means in a column of ``type_name``: a value, None (null) or BAD."""
    if type_name == "string":
        return None if text in NULL_VALUES else text
    text = text.strip(BLANKS)
    if text in NULL_VALUES:
        return None
    if type_name == "integer":
        if not re.fullmatch(r"[+-]?\d+", text):
            return BAD
        value = int(text)
        return value if INT64[0] <= value <= INT64[1] else BAD
    if type_name == "double":
        if not _FLOAT.fullmatch(text):
            return BAD
        value = float(text)
        if "inf" in text.lower() or "nan" in text.lower():
            return value
        if math.isinf(value) or (value != 0.0 and abs(value) < sys.float_info.min):
            return BAD  # overflow, or a subnormal result (fewer than 53 significant bits)
        if value == 0.0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
            return BAD  # a non-zero number rounded to zero
        return value
    if type_name == "boolean":
        word = text.lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else BAD
    if type_name.startswith("decimal"):
        precision, scale = (int(n) for n in re.findall(r"\d+", type_name))
        match = _DECIMAL.fullmatch(text)
        if not match:
            return BAD
        whole = (match.group(1) or "").lstrip("0")
        fraction = match.group(2) if match.group(1) is not None else match.group(3)
        if len(fraction or "") > scale or len(whole) > precision - scale:
            return BAD
        return Decimal(text)
    return _reference_time(text, type_name)


def _reference_time(text: str, type_name: str) -> Any:
    day = _DATE.match(text)
    if not day:
        return BAD
    rest = text[day.end():]
    try:
        base = date(int(day.group(1)), int(day.group(2)), int(day.group(3)))
    except ValueError:
        return BAD
    if type_name == "date":
        if rest and not re.fullmatch(r"[T ]00:00(?::00(?:\.0{1,6})?)?", rest):
            return BAD
        return base
    if not rest or rest[0] not in "T ":
        return BAD
    clock = _TIME.match(rest, 1)
    if not clock:
        return BAD
    hour, minute, second = int(clock.group(1)), int(clock.group(2)), int(clock.group(3) or 0)
    if hour > 23 or minute > 59 or second > 59:
        return BAD
    micros = int((clock.group(4) or "").ljust(6, "0"))
    value = datetime(base.year, base.month, base.day, hour, minute, second, micros)
    tail = rest[clock.end():]
    if type_name == "timestamp":
        return value if not tail else BAD
    offset = timedelta(0)
    if tail:
        zone = _OFFSET.fullmatch(tail)
        if not zone:
            return BAD
        if zone.group(1):
            hours, minutes = int(zone.group(2)), int(zone.group(3) or 0)
            if hours > 23 or minutes > 59:
                return BAD
            offset = timedelta(hours=hours, minutes=minutes) * (1 if zone.group(1) == "+" else -1)
    try:
        return (value - offset).replace(tzinfo=UTC)
    except OverflowError:
        return BAD


# --- generated text ---------------------------------------------------------------------------------------------

TYPE_NAMES = ("string", "integer", "double", "boolean", "date", "timestamp", "timestamptz")
JUNK = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
SPACES = st.sampled_from(["", " ", "\t", "  "])


def _spaced(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(SPACES, inner, SPACES).map("".join)


def _date_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.dates().map(date.isoformat),
        st.tuples(st.integers(0, 10000), st.integers(0, 13), st.integers(0, 32)).map(
            lambda t: f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}"
        ),
    )


def _clock_text() -> st.SearchStrategy[str]:
    return st.tuples(
        st.integers(0, 25), st.integers(0, 61), st.one_of(st.none(), st.integers(0, 61)),
        st.one_of(st.none(), st.integers(0, 999999).map(str), st.just("1234567")),
    ).map(lambda t: f"{t[0]:02d}:{t[1]:02d}" + ("" if t[2] is None else f":{t[2]:02d}" + ("" if t[3] is None else f".{t[3]}")))


def _offset_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""), st.just("Z"),
        st.tuples(st.sampled_from("+-"), st.integers(0, 25), st.integers(0, 61), st.sampled_from([":", ""])).map(
            lambda t: f"{t[0]}{t[1]:02d}{t[3]}{t[2]:02d}"
        ),
    )


def _decimal_text(precision: int, scale: int) -> st.SearchStrategy[str]:
    digits = st.text("0123456789", min_size=0, max_size=precision + 2)
    return st.tuples(st.sampled_from(["", "-", "+"]), digits, st.sampled_from([".", ""]), digits).map(
        lambda t: f"{t[0]}{t[1]}{t[2]}{t[3]}"
    )


def text_for(type_name: str) -> st.SearchStrategy[str]:
    """Cell text for a column of ``type_name``: mostly plausible, some of it just wrong."""
    specials = st.sampled_from(["", "NULL", "null", "None", " NULL ", "NaN", "Infinity", "-inf", "nan(1)", "1e400"])
    if type_name == "string":
        return st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20) | st.sampled_from(
            ['a,b', '"', '""', "line\nbreak", "cr\rlf\r\n", ",", " ", "NULL"]
        )
    if type_name == "integer":
        plausible = st.integers(-(2**64), 2**64).map(str) | st.sampled_from([str(INT64[1]), str(INT64[0]), "+7", "0x1f", "1e3"])
    elif type_name == "double":
        plausible = st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.sampled_from(
            ["1.", ".5", "-0", "1E5", "1e-400", "INF", "+Infinity", "1.7976931348623157e308", "1e309", "5e-324",
             "1e-310", "0e-999", "-0.0e5"]
        )
    elif type_name == "boolean":
        plausible = st.sampled_from(sorted(TRUE_WORDS | FALSE_WORDS | {"TRUE", "Yes", "nope", "2", "Y"}))
    elif type_name == "date":
        plausible = _date_text() | st.tuples(_date_text(), st.sampled_from([" 00:00", "T00:00:00", "T00:00:00.000", " 00:00:01"])).map("".join)
    elif type_name in ("timestamp", "timestamptz"):
        plausible = st.tuples(_date_text(), st.sampled_from(["T", " ", "t"]), _clock_text(), _offset_text()).map("".join)
    else:
        precision, scale = (int(n) for n in re.findall(r"\d+", type_name))
        plausible = _decimal_text(precision, scale)
    return st.one_of(_spaced(plausible), plausible, specials, JUNK)


@st.composite
def type_names(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from((*TYPE_NAMES, "decimal")))
    if name != "decimal":
        return name
    precision = draw(st.integers(1, 38))
    return f"decimal({precision},{draw(st.integers(0, precision))})"


@dataclass(frozen=True)
class Dataset:
    """A schema, the rows' cell texts, and the CSV file they make."""

    types: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    @property
    def names(self) -> list[str]:
        return [f"c{i}" for i in range(len(self.types))]

    def fields(self, required: Sequence[bool] | None = None) -> list[FieldSpec]:
        flags = required or [False] * len(self.types)
        return [FieldSpec(name=n, type=t, required=r) for n, t, r in zip(self.names, self.types, flags, strict=True)]

    def csv_bytes(self) -> tuple[bytes, list[int]]:
        """The file, written by Python's csv module, and the physical line each row starts on."""
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(self.names)
        starts = []
        line = 2
        for row in self.rows:
            before = out.tell()
            writer.writerow(row)
            starts.append(line)
            written = out.getvalue()[before:]
            line += written.count("\n") + written.count("\r") - written.count("\r\n")
        return out.getvalue().encode(), starts

    def expected(self) -> list[tuple[int, tuple[str, ...], list[Any] | None]]:
        """(line, cells, reference values or None when rejected) of every record the reader keeps."""
        _, starts = self.csv_bytes()
        out = []
        for line, row in zip(starts, self.rows, strict=True):
            if all(cell == "" for cell in row):
                continue  # a blank record: skipped by the reader
            values = [reference(cell, t) for cell, t in zip(row, self.types, strict=True)]
            out.append((line, row, None if any(v is BAD for v in values) else values))
        return out


@st.composite
def datasets(draw: st.DrawFn, max_rows: int = 12) -> Dataset:
    types = tuple(draw(st.lists(type_names(), min_size=1, max_size=6)))
    cells = st.tuples(*(text_for(t) for t in types))
    rows = tuple(draw(st.lists(cells, min_size=1, max_size=max_rows)))
    return Dataset(types, rows)


# --- comparison helpers ------------------------------------------------------------------------------------------


def comparable(value: Any) -> Any:
    """NaN equals NaN; -0.0 equals 0.0 already."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def extract_and_validate(data: Dataset, folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], FileReport]:
    """The plain-function path of a run: read the file, validate every batch."""
    content, _ = data.csv_bytes()
    path = folder / "data.csv"
    path.write_bytes(content)
    source = SourceFile(uri=str(path), size=len(content), version="1")
    report = FileReport(uri=source.uri)
    fields = data.fields()
    valid: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for batch in read_source_file(source, fields, CsvOptions(), S3Settings(), report):
        good, bad, tally = validate_batch(batch, fields, CsvOptions().null_values)
        assert tally.rows_read == good.num_rows + bad.num_rows == batch.num_rows
        valid += good.to_pylist()
        rejected += bad.to_pylist()
    return valid, rejected, report


def assert_matches_reference(data: Dataset, valid: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
    expected = data.expected()
    want_valid = [values for _, _, values in expected if values is not None]
    want_rejected = [(line, cells) for line, cells, values in expected if values is None]
    assert len(valid) + len(rejected) == len(expected)
    got_valid = [[comparable(row[n]) for n in data.names] for row in valid]
    assert got_valid == [[comparable(v) for v in values] for values in want_valid]
    got_rejected = [(row["_source_line"], tuple(row[n] for n in data.names)) for row in rejected]
    assert got_rejected == want_rejected
    assert all(row["_reject_reason"] and row["_raw_record"] is None for row in rejected)


# --- the properties ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=datasets())
def test_every_record_is_valid_or_rejected_once_and_agrees_with_the_reference(data: Dataset) -> None:
    with tempfile.TemporaryDirectory() as folder:
        valid, rejected, report = extract_and_validate(data, Path(folder))
    assert_matches_reference(data, valid, rejected)
    assert report.rows == len(valid) + len(rejected)
    assert report.blank_records == sum(all(c == "" for c in row) for row in data.rows)


@settings(max_examples=40, deadline=None)
@given(type_name=type_names(), cells=st.data())
def test_a_single_column_of_each_type_agrees_with_the_reference(type_name: str, cells: st.DataObject) -> None:
    """One type at a time, many values: the reference and the vectorised parser agree cell by cell."""
    rows = tuple((cell,) for cell in cells.draw(st.lists(text_for(type_name), min_size=1, max_size=40)))
    data = Dataset((type_name,), rows)
    with tempfile.TemporaryDirectory() as folder:
        valid, rejected, _ = extract_and_validate(data, Path(folder))
    assert_matches_reference(data, valid, rejected)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(max_rows=8).filter(lambda d: any(v is None for _, _, v in d.expected())))
def test_whole_runs_commit_exactly_the_valid_rows_and_strict_commits_nothing_when_one_is_bad(data: Dataset) -> None:
    """Two small materializations per example: strict (all or nothing) and warn (split, nothing lost)."""
    content, _ = data.csv_bytes()
    expected = data.expected()
    schema = [{"name": n, "type": t} for n, t in zip(data.names, data.types, strict=True)]
    with tempfile.TemporaryDirectory() as folder:
        strict = Project(Path(folder) / "strict")
        strict.write_spec(base_spec(schema=schema))
        strict.write_data("people.csv", content)
        result = strict.materialize()
        assert not result.success
        assert not list(strict.warehouse.rglob("*.parquet"))
        catalog = strict.catalog()
        assert not catalog.table_exists("testdomain.people") or branch_rows(strict.table("testdomain.people"), "acme") == []

        warn = Project(Path(folder) / "warn")
        warn.write_spec(base_spec(schema=schema, schema_validation_mode="warn"))
        warn.write_data("people.csv", content)
        result = warn.materialize()
        assert result.success
        committed = [tuple(comparable(r[n]) for n in data.names) for r in branch_rows(warn.table("testdomain.people"), "acme")]
        want = [tuple(comparable(v) for v in values) for _, _, values in expected if values is not None]
        assert sorted(committed, key=repr) == sorted(want, key=repr)
        rejects = branch_rows(warn.table("testdomain.people__rejects"), "acme")
        got_rejects = sorted((r["_source_line"], tuple(r[n] for n in data.names)) for r in rejects)
        assert got_rejects == [(line, cells) for line, cells, values in expected if values is None]
        assert len(committed) + len(rejects) == len(expected)


def test_the_reference_itself_on_known_answers() -> None:
    """The reference is only as good as its own answers: a few that CONTRACT section 2 spells out."""
    assert reference(" 42 ", "integer") == 42 and reference(str(2**63), "integer") is BAD
    assert reference("1e400", "double") is BAD and math.isinf(reference("-Infinity", "double"))
    assert reference("1.50", "decimal(3,2)") == Decimal("1.5") and reference("1.505", "decimal(3,2)") is BAD
    assert reference("0001.5", "decimal(2,1)") == Decimal("1.5") and reference("10.5", "decimal(2,1)") is BAD
    assert reference("2024-02-29T00:00", "date") == date(2024, 2, 29) and reference("2023-02-29", "date") is BAD
    assert reference("2024-01-01 24:00:00", "timestamp") is BAD
    assert reference("2024-01-01T00:30+01:00", "timestamptz") == datetime(2023, 12, 31, 23, 30, tzinfo=UTC)
    assert reference("NULL", "string") is None and reference(" NULL ", "string") == " NULL "
    assert reference(" NULL ", "integer") is None and reference("Y", "boolean") is True
    assert pa.scalar(reference("0.5", "decimal(1,1)")).as_py() == Decimal("0.5")
