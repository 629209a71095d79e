"""Rewrite: take rows (of some source files, or of a merge's keys) off a branch, rewriting the files they share.

A data file may hold the rows of several source files (one run writes all the files it read, partition by
partition). Replacing one source's rows therefore deletes the data files that hold nothing else, and rewrites the
files that mix sources: their other rows (the survivors) are read, filtered with Arrow compute and written through
the project's own writer (``write.PartitionedParquetWriter``) into new files, so that every data file the project
commits keeps CONTRACT 4 (names, Hive folders, target size, footer keys, object metadata and tags). pyiceberg's
``Transaction.delete`` would rewrite them with its own writer, which keeps none of that.

The plan and the new files belong to one branch head: the caller commits them in one transaction on that head
(``commit._commit_once``: the old files deleted and the survivors' files added in one snapshot) and, when that
commit is refused, removes the new files (:meth:`SourceRemoval.discard`) and plans again on the fresh head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.expressions import AlwaysFalse, AlwaysTrue, BooleanExpression, In
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile
from pyiceberg.table import FileScanTask, Table

from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import SOURCE_FILE as SOURCE_FILE_COLUMN
from dativo_dagster.write import REPEATED_COLUMNS, PartitionedParquetWriter, WrittenFile, remove_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRemoval:
    """What taking the rows of ``sources`` off a branch does to its data files, planned at the head ``head``."""

    head: int | None
    sources: list[str]
    deleted: list[DataFile] = field(default_factory=list)  # files of the head that go: wholly replaced or rewritten
    written: list[WrittenFile] = field(default_factory=list)  # the rewritten files' survivors, in new files
    rewritten: int = 0  # how many of ``deleted`` were rewritten (the others held only rows of ``sources``)
    rows_removed: int = 0
    s3: S3Settings = field(default_factory=S3Settings)

    def discard(self) -> None:
        """Remove the new files of a plan that was not committed (nothing references them)."""
        for written in self.written:
            try:
                remove_file(written.uri, self.s3)
            except OSError as exc:
                log.warning("could not remove %s of a refused commit (the maintenance job will): %s", written.uri, exc)


class RowSelection(Protocol):
    """Which rows of a branch leave it (a source file's rows, a merge's keys): what ``remove_rows`` asks of it."""

    sources: list[str]  # source files whose every row leaves (may be empty)

    def describe(self) -> str:
        """A few words for the log: what is taken away."""
        ...

    def columns(self) -> list[str]:
        """The columns :meth:`matches` needs."""
        ...

    def row_filter(self) -> BooleanExpression:
        """A filter for pyiceberg's scan planning: every file that can hold a selected row passes it."""
        ...

    def might_hold(self, data_file: DataFile) -> bool:
        """False when the file's own statistics rule out every selected row (a finer pass than ``row_filter``)."""
        ...

    def matches(self, data: pa.Table) -> pa.Array:
        """Per row of ``data`` (holding at least :meth:`columns`): true when the row leaves the branch."""
        ...

    def narrowed(self, bounds: Mapping[str, tuple[Any, Any]]) -> RowSelection | None:
        """The selection restricted to rows within ``bounds`` (column: (min, max) of a row group), or None when no
        selected row can lie within them."""
        ...


@dataclass(frozen=True)
class SourceSelection:
    """The rows that some source files brought (``_source_file`` in ``sources``)."""

    sources: list[str]

    def describe(self) -> str:
        return f"{len(self.sources)} source file(s)"

    def columns(self) -> list[str]:
        return [SOURCE_FILE_COLUMN]

    def row_filter(self) -> BooleanExpression:
        return In(SOURCE_FILE_COLUMN, self.sources) if self.sources else AlwaysFalse()

    def might_hold(self, data_file: DataFile) -> bool:
        return bool(self.sources)

    def matches(self, data: pa.Table) -> pa.Array:
        values = pa.array(self.sources, pa.string())
        column = data.column(SOURCE_FILE_COLUMN)
        return pc.fill_null(pc.is_in(column, value_set=values), False)

    def narrowed(self, bounds: Mapping[str, tuple[Any, Any]]) -> SourceSelection | None:
        return self if self.sources else None


def remove_sources(
    table: Table,
    branch: str,
    sources: Sequence[str],
    new_writer: Callable[[], PartitionedParquetWriter],
    s3: S3Settings,
) -> SourceRemoval:
    """Plan taking every row of ``sources`` off the head of ``branch``, and write the survivors of mixed files.

    The files that can hold a row of ``sources`` are found by pyiceberg's scan planning (pruned by partition and by
    the ``_source_file`` bounds in the manifest entries); each one's ``_source_file`` column is then read to tell
    the files to delete whole from those to rewrite. ``new_writer`` makes the writer of the rewritten files (the
    run's own settings); on any error the files it wrote are removed again.

    Raises:
        OSError: a data file could not be read or a new one written.
    """
    return remove_rows(table, branch, SourceSelection(sorted(set(sources))), new_writer, s3)


