"""Time-partitioned assets (CONTRACT 10): the spec, the Dagster partitions, a partition's run replacing its window."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections import Counter
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster.definitions import build_definitions
from dativo_dagster.partitions import WindowSelection, partition_window
from dativo_dagster.spec import LoadedSpec, parse_spec_document
from dativo_dagster.types import TypeKind
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.table_checks import (
    commit_conflicts,
    data_files,
    failures,
    materialize_concurrently,
)

BRANCH = "acme"
TABLE = "testdomain.events"


def partitioned_spec(name: str = "events", **overrides: Any) -> dict[str, Any]:
    """A daily-partitioned spec over ``data/events/<day>.csv``, the table partitioned by the event's day."""
    spec = base_spec(
        name,
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "event_date", "type": "date", "required": True},
            {"name": "name", "type": "string"},
        ],
        source={"type": "csv", "files": [{"path": "data/events/{partition}.csv"}]},
        target={"partitioning": ["day(event_date)"]},
        partitions={"type": "daily", "start": "2024-01-01", "field": "event_date"},
    )
    spec.update(overrides)
    return spec


def day_csv(day: str, ids: range, tag: str = "v1", extra: str = "") -> str:
    return "id,event_date,name\n" + "".join(f"{i},{day},{tag}-{i}\n" for i in ids) + extra


def materialize(project: Project, key: str, **kwargs: Any) -> dg.ExecuteInProcessResult:
    return project.materialize(partition_key=key, **kwargs)


def rows(project: Project) -> Counter[tuple[int, str, str]]:
    return Counter(
        (r["id"], r["event_date"].isoformat(), r["name"]) for r in branch_rows(project.table(TABLE), BRANCH)
    )


def problems(document: dict[str, Any]) -> list[str]:
    model, found = parse_spec_document(document, "asset_specs/events.yaml")
    assert model is None
    return found


# ---- the spec ----------------------------------------------------------------------------------------------------


def test_a_partitioned_spec_parses() -> None:
    model, found = parse_spec_document(partitioned_spec(), "asset_specs/events.yaml")
    assert found == []
    assert model is not None and model.partitions is not None
    assert (model.partitions.type.value, model.partitions.start, model.partitions.timezone) == (
        "daily", "2024-01-01", "UTC"
    )


@pytest.mark.parametrize(
    ("partitions", "key", "words"),
    [
        ({"type": "daily", "start": "2024-01-01", "field": "nope"}, "partitions.field", "unknown field 'nope'"),
        ({"type": "daily", "start": "2024-01-01", "field": "name"}, "partitions.field", "is string"),
        ({"type": "hourly", "start": "2024-01-01", "field": "event_date"}, "partitions.field", "is a date"),
        ({"type": "yearly", "start": "2024-01-01", "field": "event_date"}, "partitions.type", "'monthly'"),
        ({"type": "daily", "start": "2024-13-01", "field": "event_date"}, "partitions.start", "not a real date"),
        ({"type": "daily", "start": "01/01/2024", "field": "event_date"}, "partitions.start", "YYYY-MM-DD"),
        ({"type": "daily", "start": "2024-01-01 05:00", "field": "event_date"}, "partitions.start", "hourly partitions only"),
        ({"type": "daily", "start": "2024-01-01", "field": "event_date", "timezone": "Mars/Base"},
         "partitions.timezone", "unknown timezone 'Mars/Base'"),
        ({"type": "daily", "start": "2024-01-01", "field": "event_date", "zone": "UTC"}, "partitions.zone",
         "unknown key"),
    ],
)
def test_bad_partitions_name_the_key(partitions: dict[str, Any], key: str, words: str) -> None:
    found = problems(partitioned_spec(partitions=partitions))
    assert any(p.startswith(f"asset_specs/events.yaml: {key}: ") and words in p for p in found), found


def test_partitions_refuse_what_a_window_cannot_replace() -> None:
    optional = partitioned_spec()
    optional["schema"][1]["required"] = False
    assert any("partitions.field: " in p and "must be required" in p for p in problems(optional))
    merge = partitioned_spec(target={"write_mode": "overwrite"})
    assert any("target.write_mode: overwrite cannot be combined with partitions" in p for p in problems(merge))
    none = partitioned_spec(target={"catalog": "none"})
    assert any(p.endswith("partitions: needs catalog: iceberg (a partition's run replaces the rows of its window"
                          " in one atomic commit); remove partitions for catalog: none") for p in problems(none))
    fixed = partitioned_spec(source={"type": "csv", "files": [{"path": "data/events.csv"}]})
    assert any("source.files: a partitioned asset reads its partition's files" in p for p in problems(fixed))
    incremental = partitioned_spec(source={"type": "csv", "files": [{"path": "data/{partition}.csv"}],
                                           "incremental": {"strategy": "file_modified_time", "lookback_days": 2}})
    assert any("source.incremental.lookback_days: cannot be combined with partitions" in p
               for p in problems(incremental))
    database = partitioned_spec(source={"type": "postgres", "connection": {"url_env": "DB_URL"}, "query": "SELECT 1"})
    assert any("source.query: a partitioned query must select its window" in p for p in problems(database))
    sensor = partitioned_spec(sensor={"minimum_interval_seconds": 60})
    assert any("sensor: an append asset with a sensor needs source.incremental" in p for p in problems(sensor))


