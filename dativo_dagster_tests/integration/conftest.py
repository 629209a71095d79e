"""Fixtures for tests against real servers: SeaweedFS (S3 + Iceberg REST), PostgreSQL, MariaDB and Redis, once per
session.

Every test collected under this folder is marked ``integration`` (deselect with ``-m "not integration"``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from .celery_cluster import RedisServer
from .servers import MariaDBServer, PostgresCluster, SeaweedFS

HERE = Path(__file__).parent.resolve()

# Start-up times of this session's servers, reported at the end of the run.
STARTUP_SECONDS: dict[str, float] = {}

ServerT = TypeVar("ServerT", SeaweedFS, PostgresCluster, MariaDBServer, RedisServer)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _running(server: ServerT, name: str) -> Iterator[ServerT]:
    """Start ``server``, note its start-up time under ``name``, hand it to the session and stop it at the end."""
    server.start()
    assert server.startup_seconds is not None
    STARTUP_SECONDS[name] = server.startup_seconds
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """A running SeaweedFS (``weed mini``): ``s3_endpoint``, ``iceberg_rest_uri``, ``access_key``, ``secret_key``,
    ``region``, ``warehouse`` (``s3://warehouse``, the Iceberg table bucket), ``create_bucket()``,
    ``boto3_client()``, ``rest_catalog_properties()``, ``pyiceberg_s3_properties()``, ``env()``."""
    yield from _running(SeaweedFS(), "SeaweedFS")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running private PostgreSQL cluster: ``host``, ``port``, ``user``, ``sqlalchemy_uri(db)``,
    ``create_database(name)``, ``connect(db)``."""
    yield from _running(PostgresCluster(), "PostgreSQL")


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDBServer]:
    """A running private MariaDB server: ``host``, ``port``, ``user`` (root, no password), ``connect(db)``,
    ``execute(statements, db)``."""
    yield from _running(MariaDBServer(), "MariaDB")


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[RedisServer]:
    """A running private Redis (Debian's ``redis-server``, with a password), the Celery executor's broker: ``url(db)``,
    ``client(db)``, ``password``. ``celery_cluster.CeleryCluster`` adds the Dagster instance and the workers."""
    yield from _running(RedisServer(), "Redis")


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder, where the S3 sink stages data files before uploading them."""
    folder = tmp_path / "staging"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if STARTUP_SECONDS:
        timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in STARTUP_SECONDS.items())
        terminalreporter.write_line(f"integration servers ready after: {timings}")
