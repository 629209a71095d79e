"""PostgreSQL as a source, against the private cluster: types, warn and strict, secrets, errors, memory, snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from psycopg2 import sql

from dativo_dagster.errors import DatabaseSourceError, DatabaseUnavailableError, is_transient
from dativo_dagster.sources import source_for
from dativo_dagster.spec import LoadedSpec, load_spec_file
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

from .databases import add_postgres_reader
from .servers import PostgresCluster, free_ports

VENV_BIN = Path(sys.executable).parent
DATIVO_DAGSTER = VENV_BIN / "dativo-dagster"
DB = "shop"
READER = "shop_reader"
PASSWORD = "Pw-9f3kQzT7-never-logged"  # noqa: S105 - the secret the tests look for in every artefact
URL_ENV = "SHOP_DB_URL"

# one row per case: (label, values...) for the columns of TYPES_TABLE; label says which field should fail, if any
TYPES_DDL = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE sales.types (
    label text PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    big numeric(30,0), amount numeric(20,6),
    r4 real, f8 double precision, frac double precision,
    flag boolean, day date, ts timestamp, tstz timestamptz, tstz_naive timestamptz,
    txt_int text, vc varchar(20), ch char(5), id uuid, doc json, docb jsonb, feeling mood,
    empty_text text
);
INSERT INTO sales.types VALUES
 ('good', -32768, 2147483647, 9223372036854775807, 12345678901234, 12.340000, 1.5, 0.1, 3,
  true, '2024-02-29', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02', NULL,
  '42', 'varchar', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": null}', 'happy', ''),
 ('rounding', 1, 1, 1, 1, 12.345000, 1, 1, 1, false, '2024-01-01', '2024-01-01 00:00:00', '2024-01-01 00:00:00+00',
  NULL, '1', 'v', 'c', NULL, NULL, NULL, 'sad', NULL),
 ('overflow', 1, 1, 1, 9223372036854775808, 1, 1, 1, 1, false, '2024-01-01', '2024-01-01 00:00:00',
  '2024-01-01 00:00:00+00', NULL, '1', 'v', 'c', NULL, NULL, NULL, NULL, NULL),
 ('fraction', 1, 1, 1, 1, 1, 1, 1, 2.5, false, '2024-01-01', '2024-01-01 00:00:00', '2024-01-01 00:00:00+00',
  NULL, '1', 'v', 'c', NULL, NULL, NULL, NULL, NULL),
 ('text_abc', 1, 1, 1, 1, 1, 1, 1, 1, false, '2024-01-01', '2024-01-01 00:00:00', '2024-01-01 00:00:00+00',
  NULL, 'abc', 'v', 'c', NULL, NULL, NULL, NULL, NULL),
 ('zoned', 1, 1, 1, 1, 1, 1, 1, 1, false, '2024-01-01', '2024-01-01 00:00:00', '2024-01-01 00:00:00+00',
  '2024-01-01 00:00:00+05', '1', 'v', 'c', NULL, NULL, NULL, NULL, NULL),
 ('infinite_date', 1, 1, 1, 1, 1, 1, 1, 1, false, 'infinity', '2024-01-01 00:00:00', '2024-01-01 00:00:00+00',
  NULL, '1', 'v', 'c', NULL, NULL, NULL, NULL, NULL);
"""

TYPES_SCHEMA = [
    {"name": "label", "type": "string", "required": True},
    {"name": "i2", "type": "integer"},
    {"name": "i4", "type": "integer"},
    {"name": "i8", "type": "long"},
    {"name": "big", "type": "long"},  # numeric(30,0): beyond int64 is out of range
    {"name": "amount", "type": "decimal(10,2)"},  # numeric(20,6): 12.340000 fits, 12.345000 would round
    {"name": "r4", "type": "float"},
    {"name": "f8", "type": "double"},
    {"name": "frac", "type": "integer"},  # a double with a fraction is not an integer
    {"name": "flag", "type": "boolean"},
    {"name": "day", "type": "date"},
    {"name": "ts", "type": "timestamp"},
    {"name": "tstz", "type": "timestamptz"},
    {"name": "tstz_naive", "type": "timestamp"},  # a zoned time stamp into timestamp: only as an error
    {"name": "txt_int", "type": "integer"},  # text parsed by the CSV rules
    {"name": "vc", "type": "string"},
    {"name": "ch", "type": "string"},
    {"name": "id", "type": "string"},
    {"name": "doc", "type": "string"},
    {"name": "docb", "type": "string"},
    {"name": "feeling", "type": "string"},
    {"name": "empty_text", "type": "string"},
]

