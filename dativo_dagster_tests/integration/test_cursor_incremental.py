"""Cursor incremental from PostgreSQL and MariaDB (CONTRACT 7), against the private servers: each row is loaded
exactly once across runs, at the boundary, with a lookback, without a key, and when the process is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from dativo_dagster.table_state import SOURCE_STATE_KEY, read_branch_state
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

from .databases import ReaderDatabase, add_mariadb_reader, add_postgres_reader, unique
from .servers import MariaDBServer, PostgresCluster

DATIVO_DAGSTER = Path(sys.executable).parent / "dativo-dagster"
DB = "cursor_shop"
READER = "cursor_reader"
PASSWORD = "Cur-7hQ2xW9-never-logged"  # noqa: S105 - the secret the tests look for
URL_ENV = "CURSOR_DB_URL"
T0 = datetime(2024, 3, 1, 12, 0, 0)


@dataclass
class Database(ReaderDatabase):
    """One server kind with database ``cursor_shop`` and a reader that logs in with a password."""

    name: str = DB
    reader: str = READER
    password: str = PASSWORD

    def create_orders(self, table: str, *, key: bool = True, zoned: bool = False) -> None:
        """``table(id, updated_at, note)``; ``id`` is the primary key with ``key``; ``updated_at`` an instant with
        ``zoned`` (``timestamptz`` / MySQL ``TIMESTAMP``)."""
        id_type = "integer PRIMARY KEY" if key else "integer"
        if self.kind == "postgres":
            ts_type = "timestamptz(6)" if zoned else "timestamp(6)"
        else:
            ts_type = "TIMESTAMP(6)" if zoned else "DATETIME(6)"
        note_type = "text" if self.kind == "postgres" else "VARCHAR(100)"
        self.execute(f"CREATE TABLE {table} (id {id_type}, updated_at {ts_type} NOT NULL, note {note_type})")
        if self.kind == "postgres":
            self.execute(f"GRANT SELECT ON {table} TO {READER}")

    def insert(self, table: str, rows: list[tuple[int, datetime, str | None]]) -> None:
        values = ", ".join(
            f"({i}, '{at.isoformat(sep=' ')}', {'NULL' if note is None else repr(note)})" for i, at, note in rows
        )
        self.execute(f"INSERT INTO {table} (id, updated_at, note) VALUES {values}")  # noqa: S608 - test data


@pytest.fixture(scope="module")
def pg_db(postgres: PostgresCluster) -> PostgresCluster:
    add_postgres_reader(postgres, DB, READER, PASSWORD)
    return postgres


@pytest.fixture(scope="module")
def my_db(mariadb: MariaDBServer) -> MariaDBServer:
    add_mariadb_reader(mariadb, DB, READER, PASSWORD)
    return mariadb


@pytest.fixture(params=["postgres", "mysql"])
def db(request: pytest.FixtureRequest) -> Database:
    server = request.getfixturevalue("pg_db" if request.param == "postgres" else "my_db")
    return Database(request.param, server)


def orders_spec(db: Database, name: str, table: str, *, key: bool = True, lookback: int = 0, zoned: bool = False,
                **overrides: Any) -> dict:
    schema = [
        {"name": "id", "type": "integer", "required": True, **({"primary_key": True} if key else {})},
        {"name": "updated_at", "type": "timestamptz" if zoned else "timestamp", "required": True},
        {"name": "note", "type": "string"},
    ]
    spec = base_spec(name, schema=schema, **overrides)
    spec["source"] = {
        "type": db.kind,
        "connection": {"url_env": URL_ENV},
        "table": table,
        "incremental": {"strategy": "cursor", "cursor_field": "updated_at", "lookback_seconds": lookback},
    }
    spec["compliance"] = {"classification": ["internal"]}
    return spec


@pytest.fixture
def env_url(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(URL_ENV, db.url)
    yield db.url




def rows_of(project: Project, name: str) -> list[tuple[int, datetime, str | None]]:
    rows = branch_rows(project.table(f"testdomain.{name}"), "acme")
    return sorted(((r["id"], r["updated_at"], r["note"]) for r in rows), key=lambda r: (r[0], r[1], r[2] is not None, r[2] or ""))


def head_id(project: Project, name: str) -> int | None:
    head = project.table(f"testdomain.{name}").snapshot_by_name("acme")
    return head.snapshot_id if head is not None else None


def committed_mark(project: Project, name: str) -> str:
    """The mark the branch holds (its state at the head), and the head's own summary agrees."""
    table = project.table(f"testdomain.{name}")
    (mark,) = read_branch_state(table, "acme").sources.values()
    head_state = json.loads(table.snapshot_by_name("acme").summary.additional_properties.get(SOURCE_STATE_KEY, "{}"))
    assert head_state in ({}, {next(iter(read_branch_state(table, "acme").sources)): mark})
    return mark


