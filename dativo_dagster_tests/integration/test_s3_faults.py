"""Object storage faults against a real S3 API (SeaweedFS): throttling (503 SlowDown) on every kind of write,
for a while and for good, and the server going down in the middle of a run's uploads. Each run either lands
every row exactly once (read back with pyiceberg and DuckDB) or fails at its write step with the table
unchanged; either way the bucket holds no data object that the table does not reference."""

from __future__ import annotations

import functools
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from botocore.awsrequest import AWSResponse
from botocore.retries.standard import ExponentialBackoff
from pyiceberg.table import Table
from pyiceberg.utils.concurrent import ExecutorFactory

import dativo_dagster.storage as storage_module
import dativo_dagster.write as write_module
from dativo_dagster import maintenance
from dativo_dagster.definitions import build_definitions
from dativo_dagster.jobs import MAINTENANCE_JOB
from dativo_dagster.maintenance import MIN_AGE_HOURS
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows, duckdb_branch_rows

from .deployment import Deployment, failure_messages, list_keys, make_deployment, run, run_text
from .servers import SeaweedFS
from .test_servers import duckdb_for

RETRIES = 2
BRANCH = "acme"
REGIONS = ("eu", "us", "apac")  # one data file per region and run
# botocore's client config (storage._boto3_s3): retries={"max_attempts": 5} is 5 retries, 6 attempts in all
ATTEMPTS_PER_REQUEST = 6
SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>injected</RequestId></Error>"
)

Row = tuple[int, str, str, str]  # id, name, region, _source_file
_build_client = storage_module._boto3_s3.__wrapped__  # the package's client factory, without its cache


class _Body:
    """The raw body of an injected response (what ``AWSResponse.content`` streams)."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data



@pytest.fixture(autouse=True)
def uploads_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The files still open at the end of a run go up on pyiceberg's thread pool; with one thread they go in
    order, so that the faults below fall on the uploads these tests count (the pool's own failure handling with
    several threads: ``test_s3_storage.py``)."""
    serial = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(ExecutorFactory, "_instance", serial)
    monkeypatch.setattr(ExecutorFactory, "_instance_pid", os.getpid())
    yield
    serial.shutdown()

class SlowDown:
    """S3 throttling injected into every boto3 client of the package: a botocore ``before-send`` handler on the
    writes (``PutObject``, ``CreateMultipartUpload``, ``UploadPart``) answers ``503 SlowDown`` instead of sending
    the request, for the calls that ``refuse(operation, n)`` picks (``n``: the operation's call number from 1,
    over all clients, retries included); the other calls reach the server. botocore's own retry handler sees
    the answer as it would a real one."""

    WRITES = ("PutObject", "CreateMultipartUpload", "UploadPart")

    def __init__(self, refuse: Callable[[str, int], bool]):
        self.refuse = refuse
        self.calls: list[tuple[str, bool]] = []  # (operation, refused) in the order they were sent
        self._lock = threading.Lock()

    @property
    def refused(self) -> Counter[str]:
        """Refused calls per operation."""
        return Counter(operation for operation, refused in self.calls if refused)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Patch the client factory of ``storage`` so that every client it makes carries the handler, and scale
        botocore's throttling backoff (1 s, doubling, up to 20 s) down to its non-throttling one (50 ms) so that
        a hundred retried requests take seconds; the retries themselves are botocore's."""
        clients: dict[storage_module.S3Settings, Any] = {}

        def client_with_throttling(s3: storage_module.S3Settings) -> Any:
            with self._lock:
                if s3 not in clients:
                    client = _build_client(s3)
                    for operation in self.WRITES:
                        client.meta.events.register(
                            f"before-send.s3.{operation}", functools.partial(self._before_send, operation)
                        )
                    clients[s3] = client
                return clients[s3]

        monkeypatch.setattr(storage_module, "_boto3_s3", client_with_throttling)
        monkeypatch.setitem(ExponentialBackoff._DEFAULT_BACKOFF_CONFIG, "throttling_base_scale", 0.05)

    def _before_send(self, operation: str, request: Any, **_: Any) -> AWSResponse | None:
        with self._lock:
            refused = self.refuse(operation, 1 + sum(1 for called, _ in self.calls if called == operation))
            self.calls.append((operation, refused))
        if not refused:
            return None
        headers = {"Content-Type": "application/xml", "x-amz-request-id": "injected"}
        return AWSResponse(request.url, 503, headers, _Body(SLOW_DOWN_BODY))


