"""The database demo (`make run-db`): AdventureWorks tables in a private PostgreSQL, ingested by database specs.

    python demo/run_db.py [--keep-running]

1. starts a private PostgreSQL: ``initdb`` in ``.dativo/run-db/postgres`` (a fresh cluster every run), listening on
   127.0.0.1 only, on a free port, trusting local logins (as the integration tests run theirs; run as root, the
   server runs as the ``postgres`` user, since PostgreSQL refuses root);
2. loads the sample files of ``data/adventureworks/`` into database ``adventureworks`` (``person.person`` and the
   data-warehouse tables ``dw.dimcurrency``, ``dw.dimproductcategory``, ``dw.dimsalesreason``,
   ``dw.factsalesquota``): each file is read with pyarrow (UTF-8 with a header, or the install files' UTF-16,
   ``|``-delimited, no header) and copied in with ``COPY ... FROM STDIN``, PostgreSQL parsing every value into the
   column's type;
3. runs ``dativo-dagster materialize --specs asset_specs_db`` with ``ADVENTUREWORKS_DB_URL`` pointing at the server,
   so the specs of ``asset_specs_db/adventureworks/`` read the tables into Iceberg (the same warehouse and catalog
   as ``make run``: the embedded default under ``.dativo/``, or the deployment the ``DATIVO_*`` variables name);
4. stops the server and removes its folder (``--keep-running`` leaves it up and prints how to stop it), and prints
   where the rows are.

Exit code: the materialize command's (0 every row committed, 2 a failure), or 2 when the server or the load failed.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pyarrow as pa
import pyarrow.csv as pacsv

log = logging.getLogger("run-db")

DATABASE = "adventureworks"
URL_ENV = "ADVENTUREWORKS_DB_URL"
SPECS_FOLDER = "asset_specs_db"
BRANCH = "demo_tenant"
USER = "postgres"
HOST = "127.0.0.1"
TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class SampleTable:
    """One table of the demo database: its name, the file it is loaded from and its columns (name, SQL type) in
    the file's column order."""

    name: str
    file: str
    columns: tuple[tuple[str, str], ...]
    header: bool = False  # the install files have none; Person.csv has one (UTF-8, comma-delimited)

    def create_sql(self) -> str:
        columns = ", ".join(f"{name} {sql_type}" for name, sql_type in self.columns)
        return f"CREATE TABLE {self.name} ({columns})"


TABLES = (
    SampleTable(
        "person.person",
        "Person.csv",
        (
            ("BusinessEntityID", "integer PRIMARY KEY"),
            ("PersonType", "char(2) NOT NULL"),
            ("NameStyle", "boolean NOT NULL"),
            ("Title", "varchar(8)"),
            ("FirstName", "varchar(50) NOT NULL"),
            ("MiddleName", "varchar(50)"),
            ("LastName", "varchar(50) NOT NULL"),
            ("Suffix", "varchar(10)"),
            ("EmailPromotion", "integer NOT NULL"),
            ("AdditionalContactInfo", "text"),
            ("Demographics", "text"),
            ("rowguid", "uuid NOT NULL"),
            ("ModifiedDate", "timestamp NOT NULL"),
        ),
        header=True,
    ),
    SampleTable(
        "dw.dimcurrency",
        "DimCurrency.csv",
        (("CurrencyKey", "integer PRIMARY KEY"), ("CurrencyAlternateKey", "char(3) NOT NULL"),
         ("CurrencyName", "varchar(50) NOT NULL")),
    ),
    SampleTable(
        "dw.dimproductcategory",
        "DimProductCategory.csv",
        (("ProductCategoryKey", "integer PRIMARY KEY"), ("ProductCategoryAlternateKey", "integer"),
         ("EnglishProductCategoryName", "varchar(50) NOT NULL"), ("SpanishProductCategoryName", "varchar(50) NOT NULL"),
         ("FrenchProductCategoryName", "varchar(50) NOT NULL")),
    ),
    SampleTable(
        "dw.dimsalesreason",
        "DimSalesReason.csv",
        (("SalesReasonKey", "integer PRIMARY KEY"), ("SalesReasonAlternateKey", "integer NOT NULL"),
         ("SalesReasonName", "varchar(50) NOT NULL"), ("SalesReasonReasonType", "varchar(50) NOT NULL")),
    ),
    SampleTable(
        "dw.factsalesquota",
        "FactSalesQuota.csv",
        (("SalesQuotaKey", "integer PRIMARY KEY"), ("EmployeeKey", "integer NOT NULL"), ("DateKey", "integer NOT NULL"),
         ("CalendarYear", "smallint NOT NULL"), ("CalendarQuarter", "smallint NOT NULL"),
         ("SalesAmountQuota", "numeric(19,4) NOT NULL"), ("Date", "date NOT NULL")),
    ),
)