def remove_rows(
    table: Table,
    branch: str,
    selection: RowSelection,
    new_writer: Callable[[], PartitionedParquetWriter],
    s3: S3Settings,
) -> SourceRemoval:
    """Plan taking the rows ``selection`` matches off the head of ``branch``, writing the survivors of mixed files.

    Candidate files come from pyiceberg's scan planning with ``selection.row_filter()`` (pruned by partition and by
    column bounds), then ``selection.might_hold`` (the file's own bounds); only the columns the selection needs are
    read, a few row groups at a time (:func:`read_matches`), to tell files to delete whole from files to rewrite, and
    only the latter are read whole, one after the other (memory bounded by one piece of row groups and a bit per
    row of the file).

    Raises:
        OSError: a data file could not be read or a new one written.
    """
    head = table.snapshot_by_name(branch)
    sources = list(selection.sources)
    if head is None:
        return SourceRemoval(None, sources, s3=s3)
    scan = table.scan(snapshot_id=head.snapshot_id, row_filter=selection.row_filter())
    needed_schema = table.schema().select(*selection.columns())
    needed = ArrowScan(table.metadata, table.io, needed_schema, AlwaysTrue())
    deleted: list[DataFile] = []
    to_rewrite: list[tuple[FileScanTask, pa.Array | pa.ChunkedArray]] = []  # with the rows that leave
    removed = 0
    # one file after the other: ArrowScan reads each on pyiceberg's shared pool already, and a read started from a
    # task of that pool (storage.map_per_object) could wait forever for a worker
    for task in scan.plan_files():
        if not selection.might_hold(task.file):
            continue
        # a few row groups at a time: only the mask (a bit per row) is kept until the rewrite
        masks = [mask for _, mask in read_matches(table, task.file, needed, selection, task.delete_files)]
        leaving = pa.chunked_array(masks, pa.bool_())
        rows = len(leaving)
        found = pc.sum(leaving).as_py() or 0
        if not found:
            continue  # the bounds could not rule it out, but it holds none of the selected rows
        deleted.append(task.file)
        removed += found
        if found < rows:
            to_rewrite.append((task, leaving))
    written = _write_survivors(table, to_rewrite, new_writer) if to_rewrite else []
    if deleted:
        log.info(
            "%s@%s: %d row(s) of %s leave %d data file(s), %d rewritten into %d",
            ".".join(table.name()), branch, removed, selection.describe(), len(deleted), len(to_rewrite), len(written),
        )
    return SourceRemoval(head.snapshot_id, sources, deleted, written, len(to_rewrite), removed, s3)


BATCH_ROWS = 65_536


def _own_columns(table: Table, parquet: pq.ParquetFile, names: Sequence[str]) -> bool:
    """True when the file holds each of the table's columns ``names`` under its field id and name (the project's
    own files), so that pyarrow's reader maps them as pyiceberg would."""
    ids = {f.name: (f.metadata or {}).get(b"PARQUET:field_id") for f in parquet.schema_arrow}
    schema = table.schema()
    return all(ids.get(name) == str(schema.find_field(name).field_id).encode() for name in names)


def read_column_groups(
    table: Table, data_file: DataFile, scan: ArrowScan, names: Sequence[str], delete_files: Collection[DataFile] = (),
) -> Iterator[pa.Table]:
    """Some columns (``names``, the columns of ``scan``'s projected schema) of one data file, in file order, one row
    group at a time with pyarrow's reader for the project's own files (only those columns' chunks are read), else
    whole through pyiceberg's scan (field ids, deletes)."""
    if not delete_files:
        with table.io.new_input(data_file.file_path).open() as stream:
            parquet = pq.ParquetFile(stream)
            if _own_columns(table, parquet, names):
                for index in range(parquet.num_row_groups):
                    yield parquet.read_row_group(index, columns=list(names))
                return
    yield scan.to_table([FileScanTask(data_file, delete_files=set(delete_files))])


# rows of a file matched at once (consecutive row groups up to this many rows): bounds memory (about 9 bytes a row
# for an integer key and its mask) whatever the file's size, while keeping the hash sets the keys are probed with
# as few as when a file was matched whole
MATCH_ROWS = 1 << 20