EXPECTED_REASONS = {
    "rounding": "amount: out_of_range",
    "overflow": "big: out_of_range",
    "fraction": "frac: invalid_integer",
    "text_abc": "txt_int: invalid_integer",
    "zoned": "tstz_naive: invalid_timestamp",
    "infinite_date": "day: invalid_date",
}


@pytest.fixture(scope="module")
def shop(postgres: PostgresCluster) -> PostgresCluster:
    """Database ``shop`` with schema ``sales``, its ``types`` table, and a role that logs in with a password.

    Other modules import this fixture (test_merge_servers.py): each module runs it once on the session's cluster, so
    a cluster that has the role already is set up."""
    if not add_postgres_reader(postgres, DB, READER, PASSWORD):
        return postgres
    conn = postgres.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE SCHEMA sales")
        cur.execute(TYPES_DDL)
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA sales TO {}").format(sql.Identifier(READER)))
        cur.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA sales TO {}").format(sql.Identifier(READER)))
    conn.close()
    return postgres


def url(cluster: PostgresCluster, password: str = PASSWORD, port: int | None = None) -> str:
    return f"postgresql://{READER}:{password}@{cluster.host}:{port or cluster.port}/{DB}"


def db_spec(name: str, source: dict[str, Any], schema: list[dict[str, Any]] = TYPES_SCHEMA, **overrides: Any) -> dict:
    spec = base_spec(name, schema=schema, **overrides)
    spec["source"] = {"type": "postgres", "connection": {"url_env": URL_ENV}, **source}
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


