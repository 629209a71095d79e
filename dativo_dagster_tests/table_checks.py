"""Helpers for exactly-once tests: the rows a table must hold, and the rows it holds, read by two readers."""

from __future__ import annotations

import ast
import contextlib
import csv
import gc
import hashlib
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

from dativo_dagster import maintenance
from dativo_dagster.definitions import build_definitions
from dativo_dagster.jobs import MAINTENANCE_JOB
from dativo_dagster.maintenance import MIN_AGE_HOURS
from dativo_dagster.markers import committed_files, committed_files_sql
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import branch_rows, duckdb_branch_rows

# (id, name, _source_file): what the incremental test specs load from each CSV row
Row = tuple[int, str, str]
SPEC_COLUMNS = ("id", "name", "_source_file")


def incremental_spec(name: str = "events", **overrides: Any) -> dict[str, Any]:
    """A spec reading every ``data/<name>/*.csv`` incrementally into ``testdomain.<name>`` on branch ``acme``."""
    from dativo_dagster_tests.conftest import base_spec  # noqa: PLC0415

    spec = base_spec(name, source={"type": "csv", "files": [{"path": f"data/{name}/*.csv"}],
                                   "incremental": {"strategy": "file_modified_time", "lookback_days": 0}})
    spec.update(overrides)
    return spec


def csv_text(ids: Iterable[int], tag: str = "v1") -> str:
    """A CSV with a header and one row per id; ``tag`` goes into the name column so versions differ."""
    return "id,name\n" + "".join(f"{i},{tag}-{i}\n" for i in ids)


def touch(path: Path, seconds_from_now: float) -> None:
    """Give ``path`` a modification time relative to now (a rewrite within one mtime tick must still look changed)."""
    when = time.time() + seconds_from_now
    os.utime(path, (when, when))


def expected_rows(files: Sequence[Path]) -> Counter[Row]:
    """Every row of every file, as the table must hold it: each file exactly once, in its current content."""
    rows: Counter[Row] = Counter()
    for path in files:
        with path.open(newline="") as stream:
            for record in csv.DictReader(stream):
                rows[(int(record["id"]), record["name"], os.path.abspath(path))] += 1
    return rows


def as_rows(records: Iterable[dict[str, Any]]) -> Counter[Row]:
    return Counter((r["id"], r["name"], r["_source_file"]) for r in records)


def content_hash(rows: Counter[Row]) -> str:
    """A hash over the multiset of rows (order-free, duplicates counted)."""
    digest = hashlib.sha256()
    for row, count in sorted(rows.items()):
        digest.update(repr((row, count)).encode())
    return digest.hexdigest()


def iceberg_rows(table: Table, branch: str) -> Counter[Row]:
    """The branch head's rows read by pyiceberg."""
    return as_rows(branch_rows(table, branch))


def duckdb_rows(con: Any, table: Table, branch: str) -> Counter[Row]:
    """The branch head's rows read by DuckDB's own Iceberg reader."""
    names = [f.name for f in table.schema().fields]
    at = [names.index(c) for c in SPEC_COLUMNS]
    return Counter(tuple(row[i] for i in at) for row in duckdb_branch_rows(con, table, branch))  # type: ignore[misc]


def marker_rows(location: str) -> Counter[Row]:
    """The rows of the data files that the commit markers make visible (``catalog: none``), read by pyarrow."""
    rows: Counter[Row] = Counter()
    for uri in committed_files(location, S3Settings()):
        rows += as_rows(pq.read_table(uri, columns=list(SPEC_COLUMNS)).to_pylist())
    return rows


def duckdb_marker_rows(con: Any, location: str) -> Counter[Row]:
    """The rows of the data files that the documented DuckDB query over the commit markers lists
    (``markers.committed_files_sql``, docs/deployment.md), read by DuckDB itself."""
    query = committed_files_sql(location)
    con.execute(f"SET VARIABLE files = (SELECT list(uri) FROM ({query}))")  # noqa: S608 - our own query
    columns = ", ".join(SPEC_COLUMNS)
    return Counter(con.execute(f"SELECT {columns} FROM read_parquet(getvariable('files'))").fetchall())  # noqa: S608


