"""Maintenance: expire old snapshots, remove files that no snapshot references any more, and stale staging."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow.fs as pafs
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.table.update import AssertRefSnapshotId, RemoveSnapshotsUpdate
from pyiceberg.utils.datetime import datetime_to_millis

from dativo_dagster.errors import CommitError
from dativo_dagster.markers import read_commit_markers
from dativo_dagster.merge import KEYS_FOLDER
from dativo_dagster.storage import S3Object, S3Settings, delete_s3_object, filesystem_for, is_s3_uri, list_s3_objects
from dativo_dagster.table_state import STATE_FILE_PREFIX, read_branch_state, state_file_folders, state_file_of

log = logging.getLogger(__name__)

EXPIRY_ATTEMPTS = 10
EXPIRY_BACKOFF_SECONDS = (0.1, 2.0)
# Unreferenced files and staged records younger than this are never removed. A run writes its data files (and
# stages its records) before it commits; a retried step, a run re-executed from failure or a slow run commits
# them later. A day is longer than any retry window Dagster's run retries and a spec's retry_config give in
# practice; a commit that still comes later finds its files gone and fails, naming them (commit._data_files).
MIN_AGE_HOURS = 24.0
# unreferenced files are deleted in batches; the table's references are read again right before each batch
DELETE_BATCH = 100


@dataclass
class ExpiryReport:
    """What a snapshot expiry removed from one table, and what it kept."""

    expired: list[int] = field(default_factory=list)
    kept: int = 0
    # branches whose whole history is kept: no commit has compacted their state into a state file yet
    history_kept: list[str] = field(default_factory=list)


def plan_expiry(table: Table, *, older_than_ms: int, keep_last: int) -> ExpiryReport:
    """Which snapshots of ``table`` may be expired, and which are kept.

    Kept: every branch head and tagged snapshot; on every branch its newest ``keep_last`` snapshots and every
    snapshot younger than ``older_than_ms``, and every snapshot from the head down to the first that names a
    readable state file (it holds the state of everything older: see ``table_state``). A branch that has no
    state file yet (written before they existed) keeps its whole history, so that no loaded source file and
    no committed run is forgotten; its next commit compacts it. Expired: every other snapshot older than
    ``older_than_ms``, on a branch or on none (rolled back, or left by a removed branch).
    """
    by_id = {s.snapshot_id: s for s in table.metadata.snapshots}
    kept: set[int] = set()
    report = ExpiryReport()
    for name, ref in sorted(table.metadata.refs.items()):
        kept.add(ref.snapshot_id)
        if ref.snapshot_ref_type != SnapshotRefType.BRANCH:
            continue
        state = read_branch_state(table, name)
        needed = max(keep_last, state.snapshots_read) if state.compacted else None
        snapshot, depth = by_id.get(ref.snapshot_id), 0
        while snapshot is not None:
            if depth >= (needed or keep_last) and snapshot.timestamp_ms < older_than_ms:
                if needed is not None:
                    break
                if name not in report.history_kept:
                    report.history_kept.append(name)  # would have expired, but its state is in these summaries
            kept.add(snapshot.snapshot_id)
            parent = snapshot.parent_snapshot_id
            snapshot, depth = (by_id.get(parent) if parent is not None else None), depth + 1
    report.expired = sorted(i for i, s in by_id.items() if i not in kept and s.timestamp_ms < older_than_ms)
    report.kept = len(by_id) - len(report.expired)
    return report


def expire_snapshots(table: Table, *, older_than: datetime, keep_last: int, dry_run: bool = False) -> ExpiryReport:
    """Expire the snapshots of ``table`` that ``plan_expiry`` allows, in one metadata commit.

    The commit asserts that no branch or tag moved since the plan was made (pyiceberg's own
    ``expire_snapshots()`` asserts nothing, and the catalog applies the removal to its current metadata, where
    a ref moved meanwhile onto an expired snapshot would be dropped with it); when one did, the plan is made
    again on a fresh view. Files are not deleted here: ``remove_unreferenced`` and
    ``remove_unreferenced_metadata`` remove them once they are old enough.

    Raises:
        ValueError: ``keep_last`` is below 1.
        CommitError: the table kept changing for every attempt (transient).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (every branch keeps its head), got {keep_last}")
    name = ".".join(table.name())
    last_error: Exception | None = None
    for attempt in range(EXPIRY_ATTEMPTS):
        if attempt:
            time.sleep(random.uniform(*EXPIRY_BACKOFF_SECONDS))  # noqa: S311 - spreading retries, not a secret
            table = table.refresh()
        report = plan_expiry(table, older_than_ms=datetime_to_millis(older_than), keep_last=keep_last)
        if dry_run or not report.expired:
            return report
        refs = table.metadata.refs.items()
        requirements = tuple(AssertRefSnapshotId(ref=ref_name, snapshot_id=ref.snapshot_id) for ref_name, ref in refs)
        try:
            table.catalog.commit_table(table, requirements, (RemoveSnapshotsUpdate(snapshot_ids=report.expired),))
        except CommitFailedException as exc:
            last_error = exc
            log.info("expiring snapshots of %s conflicted with a commit (attempt %d): %s", name, attempt + 1, exc)
            continue
        log.info("expired %d snapshot(s) of %s; %d kept", len(report.expired), name, report.kept)
        return report
    raise CommitError(f"expiring snapshots of {name} failed after {EXPIRY_ATTEMPTS} attempts: {last_error}")


