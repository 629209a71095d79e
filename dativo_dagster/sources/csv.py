"""CSV source: list the source files (local or S3, globs) and stream them as Arrow batches of text, with file
and line."""

from __future__ import annotations

import codecs
import csv
import fnmatch
import gc
import glob
import io
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dativo_dagster.errors import NothingToReadError, SourceError
from dativo_dagster.sources.base import (
    PARSE_ERROR,
    RAW_RECORD,
    SOURCE_LINE,
    DuplicateColumnError,
    FileReport,
    SourceFile,
    local_version,
    match_columns,
    text_schema,
)
from dativo_dagster.spec import CsvOptions, FieldSpec, LoadedSpec
from dativo_dagster.storage import (
    READ_BUFFER,
    S3Object,
    S3Settings,
    filesystem_for,
    head_s3_object,
    is_s3_uri,
    list_s3_objects,
    split_s3_uri,
)
from dativo_dagster.table_schema import SOURCE_FILE, repeated

log = logging.getLogger(__name__)

BLOCK_SIZE = 1 << 20
# A record must fit in one block of pyarrow's reader: a longer one restarts the file with blocks this many
# times larger, up to MAX_BLOCK_SIZE; a record longer than that fails the file (CONTRACT: never a crash or hang).
BLOCK_GROWTH = 4
MAX_BLOCK_SIZE = 32 << 20  # a 32 MiB block takes about 150 MB while pyarrow reads it
# A file up to this size is fetched whole with one request and read from memory: its header, its rows and its
# last record are looked at by three opens otherwise (three GETs on object storage, a round trip each).
SMALL_FILE_BYTES = BLOCK_SIZE
# Object storage: this many small files are fetched ahead of the one being read, on pyiceberg's shared pool
# (a run over 10,000 small objects waited for one round trip after the other).
PREFETCH_FILES = 16
# Small files with the same header are parsed together up to this many bytes (see ``_read_together``).
GROUP_BYTES = BLOCK_SIZE
_GLOB_CHARS = set("*?[")
# The small file being read on this thread, as fetched: (uri, content); see ``_open``
_in_memory = threading.local()


def resolve_path(path: str, loaded: LoadedSpec) -> str:
    """Absolute local path or S3 URI for a spec's ``source.files[].path``."""
    if is_s3_uri(path):
        return path
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        expanded = os.path.join(loaded.base_dir, expanded)
    return os.path.normpath(expanded)


def list_source_files(loaded: LoadedSpec, s3: S3Settings) -> list[SourceFile]:
    """Expand the spec's paths and globs into files, each listed once, in a stable order.

    Raises:
        SourceError: a literal (non-glob) path does not exist.
        NothingToReadError: no file matched at all.
    """
    found: dict[str, SourceFile] = {}
    for entry in loaded.spec.source.files:
        pattern = resolve_path(entry.path, loaded)
        has_glob = bool(_GLOB_CHARS & set(pattern))
        matches = _list_s3(pattern, s3, has_glob) if is_s3_uri(pattern) else _list_local(pattern, has_glob)
        if not matches and not has_glob:
            raise SourceError("source file not found", path=pattern)
        for item in matches:
            found.setdefault(item.uri, item)
    if not found:
        patterns = ", ".join(resolve_path(f.path, loaded) for f in loaded.spec.source.files)
        raise NothingToReadError(f"no source file matches {patterns}")
    return sorted(found.values())


def _list_local(pattern: str, has_glob: bool) -> list[SourceFile]:
    paths = glob.glob(pattern, recursive=True) if has_glob else ([pattern] if os.path.exists(pattern) else [])
    out = []
    for path in paths:
        if not os.path.isfile(path):
            if not has_glob:
                raise SourceError("source path is not a file", path=path)
            continue
        stat = os.stat(path)
        uri = os.path.abspath(path)
        out.append(SourceFile(uri=uri, size=stat.st_size, version=local_version(stat.st_mtime_ns, stat.st_size),
                              modified_ns=stat.st_mtime_ns))
    return out


def _list_s3(pattern: str, s3: S3Settings, has_glob: bool) -> list[SourceFile]:
    """Objects matching ``pattern``: one object, or a glob over keys (``*`` and ``?`` stay within one
    ``/``-separated level, ``**`` spans any number of levels), listed with their ETags.

    Raises:
        SourceError: the bucket name holds a glob character.
        StorageAccessError: S3 refused the listing (terminal); StorageError: unreachable (transient).
    """
    bucket, key = split_s3_uri(pattern)
    if _GLOB_CHARS & set(bucket):
        raise SourceError("globs are allowed in object keys, not in bucket names", path=pattern)
    if not has_glob:
        found = head_s3_object(pattern, s3)
        return [] if found is None else [_s3_source_file(found)]
    literal = key[: min(key.index(c) for c in _GLOB_CHARS if c in key)]
    # a glob in the last level only: list that level, not everything below it
    delimiter = "/" if "**" not in key and "/" not in key[len(literal):] else None
    parts = key.split("/")
    return [
        _s3_source_file(item)
        for item in list_s3_objects(f"s3://{bucket}/{literal}", s3, delimiter=delimiter)
        if not item.key.endswith("/") and _glob_match(parts, item.key.split("/"))
    ]


