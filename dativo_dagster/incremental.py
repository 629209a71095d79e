"""Incremental state: which source files (at which version) the committed table already holds (CONTRACT 5)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyiceberg.table import Table

from dativo_dagster.sources.base import SourceFile, same_version
from dativo_dagster.table_state import SOURCE_STATE_KEY, parse_source_state, read_branch_state

__all__ = ["SOURCE_STATE_KEY", "Selection", "marker_source_state", "parse_source_state", "select_files",
           "table_source_state"]


def table_source_state(table: Table, branch: str) -> dict[str, str]:
    """Every source file the branch holds rows of, at the version last committed.

    Read from the branch head: its own summary and the state file it names (see ``table_state``); tables
    written before state files existed are read by walking the lineage, the newest snapshot naming a file
    winning. The committed table is the only truth; sensor cursors never decide what is read.
    """
    return read_branch_state(table, branch).sources


def marker_source_state(markers: Iterable[Mapping[str, object]]) -> dict[str, str]:
    """The same for ``catalog: none``: commit markers, oldest first, later ones win."""
    state: dict[str, str] = {}
    for marker in markers:
        properties = marker.get("properties") or {}
        if isinstance(properties, Mapping):
            state.update(parse_source_state(properties.get(SOURCE_STATE_KEY)))  # type: ignore[arg-type]
    return state


@dataclass
class Selection:
    """The files a run reads, and why the others are left out."""

    to_read: list[SourceFile] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    too_old: list[str] = field(default_factory=list)

    @property
    def nothing_new(self) -> bool:
        return not self.to_read

    def describe(self) -> str:
        return (
            f"{len(self.new)} new, {len(self.changed)} changed, {len(self.unchanged)} unchanged,"
            f" {len(self.too_old)} outside the lookback window"
        )


def select_files(
    listed: Sequence[SourceFile], committed: Mapping[str, str], *, lookback_days: int, now: datetime
) -> Selection:
    """Files that are new, or whose version changed since the last commit, within the lookback window."""
    selection = Selection()
    oldest_ns = int((now - timedelta(days=lookback_days)).timestamp() * 1e9) if lookback_days > 0 else None
    for source in listed:
        if oldest_ns is not None and source.modified_ns and source.modified_ns < oldest_ns:
            selection.too_old.append(source.uri)
            continue
        previous = committed.get(source.uri)
        if previous is not None and same_version(previous, source.version):
            selection.unchanged.append(source.uri)
            continue
        selection.to_read.append(source)
        (selection.new if previous is None else selection.changed).append(source.uri)
    return selection