def branch_snapshot_ids(table: Table, branch: str) -> list[int]:
    head = table.snapshot_by_name(branch)
    return [s.snapshot_id for s in ancestors_of(head, table.metadata)] if head is not None else []


def materialization(result: dg.ExecuteInProcessResult, name: str) -> dict[str, Any]:
    """Metadata values of the one materialization of asset ``name`` in ``result``."""
    mats = [
        e.materialization for e in result.get_asset_materialization_events()
        if e.materialization.asset_key == dg.AssetKey(name)
    ]
    assert len(mats) == 1, mats
    return {k: v.value for k, v in mats[0].metadata.items()}


def parquet_files(location: str) -> set[str]:
    """Every Parquet file under a table's ``data/`` folder, committed or not."""
    return {str(p) for p in Path(location, "data").rglob("*.parquet")}


def referenced_files(table: Table) -> set[str]:
    """Data files that any snapshot of the table references (file:// stripped)."""
    files = table.inspect.all_files()
    return {p.removeprefix("file://") for p in files.column("file_path").to_pylist()} if files.num_rows else set()


# the commit loop's own line for a lost race (commit.commit_files), whichever catalog it runs against
CONFLICT_LINE = re.compile(r"commit to \S+ conflicted \(attempt (\d+) of (\d+)\)")