# ---- windows -----------------------------------------------------------------------------------------------------


def loaded_spec(project: Project, spec: dict[str, Any]) -> LoadedSpec:
    model, found = parse_spec_document(spec, "asset_specs/events.yaml")
    assert model is not None, found
    return LoadedSpec(spec=model, path=project.specs_dir / "events.yaml", base_dir=project.root)


def test_windows_in_the_partitions_zone(project: Project) -> None:
    spec = partitioned_spec(
        schema=[{"name": "at", "type": "timestamptz", "required": True}, {"name": "local", "type": "timestamp"}],
        partitions={"type": "hourly", "start": "2024-01-01 00:00", "field": "at", "timezone": "Europe/Berlin"},
        target={"partitioning": ["hour(at)"]},
    )
    window = partition_window(loaded_spec(project, spec), "2024-01-31-05:00")
    assert window.kind is TypeKind.TIMESTAMPTZ
    # 05:00 in Berlin (UTC+1 in January) is 04:00 UTC
    utc = dt.timezone.utc
    assert window.bounds() == (dt.datetime(2024, 1, 31, 4, tzinfo=utc), dt.datetime(2024, 1, 31, 5, tzinfo=utc))
    values = pa.array(
        [dt.datetime(2024, 1, 31, 3, 59, 59, 999999, tzinfo=utc), dt.datetime(2024, 1, 31, 4, tzinfo=utc),
         dt.datetime(2024, 1, 31, 4, 59, tzinfo=utc), dt.datetime(2024, 1, 31, 5, tzinfo=utc), None],
        pa.timestamp("us", tz="UTC"),
    )
    assert window.outside(values).to_pylist() == [True, False, False, True, False]
    assert WindowSelection(window).matches(pa.table({"at": values})).to_pylist() == [False, True, True, False, False]


# ---- a partition's run -------------------------------------------------------------------------------------------


def test_two_partitions_load_and_a_rerun_replaces_only_its_own(project: Project) -> None:
    project.write_spec(partitioned_spec())
    project.write_data("events/2024-01-30.csv", day_csv("2024-01-30", range(1, 4)))
    project.write_data("events/2024-01-31.csv", day_csv("2024-01-31", range(10, 15)))
    for key in ("2024-01-30", "2024-01-31"):
        result = materialize(project, key)
        assert result.success, failures(result)
    before = rows(project)
    assert before == Counter(
        [(i, "2024-01-30", f"v1-{i}") for i in range(1, 4)] + [(i, "2024-01-31", f"v1-{i}") for i in range(10, 15)]
    )
    table = project.table(TABLE)
    files_30 = {f for f in data_files(table, BRANCH) if "2024-01-30" in f}
    assert files_30

    # the partition's file changed: fewer rows, other values; the run replaces the window, the other day stays
    project.write_data("events/2024-01-31.csv", day_csv("2024-01-31", range(10, 12), tag="v2"))
    result = materialize(project, "2024-01-31")
    assert result.success, failures(result)
    assert rows(project) == Counter(
        [(i, "2024-01-30", f"v1-{i}") for i in range(1, 4)] + [(i, "2024-01-31", f"v2-{i}") for i in range(10, 12)]
    )
    table = project.table(TABLE)
    after = set(data_files(table, BRANCH))
    assert files_30 <= after, "the other partition's data files must stay, by path"
    head = table.snapshot_by_name(BRANCH)
    assert head is not None and head.summary is not None
    assert head.summary.get("dativo.partition") == "2024-01-31"
    assert head.summary.get(RUN_ID_KEY) == result.run_id

    # running the same partition again with the same file: the same rows, once
    result = materialize(project, "2024-01-31")
    assert result.success, failures(result)
    assert sum(rows(project).values()) == 5


