"""Time partitions: a spec's ``partitions:`` as a Dagster partitions definition, and one partition's window.

A partition's run reads the files whose path holds its key (``{partition}``), rejects rows whose ``field`` falls
outside its window (``out_of_partition``) and replaces the window's rows on the branch in its one commit
(:class:`WindowSelection`, taken off by ``rewrite.remove_rows``). See docs/partitions.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.manifest import DataFile

from dativo_dagster.incremental import Selection, select_files
from dativo_dagster.sources.base import SourceFile
from dativo_dagster.spec import AssetSpecModel, CsvSourceSpec, LoadedSpec, PartitionType
from dativo_dagster.table_schema import PARTITION_KEY_COLUMN
from dativo_dagster.types import TypeKind
from dativo_dagster.validate import OUT_OF_PARTITION

PARTITION_PLACEHOLDER = "{partition}"
PARTITION_KEY_PROPERTY = "dativo.partition"  # snapshot summary: the partition a commit replaced

_DEFINITIONS: dict[PartitionType, type[dg.TimeWindowPartitionsDefinition]] = {
    PartitionType.HOURLY: dg.HourlyPartitionsDefinition,
    PartitionType.DAILY: dg.DailyPartitionsDefinition,
    PartitionType.WEEKLY: dg.WeeklyPartitionsDefinition,
    PartitionType.MONTHLY: dg.MonthlyPartitionsDefinition,
}


def partitions_definition(spec: AssetSpecModel) -> dg.TimeWindowPartitionsDefinition | None:
    """The Dagster partitions of a spec with ``partitions:`` (None without)."""
    parts = spec.partitions
    if parts is None:
        return None
    start = datetime.strptime(parts.start, "%Y-%m-%d %H:%M" if " " in parts.start else "%Y-%m-%d")
    return _DEFINITIONS[parts.type](start_date=start, timezone=parts.timezone)


@dataclass(frozen=True)
class PartitionWindow:
    """One partition: its key and its window ``[start, end)`` (aware, in the partitions' zone) over ``field``."""

    key: str
    start: datetime
    end: datetime
    field: str
    kind: TypeKind

    def _bound(self, moment: datetime) -> date | datetime:
        if self.kind is TypeKind.DATE:
            return moment.date()  # the calendar day in the partitions' zone
        if self.kind is TypeKind.TIMESTAMP:
            return moment.replace(tzinfo=None)  # wall-clock time in the partitions' zone
        return moment.astimezone(timezone.utc)

    def bounds(self) -> tuple[date | datetime, date | datetime]:
        """The window's bounds as values of the field's type."""
        return self._bound(self.start), self._bound(self.end)

    def _scalars(self, arrow_type: pa.DataType) -> tuple[pa.Scalar, pa.Scalar]:
        low, high = self.bounds()
        return pa.scalar(low, arrow_type), pa.scalar(high, arrow_type)

    def outside(self, values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        """Per value: true when it is not null and falls outside the window (vectorised)."""
        low, high = self._scalars(values.type)
        inside = pc.and_(pc.greater_equal(values, low), pc.less(values, high))
        return pc.fill_null(pc.invert(inside), False)

    def describe(self) -> str:
        low, high = self.bounds()
        return f"partition {self.key}: {self.field} in [{low.isoformat()}, {high.isoformat()})"


def partition_window(loaded: LoadedSpec, key: str) -> PartitionWindow:
    """The window of partition ``key`` of a partitioned spec.

    Raises:
        ValueError: the spec has no ``partitions:``, or ``key`` is not one of its partition keys.
    """
    spec = loaded.spec
    definition = partitions_definition(spec)
    if definition is None or spec.partitions is None:
        raise ValueError(f"{loaded.display_path}: the spec has no partitions; got partition key {key!r}")
    window = definition.time_window_for_partition_key(key)
    kind = next(f.type.kind for f in spec.fields if f.name == spec.partitions.field)
    return PartitionWindow(key=key, start=window.start, end=window.end, field=spec.partitions.field, kind=kind)


def for_partition(loaded: LoadedSpec, key: str) -> LoadedSpec:
    """The spec as partition ``key``'s run reads it: ``{partition}`` in each source path replaced by the key; a
    database source's spec carries the key (its query's ``:partition_start`` / ``:partition_end``, or a table's
    ``WHERE field >= start AND field < end``)."""
    source = loaded.spec.source
    if not isinstance(source, CsvSourceSpec):  # a database source binds the window's bounds when it reads
        return loaded.model_copy(update={"partition_key": key})
    files = [f.model_copy(update={"path": f.path.replace(PARTITION_PLACEHOLDER, key)}) for f in source.files]
    spec = loaded.spec.model_copy(update={"source": source.model_copy(update={"files": files})})
    return loaded.model_copy(update={"spec": spec})


def partition_state_key(key: str, uri: str) -> str:
    """The name of a source file in the committed source state of partition ``key``'s runs: ``[key]uri``.

    Each partition keeps its own state: a file that several partitions read (a path without ``{partition}``) is
    committed once per partition, and one partition's run never makes another's files look new or old."""
    return f"[{key}]{uri}"


def partition_source_state(key: str, files: Mapping[str, str], removed: Sequence[str] = ()) -> dict[str, str]:
    """The source state a run of partition ``key`` commits: its files at their versions, and ``removed`` files
    (committed for the partition, no longer listed) at the version ``REMOVED``, so they are not missed again."""
    state = {partition_state_key(key, uri): version for uri, version in files.items()}
    state.update({partition_state_key(key, uri): REMOVED for uri in removed})
    return state


REMOVED = ""  # the version of a file that a partition's run found gone (no listed file has an empty version)


@dataclass
class PartitionSelection(Selection):
    """What an incremental partition's run reads: every listed file of the partition when any is new or changed
    or a committed one is gone (the run replaces the whole window), else nothing."""

    removed: list[str] = field(default_factory=list)

    @property
    def nothing_new(self) -> bool:
        return not self.to_read and not self.removed

    def describe(self) -> str:
        return super().describe() + f", {len(self.removed)} removed"


def select_partition_files(listed: Sequence[SourceFile], committed: Mapping[str, str], key: str) -> PartitionSelection:
    """Decide an incremental run of partition ``key`` from the branch's committed state (its own entries only)."""
    prefix = partition_state_key(key, "")
    own = {uri[len(prefix):]: version for uri, version in committed.items() if uri.startswith(prefix)}
    found = select_files(listed, {u: v for u, v in own.items() if v != REMOVED}, lookback_days=0,
                         now=datetime.now(timezone.utc))
    names = {f.uri for f in listed}
    removed = sorted(uri for uri, version in own.items() if version != REMOVED and uri not in names)
    read_all = bool(found.to_read or removed)
    return PartitionSelection(
        to_read=list(listed) if read_all else [], new=found.new, changed=found.changed, unchanged=found.unchanged,
        removed=removed,
    )


_SENTINEL = "\x00partition\x00"


def _glob_regex(text: str) -> str:
    """A regular expression for a path glob (``**`` any levels, ``*`` / ``?`` within one level)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("**", i):
            out.append(".*")
            i += 2
        elif text[i] == "*":
            out.append("[^/]*")
            i += 1
        elif text[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(text[i]))
            i += 1
    return "".join(out)


def partition_path_patterns(loaded: LoadedSpec, resolve: Callable[[str, LoadedSpec], str]) -> list[re.Pattern[str]]:
    """For each ``source.files`` path holding ``{partition}``: a regular expression over listed URIs whose group
    ``key`` is the partition key the path was made from (``resolve``: the CSV source's path resolution)."""
    source = loaded.spec.source
    assert isinstance(source, CsvSourceSpec)
    patterns = []
    for entry in source.files:
        if PARTITION_PLACEHOLDER not in entry.path:
            continue
        resolved = resolve(entry.path.replace(PARTITION_PLACEHOLDER, _SENTINEL), loaded)
        pieces = [_glob_regex(piece) for piece in resolved.split(_SENTINEL)]
        regex = pieces[0] + "".join(("(?P<key>[^/]+?)" if i == 1 else "(?P=key)") + piece
                                    for i, piece in enumerate(pieces[1:], start=1))
        patterns.append(re.compile(regex + r"\Z", re.DOTALL))
    return patterns


def for_all_partitions(loaded: LoadedSpec) -> LoadedSpec:
    """The spec as a sensor lists it: its ``{partition}`` paths with any key (``*``); paths without it left out."""
    source = loaded.spec.source
    assert isinstance(source, CsvSourceSpec)
    files = [f.model_copy(update={"path": f.path.replace(PARTITION_PLACEHOLDER, "*")})
             for f in source.files if PARTITION_PLACEHOLDER in f.path]
    spec = loaded.spec.model_copy(update={"source": source.model_copy(update={"files": files})})
    return loaded.model_copy(update={"spec": spec})


def partition_key_of(uri: str, patterns: Sequence[re.Pattern[str]], definition: dg.PartitionsDefinition) -> str | None:
    """The partition key a listed file was found under (None: no path pattern gives it a valid, ended-or-current
    key of the asset's partitions)."""
    for pattern in patterns:
        match = pattern.match(uri)
        if match is not None and definition.has_partition_key(match.group("key")):
            return match.group("key")
    return None


@dataclass(frozen=True)
class PartitionRejects:
    """The quarantined rows of one partition's earlier runs (``_partition`` = key): what a partition's run replaces
    in the quarantine table, in its commit of the rejects (a ``rewrite.RowSelection``)."""

    key: str
    sources: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"the rejects of partition {self.key}"

    def columns(self) -> list[str]:
        return [PARTITION_KEY_COLUMN]

    def row_filter(self) -> BooleanExpression:
        return EqualTo(PARTITION_KEY_COLUMN, self.key)

    def might_hold(self, data_file: DataFile) -> bool:
        return True  # the quarantine table is not partitioned; scan planning has used the column bounds

    def matches(self, data: pa.Table) -> pa.Array:
        return pc.fill_null(pc.equal(data.column(PARTITION_KEY_COLUMN), self.key), False)

    def narrowed(self, bounds: Mapping[str, tuple[Any, Any]]) -> PartitionRejects:
        return self  # a row group's bounds are not used to skip it: the quarantine table's files are small


@dataclass(frozen=True)
class WindowSelection:
    """The rows of a branch whose ``field`` falls in a partition's window: what a partition's run replaces
    (a ``rewrite.RowSelection``)."""

    window: PartitionWindow
    sources: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.window.describe()

    def columns(self) -> list[str]:
        return [self.window.field]

    def row_filter(self) -> BooleanExpression:
        low, high = self.window.bounds()
        # pyiceberg converts ISO text to the column's type (date, timestamp, timestamptz)
        return And(GreaterThanOrEqual(self.window.field, low.isoformat()), LessThan(self.window.field, high.isoformat()))

    def might_hold(self, data_file: DataFile) -> bool:
        return True  # scan planning has pruned by partition values and column bounds already

    def matches(self, data: pa.Table) -> pa.Array:
        column = data.column(self.window.field)
        low, high = self.window._scalars(column.type)
        inside = pc.and_(pc.greater_equal(column, low), pc.less(column, high))
        return pc.fill_null(inside, False)

    def narrowed(self, bounds: Mapping[str, tuple[Any, Any]]) -> WindowSelection:
        return self  # every row group of a file that scan planning kept is read: a window spans whole row groups


__all__ = [
    "PARTITION_KEY_PROPERTY",
    "PartitionRejects",
    "PartitionSelection",
    "for_all_partitions",
    "partition_key_of",
    "partition_path_patterns",
    "partition_source_state",
    "partition_state_key",
    "select_partition_files",
    "OUT_OF_PARTITION",
    "PARTITION_PLACEHOLDER",
    "PartitionWindow",
    "WindowSelection",
    "for_partition",
    "partition_window",
    "partitions_definition",
]
