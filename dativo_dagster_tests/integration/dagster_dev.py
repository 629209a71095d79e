"""``dagster dev`` for this code location in the background, on loopback, with its GraphQL API.

Plain Python, no pytest::

    with DagsterDev(dagster_home, specs_dir) as dev:
        run_id = dev.launch_assets(["csv_person"])
        assert dev.wait_for_run(run_id) == "SUCCESS"
        print(dev.url)

``dagster dev`` starts the webserver, the daemon and a code server as children: it runs in its own process
group (``start_new_session``) and ``stop()`` signals that group by the id recorded at start. The instance is
the caller's ``DAGSTER_HOME``; the deployment settings come from the caller's environment plus
``DATIVO_ASSET_SPECS_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from .servers import free_ports, stop_group

MODULE = "dativo_dagster.definitions"
LOCATION = MODULE  # `dagster dev -m MODULE` names the code location after the module
REPOSITORY = "__repository__"
ASSET_JOB = "__ASSET_JOB"
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
STOP_GRACE_SECONDS = 15.0

LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""
RUN_STATUS = "query RunStatus($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"


class DagsterDevError(RuntimeError):
    """``dagster dev`` did not come up, or a run could not be launched; the message holds its log tail."""


class DagsterDev:
    """One ``dagster dev -m dativo_dagster.definitions`` on 127.0.0.1 and a free port."""

    def __init__(
        self, dagster_home: Path, specs_dir: Path, env: Mapping[str, str] | None = None, module: str = MODULE
    ):
        self.dagster_home = dagster_home
        self.module = module  # the code location's module (and so its name)
        self.specs_dir = specs_dir
        self.env = dict(env if env is not None else os.environ)
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = dagster_home / "dagster-dev.log"
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> DagsterDev:
        """Start it and wait until ``/server_info`` answers and the code location has loaded."""
        began = time.monotonic()
        self.port = free_ports(1)[0]
        env = {**self.env, "DAGSTER_HOME": str(self.dagster_home), "DATIVO_ASSET_SPECS_DIR": str(self.specs_dir)}
        dagster = Path(sys.executable).parent / "dagster"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(dagster), "dev", "-m", self.module, "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dagster_home,
                start_new_session=True,
            )
        deadline = began + timeout
        try:
            while not self._location_loaded():
                if self.process.poll() is not None:
                    raise DagsterDevError(f"dagster dev exited with code {self.process.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise DagsterDevError(f"dagster dev was not ready within {timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _location_loaded(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=2):  # noqa: S310 - loopback
                pass
            data = self.graphql(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus"
                " locationOrLoadError { __typename ... on PythonError { message } } } } } }"
            )
        except (OSError, DagsterDevError):
            return False
        entries = data["workspaceOrError"].get("locationEntries") or []
        for entry in entries:
            error = entry.get("locationOrLoadError") or {}
            if error.get("__typename") == "PythonError":
                raise DagsterDevError(f"code location {entry['name']} failed to load: {error.get('message')}")
        return any(e["name"] == self.module and e["loadStatus"] == "LOADED" and e["locationOrLoadError"] for e in entries)

    def stop(self) -> None:
        """Interrupt the process group (as Ctrl-C would), then terminate, then kill what is left."""
        proc, self.process = self.process, None
        if proc is None:
            return
        stop_group(proc, (signal.SIGINT, signal.SIGTERM, signal.SIGKILL), STOP_GRACE_SECONDS)
        # children that outlived dagster dev itself (none expected)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> DagsterDev:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------------------------------ GraphQL
    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """POST one query to ``/graphql``; returns ``data``. Raises on transport or GraphQL errors."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                payload = json.load(response)
        except urllib.error.HTTPError as exc:
            raise DagsterDevError(f"GraphQL HTTP {exc.code}: {exc.read()[:2000]!r}") from exc
        if payload.get("errors"):
            raise DagsterDevError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def launch_assets(self, asset_names: Sequence[str], run_config: Mapping[str, Any] | None = None, *,
                      tags: Mapping[str, str] | None = None) -> str:
        """Launch a run of the implicit asset job for these assets (and their checks), with these run tags (one
        partition: ``{"dagster/partition": key}``, as the UI's asset page sends it); returns the run id."""
        params: dict[str, Any] = {
            "selector": {
                "repositoryLocationName": self.module,
                "repositoryName": REPOSITORY,
                "jobName": ASSET_JOB,
                "assetSelection": [{"path": [name]} for name in asset_names],
            },
            "runConfigData": json.dumps(dict(run_config or {})),
        }
        if tags:
            params["executionMetadata"] = {"tags": [{"key": key, "value": value} for key, value in tags.items()]}
        result = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise DagsterDevError(f"launchRun failed: {result}")
        return result["run"]["runId"]

    def wait_for_run(self, run_id: str, timeout: float = 120.0) -> str:
        """Poll until the run finishes; returns its status (SUCCESS, FAILURE or CANCELED)."""
        return self.wait_for(
            f"run {run_id}", lambda: self.graphql(RUN_STATUS, {"id": run_id})["runOrError"].get("status", "UNKNOWN"),
            FINISHED, timeout=timeout, interval=0.5,
        )

    def wait_for(self, what: str, status_of: Callable[[], str], finished: Collection[str], *, timeout: float,
                 interval: float) -> str:
        """Poll ``status_of()`` every ``interval`` seconds until it returns one of ``finished``, and return that;
        after ``timeout`` seconds raise, naming ``what`` and its last status, with the log's tail."""
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        while time.monotonic() < deadline:
            status = status_of()
            if status in finished:
                return status
            time.sleep(interval)
        raise DagsterDevError(f"{what} still {status} after {timeout:.0f} s:\n{self.log_tail()}")


__all__ = ["ASSET_JOB", "LOCATION", "DagsterDev", "DagsterDevError"]
