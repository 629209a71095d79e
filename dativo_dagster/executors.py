"""Which executor a run's steps get: one asset in one process, many assets in parallel from a preloaded forkserver.

An asset's four steps take milliseconds of work on a small file, while Dagster's default multiprocess executor
starts a fresh Python for each step (3-4 s of imports: Dagster, pyiceberg, pyarrow). So a run of one asset
(``dagster asset materialize``, the UI's Materialize button, a spec's schedule or sensor) runs its steps in the
run's own process, as ``dativo-dagster materialize`` does. The per-group jobs materialize many assets: their
steps run in parallel processes forked from a server that has this package imported already.

Both executors accept Dagster's usual choice in run config (``execution: {config: {in_process: {}}}`` or
``{multiprocess: {...}}``), so any run can switch; only the default differs. The steps pass their records through
staged files (``StagingIOManager``), which any of them can read, whatever process or machine it runs on.

``DATIVO_EXECUTOR=celery`` (docs/deployment.md "Celery") puts every job on Dagster's Celery executor instead: each
step is a task for the Celery workers (``celery -A dativo_dagster.celery_worker worker``), which run the same code
with the same environment. The broker is ``DATIVO_CELERY_BROKER_URL``; dagster-celery is the optional extra
``dativo-dagster[celery]``, imported only then.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import dagster as dg

from dativo_dagster.errors import DeploymentError

# what the forkserver imports once, before it forks each step: the code location and through it everything the
# steps use (dagster, pyiceberg, pyarrow)
FORKSERVER_PRELOAD = ("dativo_dagster.definitions",)
IN_PROCESS_CONFIG: dict[str, Any] = {"in_process": {}}
FORKSERVER_CONFIG: dict[str, Any] = {
    "multiprocess": {"start_method": {"forkserver": {"preload_modules": list(FORKSERVER_PRELOAD)}}}
}
ONE_ASSET_EXECUTOR = "dativo_in_process"
MANY_ASSETS_EXECUTOR = "dativo_forkserver"


def _step_executor(name: str, default: Mapping[str, Any], description: str) -> dg.ExecutorDefinition:
    """Dagster's ``multi_or_in_process_executor`` (same config, same requirements) with another default."""
    base = dg.multi_or_in_process_executor
    creation = base.executor_creation_fn
    assert creation is not None

    @dg.executor(
        name=name,
        config_schema=dg.Field(base.config_schema.config_type, default_value=dict(default), description=description),
        requirements=base.get_requirements,
    )
    def step_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
        return creation(init_context)

    return step_executor


one_asset_executor = _step_executor(
    ONE_ASSET_EXECUTOR,
    IN_PROCESS_CONFIG,
    "Steps run one after the other in the run's process (default); `multiprocess` runs each in a process of its own.",
)
many_assets_executor = _step_executor(
    MANY_ASSETS_EXECUTOR,
    FORKSERVER_CONFIG,
    "Steps run in parallel processes forked from a server that imported the code location once (default);"
    " `in_process` runs them one after the other in the run's process.",
)


EXECUTOR_VAR = "DATIVO_EXECUTOR"
CELERY_BROKER_VAR = "DATIVO_CELERY_BROKER_URL"
CELERY_BACKEND_VAR = "DATIVO_CELERY_BACKEND_URL"
EXECUTOR_CHOICES = ("default", "celery")
CELERY_EXECUTOR = "dativo_celery"


class StepExecutors(NamedTuple):
    """The executor of the jobs that materialize one asset, and that of the group jobs (many assets)."""

    one_asset: dg.ExecutorDefinition
    many_assets: dg.ExecutorDefinition


class CeleryUrls(NamedTuple):
    broker: str
    backend: str


def celery_urls(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> CeleryUrls:
    """The broker and result backend: the executor's run config where it names them, else
    ``DATIVO_CELERY_BROKER_URL`` / ``DATIVO_CELERY_BACKEND_URL`` (default: the broker, e.g. the same Redis).

    Read when a run starts, never put into config: a broker URL may hold a password.

    Raises:
        DeploymentError: no broker in run config nor in the environment.
    """
    env = os.environ if environ is None else environ
    broker = config.get("broker") or env.get(CELERY_BROKER_VAR)
    if not broker:
        raise DeploymentError(
            f"{EXECUTOR_VAR}=celery needs the Celery broker's URL: set {CELERY_BROKER_VAR} (e.g. redis://host:6379/0)"
            " in the environment of the code location and of every Celery worker",
            missing=[CELERY_BROKER_VAR],
        )
    return CeleryUrls(broker, config.get("backend") or env.get(CELERY_BACKEND_VAR) or broker)


def celery_step_executor() -> dg.ExecutorDefinition:
    """Dagster's ``celery_executor`` (same config and requirements) whose broker and backend default to the
    environment's (:func:`celery_urls`).

    Raises:
        DeploymentError: dagster-celery is not installed.
    """
    try:
        from dagster_celery import celery_executor  # noqa: PLC0415 - an optional extra, imported only when chosen
    except ImportError as exc:
        raise DeploymentError(
            f"{EXECUTOR_VAR}=celery needs Dagster's Celery executor, which is not installed: "
            "pip install 'dativo-dagster[celery]'",
            missing=[],
        ) from exc
    creation = celery_executor.executor_creation_fn
    assert creation is not None
    fields = dict(celery_executor.config_schema.config_type.fields)
    for key, variable, fallback in (
        ("broker", CELERY_BROKER_VAR, "required"),
        ("backend", CELERY_BACKEND_VAR, "default: the broker"),
    ):
        fields[key] = dg.Field(
            dg.Noneable(dg.StringSource), is_required=False, default_value=None,
            description=f"Celery's {key} URL; default: the environment variable {variable} ({fallback}).",
        )

    @dg.executor(name=CELERY_EXECUTOR, config_schema=fields, requirements=celery_executor.get_requirements)
    def step_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
        broker, backend = celery_urls(init_context.executor_config)
        config = {**init_context.executor_config, "broker": broker, "backend": backend}
        return creation(dg.InitExecutorContext(job=init_context.job, executor_def=init_context.executor_def,
                                               executor_config=config, instance=init_context.instance))

    return step_executor


def executors_from_env(environ: Mapping[str, str] | None = None) -> StepExecutors:
    """The executors ``DATIVO_EXECUTOR`` chooses: unset or ``default``, one asset in process and many from a
    forkserver; ``celery``, Celery workers for every job.

    Raises:
        DeploymentError: another value, or ``celery`` without dagster-celery installed.
    """
    env = os.environ if environ is None else environ
    value = env.get(EXECUTOR_VAR, "").strip().lower() or "default"
    if value == "default":
        return StepExecutors(one_asset_executor, many_assets_executor)
    if value == "celery":
        celery = celery_step_executor()
        return StepExecutors(celery, celery)
    raise DeploymentError(
        f"{EXECUTOR_VAR}={env[EXECUTOR_VAR]!r} is not an executor; expected one of {', '.join(EXECUTOR_CHOICES)}",
        missing=[],
    )


__all__ = [
    "CELERY_BACKEND_VAR",
    "CELERY_BROKER_VAR",
    "CELERY_EXECUTOR",
    "EXECUTOR_VAR",
    "FORKSERVER_CONFIG",
    "FORKSERVER_PRELOAD",
    "IN_PROCESS_CONFIG",
    "MANY_ASSETS_EXECUTOR",
    "ONE_ASSET_EXECUTOR",
    "CeleryUrls",
    "StepExecutors",
    "celery_step_executor",
    "celery_urls",
    "executors_from_env",
    "many_assets_executor",
    "one_asset_executor",
]
