"""Load: many assets in one run, concurrent runs on one table, and commit time against a long history.

- 20 assets materialized in one run: every table holds each row of its file exactly once.
- 8 runs at once appending to one incremental table (8 processes, as Dagster runs are; one SQLite catalog):
  every run succeeds and the table holds each row of each file exactly once, whichever run read it.
- Commit time with 1,000 snapshots on the branch against 10 (the plain ``commit.commit_files`` API, tiny files;
  the long history is written straight into the table metadata so that the test takes seconds, not the hour
  that 1,000 real commits take). It is 30-50 times slower today: pyiceberg copies the whole table metadata
  about 15 times per transaction, so each commit costs time in proportion to the snapshots kept. The test is a
  strict xfail until snapshot expiry (with the committed source state compacted into the snapshots that remain)
  exists as a maintenance operation.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog.sql import SqlCatalog

from dativo_dagster.commit import commit_files, ensure_table
from dativo_dagster.incremental import table_source_state
from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.table_schema import Partitioner, arrow_schema, iceberg_schema, partition_spec
from dativo_dagster.write import WrittenFile
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

BRANCH = "acme"


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    out = []
    for event in result.get_step_failure_events():
        data = event.event_specific_data
        text = data.user_failure_data.description if data and data.user_failure_data else str(data)
        out.append(f"{event.step_key}: {text}")
    return out


def csv_rows(ids: range, tag: str) -> str:
    return "id,name\n" + "".join(f"{i},{tag}-{i}\n" for i in ids)


def table_rows(project: Project, identifier: str) -> Counter[tuple[Any, ...]]:
    return Counter((r["id"], r["name"], r["_source_file"]) for r in branch_rows(project.table(identifier), BRANCH))


def file_rows(path: Path) -> Counter[tuple[Any, ...]]:
    lines = path.read_text().splitlines()[1:]
    return Counter((int(i), name, str(path.resolve())) for i, name in (line.split(",") for line in lines))


def test_twenty_assets_in_one_run_each_hold_every_row_once(project: Project) -> None:
    files = {}
    for k in range(20):
        name = f"asset_{k:02d}"
        project.write_spec(base_spec(name, dataProduct=f"product_{k % 3}"), f"{name}.yaml")
        files[name] = project.write_data(f"{name}.csv", csv_rows(range(k * 1000, k * 1000 + 50 + k), name))
    started = time.monotonic()
    result = project.materialize()
    seconds = time.monotonic() - started
    assert result.success, failures(result)
    materialized = {e.materialization.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == set(files)
    for name, path in files.items():
        assert table_rows(project, f"testdomain.{name}") == file_rows(path), name
    assert seconds < 90, seconds  # measured: about 30 s on the 2-core CI machine


def _incremental(project: Project, **retry: Any) -> None:
    spec = base_spec(
        "events",
        source={"type": "csv", "files": [{"path": "data/events/*.csv"}],
                "incremental": {"strategy": "file_modified_time", "lookback_days": 0}},
    )
    if retry:
        spec["retry_config"] = retry
    project.write_spec(spec)


RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from dativo_dagster_tests.conftest import Project

    root, k, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    project = Project(root)
    (root / f"ready_{k}").touch()
    while not go.exists():
        time.sleep(0.01)
    project.write_data(f"events/run_{k}.csv", "id,name\\n" + "".join(f"{i},run{k}-{i}\\n" for i in range(k * 1000, k * 1000 + 100)))
    result = project.materialize()
    failures = [str(e.event_specific_data.user_failure_data.description) for e in result.get_step_failure_events()]
    retries = sum(1 for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY")
    print(json.dumps({"success": result.success, "failures": failures, "retries": retries}))
    """
)