def _glob_match(pattern: Sequence[str], key: Sequence[str]) -> bool:
    """Whether key levels match pattern levels; a ``**`` level matches any number of levels (zero included).

    One pass over the key, keeping the set of pattern positions reached so far (a glob is a regular language):
    at most ``len(key) * len(pattern)`` level comparisons, however many ``**`` there are. Trying every way to
    split the key among the ``**`` instead costs about ``len(key) ** k`` for ``k`` of them.
    """
    end = len(pattern)

    def reach(positions: Iterable[int]) -> set[int]:
        """``positions`` and every position after a run of ``**`` there (each may match no level)."""
        out = set()
        for i in positions:
            out.add(i)
            while i < end and pattern[i] == "**":
                i += 1
                out.add(i)
        return out

    states = reach([0])
    for level in key:
        moved = set()
        for i in states:
            if i == end:
                continue
            if pattern[i] == "**":
                moved.add(i)  # takes this level and may take more
            elif fnmatch.fnmatchcase(level, pattern[i]):
                moved.add(i + 1)
        if not moved:
            return False
        states = reach(moved)
    return end in states


def _s3_source_file(item: S3Object) -> SourceFile:
    """An object as a source file: its version is the ETag (CONTRACT 5)."""
    modified = item.last_modified
    modified_ns = int(modified.timestamp()) * 1_000_000_000 + modified.microsecond * 1000 if modified else 0
    return SourceFile(uri=item.uri, size=item.size, version=item.etag, modified_ns=modified_ns)


def _open(source: SourceFile, s3: S3Settings) -> pa.NativeFile:
    held = getattr(_in_memory, "content", None)
    if held is not None and held[0] == source.uri:
        return pa.BufferReader(held[1])
    fs, path = filesystem_for(source.uri, s3)
    try:
        if is_s3_uri(source.uri):
            # streamed: one ranged GET per READ_BUFFER bytes, never the whole object in memory
            return fs.open_input_stream(path, buffer_size=READ_BUFFER)
        return fs.open_input_stream(path)
    except FileNotFoundError:
        raise SourceError("source file not found", path=source.uri) from None
    except OSError as exc:
        raise SourceError(f"cannot open: {exc}", path=source.uri) from None


def _codec_name(options: CsvOptions) -> str:
    return codecs.lookup(options.encoding).name


