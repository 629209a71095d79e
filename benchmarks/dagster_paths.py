"""The two Dagster paths of the benchmark: ``dagster asset materialize`` and a run launched as the UI launches one.

    with DagsterDevServer(dagster, env, home, log) as dev:   # dagster dev: webserver, daemon, code server
        facts = dev.launch_and_wait("bench_person5m")        # GraphQL launchRun of the implicit asset job

A launched run goes the way of the UI's Materialize button: the webserver queues it, the daemon dequeues it, the
run launcher starts a run worker (``dagster api execute_run``) that loads the code location and runs the steps.
Its time is from the launch request to the run's RUN_SUCCESS event (the run worker's clock, the same machine;
the status is polled only every 0.5 s, so that the polling does not compete with the run); the memory of the process
that ran the steps (the run worker) is its peak resident set (``VmHWM``), read every 50 ms from every process
under ``dagster dev`` while the run lasts. ``read_run`` reads a finished run back from
the instance: status, step times, the process of each step, and the materialization's metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODULE = "dativo_dagster.definitions"
LOCATION = MODULE  # `dagster dev -m MODULE` names the code location after the module
ASSET_JOB = "__ASSET_JOB"
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN_STATUS = "query RunStatus($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
LOCATION_STATUS = (
    "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus"
    " locationOrLoadError { __typename ... on PythonError { message } } } } } }"
)


@dataclass
class RunFacts:
    """What the instance says about one finished run, and (launched runs) what watching its worker gave."""

    run_id: str
    status: str
    steps: dict[str, float]  # op (extract, validate, ...) -> STEP_START..STEP_SUCCESS seconds
    step_pids: dict[str, int]  # step key -> pid that ran it
    metadata: dict[str, Any]  # the asset materialization's metadata values
    seconds: float = 0.0  # launched runs: launch request to SUCCESS as the UI sees it
    worker_peak_mib: float = 0.0  # launched runs: the peak VmHWM of the processes that ran the steps
    worker_cpu: float = 0.0  # launched runs: their user + system seconds
    timeline: dict[str, float] = field(default_factory=dict)  # run events (ENQUEUED, STARTING...) -> seconds
    ended: float = 0.0  # time of the run's RUN_SUCCESS (or failure) event


def read_run(home: Path, run_id: str | None = None) -> RunFacts:
    """The run ``run_id`` (default: the only run) of the instance in ``home``."""
    import dagster as dg  # noqa: PLC0415 - only the Dagster rows need it

    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = dg.DagsterInstance.get()
        try:
            run = instance.get_run_by_id(run_id) if run_id else instance.get_runs(limit=1)[0]
            assert run is not None
            spans: dict[str, list[float]] = {}
            pids: dict[str, int] = {}
            metadata: dict[str, Any] = {}
            timeline: dict[str, float] = {}
            for entry in instance.all_logs(run.run_id):
                kind, event = entry.dagster_event_type, entry.dagster_event
                if entry.step_key is None and kind is not None and kind.value not in timeline:
                    timeline[kind.value] = entry.timestamp
                if kind in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS) and entry.step_key:
                    span = spans.setdefault(entry.step_key, [0.0, 0.0])
                    span[0 if kind == dg.DagsterEventType.STEP_START else 1] = entry.timestamp
                    if kind == dg.DagsterEventType.STEP_START and event is not None and event.pid is not None:
                        pids[entry.step_key] = event.pid
                if kind == dg.DagsterEventType.ASSET_MATERIALIZATION and event is not None:
                    mat = event.step_materialization_data.materialization
                    metadata = {k: v.value for k, v in mat.metadata.items()}
            steps = {key.rsplit("__", 1)[-1]: end - start for key, (start, end) in spans.items() if end}
            first = min(timeline.values(), default=0.0)
            ended = max((timeline.get(k, 0.0) for k in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "PIPELINE_CANCELED")))
            return RunFacts(run.run_id, run.status.value, steps, pids, metadata,
                            timeline={k: round(t - first, 2) for k, t in timeline.items()}, ended=ended)
        finally:
            instance.dispose()
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in children.read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += _children(current)
    return found


class DagsterDevServer:
    """``dagster dev`` on loopback in its own process group; stopped by that group's id."""

    def __init__(self, dagster: Path, env: Mapping[str, str], home: Path, log: Path):
        self.dagster, self.env, self.home, self.log = dagster, dict(env), home, log
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DagsterDevServer:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(  # noqa: S603 - our own command
                [str(self.dagster), "dev", "-m", MODULE, "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**self.env, "DAGSTER_HOME": str(self.home)},
                cwd=self.home, start_new_session=True,
            )
        deadline = time.monotonic() + 180
        try:
            while not self._loaded():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dagster dev did not come up:\n{self._log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:]) if self.log.exists() else ""

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            payload = json.load(response)
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def _loaded(self) -> bool:
        try:
            entries = self.graphql(LOCATION_STATUS)["workspaceOrError"].get("locationEntries") or []
        except (OSError, RuntimeError, urllib.error.URLError):
            return False
        for entry in entries:
            error = entry.get("locationOrLoadError") or {}
            if error.get("__typename") == "PythonError":
                raise RuntimeError(f"code location {entry['name']} failed to load: {error.get('message')}")
        return any(e["name"] == LOCATION and e["loadStatus"] == "LOADED" for e in entries)

    def launch_and_wait(self, asset: str, timeout: float = 1800) -> RunFacts:
        """Launch a run of the implicit asset job for ``asset`` as the UI's Materialize button does; wait for it."""
        assert self.process is not None
        params = {
            "selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                         "jobName": ASSET_JOB, "assetSelection": [{"path": [asset]}]},
            "runConfigData": "{}",
        }
        peaks: dict[int, float] = {}
        cpu: dict[int, float] = {}
        ticks = os.sysconf("SC_CLK_TCK")
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                for pid in _descendants(self.process.pid):  # type: ignore[union-attr]
                    with contextlib.suppress(OSError):
                        status = Path(f"/proc/{pid}/status").read_text()
                        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
                        if match:
                            peaks[pid] = max(peaks.get(pid, 0.0), int(match.group(1)) / 1024)
                        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        cpu[pid] = (int(stat[11]) + int(stat[12])) / ticks  # utime, stime

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.time()
        result = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            done.set()
            raise RuntimeError(f"launchRun failed: {result}")
        run_id = result["run"]["runId"]
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        while status not in FINISHED:
            if time.monotonic() > deadline:
                done.set()
                raise RuntimeError(f"run {run_id} still {status} after {timeout:.0f} s")
            time.sleep(0.5)
            status = self.graphql(RUN_STATUS, {"id": run_id})["runOrError"].get("status", "UNKNOWN")
        done.set()
        watcher.join()
        facts = read_run(self.home, run_id)
        facts.seconds = facts.ended - started
        step_pids = set(facts.step_pids.values())
        if not step_pids <= set(peaks):
            raise RuntimeError(f"run {run_id}: steps ran in processes {sorted(step_pids)} not seen under dagster dev")
        facts.worker_peak_mib = max((peaks[pid] for pid in step_pids), default=0.0)
        facts.worker_cpu = sum(cpu.get(pid, 0.0) for pid in step_pids)
        return facts


__all__ = ["DagsterDevServer", "RunFacts", "read_run"]
