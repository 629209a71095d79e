"""Runs on Dagster's Celery executor across two worker processes: Redis (Debian's ``redis-server``) as the broker,
the run, event and schedule storage on PostgreSQL (``dagster-postgres``, the shipped ``deploy/dagster.docker.yaml``),
source files, S3 staging and the warehouse on SeaweedFS, the catalog on PostgreSQL (pyiceberg SqlCatalog).

Each run goes through Dagster's own command line with ``DATIVO_EXECUTOR=celery``: the run's process only submits
the steps, the workers (``celery -A dativo_dagster.celery_worker worker --concurrency 1``) execute them. Which worker
executed a step is read from dagster-celery's engine event ("Executing steps <key> in celery worker", with the
worker's name) in the instance's PostgreSQL storage; rows are read back with pyiceberg.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

from dativo_dagster.partitions import PARTITION_KEY_PROPERTY
from dativo_dagster.table_state import RUN_ID_KEY
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

from .celery_cluster import CeleryCluster, RedisServer, steps_by_worker, successful_steps
from .deployment import Deployment, make_deployment, run_text, unique
from .servers import PostgresCluster, SeaweedFS

OPS = ("extract", "validate", "write", "commit")
BRANCH = "acme"
GROUP_ROWS = {"alpha": [(i, f"alpha-{i}") for i in range(1, 41)], "beta": [(i, f"beta-{i}") for i in range(100, 125)]}
PARTITIONS = [f"2024-01-0{day}" for day in range(1, 7)]
# source.fan_out with step_size_mb 1 and four files of a bit more than 1 MiB each: four groups, g0 to g3
FAN_OUT_FILES, FAN_OUT_ROWS_PER_FILE = 4, 36_000


def _partition_rows(key: str) -> list[tuple[int, str, str]]:
    """Five rows per partition, ids unique across partitions: (id, event_date, name)."""
    day = int(key[-2:])
    return [(day * 100 + i, key, f"event-{day}-{i}") for i in range(5)]


class CeleryProject:
    """The project the workers serve (specs written before they start), its deployment and the cluster."""

    def __init__(self, project: Project, deployment: Deployment, cluster: CeleryCluster, sources: str) -> None:
        self.project = project
        self.deployment = deployment
        self.cluster = cluster
        self.sources = sources

    def table(self, name: str, domain: str = "testdomain") -> Table:
        return self.deployment.catalog().load_table(f"{domain}.{name}")


def _write_specs(project: Project, seaweedfs: SeaweedFS, bucket: str) -> None:
    client = seaweedfs.boto3_client()
    for name, rows in GROUP_ROWS.items():
        body = "id,name\n" + "".join(f"{i},{text}\n" for i, text in rows)
        client.put_object(Bucket=bucket, Key=f"group/{name}.csv", Body=body.encode())
        project.write_spec(base_spec(name, source={"type": "csv", "files": [{"path": f"s3://{bucket}/group/{name}.csv"}]}))
    for key in PARTITIONS:
        body = "id,event_date,name\n" + "".join(f"{i},{day},{text}\n" for i, day, text in _partition_rows(key))
        client.put_object(Bucket=bucket, Key=f"events/{key}.csv", Body=body.encode())
    for number in range(FAN_OUT_FILES):
        first = number * FAN_OUT_ROWS_PER_FILE
        body = "id,name\n" + "".join(f"{i},fanned-{i:08d}-abcdefghijkl\n" for i in range(first, first + FAN_OUT_ROWS_PER_FILE))
        assert len(body) > 1024 * 1024
        client.put_object(Bucket=bucket, Key=f"fanned/part-{number}.csv", Body=body.encode())
    project.write_spec(base_spec(
        "fanned", dataProduct="fanout",
        source={"type": "csv", "files": [{"path": f"s3://{bucket}/fanned/*.csv"}], "fan_out": {"step_size_mb": 1}},
    ))
    project.write_spec(base_spec(
        "events",
        dataProduct="backfills",
        schema=[{"name": "id", "type": "integer", "required": True},
                {"name": "event_date", "type": "date", "required": True},
                {"name": "name", "type": "string"}],
        source={"type": "csv", "files": [{"path": f"s3://{bucket}/events/{{partition}}.csv"}]},
        target={"partitioning": ["day(event_date)"]},
        partitions={"type": "daily", "start": "2024-01-01", "field": "event_date"},
    ))


@pytest.fixture(scope="module")
def celery_project(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS, postgres: PostgresCluster,
    redis_broker: RedisServer,
) -> Iterator[CeleryProject]:
    """Specs on SeaweedFS sources, a PostgreSQL SqlCatalog with its warehouse and the S3 staging on SeaweedFS, a
    Dagster instance on PostgreSQL, and two Celery workers of concurrency 1 with that environment."""
    base = tmp_path_factory.mktemp("celery")
    project = Project(base / "project")
    deployment = make_deployment("postgres", seaweedfs, postgres, base)
    deployment.env["DATIVO_STAGING_DIR"] = f"s3://{deployment.bucket}/staging"
    sources = unique("sources-")
    seaweedfs.create_bucket(sources)
    _write_specs(project, seaweedfs, sources)
    cluster = CeleryCluster(base, project.specs_dir, deployment.env, redis_broker, postgres).start()
    try:
        yield CeleryProject(project, deployment, cluster, sources)
    finally:
        cluster.stop()


def _branch_commits(table: Table, branch: str) -> list[dict[str, Any]]:
    """The summaries of the branch's snapshots that carry a run id, newest first."""
    head = table.snapshot_by_name(branch)
    assert head is not None
    return [{**s.summary.additional_properties, "operation": s.summary.operation.value}
            for s in ancestors_of(head, table.metadata)
            if s.summary is not None and RUN_ID_KEY in s.summary.additional_properties]


