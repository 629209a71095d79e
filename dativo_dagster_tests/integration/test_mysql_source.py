"""MySQL / MariaDB as a source, against the private MariaDB server: types, warn and strict, secrets, errors, memory,
snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from dativo_dagster.errors import DatabaseSourceError, DatabaseUnavailableError, is_transient
from dativo_dagster.sources import source_for
from dativo_dagster.spec import LoadedSpec, load_spec_file
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

from .servers import MariaDBServer, free_ports

VENV_BIN = Path(sys.executable).parent
DATIVO_DAGSTER = VENV_BIN / "dativo-dagster"
DB = "shop"
READER = "shop_reader"
PASSWORD = "My-9f3kQzT7-never-logged"  # noqa: S105 - the secret the tests look for in every artefact
URL_ENV = "SHOP_DB_URL"

# one row per case; the label says which field should fail, if any. sql_mode '' lets the zero date in.
TYPES_DDL = [
    "SET SESSION sql_mode = ''",
    """CREATE TABLE types (
        label VARCHAR(30) PRIMARY KEY,
        i1 TINYINT, i4 INT, i8 BIGINT, u8 BIGINT UNSIGNED, amount DECIMAL(20,6), whole DECIMAL(12,0),
        f8 DOUBLE, frac DOUBLE, flag TINYINT(1), day DATE, dt DATETIME(6), ts TIMESTAMP NULL, ts_naive TIMESTAMP NULL,
        txt_int TEXT, vc VARCHAR(20), ch CHAR(5), doc JSON, feeling ENUM('happy', 'sad'), empty_text TEXT, bin VARBINARY(4)
    )""",
    "SET SESSION time_zone = '+02:00'",  # TIMESTAMP values are given in +02:00 and read back in UTC
    """INSERT INTO types VALUES
     ('good', -128, 2147483647, 9223372036854775807, 9223372036854775807, 12.340000, 100, 0.1, 3, 1, '2024-02-29',
      '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05', NULL, '42', 'varchar', 'ab', '{"a": [1, 2]}', 'happy', '',
      x'00ff'),
     ('rounding', 1, 1, 1, 1, 12.345000, 1, 1, 1, 0, '2024-01-01', '2024-01-01 00:00:00', NULL, NULL, '1', 'v', 'c',
      NULL, 'sad', NULL, NULL),
     ('unsigned_overflow', 1, 1, 1, 18446744073709551615, 1, 1, 1, 1, 0, '2024-01-01', '2024-01-01 00:00:00', NULL,
      NULL, '1', 'v', 'c', NULL, NULL, NULL, NULL),
     ('fraction', 1, 1, 1, 1, 1, 1, 1, 2.5, 0, '2024-01-01', '2024-01-01 00:00:00', NULL, NULL, '1', 'v', 'c', NULL,
      NULL, NULL, NULL),
     ('text_abc', 1, 1, 1, 1, 1, 1, 1, 1, 0, '2024-01-01', '2024-01-01 00:00:00', NULL, NULL, 'abc', 'v', 'c', NULL,
      NULL, NULL, NULL),
     ('zoned', 1, 1, 1, 1, 1, 1, 1, 1, 0, '2024-01-01', '2024-01-01 00:00:00', NULL, '2024-01-01 05:00:00', '1', 'v',
      'c', NULL, NULL, NULL, NULL),
     ('zero_date', 1, 1, 1, 1, 1, 1, 1, 1, 0, '0000-00-00', '2024-01-01 00:00:00', NULL, NULL, '1', 'v', 'c', NULL,
      NULL, NULL, NULL),
     ('zero_datetime', 1, 1, 1, 1, 1, 1, 1, 1, 0, '2024-01-01', '0000-00-00 00:00:00', NULL, NULL, '1', 'v', 'c',
      NULL, NULL, NULL, NULL),
     ('not_boolean', 1, 1, 1, 1, 1, 1, 1, 1, 2, '2024-01-01', '2024-01-01 00:00:00', NULL, NULL, '1', 'v', 'c',
      NULL, NULL, NULL, NULL)""",
]

TYPES_SCHEMA = [
    {"name": "label", "type": "string", "required": True},
    {"name": "i1", "type": "integer"},
    {"name": "i4", "type": "integer"},
    {"name": "i8", "type": "long"},
    {"name": "u8", "type": "long"},  # BIGINT UNSIGNED: beyond int64 is out of range
    {"name": "amount", "type": "decimal(10,2)"},  # DECIMAL(20,6): 12.340000 fits, 12.345000 would round
    {"name": "whole", "type": "decimal(5,0)"},  # 100 keeps its zeros
    {"name": "f8", "type": "double"},
    {"name": "frac", "type": "integer"},  # a double with a fraction is not an integer
    {"name": "flag", "type": "boolean"},  # TINYINT(1): 1 / 0 are booleans, 2 is not
    {"name": "day", "type": "date"},
    {"name": "dt", "type": "timestamp"},
    {"name": "ts", "type": "timestamptz"},
    {"name": "ts_naive", "type": "timestamp"},  # a TIMESTAMP is an instant: into timestamp only as an error
    {"name": "txt_int", "type": "integer"},  # text parsed by the CSV rules
    {"name": "vc", "type": "string"},
    {"name": "ch", "type": "string"},
    {"name": "doc", "type": "string"},
    {"name": "feeling", "type": "string"},
    {"name": "empty_text", "type": "string"},
    {"name": "bin", "type": "string"},
]

EXPECTED_REASONS = {
    "rounding": "amount: out_of_range",
    "unsigned_overflow": "u8: out_of_range",
    "fraction": "frac: invalid_integer",
    "text_abc": "txt_int: invalid_integer",
    "zoned": "ts_naive: invalid_timestamp",
    "zero_date": "day: invalid_date",
    "zero_datetime": "dt: invalid_timestamp",
    "not_boolean": "flag: invalid_boolean",
}


@pytest.fixture(scope="module")
def shop(mariadb: MariaDBServer) -> MariaDBServer:
    """Database ``shop`` with its ``types`` table, and a user that logs in with a password and may only read."""
    mariadb.execute([f"CREATE DATABASE {DB}", f"CREATE USER '{READER}'@'%' IDENTIFIED BY '{PASSWORD}'",
                     f"GRANT SELECT ON {DB}.* TO '{READER}'@'%'"])
    mariadb.execute(TYPES_DDL, DB)
    return mariadb


def url(server: MariaDBServer, password: str = PASSWORD, port: int | None = None) -> str:
    return f"mysql://{READER}:{password}@{server.host}:{port or server.port}/{DB}"


def db_spec(name: str, source: dict[str, Any], schema: list[dict[str, Any]] = TYPES_SCHEMA, **overrides: Any) -> dict:
    spec = base_spec(name, schema=schema, **overrides)
    spec["source"] = {"type": "mysql", "connection": {"url_env": URL_ENV}, **source}
    spec["compliance"] = {"classification": ["internal"]}
    return spec


def materialize(project: Project, env_url: str | None, *, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATIVO_") and k not in ("DAGSTER_HOME", URL_ENV)}
    if env_url is not None:
        env[URL_ENV] = env_url
    if home is not None:
        env["DAGSTER_HOME"] = str(home)
    return subprocess.run(
        [str(DATIVO_DAGSTER), "materialize", "--specs", str(project.specs_dir)],
        capture_output=True, text=True, env=env, cwd="/", timeout=300, check=False,
    )


def loaded(project: Project, path: Path) -> LoadedSpec:
    spec, problems = load_spec_file(path, project.root)
    assert spec is not None, problems
    return spec


def test_type_matrix_in_warn_mode_end_to_end(shop: MariaDBServer, tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(db_spec("types", {"table": "types"}, schema_validation_mode="warn"))
    home = tmp_path / "dagster_home"
    home.mkdir()
    done = materialize(project, url(shop), home=home)
    assert done.returncode == 1, done.stdout + done.stderr  # warn mode committed with rejected rows

    source_uri = f"mysql://{shop.host}:{shop.port}/{DB}/types"
    rows = branch_rows(project.table("testdomain.types"), "acme")
    assert [r["label"] for r in rows] == ["good"]
    good = rows[0]
    assert good["i1"] == -128 and good["i4"] == 2147483647 and good["i8"] == 9223372036854775807
    assert good["u8"] == 9223372036854775807
    assert good["amount"] == Decimal("12.34") and good["whole"] == Decimal("100")
    assert good["f8"] == 0.1 and good["frac"] == 3
    assert good["flag"] is True and str(good["day"]) == "2024-02-29"
    assert good["dt"].isoformat() == "2024-01-02T03:04:05.123456"
    assert good["ts"].isoformat() == "2024-01-02T01:04:05+00:00"  # given at +02:00, read as the UTC instant
    assert good["ts_naive"] is None  # a null is fine; the 'zoned' row's value is rejected
    assert good["txt_int"] == 42 and good["vc"] == "varchar" and good["ch"] == "ab"
    assert json.loads(good["doc"]) == {"a": [1, 2]}
    assert good["feeling"] == "happy" and good["empty_text"] == ""  # an empty text is not a null
    assert good["bin"] == "00FF"  # binary strings as hex
    assert good["_source_file"] == source_uri

    rejects = {r["label"]: r for r in branch_rows(project.table("testdomain.types__rejects"), "acme")}
    assert set(rejects) == set(EXPECTED_REASONS)
    for label, reason in EXPECTED_REASONS.items():
        assert rejects[label]["_reject_reason"] == reason, label
        assert rejects[label]["_source_line"] is None
        assert rejects[label]["_source_file"] == source_uri
    assert rejects["rounding"]["amount"] == "12.345"  # kept as the server's text, trailing zeros aside
    assert rejects["unsigned_overflow"]["u8"] == "18446744073709551615"
    assert rejects["zoned"]["ts_naive"] == "2024-01-01 03:00:00+00:00"
    assert rejects["zero_date"]["day"] == "0000-00-00"
    assert rejects["not_boolean"]["flag"] == "2"

    # the password is nowhere: output, the instance's event log and runs, the warehouse's files, the rows
    artefacts = [done.stdout, done.stderr]
    for root in (home, project.root / ".dativo"):
        artefacts += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    table = project.table("testdomain.types")
    artefacts += [json.dumps(s.summary.model_dump() if s.summary else {}) for s in table.metadata.snapshots]
    artefacts += [json.dumps(rows, default=str), json.dumps(list(rejects.values()), default=str)]
    assert len(artefacts) > 10
    assert not [a for a in artefacts if PASSWORD in a]
    assert any(f"{shop.host}:{shop.port}/{DB}/types" in a for a in artefacts[2:])  # the events were searched


def test_strict_mode_fails_and_commits_nothing(shop: MariaDBServer, tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(db_spec("strict_types", {"table": "shop.types"}))
    done = materialize(project, url(shop))
    assert done.returncode == 2
    output = done.stdout + done.stderr
    for reason in EXPECTED_REASONS.values():
        field, kind = reason.split(": ")
        assert f"{field}: {kind}" in output, reason
    assert f"mysql://{shop.host}:{shop.port}/{DB}/shop.types:" in output  # examples name the source, no line
    assert PASSWORD not in output
    catalog = project.catalog()
    assert not catalog.table_exists("testdomain.strict_types") or not branch_rows(
        project.table("testdomain.strict_types"), "acme"
    )


def test_query_source_reads_the_select_with_its_columns(shop: MariaDBServer, tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    schema = [{"name": "Label", "type": "string", "required": True}, {"name": "doubled", "type": "integer"},
              {"name": "missing_col", "type": "string"}]
    query = "SELECT label, i4 * 2 AS doubled, 'x' AS extra FROM types WHERE label IN ('good', 'fraction');"
    project.write_spec(db_spec("from_query", {"query": query}, schema=schema, schema_validation_mode="warn"))
    done = materialize(project, url(shop))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = sorted(branch_rows(project.table("testdomain.from_query"), "acme"), key=lambda r: r["Label"])
    assert [(r["Label"], r["doubled"], r["missing_col"]) for r in rows] == [("fraction", 2, None), ("good", 4294967294, None)]
    assert {r["_source_file"] for r in rows} == {f"mysql://{shop.host}:{shop.port}/{DB}/query"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_variable", f"environment variable {URL_ENV} is not set"),
        ("wrong_password", "Access denied for user 'shop_reader'"),
        ("unknown_table", "Table 'shop.nope' doesn't exist"),
        ("unknown_column", "Unknown column 'nope'"),
        ("write_query", "READ ONLY transaction"),
    ],
)
def test_terminal_errors_name_the_spec(shop: MariaDBServer, tmp_path: Path, case: str, expected: str) -> None:
    project = Project(tmp_path / "project")
    source = {"table": "nope"} if case == "unknown_table" else {"table": "types"}
    if case == "unknown_column":
        source = {"query": "SELECT nope FROM types"}
    if case == "write_query":  # a query that would lock rows for writing is refused by the read-only transaction
        source = {"query": "SELECT label FROM types FOR UPDATE"}
    path = project.write_spec(db_spec(f"err_{case}", source, retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    env_url = {"missing_variable": None, "wrong_password": url(shop, password="Wrong-pw-1234")}.get(case, url(shop))
    done = materialize(project, env_url)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert expected in output
    assert f"asset_specs/{path.name}: source" in output
    assert PASSWORD not in output and "Wrong-pw-1234" not in output
    assert "retry" not in output.lower()  # terminal: the RetryPolicy does not try again


def test_server_down_is_transient(shop: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = Project(tmp_path / "project")
    path = project.write_spec(db_spec("down", {"table": "types"}))
    monkeypatch.setenv(URL_ENV, url(shop, port=free_ports(1)[0]))
    source = source_for(loaded(project, path), S3Settings())
    with pytest.raises(DatabaseUnavailableError) as caught:
        list(source.read(source.list_units(), []))
    assert is_transient(caught.value)
    assert "Connection refused" in str(caught.value) and PASSWORD not in str(caught.value)
    monkeypatch.setenv(URL_ENV, url(shop, password="Wrong-pw-1234"))
    with pytest.raises(DatabaseSourceError) as refused:
        list(source.read(source.list_units(), []))
    assert not is_transient(refused.value)
    assert "Wrong-pw-1234" not in str(refused.value)


def test_a_connection_dropped_mid_read_is_transient(
    shop: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.execute(["CREATE TABLE dropped (id BIGINT PRIMARY KEY, pad VARCHAR(200))",
                  "INSERT INTO dropped SELECT seq, REPEAT('x', 200) FROM seq_1_to_200000"], DB)
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "long", "required": True}, {"name": "pad", "type": "string"}]
    path = project.write_spec(db_spec("dropped", {"table": "dropped"}, schema=schema))
    monkeypatch.setenv(URL_ENV, url(shop))
    source = source_for(loaded(project, path), S3Settings())
    batches = source.read(source.list_units(), [])
    first = next(batches)
    conn = shop.connect()
    with conn.cursor() as cur:  # the server drops the reader's connection while rows stream
        cur.execute("SELECT id FROM information_schema.processlist WHERE user = %s", (READER,))
        readers = [row[0] for row in cur.fetchall()]
        assert len(readers) == 1
        cur.execute(f"KILL CONNECTION {readers[0]}")
    conn.close()
    with pytest.raises(DatabaseUnavailableError) as caught:
        for batch in batches:
            assert batch.num_rows > 0
    assert first.num_rows < 200000  # the read was under way when the connection went
    assert is_transient(caught.value)
    assert "reading mysql://" in str(caught.value) and PASSWORD not in str(caught.value)


def test_one_snapshot_while_rows_are_inserted(shop: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shop.execute(["CREATE TABLE growing (id BIGINT PRIMARY KEY, pad VARCHAR(200))",
                  "INSERT INTO growing SELECT seq, REPEAT('x', 200) FROM seq_1_to_20000"], DB)
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "integer", "required": True}, {"name": "pad", "type": "string"}]
    # SLEEP(0.0002) a row keeps the rows' statement running for a few seconds while the insert commits
    query = "SELECT id, pad FROM growing WHERE SLEEP(0.0002) = 0"
    path = project.write_spec(db_spec("growing", {"query": query}, schema=schema))
    monkeypatch.setenv(URL_ENV, url(shop))
    source = source_for(loaded(project, path), S3Settings())
    batches = source.read(source.list_units(), [])
    first = next(batches)
    shop.execute("INSERT INTO growing SELECT seq, 'new' FROM seq_20001_to_20100", DB)  # committed mid-read
    conn = shop.connect(DB)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM growing")
        assert cur.fetchone()[0] == 20100
        cur.execute("SELECT command, info FROM information_schema.processlist WHERE user = %s", (READER,))
        running = cur.fetchall()
        assert [c for c, info in running if "SLEEP" in (info or "")], running  # the rows' statement still runs
    conn.close()
    rest = sum(batch.num_rows for batch in batches)
    assert first.num_rows < 20000
    assert first.num_rows + rest == 20000


def test_the_rows_are_one_statement_read_after_the_column_lookup(
    shop: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The column lookup and the rows are two statements: rows committed in between are read, all of them (the rows'
    one statement is the snapshot; docs/sources/mysql.md "How a run reads")."""
    shop.execute(["CREATE TABLE early (id BIGINT PRIMARY KEY)", "INSERT INTO early SELECT seq FROM seq_1_to_10"], DB)
    project = Project(tmp_path / "project")
    path = project.write_spec(db_spec("early", {"table": "early"}, schema=[{"name": "id", "type": "long"}]))
    monkeypatch.setenv(URL_ENV, url(shop))
    from dativo_dagster.sources import database  # noqa: PLC0415 - where the columns are matched, inside the read

    real_match_columns = database.match_columns
    inserted = []

    def insert_then_match(*args: Any, **kwargs: Any) -> Any:  # runs between the column lookup and the rows' SELECT
        shop.execute("INSERT INTO early SELECT seq FROM seq_11_to_15", DB)
        inserted.append(True)
        return real_match_columns(*args, **kwargs)

    monkeypatch.setattr(database, "match_columns", insert_then_match)
    source = source_for(loaded(project, path), S3Settings())
    ids = sorted(int(i) for batch in source.read(source.list_units(), []) for i in batch.column("id").to_pylist())
    assert inserted  # the insert happened during the read
    assert ids == list(range(1, 16))