class DemoError(RuntimeError):
    """The demo could not run: the message says which step and why."""


# --------------------------------------------------------------------------------------------- the server
def find_postgres_bindir() -> Path:
    """Folder of ``initdb`` and ``pg_ctl``: ``$PG_BINDIR``, ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``, PATH."""
    candidates = [Path(os.environ["PG_BINDIR"])] if os.environ.get("PG_BINDIR") else []
    if pg_config := shutil.which("pg_config"):
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
        candidates.append(Path(done.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise DemoError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with `apt-get install -y postgresql`"
        " (`make system-packages` does), or set PG_BINDIR to their folder"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in ``folder`` on a free loopback port (``trust`` logins, loopback only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.log_path = folder / "postgres.log"
        self.bindir = find_postgres_bindir()
        self.port = 0

    def _as_owner(self, args: list[str]) -> list[str]:
        """PostgreSQL refuses to run as root: then run its commands as the ``postgres`` user."""
        if os.geteuid() != 0:
            return args
        if runuser := shutil.which("runuser"):
            return [runuser, "-u", USER, "--", *args]
        return ["su", USER, "-s", "/bin/sh", "-c", shlex.join(args)]

    def _run(self, args: list[str], what: str) -> None:
        done = subprocess.run(self._as_owner(args), capture_output=True, text=True, timeout=TIMEOUT_SECONDS + 10,
                              cwd=self.folder, check=False)
        if done.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise DemoError(f"PostgreSQL {what} failed (exit {done.returncode}): {done.stdout}{done.stderr}{tail}")

    def start(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, user=USER)
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "--auth=trust", f"--username={USER}",
                   "--encoding=UTF8", "--locale=C", "--no-sync"], "initdb")
        self.port = free_port()
        options = f"-c listen_addresses={HOST} -p {self.port} -k {self.folder}"
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                   "-w", "-t", str(TIMEOUT_SECONDS), "start"], "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], "stop")

    def stop_command(self) -> str:
        return shlex.join(self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]))

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{database}"

    def connect(self, database: str):  # noqa: ANN201 - psycopg2's connection
        return psycopg2.connect(host=HOST, port=self.port, user=USER, dbname=database, connect_timeout=5)


@contextmanager
def running(server: PrivatePostgres, *, keep: bool) -> Iterator[PrivatePostgres]:
    server.start()
    try:
        yield server
    finally:
        if keep:
            log.info("PostgreSQL keeps running on %s:%s; stop it with: %s", HOST, server.port, server.stop_command())
        else:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)
            log.info("PostgreSQL stopped and its folder removed")


# --------------------------------------------------------------------------------------------- the data
def read_sample(table: SampleTable, folder: Path) -> pa.Table:
    """The sample file as text columns (nulls for empty fields): PostgreSQL's COPY parses them into its types."""
    names = [name for name, _ in table.columns]
    path = folder / table.file
    if table.header:
        read = pacsv.ReadOptions(encoding="utf-8")
        parse = pacsv.ParseOptions(delimiter=",")
    else:
        read = pacsv.ReadOptions(encoding="utf-16", column_names=names)
        parse = pacsv.ParseOptions(delimiter="|")
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True,
                                   null_values=[""], include_columns=names)
    data = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    if data.column_names != names:
        raise DemoError(f"{path}: columns {data.column_names}, expected {names}")
    return data


