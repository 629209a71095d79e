"""Per-partition state of time-partitioned assets (CONTRACT 5 and 10): incremental runs per partition, sensors that
request one run per partition key, and the quarantine replaced per partition."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dativo_dagster.definitions import build_definitions
from dativo_dagster.spec import parse_spec_document
from dativo_dagster.table_state import read_branch_state
from dativo_dagster_tests.conftest import Project, branch_rows
from dativo_dagster_tests.table_checks import failures
from dativo_dagster_tests.test_partitions import BRANCH, TABLE, day_csv, partitioned_spec


def incremental_spec(files: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
    source = {"type": "csv", "files": [{"path": p} for p in files or ["data/events/{partition}/*.csv"]],
              "incremental": {"strategy": "file_modified_time"}}
    return partitioned_spec(source=source, **overrides)


def rows(project: Project) -> Counter[tuple[int, str, str]]:
    return Counter((r["id"], r["event_date"].isoformat(), r["name"]) for r in branch_rows(project.table(TABLE), BRANCH))


def head(project: Project) -> int:
    return project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id


def run(project: Project, key: str) -> Any:
    result = project.materialize(partition_key=key)
    assert result.success, failures(result)
    return result


def rewrite(path: Path, content: str) -> None:
    """New content and a later modification time (a version the table has not seen)."""
    path.write_text(content)
    later = time.time() + 5
    os.utime(path, (later, later))


def test_incremental_partitions_parse_and_a_lookback_is_refused() -> None:
    model, found = parse_spec_document(incremental_spec(), "asset_specs/events.yaml")
    assert found == [] and model is not None
    spec = incremental_spec()
    spec["source"]["incremental"]["lookback_days"] = 3
    _, found = parse_spec_document(spec, "asset_specs/events.yaml")
    assert any(p.startswith("asset_specs/events.yaml: source.incremental.lookback_days: ") and "partition" in p
               for p in found), found


def test_a_partition_with_nothing_new_adds_no_snapshot_and_a_changed_file_replaces_its_window(
    project: Project,
) -> None:
    project.write_spec(incremental_spec())
    a1 = project.write_data("events/2024-01-01/a.csv", day_csv("2024-01-01", range(1, 3)))
    project.write_data("events/2024-01-01/b.csv", day_csv("2024-01-01", range(3, 5)))
    project.write_data("events/2024-01-02/a.csv", day_csv("2024-01-02", range(10, 12)))
    run(project, "2024-01-01")
    run(project, "2024-01-02")
    loaded = rows(project)
    assert sum(loaded.values()) == 6

    # nothing new for either partition: no snapshot, reported as such
    before = head(project)
    result = run(project, "2024-01-01")
    assert head(project) == before
    assert result.asset_materializations_for_node("events")[0].metadata["nothing_new"].value is True
    run(project, "2024-01-02")
    assert head(project) == before and rows(project) == loaded

    # one file of day 1 changes: day 1's window is read again whole (b.csv too) and replaced; day 2 stays
    rewrite(a1, day_csv("2024-01-01", range(1, 2), tag="v2"))
    run(project, "2024-01-01")
    assert head(project) != before
    assert rows(project) == Counter([(1, "2024-01-01", "v2-1"), (3, "2024-01-01", "v1-3"), (4, "2024-01-01", "v1-4"),
                                     (10, "2024-01-02", "v1-10"), (11, "2024-01-02", "v1-11")])
    after = head(project)
    run(project, "2024-01-01")  # and then nothing new again
    assert head(project) == after

    # a file of day 1 removed: its rows leave with the next run of day 1, which then finds nothing new
    (project.data_dir / "events/2024-01-01/b.csv").unlink()
    run(project, "2024-01-01")
    assert rows(project) == Counter([(1, "2024-01-01", "v2-1"), (10, "2024-01-02", "v1-10"),
                                     (11, "2024-01-02", "v1-11")])
    after = head(project)
    run(project, "2024-01-01")
    assert head(project) == after


def test_the_source_state_is_kept_per_partition(project: Project) -> None:
    """A file that every partition reads (no {partition} in its path): partition 1's run of its new version does not
    make it look committed for partition 2, whose own run still reads it."""
    project.write_spec(incremental_spec(["data/events/{partition}.csv", "data/shared.csv"],
                                        schema_validation_mode="warn"))
    project.write_data("events/2024-01-01.csv", day_csv("2024-01-01", range(1, 2)))
    project.write_data("events/2024-01-02.csv", day_csv("2024-01-02", range(10, 11)))
    shared = project.write_data("shared.csv", "id,event_date,name\n50,2024-01-01,s1\n60,2024-01-02,s1\n")
    run(project, "2024-01-01")
    run(project, "2024-01-02")
    assert rows(project) == Counter([(1, "2024-01-01", "v1-1"), (50, "2024-01-01", "s1"),
                                     (10, "2024-01-02", "v1-10"), (60, "2024-01-02", "s1")])

    rewrite(shared, "id,event_date,name\n50,2024-01-01,s2\n60,2024-01-02,s2\n")
    run(project, "2024-01-01")
    before = head(project)
    run(project, "2024-01-02")  # shared.csv is new for partition 2 although partition 1 committed its version
    assert head(project) != before
    assert rows(project) == Counter([(1, "2024-01-01", "v1-1"), (50, "2024-01-01", "s2"),
                                     (10, "2024-01-02", "v1-10"), (60, "2024-01-02", "s2")])
    state = read_branch_state(project.table(TABLE), BRANCH).sources
    shared_uri = str(shared.resolve())
    assert {k for k in state if k.endswith(shared_uri)} == {f"[2024-01-01]{shared_uri}", f"[2024-01-02]{shared_uri}"}


# ---- sensors -----------------------------------------------------------------------------------------------------


def sensor_tick(project: Project, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult | Any:
    defs = build_definitions(project.specs_dir)
    sensor = defs.resolve_sensor_def("events__sensor")
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs,
        resources={name: defs.resources[name] for name in ("dativo_storage", "dativo_catalog")},
    ) as context:
        return sensor.evaluate_tick(context)


def test_a_sensor_requests_one_run_per_partition_key_with_new_or_changed_files(
    project: Project, capfd: pytest.CaptureFixture[str]
) -> None:
    project.write_spec(incremental_spec(["data/events/{partition}/*.csv"], sensor={"minimum_interval_seconds": 30}))
    project.write_data("events/2024-01-01/a.csv", day_csv("2024-01-01", range(1, 3)))
    project.write_data("events/2024-01-01/b.csv", day_csv("2024-01-01", range(3, 4)))
    day2 = project.write_data("events/2024-01-02/a.csv", day_csv("2024-01-02", range(10, 12)))
    # files that map to no valid key: not a key, before the start, a partition that has not ended
    for folder in ("not-a-day", "2023-12-31", "2999-01-01"):
        project.write_data(f"events/{folder}/a.csv", day_csv("2024-01-01", range(90, 91)))

    with dg.instance_for_test() as instance:
        capfd.readouterr()
        first = sensor_tick(project, instance, None)
        logged = capfd.readouterr().err  # a sensor's context.log goes to Dagster's console handler
        requests = sorted(first.run_requests, key=lambda r: r.partition_key)
        assert [r.partition_key for r in requests] == ["2024-01-01", "2024-01-02"]
        assert all(r.run_key.startswith(f"events:{r.partition_key}:") for r in requests)
        assert [r.tags["dativo/files"] for r in requests] == ["2", "1"]
        assert len(json.loads(first.cursor)) == 6  # the cursor lists every file seen, as for unpartitioned specs
        warned = [line for line in logged.splitlines() if "map to no partition key" in line]
        assert len(warned) == 1 and "3 source file(s)" in warned[0], warned
        for folder in ("not-a-day", "2023-12-31", "2999-01-01"):
            assert f"events/{folder}/a.csv" in warned[0]

        # the daemon launches both; the next tick finds nothing new
        for request in requests:
            result = project.materialize(instance=instance, partition_key=request.partition_key,
                                         tags={**request.tags, "dagster/run_key": request.run_key})
            assert result.success, failures(result)
        assert sum(rows(project).values()) == 5
        second = sensor_tick(project, instance, first.cursor)
        assert not second.run_requests and "no new or changed file" in second.skip_message

        # one file of day 2 changes: one run, of day 2 only, with a key of its own
        rewrite(day2, day_csv("2024-01-02", range(10, 13), tag="v2"))
        third = sensor_tick(project, instance, second.cursor)
        (request,) = third.run_requests
        assert request.partition_key == "2024-01-02"
        assert request.run_key not in {r.run_key for r in requests}
        result = project.materialize(instance=instance, partition_key="2024-01-02",
                                     tags={**request.tags, "dagster/run_key": request.run_key})
        assert result.success, failures(result)
        assert rows(project) == Counter([(1, "2024-01-01", "v1-1"), (2, "2024-01-01", "v1-2"),
                                         (3, "2024-01-01", "v1-3"), (10, "2024-01-02", "v2-10"),
                                         (11, "2024-01-02", "v2-11"), (12, "2024-01-02", "v2-12")])
        assert not sensor_tick(project, instance, third.cursor).run_requests


def test_a_sensor_on_a_partitioned_database_source_is_refused() -> None:
    spec = partitioned_spec(source={"type": "postgres", "connection": {"url_env": "DB_URL"}, "table": "events"},
                            sensor={"minimum_interval_seconds": 30})
    _, found = parse_spec_document(spec, "asset_specs/events.yaml")
    assert any(p.startswith("asset_specs/events.yaml: sensor: not supported for partitioned postgres sources")
               for p in found), found


# ---- the quarantine per partition --------------------------------------------------------------------------------


def rejects(project: Project) -> Counter[tuple[str, str, str | None]]:
    found = branch_rows(project.table(f"{TABLE}__rejects"), BRANCH)
    return Counter((r["id"], r["_reject_reason"], r.get("_partition")) for r in found)


def test_rerunning_a_partition_in_warn_mode_replaces_its_rejects(project: Project) -> None:
    project.write_spec(partitioned_spec(schema_validation_mode="warn"))
    project.write_data("events/2024-01-01.csv", day_csv("2024-01-01", range(1, 3), extra="x,2024-01-01,bad\n"))
    day2 = project.write_data("events/2024-01-02.csv", day_csv("2024-01-02", range(10, 11),
                                                                  extra="11,2024-01-05,late\n"))
    run(project, "2024-01-01")
    run(project, "2024-01-02")
    first = Counter({("x", "id: invalid_integer", "2024-01-01"): 1, ("11", "event_date: out_of_partition", "2024-01-02"): 1})
    assert rejects(project) == first

    # re-running day 1 (same file): its reject is there once; day 2's stays
    run(project, "2024-01-01")
    run(project, "2024-01-01")
    assert rejects(project) == first
    assert sum(rows(project).values()) == 3

    # day 2's file is fixed: its re-run takes its earlier reject away (a commit to the quarantine with no new rows)
    day2.write_text(day_csv("2024-01-02", range(10, 12)))
    run(project, "2024-01-02")
    assert rejects(project) == Counter({("x", "id: invalid_integer", "2024-01-01"): 1})
    assert rows(project)[(11, "2024-01-02", "v1-11")] == 1
