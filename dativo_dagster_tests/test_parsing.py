"""Tests for text-to-type parsing (CONTRACT section 2)."""

from __future__ import annotations

import math
import re
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dativo_dagster import layouts as layout_module
from dativo_dagster.parsing import ErrorKind, ParsedColumn, parse_column
from dativo_dagster.types import ColumnType

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

MISSING = ErrorKind.MISSING_REQUIRED.value
OOR = ErrorKind.OUT_OF_RANGE.value
BAD_INT = ErrorKind.INVALID_INTEGER.value
BAD_FLOAT = ErrorKind.INVALID_FLOAT.value
BAD_BOOL = ErrorKind.INVALID_BOOLEAN.value
BAD_DATE = ErrorKind.INVALID_DATE.value
BAD_TS = ErrorKind.INVALID_TIMESTAMP.value
BAD_TSTZ = ErrorKind.INVALID_TIMESTAMPTZ.value
BAD_DEC = ErrorKind.INVALID_DECIMAL.value

# Valid neighbours put next to each case: whole-batch fast paths and row-by-row slow paths must agree.
COMPANIONS = {
    "string": ["x"],
    "integer": ["12"],
    "long": ["-7"],
    "float": ["1.5"],
    "double": ["2e3"],
    "boolean": ["true"],
    "date": ["2024-05-06", "2024-05-06 00:00:00"],
    "timestamp": ["2024-05-06T07:08:09", "2024-05-06 07:08:09.123"],
    "timestamptz": ["2024-05-06T07:08:09", "2024-05-06T07:08:09Z", "2024-05-06T07:08:09-05:00"],
}


def parse(texts: list[str | None], type_name: str, **options) -> list[tuple[object, str | None]]:
    """Parse a batch and return (value, error) per row, checking the result's shape on the way."""
    column_type = ColumnType.parse(type_name)
    parsed = parse_column(pa.array(texts, pa.string()), column_type, **options)
    assert isinstance(parsed, ParsedColumn)
    assert parsed.values.type == column_type.arrow_type
    assert parsed.errors.type == pa.string()
    assert len(parsed.values) == len(parsed.errors) == len(texts)
    rows = list(zip(parsed.values.to_pylist(), parsed.errors.to_pylist(), strict=True))
    for value, error in rows:
        assert error is None or value is None, "a rejected row must have a null value"
    return rows


def same(actual: object, expected: object) -> bool:
    """Exact equality that also tells NaN, -0.0, naive and aware datetimes and bool/int apart."""
    if expected is None or actual is None or type(actual) is not type(expected):
        return actual is expected
    if isinstance(expected, float):
        if math.isnan(expected):
            return math.isnan(actual)
        return actual == expected and math.copysign(1, actual) == math.copysign(1, expected)
    if isinstance(expected, datetime):
        zones_match = (actual.tzinfo is None) == (expected.tzinfo is None)
        return zones_match and actual == expected and actual.utcoffset() in (None, timedelta(0))
    return actual == expected


def check(type_name: str, text: str, value: object, error: str | None, **options) -> None:
    """The text alone, after a junk row and next to each valid companion gives value and error."""
    batches = [[text], ["junk!", text], *([companion, text] for companion in COMPANIONS.get(type_name, []))]
    if type_name.startswith("decimal"):
        batches.append(["1", text])
    for batch in batches:
        got_value, got_error = parse(batch, type_name, **options)[-1]
        assert got_error == error, f"{text!r} in {batch}: error {got_error!r}, expected {error!r}"
        assert same(got_value, value), f"{text!r} in {batch}: value {got_value!r}, expected {value!r}"


# --- the contract's type table, cell by cell -------------------------------------------------------------

STRING_CASES = [
    ("abc", "abc", None),
    (" padded\t", " padded\t", None),
    ("", None, None),
    ("NULL", None, None),
    ("null", None, None),
    ("None", None, None),
    (" NULL", " NULL", None),
    ("none", "none", None),
    ("Ünïcødé ✓", "Ünïcødé ✓", None),
    ("0x10", "0x10", None),
]


@pytest.mark.parametrize(("text", "value", "error"), STRING_CASES)
def test_string(text: str, value: object, error: str | None) -> None:
    check("string", text, value, error)


INTEGER_CASES = [
    ("0", 0, None),
    ("42", 42, None),
    ("-42", -42, None),
    ("+42", 42, None),
    ("  42  ", 42, None),
    ("\t42\t", 42, None),
    ("007", 7, None),
    ("-0", 0, None),
    ("+0", 0, None),
    ("9223372036854775807", INT64_MAX, None),
    ("-9223372036854775808", INT64_MIN, None),
    ("+9223372036854775807", INT64_MAX, None),
    ("00009223372036854775807", INT64_MAX, None),
    ("-00009223372036854775808", INT64_MIN, None),
    ("9223372036854775808", None, OOR),
    ("-9223372036854775809", None, OOR),
    ("+9223372036854775808", None, OOR),
    ("99999999999999999999999999999", None, OOR),
    ("10000000000000000000", None, OOR),
    ("1e3", None, BAD_INT),
    ("1.0", None, BAD_INT),
    ("1.", None, BAD_INT),
    ("0x10", None, BAD_INT),
    ("0X1F", None, BAD_INT),
    ("1_000", None, BAD_INT),
    ("1,000", None, BAD_INT),
    ("1 000", None, BAD_INT),
    ("+", None, BAD_INT),
    ("-", None, BAD_INT),
    ("--1", None, BAD_INT),
    ("+-1", None, BAD_INT),
    ("- 1", None, BAD_INT),
    ("\u0663", None, BAD_INT),
    ("\uff11", None, BAD_INT),
    ("abc", None, BAD_INT),
    ("1\n", None, BAD_INT),
    ("nan", None, BAD_INT),
]


@pytest.mark.parametrize(("text", "value", "error"), INTEGER_CASES)
@pytest.mark.parametrize("type_name", ["integer", "long"])
def test_integer(type_name: str, text: str, value: object, error: str | None) -> None:
    check(type_name, text, value, error)


FLOAT_CASES = [
    ("1.5", 1.5, None),
    ("-1.5", -1.5, None),
    ("+1.5", 1.5, None),
    (" 1.5\t", 1.5, None),
    ("0", 0.0, None),
    ("-0.0", -0.0, None),
    ("42", 42.0, None),
    (".5", 0.5, None),
    ("5.", 5.0, None),
    ("1e10", 1e10, None),
    ("1E-5", 1e-5, None),
    ("1.5e+3", 1500.0, None),
    ("-2.5E-3", -0.0025, None),
    ("0.1", 0.1, None),
    ("3.141592653589793", 3.141592653589793, None),
    ("1.7976931348623157e308", 1.7976931348623157e308, None),
    ("2.2250738585072014e-308", 2.2250738585072014e-308, None),
    ("-2.2250738585072014e-308", -2.2250738585072014e-308, None),
    ("0e5", 0.0, None),
    ("0e-999", 0.0, None),
    ("-0e-999", -0.0, None),
    ("000.000E+12", 0.0, None),
    (".0", 0.0, None),
    # below the smallest normal double: rounded to zero, or kept with fewer than 53 significant bits
    ("1e-400", None, OOR),
    ("-1e-400", None, OOR),
    ("0.0001e-320", None, OOR),
    ("4.9e-324", None, OOR),
    ("1e-310", None, OOR),
    ("2.2250738585072009e-308", None, OOR),
    ("NaN", math.nan, None),
    ("nan", math.nan, None),
    ("NAN", math.nan, None),
    ("-nan", math.nan, None),
    ("inf", math.inf, None),
    ("Inf", math.inf, None),
    ("+inf", math.inf, None),
    ("-inf", -math.inf, None),
    ("Infinity", math.inf, None),
    ("-Infinity", -math.inf, None),
    ("INFINITY", math.inf, None),
    ("1e309", None, OOR),
    ("-1e400", None, OOR),
    ("1.8e308", None, OOR),
    ("1e", None, BAD_FLOAT),
    ("e5", None, BAD_FLOAT),
    ("1e+", None, BAD_FLOAT),
    (".", None, BAD_FLOAT),
    ("-", None, BAD_FLOAT),
    ("1.2.3", None, BAD_FLOAT),
    ("0x10", None, BAD_FLOAT),
    ("0x1p3", None, BAD_FLOAT),
    ("1_000", None, BAD_FLOAT),
    ("1,5", None, BAD_FLOAT),
    ("nan(1)", None, BAD_FLOAT),
    ("nan()", None, BAD_FLOAT),
    ("infinit", None, BAD_FLOAT),
    ("inff", None, BAD_FLOAT),
    ("1.5f", None, BAD_FLOAT),
    ("1d5", None, BAD_FLOAT),
    ("- 1", None, BAD_FLOAT),
    ("1 e5", None, BAD_FLOAT),
    ("\u0663.5", None, BAD_FLOAT),
]


