"""Op staging on object storage (``DATIVO_STAGING_DIR=s3://...``), for executors that run a run's steps on
different machines: the records the ops pass each other live in the bucket, and go once the run commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dativo_dagster import maintenance
from dativo_dagster.executors import FORKSERVER_CONFIG
from dativo_dagster.maintenance import MIN_AGE_HOURS, remove_stale_staging
from dativo_dagster.resources import StagingResource, StorageResource
from dativo_dagster_tests.conftest import Project, base_spec

from .deployment import branch_head, list_keys, make_deployment
from .servers import SeaweedFS

DAGSTER = Path(sys.executable).parent / "dagster"


@pytest.mark.parametrize(
    ("executor", "engine_line"),
    [
        # the group jobs' executor: every step in a process forked from a preloaded forkserver
        (FORKSERVER_CONFIG, "Executing steps using multiprocess executor"),
        # the code location's default for one asset: every step in the run's process
        (None, "Executing steps in process"),
    ],
    ids=["forkserver", "in_process"],
)
def test_steps_in_separate_processes_pass_their_records_through_the_bucket(
    seaweedfs: SeaweedFS, tmp_path: Path, executor: dict | None, engine_line: str
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    staging = f"s3://{deployment.bucket}/staging"
    project = Project(tmp_path / "project")
    project.write_spec(base_spec("events", schema_validation_mode="warn"))
    project.write_data("events.csv", "id,name\n1,Ann\nx,Bad\n2,Bob\n")
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
    env.update(deployment.env, DATIVO_ASSET_SPECS_DIR=str(project.specs_dir), DATIVO_STAGING_DIR=staging,
               DAGSTER_HOME=str(home))
    config = ["--config-json", json.dumps({"execution": {"config": executor}})] if executor else []
    proc = subprocess.run(
        [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "*", *config],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert engine_line in proc.stderr

    table = deployment.catalog().load_table("testdomain.events")
    rows = table.scan(snapshot_id=branch_head(table, "acme").snapshot_id).to_arrow().to_pylist()
    assert sorted((r["id"], r["name"]) for r in rows) == [(1, "Ann"), (2, "Bob")]
    # nothing was staged on this machine's disk (a local path would have been the embedded default's, or an
    # "s3:" folder in the working directory), and the committed run's records are gone from the bucket
    assert not (project.root / ".dativo" / "staging").exists()
    assert list(tmp_path.rglob("s3:*")) == []
    assert list_keys(seaweedfs, deployment.bucket, "staging/") == []
    secret = seaweedfs.secret_key
    assert secret not in proc.stdout + proc.stderr


def test_s3_staging_records_round_trip_and_stale_runs_are_removed(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    storage = StorageResource(
        warehouse=deployment.warehouse, s3_endpoint=seaweedfs.s3_endpoint, aws_region=seaweedfs.region,
        aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key,
    )
    root = f"s3://{deployment.bucket}/staging"
    staging = StagingResource(root=root, storage=storage)
    staging.write("run-1", "events.events__extract", "stream", '{"rows": 3}')
    staging.write("run-1", "events.events__validate", "validated", '{"rows": 2}')
    staging.write("run-1", "other.other__extract", "stream", "{}")
    staging.write("run-2", "events.events__extract", "stream", "{}")
    assert staging.read("run-1", "events.events__validate", "validated") == '{"rows": 2}'
    assert list_keys(seaweedfs, deployment.bucket, "staging/run-1/") == [
        "staging/run-1/events.events__extract/stream.json",
        "staging/run-1/events.events__validate/validated.json",
        "staging/run-1/other.other__extract/stream.json",
    ]
    with pytest.raises(FileNotFoundError, match=r"staged record events.events__write.result missing at s3://"):
        staging.read("run-1", "events.events__write", "result")

    # one asset's records go, the other asset's of the same run stay
    staging.remove_steps("run-1", "events.")
    assert list_keys(seaweedfs, deployment.bucket, "staging/") == [
        "staging/run-1/other.other__extract/stream.json",
        "staging/run-2/events.events__extract/stream.json",
    ]

    # maintenance: nothing is a day old yet; a day later every run is stale
    s3 = storage.s3_settings()
    day = MIN_AGE_HOURS * 3600
    assert remove_stale_staging(root, day, s3) == []
    assert len(list_keys(seaweedfs, deployment.bucket, "staging/")) == 2
    now = time.time()
    monkeypatch.setattr(maintenance, "wall_clock", lambda: now + day + 60)
    assert remove_stale_staging(root, day, s3) == [f"{root}/run-1", f"{root}/run-2"]
    assert list_keys(seaweedfs, deployment.bucket, "staging/") == []
