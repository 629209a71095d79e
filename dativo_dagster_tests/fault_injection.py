"""Kill a run with SIGKILL at a chosen point: a wrapper script that patches one function, then runs the CLI
(``dativo-dagster materialize``) or a Dagster job against a persistent instance.

Points (``KILL_POINTS``):
- ``extract``: while the source files (or a database source's rows) are being read, after the first batch came out;
- ``write``: after the first data file was finished, before the others;
- ``commit-before``: before the first catalog commit of the run (nothing committed);
- ``between-tables``: after the quarantine table's commit, before the data table's (warn mode);
- ``commit-after``: right after the data table's catalog commit succeeded, before the op could succeed.
Before dying, the wrapper writes what it did to the JSON file named by ``DATIVO_KILL_REPORT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

KILL_POINTS = ("extract", "write", "commit-before", "between-tables", "commit-after")
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

WRAPPER = '''
import json, os, signal, sys

from dativo_dagster import commit, write
from dativo_dagster.sources import csv as extract

point = sys.argv.pop(1)
mode = sys.argv.pop(1)  # "cli" or "job"
report_path = os.environ["DATIVO_KILL_REPORT"]
calls = {"batches": 0, "commits": 0}


def die(**detail):
    with open(report_path, "w") as out:
        json.dump({"point": point, **detail}, out)
    os.kill(os.getpid(), signal.SIGKILL)


if point == "extract":

    def reading(read, uri_of, at_end=False):
        def read_and_die(*args, **kwargs):
            for batch in read(*args, **kwargs):
                if calls["batches"] >= 1:
                    die(batches=calls["batches"], file=uri_of(args[0]))
                calls["batches"] += 1
                yield batch
            if at_end and calls["batches"] >= 1:  # asked for more after its batch came out
                die(batches=calls["batches"], file=uri_of(args[0]))

        return read_and_die

    # killed once the first batch came out: of a file read on its own, or of small files of one header parsed
    # together (sources/csv.py), which come out as one batch
    extract.read_source_file = reading(extract.read_source_file, lambda source: source.uri)
    extract._read_group = reading(extract._read_group, lambda group: group[0][0].uri, at_end=True)

    from dativo_dagster.sources import database

    read_database = database.DatabaseSource.read

    def reading_database(self, *args, **kwargs):
        for batch in read_database(self, *args, **kwargs):
            if calls["batches"] >= 1:
                die(batches=calls["batches"], file=self.uri())
            calls["batches"] += 1
            yield batch

    database.DatabaseSource.read = reading_database
elif point == "write":
    close = write.PartitionedParquetWriter._close

    def closing(self, state):
        close(self, state)
        if self.files:
            die(files=[f.uri for f in self.files])

    write.PartitionedParquetWriter._close = closing
else:
    commit_once = commit._commit_once
    # the quarantine table commits first (warn mode), then the data table
    before = {"commit-before": 1, "between-tables": 2}.get(point)

    def committing(table, branch, data_files, *args, **kwargs):
        calls["commits"] += 1
        if calls["commits"] == before:
            die(table=".".join(table.name()), files=[f.file_path for f in data_files], commits=calls["commits"])
        commit_once(table, branch, data_files, *args, **kwargs)
        if point == "commit-after" and not ".".join(table.name()).endswith("__rejects"):
            die(table=".".join(table.name()), files=[f.file_path for f in data_files], committed=True)

    commit._commit_once = committing

if mode == "cli":
    from dativo_dagster import cli

    sys.exit(cli.main())
else:
    import importlib

    import dagster as dg

    from dativo_dagster_tests.fault_injection import IN_PROCESS

    job_module = importlib.import_module(os.environ["DATIVO_JOB_MODULE"])
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(job_module.ingest_job), instance, run_config=IN_PROCESS)
        sys.exit(0 if result.success else 2)
'''


GROUP_JOB = "testproduct__group_job"  # the code location's job for the test specs' dataProduct
JOB_MODULE = """
from pathlib import Path

from dativo_dagster.definitions import build_definitions

SPECS_DIR = Path({specs_dir!r})


def ingest_job():
    return build_definitions(SPECS_DIR).resolve_job_def({job!r})
"""


def write_job_module(folder: Path, specs_dir: Path) -> str:
    """A module (in ``folder``) whose ``ingest_job`` is the project's group job, for ``dg.reconstructable``.

    One module per project: Dagster caches reconstructed jobs by their code pointer, so two projects must
    not share a pointer within one process. Returns the module's name.
    """
    name = f"dativo_job_{uuid.uuid4().hex[:12]}"
    (folder / f"{name}.py").write_text(JOB_MODULE.format(specs_dir=str(specs_dir), job=GROUP_JOB))
    return name


def write_wrapper(folder: Path) -> Path:
    path = folder / "kill_wrapper.py"
    path.write_text(WRAPPER)
    return path


def start_killed_run(
    wrapper: Path,
    point: str,
    specs_dir: Path,
    report: Path,
    *,
    job_module: str | None = None,
    dagster_home: Path | None = None,
) -> subprocess.Popen[str]:
    """Start ``dativo-dagster materialize --specs DIR`` or, given ``job_module`` (see :func:`write_job_module`,
    next to the wrapper), that module's job in the instance at ``dagster_home``, in a subprocess that
    SIGKILLs itself at ``point``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_HOME"))}
    env["DATIVO_KILL_REPORT"] = str(report)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(wrapper.parent)])
    if job_module is None:
        mode, args = "cli", ["materialize", "--specs", str(specs_dir), "--log-level", "ERROR"]
    else:
        assert dagster_home is not None
        mode, args = "job", []
        env["DAGSTER_HOME"] = str(dagster_home)
        env["DATIVO_JOB_MODULE"] = job_module
    return subprocess.Popen(
        [sys.executable, str(wrapper), point, mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd="/",
    )
