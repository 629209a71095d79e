"""Extract: list the source files and stream them as Arrow batches of text, with file and line."""

from __future__ import annotations

import codecs
import csv
import fnmatch
import glob
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from dativo_dagster.errors import NothingToReadError, SourceError
from dativo_dagster.spec import CsvOptions, FieldSpec, LoadedSpec
from dativo_dagster.storage import S3Settings, filesystem_for, is_s3_uri

log = logging.getLogger(__name__)

SOURCE_FILE = "_source_file"
SOURCE_LINE = "_source_line"
PARSE_ERROR = "_parse_error"
RAW_RECORD = "_raw_record"
BLOCK_SIZE = 1 << 20
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True, order=True)
class SourceFile:
    """One source file as listed: its URI and the version that identifies its content."""

    uri: str
    size: int
    version: str  # local: mtime in ns; S3: ETag


@dataclass
class FileReport:
    """What reading one file found besides its rows."""

    uri: str
    rows: int = 0
    blank_records: int = 0
    unparseable_records: int = 0
    extra_columns: list[str] = field(default_factory=list)
    missing_columns: list[str] = field(default_factory=list)


def text_schema(fields: Sequence[FieldSpec]) -> pa.Schema:
    """Schema of the batches that extract produces."""
    return pa.schema(
        [pa.field(f.name, pa.string()) for f in fields]
        + [
            pa.field(SOURCE_FILE, pa.string()),
            pa.field(SOURCE_LINE, pa.int64()),
            pa.field(PARSE_ERROR, pa.string()),
            pa.field(RAW_RECORD, pa.string()),
        ]
    )


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
        if is_s3_uri(pattern):
            matches = _list_s3(pattern, s3, has_glob)
        else:
            matches = _list_local(pattern, has_glob)
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
        out.append(SourceFile(uri=os.path.abspath(path), size=stat.st_size, version=str(stat.st_mtime_ns)))
    return out


def _list_s3(pattern: str, s3: S3Settings, has_glob: bool) -> list[SourceFile]:
    fs, path = filesystem_for(pattern, s3)
    if not has_glob:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return []
        return [_s3_source_file(info)]
    prefix = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)]
    base = prefix.rsplit("/", 1)[0]
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return [
        _s3_source_file(info)
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.path, path)
    ]


def _s3_source_file(info: pafs.FileInfo) -> SourceFile:
    # pyarrow does not expose the ETag; size + mtime identify the object version for S3 too.
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return SourceFile(uri=f"s3://{info.path}", size=info.size or 0, version=f"{mtime}-{info.size}")


def _open(source: SourceFile, s3: S3Settings) -> pa.NativeFile:
    fs, path = filesystem_for(source.uri, s3)
    try:
        return fs.open_input_stream(path)
    except FileNotFoundError:
        raise SourceError("source file not found", path=source.uri) from None
    except OSError as exc:
        raise SourceError(f"cannot open: {exc}", path=source.uri) from None


def _codec_name(options: CsvOptions) -> str:
    return codecs.lookup(options.encoding).name


def _read_header(source: SourceFile, options: CsvOptions, s3: S3Settings) -> list[str] | None:
    """The header record's names, parsed with the same dialect; None for an empty file."""
    with _open(source, s3) as stream:
        head = stream.read(BLOCK_SIZE)
    if not head:
        return None
    codec = _codec_name(options)
    if codec == "utf-8":
        codec = "utf-8-sig"
    decoder = codecs.getincrementaldecoder(codec)(errors="strict")
    try:
        text = decoder.decode(head, final=len(head) < BLOCK_SIZE)
    except UnicodeDecodeError as exc:
        line = head[: exc.start].count(b"\n") + 1 if codec.startswith("utf-8") or codec == "latin-1" else None
        if line is None or line == 1:
            raise SourceError(
                f"header is not valid {options.encoding} ({exc.reason} at byte {exc.start})", path=source.uri, line=1
            ) from None
        text = head[: exc.start].decode(codec, errors="strict")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text), delimiter=options.delimiter, quotechar=options.quote_char, strict=False)
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise SourceError(f"cannot parse header: {exc}", path=source.uri, line=1) from None


