"""Hostile CSV input end to end through Dagster: every case fails clearly or quarantines, never half commits.

The rules every case here holds to (issue 6, part 1):

- a record that cannot be read as the schema says (wrong number of fields, a quote never closed, a value that
  does not fit its type) fails a ``strict`` run naming the file and the physical line, with the table exactly
  as it was; in ``warn`` mode it lands, as written, in the ``__rejects`` table with its reason and line, and
  the valid rows are committed;
- a file that cannot be read as text at all (bytes that do not decode in the declared encoding, a UTF-16 file
  without byte order mark declared ``utf-16``, a header naming a spec column twice, a record longer than
  ``MAX_BLOCK_SIZE``) fails the run in both modes, naming the file and line, with the table as it was: its rows
  cannot be kept "unchanged, as text" in a quarantine table;
- a file without records (zero bytes, header only) succeeds and adds no row.

Each case runs on an incremental spec whose first run committed ``0_good.csv``, so "the table as it was" is
checked against a real table: same metadata file, same data files, no file of the failed run anywhere.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from dativo_dagster.sources.csv import (
    BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    PARSE_ERROR,
    RAW_RECORD,
    SOURCE_LINE,
    FileReport,
    SourceFile,
    read_source_file,
)
from dativo_dagster.spec import CsvOptions, FieldSpec
from dativo_dagster.storage import S3Settings
from dativo_dagster.validate import MAX_EXAMPLE_CHARS
from dativo_dagster_tests.conftest import CASES, Project, base_spec, branch_rows

HOSTILE = CASES / "hostile"
TABLE = "testdomain.people"
REJECTS = "testdomain.people__rejects"
BRANCH = "acme"
GOOD_ROWS = [(100, "good")]
MODES = ["strict", "warn"]


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The description of the run's one failed step."""
    failures = result.get_step_failure_events()
    assert len(failures) == 1, [f.step_key for f in failures]
    data = failures[0].event_specific_data
    assert data is not None and data.user_failure_data is not None, data
    return data.user_failure_data.description or ""


class HostileProject:
    """An incremental spec over ``data/people/*.csv`` whose table already holds ``0_good.csv``."""

    def __init__(self, project: Project, mode: str, schema: list[dict[str, Any]] | None = None, **options: Any):
        self.project = project
        self.mode = mode
        spec = base_spec(
            source={
                "type": "csv",
                "files": [{"path": "data/people/*.csv"}],
                "incremental": {"strategy": "file_modified_time", "lookback_days": 0},
                **({"options": options} if options else {}),
            },
            schema_validation_mode=mode,
        )
        if schema is not None:
            spec["schema"] = schema
        project.write_spec(spec)
        self.columns = [f["name"] for f in spec["schema"]]
        good = ",".join(self.columns) + "\n" + ",".join(["100", "good"] + ["" for _ in self.columns[2:]]) + "\n"
        encoding = options.get("encoding", "utf-8")
        project.write_data("people/0_good.csv", good.encode("utf-16" if encoding == "utf-16" else encoding))
        first = project.materialize()
        assert first.success, failure_text(first)
        table = project.table(TABLE)
        self.metadata_before = table.metadata_location
        self.parquet_before = self._parquet()
        self.rejects_before = self._rejects_rows()

    def _parquet(self) -> set[Path]:
        return set(self.project.warehouse.rglob("*.parquet"))

    def _rejects_rows(self) -> list[dict[str, Any]]:
        catalog = self.project.catalog()
        return branch_rows(catalog.load_table(REJECTS), BRANCH) if catalog.table_exists(REJECTS) else []

    def run(self, content: bytes, name: str = "1_hostile.csv") -> tuple[dg.ExecuteInProcessResult, str]:
        """Add one file and materialize; returns the result and the file's absolute path."""
        path = self.project.write_data(f"people/{name}", content)
        return self.project.materialize(), str(path.resolve())

    def rows(self) -> list[tuple[Any, ...]]:
        """The branch head's rows (spec columns only), sorted by the first column."""
        rows = branch_rows(self.project.table(TABLE), BRANCH)
        return sorted((tuple(r[c] for c in self.columns) for r in rows), key=lambda r: (r[0] is None, r[0] or 0))

    def new_rejects(self) -> list[dict[str, Any]]:
        """Rejected rows the last run added, in line order."""
        before = {(r["_source_file"], r["_source_line"]) for r in self.rejects_before}
        added = [r for r in self._rejects_rows() if (r["_source_file"], r["_source_line"]) not in before]
        return sorted(added, key=lambda r: r["_source_line"])

    def assert_unchanged(self) -> None:
        """The table is exactly as the first run left it and the failed run left no data file behind."""
        assert self.project.table(TABLE).metadata_location == self.metadata_before
        assert self._parquet() == self.parquet_before
        assert self._rejects_rows() == self.rejects_before
        assert self.rows()[:1] == [(*GOOD_ROWS[0], *[None] * (len(self.columns) - 2))]