@dataclass
class CleanupReport:
    """What a clean-up removed; how many files it kept for being too young; how many files the commits reference."""

    removed: list[str] = field(default_factory=list)
    kept_recent: int = 0
    referenced: int = 0


def wall_clock() -> float:
    """Now, in seconds since the epoch: every age limit of this module is measured against it."""
    return time.time()


def check_min_age(older_than_seconds: float, what: str = "older_than_seconds") -> None:
    """Refuse an age limit below ``MIN_AGE_HOURS``.

    Raises:
        ValueError: ``older_than_seconds`` is below the floor (0 and negative values included).
    """
    floor = MIN_AGE_HOURS * 3600
    if not older_than_seconds >= floor:  # NaN too
        raise ValueError(
            f"{what} must be at least {floor:g} seconds ({MIN_AGE_HOURS:g} hours), got {older_than_seconds}: a younger"
            " file may belong to a run that has not committed yet (a retried step, a re-executed run)"
        )


def _listed_files(folder: str, s3: S3Settings, wanted: Callable[[str], bool]) -> list[pafs.FileInfo]:
    fs, path = filesystem_for(folder, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and wanted(i.base_name)]


def _uri(location: str, path: str) -> str:
    return f"s3://{path}" if location.startswith(("s3://", "s3a://")) else path


def _normalise(uri: str) -> str:
    for prefix in ("file://", "s3a://"):
        if uri.startswith(prefix):
            return ("s3://" if prefix == "s3a://" else "") + uri[len(prefix):]
    return uri


References = Callable[[], Iterable[str]]
"""Reads what the table's commits reference now (called right before each batch of deletions)."""


def remove_unreferenced(
    location: str, referenced: References, s3: S3Settings, *, older_than_seconds: float, dry_run: bool = False
) -> CleanupReport:
    """Delete Parquet files under ``<location>/data`` that no commit references and that are old enough.

    The age limit (at least ``MIN_AGE_HOURS``) keeps the files of runs still in flight: only files last modified
    more than ``older_than_seconds`` ago are removed. ``referenced`` is read right before each batch of deletions
    (after the folder was listed), so a file that a commit came to reference meanwhile is kept.

    Raises:
        ValueError: ``older_than_seconds`` is below ``MIN_AGE_HOURS``.
    """
    return _remove_unreferenced(
        f"{location.rstrip('/')}/data", lambda name: name.endswith(".parquet"), referenced, s3,
        older_than_seconds=older_than_seconds, dry_run=dry_run,
    )


def remove_stale_merge_keys(
    location: str, s3: S3Settings, *, older_than_seconds: float, dry_run: bool = False
) -> CleanupReport:
    """Delete the merge keys files (``<location>/_dativo_merge/*.parquet``) last modified more than
    ``older_than_seconds`` ago.

    A merge run writes its keys there before its commit and removes the file once the commit landed; a run that
    failed after writing it and is never re-executed leaves it behind. No commit references a keys file, so age
    alone decides, with the same floor as data files (``MIN_AGE_HOURS``): a re-execution of the run's commit step
    within that time still finds its keys; a later one fails naming the missing file (``merge.MergeKeys.read``).

    Raises:
        ValueError: ``older_than_seconds`` is below ``MIN_AGE_HOURS``.
    """
    return _remove_unreferenced(
        f"{location.rstrip('/')}/{KEYS_FOLDER}", lambda name: name.endswith(".parquet"), frozenset, s3,
        older_than_seconds=older_than_seconds, dry_run=dry_run,
    )


def _remove_unreferenced(
    folder: str,
    wanted: Callable[[str], bool],
    referenced: References,
    s3: S3Settings,
    *,
    older_than_seconds: float,
    dry_run: bool,
) -> CleanupReport:
    check_min_age(older_than_seconds)
    cutoff_ns = (wall_clock() - older_than_seconds) * 1e9
    fs, _ = filesystem_for(folder, s3)
    report = CleanupReport()
    candidates = []
    for info in _listed_files(folder, s3, wanted):
        if info.mtime_ns is None or info.mtime_ns > cutoff_ns:
            report.kept_recent += 1  # no time known counts as young
            continue
        candidates.append((_uri(folder, info.path), info.path))
    for start in range(0, len(candidates), DELETE_BATCH):
        # read right before each batch, not once before the listing: a commit may have landed since
        keep = {_normalise(u) for u in referenced()}
        report.referenced = len(keep)
        for uri, path in candidates[start:start + DELETE_BATCH]:
            if _normalise(uri) in keep:
                continue
            if not dry_run:
                try:
                    if is_s3_uri(uri):
                        # boto3, not pyarrow: pyarrow's delete leaves an empty "folder" object where the file was
                        delete_s3_object(uri, s3)
                    else:
                        fs.delete_file(path)
                except FileNotFoundError:
                    continue
            report.removed.append(uri)
    return report


