"""Source sensors through Dagster's test APIs: new, changed, unchanged, deleted files, lookback, cursor, run keys."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from dativo_dagster import commit as commit_module
from dativo_dagster.definitions import build_definitions
from dativo_dagster.sources.csv import SourceFile, list_source_files
from dativo_dagster.freshness import FRESHNESS_SENSOR
from dativo_dagster.sensors import (
    SENSOR_ATTEMPT_TAG,
    SENSOR_FILES_TAG,
    attempt_run_key,
    evaluate,
    parse_cursor,
    run_key_for,
)
from dativo_dagster.spec import load_specs
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project
from dativo_dagster_tests.table_checks import (
    csv_text,
    expected_rows,
    iceberg_rows,
    incremental_spec,
    touch,
)

SENSOR = "events__sensor"


@dataclass
class Tick:
    run_keys: list[str]
    tags: list[dict[str, str]]
    skip: str | None
    cursor: str | None

    @property
    def files(self) -> dict[str, str]:
        return parse_cursor(self.cursor)


class SensorHarness:
    """Evaluates the project's sensor the way the daemon does: definitions from the specs, a real instance."""

    def __init__(self, project: Project, instance: dg.DagsterInstance):
        self.project = project
        self.instance = instance

    def tick(self, cursor: str | None) -> Tick:
        defs = build_definitions(self.project.specs_dir)
        sensor = defs.resolve_sensor_def(SENSOR)
        with dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor,
            resources={name: defs.resources[name] for name in ("dativo_storage", "dativo_catalog")},
            definitions=defs,  # an asset-selection sensor resolves its target against the repository
        ) as context:
            data = sensor.evaluate_tick(context)
        requests = data.run_requests or []
        return Tick(
            run_keys=[r.run_key for r in requests],
            tags=[dict(r.tags) for r in requests],
            skip=data.skip_message,
            cursor=data.cursor,
        )

    def launch(self, tick: Tick) -> dg.ExecuteInProcessResult:
        """Run what ``tick`` asked for on the sensor's instance, with the request's tags, as the daemon would."""
        assert len(tick.run_keys) == 1, tick.skip
        return self.project.materialize(
            instance=self.instance, tags={**tick.tags[0], "dagster/run_key": tick.run_keys[0]}
        )

    def listed(self) -> dict[str, SourceFile]:
        [loaded] = load_specs(self.project.specs_dir)
        return {f.uri: f for f in list_source_files(loaded, S3Settings())}


@pytest.fixture
def sensor(project: Project) -> Iterator[SensorHarness]:
    spec = incremental_spec(sensor={"minimum_interval_seconds": 30})
    project.write_spec(spec)
    with dg.instance_for_test() as instance:
        yield SensorHarness(project, instance)


def test_the_sensor_targets_its_asset_and_starts_stopped(project: Project, sensor: SensorHarness) -> None:
    project.write_spec(incremental_spec("quiet"))  # no sensor: key
    defs = build_definitions(project.specs_dir)
    sensor_def = defs.resolve_sensor_def(SENSOR)

    assert sensor_def.minimum_interval_seconds == 30
    assert sensor_def.default_status == dg.DefaultSensorStatus.STOPPED
    assert [s.name for s in defs.sensors or []] == [SENSOR, FRESHNESS_SENSOR]  # freshness: test_freshness.py
    repository = defs.get_repository_def()
    assert sensor_def.asset_selection is not None
    assert sensor_def.asset_selection.resolve(repository.asset_graph) == {dg.AssetKey("events")}


def test_a_new_file_requests_a_run_and_enters_the_cursor(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1]))

    tick = sensor.tick(None)

    assert tick.skip is None and len(tick.run_keys) == 1
    assert tick.run_keys == [run_key_for("events", [sensor.listed()[str(a)]])]
    assert tick.tags[0]["dativo/files"] == "1" and tick.tags[0]["dativo/trigger"] == "sensor"
    assert tick.files == {str(a): f"{a.stat().st_mtime_ns}:{a.stat().st_size}"}


def test_an_unchanged_source_is_skipped_with_a_reason(project: Project, sensor: SensorHarness) -> None:
    project.write_data("events/a.csv", csv_text([1]))
    project.write_data("events/b.csv", csv_text([2]))
    first = sensor.tick(None)
    assert sensor.launch(first).success

    second = sensor.tick(first.cursor)

    assert second.run_keys == []
    assert second.skip == "no new or changed file among 2 source file(s) of events"
    assert second.files == first.files


def test_a_changed_file_requests_a_run_for_that_file_only(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1]))
    b = project.write_data("events/b.csv", csv_text([2]))
    first = sensor.tick(None)
    assert sensor.launch(first).success
    project.write_data("events/a.csv", csv_text([1], tag="v2"))
    touch(a, 5)

    second = sensor.tick(first.cursor)

    assert second.run_keys == [run_key_for("events", [sensor.listed()[str(a)]])]
    assert second.run_keys != first.run_keys
    assert second.tags[0]["dativo/files"] == "1"
    assert second.files[str(a)] != first.files[str(a)]
    assert second.files[str(b)] == first.files[str(b)]


