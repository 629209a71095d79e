"""Maintenance: remove files that no commit references (left by runs killed mid-way) and stale staging."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
from pyiceberg.table import Table

from dativo_dagster.markers import read_commit_markers
from dativo_dagster.storage import S3Settings, filesystem_for

log = logging.getLogger(__name__)


@dataclass
class CleanupReport:
    """What a clean-up removed."""

    removed: list[str] = field(default_factory=list)
    kept_recent: int = 0
    referenced: int = 0


def _listed_files(location: str, s3: S3Settings) -> list[pafs.FileInfo]:
    fs, path = filesystem_for(f"{location.rstrip('/')}/data", s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")]


def _uri(location: str, path: str) -> str:
    return f"s3://{path}" if location.startswith(("s3://", "s3a://")) else path


def _normalise(uri: str) -> str:
    for prefix in ("file://", "s3a://"):
        if uri.startswith(prefix):
            return ("s3://" if prefix == "s3a://" else "") + uri[len(prefix):]
    return uri


def remove_unreferenced(
    location: str, referenced: Iterable[str], s3: S3Settings, *, older_than_seconds: float, dry_run: bool = False
) -> CleanupReport:
    """Delete Parquet files under ``<location>/data`` that no commit references and that are old enough.

    The age limit keeps the files of runs still in flight: only files last modified more than
    ``older_than_seconds`` ago are removed.
    """
    keep = {_normalise(u) for u in referenced}
    report = CleanupReport(referenced=len(keep))
    cutoff_ns = (time.time() - older_than_seconds) * 1e9
    fs, _ = filesystem_for(location, s3)
    for info in _listed_files(location, s3):
        uri = _uri(location, info.path)
        if _normalise(uri) in keep:
            continue
        if info.mtime_ns is not None and info.mtime_ns > cutoff_ns:
            report.kept_recent += 1
            continue
        if not dry_run:
            try:
                fs.delete_file(info.path)
            except FileNotFoundError:
                continue
        report.removed.append(uri)
    return report


def iceberg_referenced_files(table: Table) -> set[str]:
    """Every data file of every snapshot of every branch (time travel keeps them alive)."""
    files = table.inspect.all_files()
    return set(files.column("file_path").to_pylist()) if files.num_rows else set()


def marker_referenced_files(location: str, s3: S3Settings) -> set[str]:
    """Every data file any commit marker lists, hidden or not."""
    return {f["uri"] for marker in read_commit_markers(location, s3) for f in marker["files"]}


def remove_stale_staging(root: Path, older_than_seconds: float) -> list[str]:
    """Delete run staging folders untouched for longer than ``older_than_seconds``."""
    removed = []
    if not root.is_dir():
        return removed
    cutoff = time.time() - older_than_seconds
    for run_dir in root.iterdir():
        if run_dir.is_dir() and run_dir.stat().st_mtime < cutoff:
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(str(run_dir))
    return removed
