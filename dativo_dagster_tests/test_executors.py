"""The executors the code location's jobs carry, and what they do in real runs on a persistent instance.

One asset (``dagster asset materialize``, the UI's Materialize button, a spec's schedule or sensor): its steps run
in the run's own process. A group job (many assets): steps in parallel processes forked from a forkserver that
preloaded the code location. Not timed: the runs' step events and the process tree say which mode ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from dativo_dagster.definitions import build_definitions
from dativo_dagster.errors import DeploymentError
from dativo_dagster.executors import (
    CELERY_BACKEND_VAR,
    CELERY_BROKER_VAR,
    CELERY_EXECUTOR,
    FORKSERVER_CONFIG,
    IN_PROCESS_CONFIG,
    MANY_ASSETS_EXECUTOR,
    ONE_ASSET_EXECUTOR,
    celery_urls,
)
from dativo_dagster.freshness import FRESHNESS_CHECK
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

DAGSTER = Path(sys.executable).parent / "dagster"
REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE = "dativo_dagster.definitions"
OPS = ("extract", "validate", "write", "commit")
HOURLY = {"cron": "0 * * * *", "timezone": "UTC"}


def _env(project: Project, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
    env.update(DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DAGSTER_HOME=str(home))
    return env


def _two_asset_project(root: Path) -> Project:
    project = Project(root)
    for name, rows in (("alpha", "id,name\n1,Ann\n2,Bob\n"), ("beta", "id,name\n7,Cy\n")):
        project.write_spec(base_spec(name, schedule=HOURLY))
        project.write_data(f"{name}.csv", rows)
    return project


def _step_events(home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dg.DagsterRun, list[dg.EventLogEntry]]:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    try:
        [run] = instance.get_runs()
        return run, list(instance.all_logs(run.run_id))
    finally:
        instance.dispose()


def _of_type(events: list[dg.EventLogEntry], kind: dg.DagsterEventType) -> list[dg.EventLogEntry]:
    return [e for e in events if e.dagster_event_type == kind]


def test_every_job_carries_the_executor_for_its_size(project: Project) -> None:
    """One asset's jobs (the implicit asset job that `dagster asset materialize` and the UI's Materialize button
    run, a spec's own job that its schedule and sensor run) default to in process; a group job to a forkserver
    that preloads the code location."""
    project.write_spec(base_spec("hourly", schedule=HOURLY))
    project.write_spec(base_spec("watched", sensor={"minimum_interval_seconds": 30},
                                 source={"type": "csv", "files": [{"path": "data/watched.csv"}],
                                         "incremental": {"strategy": "file_modified_time"}}))
    defs = build_definitions(project.specs_dir)

    def executor(job: dg.JobDefinition) -> tuple[str, object]:
        return job.executor_def.name, job.executor_def.config_schema.as_field().default_value

    in_process = (ONE_ASSET_EXECUTOR, IN_PROCESS_CONFIG)
    assert executor(defs.resolve_implicit_global_asset_job_def()) == in_process
    assert executor(defs.resolve_job_def("hourly__job")) == in_process
    assert executor(defs.resolve_job_def("watched__job")) == in_process
    schedule = defs.resolve_schedule_def("hourly__schedule")
    assert executor(defs.resolve_job_def(schedule.job_name)) == in_process
    # the sensor targets its asset, no job: Dagster runs its requests as runs of the implicit asset job
    sensor = defs.resolve_sensor_def("watched__sensor")
    assert not sensor.targets and sensor.asset_selection is not None
    assert set(sensor.asset_selection.resolve(defs.get_repository_def().asset_graph)) == {dg.AssetKey("watched")}
    assert executor(defs.resolve_job_def("testproduct__group_job")) == (MANY_ASSETS_EXECUTOR, FORKSERVER_CONFIG)
    assert FORKSERVER_CONFIG["multiprocess"]["start_method"]["forkserver"]["preload_modules"] == [MODULE]


def test_dagster_asset_materialize_runs_the_four_ops_in_its_own_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = Project(tmp_path / "project")
    project.write_spec(base_spec("good", schedule=HOURLY))
    project.write_data("good.csv", "id,name\n1,Ann\n2,Bob\n")
    home = tmp_path / "dagster_home"
    home.mkdir()
    proc = subprocess.Popen(
        [str(DAGSTER), "asset", "materialize", "-m", MODULE, "--select", "good"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(project, home), cwd=tmp_path,
    )
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]

    run, events = _step_events(home, monkeypatch)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    starts = _of_type(events, dg.DagsterEventType.STEP_START)
    steps = {e.step_key for e in starts}
    assert {f"good.good__{op}" for op in OPS} <= steps
    # the freshness check (bookkeeping) runs in the same process, no step process of its own
    assert len(steps) == len(OPS) + 1 and any(FRESHNESS_CHECK in (k or "") for k in steps)
    # every step in the process that `dagster asset materialize` is: no step process was started
    assert {e.dagster_event.pid for e in starts} == {proc.pid}
    engine = [e.user_message for e in _of_type(events, dg.DagsterEventType.ENGINE_EVENT)]
    assert f"Executing steps in process (pid: {proc.pid})" in engine
    assert not _of_type(events, dg.DagsterEventType.STEP_WORKER_STARTING)
    rows = branch_rows(project.table("testdomain.good"), "acme")
    assert sorted(r["id"] for r in rows) == [1, 2] and {r["_run_id"] for r in rows} == {run.run_id}


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command line)."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if cmdline:  # an exiting process (a zombie) shows none
            found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def test_a_group_job_runs_its_assets_steps_forked_from_a_preloaded_forkserver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _two_asset_project(tmp_path / "project")
    home = tmp_path / "dagster_home"
    home.mkdir()
    proc = subprocess.Popen(
        [str(DAGSTER), "job", "execute", "-m", MODULE, "-j", "testproduct__group_job"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(project, home), cwd=tmp_path,
    )
    # every (parent, command line) each process was seen with: a process is seen between its fork and its exec
    # with its parent's command line, and with another parent once its own has exited
    seen: dict[int, set[tuple[int, str]]] = {}

    def watch() -> None:
        while proc.poll() is None:
            for pid, observed in _processes().items():
                seen.setdefault(pid, set()).add(observed)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = proc.communicate(timeout=600)
    watcher.join()
    assert proc.returncode == 0, stderr[-3000:]

    run, events = _step_events(home, monkeypatch)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    starts = _of_type(events, dg.DagsterEventType.STEP_START)
    by_step = {e.step_key: e.dagster_event.pid for e in starts}
    assert {f"{a}.{a}__{op}" for a in ("alpha", "beta") for op in OPS} <= set(by_step)
    # each step in a process of its own, none in the run's process
    assert proc.pid not in by_step.values() and len(set(by_step.values())) == len(by_step)
    assert len(_of_type(events, dg.DagsterEventType.STEP_WORKER_STARTING)) == len(by_step)
    # the run's process started a forkserver, and the step processes are its children
    children = {pid: cmds for pid, cmds in seen.items() if any(ppid == proc.pid for ppid, _ in cmds)}
    forkservers = {pid for pid, cmds in children.items() if any("forkserver" in cmd for _, cmd in cmds)}
    assert len(forkservers) == 1, children
    forked = {pid for pid in by_step.values() if pid in seen}
    assert forked and all(any(ppid in forkservers for ppid, _ in seen[pid]) for pid in forked)
    # the steps passed their records through the staging folder, and both tables hold their rows
    assert sorted(r["id"] for r in branch_rows(project.table("testdomain.alpha"), "acme")) == [1, 2]
    assert [r["id"] for r in branch_rows(project.table("testdomain.beta"), "acme")] == [7]


def test_the_multiprocess_mode_stays_available_for_one_asset_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run config switches a one-asset run to a process per step, as Dagster's default executor would."""
    project = _two_asset_project(tmp_path / "project")
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = '{"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}}'
    proc = subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", MODULE, "--select", "*", "--config-json", config],
        capture_output=True, text=True, timeout=600, env=_env(project, home), cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, events = _step_events(home, monkeypatch)
    starts = _of_type(events, dg.DagsterEventType.STEP_START)
    assert len({e.dagster_event.pid for e in starts}) == len(starts) >= 2 * len(OPS)
    engine = [e.user_message for e in _of_type(events, dg.DagsterEventType.ENGINE_EVENT)]
    assert any(m.startswith("Executing steps using multiprocess executor") for m in engine)
    assert [r["id"] for r in branch_rows(project.table("testdomain.beta"), "acme")] == [7]