def test_a_deleted_file_drops_out_of_the_cursor_and_requests_nothing(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1]))
    b = project.write_data("events/b.csv", csv_text([2]))
    first = sensor.tick(None)
    assert sensor.launch(first).success
    b.unlink()

    second = sensor.tick(first.cursor)
    assert second.run_keys == [] and second.skip is not None
    assert second.files == {str(a): first.files[str(a)]}

    # a file that comes back is new again
    project.write_data("events/b.csv", csv_text([2]))
    assert len(sensor.tick(second.cursor).run_keys) == 1

    # every file gone: nothing to list is a skip, not an error, and the cursor empties
    a.unlink()
    b.unlink()
    empty = sensor.tick(second.cursor)
    assert empty.run_keys == [] and empty.files == {}


def test_files_older_than_the_lookback_window_are_ignored(project: Project, sensor: SensorHarness) -> None:
    spec = incremental_spec(sensor={"minimum_interval_seconds": 30})
    spec["source"]["incremental"]["lookback_days"] = 2
    project.write_spec(spec)
    old = project.write_data("events/old.csv", csv_text([1]))
    touch(old, -3 * 86_400)

    first = sensor.tick(None)
    assert first.run_keys == [] and first.skip is not None
    assert str(old) in first.files  # seen, so that it is not reconsidered every tick

    recent = project.write_data("events/recent.csv", csv_text([2]))
    second = sensor.tick(first.cursor)
    assert second.run_keys == [run_key_for("events", [sensor.listed()[str(recent)]])]
    assert sensor.launch(second).success

    touch(old, 0)  # modified again: inside the window now
    third = sensor.tick(second.cursor)
    assert third.run_keys == [run_key_for("events", [sensor.listed()[str(old)]])]


def test_run_keys_are_stable_for_the_same_changes(project: Project, sensor: SensorHarness) -> None:
    project.write_data("events/a.csv", csv_text([1]))
    project.write_data("events/b.csv", csv_text([2]))
    start = sensor.tick(None)
    assert sensor.launch(start).success
    project.write_data("events/c.csv", csv_text([3]))
    project.write_data("events/d.csv", csv_text([4]))

    # a tick repeated from the same cursor (the daemon crashed before storing the new one) asks for the same run
    repeated = [sensor.tick(start.cursor) for _ in range(3)]
    assert len({tuple(t.run_keys) for t in repeated}) == 1 and len(repeated[0].run_keys) == 1
    assert repeated[0].tags[0]["dativo/files"] == "2"
    # the key names the file versions, not the tick: a cursor reached otherwise gives the same key
    rebuilt = json.dumps(dict(reversed(list(start.files.items()))))
    assert sensor.tick(rebuilt).run_keys == repeated[0].run_keys
    # and once that run committed there is nothing more to ask for
    assert sensor.launch(repeated[0]).success
    assert sensor.tick(repeated[0].cursor).run_keys == []


def test_the_cursor_round_trips_and_a_broken_one_starts_over(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1]))
    tick = sensor.tick(None)
    assert tick.cursor is not None
    assert json.loads(tick.cursor) == {str(a): f"{a.stat().st_mtime_ns}:{a.stat().st_size}"}
    assert parse_cursor(tick.cursor) == tick.files
    assert parse_cursor(json.dumps(tick.files)) == tick.files

    for broken in ("not json", "[1, 2]", ""):
        again = sensor.tick(broken)
        assert again.run_keys == tick.run_keys, broken