def run(project: Project) -> Any:
    result = project.materialize()
    assert result.success, [e.event_specific_data for e in result.all_events if e.is_failure]
    return result


def test_each_row_is_loaded_once_across_runs_and_at_the_boundary(db: Database, env_url: str, tmp_path: Path) -> None:
    table, name = unique("orders"), unique("orders")
    db.create_orders(table)
    first = [(i, T0 + timedelta(minutes=i), f"v1-{i}") for i in range(1, 6)]
    db.insert(table, first)
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table))

    run(project)
    assert rows_of(project, name) == first
    assert committed_mark(project, name) == f"cursor:{(T0 + timedelta(minutes=5)).isoformat()}"

    # after the first run: a new row AT the mark (same cursor value, new key), an update, a row past the mark
    at_mark = (6, T0 + timedelta(minutes=5), "new-at-mark")
    db.insert(table, [at_mark, (7, T0 + timedelta(minutes=9), "past")])
    db.execute(f"UPDATE {table} SET updated_at = '{(T0 + timedelta(minutes=8)).isoformat(sep=' ')}', note = 'v2-2'"
               " WHERE id = 2")
    run(project)
    loaded = rows_of(project, name)
    assert loaded == sorted([*first, at_mark, (2, T0 + timedelta(minutes=8), "v2-2"), (7, T0 + timedelta(minutes=9), "past")])
    # row 5, committed at the mark, is not loaded again; every (key, cursor) once
    assert max(Counter((i, at) for i, at, _ in loaded).values()) == 1
    assert committed_mark(project, name) == f"cursor:{(T0 + timedelta(minutes=9)).isoformat()}"

    # nothing new: no snapshot, reported as such, and little work
    before = head_id(project, name)
    started = time.perf_counter()
    result = run(project)
    elapsed = time.perf_counter() - started
    assert head_id(project, name) == before
    assert rows_of(project, name) == loaded
    materialization = result.asset_materializations_for_node(name)[0]
    assert materialization.metadata["nothing_new"].value is True
    assert materialization.metadata["rows_committed"].value == 0
    assert elapsed < 6, elapsed  # the whole in-process run, Dagster's own overhead included
    work = sum(v.value for k, v in materialization.metadata.items() if k in ("stream_seconds", "commit_seconds"))
    assert work < 2, work


def test_a_cursor_with_merge_replaces_updated_rows_by_key(db: Database, env_url: str, tmp_path: Path) -> None:
    """Cursor + write_mode: merge: an updated row (same key, later cursor) replaces its key's row, a new key is added,
    a row committed at the mark is not read twice; each key once on the branch."""
    table, name = unique("orders"), unique("orders")
    db.create_orders(table)
    first = [(i, T0 + timedelta(minutes=i), f"v1-{i}") for i in range(1, 4)]
    db.insert(table, first)
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table, target={"write_mode": "merge"}))
    run(project)
    assert rows_of(project, name) == first

    db.execute(f"UPDATE {table} SET updated_at = '{(T0 + timedelta(minutes=8)).isoformat(sep=' ')}', note = 'v2-2'"
               " WHERE id = 2")
    db.insert(table, [(4, T0 + timedelta(minutes=9), "new")])
    result = run(project)

    assert rows_of(project, name) == [first[0], (2, T0 + timedelta(minutes=8), "v2-2"), first[2],
                                      (4, T0 + timedelta(minutes=9), "new")]
    unique_key = [e for e in result.get_asset_check_evaluations() if e.check_name == "unique_key"]
    assert [e.passed for e in unique_key] == [True]
    assert committed_mark(project, name) == f"cursor:{(T0 + timedelta(minutes=9)).isoformat()}"


