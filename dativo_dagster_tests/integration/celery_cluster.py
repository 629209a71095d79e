"""Dagster's Celery executor on real servers: a private Redis (Debian's ``redis-server``) as the broker, a Dagster
instance whose storage is the test PostgreSQL (the shipped ``deploy/dagster.docker.yaml``), and Celery worker
processes (``celery -A dativo_dagster.celery_worker worker``) with the environment of a SeaweedFS deployment.

Plain Python, no pytest: the fixtures in conftest.py and the tests compose it. Every process binds loopback only,
runs in its own process group and is stopped by the id recorded at start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import redis

from .servers import DEFAULT_TIMEOUT, STOP_GRACE_SECONDS, PostgresCluster, ServerError, _tail, free_ports, stop_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHIPPED_INSTANCE = ROOT / "deploy" / "dagster.docker.yaml"
CELERY_WORKER_KEY = "Celery worker"  # metadata of dagster-celery's engine event "Executing steps X in celery worker"


def _stop_group(process: subprocess.Popen[bytes] | None, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the process group started with ``process`` (its own session), SIGKILL after ``grace``."""
    if process is None or process.poll() is not None:
        return
    stop_group(process, (signal.SIGTERM, signal.SIGKILL), grace)


class RedisServer:
    """A private ``redis-server`` on a free loopback port, no persistence, with a random password (so that tests can
    check it never shows up). ``url(db)`` is the broker URL; ``client()`` a redis-py client."""

    host = "127.0.0.1"

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self.port: int | None = None
        self.password = secrets.token_urlsafe(18)
        self.base_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, db=db, socket_timeout=5)

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                                  else None)
        if binary is None:
            raise ServerError("redis-server not found: `apt-get install -y redis-server` (.ci/install-system-packages"
                              " does)")
        began = time.monotonic()
        self.base_dir = Path(tempfile.mkdtemp(prefix="dativo-redis-"))
        config = self.base_dir / "redis.conf"  # the password in a file of ours, not on the command line
        atexit.register(self.stop)
        for _attempt in range(3):  # the chosen port can be taken before redis binds it: retry anew
            self.port = free_ports(1)[0]
            config.write_text(
                f"port {self.port}\nbind {self.host}\nprotected-mode yes\nsave \"\"\nappendonly no\n"
                f"daemonize no\ndir {self.base_dir}\nrequirepass {self.password}\n"
            )
            config.chmod(0o600)
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready(began):
                self.startup_seconds = time.monotonic() - began
                return self
            _stop_group(self.process)
        self.stop()
        raise ServerError(f"redis-server did not start\n{_tail(self.log_path)}")

    def _wait_ready(self, began: float) -> bool:
        """Ready = PING answers; False when the server exited (its port was taken)."""
        assert self.process is not None
        while time.monotonic() < began + self.timeout:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return True
            time.sleep(0.05)
        raise ServerError(f"redis-server did not answer PING within {self.timeout:.0f} s\n{_tail(self.log_path)}")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        _stop_group(self.process)
        self.process = None
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None