def _assert_no_secrets(celery_project: CeleryProject, text: str) -> None:
    for secret in [*celery_project.cluster.secrets, *celery_project.deployment.secrets]:
        assert secret not in text


def test_a_group_run_on_celery_runs_its_steps_on_both_workers_and_ends_exact(celery_project: CeleryProject) -> None:
    """`dagster job execute` of the group job (two assets, their steps in parallel): every step is executed by a
    worker, both workers take steps, each table holds its file's rows exactly once from one commit."""
    cluster = celery_project.cluster
    result = cluster.dagster("job", "execute", "-m", "dativo_dagster.definitions", "-j", "testproduct__group_job")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with cluster.instance() as instance:
        [run] = instance.get_runs(filters=dg.RunsFilter(job_name="testproduct__group_job"))
        assert run.status == dg.DagsterRunStatus.SUCCESS
        executed = steps_by_worker(instance, run.run_id)
        steps = {f"{name}.{name}__{op}" for name, op in itertools.product(GROUP_ROWS, OPS)}
        # every step ran in a worker (none in the run's own process), each once, and both workers took a share
        assert set(executed) == steps == successful_steps(instance, run.run_id)
        assert set(executed.values()) == cluster.worker_names, executed
        _assert_no_secrets(celery_project, run_text(instance, run.run_id) + repr(run.run_config))

    for name, rows in GROUP_ROWS.items():
        table = celery_project.table(name)
        got = sorted((row["id"], row["name"]) for row in branch_rows(table, BRANCH))
        assert got == rows
        assert {row["_run_id"] for row in branch_rows(table, BRANCH)} == {run.run_id}
        commits = _branch_commits(table, BRANCH)
        assert [c[RUN_ID_KEY] for c in commits if c["operation"] == "append"] == [run.run_id], commits
        assert {c[RUN_ID_KEY] for c in commits} == {run.run_id}