def test_lookback_rereads_late_rows_without_doubling(db: Database, env_url: str, tmp_path: Path) -> None:
    # an instant cursor (timestamptz / MySQL TIMESTAMP): the mark and the bound are UTC
    table, name = unique("late"), unique("late")
    db.create_orders(table, zoned=True)
    t0 = T0.replace(tzinfo=timezone.utc)
    db.insert(table, [(1, T0, "a"), (2, T0 + timedelta(seconds=50), "b"), (3, T0 + timedelta(seconds=100), "c")])
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table, lookback=60, zoned=True))
    run(project)
    # a transaction that committed late: its row's cursor is 30 s below the mark, inside the 60 s lookback
    db.insert(table, [(4, T0 + timedelta(seconds=70), "late")])
    run(project)
    rows = rows_of(project, name)
    assert rows == [(1, t0, "a"), (2, t0 + timedelta(seconds=50), "b"), (3, t0 + timedelta(seconds=100), "c"),
                    (4, t0 + timedelta(seconds=70), "late")]
    # row 2 (at mark - 50 s) and row 3 (at the mark) were read again and skipped; the mark did not move
    assert committed_mark(project, name) == f"cursor:{(t0 + timedelta(seconds=100)).isoformat()}"
    head = head_id(project, name)
    run(project)
    assert head_id(project, name) == head and rows_of(project, name) == rows


def test_without_a_key_the_boundary_is_deduplicated_by_content(db: Database, env_url: str, tmp_path: Path) -> None:
    table, name = unique("nokey"), unique("nokey")
    db.create_orders(table, key=False)
    mark = T0 + timedelta(minutes=1)
    db.insert(table, [(1, T0, "a"), (2, mark, "b"), (2, mark, None)])
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table, key=False))
    run(project)
    # at the mark: a row equal to a committed one but for its note, and one that differs from a null note only
    db.insert(table, [(2, mark, "c"), (3, mark, "")])
    run(project)
    assert Counter(rows_of(project, name)) == Counter(
        [(1, T0, "a"), (2, mark, "b"), (2, mark, None), (2, mark, "c"), (3, mark, "")]
    )


def test_a_query_source_is_filtered_as_a_subselect(db: Database, env_url: str, tmp_path: Path) -> None:
    table, name = unique("q"), unique("q")
    db.create_orders(table)
    db.insert(table, [(1, T0, "a"), (2, T0 + timedelta(minutes=1), "skip-me"), (3, T0 + timedelta(minutes=2), "c")])
    project = Project(tmp_path / "project")
    spec = orders_spec(db, name, table)
    del spec["source"]["table"]
    spec["source"]["query"] = f"SELECT id, updated_at, note FROM {table} WHERE note <> 'skip-me'"  # noqa: S608
    project.write_spec(spec)
    run(project)
    db.insert(table, [(4, T0 + timedelta(minutes=2), "at-mark"), (5, T0 + timedelta(minutes=3), "skip-me")])
    run(project)
    assert [r[0] for r in rows_of(project, name)] == [1, 3, 4]


def bulk_insert(db: Database, table: str, first_id: int, count: int, start: datetime) -> None:
    """``count`` rows from ``first_id``, one second apart from ``start``, with 200 bytes of note each (several
    batches of the drivers' streams)."""
    at = start.isoformat(sep=" ")
    if db.kind == "postgres":
        db.execute(
            f"INSERT INTO {table} SELECT g, timestamp '{at}' + (g - {first_id}) * interval '1 second', repeat('x', 200)"  # noqa: S608
            f" FROM generate_series({first_id}, {first_id + count - 1}) g"
        )
    else:
        db.execute(
            f"INSERT INTO {table} SELECT seq, TIMESTAMP'{at}' + INTERVAL (seq - {first_id}) SECOND, REPEAT('x', 100)"  # noqa: S608
            f" FROM seq_{first_id}_to_{first_id + count - 1}"
        )