@pytest.mark.parametrize(("text", "value", "error"), FLOAT_CASES)
@pytest.mark.parametrize("type_name", ["float", "double"])
def test_float(type_name: str, text: str, value: object, error: str | None) -> None:
    check(type_name, text, value, error)


BOOLEAN_CASES = [
    *[(word, True, None) for word in ("true", "TRUE", "True", "tRuE", "t", "T", "yes", "YES", "Yes", "y", "Y")],
    *[(word, True, None) for word in ("on", "ON", "On", "1", " yes ", "\ttrue")],
    *[(word, False, None) for word in ("false", "FALSE", "False", "f", "F", "no", "NO", "No", "n", "N")],
    *[(word, False, None) for word in ("off", "OFF", "Off", "0", " no\t")],
    *[(word, None, BAD_BOOL) for word in ("2", "-1", "10", "00", "0.0", "truee", "yess", "ja", "oui", "t rue")],
    *[(word, None, BAD_BOOL) for word in ("enabled", "x", "nope", "+1")],
]


@pytest.mark.parametrize(("text", "value", "error"), BOOLEAN_CASES)
def test_boolean(text: str, value: object, error: str | None) -> None:
    check("boolean", text, value, error)


DATE_CASES = [
    ("2024-01-15", date(2024, 1, 15), None),
    (" 2024-01-15 ", date(2024, 1, 15), None),
    ("2024-02-29", date(2024, 2, 29), None),
    ("2000-02-29", date(2000, 2, 29), None),
    ("2023-02-28", date(2023, 2, 28), None),
    ("0001-01-01", date(1, 1, 1), None),
    ("9999-12-31", date(9999, 12, 31), None),
    ("1970-01-01", date(1970, 1, 1), None),
    ("2024-01-15 00:00:00", date(2024, 1, 15), None),
    ("2024-01-15T00:00:00", date(2024, 1, 15), None),
    ("2024-01-15T00:00", date(2024, 1, 15), None),
    ("2024-01-15 00:00:00.000", date(2024, 1, 15), None),
    ("2024-01-15T00:00:00.000000", date(2024, 1, 15), None),
    ("2024-02-29 00:00:00", date(2024, 2, 29), None),
    ("0000-01-01", None, OOR),
    ("2023-02-29", None, BAD_DATE),
    ("2100-02-29", None, BAD_DATE),
    ("2024-04-31", None, BAD_DATE),
    ("2024-13-01", None, BAD_DATE),
    ("2024-00-10", None, BAD_DATE),
    ("2024-01-00", None, BAD_DATE),
    ("2024-01-32", None, BAD_DATE),
    ("2024-1-5", None, BAD_DATE),
    ("24-01-15", None, BAD_DATE),
    ("12024-01-15", None, BAD_DATE),
    ("20240115", None, BAD_DATE),
    ("2024/01/15", None, BAD_DATE),
    ("15/01/2024", None, BAD_DATE),
    ("2024-01-15T", None, BAD_DATE),
    ("2024-01-15 00:00:01", None, BAD_DATE),
    ("2024-01-15T12:00:00", None, BAD_DATE),
    ("2024-01-15T00:00:00.000001", None, BAD_DATE),
    ("2024-01-15T00:00:00.0000000", None, BAD_DATE),
    ("2024-01-15T00:00:00Z", None, BAD_DATE),
    ("2024-01-15T00", None, BAD_DATE),
    ("2023-02-29 00:00:00", None, BAD_DATE),
    ("2024-W03-1", None, BAD_DATE),
]


@pytest.mark.parametrize(("text", "value", "error"), DATE_CASES)
def test_date(text: str, value: object, error: str | None) -> None:
    check("date", text, value, error)


