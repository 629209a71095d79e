"""A run over thousands of small source files (issue 19): every row once with its file, and a fast nothing-new run."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import dagster as dg

from dativo_dagster.pipeline import LOGGED_FILES
from dativo_dagster.table_state import SOURCE_STATE_KEY, STATE_FILE_KEY, read_branch_state
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.table_checks import branch_snapshot_ids, incremental_spec, materialization

BRANCH = "acme"
TABLE = "testdomain.events"
FILES = 2_000
ROWS_PER_FILE = 5


def write_files(project: Project) -> dict[str, set[int]]:
    """FILES small CSV files; returns each file's absolute path with the ids it holds."""
    expected: dict[str, set[int]] = {}
    for index in range(FILES):
        ids = range(index * ROWS_PER_FILE, (index + 1) * ROWS_PER_FILE)
        path = project.write_data(
            f"events/part-{index:05d}.csv", "id,name\n" + "".join(f"{i},n{i}\n" for i in ids)
        )
        expected[str(path.resolve())] = set(ids)
    return expected


def run(project: Project) -> dg.ExecuteInProcessResult:
    result = project.materialize()
    assert result.success, [e.message for e in result.get_step_failure_events()]
    return result


def test_thousands_of_small_files_load_every_row_once_with_its_file_and_the_rerun_adds_nothing(project):
    project.write_spec(incremental_spec(target={"partitioning": []}))
    expected = write_files(project)

    instance = dg.DagsterInstance.ephemeral()
    result = project.materialize(instance=instance)
    assert result.success, [e.message for e in result.get_step_failure_events()]
    first = materialization(result, "events")
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    # files are named one by one only up to LOGGED_FILES: a Dagster log call per file cost about a millisecond each
    assert sum(1 for m in messages if re.match(rf"events: file \d+ of {FILES}: ", m)) == LOGGED_FILES == 20
    assert max(len(m) for m in messages) < 8192  # no message lists every file
    table = project.table(TABLE)
    rows = branch_rows(table, BRANCH)
    assert len(rows) == FILES * ROWS_PER_FILE
    held: dict[str, set[int]] = {}
    for row in rows:
        held.setdefault(row["_source_file"], set()).add(row["id"])
        assert row["name"] == f"n{row['id']}"
    assert held == expected  # every file's rows, each under its own path
    assert Counter(row["id"] for row in rows).most_common(1)[0][1] == 1  # no row twice
    assert first["rows_read"] == first["dagster/row_count"] == FILES * ROWS_PER_FILE

    # the state names every file at its version, and the commit's own summary stays small: a state of thousands
    # of files is kept in the state file, not copied into every later table metadata version
    head = table.snapshot_by_name(BRANCH)
    state = read_branch_state(table, BRANCH)
    assert set(state.sources) == set(expected)
    summary = head.summary.additional_properties
    assert len(json.dumps(summary)) < 4096, len(json.dumps(summary))
    assert STATE_FILE_KEY in summary
    snapshots = branch_snapshot_ids(table, BRANCH)

    started = time.perf_counter()
    second = run(project)
    seconds = time.perf_counter() - started
    again = project.table(TABLE)
    assert branch_snapshot_ids(again, BRANCH) == snapshots  # nothing new: no snapshot
    assert len(branch_rows(again, BRANCH)) == FILES * ROWS_PER_FILE
    assert materialization(second, "events")["nothing_new"] is True
    assert SOURCE_STATE_KEY not in summary or len(summary[SOURCE_STATE_KEY]) < 4096
    assert seconds < 30, seconds

    # a later commit of one new file: its summary holds its own share again, and the state still knows every file
    late = project.write_data("events/late.csv", "id,name\n999999,n999999\n")
    third = materialization(run(project), "events")
    assert third["rows_read"] == 1
    table = project.table(TABLE)
    assert len(branch_rows(table, BRANCH)) == FILES * ROWS_PER_FILE + 1
    own = json.loads(table.snapshot_by_name(BRANCH).summary.additional_properties[SOURCE_STATE_KEY])
    assert list(own) == [str(late.resolve())]
    assert set(read_branch_state(table, BRANCH).sources) == {*expected, str(late.resolve())}


# ------------------------------------------------------------------------------------------------------------
# Small files are parsed several at a time (sources/csv.py): every row and line must still map to its own file.

Expected = tuple[int, str | None, str | None, str | None, str | None]  # line, id, name, parse error, raw record
HEADER_ONLY_KINDS = {"header_only"}


