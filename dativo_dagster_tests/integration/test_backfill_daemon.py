"""Backfills through Dagster's run queue: ``dagster dev`` (webserver, daemon, code server) on an instance made from
the shipped dagster.yaml, a backfill launched as the UI's asset page launches it (GraphQL
``launchPartitionBackfill``), the runs dequeued by the daemon and run by the default run launcher. Embedded default
deployment: local warehouse, SQLite catalog."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from dativo_dagster.partitions import PARTITION_KEY_PROPERTY
from dativo_dagster.table_state import RUN_ID_KEY
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.table_checks import data_files

from . import commit_gate_location
from .dagster_dev import DagsterDev, DagsterDevError

ROOT = Path(__file__).resolve().parents[2]
GATED_LOCATION = commit_gate_location.__name__
BRANCH = "acme"
BACKFILL_TAG = "dagster/backfill"
PARTITION_TAG = "dagster/partition"
# the daemon submits a backfill's runs one by one: 30 took 8.5 min (runs of 9.5 s) on 2 cores at a load average of 16
BACKFILL_TIMEOUT = 900.0
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}

LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
    ... on UnauthorizedError { message }
  }
}
"""
BACKFILL_STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } }
}
"""


def daily_spec(name: str) -> dict[str, Any]:
    """A daily-partitioned spec over ``data/<name>/<day>.csv``; the table partitioned by the event's day."""
    return base_spec(
        name,
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "event_date", "type": "date", "required": True},
            {"name": "name", "type": "string"},
        ],
        source={"type": "csv", "files": [{"path": f"data/{name}/{{partition}}.csv"}]},
        target={"partitioning": ["day(event_date)"]},
        partitions={"type": "daily", "start": "2024-01-01", "field": "event_date"},
    )


def days(count: int) -> list[str]:
    return [f"2024-01-{d:02d}" for d in range(1, count + 1)]


def write_days(project: Project, name: str, keys: Sequence[str], rows: int = 20, tag: str = "v1") -> Counter:
    """One file per day; returns the rows the table must hold for them."""
    expected: Counter = Counter()
    for index, day in enumerate(keys):
        ids = range(index * 1000, index * 1000 + rows)
        project.write_data(f"{name}/{day}.csv", "id,event_date,name\n" + "".join(f"{i},{day},{tag}-{i}\n" for i in ids))
        expected.update((i, day, f"{tag}-{i}") for i in ids)
    return expected


def table_rows(project: Project, identifier: str) -> Counter:
    return Counter((r["id"], r["event_date"].isoformat(), r["name"]) for r in branch_rows(project.table(identifier), BRANCH))


def dagster_home(tmp_path: Path, pool_limit: int | None = None) -> Path:
    """An instance made from the shipped dagster.yaml (what `make dev` copies), its per-table limit optionally set."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    if pool_limit is not None:
        config = yaml.safe_load((home / "dagster.yaml").read_text())
        config["concurrency"]["pools"]["default_limit"] = pool_limit
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def run_env(**extra: str) -> dict[str, str]:
    """The test's environment, with this checkout importable by the code server and the run workers."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def launch_backfill(dev: DagsterDev, asset: str, keys: Sequence[str]) -> str:
    """What the UI's asset page sends for a range of partitions of one asset (its target is the hidden asset job)."""
    params = {
        "assetSelection": [{"path": [asset]}],
        "partitionNames": list(keys),
        "fromFailure": False,
        "tags": [{"key": "dagster/from_ui", "value": "true"}],
    }
    result = dev.graphql(LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise DagsterDevError(f"launchPartitionBackfill failed: {result}")
    return result["backfillId"]


def wait_for_backfill(dev: DagsterDev, backfill_id: str, timeout: float) -> str:
    return dev.wait_for(
        f"backfill {backfill_id}",
        lambda: dev.graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"].get("status", "UNKNOWN"),
        DONE, timeout=timeout, interval=1,
    )


def launch_partition_run(dev: DagsterDev, asset: str, key: str) -> str:
    """What the UI's asset page sends to materialize one partition: the asset job, the partition as a tag."""
    return dev.launch_assets([asset], tags={PARTITION_TAG: key})


def backfill_runs(home: Path, backfill_id: str) -> list[dg.RunRecord]:
    """The backfill's runs as the run storage recorded them (status, start and end times)."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_run_records(dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})))


def started_intervals(records: Sequence[dg.RunRecord]) -> list[tuple[float, float]]:
    """Each run's STARTED..end (the run worker's own start and end)."""
    return [(r.start_time, r.end_time) for r in records]


def dequeued_intervals(home: Path, records: Sequence[dg.RunRecord]) -> list[tuple[float, float]]:
    """Each run's time in flight as the run queue counts it: from its dequeue (RUN_STARTING) to its end."""
    intervals = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for record in records:
            (starting,) = instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_STARTING)
            intervals.append((starting.timestamp, record.end_time))
    return intervals