def _line_breaks(text: str) -> int:
    """Line breaks in ``text``: ``\r\n``, a lone ``\r`` and a lone ``\n`` each end one physical line."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _scan_text(batch: pa.RecordBatch) -> list[bool]:
    """Whether each string column of a reader batch may hold a line break; checks that its values are UTF-8.

    The reader does not check UTF-8 value by value (``check_utf8=False``): one copy of a column's data buffer
    shows, by ``bytes.isascii`` (a word at a time), that almost every column is ASCII and so valid UTF-8, and
    by memchr whether any value holds a line break. Only a column with other bytes has its values checked one
    by one (bytes of two values could make a valid character together, so the buffer as a whole cannot tell).

    Raises:
        pa.ArrowInvalid: a value is not valid UTF-8 (the reader's own error, for ``_read_error``).
    """
    multiline = []
    for column in batch.columns:
        buffers = column.buffers()
        data = buffers[2] if len(buffers) > 2 else None
        if data is None or data.size == 0:
            multiline.append(False)
            continue
        raw = data.to_pybytes()  # one copy, then C loops: far cheaper than vectorised comparisons over the buffer
        if not raw.isascii():
            column.validate(full=True)
        multiline.append(raw.find(b"\n") >= 0 or raw.find(b"\r") >= 0)
    return multiline


def _line_breaks_in_column(column: pa.Array) -> np.ndarray:
    """:func:`_line_breaks` of every value of a string column, vectorised."""
    breaks = pc.count_substring(column, "\n").to_numpy(zero_copy_only=False).astype(np.int64)
    returns = pc.count_substring(column, "\r").to_numpy(zero_copy_only=False).astype(np.int64)
    if returns.any():
        breaks += returns - pc.count_substring(column, "\r\n").to_numpy(zero_copy_only=False)
    return breaks


@dataclass(frozen=True)
class _Head:
    """What the first block of a file tells before pyarrow reads it."""

    header: list[str] | None  # the header record's names (header: true only)
    empty: bool  # no record to read: only the header, or (header: false) no bytes, only a BOM or line breaks
    header_lines: int = 0  # physical lines the header record spans (quoted names may hold line breaks)


def _read_head(source: SourceFile, options: CsvOptions, s3: S3Settings) -> _Head:
    """Decode the first block: the header record's names and whether any record follows.

    Raises:
        SourceError: the header does not decode, parse or name any column; names line 1.
        NothingToReadError: a header is expected and the file has no record at all.
    """
    with _open(source, s3) as stream:
        head = stream.read(BLOCK_SIZE)
    whole = len(head) < BLOCK_SIZE
    codec = _codec_name(options)
    if codec == "utf-8":
        codec = "utf-8-sig"
    undecodable: UnicodeDecodeError | None = None
    try:
        text = codecs.getincrementaldecoder(codec)().decode(head, final=whole)
    except UnicodeDecodeError as exc:
        undecodable, whole = exc, False
        text = codecs.getincrementaldecoder(codec)().decode(head[: exc.start], final=False)
    except UnicodeError as exc:
        # Python's utf-16 and utf-32 decoders refuse a file without a byte order mark
        raise SourceError(
            f"cannot decode as {options.encoding}: {exc}; declare {codec}-le or {codec}-be for a file"
            " without a byte order mark",
            path=source.uri,
            line=1,
        ) from None
    text = text.removeprefix("\ufeff")
    if whole and not text.strip("\r\n"):
        if options.header:
            # CONTRACT 3: not even a header where one is expected; a header-only file is a valid empty file
            raise NothingToReadError(
                "no header record (the file holds no bytes, or only a byte order mark or line breaks);"
                " a file with no rows still needs its header line",
                path=source.uri,
            )
        return _Head(header=None, empty=True)
    if not options.header:
        return _Head(header=None, empty=False)
    if undecodable is not None:
        # a character after the good text tells whether the header record ended before the bad byte
        text += next(c for c in "0a_" if c not in (options.delimiter, options.quote_char))
    records = csv.reader(io.StringIO(text, newline=""), delimiter=options.delimiter, quotechar=options.quote_char)
    try:
        names = next(records, None)
        header_lines = records.line_num
    except csv.Error as exc:
        raise SourceError(f"cannot parse header: {exc}", path=source.uri, line=1) from None
    try:
        follows = next(records, None) is not None
    except csv.Error:
        follows = True  # a record follows (csv's field size limit is no concern here: pyarrow reads it)
    if undecodable is not None and not follows:
        raise SourceError(
            f"header is not valid {options.encoding} ({undecodable.reason} at byte {undecodable.start})",
            path=source.uri,
            line=1,
        )
    if not names or not any(name.strip() for name in names):
        raise SourceError("header line is empty; expected the column names", path=source.uri, line=1)
    return _Head(header=names, empty=whole and not follows, header_lines=header_lines)


@dataclass
class _LineTracker:
    """Turns pyarrow's record numbers into the physical line each record starts on.

    pyarrow numbers records, not lines, and tells only the numbers of the records it skips (wrong
    field count). Parsed records fill the gaps between skipped ones in order, and each record
    starts on the line after the previous one ends: it spans 1 + the line breaks inside its values.
    """

    next_record: int  # pyarrow's number of the first record not placed yet
    next_line: int  # the physical line that record starts on
    pending: list[tuple[int, str]] = field(default_factory=list)  # (record number, raw text) of skipped records

    def handler(self, row: pacsv.InvalidRow) -> str:
        self.pending.append((row.number, row.text))
        return "skip"

    def place(self, breaks: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Start lines of a batch of parsed records with ``breaks`` line breaks inside each.

        Returns those lines and the (line, raw text) of the skipped records between them.
        """
        n = len(breaks)
        if n == 0:
            return np.zeros(0, np.int64), []
        if not self.pending and not breaks.any():
            # the common batch: one line per record, nothing skipped
            starts = np.arange(self.next_line, self.next_line + n, dtype=np.int64)
            self.next_line += n
            self.next_record += n
            return starts, []
        self.pending.sort()
        numbers = np.array([number for number, _ in self.pending], dtype=np.int64)
        # the j-th skipped record comes before the i-th parsed one when gaps[j] <= i
        gaps = numbers - self.next_record - np.arange(len(numbers), dtype=np.int64)
        index = np.arange(n, dtype=np.int64)
        positions = index + np.searchsorted(gaps, index, side="right")
        count = int(positions[-1]) + 1
        inside = int(np.searchsorted(numbers, self.next_record + count))
        skipped, self.pending = self.pending[:inside], self.pending[inside:]
        skipped_positions = numbers[:inside] - self.next_record
        if inside and skipped_positions[0] < 0:
            raise RuntimeError(f"skipped record {numbers[0]} precedes record {self.next_record} already placed")
        spans = np.ones(count, dtype=np.int64)
        spans[positions] += breaks
        spans[skipped_positions] += np.array([_line_breaks(text) for _, text in skipped], dtype=np.int64)
        starts = self.next_line + np.concatenate([[0], np.cumsum(spans)[:-1]])
        self.next_line += int(spans.sum())
        self.next_record += count
        placed = [(int(starts[p]), text) for p, (_, text) in zip(skipped_positions, skipped, strict=True)]
        return starts[positions], placed

    def flush(self) -> list[tuple[int, str]]:
        """Skipped records after the last parsed one."""
        out = []
        for _, text in sorted(self.pending):
            out.append((self.next_line, text))
            self.next_line += 1 + _line_breaks(text)
        self.pending = []
        return out


def read_source_file(
    source: SourceFile, fields: Sequence[FieldSpec], options: CsvOptions, s3: S3Settings, report: FileReport
) -> Iterator[pa.RecordBatch]:
    """Stream one CSV file as batches of :func:`text_schema`, never holding the whole file.

    Records with the wrong number of fields, and a last record whose quoted value is never closed, are not
    errors here: they come through with ``_parse_error`` and ``_raw_record`` set, so that validation can
    fail (strict) or quarantine them (warn). Records whose fields are all empty (blank lines) are skipped
    and counted. A record longer than the reader's block makes it start over with larger blocks, leaving
    out the rows it already produced.

    Raises:
        SourceError: the file cannot be opened or decoded, its header names a column twice, or a record
            is longer than ``MAX_BLOCK_SIZE``; names the file and line.
        NothingToReadError: a header is expected and the file has none (zero bytes, only a BOM or line breaks).
    """
    schema = text_schema(fields)
    head = _read_head(source, options, s3)
    if head.header is not None:
        mapping = _map_header(head.header, fields, source, report)
        width = len(head.header)
    else:
        mapping = {f.name: f"c{i}" for i, f in enumerate(fields)}
        width = len(fields)
    if head.empty:
        return
    state = _PassState(resume_line=0)
    block_size = BLOCK_SIZE
    held: pa.RecordBatch | None = None  # the newest batch waits: the file's last record is checked at the end
    while True:
        try:
            for out in _parse_pass(source, options, s3, head, mapping, width, schema, report, block_size, state):
                if held is not None:
                    yield held
                held = out
            break
        except _RecordTooLong as exc:
            # a record with no line break for MAX_BLOCK_SIZE characters cannot fit any block: refuse it now,
            # without passes over the file with ever larger blocks (pyarrow reads dozens of blocks ahead)
            if block_size >= MAX_BLOCK_SIZE or not _line_break_within(source, options, s3, exc.line, MAX_BLOCK_SIZE):
                raise SourceError(
                    f"the record starting here is longer than {MAX_BLOCK_SIZE >> 20} MiB, the most one record may"
                    " hold; is this a CSV file with the declared delimiter and quote character?",
                    path=source.uri,
                    line=exc.line,
                ) from None
            block_size = min(block_size * BLOCK_GROWTH, MAX_BLOCK_SIZE)
            # the failed pass's reader sits in a reference cycle with its traceback: free its blocks before
            # the larger ones come, not at the next garbage collection
            gc.collect()
            pa.default_memory_pool().release_unused()
            log.info("%s: a record from line %d on is longer than the block; reading on with %d MiB blocks",
                     source.uri, exc.line, block_size >> 20)
            state.resume_line = exc.resume_line
    if state.last_line is not None and state.last_value is not None:
        raw = _unterminated_last_record(source, options, s3, state.last_line, state.last_value)
        if raw is not None:
            held = _reject_last_record(held, state.last_line, raw, source, schema, report)
    if held is not None and held.num_rows:
        yield held


@dataclass
class _PassState:
    """What a pass over a file tells the next one (after a restart) and the end-of-file check."""

    resume_line: int  # rows starting before this line were produced by an earlier pass
    last_line: int | None = None  # the line the file's last record starts on, when pyarrow parsed it
    last_value: str | None = None  # that record's last field
    next_line: int = 0  # the line after the last record, once the pass is done
    blank_lines: list[np.ndarray] | None = None  # when a list: the start lines of the blank records left out


class _RecordTooLong(Exception):  # noqa: N818 - internal signal, never leaves this module
    def __init__(self, resume_line: int, line: int):
        self.resume_line = resume_line  # the first line whose rows were not produced yet
        self.line = line  # where the record that does not fit starts


def _parse_pass(
    source: SourceFile,
    options: CsvOptions,
    s3: S3Settings,
    head: _Head,
    mapping: dict[str, str],
    width: int,
    schema: pa.Schema,
    report: FileReport,
    block_size: int,
    state: _PassState,
) -> Iterator[pa.RecordBatch]:
    """One pass of pyarrow's reader over the file with ``block_size`` blocks.

    Raises:
        _RecordTooLong: a record does not fit in a block.
    """
    column_names = [f"c{i}" for i in range(width)]
    skip_rows = head.header_lines  # pyarrow skips lines, not records
    tracker = _LineTracker(next_record=skip_rows + 1, next_line=skip_rows + 1)
    read_options = pacsv.ReadOptions(
        use_threads=False,  # serial parsing is what gives record numbers for skipped records
        block_size=block_size,
        skip_rows=skip_rows,
        column_names=column_names,
        encoding=_codec_name(options),
    )
    parse_options = pacsv.ParseOptions(
        delimiter=options.delimiter,
        quote_char=options.quote_char,
        double_quote=True,
        newlines_in_values=True,
        ignore_empty_lines=False,
        invalid_row_handler=tracker.handler,
    )
    # every column is read, not only the mapped ones: line breaks in any value move the line numbers
    convert_options = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in column_names},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        null_values=[],
        check_utf8=False,  # _scan_text checks UTF-8 far cheaper, together with its search for line breaks
    )
    stream = _open(source, s3)
    try:
        try:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
        except StopIteration:
            state.next_line = tracker.next_line
            return
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise _read_error(exc, source, options, s3, tracker) from None
        while True:
            try:
                batch = reader.read_next_batch()
                multiline = _scan_text(batch)
            except StopIteration:
                break
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise _read_error(exc, source, options, s3, tracker) from None
            out, last_line = _number_batch(
                batch, tracker, multiline, mapping=mapping, schema=schema, source=source, report=report,
                resume_line=state.resume_line, blank_lines=state.blank_lines,
            )
            if batch.num_rows:
                state.last_line = last_line
                state.last_value = batch.column(width - 1)[batch.num_rows - 1].as_py()
            if out.num_rows:
                yield out
        rest = [(line, text) for line, text in tracker.flush() if line >= state.resume_line]
        if rest:
            state.last_line = state.last_value = None  # the last record is a skipped one: already rejected
            report.unparseable_records += len(rest)
            yield _skipped_batch(rest, source, schema, width)
        state.next_line = tracker.next_line
    finally:
        stream.close()


