"""Extract: real CSV files in many dialects and encodings become text batches with file and line."""

from __future__ import annotations

import csv
import io
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from dativo_dagster.errors import NothingToReadError, SourceError
from dativo_dagster.sources.csv import (
    BLOCK_SIZE,
    PARSE_ERROR,
    RAW_RECORD,
    SOURCE_FILE,
    SOURCE_LINE,
    FileReport,
    SourceFile,
    iter_source_batches,
    list_source_files,
    read_source_file,
    text_schema,
)
from dativo_dagster.spec import AssetSpecModel, CsvOptions, FieldSpec, LoadedSpec
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import CASES, base_spec

CSV_CASES = CASES / "csv"
PEOPLE = ["id", "name", "city"]
PEOPLE_ROWS = [("1", "Ann", "Zürich"), ("2", "Bob", "Łódź"), ("3", "Chloé", "São Paulo")]


def _fields(names: list[str]) -> list[FieldSpec]:
    return [FieldSpec(name=name, type="string") for name in names]


def read(path: Path, names: list[str] = PEOPLE, **options: Any) -> tuple[list[dict[str, Any]], FileReport]:
    """All rows of one file as dicts, and its report."""
    source = SourceFile(uri=str(path.resolve()), size=path.stat().st_size, version="1")
    report = FileReport(uri=source.uri)
    fields = _fields(names)
    batches = list(read_source_file(source, fields, CsvOptions(**options), S3Settings(), report))
    for batch in batches:
        assert batch.schema == text_schema(fields)
    return pa.Table.from_batches(batches, schema=text_schema(fields)).to_pylist(), report


def values(rows: list[dict[str, Any]], names: list[str] = PEOPLE) -> list[tuple[Any, ...]]:
    return [tuple(row[n] for n in names) for row in rows]


def lines(rows: list[dict[str, Any]]) -> list[int]:
    return [row[SOURCE_LINE] for row in rows]


