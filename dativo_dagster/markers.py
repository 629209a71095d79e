"""S3-only mode (``catalog: none``): commit markers that make a run's files visible to readers."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from dativo_dagster.commit import CommitResult
from dativo_dagster.errors import DativoError
from dativo_dagster.storage import (
    S3Settings,
    filesystem_for,
    head_s3_object,
    is_s3_uri,
    list_s3_objects,
    read_small_object,
    write_small_object,
)
from dativo_dagster.table_state import STATE_FOLDER
from dativo_dagster.write import WrittenFile

log = logging.getLogger(__name__)

COMMITS_FOLDER = "_commits"
# Runs read every marker (their source state, the rows they make visible). A marker never changes once written,
# so the markers read are kept in one compressed file beside them, the marker cache, which readers never need:
# a run lists _commits/, reads the cache and fetches only the markers it does not hold (each checked against
# the listing's ETag or modification time). The cache is rewritten once a read fetched this many markers.
MARKER_CACHE = f"{STATE_FOLDER}/commit-markers.json.gz"
CACHE_AFTER_FETCHED = 16
CACHE_FORMAT = 1


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
    replace_sources: bool = False,
    record_sources: bool = False,
) -> CommitResult:
    """Write the run's marker listing its files, unless the run already has one (idempotent).

    The marker is written to a temporary name and moved into place, so a reader sees all of a
    run's files or none. With ``overwrite`` the marker hides every file committed before it; with
    ``replace_sources`` it hides the earlier files of every source file it read (files are written one
    source file each in this mode, so nothing else is hidden with them). With ``record_sources`` (a cursor's new
    mark) a marker is written even without files, so that its source state is committed.
    """
    uri = marker_uri(location, run_id)
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
    if _marker_exists(uri, s3):
        return result.model_copy(update={"already_committed": True})
    if not files and not overwrite and not replace_sources and not record_sources:
        return result.model_copy(update={"metadata_location": ""})
    body = {
        "run_id": run_id,
        "committed_at": datetime.now(timezone.utc).isoformat(),
        "overwrite": overwrite,
        "replace_sources": replace_sources,
        "files": [f.model_dump() for f in files],
        "properties": dict(properties),
    }
    write_small_object(uri, json.dumps(body, indent=1).encode(), s3)  # whole or not at all
    return result


def _marker_exists(uri: str, s3: S3Settings) -> bool:
    if is_s3_uri(uri):
        return head_s3_object(uri, s3) is not None
    fs, path = filesystem_for(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_commit_markers(location: str, s3: S3Settings) -> list[dict[str, Any]]:
    """Every commit marker under ``location``, oldest commit first.

    The listing of ``_commits/`` decides which markers exist; their contents come from the marker cache where it
    holds the same version of a marker (see ``MARKER_CACHE``), else from the marker itself.
    """
    folder = f"{location.rstrip('/')}/{COMMITS_FOLDER}"
    listed = _list_markers(folder, s3)
    cached = _read_cache(location, s3)
    markers: dict[str, dict[str, Any]] = {}
    fetched = 0
    for name, (uri, version) in listed.items():
        entry = cached.get(name)
        if entry is not None and entry.get("version") == version and isinstance(entry.get("marker"), dict):
            markers[name] = entry["marker"]
            continue
        data = read_small_object(uri, s3)
        if data is None:  # removed since the listing
            continue
        markers[name] = json.loads(data)
        fetched += 1
    if fetched >= CACHE_AFTER_FETCHED:
        _write_cache(location, {n: {"version": listed[n][1], "marker": m} for n, m in markers.items()}, s3)
    return sorted(markers.values(), key=lambda m: (m.get("committed_at", ""), m["run_id"]))


def _list_markers(folder: str, s3: S3Settings) -> dict[str, tuple[str, str]]:
    """Marker file name -> (URI, version: the ETag on S3, size and modification time elsewhere)."""
    if is_s3_uri(folder):
        return {
            item.key.rsplit("/", 1)[-1]: (item.uri, item.etag)
            for item in list_s3_objects(f"{folder}/", s3, delimiter="/")
            if item.key.endswith(".json")
        }
    fs, path = filesystem_for(folder, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {
        info.base_name: (info.path, f"{info.size}:{info.mtime_ns}")
        for info in infos
        if info.type == pafs.FileType.File and info.path.endswith(".json")
    }


def cache_uri(location: str) -> str:
    """``<table location>/_dativo_state/commit-markers.json.gz``."""
    return f"{location.rstrip('/')}/{MARKER_CACHE}"


def _read_cache(location: str, s3: S3Settings) -> dict[str, dict[str, Any]]:
    """The marker cache's entries by marker name; empty when there is none or it cannot be read."""
    uri = cache_uri(location)
    try:
        data = read_small_object(uri, s3)
        if data is None:
            return {}
        body = json.loads(gzip.decompress(data))
    except (DativoError, OSError, EOFError, ValueError) as exc:
        log.warning("ignoring the commit marker cache %s (%s); reading every marker", uri, exc)
        return {}
    if not isinstance(body, dict) or body.get("format") != CACHE_FORMAT or not isinstance(body.get("markers"), dict):
        log.warning("ignoring the commit marker cache %s (not a format %s cache)", uri, CACHE_FORMAT)
        return {}
    return body["markers"]


