"""docker-compose.yml's Dagster services run without Docker: the `code`, `webserver` and `daemon` services' own
commands and environment, read from the compose file and interpolated as Compose does with the test servers'
credentials as the `.env`, on the shipped deploy/ files (the image's `$DAGSTER_HOME/dagster.yaml` and workspace), with
the compose service names replaced by 127.0.0.1 and the container ports by the test servers' ports. A run queued
through the webserver is dequeued by the daemon, executed by the code server, and its rows are read back with
pyiceberg from SeaweedFS's REST catalog."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pytest
import yaml
from pyiceberg.catalog.rest import RestCatalog

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster_tests.compose_file import load_compose, service_environment

from .dagster_dev import ASSET_JOB, LAUNCH_RUN, REPOSITORY
from .deployment import branch_head
from .servers import PostgresCluster, SeaweedFS, free_ports, stop_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOCATION = "dativo_dagster"  # deploy/workspace.docker.yaml's location_name
ASSET, TABLE, BRANCH = "csv_person", "adventureworks.csv_person", "demo_tenant"
STOP_GRACE_SECONDS = 15.0
RUN_EVENTS = """
query RunEvents($id: ID!) {
  runOrError(runId: $id) {
    __typename
    ... on Run { status eventConnection(afterCursor: null) { events { __typename } } }
  }
}
"""


@dataclass
class Service:
    """One compose service's process, in its own process group (stopped by the group id recorded at start)."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, cwd: Path) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        stop_group(proc, (signal.SIGTERM, signal.SIGKILL), STOP_GRACE_SECONDS)
        with contextlib.suppress(ProcessLookupError):  # run workers it started, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_GRACE_SECONDS  # killed children are gone once init has reaped them
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    def group_alive(self) -> bool:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])


class Translation:
    """What differs between a container of the stack and this machine: service host names and container ports
    (to 127.0.0.1 and the test ports), and the image's paths (to this checkout and temporary folders)."""

    def __init__(self, ports: Mapping[tuple[str, int], int], paths: Mapping[str, Path]) -> None:
        self.ports = dict(ports)
        self.paths = dict(sorted(paths.items(), key=lambda item: -len(item[0])))  # longest path first

    def text(self, value: str, service: str) -> str:
        for (host, port), test_port in self.ports.items():
            value = value.replace(f"//{host}:{port}", f"//127.0.0.1:{test_port}")
            if host == service:  # the service's own address, as its healthcheck uses it
                value = value.replace(f"//127.0.0.1:{port}", f"//127.0.0.1:{test_port}")
        for image_path, path in self.paths.items():
            value = value.replace(image_path, str(path))
        return value

    def command(self, command: list[str], service: str) -> list[str]:
        out = [self.text(part, service) for part in command]
        for index in range(1, len(command)):
            if command[index - 1] == "-h":
                out[index] = "127.0.0.1"  # 0.0.0.0 in a container; loopback only here
            elif command[index - 1] == "-p":
                out[index] = str(self.ports[(service, int(command[index]))])
        executable = BIN / out[0]
        out[0] = str(executable if executable.exists() else out[0])
        return out

    def environment(self, env: Mapping[str, str], service: str) -> dict[str, str]:
        out = {key: self.text(value, service) for key, value in env.items()}
        # HOST / PORT pairs naming a compose service (DAGSTER_POSTGRES_HOST=postgres, DAGSTER_POSTGRES_PORT=5432)
        for key, value in env.items():
            if key.endswith("_HOST") and any(host == value for host, _ in self.ports):
                port_key = key[: -len("_HOST")] + "_PORT"
                out[key] = "127.0.0.1"
                out[port_key] = str(self.ports[(value, int(env[port_key]))])
        return out


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    block = re.search(r"^ENV (.+?)(?=\n\S)", text, flags=re.MULTILINE | re.DOTALL)
    assert block
    return dict(re.findall(r"([A-Z0-9_]+)=(\S+)", block.group(1)))