MEMORY_PROBE = textwrap.dedent(
    """
    import os, resource, sys
    from pathlib import Path
    from dativo_dagster.sources import source_for
    from dativo_dagster.spec import load_spec_file
    from dativo_dagster.storage import S3Settings
    from dativo_dagster.validate import validate_batch
    spec, _ = load_spec_file(Path(sys.argv[1]), Path(sys.argv[2]))
    source = source_for(spec, S3Settings())
    rows = 0
    for batch in source.read(source.list_units(), []):
        valid, _, _ = validate_batch(batch, spec.spec.fields, source.null_values)
        rows += valid.num_rows
    print(rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def test_a_large_table_streams_in_bounded_memory(shop: MariaDBServer, tmp_path: Path) -> None:
    for name, count in (("small", 50_000), ("large", 1_000_000)):
        shop.execute(
            f"CREATE TABLE {name} AS SELECT seq AS id, MD5(seq) AS hash, CAST(seq * 0.5 AS DECIMAL(12,1)) AS amount,"
            f" TIMESTAMP('2024-01-01') + INTERVAL seq SECOND AS at FROM seq_1_to_{count}",
            DB,
        )
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "long", "required": True}, {"name": "hash", "type": "string"},
              {"name": "amount", "type": "decimal(12,1)"}, {"name": "at", "type": "timestamp"}]
    peaks = {}
    for name, count in (("small", 50_000), ("large", 1_000_000)):
        path = project.write_spec(db_spec(f"mem_{name}", {"table": name}, schema=schema))
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(path), str(project.root)],
            capture_output=True, text=True, env={**os.environ, URL_ENV: url(shop)}, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        rows, peak = map(int, done.stdout.split())
        assert rows == count
        peaks[name] = peak
    # 20 times the rows (about 70 MB of text) at nearly the same peak: the table is never held whole
    assert peaks["large"] < peaks["small"] + 40, peaks