TIMESTAMP_CASES = [
    ("2024-01-15 10:30:00", datetime(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30:00", datetime(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30", datetime(2024, 1, 15, 10, 30), None),
    ("2024-01-15 10:30", datetime(2024, 1, 15, 10, 30), None),
    (" 2024-01-15 10:30:00\t", datetime(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30:00.5", datetime(2024, 1, 15, 10, 30, 0, 500000), None),
    ("2024-01-15T10:30:00.123", datetime(2024, 1, 15, 10, 30, 0, 123000), None),
    ("2024-01-15T10:30:00.123456", datetime(2024, 1, 15, 10, 30, 0, 123456), None),
    ("2024-01-15T10:30:00.000001", datetime(2024, 1, 15, 10, 30, 0, 1), None),
    ("2024-01-15T23:59:59.999999", datetime(2024, 1, 15, 23, 59, 59, 999999), None),
    ("2024-01-15T00:00:00", datetime(2024, 1, 15), None),
    ("2024-02-29T12:00:00", datetime(2024, 2, 29, 12), None),
    ("0001-01-01T00:00:00", datetime(1, 1, 1), None),
    ("9999-12-31T23:59:59.999999", datetime(9999, 12, 31, 23, 59, 59, 999999), None),
    ("1969-12-31T23:59:59.999999", datetime(1969, 12, 31, 23, 59, 59, 999999), None),
    ("0000-06-01T00:00:00", None, OOR),
    ("2023-02-29T12:00:00", None, BAD_TS),
    ("2024-04-31 08:00", None, BAD_TS),
    ("2024-01-15T24:00:00", None, BAD_TS),
    ("2024-01-15T23:60:00", None, BAD_TS),
    ("2024-01-15T23:59:60", None, BAD_TS),
    ("2024-01-15T10:30:00.1234567", None, BAD_TS),
    ("2024-01-15T10:30:00.1234560", None, BAD_TS),
    ("2024-01-15T10:30:00.", None, BAD_TS),
    ("2024-01-15T10:30:00,5", None, BAD_TS),
    ("2024-01-15", None, BAD_TS),
    ("2024-01-15T10", None, BAD_TS),
    ("2024-01-15 10", None, BAD_TS),
    ("2024-01-15t10:30:00", None, BAD_TS),
    ("2024-01-15  10:30:00", None, BAD_TS),
    ("2024-01-15T1:30:00", None, BAD_TS),
    ("2024-01-15T10:3", None, BAD_TS),
    ("2024-01-15T103000", None, BAD_TS),
    ("2024-01-15T10:30:00Z", None, BAD_TS),
    ("2024-01-15T10:30:00+02:00", None, BAD_TS),
    ("2024-01-15T10:30:00-05:00", None, BAD_TS),
    ("2024-01-15T10:30:00+0200", None, BAD_TS),
    ("2024-01-15T10:30:00 UTC", None, BAD_TS),
    ("15/01/2024 10:30", None, BAD_TS),
]


@pytest.mark.parametrize(("text", "value", "error"), TIMESTAMP_CASES)
def test_timestamp(text: str, value: object, error: str | None) -> None:
    check("timestamp", text, value, error)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


TIMESTAMPTZ_CASES = [
    ("2024-01-15T10:30:00Z", utc(2024, 1, 15, 10, 30), None),
    ("2024-01-15 10:30:00Z", utc(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30Z", utc(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30:00+02:00", utc(2024, 1, 15, 8, 30), None),
    ("2024-01-15T10:30:00-05:00", utc(2024, 1, 15, 15, 30), None),
    ("2024-01-15T10:30:00+05:30", utc(2024, 1, 15, 5, 0), None),
    ("2024-01-15T10:30:00+0530", utc(2024, 1, 15, 5, 0), None),
    ("2024-01-15T10:30:00-0230", utc(2024, 1, 15, 13, 0), None),
    ("2024-01-15T10:30:00+05", utc(2024, 1, 15, 5, 30), None),
    ("2024-01-15T10:30:00-00:00", utc(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30:00+23:59", utc(2024, 1, 14, 10, 31), None),
    ("2024-01-15T10:30+01:00", utc(2024, 1, 15, 9, 30), None),
    ("2024-01-15T10:30:00.123456+01:00", utc(2024, 1, 15, 9, 30, 0, 123456), None),
    ("2024-01-15T10:30:00.5Z", utc(2024, 1, 15, 10, 30, 0, 500000), None),
    ("2024-01-15T00:30:00+01:00", utc(2024, 1, 14, 23, 30), None),
    ("2024-03-01T00:30:00+01:00", utc(2024, 2, 29, 23, 30), None),
    ("2023-12-31T22:00:00-03:00", utc(2024, 1, 1, 1, 0), None),
    ("2024-01-15 10:30:00", utc(2024, 1, 15, 10, 30), None),
    ("2024-01-15T10:30", utc(2024, 1, 15, 10, 30), None),
    (" 2024-01-15T10:30:00+02:00 ", utc(2024, 1, 15, 8, 30), None),
    ("0001-01-01T00:00:00Z", utc(1, 1, 1), None),
    ("0001-01-01T01:00:00+01:00", utc(1, 1, 1), None),
    ("9999-12-31T23:59:59.999999Z", utc(9999, 12, 31, 23, 59, 59, 999999), None),
    ("9999-12-31T18:59:59.999999-05:00", utc(9999, 12, 31, 23, 59, 59, 999999), None),
    ("0001-01-01T00:00:00+01:00", None, OOR),
    ("9999-12-31T23:00:00-05:00", None, OOR),
    ("0000-12-31T23:00:00-05:00", utc(1, 1, 1, 4, 0), None),
    ("0000-12-31T23:00:00+05:00", None, OOR),
    ("2023-02-29T10:00:00Z", None, BAD_TSTZ),
    ("2023-02-29T10:00:00", None, BAD_TSTZ),
    ("2024-01-15T24:00:00Z", None, BAD_TSTZ),
    ("2024-01-15T10:30:00.1234567Z", None, BAD_TSTZ),
    ("2024-01-15T10:30:00z", None, BAD_TSTZ),
    ("2024-01-15T10:30:00+24:00", None, BAD_TSTZ),
    ("2024-01-15T10:30:00+02:60", None, BAD_TSTZ),
    ("2024-01-15T10:30:00+2:00", None, BAD_TSTZ),
    ("2024-01-15T10:30:00+02:0", None, BAD_TSTZ),
    ("2024-01-15T10:30:00 +02:00", None, BAD_TSTZ),
    ("2024-01-15T10:30:00UTC", None, BAD_TSTZ),
    ("2024-01-15T10Z", None, BAD_TSTZ),
    ("2024-01-15T10+05:30", None, BAD_TSTZ),
    ("2024-01-15T10-07", None, BAD_TSTZ),
    ("2024-01-15Z", None, BAD_TSTZ),
    ("2024-01-15+05:00", None, BAD_TSTZ),
    ("2024-01-15", None, BAD_TSTZ),
]


@pytest.mark.parametrize(("text", "value", "error"), TIMESTAMPTZ_CASES)
def test_timestamptz(text: str, value: object, error: str | None) -> None:
    check("timestamptz", text, value, error)


DECIMAL_CASES = [
    ("decimal(10,4)", "1.2345", Decimal("1.2345"), None),
    ("decimal(10,4)", "-1.2345", Decimal("-1.2345"), None),
    ("decimal(10,4)", "+1.5", Decimal("1.5"), None),
    ("decimal(10,4)", " 1.5\t", Decimal("1.5"), None),
    ("decimal(10,4)", "1.", Decimal("1"), None),
    ("decimal(10,4)", ".5", Decimal("0.5"), None),
    ("decimal(10,4)", "-.5", Decimal("-0.5"), None),
    ("decimal(10,4)", "0", Decimal("0"), None),
    ("decimal(10,4)", "-0", Decimal("0"), None),
    ("decimal(10,4)", "42", Decimal("42"), None),
    ("decimal(10,4)", "000123.4500", Decimal("123.45"), None),
    ("decimal(10,4)", "123456.7890", Decimal("123456.789"), None),
    ("decimal(10,4)", "-999999.9999", Decimal("-999999.9999"), None),
    ("decimal(10,4)", "1234567.0", None, OOR),
    ("decimal(10,4)", "1234567", None, OOR),
    ("decimal(10,4)", "1.23456", None, OOR),
    ("decimal(10,4)", "1.00000", None, OOR),
    ("decimal(10,4)", "0.00001", None, OOR),
    ("decimal(10,4)", "1e3", None, BAD_DEC),
    ("decimal(10,4)", "1E3", None, BAD_DEC),
    ("decimal(10,4)", "1.5e0", None, BAD_DEC),
    ("decimal(10,4)", "NaN", None, BAD_DEC),
    ("decimal(10,4)", "inf", None, BAD_DEC),
    ("decimal(10,4)", ".", None, BAD_DEC),
    ("decimal(10,4)", "+", None, BAD_DEC),
    ("decimal(10,4)", "-.", None, BAD_DEC),
    ("decimal(10,4)", "1.2.3", None, BAD_DEC),
    ("decimal(10,4)", "1,5", None, BAD_DEC),
    ("decimal(10,4)", "0x10", None, BAD_DEC),
    ("decimal(10,4)", "1 000", None, BAD_DEC),
    ("decimal(10,4)", "--1", None, BAD_DEC),
    ("decimal(10,4)", "$1.50", None, BAD_DEC),
    ("decimal(38,0)", "9" * 38, Decimal("9" * 38), None),
    ("decimal(38,0)", "-" + "9" * 38, Decimal("-" + "9" * 38), None),
    ("decimal(38,0)", "0" * 10 + "9" * 38, Decimal("9" * 38), None),
    ("decimal(38,0)", "1" + "0" * 38, None, OOR),
    ("decimal(38,0)", "1.", Decimal("1"), None),
    ("decimal(38,0)", "1.0", None, OOR),
    ("decimal(38,0)", ".5", None, OOR),
    ("decimal(38,38)", "0." + "9" * 38, Decimal("0." + "9" * 38), None),
    ("decimal(38,38)", "-." + "1" * 38, Decimal("-0." + "1" * 38), None),
    ("decimal(38,38)", "0", Decimal("0"), None),
    ("decimal(38,38)", "0." + "1" * 39, None, OOR),
    ("decimal(38,38)", "1.0", None, OOR),
    ("decimal(38,10)", "9" * 28 + "." + "9" * 10, Decimal("9" * 28 + "." + "9" * 10), None),
    ("decimal(38,10)", "9" * 29, None, OOR),
    ("decimal(5,0)", "12345", Decimal("12345"), None),
    ("decimal(5,0)", "123456", None, OOR),
    ("decimal(5,0)", "-99999", Decimal("-99999"), None),
    ("decimal(1,0)", "9", Decimal("9"), None),
    ("decimal(1,0)", "10", None, OOR),
    ("decimal(3,3)", "0.123", Decimal("0.123"), None),
    ("decimal(3,3)", "1.123", None, OOR),
    ("decimal(5,1)", "1.50", None, OOR),
]


@pytest.mark.parametrize(("type_name", "text", "value", "error"), DECIMAL_CASES)
def test_decimal(type_name: str, text: str, value: object, error: str | None) -> None:
    check(type_name, text, value, error)


ALL_TABLES = [
    ("string", STRING_CASES),
    ("integer", INTEGER_CASES),
    ("float", FLOAT_CASES),
    ("boolean", BOOLEAN_CASES),
    ("date", DATE_CASES),
    ("timestamp", TIMESTAMP_CASES),
    ("timestamptz", TIMESTAMPTZ_CASES),
]


@pytest.mark.parametrize(("type_name", "cases"), ALL_TABLES, ids=[name for name, _ in ALL_TABLES])
def test_whole_table_in_one_batch(type_name: str, cases: list[tuple[str, object, str | None]]) -> None:
    rows = parse([text for text, _, _ in cases], type_name)
    for (text, value, error), (got_value, got_error) in zip(cases, rows, strict=True):
        assert got_error == error, text
        assert same(got_value, value), text


@pytest.mark.parametrize(("type_name", "cases"), ALL_TABLES, ids=[name for name, _ in ALL_TABLES])
def test_valid_rows_of_table_in_one_batch(type_name: str, cases: list[tuple[str, object, str | None]]) -> None:
    valid = [(text, value) for text, value, error in cases if error is None and value is not None]
    rows = parse([text for text, _ in valid], type_name)
    for (text, value), (got_value, got_error) in zip(valid, rows, strict=True):
        assert got_error is None, text
        assert same(got_value, value), text


def test_decimal_table_grouped_by_type_in_one_batch() -> None:
    for type_name in {case[0] for case in DECIMAL_CASES}:
        cases = [case[1:] for case in DECIMAL_CASES if case[0] == type_name]
        rows = parse([text for text, _, _ in cases], type_name)
        for (text, value, error), (got_value, got_error) in zip(cases, rows, strict=True):
            assert got_error == error, (type_name, text)
            assert same(got_value, value), (type_name, text)


def test_many_out_of_range_and_impossible_rows_are_each_reported() -> None:
    texts = ["1", "9223372036854775808", "2", "-9223372036854775809", "x"] * 1000
    rows = parse(texts, "integer")
    assert [error for _, error in rows[:5]] == [None, OOR, None, OOR, BAD_INT]
    assert [value for value, _ in rows[:5]] == [1, None, 2, None, None]
    assert rows[:5] * 1000 == rows
    dates = ["2024-02-29", "2023-02-29", "2023-02-28 00:00"] * 1000
    rows = parse(dates, "date")
    assert rows[:3] == [(date(2024, 2, 29), None), (None, BAD_DATE), (date(2023, 2, 28), None)]
    assert rows[:3] * 1000 == rows


def test_mixed_offsets_and_naive_text_for_timestamptz() -> None:
    texts = ["2024-01-15T10:30:00", "2024-01-15T10:30:00+01:00", "2024-01-15T10:30:00Z", "2023-02-29T10:00:00"]
    assert parse(texts, "timestamptz") == [
        (utc(2024, 1, 15, 10, 30), None),
        (utc(2024, 1, 15, 9, 30), None),
        (utc(2024, 1, 15, 10, 30), None),
        (None, BAD_TSTZ),
    ]


# --- nulls and required fields ---------------------------------------------------------------------------

NON_STRING_TYPES = ["integer", "float", "boolean", "date", "timestamp", "timestamptz", "decimal(10,2)"]


@pytest.mark.parametrize("type_name", NON_STRING_TYPES)
@pytest.mark.parametrize("text", ["", "   ", "\t", "NULL", " NULL ", "null", "\tNone"])
def test_null_values_are_compared_after_trimming_for_non_string_types(type_name: str, text: str) -> None:
    assert parse([text], type_name) == [(None, None)]
    assert parse([text], type_name, required=True) == [(None, MISSING)]


@pytest.mark.parametrize("type_name", NON_STRING_TYPES)
def test_text_outside_null_values_is_not_null(type_name: str) -> None:
    ((_, error),) = parse(["none"], type_name)
    assert error is not None and error != MISSING
    ((_, error),) = parse(["nil"], type_name, required=True)
    assert error is not None and error != MISSING


def test_null_values_are_compared_verbatim_for_strings() -> None:
    texts = ["", " ", "NULL", " NULL", "null ", "None", "N/A"]
    assert parse(texts, "string") == [
        (None, None),
        (" ", None),
        (None, None),
        (" NULL", None),
        ("null ", None),
        (None, None),
        ("N/A", None),
    ]
    assert parse(texts, "string", required=True) == [
        (None, MISSING),
        (" ", None),
        (None, MISSING),
        (" NULL", None),
        ("null ", None),
        (None, MISSING),
        ("N/A", None),
    ]


def test_custom_null_values() -> None:
    assert parse(["N/A", " N/A ", "", "5"], "integer", null_values=["N/A"]) == [
        (None, None),
        (None, None),
        (None, BAD_INT),
        (5, None),
    ]
    assert parse(["N/A", " N/A ", ""], "string", null_values=["N/A"]) == [(None, None), (" N/A ", None), ("", None)]
    # Entries are trimmed too for non-string types.
    assert parse(["NA", " NA"], "integer", null_values=[" NA "]) == [(None, None), (None, None)]
    assert parse(["NA", " NA "], "string", null_values=[" NA "]) == [("NA", None), (None, None)]


def test_no_null_values_makes_empty_text_invalid_except_for_strings() -> None:
    assert parse([""], "integer", null_values=()) == [(None, BAD_INT)]
    assert parse(["  "], "date", null_values=[]) == [(None, BAD_DATE)]
    assert parse([""], "string", null_values=()) == [("", None)]


@pytest.mark.parametrize("type_name", ["string", *NON_STRING_TYPES])
def test_arrow_nulls_are_null_cells(type_name: str) -> None:
    assert parse([None], type_name) == [(None, None)]
    assert parse([None], type_name, required=True) == [(None, MISSING)]


def test_required_only_flags_null_cells() -> None:
    assert parse(["1", "", "x", None], "integer", required=True) == [
        (1, None),
        (None, MISSING),
        (None, BAD_INT),
        (None, MISSING),
    ]
    assert parse(["1", "", "x", None], "integer") == [(1, None), (None, None), (None, BAD_INT), (None, None)]


# --- input shapes ----------------------------------------------------------------------------------------


def test_chunked_input_is_parsed_chunk_by_chunk_into_one_array() -> None:
    chunked = pa.chunked_array([["1", "2"], [], ["x", " 3 "], ["9223372036854775808"]], pa.string())
    parsed = parse_column(chunked, ColumnType.parse("integer"))
    assert isinstance(parsed.values, pa.Array) and isinstance(parsed.errors, pa.Array)
    assert parsed.values.to_pylist() == [1, 2, None, 3, None]
    assert parsed.errors.to_pylist() == [None, None, BAD_INT, None, OOR]


def test_chunked_input_with_no_chunks_and_one_chunk() -> None:
    empty = parse_column(pa.chunked_array([], pa.string()), ColumnType.parse("date"))
    assert empty.values.type == pa.date32() and len(empty.values) == 0 and len(empty.errors) == 0
    single = parse_column(pa.chunked_array([["2024-01-15"]]), ColumnType.parse("date"))
    assert single.values.to_pylist() == [date(2024, 1, 15)]


@pytest.mark.parametrize("type_name", ["string", *NON_STRING_TYPES])
def test_empty_array(type_name: str) -> None:
    parsed = parse_column(pa.array([], pa.string()), ColumnType.parse(type_name))
    assert parsed.values.type == ColumnType.parse(type_name).arrow_type
    assert len(parsed.values) == 0 and parsed.errors.type == pa.string() and len(parsed.errors) == 0


def test_large_string_sliced_and_all_null_input() -> None:
    large = pa.array(["x", "1", " 2 ", "y"], pa.large_string()).slice(1, 2)
    assert parse_column(large, ColumnType.parse("integer")).values.to_pylist() == [1, 2]
    assert parse_column(large, ColumnType.parse("string")).values.type == pa.string()
    sliced = pa.array(["0x10", "5", "6", "0x10"]).slice(1, 2)
    assert parse_column(sliced, ColumnType.parse("integer")).values.to_pylist() == [5, 6]
    nulls = parse_column(pa.nulls(2), ColumnType.parse("timestamp"), required=True)
    assert nulls.values.to_pylist() == [None, None]
    assert nulls.errors.to_pylist() == [MISSING, MISSING]


def test_non_text_input_is_refused() -> None:
    with pytest.raises(TypeError):
        parse_column(pa.array([1, 2]), ColumnType.parse("integer"))


# --- format ----------------------------------------------------------------------------------------------

FORMAT_CASES = [
    ("date", "%d/%m/%Y", "15/01/2024", date(2024, 1, 15), None),
    ("date", "%d/%m/%Y", " 15/01/2024 ", date(2024, 1, 15), None),
    ("date", "%d/%m/%Y", "5/1/2024", date(2024, 1, 5), None),
    ("date", "%d/%m/%Y", "29/02/2024", date(2024, 2, 29), None),
    ("date", "%d/%m/%Y", "01/03/2023", date(2023, 3, 1), None),
    ("date", "%d/%m/%Y", "1/3/2023", date(2023, 3, 1), None),
    ("date", "%d/%m/%Y", "01/05/2024", date(2024, 5, 1), None),
    ("date", "%d/%m/%Y", "31/12/2024", date(2024, 12, 31), None),
    ("date", "%d/%m/%Y", "29/02/2023", None, BAD_DATE),
    ("date", "%d/%m/%Y", "30/02/2024", None, BAD_DATE),
    ("date", "%d/%m/%Y", "31/04/2024", None, BAD_DATE),
    ("date", "%d/%m/%Y", "31/09/2024", None, BAD_DATE),
    ("date", "%d/%m/%Y", "32/01/2024", None, BAD_DATE),
    ("date", "%d/%m/%Y", "00/01/2024", None, BAD_DATE),
    ("date", "%d/%m/%Y", "15/13/2024", None, BAD_DATE),
    ("date", "%d/%m/%Y", "2024-01-15", None, BAD_DATE),
    ("date", "%d/%m/%Y", "15/01/2024x", None, BAD_DATE),
    ("date", "%d/%m/%Y", "15/01/2024 10:30", None, BAD_DATE),
    ("date", "%d/%m/%Y", "15/01/0000", None, OOR),
    ("date", "%d/%m/%Y %H:%M", "15/01/2024 00:00", date(2024, 1, 15), None),
    ("date", "%d/%m/%Y %H:%M", "15/01/2024 10:30", None, BAD_DATE),
    # %Y is exactly four digits, as in Python (Arrow's own strptime took '24' as the year 24)
    ("date", "%d/%m/%Y", "15/01/24", None, BAD_DATE),
    ("date", "%d/%m/%Y", "15/01/02024", None, BAD_DATE),
    ("date", "%d/%m/%y", "15/01/24", date(2024, 1, 15), None),
    ("date", "%d/%m/%y", "15/01/68", date(2068, 1, 15), None),
    ("date", "%d/%m/%y", "15/01/69", date(1969, 1, 15), None),
    ("date", "%d/%m/%y", "15/01/2024", None, BAD_DATE),
    ("date", "%d.%m.%Y", "15.01.2024", date(2024, 1, 15), None),
    ("date", "%d.%m.%Y", "15x01x2024", None, BAD_DATE),
    ("date", "%d %m %Y", "15 \t 01\n2024", date(2024, 1, 15), None),
    ("date", "%d/%m", "29/02", None, BAD_DATE),  # no year: 1900, as in Python
    ("date", "%d/%m", "28/02", date(1900, 2, 28), None),
    ("date", "%d/%m/%Y", "١٥/01/2024", None, BAD_DATE),  # only ASCII digits
    ("date", "%Y%m%d", "20240115", date(2024, 1, 15), None),
    ("date", "%Y%m%d", "20230229", None, BAD_DATE),
    ("timestamp", "%d/%m/%Y %H:%M", "15/01/2024 10:30", datetime(2024, 1, 15, 10, 30), None),
    ("timestamp", "%d/%m/%Y %H:%M", "31/12/2024 23:59", datetime(2024, 12, 31, 23, 59), None),
    ("timestamp", "%d/%m/%Y %H:%M", "01/03/2024 00:00", datetime(2024, 3, 1), None),
    ("timestamp", "%d/%m/%Y %H:%M", "15/01/2024 24:00", None, BAD_TS),
    ("timestamp", "%d/%m/%Y %H:%M", "15/01/2024 10:60", None, BAD_TS),
    ("timestamp", "%d/%m/%Y %H:%M", "30/02/2023 10:00", None, BAD_TS),
    ("timestamp", "%d/%m/%Y %H:%M", "15/01/2024", None, BAD_TS),
    ("timestamp", "%d/%m/%Y %H:%M:%S", "15/01/2024 10:30:45", datetime(2024, 1, 15, 10, 30, 45), None),
    ("timestamp", "%d/%m/%Y %H:%M:%S", "15/01/2024 10:31:00", datetime(2024, 1, 15, 10, 31), None),
    ("timestamp", "%d/%m/%Y %H:%M:%S", "6/1/2024 6:06:01", datetime(2024, 1, 6, 6, 6, 1), None),
    ("timestamp", "%d/%m/%Y %H:%M:%S", "15/01/2024 23:59:60", None, BAD_TS),
    ("timestamp", "%d/%m/%Y %H:%M:%S", "15/01/2024 10:30:61", None, BAD_TS),
    ("timestamp", "%d/%m/%Y %H:%M:%S", "31/12/2024 23:59:60", None, BAD_TS),
    ("timestamp", "%m/%d/%Y %I:%M %p", "01/15/2024 12:30 AM", datetime(2024, 1, 15, 0, 30), None),
    ("timestamp", "%m/%d/%Y %I:%M %p", "01/15/2024 01:30 PM", datetime(2024, 1, 15, 13, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M", "15/01/2024 10:30", utc(2024, 1, 15, 10, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +0200", utc(2024, 1, 15, 8, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 -0500", utc(2024, 1, 15, 15, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "01/03/2024 00:30 +0100", utc(2024, 2, 29, 23, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "29/02/2024 23:30 -0100", utc(2024, 3, 1, 0, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "30/02/2023 00:30 +0100", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "29/02/2023 23:30 -0100", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +02:00", utc(2024, 1, 15, 8, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 Z", utc(2024, 1, 15, 10, 30), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 z", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +01:00:30.5", utc(2024, 1, 15, 9, 29, 29, 500000), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +0100:30", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +01:0030", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +2400", None, BAD_TSTZ),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 +2359", utc(2024, 1, 14, 10, 31), None),
    ("timestamptz", "%d/%m/%Y %H:%M %z", "15/01/2024 10:30 CET", None, BAD_TSTZ),
    ("timestamptz", "%Y-%m-%d %H:%M:%S.%f%z", "2024-01-15 10:00:00.5-0130", utc(2024, 1, 15, 11, 30, 0, 500000), None),
    ("timestamp", "%Y-%m-%dT%H:%M:%S.%f", "2024-01-15t10:00:00.000123", datetime(2024, 1, 15, 10, 0, 0, 123), None),
    ("timestamp", "%Y-%m-%dT%H:%M:%S.%f", "2024-01-15T10:00:00.1234567", None, BAD_TS),
    ("timestamp", "%m/%d/%Y %I:%M %p", "01/15/2024 12:30 pm", datetime(2024, 1, 15, 12, 30), None),
    ("timestamp", "%m/%d/%Y %I:%M %p", "01/15/2024 13:30 PM", None, BAD_TS),
    ("timestamp", "%m/%d/%Y %I:%M", "01/15/2024 12:30", datetime(2024, 1, 15, 0, 30), None),  # no %p: before noon
    ("timestamp", "%Y%m%d%H%M", "202401151030", datetime(2024, 1, 15, 10, 30), None),
    ("timestamp", "%Y%m%d%H%M", "20240115130", datetime(2024, 1, 15, 13, 0), None),  # Python splits it so too
    ("timestamp", "100%% %Y", "100% 2024", datetime(2024, 1, 1), None),
]


@pytest.mark.parametrize(("type_name", "fmt", "text", "value", "error"), FORMAT_CASES)
def test_format(type_name: str, fmt: str, text: str, value: object, error: str | None) -> None:
    got_value, got_error = parse([text], type_name, fmt=fmt)[0]
    assert got_error == error
    assert same(got_value, value)


def test_format_cases_in_one_batch_per_format() -> None:
    for type_name, fmt in {(case[0], case[1]) for case in FORMAT_CASES}:
        cases = [case[2:] for case in FORMAT_CASES if case[:2] == (type_name, fmt)]
        rows = parse([text for text, _, _ in cases] + ["", None], type_name, fmt=fmt, required=True)
        for (text, value, error), (got_value, got_error) in zip(cases, rows[:-2], strict=True):
            assert got_error == error, (fmt, text)
            assert same(got_value, value), (fmt, text)
        assert rows[-2:] == [(None, MISSING), (None, MISSING)]


def test_format_on_many_first_of_month_rows() -> None:
    texts = [f"01/{month:02d}/2024" for month in range(1, 13)] * 300 + ["31/04/2024", "1/5/2024"]
    rows = parse(texts, "date", fmt="%d/%m/%Y")
    assert [value for value, _ in rows[:12]] == [date(2024, month, 1) for month in range(1, 13)]
    assert all(error is None for _, error in rows[:-2])
    assert rows[-2:] == [(None, BAD_DATE), (date(2024, 5, 1), None)]


@pytest.mark.parametrize("type_name", ["string", "integer", "float", "boolean", "decimal(5,2)"])
def test_format_is_refused_for_types_without_one(type_name: str) -> None:
    with pytest.raises(ValueError, match="only applies"):
        parse_column(pa.array(["1"]), ColumnType.parse(type_name), fmt="%Y")


@pytest.mark.parametrize("type_name", ["date", "timestamp"])
def test_offset_directive_is_refused_without_time_zone(type_name: str) -> None:
    with pytest.raises(ValueError, match="offset"):
        parse_column(pa.array(["1"]), ColumnType.parse(type_name), fmt="%Y-%m-%d %z")
    # A literal '%%z' is no directive.
    assert parse(["2024-01-15 %z"], type_name, fmt="%Y-%m-%d %%z")[0][1] is None


# --- properties: agreement with Python's own parsers -----------------------------------------------------

ASCII = re.ASCII
NULLS = ("", "NULL", "null", "None")


def reference(text: str, type_name: str) -> tuple[object, str | None]:
    """The contract's reading of one cell, built on Python's int(), float(), Decimal and fromisoformat."""
    column_type = ColumnType.parse(type_name)
    kind = column_type.kind.value
    if kind == "string":
        return (None, None) if text in NULLS else (text, None)
    text = text.strip(" \t")
    if text in NULLS:
        return None, None
    if kind == "decimal":
        return _reference_decimal(text, column_type)
    return REFERENCES[kind](text)


def _reference_integer(text: str) -> tuple[object, str | None]:
    if not re.fullmatch(r"[+-]?[0-9]+", text, ASCII):
        return None, BAD_INT
    number = int(text)
    return (number, None) if INT64_MIN <= number <= INT64_MAX else (None, OOR)


def _reference_float(text: str) -> tuple[object, str | None]:
    numeric = re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text, ASCII)
    named = re.fullmatch(r"[+-]?(nan|inf|infinity)", text, re.ASCII | re.IGNORECASE)
    if not (numeric or named):
        return None, BAD_FLOAT
    number = float(text)
    if numeric and (math.isinf(number) or (number != 0.0 and abs(number) < sys.float_info.min)):
        return None, OOR  # overflow, or a subnormal result (precision lost)
    if numeric and number == 0.0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
        return None, OOR  # a non-zero number that rounds to zero
    return number, None


def _reference_boolean(text: str) -> tuple[object, str | None]:
    word = text.lower()
    if word in ("true", "t", "yes", "y", "on", "1"):
        return True, None
    if word in ("false", "f", "no", "n", "off", "0"):
        return False, None
    return None, BAD_BOOL


def _reference_decimal(text: str, column_type: ColumnType) -> tuple[object, str | None]:
    match = re.fullmatch(r"[+-]?([0-9]*)(?:\.([0-9]*))?", text, ASCII)
    if not match or not re.search(r"[0-9]", text):
        return None, BAD_DEC
    whole, fraction = match.group(1).lstrip("0"), match.group(2) or ""
    if len(fraction) > column_type.scale or len(whole) > column_type.precision - column_type.scale:
        return None, OOR
    return Decimal(text), None


ISO_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
ISO_TIME = r"[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
# Python's fromisoformat takes offset minutes of 60 and more; ISO 8601 does not.
ISO_OFFSET = r"(Z|[+-][0-9]{2}(:?[0-5][0-9])?)?"


def _reference_date(text: str) -> tuple[object, str | None]:
    if not re.fullmatch(rf"{ISO_DATE}([T ]00:00(:00(\.0{{1,6}})?)?)?", text, ASCII):
        return None, BAD_DATE
    if text.startswith("0000"):
        return _year_zero(text, "date")
    try:
        return date.fromisoformat(text[:10]), None
    except ValueError:
        return None, BAD_DATE


def _reference_timestamp(text: str) -> tuple[object, str | None]:
    if not re.fullmatch(rf"{ISO_DATE}[T ]{ISO_TIME}", text, ASCII):
        return None, BAD_TS
    if text.startswith("0000"):
        return _year_zero(text, "timestamp")
    try:
        return datetime.fromisoformat(text), None
    except ValueError:
        return None, BAD_TS


def _reference_timestamptz(text: str) -> tuple[object, str | None]:
    if not re.fullmatch(rf"{ISO_DATE}[T ]{ISO_TIME}{ISO_OFFSET}", text, ASCII):
        return None, BAD_TSTZ
    if text.startswith("0000"):
        return _year_zero(text, "timestamptz")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None, BAD_TSTZ
    try:
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).astimezone(UTC), None
    except OverflowError:
        return None, OOR


REFERENCES = {
    "integer": _reference_integer,
    "float": _reference_float,
    "boolean": _reference_boolean,
    "date": _reference_date,
    "timestamp": _reference_timestamp,
    "timestamptz": _reference_timestamptz,
}


def _year_zero(text: str, kind: str) -> tuple[object, str | None]:
    """Python has no year 0; read the text as year 4 (a leap year, as year 0 is in Arrow's proleptic calendar)
    and move the result back by the 1461 days between the two."""
    invalid = {"date": BAD_DATE, "timestamp": BAD_TS, "timestamptz": BAD_TSTZ}[kind]
    try:
        shifted = datetime.fromisoformat("0004" + text[4:])
    except ValueError:
        return None, invalid
    if shifted.tzinfo is None:
        return None, OOR
    shifted_utc = shifted.astimezone(UTC)
    if shifted_utc < datetime(5, 1, 1, tzinfo=UTC):
        return None, OOR
    return shifted_utc - timedelta(days=1461), None


def assert_agrees(texts: list[str], type_name: str) -> None:
    rows = parse(texts, type_name)
    for text, (value, error) in zip(texts, rows, strict=True):
        expected_value, expected_error = reference(text, type_name)
        assert error == expected_error, f"{type_name}: {text!r} gave {error!r}, Python says {expected_error!r}"
        assert same(value, expected_value), f"{type_name}: {text!r} gave {value!r}, Python says {expected_value!r}"


def blanks() -> st.SearchStrategy[str]:
    return st.sampled_from(["", " ", "\t", "  "])


@st.composite
def integer_texts(draw: st.DrawFn) -> str:
    number = draw(st.integers(INT64_MIN, INT64_MAX) | st.integers(-(10**25), 10**25))
    sign = "-" if number < 0 else draw(st.sampled_from(["", "+"]))
    zeros = draw(st.sampled_from(["", "0", "000"]))
    return draw(blanks()) + sign + zeros + str(abs(number)) + draw(blanks())


@st.composite
def float_texts(draw: st.DrawFn) -> str:
    number = draw(st.floats(allow_nan=False, allow_infinity=False))
    spelling = draw(st.sampled_from(["{!r}", "{:e}", "{:E}", "{:.17g}", "{:.3e}", "{:.25e}", "{:.1f}"]))
    return draw(blanks()) + spelling.format(number) + draw(blanks())


@st.composite
def date_texts(draw: st.DrawFn) -> str:
    day = draw(st.dates())
    suffix = draw(st.sampled_from(["", " 00:00:00", "T00:00", "T00:00:00.000", "T00:00:00.000000"]))
    return draw(blanks()) + day.isoformat() + suffix + draw(blanks())


def render_time(value: datetime, draw: st.DrawFn) -> str:
    spellings = ["auto", "microseconds"]
    if value.microsecond % 1000 == 0:
        spellings.append("milliseconds")
    if value.microsecond == 0:
        spellings.append("seconds")
        if value.second == 0:
            spellings.append("minutes")
    return value.isoformat(sep=draw(st.sampled_from(["T", " "])), timespec=draw(st.sampled_from(spellings)))


@st.composite
def timestamp_texts(draw: st.DrawFn) -> str:
    return render_time(draw(st.datetimes()), draw)


@st.composite
def timestamptz_texts(draw: st.DrawFn) -> str:
    minutes = draw(st.integers(-(24 * 60 - 1), 24 * 60 - 1))
    zone = draw(st.sampled_from([None, timezone(timedelta(minutes=minutes))]))
    text = render_time(draw(st.datetimes()).replace(tzinfo=zone), draw)
    if text.endswith("+00:00"):
        text = draw(st.sampled_from([text, text[:-6] + "Z"]))
    if zone is not None and draw(st.booleans()):
        text = text[:-3] + text[-2:]  # +hh:mm -> +hhmm
    return text


DECIMAL_TYPES = ["decimal(10,4)", "decimal(38,0)", "decimal(38,10)", "decimal(38,38)", "decimal(5,5)", "decimal(18,2)"]


@st.composite
def decimal_texts(draw: st.DrawFn) -> tuple[str, str]:
    type_name = draw(st.sampled_from(DECIMAL_TYPES))
    column_type = ColumnType.parse(type_name)
    whole = draw(st.integers(0, 10 ** (column_type.precision - column_type.scale) - 1))
    fraction = draw(st.integers(0, 10**column_type.scale - 1)) if column_type.scale else 0
    fraction_digits = str(fraction).zfill(column_type.scale) if column_type.scale else ""
    fraction_digits = fraction_digits[: draw(st.integers(0, len(fraction_digits)))]
    sign = draw(st.sampled_from(["", "-", "+"]))
    whole_text = draw(
        st.sampled_from([str(whole), "0" + str(whole)] + ([""] if whole == 0 and fraction_digits else []))
    )
    text = sign + whole_text + ("." + fraction_digits if fraction_digits else draw(st.sampled_from(["", "."])))
    return type_name, draw(blanks()) + text + draw(blanks())


FAST = settings(max_examples=200, deadline=None)


# --- format: the project's reading equals datetime.strptime for every supported directive -----------------------

LAYOUT_DIRECTIVES = ("%Y", "%y", "%m", "%d", "%H", "%I", "%p", "%M", "%S", "%f", "%z")
LAYOUT_SEPARATORS = ("", "-", "/", ":", " ", "T", ".", "  ", "\t", "%%", "at")
JUNK_CHARS = "0123456789 \t+-:./TZzaApPmM\xa0\u3000٣x"


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, str]:
    """A type name and a layout of distinct supported directives, as a spec may declare them."""
    type_name = draw(st.sampled_from(["date", "timestamp", "timestamptz"]))
    chosen = draw(st.lists(st.sampled_from(LAYOUT_DIRECTIVES), min_size=1, max_size=7, unique=True))
    chosen = [d for d in chosen if not (d == "%y" and "%Y" in chosen) and not (d == "%I" and "%H" in chosen)]
    if type_name != "timestamptz":
        chosen = [d for d in chosen if d != "%z"] or ["%d"]
    parts = [draw(st.sampled_from(LAYOUT_SEPARATORS))]
    for directive in chosen:
        parts += [directive, draw(st.sampled_from(LAYOUT_SEPARATORS))]
    return type_name, "".join(parts)


@st.composite
def layout_texts(draw: st.DrawFn, fmt: str) -> str:
    """Text written with ``fmt`` from a random instant, then maybe truncated, (un)padded, edited or wrapped in junk."""
    zone = draw(
        st.sampled_from([None, UTC])
        | st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
        | st.integers(-86399, 86399).map(lambda s: timezone(timedelta(seconds=s)))
    )
    moment = draw(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9998, 12, 31)))
    text = moment.replace(tzinfo=zone).strftime(fmt)
    if zone is not None and draw(st.booleans()):
        text = re.sub(r"([+-]\d\d)(\d\d)", r"\1:\2", text)  # %z also reads +hh:mm
    junk = st.text(JUNK_CHARS, max_size=3)
    edit = draw(st.sampled_from(["none", "truncate", "unpad", "pad", "replace", "insert", "bump", "bump", "bump", "junk"]))
    if edit == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif edit == "unpad":
        text = re.sub(r"(?<![0-9])0(?=[0-9])", "", text, count=draw(st.integers(1, 3)))
    elif edit == "pad":
        text = re.sub(r"(?<![0-9])(?=[0-9])", "0", text, count=draw(st.integers(1, 2)))
    elif edit == "replace" and text:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(JUNK_CHARS)) + text[at + 1 :]
    elif edit == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(JUNK_CHARS)) + text[at:]
    elif edit == "bump" and re.search(r"[0-9]{2}", text):
        # a field at or past its limit: leap seconds, day 29-31 in short months, hour 24, month 13...
        spots = [m.start() for m in re.finditer(r"(?=[0-9]{2})", text)]
        at = draw(st.sampled_from(spots))
        text = text[:at] + draw(st.sampled_from(["60", "61", "29", "30", "31", "00", "12", "13", "24", "59"])) + text[at + 2 :]
    elif edit == "junk":
        text = draw(junk) + text + draw(junk)
    return text


def strptime_reference(text: str, fmt: str, type_name: str) -> tuple[object, str | None]:
    """CONTRACT 2: a value read under a layout means exactly what datetime.strptime makes of the trimmed text."""
    errors = {"date": BAD_DATE, "timestamp": BAD_TS, "timestamptz": BAD_TSTZ}
    trimmed = text.strip(" \t")
    if trimmed in NULLS:
        return None, None
    try:
        value = datetime.strptime(trimmed, fmt)
    except ValueError:
        return None, errors[type_name]
    if type_name == "date":
        return (value.date(), None) if value.time() == datetime.min.time() else (None, BAD_DATE)
    if type_name == "timestamp":
        return value, None
    try:
        return (value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)), None
    except OverflowError:
        return None, OOR  # the offset moves the instant past year 1 or 9999


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_every_supported_directive_reads_exactly_as_python_strptime(data: st.DataObject) -> None:
    type_name, fmt = data.draw(layouts(), label="layout")
    texts = data.draw(st.lists(layout_texts(fmt), min_size=1, max_size=8), label="texts")
    rows = parse(texts, type_name, fmt=fmt)
    for text, got in zip(texts, rows, strict=True):
        expected = strptime_reference(text, fmt, type_name)
        if expected[1] is None and any(c.isdecimal() and not c.isascii() for c in text):
            # Python's strptime also reads other Unicode digits; the project takes ASCII digits only (documented)
            assert got == (None, {"date": BAD_DATE, "timestamp": BAD_TS, "timestamptz": BAD_TSTZ}[type_name])
        elif expected[1] is None:
            assert got[1] is None and same(got[0], expected[0]), (fmt, text, got, expected)
        else:  # refused; a year 0000 (refused by datetime) is out_of_range as for ISO text
            assert got[0] is None and got[1] in (expected[1], OOR), (fmt, text, got, expected)


def test_the_layout_property_covers_every_supported_directive() -> None:
    assert {d.lstrip("%") for d in LAYOUT_DIRECTIVES} | {"%"} == set(layout_module.DIRECTIVES) | {"%"}
    assert set(layout_module.SUPPORTED.replace("%", "").split()) | {""} == set(layout_module.DIRECTIVES) | {""}


@FAST
@given(st.lists(integer_texts(), min_size=1, max_size=6))
def test_integers_match_python_int(texts: list[str]) -> None:
    for text in texts:
        number = int(text)
        if INT64_MIN <= number <= INT64_MAX:
            assert parse([text], "integer") == [(number, None)]
    assert_agrees(texts, "integer")


@FAST
@given(st.lists(float_texts(), min_size=1, max_size=6))
def test_floats_match_python_float(texts: list[str]) -> None:
    rows = parse(texts, "double")
    for text, (value, error) in zip(texts, rows, strict=True):
        expected = float(text)
        # rounding a spelling such as 1.798e+308 can leave the double range; below the smallest normal double a
        # value keeps fewer than 53 significant bits or becomes zero
        if math.isinf(expected) or (expected != 0 and abs(expected) < sys.float_info.min):
            assert (value, error) == (None, OOR)
        elif expected == 0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
            assert (value, error) == (None, OOR)
        else:
            assert error is None
            assert same(value, expected)


@FAST
@given(st.lists(date_texts(), min_size=1, max_size=6))
def test_dates_match_python_fromisoformat(texts: list[str]) -> None:
    rows = parse(texts, "date")
    for text, (value, error) in zip(texts, rows, strict=True):
        assert error is None
        assert value == datetime.fromisoformat(text.strip()).date()


@FAST
@given(st.lists(timestamp_texts(), min_size=1, max_size=6))
def test_timestamps_match_python_fromisoformat(texts: list[str]) -> None:
    rows = parse(texts, "timestamp")
    for text, (value, error) in zip(texts, rows, strict=True):
        assert error is None
        assert same(value, datetime.fromisoformat(text))


@FAST
@given(st.lists(timestamptz_texts(), min_size=1, max_size=6))
def test_timestamptz_match_python_fromisoformat_in_utc(texts: list[str]) -> None:
    rows = parse(texts, "timestamptz")
    for text, (value, error) in zip(texts, rows, strict=True):
        expected = datetime.fromisoformat(text)
        expected = expected.replace(tzinfo=UTC) if expected.tzinfo is None else expected
        try:
            expected = expected.astimezone(UTC)
        except OverflowError:
            assert (value, error) == (None, OOR)
            continue
        assert error is None
        assert same(value, expected)


@FAST
@given(st.lists(decimal_texts(), min_size=1, max_size=6))
def test_decimals_match_python_decimal(cases: list[tuple[str, str]]) -> None:
    for type_name, text in cases:
        assert parse([text], type_name) == [(Decimal(text.strip()), None)]


@FAST
@given(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=1, max_size=6), st.integers(-3, 3))
def test_integers_just_past_int64_are_out_of_range(numbers: list[int], push: int) -> None:
    edge = INT64_MAX + 1 + push if push >= 0 else INT64_MIN - 1 + push
    rows = parse([str(number) for number in numbers] + [str(edge)], "integer")
    assert rows == [(number, None) for number in numbers] + [(None, OOR)]


