"""Freshness checks: one per spec with a schedule or sensor, its limit from the cron or the sensor interval,
evaluated by Dagster's own check against the instance's materializations, and the sensor that runs them."""

from __future__ import annotations

import time
from datetime import timedelta

import dagster as dg
import pytest

from dativo_dagster.definitions import build_definitions
from dativo_dagster.freshness import (
    FRESHNESS_CHECK,
    FRESHNESS_SENSOR,
    build_freshness_checks,
    schedule_interval,
)
from dativo_dagster.spec import load_specs
from dativo_dagster_tests.conftest import Project, base_spec

# a sensor on an append asset needs incremental reads (a spec error otherwise): these specs replace their table
OVERWRITE = {"partitioning": ["ingest_date"], "write_mode": "overwrite"}

HOUR = 3600.0
DAY = 24 * HOUR


def limits(defs: dg.Definitions) -> dict[str, float]:
    """Asset name -> the freshness check's limit in seconds, as Dagster's check records it."""
    found = {}
    for checks_def in defs.asset_checks or []:
        for spec in checks_def.check_specs:
            assert spec.key.name == FRESHNESS_CHECK
            params = spec.metadata["dagster/freshness_params"].value
            found[spec.asset_key.to_user_string()] = params["lower_bound_delta_seconds"]
    return found


def evaluate(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str) -> dg.AssetCheckEvaluation:
    """Run the asset's freshness check alone, as the freshness sensor's run does."""
    key = dg.AssetCheckKey(dg.AssetKey(asset), FRESHNESS_CHECK)
    job = dg.Definitions(
        assets=defs.assets,
        asset_checks=defs.asset_checks,
        resources=defs.resources,
        jobs=[dg.define_asset_job("check_freshness", selection=dg.AssetSelection.checks(key))],
    ).resolve_job_def("check_freshness")
    result = job.execute_in_process(instance=instance)
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.asset_check_key == key
    return evaluation


def test_a_check_per_scheduled_or_sensed_asset_with_its_interval_and_grace(project: Project) -> None:
    project.write_spec(base_spec("hourly", schedule={"cron": "0 * * * *"}))
    project.write_spec(base_spec("daily", schedule={"cron": "30 2 * * *", "timezone": "Europe/Berlin"}))
    project.write_spec(base_spec("weekdays", schedule={"cron": "0 9 * * 1-5"}))
    project.write_spec(base_spec("sensed", sensor={"minimum_interval_seconds": 30}, target=OVERWRITE))
    project.write_spec(base_spec("slow_sensor", sensor={"minimum_interval_seconds": 3600}, target=OVERWRITE))
    project.write_spec(base_spec("both", schedule={"cron": "*/10 * * * *"}, sensor={"minimum_interval_seconds": 60}, target=OVERWRITE))
    project.write_spec(base_spec("manual"))

    defs = build_definitions(project.specs_dir)

    assert limits(defs) == {
        "hourly": HOUR + 15 * 60,  # one interval and the least grace, 15 minutes
        # a daily cron in a zone with daylight saving: 25 h across the autumn change, grace 10 % of it
        "daily": 25 * HOUR + 2.5 * HOUR,
        "weekdays": 3 * DAY + 7.2 * HOUR,  # Friday 09:00 to Monday 09:00
        "sensed": 10 * 30 + 15 * 60,  # ten sensor intervals
        "slow_sensor": 10 * HOUR + HOUR,
        "both": 10 * 60 + 15 * 60,  # the schedule runs even when no file is new: its interval counts
    }
    for checks_def in defs.asset_checks or []:
        [spec] = checks_def.check_specs
        assert not spec.blocking
    [sensor] = [s for s in defs.sensors or [] if s.name == FRESHNESS_SENSOR]
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    checked = {key.asset_key.to_user_string() for key in sensor.asset_selection.resolve_checks(
        defs.get_repository_def().asset_graph)}
    assert checked == set(limits(defs))


def test_specs_without_schedule_or_sensor_get_no_check_and_no_freshness_sensor(project: Project) -> None:
    project.write_spec(base_spec("manual"))
    defs = build_definitions(project.specs_dir)
    assert list(defs.asset_checks or []) == []
    assert FRESHNESS_SENSOR not in {s.name for s in defs.sensors or []}