def test_type_matrix_in_warn_mode_end_to_end(shop: PostgresCluster, tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(db_spec("types", {"table": "sales.types"}, schema_validation_mode="warn"))
    home = tmp_path / "dagster_home"
    home.mkdir()
    done = materialize(project, url(shop), home=home)
    assert done.returncode == 1, done.stdout + done.stderr  # warn mode committed with rejected rows

    rows = branch_rows(project.table("testdomain.types"), "acme")
    assert [r["label"] for r in rows] == ["good"]
    good = rows[0]
    assert good["i2"] == -32768 and good["i4"] == 2147483647 and good["i8"] == 9223372036854775807
    assert good["big"] == 12345678901234
    assert good["amount"] == Decimal("12.34")
    assert good["r4"] == 1.5 and good["f8"] == 0.1 and good["frac"] == 3
    assert good["flag"] is True and str(good["day"]) == "2024-02-29"
    assert good["ts"].isoformat() == "2024-01-02T03:04:05.123456"
    assert good["tstz"].isoformat() == "2024-01-02T01:04:05+00:00"  # +02 normalised to UTC
    assert good["tstz_naive"] is None  # a null is fine; the 'zoned' row's value is rejected
    assert good["txt_int"] == 42 and good["vc"] == "varchar" and good["ch"] == "ab"
    assert good["id"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert json.loads(good["doc"]) == {"a": [1, 2]} and json.loads(good["docb"]) == {"b": None}
    assert good["feeling"] == "happy" and good["empty_text"] == ""  # an empty text is not a null
    assert good["_source_file"] == f"postgresql://{shop.host}:{shop.port}/{DB}/sales.types"

    rejects = {r["label"]: r for r in branch_rows(project.table("testdomain.types__rejects"), "acme")}
    assert set(rejects) == set(EXPECTED_REASONS)
    for label, reason in EXPECTED_REASONS.items():
        assert rejects[label]["_reject_reason"] == reason, label
        assert rejects[label]["_source_line"] is None
        assert rejects[label]["_source_file"] == f"postgresql://{shop.host}:{shop.port}/{DB}/sales.types"
    assert rejects["rounding"]["amount"] == "12.345"  # kept as the server's text, trailing zeros aside
    assert rejects["overflow"]["big"] == "9223372036854775808"
    assert rejects["zoned"]["tstz_naive"] == "2023-12-31 19:00:00+00"

    # the password is nowhere: output, the instance's event log and runs, the warehouse's files, the rows
    artefacts = [done.stdout, done.stderr]
    for root in (home, project.root / ".dativo"):
        artefacts += [p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()]
    table = project.table("testdomain.types")
    artefacts += [json.dumps(s.summary.model_dump() if s.summary else {}) for s in table.metadata.snapshots]
    artefacts += [json.dumps(rows, default=str), json.dumps(list(rejects.values()), default=str)]
    assert len(artefacts) > 10
    assert not [a for a in artefacts if PASSWORD in a]
    assert any(f"{shop.host}:{shop.port}/{DB}/sales.types" in a for a in artefacts[2:])  # the events were searched


def test_strict_mode_fails_and_commits_nothing(shop: PostgresCluster, tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(db_spec("strict_types", {"table": "sales.types"}))
    done = materialize(project, url(shop))
    assert done.returncode == 2
    output = done.stdout + done.stderr
    for reason in EXPECTED_REASONS.values():
        field, kind = reason.split(": ")
        assert f"{field}: {kind}" in output, reason
    assert f"postgresql://{shop.host}:{shop.port}/{DB}/sales.types:" in output  # examples name the source, no line
    assert PASSWORD not in output
    catalog = project.catalog()
    assert not catalog.table_exists("testdomain.strict_types") or not branch_rows(
        project.table("testdomain.strict_types"), "acme"
    )


def test_query_source_reads_the_select_with_its_columns(shop: PostgresCluster, tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    schema = [{"name": "Label", "type": "string", "required": True}, {"name": "doubled", "type": "integer"},
              {"name": "missing_col", "type": "string"}]
    query = "SELECT label, i4::bigint * 2 AS doubled, 'x' AS extra FROM sales.types WHERE label IN ('good', 'fraction');"
    project.write_spec(db_spec("from_query", {"query": query}, schema=schema, schema_validation_mode="warn"))
    done = materialize(project, url(shop))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = sorted(branch_rows(project.table("testdomain.from_query"), "acme"), key=lambda r: r["Label"])
    assert [(r["Label"], r["doubled"], r["missing_col"]) for r in rows] == [("fraction", 2, None), ("good", 4294967294, None)]
    assert {r["_source_file"] for r in rows} == {f"postgresql://{shop.host}:{shop.port}/{DB}/query"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_variable", f"environment variable {URL_ENV} is not set"),
        ("wrong_password", "password authentication failed"),
        ("unknown_table", 'relation "sales.nope" does not exist'),
        ("unknown_column", 'column "nope" does not exist'),
        ("query_fails_half_way", "integer out of range"),
    ],
)
def test_terminal_errors_name_the_spec(shop: PostgresCluster, tmp_path: Path, case: str, expected: str) -> None:
    project = Project(tmp_path / "project")
    source = {"table": "sales.nope"} if case == "unknown_table" else {"table": "sales.types"}
    if case == "unknown_column":
        source = {"query": "SELECT nope FROM sales.types"}
    if case == "query_fails_half_way":  # the server fails the statement while rows stream
        source = {"query": "SELECT label, i4 * 2 AS i4 FROM sales.types"}
    path = project.write_spec(db_spec(f"err_{case}", source, retry_config={"max_retries": 2, "retry_delay_seconds": 0}))
    env_url = {"missing_variable": None, "wrong_password": url(shop, password="Wrong-pw-1234")}.get(case, url(shop))
    done = materialize(project, env_url)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert expected in output
    assert f"asset_specs/{path.name}: source" in output
    assert PASSWORD not in output and "Wrong-pw-1234" not in output
    assert "retry" not in output.lower()  # terminal: the RetryPolicy does not try again


def test_server_down_is_transient(shop: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = Project(tmp_path / "project")
    path = project.write_spec(db_spec("down", {"table": "sales.types"}))
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


def test_one_snapshot_while_rows_are_inserted(shop: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = shop.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE sales.growing AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 300000) g")
        cur.execute(sql.SQL("GRANT SELECT ON sales.growing TO {}").format(sql.Identifier(READER)))
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "integer", "required": True}, {"name": "pad", "type": "string"}]
    path = project.write_spec(db_spec("growing", {"table": "sales.growing"}, schema=schema))
    monkeypatch.setenv(URL_ENV, url(shop))
    source = source_for(loaded(project, path), S3Settings())
    batches = source.read(source.list_units(), [])
    first = next(batches)
    with conn.cursor() as cur:  # committed while the read is under way
        cur.execute("INSERT INTO sales.growing SELECT g, 'new' FROM generate_series(300001, 300100) g")
        cur.execute("SELECT count(*) FROM sales.growing")
        assert cur.fetchone()[0] == 300100
    rest = sum(batch.num_rows for batch in batches)
    assert first.num_rows < 300000  # the insert really happened mid-read
    assert first.num_rows + rest == 300000
    conn.close()


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


def test_a_large_table_streams_in_bounded_memory(shop: PostgresCluster, tmp_path: Path) -> None:
    conn = shop.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name, count in (("small", 100_000), ("large", 2_000_000)):
            cur.execute(
                f"CREATE TABLE sales.{name} AS SELECT g AS id, md5(g::text) AS hash, g * 0.5 AS amount,"  # noqa: S608
                f" timestamptz '2024-01-01' + g * interval '1 second' AS at FROM generate_series(1, {count}) g"
            )
            cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier("sales", name), sql.Identifier(READER)))
    conn.close()
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "long", "required": True}, {"name": "hash", "type": "string"},
              {"name": "amount", "type": "decimal(12,1)"}, {"name": "at", "type": "timestamptz"}]
    peaks = {}
    for name, count in (("small", 100_000), ("large", 2_000_000)):
        path = project.write_spec(db_spec(f"mem_{name}", {"table": f"sales.{name}"}, schema=schema))
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(path), str(project.root)],
            capture_output=True, text=True, env={**os.environ, URL_ENV: url(shop)}, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        rows, peak = map(int, done.stdout.split())
        assert rows == count
        peaks[name] = peak
    # 20 times the rows (about 150 MB of text) at nearly the same peak: the table is never held whole
    assert peaks["large"] < peaks["small"] + 60, peaks


