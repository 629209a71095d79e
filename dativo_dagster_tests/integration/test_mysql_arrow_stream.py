"""The MySQL source's rows reach Arrow without Python work per row (ConnectorX's stream, docs/sources/mysql.md
"Speed"), and what that reader adds keeps the source's promises: the URL's percent-encoded password, errors raised
while rows stream (terminal or transient, naming the spec, without the password), a read stopped early."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dativo_dagster.errors import DatabaseSourceError, DatabaseUnavailableError, is_transient
from dativo_dagster.sources import source_for
from dativo_dagster.spec import LoadedSpec, load_spec_file
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, base_spec

from .servers import MariaDBServer

DB = "stream"
READER = "stream_reader"
PASSWORD = "p@ss:w/rd%41-Zz9#?never-logged"  # noqa: S105 - URL-special characters, percent-encoded in the URL
ENCODED = "p%40ss%3Aw%2Frd%2541-Zz9%23%3Fnever-logged"
URL_ENV = "DATIVO_TEST_STREAM_URL"
ROWS = 100_000


@pytest.fixture(scope="module")
def stream_db(mariadb: MariaDBServer) -> MariaDBServer:
    mariadb.execute([f"CREATE DATABASE IF NOT EXISTS {DB}", f"CREATE USER '{READER}'@'%' IDENTIFIED BY '{PASSWORD}'",
                     f"GRANT SELECT ON {DB}.* TO '{READER}'@'%'"])
    mariadb.execute(
        f"CREATE TABLE people AS SELECT seq AS id, CONCAT('name-', seq) AS name, CAST(seq / 4 AS DECIMAL(12,2)) AS"
        f" amount FROM seq_1_to_{ROWS}",
        DB,
    )
    return mariadb


def source_of(tmp_path: Path, source: dict[str, Any], schema: list[dict[str, Any]]) -> Any:
    project = Project(tmp_path / "project")
    spec = base_spec("people", schema=schema)
    spec["source"] = {"type": "mysql", "connection": {"url_env": URL_ENV}, **source}
    path = project.write_spec(spec)
    loaded, problems = load_spec_file(path, project.root)
    assert isinstance(loaded, LoadedSpec), problems
    return source_for(loaded, S3Settings())


def reader_url(server: MariaDBServer) -> str:
    return f"mysql://{READER}:{ENCODED}@{server.host}:{server.port}/{DB}"


SCHEMA = [{"name": "id", "type": "long", "required": True}, {"name": "name", "type": "string"},
          {"name": "amount", "type": "decimal(12,2)"}]


def python_calls_while(batches: Iterator[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], int]:
    """The batches, and how many Python function calls producing them took."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        got = list(batches)
    finally:
        sys.setprofile(None)
    return got, calls


def test_rows_reach_arrow_without_python_work_per_row(
    stream_db: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_ENV, reader_url(stream_db))  # the password's special characters, percent-encoded
    source = source_of(tmp_path, {"table": "people"}, SCHEMA)
    batches, calls = python_calls_while(source.read(source.list_units(), []))
    table = pa.Table.from_batches(batches)
    assert table.num_rows == ROWS
    ids = pc.cast(table.column("id"), pa.int64())
    assert pc.sum(ids).as_py() == ROWS * (ROWS + 1) // 2
    picked = table.filter(pc.is_in(table.column("id"), pa.array(["1", "7", str(ROWS)])))
    by_id = {r["id"]: r for r in picked.to_pylist()}
    assert (by_id["7"]["name"], by_id["7"]["amount"]) == ("name-7", "1.75")
    assert by_id[str(ROWS)]["amount"] == "25000"  # the decimal's exact text, trailing zeros dropped
    # PyMySQL's loop makes several Python calls per row (hundreds of thousands here); a reader that fills Arrow
    # columns in native code makes a few per batch of 10,000 rows
    assert calls < ROWS // 20, calls


def test_an_error_while_rows_stream_is_terminal_and_names_the_spec(
    stream_db: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_ENV, reader_url(stream_db))
    # the column lookup (LIMIT 0) does not run the subquery; the read does, and the server refuses it
    query = "SELECT id, (SELECT seq FROM seq_1_to_2 WHERE id > 5) AS name FROM people"
    source = source_of(tmp_path, {"query": query}, SCHEMA)
    with pytest.raises(DatabaseSourceError) as caught:
        list(source.read(source.list_units(), []))
    message = str(caught.value)
    assert not is_transient(caught.value)
    assert "asset_specs/people.yaml: source: reading mysql://" in message
    assert "Subquery returns more than 1 row (error 1242)" in message
    assert PASSWORD not in message and ENCODED not in message


def test_a_read_stopped_early_leaves_no_connection_and_no_spool(
    stream_db: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_ENV, reader_url(stream_db))
    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))  # where the reading process leaves its batches
    source = source_of(tmp_path, {"table": "people"}, SCHEMA)
    batches = source.read(source.list_units(), [])
    first = next(batches)
    assert 0 < first.num_rows < ROWS
    spooled = list(spools.glob("dativo-mysql-*/batches-*.arrow"))
    assert len(spooled) == 1 and spooled[0].stat().st_size > 0  # the batches came through the reader's file
    batches.close()  # what a strict-mode failure does: the pipeline stops asking for batches
    assert list(spools.iterdir()) == []
    assert reader_connections(stream_db) == []


def reader_connections(server: MariaDBServer) -> list[tuple]:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + 10
    while True:
        conn = server.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT id, command FROM information_schema.processlist WHERE user = %s", (READER,))
            rows = list(cur.fetchall())
        conn.close()
        if not rows or time.monotonic() > deadline or any(r[1] != "Sleep" for r in rows):
            return rows
        time.sleep(0.1)


def test_a_reading_process_that_dies_is_transient(
    stream_db: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_ENV, reader_url(stream_db))
    source = source_of(tmp_path, {"table": "people"}, SCHEMA)
    units = source.list_units()
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the reading process exits 1 without a word
    with pytest.raises(DatabaseUnavailableError) as caught:
        list(source.read(units, []))
    assert is_transient(caught.value)
    message = str(caught.value)
    assert "asset_specs/people.yaml: source: reading mysql://" in message
    assert "the reading process ended with exit code 1" in message
    assert PASSWORD not in message and ENCODED not in message


def test_the_spool_keeps_only_the_rows_not_yet_read(
    stream_db: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reading process spools in segment files and each is removed once read: the spool (disk, and page cache or
    a tmpfs's memory) holds the rows the pipeline has not taken yet, not the whole table."""
    from dativo_dagster import mysql_reader  # noqa: PLC0415

    monkeypatch.setenv(URL_ENV, reader_url(stream_db))
    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    segment = 256 * 1024
    monkeypatch.setattr(mysql_reader, "SEGMENT_BYTES", segment, raising=False)
    source = source_of(tmp_path, {"table": "people"}, SCHEMA)
    rows, ids, spooled = 0, 0, []
    for batch in source.read(source.list_units(), []):
        rows += batch.num_rows
        ids += pc.sum(pc.cast(batch.column("id"), pa.int64())).as_py()
        spooled.append(sum(f.stat().st_size for f in spools.glob("dativo-mysql-*/*") if f.is_file()))
    assert (rows, ids) == (ROWS, ROWS * (ROWS + 1) // 2)
    # once the last batch is in, the reading process has written every row (about 3 MB of Arrow here): what is
    # left is the segment being read, at most its size and one batch more
    assert spooled[-1] <= segment + 512 * 1024, spooled
    assert list(spools.iterdir()) == []  # and nothing once the read is over
