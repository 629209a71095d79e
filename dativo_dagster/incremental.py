"""Incremental state: which source files (at which version) the committed table already holds (CONTRACT 5)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

from dativo_dagster.extract import SourceFile

log = logging.getLogger(__name__)

SOURCE_STATE_KEY = "dativo.source-state"


def parse_source_state(text: str | None) -> dict[str, str]:
    """The ``{uri: version}`` mapping stored in a snapshot summary or a commit marker."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        log.warning("ignoring unreadable source state %r", text[:80])
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def table_source_state(table: Table, branch: str) -> dict[str, str]:
    """Every source file the branch holds rows of, at the version last committed.

    Walks the branch's lineage from its head: the newest snapshot that names a file wins. The
    committed table is the only truth; sensor cursors never decide what is read.
    """
    head = table.snapshot_by_name(branch)
    state: dict[str, str] = {}
    for snapshot in ancestors_of(head, table.metadata):
        summary = snapshot.summary
        if summary is None:
            continue
        for uri, version in parse_source_state(summary.additional_properties.get(SOURCE_STATE_KEY)).items():
            state.setdefault(uri, version)
    return state


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
        if previous == source.version:
            selection.unchanged.append(source.uri)
            continue
        selection.to_read.append(source)
        (selection.new if previous is None else selection.changed).append(source.uri)
    return selection