def test_the_sensor_decides_from_the_table_not_from_the_cursor(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    first = sensor.tick(None)
    assert sensor.launch(first).success

    # a sensor that lost its cursor does not ask again: the table holds the file at its version
    again = sensor.tick(None)
    assert again.run_keys == [] and again.skip == "no new or changed file among 1 source file(s) of events"
    assert again.files == first.files
    # and a cursor that claims a file was seen does not hide it while the table lacks it
    b = project.write_data("events/b.csv", csv_text([3]))
    claimed = json.dumps({**first.files, str(b): sensor.listed()[str(b)].version})
    assert sensor.tick(claimed).run_keys == [run_key_for("events", [sensor.listed()[str(b)]])]
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows([a])


def test_files_of_a_failed_run_are_requested_again_until_a_run_loads_them(
    project: Project, sensor: SensorHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    first = sensor.tick(None)
    real_commit = commit_module._commit_once

    def catalog_down(*args: object, **kwargs: object) -> None:
        raise PermissionError("catalog refused the commit")  # terminal: the run fails for good

    monkeypatch.setattr(commit_module, "_commit_once", catalog_down)
    failed = sensor.launch(first)
    assert not failed.success
    assert sensor.instance.get_run_by_id(failed.run_id).status == dg.DagsterRunStatus.FAILURE
    assert not iceberg_rows(project.table("testdomain.events"), "acme")  # nothing committed

    # no file changed, yet the next tick asks again, under a key Dagster has not used
    retry = sensor.tick(first.cursor)
    assert retry.files == first.files
    assert retry.run_keys == [attempt_run_key(first.run_keys[0], 1)] and retry.run_keys != first.run_keys
    assert retry.tags[0][SENSOR_FILES_TAG] == first.run_keys[0] and retry.tags[0][SENSOR_ATTEMPT_TAG] == "1"
    # repeated, the tick asks with the same key (Dagster starts that run once)
    assert sensor.tick(retry.cursor).run_keys == retry.run_keys

    monkeypatch.setattr(commit_module, "_commit_once", real_commit)  # the catalog is back
    assert sensor.launch(retry).success
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows([a])
    done = sensor.tick(retry.cursor)
    assert done.run_keys == [] and done.skip is not None


def test_no_second_run_is_requested_while_one_for_the_same_files_is_in_progress(
    project: Project, sensor: SensorHarness
) -> None:
    project.write_data("events/a.csv", csv_text([1]))
    first = sensor.tick(None)
    queued = dg.DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), tags={**first.tags[0]},
                           status=dg.DagsterRunStatus.STARTED)
    sensor.instance.add_run(queued)

    tick = sensor.tick(first.cursor)

    assert tick.run_keys == []
    assert tick.skip == f"run {queued.run_id} (STARTED) already loads the 1 new or changed file(s) of events"


def test_a_file_reverted_to_a_version_loaded_before_is_requested_again(project: Project, sensor: SensorHarness) -> None:
    # cp -p of a backup: the same content, time and size as a version an earlier run loaded (S3: the same ETag)
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    original_ns = a.stat().st_mtime_ns
    first = sensor.tick(None)
    assert sensor.launch(first).success
    project.write_data("events/a.csv", csv_text([1, 2, 3], tag="v2"))
    touch(a, 5)
    changed = sensor.tick(first.cursor)
    assert sensor.launch(changed).success
    project.write_data("events/a.csv", csv_text([1, 2]))
    os.utime(a, ns=(original_ns, original_ns))

    reverted = sensor.tick(changed.cursor)

    # the files' key is the first run's: that key is used, so the request carries the next attempt's
    assert run_key_for("events", [sensor.listed()[str(a)]]) == first.run_keys[0]
    assert reverted.run_keys == [attempt_run_key(first.run_keys[0], 1)]
    assert sensor.launch(reverted).success
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows([a])
    assert sensor.tick(reverted.cursor).run_keys == []


def test_a_source_that_cannot_be_listed_is_a_skip(project: Project, sensor: SensorHarness) -> None:
    spec = incremental_spec(sensor={"minimum_interval_seconds": 30})
    spec["source"]["files"] = [{"path": "data/events/missing.csv"}]
    project.write_spec(spec)

    tick = sensor.tick('{"x": "1"}')

    assert tick.run_keys == []
    assert tick.skip is not None and "cannot list the source of events" in tick.skip
    assert "missing.csv" in tick.skip


def test_evaluate_is_the_pure_core(project: Project) -> None:
    spec = incremental_spec()
    spec["source"]["incremental"]["lookback_days"] = 1
    project.write_spec(spec)
    [loaded] = load_specs(project.specs_dir)
    now = datetime(2026, 1, 10, tzinfo=timezone.utc)
    fresh = int(now.timestamp() * 1e9)
    old = fresh - 2 * 86_400 * 10**9
    listed = [SourceFile("/a", 1, "1", fresh), SourceFile("/b", 1, "2", fresh), SourceFile("/old", 1, "3", old)]

    pending, cursor = evaluate(loaded, listed, {"/a": "1", "/gone": "5"}, now)

    assert [f.uri for f in pending] == ["/b"]
    assert cursor == {"/a": "1", "/b": "2", "/old": "3"}
    assert run_key_for("x", listed) == run_key_for("x", list(reversed(listed)))
    assert run_key_for("x", listed) != run_key_for("y", listed)
    assert run_key_for("x", listed[:1]) != run_key_for("x", [SourceFile("/a", 1, "2", fresh)])


def test_every_spec_with_a_sensor_gets_one(tmp_path: Path) -> None:
    project = Project(tmp_path)
    project.write_spec(incremental_spec("one", sensor={"minimum_interval_seconds": 5}))
    project.write_spec(incremental_spec("two", sensor={}))
    project.write_spec(incremental_spec("three"))
    defs = build_definitions(project.specs_dir)

    sensors = {s.name: s.minimum_interval_seconds for s in defs.sensors or [] if s.name != FRESHNESS_SENSOR}
    assert sensors == {"one__sensor": 5, "two__sensor": 60}
