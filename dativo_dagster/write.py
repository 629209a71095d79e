"""Write: typed batches become snappy Parquet files, one Hive folder per partition, near a target size."""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field
from pyiceberg.utils.concurrent import ExecutorFactory

from dativo_dagster.errors import StorageError
from dativo_dagster.storage import (
    MAX_TAGS,  # noqa: F401 - part of this module's interface since the S3 helpers moved to storage
    S3Settings,
    delete_s3_object,
    filesystem_for,
    is_s3_uri,
    object_metadata,
    object_tags,
    tag_safe,  # noqa: F401 - as MAX_TAGS
    upload_s3_file,
)
from dativo_dagster.table_schema import INGESTED_AT as INGESTED_AT_COLUMN
from dativo_dagster.table_schema import REPEATED_TYPE, Partitioner
from dativo_dagster.table_schema import RUN_ID as RUN_ID_COLUMN
from dativo_dagster.table_schema import SOURCE_FILE as SOURCE_FILE_COLUMN

log = logging.getLogger(__name__)

MIB = 1 << 20
# In-memory bytes per row group: 100-200K rows of the benchmark's tables, 1.5-2 MB once encoded (DuckDB and
# Polars write row groups of 123K and 262K rows). The encoder starts on a row group only once it is full, so
# smaller ones keep it busy sooner and leave less to encode after the last row is read (measured against 32 MiB:
# person5m and flights x10 4-5 % faster, 15 MB less memory, for 2 % more encoder work and 0.5 % larger files).
ROW_GROUP_MAX_BYTES = 16 * MIB
# Row groups never get smaller than this, so a tiny target cannot make a file per handful of rows;
# it binds only for targets under about 1 MiB, where the file-size rule cannot hold anyway.
MIN_ROW_GROUP_BYTES = 64 * 1024
# In-memory bytes buffered across all partitions. Beyond it the partitions holding most are spilled (see _Spill)
# until SPILL_TO_FRACTION of it is left, so memory stays flat however many partitions a run touches.
TOTAL_BUFFER_BYTES = 32 * MIB
SPILL_TO_FRACTION = 0.5
# A spilled batch is written as messages of about this many in-memory bytes: a group of partitions finished together
# reads back the messages holding its rows, and at most one message's worth more at each end of its rows in a batch.
SPILL_MESSAGE_BYTES = 256 * 1024
# Parquet files open at once while the rows stream in: each holds its columns' encoders and row group metadata.
# A partition whose rows fill a row group while this many are open waits in the spill file until the end.
MAX_OPEN_WRITERS = 64
# At the end, the partitions still open or spilled are finished on this many threads (the encoder releases the GIL)
CLOSE_THREADS = 2
SPLIT_BYTES = 8 * MIB  # incoming in-memory bytes gathered before they are split by partition
# A file's first row group decides each column's encoding (_encodings): a column is "unique" when more than
# UNIQUE_FRACTION of its first DICTIONARY_SAMPLE_ROWS values are distinct, and then gets no dictionary pages.
DICTIONARY_SAMPLE_ROWS = 65_536
UNIQUE_FRACTION = 0.5
INITIAL_RATIO = 1.0  # written/in-memory bytes before a partition's first row group tells better
MAX_FILE_FRACTION = 1.10  # CONTRACT 4: no file but a partition's last may pass 110 % of the target
CLOSE_FRACTION = 0.90  # a file is finished once it holds this share of the target
# Written/in-memory bytes never exceed this (measured: up to 1.5 for dates that repeat in a file's first rows,
# so they get dictionary pages, and never after: the pages add their indices before parquet falls back to
# plain encoding; snappy only adds to random bytes).
# Row groups are bounded by it, so a file stays under MAX_FILE_FRACTION whatever the data turns into.
WORST_RATIO = 1.6
REPEATED_COLUMNS = (SOURCE_FILE_COLUMN, RUN_ID_COLUMN)  # one value per source file / per run
CHUNK_METADATA_BYTES = 160  # footer bytes per column chunk, besides min/max statistics
MAX_STATISTICS_VALUE = 4096  # parquet drops min/max statistics longer than this


class WrittenFile(BaseModel):
    """One finished data file."""

    uri: str
    size_bytes: int
    record_count: int
    partition_path: str
    partition_values: list[Any]
    sources: list[str] = Field(default_factory=list)  # the source files whose rows it holds, when split by source