def staged_files(staging: Path) -> list[Path]:
    """Data files staged for upload and not removed (Dagster's ephemeral instance keeps a folder there too)."""
    return sorted(staging.rglob("dativo-*.parquet"))


def regions_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """Incremental over ``data/<name>/*.csv``, one partition (so one data file per run) per region."""
    return base_spec(
        name,
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "name", "type": "string"},
            {"name": "region", "type": "string", "required": True},
        ],
        source={"type": "csv", "files": [{"path": f"data/{name}/*.csv"}],
                "incremental": {"strategy": "file_modified_time", "lookback_days": 0}},
        target={"partitioning": ["region"]},
        retry_config={"max_retries": RETRIES, "retry_delay_seconds": 0},
        **overrides,
    )


def write_source(project: Project, name: str, file: str, ids: range) -> Counter[Row]:
    """A CSV of rows spread over every region; returns the rows the table must hold for it."""
    lines = [f"{i},name-{i},{REGIONS[i % len(REGIONS)]}" for i in ids]
    path = project.write_data(f"{name}/{file}", "id,name,region\n" + "\n".join(lines) + "\n")
    return Counter((i, f"name-{i}", REGIONS[i % len(REGIONS)], str(path)) for i in ids)


def retries_of(result: dg.ExecuteInProcessResult, step_suffix: str) -> int:
    return sum(
        1 for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY and (e.step_key or "").endswith(step_suffix)
    )


def table_rows(table: Table) -> Counter[Row]:
    return Counter((r["id"], r["name"], r["region"], r["_source_file"]) for r in branch_rows(table, BRANCH))


def duckdb_table_rows(server: SeaweedFS, table: Table) -> Counter[Row]:
    con = duckdb_for(server)
    try:
        rows = duckdb_branch_rows(con, table, BRANCH, columns="id, name, region, _source_file")
    finally:
        con.close()
    return Counter(tuple(row) for row in rows)  # type: ignore[misc]


def referenced_keys(table: Table, bucket: str) -> set[str]:
    """Keys of the data files that any snapshot of the table references."""
    files = table.inspect.all_files()
    paths = files.column("file_path").to_pylist() if files.num_rows else []
    assert all(p.startswith(f"s3://{bucket}/") for p in paths)
    return {p.removeprefix(f"s3://{bucket}/") for p in paths}


def data_keys(deployment: Deployment, name: str) -> set[str]:
    """Every object under the table location's ``data/`` folder, committed or not."""
    location = deployment.expected_location("testdomain", "testproduct", name)
    prefix = location.removeprefix(f"s3://{deployment.bucket}/") + "/data/"
    return set(list_keys(deployment.seaweedfs, deployment.bucket, prefix))


def no_incomplete_uploads(seaweedfs: SeaweedFS, bucket: str) -> bool:
    return not seaweedfs.boto3_client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def failure_metadata(result: dg.ExecuteInProcessResult, step_suffix: str) -> dict[str, Any]:
    """The metadata of the step's final failure (``retryable``, ``error_class``...)."""
    [event] = [e for e in result.get_step_failure_events() if (e.step_key or "").endswith(step_suffix)]
    data = event.step_failure_data.user_failure_data
    assert data is not None, event.step_failure_data.error
    return {k: v.value for k, v in data.metadata.items()}


def sqlite_deployment(
    server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Deployment, Project]:
    """A deployment on ``server`` with the SQLite catalog, applied to the environment, and an empty project."""
    deployment = make_deployment("sqlite", server, None, tmp_path)
    deployment.apply(monkeypatch)
    return deployment, Project(tmp_path / "project")


def after_a_first_run(
    server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Deployment, Project, Counter[Row]]:
    """A deployment on ``server`` whose table ``people`` holds a first file's rows (returned)."""
    deployment, project = sqlite_deployment(server, tmp_path, monkeypatch)
    project.write_spec(regions_spec("people"))
    first = write_source(project, "people", "a.csv", range(1, 31))
    assert run(project).success
    return deployment, project, first


def remove_orphans(project: Project, monkeypatch: pytest.MonkeyPatch) -> dg.ExecuteInProcessResult:
    """The maintenance job a day later (its default age limit): every unreferenced file is old enough to go."""
    now = time.time()
    monkeypatch.setattr(maintenance, "wall_clock", lambda: now + (MIN_AGE_HOURS + 1) * 3600)
    return build_definitions(project.specs_dir).resolve_job_def(MAINTENANCE_JOB).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
    )