def write_bytes(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_text_schema_is_spec_columns_then_source_columns():
    schema = text_schema(_fields(["b", "a"]))
    assert schema.names == ["b", "a", SOURCE_FILE, SOURCE_LINE, PARSE_ERROR, RAW_RECORD]
    assert schema.field(SOURCE_LINE).type == pa.int64()
    assert all(schema.field(n).type == pa.string() for n in ("b", "a", PARSE_ERROR, RAW_RECORD))
    # one file per batch: its URI is a dictionary's one entry, not a copy per row
    assert schema.field(SOURCE_FILE).type == pa.dictionary(pa.int32(), pa.string())


def test_utf8_with_header():
    path = CSV_CASES / "people.csv"
    rows, report = read(path)
    assert values(rows) == PEOPLE_ROWS
    assert lines(rows) == [2, 3, 4]
    assert {row[SOURCE_FILE] for row in rows} == {str(path.resolve())}
    assert all(row[PARSE_ERROR] is None and row[RAW_RECORD] is None for row in rows)
    assert (report.rows, report.blank_records, report.unparseable_records) == (3, 0, 0)
    assert report.extra_columns == [] and report.missing_columns == []


@pytest.mark.parametrize("case", ["people_bom.csv", "people_utf16le.csv", "people_utf16be.csv"])
def test_byte_order_marks_are_not_part_of_the_first_column_name(case):
    encoding = "utf-8" if case == "people_bom.csv" else "utf-16"
    rows, report = read(CSV_CASES / case, encoding=encoding)
    assert values(rows) == PEOPLE_ROWS
    assert lines(rows) == [2, 3, 4]
    assert report.missing_columns == [] and report.extra_columns == []


def test_utf16_without_header_and_with_quoted_newlines(tmp_path):
    text = '1,"multi\r\nline",Bern\n2,Bob,"a\nb\nc"\n3,Cy,Zug\n'
    for codec, bom in (("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")):
        path = write_bytes(tmp_path, f"{codec}.csv", bom + text.encode(codec))
        rows, _ = read(path, encoding="utf-16", header=False)
        assert values(rows) == [("1", "multi\r\nline", "Bern"), ("2", "Bob", "a\nb\nc"), ("3", "Cy", "Zug")]
        assert lines(rows) == [1, 3, 6]


def test_latin1():
    rows, _ = read(CSV_CASES / "people_latin1.csv", encoding="latin-1")
    assert values(rows) == [("1", "Renée", "Orléans"), ("2", "José", "Málaga")]
    assert (CSV_CASES / "people_latin1.csv").read_bytes().count(b"\xe9") == 3  # é as one byte, 0xE9


def test_pipe_delimiter_without_header_takes_columns_in_schema_order():
    rows, report = read(CSV_CASES / "people_pipe_noheader.psv", delimiter="|", header=False)
    assert values(rows) == [("1", "Ann", "Bern|Zug"), ("2", "Bob", "Basel")]
    assert lines(rows) == [1, 2]
    assert report.missing_columns == [] and report.extra_columns == []


def test_custom_quote_char_and_delimiter():
    rows, _ = read(CSV_CASES / "semicolon_single_quote.csv", delimiter=";", quote_char="'")
    assert values(rows) == [("1", "Smith; Ann", "Bern"), ("2", "O'Brien", "Zug\nSouth"), ("3", "Cy", "Chur")]
    assert lines(rows) == [2, 3, 5]


def test_quoted_delimiters_quotes_and_newlines_keep_later_line_numbers_right():
    rows, report = read(CSV_CASES / "quoted.csv")
    assert values(rows) == [
        ("1", "Smith, Ann", "Bern"),
        ("2", 'Bob "the builder"', "Basel"),
        ("3", "multi\nline\nname", "Zug"),
        ("4", "Dan", "Chur\n"),
        ("5", "Eve", "Genf"),
    ]
    assert lines(rows) == [2, 3, 4, 7, 9]
    assert report.unparseable_records == 0


@pytest.mark.parametrize(
    ("content", "expected_lines"),
    [
        (b"id,name,city\r\n1,Ann,Bern\r\n2,Bob,Basel\r\n3,Cy,Zug", [2, 3, 4]),
        (b"id,name,city\n1,Ann,Bern\r\n2,Bob,Basel\r3,Cy,Zug\n", [2, 3, 4]),
        (b'id,name,city\r\n1,"a\r\nb",Bern\r2,"c\rd\ne",Basel\n3,Cy,Zug\r\n', [2, 4, 7]),
    ],
    ids=["crlf", "mixed", "mixed-inside-quotes"],
)
def test_crlf_and_mixed_line_endings(tmp_path, content, expected_lines):
    rows, _ = read(write_bytes(tmp_path, "endings.csv", content))
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert [r["city"] for r in rows] == ["Bern", "Basel", "Zug"]
    assert lines(rows) == expected_lines


def test_blank_lines_are_skipped_and_counted_including_trailing_ones():
    rows, report = read(CSV_CASES / "blank_lines.csv")
    assert values(rows) == [("1", "Ann", "Bern"), ("2", "Bob", "Basel")]
    assert lines(rows) == [3, 6]
    # three empty lines between/around the rows, ",," (all fields empty) and two trailing empty lines
    assert report.blank_records == 6
    assert report.rows == 2


def test_blank_lines_in_a_single_column_file_without_header(tmp_path):
    rows, report = read(write_bytes(tmp_path, "one.csv", b"a\n\nb\n\n"), names=["v"], header=False)
    assert [(r["v"], r[SOURCE_LINE]) for r in rows] == [("a", 1), ("b", 3)]
    assert report.blank_records == 2


def test_ragged_rows_come_through_with_reason_raw_text_and_line_in_file_order():
    rows, report = read(CSV_CASES / "ragged.csv")
    got = [(r[SOURCE_LINE], r["id"], r[PARSE_ERROR] is not None, r[RAW_RECORD]) for r in rows]
    assert got == [
        (2, "1", False, None),
        (3, None, True, "2,Bob"),
        (4, None, True, "3,Cy,Zug,extra"),
        (5, None, True, '4,"two\nlines",Chur,x'),
        (7, "5", False, None),
        (8, None, True, "6"),
    ]
    assert "expected 3" in rows[1][PARSE_ERROR]
    assert (report.rows, report.unparseable_records) == (2, 4)


def test_ragged_first_record_without_header(tmp_path):
    rows, report = read(write_bytes(tmp_path, "r.csv", b"1,2,3,4\n5,6,7\n"), header=False)
    assert [(r[SOURCE_LINE], r[RAW_RECORD], r["id"]) for r in rows] == [(1, "1,2,3,4", None), (2, None, "5")]
    assert report.unparseable_records == 1


@pytest.mark.parametrize(
    ("content", "header"),
    [
        (b"id,name,city\n", True),
        (b"id,name,city", True),
        (b"id,name,city\r\n", True),
        (b"", False),
        (b"\n\n", False),
        ("id,name,city".encode("utf-16"), True),
    ],
    ids=[
        "header-only",
        "header-no-newline",
        "header-crlf",
        "zero-bytes-no-header",
        "only-newlines-no-header",
        "utf16-header-only",
    ],
)
def test_files_without_records_give_zero_rows(tmp_path, content, header):
    encoding = "utf-16" if content.startswith(b"\xff\xfe") else "utf-8"
    rows, report = read(write_bytes(tmp_path, "nothing.csv", content), header=header, encoding=encoding)
    assert rows == []
    assert report.rows == 0 and report.unparseable_records == 0


def test_case_files_without_records():
    assert read(CSV_CASES / "header_only.csv")[0] == []
    assert read(CSV_CASES / "empty.csv", header=False)[0] == []


@pytest.mark.parametrize(
    "content",
    [b"", b"\xef\xbb\xbf", b"\n\n", b"\r\n", "".encode("utf-16")],
    ids=["zero-bytes", "bom-only", "only-newlines", "only-crlf", "utf16-bom-only"],
)
def test_a_file_without_the_expected_header_is_nothing_readable(tmp_path, content):
    """CONTRACT 3: no header record where one is expected cannot hold a record of the declared layout; a
    header-only file (above) stays a valid empty file."""
    path = write_bytes(tmp_path, "nothing.csv", content)
    encoding = "utf-16" if content.startswith(b"\xff\xfe") else "utf-8"
    with pytest.raises(NothingToReadError) as info:
        read(path, encoding=encoding)
    assert str(info.value).startswith(f"{path.resolve()}: ")
    assert "no header record" in str(info.value)
    assert info.value.path == str(path.resolve())


def test_header_with_a_quoted_line_break_is_one_record(tmp_path):
    content = b'id,"long\nname",city\r\n1,Ann,Bern\n2,Bob\n3,"C\ny",Zug\n4,Dan,Chur'
    rows, report = read(write_bytes(tmp_path, "h.csv", content))
    assert [(r[SOURCE_LINE], r["id"], r["city"], r[RAW_RECORD]) for r in rows] == [
        (3, "1", "Bern", None),
        (4, None, None, "2,Bob"),
        (5, "3", "Zug", None),
        (7, "4", "Chur", None),
    ]
    assert report.extra_columns == ["long\nname"] and report.missing_columns == ["name"]


def test_header_line_that_is_empty_is_an_error(tmp_path):
    with pytest.raises(SourceError) as info:
        read(write_bytes(tmp_path, "blank_header.csv", b"\nid,name,city\n1,Ann,Bern\n"))
    assert info.value.line == 1


def test_invalid_utf8_in_the_body_names_file_and_line():
    path = CSV_CASES / "invalid_utf8_body.csv"
    with pytest.raises(SourceError) as info:
        read(path)
    assert info.value.path == str(path.resolve())
    assert info.value.line == 5  # after a record spanning lines 3-4
    assert f"{path.resolve()}, line 5" in str(info.value)


def test_invalid_utf8_far_into_a_crlf_file_names_the_line(tmp_path):
    body = "".join(f'{i},"two\r\nlines",x\r\n' for i in range(150_000))  # 2 lines per record, several blocks
    content = ("id,name,city\r\n" + body).encode() + b"bad,\xc3\x28,x\r\nlast,y,z\r\n"
    assert len(content) > 3 * BLOCK_SIZE
    with pytest.raises(SourceError) as info:
        read(write_bytes(tmp_path, "late.csv", content))
    assert info.value.line == 1 + 2 * 150_000 + 1


def test_half_characters_in_neighbouring_values_are_not_utf8_although_their_bytes_would_join(tmp_path):
    # "\xc3" then "\xa9" is "é"; split over two records of one column they sit side by side in the column's
    # data buffer, and over two fields of one record in the file: each value alone is not UTF-8
    head = "id,name,city\n1,Zoë,Bern\n".encode()
    for name, body in (("records.csv", b"2,\xc3,x\n3,\xa9,y\n"), ("fields.csv", b"2,\xc3,\xa9\n")):
        with pytest.raises(SourceError) as info:
            read(write_bytes(tmp_path, name, head + body))
        assert info.value.line == 3, name
        assert "not valid utf-8" in str(info.value), name
    rows, _ = read(write_bytes(tmp_path, "ok.csv", head + "2,Ann,Genève\n".encode()))
    assert [(r["name"], r["city"]) for r in rows] == [("Zoë", "Bern"), ("Ann", "Genève")]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_undecodable_utf16_names_the_line(tmp_path, codec):
    bom = b"\xff\xfe" if codec == "utf-16-le" else b"\xfe\xff"
    lone_surrogate = "\udc00".encode(codec, "surrogatepass")
    content = bom + "id,name,city\n1,Ann,Bern\n2,".encode(codec) + lone_surrogate + ",Zug\n".encode(codec)
    with pytest.raises(SourceError) as info:
        read(write_bytes(tmp_path, "bad16.csv", content), encoding="utf-16")
    assert info.value.line == 3


def test_latin1_header_declared_utf8_names_line_1():
    path = CSV_CASES / "latin1_header_declared_utf8.csv"
    with pytest.raises(SourceError) as info:
        read(path, names=["id", "näme", "city"])
    assert info.value.line == 1
    assert info.value.path == str(path.resolve())
    assert "utf-8" in str(info.value)


def test_header_names_map_exactly_then_case_insensitively_extra_and_missing_reported():
    rows, report = read(CSV_CASES / "mixed_case_header.csv", names=["id", "name", "city", "zip"])
    assert values(rows, ["id", "name", "city", "zip"]) == [("1", "Ann", "Bern", None)]
    assert report.extra_columns == ["Country"]
    assert report.missing_columns == ["zip"]


def test_exact_header_match_wins_over_a_case_variant(tmp_path):
    rows, report = read(write_bytes(tmp_path, "h.csv", b"ID,id,name,city\nupper,lower,Ann,Bern\n"))
    assert values(rows) == [("lower", "Ann", "Bern")]
    assert report.extra_columns == ["ID"]


@pytest.mark.parametrize(
    "header", [b"id,name,city,name", b"id,Name,city,NAME", b"id, name ,city,name"], ids=["exact", "case", "spaces"]
)
def test_spec_column_named_twice_in_header_is_an_error_naming_file_and_line_1(tmp_path, header):
    path = write_bytes(tmp_path, "dup.csv", header + b"\n1,a,b,c\n")
    with pytest.raises(SourceError) as info:
        read(path)
    assert info.value.line == 1
    assert info.value.path == str(path.resolve())
    assert "'name'" in str(info.value)


def test_duplicate_names_of_columns_not_in_the_spec_are_only_extra(tmp_path):
    rows, report = read(write_bytes(tmp_path, "x.csv", b"id,x,name,x,city\n1,a,Ann,b,Bern\n"))
    assert values(rows) == [("1", "Ann", "Bern")]
    assert report.extra_columns == ["x", "x"]


def _ground_truth(text: str) -> list[tuple[int, list[str]]]:
    """(start line, fields) of every non-blank record after the header, by Python's csv module."""
    reader = csv.reader(io.StringIO(text, newline=""))
    out, previous_end = [], 0
    for record in reader:
        start, previous_end = previous_end + 1, reader.line_num
        if start > 1 and any(record):
            out.append((start, record))
    return out


def test_line_numbers_match_pythons_csv_module_across_many_blocks(tmp_path):
    rnd = random.Random(7)  # noqa: S311 - reproducible test data
    parts = ["id,name,city\r\n"]
    for i in range(120_000):
        eol, inner, r = rnd.choice(["\n", "\r\n", "\r"]), rnd.choice(["\n", "\r\n", "\r"]), rnd.random()
        if r < 0.01:
            parts.append(eol)
        elif r < 0.02:
            parts.append(f"{i},short{eol}")
        elif r < 0.03:
            parts.append(f'{i},"x{inner}y",z,too many{eol}')
        elif r < 0.10:
            parts.append(f'{i},"multi{inner}line{eol}value",w{eol}')
        else:
            parts.append(f"{i},name{rnd.randint(0, 10**6)},{rnd.random()}{eol}")
    text = "".join(parts)
    path = write_bytes(tmp_path, "mix.csv", text.encode())
    assert path.stat().st_size > 3 * BLOCK_SIZE
    rows, report = read(path)
    truth = _ground_truth(text)
    assert len(rows) == len(truth) == report.rows + report.unparseable_records
    assert lines(rows) == [line for line, _ in truth]  # also: output in file order
    for row, (_, record) in zip(rows, truth, strict=True):
        if len(record) == 3:
            assert [row["id"], row["name"], row["city"]] == record
        else:
            assert row[PARSE_ERROR] is not None
            assert list(csv.reader(io.StringIO(row[RAW_RECORD], newline=""))) == [record]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import random, resource, sys, time
    from dativo_dagster.sources.csv import FileReport, SourceFile, read_source_file
    from dativo_dagster.spec import CsvOptions, FieldSpec
    from dativo_dagster.storage import S3Settings

    def peak_mb():
        # ru_maxrss keeps the high-water mark of the image before exec (a fork of the big pytest
        # process); VmHWM belongs to this process's own memory only
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    path = sys.argv[1]
    rnd = random.Random(0)
    chunk = "".join(
        f'{i},name {rnd.randint(0, 10**9)},"quoted\\nvalue {i}",{rnd.random()}\\n' for i in range(20000)
    ).encode()
    repeats = 200 * 2**20 // len(chunk)
    with open(path, "wb") as f:
        f.write(b"id,name,note,score\\n")
        for _ in range(repeats):
            f.write(chunk)
    fields = [FieldSpec(name=n, type="string") for n in ("id", "name", "note", "score")]
    report = FileReport(uri=path)
    baseline = peak_mb()
    started = time.monotonic()
    rows = last = 0
    source = SourceFile(uri=path, size=0, version="1")
    for batch in read_source_file(source, fields, CsvOptions(), S3Settings(), report):
        rows += batch.num_rows
        last = batch.column("_source_line")[-1].as_py()
    peak = peak_mb()
    print(rows, last, repeats * 20000, baseline, peak, round(time.monotonic() - started, 1))
    """
)


def test_reading_a_200_mb_file_streams_with_modest_memory(tmp_path):
    path = tmp_path / "big.csv"
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True, check=True, timeout=120
    )
    rows, last, expected, baseline_mb, peak_mb, _seconds = (float(v) for v in result.stdout.split())
    assert path.stat().st_size > 195 * 2**20
    assert rows == expected
    assert last == 1 + 2 * (expected - 1) + 1  # two physical lines per record, header on line 1
    assert peak_mb < 600, result.stdout
    assert peak_mb - baseline_mb < 300, result.stdout


def _loaded(root: Path, paths: list[str]) -> LoadedSpec:
    spec = AssetSpecModel.model_validate(base_spec(source={"type": "csv", "files": [{"path": p} for p in paths]}))
    (root / "asset_specs").mkdir(parents=True, exist_ok=True)
    return LoadedSpec(spec=spec, path=root / "asset_specs" / "people.yaml", base_dir=root)


def test_missing_literal_path_is_a_source_error_naming_the_path(tmp_path):
    with pytest.raises(SourceError) as info:
        list_source_files(_loaded(tmp_path, ["data/missing.csv"]), S3Settings())
    assert info.value.path == str(tmp_path / "data" / "missing.csv")
    assert str(tmp_path / "data" / "missing.csv") in str(info.value)


def test_globs_list_every_matching_file_once_sorted_and_relative_to_the_project(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("b.csv", "a.csv", "sub/c.csv", "notes.txt"):
        (data / name).write_text("id,name,city\n1,x,y\n")
    loaded = _loaded(tmp_path, ["data/*.csv", "data/a.csv", "data/**/*.csv", "data/none_*.csv"])
    files = list_source_files(loaded, S3Settings())
    assert [f.uri for f in files] == [str(data / "a.csv"), str(data / "b.csv"), str(data / "sub" / "c.csv")]
    assert all(f.size == 19 and f.version for f in files)


def test_glob_matching_nothing_is_nothing_to_read(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(NothingToReadError) as info:
        list_source_files(_loaded(tmp_path, ["data/*.csv"]), S3Settings())
    assert str(tmp_path / "data" / "*.csv") in str(info.value)


def test_iter_source_batches_reads_each_file_with_its_own_report(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("id,name,city,extra\n1,Ann,Bern,x\n")
    (data / "b.csv").write_text("name,id\nBob,2\n\nCy,3\n")
    loaded = _loaded(tmp_path, ["data/*.csv"])
    reports: list[FileReport] = []
    table = pa.Table.from_batches(
        list(iter_source_batches(list_source_files(loaded, S3Settings()), loaded, S3Settings(), reports)),
        schema=text_schema(loaded.spec.fields),
    )
    assert table.select(["id", "name", SOURCE_LINE]).to_pylist() == [
        {"id": "1", "name": "Ann", SOURCE_LINE: 2},
        {"id": "2", "name": "Bob", SOURCE_LINE: 2},
        {"id": "3", "name": "Cy", SOURCE_LINE: 4},
    ]
    assert [(r.uri, r.rows, r.blank_records, r.extra_columns) for r in reports] == [
        (str(data / "a.csv"), 1, 0, ["city", "extra"]),
        (str(data / "b.csv"), 2, 1, []),
    ]


class _CountingFileSystem:
    """A pyarrow filesystem that counts the files opened through it."""

    def __init__(self, inner: Any, opened: list[str]):
        self._inner = inner
        self._opened = opened

    def open_input_stream(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._opened.append(path)
        return self._inner.open_input_stream(path, *args, **kwargs)

    def open_input_file(self, path: str) -> Any:
        self._opened.append(path)
        return self._inner.open_input_file(path)


def test_a_small_file_is_opened_once_and_a_large_one_streamed(tmp_path, monkeypatch):
    """A file up to SMALL_FILE_BYTES is fetched with one request and read from memory (its header, rows and last
    record used to take three opens: three GETs on object storage); a larger one is still streamed."""
    from dativo_dagster.sources import csv as csv_module  # noqa: PLC0415

    opened: list[str] = []
    real = csv_module.filesystem_for

    def counting(uri: str, s3: S3Settings) -> tuple[Any, str]:
        fs, path = real(uri, s3)
        return _CountingFileSystem(fs, opened), path

    monkeypatch.setattr(csv_module, "filesystem_for", counting)

    def counting_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(csv_module, "open", counting_open, raising=False)  # a small local file: Python's own read
    small = tmp_path / "small.csv"
    small.write_text("id,name,city\n" + "".join(f"{i},n{i},\"c\n{i}\"\n" for i in range(200)))
    large = tmp_path / "large.csv"
    large.write_text("id,name,city\n" + "".join(f"{i},n{i},c{i}\n" for i in range(BLOCK_SIZE // 8)))
    spec = AssetSpecModel.model_validate(base_spec(schema=[{"name": n, "type": "string"} for n in PEOPLE]))
    loaded = LoadedSpec(spec=spec, path=tmp_path / "x.yaml", base_dir=tmp_path)
    files = [SourceFile(uri=str(p), size=p.stat().st_size, version="1") for p in (small, large)]
    reports: list[FileReport] = []
    table = pa.Table.from_batches(list(iter_source_batches(files, loaded, S3Settings(), reports)))

    assert opened.count(str(small)) == 1
    assert opened.count(str(large)) >= 2  # header, then the streaming pass
    rows = table.to_pylist()
    assert [r["city"] for r in rows[:200]] == [f"c\n{i}" for i in range(200)]
    assert [r[SOURCE_LINE] for r in rows[:3]] == [2, 4, 6]  # line numbers as from a streamed read
    assert {r[SOURCE_FILE] for r in rows[:200]} == {str(small)}
    assert [r.rows for r in reports] == [200, BLOCK_SIZE // 8]