def _small_file(kind: str, i: int) -> tuple[bytes, list[Expected], tuple[int, int, int, list[str], list[str]]]:
    """One small CSV of ``kind``: its bytes, the rows it must give (line, id, name, parse error, raw record) and
    its report (rows, blank records, unparseable records, missing columns, extra columns)."""
    a, b = str(i * 100), str(i * 100 + 1)
    rows: list[Expected]
    if kind == "plain":
        count = 1 + i % 5
        ids = [str(i * 100 + j) for j in range(count)]
        text = "id,name\n" + "".join(f"{x},n{x}\n" for x in ids)
        return text.encode(), [(j + 2, x, f"n{x}", None, None) for j, x in enumerate(ids)], (count, 0, 0, [], [])
    if kind == "blank":
        rows = [(2, a, "x", None, None), (4, b, "y", None, None)]
        return f"id,name\n{a},x\n\n{b},y\n\n".encode(), rows, (2, 2, 0, [], [])
    if kind == "quoted":
        rows = [(2, a, "p\nq", None, None), (4, b, "r", None, None)]
        return f'id,name\n{a},"p\nq"\n{b},r\n'.encode(), rows, (2, 0, 0, [], [])
    if kind == "ragged":
        rows = [(2, a, "x", None, None), (3, None, None, "wrong number of fields", "1,2,3"), (4, b, "y", None, None)]
        return f"id,name\n{a},x\n1,2,3\n{b},y\n".encode(), rows, (2, 0, 1, [], [])
    if kind == "reversed":
        rows = [(2, a, "x", None, None), (3, b, "y", None, None)]
        return f"name,id\nx,{a}\ny,{b}\n".encode(), rows, (2, 0, 0, [], [])
    if kind == "missing":
        rows = [(2, a, None, None, None), (3, b, None, None, None)]
        return f"id\n{a}\n{b}\n".encode(), rows, (2, 0, 0, ["name"], [])
    if kind == "extra":
        return f"id,name,extra\n{a},x,e\n".encode(), [(2, a, "x", None, None)], (1, 0, 0, [], ["extra"])
    if kind == "no_final_newline":
        rows = [(2, a, "x", None, None), (3, b, "y", None, None)]
        return f"id,name\n{a},x\n{b},y".encode(), rows, (2, 0, 0, [], [])
    if kind == "header_only":
        return b"id,name\n", [], (0, 0, 0, [], [])
    if kind == "crlf":
        rows = [(2, a, "x", None, None), (3, b, "y", None, None)]
        return f"id,name\r\n{a},x\r\n{b},y\r\n".encode(), rows, (2, 0, 0, [], [])
    if kind == "lone_cr":
        rows = [(2, a, "x", None, None), (3, b, "y", None, None)]
        return f"id,name\n{a},x\r{b},y\n".encode(), rows, (2, 0, 0, [], [])
    if kind == "bom":
        return f"\ufeffid,name\n{a},x\n".encode(), [(2, a, "x", None, None)], (1, 0, 0, [], [])
    if kind == "unclosed_quote":
        # the last record's quote never closes: it is that file's reject, and must not swallow the next file
        rows = [(2, a, "x", None, None), (3, None, None, "not closed", f'{b},"open\n')]
        return f'id,name\n{a},x\n{b},"open\n'.encode(), rows, (1, 0, 1, [], [])
    raise AssertionError(kind)


SPECIAL_KINDS = ("blank", "quoted", "ragged", "reversed", "missing", "extra", "no_final_newline", "header_only",
                 "crlf", "bom", "lone_cr")
UNCLOSED = {50, 301, 302, 399}  # the last record's quote never closes (two files in a row; the last file)


