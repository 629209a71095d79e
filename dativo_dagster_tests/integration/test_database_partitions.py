"""Time partitions over PostgreSQL and MariaDB sources (CONTRACT 10): a ``table:`` partition reads ``field >= start
AND field < end``, a ``query`` binds ``:partition_start`` / ``:partition_end``; a partition's run replaces its window
only, rows outside it are ``out_of_partition``, and no value from outside ever becomes SQL text."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from dativo_dagster.spec import LoadedSpec, parse_spec_document
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.table_checks import failures

from .databases import ReaderDatabase, add_mariadb_reader, add_postgres_reader, unique
from .servers import MariaDBServer, PostgresCluster

DB = "part_shop"
READER = "part_reader"
PASSWORD = "Prt-4kV8zQ1-never-logged"  # noqa: S105 - the secret the tests look for
URL_ENV = "PART_DB_URL"
BRANCH = "acme"


@dataclass
class Database(ReaderDatabase):
    name: str = DB
    reader: str = READER
    password: str = PASSWORD

    def create_events(self, table: str, *, zoned: bool = False) -> None:
        """``table(id, event_date date, at timestamp(tz), note)``."""
        if self.kind == "postgres":
            at = "timestamptz(6)" if zoned else "timestamp(6)"
            self.execute(f"CREATE TABLE {table} (id integer, event_date date NOT NULL, ts {at} NOT NULL, note text)",
                         f"GRANT SELECT ON {table} TO {READER}")
        else:
            at = "TIMESTAMP(6)" if zoned else "DATETIME(6)"
            self.execute(f"CREATE TABLE {table} (id integer, event_date DATE NOT NULL, ts {at} NOT NULL,"
                         " note VARCHAR(100))")

    def insert(self, table: str, rows: list[tuple[int, str, str, str]]) -> None:
        escape = (lambda s: s.replace("\\", "\\\\").replace("'", "''")) if self.kind == "mysql" else (
            lambda s: s.replace("'", "''"))
        values = ", ".join(f"({i}, '{d}', '{at}', '{escape(note)}')" for i, d, at, note in rows)
        self.execute(f"INSERT INTO {table} (id, event_date, ts, note) VALUES {values}")  # noqa: S608 - test data


@pytest.fixture(scope="module")
def pg_db(postgres: PostgresCluster) -> PostgresCluster:
    # every statement of the reader goes to the server's log: the tests read the SQL the source sent
    add_postgres_reader(postgres, DB, READER, PASSWORD, log_statements=True)
    return postgres


@pytest.fixture(scope="module")
def my_db(mariadb: MariaDBServer) -> MariaDBServer:
    add_mariadb_reader(mariadb, DB, READER, PASSWORD)
    return mariadb


@pytest.fixture(params=["postgres", "mysql"])
def db(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Database:
    server = request.getfixturevalue("pg_db" if request.param == "postgres" else "my_db")
    database = Database(request.param, server)
    monkeypatch.setenv(URL_ENV, database.url)
    return database


def events_spec(db: Database, name: str, *, table: str | None = None, query: str | None = None,
                field: str = "event_date", zoned: bool = False, **overrides: Any) -> dict[str, Any]:
    spec = base_spec(
        name,
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "event_date", "type": "date", "required": True},
            {"name": "ts", "type": "timestamptz" if zoned else "timestamp", "required": True},
            {"name": "note", "type": "string"},
        ],
        source={"type": db.kind, "connection": {"url_env": URL_ENV},
                **({"table": table} if table else {"query": query})},
        target={"partitioning": [f"day({field})"]},
        partitions={"type": "daily", "start": "2024-01-01", "field": field},
        **overrides,
    )
    spec["compliance"] = {"classification": ["internal"]}
    return spec


def rows_of(project: Project, name: str) -> list[tuple[int, date, str]]:
    found = branch_rows(project.table(f"testdomain.{name}"), BRANCH)
    return sorted((r["id"], r["event_date"], r["note"]) for r in found)


def run(project: Project, key: str) -> Any:
    result = project.materialize(partition_key=key)
    assert result.success, failures(result)
    return result


DAY1 = [(1, "2024-01-01", "2024-01-01 08:00:00", "a"), (2, "2024-01-01", "2024-01-01 09:00:00", "b"),
        (3, "2024-01-01", "2024-01-01 23:59:59.999999", "c")]
DAY2 = [(4, "2024-01-02", "2024-01-02 00:00:00", "d"), (5, "2024-01-02", "2024-01-02 10:00:00", "O'Brien")]
DAY3 = [(6, "2024-01-03", "2024-01-03 00:00:00", "later")]


def expected(rows: list[tuple[int, str, str, str]]) -> list[tuple[int, date, str]]:
    return sorted((i, date.fromisoformat(d), note) for i, d, _, note in rows)


def test_table_partitions_load_their_window_and_a_rerun_replaces_only_its_own(db: Database, tmp_path: Path) -> None:
    table, name = unique("events"), unique("events")
    db.create_events(table)
    db.insert(table, [*DAY1, *DAY2, *DAY3])
    project = Project(tmp_path / "project")
    project.write_spec(events_spec(db, name, table=table))

    run(project, "2024-01-01")
    assert rows_of(project, name) == expected(DAY1)  # days 2 and 3 were not read (nothing out_of_partition either)
    result = run(project, "2024-01-02")
    assert rows_of(project, name) == expected([*DAY1, *DAY2])
    materialization = result.asset_materializations_for_node(name)[0]
    assert materialization.metadata["rows_read"].value == 2

    # the source changes on day 1 (an update, a delete, a new row) and on day 2; only day 1 is run again
    db.execute(f"UPDATE {table} SET note = 'a2' WHERE id = 1", f"DELETE FROM {table} WHERE id = 2",
               f"UPDATE {table} SET note = 'd2' WHERE id = 4")
    db.insert(table, [(7, "2024-01-01", "2024-01-01 12:00:00", "new")])
    run(project, "2024-01-01")
    day1_now = [(1, "2024-01-01", "", "a2"), (3, "2024-01-01", "", "c"), (7, "2024-01-01", "", "new")]
    assert rows_of(project, name) == expected([*day1_now, *DAY2])  # day 2 untouched: still 'd', not 'd2'
    head = project.table(f"testdomain.{name}").snapshot_by_name(BRANCH)
    assert head.summary.get("dativo.partition") == "2024-01-01"


@pytest.fixture
def pg_log(db: Database) -> Any:
    """The PostgreSQL log's text written from now on (empty for MariaDB)."""
    if db.kind != "postgres":
        return lambda: ""
    path = db.server.log_path
    start = path.stat().st_size

    def read() -> str:
        with path.open("rb") as handle:
            handle.seek(start)
            return handle.read().decode(errors="replace")

    return read