def graphql(url: str, query: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": dict(variables)}).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        payload = json.load(response)
    assert not payload.get("errors"), payload["errors"]
    return payload["data"]


def run_healthcheck(service: dict[str, Any], name: str, env: dict[str, str], translate: Translation) -> int:
    """Run a compose service's healthcheck command (``CMD`` form) here; its exit code."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test
    command = translate.command(test[1:], name)
    if command[0] == "python":
        command[0] = sys.executable
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=60, check=False).returncode


def wait_for(what: str, check: Any, services: list[Service], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for service in services:
            assert service.process is not None
            if service.process.poll() is not None:
                pytest.fail(f"{service.name} exited with {service.process.returncode} while waiting for {what}\n"
                            + "\n".join(s.log_tail() for s in services))
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:.0f} s\n" + "\n".join(s.log_tail() for s in services))
        time.sleep(0.5)


@pytest.fixture
def stack(
    seaweedfs: SeaweedFS, postgres: PostgresCluster, tmp_path: Path
) -> Iterator[tuple[dict[str, Any], Translation, dict[str, Service]]]:
    database = f"compose_{uuid.uuid4().hex[:10]}"
    postgres.create_database(database)
    # what a user's .env would hold for these servers
    dotenv = {
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_REGION": seaweedfs.region,
        "WAREHOUSE_BUCKET": seaweedfs.table_bucket,
        "DAGSTER_POSTGRES_USER": postgres.user,
        "DAGSTER_POSTGRES_PASSWORD": "unused-the-test-cluster-trusts-loopback",
        "DAGSTER_POSTGRES_DB": database,
    }
    compose = load_compose(dotenv)
    services = compose["services"]
    code_port, webserver_port = free_ports(2)
    seaweed_cmd = services["seaweedfs"]["command"]
    s3_port = int(next(p for p in seaweed_cmd if p.startswith("-s3.port=")).split("=")[1])
    rest_port = int(next(p for p in seaweed_cmd if p.startswith("-s3.port.iceberg=")).split("=")[1])
    ports = {
        ("code", 4000): code_port,
        ("webserver", 3000): webserver_port,
        ("postgres", 5432): postgres.port,
        ("seaweedfs", s3_port): seaweedfs.s3_port,
        ("seaweedfs", rest_port): seaweedfs.iceberg_port,
    }
    image_env = dockerfile_env()
    # the image's $DAGSTER_HOME/dagster.yaml and workspace file (Dockerfile COPY lines, checked by test_compose.py)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "deploy" / "dagster.docker.yaml").read_text())
    workspace = yaml.safe_load((ROOT / "deploy" / "workspace.docker.yaml").read_text())
    for entry in workspace["load_from"]:
        server = entry["grpc_server"]
        server["port"] = ports[(server["host"], server["port"])]
        server["host"] = "127.0.0.1"
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    (tmp_path / "staging").mkdir()
    translate = Translation(
        ports,
        {
            image_env["DAGSTER_HOME"]: home,
            "/opt/dagster/workspace.docker.yaml": tmp_path / "workspace.yaml",
            "/opt/dagster/seaweedfs.py": ROOT / "deploy" / "seaweedfs.py",
            "/opt/dagster/staging": tmp_path / "staging",
            "/opt/dagster/app": ROOT,  # the image's WORKDIR: the project's specs and data
        },
    )
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    processes: dict[str, Service] = {}
    for name in ("code", "webserver", "daemon"):
        service_env = service_environment(services[name])
        env = {**translate.environment(image_env, name), **translate.environment(service_env, name)}
        command = translate.command(services[name]["command"], name)
        processes[name] = Service(name, command, {**base, **env}, tmp_path / f"{name}.log")
    try:
        yield compose, translate, processes
    finally:
        for process in processes.values():
            process.stop()


def test_the_compose_services_commands_materialize_an_asset_through_the_daemon(
    stack: tuple[dict[str, Any], Translation, dict[str, Service]], seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    compose, translate, processes = stack
    services = compose["services"]
    code, webserver, daemon = processes["code"], processes["webserver"], processes["daemon"]
    # the shipped settings reached the processes, translated only where a container differs from this machine
    assert code.command[1:] == ["code-server", "start", "-h", "127.0.0.1", "-p", str(translate.ports[("code", 4000)]),
                                "-m", "dativo_dagster.definitions"]
    assert code.env["DATIVO_CATALOG_URI"] == seaweedfs.iceberg_rest_uri
    assert code.env["DATIVO_S3_ENDPOINT"] == seaweedfs.s3_endpoint
    assert code.env["DATIVO_WAREHOUSE"] == seaweedfs.warehouse
    assert code.env["DATIVO_CATALOG_CREDENTIAL"] == seaweedfs.credential
    assert code.env["DATIVO_ASSET_SPECS_DIR"] == str(ROOT / "asset_specs")
    for process in (webserver, daemon):  # no secret, no deployment setting beyond the image's specs folder
        assert {k for k in process.env if k.startswith(("AWS_", "DATIVO_"))} == {"DATIVO_ASSET_SPECS_DIR"}

    # SeaweedFS's healthcheck, as the seaweedfs service runs it, passes against the test server
    seaweedfs_env = {**os.environ, **service_environment(services["seaweedfs"])}
    assert run_healthcheck(services["seaweedfs"], "seaweedfs", seaweedfs_env, translate) == 0

    code.start(ROOT)
    wait_for("the code server's healthcheck",
             lambda: run_healthcheck(services["code"], "code", code.env, translate) == 0, [code], timeout=180)
    webserver.start(ROOT)
    running = [code, webserver]
    url = f"http://127.0.0.1:{translate.ports[('webserver', 3000)]}"
    wait_for("the webserver's healthcheck",
             lambda: run_healthcheck(services["webserver"], "webserver", webserver.env, translate) == 0,
             running, timeout=180)

    def location_loaded() -> bool:
        data = graphql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus"
                            " locationOrLoadError { __typename ... on PythonError { message } } } } } }", {})
        entries = data["workspaceOrError"]["locationEntries"]
        errors = [e for e in entries if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError"]
        assert not errors, errors
        return any(e["name"] == LOCATION and e["loadStatus"] == "LOADED" for e in entries)

    wait_for("the code location in the webserver", location_loaded, running, timeout=120)

    params = {
        "selector": {
            "repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": ASSET_JOB,
            "assetSelection": [{"path": [ASSET]}],
        },
        "runConfigData": "{}",
    }
    launched = graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    state: dict[str, Any] = {}
    # the webserver only queues it (QueuedRunCoordinator): nothing starts it before the daemon runs
    time.sleep(3)
    state.update(graphql(url, RUN_EVENTS, {"id": run_id})["runOrError"])
    assert state["status"] == "QUEUED", state
    daemon.start(ROOT)
    running.append(daemon)

    def finished() -> bool:
        state.update(graphql(url, RUN_EVENTS, {"id": run_id})["runOrError"])
        return state["status"] in ("SUCCESS", "FAILURE", "CANCELED")

    wait_for(f"run {run_id}", finished, running, timeout=420)
    events = [e["__typename"] for e in state["eventConnection"]["events"]]
    assert state["status"] == "SUCCESS", (events, "\n".join(s.log_tail() for s in running))
    # queued by the webserver (QueuedRunCoordinator), dequeued and launched by the daemon, then run to success
    # queued, then started (by the daemon, through the code server) and run to success
    assert events.index("RunEnqueuedEvent") < events.index("RunStartingEvent") < events.index("RunSuccessEvent")
    assert re.search(r"QueuedRunCoordinatorDaemon .* Launched 1 runs", daemon.log_path.read_text(errors="replace")), (
        daemon.log_tail()
    )

    # the rows, read back from the REST catalog on the tenant's branch, by this run's commit
    table = RestCatalog("dativo", **seaweedfs.rest_catalog_properties()).load_table(TABLE)
    head = branch_head(table, BRANCH)
    assert head.summary is not None and head.summary[RUN_ID_KEY] == run_id
    rows = table.scan(snapshot_id=head.snapshot_id).to_arrow()
    source = pa_csv.read_csv(ROOT / "data" / "adventureworks" / "Person.csv")
    assert rows.num_rows == source.num_rows == 10
    assert sorted(rows["BusinessEntityID"].to_pylist()) == sorted(source["BusinessEntityID"].to_pylist())
    assert pc.all(pc.equal(rows["_run_id"], run_id)).as_py()

    for process in running:
        process.stop()
        assert not process.group_alive(), f"{process.name} left processes behind"