def assert_fails_at(result: dg.ExecuteInProcessResult, where: str, line: int, *fragments: str) -> str:
    assert not result.success
    text = failure_text(result)
    assert f"{where}, line {line}" in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


# --- records that do not fit: strict fails naming the line, warn quarantines them as written ------------------


RAGGED = b'id,name\n1,Ann\n2\n3,Cy,extra\n4,"Dee\nJr",x\n5,Eve\n'


@pytest.mark.parametrize("mode", MODES)
def test_ragged_rows(project: Project, mode: str) -> None:
    case = HostileProject(project, mode)
    result, where = case.run(RAGGED)
    if mode == "strict":
        text = assert_fails_at(result, where, 3, "3 of 5 rows are invalid", "(record): unparseable_record x3")
        assert f"{where}, line 4: '3,Cy,extra'" in text and f"{where}, line 5: " in text
        case.assert_unchanged()
        return
    assert result.success
    assert case.rows() == [(1, "Ann"), (5, "Eve"), *GOOD_ROWS]
    rejects = case.new_rejects()
    assert [(r["_source_line"], r["_raw_record"]) for r in rejects] == [
        (3, "2"), (4, "3,Cy,extra"), (5, '4,"Dee\nJr",x')
    ]
    assert {r["_reject_reason"] for r in rejects} == {
        "unparseable_record: record has the wrong number of fields; expected 2"
    }
    assert all(r["_source_file"] == where and r["id"] is None for r in rejects)


@pytest.mark.parametrize("mode", MODES)
def test_unterminated_quote_at_the_end_of_the_file_swallows_nothing(project: Project, mode: str) -> None:
    content = (HOSTILE / "unterminated_quote.csv").read_bytes()
    case = HostileProject(project, mode)
    result, where = case.run(content)
    if mode == "strict":
        assert_fails_at(result, where, 3, "(record): unparseable_record x1")
        case.assert_unchanged()
        return
    assert result.success
    # the three records after the quote are not one value of row 2: the whole tail is quarantined as written
    assert case.rows() == [(1, "Ann"), *GOOD_ROWS]
    [reject] = case.new_rejects()
    assert reject["_source_line"] == 3
    assert reject["_raw_record"] == '2,"Bob\n3,Cy\n4,Dee\n'
    assert reject["_reject_reason"] == "unparseable_record: a quoted value is not closed before the end of the file"


@pytest.mark.parametrize("mode", MODES)
def test_quoted_delimiters_quotes_line_breaks_and_mixed_line_endings(project: Project, mode: str) -> None:
    content = (HOSTILE / "mixed_endings.csv").read_bytes()
    case = HostileProject(project, mode)
    result, where = case.run(content)
    if mode == "strict":
        assert_fails_at(result, where, 10, "id: invalid_integer x1", "'x10'")
        case.assert_unchanged()
        return
    assert result.success
    assert case.rows() == [
        (1, "Ann, the first"),
        (2, 'Bob "B" Jr'),
        (3, "Cy\r\nSecond line"),
        (4, "Dee\nx\ry\r\nz"),
        (6, "F,\n"),
        (7, "Gus"),
        *GOOD_ROWS,
    ]
    [reject] = case.new_rejects()
    assert (reject["_source_line"], reject["id"], reject["name"]) == (10, "x10", "Eve")
    assert reject["_reject_reason"] == "id: invalid_integer"


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(project: Project) -> None:
    case = HostileProject(project, "strict")
    result, _ = case.run("\ufeffid,name\r\n1,Ann\r\n".encode())
    assert result.success
    assert case.rows() == [(1, "Ann"), *GOOD_ROWS]