class _Sink:
    """Where one file's bytes go: a local path, or a temporary file uploaded to S3 when finished.

    A file-like object for ``pq.ParquetWriter`` that holds an OS file handle only while a row group
    or the footer is being written, so a run with thousands of open partitions never runs out of
    file handles.
    """

    def __init__(self, uri: str, s3: S3Settings, *, folder_made: bool = False):
        self.uri = uri
        self.s3 = s3
        if is_s3_uri(uri):
            handle, self.local_path = tempfile.mkstemp(prefix="dativo-", suffix=".parquet")
            os.close(handle)
            self._mode = "ab"
        else:
            self.local_path = uri
            if not folder_made:
                os.makedirs(os.path.dirname(uri), exist_ok=True)
            self._mode = "xb"  # never overwrite a file that is already there
        self._handle: Any = None
        self._position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        try:
            if self._handle is None:
                self._handle = open(self.local_path, self._mode)  # noqa: SIM115 - released after each row group
                self._mode = "ab"
            written = self._handle.write(data)
        except OSError as exc:
            # a full disk or a refused folder: name the file (the local copy, for an object on S3)
            raise StorageError(f"{self.local_path}: cannot write: {exc}") from None
        self._position += written
        return written

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def release(self) -> None:
        """Give the OS file handle back until the next write."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        self.release()
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def publish(self, metadata: Mapping[str, str]) -> None:
        """Make the closed file visible at its URI with its object metadata and tags.

        S3: the temporary file is uploaded (multipart when large) and removed, whether the upload
        succeeded or not.

        Raises:
            StorageAccessError: S3 refused the upload (terminal).
            StorageError: S3 could not be reached (transient).
        """
        if not is_s3_uri(self.uri):
            return
        try:
            upload_s3_file(
                self.local_path,
                self.uri,
                self.s3,
                metadata=object_metadata(metadata),
                tags=object_tags(metadata),
                content_type="application/vnd.apache.parquet",
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local_path)

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path)


_Upload = tuple[_Sink, dict[str, str], WrittenFile]  # a finished file waiting to be published, with its object metadata


@dataclass(frozen=True)
class _Message:
    """One spilled batch in the spill file: where its IPC message is, and its dictionaries' value ids."""

    offset: int
    length: int
    dictionary_ids: tuple[np.ndarray, ...]  # per dictionary column: the spill's id of each of its values