def _map_header(
    names: list[str], fields: Sequence[FieldSpec], source: SourceFile, report: FileReport
) -> dict[str, str]:
    """Spec column -> reader column: exact name first, then the only case-insensitive match."""
    try:
        mapping, report.missing_columns, report.extra_columns = match_columns(names, fields)
    except DuplicateColumnError as exc:
        raise SourceError(
            f"header names column {exc.name!r} more than once: columns {exc.columns}", path=source.uri, line=1
        ) from None
    return {name: f"c{index}" for name, index in mapping.items()}


def _number_batch(
    batch: pa.RecordBatch,
    tracker: _LineTracker,
    multiline: Sequence[bool],
    *,
    mapping: dict[str, str],
    schema: pa.Schema,
    source: SourceFile,
    report: FileReport,
    resume_line: int = 0,
    blank_lines: list[np.ndarray] | None = None,
) -> tuple[pa.RecordBatch, int | None]:
    """One pyarrow batch in :func:`text_schema`, with lines, skipped records in place, blank ones gone.

    ``multiline`` tells which of the batch's columns may hold line breaks (:func:`_scan_text`).

    Rows and skipped records starting before ``resume_line`` (produced by an earlier pass) are left out. The start
    lines of the blank records left out are appended to ``blank_lines`` when it is a list.
    Returns the batch and the line its last parsed record starts on (None for an empty batch).
    """
    n = batch.num_rows
    breaks = np.zeros(n, dtype=np.int64)
    for col, may_break in zip(batch.columns, multiline, strict=True):
        # quoted line breaks are rare: most batches skip the per-value count
        if may_break:
            breaks += _line_breaks_in_column(col)
    lines, skipped = tracker.place(breaks)
    last_line = int(lines[-1]) if n else None
    if resume_line and n and lines[0] < resume_line:
        keep = lines >= resume_line
        batch, lines = batch.filter(pa.array(keep)), lines[keep]
        skipped = [(line, text) for line, text in skipped if line >= resume_line]
        n = batch.num_rows
    blank = None
    # a blank record has every field empty: the first column rules most batches out in one pass
    if n and batch.num_columns and pc.min(pc.binary_length(batch.column(0))).as_py() == 0:
        for col in batch.columns:
            empty = pc.equal(pc.binary_length(col), 0)
            blank = empty if blank is None else pc.and_(blank, empty)
    columns = []
    for f in schema:
        if f.name == SOURCE_FILE:
            columns.append(repeated(source.uri, n))
        elif f.name == SOURCE_LINE:
            columns.append(pa.array(lines, pa.int64()))
        elif f.name in mapping:
            columns.append(batch.column(mapping[f.name]))
        else:
            columns.append(pa.nulls(n, pa.string()))
    out = pa.RecordBatch.from_arrays(columns, schema=schema)
    if blank is not None:
        out = out.filter(pc.invert(blank))
        if blank_lines is not None:
            blank_lines.append(lines[blank.to_numpy(zero_copy_only=False)])
    report.blank_records += n - out.num_rows
    report.rows += out.num_rows
    if not skipped:
        return out, last_line
    report.unparseable_records += len(skipped)
    merged = pa.Table.from_batches([out, _skipped_batch(skipped, source, schema, batch.num_columns)])
    merged = merged.take(pc.sort_indices(merged.column(SOURCE_LINE)))
    return merged.combine_chunks().to_batches()[0], last_line