# Junk: short strings over each type's alphabet, and valid texts with a few random edits.
JUNK_ALPHABETS = {
    "integer": "0123456789+-xX .e_ \t",
    "double": "0123456789+-.eEinfatyINFATY() x_,",
    "boolean": "truefalsyonTRUEFALSYON01 \t",
    "date": "0123456789-T :.Z",
    "timestamp": "0123456789-T :.Z+,",
    "timestamptz": "0123456789-T :.Z+,z",
    "decimal(6,2)": "0123456789+-.eE ,x",
}
VALID_SEEDS = {
    "integer": ["123", "-45", "9223372036854775807", "+7", "0x1f"],
    "double": ["1.5", "-2.5e-3", "inf", "NaN", ".5", "1e400"],
    "boolean": ["true", "No", "on", "0"],
    "date": ["2024-01-15", "2024-02-29 00:00:00", "2023-02-28T00:00"],
    "timestamp": ["2024-01-15T10:30:00", "2024-02-29 23:59:59.123456", "2024-01-15T10:30"],
    "timestamptz": ["2024-01-15T10:30:00Z", "2024-02-29 23:59:59.5+05:30", "2024-01-15T10:30-0800"],
    "decimal(6,2)": ["1234.56", "-0.5", "+.25", "12."],
}