def load_tables(server: PrivatePostgres, data_folder: Path) -> dict[str, int]:
    """Create database ``adventureworks`` and copy each sample file into its table; rows per table."""
    admin = server.connect("postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {DATABASE}")
    admin.close()
    counts = {}
    conn = server.connect(DATABASE)
    try:
        with conn, conn.cursor() as cur:
            for schema in sorted({t.name.split(".")[0] for t in TABLES}):
                cur.execute(f"CREATE SCHEMA {schema}")
            for table in TABLES:
                data = read_sample(table, data_folder)
                text = io.BytesIO()
                pacsv.write_csv(data, text)
                text.seek(0)
                cur.execute(table.create_sql())
                cur.copy_expert(f"COPY {table.name} FROM STDIN (FORMAT csv, HEADER true)", text)
                cur.execute(f"SELECT count(*) FROM {table.name}")
                counts[table.name] = int(cur.fetchone()[0])
    finally:
        conn.close()
    return counts


# --------------------------------------------------------------------------------------------- the run
def materialize(project: Path, url: str) -> int:
    """``dativo-dagster materialize --specs asset_specs_db`` with the URL in ``ADVENTUREWORKS_DB_URL``."""
    command = [str(Path(sys.executable).parent / "dativo-dagster"), "materialize", "--specs",
               str(project / SPECS_FOLDER)]
    return subprocess.run(command, env={**os.environ, URL_ENV: url}, cwd=project, check=False).returncode


def report_rows(project: Path) -> None:
    """Where the rows are: the embedded default's catalog and warehouse, each table's rows on the demo branch."""
    if any(name.startswith("DATIVO_") and name != "DATIVO_ASSET_SPECS_DIR" for name in os.environ):
        log.info("the rows are in the deployment's catalog (DATIVO_* variables), tables adventureworks_db.pg_*,"
                 " branch %s", BRANCH)
        return
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415 - only for the summary

    dativo = project / ".dativo"
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=str(dativo / "warehouse"))
    for identifier in sorted(".".join(t) for t in catalog.list_tables("adventureworks_db")):
        table = catalog.load_table(identifier)
        head = table.snapshot_by_name(BRANCH)
        rows = int(head.summary["total-records"]) if head is not None and head.summary else 0
        log.info("%-45s %5d rows on branch %s", identifier, rows, BRANCH)
    log.info("warehouse: %s", dativo / "warehouse")
    log.info("catalog:   %s (pyiceberg SqlCatalog 'dativo')", dativo / "catalog.db")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the project folder (asset_specs_db/, data/, .dativo/); default: this checkout")
    parser.add_argument("--keep-running", action="store_true", help="leave PostgreSQL running at the end")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("run-db: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    project = args.project.resolve()
    try:
        server = PrivatePostgres(project / ".dativo" / "run-db" / "postgres")
        began = time.monotonic()
        with running(server, keep=args.keep_running):
            log.info("PostgreSQL %s on %s:%s (%.1f s)", server.bindir.parent.name, HOST, server.port,
                     time.monotonic() - began)
            for name, rows in load_tables(server, project / "data" / "adventureworks").items():
                log.info("loaded %-25s %5d rows", name, rows)
            log.info("%s=%s", URL_ENV, server.url(DATABASE))
            status = materialize(project, server.url(DATABASE))
    except (DemoError, psycopg2.Error, pa.ArrowException, OSError) as exc:
        log.error("%s", exc)
        return 2
    if status == 0:
        report_rows(project)
    return status


if __name__ == "__main__":
    sys.exit(main())
