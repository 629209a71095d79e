"""S3-only mode (``catalog: none``): commit markers that make a run's files visible to readers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from dativo_dagster.commit import CommitResult
from dativo_dagster.storage import S3Settings, filesystem_for
from dativo_dagster.write import WrittenFile

COMMITS_FOLDER = "_commits"


def marker_uri(location: str, run_id: str) -> str:
    """``<table location>/_commits/<run id>.json``."""
    return f"{location.rstrip('/')}/{COMMITS_FOLDER}/{run_id}.json"


def write_commit_marker(
    *,
    location: str,
    run_id: str,
    files: Sequence[WrittenFile],
    properties: Mapping[str, str],
    s3: S3Settings,
    table: str,
    overwrite: bool = False,
) -> CommitResult:
    """Write the run's marker listing its files, unless the run already has one (idempotent).

    The marker is written to a temporary name and moved into place, so a reader sees all of a
    run's files or none. With ``overwrite`` the marker hides every file committed before it.
    """
    uri = marker_uri(location, run_id)
    fs, path = filesystem_for(uri, s3)
    result = CommitResult(
        table=table,
        branch="",
        files=len(files),
        rows=sum(f.record_count for f in files),
        bytes=sum(f.size_bytes for f in files),
        location=location,
        metadata_location=uri,
        partitions=sorted({f.partition_path for f in files if f.partition_path}),
    )
    if fs.get_file_info(path).type == pafs.FileType.File:
        return result.model_copy(update={"already_committed": True})
    if not files and not overwrite:
        return result.model_copy(update={"metadata_location": ""})
    body = {
        "run_id": run_id,
        "committed_at": datetime.now(timezone.utc).isoformat(),
        "overwrite": overwrite,
        "files": [f.model_dump() for f in files],
        "properties": dict(properties),
    }
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(body, indent=1).encode())
    fs.move(tmp, path)
    return result


def read_commit_markers(location: str, s3: S3Settings) -> list[dict[str, Any]]:
    """Every commit marker under ``location``, oldest commit first."""
    fs, path = filesystem_for(f"{location.rstrip('/')}/{COMMITS_FOLDER}", s3)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    markers = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as stream:
                markers.append(json.loads(stream.read()))
    return sorted(markers, key=lambda m: (m.get("committed_at", ""), m["run_id"]))


def committed_files(location: str, s3: S3Settings) -> list[str]:
    """URIs of the data files that the commit markers under ``location`` make visible; readers use only these.

    Files of an ``overwrite`` marker replace everything committed before it.
    """
    out: list[str] = []
    for marker in read_commit_markers(location, s3):
        if marker.get("overwrite"):
            out = []
        out.extend(f["uri"] for f in marker["files"])
    return out


def committed_records(location: str, s3: S3Settings) -> int:
    """How many rows the visible files hold, from the markers alone (no data file is opened)."""
    total = 0
    for marker in read_commit_markers(location, s3):
        if marker.get("overwrite"):
            total = 0
        total += sum(int(f["record_count"]) for f in marker["files"])
    return total
