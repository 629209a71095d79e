"""Merge by primary key (issue 18), side by side in one invocation.

    python benchmarks/merge_bench.py [--rows 5000000] [--upsert-limit 900]

A table of the person data (``--rows`` rows of person5m.csv, key ``business_entity_id``; beyond 5M rows person5m.csv
repeated with shifted keys) is loaded three times, one project each; then a change file of 500K changed rows (keys
drawn at random over the whole table, other columns altered; at most 10 % of the table) and as many new keys (the
same change set for every table size, so that sizes compare) goes

- into the first table with ``write_mode: merge`` (this project),
- into the second with ``write_mode: append`` (the same rows, appended: the floor a merge is compared with),
- into the third with pyiceberg's ``Table.upsert`` on the branch (in its own process, killed after
  ``--upsert-limit`` seconds: then its time is reported as a lower bound).

Each timed run is a fresh process; seconds are the four steps (first step start to last step end, from the run's
events) and the whole command; peak RSS is the process tree's. The merge's result is checked: every key once,
rows = table + new keys, the changed rows' values. Prints a markdown section; ``--write`` merges it into
benchmarks/RESULTS.md under "## Merge by primary key".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402 - the benchmark's own helpers (process sampling, data generation)

HERE = Path(__file__).resolve().parent
WORK = bench.DATA / "merge"
KEY = "business_entity_id"
SECTION = "## Merge by primary key"

UPSERT = """
import sys, time
import pyarrow as pa, pyarrow.csv as pacsv, pyarrow.compute as pc
from pyiceberg.catalog.sql import SqlCatalog
catalog_uri, warehouse, changes = sys.argv[1:4]
table = SqlCatalog("dativo", uri=catalog_uri, warehouse=warehouse).load_table("bench.bench_person")
schema = table.schema().as_arrow()
data = pacsv.read_csv(changes)
n = data.num_rows
columns = {}
for field in schema:
    if field.name in data.column_names:
        columns[field.name] = data.column(field.name).cast(field.type)
    elif field.name == "_ingested_at":
        columns[field.name] = pa.repeat(pa.scalar(0, field.type), n)
    else:
        columns[field.name] = pa.repeat(pa.scalar("upsert", pa.string()), n).cast(field.type)
