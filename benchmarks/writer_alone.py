"""The partitioned writer alone on flights x10: stream and close timed apart, CPU seconds, sampled RSS.

    .venv/bin/python benchmarks/writer_alone.py flights10x_by_tailnum OUT_DIR [--threads N] [--profile-close]

Feeds ``pyarrow.csv`` typed batches of ``.data/flights10x.csv`` (with the system columns) to
``write.PartitionedParquetWriter`` as the pipeline does, without Dagster, validation or commit. ``--profile-close``
runs the close on one thread under cProfile and prints its top costs. PROFILE.md's writer-alone numbers come from it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import cProfile
import pstats
import resource
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import yaml

from dativo_dagster import write
from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import Partitioner, arrow_schema, iceberg_schema, partition_spec, repeated

BENCH = Path(__file__).resolve().parent
INGESTED_AT = datetime(2025, 1, 1, tzinfo=UTC)
RUN_ID = "run-00000001"


class _InlineExecutor:
    """Runs each submitted call at once, on the calling thread (so that cProfile sees the close's work)."""

    def __init__(self, *_: Any, **__: Any):
        pass

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *_: Any) -> bool:
        return False

    def submit(self, fn: Any, *args: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        future.set_result(fn(*args))
        return future


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="a spec of benchmarks/specs over flights10x.csv, e.g. flights10x_by_tailnum")
    parser.add_argument("out", help="an empty folder for the data files")
    parser.add_argument("--threads", type=int, default=write.CLOSE_THREADS, help="close threads")
    parser.add_argument("--profile-close", action="store_true", help="profile the close on one thread")
    args = parser.parse_args(argv)
    write.CLOSE_THREADS = args.threads
    spec = AssetSpecModel.model_validate(yaml.safe_load((BENCH / "specs" / f"{args.spec}.yaml").read_text()))
    schema = iceberg_schema(spec.fields)
    settings = write.run_writer_settings(spec, branch="bench", run_id=RUN_ID, ingested_at=INGESTED_AT, s3=S3Settings())
    writer = settings.writer(args.out, arrow_schema(schema), Partitioner(partition_spec(spec, schema), schema))
    names = [f.name for f in spec.fields]
    reader = pacsv.open_csv(
        BENCH / ".data" / "flights10x.csv",
        read_options=pacsv.ReadOptions(block_size=4 << 20),
        convert_options=pacsv.ConvertOptions(
            column_types={name: writer.schema.field(name).type for name in names}, include_columns=names
        ),
    )
    ingested_at = pa.scalar(INGESTED_AT, pa.timestamp("us", tz="UTC"))

    def batches() -> Iterator[pa.Table]:
        for batch in reader:
            n = batch.num_rows
            columns = [batch.column(name) for name in names]
            columns += [pa.repeat(ingested_at, n), repeated("/data/flights10x.csv", n), repeated(RUN_ID, n)]
            yield pa.Table.from_arrays(columns, schema=writer.file_schema)

    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with open("/proc/self/statm") as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * 4096 / 2**20)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0, c0 = time.perf_counter(), _cpu()
    for table in batches():
        writer.write(table)
    writer._route()  # noqa: SLF001 - the last batch is routed in the stream's time, not the close's
    t1, c1 = time.perf_counter(), _cpu()
    stream_peak, peak[0] = peak[0], 0.0
    profile = None
    if args.profile_close:
        write.ThreadPoolExecutor = _InlineExecutor  # type: ignore[misc,assignment]
        profile = cProfile.Profile()
        profile.enable()
    files = writer.close()
    if profile is not None:
        profile.disable()
    t2, c2 = time.perf_counter(), _cpu()
    done.set()
    sys.stdout.write(
        f"{args.spec}: {len(files):,} files, {sum(f.record_count for f in files):,} rows; stream {t1 - t0:.2f} s"
        f" ({c1 - c0:.2f} s CPU), close {t2 - t1:.2f} s ({c2 - c1:.2f} s CPU); spilled"
        f" {writer._spill.bytes_written / 2**20:.0f} MiB;"  # noqa: SLF001
        f" RSS peak while streaming {stream_peak:.0f} MiB,"
        f" while closing {peak[0]:.0f} MiB\n"
    )
    if profile is not None:
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