@dataclass
class _LineTracker:
    """Turns pyarrow's record numbers into the physical line each record starts on."""

    next_record: int
    extra_newlines: int = 0
    pending: list[tuple[int, str]] = field(default_factory=list)  # (record number, raw text) of skipped records
    done: list[tuple[int, str]] = field(default_factory=list)  # (line, raw text) placed by the last batch

    def handler(self, row: pacsv.InvalidRow) -> str:
        self.pending.append((row.number, row.text))
        return "skip"

    def number_batch(self, newlines: np.ndarray) -> np.ndarray:
        """Line numbers for a batch of ``len(newlines)`` parsed records; leaves skipped ones in ``done``."""
        n = len(newlines)
        pending = sorted(p for p in self.pending if p[0] >= self.next_record)
        invalid = np.array([p[0] for p in pending], dtype=np.int64)
        shifted = invalid - self.next_record - np.arange(len(invalid), dtype=np.int64)
        index = np.arange(n, dtype=np.int64)
        skipped_before = np.searchsorted(shifted, index, side="right")
        records = self.next_record + index + skipped_before
        last = int(records[-1]) if n else self.next_record - 1
        inside = [p for p in pending if p[0] <= last] if n else []
        # newlines in earlier records push later records' first lines down
        invalid_nl = np.array([text.count("\n") for _, text in inside], dtype=np.int64)
        valid_before = np.concatenate([[0], np.cumsum(newlines)[:-1]]) if n else np.zeros(0, np.int64)
        invalid_cum = np.concatenate([[0], np.cumsum(invalid_nl)])
        lines = records + self.extra_newlines + valid_before + invalid_cum[skipped_before]
        self.done = []
        for j, (number, text) in enumerate(inside):
            valid_count = int(np.searchsorted(records, number))
            line = number + self.extra_newlines + int(np.sum(newlines[:valid_count])) + int(invalid_cum[j])
            self.done.append((line, text))
        self.extra_newlines += int(np.sum(newlines)) + int(invalid_cum[-1])
        self.next_record = last + 1
        self.pending = [p for p in self.pending if p[0] > last]
        return lines

    def flush(self) -> list[tuple[int, str]]:
        """Skipped records after the last parsed one."""
        out = []
        for number, text in sorted(self.pending):
            out.append((number + self.extra_newlines, text))
            self.extra_newlines += text.count("\n")
        self.pending = []
        return out


def read_source_file(
    source: SourceFile, fields: Sequence[FieldSpec], options: CsvOptions, s3: S3Settings, report: FileReport
) -> Iterator[pa.RecordBatch]:
    """Stream one CSV file as batches of :func:`text_schema`, never holding the whole file.

    Records with the wrong number of fields are not errors here: they come through with
    ``_parse_error`` set, so that validation can fail (strict) or quarantine them (warn).

    Raises:
        SourceError: the file cannot be opened or decoded; names the file and line.
    """
    schema = text_schema(fields)
    if options.header:
        names = _read_header(source, options, s3)
        if names is None:
            return
        mapping = _map_header(names, fields, source, report)
        column_names = [f"c{i}" for i in range(len(names))]
        skip_rows = 1
    else:
        mapping = {f.name: f"c{i}" for i, f in enumerate(fields)}
        column_names = [f"c{i}" for i in range(len(fields))]
        skip_rows = 0
    tracker = _LineTracker(next_record=skip_rows + 1)
    # every column is read, not only the mapped ones: quoted newlines anywhere move the line numbers
    include = column_names
    read_options = pacsv.ReadOptions(
        use_threads=False,  # serial parsing is what gives record numbers for skipped records
        block_size=BLOCK_SIZE,
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
    convert_options = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in column_names},
        include_columns=include,
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
        null_values=[],
        check_utf8=True,
    )
    stream = _open(source, s3)
    try:
        try:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
        except StopIteration:
            return
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise _read_error(exc, source, options, s3) from None
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise _read_error(exc, source, options, s3) from None
            yield from _emit(batch, tracker, mapping, include, schema, source, report)
        rest = tracker.flush()
        if rest:
            report.unparseable_records += len(rest)
            yield _skipped_batch(rest, source, schema, len(column_names))
    finally:
        stream.close()


def _map_header(names: list[str], fields: Sequence[FieldSpec], source: SourceFile, report: FileReport) -> dict[str, str]:
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name.strip(), []).append(i)
    lowered: dict[str, list[int]] = {}
    for name, idx in positions.items():
        lowered.setdefault(name.lower(), []).extend(idx)
    mapping: dict[str, str] = {}
    for f in fields:
        idx = positions.get(f.name) or lowered.get(f.name.lower())
        if not idx:
            report.missing_columns.append(f.name)
            continue
        if len(idx) > 1:
            cols = ", ".join(str(i + 1) for i in idx)
            raise SourceError(f"header names column {f.name!r} more than once (columns {cols})", path=source.uri, line=1)
        mapping[f.name] = f"c{idx[0]}"
    known = {f.name.lower() for f in fields}
    report.extra_columns = [n for n in names if n.strip().lower() not in known]
    return mapping


