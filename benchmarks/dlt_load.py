"""The dlt peer: load one CSV into an Iceberg table with dlt's filesystem destination (one fresh process per run).

    benchmarks/.venv-dlt/bin/python dlt_load.py --spec SPEC --csv FILE --out DIR

Runs in its own virtualenv (``benchmarks/.venv-dlt``, made by run.py with pinned versions), since dlt's
dependencies must not move the project's. The resource yields Arrow tables read by pyarrow's streaming CSV
reader with the spec's column types, which is dlt's fastest documented path (no per-row Python objects):
the comparison measures dlt's extract -> normalize -> load into Iceberg, not a slower reader.
Prints one JSON line last, like peers.py: seconds of ``pipeline.run`` and the rows in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.csv as pacsv
from spec_types import BenchSpec, load_bench_spec

TABLE = "bench_table"


def csv_tables(spec: BenchSpec, csv: Path):
    """Typed Arrow batches of the CSV, streamed."""
    reader = pacsv.open_csv(
        csv,
        convert_options=pacsv.ConvertOptions(
            column_types=spec.column_types,
            null_values=list(spec.null_values),
            strings_can_be_null=True,
        ),
    )
    yield from reader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    import dlt  # noqa: PLC0415 - after the environment that configures it

    spec = load_bench_spec(args.spec)
    resource = dlt.resource(csv_tables(spec, args.csv), name=TABLE, write_disposition="append")
    pipeline = dlt.pipeline(
        pipeline_name="bench",
        pipelines_dir=str(out / "pipelines"),
        destination=dlt.destinations.filesystem(bucket_url=(out / "bucket").as_uri()),
        dataset_name="bench",
    )
    start = time.perf_counter()
    pipeline.run(resource, table_format="iceberg", loader_file_format="parquet")
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
