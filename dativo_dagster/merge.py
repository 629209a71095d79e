"""Merge by primary key (CONTRACT 8): a run's rows replace the branch's rows with the same key, new keys are added.

Three parts, each a plain function or record over Arrow data:

- :class:`MergeBuffer` sits in front of the run's data writer while the rows stream (``pipeline.py``): it keeps
  them in a local Arrow IPC file and, once the stream ends, keeps only the last row read for each key, drops the
  rows whose ``delete_field`` is true, writes the rest through the project's writer, and stores the run's keys (every
  key it read, deleted or not) in a small Parquet file next to the table for the commit step.
- :class:`KeySelection` tells ``rewrite.remove_rows`` which rows of the branch leave: those whose key the run
  brought (and, under ``file_modified_time``, those of the changed source files). Files are pruned by scan
  planning (partition and key-column bounds) and by the files' own key bounds; only candidates are read.
- :func:`ensure_key` records the key in the table (Iceberg's ``identifier-field-ids``) and refuses a merge onto a
  table that holds rows under no key or another key; :func:`duplicate_keys` backs the ``unique_key`` check.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.conversions import from_bytes
from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    GreaterThanOrEqual,
    In,
    LessThanOrEqual,
    Or,
)
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile, ManifestEntryStatus
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, ancestors_of
from pyiceberg.types import DateType, DecimalType, IntegerType, LongType, NestedField, StringType

from dativo_dagster.errors import TerminalError
from dativo_dagster.rewrite import SourceSelection, read_column_groups, read_matches
from dativo_dagster.table_state import RUN_ID_KEY
from dativo_dagster.storage import S3Settings, filesystem_for, is_s3_uri, join_uri
from dativo_dagster.write import PartitionedParquetWriter, WrittenFile, remove_file

log = logging.getLogger(__name__)

# a merge's snapshots carry it: the commit counted, before it landed, the keys it brought and those of every file added
# since the last snapshot carrying it (merge_keys_to_check), so the branch held each key once up to it
KEY_CHECKED_KEY = "dativo.key-checked"
KEYS_FOLDER = "_dativo_merge"  # under the table location: one Parquet file of keys per run's write
ROW = "__dativo_row"
IN_LIMIT = 200  # pyiceberg's planning evaluates an In filter exactly up to this many values; beyond, a range
CHUNK_ROWS = 65_536
# key types whose values pyiceberg's expressions take as plain Python values (for the planning filter)
_FILTERABLE = (IntegerType, LongType, StringType, DateType, DecimalType)


def keyed_schema(schema: Schema, key: Sequence[str]) -> Schema:
    """``schema`` with the key fields required and recorded as its identifier fields (Iceberg's place for a key)."""
    fields = [
        NestedField(f.field_id, f.name, f.field_type, required=f.required or f.name in key, doc=f.doc)
        for f in schema.fields
    ]
    ids = [schema.find_field(name).field_id for name in key]
    return Schema(*fields, schema_id=schema.schema_id, identifier_field_ids=ids)


def recorded_key(table: Table) -> list[str]:
    """The key the table records (its schema's identifier fields, in schema order); empty when it has none."""
    schema = table.schema()
    ids = set(schema.identifier_field_ids)
    return [f.name for f in schema.fields if f.field_id in ids]


def _holds_rows(table: Table) -> bool:
    for ref in table.metadata.refs.values():
        snapshot = table.snapshot_by_id(ref.snapshot_id)
        if snapshot is not None and snapshot.summary is not None and int(snapshot.summary.get("total-records") or 0):
            return True
    return False


def ensure_key(table: Table, key: Sequence[str], *, overwrite: bool = False) -> Table:
    """Make sure the table records ``key`` before a merge (or an overwrite of a keyed spec) writes to it.

    A table without rows, or one an overwrite is about to replace whole, gets the key recorded (the key columns
    become required, as Iceberg wants of identifier fields). A table that holds rows under no key, or under another
    key, is refused: its rows may repeat the spec's key, which a merge would then keep.

    Raises:
        TerminalError: the table holds rows and records no key, or another key; the message names the fix.
    """
    key = list(key)
    recorded = recorded_key(table)
    if recorded == key:
        return table
    name = ".".join(table.name())
    if not overwrite and _holds_rows(table):
        if recorded:
            raise TerminalError(
                f"table {name}: the spec's primary key {key} differs from the key the table records {recorded};"
                " a merge by the new key would keep rows that repeat it. Fix: mark primary_key: true on"
                f" {', '.join(recorded)} again, or reload the table under the new key: run the asset once with"
                " write_mode: overwrite (it replaces every row and records the new key), then switch back to merge"
            )
        raise TerminalError(
            f"table {name} holds rows but records no primary key (it was created by a spec without primary_key"
            " fields or with write_mode: append), so its rows may repeat a key and merge is refused. Fix: run the"
            " asset once with write_mode: overwrite (it replaces every row and records the key), then switch to"
            " write_mode: merge; or write the merge to a new table (another name)"
        )
    with table.update_schema(allow_incompatible_changes=True) as update:
        for column in key:
            if not table.schema().find_field(column).required:
                update.update_column(column, required=True)
        update.set_identifier_fields(*key)
    log.info("%s: recorded the primary key %s (was %s)", name, key, recorded or "none")
    return table.refresh()


@dataclass(frozen=True)
class MergeKeys:
    """The keys one run's merge touches: a Parquet file of the key columns (``MergeBuffer`` wrote it)."""

    uri: str
    key: tuple[str, ...]
    s3: S3Settings = field(default_factory=S3Settings)

    def read(self) -> pa.Table:
        """The key columns, one row per distinct key.

        Raises:
            TerminalError: the file is gone (a maintenance job removed it): the run must be materialized again.
        """
        fs, path = filesystem_for(self.uri, self.s3)
        try:
            return pq.read_table(path, filesystem=fs)
        except FileNotFoundError:
            raise TerminalError(
                f"the merge keys file {self.uri} written by this run is gone; nothing was committed:"
                " materialize the asset again in a new run"
            ) from None

    def remove(self) -> None:
        """Delete the file once the commit landed (best effort: it is small)."""
        try:
            remove_file(self.uri, self.s3)
        except OSError as exc:
            log.warning("could not remove the merge keys file %s: %s", self.uri, exc)


def _row_index(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


@dataclass(frozen=True)
class MergeOutcome:
    """What deduplicating a run's rows did."""

    rows_in: int
    rows_kept: int
    keys: int  # distinct keys the run read (its affected keys)
    keys_deleted: int

    @property
    def rows_not_loaded(self) -> int:
        """Rows read but not loaded: earlier rows of a key read again later, and delete rows."""
        return self.rows_in - self.rows_kept


def last_per_key(keys: pa.Table, deleted: pa.Array | pa.ChunkedArray | None) -> tuple[np.ndarray, pa.Table, int]:
    """Which rows a merge loads: for each key the last row read, unless that row is a delete.

    Args:
        keys: the key columns of every row, in the order read.
        deleted: the delete field per row (true: the key is removed), or None.

    Returns:
        A boolean mask over the rows (true: load it), the distinct keys (the run's affected keys), and how many
        of them the run deletes.
    """
    n = keys.num_rows
    indexed = keys.append_column(ROW, _row_index(n))
    last = indexed.group_by(keys.column_names, use_threads=False).aggregate([(ROW, "max")])
    winners = last.column(f"{ROW}_max")
    keep = np.zeros(n, dtype=bool)
    winner_rows = winners.to_numpy()
    keep[winner_rows] = True
    keys_deleted = 0
    if deleted is not None:
        removes = pc.fill_null(pc.take(deleted, winners), False).to_numpy(zero_copy_only=False)
        keep[winner_rows[removes]] = False
        keys_deleted = int(removes.sum())
    return keep, last.drop_columns([f"{ROW}_max"]), keys_deleted


class MergeBuffer:
    """Takes the run's rows in place of its data writer; on :meth:`close` loads the last row of each key.

    The rows wait in a local Arrow IPC file (read back memory-mapped), so memory stays bounded by the key columns.
    """

    def __init__(
        self,
        writer: PartitionedParquetWriter,
        *,
        key: Sequence[str],
        delete_field: str | None,
        keys_uri: str,
        s3: S3Settings,
    ):
        self.writer = writer
        self.schema = writer.schema
        self.file_schema = writer.file_schema
        self.location = writer.location
        self.key = list(key)
        self.delete_field = delete_field
        self.keys_uri = keys_uri
        self.s3 = s3
        self.outcome: MergeOutcome | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="dativo-merge-"))
        self._path = self._dir / "rows.arrow"
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._keys_written = False

    def write(self, table: pa.Table) -> None:
        """Keep rows (in the writer's ``schema``; repeated system columns may be dictionary-encoded)."""
        table = table.cast(self.file_schema)
        if self._ipc is None:
            self._ipc = pa.ipc.new_file(str(self._path), self.file_schema)
        self._ipc.write_table(table)

    def close(self) -> list[WrittenFile]:
        """Write the last row of every key (not the deleted ones) through the writer, and the keys file."""
        if self._ipc is None:
            self._ipc = pa.ipc.new_file(str(self._path), self.file_schema)
        self._ipc.close()
        try:
            with pa.memory_map(str(self._path)) as source:
                rows = pa.ipc.open_file(source).read_all()
                keep, keys, keys_deleted = last_per_key(
                    rows.select(self.key), rows.column(self.delete_field) if self.delete_field else None
                )
                for offset in range(0, rows.num_rows, CHUNK_ROWS):
                    piece = rows.slice(offset, CHUNK_ROWS).filter(pa.array(keep[offset:offset + CHUNK_ROWS]))
                    if piece.num_rows:
                        self.writer.write(piece)
                del rows
            files = self.writer.close()
            keys = keys.cast(pa.schema([self.schema.field(name).with_nullable(True) for name in self.key]))
            fs, path = filesystem_for(self.keys_uri, self.s3)
            if not is_s3_uri(self.keys_uri):
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pq.write_table(keys, path, filesystem=fs)
            self._keys_written = True
            kept = int(keep.sum())
            self.outcome = MergeOutcome(len(keep), kept, keys.num_rows, keys_deleted)
            if self.outcome.rows_not_loaded:
                log.info(
                    "merge: %d row(s) read for %d key(s); %d earlier row(s) of a key and %d delete(s) not loaded",
                    len(keep), keys.num_rows, self.outcome.rows_not_loaded - keys_deleted, keys_deleted,
                )
            return files
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything written: the waiting rows, the writer's files, the keys file."""
        if self._ipc is not None:
            try:
                self._ipc.close()
            except (OSError, pa.ArrowInvalid):
                log.debug("the merge buffer of %s was already closed", self.location)
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._keys_written:
            remove_file(self.keys_uri, self.s3)
        self.writer.abort()