def test_s3_slowdowns_are_retried_by_botocore_then_by_the_write_step_and_every_row_lands_once(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: Path
) -> None:
    deployment, project = sqlite_deployment(seaweedfs, tmp_path, monkeypatch)
    project.write_spec(regions_spec("people"))
    expected = write_source(project, "people", "a.csv", range(1, 301))
    # the first upload goes through; the next seven are throttled: the second file's six attempts (botocore's
    # retries) all fail, which fails the stream, then the write step's retry sees two more before S3 recovers
    throttle = SlowDown(lambda operation, call: 2 <= call <= 8)
    throttle.install(monkeypatch)
    instance = dg.DagsterInstance.ephemeral()

    result = run(project, instance=instance)

    assert result.success, failure_messages(result)
    assert throttle.refused == {"PutObject": 7}
    assert len(throttle.calls) == 1 + ATTEMPTS_PER_REQUEST + 1 + len(REGIONS)  # every call was a PutObject
    assert retries_of(result, "__write") == 1 and retries_of(result, "__extract") == 0
    table = deployment.catalog().load_table("testdomain.people")
    assert table_rows(table) == expected
    assert duckdb_table_rows(seaweedfs, table) == expected
    # one file per region, all of the write step's pass: the failed pass's uploaded file was removed again
    referenced = referenced_keys(table, deployment.bucket)
    assert len(referenced) == len(REGIONS)
    assert data_keys(deployment, "people") == referenced
    assert no_incomplete_uploads(seaweedfs, deployment.bucket)
    assert staged_files(staging) == []
    assert "SlowDown" in run_text(instance, result.run_id)


def test_s3_slowdown_that_never_ends_fails_the_write_step_after_its_retries_and_leaves_nothing(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: Path
) -> None:
    deployment, project, first = after_a_first_run(seaweedfs, tmp_path, monkeypatch)
    catalog = deployment.catalog()
    before = catalog.load_table("testdomain.people")
    head_before, files_before = before.snapshot_by_name(BRANCH), data_keys(deployment, "people")
    assert head_before is not None and table_rows(before) == first and len(files_before) == len(REGIONS)
    write_source(project, "people", "b.csv", range(31, 61))
    project.write_spec(regions_spec("fresh"))  # a table the failing run would create
    write_source(project, "fresh", "a.csv", range(1, 31))
    throttle = SlowDown(lambda operation, call: True)
    throttle.install(monkeypatch)
    instance = dg.DagsterInstance.ephemeral()

    result = run(project, instance=instance)

    assert not result.success
    # each pass's first upload is tried 6 times by botocore; each asset streams once, then once per retry
    assert retries_of(result, "people__write") == RETRIES and retries_of(result, "fresh__write") == RETRIES
    assert throttle.calls == [("PutObject", True)] * (2 * (1 + RETRIES) * ATTEMPTS_PER_REQUEST)
    messages = failure_messages(result)
    assert len(messages) == 2
    for name in ("people", "fresh"):
        [message] = [m for m in messages if f"/testdomain/testproduct/{name}/data/region=" in m]
        location = deployment.expected_location("testdomain", "testproduct", name)
        assert f"cannot upload {location}/data/region=" in message and ".parquet" in message
        assert "S3 answered SlowDown: Please reduce your request rate" in message
        assert message.startswith(f"Exceeded max_retries of {RETRIES}")  # it was retryable, and retried
        metadata = failure_metadata(result, f"{name}__write")
        assert metadata["retryable"] is True and metadata["error_class"] == "StorageError"
    text = run_text(instance, result.run_id)
    for secret in deployment.secrets:
        assert secret not in text

    # the table that existed is unchanged; the one the run would have created does not exist
    after = catalog.load_table("testdomain.people")
    head_after = after.snapshot_by_name(BRANCH)
    assert head_after is not None and head_after.snapshot_id == head_before.snapshot_id
    assert table_rows(after) == first
    assert duckdb_table_rows(seaweedfs, after) == first
    assert not catalog.table_exists("testdomain.fresh")
    # no data object besides the first run's files; nothing at all of the table that was dropped again (no
    # data object, and not the metadata file that creating it wrote either)
    assert data_keys(deployment, "people") == files_before == referenced_keys(after, deployment.bucket)
    fresh = deployment.expected_location("testdomain", "testproduct", "fresh")
    assert list_keys(seaweedfs, deployment.bucket, fresh.removeprefix(f"s3://{deployment.bucket}/") + "/") == []
    assert no_incomplete_uploads(seaweedfs, deployment.bucket)
    assert staged_files(staging) == []