def _file_kinds(count: int) -> list[str]:
    """Mostly plain files, a special one every third file (each kind many times), runs of files with their columns
    in another order, with CRLF line breaks and with a byte order mark (groups of their own) and a few files whose
    last quote never closes."""
    kinds = []
    for i in range(count):
        if i in UNCLOSED:
            kinds.append("unclosed_quote")
        elif 200 <= i < 220:
            kinds.append("reversed")
        elif 250 <= i < 260:
            kinds.append("crlf")
        elif 270 <= i < 280:
            kinds.append("bom")
        elif i % 3 == 2:
            kinds.append(SPECIAL_KINDS[(i // 3) % len(SPECIAL_KINDS)])
        else:
            kinds.append("plain")
    return kinds


def _read_all(folder, pattern: str = "*.csv"):
    from dativo_dagster.sources.base import FileReport  # noqa: PLC0415
    from dativo_dagster.sources.csv import iter_source_batches, list_source_files  # noqa: PLC0415
    from dativo_dagster.spec import AssetSpecModel, LoadedSpec  # noqa: PLC0415
    from dativo_dagster.storage import S3Settings  # noqa: PLC0415
    from dativo_dagster_tests.conftest import base_spec  # noqa: PLC0415

    spec = AssetSpecModel.model_validate(
        base_spec(schema=[{"name": "id", "type": "string"}, {"name": "name", "type": "string"}],
                  source={"type": "csv", "files": [{"path": f"{folder.name}/{pattern}"}]})
    )
    loaded = LoadedSpec(spec=spec, path=folder.parent / "x.yaml", base_dir=folder.parent)
    reports: list[FileReport] = []
    batches = list(iter_source_batches(list_source_files(loaded, S3Settings()), loaded, S3Settings(), reports))
    import pyarrow as pa  # noqa: PLC0415

    from dativo_dagster.sources.base import text_schema  # noqa: PLC0415

    for batch in batches:
        assert batch.schema == text_schema(loaded.spec.fields)
    return pa.Table.from_batches(batches, schema=text_schema(loaded.spec.fields)), reports


def _count_readers(monkeypatch) -> list[int]:
    """A list that gets an entry for every pyarrow CSV reader opened from now on."""
    from dativo_dagster.sources import csv as csv_module  # noqa: PLC0415

    opened: list[int] = []
    real = csv_module.pacsv.open_csv

    def counting(*args, **kwargs):
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(csv_module.pacsv, "open_csv", counting)
    return opened


def _write_small_files(folder, count: int) -> tuple[dict[str, list[Expected]], dict[str, tuple]]:
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list[Expected]] = {}
    reports: dict[str, tuple] = {}
    for i, kind in enumerate(_file_kinds(count)):
        content, rows, report = _small_file(kind, i)
        path = folder / f"part-{i:05d}.csv"
        path.write_bytes(content)
        expected[str(path)] = rows
        reports[str(path)] = report
    return expected, reports


def test_hundreds_of_small_files_map_every_row_line_reject_and_report_to_their_own_file(tmp_path, monkeypatch):
    """Files of every shape side by side: rows, physical lines, skipped blank records, quoted line breaks, ragged
    and unclosed records, other column orders, missing and extra columns, a header-only file and a file without
    a final line break all come back under their own file, exactly as if each file were read alone."""
    from dativo_dagster.sources.base import PARSE_ERROR, RAW_RECORD, SOURCE_LINE  # noqa: PLC0415
    from dativo_dagster.table_schema import SOURCE_FILE  # noqa: PLC0415

    expected, expected_reports = _write_small_files(tmp_path / "small", 400)
    opened = _count_readers(monkeypatch)
    table, reports = _read_all(tmp_path / "small")
    assert len(opened) < 200, len(opened)  # most files were parsed together with others

    got: dict[str, list[Expected]] = {uri: [] for uri in expected}
    for row in table.to_pylist():
        got[row[SOURCE_FILE]].append(
            (row[SOURCE_LINE], row["id"], row["name"], row[PARSE_ERROR], row[RAW_RECORD])
        )
    for uri, rows in expected.items():
        found = got[uri]
        assert [r[:3] for r in found] == [r[:3] for r in rows], uri
        for want, have in zip(rows, found, strict=True):
            if want[3] is None:
                assert have[3] is None and have[4] is None, (uri, have)
            else:
                assert want[3] in have[3] and have[4] == want[4], (uri, have)
    # the files come in listing order, each file's rows in line order
    order = [row[SOURCE_FILE] for row in table.to_pylist()]
    assert order == sorted(order, key=list(expected).index)
    assert [r.uri for r in reports] == list(expected)
    assert {r.uri: (r.rows, r.blank_records, r.unparseable_records, r.missing_columns, r.extra_columns)
            for r in reports} == {uri: (*report[:3], list(report[3]), list(report[4]))
                                  for uri, report in expected_reports.items()}


def test_small_files_with_one_header_are_parsed_together_not_one_reader_each(tmp_path, monkeypatch):
    """Setting up pyarrow's reader costs about 0.4 ms a file: 10,000 files of 100 rows took 9.7x one file of the
    same rows. Small files with the same header are parsed several at a time."""
    opened = _count_readers(monkeypatch)
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(500):
        (folder / f"part-{i:05d}.csv").write_text("id,name\n" + "".join(f"{i}-{j},n{j}\n" for j in range(20)))
    table, reports = _read_all(folder)
    assert table.num_rows == 500 * 20
    assert len(reports) == 500 and all(r.rows == 20 for r in reports)
    assert len(opened) <= 5, len(opened)


def test_an_undecodable_byte_in_one_of_many_small_files_names_that_file_and_line(tmp_path):
    import pytest  # noqa: PLC0415

    from dativo_dagster.errors import SourceError  # noqa: PLC0415

    folder = tmp_path / "enc"
    folder.mkdir()
    for i in range(300):
        body = "".join(f"{i}-{j},n{j}\n" for j in range(10))
        content = ("id,name\n" + body).encode()
        if i == 137:
            content = ("id,name\n" + body).encode() + b"x,caf\xe9\n" + b"y,z\n"
        (folder / f"part-{i:05d}.csv").write_bytes(content)
    with pytest.raises(SourceError) as info:
        _read_all(folder)
    assert info.value.path == str(folder / "part-00137.csv")
    assert info.value.line == 12
    assert "utf-8" in str(info.value)


def test_warn_mode_over_hundreds_of_files_quarantines_each_reject_with_its_own_file_and_line(project):
    """End to end: type errors on known lines of known files land in the quarantine with exactly that file and
    line, and every valid row in the table under its own file."""
    project.write_spec(incremental_spec(target={"partitioning": []}, schema_validation_mode="warn"))
    valid: dict[str, set[int]] = {}
    bad: set[tuple[str, int, str]] = set()
    for index in range(300):
        lines = ["id,name"]
        for j in range(1 + index % 7):
            value = index * 10 + j
            if (index + j) % 11 == 0:
                lines.append(f"x{value},bad")
            elif j == 3:
                lines.append(f'{value},"two\nlines"')
            else:
                lines.append(f"{value},n{value}")
        path = project.write_data(f"events/part-{index:05d}.csv", "\n".join(lines) + "\n")
        uri = str(path.resolve())
        line = 2
        for text in lines[1:]:
            if text.startswith("x"):
                bad.add((uri, line, text.split(",")[0]))
            else:
                valid.setdefault(uri, set()).add(int(text.split(",")[0]))
            line += 1 + text.count("\n")
    result = project.materialize()
    assert result.success, [e.message for e in result.get_step_failure_events()]
    rejects = branch_rows(project.table(f"{TABLE}__rejects"), BRANCH)
    assert {(r["_source_file"], r["_source_line"], r["id"]) for r in rejects} == bad
    assert len(rejects) == len(bad)
    rows = branch_rows(project.table(TABLE), BRANCH)
    held: dict[str, set[int]] = {}
    for row in rows:
        held.setdefault(row["_source_file"], set()).add(row["id"])
    assert held == valid
    assert len(rows) == sum(len(v) for v in valid.values())


def test_per_file_warnings_name_a_few_files_and_count_the_rest(project):
    """A run over thousands of files whose columns differ from the spec must not log a Dagster warning per file (about
    a millisecond each): the first LOGGED_FILES files are named, one line counts the rest; the drift check still
    names every file."""
    project.write_spec(incremental_spec(target={"partitioning": []}))
    count = 60
    for index in range(count):
        project.write_data(f"events/part-{index:05d}.csv", f"id,name,extra\n{index},n{index},x\n\n")
    instance = dg.DagsterInstance.ephemeral()
    result = project.materialize(instance=instance)
    assert result.success, [e.message for e in result.get_step_failure_events()]
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    extra = [m for m in messages if "columns not in the spec, not loaded" in m]
    blank = [m for m in messages if "blank record(s) skipped" in m]
    assert len(extra) == LOGGED_FILES + 1, len(extra)
    assert len(blank) == LOGGED_FILES + 1, len(blank)
    assert f"and {count - LOGGED_FILES} more file(s)" in extra[-1]
    assert f"and {count - LOGGED_FILES} more file(s)" in blank[-1]
    drift = result.get_asset_check_evaluations()
    drift = next(e for e in drift if e.check_name == "schema_drift")
    assert drift.metadata["files_with_columns_not_in_spec"].value == count
    rows = branch_rows(project.table(TABLE), BRANCH)
    assert sorted(r["id"] for r in rows) == list(range(count))