@pytest.mark.parametrize("mode", MODES)
def test_utf16_without_byte_order_mark_declared_utf16_fails_on_line_1_saying_what_to_declare(
    project: Project, mode: str
) -> None:
    case = HostileProject(project, mode, encoding="utf-16")
    result, where = case.run((HOSTILE / "utf16le_no_bom.csv").read_bytes())
    assert_fails_at(result, where, 1, "does not start with BOM", "declare utf-16-le or utf-16-be")
    case.assert_unchanged()


def test_utf16_without_byte_order_mark_declared_utf16_le_loads(project: Project) -> None:
    case = HostileProject(project, "strict", encoding="utf-16-le")
    result, _ = case.run((HOSTILE / "utf16le_no_bom.csv").read_bytes())
    assert result.success
    assert case.rows() == [(1, "Zoë"), (2, "Łukasz"), *GOOD_ROWS]


@pytest.mark.parametrize("mode", MODES)
def test_bytes_invalid_in_the_declared_encoding_fail_the_file_in_both_modes(project: Project, mode: str) -> None:
    case = HostileProject(project, mode)
    result, where = case.run((HOSTILE / "body_latin1_declared_utf8.csv").read_bytes())
    assert_fails_at(result, where, 4, "text is not valid utf-8")
    case.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_header_in_another_layout_than_the_body_adventureworks_product(project: Project, mode: str) -> None:
    """Product.csv names 25 columns and holds 26 fields per record: every record is unparseable."""
    source = HOSTILE / "product_header_mismatch.csv"
    header = source.read_text().splitlines()[0].split(",")
    schema = [{"name": "ProductID", "type": "integer", "required": True}, {"name": "Name", "type": "string"}]
    case = HostileProject(project, mode, schema=schema)
    result, where = case.run(source.read_bytes())
    assert len(header) == 25
    if mode == "strict":
        assert_fails_at(result, where, 2, "10 of 10 rows are invalid", "(record): unparseable_record x10")
        case.assert_unchanged()
        return
    assert result.success
    assert case.rows() == GOOD_ROWS
    rejects = case.new_rejects()
    body = [line for line in source.read_text().splitlines()[1:] if line]  # the file ends in a blank line
    assert [(r["_source_line"], r["_raw_record"]) for r in rejects] == list(enumerate(body, start=2))
    assert {r["_reject_reason"] for r in rejects} == {
        "unparseable_record: record has the wrong number of fields; expected 25"
    }


@pytest.mark.parametrize("mode", MODES)
def test_header_in_utf16_and_body_in_utf8(project: Project, mode: str) -> None:
    case = HostileProject(project, mode, encoding="utf-16")
    result, where = case.run((HOSTILE / "header_utf16_body_utf8.csv").read_bytes())
    if mode == "strict":
        assert_fails_at(result, where, 2, "(record): unparseable_record x1")
        case.assert_unchanged()
        return
    assert result.success
    assert case.rows() == GOOD_ROWS
    [reject] = case.new_rejects()
    assert reject["_source_line"] == 2
    assert reject["_raw_record"] == "1,Ann\n2,Bob\n".encode().decode("utf-16-le")


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n"], ids=["zero-bytes", "bom-only", "newline-only"])
@pytest.mark.parametrize("mode", MODES)
def test_a_file_without_its_header_is_nothing_readable_and_changes_nothing(
    project: Project, mode: str, content: bytes
) -> None:
    """CONTRACT 3: zero bytes where a header is expected fails the run naming the file, in either mode."""
    case = HostileProject(project, mode)
    result, where = case.run(content)
    assert not result.success
    text = failure_text(result)
    assert f"{where}: nothing readable: no header record" in text, text
    case.assert_unchanged()


@pytest.mark.parametrize("content", [b"id,name\n", b"\xef\xbb\xbfid,name\r\n"], ids=["header-only", "bom-header"])
@pytest.mark.parametrize("mode", MODES)
def test_files_without_records_succeed_and_add_no_rows(project: Project, mode: str, content: bytes) -> None:
    """The file is recorded as read (a snapshot without data files), so the next run finds nothing new."""
    case = HostileProject(project, mode)
    result, where = case.run(content)
    assert result.success
    table = project.table(TABLE)
    head = table.snapshot_by_name(BRANCH)
    assert where in head.summary.additional_properties["dativo.source-state"]
    assert head.summary["added-data-files"] is None or head.summary["added-data-files"] == "0"
    assert case.rows() == GOOD_ROWS
    assert set(project.warehouse.rglob("*.parquet")) == case.parquet_before
    again = project.materialize()
    assert again.success
    assert project.table(TABLE).metadata_location == table.metadata_location


