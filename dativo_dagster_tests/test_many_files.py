"""A run over thousands of small source files (issue 19): every row once with its file, and a fast nothing-new run."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import dagster as dg

from dativo_dagster.pipeline import LOGGED_FILES
from dativo_dagster.table_state import SOURCE_STATE_KEY, STATE_FILE_KEY, read_branch_state
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.table_checks import branch_snapshot_ids, incremental_spec, materialization

BRANCH = "acme"
TABLE = "testdomain.events"
FILES = 2_000
ROWS_PER_FILE = 5


def write_files(project: Project) -> dict[str, set[int]]:
    """FILES small CSV files; returns each file's absolute path with the ids it holds."""
    expected: dict[str, set[int]] = {}
    for index in range(FILES):
        ids = range(index * ROWS_PER_FILE, (index + 1) * ROWS_PER_FILE)
        path = project.write_data(
            f"events/part-{index:05d}.csv", "id,name\n" + "".join(f"{i},n{i}\n" for i in ids)
        )
        expected[str(path.resolve())] = set(ids)
    return expected


def run(project: Project) -> dg.ExecuteInProcessResult:
    result = project.materialize()
    assert result.success, [e.message for e in result.get_step_failure_events()]
    return result


def test_thousands_of_small_files_load_every_row_once_with_its_file_and_the_rerun_adds_nothing(project):
    project.write_spec(incremental_spec(target={"partitioning": []}))
    expected = write_files(project)

    instance = dg.DagsterInstance.ephemeral()
    result = project.materialize(instance=instance)
    assert result.success, [e.message for e in result.get_step_failure_events()]
    first = materialization(result, "events")
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    # files are named one by one only up to LOGGED_FILES: a Dagster log call per file cost about a millisecond each
    assert sum(1 for m in messages if re.match(rf"events: file \d+ of {FILES}: ", m)) == LOGGED_FILES == 20
    assert max(len(m) for m in messages) < 8192  # no message lists every file
    table = project.table(TABLE)
    rows = branch_rows(table, BRANCH)
    assert len(rows) == FILES * ROWS_PER_FILE
    held: dict[str, set[int]] = {}
    for row in rows:
        held.setdefault(row["_source_file"], set()).add(row["id"])
        assert row["name"] == f"n{row['id']}"
    assert held == expected  # every file's rows, each under its own path
    assert Counter(row["id"] for row in rows).most_common(1)[0][1] == 1  # no row twice
    assert first["rows_read"] == first["dagster/row_count"] == FILES * ROWS_PER_FILE

    # the state names every file at its version, and the commit's own summary stays small: a state of thousands
    # of files is kept in the state file, not copied into every later table metadata version
    head = table.snapshot_by_name(BRANCH)
    state = read_branch_state(table, BRANCH)
    assert set(state.sources) == set(expected)
    summary = head.summary.additional_properties
    assert len(json.dumps(summary)) < 4096, len(json.dumps(summary))
    assert STATE_FILE_KEY in summary
    snapshots = branch_snapshot_ids(table, BRANCH)

    started = time.perf_counter()
    second = run(project)
    seconds = time.perf_counter() - started
    again = project.table(TABLE)
    assert branch_snapshot_ids(again, BRANCH) == snapshots  # nothing new: no snapshot
    assert len(branch_rows(again, BRANCH)) == FILES * ROWS_PER_FILE
    assert materialization(second, "events")["nothing_new"] is True
    assert SOURCE_STATE_KEY not in summary or len(summary[SOURCE_STATE_KEY]) < 4096
    assert seconds < 30, seconds

    # a later commit of one new file: its summary holds its own share again, and the state still knows every file
    late = project.write_data("events/late.csv", "id,name\n999999,n999999\n")
    third = materialization(run(project), "events")
    assert third["rows_read"] == 1
    table = project.table(TABLE)
    assert len(branch_rows(table, BRANCH)) == FILES * ROWS_PER_FILE + 1
    own = json.loads(table.snapshot_by_name(BRANCH).summary.additional_properties[SOURCE_STATE_KEY])
    assert list(own) == [str(late.resolve())]
    assert set(read_branch_state(table, BRANCH).sources) == {*expected, str(late.resolve())}