def source_ids(db: Database, table: str) -> Counter:
    if db.kind == "postgres":
        conn = db.server.connect(DB)
    else:
        conn = db.server.connect(DB)
    with conn.cursor() as cur:
        cur.execute(f"SELECT id, updated_at FROM {table}")  # noqa: S608
        rows = Counter((i, at.replace(tzinfo=None)) for i, at in cur.fetchall())
    conn.close()
    return rows


def table_ids(project: Project, name: str) -> Counter:
    head = project.table(f"testdomain.{name}").snapshot_by_name("acme")
    if head is None:
        return Counter()
    rows = project.table(f"testdomain.{name}").scan(snapshot_id=head.snapshot_id, selected_fields=("id", "updated_at"))
    return Counter((r["id"], r["updated_at"]) for r in rows.to_arrow().to_pylist())


def cli_materialize(project: Project, env_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATIVO_") and k != "DAGSTER_HOME"}
    env[URL_ENV] = env_url
    return subprocess.run(
        [str(DATIVO_DAGSTER), "materialize", "--specs", str(project.specs_dir)],
        capture_output=True, text=True, env=env, cwd="/", timeout=300, check=False,
    )


def test_killed_runs_never_lose_or_double_a_row(db: Database, env_url: str, tmp_path: Path) -> None:
    from dativo_dagster_tests.fault_injection import start_killed_run, write_wrapper  # noqa: PLC0415

    table, name = unique("kill"), unique("kill")
    db.create_orders(table)
    count = 120_000 if db.kind == "postgres" else 25_000  # several batches of each driver's stream
    bulk_insert(db, table, 1, count, T0)
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table, retry_config={"max_retries": 0, "retry_delay_seconds": 0}))
    first = cli_materialize(project, env_url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert table_ids(project, name) == source_ids(db, table)
    wrapper = write_wrapper(tmp_path)
    next_id, start = count + 1, T0 + timedelta(seconds=count)
    for point in ("extract", "commit-before", "commit-after"):
        mark_before, rows_before = committed_mark(project, name), table_ids(project, name)
        at_mark = datetime.fromisoformat(mark_before.removeprefix("cursor:"))  # a new row AT the mark is loaded too
        db.insert(table, [(next_id, at_mark, "at-mark")])
        bulk_insert(db, table, next_id + 1, count, start)
        report = tmp_path / f"{point}.json"
        proc = start_killed_run(wrapper, point, project.specs_dir, report)
        proc.communicate(timeout=300)
        assert proc.returncode == -9, point  # SIGKILL
        died = json.loads(report.read_text())
        assert died["point"] == point and (point != "extract" or died["batches"] >= 1), died  # killed mid-stream
        if point == "commit-after":
            # the rows and their mark landed in one commit: the head holds both
            rows_now = table_ids(project, name)
            assert rows_now == source_ids(db, table)
            assert committed_mark(project, name) == f"cursor:{max(at for _, at in rows_now).isoformat()}"
        else:
            assert table_ids(project, name) == rows_before and committed_mark(project, name) == mark_before, point
        again = cli_materialize(project, env_url)
        assert again.returncode == 0, again.stdout + again.stderr
        assert table_ids(project, name) == source_ids(db, table), point  # every row exactly once
        assert PASSWORD not in again.stdout + again.stderr
        next_id, start = next_id + count + 1, start + timedelta(seconds=count + 10)


def drop_reader_connection(db: Database) -> int:
    """Terminate the reader's sessions from another connection, as a server-side drop; returns how many."""
    if db.kind == "postgres":
        conn = db.server.connect(DB)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (READER,))
            dropped = sum(1 for (ok,) in cur.fetchall() if ok)
        conn.close()
        return dropped
    conn = db.server.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM information_schema.processlist WHERE user = %s", (READER,))
        ids = [i for (i,) in cur.fetchall()]
        for i in ids:
            cur.execute(f"KILL CONNECTION {int(i)}")
    conn.close()
    return len(ids)


