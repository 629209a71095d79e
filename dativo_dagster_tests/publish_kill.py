"""Kill ``dativo-dagster materialize`` with SIGKILL around its publishing catalog commit, for the tests of CONTRACT 9.

A wrapper script patches ``commit_table`` of pyiceberg's SQL and REST catalogs: at the commit that moves ``main``
(the publish of the data table) it SIGKILLs its own process just before sending the commit (``before``) or right
after the catalog accepted it (``after``), having written the commit's refs to the JSON file ``DATIVO_KILL_REPORT``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyiceberg.table import Table

KILL_POINTS = ("before", "after")

WRAPPER = '''
import json, os, signal, sys

from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table.update import AssertRefSnapshotId, SetSnapshotRefUpdate

point = sys.argv.pop(1)
report_path = os.environ["DATIVO_KILL_REPORT"]


def die(**detail):
    with open(report_path, "w") as out:
        json.dump({"point": point, **detail}, out)
    os.kill(os.getpid(), signal.SIGKILL)


def patch(cls):
    commit_table = cls.commit_table

    def committing(self, table, requirements, updates):
        moved = {u.ref_name: u.snapshot_id for u in updates if isinstance(u, SetSnapshotRefUpdate)}
        if "main" not in moved or table.name()[-1].endswith("__rejects"):
            return commit_table(self, table, requirements, updates)
        asserted = {r.ref: r.snapshot_id for r in requirements if isinstance(r, AssertRefSnapshotId)}
        detail = {"table": ".".join(table.name()), "moved": moved, "asserted": asserted}
        if point == "before":
            die(**detail)
        response = commit_table(self, table, requirements, updates)
        die(**detail, metadata_location=response.metadata_location)

    cls.commit_table = committing


patch(SqlCatalog)
patch(RestCatalog)

from dativo_dagster import cli

sys.exit(cli.main())
'''


@dataclass
class KilledPublish:
    point: str
    returncode: int
    report: dict[str, Any]
    stderr: str


def start_killed_publish(
    folder: Path, point: str, specs_dir: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``dativo-dagster materialize --specs DIR`` that SIGKILLs itself at ``point`` of its publishing commit;
    ``env``: the deployment's variables (none: the embedded default)."""
    wrapper = folder / "publish_kill_wrapper.py"
    wrapper.write_text(WRAPPER)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_HOME"))}
    environment.update(env or {})
    environment["DATIVO_KILL_REPORT"] = str(folder / f"kill-{point}.json")
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.Popen(
        [sys.executable, str(wrapper), point, "materialize", "--specs", str(specs_dir), "--log-level", "ERROR"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd="/",
    )


def wait_killed(folder: Path, point: str, process: subprocess.Popen[str]) -> KilledPublish:
    """Wait for a run started by :func:`start_killed_publish`; its report is empty when it did not reach the point."""
    _, stderr = process.communicate(timeout=300)
    report = folder / f"kill-{point}.json"
    return KilledPublish(
        point, process.returncode, json.loads(report.read_text()) if report.exists() else {}, stderr
    )


def refs(table: Table, branch: str) -> dict[str, int | None]:
    """The snapshot ids of ``branch`` and ``main``."""
    return {name: (s.snapshot_id if (s := table.snapshot_by_name(name)) is not None else None)
            for name in (branch, "main")}


def assert_both_refs_or_neither(killed: KilledPublish, table: Table, branch: str, before: dict[str, int | None]) -> int:
    """The run died at its publishing commit, which carried both refs, and the table shows both moved to the run's
    snapshot (``after``) or neither (``before``); returns the refs' common snapshot id."""
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    now = refs(table, branch)
    assert now[branch] == now["main"], f"killed {killed.point} the publishing commit: refs {now}, before {before}"
    assert (now == before) is (killed.point == "before")
    moved, asserted = killed.report["moved"], killed.report["asserted"]
    assert set(moved) == {branch, "main"} and moved[branch] == moved["main"]  # one commit for both refs
    assert {ref: asserted[ref] for ref in (branch, "main")} == before  # each required where the run found it
    if killed.point == "after":
        assert now[branch] == moved[branch]
    return now[branch]