@pytest.mark.parametrize(
    ("header", "columns"),
    [(b"id,name,id", "1 ('id'), 3 ('id')"), (b"ID,name,Id", "1 ('ID'), 3 ('Id')")],
    ids=["exact", "case-variants"],
)
@pytest.mark.parametrize("mode", MODES)
def test_header_naming_a_spec_column_twice_fails_on_line_1(
    project: Project, mode: str, header: bytes, columns: str
) -> None:
    """An exact name beside a case variant is no conflict (the exact one wins, see test_extract)."""
    case = HostileProject(project, mode)
    result, where = case.run(header + b"\n1,Ann,2\n")
    assert_fails_at(result, where, 1, f"header names column 'id' more than once: columns {columns}")
    case.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_missing_and_empty_header_names(project: Project, mode: str) -> None:
    """A required spec column the header lacks makes every row invalid; both are reported, nothing is guessed."""
    schema = [{"name": "id", "type": "integer", "required": True}, {"name": "name", "type": "string", "required": True}]
    case = HostileProject(project, mode, schema=schema)
    result, where = case.run(b"id,,\n1,Ann,x\n2,Bob,y\n")
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    drift = {k: v.value for k, v in checks["schema_drift"].metadata.items()}
    assert not checks["schema_drift"].passed
    assert drift["spec_columns_missing"] == {where: ["name"]}
    assert drift["columns_not_in_spec"] == {where: ["", ""]}
    if mode == "strict":
        assert_fails_at(result, where, 2, "name: missing_required x2")
        case.assert_unchanged()
        return
    assert result.success
    assert case.rows() == GOOD_ROWS
    assert [(r["_source_line"], r["id"], r["name"], r["_reject_reason"]) for r in case.new_rejects()] == [
        (2, "1", None, "name: missing_required"),
        (3, "2", None, "name: missing_required"),
    ]


# --- size: a 10 MB field, a 2 GB sparse file ------------------------------------------------------------------

TEN_MB = 10 * 2**20