def iceberg_referenced_files(table: Table) -> set[str]:
    """Every data file of every snapshot of every branch (time travel keeps them alive)."""
    files = table.inspect.all_files()
    return set(files.column("file_path").to_pylist()) if files.num_rows else set()


def current_references(table: Table, referenced: Callable[[Table], set[str]]) -> References:
    """``referenced(table)`` as the catalog has the table at each call: the table is refreshed every time, and
    read again only when a commit changed its metadata since the previous call."""
    seen: dict[str, set[str]] = {}

    def read() -> set[str]:
        table.refresh()
        if table.metadata_location not in seen:
            seen.clear()
            seen[table.metadata_location] = referenced(table)
        return seen[table.metadata_location]

    return read


def _is_state_file(name: str) -> bool:
    return name.startswith(STATE_FILE_PREFIX) and name.endswith(".json")


def _is_snapshot_metadata(name: str) -> bool:
    """Manifest lists, manifests and state files: what each commit adds to the metadata folder."""
    return name.endswith(".avro") or _is_state_file(name)


def iceberg_referenced_metadata(table: Table) -> set[str]:
    """The manifest lists and manifests of every snapshot kept, the state files they name, and statistics files."""
    referenced: set[str] = set()
    for snapshot in table.metadata.snapshots:
        referenced.add(snapshot.manifest_list)
        referenced.update(manifest.manifest_path for manifest in snapshot.manifests(table.io))
        if state_file := state_file_of(snapshot):
            referenced.add(state_file)
    referenced.update(f.statistics_path for f in table.metadata.statistics)
    referenced.update(f.statistics_path for f in table.metadata.partition_statistics)
    return referenced


def remove_unreferenced_metadata(
    table: Table, s3: S3Settings, *, older_than_seconds: float, dry_run: bool = False
) -> CleanupReport:
    """Delete manifest lists, manifests and state files that no kept snapshot references and that are old enough.

    They are what expired snapshots, and commits that the catalog refused, leave in the metadata folder (and
    state files in the folder used where the metadata folder refuses them, ``table_state.STATE_FOLDER``). Table
    metadata files (``*.metadata.json``) are never touched: the catalog and the metadata log refer to them.
    """
    referenced = current_references(table, iceberg_referenced_metadata)
    metadata_folder, state_folder = state_file_folders(table)
    report = _remove_unreferenced(
        metadata_folder, _is_snapshot_metadata, referenced, s3, older_than_seconds=older_than_seconds, dry_run=dry_run
    )
    states = _remove_unreferenced(
        state_folder, _is_state_file, referenced, s3, older_than_seconds=older_than_seconds, dry_run=dry_run
    )
    return CleanupReport(removed=report.removed + states.removed, kept_recent=report.kept_recent + states.kept_recent,
                         referenced=max(report.referenced, states.referenced))


def marker_referenced_files(location: str, s3: S3Settings) -> set[str]:
    """Every data file any commit marker lists, hidden or not."""
    return {f["uri"] for marker in read_commit_markers(location, s3) for f in marker["files"]}


def remove_stale_staging(root: str | Path, older_than_seconds: float, s3: S3Settings | None = None) -> list[str]:
    """Delete the staged records of runs whose newest record is older than ``older_than_seconds``.

    ``root`` is a local folder or an ``s3://`` prefix. A run re-executed from failure reads its parent run's
    records, so the age limit is at least ``MIN_AGE_HOURS``; each run's records are listed again right before
    they are deleted, and a run that wrote one meanwhile keeps them all. A re-execution that comes later still
    fails naming the missing record (``StagingResource.read``).

    Raises:
        ValueError: ``older_than_seconds`` is below ``MIN_AGE_HOURS``.
    """
    check_min_age(older_than_seconds)
    cutoff = wall_clock() - older_than_seconds
    removed: list[str] = []
    if is_s3_uri(str(root)):
        settings = s3 or S3Settings()
        base = str(root).rstrip("/")

        def stale(items: Iterable[S3Object]) -> bool:
            return all(i.last_modified is not None and i.last_modified.timestamp() < cutoff for i in items)

        runs: dict[str, list[S3Object]] = {}
        for item in list_s3_objects(f"{base}/", settings):
            run_id = item.uri.removeprefix(f"{base}/").split("/", 1)[0]
            runs.setdefault(run_id, []).append(item)
        for run_id, items in sorted(runs.items()):
            if not stale(items):
                continue
            current = list(list_s3_objects(f"{base}/{run_id}/", settings))  # again, right before deleting
            if not current or not stale(current):
                continue
            for item in current:
                delete_s3_object(item.uri, settings)
            removed.append(f"{base}/{run_id}")
        return removed
    root = Path(root)
    if not root.is_dir():
        return removed
    for run_dir in sorted(root.iterdir()):
        # the newest time in the folder, read right before it goes: a step that staged a record meanwhile keeps it
        if run_dir.is_dir() and _newest_mtime(run_dir) < cutoff:
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(str(run_dir))
    return removed


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of ``folder`` and of everything below it."""
    newest = folder.stat().st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue  # removed meanwhile
    return newest
