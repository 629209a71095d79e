"""`make run-db`, the database demo, on a copy of the project: its private PostgreSQL is loaded with the AdventureWorks
files, the specs of asset_specs_db/ read every table into Iceberg, and the server is stopped at the end."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster_tests.test_getting_started import NO_INSTALL

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
DATA = ROOT / "data" / "adventureworks"
BRANCH = "demo_tenant"


def _install_file_rows(name: str) -> int:
    """Rows of an AdventureWorks data-warehouse install file (UTF-16, '|', no header), counted by pyarrow."""
    read = pacsv.ReadOptions(encoding="utf-16", autogenerate_column_names=True)
    return pacsv.read_csv(DATA / name, read_options=read, parse_options=pacsv.ParseOptions(delimiter="|")).num_rows


# table -> (source file, rows in it, Iceberg types of some fields)
EXPECTED = {
    "adventureworks_db.pg_person": (
        "person.person", pacsv.read_csv(DATA / "Person.csv").num_rows,
        {"BusinessEntityID": "long", "NameStyle": "boolean", "rowguid": "string", "ModifiedDate": "timestamp"},
    ),
    "adventureworks_db.pg_dim_currency": ("dw.dimcurrency", _install_file_rows("DimCurrency.csv"),
                                          {"CurrencyKey": "long", "CurrencyName": "string"}),
    "adventureworks_db.pg_dim_product_category": ("dw.dimproductcategory", _install_file_rows("DimProductCategory.csv"),
                                                  {"FrenchProductCategoryName": "string"}),
    "adventureworks_db.pg_dim_sales_reason": ("dw.dimsalesreason", _install_file_rows("DimSalesReason.csv"),
                                              {"SalesReasonKey": "long"}),
    "adventureworks_db.pg_fact_sales_quota": ("dw.factsalesquota", _install_file_rows("FactSalesQuota.csv"),
                                              {"SalesAmountQuota": "decimal(19, 4)", "Date": "date"}),
}


def _env() -> dict[str, str]:
    drop = ("DAGSTER_HOME", "MAKEFLAGS", "MAKELEVEL", "ADVENTUREWORKS_DB_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith("DATIVO_") and k not in drop}


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[Path, str]]:
    """A copy of the project on which `make run-db` ran (on this test's virtualenv): the folder and its output."""
    # not under pytest's private (0700) temporary folders: run as root, the server runs as `postgres`, which must
    # reach its folder under the project
    base = Path(tempfile.mkdtemp(prefix="dativo-run-db-"))
    base.chmod(0o755)
    root = base / "project"
    root.mkdir()
    for folder in ("asset_specs", "asset_specs_db", "data", "demo"):
        shutil.copytree(ROOT / folder, root / folder)
    for name in ("Makefile", "pyproject.toml", "dagster.yaml"):
        shutil.copy2(ROOT / name, root / name)
    (root / ".venv").symlink_to(VENV)
    try:
        run = subprocess.run(
            ["make", "--no-print-directory", "-C", str(root), "run-db", *NO_INSTALL],
            capture_output=True, text=True, timeout=600, env=_env(), check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        yield root, run.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_make_run_db_ingests_every_sample_table_with_its_types(demo: tuple[Path, str]) -> None:
    root, output = demo
    dativo = root / ".dativo"
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=str(dativo / "warehouse"))
    assert sorted(".".join(t) for t in catalog.list_tables("adventureworks_db")) == sorted(EXPECTED)
    port = re.search(r"ADVENTUREWORKS_DB_URL=postgresql://postgres@127\.0\.0\.1:(\d+)/adventureworks", output)
    assert port, output
    for identifier, (source, rows, types) in EXPECTED.items():
        table = catalog.load_table(identifier)
        head = table.snapshot_by_name(BRANCH)
        data = table.scan(snapshot_id=head.snapshot_id).to_arrow()
        assert data.num_rows == rows > 0, identifier
        # the database held the file's rows, and the demo says so
        assert re.search(rf"loaded {re.escape(source)}\s+{rows} rows", output), output
        assert re.search(rf"{re.escape(identifier)}\s+{rows} rows on branch {BRANCH}", output), output
        fields = {f.name: str(f.field_type) for f in table.schema().fields}
        for name, expected in types.items():
            assert fields[name] == expected, (identifier, name, fields[name])
        assert set(data.column("_source_file").to_pylist()) == {
            f"postgresql://127.0.0.1:{port.group(1)}/adventureworks/{source}"
        }
        assert table.scan().to_arrow().num_rows == 0  # main is untouched: the rows are on the tenant's branch


def test_make_run_db_values_read_back_as_the_files_hold_them(demo: tuple[Path, str]) -> None:
    root, _ = demo
    dativo = root / ".dativo"
    catalog = SqlCatalog("dativo", uri=f"sqlite:///{dativo / 'catalog.db'}", warehouse=str(dativo / "warehouse"))

    def rows(identifier: str) -> pa.Table:
        table = catalog.load_table(identifier)
        return table.scan(snapshot_id=table.snapshot_by_name(BRANCH).snapshot_id).to_arrow()

    quota = rows("adventureworks_db.pg_fact_sales_quota").sort_by("SalesQuotaKey")
    first = quota.slice(0, 1).to_pylist()[0]
    # FactSalesQuota.csv line 1: 1|272|20101229|2010|4|28000|2010-12-29 00:00:00
    assert (first["EmployeeKey"], first["SalesAmountQuota"], first["Date"]) == (272, Decimal("28000.0000"),
                                                                                date(2010, 12, 29))
    read = pacsv.ReadOptions(encoding="utf-16", autogenerate_column_names=True)
    source = pacsv.read_csv(DATA / "FactSalesQuota.csv", read_options=read,
                            parse_options=pacsv.ParseOptions(delimiter="|"))
    assert sum(quota.column("SalesAmountQuota").to_pylist()) == sum(Decimal(v) for v in source.column("f5").to_pylist())

    person = rows("adventureworks_db.pg_person").sort_by("BusinessEntityID").slice(0, 1).to_pylist()[0]
    # Person.csv line 2: 1,EM,0,Mr.,Ken,J.,Sánchez,,0,,,92C4279F-1207-48A3-8448-33563BA6D921,2009-01-07 00:00:00
    assert (person["LastName"], person["NameStyle"], person["Suffix"], person["ModifiedDate"]) == (
        "Sánchez", False, None, datetime(2009, 1, 7))
    assert person["rowguid"] == "92c4279f-1207-48a3-8448-33563ba6d921"  # PostgreSQL's uuid text
    french = rows("adventureworks_db.pg_dim_product_category").column("FrenchProductCategoryName").to_pylist()
    assert "Vélo" in french


def test_make_run_db_stops_its_server(demo: tuple[Path, str]) -> None:
    root, output = demo
    port = int(re.search(r"ADVENTUREWORKS_DB_URL=postgresql://\S+:(\d+)/", output).group(1))
    assert "PostgreSQL stopped" in output
    assert not (root / ".dativo" / "run-db" / "postgres").exists()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the demo's PostgreSQL still listens"