def test_a_query_binds_its_window_as_typed_literals_and_leaves_string_literals_alone(
    db: Database, tmp_path: Path, pg_log: Any
) -> None:
    """A timestamptz window in New York: the bounds are the zone's midnights as UTC instants; a placeholder inside a
    string literal and a comment stays text (the row whose note is ':partition_start' is excluded by the query, and a
    note with a quote is only data)."""
    table, name = unique("events"), unique("events")
    db.create_events(table, zoned=True)
    # 2024-01-02 in New York is [05:00Z on the 2nd, 05:00Z on the 3rd)
    db.insert(table, [
        (1, "2024-01-02", "2024-01-02 04:59:59.999999", "before"),
        (2, "2024-01-02", "2024-01-02 05:00:00", "first"),
        (3, "2024-01-02", "2024-01-03 04:59:59", "x' OR '1'='1"),
        (4, "2024-01-02", "2024-01-02 12:00:00", ":partition_start"),
        (5, "2024-01-03", "2024-01-03 05:00:00", "after"),
    ])
    query = (f"SELECT id, event_date, ts, note FROM {table} /* :partition_end */"
             " WHERE ts >= :partition_start AND ts < :partition_end AND note <> ':partition_start'")
    spec = events_spec(db, name, query=query, field="ts", zoned=True)
    spec["partitions"]["timezone"] = "America/New_York"
    project = Project(tmp_path / "project")
    project.write_spec(spec)

    run(project, "2024-01-02")
    found = branch_rows(project.table(f"testdomain.{name}"), BRANCH)
    assert sorted((r["id"], r["note"], r["ts"]) for r in found) == [
        (2, "first", datetime(2024, 1, 2, 5, tzinfo=timezone.utc)),
        (3, "x' OR '1'='1", datetime(2024, 1, 3, 4, 59, 59, tzinfo=timezone.utc)),
    ]
    if db.kind == "postgres":
        log = pg_log()
        assert "ts >= TIMESTAMPTZ '2024-01-02T05:00:00+00:00' AND ts < TIMESTAMPTZ '2024-01-03T05:00:00+00:00'" in log
        assert "/* :partition_end */" in log and "note <> ':partition_start'" in log
        assert PASSWORD not in log


