"""Batch validation: valid typed rows, rejected rows with reasons, and the report."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest

from dativo_dagster.sources.csv import PARSE_ERROR, RAW_RECORD, SOURCE_FILE, SOURCE_LINE, text_schema
from dativo_dagster.spec import CsvOptions, FieldSpec
from dativo_dagster.validate import ValidationReport, validate_batch

FIELDS = [
    FieldSpec(name="id", type="integer", required=True),
    FieldSpec(name="amount", type="decimal(6,2)"),
    FieldSpec(name="active", type="boolean"),
    FieldSpec(name="name", type="string", required=True),
]


def text_batch(rows: list[dict], fields=FIELDS, file: str = "/data/in.csv") -> pa.RecordBatch:
    schema = text_schema(fields)
    columns = {f.name: [r.get(f.name) for r in rows] for f in fields}
    columns[SOURCE_FILE] = [file] * len(rows)
    columns[SOURCE_LINE] = [r.get("_line", i + 2) for i, r in enumerate(rows)]
    columns[PARSE_ERROR] = [r.get("_error") for r in rows]
    columns[RAW_RECORD] = [r.get("_raw") for r in rows]
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def test_valid_rows_are_typed_and_rejects_keep_original_text():
    batch = text_batch(
        [
            {"id": "1", "amount": "12.50", "active": "yes", "name": "Ann"},
            {"id": "x2", "amount": "1.234", "active": "maybe", "name": "Bob"},
            {"id": " 3 ", "amount": "", "active": "0", "name": "Cy"},
            {"id": "", "amount": "7", "active": "1", "name": ""},
        ]
    )
    valid, rejects, tally = validate_batch(batch, FIELDS, CsvOptions().null_values)
    assert valid.to_pylist() == [
        {"id": 1, "amount": Decimal("12.50"), "active": True, "name": "Ann", SOURCE_FILE: "/data/in.csv"},
        {"id": 3, "amount": None, "active": False, "name": "Cy", SOURCE_FILE: "/data/in.csv"},
    ]
    assert valid.schema.field("amount").type == pa.decimal128(6, 2)
    rows = rejects.to_pylist()
    assert [r[SOURCE_LINE] for r in rows] == [3, 5]
    assert rows[0]["id"] == "x2" and rows[0]["amount"] == "1.234" and rows[0]["active"] == "maybe"
    assert rows[0]["_reject_reason"] == "id: invalid_integer; amount: out_of_range; active: invalid_boolean"
    assert rows[1]["_reject_reason"] == "id: missing_required; name: missing_required"
    assert rows[1]["id"] == "" and rows[1]["name"] == ""
    assert (tally.rows_read, tally.rows_valid, tally.rows_rejected) == (4, 2, 2)
    assert tally.errors[("id", "invalid_integer")][0] == 1
    assert tally.errors[("name", "missing_required")][0] == 1
    example = tally.errors[("active", "invalid_boolean")][1][0]
    assert (example.file, example.line, example.value) == ("/data/in.csv", 3, "maybe")


def test_unparseable_records_are_rejected_with_their_raw_text():
    batch = text_batch(
        [
            {"id": "1", "name": "ok"},
            {"_error": "record has the wrong number of fields; expected 4", "_raw": "9,9", "_line": 7},
        ]
    )
    valid, rejects, tally = validate_batch(batch, FIELDS, CsvOptions().null_values)
    assert valid.num_rows == 1
    (row,) = rejects.to_pylist()
    assert row[RAW_RECORD] == "9,9" and row[SOURCE_LINE] == 7
    assert row["_reject_reason"] == "unparseable_record: record has the wrong number of fields; expected 4"
    assert tally.errors[("(record)", "unparseable_record")][0] == 1


def test_custom_null_values():
    fields = [FieldSpec(name="n", type="integer", required=True)]
    batch = text_batch([{"n": "N/A"}, {"n": "5"}], fields=fields)
    valid, rejects, _ = validate_batch(batch, fields, CsvOptions(null_values=["N/A"]).null_values)
    assert valid.column("n").to_pylist() == [5]
    assert rejects.to_pylist()[0]["_reject_reason"] == "n: missing_required"


def test_report_accumulates_counts_and_keeps_first_examples():
    report = ValidationReport()
    for start in (0, 10):
        rows = [{"id": "bad", "name": "n", "_line": start + i} for i in range(5)]
        report.add(validate_batch(text_batch(rows), FIELDS, CsvOptions().null_values)[2])
    (entry,) = report.errors
    assert (entry.field, entry.kind, entry.count) == ("id", "invalid_integer", 10)
    assert [e.line for e in entry.examples] == [0, 1, 2]
    assert report.rows_read == 10 and report.rows_rejected == 10
    text = report.describe()
    assert "id: invalid_integer x10" in text and "/data/in.csv, line 0: 'bad'" in text


@pytest.mark.parametrize("mode_rows", [0, 1])
def test_empty_and_all_valid_batches(mode_rows):
    rows = [{"id": "1", "name": "a"}] * mode_rows
    valid, rejects, tally = validate_batch(text_batch(rows), FIELDS, CsvOptions().null_values)
    assert valid.num_rows == mode_rows and rejects.num_rows == 0 and tally.rows_rejected == 0


@pytest.mark.parametrize("classification", ["PII", "pii", "Pii", " pii "])
def test_a_pii_fields_rejected_values_are_never_shown(classification):
    """A rejected value of a field classified PII (any case) is shown by kind, file, line and length only;
    the rejects table still keeps the record as written (its purpose)."""
    fields = [
        FieldSpec(name="id", type="integer", required=True),
        FieldSpec(name="born", type="date", classification=classification),
        FieldSpec(name="name", type="string", classification="internal"),
    ]
    batch = text_batch(
        [
            {"id": "1", "born": "1984-13-01", "name": "Ann"},
            {"id": "x2", "born": "1990-01-01", "name": "Bob"},
            {"_error": "record has the wrong number of fields; expected 3", "_raw": "3,1975-06-07,Cy,extra", "_line": 4},
        ],
        fields=fields,
    )
    _, rejects, tally = validate_batch(batch, fields, CsvOptions().null_values)
    report = ValidationReport()
    report.add(tally)
    [born] = [e for e in report.errors if e.field == "born"]
    assert (born.kind, born.count, [(x.file, x.line) for x in born.examples]) == (
        "invalid_date", 1, [("/data/in.csv", 2)]
    )
    assert [(x.value, x.withheld, x.length) for x in born.examples] == [(None, True, 10)]
    # the raw text of an unparseable record holds the PII field too
    [record] = [e for e in report.errors if e.field == "(record)"]
    assert [(x.value, x.withheld, x.length, x.line) for x in record.examples] == [(None, True, 21, 4)]
    text = report.describe()
    assert "1984-13-01" not in text and "1975-06-07" not in text, text
    assert "born: invalid_date x1 (e.g. /data/in.csv, line 2: PII value withheld, 10 characters)" in text, text
    assert "(record): unparseable_record x1 (e.g. /data/in.csv, line 4: PII value withheld, 21 characters)" in text
    # a field not classified PII still shows its value
    assert "id: invalid_integer x1 (e.g. /data/in.csv, line 3: 'x2')" in text, text
    assert [r["born"] for r in rejects.to_pylist()] == ["1984-13-01", "1990-01-01", None]
    assert rejects.to_pylist()[2][RAW_RECORD] == "3,1975-06-07,Cy,extra"


def test_pii_withheld_examples_survive_the_report_round_trip():
    """Reports travel between steps as JSON: a withheld example stays withheld."""
    fields = [FieldSpec(name="ssn", type="integer", classification="PII")]
    _, _, tally = validate_batch(text_batch([{"ssn": "123-45-6789"}], fields=fields), fields, CsvOptions().null_values)
    report = ValidationReport()
    report.add(tally)
    again = ValidationReport.model_validate_json(report.model_dump_json())
    assert "123-45-6789" not in report.model_dump_json()
    assert again.describe() == report.describe()
    assert "line 2: PII value withheld, 11 characters" in again.describe()
