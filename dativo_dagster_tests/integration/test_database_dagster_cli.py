"""Both databases through Dagster's own command line: `dagster asset materialize -m dativo_dagster.definitions
--select ...` on a DAGSTER_HOME made from the shipped dagster.yaml, a postgres spec and a mysql spec in one run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

from .servers import MariaDBServer, PostgresCluster

ROOT = Path(__file__).resolve().parents[2]
DAGSTER = Path(sys.executable).parent / "dagster"
PG_ENV, MYSQL_ENV = "DATIVO_TEST_PG_ORDERS_URL", "DATIVO_TEST_MY_ORDERS_URL"
DB = "cli_shop"
SCHEMA = [
    {"name": "id", "type": "integer", "required": True},
    {"name": "amount", "type": "decimal(10,2)", "required": True},
    {"name": "paid", "type": "boolean"},
    {"name": "placed_at", "type": "timestamptz", "required": True},
    {"name": "note", "type": "string"},
]
EXPECTED = [
    {"id": 1, "amount": Decimal("12.50"), "paid": True,
     "placed_at": datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc), "note": "first"},
    {"id": 2, "amount": Decimal("0.99"), "paid": False,
     "placed_at": datetime(2024, 3, 2, 23, 30, 15, tzinfo=timezone.utc), "note": None},
    {"id": 3, "amount": Decimal("1000.00"), "paid": None,
     "placed_at": datetime(2024, 3, 3, 0, 0, tzinfo=timezone.utc), "note": "Grüße"},
]


@pytest.fixture(scope="module")
def databases(postgres: PostgresCluster, mariadb: MariaDBServer) -> dict[str, str]:
    """The same three orders in PostgreSQL (numeric, boolean, timestamptz) and MariaDB (DECIMAL, TINYINT(1),
    TIMESTAMP); the URLs by variable name."""
    postgres.create_database(DB)
    conn = postgres.connect(DB)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (id integer PRIMARY KEY, amount numeric(12,2) NOT NULL, paid boolean,"
                    " placed_at timestamptz NOT NULL, note text)")
        cur.execute("INSERT INTO orders VALUES (1, 12.50, true, '2024-03-01 12:00:00+02', 'first'),"
                    " (2, 0.99, false, '2024-03-02 23:30:15+00', NULL), (3, 1000, NULL, '2024-03-03 00:00:00Z', 'Grüße')")
    conn.close()
    mariadb.execute(f"CREATE DATABASE IF NOT EXISTS {DB}")
    mariadb.execute([
        "CREATE TABLE orders (id INT PRIMARY KEY, amount DECIMAL(12,2) NOT NULL, paid TINYINT(1),"
        " placed_at TIMESTAMP NOT NULL, note VARCHAR(20)) CHARACTER SET utf8mb4",
    ], DB)
    # one session: the TIMESTAMP values are given in UTC
    conn = mariadb.connect(DB)
    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+00:00'")
        cur.execute("INSERT INTO orders VALUES (1, 12.50, 1, '2024-03-01 10:00:00', 'first'),"
                    " (2, 0.99, 0, '2024-03-02 23:30:15', NULL), (3, 1000, NULL, '2024-03-03 00:00:00', 'Grüße')")
    conn.close()
    return {
        PG_ENV: f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{DB}",
        MYSQL_ENV: f"mysql://root@{mariadb.host}:{mariadb.port}/{DB}",
    }


def _project(root: Path) -> Project:
    project = Project(root)
    for name, kind, env in (("pg_orders", "postgres", PG_ENV), ("my_orders", "mysql", MYSQL_ENV)):
        source = {"type": kind, "connection": {"url_env": env}, "table": "orders"}
        project.write_spec(base_spec(name, schema=SCHEMA, source=source))
    return project


def _materialize(project: Project, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("DATIVO_") and k not in ("DAGSTER_HOME", PG_ENV, MYSQL_ENV)}
    return subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "pg_orders,my_orders"],
        capture_output=True, text=True, timeout=300, check=False, cwd=home,
        env={**base, **env, "DATIVO_ASSET_SPECS_DIR": str(project.specs_dir), "DAGSTER_HOME": str(home)},
    )


def _home(folder: Path) -> Path:
    folder.mkdir()
    shutil.copy2(ROOT / "dagster.yaml", folder / "dagster.yaml")
    return folder


def test_dagster_asset_materialize_ingests_a_postgres_and_a_mysql_table(tmp_path: Path, databases: dict[str, str]):
    project = _project(tmp_path / "project")
    home = _home(tmp_path / "dagster_home")
    done = _materialize(project, home, databases)
    assert done.returncode == 0, done.stdout + done.stderr
    run_ids = set()
    for name, scheme in (("pg_orders", "postgresql"), ("my_orders", "mysql")):
        table = project.table(f"testdomain.{name}")
        rows = sorted(branch_rows(table, "acme"), key=lambda r: r["id"])
        assert [{k: r[k] for k in EXPECTED[0]} for r in rows] == EXPECTED, name
        assert {str(f.field_type) for f in table.schema().fields if f.name == "amount"} == {"decimal(10, 2)"}
        assert {r["_source_file"] for r in rows} == {databases[PG_ENV if scheme == "postgresql" else MYSQL_ENV]
                                                     .replace("postgres@", "").replace("root@", "") + "/orders"}
        run_ids |= {r["_run_id"] for r in rows}
    # one run of the asset job, recorded in the DAGSTER_HOME instance (its SQLite run storage)
    assert len(run_ids) == 1
    assert (home / "history" / "runs" / f"{run_ids.pop()}.db").exists()


def test_dagster_asset_materialize_fails_when_a_database_url_is_missing(tmp_path: Path, databases: dict[str, str]):
    project = _project(tmp_path / "project")
    home = _home(tmp_path / "dagster_home")
    done = _materialize(project, home, {PG_ENV: databases[PG_ENV]})
    assert done.returncode != 0, done.stdout + done.stderr
    assert f"environment variable {MYSQL_ENV} is not set" in done.stdout + done.stderr
    catalog = project.catalog()
    assert not catalog.table_exists("testdomain.my_orders") or not branch_rows(
        project.table("testdomain.my_orders"), "acme")
    # the other asset of the run still committed its rows
    assert len(branch_rows(project.table("testdomain.pg_orders"), "acme")) == len(EXPECTED)