def test_a_connection_dropped_mid_read_is_retried_from_a_fresh_snapshot(
    db: Database, env_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dativo_dagster.sources import database  # noqa: PLC0415

    table, name = unique("drop"), unique("drop")
    db.create_orders(table)
    count = 120_000 if db.kind == "postgres" else 300_000  # more than the socket buffers hold once the read starts
    bulk_insert(db, table, 1, count, T0)
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table, retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    read = database.DatabaseSource.read
    attempts: list[dict[str, int]] = []

    def dropping(self, *args, **kwargs):  # noqa: ANN001, ANN202 - wraps DatabaseSource.read
        attempt = {"batches": 0, "dropped": 0}
        attempts.append(attempt)
        for batch in read(self, *args, **kwargs):
            attempt["batches"] += 1
            if len(attempts) == 1 and attempt["batches"] == 1:
                attempt["dropped"] = drop_reader_connection(db)  # the server ends the read's session
                # committed meanwhile: only a new snapshot sees them
                bulk_insert(db, table, count + 1, 10, T0 + timedelta(seconds=count))
            yield batch

    monkeypatch.setattr(database.DatabaseSource, "read", dropping)
    result = project.materialize()
    assert result.success
    assert len(attempts) == 2 and attempts[0]["dropped"] >= 1, attempts  # the drop happened while rows streamed
    retried = [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert [e.step_key for e in retried] == [f"{name}.{name}__extract"]
    assert table_ids(project, name) == source_ids(db, table)  # as if not interrupted, the late rows included
    assert sum(table_ids(project, name).values()) == count + 10


def test_the_sensor_requests_a_run_only_when_the_cursor_moved(db: Database, env_url: str, tmp_path: Path) -> None:
    import dagster as dg  # noqa: PLC0415

    from dativo_dagster.definitions import build_definitions  # noqa: PLC0415
    from dativo_dagster.sensors import SENSOR_FILES_TAG  # noqa: PLC0415

    table, name = unique("sense"), unique("sense")
    db.create_orders(table)
    db.insert(table, [(1, T0, "a"), (2, T0 + timedelta(minutes=1), "b")])
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table, sensor={"minimum_interval_seconds": 30}))

    def tick(instance: dg.DagsterInstance, cursor: str | None) -> Any:
        defs = build_definitions(project.specs_dir)
        sensor = defs.resolve_sensor_def(f"{name}__sensor")
        resources = {key: defs.resources[key] for key in ("dativo_storage", "dativo_catalog")}
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources, definitions=defs) as context:
            started = time.perf_counter()
            data = sensor.evaluate_tick(context)
            return data, time.perf_counter() - started

    with dg.instance_for_test() as instance:
        first, _ = tick(instance, None)  # nothing committed yet: the source's rows are new
        assert [r.run_key for r in first.run_requests] and first.run_requests[0].tags[SENSOR_FILES_TAG]
        request = first.run_requests[0]
        done = project.materialize(instance=instance, tags={**request.tags, "dagster/run_key": request.run_key})
        assert done.success
        idle, seconds = tick(instance, first.cursor)
        assert not idle.run_requests and "nothing past the committed mark" in idle.skip_message
        assert seconds < 2, seconds
        db.insert(table, [(3, T0 + timedelta(minutes=2), "c")])
        moved, _ = tick(instance, idle.cursor)
        assert len(moved.run_requests) == 1 and moved.run_requests[0].run_key != request.run_key
        assert json.loads(moved.cursor) == {
            next(iter(json.loads(moved.cursor))): f"cursor:{(T0 + timedelta(minutes=2)).isoformat()}"
        }
        again, _ = tick(instance, moved.cursor)  # the same state asks with the same key (Dagster starts it once)
        assert [r.run_key for r in again.run_requests] == [moved.run_requests[0].run_key]
        artefacts = [first.cursor, idle.cursor, moved.cursor, idle.skip_message]
        for data in (first, moved):
            artefacts += [r.run_key for r in data.run_requests]
            artefacts += [json.dumps(dict(r.tags)) for r in data.run_requests]
        assert all(a for a in artefacts) and not [a for a in artefacts if PASSWORD in a or READER in a]
        assert any(f"{db.server.host}:{db.server.port}/{DB}/{table}" in a for a in artefacts)