def test_out_of_partition_rows_are_quarantined_in_warn_mode(project: Project) -> None:
    project.write_spec(partitioned_spec(schema_validation_mode="warn"))
    project.write_data("events/2024-01-31.csv", day_csv("2024-01-31", range(1, 3), extra="7,2024-02-01,late\n"))
    result = materialize(project, "2024-01-31")
    assert result.success, failures(result)
    assert rows(project) == Counter([(1, "2024-01-31", "v1-1"), (2, "2024-01-31", "v1-2")])
    rejects = branch_rows(project.table(f"{TABLE}__rejects"), BRANCH)
    assert [(r["id"], r["event_date"], r["_reject_reason"], r["_source_line"]) for r in rejects] == [
        ("7", "2024-02-01", "event_date: out_of_partition", 4)
    ]
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "validation"]
    assert evaluation.metadata["event_date:out_of_partition"].value == 1


def test_out_of_partition_rows_fail_a_strict_run_and_leave_the_table(project: Project) -> None:
    project.write_spec(partitioned_spec())
    project.write_data("events/2024-01-30.csv", day_csv("2024-01-30", range(1, 3)))
    assert materialize(project, "2024-01-30").success
    snapshot = project.table(TABLE).snapshot_by_name(BRANCH)
    project.write_data("events/2024-01-31.csv", day_csv("2024-01-31", range(5, 7), extra="8,2024-01-30,early\n"))
    result = materialize(project, "2024-01-31")
    assert not result.success
    (message,) = failures(result)
    assert "event_date: out_of_partition x1" in message and "2024-01-31.csv, line 4: '2024-01-30'" in message
    table = project.table(TABLE)
    assert table.snapshot_by_name(BRANCH).snapshot_id == snapshot.snapshot_id
    assert rows(project) == Counter([(1, "2024-01-30", "v1-1"), (2, "2024-01-30", "v1-2")])


def test_a_concurrent_backfill_commits_every_partition_once(project: Project) -> None:
    project.write_spec(partitioned_spec())
    days = [f"2024-01-{d:02d}" for d in range(1, 11)]
    expected = Counter()
    for index, day in enumerate(days):
        ids = range(index * 100, index * 100 + 20)
        project.write_data(f"events/{day}.csv", day_csv(day, ids))
        expected.update((i, day, f"v1-{i}") for i in ids)
    # the table exists before the backfill, as after any first run
    assert materialize(project, days[0]).success
    with commit_conflicts() as conflicts:
        results = materialize_concurrently(project, len(days), commit_together=True, partition_keys=days)
    for result in results:
        assert result.success, failures(result)
    assert conflicts.lines, "the commits were released together: some must have conflicted and re-planned"
    assert rows(project) == expected
    # the first day, loaded twice, is in the table once: its second run replaced its window
    table = project.table(TABLE)
    head = table.snapshot_by_name(BRANCH)
    partitions = [s.summary.get("dativo.partition") for s in table.snapshots() if s.summary is not None]
    assert set(days) <= set(partitions)
    assert head is not None


# ---- Dagster -----------------------------------------------------------------------------------------------------


def test_the_asset_and_its_job_are_partitioned_and_the_schedule_requests_the_last_day(project: Project) -> None:
    project.write_spec(partitioned_spec(schedule={"cron": "0 2 * * *", "timezone": "UTC"}))
    defs = build_definitions(project.specs_dir)
    asset = defs.resolve_assets_def("events")
    assert isinstance(asset.partitions_def, dg.DailyPartitionsDefinition)
    assert asset.partitions_def.get_first_partition_key() == "2024-01-01"
    job = defs.resolve_job_def("events__job")
    assert job.partitions_def == asset.partitions_def
    schedule = defs.resolve_schedule_def("events__schedule")
    assert schedule.cron_schedule == "0 2 * * *"
    tick = dt.datetime(2024, 3, 5, 2, 0, tzinfo=dt.timezone.utc)
    with dg.build_schedule_context(scheduled_execution_time=tick, repository_def=defs.get_repository_def()) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == "2024-03-04"


def test_a_run_without_a_partition_key_fails_naming_it(project: Project) -> None:
    project.write_spec(partitioned_spec())
    project.write_data("events/2024-01-31.csv", day_csv("2024-01-31", range(1, 3)))
    defs = build_definitions(project.specs_dir)
    job = defs.resolve_job_def("events__job")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    (message,) = failures(result)
    assert "events is partitioned (daily): a run needs a partition key (--partition 2024-01-31" in message
    assert not project.warehouse.exists()  # failed before anything was read or created


# ---- the command line --------------------------------------------------------------------------------------------


def _dagster(project: Project, tmp_path: Any, *args: str) -> Any:
    from dativo_dagster_tests.test_cli_materialize import DAGSTER, clean_env  # noqa: PLC0415

    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "events", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(home)),
        cwd=tmp_path,
    )


