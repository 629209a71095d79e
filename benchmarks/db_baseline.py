"""The raw baseline of the database rows: the fastest Arrow read of a table, written with ``pyarrow.parquet.write_table``.

    python db_baseline.py --driver adbc|connectorx --url URL --table TABLE --out DIR

``adbc``: ADBC's PostgreSQL driver (``COPY ... TO STDOUT (FORMAT binary)`` decoded in C++), in the product venv;
``connectorx``: ConnectorX's Rust readers (PostgreSQL and MySQL), in the dlt database venv (benchmarks/run.py makes
both). One connection, no partitioning: the same single read the asset makes. Typed columns as the driver gives
them, no validation; the whole table is collected and written as one snappy Parquet file (write_table takes a
table). Prints one JSON line last: seconds of read + write, rows, files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def read_adbc(url: str, table: str) -> pa.Table:
    import adbc_driver_postgresql.dbapi as adbc  # noqa: PLC0415 - only the measured driver is imported

    conn = adbc.connect(url, autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT * FROM {table}")  # noqa: S608 - the benchmark's own table name
        return cur.fetch_record_batch().read_all()
    finally:
        conn.close()


def read_connectorx(url: str, table: str) -> pa.Table:
    import connectorx as cx  # noqa: PLC0415

    return cx.read_sql(url, f"SELECT * FROM {table}", return_type="arrow")  # noqa: S608


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver", choices=("adbc", "connectorx"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = (read_adbc if args.driver == "adbc" else read_connectorx)(args.url, args.table)
    path = args.out / "baseline.parquet"
    pq.write_table(data, path, compression="snappy")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rows": data.num_rows, "rejected": 0,
                      "files": [(str(path), path.stat().st_size)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