def _skipped_batch(
    records: list[tuple[int, str]], source: SourceFile, schema: pa.Schema, expected: int, error: str | None = None
) -> pa.RecordBatch:
    n = len(records)
    error = error or _field_count_error(expected)
    columns = []
    for f in schema:
        if f.name == SOURCE_FILE:
            columns.append(repeated(source.uri, n))
        elif f.name == SOURCE_LINE:
            columns.append(pa.array([line for line, _ in records], pa.int64()))
        elif f.name == PARSE_ERROR:
            columns.append(pa.array([error] * n, pa.string()))
        elif f.name == RAW_RECORD:
            columns.append(pa.array([text for _, text in records], pa.string()))
        else:
            columns.append(pa.nulls(n, pa.string()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _field_count_error(expected: int) -> str:
    return f"record has the wrong number of fields; expected {expected}"


def _read_error(
    exc: Exception, source: SourceFile, options: CsvOptions, s3: S3Settings, tracker: _LineTracker
) -> Exception:
    """Turn a reader error into one that names the file and the first bad line.

    pyarrow's "straddling object" error means a record does not fit in one block: that is a
    :class:`_RecordTooLong` for :func:`read_source_file`, which starts over with larger blocks.
    """
    if isinstance(exc, pa.ArrowInvalid) and "straddl" in str(exc):
        resume_line = tracker.next_line
        # records pyarrow skipped before the long one are not placed yet: the long one starts after them
        line = resume_line + sum(1 + _line_breaks(text) for _, text in tracker.pending)
        return _RecordTooLong(resume_line, line)
    line = _first_undecodable_line(source, options, s3)
    if line is not None:
        return SourceError(f"text is not valid {options.encoding}", path=source.uri, line=line)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SourceError(f"cannot parse CSV: {message}", path=source.uri)


def _first_undecodable_line(source: SourceFile, options: CsvOptions, s3: S3Settings) -> int | None:
    """The physical line of the first byte that does not decode; only runs on the error path."""
    decoder = codecs.getincrementaldecoder(_codec_name(options))(errors="strict")
    line = 1
    after_cr = False  # a chunk ended in "\r": a "\n" opening the next one ends no further line
    with _open(source, s3) as stream:
        while True:
            chunk = stream.read(BLOCK_SIZE)
            _, flag = decoder.getstate()
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                decoder.setstate((b"", flag))
                text = decoder.decode(exc.object[: exc.start], final=False)
                return line + _line_breaks(text) - (after_cr and text.startswith("\n"))
            if not chunk:
                return None
            if text:
                line += _line_breaks(text) - (after_cr and text.startswith("\n"))
                after_cr = text.endswith("\r")


def _unterminated_last_record(
    source: SourceFile, options: CsvOptions, s3: S3Settings, line: int, last_value: str
) -> str | None:
    """The text of the file's last record (starting on ``line``) when it ends inside a quoted value, else None.

    pyarrow takes a quote that is never closed as running to the end of the file, which can swallow
    any number of records into one value. Cheap test first: such a file ends with the quote character
    and the last value as written (quotes doubled). Only then is the file scanned from the start to
    find the record and follow its quotes.
    """
    quote = options.quote_char
    written = quote + last_value.replace(quote, quote * 2)
    tail = _decoded_tail(source, options, s3, chars=len(written))
    if not tail.endswith(written):
        return None
    record = _text_from_line(source, options, s3, line)
    return record if _ends_inside_quotes(record, options.delimiter, quote) else None


def _decoded_tail(source: SourceFile, options: CsvOptions, s3: S3Settings, chars: int) -> str:
    """At least the last ``chars`` characters of the file (more, and a replacement character or two in front)."""
    codec = _codec_name(options)
    unit = len(("aa").encode(codec)) - len("a".encode(codec))  # bytes per code unit: 1, 2 or 4
    held = getattr(_in_memory, "content", None)
    if held is not None and held[0] == source.uri:
        opened: pa.NativeFile = pa.BufferReader(held[1])
    else:
        fs, path = filesystem_for(source.uri, s3)
        opened = fs.open_input_file(path)
    with opened as handle:
        size = handle.size()
        want = min(size, 4 * chars + 8 * unit)
        start = size - want
        start -= start % unit
        data = handle.read_at(size - start, start)
        bom = handle.read_at(unit, 0) if codec in ("utf-16", "utf-32") and start else b""
    text = (bom + data).decode(codec, errors="replace")
    return text.removeprefix("\ufeff")


def _text_from_line(source: SourceFile, options: CsvOptions, s3: S3Settings, line: int) -> str:
    """The decoded text from the start of physical ``line`` to the end of the file."""
    decoder = codecs.getincrementaldecoder(_codec_name(options))(errors="replace")
    breaks = re.compile(r"\r\n|\r|\n")
    to_skip = line - 1  # line breaks before the line starts
    carry = ""  # a chunk's trailing "\r" waits: a "\n" may follow in the next chunk
    found: list[str] = []
    with _open(source, s3) as stream:
        while True:
            chunk = stream.read(BLOCK_SIZE)
            text = carry + decoder.decode(chunk, final=not chunk)
            carry = ""
            if chunk and text.endswith("\r") and not found:
                text, carry = text[:-1], "\r"
            if found or to_skip == 0:
                found.append(text)
            else:
                for match in breaks.finditer(text):
                    to_skip -= 1
                    if to_skip == 0:
                        found.append(text[match.end():])
                        break
            if not chunk:
                break
    return "".join(found).removeprefix("\ufeff")


def _line_break_within(source: SourceFile, options: CsvOptions, s3: S3Settings, line: int, limit: int) -> bool:
    """Whether a line break (or the end of the file) follows within ``limit`` characters of physical ``line``'s
    start: a record can only end at one, so without it the record is longer than ``limit``."""
    decoder = codecs.getincrementaldecoder(_codec_name(options))(errors="replace")
    breaks = re.compile(r"\r\n|\r|\n")
    to_skip = line - 1
    seen = 0  # characters of the line read so far
    with _open(source, s3) as stream:
        while True:
            chunk = stream.read(BLOCK_SIZE)
            if not chunk:
                return True  # the end of the file ends the record
            text = decoder.decode(chunk)
            if to_skip:
                for match in breaks.finditer(text):
                    to_skip -= 1
                    if to_skip == 0:
                        text = text[match.end():]
                        break
                else:
                    continue
            if "\n" in text or "\r" in text:
                return True
            seen += len(text)
            if seen > limit:
                return False


def _ends_inside_quotes(record: str, delimiter: str, quote: str) -> bool:
    """Whether the text, read as CSV from a record's start, ends inside a quoted value."""
    unquoted = re.compile(f"[{re.escape(delimiter)}\r\n]")
    i, n = 0, len(record)
    while i < n:
        if record[i] == quote:  # a value that starts with the quote character is quoted
            i += 1
            while True:
                j = record.find(quote, i)
                if j < 0:
                    return True
                if record.startswith(quote, j + 1):
                    i = j + 2  # a doubled quote stands for itself
                    continue
                i = j + 1
                break
        match = unquoted.search(record, i)  # the rest of the value, up to its delimiter or line break
        if match is None:
            return False
        i = match.end()
        if match.group() == "\r" and record.startswith("\n", i):
            i += 1
    return False


def _reject_last_record(
    held: pa.RecordBatch | None, line: int, raw: str, source: SourceFile, schema: pa.Schema, report: FileReport
) -> pa.RecordBatch:
    """``held`` with the file's last record (starting on ``line``) as an unparseable one with its raw text."""
    error = "a quoted value is not closed before the end of the file"
    rejected = _skipped_batch([(line, raw)], source, schema, 0, error=error)
    report.unparseable_records += 1
    if held is not None and held.num_rows and held.column(SOURCE_LINE)[held.num_rows - 1].as_py() == line:
        report.rows -= 1
        held = held.slice(0, held.num_rows - 1)
    else:
        report.blank_records -= 1  # its values were all empty
    if held is None or held.num_rows == 0:
        return rejected
    return pa.Table.from_batches([held, rejected]).combine_chunks().to_batches()[0]


def iter_source_batches(
    files: Sequence[SourceFile], loaded: LoadedSpec, s3: S3Settings, reports: list[FileReport]
) -> Iterator[pa.RecordBatch]:
    """Read every file in turn; appends one :class:`FileReport` per file to ``reports``.

    Consecutive small files with the same header are parsed together (:func:`_read_together`): pyarrow's reader
    costs about 0.4 ms to set up, more than parsing a file of 100 rows.
    """
    options = loaded.spec.source.options
    together = _codec_name(options) == "utf-8"
    group: list[tuple[SourceFile, bytes]] = []
    header: bytes | None = None  # the header line the group's files share
    size = 0
    for source, content in _fetched(files, s3):
        own = _shared_header(content, options) if together and content is not None else None
        if group and (own != header or size + len(content or b"") > GROUP_BYTES):
            yield from _read_group(group, loaded, s3, reports)
            group, size = [], 0
        if own is not None and content is not None:
            group.append((source, content))
            header, size = own, size + len(content)
            continue
        yield from _read_file(source, content, loaded, s3, reports)
    if group:
        yield from _read_group(group, loaded, s3, reports)


def _read_file(
    source: SourceFile, content: bytes | None, loaded: LoadedSpec, s3: S3Settings, reports: list[FileReport]
) -> Iterator[pa.RecordBatch]:
    """One file on its own (:func:`read_source_file`), from ``content`` when it was fetched whole."""
    spec = loaded.spec
    report = FileReport(uri=source.uri)
    reports.append(report)
    log.info("reading %s (%d bytes)", source.uri, source.size)
    _in_memory.content = None if content is None else (source.uri, content)
    try:
        yield from read_source_file(source, spec.fields, spec.source.options, s3, report)
    finally:
        _in_memory.content = None


def _read_group(
    group: Sequence[tuple[SourceFile, bytes]], loaded: LoadedSpec, s3: S3Settings, reports: list[FileReport]
) -> Iterator[pa.RecordBatch]:
    """Small files with one header: parsed together, or each on its own when that cannot map every record back."""
    if len(group) > 1:
        together = _read_together(group, loaded.spec.fields, loaded.spec.source.options, s3)
        if together is not None:
            batch, own = together
            log.info("read %d files together, %s to %s", len(group), group[0][0].uri, group[-1][0].uri)
            reports.extend(own)
            if batch.num_rows:
                yield batch
            return
        log.info("reading %d files one by one, %s to %s", len(group), group[0][0].uri, group[-1][0].uri)
    for source, content in group:
        yield from _read_file(source, content, loaded, s3, reports)


def _shared_header(content: bytes, options: CsvOptions) -> bytes | None:
    """The header line of a small file (empty without a header) when its records can be parsed together with
    other files' of the same header line, else None.

    Its records must end where the file ends: the file ends in a line feed (or has no record), and its header is
    one line ending in a line feed. A header without a line feed, or with a carriage return inside, makes the file
    one to read on its own (like a body starting with a byte order mark, which pyarrow drops at a file's start).
    """
    if options.header:
        end = content.find(b"\n") + 1
        if end == 0:
            return None
        header = content[:end]
        if b"\r" in header[:-2]:
            return None
        if len(content) > end and content[-1:] != b"\n":
            return None
        return header
    if not content.endswith(b"\n") or content.startswith(codecs.BOM_UTF8) or not content.strip(b"\r\n"):
        return None  # read alone: a file of nothing but line breaks holds no record without a header
    return b""


def _among(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` occurs in ``ordered`` (ascending)."""
    at = np.minimum(np.searchsorted(ordered, values), max(len(ordered) - 1, 0))
    return ordered[at] == values if len(ordered) else np.zeros(len(values), dtype=bool)


def _byte_line_breaks(data: bytes) -> int:
    """:func:`_line_breaks` of undecoded bytes (UTF-8: line breaks are single bytes)."""
    returns = data.count(b"\r")
    return data.count(b"\n") + returns - (data.count(b"\r\n") if returns else 0)


def _read_together(
    group: Sequence[tuple[SourceFile, bytes]], fields: Sequence[FieldSpec], options: CsvOptions, s3: S3Settings
) -> tuple[pa.RecordBatch, list[FileReport]] | None:
    """Parse small files of one header line in one reader call: the header once, then every file's records.

    Each file's records come after the lines of the files before it, so a record's line in the joined text tells
    its file and its line there. That holds only when every file's first line starts a record and the records end
    with the text, which the line numbering shows: a quote left open at a file's end would run into the next file.
    Then, and on any error (an undecodable byte, a record too long for the block, a header to refuse), None: the
    files are read one by one, which reports each problem under its own file and line.

    Returns the rows in :func:`text_schema` (``_source_file`` a dictionary of the files) and one report per file.
    """
    first, content = group[0]
    header_size = len(_shared_header(content, options) or b"")
    _in_memory.content = (first.uri, content)
    try:
        head = _read_head(first, options, s3)
    except (SourceError, NothingToReadError):
        return None
    finally:
        _in_memory.content = None
    header_lines = 1 if options.header else 0
    if head.header_lines != header_lines:
        return None
    missing: list[str] = []
    extra: list[str] = []
    if head.header is not None:
        try:
            indices, missing, extra = match_columns(head.header, fields)
        except DuplicateColumnError:
            return None
        mapping = {name: f"c{index}" for name, index in indices.items()}
        width = len(head.header)
    else:
        mapping = {f.name: f"c{i}" for i, f in enumerate(fields)}
        width = len(fields)
    bodies = [data[header_size:] for _, data in group]
    body_lines = np.array([_byte_line_breaks(body) for body in bodies], dtype=np.int64)
    starts = header_lines + 1 + np.concatenate([[0], np.cumsum(body_lines)[:-1]])  # each file's first line
    joined = content[:header_size] + b"".join(bodies)
    whole = SourceFile(uri=f"{first.uri} and {len(group) - 1} more", size=len(joined), version="")
    schema = text_schema(fields)
    state = _PassState(resume_line=0, blank_lines=[])
    _in_memory.content = (whole.uri, joined)
    try:
        batches = list(_parse_pass(
            whole, options, s3, _Head(header=head.header, empty=False, header_lines=header_lines), mapping, width,
            schema, FileReport(uri=whole.uri), max(BLOCK_SIZE, len(joined) + 1), state,
        ))
    except (_RecordTooLong, SourceError):
        return None
    finally:
        _in_memory.content = None
    batch = pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()
    batch = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=schema)
    lines = batch.column(SOURCE_LINE).to_numpy(zero_copy_only=False)
    blanks = np.concatenate(state.blank_lines) if state.blank_lines else np.zeros(0, np.int64)
    firsts = starts[body_lines > 0]
    each_starts_a_record = (_among(lines, firsts) | _among(blanks, firsts)).all()
    if state.next_line != int(starts[-1] + body_lines[-1]) or not each_starts_a_record:
        return None  # a record runs over a file's end
    owner = np.searchsorted(starts, lines, side="right") - 1
    uris = [source.uri for source, _ in group]
    columns = list(batch.columns)
    columns[schema.get_field_index(SOURCE_FILE)] = pa.DictionaryArray.from_arrays(
        pa.array(owner, pa.int32()), pa.array(uris, pa.string())
    )
    columns[schema.get_field_index(SOURCE_LINE)] = pa.array(lines - starts[owner] + header_lines + 1, pa.int64())
    unparseable = batch.column(PARSE_ERROR).is_valid().to_numpy(zero_copy_only=False)
    count = len(group)
    rows = np.bincount(owner[~unparseable], minlength=count)
    skipped = np.bincount(owner[unparseable], minlength=count)
    blank = np.bincount(np.searchsorted(starts, blanks, side="right") - 1, minlength=count)
    reports = [
        FileReport(uri=uri, rows=r, blank_records=b, unparseable_records=u, extra_columns=list(extra),
                   missing_columns=list(missing))
        for uri, r, b, u in zip(uris, rows.tolist(), blank.tolist(), skipped.tolist(), strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema), reports


def _fetched(files: Sequence[SourceFile], s3: S3Settings) -> Iterator[tuple[SourceFile, bytes | None]]:
    """Each file with its whole content when it is small (``SMALL_FILE_BYTES``), else None (it is streamed).

    Small objects on object storage are fetched ``PREFETCH_FILES`` ahead on pyiceberg's shared thread pool, so
    that their round trips overlap; local files are read when their turn comes.
    """
    from pyiceberg.utils.concurrent import ExecutorFactory  # noqa: PLC0415 - only for object storage

    ahead: dict[int, Future[bytes | None]] = {}
    for index, source in enumerate(files):
        if not is_s3_uri(source.uri):
            yield source, _fetch_small(source, s3)
            continue
        for later in range(index, min(index + PREFETCH_FILES, len(files))):
            if later not in ahead and is_s3_uri(files[later].uri):
                ahead[later] = ExecutorFactory.get_or_create().submit(_fetch_small, files[later], s3)
        yield source, ahead.pop(index).result()


def _fetch_small(source: SourceFile, s3: S3Settings) -> bytes | None:
    """The whole content of a file listed as at most ``SMALL_FILE_BYTES``; None for a larger one (also when it
    grew since it was listed), which is then streamed; errors are left to the streaming read, which names them."""
    if source.size > SMALL_FILE_BYTES:
        return None
    try:
        if is_s3_uri(source.uri):
            with _open(source, s3) as stream:
                content = stream.read(SMALL_FILE_BYTES + 1)
        else:
            # Python's own read: about a third of what a pyarrow filesystem and stream cost per local file
            with open(source.uri.removeprefix("file://"), "rb") as handle:
                content = handle.read(SMALL_FILE_BYTES + 1)
    except (SourceError, OSError):
        return None
    return None if len(content) > SMALL_FILE_BYTES else content


@dataclass(frozen=True)
class CsvSource:
    """``source.type: csv`` bound to one spec (:class:`dativo_dagster.sources.base.Source`)."""

    loaded: LoadedSpec
    s3: S3Settings

    @property
    def null_values(self) -> Sequence[str]:
        return self.loaded.spec.source.options.null_values

    def list_units(self) -> list[SourceFile]:
        """The spec's files, each at its version (:func:`list_source_files`)."""
        return list_source_files(self.loaded, self.s3)

    def read(self, units: Sequence[SourceFile], reports: list[FileReport]) -> Iterator[pa.RecordBatch]:
        """:func:`iter_source_batches` over ``units``."""
        return iter_source_batches(units, self.loaded, self.s3, reports)