def test_throttled_multipart_uploads_are_retried_and_a_failed_one_leaves_no_parts(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: Path
) -> None:
    monkeypatch.setattr(storage_module, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(storage_module, "MULTIPART_CHUNK", 5 << 20)  # S3's smallest part
    deployment, project = sqlite_deployment(seaweedfs, tmp_path, monkeypatch)
    project.write_spec(base_spec("wide", source={"type": "csv", "files": [{"path": "data/wide.csv"}]}))
    rnd = random.Random(7)  # noqa: S311 - reproducible test data
    rows = 120_000
    # 64 random hex digits per row: about 9 MB of Parquet that snappy cannot shrink, uploaded in two parts
    path = project.write_data(
        "wide.csv", "id,name\n" + "".join(f"{i},{rnd.getrandbits(256):064x}\n" for i in range(rows))
    )
    expected = {(i, str(path)) for i in range(rows)}

    # every part refused for good: the upload fails and is aborted, its parts are gone
    forever = SlowDown(lambda operation, call: operation == "UploadPart")
    forever.install(monkeypatch)
    failed = run(project)

    assert not failed.success
    [message] = failure_messages(failed)
    assert "cannot upload s3://" in message and "S3 answered SlowDown" in message
    assert forever.refused["UploadPart"] >= ATTEMPTS_PER_REQUEST and set(forever.refused) == {"UploadPart"}
    assert {op for op, _ in forever.calls} == {"CreateMultipartUpload", "UploadPart"}
    assert no_incomplete_uploads(seaweedfs, deployment.bucket)
    assert data_keys(deployment, "wide") == set()
    assert not deployment.catalog().table_exists("testdomain.wide")
    assert staged_files(staging) == []

    # two refusals of each multipart request: botocore's own retries absorb them, the step is not retried
    a_few = SlowDown(lambda operation, call: call <= 2)
    a_few.install(monkeypatch)
    result = run(project)

    assert result.success, failure_messages(result)
    assert a_few.refused == {"CreateMultipartUpload": 2, "UploadPart": 2}
    table = deployment.catalog().load_table("testdomain.wide")
    loaded = branch_rows(table, BRANCH)
    assert len(loaded) == rows and {(r["id"], r["_source_file"]) for r in loaded} == expected
    [key] = referenced_keys(table, deployment.bucket)
    assert data_keys(deployment, "wide") == {key}
    etag = seaweedfs.boto3_client().head_object(Bucket=deployment.bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-2")  # a multipart ETag ends in -<parts>
    assert no_incomplete_uploads(seaweedfs, deployment.bucket)
    assert staged_files(staging) == []


@pytest.fixture
def server() -> Iterator[SeaweedFS]:
    """A SeaweedFS of the test's own: these tests stop it in the middle of a run."""
    own = SeaweedFS()
    own.start()
    try:
        yield own
    finally:
        own.stop()


def test_s3_going_down_during_the_uploads_fails_the_write_step_and_a_run_after_it_is_back_loads_every_row_once(
    server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: Path
) -> None:
    deployment, project, first = after_a_first_run(server, tmp_path, monkeypatch)
    catalog = deployment.catalog()
    head_before = catalog.load_table("testdomain.people").snapshot_by_name(BRANCH)
    files_before = data_keys(deployment, "people")
    assert head_before is not None and len(files_before) == len(REGIONS)
    second = write_source(project, "people", "b.csv", range(31, 61))

    uploaded: list[str] = []
    upload = write_module.upload_s3_file

    def upload_then_go_down(local_path: str, uri: str, *args: Any, **kwargs: Any) -> None:
        upload(local_path, uri, *args, **kwargs)
        uploaded.append(uri)
        if len(uploaded) == 1:
            server.halt()  # the first data file is in; the server is gone before the second

    monkeypatch.setattr(write_module, "upload_s3_file", upload_then_go_down)
    instance = dg.DagsterInstance.ephemeral()
    result = run(project, instance=instance)
    monkeypatch.setattr(write_module, "upload_s3_file", upload)

    assert not result.success
    assert len(uploaded) == 1
    assert retries_of(result, "__write") == RETRIES and retries_of(result, "__extract") == 0
    [message] = failure_messages(result)
    assert f"s3://{deployment.bucket}/warehouse" in message and "Could not connect to the endpoint" in message
    assert failure_metadata(result, "__write")["retryable"] is True
    assert all(secret not in run_text(instance, result.run_id) for secret in deployment.secrets)
    assert staged_files(staging) == []

    server.restart()  # same ports, credentials and data

    # the failed run changed nothing; the file it uploaded before the outage is not referenced
    table = catalog.load_table("testdomain.people")
    head = table.snapshot_by_name(BRANCH)
    assert head is not None and head.snapshot_id == head_before.snapshot_id
    assert table_rows(table) == first
    [orphan] = [uri.removeprefix(f"s3://{deployment.bucket}/") for uri in uploaded]
    assert data_keys(deployment, "people") == files_before | {orphan}

    result = run(project)

    assert result.success, failure_messages(result)
    table = catalog.load_table("testdomain.people")
    assert table_rows(table) == first + second
    assert duckdb_table_rows(server, table) == first + second
    referenced = referenced_keys(table, deployment.bucket)
    assert len(referenced) == 2 * len(REGIONS) and orphan not in referenced
    assert data_keys(deployment, "people") == referenced | {orphan}

    maintenance = remove_orphans(project, monkeypatch)

    assert maintenance.success
    assert maintenance.output_for_node("remove_orphan_files") == 1
    # no object is left but the referenced ones (not even an empty "folder" marker where the orphan was)
    assert data_keys(deployment, "people") == referenced
    assert table_rows(catalog.load_table("testdomain.people")) == first + second


def test_s3_down_before_the_run_fails_it_at_once_with_nothing_written_and_the_next_run_loads_once(
    server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: Path
) -> None:
    deployment, project, first = after_a_first_run(server, tmp_path, monkeypatch)
    files_before = data_keys(deployment, "people")
    second = write_source(project, "people", "b.csv", range(31, 61))

    server.halt()
    instance = dg.DagsterInstance.ephemeral()
    result = run(project, instance=instance)
    server.restart()

    assert not result.success
    [message] = failure_messages(result)
    # met first by loading the table's metadata from the bucket (botocore and pyarrow word it differently)
    assert "Could not connect" in message, message
    # unreachable storage is transient: the step that met it was retried, then the run failed
    assert retries_of(result, "__extract") == RETRIES
    assert all(secret not in run_text(instance, result.run_id) for secret in deployment.secrets)
    catalog = deployment.catalog()
    assert table_rows(catalog.load_table("testdomain.people")) == first
    assert data_keys(deployment, "people") == files_before  # nothing was written
    assert staged_files(staging) == []

    assert run(project).success
    table = catalog.load_table("testdomain.people")
    assert table_rows(table) == first + second
    assert data_keys(deployment, "people") == referenced_keys(table, deployment.bucket)


def test_s3_down_after_the_write_fails_the_commit_with_the_table_unchanged_and_the_next_run_loads_once(
    server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: Path
) -> None:
    import dativo_dagster.assets as assets_module  # noqa: PLC0415 - the commit step's function is patched

    deployment, project, first = after_a_first_run(server, tmp_path, monkeypatch)
    catalog = deployment.catalog()
    head_before = catalog.load_table("testdomain.people").snapshot_by_name(BRANCH)
    assert head_before is not None
    second = write_source(project, "people", "b.csv", range(31, 61))

    commit = assets_module._commit

    halted: list[bool] = []

    def go_down_then_commit(*args: Any, **kwargs: Any) -> Any:
        if not halted:  # the data files are uploaded; the catalog commit must write metadata to S3
            server.halt()
            halted.append(True)
        return commit(*args, **kwargs)

    monkeypatch.setattr(assets_module, "_commit", go_down_then_commit)
    instance = dg.DagsterInstance.ephemeral()
    result = run(project, instance=instance)
    monkeypatch.setattr(assets_module, "_commit", commit)
    server.restart()

    assert not result.success
    assert retries_of(result, "__commit") == RETRIES
    [message] = failure_messages(result)
    assert "Could not connect" in message or "Connection refused" in message, message
    assert all(secret not in run_text(instance, result.run_id) for secret in deployment.secrets)
    table = catalog.load_table("testdomain.people")
    head = table.snapshot_by_name(BRANCH)
    assert head is not None and head.snapshot_id == head_before.snapshot_id
    assert table_rows(table) == first
    orphans = data_keys(deployment, "people") - referenced_keys(table, deployment.bucket)
    assert len(orphans) == len(REGIONS)  # the run's files: uploaded, never referenced

    assert run(project).success
    table = catalog.load_table("testdomain.people")
    assert table_rows(table) == first + second
    assert duckdb_table_rows(server, table) == first + second
    maintenance = remove_orphans(project, monkeypatch)
    assert maintenance.success
    assert data_keys(deployment, "people") == referenced_keys(table, deployment.bucket)