@st.composite
def junk_batches(draw: st.DrawFn) -> tuple[str, list[str]]:
    type_name = draw(st.sampled_from(sorted(JUNK_ALPHABETS)))
    alphabet = JUNK_ALPHABETS[type_name]
    texts = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            texts.append(draw(st.text(alphabet, max_size=14)))
            continue
        chars = list(draw(st.sampled_from(VALID_SEEDS[type_name])))
        for _ in range(draw(st.integers(0, 3))):
            position = draw(st.integers(0, len(chars)))
            edit = draw(st.sampled_from(["insert", "delete", "replace"]))
            if edit == "insert":
                chars.insert(position, draw(st.sampled_from(alphabet)))
            elif chars:
                position = min(position, len(chars) - 1)
                if edit == "delete":
                    del chars[position]
                else:
                    chars[position] = draw(st.sampled_from(alphabet))
        texts.append("".join(chars))
    return type_name, texts


@settings(max_examples=600, deadline=None)
@given(junk_batches())
def test_junk_is_read_exactly_as_python_reads_it(batch: tuple[str, list[str]]) -> None:
    type_name, texts = batch
    assert_agrees(texts, type_name)
    for text in texts:
        assert_agrees([text], type_name)


@FAST
@given(st.lists(st.text(max_size=8), max_size=6))
def test_strings_are_kept_verbatim(texts: list[str]) -> None:
    assert_agrees(texts, "string")