def test_dagster_asset_materialize_with_a_partition_and_a_partition_range(project: Project, tmp_path: Any) -> None:
    project.write_spec(partitioned_spec())
    # an unpartitioned asset of the same data product: its group job must still build
    project.write_spec(base_spec("people"))
    project.write_data("people.csv", "id,name\n1,a\n")
    for day, ids in (("2024-01-30", range(1, 3)), ("2024-01-31", range(5, 8)), ("2024-02-01", range(9, 10))):
        project.write_data(f"events/{day}.csv", day_csv(day, ids))

    proc = _dagster(project, tmp_path, "--partition", "2024-01-31")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(project) == Counter((i, "2024-01-31", f"v1-{i}") for i in range(5, 8))

    # a range would be one run over several partitions: Dagster refuses it for an asset without a single-run
    # backfill policy (a backfill runs one partition per run, through the UI or the daemon); the table is as it was
    proc = _dagster(project, tmp_path, "--partition-range", "2024-01-30...2024-02-01")
    assert proc.returncode != 0
    assert "partition ranges for assets without a single-run backfill policy" in proc.stderr
    assert rows(project) == Counter((i, "2024-01-31", f"v1-{i}") for i in range(5, 8))

    proc = _dagster(project, tmp_path)
    assert proc.returncode != 0
    assert "Asset has partitions, but no '--partition' option was provided" in proc.stderr
    assert rows(project) == Counter((i, "2024-01-31", f"v1-{i}") for i in range(5, 8))


def test_dativo_dagster_materialize_takes_a_partition(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    from dativo_dagster.cli import main  # noqa: PLC0415

    project.write_spec(partitioned_spec())
    project.write_spec(base_spec("people"))
    project.write_data("people.csv", "id,name\n1,a\n")
    project.write_data("events/2024-01-31.csv", day_csv("2024-01-31", range(5, 8)))
    specs = ["materialize", "--specs", str(project.specs_dir)]

    assert main(specs) == 2
    assert "time-partitioned asset(s) events need --partition KEY" in capsys.readouterr().err
    assert main([*specs, "--partition", "2024-01-31"]) == 2
    assert "--partition applies to time-partitioned assets only; not partitioned: people" in capsys.readouterr().err
    assert main([*specs, "--select", "events", "--partition", "2024-1-31"]) == 2
    assert "events: no partition '2024-1-31'" in capsys.readouterr().err
    assert not project.warehouse.exists()

    assert main([*specs, "--select", "events", "--partition", "2024-01-31"]) == 0
    assert "events:" in capsys.readouterr().out
    assert rows(project) == Counter((i, "2024-01-31", f"v1-{i}") for i in range(5, 8))


@pytest.mark.parametrize("kind", ["timestamptz", "timestamp"])
def test_hourly_partitions_in_a_zone_replace_their_hour(project: Project, kind: str) -> None:
    """Hourly partitions in Europe/Berlin (UTC+1 in January): partition 2024-01-31-05:00 is 04:00-05:00 UTC for a
    timestamptz field, 05:00-06:00 wall-clock for a timestamp field; a re-run replaces only its hour."""
    spec = partitioned_spec(
        schema=[{"name": "id", "type": "integer", "required": True}, {"name": "at", "type": kind, "required": True}],
        source={"type": "csv", "files": [{"path": "data/events/{partition}.csv"}]},
        target={"partitioning": ["hour(at)"]},
        partitions={"type": "hourly", "start": "2024-01-01 00:00", "field": "at", "timezone": "Europe/Berlin"},
    )
    project.write_spec(spec)
    five, six = ("04", "05") if kind == "timestamptz" else ("05", "06")  # the hours as the CSV writes them
    zone = "Z" if kind == "timestamptz" else ""
    project.write_data("events/2024-01-31-05:00.csv",
                       f"id,at\n1,2024-01-31 {five}:00:00{zone}\n2,2024-01-31 {five}:59:59.999999{zone}\n")
    project.write_data("events/2024-01-31-06:00.csv", f"id,at\n3,2024-01-31 {six}:00:00{zone}\n")
    for key in ("2024-01-31-05:00", "2024-01-31-06:00"):
        result = materialize(project, key)
        assert result.success, failures(result)
    project.write_data("events/2024-01-31-05:00.csv", f"id,at\n4,2024-01-31 {five}:30:00{zone}\n")
    result = materialize(project, "2024-01-31-05:00")
    assert result.success, failures(result)
    assert sorted(r["id"] for r in branch_rows(project.table(TABLE), BRANCH)) == [3, 4]