class _Spill:
    """A local temporary file that holds rows waiting for their partition's row group, in Arrow IPC messages.

    Under memory pressure whole routed batches (:class:`_Rows`, sorted by partition) are spilled, one message each,
    instead of being written as small row groups into a Parquet file per partition: buffered rows then stay within
    the budget whatever the number of partitions, and every Parquet file still ends near the target (CONTRACT 4)
    because none has to be finished early. The partitions keep their row ranges and read them back through a
    memory map (:class:`_SpillView`). Dictionary columns (the repeated system columns) are stored as their indices;
    their values are kept once here, each message remembering which of them its indices mean. The file is unlinked
    as soon as it is open: it goes away with the process, whatever happens.
    """

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self._dictionary_columns = [i for i, f in enumerate(schema) if pa.types.is_dictionary(f.type)]
        self.spill_schema = pa.schema(
            [f.with_type(f.type.index_type) if pa.types.is_dictionary(f.type) else f for f in schema]
        )
        self._values: list[dict[Any, int]] = [{} for _ in self._dictionary_columns]
        self._arrays: list[pa.Array | None] = [None for _ in self._dictionary_columns]
        self._fd: int | None = None
        self.path = ""
        self._end = 0
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.messages = 0

    def _file(self) -> int:
        if self._fd is None:
            handle, self.path = tempfile.mkstemp(prefix="dativo-spill-", suffix=".arrows")
            os.unlink(self.path)
            self._fd = handle
        return self._fd

    def put(self, table: pa.Table) -> list[tuple[int, _Message]]:
        """Append ``table`` (in ``schema``) as messages of about ``SPILL_MESSAGE_BYTES``; returns each one's first
        row and where it is (a few messages per batch, so that reading back some rows reads little else)."""
        batches = table.to_batches()
        batch = batches[0] if len(batches) == 1 else table.combine_chunks().to_batches()[0]
        columns = list(batch.columns)
        ids = []
        for slot, index in enumerate(self._dictionary_columns):
            column = columns[index]
            ids.append(self._ids(slot, column.dictionary))
            columns[index] = column.indices
        whole = pa.RecordBatch.from_arrays(columns, schema=self.spill_schema)
        step = max(1, -(-whole.num_rows * SPILL_MESSAGE_BYTES // max(table.nbytes, 1)))
        out = []
        for start in range(0, whole.num_rows, step):
            message = whole.slice(start, step).serialize()
            out.append((start, _Message(self._append(message), message.size, tuple(ids))))
        return out

    def _ids(self, slot: int, dictionary: pa.Array) -> np.ndarray:
        known = self._values[slot]
        return np.fromiter((known.setdefault(v, len(known)) for v in dictionary.to_pylist()), np.int32,
                           len(dictionary))

    def _append(self, message: pa.Buffer) -> int:
        fd = self._file()
        with self._lock:
            offset = self._end
            view = memoryview(message)
            try:
                while view:
                    written = os.pwrite(fd, view, self._end)
                    view = view[written:]
                    self._end += written
            except OSError as exc:
                raise StorageError(f"{self.path}: cannot spill rows to this temporary file: {exc}") from None
            self.bytes_written += message.size
            self.messages += 1
        return offset

    def get(self, message: _Message) -> pa.Table:
        """The rows of ``message``, in ``schema``."""
        data = pa.allocate_buffer(message.length)  # in Arrow's pool, aligned: the columns are read in place
        view = memoryview(data)
        done = 0
        try:
            while done < message.length:
                read = os.preadv(self._file(), [view[done:]], message.offset + done)
                if read == 0:
                    raise OSError(f"unexpected end of file at byte {message.offset + done}")
                done += read
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot read spilled rows back from this temporary file: {exc}") from None
        finally:
            view.release()
        batch = pa.ipc.read_record_batch(data, self.spill_schema)
        columns = list(batch.columns)
        for slot, index in enumerate(self._dictionary_columns):
            values = self._value_array(slot).take(pa.array(message.dictionary_ids[slot]))
            columns[index] = pa.DictionaryArray.from_arrays(columns[index], values)
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _value_array(self, slot: int) -> pa.Array:
        with self._lock:
            array = self._arrays[slot]
            if array is None or len(array) != len(self._values[slot]):
                value_type = self.schema.field(self._dictionary_columns[slot]).type.value_type
                array = pa.array(list(self._values[slot]), value_type)
                self._arrays[slot] = array
            return array

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _SpillView:
    """Spilled messages read back for one row group or one group of partitions finished together, each read once.

    Whatever it read goes when the view and the tables taken from it are dropped, so that what it holds stays
    within the buffer budget.
    """

    def __init__(self, spill: _Spill):
        self._spill = spill
        self._tables: dict[int, pa.Table] = {}
        self._lock = threading.Lock()

    def table(self, message: _Message) -> pa.Table:
        with self._lock:
            table = self._tables.get(message.offset)
            if table is None:
                table = self._spill.get(message)
                self._tables[message.offset] = table
            return table


@dataclass(eq=False)
class _Rows:
    """A routed batch sorted by partition. Partitions buffer row ranges of it (zero-copy slices), so it stays in
    memory, counted whole, until every range is written or it is spilled (then ``table`` is None)."""

    table: pa.Table | None
    sizes: np.ndarray  # cumulative in-memory bytes of its rows: sizes[j] - sizes[i] for rows i..j-1
    nbytes: int
    holders: int = 0  # ranges of it that wait in a partition
    messages: list[tuple[int, _Message]] = field(default_factory=list)  # once spilled: first row and message of each

    def bytes_of(self, start: int, end: int) -> int:
        return int(self.sizes[end] - self.sizes[start])

    def pieces(self, start: int, end: int, view: _SpillView) -> Iterator[tuple[int, pa.Table, int, int]]:
        """The tables holding rows ``start:end``, in order: (message offset, or -1 in memory; the table; the first
        and the end row wanted in it). A spilled batch's messages are read through ``view``."""
        if self.table is not None:
            yield -1, self.table, start, end
            return
        first = bisect.bisect_right(self.messages, start, key=lambda m: m[0]) - 1
        for begin, message in self.messages[first:]:
            if begin >= end:
                break
            part = view.table(message)
            yield message.offset, part, max(start - begin, 0), min(end - begin, part.num_rows)


_Range = tuple[_Rows, int, int]
_NO_SIZES = np.zeros(1, dtype=np.int32)  # rows start:end of a routed batch


@dataclass
class _PartitionState:
    values: tuple[Any, ...]
    path: str
    source: str | None = None
    pending: list[_Range] = field(default_factory=list)  # rows waiting for the next row group, in memory or spilled
    pending_bytes: int = 0  # their in-memory bytes
    writer: pq.ParquetWriter | None = None
    sink: _Sink | None = None
    written: int = 0  # bytes in the open file, footer not included
    footer: int = 0  # estimated footer bytes of the open file
    rows_in_file: int = 0
    ratio: float | None = None  # written/in-memory bytes seen in this partition


class PartitionedParquetWriter:
    """Streams tables into per-partition Parquet files that roll over near ``target_bytes``.

    Rows are buffered per partition and written as large row groups. Each row group is sized from
    the compression ratio seen so far so that the file ends close to the target in written bytes,
    and never beyond what the worst ratio could push past ``MAX_FILE_FRACTION`` of the target.
    A file is finished once it reaches ``CLOSE_FRACTION`` of the target, or at the end of the run.

    Each batch of ``SPLIT_BYTES`` is sorted by partition once (:meth:`Partitioner.sort`) and every partition gets a
    range of it (a zero-copy slice, its bytes from the batch's cumulative row sizes), so the work per partition and
    batch is a few additions. Memory does not grow with the number of partitions: the sorted batches that ranges
    still hold count whole against ``TOTAL_BUFFER_BYTES``; beyond it the oldest go to a local spill file
    (:class:`_Spill`, a few messages per batch), and at most ``MAX_OPEN_WRITERS`` files are open while rows stream in.
    Partitions whose rows never filled a row group are written at the end, one file each, on ``CLOSE_THREADS``
    threads, in groups that read back at most the budget from the spill file; the small partitions of a group are
    gathered by one ``take`` (:meth:`_gather`) and each file is written from a zero-copy slice of it.
    """

    def __init__(
        self,
        *,
        location: str,
        schema: pa.Schema,
        partitioner: Partitioner,
        target_bytes: int,
        file_prefix: str,
        metadata: Mapping[str, str],
        s3: S3Settings,
        split_by_source: bool = False,
    ):
        self.location = location.rstrip("/")
        # catalog: none keeps each source file's rows in files of their own, so that a changed source
        # file can be replaced by hiding whole data files (see markers.committed_files)
        self.split_by_source = split_by_source
        self.schema = schema
        # The system columns repeat one value per file or run: written as Arrow dictionaries (REPEATED_TYPE), the
        # Parquet writer neither hashes nor compares every row's copy (that was a third of its time). Readers see
        # plain strings: the files carry no Arrow schema, only the Parquet one with its field ids.
        self.file_schema = pa.schema(
            [
                f.with_type(REPEATED_TYPE)
                if f.name in REPEATED_COLUMNS and pa.types.is_string(f.type)
                else f
                for f in schema
            ],
            metadata=schema.metadata,
        )
        self.partitioner = partitioner
        self.target_bytes = max(int(target_bytes), 1)
        self.file_prefix = file_prefix
        self.metadata = dict(metadata)
        self.s3 = s3
        self.ratio = INITIAL_RATIO
        self.files: list[WrittenFile] = []
        self._states: dict[Any, _PartitionState] = {}
        self._buffered = 0
        self._seq = 0
        self._open_writers = 0
        self._closing = False  # close(): every partition may open its file now
        self._lock = threading.Lock()  # close() finishes partitions on several threads
        self._spill = _Spill(self.file_schema)
        self._folders: set[str] = set()  # local partition folders made so far
        self._incoming: list[pa.Table] = []
        self._small_encodings: dict[str, Any] | None = None
        self._resident: list[_Rows] = []  # routed batches in memory, oldest first
        self._incoming_bytes = 0
        self._base_footer = _empty_footer_bytes(self.file_schema, self._footer_metadata("", 0)) + 64
        self._string_columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_binary(f.type)]
        self._statistics_bytes = 2 * 256 * len(self._string_columns)  # grows with the longest values written

    def write(self, table: pa.Table) -> None:
        """Add rows (in ``schema``; the repeated system columns may already be dictionary-encoded)."""
        table = _encode_repeated(table, self.file_schema)
        self._incoming.append(table)
        self._incoming_bytes += table.nbytes
        if self._incoming_bytes >= SPLIT_BYTES:
            self._route()

    def _route(self) -> None:
        """Sort what came in by partition (one ``take``) and hand each partition its range of rows.

        The per-partition work is a dictionary look-up and a few additions: the ranges are zero-copy slices of the
        sorted batch, and their bytes come from the batch's cumulative row sizes, not from the slices.
        """
        if not self._incoming:
            return
        table = pa.concat_tables(self._incoming)
        self._incoming, self._incoming_bytes = [], 0
        extra = []
        if self.split_by_source and SOURCE_FILE_COLUMN in table.column_names:
            # catalog: none keeps each source file's rows in files of their own: the source is one more sort key
            column = table.column(SOURCE_FILE_COLUMN)
            extra.append(column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column)
        ordered, bounds, keys = self.partitioner.sort(table, extra)
        if not keys:
            return
        # 4 bytes a row, kept while ranges of the batch wait (spilled ones included): whole bytes are precise enough
        sizes = np.zeros(ordered.num_rows + 1, dtype=np.int32)
        sizes[1:] = np.rint(np.cumsum(_row_bytes(ordered)))
        rows = _Rows(ordered, sizes, ordered.nbytes)
        self._hold(rows)  # held while the ranges are handed out, so that none is dropped before the last is given
        self._resident = [r for r in self._resident if r.table is not None]
        self._resident.append(rows)
        fields = len(self.partitioner.fields)
        for key, start, end in zip(keys, bounds[:-1], bounds[1:], strict=True):
            state = self._states.get(key)
            if state is None:
                values = key[:fields]
                source = key[fields] if extra else None
                state = _PartitionState(values=values, path=self.partitioner.hive_path(values), source=source)
                self._states[key] = state
            self._add(state, (rows, start, end))
        self._release(rows)
        if self._buffered > TOTAL_BUFFER_BYTES:
            self._relieve()

    def _relieve(self) -> None:
        """Spill the oldest routed batches still held until ``SPILL_TO_FRACTION`` of the budget is left: one message
        per batch, whatever the number of partitions holding rows of it."""
        resident = []
        for rows in self._resident:
            if rows.table is None:
                continue
            if self._buffered > TOTAL_BUFFER_BYTES * SPILL_TO_FRACTION and rows.holders:
                rows.messages = self._spill.put(rows.table)
                rows.table = None
                with self._lock:
                    self._buffered -= rows.nbytes
            else:
                resident.append(rows)
        self._resident = resident

    def _hold(self, rows: _Rows) -> None:
        with self._lock:
            if rows.holders == 0 and rows.table is not None:
                self._buffered += rows.nbytes
            rows.holders += 1

    def _release(self, rows: _Rows) -> None:
        with self._lock:
            rows.holders -= 1
            if rows.holders == 0 and rows.table is not None:
                self._buffered -= rows.nbytes
            if rows.holders == 0:
                rows.table, rows.sizes, rows.messages = None, _NO_SIZES, []  # every range is written: the batch goes

    def _limit(self, state: _PartitionState) -> int:
        """In-memory bytes to buffer before the partition's next row group is written."""
        ratio = state.ratio or self.ratio
        used = state.written + (state.footer or self._base_footer)
        aimed = (self.target_bytes - used) / ratio
        # whatever the data compresses to, the row group and its footer entry fit under the upper bound
        safe = (self.target_bytes * MAX_FILE_FRACTION - used - self._chunk_footer_bound()) / WORST_RATIO
        return max(int(min(aimed, safe, ROW_GROUP_MAX_BYTES)), MIN_ROW_GROUP_BYTES)

    def _chunk_footer_bound(self) -> int:
        """Footer bytes one more row group may add: its chunks' metadata and the longest statistics seen."""
        return len(self.schema) * CHUNK_METADATA_BYTES + self._statistics_bytes

    def _add(self, state: _PartitionState, rows_range: _Range) -> None:
        """Queue a range of rows for the partition; write row groups while it holds more than one."""
        rows, start, end = rows_range
        self._hold(rows)
        state.pending.append(rows_range)
        state.pending_bytes += rows.bytes_of(start, end)
        if state.writer is not None or self._closing or self._open_writers < MAX_OPEN_WRITERS:
            self._settle(state)
        # else no file may open now: the rows wait (spilled if need be)

    def _settle(self, state: _PartitionState, *, final: bool = False, view: _SpillView | None = None) -> None:
        """Write full row groups while the partition holds more than its limit (``final``: everything)."""
        while state.pending and (final or state.pending_bytes > self._limit(state)):
            self._write_row_group(state, self._take(state, self._limit(state)), view)

    def _take(self, state: _PartitionState, limit: int) -> list[_Range]:
        """Take the partition's first rows holding at most ``limit`` bytes (at least one row)."""
        taken: list[_Range] = []
        total = 0
        while state.pending:
            rows, start, end = state.pending[0]
            size = rows.bytes_of(start, end)
            if total + size <= limit:
                taken.append(state.pending.pop(0))
                total += size
                continue
            cut = int(np.searchsorted(rows.sizes, rows.sizes[start] + (limit - total), side="right")) - 1
            if cut <= start and not taken:
                cut = start + 1  # one row larger than the room still has to go somewhere
            if cut > start:
                self._hold(rows)  # the range is now two
                taken.append((rows, start, cut))
                state.pending[0] = (rows, cut, end)
                total += rows.bytes_of(start, cut)
            break
        state.pending_bytes -= total
        return taken

    def _tables(self, ranges: Sequence[_Range], view: _SpillView | None) -> list[pa.Table]:
        view = view or _SpillView(self._spill)  # reads nothing until a spilled range asks
        return [part.slice(low, high - low)
                for rows, start, end in ranges for _, part, low, high in rows.pieces(start, end, view)]

    def _write_row_group(self, state: _PartitionState, ranges: list[_Range], view: _SpillView | None) -> None:
        tables = self._tables(ranges, view)
        # a partition's rows from many batches: one small copy, instead of the encoder visiting every piece's columns
        data = pa.concat_tables(tables) if len(tables) == 1 or len(tables) * 1024 < _ranges_rows(ranges) else (
            pa.concat_tables(tables).combine_chunks())
        del tables
        in_memory = sum(rows.bytes_of(start, end) for rows, start, end in ranges)
        if state.writer is None or state.sink is None:
            state.writer, state.sink = self._open(state, data)
        before = state.sink.tell()
        state.writer.write_table(data, row_group_size=max(data.num_rows, 1))
        if not self._closing:
            state.sink.release()  # while rows stream in, many files are open: none keeps an OS file handle
        footer, written_rows = self._row_group_footer_bytes(data), data.num_rows
        del data  # before the ranges go: the last range of a batch drops it
        for rows, _, _ in ranges:
            self._release(rows)
        state.written = state.sink.tell()
        state.footer += footer
        state.rows_in_file += written_rows
        if in_memory > 0 and state.written > before:
            observed = (state.written - before) / in_memory
            state.ratio = observed if state.ratio is None else 0.5 * state.ratio + 0.5 * observed
            self.ratio = state.ratio
        if state.written + state.footer >= self.target_bytes * CLOSE_FRACTION:
            self._close(state)

    def _row_group_footer_bytes(self, data: pa.Table) -> int:
        """Footer bytes a written row group adds: chunk metadata and min/max of its string columns."""
        statistics = 0
        for name in self._string_columns:
            column = data.column(name)
            if pa.types.is_dictionary(column.type):
                column = pa.chunked_array([c.dictionary for c in column.chunks], column.type.value_type)
            longest = pc.max(pc.binary_length(column)).as_py() or 0
            statistics += 2 * longest if longest <= MAX_STATISTICS_VALUE else 0
        self._statistics_bytes = max(self._statistics_bytes, statistics)
        return len(self.schema) * CHUNK_METADATA_BYTES + statistics

    def _open(self, state: _PartitionState, first: pa.Table) -> tuple[pq.ParquetWriter, _Sink]:
        """Start the partition's next file, with ``first`` as its first row group; its name is unique to this
        run and writer."""
        with self._lock:
            self._seq += 1
            self._open_writers += 1
            seq = self._seq
        name = f"{self.file_prefix}-{uuid.uuid4().hex}-{seq:05d}.parquet"
        folder = f"{self.location}/{state.path}" if state.path else self.location
        if not is_s3_uri(folder) and folder not in self._folders:
            os.makedirs(folder, exist_ok=True)  # once per folder and writer, not once per file
            self._folders.add(folder)
        sink = _Sink(f"{folder}/{name}", self.s3, folder_made=True)
        writer = pq.ParquetWriter(
            sink,
            self.file_schema,
            compression="snappy",
            write_statistics=True,
            **self._encodings(first),
            store_schema=False,
        )
        state.written = 0
        state.footer = self._base_footer + len(state.path.encode())
        state.rows_in_file = 0
        return writer, sink

    def _encodings(self, first: pa.Table) -> dict[str, Any]:
        """:func:`_encodings`; the same for every file whose first row group is too small to judge its values."""
        if first.num_rows >= DICTIONARY_SAMPLE_ROWS // 16:
            return _encodings(first)
        if self._small_encodings is None:
            self._small_encodings = _encodings(first)
        return self._small_encodings

    def _footer_metadata(self, path: str, rows: int) -> dict[str, str]:
        metadata = {**self.metadata, "partition": path, "record-count": str(rows)}
        return {f"dativo.{k}": v for k, v in metadata.items()}

    def _close(
        self, state: _PartitionState, uploads: list[_Upload] | None = None
    ) -> None:
        """Finish the partition's file; publish it now, or add it to ``uploads`` for :meth:`close`."""
        if state.writer is None or state.sink is None:
            return
        state.writer.add_key_value_metadata(self._footer_metadata(state.path, state.rows_in_file))
        state.writer.close()
        state.sink.close()
        size = state.sink.tell()
        metadata = {
            **self.metadata,
            "partition": state.path,
            "record-count": str(state.rows_in_file),
            "file-size-bytes": str(size),
        }
        written = WrittenFile(
            uri=state.sink.uri,
            size_bytes=size,
            record_count=state.rows_in_file,
            partition_path=state.path,
            partition_values=self.partitioner.to_json(state.values),
            sources=[state.source] if state.source is not None else [],
        )
        sink = state.sink
        state.writer, state.sink = None, None
        state.written, state.footer, state.rows_in_file = 0, 0, 0
        with self._lock:
            self._open_writers -= 1
        if uploads is None:
            sink.publish(metadata)
            self.files.append(written)
        else:
            uploads.append((sink, metadata, written))

    def close(self) -> list[WrittenFile]:
        """Flush every buffer, finish every file; returns all files written.

        The files still open (one per partition) are finished first and then published together: on object
        storage their uploads go out on pyiceberg's shared thread pool (a day-partitioned run ends with hundreds).
        """
        self._route()
        self._closing = True
        uploads: list[_Upload] = []

        def finish(state: _PartitionState, view: _SpillView | None) -> None:
            self._settle(state, final=True, view=view)
            self._close(state, uploads)

        def finish_whole(state: _PartitionState, data: pa.Table) -> None:
            self._write_whole(state, data)
            self._close(state, uploads)

        try:
            with ThreadPoolExecutor(CLOSE_THREADS, thread_name_prefix="dativo-write") as pool:
                for group, shared in self._closing_groups():
                    # one map of the spill file per group (each message decoded once for all its partitions);
                    # unmapped once the group is written, so the pages it read in go too
                    view = _SpillView(self._spill) if shared else None
                    # partitions whose rows make one row group of a new file: gathered together, a slice each
                    whole = [s for s in group if shared and s.writer is None and s.pending_bytes <= self._limit(s)]
                    gathering = {id(state) for state in whole}
                    futures = [pool.submit(finish, state, view) for state in group if id(state) not in gathering]
                    if whole:
                        gathered, bounds = self._gather(whole, view)
                        futures += [
                            pool.submit(finish_whole, state, gathered.slice(start, end - start))
                            for state, start, end in zip(whole, bounds[:-1], bounds[1:], strict=True)
                        ]
                        del gathered
                    for future in futures:
                        future.result()
                    del view, futures
        except BaseException:
            for sink, _, _ in uploads:
                sink.discard()
            raise
        finally:
            self._spill.close()
        self._publish(uploads)
        return self.files

    def _gather(self, states: Sequence[_PartitionState], view: _SpillView | None) -> tuple[pa.Table, list[int]]:
        """Every row the partitions wait for, in one table ordered by partition (each partition's rows in the order
        they came in): ``bounds[i]:bounds[i + 1]`` holds ``states[i]``'s rows. Their ranges are released.

        One ``take`` over the batches in memory and the spilled messages read back (all zero-copy pieces of one
        table), instead of a slice and a concatenation per partition and batch: with thousands of partitions of a
        few rows in every batch, that was most of the close's time.
        """
        pieces: list[pa.Table] = []
        located: dict[tuple[int, int], int] = {}  # (batch, message offset or -1) -> its first row among the pieces
        total = 0
        starts: list[int] = []
        lengths: list[int] = []
        counts: list[int] = []

        def piece(key: tuple[int, int], table: pa.Table) -> int:
            nonlocal total
            first = located.get(key)
            if first is None:
                first = located[key] = total
                pieces.append(table)
                total += table.num_rows
            return first

        view = view or _SpillView(self._spill)  # reads nothing until a spilled range asks
        for state in states:
            counts.append(_ranges_rows(state.pending))
            for rows, start, end in state.pending:
                for offset, part, low, high in rows.pieces(start, end, view):
                    starts.append(piece((id(rows), offset), part) + low)
                    lengths.append(high - low)
        run_lengths = np.asarray(lengths, dtype=np.int64)
        run_starts = np.asarray(starts, dtype=np.int64)
        taken = int(run_lengths.sum())
        # row i of the result is row run_starts[r] + (i - first row of run r) of the pieces, r the run holding it
        indices = np.arange(taken, dtype=np.int64) + np.repeat(run_starts - (np.cumsum(run_lengths) - run_lengths),
                                                                run_lengths)
        gathered = pa.concat_tables(pieces).take(pa.array(indices)) if taken else self.file_schema.empty_table()
        del pieces, located
        for state in states:
            for rows, _, _ in state.pending:
                self._release(rows)
            state.pending, state.pending_bytes = [], 0
        bounds = [0, *np.cumsum(counts).tolist()]
        return gathered, bounds

    def _write_whole(self, state: _PartitionState, data: pa.Table) -> None:
        """Write ``data`` (all the partition's rows) as the only row group of a new file; :meth:`_close` finishes it.

        No footer estimate and no ratio: no other row group follows in this file.
        """
        state.writer, state.sink = self._open(state, data)
        state.writer.write_table(data, row_group_size=max(data.num_rows, 1))
        state.written = state.sink.tell()
        state.rows_in_file = data.num_rows

    def _closing_groups(self) -> list[tuple[list[_PartitionState], bool]]:
        """The partitions left at the end, in groups of at most ``TOTAL_BUFFER_BYTES`` of rows, in the order their
        rows are sorted in every spilled batch (so that a group reads contiguous pages of the spill file); a
        partition holding more is a group of its own that maps the spill file anew for each row group."""
        states = [state for state in self._states.values() if state.pending or state.writer is not None]
        with contextlib.suppress(TypeError):  # values that do not compare: the order only saves pages, not rows
            states.sort(key=_sort_key)
        groups: list[tuple[list[_PartitionState], bool]] = []
        group: list[_PartitionState] = []
        size = 0
        for state in states:
            if state.pending_bytes > TOTAL_BUFFER_BYTES:
                groups.append(([state], False))
                continue
            if group and size + state.pending_bytes > TOTAL_BUFFER_BYTES:
                groups.append((group, True))
                group, size = [], 0
            group.append(state)
            size += state.pending_bytes
        if group:
            groups.append((group, True))
        return groups

    def _publish(self, uploads: Sequence[_Upload]) -> None:
        """Publish finished files. Once one fails no more are started; every file that went up is recorded (so
        that abort() removes it) before the first error is raised."""
        if len(uploads) < 2 or not is_s3_uri(self.location):
            for sink, metadata, written in uploads:
                sink.publish(metadata)  # a no-op for local files
                self.files.append(written)
            return
        failed = threading.Event()

        def publish(sink: _Sink, metadata: dict[str, str]) -> bool:
            if failed.is_set():  # an upload failed: the run fails, so the files not yet started stay local
                sink.discard()
                return False
            try:
                sink.publish(metadata)
            except BaseException:
                failed.set()
                raise
            return True

        executor = ExecutorFactory.get_or_create()
        futures = [executor.submit(publish, sink, metadata) for sink, metadata, _ in uploads]
        error: BaseException | None = None
        for (_, _, written), future in zip(uploads, futures, strict=True):
            try:
                if future.result():
                    self.files.append(written)
            except BaseException as exc:  # the first is raised once no upload is under way any more
                error = error or exc
        if error is not None:
            raise error

    def abort(self) -> None:
        """Close and remove everything this writer wrote (a failed run leaves no files)."""
        self._spill.close()
        for state in self._states.values():
            if state.writer is not None and state.sink is not None:
                try:
                    state.writer.close()
                except (OSError, pa.ArrowException):
                    log.warning("could not finish %s while aborting; removing it", state.sink.uri)
                finally:
                    state.sink.discard()
                state.writer, state.sink = None, None
        for written in self.files:
            remove_file(written.uri, self.s3)


def _ranges_rows(ranges: Sequence[_Range]) -> int:
    """Rows in ``ranges``."""
    return sum(end - start for _, start, end in ranges)


def _sort_key(state: _PartitionState) -> tuple[Any, ...]:
    """A partition's place in a batch sorted by ``Partitioner.sort`` (nulls last)."""
    key = (*state.values, state.source) if state.source is not None else state.values
    return tuple((value is None, value) for value in key)


def _encodings(first: pa.Table) -> dict[str, Any]:
    """``ParquetWriter`` arguments choosing each column's encoding, from the first rows of a file.

    - integers: DELTA_BINARY_PACKED. It encodes about twice as fast as dictionary pages (no hashing), is about as
      small for codes and counts, and stores ids and other ascending numbers in next to nothing (the benchmark's
      person file: 47 instead of 67 MB, flights x10 1.6 instead of 1.9 s to write).
    - dates and time stamps: dictionary pages when they repeat (dates) or plain (time stamps, whose dictionary
      rarely pays), DELTA_BINARY_PACKED when mostly unique (event times, usually ascending);
    - text: dictionary pages unless mostly unique: the encoder otherwise hashes every id or e-mail address until
      the dictionary outgrows its page (1 MiB), in every row group, for a larger file (booleans are bit-packed
      whatever is asked);
    - floating point and decimals: plain (they rarely repeat); the repeated system columns (Arrow dictionaries,
      the constant ingest time): dictionary pages.
    Readers (Arrow, DuckDB, Spark, Trino, pyiceberg) read every one of these encodings.
    """
    sample = first.slice(0, DICTIONARY_SAMPLE_ROWS)
    judged = sample.num_rows >= DICTIONARY_SAMPLE_ROWS // 16  # fewer rows tell too little: taken as repeating

    def unique(name: str) -> bool:
        if not judged:
            return False
        return pc.count_distinct(sample.column(name), mode="all").as_py() > sample.num_rows * UNIQUE_FRACTION

    dictionary: list[str] = []
    delta: dict[str, str] = {}
    for f in first.schema:
        kind = f.type
        if pa.types.is_dictionary(kind) or f.name == INGESTED_AT_COLUMN:
            dictionary.append(f.name)
        elif pa.types.is_integer(kind):
            delta[f.name] = "DELTA_BINARY_PACKED"
        elif pa.types.is_date(kind) or pa.types.is_timestamp(kind):
            if unique(f.name):
                delta[f.name] = "DELTA_BINARY_PACKED"
            elif pa.types.is_date(kind):
                dictionary.append(f.name)
        elif not (pa.types.is_floating(kind) or pa.types.is_decimal(kind) or unique(f.name)):
            dictionary.append(f.name)
    return {"use_dictionary": dictionary, "column_encoding": delta}


def _row_bytes(table: pa.Table) -> np.ndarray:
    """Approximate in-memory bytes of each row, as ``nbytes`` counts them."""
    per_row = np.zeros(table.num_rows, dtype=np.float64)
    fixed = 0.0
    for column in table.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            fixed += kind.index_type.bit_width / 8
        elif pa.types.is_string(kind) or pa.types.is_binary(kind):
            lengths = pc.binary_length(column).to_numpy(zero_copy_only=False)
            per_row += np.nan_to_num(lengths.astype(np.float64)) + 4
        elif pa.types.is_boolean(kind):
            fixed += 0.125
        else:
            fixed += kind.bit_width / 8
        if column.null_count:
            fixed += 0.125
    return per_row + fixed


def _empty_footer_bytes(schema: pa.Schema, metadata: Mapping[str, str]) -> int:
    """Footer size of a file with this schema and metadata and no rows."""
    buffer = pa.BufferOutputStream()
    writer = pq.ParquetWriter(buffer, schema, compression="snappy", store_schema=False)
    writer.add_key_value_metadata(dict(metadata))
    writer.close()
    return buffer.getvalue().size


def _encode_repeated(table: pa.Table, file_schema: pa.Schema) -> pa.Table:
    """The table with its repeated system columns as dictionaries of the file schema.

    The pipeline hands them over as dictionaries already (``table_schema.repeated``); plain strings, from other
    callers of the writer, are encoded here.
    """
    for i, f in enumerate(table.schema):
        if f.name in REPEATED_COLUMNS and pa.types.is_string(f.type):
            target = file_schema.field(f.name)
            table = table.set_column(i, target, table.column(i).dictionary_encode().cast(target.type))
    return table


def remove_file(uri: str, s3: S3Settings) -> None:
    """Delete one data file; missing is fine."""
    if is_s3_uri(uri):
        delete_s3_object(uri, s3)
        return
    fs, path = filesystem_for(uri, s3)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def governance_metadata(spec: Any, *, branch: str, run_id: str, ingested_at: datetime) -> dict[str, str]:
    """User metadata of every data object (CONTRACT section 4), except the per-file keys."""
    return {
        "asset-name": spec.name,
        "asset-version": spec.version,
        "domain": spec.domain,
        "data-product": spec.data_product,
        "tenant-id": spec.tenant,
        "branch": branch,
        "owner": spec.team.owner,
        "retention-days": "" if spec.compliance.retention_days is None else str(spec.compliance.retention_days),
        "classification": ",".join(spec.compliance.classification),
        "ingest-timestamp": ingested_at.isoformat().replace("+00:00", "Z"),
        "run-id": run_id,
    }


@dataclass(frozen=True)
class WriterSettings:
    """How a run writes data files (target size, names, governance metadata, storage): the same for the files it
    streams and for the files its commit rewrites, so that every file the project commits keeps CONTRACT 4."""

    target_bytes: int
    file_prefix: str
    metadata: Mapping[str, str]
    s3: S3Settings

    def writer(
        self, location: str, schema: pa.Schema, partitioner: Partitioner, *, split_by_source: bool = False
    ) -> PartitionedParquetWriter:
        """A writer of Parquet files under ``location`` (a table's data folder)."""
        return PartitionedParquetWriter(
            location=location,
            schema=schema,
            partitioner=partitioner,
            target_bytes=self.target_bytes,
            file_prefix=self.file_prefix,
            metadata=self.metadata,
            s3=self.s3,
            split_by_source=split_by_source,
        )


def run_writer_settings(
    spec: Any, *, branch: str, run_id: str, ingested_at: datetime, s3: S3Settings
) -> WriterSettings:
    """The writer settings of one run of ``spec``: file names start with its time and run id, its governance
    metadata (CONTRACT 4) goes into every file's footer and object metadata."""
    return WriterSettings(
        target_bytes=int(spec.target.parquet_target_size_mb * MIB),
        file_prefix=f"{ingested_at.strftime('%Y%m%dT%H%M%S')}-{run_id[:8]}",
        metadata=governance_metadata(spec, branch=branch, run_id=run_id, ingested_at=ingested_at),
        s3=s3,
    )


def write_batches(batches: Iterable[pa.RecordBatch], writer: PartitionedParquetWriter) -> list[WrittenFile]:
    """Write every batch and close; on any error remove what was written and re-raise."""
    try:
        for batch in batches:
            writer.write(pa.Table.from_batches([batch]))
        return writer.close()
    except BaseException:
        writer.abort()
        raise