def test_a_quarantined_row_advances_the_mark_and_is_quarantined_once(db: Database, env_url: str, tmp_path: Path) -> None:
    table, name = unique("warn"), unique("warn")
    db.create_orders(table)
    mark = T0 + timedelta(minutes=2)
    db.insert(table, [(1, T0, "10"), (2, T0 + timedelta(minutes=1), "20"), (3, mark, "not a number")])
    project = Project(tmp_path / "project")
    spec = orders_spec(db, name, table, schema_validation_mode="warn")
    spec["schema"][2]["type"] = "integer"  # note's text must be a number: row 3 is rejected
    project.write_spec(spec)
    run(project)
    assert sorted(r["id"] for r in branch_rows(project.table(f"testdomain.{name}"), "acme")) == [1, 2]
    # the mark is the highest cursor read, the quarantined row's included: it is not read past again
    assert committed_mark(project, name) == f"cursor:{mark.isoformat()}"
    rejects = project.table(f"testdomain.{name}__rejects")
    assert [r["id"] for r in branch_rows(rejects, "acme")] == ["3"]
    heads = (head_id(project, name), rejects.snapshot_by_name("acme").snapshot_id)
    # the quarantined row sits AT the mark, so it is read again: it is neither loaded nor quarantined twice
    result = run(project)
    assert result.asset_materializations_for_node(name)[0].metadata["nothing_new"].value is True
    rejects = project.table(f"testdomain.{name}__rejects")
    assert (head_id(project, name), rejects.snapshot_by_name("acme").snapshot_id) == heads
    # a new row at the mark that is invalid too is quarantined; the earlier one stays once
    db.insert(table, [(4, mark, "also bad")])
    run(project)
    rejects = project.table(f"testdomain.{name}__rejects")
    assert sorted(r["id"] for r in branch_rows(rejects, "acme")) == ["3", "4"]
    assert sorted(r["id"] for r in branch_rows(project.table(f"testdomain.{name}"), "acme")) == [1, 2]


def test_catalog_none_commits_the_mark_in_the_commit_marker(pg_db: PostgresCluster, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415

    from dativo_dagster.markers import committed_files, read_commit_markers  # noqa: PLC0415
    from dativo_dagster.storage import S3Settings  # noqa: PLC0415

    db = Database("postgres", pg_db)
    monkeypatch.setenv(URL_ENV, db.url)
    table, name = unique("plain"), unique("plain")
    db.create_orders(table)
    db.insert(table, [(1, T0, "a"), (2, T0 + timedelta(minutes=1), "b")])
    project = Project(tmp_path / "project")
    spec = orders_spec(db, name, table)
    spec["source"]["incremental"] = {"strategy": "cursor", "cursor_field": "id"}  # an integer cursor
    spec["target"] = {"catalog": "none", "partitioning": ["ingest_date"]}
    project.write_spec(spec)
    location = str(project.warehouse / "testdomain" / "testproduct" / name)

    def rows() -> Counter:
        found: Counter = Counter()
        for uri in committed_files(location, S3Settings()):
            found.update((r["id"], r["note"]) for r in pq.read_table(uri, columns=["id", "note"]).to_pylist())
        return found

    run(project)
    db.insert(table, [(3, T0, "c"), (4, T0, "d")])  # row 2 (id at the mark) is read again and skipped
    run(project)
    assert rows() == Counter({(1, "a"): 1, (2, "b"): 1, (3, "c"): 1, (4, "d"): 1})
    markers = read_commit_markers(location, S3Settings())
    assert len(markers) == 2
    assert json.loads(markers[-1]["properties"][SOURCE_STATE_KEY]) == {
        f"postgresql://{pg_db.host}:{pg_db.port}/{DB}/{table}": "cursor:4"
    }
    run(project)  # nothing new: no marker
    assert len(read_commit_markers(location, S3Settings())) == 2 and sum(rows().values()) == 4


def test_a_run_overtaken_by_another_commits_nothing(
    pg_db: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dativo_dagster import assets  # noqa: PLC0415

    db = Database("postgres", pg_db)
    monkeypatch.setenv(URL_ENV, db.url)
    table, name = unique("race"), unique("race")
    db.create_orders(table)
    db.insert(table, [(1, T0, "a")])
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table))
    run(project)
    db.insert(table, [(2, T0 + timedelta(minutes=1), "b")])
    commit_files = assets.commit_files
    overtook: list[str] = []

    def overtaken(table_, **kwargs):  # noqa: ANN001, ANN202 - wraps commit_files
        if not overtook:
            # another run that read from the same mark commits first (here: its commit's source state)
            (uri,) = kwargs["sources"]
            other_mark = f"cursor:{(T0 + timedelta(minutes=1)).isoformat()}"
            commit_files(table_, branch="acme", files=[], partitioner=kwargs["partitioner"], run_id="other-run",
                         properties={SOURCE_STATE_KEY: json.dumps({uri: other_mark})}, sources={uri: other_mark},
                         record_sources=True)
            overtook.append(other_mark)
            table_ = table_.refresh()
        return commit_files(table_, **kwargs)

    monkeypatch.setattr(assets, "commit_files", overtaken)
    result = project.materialize()
    assert overtook and committed_mark(project, name) == overtook[0]  # the race happened
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "another run committed rows of" in failure.event_specific_data.error.message
    assert rows_of(project, name) == [(1, T0, "a")]  # nothing of the overtaken run