def _write_cache(location: str, entries: Mapping[str, Any], s3: S3Settings) -> None:
    """Replace the marker cache; a failure only costs the next run the reads the cache would have saved."""
    uri = cache_uri(location)
    data = gzip.compress(json.dumps({"format": CACHE_FORMAT, "markers": entries}).encode(), compresslevel=6)
    try:
        write_small_object(uri, data, s3, content_type="application/gzip")
    except (DativoError, OSError) as exc:
        log.warning("could not write the commit marker cache %s (%s)", uri, exc)


def visible_files(markers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The file records that markers (oldest first) leave visible.

    An ``overwrite`` marker hides everything before it; a ``replace_sources`` marker hides the earlier
    files of the source files it read (its source state), so each source file's rows are visible once,
    from the latest commit that read it, even when two runs read the same file concurrently.
    """
    from dativo_dagster.incremental import SOURCE_STATE_KEY, parse_source_state  # noqa: PLC0415

    visible: list[dict[str, Any]] = []
    for marker in markers:
        if marker.get("overwrite"):
            visible = []
        elif marker.get("replace_sources"):
            read = set(parse_source_state((marker.get("properties") or {}).get(SOURCE_STATE_KEY)))
            visible = [f for f in visible if not read.intersection(f.get("sources") or [])]
        visible.extend(marker["files"])
    return visible


def committed_files(location: str, s3: S3Settings) -> list[str]:
    """URIs of the data files that the commit markers under ``location`` make visible; readers use only these."""
    return [f["uri"] for f in visible_files(read_commit_markers(location, s3))]


def committed_records(location: str, s3: S3Settings) -> int:
    """How many rows the visible files hold, from the markers alone (no data file is opened)."""
    return sum(int(f["record_count"]) for f in visible_files(read_commit_markers(location, s3)))


def committed_files_sql(location: str) -> str:
    """A DuckDB query listing the URIs of the files that the commit markers under ``location`` make visible.

    The same rules as :func:`committed_files`, for readers outside Python (docs/deployment.md). On S3,
    DuckDB needs its ``httpfs`` extension and an S3 secret. Read the rows with
    ``SET VARIABLE files = (SELECT list(uri) FROM (<query>)); SELECT * FROM read_parquet(getvariable('files'))``.
    """
    commits = f"{location.rstrip('/')}/{COMMITS_FOLDER}/*.json".replace("'", "''")
    return _COMMITTED_FILES_SQL.replace("<commits>", commits)


_COMMITTED_FILES_SQL = """WITH markers AS (
  SELECT row_number() OVER (ORDER BY committed_at, run_id) AS seq,
         coalesce(overwrite, false) AS overwrite,
         coalesce(replace_sources, false) AS replace_sources,
         coalesce(json_keys(properties ->> '$."dativo.source-state"'), []) AS read_sources,
         files
  FROM read_json('<commits>', columns = {run_id: 'VARCHAR', committed_at: 'VARCHAR',
       overwrite: 'BOOLEAN', replace_sources: 'BOOLEAN', files: 'JSON', properties: 'JSON'})
),
written AS (
  SELECT seq, f ->> 'uri' AS uri, coalesce(from_json(f -> 'sources', '["VARCHAR"]'), []) AS sources
  FROM markers, unnest(from_json(files, '["JSON"]')) AS t(f)
)
SELECT uri FROM written w
WHERE NOT EXISTS (  -- hidden by a later overwrite, or by a later run that re-read one of its source files
  SELECT 1 FROM markers m
  WHERE m.seq > w.seq
    AND (m.overwrite OR (m.replace_sources AND len(list_intersect(m.read_sources, w.sources)) > 0)))"""