@st.composite
def day_month_year_texts(draw: st.DrawFn) -> str:
    parts = [draw(st.integers(1, 31)), draw(st.integers(1, 12)), draw(st.integers(1, 9999))]
    pad = draw(st.booleans())
    day, month = (f"{part:02d}" if pad else str(part) for part in parts[:2])
    text = f"{day}/{month}/{parts[2]:04d}"
    if draw(st.booleans()):
        text += f" {draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}:{draw(st.integers(0, 61)):02d}"
    return text


@FAST
@given(st.lists(day_month_year_texts(), min_size=1, max_size=8))
def test_format_matches_python_strptime(texts: list[str]) -> None:
    fmt = "%d/%m/%Y %H:%M:%S"
    rows = parse([text if " " in text else text + " 00:00:00" for text in texts], "timestamp", fmt=fmt)
    for text, (value, error) in zip(texts, rows, strict=True):
        try:
            expected = datetime.strptime(text if " " in text else text + " 00:00:00", fmt)
        except ValueError:
            assert (value, error) == (None, BAD_TS), text
        else:
            assert (value, error) == (expected, None), text
    dates = [text.split(" ")[0] for text in texts]
    for text, (value, error) in zip(dates, parse(dates, "date", fmt="%d/%m/%Y"), strict=True):
        try:
            expected = datetime.strptime(text, "%d/%m/%Y").date()
        except ValueError:
            assert (value, error) == (None, BAD_DATE), text
        else:
            assert (value, error) == (expected, None), text