def test_a_10_mb_field_loads_intact_and_later_lines_stay_right(project: Project) -> None:
    case = HostileProject(project, "warn")
    big = "é" * (TEN_MB // 2)  # 10 MiB of UTF-8, 5 Mi characters: far more than one read block
    content = f'id,name\n1,"{big}"\n2,"two\nlines"\nx3,Cy\n'.encode()
    result, _ = case.run(content)
    assert result.success
    rows = case.rows()
    assert [r[0] for r in rows] == [1, 2, 100]
    assert rows[0][1] == big and rows[1][1] == "two\nlines"
    [reject] = case.new_rejects()
    assert (reject["_source_line"], reject["id"]) == (5, "x3")


@pytest.mark.parametrize("mode", MODES)
def test_a_10_mb_value_that_does_not_fit_is_kept_whole_but_shown_short(project: Project, mode: str) -> None:
    case = HostileProject(project, mode)
    big = "9" * TEN_MB
    result, where = case.run(f"id,name\n1,Ann\n{big},Bob\n".encode())
    if mode == "strict":
        text = assert_fails_at(result, where, 3, "id: out_of_range x1", f"({TEN_MB:,} characters)")
        assert len(text) < 2 * MAX_EXAMPLE_CHARS + 1000
        case.assert_unchanged()
        return
    assert result.success
    [reject] = case.new_rejects()
    assert reject["id"] == big and reject["_reject_reason"] == "id: out_of_range"
    metadata = {c.check_name: c for c in result.get_asset_check_evaluations()}["validation"].metadata
    assert len(metadata["first_errors"].value) < 3 * MAX_EXAMPLE_CHARS


SPARSE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dativo_dagster_tests.conftest import Project, base_spec

    root = Path(sys.argv[1])
    project = Project(root)
    project.write_spec(base_spec())
    path = project.data_dir / "people.csv"
    with open(path, "wb") as handle:
        handle.write(b"id,name\\n")
        handle.truncate(2 * 1024**3)  # 2 GiB: the header, then a hole that reads as NUL bytes
    started = time.monotonic()
    result = project.materialize()
    seconds = time.monotonic() - started
    [failure] = result.get_step_failure_events()
    print(failure.step_key)
    print(failure.event_specific_data.user_failure_data.description)
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork and exec into ru_maxrss, and the
    # parent here is the whole test session
    status = Path("/proc/self/status").read_text()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    print(result.success, round(seconds, 1), peak_kb // 1024)
    """
)


def test_a_2_gb_sparse_file_fails_clearly_with_bounded_memory(tmp_path: Path) -> None:
    """Header, then 2 GiB of NUL bytes without a line break: one record far longer than any block.

    The record has no line break within MAX_BLOCK_SIZE characters, so the reader refuses it naming line 2
    before any pass with larger blocks (pyarrow would read up to 32 such blocks ahead); it never reads the
    whole file into memory. Measured: about 1 s and 250 MB peak RSS (Dagster itself takes some 200 MB).
    """
    root = tmp_path / "project"
    result = subprocess.run(
        [sys.executable, "-c", SPARSE_SCRIPT, str(root)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    step, *message, summary = result.stdout.strip().splitlines()
    success, seconds, peak_mb = summary.split()
    assert step == "people.people__extract"
    where = str((root / "data" / "people.csv").resolve())
    assert message[0] == (
        f"{where}, line 2: the record starting here is longer than {MAX_BLOCK_SIZE >> 20} MiB, the most one record"
        " may hold; is this a CSV file with the declared delimiter and quote character?"
    )
    assert success == "False"
    assert int(peak_mb) < 500, summary
    assert float(seconds) < 60, summary
    assert not list((root / ".dativo" / "warehouse").rglob("*.parquet"))
    (root / "data" / "people.csv").unlink()


# --- binary garbage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_binary_garbage_declared_utf8_fails_on_line_1(project: Project, mode: str) -> None:
    case = HostileProject(project, mode)
    result, where = case.run((HOSTILE / "binary_garbage.bin").read_bytes())
    assert_fails_at(result, where, 1, "header is not valid utf-8")
    case.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_binary_garbage_declared_latin1_is_read_as_nonsense_text_and_rejected(project: Project, mode: str) -> None:
    """Every byte is a Latin-1 character, so the file is text: its header names no spec column and its
    records are ragged. Nothing of it is committed; warn keeps every record in quarantine."""
    case = HostileProject(project, mode, encoding="latin-1")
    result, where = case.run((HOSTILE / "binary_garbage.bin").read_bytes())
    if mode == "strict":
        assert_fails_at(result, where, 2, "id: missing_required")
        case.assert_unchanged()
        return
    assert result.success
    assert case.rows() == GOOD_ROWS
    metadata = {c.check_name: c for c in result.get_asset_check_evaluations()}["reconciliation"].metadata
    rejects = case.new_rejects()
    assert metadata["rows_committed"].value == 0
    assert metadata["rows_read"].value == metadata["rows_rejected"].value == len(rejects) > 0


# --- values at and beyond the limits of their types -----------------------------------------------------------

LIMITS_SCHEMA = [
    {"name": "id", "type": "integer", "required": True},
    {"name": "label", "type": "string"},
    {"name": "n", "type": "long"},
    {"name": "money", "type": "decimal(38,2)"},
    {"name": "ratio", "type": "decimal(5,5)"},
    {"name": "x", "type": "double"},
    {"name": "day", "type": "date"},
    {"name": "at", "type": "timestamp"},
    {"name": "atz", "type": "timestamptz"},
    {"name": "flag", "type": "boolean"},
]
INT64_MAX = 2**63 - 1
DEC38 = "9" * 36 + ".99"
# (id, column, text, expected value or the rejection kind)
LIMIT_CASES: list[tuple[str, str, Any]] = [
    ("n", str(INT64_MAX), INT64_MAX),
    ("n", str(-(2**63)), -(2**63)),
    ("n", "+0009223372036854775807", INT64_MAX),
    ("n", str(2**63), "out_of_range"),
    ("n", str(-(2**63) - 1), "out_of_range"),
    ("n", "1" * 400, "out_of_range"),
    ("n", "NaN", "invalid_integer"),
    ("n", "Infinity", "invalid_integer"),
    ("n", "1e3", "invalid_integer"),
    ("n", "0x1F", "invalid_integer"),
    ("money", DEC38, Decimal(DEC38)),
    ("money", "-" + DEC38, Decimal("-" + DEC38)),
    ("money", "9" * 37 + ".99", "out_of_range"),
    ("money", "1.001", "out_of_range"),
    ("money", "NaN", "invalid_decimal"),
    ("money", "Infinity", "invalid_decimal"),
    ("money", "1e2", "invalid_decimal"),
    ("ratio", "0.99999", Decimal("0.99999")),
    ("ratio", "-.00001", Decimal("-0.00001")),
    ("ratio", "1.0", "out_of_range"),
    ("x", "1.7976931348623157e308", 1.7976931348623157e308),
    ("x", "1e309", "out_of_range"),
    ("x", "-1e309", "out_of_range"),
    ("x", "5e-324", "out_of_range"),
    ("x", "1e-400", "out_of_range"),
    ("x", "2.2250738585072014e-308", 2.2250738585072014e-308),
    ("x", "0e-999", 0.0),
    ("x", "NaN", math.nan),
    ("x", "-Infinity", -math.inf),
    ("x", "inf", math.inf),
    ("x", "nan(0x1)", "invalid_float"),
    ("day", "2024-02-29", "2024-02-29"),
    ("day", "2023-02-29", "invalid_date"),
    ("day", "2023-04-31", "invalid_date"),
    ("day", "0000-01-01", "out_of_range"),
    ("day", "10000-01-01", "invalid_date"),
    ("day", "Infinity", "invalid_date"),
    ("day", "2024-01-01 00:00:00", "2024-01-01"),
    ("day", "2024-01-01 00:00:01", "invalid_date"),
    ("at", "2024-12-31 23:59:59.999999", "2024-12-31 23:59:59.999999"),
    ("at", "2024-01-01 24:00:00", "invalid_timestamp"),
    ("at", "2024-01-01T23:60:00", "invalid_timestamp"),
    ("at", "2024-01-01 23:59:60", "invalid_timestamp"),
    ("at", "2023-02-29 12:00:00", "invalid_timestamp"),
    ("at", "2024-01-01 12:00:00+01:00", "invalid_timestamp"),
    ("atz", "9999-12-31T23:59:59-01:00", "out_of_range"),
    ("atz", "2024-01-01T00:00:00+24:00", "invalid_timestamptz"),
    ("atz", "2024-01-01T00:30:00+01:00", "2023-12-31 23:30:00+00:00"),
    ("flag", "NaN", "invalid_boolean"),
    ("flag", "2", "invalid_boolean"),
    ("flag", " Yes ", True),
]


def _limits_csv() -> bytes:
    names = [f["name"] for f in LIMITS_SCHEMA]
    lines = [",".join(names)]
    for i, (column, text, _) in enumerate(LIMIT_CASES):
        row = {name: "" for name in names}
        row["id"], row["label"], row[column] = str(i), f"{column}:{text}"[:40], text
        lines.append(",".join(row[n] for n in names))
    return ("\n".join(lines) + "\n").encode()


def _as_text(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value) if hasattr(value, "isoformat") else value


@pytest.mark.parametrize("mode", MODES)
def test_numbers_dates_and_specials_at_and_beyond_their_limits(project: Project, mode: str) -> None:
    case = HostileProject(project, mode, schema=LIMITS_SCHEMA)
    result, where = case.run(_limits_csv())
    rejected = {i: expected for i, (_, _, expected) in enumerate(LIMIT_CASES) if isinstance(expected, str)
                and re.fullmatch(r"[a-z_]+", expected)}
    if mode == "strict":
        assert_fails_at(result, where, 2 + min(rejected), f"{len(rejected)} of {len(LIMIT_CASES)} rows are invalid")
        case.assert_unchanged()
        return
    assert result.success
    committed = {row[0]: row for row in case.rows() if row[0] != 100}
    assert sorted(committed) == sorted(set(range(len(LIMIT_CASES))) - set(rejected))
    names = [f["name"] for f in LIMITS_SCHEMA]
    for i, row in committed.items():
        column, text, expected = LIMIT_CASES[i]
        got = row[names.index(column)]
        expected_text = _as_text(expected)
        assert _as_text(got) == expected_text, (text, got)
    reasons = {int(r["id"]): r["_reject_reason"] for r in case.new_rejects()}
    assert reasons == {i: f"{LIMIT_CASES[i][0]}: {kind}" for i, kind in rejected.items()}


def test_hostile_case_files_carry_their_attribution() -> None:
    sources = (HOSTILE / "SOURCES.md").read_text()
    assert "AdventureWorks" in sources and "MIT" in sources and "product_header_mismatch.csv" in sources
    lines = (HOSTILE / "product_header_mismatch.csv").read_text().splitlines()
    assert lines[0].startswith("ProductID,Name,ProductNumber,") and lines[1].startswith("1,Adjustable Race,AR-5381,")


# --- the reader itself: the end-of-file quote check and the restart with larger blocks ---------------------------

UNCLOSED = "a quoted value is not closed before the end of the file"


def read_plain(path: Path, **options: Any) -> tuple[list[tuple[Any, ...]], FileReport]:
    source = SourceFile(uri=str(path), size=path.stat().st_size, version="1")
    report = FileReport(uri=source.uri)
    fields = [FieldSpec(name="id", type="string"), FieldSpec(name="name", type="string")]
    batches = list(read_source_file(source, fields, CsvOptions(**options), S3Settings(), report))
    rows = pa.Table.from_batches(batches).to_pylist() if batches else []
    return [(r[SOURCE_LINE], r["id"], r["name"], r[PARSE_ERROR], r[RAW_RECORD]) for r in rows], report


@pytest.mark.parametrize(
    ("tail", "last"),
    [
        ('2,"Bob', (3, None, None, UNCLOSED, '2,"Bob')),
        ('2,"', (3, None, None, UNCLOSED, '2,"')),
        ('2,"a""b', (3, None, None, UNCLOSED, '2,"a""b')),
        (',"', (3, None, None, UNCLOSED, ',"')),
        ('2,"a\r\n\r\nb', (3, None, None, UNCLOSED, '2,"a\r\n\r\nb')),
        ('2,"Bob"', (3, "2", "Bob", None, None)),
        ('2,""', (3, "2", "", None, None)),
        ('2,"a""b"', (3, "2", 'a"b', None, None)),
        ("2,Bob", (3, "2", "Bob", None, None)),
        ('2,Bo"b', (3, "2", 'Bo"b', None, None)),
        ('2,"x\ny"\n', (3, "2", "x\ny", None, None)),
    ],
    ids=["open", "only-quote", "doubled-inside", "blank-fields", "line-breaks", "closed", "empty-quoted",
         "doubled-closed", "unquoted", "quote-inside-unquoted", "closed-multiline"],
)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "latin-1"])
def test_only_a_quote_still_open_at_the_end_of_the_file_rejects_the_last_record(
    tmp_path: Path, tail: str, last: tuple[Any, ...], encoding: str
) -> None:
    path = tmp_path / "tail.csv"
    path.write_bytes(("id,name\n1,Ann\n" + tail).encode(encoding))
    rows, report = read_plain(path, encoding=encoding)
    assert rows == [(2, "1", "Ann", None, None), last]
    assert (report.rows, report.unparseable_records) == ((1, 1) if last[3] else (2, 0))


def test_a_record_longer_than_the_block_restarts_the_reader_without_losing_or_repeating_rows(tmp_path: Path) -> None:
    """Ragged and multi-line records before and after a 5 MiB one: every record once, in order, on its line."""
    head = "".join(f"{i},n{i}\n" if i % 7 else f'{i},"two\nlines",extra\n' for i in range(1, 60_000))
    big = "9," + "x" * (5 * 2**20) + "\n"
    tail = "".join(f"{i},n{i}\n" if i % 5 else f"{i}\n" for i in range(60_000, 60_050))
    path = tmp_path / "long.csv"
    path.write_text("id,name\n" + head + big + tail)
    assert 4 * BLOCK_SIZE < 5 * 2**20
    rows, report = read_plain(path)
    ids = [int(r[1]) if r[1] is not None else int(r[4].split(",")[0]) for r in rows]
    assert ids == [*range(1, 60_000), 9, *range(60_000, 60_050)]
    lines = [r[0] for r in rows]
    assert lines == sorted(lines) and len(set(lines)) == len(lines)
    assert rows[60_000 - 1][0] == 2 + 59_999 + len(range(7, 60_000, 7))  # the big record's line
    assert rows[60_000 - 1][2] == "x" * (5 * 2**20)
    assert report.unparseable_records == len(range(7, 60_000, 7)) + len(range(60_000, 60_050, 5))
    assert report.rows + report.unparseable_records == len(rows)