def test_the_shipped_instance_dequeues_launched_runs_every_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run launched from the UI waits in the queue until the daemon's next look (Dagster's default: every 5 s,
    longer than a small asset's whole run); the shipped dagster.yaml has it look every second, and keeps the
    queue's limit on concurrent runs."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:  # what `make dev`'s daemon loads
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        # the daemon's QueuedRunCoordinatorDaemon runs at this interval
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4


# --------------------------------------------------------------------------------------------- Celery (opt-in)
CELERY_ENV = ("DATIVO_EXECUTOR", "DATIVO_CELERY_BROKER_URL", "DATIVO_CELERY_BACKEND_URL")


def test_dativo_executor_celery_puts_every_job_on_the_celery_executor(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DATIVO_EXECUTOR=celery``: the implicit asset job (`dagster asset materialize`, the UI, sensors,
    backfills), each spec's job and the group jobs all submit their steps to Celery workers; without the variable
    nothing changes (the test above)."""
    project.write_spec(base_spec("hourly", schedule=HOURLY))
    project.write_spec(base_spec("other"))
    monkeypatch.setenv("DATIVO_EXECUTOR", "celery")
    defs = build_definitions(project.specs_dir)
    jobs = [defs.resolve_implicit_global_asset_job_def(), defs.resolve_job_def("hourly__job"),
            defs.resolve_job_def("other__job"), defs.resolve_job_def("testproduct__group_job")]
    assert {job.executor_def.name for job in jobs} == {CELERY_EXECUTOR}
    # Celery's own settings stay available in run config; broker and backend default to the environment's
    fields = jobs[0].executor_def.config_schema.config_type.fields
    assert set(fields) == {"broker", "backend", "include", "config_source", "retries"}
    assert not fields["broker"].is_required and fields["broker"].default_value is None
    assert CELERY_BROKER_VAR in fields["broker"].description


@pytest.mark.parametrize("value", ["", "default", "DEFAULT"])
def test_dativo_executor_unset_or_default_keeps_the_executors_for_their_size(
    project: Project, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    project.write_spec(base_spec("one"))
    monkeypatch.setenv("DATIVO_EXECUTOR", value)
    defs = build_definitions(project.specs_dir)
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == ONE_ASSET_EXECUTOR
    assert defs.resolve_job_def("testproduct__group_job").executor_def.name == MANY_ASSETS_EXECUTOR


def test_an_unknown_executor_is_refused_naming_the_variable_and_the_choices(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(base_spec("one"))
    monkeypatch.setenv("DATIVO_EXECUTOR", "dask")
    with pytest.raises(DeploymentError, match=r"DATIVO_EXECUTOR='dask' .*expected one of default, celery"):
        build_definitions(project.specs_dir)


def test_dativo_executor_celery_without_dagster_celery_names_the_extra(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(base_spec("one"))
    monkeypatch.setenv("DATIVO_EXECUTOR", "celery")
    monkeypatch.setitem(sys.modules, "dagster_celery", None)  # import fails as if it were not installed
    with pytest.raises(DeploymentError, match=r"dativo-dagster\[celery\]"):
        build_definitions(project.specs_dir)


def test_the_broker_and_backend_come_from_the_environment_unless_run_config_names_them() -> None:
    broker = "redis://:s3cret@broker:6379/0"
    assert celery_urls({}, {CELERY_BROKER_VAR: broker}) == (broker, broker)
    assert celery_urls({}, {CELERY_BROKER_VAR: broker, CELERY_BACKEND_VAR: "redis://results:6379/1"}) == (
        broker, "redis://results:6379/1")
    assert celery_urls({"broker": "redis://other/0", "backend": None}, {CELERY_BROKER_VAR: broker}) == (
        "redis://other/0", "redis://other/0")
    with pytest.raises(DeploymentError, match=CELERY_BROKER_VAR) as raised:
        celery_urls({}, {})
    assert raised.value.missing == [CELERY_BROKER_VAR]


def test_the_worker_app_listens_where_the_executor_submits(monkeypatch: pytest.MonkeyPatch) -> None:
    """`celery -A dativo_dagster.celery_worker worker`: the broker and backend of the environment, Dagster's queue,
    and the task the executor submits."""
    monkeypatch.setenv(CELERY_BROKER_VAR, "redis://127.0.0.1:1/3")
    monkeypatch.delitem(sys.modules, "dativo_dagster.celery_worker", raising=False)
    import dativo_dagster.celery_worker as worker  # noqa: PLC0415 - the module reads the environment on import

    from dagster_celery.config import TASK_EXECUTE_PLAN_NAME  # noqa: PLC0415

    assert worker.app.conf.broker_url == "redis://127.0.0.1:1/3"
    assert worker.app.conf.result_backend == "redis://127.0.0.1:1/3"
    assert worker.app.conf.task_default_queue == "dagster"
    assert worker.app.conf.worker_prefetch_multiplier == 1
    assert TASK_EXECUTE_PLAN_NAME in worker.app.tasks
    monkeypatch.delitem(sys.modules, "dativo_dagster.celery_worker")