frame = pa.table(columns, schema=schema)
started = time.perf_counter()
result = table.upsert(frame, join_cols=["business_entity_id"], branch="bench")
print(f"UPSERT {time.perf_counter() - started:.2f} {result.rows_updated} {result.rows_inserted}", flush=True)
"""


TARGET_MB: float | None = None  # --target-mb: the table's parquet_target_size_mb (None: the spec's)


def spec(name: str, source: Path, mode: str) -> dict:
    """The person spec of benchmarks/specs/person5m.yaml, keyed, with ``mode``."""
    loaded = yaml.safe_load((HERE / "specs" / "person5m.yaml").read_text())
    loaded["name"] = name
    loaded["schema"][0]["primary_key"] = True
    loaded["source"]["files"] = [{"path": str(source)}]
    loaded["target"]["write_mode"] = mode
    if TARGET_MB is not None:
        loaded["target"]["parquet_target_size_mb"] = TARGET_MB
    return loaded


CHANGED_ROWS = 500_000  # the change set: 500K changed rows and 500K new keys, whatever the table's size


def replicated_source(base: Path, rows: int, out: Path) -> None:
    """``rows`` rows of person data: ``base`` (person5m.csv, keys 1..N) repeated with its keys shifted by N per copy,
    streamed a copy at a time through Arrow's CSV writer (make_data.py would take minutes for 50M rows)."""
    table = pacsv.read_csv(base)
    n = table.num_rows
    partial = out.with_name(out.name + ".partial")
    with pacsv.CSVWriter(partial, table.schema) as writer:
        for copy in range(-(-rows // n)):
            piece = table.slice(0, min(n, rows - copy * n))
            shifted = pc.add(piece.column(KEY), pa.scalar(copy * n, piece.column(KEY).type))
            writer.write_table(piece.set_column(0, KEY, shifted))
    partial.rename(out)


def source_rows(base: pa.Table, indices: np.ndarray) -> pa.Table:
    """Rows ``indices`` of the (possibly replicated, see :func:`replicated_source`) table made from ``base``."""
    n = base.num_rows
    picked = base.take(pa.array(indices % n))
    shift = pa.array((indices // n) * n, picked.column(KEY).type)
    return picked.set_column(0, KEY, pc.add(picked.column(KEY), shift))


def changes_file(base: Path, rows: int, out: Path, seed: int = 18, *, clustered: bool = False,
                 count: int = CHANGED_ROWS) -> tuple[int, int]:
    """``count`` existing keys (at most 10 % of ``rows``) with other values, and as many new keys (after the last);
    returns (changed, new).

    The changed keys are drawn at random over the whole table, or (``clustered``) are the rows of one narrow range
    in the middle of the table (the keys a day of updates to recent records would touch)."""
    table = pacsv.read_csv(base)
    rng = np.random.default_rng(seed)
    count = min(count, rows // 10)
    if clustered:
        picked = np.arange(rows // 2, rows // 2 + count)
    else:
        picked = np.sort(rng.choice(rows, size=count, replace=False))
    changed = source_rows(table, picked)
    changed = changed.set_column(
        changed.schema.get_field_index("last_name"), "last_name", pc.binary_join_element_wise(
            changed.column("last_name"), pa.scalar("changed"), "-"))
    new = table.slice(0, count)
    new = new.set_column(0, KEY, pc.add(new.column(KEY), pa.scalar(rows, pa.int64())))
    pacsv.write_csv(pa.concat_tables([changed, new]), out)
    return count, count


def run_cli(project: Path, name: str, log: Path) -> dict:
    """One ``dativo-dagster materialize`` in a fresh process: wall, four steps, peak RSS."""
    steps_file = log / "steps.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATIVO_") and k != "DAGSTER_HOME"}
    env["BENCH_STEP_TIMES"] = str(steps_file)
    cmd = [sys.executable, str(HERE / "dativo_cli.py"), "materialize", "--specs", str(project / "asset_specs"),
           "--select", name]
    sampled = bench.run_process(cmd, env=env, cwd=project, log_dir=log)
    if sampled.returncode != 0:
        raise SystemExit(f"{name}: exit {sampled.returncode}\n{bench.tail(log / 'stdout.txt')}\n{bench.tail(log / 'stderr.txt')}")
    spans = json.loads(steps_file.read_text())["steps"].values()
    steps = max(end for _, end in spans) - min(start for start, _ in spans)
    return {"wall": sampled.wall, "steps": steps, "rss": sampled.maxrss_mib, "others": sampled.foreign_cores}


def load(project: Path, name: str, source: Path, mode: str) -> dict:
    shutil.rmtree(project, ignore_errors=True)
    (project / "asset_specs").mkdir(parents=True)
    (project / "asset_specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec(name, source, mode), sort_keys=False))
    return run_cli(project, name, project / "log-load")


def switch_source(project: Path, name: str, source: Path, mode: str) -> None:
    (project / "asset_specs" / f"{name}.yaml").write_text(yaml.safe_dump(spec(name, source, mode), sort_keys=False))


def check_merge(project: Path, rows: int, changed: int, new: int) -> str:
    from pyiceberg.catalog.sql import SqlCatalog  # noqa: PLC0415

    catalog = SqlCatalog("dativo", uri=f"sqlite:///{project / '.dativo' / 'catalog.db'}",
                         warehouse=(project / ".dativo" / "warehouse").as_uri())
    table = catalog.load_table("bench.bench_person")
    head = table.snapshot_by_name("bench")
    data = table.scan(snapshot_id=head.snapshot_id, selected_fields=(KEY, "last_name")).to_arrow()
    distinct = pc.count_distinct(data.column(KEY)).as_py()
    marked = pc.sum(pc.ends_with(data.column("last_name"), "-changed")).as_py()
    assert data.num_rows == rows + new == distinct, (data.num_rows, distinct)
    assert marked == changed, marked
    files = len(list(table.scan(snapshot_id=head.snapshot_id).plan_files()))
    return f"{data.num_rows:,} rows, every key once, {marked:,} changed rows read back; {files} data files"


def upsert(project: Path, changes: Path, limit: float) -> tuple[float, bool, float]:
    """pyiceberg's Table.upsert in its own process, stopped after ``limit`` s; (seconds, finished, peak RSS MiB)."""
    cmd = [sys.executable, "-c", UPSERT, f"sqlite:///{project / '.dativo' / 'catalog.db'}",
           (project / ".dativo" / "warehouse").as_uri(), str(changes)]
    bench.RUN_TIMEOUT_S = limit
    log = project / "log-upsert"
    sampled = bench.run_process(cmd, env=dict(os.environ), cwd=project, log_dir=log)
    line = next((x for x in (log / "stdout.txt").read_text().splitlines() if x.startswith("UPSERT ")), None)
    if line is None:
        if sampled.wall >= limit:
            return sampled.wall, False, sampled.maxrss_mib
        raise SystemExit(f"upsert failed: {bench.tail(log / 'stderr.txt')}")
    return float(line.split()[1]), True, sampled.maxrss_mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows of person5m.csv in the table")
    parser.add_argument("--upsert-limit", type=float, default=900.0, help="seconds before Table.upsert is stopped")
    parser.add_argument("--make-data", default=str(bench.DEFAULT_MAKE_DATA), help="path of shared/bench/make_data.py")
    parser.add_argument("--write", action="store_true", help="merge the section into benchmarks/RESULTS.md")
    parser.add_argument("--keys", choices=("random", "clustered"), default="random",
                        help="changed keys at random over the table, or one narrow range of it")
    parser.add_argument("--target-mb", type=float, help="the table's parquet_target_size_mb (default: the spec's)")
    parser.add_argument("--no-upsert", action="store_true", help="leave out pyiceberg's Table.upsert")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the files only (own process)
    args = parser.parse_args(argv)
    global TARGET_MB  # noqa: PLW0603 - one invocation, one setting
    TARGET_MB = args.target_mb
    base = bench.datasets()["person5m"].path
    source = base
    if args.rows < 5_000_000:
        source = WORK / f"person_{args.rows}.csv"
    elif args.rows > 5_000_000:
        source = WORK / f"person_{args.rows}_replicated.csv"
    changes = WORK / f"changes_{args.rows}_{args.keys}.csv"
    if args.prepare:
        if not source.exists() and args.rows < 5_000_000:
            pacsv.write_csv(pacsv.read_csv(base).slice(0, args.rows), source)
        elif not source.exists():
            replicated_source(base, args.rows, source)
        changes_file(base, args.rows, changes, clustered=args.keys == "clustered")
        return 0
    bench.ensure_data([bench.datasets()["person5m"]], Path(args.make_data))
    WORK.mkdir(parents=True, exist_ok=True)
    # the files are made in a process of their own: a child forked from a process holding the whole table would
    # report that process's memory as its own peak RSS
    subprocess.run([sys.executable, __file__, "--prepare", "--rows", str(args.rows), "--keys", args.keys],  # noqa: S603
                   check=True)
    changed = new = min(CHANGED_ROWS, args.rows // 10)
    began = time.time()
    results = {}
    tools = (("merge", "merge"), ("append", "append"), *(() if args.no_upsert else (("upsert", "append"),)))
    for tool, mode in tools:
        project = WORK / tool
        loaded = load(project, "bench_person", source, mode)
        print(f"{tool}: loaded {args.rows:,} rows in {loaded['wall']:.1f} s", flush=True)
        if tool == "upsert":
            results[tool] = upsert(project, changes, args.upsert_limit)
            continue
        switch_source(project, "bench_person", changes, mode)
        results[tool] = run_cli(project, "bench_person", project / "log-change")
        print(f"{tool}: {results[tool]}", flush=True)
    verdict = check_merge(WORK / "merge", args.rows, changed, new)
    merge, append = results["merge"], results["append"]
    up_seconds, up_done, up_rss = results.get("upsert", (float("nan"), True, float("nan")))
    up_text = f"{up_seconds:.1f}" if up_done else f"> {up_seconds:.0f} (stopped)"
    options = (f" --keys {args.keys}" if args.keys != "random" else "") + (
        f" --target-mb {args.target_mb:g}" if args.target_mb is not None else "") + (
        " --no-upsert" if args.no_upsert else "")
    lines = [
        SECTION,
        "",
        f"- **date**: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; **machine**: {platform.machine()},"
        f" {os.cpu_count()} cores; took {(time.time() - began) / 60:.1f} min",
        f"- **command**: `python benchmarks/merge_bench.py --rows {args.rows} --upsert-limit {args.upsert_limit:.0f}"
        f"{options}`",
        f"- a {args.rows:,}-row person table (key `business_entity_id`, unpartitioned,"
        f" {args.target_mb or 128:g} MiB files), then {changed:,} changed rows (keys"
        f" {'at random over the whole table' if args.keys == 'random' else 'in one narrow range'}) + {new:,} new keys"
        " in one CSV",
        f"- merge result: {verdict}",
        "",
        "| run of the change file | four steps s | whole command s | peak RSS MiB | others' cores |",
        "|---|---:|---:|---:|---:|",
        f"| **merge** (`write_mode: merge`) | {merge['steps']:.1f} | {merge['wall']:.1f} | {merge['rss']:.0f} |"
        f" {merge['others']:.2f} |",
        f"| append the same rows (`write_mode: append`) | {append['steps']:.1f} | {append['wall']:.1f} |"
        f" {append['rss']:.0f} | {append['others']:.2f} |",
        *([] if args.no_upsert else [
            f"| pyiceberg `Table.upsert` on a copy (the call alone; RSS: its process) | {up_text} | | {up_rss:.0f} | |"]),
        "",
        f"Merge / append (four steps): **{merge['steps'] / append['steps']:.2f}x** (target <= 3x)."
        + ("" if args.no_upsert else f" Upsert / merge: **{'>= ' if not up_done else ''}"
           f"{up_seconds / merge['steps']:.1f}x** (target >= 10x).")
        + f" Merge peak RSS: **{merge['rss']:.0f} MiB** (target <= 600).",
        "",
        "Keys drawn at random over the whole table put a changed key in every data file, so the merge rewrites every"
        " file (copy-on-write: the surviving rows are read and written again through the project's writer); that"
        " rewrite, not the matching, is most of the difference to the append. It grows with the rows of the files the"
        " change touches: linearly with the table for scattered keys (5M vs 50M rows: RESULTS.md, growth table),"
        " with the touched files only for clustered keys or a key-bucketed partitioning (docs/merge.md).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        results_md = HERE / "RESULTS.md"
        current = results_md.read_text()
        if SECTION in current:
            before, _, after = current.partition(SECTION)
            rest = after.split("\n## ", 1)
            current = before + text + ("\n## " + rest[1] if len(rest) > 1 else "")
        else:
            current = current.rstrip("\n") + "\n\n" + text
        results_md.write_text(current)
    return 0


if __name__ == "__main__":
    sys.exit(main())