@pytest.mark.parametrize("mode", ["warn", "strict"])
def test_rows_outside_the_window_are_out_of_partition(db: Database, tmp_path: Path, mode: str) -> None:
    """A query that selects more than its window (an OR): the extra row is an ``out_of_partition`` reject in warn
    mode, and fails a strict run that leaves the table as it was."""
    table, name = unique("events"), unique("events")
    db.create_events(table)
    db.insert(table, [*DAY1, *DAY2, *DAY3])
    query = (f"SELECT id, event_date, ts, note FROM {table}"
             " WHERE (event_date >= :partition_start AND event_date < :partition_end) OR id = 6")
    project = Project(tmp_path / "project")
    project.write_spec(events_spec(db, name, query=query, schema_validation_mode=mode))
    if mode == "strict":
        # day 3's own run reads its row once (the OR selects the same row): committed
        run(project, "2024-01-03")
        before = project.table(f"testdomain.{name}").snapshot_by_name(BRANCH).snapshot_id
        result = project.materialize(partition_key="2024-01-02")
        assert not result.success
        (message,) = failures(result)
        assert "event_date: out_of_partition x1" in message, message
        assert PASSWORD not in message
        assert project.table(f"testdomain.{name}").snapshot_by_name(BRANCH).snapshot_id == before
        assert rows_of(project, name) == expected(DAY3)
        return
    run(project, "2024-01-02")
    assert rows_of(project, name) == expected(DAY2)
    rejects = branch_rows(project.table(f"testdomain.{name}__rejects"), BRANCH)
    assert [(r["id"], r["event_date"], r["_reject_reason"], r["_source_line"]) for r in rejects] == [
        ("6", "2024-01-03", "event_date: out_of_partition", None)
    ]


def test_a_partition_key_that_is_not_a_key_never_reaches_sql(db: Database, tmp_path: Path, pg_log: Any) -> None:
    """The bounds come from Dagster's window of a valid key, rendered from a date: a hostile key is refused before
    any SQL is built or sent."""
    from dativo_dagster.partitions import for_partition  # noqa: PLC0415
    from dativo_dagster.sources import source_for  # noqa: PLC0415
    from dativo_dagster.storage import S3Settings  # noqa: PLC0415

    table = unique("events")
    db.create_events(table)
    query = f"SELECT * FROM {table} WHERE event_date >= :partition_start AND event_date < :partition_end"
    model, found = parse_spec_document(events_spec(db, "events", query=query), "asset_specs/events.yaml")
    assert model is not None, found
    loaded = LoadedSpec(spec=model, path=tmp_path / "events.yaml", base_dir=tmp_path)
    hostile = "2024-01-01' OR '1'='1"
    source = source_for(for_partition(loaded, hostile), S3Settings())
    with pytest.raises(Exception, match="2024-01-01' OR '1'='1") as raised:
        source._relation()  # noqa: SLF001 - the SQL text the read would send
    assert "SELECT" not in str(raised.value)
    relation = source_for(for_partition(loaded, "2024-01-05"), S3Settings())._relation()  # noqa: SLF001
    literal = "DATE '2024-01-05'" if db.kind == "postgres" else "CAST('2024-01-05' AS DATE)"
    assert f"event_date >= {literal}" in relation
    assert "OR '1'='1" not in pg_log()