@dataclass
class CeleryWorker:
    """One ``celery -A dativo_dagster.celery_worker worker`` process (concurrency 1), named ``<name>@<host>``."""

    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: Mapping[str, str], cwd: Path) -> None:
        command = [
            str(BIN / "celery"), "-A", "dativo_dagster.celery_worker", "worker", "--concurrency", "1",
            "--prefetch-multiplier", "1", "-n", f"{self.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        """Celery logs ``<name>@<host> ready.`` once it consumes from the broker."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"worker {self.name} exited with {self.process.returncode}\n{_tail(self.log_path)}")
            if " ready." in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise ServerError(f"worker {self.name} not ready in time\n{_tail(self.log_path)}")

    def stop(self) -> None:
        _stop_group(self.process)


class CeleryCluster:
    """A Dagster instance on PostgreSQL and Celery workers for one project and deployment environment.

    ``env`` is what the code location, ``dagster`` commands and workers get: ``deployment_env`` (CONTRACT 6 on
    SeaweedFS), the project's specs, ``DATIVO_EXECUTOR=celery`` with the broker, and the instance
    (``DAGSTER_HOME``, ``DAGSTER_POSTGRES_*``). ``dagster(*args)`` runs Dagster's command line in it;
    ``instance()`` opens the instance in this process.
    """

    def __init__(self, base_dir: Path, specs_dir: Path, deployment_env: Mapping[str, str], broker: RedisServer,
                 postgres: PostgresCluster, *, workers: int = 2, broker_db: int = 0) -> None:
        self.base_dir = base_dir
        self.specs_dir = specs_dir
        self.home = base_dir / "dagster_home"
        self.broker = broker
        self.postgres = postgres
        self.database = f"dagster_{secrets.token_hex(4)}"
        self.postgres_password = secrets.token_urlsafe(12)  # trust auth ignores it; never shown anywhere
        self.broker_db = broker_db
        self.workers = [CeleryWorker(f"w{i + 1}", base_dir / f"worker{i + 1}.log") for i in range(workers)]
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_", "AWS_"))}
        self.env: dict[str, str] = {
            **keep,
            **deployment_env,
            "DATIVO_ASSET_SPECS_DIR": str(specs_dir),
            "DATIVO_EXECUTOR": "celery",
            "DATIVO_CELERY_BROKER_URL": broker.url(broker_db),
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_POSTGRES_HOST": postgres.host,
            "DAGSTER_POSTGRES_PORT": str(postgres.port),
            "DAGSTER_POSTGRES_USER": postgres.user,
            "DAGSTER_POSTGRES_PASSWORD": self.postgres_password,
            "DAGSTER_POSTGRES_DB": self.database,
        }

    @property
    def secrets(self) -> list[str]:
        return [self.broker.password, self.postgres_password]

    @property
    def worker_names(self) -> set[str]:
        return {worker.name for worker in self.workers}

    def start(self) -> CeleryCluster:
        self.postgres.create_database(self.database)
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SHIPPED_INSTANCE, self.home / "dagster.yaml")
        self.broker.client(self.broker_db).flushdb()
        atexit.register(self.stop)
        try:
            # the instance's tables, created once before the workers and runs open it concurrently
            self.dagster("instance", "migrate", timeout=180).check_returncode()
            for worker in self.workers:
                worker.start(self.env, self.specs_dir.parent)
            deadline = time.monotonic() + 180
            for worker in self.workers:
                worker.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for worker in self.workers:
            worker.stop()

    def dagster(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``dagster ARGS`` in the cluster's environment, from the project folder."""
        return subprocess.run([str(BIN / "dagster"), *args], env=self.env, cwd=self.specs_dir.parent,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start_dagster(self, *args: str, log_path: Path) -> subprocess.Popen[bytes]:
        """``dagster ARGS`` started in the background (its own process group), output to ``log_path``."""
        with log_path.open("wb") as log:
            return subprocess.Popen([str(BIN / "dagster"), *args], env=self.env, cwd=self.specs_dir.parent,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    @contextlib.contextmanager
    def instance(self) -> dg.DagsterInstance:
        """The Dagster instance (PostgreSQL storage), opened in this process with the cluster's variables."""
        names = ("DAGSTER_HOME", *(k for k in self.env if k.startswith("DAGSTER_POSTGRES_")))
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update({name: self.env[name] for name in names})
        try:
            with dg.DagsterInstance.get() as instance:
                yield instance
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def steps_by_worker(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker (its ``-n`` name before ``@``) that executed it, from the "Celery worker"
    metadata of the engine event that dagster-celery's task reports from the worker before it runs the step."""
    out: dict[str, str] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is None or entry.step_key is None or CELERY_WORKER_KEY not in event.engine_event_data.metadata:
            continue
        hostname = event.engine_event_data.metadata[CELERY_WORKER_KEY].value
        assert entry.step_key not in out, f"step {entry.step_key} executed twice"
        out[entry.step_key] = str(hostname).split("@", 1)[0]
    return out


def successful_steps(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    return {e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}


def run_ids(instance: dg.DagsterInstance, tags: Mapping[str, str] | None = None) -> Sequence[str]:
    return [run.run_id for run in instance.get_runs(filters=dg.RunsFilter(tags=dict(tags or {})))]
