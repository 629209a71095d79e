"""Source sensors through Dagster's test APIs: new, changed, unchanged, deleted files, lookback, cursor, run keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from dativo_dagster.definitions import build_definitions
from dativo_dagster.extract import SourceFile, list_source_files
from dativo_dagster.freshness import FRESHNESS_SENSOR
from dativo_dagster.sensors import evaluate, parse_cursor, run_key_for
from dativo_dagster.spec import load_specs
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project
from dativo_dagster_tests.table_checks import (
    csv_text,
    expected_rows,
    iceberg_rows,
    incremental_spec,
    materialization,
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
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor,
            resources={"dativo_storage": defs.resources["dativo_storage"]},
            definitions=defs,  # an asset-selection sensor resolves its target against the repository
        )
        data = sensor.evaluate_tick(context)
        requests = data.run_requests or []
        return Tick(
            run_keys=[r.run_key for r in requests],
            tags=[dict(r.tags) for r in requests],
            skip=data.skip_message,
            cursor=data.cursor,
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
    assert tick.files == {str(a): str(a.stat().st_mtime_ns)}


def test_an_unchanged_source_is_skipped_with_a_reason(project: Project, sensor: SensorHarness) -> None:
    project.write_data("events/a.csv", csv_text([1]))
    project.write_data("events/b.csv", csv_text([2]))
    first = sensor.tick(None)

    second = sensor.tick(first.cursor)

    assert second.run_keys == []
    assert second.skip == "no new or changed file among 2 source file(s) of events"
    assert second.files == first.files


def test_a_changed_file_requests_a_run_for_that_file_only(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1]))
    b = project.write_data("events/b.csv", csv_text([2]))
    first = sensor.tick(None)
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

    touch(old, 0)  # modified again: inside the window now
    third = sensor.tick(second.cursor)
    assert third.run_keys == [run_key_for("events", [sensor.listed()[str(old)]])]


def test_run_keys_are_stable_for_the_same_changes(project: Project, sensor: SensorHarness) -> None:
    project.write_data("events/a.csv", csv_text([1]))
    project.write_data("events/b.csv", csv_text([2]))
    start = sensor.tick(None)
    project.write_data("events/c.csv", csv_text([3]))
    project.write_data("events/d.csv", csv_text([4]))

    # a tick repeated from the same cursor (the daemon crashed before storing the new one) asks for the same run
    repeated = [sensor.tick(start.cursor) for _ in range(3)]
    assert len({tuple(t.run_keys) for t in repeated}) == 1 and len(repeated[0].run_keys) == 1
    assert repeated[0].tags[0]["dativo/files"] == "2"
    # the key names the file versions, not the tick: a cursor reached otherwise gives the same key
    rebuilt = json.dumps(dict(reversed(list(start.files.items()))))
    assert sensor.tick(rebuilt).run_keys == repeated[0].run_keys
    # and after the next tick there is nothing more to ask for
    assert sensor.tick(repeated[0].cursor).run_keys == []


def test_the_cursor_round_trips_and_a_broken_one_starts_over(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1]))
    tick = sensor.tick(None)
    assert tick.cursor is not None
    assert json.loads(tick.cursor) == {str(a): str(a.stat().st_mtime_ns)}
    assert parse_cursor(tick.cursor) == tick.files
    assert parse_cursor(json.dumps(tick.files)) == tick.files

    for broken in ("not json", "[1, 2]", ""):
        again = sensor.tick(broken)
        assert again.run_keys == tick.run_keys, broken


def test_the_run_decides_from_the_table_not_from_the_cursor(project: Project, sensor: SensorHarness) -> None:
    a = project.write_data("events/a.csv", csv_text([1, 2]))
    first = sensor.tick(None)
    result = project.materialize(tags={"dativo/trigger": "sensor"})
    assert result.success

    # a sensor that lost its cursor asks again, but the run finds that the table already holds the file
    again = sensor.tick(None)
    assert again.run_keys == first.run_keys
    metadata = materialization(project.materialize(), "events")
    assert metadata["nothing_new"] is True
    assert iceberg_rows(project.table("testdomain.events"), "acme") == expected_rows([a])


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