@pytest.mark.parametrize(
    ("cron", "timezone", "gap"),
    [
        ("*/15 * * * *", "UTC", timedelta(minutes=15)),
        ("*/7 * * * *", "UTC", timedelta(minutes=7)),  # :56 to :00 is shorter; the longest gap counts
        ("*/5 9-17 * * 1-5", "UTC", timedelta(days=2, hours=15, minutes=5)),  # Friday 17:55 to Monday 09:00
        ("0 0 1 * *", "UTC", timedelta(days=31)),
        ("0 0 1-7 * *", "UTC", timedelta(days=25)),  # the 7th to the 1st of a 31-day month
        ("@daily", "Asia/Kolkata", timedelta(days=1)),
        ("@weekly", "UTC", timedelta(days=7)),
    ],
)
def test_schedule_interval_is_the_longest_gap_between_ticks(cron: str, timezone: str, gap: timedelta) -> None:
    assert schedule_interval(cron, timezone) == gap


def test_the_check_fails_with_warn_when_the_last_materialization_is_older_than_the_limit(project: Project) -> None:
    project.write_spec(base_spec("people", schedule={"cron": "0 * * * *"}))
    project.write_data("people.csv", "id,name\n1,Ann\n")
    defs = build_definitions(project.specs_dir)
    [checks_def] = build_freshness_checks(load_specs(project.specs_dir))
    limit = 75 * 60.0

    # never materialized: overdue
    with dg.DagsterInstance.ephemeral() as instance:
        never = evaluate(defs, instance, "people")
        assert (never.passed, never.severity) == (False, dg.AssetCheckSeverity.WARN)

    # a real run just now: fresh, and fresh until the limit has passed
    with dg.DagsterInstance.ephemeral() as instance:
        assert project.materialize(instance=instance).success
        [record] = instance.fetch_materializations(dg.AssetKey("people"), limit=1).records
        fresh = evaluate(defs, instance, "people")
        assert fresh.passed
        fresh_until = fresh.metadata["dagster/fresh_until_timestamp"].value
        assert fresh_until == pytest.approx(record.timestamp + limit)
    entry = record.event_log_entry

    def aged(seconds: float) -> dg.AssetCheckEvaluation:
        """The same materialization, recorded ``seconds`` ago in a new instance."""
        with dg.DagsterInstance.ephemeral() as instance:
            instance.store_event(
                dg.EventLogEntry(
                    error_info=None,
                    level=entry.level,
                    user_message=entry.user_message,
                    run_id=entry.run_id,
                    timestamp=time.time() - seconds,
                    step_key=entry.step_key,
                    job_name=entry.job_name,
                    dagster_event=entry.dagster_event,
                )
            )
            return evaluate(defs, instance, "people")

    within = aged(limit - 60)
    assert within.passed
    overdue = aged(limit + 60)
    assert (overdue.passed, overdue.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert overdue.metadata["dagster/freshness_params"].value["lower_bound_delta_seconds"] == limit
    assert "overdue" in (overdue.description or "")
    assert checks_def.check_keys == {dg.AssetCheckKey(dg.AssetKey("people"), FRESHNESS_CHECK)}


def test_the_freshness_sensor_asks_for_checks_that_never_ran(project: Project) -> None:
    project.write_spec(base_spec("hourly", schedule={"cron": "0 * * * *"}))
    project.write_spec(base_spec("sensed", sensor={"minimum_interval_seconds": 60}, target=OVERWRITE))
    project.write_spec(base_spec("manual"))
    defs = build_definitions(project.specs_dir)
    sensor = defs.resolve_sensor_def(FRESHNESS_SENSOR)

    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_sensor_context(instance=instance, definitions=defs)
        request = sensor(context)

    assert isinstance(request, dg.RunRequest)
    assert set(request.asset_check_keys or []) == {
        dg.AssetCheckKey(dg.AssetKey("hourly"), FRESHNESS_CHECK),
        dg.AssetCheckKey(dg.AssetKey("sensed"), FRESHNESS_CHECK),
    }


def test_the_spec_s_own_jobs_evaluate_its_freshness_check_after_materializing(project: Project) -> None:
    project.write_spec(base_spec("hourly", schedule={"cron": "0 * * * *"}))
    project.write_data("hourly.csv", "id,name\n1,Ann\n")
    defs = build_definitions(project.specs_dir)
    job = defs.resolve_job_def("testproduct__group_job")

    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)

    assert result.success
    freshness = [e for e in result.get_asset_check_evaluations() if e.check_name == FRESHNESS_CHECK]
    assert [(e.asset_key, e.passed) for e in freshness] == [(dg.AssetKey("hourly"), True)]
