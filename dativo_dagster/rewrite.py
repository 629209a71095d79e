"""Rewrite: take the rows of some source files off a branch, rewriting the data files they share with other sources.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import AlwaysTrue, In
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile
from pyiceberg.table import FileScanTask, Table

from dativo_dagster.storage import S3Settings
from dativo_dagster.table_schema import SOURCE_FILE as SOURCE_FILE_COLUMN
from dativo_dagster.write import PartitionedParquetWriter, WrittenFile, remove_file

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
    head = table.snapshot_by_name(branch)
    wanted = sorted(set(sources))
    if head is None or not wanted:
        return SourceRemoval(head.snapshot_id if head is not None else None, wanted, s3=s3)
    values = pa.array(wanted, pa.string())
    scan = table.scan(snapshot_id=head.snapshot_id, row_filter=In(SOURCE_FILE_COLUMN, wanted))
    source_only = ArrowScan(table.metadata, table.io, table.schema().select(SOURCE_FILE_COLUMN), AlwaysTrue())
    deleted: list[DataFile] = []
    to_rewrite: list[FileScanTask] = []
    removed = 0
    # one file after the other: ArrowScan reads each on pyiceberg's shared pool already, and a read started from a
    # task of that pool (storage.map_per_object) could wait forever for a worker
    for task in scan.plan_files():
        column = source_only.to_table([task]).column(SOURCE_FILE_COLUMN)
        found = pc.sum(pc.is_in(column, value_set=values)).as_py() or 0
        if not found:
            continue  # the bounds could not rule it out, but it holds none of their rows
        deleted.append(task.file)
        removed += found
        if found < len(column):
            to_rewrite.append(task)
    written = _write_survivors(table, to_rewrite, values, new_writer) if to_rewrite else []
    if deleted:
        log.info(
            "%s@%s: %d row(s) of %d source file(s) leave %d data file(s), %d rewritten into %d",
            ".".join(table.name()), branch, removed, len(wanted), len(deleted), len(to_rewrite), len(written),
        )
    return SourceRemoval(head.snapshot_id, wanted, deleted, written, len(to_rewrite), removed, s3)


def _write_survivors(
    table: Table, tasks: Sequence[FileScanTask], values: pa.Array, new_writer: Callable[[], PartitionedParquetWriter]
) -> list[WrittenFile]:
    """Stream the rows of ``tasks`` that are not from ``values`` into new files of the project's writer."""
    writer = new_writer()
    scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
    try:
        for task in tasks:
            for batch in scan.to_record_batches([task]):
                keep = pc.invert(pc.fill_null(pc.is_in(batch.column(SOURCE_FILE_COLUMN), value_set=values), False))
                survivors = pa.Table.from_batches([batch]).filter(keep)
                if survivors.num_rows:
                    writer.write(survivors.cast(writer.schema))
        return writer.close()
    except BaseException:
        writer.abort()
        raise
