"""Which executor a run's steps get: one asset in one process, many assets in parallel from a preloaded forkserver.

An asset's four steps take milliseconds of work on a small file, while Dagster's default multiprocess executor
starts a fresh Python for each step (3-4 s of imports: Dagster, pyiceberg, pyarrow). So a run of one asset
(``dagster asset materialize``, the UI's Materialize button, a spec's schedule or sensor) runs its steps in the
run's own process, as ``dativo-dagster materialize`` does. The per-group jobs materialize many assets: their
steps run in parallel processes forked from a server that has this package imported already.

Both executors accept Dagster's usual choice in run config (``execution: {config: {in_process: {}}}`` or
``{multiprocess: {...}}``), so any run can switch; only the default differs. The steps pass their records through
staged files (``StagingIOManager``), which any of them can read, whatever process or machine it runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

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

__all__ = [
    "FORKSERVER_CONFIG",
    "FORKSERVER_PRELOAD",
    "IN_PROCESS_CONFIG",
    "MANY_ASSETS_EXECUTOR",
    "ONE_ASSET_EXECUTOR",
    "many_assets_executor",
    "one_asset_executor",
]