def _run_concurrently(project: Project, count: int) -> tuple[list[dict[str, Any]], list[Path]]:
    """``count`` processes (as Dagster runs are), each writing its own new file and materializing the same spec,
    all let go at the same moment once Dagster is imported."""
    go = project.root / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(project.root), str(k), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(count)
    ]
    deadline = time.monotonic() + 120
    while not all((project.root / f"ready_{k}").exists() for k in range(count)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a run did not start"
        time.sleep(0.05)
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results, [project.data_dir / "events" / f"run_{k}.csv" for k in range(count)]


def test_eight_concurrent_runs_appending_to_one_table_load_every_row_once(project: Project) -> None:
    """No Dagster retries at all: commit conflicts are retried inside the commit step, on a fresh view."""
    _incremental(project)
    seed = project.write_data("events/seed.csv", csv_rows(range(-5, 0), "seed"))
    assert project.materialize().success
    results, paths = _run_concurrently(project, 8)
    assert [(r["success"], r["failures"], r["retries"]) for r in results] == [(True, [], 0)] * 8
    expected = sum((file_rows(p) for p in [seed, *paths]), Counter())
    assert table_rows(project, "testdomain.events") == expected
    assert max(table_rows(project, "testdomain.events").values()) == 1
    table = project.table("testdomain.events")
    assert set(table_source_state(table, BRANCH)) == {str(p.resolve()) for p in [seed, *paths]}
    assert project.materialize().success  # and a run after them finds nothing new
    assert project.table("testdomain.events").metadata_location == table.metadata_location


def test_eight_concurrent_first_runs_on_an_empty_catalog_recover_by_retrying(project: Project) -> None:
    """Runs that all find no catalog yet race to create its tables; when two get there together, pyiceberg's
    SQLite catalog fails one with "table iceberg_tables already exists" (seen with runs in threads; reported
    with issue 6). That error counts as transient and the spec's retry_config retries it, so every run succeeds
    and every row lands once."""
    _incremental(project, max_retries=3, retry_delay_seconds=0.2)
    results, paths = _run_concurrently(project, 8)
    assert [(r["success"], r["failures"]) for r in results] == [(True, [])] * 8
    expected = sum((file_rows(p) for p in paths), Counter())
    assert table_rows(project, "testdomain.events") == expected


# --- commit time against a long history ------------------------------------------------------------------------


class History:
    """A table on the plain commit API, whose branch can be given a long history cheaply."""

    def __init__(self, root: Path):
        (root / "warehouse").mkdir(parents=True)
        self.catalog = SqlCatalog("dativo", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=(root / "warehouse").as_uri())
        self.spec = AssetSpecModel.model_validate(base_spec(target={"partitioning": []}))
        self.location = str(root / "warehouse" / self.spec.table_path)
        ensure_table(self.catalog, self.spec.table_identifier, iceberg_schema(self.spec.fields),
                     lambda s: partition_spec(self.spec, s), self.location)
        self.identifier = ".".join(self.spec.table_identifier)

    def commit(self, i: int) -> float:
        """Commit one tiny file as run ``run-<i>``; returns the seconds ``commit_files`` took."""
        table = self.catalog.load_table(self.identifier)
        schema = arrow_schema(table.schema())
        path = f"{self.location}/data/{i}-{uuid.uuid4().hex}.parquet"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        source = f"/src/file_{i}.csv"
        pq.write_table(pa.table({"id": [i], "name": [f"n{i}"], "_ingested_at": [datetime(2025, 1, 1, tzinfo=timezone.utc)],
                                 "_source_file": [source], "_run_id": [f"run-{i}"]}, schema=schema), path)
        written = WrittenFile(uri=path, size_bytes=Path(path).stat().st_size, record_count=1, partition_path="",
                              partition_values=[])
        started = time.perf_counter()
        commit_files(table, branch=BRANCH, files=[written], partitioner=Partitioner(table.spec(), table.schema()),
                     run_id=f"run-{i}", properties={"dativo.source-state": json.dumps({source: "1"})})
        return time.perf_counter() - started

    def grow(self, snapshots: int) -> None:
        """Give the branch ``snapshots`` snapshots in all, written straight into a new metadata file: each a copy of
        the head (same manifest list) with its own run id and source state, like a run that loaded one file."""
        table = self.catalog.load_table(self.identifier)
        current = Path(table.metadata_location.removeprefix("file://"))
        metadata = json.loads(current.read_text())
        head = next(s for s in metadata["snapshots"] if s["snapshot-id"] == metadata["refs"][BRANCH]["snapshot-id"])
        parent, sequence, stamp = head["snapshot-id"], metadata["last-sequence-number"], head["timestamp-ms"]
        for i in range(len(metadata["snapshots"]), snapshots):
            sequence, stamp = sequence + 1, stamp + 1
            snapshot = copy.deepcopy(head)
            snapshot.update({"snapshot-id": 10**12 + i, "parent-snapshot-id": parent, "sequence-number": sequence,
                             "timestamp-ms": stamp})
            snapshot["summary"] = {**head["summary"], "dativo.run-id": f"history-{i}",
                                   "dativo.source-state": json.dumps({f"/src/history_{i}.csv": "1"})}
            metadata["snapshots"].append(snapshot)
            metadata["snapshot-log"].append({"snapshot-id": snapshot["snapshot-id"], "timestamp-ms": stamp})
            parent = snapshot["snapshot-id"]
        metadata.update({"last-sequence-number": sequence, "last-updated-ms": stamp})
        metadata["refs"][BRANCH]["snapshot-id"] = parent
        grown = current.parent / f"{len(metadata['snapshots']):05d}-{uuid.uuid4()}.metadata.json"
        grown.write_text(json.dumps(metadata))
        self.catalog.drop_table(self.identifier)
        self.catalog.register_table(self.identifier, str(grown))
        assert len(self.catalog.load_table(self.identifier).metadata.snapshots) == snapshots

    def median_commit_seconds(self, runs: int, first: int) -> float:
        return statistics.median(self.commit(first + k) for k in range(runs))


def test_a_grown_history_is_what_the_commit_step_reads(tmp_path: Path) -> None:
    """The synthetic history is real to the commit path: its source state counts, and commits still land once."""
    history = History(tmp_path)
    history.commit(0)
    history.grow(200)
    history.commit(1)
    table = history.catalog.load_table(history.identifier)
    state = table_source_state(table, BRANCH)
    assert len(state) == 200 and "/src/history_150.csv" in state and "/src/file_1.csv" in state
    history.commit(1)  # the same run again: recognised as committed, nothing added
    assert sorted(r["id"] for r in branch_rows(history.catalog.load_table(history.identifier), BRANCH)) == [0, 1]


@pytest.mark.xfail(
    strict=True,
    reason="commit time grows with the snapshots kept (measured: 10 snapshots 0.03-0.07 s, 1,000 snapshots 1.2-2.2 s"
    " per commit; real commits: 0.07 s at 10, 0.46 s at 200, 2.7 s at 400). Needs snapshot expiry as a maintenance"
    " operation, with the committed source state compacted so that expiring snapshots forgets no file.",
)
def test_commit_time_with_1000_snapshots_stays_near_that_with_10(tmp_path: Path) -> None:
    short = History(tmp_path / "short")
    short.commit(0)
    short.grow(10)
    long = History(tmp_path / "long")
    long.commit(0)
    long.grow(1000)
    at_10 = short.median_commit_seconds(3, first=1)
    at_1000 = long.median_commit_seconds(2, first=1)
    assert at_1000 < 3 * at_10, f"commit at 10 snapshots: {at_10:.3f} s, at 1,000: {at_1000:.3f} s"