def test_a_nothing_new_run_starts_no_reader_and_loads_the_table_once(
    db: Database, env_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing past the committed mark: the MySQL reader process is not started (a cheap query in the lookup's
    snapshot shows it, and the rows at the mark are read there), and extract loads the target table once. A new row
    AT the mark is still loaded exactly once that way, and a row past it still goes through the reader."""
    import traceback  # noqa: PLC0415

    from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415

    from dativo_dagster.sources import mysql as mysql_source  # noqa: PLC0415

    table, name = unique("idle"), unique("idle")
    db.create_orders(table)
    first = [(i, T0 + timedelta(minutes=i), f"v1-{i}") for i in range(1, 4)]
    db.insert(table, first)
    project = Project(tmp_path / "project")
    project.write_spec(orders_spec(db, name, table))
    run(project)

    readers: list[str] = []
    read_batches = mysql_source.read_batches

    def counted_reader(url: str, select: str, *args: Any) -> Any:
        readers.append(select)
        return read_batches(url, select, *args)

    loads: list[str] = []
    load_table = SqlCatalog.load_table

    def counted_load(self: SqlCatalog, identifier: Any) -> Any:
        if any(f.name == "extract" and f.filename.endswith("assets.py") for f in traceback.extract_stack()):
            loads.append(identifier if isinstance(identifier, str) else ".".join(identifier))
        return load_table(self, identifier)

    monkeypatch.setattr(mysql_source, "read_batches", counted_reader)
    monkeypatch.setattr(SqlCatalog, "load_table", counted_load)

    before = head_id(project, name)
    result = run(project)
    assert result.asset_materializations_for_node(name)[0].metadata["nothing_new"].value is True
    assert head_id(project, name) == before and rows_of(project, name) == first
    assert readers == []
    assert loads.count(f"testdomain.{name}") == 1, loads

    # a new row at the mark, nothing past it: read in the lookup's snapshot, loaded once, the mark stays
    at_mark = (4, T0 + timedelta(minutes=3), "new-at-mark")
    db.insert(table, [at_mark])
    loads.clear()
    run(project)
    assert rows_of(project, name) == sorted([*first, at_mark])
    assert readers == [] and loads.count(f"testdomain.{name}") == 1, loads
    assert committed_mark(project, name) == f"cursor:{(T0 + timedelta(minutes=3)).isoformat()}"
    head = head_id(project, name)
    run(project)
    assert head_id(project, name) == head and rows_of(project, name) == sorted([*first, at_mark])

    # a row past the mark: the whole read from the bound, through the reader process for MySQL
    past = (5, T0 + timedelta(minutes=9), "past")
    db.insert(table, [past])
    run(project)
    assert rows_of(project, name) == sorted([*first, at_mark, past])
    assert len(readers) == (1 if db.kind == "mysql" else 0), readers
