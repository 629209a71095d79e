"""Fan-out on object storage: sources, staging and warehouse in SeaweedFS; the groups stream in separate processes,
pass their records through the bucket, and commit once (docs/fan-out.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from dativo_dagster.commit import RUN_ID_KEY
from dativo_dagster.fanout import group_files
from dativo_dagster.sources import SourceFile
from dativo_dagster_tests.conftest import Project, base_spec

from .deployment import branch_head, list_keys, make_deployment
from .servers import SeaweedFS

pytestmark = pytest.mark.integration

DAGSTER = Path(sys.executable).parent / "dagster"
FILE_ROWS = (30_000, 100, 50_000, 10, 20_000)


def test_a_fanned_out_run_over_s3_sources_stages_its_groups_in_the_bucket_and_commits_once(
    seaweedfs: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = make_deployment("sqlite", seaweedfs, None, tmp_path)
    bucket = deployment.bucket
    client = seaweedfs.boto3_client()
    expected: Counter[tuple[int, str]] = Counter()
    sizes = []
    start = 0
    for index, count in enumerate(FILE_ROWS):
        key = f"landing/events/f{index}.csv"
        body = "id,name\n" + "".join(f"{start + i},name-{start + i}-padding-text\n" for i in range(count))
        client.put_object(Bucket=bucket, Key=key, Body=body.encode())
        sizes.append(len(body.encode()))
        expected.update((start + i, f"s3://{bucket}/{key}") for i in range(count))
        start += count
    groups = group_files([SourceFile(uri=str(i), size=s, version="") for i, s in enumerate(sizes)], 1)
    assert len(groups) >= 3

    project = Project(tmp_path / "project")
    project.write_spec(base_spec(
        "events",
        source={"type": "csv", "files": [{"path": f"s3://{bucket}/landing/events/*.csv"}],
                "incremental": {"strategy": "file_modified_time"}, "fan_out": {"step_size_mb": 1}},
    ))
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATIVO_", "DAGSTER_"))}
    env.update(deployment.env, DATIVO_ASSET_SPECS_DIR=str(project.specs_dir),
               DATIVO_STAGING_DIR=f"s3://{bucket}/staging", DAGSTER_HOME=str(home))
    config = json.dumps({"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}})

    def materialize() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(DAGSTER), "asset", "materialize", "-m", "dativo_dagster.definitions", "--select", "events",
             "--config-json", config],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False,
        )

    proc = materialize()
    assert proc.returncode == 0, proc.stderr[-3000:]

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        events = list(instance.all_logs(run.run_id))
    starts = {e.step_key: e.dagster_event.pid for e in events if e.dagster_event_type == dg.DagsterEventType.STEP_START}
    group_pids = {k: pid for k, pid in starts.items() if "__extract[" in (k or "")}
    assert set(group_pids) == {f"events.events__extract[g{i}]" for i in range(len(groups))}
    assert len(set(group_pids.values())) == len(groups)
    table = deployment.catalog().load_table("testdomain.events")
    head = branch_head(table, "acme")
    rows = table.scan(snapshot_id=head.snapshot_id).to_arrow().to_pylist()
    assert Counter((r["id"], r["_source_file"]) for r in rows) == expected
    assert {r["_run_id"] for r in rows} == {run.run_id}
    assert head.summary is not None and head.summary.get(RUN_ID_KEY) == run.run_id
    # the records went through the bucket and are gone once the run committed; nothing staged on local disk
    assert list_keys(seaweedfs, bucket, "staging/") == []
    assert not (project.root / ".dativo" / "staging").exists()
    assert seaweedfs.secret_key not in proc.stdout + proc.stderr

    again = materialize()
    assert again.returncode == 0, again.stderr[-3000:]
    table = deployment.catalog().load_table("testdomain.events")
    assert branch_head(table, "acme").snapshot_id == head.snapshot_id  # nothing new: no snapshot