def _emit(
    batch: pa.RecordBatch,
    tracker: _LineTracker,
    mapping: dict[str, str],
    include: list[str],
    schema: pa.Schema,
    source: SourceFile,
    report: FileReport,
) -> Iterator[pa.RecordBatch]:
    n = batch.num_rows
    newlines = np.zeros(n, dtype=np.int64)
    blank = None
    for name in include:
        col = batch.column(name)
        newlines += pc.count_substring(col, "\n").to_numpy(zero_copy_only=False)
        empty = pc.equal(pc.binary_length(col), 0)
        blank = empty if blank is None else pc.and_(blank, empty)
    lines = tracker.number_batch(newlines)
    if tracker.done:
        report.unparseable_records += len(tracker.done)
        yield _skipped_batch(tracker.done, source, schema, len(include))
    keep = pc.invert(blank) if blank is not None else None
    columns = []
    for f in schema:
        if f.name == SOURCE_FILE:
            columns.append(pa.repeat(source.uri, n))
        elif f.name == SOURCE_LINE:
            columns.append(pa.array(lines, pa.int64()))
        elif f.name in (PARSE_ERROR, RAW_RECORD):
            columns.append(pa.nulls(n, pa.string()))
        elif f.name in mapping:
            columns.append(batch.column(mapping[f.name]))
        else:
            columns.append(pa.nulls(n, pa.string()))
    out = pa.RecordBatch.from_arrays(columns, schema=schema)
    if keep is not None:
        out = out.filter(keep)
    report.blank_records += n - out.num_rows
    report.rows += out.num_rows
    if out.num_rows:
        yield out


def _skipped_batch(records: list[tuple[int, str]], source: SourceFile, schema: pa.Schema, expected: int) -> pa.RecordBatch:
    n = len(records)
    columns = []
    for f in schema:
        if f.name == SOURCE_FILE:
            columns.append(pa.repeat(source.uri, n))
        elif f.name == SOURCE_LINE:
            columns.append(pa.array([line for line, _ in records], pa.int64()))
        elif f.name == PARSE_ERROR:
            columns.append(pa.array([_field_count_error(expected) for _ in records], pa.string()))
        elif f.name == RAW_RECORD:
            columns.append(pa.array([text for _, text in records], pa.string()))
        else:
            columns.append(pa.nulls(n, pa.string()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _field_count_error(expected: int) -> str:
    return f"record has the wrong number of fields; expected {expected}"


def _read_error(exc: Exception, source: SourceFile, options: CsvOptions, s3: S3Settings) -> SourceError:
    """Turn a reader error into one that names the file and the first bad line."""
    line = _first_undecodable_line(source, options, s3)
    if line is not None:
        return SourceError(f"text is not valid {options.encoding}", path=source.uri, line=line)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SourceError(f"cannot parse CSV: {message}", path=source.uri)


def _first_undecodable_line(source: SourceFile, options: CsvOptions, s3: S3Settings) -> int | None:
    """Scan the file for the first line that does not decode; only runs on the error path."""
    codec = _codec_name(options)
    decoder = codecs.getincrementaldecoder(codec)(errors="strict")
    lines = 1
    with _open(source, s3) as stream:
        while True:
            chunk = stream.read(BLOCK_SIZE)
            final = not chunk
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                return lines + _decoded_newlines(chunk[: exc.start], codec)
            lines += text.count("\n")
            if final:
                return None


def _decoded_newlines(prefix: bytes, codec: str) -> int:
    return prefix.decode(codec, errors="replace").count("\n")


def iter_source_batches(
    files: Sequence[SourceFile], loaded: LoadedSpec, s3: S3Settings, reports: list[FileReport]
) -> Iterator[pa.RecordBatch]:
    """Read every file in turn; appends one :class:`FileReport` per file to ``reports``."""
    spec = loaded.spec
    for source in files:
        report = FileReport(uri=source.uri)
        reports.append(report)
        log.info("reading %s (%d bytes)", source.uri, source.size)
        yield from read_source_file(source, spec.fields, spec.source.options, s3, report)