def test_a_backfill_of_six_partitions_run_concurrently_on_celery_commits_each_partition_once(
    celery_project: CeleryProject,
) -> None:
    """Six partition runs started at once (`dagster asset materialize --partition`, each on the Celery executor):
    their steps share the two workers, the runs overlap in time, and the table holds every partition's rows exactly
    once, each partition from one commit of its own run."""
    cluster = celery_project.cluster
    logs = cluster.base_dir / "backfill"
    logs.mkdir()
    started = {
        key: cluster.start_dagster("asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "events",
                                   "--partition", key, log_path=logs / f"{key}.log")
        for key in PARTITIONS
    }
    deadline = time.monotonic() + 900
    for key, process in started.items():
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, (logs / f"{key}.log").read_text()[-4000:]

    with cluster.instance() as instance:
        records = {}
        workers: Counter[str] = Counter()
        for key in PARTITIONS:
            [record] = instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/partition": key}))
            assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            records[key] = record
            run_id = record.dagster_run.run_id
            executed = steps_by_worker(instance, run_id)
            assert set(executed) == {f"events.events__{op}" for op in OPS} == successful_steps(instance, run_id)
            workers.update(executed.values())
            _assert_no_secrets(celery_project, run_text(instance, run_id))
        assert set(workers) == cluster.worker_names, workers
        # the race happened: runs were in flight at the same time
        spans = [(r.start_time, r.end_time) for r in records.values()]
        assert all(start is not None and end is not None for start, end in spans)
        overlapping = [(a, b) for a, b in itertools.combinations(spans, 2) if a[0] < b[1] and b[0] < a[1]]
        assert overlapping, spans

    table = celery_project.table("events")
    rows = branch_rows(table, BRANCH)
    got = sorted((row["id"], row["event_date"].isoformat(), row["name"]) for row in rows)
    assert got == sorted(itertools.chain.from_iterable(_partition_rows(key) for key in PARTITIONS))
    run_of = {key: record.dagster_run.run_id for key, record in records.items()}
    assert {row["_run_id"] for row in rows if row["event_date"].isoformat() == PARTITIONS[0]} == {run_of[PARTITIONS[0]]}
    # one commit per partition, by its own run: a commit may be several chained snapshots (the window's delete,
    # then the append), all carrying the run id; each commit has one append
    commits = _branch_commits(table, BRANCH)
    assert {(c[RUN_ID_KEY], c[PARTITION_KEY_PROPERTY]) for c in commits} == {(r, k) for k, r in run_of.items()}
    appends = Counter((c[RUN_ID_KEY], c[PARTITION_KEY_PROPERTY]) for c in commits if c["operation"] == "append")
    assert appends == {(run_id, key): 1 for key, run_id in run_of.items()}, commits


def test_a_fan_out_run_on_celery_streams_its_groups_on_both_workers_and_commits_once(
    celery_project: CeleryProject,
) -> None:
    """`dagster asset materialize` of a spec with `source.fan_out` (four groups): the mapped extract steps are
    submitted together and run on both workers, and the run ends with every row of every file exactly once, in one
    commit."""
    cluster = celery_project.cluster
    result = cluster.dagster("asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "fanned")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    groups = [f"fanned.fanned__extract[g{i}]" for i in range(FAN_OUT_FILES)]
    with cluster.instance() as instance:
        [record] = [r for r in instance.get_run_records() if r.dagster_run.asset_selection == {dg.AssetKey("fanned")}]
        run_id = record.dagster_run.run_id
        assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        executed = steps_by_worker(instance, run_id)
        steps = {"fanned.fanned__plan", *groups, *(f"fanned.fanned__{op}" for op in OPS if op != "extract")}
        assert set(executed) == steps == successful_steps(instance, run_id)
        assert {executed[key] for key in groups} == cluster.worker_names, executed
        # the groups were offered to the workers together: every group's task was submitted before the first
        # group finished (one worker that took them all would have shown the same events, hence the check above)
        submitted = [e.timestamp for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                     if e.step_key in groups and e.dagster_event is not None
                     and (e.dagster_event.message or "").startswith("Submitting celery task")]
        finished = [e.timestamp for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
                    if e.step_key in groups]
        assert len(submitted) == len(finished) == FAN_OUT_FILES
        assert max(submitted) < min(finished), (submitted, finished)
        _assert_no_secrets(celery_project, run_text(instance, run_id))

    table = celery_project.table("fanned")
    rows = table.scan(snapshot_id=table.snapshot_by_name(BRANCH).snapshot_id,
                      selected_fields=("id", "_run_id", "_source_file")).to_arrow()
    assert sorted(rows["id"].to_pylist()) == list(range(FAN_OUT_FILES * FAN_OUT_ROWS_PER_FILE))
    assert set(rows["_run_id"].to_pylist()) == {run_id}
    assert set(rows["_source_file"].to_pylist()) == {
        f"s3://{celery_project.sources}/fanned/part-{n}.csv" for n in range(FAN_OUT_FILES)}
    commits = _branch_commits(table, BRANCH)
    assert [c["operation"] for c in commits] == ["append"] and commits[0][RUN_ID_KEY] == run_id