def keys_uri(location: str, run_id: str) -> str:
    """Where one write of ``run_id`` keeps its merge keys (unique per write: a retried write makes its own)."""
    return join_uri(location, KEYS_FOLDER, f"{run_id}-{uuid.uuid4().hex[:12]}.parquet")


@dataclass(frozen=True)
class KeySelection:
    """The branch rows a merge takes away: rows with one of ``keys``, and every row of ``sources`` (the changed
    source files under ``file_modified_time``, whose earlier rows are replaced as in an append)."""

    keys: pa.Table
    schema: Schema
    sources: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.keys.num_rows} key(s)"
        return f"{text} and {len(self.sources)} changed source file(s)" if self.sources else text

    def columns(self) -> list[str]:
        # ``_source_file`` only when changed sources are replaced too: it is the widest column of a data file
        return [*self.keys.column_names, *(SourceSelection(self.sources).columns() if self.sources else [])]

    def row_filter(self) -> BooleanExpression:
        """The first key column's values (up to IN_LIMIT of them) or each key column's range, for scan planning:
        pyiceberg prunes manifests and files by partition and column bounds with it."""
        terms: list[BooleanExpression] = []
        for name in self.keys.column_names:
            if not isinstance(self.schema.find_field(name).field_type, _FILTERABLE):
                continue
            column = self.keys.column(name)
            if not terms and self.keys.num_rows <= IN_LIMIT:  # the keys are distinct: so are at most as many values
                terms.append(In(name, pc.unique(column).to_pylist()))
                break
            bounds = pc.min_max(column).as_py()
            terms.append(And(GreaterThanOrEqual(name, bounds["min"]), LessThanOrEqual(name, bounds["max"])))
        keys: BooleanExpression = AlwaysTrue()
        for term in terms:
            keys = term if isinstance(keys, AlwaysTrue) else And(keys, term)
        return Or(keys, SourceSelection(self.sources).row_filter()) if self.sources else keys

    def might_hold(self, data_file: DataFile) -> bool:
        """False when, for some key column, no key of the run lies within the file's lower/upper bounds."""
        if self.sources:
            return True  # the changed sources' rows may be anywhere
        for name in self.keys.column_names:
            nested = self.schema.find_field(name)
            lower = (data_file.lower_bounds or {}).get(nested.field_id)
            upper = (data_file.upper_bounds or {}).get(nested.field_id)
            if lower is None or upper is None:
                continue
            column = self.keys.column(name)
            low = pa.scalar(from_bytes(nested.field_type, lower), column.type)
            high = pa.scalar(from_bytes(nested.field_type, upper), column.type)
            if not pc.any(pc.and_(pc.greater_equal(column, low), pc.less_equal(column, high))).as_py():
                return False
        return True

    @cached_property
    def sorted_key(self) -> np.ndarray | None:
        """The run's keys sorted, when the key is one integer or date/time column: probed by binary search, so that
        each piece of a file is matched without building a hash set of the run's keys again; else None."""
        if self.keys.num_columns != 1:
            return None
        column = self.keys.column(0)
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_date(kind) or pa.types.is_timestamp(kind)):
            return None
        return np.sort(column.to_numpy())

    def narrowed(self, bounds: Mapping[str, tuple[Any, Any]]) -> KeySelection | None:
        """The run's keys that lie within ``bounds`` (key column: (min, max) of some row groups), or None when none
        does (and no changed source is replaced): those row groups need not be read. With a hash-matched key the
        hash set they are probed with then holds only the keys they can hold."""
        inside: pa.Array | None = None
        for name in self.keys.column_names:
            if name not in bounds:
                continue
            column = self.keys.column(name)
            try:
                low, high = (pa.scalar(value, column.type) for value in bounds[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                continue  # statistics of a type Arrow does not take back as the key's: no narrowing by them
            if self.sorted_key is not None:  # one sorted column: count the keys within by binary search
                edges = pa.array([low, high], column.type).to_numpy(zero_copy_only=False)
                first = np.searchsorted(self.sorted_key, edges[0])
                last = np.searchsorted(self.sorted_key, edges[1], "right")
                return self if first < last or self.sources else None
            within = pc.and_(pc.greater_equal(column, low), pc.less_equal(column, high))
            inside = within if inside is None else pc.and_(inside, within)
        if inside is None:
            return self
        keys = self.keys.filter(inside)
        if not keys.num_rows:
            return self if self.sources else None
        return self if keys.num_rows == self.keys.num_rows else KeySelection(keys, self.schema, self.sources)

    def matches(self, data: pa.Table) -> pa.Array:
        """Rows whose key is one of the run's keys (binary search in the sorted keys, an Arrow hash set, or an Arrow
        hash join), or that came from a changed source."""
        names = self.keys.column_names
        rows = data.select(names)
        if self.sorted_key is not None:
            values = rows.column(0).cast(self.keys.column(0).type).to_numpy()  # a chunked array: copied
            found = pa.array(_in_sorted(self.sorted_key, values))
        elif len(names) == 1:
            # one key column: a hash set of the run's keys, probed by the column (less memory than a join)
            column = rows.column(0)
            found = pc.is_in(column, value_set=self.keys.column(0).cast(column.type).combine_chunks())
        else:
            indexed = rows.append_column(ROW, _row_index(data.num_rows))
            keys = self.keys.cast(rows.schema)
            hit = indexed.join(keys, keys=names, join_type="left semi", use_threads=False).column(ROW)
            matched = hit.combine_chunks() if hit.num_chunks else pa.array([], pa.int64())
            found = pc.is_in(indexed.column(ROW), value_set=matched)
        if self.sources:
            found = pc.or_(found, SourceSelection(self.sources).matches(data))
        return found


def _in_sorted(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per value: whether it is one of ``keys`` (sorted), by binary search (vectorised)."""
    if not len(keys):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return keys[at] == values


@dataclass(frozen=True)
class DuplicateKeys:
    """Keys that occur more than once on a branch (the ``unique_key`` check)."""

    duplicate_keys: int  # distinct keys that occur twice or more
    extra_rows: int  # rows beyond the first of each such key
    rows: int  # rows checked
    examples: list[dict[str, Any]]  # a few duplicated keys with their counts (none for PII key fields)


def duplicate_keys(table: Table, branch: str, key: Sequence[str], *, examples: int = 5,
                   show_examples: bool = True) -> DuplicateKeys:
    """Count the keys that occur more than once at the head of ``branch``, from its committed data files.

    Only the key columns are read (pyiceberg scan with those fields), then counted with an Arrow group_by.
    """
    head = table.snapshot_by_name(branch)
    if head is None:
        return DuplicateKeys(0, 0, 0, [])
    data = table.scan(snapshot_id=head.snapshot_id, selected_fields=tuple(key)).to_arrow()
    return _count_duplicates(data, list(key), examples, show_examples)


def run_added_keys(table: Table, branch: str, run_id: str, key: Sequence[str]) -> pa.Table | None:
    """The distinct keys of the rows the commit of ``run_id`` appended to ``branch`` (the data files its append
    snapshot added, key columns only, read one file after the other); None when the branch holds no append of it.

    The branch's history is walked from its head to the run's snapshot (the head itself, unless another run
    committed since)."""
    head = table.snapshot_by_name(branch)
    for snapshot in ancestors_of(head, table.metadata) if head is not None else ():
        summary = snapshot.summary
        if summary is not None and summary.get(RUN_ID_KEY) == run_id and summary.operation == Operation.APPEND:
            return added_keys(table, snapshot.snapshot_id, key)
    return None


def added_keys(table: Table, snapshot_id: int, key: Sequence[str]) -> pa.Table:
    """The distinct keys of the rows that snapshot ``snapshot_id`` appended (the data files it added, key columns
    only, read one file after the other)."""
    snapshot = table.snapshot_by_id(snapshot_id)
    names = list(key)
    pieces: list[pa.Table] = []
    if snapshot is not None:
        needed = ArrowScan(table.metadata, table.io, table.schema().select(*names), AlwaysTrue())
        for manifest in snapshot.manifests(table.io):
            if manifest.added_snapshot_id != snapshot_id or not manifest.has_added_files():
                continue
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                if entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snapshot_id:
                    for keys in read_column_groups(table, entry.data_file, needed, names):
                        pieces.append(keys.group_by(names, use_threads=False).aggregate([]))
    schema = pa.schema([table.schema().as_arrow().field(name) for name in names])
    if not pieces:
        return schema.empty_table()
    keys = pa.concat_tables([piece.cast(schema) for piece in pieces])
    return keys.group_by(names, use_threads=False).aggregate([]).select(names)


def merge_keys_to_check(table: Table, branch: str, key: Sequence[str], run_keys: pa.Table) -> pa.Table:
    """The keys a merge's blocking ``unique_key`` check looks for: the run's keys, and the keys of every data file
    added to ``branch`` since its newest snapshot carrying ``KEY_CHECKED_KEY`` (another writer's append, an
    overwrite, a table written before the marker existed: then its whole history once). A key outside these was
    counted once by an earlier merge and no commit since added a row of it, so the check need not read it."""
    names = list(key)
    pieces = [run_keys.select(names)]
    head = table.snapshot_by_name(branch)
    for snapshot in ancestors_of(head, table.metadata) if head is not None else ():
        if snapshot.summary is not None and snapshot.summary.get(KEY_CHECKED_KEY):
            break
        pieces.append(added_keys(table, snapshot.snapshot_id, names))
    schema = pieces[0].schema
    keys = pa.concat_tables([piece.cast(schema) for piece in pieces])
    return keys.group_by(names, use_threads=False).aggregate([]).select(names)


def duplicate_keys_among(table: Table, branch: str, key: Sequence[str], keys: pa.Table, *, examples: int = 5,
                         show_examples: bool = True) -> DuplicateKeys:
    """Count, at the head of ``branch``, the rows holding one of ``keys`` and report the keys among them that occur
    more than once (``rows`` is how many rows hold one of ``keys``).

    Only the data files whose partition and key-column bounds can hold one of ``keys`` are opened (the pruning a
    merge's planning uses, ``KeySelection``), only their key columns are read, a few row groups at a time (pieces
    whose statistics rule out every key are skipped), and only their matching rows are kept: the cost follows the
    files ``keys`` touch and memory one piece plus the matching rows, not the branch's or a file's size.
    """
    head = table.snapshot_by_name(branch)
    if head is None or not keys.num_rows:
        return DuplicateKeys(0, 0, 0, [])
    names = list(key)
    selection = KeySelection(keys, table.schema())
    needed = ArrowScan(table.metadata, table.io, table.schema().select(*names), AlwaysTrue())
    found: list[pa.Table] = []
    for task in table.scan(snapshot_id=head.snapshot_id, row_filter=selection.row_filter()).plan_files():
        if not selection.might_hold(task.file):
            continue
        for data, matched in read_matches(table, task.file, needed, selection, task.delete_files):
            hits = data.filter(matched) if data is not None else None
            if hits is not None and hits.num_rows:
                found.append(hits)
    if not found:
        return DuplicateKeys(0, 0, 0, [])
    return _count_duplicates(pa.concat_tables(found), names, examples, show_examples)


def _count_duplicates(data: pa.Table, key: list[str], examples: int, show_examples: bool) -> DuplicateKeys:
    counts = data.group_by(key, use_threads=False).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1))
    extra = (pc.sum(repeated.column("count_all")).as_py() or 0) - repeated.num_rows
    shown = repeated.slice(0, examples).to_pylist() if show_examples else []
    as_text = [{k: str(v) for k, v in row.items()} for row in shown]
    return DuplicateKeys(repeated.num_rows, extra, data.num_rows, as_text)


__all__ = [
    "DuplicateKeys",
    "added_keys",
    "run_added_keys",
    "duplicate_keys_among",
    "KEY_CHECKED_KEY",
    "KeySelection",
    "MergeBuffer",
    "MergeKeys",
    "MergeOutcome",
    "duplicate_keys",
    "ensure_key",
    "keyed_schema",
    "keys_uri",
    "merge_keys_to_check",
    "last_per_key",
    "recorded_key",
]
