"""Benchmark workers that run in the project's virtualenv, one fresh process per run.

    python peers.py baseline --spec SPEC --csv FILE --out DIR
    python peers.py naive    --spec SPEC --csv FILE --out DIR

baseline: pyarrow's ``read_csv`` with the spec's column types + ``parquet.write_table`` (snappy), the floor
that an ingestion tool can get close to but not below.
naive: the per-row approach of the project's predecessor (pandas chunks of 10,000 rows as dicts, a Python
type check per value, ``Table.from_pylist`` per chunk into one Parquet file, then an Iceberg commit with
pyiceberg's SQLite catalog).

Each prints one JSON line last: ``{"seconds": ..., "rows": ..., "rejected": ..., "files": [[path, bytes], ...]}``,
``seconds`` being the work alone (imports and interpreter start are in the harness's wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from spec_types import BenchSpec, load_bench_spec

NAIVE_CHUNK_ROWS = 10_000
TRUE_WORDS = {"true", "t", "yes", "y", "on", "1"}
FALSE_WORDS = {"false", "f", "no", "n", "off", "0"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def run_baseline(spec: BenchSpec, csv: Path, out: Path) -> dict:
    """pyarrow read_csv (threads on, as by default) + write_table with snappy."""
    target = out / "baseline.parquet"
    start = time.perf_counter()
    table = pacsv.read_csv(
        csv,
        convert_options=pacsv.ConvertOptions(
            column_types=spec.column_types,
            null_values=list(spec.null_values),
            strings_can_be_null=True,
        ),
    )
    pq.write_table(table, target, compression="snappy")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": table.num_rows, "rejected": 0, "files": [[str(target), target.stat().st_size]]}


def _check_value(kind: str, value: str):  # noqa: PLR0911 - one branch per spec type
    """The predecessor's per-value conversion; raises ValueError for text that does not fit."""
    text = value.strip()
    if kind == "string":
        return value
    if kind in ("integer", "long"):
        number = int(text)
        if not INT64_MIN <= number <= INT64_MAX:
            raise ValueError("out of range")
        return number
    if kind in ("float", "double"):
        return float(text)
    if kind == "boolean":
        word = text.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if kind == "date":
        return date.fromisoformat(text)
    if kind == "timestamp":
        return datetime.fromisoformat(text)
    if kind == "timestamptz":
        parsed = datetime.fromisoformat(text)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise ValueError(f"unsupported type {kind}")


def run_naive(spec: BenchSpec, csv: Path, out: Path) -> dict:
    """pandas chunks -> dict records -> a Python check per value -> Parquet -> pyiceberg commit."""
    import pandas as pd  # noqa: PLC0415 - only this worker needs pandas and pyiceberg
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415

    schema = spec.arrow_schema
    columns = spec.columns
    target = out / "naive.parquet"
    rows = rejected = 0
    start = time.perf_counter()
    with pq.ParquetWriter(target, schema, compression="snappy") as writer:
        for chunk in pd.read_csv(
            csv,
            chunksize=NAIVE_CHUNK_ROWS,
            dtype=str,
            na_values=list(spec.null_values),
            keep_default_na=False,
        ):
            valid = []
            for record in chunk.to_dict("records"):
                row = {}
                ok = True
                for column in columns:
                    value = record.get(column.name)
                    if value is None or (isinstance(value, float) and math.isnan(value)):
                        if column.required:
                            ok = False
                        row[column.name] = None
                        continue
                    try:
                        row[column.name] = _check_value(column.kind, value)
                    except ValueError:
                        ok = False
                if ok:
                    valid.append(row)
                else:
                    rejected += 1
            rows += len(valid)
            writer.write_table(pa.Table.from_pylist(valid, schema=schema))
    catalog = SqlCatalog("naive", uri=f"sqlite:///{out / 'catalog.db'}", warehouse=(out / "warehouse").as_uri())
    catalog.create_namespace("bench")
    table = catalog.create_table("bench.naive", schema=schema)
    table.add_files([str(target)])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "rejected": rejected, "files": [[str(target), target.stat().st_size]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tool", choices=["baseline", "naive"])
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--csv", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = load_bench_spec(args.spec)
    result = (run_baseline if args.tool == "baseline" else run_naive)(spec, args.csv, args.out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
