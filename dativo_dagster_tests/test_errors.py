"""Error classification and retries: transient errors are retried (by the commit loop or the RetryPolicy),
terminal ones fail at once, ``retryable_errors`` widens the transient class; secrets never reach the messages."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import dagster as dg
import pytest
import sqlalchemy.exc
from botocore.exceptions import ClientError, EndpointConnectionError
from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    ForbiddenError,
    NoSuchTableError,
    ServiceUnavailableError,
    TooManyRequestsError,
)

from dativo_dagster import commit as commit_module
from dativo_dagster.assets import retry_policy, to_failure
from dativo_dagster.errors import (
    CatalogAccessError,
    CommitError,
    NothingToReadError,
    SourceError,
    SpecError,
    StorageError,
    ValidationFailedError,
    is_transient,
    redact,
)
from dativo_dagster.spec import load_specs
from dativo_dagster_tests.conftest import Project
from dativo_dagster_tests.table_checks import (
    branch_snapshot_ids,
    csv_text,
    expected_rows,
    iceberg_rows,
    incremental_spec,
)

TABLE = "testdomain.events"


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Put")


def caused(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as exc:  # noqa: BLE001 - the chained exception is the value under test
        return exc


# ---- classification ---------------------------------------------------------------------------------------

TRANSIENT = [
    CommitFailedException("Requirement failed: branch acme has changed"),
    CommitStateUnknownException("gateway timed out"),
    sqlalchemy.exc.OperationalError("UPDATE iceberg_tables", {}, Exception("database is locked")),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("read timed out"),
    socket.timeout("timed out"),
    OSError("Connection refused"),
    OSError(5, "Input/output error"),  # an unknown OSError: one more try is cheap
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    client_error("SlowDown", 503),
    client_error("InternalError", 500),
    client_error("Whatever", 502),
    client_error("TooManyRequestsException", 429),
    ServiceUnavailableError("503"),
    TooManyRequestsError("slow down"),
    CommitError("catalog unreachable"),
    StorageError("cannot read s3://b/k: connection reset"),
    RuntimeError("HTTP 503 Service Unavailable"),
    RuntimeError("upstream answered status=502"),
    # a number in a path is no HTTP status
    CommitError("Iceberg catalog sqlite:////tmp/pytest-403/catalog.db refused (commit): database is locked"),
    OSError("Connection reset while reading s3://bucket/2024/401/part.csv"),
]
TERMINAL = [
    PermissionError(13, "Permission denied"),
    FileNotFoundError(2, "No such file or directory"),
    IsADirectoryError(21, "Is a directory"),
    client_error("AccessDenied", 403),
    client_error("InvalidAccessKeyId", 403),
    client_error("NoSuchBucket", 404),
    ForbiddenError("Forbidden: not allowed"),
    NoSuchTableError("testdomain.events"),
    sqlalchemy.exc.OperationalError("connect", {}, Exception('FATAL: password authentication failed for user "x"')),
    CommitError("Iceberg catalog http://c refused or could not be reached (connect): UnauthorizedError: 401"),
    CatalogAccessError("Iceberg catalog http://c refused the credentials (connect): OAuthError: invalid_client"),
    KeyError("id"),
    TypeError("unsupported operand"),
    AttributeError("no attribute"),
    ValueError("bad value"),
    ValueError("cannot parse /data/500/rows.csv"),
    RuntimeError("S3 answered HTTP 403"),
    OSError("request failed (401)"),
    SourceError("source file not found", path="/x.csv"),
    NothingToReadError("no source file matches /x/*.csv"),
    ValidationFailedError("strict validation failed"),
    SpecError(["x.yaml: name: required"]),
    caused(SourceError("cannot open", path="/x.csv"), ConnectionResetError("reset")),
    OSError(28, "No space left on device"),
    OSError(27, "File too large"),
    OSError(122, "Disk quota exceeded"),
    StorageError("/w/t/data/x.parquet: cannot write: [Errno 28] No space left on device"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_transient_errors(exc: BaseException) -> None:
    assert is_transient(exc) is True


@pytest.mark.parametrize("exc", TERMINAL, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_terminal_errors(exc: BaseException) -> None:
    assert is_transient(exc) is False
    assert is_transient(exc, []) is False  # always a bool: dg.Failure refuses anything else


def test_retryable_errors_add_names_and_patterns_to_the_transient_class() -> None:
    denied = PermissionError(13, "Permission denied: '/lake/x.parquet'")
    assert is_transient(denied, ["PermissionError"]) is True
    assert is_transient(denied, ["OSError"]) is True  # a base class name matches too
    assert is_transient(denied, [r"Permission denied: '/lake/"]) is True
    assert is_transient(denied, ["FileNotFoundError", "quota"]) is False
    assert is_transient(ValueError("disk quota [exceeded"), ["quota [exceeded"]) is True  # not a regex: substring
    assert is_transient(KeyError("x"), ["KeyError"]) is True
    # a terminal error of ours whose cause the spec declares retryable
    wrapped = caused(SourceError("cannot open", path="/x.csv"), PermissionError("denied"))
    assert is_transient(wrapped, ["PermissionError"]) is True
    assert is_transient(wrapped, ["TimeoutError"]) is False


def test_to_failure_allows_retries_only_for_transient_errors_and_redacts(project: Project) -> None:
    spec = incremental_spec(retry_config={"max_retries": 2, "retry_delay_seconds": 0, "retryable_errors": ["Quota"]})
    project.write_spec(spec)
    [loaded] = load_specs(project.specs_dir)
    secret = "s3cr3t-K3y-value"

    transient = to_failure(OSError(f"connection refused by postgresql://u:pw@db/x using {secret}"), loaded, "commit",
                           [secret, None])
    terminal = to_failure(PermissionError("denied"), loaded, "commit", [])
    declared = to_failure(RuntimeError("Quota exceeded"), loaded, "commit", [])

    assert transient.allow_retries is True and terminal.allow_retries is False and declared.allow_retries is True
    for failure in (transient, terminal, declared):
        assert failure.metadata["retryable"].value is failure.allow_retries
    assert secret not in (transient.description or "")
    assert "pw@" not in (transient.description or "")
    assert transient.description == "OSError: connection refused by postgresql://u:***@db/x using ***"
    traceback_text = transient.metadata["traceback"].value
    assert "OSError" in traceback_text and secret not in traceback_text and "u:pw@" not in traceback_text
    assert terminal.metadata["error_class"].value == "PermissionError"


def test_redact() -> None:
    assert redact("key AKIAXYZ and secret abcdEFGH", ["abcdEFGH", None, ""]) == "key AKIAXYZ and secret ***"
    assert redact("postgresql://user:p4ss@host:5432/db", []) == "postgresql://user:***@host:5432/db"
    assert redact("http://id:sec/ret@host", []) == "http://id:***@host"  # a password holding '/'
    assert redact("uri?password=hunter2&x=1 token=abc", []) == "uri?password=***&x=1 token=***"
    # the longer secret first: no part of it may remain
    assert redact("credential client:topsecret", ["secret", "client:topsecret"]) == "credential ***"
    assert redact("a short one: abc", ["abc"]) == "a short one: abc"  # too short to redact safely
    assert redact("nothing to hide", ["absent"]) == "nothing to hide"


def test_retry_policy_from_retry_config(project: Project) -> None:
    project.write_spec(incremental_spec(retry_config={"max_retries": 4, "retry_delay_seconds": 2.5}))
    project.write_spec(incremental_spec("flat", retry_config={"max_retries": 1, "retry_delay_seconds": 1,
                                                              "backoff": "none"}))
    policies = {item.spec.name: retry_policy(item) for item in load_specs(project.specs_dir)}

    exponential = policies["events"]
    assert (exponential.max_retries, exponential.delay) == (4, 2.5)
    assert exponential.backoff == dg.Backoff.EXPONENTIAL and exponential.jitter == dg.Jitter.PLUS_MINUS
    flat = policies["flat"]
    assert (flat.max_retries, flat.delay, flat.backoff, flat.jitter) == (1, 1, None, None)


# ---- retries of a real run --------------------------------------------------------------------------------


def failing_commit(monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]) -> list[int]:
    """Make the next ``len(errors)`` catalog commits raise ``errors`` in turn; returns a call counter."""
    calls: list[int] = []
    original: Callable[..., Any] = commit_module._commit_once

    def commit_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        original(*args, **kwargs)

    monkeypatch.setattr(commit_module, "_commit_once", commit_once)
    monkeypatch.setattr(commit_module, "COMMIT_BACKOFF_SECONDS", (0.0, 0.01))
    return calls


def step_events(result: dg.ExecuteInProcessResult, kind: dg.DagsterEventType, step: str) -> list[Any]:
    return [e for e in result.all_events if e.event_type == kind and e.step_key == f"events.events__{step}"]


def start(project: Project, **retry: Any) -> Any:
    project.write_spec(incremental_spec(retry_config={"max_retries": 3, "retry_delay_seconds": 0, **retry}))
    return project.write_data("events/a.csv", csv_text([1, 2, 3]))


def test_commit_conflicts_are_retried_by_the_commit_loop(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    source = start(project, max_retries=0)
    calls = failing_commit(monkeypatch, [CommitFailedException("branch changed")] * 2)

    result = project.materialize()

    assert result.success
    assert len(calls) == 3
    assert step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "commit") == []
    table = project.table(TABLE)
    assert iceberg_rows(table, "acme") == expected_rows([source])
    assert len(branch_snapshot_ids(table, "acme")) == 2  # main's empty first snapshot, then the one commit


@pytest.mark.parametrize(
    "error",
    [
        OSError("[Errno 111] Connection refused"),
        sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("database is locked")),
    ],
    ids=["connection-refused", "database-locked"],
)
def test_a_transient_error_is_retried_by_the_retry_policy(
    project: Project, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    source = start(project)
    calls = failing_commit(monkeypatch, [error, error])

    result = project.materialize()

    assert result.success
    assert len(calls) == 3
    retries = step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "commit")
    assert len(retries) == 2
    assert step_events(result, dg.DagsterEventType.STEP_RESTARTED, "commit")
    assert iceberg_rows(project.table(TABLE), "acme") == expected_rows([source])


def test_retries_stop_after_max_retries(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    start(project, max_retries=2)
    calls = failing_commit(monkeypatch, [OSError("Connection refused")] * 10)

    result = project.materialize()

    assert not result.success
    assert len(calls) == 3
    assert len(step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "commit")) == 2
    assert iceberg_rows(project.table(TABLE), "acme") == Counter()


def test_a_terminal_error_is_not_retried(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    source = start(project)
    calls = failing_commit(monkeypatch, [PermissionError(13, "Permission denied")])

    result = project.materialize()

    assert not result.success
    assert len(calls) == 1
    assert step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "commit") == []
    [failure] = step_events(result, dg.DagsterEventType.STEP_FAILURE, "commit")
    data = failure.event_specific_data.user_failure_data
    assert "PermissionError" in data.description and data.metadata["retryable"].value is False
    # nothing committed: the next run reads the file
    monkeypatch.undo()
    assert project.materialize().success
    assert iceberg_rows(project.table(TABLE), "acme") == expected_rows([source])


def test_retryable_errors_make_a_terminal_error_retried(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    source = start(project, retryable_errors=["PermissionError"])
    calls = failing_commit(monkeypatch, [PermissionError(13, "Permission denied")] * 2)

    result = project.materialize()

    assert result.success
    assert len(calls) == 3
    assert len(step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "commit")) == 2
    assert iceberg_rows(project.table(TABLE), "acme") == expected_rows([source])


def test_a_commit_whose_response_was_lost_is_not_repeated(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog committed, but the op saw an error (lost response): the retried op finds its run's snapshot."""
    source = start(project)
    original = commit_module._commit_once
    calls: list[int] = []

    def commit_then_fail(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(*args, **kwargs)
        if len(calls) == 1:
            raise OSError("Connection reset by peer")

    monkeypatch.setattr(commit_module, "_commit_once", commit_then_fail)
    result = project.materialize()

    assert result.success
    assert len(calls) == 1, "the retried commit must find the run's snapshot and not commit again"
    assert len(step_events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY, "commit")) == 1
    mats = [e for e in result.get_asset_materialization_events()]
    assert mats[0].materialization.metadata["already_committed"].value is True
    table = project.table(TABLE)
    assert iceberg_rows(table, "acme") == expected_rows([source])
    assert len(branch_snapshot_ids(table, "acme")) == 2