def read_matches(
    table: Table,
    data_file: DataFile,
    scan: ArrowScan,
    selection: RowSelection,
    delete_files: Collection[DataFile] = (),
) -> Iterator[tuple[pa.Table | None, pa.Array]]:
    """The rows of one data file that ``selection`` matches, in file order, a few row groups at a time: per piece its
    ``selection.columns()`` (None when the pieces' statistics rule out every selected row: then it is not read) and
    a mask with one entry per row (true: matched).

    The project's own files are read with pyarrow's reader, consecutive row groups up to ``MATCH_ROWS`` rows (at
    least one group) at a time, each piece matched against the selection narrowed to its groups' min/max statistics
    (so memory follows ``MATCH_ROWS``, not the file, and the hash set probed holds only the keys the piece can
    hold); any other file (foreign columns, delete files) whole through pyiceberg's scan (field ids, deletes).
    """
    names = selection.columns()
    if not delete_files:
        with table.io.new_input(data_file.file_path).open() as stream:
            parquet = pq.ParquetFile(stream)
            if _own_columns(table, parquet, names):
                for groups, rows in _row_group_runs(parquet.metadata):
                    narrowed = selection.narrowed(_bounds(parquet.metadata, groups, names))
                    if narrowed is None:
                        yield None, pa.array(np.zeros(rows, dtype=bool))
                        continue
                    data = parquet.read_row_groups(groups, columns=names)
                    yield data, narrowed.matches(data)
                return
    data = scan.to_table([FileScanTask(data_file, delete_files=set(delete_files))])
    yield data, selection.matches(data)


def _row_group_runs(metadata: pq.FileMetaData) -> Iterator[tuple[list[int], int]]:
    """Consecutive row groups of a file holding up to ``MATCH_ROWS`` rows (at least one group), with their rows."""
    groups: list[int] = []
    rows = 0
    for index in range(metadata.num_row_groups):
        count = metadata.row_group(index).num_rows
        if groups and rows + count > MATCH_ROWS:
            yield groups, rows
            groups, rows = [], 0
        groups.append(index)
        rows += count
    if groups:
        yield groups, rows


def _bounds(metadata: pq.FileMetaData, groups: Sequence[int], names: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """The min/max statistics of the columns ``names`` over the row groups ``groups`` (the columns every one of
    them has statistics for)."""
    bounds: dict[str, tuple[Any, Any]] = {}
    missing: set[str] = set()
    for index in groups:
        group = metadata.row_group(index)
        seen: set[str] = set()
        for column in range(group.num_columns):
            chunk = group.column(column)
            name, statistics = chunk.path_in_schema, chunk.statistics
            if name not in names or statistics is None or not statistics.has_min_max:
                continue
            seen.add(name)
            low, high = bounds.get(name, (statistics.min, statistics.max))
            bounds[name] = (min(low, statistics.min), max(high, statistics.max))
        missing.update(set(names) - seen)
    return {name: bound for name, bound in bounds.items() if name not in missing}


def _file_batches(table: Table, task: FileScanTask, scan: ArrowScan) -> Iterator[pa.RecordBatch]:
    """The rows of one data file in the table's columns, in file order, a batch at a time.

    pyiceberg's scan reads far ahead (measured: about a whole 5M-row file, 1.2 GiB, before the first batch is used),
    so a file that holds every table column under its field id and name and has no delete files (the project's own
    files) is read with pyarrow's Parquet reader, one row group after the other, its repeated system columns
    (``_source_file``, ``_run_id``) kept as dictionaries, the writer's own form: no per-row strings are made; any
    other file through pyiceberg's scan, which maps columns by field id and applies deletes.
    """
    if not task.delete_files:
        names = [f.name for f in table.schema().fields]
        with table.io.new_input(task.file.file_path).open() as stream:
            parquet = pq.ParquetFile(stream, read_dictionary=[c for c in REPEATED_COLUMNS if c in names])
            if _own_columns(table, parquet, names):
                yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=names)
                return
    yield from scan.to_record_batches([task])


def _write_survivors(
    table: Table,
    tasks: Sequence[tuple[FileScanTask, pa.Array | pa.ChunkedArray]],
    new_writer: Callable[[], PartitionedParquetWriter],
) -> list[WrittenFile]:
    """Stream the rows of each task's file that do not leave (``leaving``, computed once per file from the columns the
    selection needs, in the file's row order) into new files of the project's writer."""
    writer = new_writer()
    scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
    try:
        for task, leaving in tasks:
            offset = 0
            for batch in _file_batches(table, task, scan):
                keep = pc.invert(leaving.slice(offset, batch.num_rows))
                offset += batch.num_rows
                survivors = pa.Table.from_batches([batch]).filter(keep)
                if survivors.num_rows:
                    writer.write(_as_written(survivors, writer))
            if offset != len(leaving):
                raise ValueError(
                    f"{task.file.file_path}: read {offset} row(s) to rewrite, but {len(leaving)} when planning;"
                    " nothing was committed"
                )
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _as_written(rows: pa.Table, writer: PartitionedParquetWriter) -> pa.Table:
    """``rows`` in the writer's file schema: plain columns cast to the table's types, the repeated system columns
    as the writer's dictionaries (read as dictionaries, or encoded by the writer when they come as strings)."""
    target = pa.schema([
        writer.file_schema.field(f.name) if pa.types.is_dictionary(f.type) else writer.schema.field(f.name)
        for f in rows.schema
    ])
    return rows.cast(target)
