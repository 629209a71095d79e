"""The dlt peer for databases: dlt's ``sql_database`` source (``sql_table``, pyarrow backend) into an Iceberg table.

    benchmarks/.venv-dlt-db/bin/python dlt_sql_load.py --url SQLALCHEMY_URL --table TABLE --out DIR

Runs in its own virtualenv (``benchmarks/.venv-dlt-db``, made by run.py with pinned versions: dlt with its
``sql_database`` extra, SQLAlchemy's psycopg2 and PyMySQL drivers), like dlt_load.py for CSV. The pyarrow backend
is dlt's fastest documented path for SQL sources (rows fetched in chunks and turned into Arrow tables, no per-row
normalisation); ``chunk_size`` stays dlt's default; MySQL's DOUBLE is read as a float (see
``doubles_as_floats``). Prints one JSON line last: seconds of ``pipeline.run`` and the
rows in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TABLE = "bench_table"


def doubles_as_floats(table):  # noqa: ANN001, ANN201 - a SQLAlchemy Table
    """MySQL's DOUBLE reflects as a float that SQLAlchemy returns as Decimal (``asdecimal=True``), whose precision
    then differs from chunk to chunk and fails dlt's schema merge: read such columns as the floats they are, as the
    other tools do (``table_adapter_callback`` changes the reflected table that the query is built from)."""
    import sqlalchemy as sa  # noqa: PLC0415

    for column in table.columns:
        if isinstance(column.type, sa.Float) and getattr(column.type, "asdecimal", False):
            column.type = sa.Double()
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    import dlt  # noqa: PLC0415 - after the environment that configures it
    from dlt.sources.sql_database import sql_table  # noqa: PLC0415

    resource = sql_table(credentials=args.url, table=args.table, backend="pyarrow",
                         table_adapter_callback=doubles_as_floats).with_name(TABLE)
    pipeline = dlt.pipeline(
        pipeline_name="bench_db",
        pipelines_dir=str(out / "pipelines"),
        destination=dlt.destinations.filesystem(bucket_url=(out / "bucket").as_uri()),
        dataset_name="bench",
    )
    start = time.perf_counter()
    pipeline.run(resource, table_format="iceberg", loader_file_format="parquet", write_disposition="append")
    seconds = time.perf_counter() - start
    with pipeline.destination_client() as client:
        table = client.load_open_table("iceberg", TABLE)
        snapshot = table.current_snapshot()
        rows = int(snapshot.summary["total-records"]) if snapshot is not None else 0
    data = out / "bucket" / "bench" / TABLE / "data"
    files = sorted((str(p), p.stat().st_size) for p in data.rglob("*.parquet"))
    print(json.dumps({"seconds": seconds, "rows": rows, "rejected": 0, "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