def max_in_progress(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def held_for_pools(log: str) -> dict[str, set[str]]:
    """Run id -> the pools that the daemon's run queue held it back for (its log lines)."""
    held: dict[str, set[str]] = {}
    for run_id, info in re.findall(r"Run ([0-9a-f-]{36}) is blocked by global concurrency limits: (\{.*\})", log):
        held.setdefault(run_id, set()).update(json.loads(info))
    return held


def conflict_lines(home: Path, run_ids: Sequence[str]) -> list[str]:
    """Lines of the runs' captured stderr (compute logs) saying a commit conflicted and was planned again."""
    lines = []
    for run_id in run_ids:
        for path in (home / "storage" / run_id).rglob("*.err"):
            lines += [line for line in path.read_text(errors="replace").splitlines() if "conflicted (attempt" in line]
    return lines


def test_a_backfill_of_30_days_through_the_run_queue_commits_each_partition_once(tmp_path: Path) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(daily_spec("events"))
    keys = days(30)
    expected = write_days(project, "events", keys)
    home = dagster_home(tmp_path)
    gate = tmp_path / "commit_gate"
    gate.mkdir()
    env = run_env(**{commit_gate_location.GATE_DIR_VAR: str(gate), commit_gate_location.GATE_SIZE_VAR: "3"})

    with DagsterDev(home, project.specs_dir, env=env, module=GATED_LOCATION) as dev:
        # the table does not exist yet: the first runs create it at the same time
        backfill_id = launch_backfill(dev, "events", keys)
        assert wait_for_backfill(dev, backfill_id, timeout=BACKFILL_TIMEOUT) in {"COMPLETED", "COMPLETED_SUCCESS"}, dev.log_tail()
        records = backfill_runs(home, backfill_id)
        assert sorted(r.dagster_run.tags[PARTITION_TAG] for r in records) == keys
        assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
        # the daemon ran several at once: the shipped queue takes 4 runs, and 4 of one table
        assert 2 <= max_in_progress(started_intervals(records)) <= 4, started_intervals(records)

        # every partition's rows exactly once, each committed by its own run in one snapshot
        assert table_rows(project, "testdomain.events") == expected
        table = project.table("testdomain.events")
        head = table.snapshot_by_name(BRANCH)
        assert head is not None
        committed: dict[str, list[str]] = {}
        for snapshot in table.snapshots():
            summary = snapshot.summary
            if summary is not None and summary.get(PARTITION_KEY_PROPERTY):
                committed.setdefault(summary[RUN_ID_KEY], []).append(summary[PARTITION_KEY_PROPERTY])
        by_run = {r.dagster_run.run_id: r.dagster_run.tags[PARTITION_TAG] for r in records}
        assert committed == {run_id: [key] for run_id, key in by_run.items()}
        # the gate released three commits together: two of them lost the race, planned again and committed
        assert conflict_lines(home, list(by_run)), "three commits were released together: some must have conflicted"
        assert len(list(gate.iterdir())) == len(keys), "every run passed the commit gate once"

        # the UI's run of one partition with changed data replaces that window only
        day = "2024-01-15"
        others = {f for f in data_files(table, BRANCH) if f"event_date_day={day}" not in f}
        project.write_data(f"events/{day}.csv", "id,event_date,name\n7,2024-01-15,v2-7\n8,2024-01-15,v2-8\n")
        run_id = launch_partition_run(dev, "events", day)
        assert dev.wait_for_run(run_id, timeout=120) == "SUCCESS", dev.log_tail()

    replaced = Counter({row: n for row, n in expected.items() if row[1] != day})
    replaced.update([(7, day, "v2-7"), (8, day, "v2-8")])
    assert table_rows(project, "testdomain.events") == replaced
    table = project.table("testdomain.events")
    assert others <= set(data_files(table, BRANCH)), "the other partitions' data files stay, by path"
    head = table.snapshot_by_name(BRANCH)
    assert head is not None and head.summary is not None
    assert (head.summary.get(PARTITION_KEY_PROPERTY), head.summary.get(RUN_ID_KEY)) == (day, run_id)


@pytest.mark.parametrize("limit", [2])
def test_the_run_queue_holds_runs_of_one_table_to_its_limit_and_not_another_table(tmp_path: Path, limit: int) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(daily_spec("events"))
    project.write_spec(daily_spec("clicks"))
    expected_events = write_days(project, "events", days(8))
    expected_clicks = write_days(project, "clicks", days(4))
    home = dagster_home(tmp_path, pool_limit=limit)

    # each run holds its commit for 8 s: the daemon submits runs faster than they end, so the queue has to choose
    env = run_env(**{commit_gate_location.HOLD_SECONDS_VAR: "8"})
    with DagsterDev(home, project.specs_dir, env=env, module=GATED_LOCATION) as dev:
        events_backfill = launch_backfill(dev, "events", days(8))
        clicks_backfill = launch_backfill(dev, "clicks", days(4))
        for backfill_id in (events_backfill, clicks_backfill):
            assert wait_for_backfill(dev, backfill_id, timeout=BACKFILL_TIMEOUT) in {"COMPLETED", "COMPLETED_SUCCESS"}, dev.log_tail()
    log = dev.log_path.read_text(errors="replace")
    events = backfill_runs(home, events_backfill)
    clicks = backfill_runs(home, clicks_backfill)
    assert len(events) == 8 and len(clicks) == 4
    assert {r.dagster_run.status for r in [*events, *clicks]} == {dg.DagsterRunStatus.SUCCESS}
    events_in_flight = dequeued_intervals(home, events)
    clicks_in_flight = dequeued_intervals(home, clicks)
    # never more than `limit` runs of one table in flight (from dequeue to end), and the limit was reached
    assert max_in_progress(events_in_flight) == limit, events_in_flight
    assert max_in_progress(started_intervals(events)) <= limit
    # the queue held events runs back for their table's pool, and no clicks run for it: the other table went on
    held = held_for_pools(log)
    events_pool, clicks_pool = "dativo/table/testdomain.events", "dativo/table/testdomain.clicks"
    assert {events_pool} in [held.get(r.dagster_run.run_id) for r in events], "events never waited for its limit"
    assert all(held.get(r.dagster_run.run_id, set()) <= {clicks_pool} for r in clicks), held
    assert all(held.get(r.dagster_run.run_id, set()) <= {events_pool} for r in events), held
    assert max_in_progress([*events_in_flight, *clicks_in_flight]) > limit
    assert table_rows(project, "testdomain.events") == expected_events
    assert table_rows(project, "testdomain.clicks") == expected_clicks
