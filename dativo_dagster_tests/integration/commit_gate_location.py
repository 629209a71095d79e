"""The code location with a gate in front of each run's commit, for backfill tests through the daemon.

Run workers are separate processes, so ``table_checks.commits_released_together`` (a thread barrier) cannot hold
them. Here the first ``DATIVO_TEST_COMMIT_GATE_SIZE`` runs that reach their commit each leave a file in the folder
``DATIVO_TEST_COMMIT_GATE`` and wait until that many files are there (at most ``GATE_TIMEOUT_SECONDS``), then commit
at once: they planned on the same branch head, so all but one conflict and re-plan. Later runs pass straight on.
With ``DATIVO_TEST_COMMIT_HOLD_SECONDS`` every commit first waits that long, so that runs last long enough for the
daemon to have several of them in progress (it submits a backfill's runs one by one). Without the variables the
location is the plain one.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg

import dativo_dagster.assets as assets_module
from dativo_dagster.definitions import build_definitions, specs_dir_from_env

GATE_DIR_VAR = "DATIVO_TEST_COMMIT_GATE"
GATE_SIZE_VAR = "DATIVO_TEST_COMMIT_GATE_SIZE"
GATE_TIMEOUT_SECONDS = 60.0
HOLD_SECONDS_VAR = "DATIVO_TEST_COMMIT_HOLD_SECONDS"

_commit_files = assets_module.commit_files


def _gated_commit_files(*args: Any, **kwargs: Any) -> Any:
    time.sleep(float(os.environ.get(HOLD_SECONDS_VAR) or 0))
    if os.environ.get(GATE_DIR_VAR):
        gate = Path(os.environ[GATE_DIR_VAR])
        size = int(os.environ[GATE_SIZE_VAR])
        (gate / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        if len(list(gate.iterdir())) <= size:
            deadline = time.monotonic() + GATE_TIMEOUT_SECONDS
            while len(list(gate.iterdir())) < size and time.monotonic() < deadline:
                time.sleep(0.05)
    return _commit_files(*args, **kwargs)


if os.environ.get(GATE_DIR_VAR) or os.environ.get(HOLD_SECONDS_VAR):
    assets_module.commit_files = _gated_commit_files


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(specs_dir_from_env())