class CommitConflicts(logging.Handler):
    """The commit loop's "conflicted (attempt N of M)" lines logged while it is attached, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        message = record.getMessage()
        if CONFLICT_LINE.search(message):
            self.lines.append(message)


@contextlib.contextmanager
def commit_conflicts() -> Iterator[CommitConflicts]:
    """Collect the commit loop's conflict lines (``dativo_dagster.commit``'s logger) while the block runs."""
    logger = logging.getLogger("dativo_dagster.commit")
    handler = CommitConflicts()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def commits_released_together(runs: int) -> Iterator[None]:
    """Hold every run's first commit (catalog commit, or commit marker with ``catalog: none``) at a barrier until
    all ``runs`` runs are there, then let them go at once: each has planned on the same view of the table, so the
    commits really overlap. Without it, runs whose reading took different times may well commit one after the
    other and prove nothing about conflicts."""
    import dativo_dagster.assets as assets_module  # noqa: PLC0415

    barrier = threading.Barrier(runs)
    held = threading.local()
    originals = {name: getattr(assets_module, name) for name in ("commit_files", "write_commit_marker")}

    def held_back(original: Any) -> Any:
        def commit(*args: Any, **kwargs: Any) -> Any:
            if not getattr(held, "done", False):
                held.done = True
                barrier.wait(timeout=120)
            return original(*args, **kwargs)

        return commit

    for name, original in originals.items():
        setattr(assets_module, name, held_back(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(assets_module, name, original)


def materialize_concurrently(
    project: Any, runs: int, *, commit_together: bool = False, partition_keys: Sequence[str] | None = None
) -> list[dg.ExecuteInProcessResult]:
    """``runs`` materializations of the project's assets at the same time, one thread each, each with its own
    instance and catalog client (as separate run workers would have), released together by a barrier; with
    ``commit_together`` their commits are released together too (:func:`commits_released_together`). With
    ``partition_keys`` (one per run) run ``i`` materializes partition ``partition_keys[i]`` (a backfill)."""
    barrier = threading.Barrier(runs)
    # Dagster composes graph-backed assets on a process-wide stack: build each run's definitions one
    # after the other (run workers are processes in a deployment), then start the runs together
    all_defs = [build_definitions(project.specs_dir) for _ in range(runs)]

    def one(index: int) -> dg.ExecuteInProcessResult:
        defs = all_defs[index]
        barrier.wait(timeout=60)
        return dg.materialize(
            list(defs.assets or []),
            resources=defs.resources,
            raise_on_error=False,
            instance=dg.DagsterInstance.ephemeral(),
            partition_key=partition_keys[index] if partition_keys is not None else None,
        )

    together = commits_released_together(runs) if commit_together else contextlib.nullcontext()
    with _serial_ast_parse(), together, ThreadPoolExecutor(max_workers=runs) as pool:
        results = list(pool.map(one, range(runs)))
        # the runs' SQLite connections die with their threads; SQLAlchemy's finalizers log an error with a
        # traceback for each. Let them run now, not inside some later ast.parse (see _serial_ast_parse)
        gc.collect()
    return results


@contextlib.contextmanager
def _serial_ast_parse() -> Iterator[None]:
    """CPython 3.11 keeps the AST converter's recursion depth per interpreter, not per thread. Formatting a
    traceback parses source lines (for its carets); when that happens in another thread, or in a finalizer
    that the garbage collector runs in the middle of a parse, the depth no longer matches and that parse
    fails with "AST constructor recursion depth mismatch" (pytest's import hooks parse too). Run workers
    are processes in a deployment; the threads standing in for them here parse one at a time."""
    original = ast.parse
    lock = threading.RLock()

    def parse(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return original(*args, **kwargs)

    ast.parse = parse  # type: ignore[assignment]
    try:
        yield
    finally:
        ast.parse = original


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """The step failures of a run, with their descriptions, for assertion messages."""
    out = []
    for event in result.get_step_failure_events():
        data = event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        error = getattr(data, "error", None)
        out.append(f"{event.step_key}: {user.description if user else error.to_string() if error else ''}")
    return out


FILE_NAME = re.compile(r"\d{8}T\d{6}-[0-9a-f-]{1,8}-[0-9a-f]{32}-\d{5}\.parquet")
GOVERNANCE_KEYS = {
    "asset-name", "asset-version", "domain", "data-product", "tenant-id", "branch", "owner", "retention-days",
    "classification", "ingest-timestamp", "run-id", "partition", "record-count",
}


def data_files(table: Table, branch: str) -> list[str]:
    """URIs of the data files at the head of ``branch``."""
    head = table.snapshot_by_name(branch)
    assert head is not None
    return sorted(task.file.file_path for task in table.scan(snapshot_id=head.snapshot_id).plan_files())


def assert_written_by_project(table: Table, uri: str, *, run_id: str | None = None) -> dict[str, str]:
    """``uri`` was written by the project's writer (CONTRACT 4): its name, its folder under the table location, and
    the governance keys in its Parquet footer (with its own record count and partition). Returns those keys."""
    assert FILE_NAME.fullmatch(uri.rsplit("/", 1)[-1]), uri
    with table.io.new_input(uri).open() as stream:
        parquet = pq.ParquetFile(stream)
        footer = {k.decode(): v.decode() for k, v in (parquet.metadata.metadata or {}).items()}
        rows = parquet.metadata.num_rows
    keys = {k.removeprefix("dativo."): v for k, v in footer.items() if k.startswith("dativo.")}
    assert set(keys) >= GOVERNANCE_KEYS, (uri, sorted(keys))
    assert keys["record-count"] == str(rows)
    folder = uri.removeprefix(f"{table.location().rstrip('/')}/data/").rsplit("/", 1)
    assert (folder[0] if len(folder) == 2 else "") == keys["partition"], uri
    if run_id is not None:
        assert uri.rsplit("/", 1)[-1].split("-")[1] == run_id[:8] and keys["run-id"] == run_id
    return keys


def run_maintenance(project: Any, monkeypatch: Any) -> dg.ExecuteInProcessResult:
    """The maintenance job a day later (its default age limit): whatever the killed run left is old enough."""
    now = time.time()
    monkeypatch.setattr(maintenance, "wall_clock", lambda: now + (MIN_AGE_HOURS + 1) * 3600)
    defs = build_definitions(project.specs_dir)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def(MAINTENANCE_JOB).execute_in_process(instance=instance)
    assert result.success
    return result
