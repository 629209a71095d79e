"""Kill ``dativo-dagster materialize`` with SIGKILL around its publishing catalog commit, for the tests of CONTRACT 9,
and at each step of a merge run (CONTRACT 8).

A wrapper script patches ``commit_table`` of pyiceberg's SQL and REST catalogs: at the commit that moves ``main``
(the publish of the data table; another ref with ``ref=``) it SIGKILLs its own process just before sending the commit
(``before``) or right after the catalog accepted it (``after``), having written the commit's refs to the JSON file
``DATIVO_KILL_REPORT``. Merge runs have two more points (``MERGE_KILL_POINTS``): ``extract`` (the first batch of rows
reached the merge buffer) and ``staged`` (the buffer wrote the run's data files and its keys file, nothing is
committed yet); ``REWRITE_POINT`` (``rewrite``) dies once the commit step's rewrite of the files holding the run's
keys has uploaded its first new file, before the catalog commit. With ``job_module``
(``fault_injection.write_job_module``) the wrapper runs the project's group job in the persistent instance at
``dagster_home`` instead of the command line, so that the run can be re-executed.
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
MERGE_KILL_POINTS = ("extract", "staged", "before", "after")
REWRITE_POINT = "rewrite"

WRAPPER = '''
import json, os, signal, sys

from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table.update import AddSnapshotUpdate, AssertRefSnapshotId, SetSnapshotRefUpdate

point = sys.argv.pop(1)
report_path = os.environ["DATIVO_KILL_REPORT"]
kill_ref = os.environ.get("DATIVO_KILL_REF", "main")


def die(**detail):
    with open(report_path, "w") as out:
        json.dump({"point": point, **detail}, out)
    os.kill(os.getpid(), signal.SIGKILL)


def patch(cls):
    commit_table = cls.commit_table

    def committing(self, table, requirements, updates):
        moved = {u.ref_name: u.snapshot_id for u in updates if isinstance(u, SetSnapshotRefUpdate)}
        if kill_ref not in moved or table.name()[-1].endswith("__rejects"):
            return commit_table(self, table, requirements, updates)
        asserted = {r.ref: r.snapshot_id for r in requirements if isinstance(r, AssertRefSnapshotId)}
        runs = [u.snapshot.summary.get("dativo.run-id") for u in updates if isinstance(u, AddSnapshotUpdate)]
        detail = {"table": ".".join(table.name()), "moved": moved, "asserted": asserted, "run_ids": runs}
        if point == "before":
            die(**detail)
        response = commit_table(self, table, requirements, updates)
        die(**detail, metadata_location=response.metadata_location)

    cls.commit_table = committing


patch(SqlCatalog)
patch(RestCatalog)

if point in ("extract", "staged"):
    from dativo_dagster.merge import MergeBuffer

    buffer_write, buffer_close = MergeBuffer.write, MergeBuffer.close

    def buffering(self, table):
        buffer_write(self, table)
        if point == "extract":  # rows are streaming in: nothing is written to the table location yet
            die(rows=table.num_rows, keys_uri=self.keys_uri)

    def closing(self):
        files = buffer_close(self)
        die(files=[f.uri for f in files], keys_uri=self.keys_uri)

    MergeBuffer.write, MergeBuffer.close = buffering, closing

if point == "rewrite":
    from dativo_dagster import rewrite, write

    write_survivors, publish_file = rewrite._write_survivors, write._Sink.publish
    rewriting = []

    def writing_survivors(*args, **kwargs):
        rewriting.append(True)
        return write_survivors(*args, **kwargs)

    def publishing(self, metadata):
        publish_file(self, metadata)
        if rewriting:  # one survivors' file is on the storage (uploaded, on S3), the others may not be
            die(files=[self.uri])

    rewrite._write_survivors, write._Sink.publish = writing_survivors, publishing

if os.environ.get("DATIVO_JOB_MODULE"):
    import importlib

    import dagster as dg

    job_module = importlib.import_module(os.environ["DATIVO_JOB_MODULE"])
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(job_module.ingest_job), instance,
                                run_config={"execution": {"config": {"in_process": {}}}})
        sys.exit(0 if result.success else 2)

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
    folder: Path,
    point: str,
    specs_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    ref: str = "main",
    job_module: str | None = None,
    dagster_home: Path | None = None,
) -> subprocess.Popen[str]:
    """Start ``dativo-dagster materialize --specs DIR`` that SIGKILLs itself at ``point`` of its commit that moves
    ``ref`` (or of its merge: ``MERGE_KILL_POINTS``); ``env``: the deployment's variables (none: the embedded
    default). With ``job_module`` (a module in ``folder``), that module's ``ingest_job`` runs in the instance at
    ``dagster_home`` instead."""
    wrapper = folder / "publish_kill_wrapper.py"
    wrapper.write_text(WRAPPER)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_HOME"))}
    environment.update(env or {})
    environment["DATIVO_KILL_REPORT"] = str(folder / f"kill-{point}.json")
    environment["DATIVO_KILL_REF"] = ref
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(folder)])
    if job_module is not None:
        assert dagster_home is not None
        environment["DATIVO_JOB_MODULE"] = job_module
        environment["DAGSTER_HOME"] = str(dagster_home)
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
