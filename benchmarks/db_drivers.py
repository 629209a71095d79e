"""Measure PostgreSQL drivers for streaming a table into Arrow batches: seconds and peak RSS, one process each.

Usage: ``python benchmarks/db_drivers.py postgresql://user@host:port/db TABLE`` (the table exists already; the
numbers and the choice are in docs/sources/postgres.md). Each candidate reads the whole table as a stream of
Arrow record batches (never the whole table at once) and counts rows; the peak RSS is the child's ``ru_maxrss``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

BATCH_ROWS = 65_536


def _adbc(url: str, table: str, as_text: bool) -> int:
    import adbc_driver_postgresql.dbapi as adbc  # noqa: PLC0415 - only the measured candidate is imported

    conn = adbc.connect(url, autocommit=True)
    cur = conn.cursor()
    cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    query = f"SELECT * FROM {table}"
    if as_text:
        names = cur.adbc_execute_schema(query).names
        query = "SELECT " + ", ".join(f'"{n}"::text AS "{n}"' for n in names) + f" FROM {table}"
    cur.execute(query)
    rows = sum(batch.num_rows for batch in cur.fetch_record_batch())
    cur.execute("COMMIT")
    conn.close()
    return rows


def _psycopg_copy_csv(url: str, table: str) -> int:
    import io  # noqa: PLC0415

    import psycopg  # noqa: PLC0415
    import pyarrow.csv as pacsv  # noqa: PLC0415

    rows = 0
    with psycopg.connect(url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = conn.cursor()
        with cur.copy(f"COPY (SELECT * FROM {table}) TO STDOUT (FORMAT csv)") as copy:
            buf = bytearray()
            for chunk in copy:  # one row per CopyData message
                buf += chunk
                if len(buf) >= 8 << 20:
                    rows += pacsv.read_csv(io.BytesIO(buf), pacsv.ReadOptions(autogenerate_column_names=True)).num_rows
                    buf = bytearray()
            if buf:
                rows += pacsv.read_csv(io.BytesIO(buf), pacsv.ReadOptions(autogenerate_column_names=True)).num_rows
    return rows


def _psycopg_named(url: str, table: str) -> int:
    import psycopg  # noqa: PLC0415
    import pyarrow as pa  # noqa: PLC0415

    rows = 0
    with psycopg.connect(url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        with conn.cursor(name="stream") as cur:
            cur.itersize = BATCH_ROWS
            cur.execute(f"SELECT * FROM {table}")
            names = None
            while chunk := cur.fetchmany(BATCH_ROWS):
                names = names or [d.name for d in cur.description]
                rows += pa.RecordBatch.from_pydict(dict(zip(names, zip(*chunk), strict=True))).num_rows
    return rows


def _psycopg2_named(url: str, table: str) -> int:
    import psycopg2  # noqa: PLC0415
    import pyarrow as pa  # noqa: PLC0415

    rows = 0
    conn = psycopg2.connect(url)
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    with conn.cursor(name="stream") as cur:
        cur.itersize = BATCH_ROWS
        cur.execute(f"SELECT * FROM {table}")
        while chunk := cur.fetchmany(BATCH_ROWS):
            names = [d.name for d in cur.description]
            rows += pa.RecordBatch.from_pydict(dict(zip(names, zip(*chunk), strict=True))).num_rows
    conn.close()
    return rows


def _connectorx(url: str, table: str) -> int:
    import connectorx as cx  # noqa: PLC0415

    reader = cx.read_sql(url, f"SELECT * FROM {table}", return_type="arrow_stream", batch_size=BATCH_ROWS)
    return sum(batch.num_rows for batch in reader)


CANDIDATES = {
    "adbc-driver-postgresql (typed)": lambda u, t: _adbc(u, t, as_text=False),
    "adbc-driver-postgresql (text cast in the server)": lambda u, t: _adbc(u, t, as_text=True),
    "psycopg 3 COPY csv + pyarrow.csv": _psycopg_copy_csv,
    "psycopg 3 server-side cursor": _psycopg_named,
    "psycopg2 named cursor": _psycopg2_named,
    "connectorx arrow_stream": _connectorx,
}


def _child(name: str, url: str, table: str) -> None:
    started = time.perf_counter()
    try:
        rows = CANDIDATES[name](url, table)
        error = None
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot stream is reported, not fatal
        rows, error = 0, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump({"name": name, "rows": rows, "seconds": round(seconds, 2), "peak_mib": round(peak_mib), "error": error},
              sys.stdout)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    url, table = sys.argv[1], sys.argv[2]
    sys.stdout.write("| driver | rows | seconds | peak RSS MiB | note |\n|---|---|---|---|---|\n")
    for name in CANDIDATES:
        done = subprocess.run([sys.executable, __file__, "--child", name, url, table],  # noqa: S603
                              capture_output=True, text=True, check=False)
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            result = {"name": name, "rows": 0, "seconds": 0, "peak_mib": 0, "error": done.stderr[-300:]}
        sys.stdout.write(f"| {name} | {result['rows']:,} | {result['seconds']} | {result['peak_mib']} |"
                         f" {result['error'] or ''} |\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