def test_batches_are_bounded_whatever_the_table_size(
    shop: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver hands over small batches (ADBC's own default is 16 MB each, and the stages hold several at once),
    so a run's memory is the same for any table beyond a few MiB of text (docs/sources/postgres.md, "Memory")."""
    mib = 1 << 20
    conn = shop.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(  # about 25 MB of text
            "CREATE TABLE sales.wide AS SELECT g AS id, repeat(md5(g::text), 3) AS hash FROM generate_series(1, 250000) g"
        )
        cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier("sales", "wide"), sql.Identifier(READER)))
    conn.close()
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "long", "required": True}, {"name": "hash", "type": "string"}]
    source = source_for(loaded(project, project.write_spec(db_spec("wide", {"table": "sales.wide"}, schema=schema))),
                        S3Settings())
    monkeypatch.setenv(URL_ENV, url(shop))
    sizes, rows, id_sum, hash_chars = [], 0, 0, 0
    for batch in source.read(source.list_units(), []):
        sizes.append(batch.column("id").nbytes + batch.column("hash").nbytes)
        rows += batch.num_rows
        id_sum += pc.sum(batch.column("id").cast(pa.int64())).as_py()
        hash_chars += pc.sum(pc.utf8_length(batch.column("hash"))).as_py()
    assert (rows, id_sum, hash_chars) == (250_000, 250_000 * 250_001 // 2, 250_000 * 96)  # every row, read once
    assert sum(sizes) > 20 * mib
    assert max(sizes) <= 3 * mib, [round(s / mib, 1) for s in sizes]
