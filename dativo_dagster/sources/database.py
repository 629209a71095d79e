"""What the database sources share: the spec, the URL from the environment, one unit per table or query, the
relation to select from, and the spec's columns matched to the relation's (CONTRACT section 7)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

import pyarrow as pa

from dativo_dagster.errors import DatabaseSourceError, DatabaseUnavailableError, redact
from dativo_dagster.sources.base import (
    PARSE_ERROR,
    RAW_RECORD,
    SOURCE_LINE,
    DuplicateColumnError,
    FileReport,
    SourceFile,
    match_columns,
)
from dativo_dagster.spec import DatabaseSourceSpec, LoadedSpec
from dativo_dagster.table_schema import SOURCE_FILE, repeated
from dativo_dagster.types import TypeKind

if TYPE_CHECKING:
    from dativo_dagster.partitions import PartitionWindow

CursorValue = int | date | datetime


@dataclass(frozen=True)
class DatabaseSource:
    """A ``postgres`` or ``mysql`` source bound to one spec; a kind's module adds ``uri`` and ``_read_unit``."""

    URI_SCHEME: ClassVar[str]  # the scheme of ``_source_file`` and of the URL the messages ask for
    URL_SCHEMES: ClassVar[tuple[str, ...]]  # the schemes a URL may have
    URL_EXAMPLE: ClassVar[str]
    DRIVER_ERRORS: ClassVar[type[DriverErrors]]  # how the kind's driver errors read and which are transient

    loaded: LoadedSpec
    null_values: Sequence[str] = ()  # a database has real nulls: no text means null

    @property
    def spec(self) -> DatabaseSourceSpec:
        source = self.loaded.spec.source
        assert isinstance(source, DatabaseSourceSpec)
        return source

    def _where(self) -> str:
        return f"{self.loaded.display_path}: source"

    def url(self) -> str:
        """The connection URL from the environment variable the spec names.

        Raises:
            DatabaseSourceError: the variable is not set, or does not hold a URL of this kind.
        """
        name = self.spec.connection.url_env
        url = os.environ.get(name, "").strip()
        if not url:
            raise DatabaseSourceError(
                f"{self._where()}.connection.url_env: environment variable {name} is not set; it must hold the"
                f" database URL ({self.URL_EXAMPLE})"
            )
        if urlsplit(url).scheme not in self.URL_SCHEMES:
            raise DatabaseSourceError(
                f"{self._where()}.connection.url_env: environment variable {name} does not hold a"
                f" {self.URI_SCHEME}:// URL"
            )
        return url

    def uri(self) -> str:
        """The source as ``_source_file`` shows it, without credentials."""
        raise NotImplementedError

    def list_units(self) -> list[SourceFile]:
        """One unit: the table or query. A full read has no version (cursor incremental will put its mark here)."""
        return [SourceFile(uri=self.uri(), size=0, version="")]

    def read(self, units: Sequence[SourceFile], reports: list[FileReport]) -> Iterator[pa.RecordBatch]:
        """Stream each unit in one consistent, read-only snapshot as batches in :func:`text_schema`; ``_source_line``
        is null (the spec's columns identify a record)."""
        for unit in units:
            report = FileReport(uri=unit.uri)
            reports.append(report)
            yield from self._read_unit(unit, report)

    def _read_unit(self, unit: SourceFile, report: FileReport) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def _errors(self, password: str, uri: str, doing: str) -> DriverErrors:
        """A context that turns the driver's errors while ``doing`` (e.g. "reading") into ours."""
        return self.DRIVER_ERRORS(self._where(), password, uri, doing)

    def _relation(self) -> str:
        """What the reads select from: the table, or the spec's query as a derived table (a partition's run: its
        ``:partition_start`` / ``:partition_end`` bound to the window, query_window.py)."""
        if self.spec.table:
            return self.spec.table
        query = self.spec.query.strip().rstrip(";")
        window = self._window()
        if window is not None:
            from dativo_dagster.query_window import START, bind_window  # noqa: PLC0415

            low, high = window.bounds()
            query = bind_window(query, self.spec.type, lambda name: self._literal(low if name == START else high))
        return f"({query}) AS source_query"

    def _window(self) -> PartitionWindow | None:
        """The window of a partition's run (None: an unpartitioned run)."""
        if not self.loaded.partition_key:
            return None
        from dativo_dagster.partitions import partition_window  # noqa: PLC0415

        return partition_window(self.loaded, self.loaded.partition_key)

    def _literal(self, value: CursorValue) -> str:
        """A typed SQL literal of a bound (an int, a date or a datetime, never text from outside)."""
        raise NotImplementedError

    def _quote(self, name: str) -> str:
        """A column name quoted for the kind's SQL."""
        raise NotImplementedError

    def _row_filter(self, names: Sequence[str], selected: Sequence[tuple[str, int]], unit: SourceFile) -> str:
        """`` WHERE ...`` for the read: a cursor run's ``cursor >= bound``, a ``table:`` partition's ``field >= start
        AND field < end`` (typed literals); nothing for a full read.

        Raises:
            DatabaseSourceError: the relation lacks the cursor's or the partitions' column.
        """
        conditions = []
        column = self._cursor_column(names, selected, unit)
        bound = self._cursor_bound(unit)
        if column is not None and bound is not None:
            conditions.append(f"{self._quote(column)} >= {self._literal(bound)}")
        window = self._window()
        if window is not None and self.spec.table:  # a query selects its own window
            index = dict(selected).get(window.field)
            if index is None:
                raise DatabaseSourceError(
                    f"{self.loaded.display_path}: partitions.field: {unit.uri} has no column {window.field!r}; it has "
                    + ", ".join(names)
                )
            low, high = window.bounds()
            quoted = self._quote(names[index])
            conditions.append(f"{quoted} >= {self._literal(low)} AND {quoted} < {self._literal(high)}")
        return f" WHERE {' AND '.join(conditions)}" if conditions else ""

    def _cursor_mark(self, unit: SourceFile) -> CursorValue | None:
        """The unit's committed mark (None: no cursor, or a first run)."""
        from dativo_dagster.cursor import cursor_field, cursor_of, parse_mark  # noqa: PLC0415

        if cursor_of(self.loaded) is None:
            return None
        return parse_mark(unit.version, cursor_field(self.loaded).type.kind)

    def _cursor_bound(self, unit: SourceFile) -> CursorValue | None:
        """The lowest cursor value the unit's read takes (the committed mark less the lookback; None: every row)."""
        from dativo_dagster.cursor import cursor_field, cursor_of, lower_bound, parse_mark  # noqa: PLC0415

        if cursor_of(self.loaded) is None:
            return None
        return lower_bound(self.loaded, parse_mark(unit.version, cursor_field(self.loaded).type.kind))

    def _cursor_column(self, names: Sequence[str], selected: Sequence[tuple[str, int]], unit: SourceFile) -> str | None:
        """The relation's column that holds the cursor field (None: the spec has no cursor).

        Raises:
            DatabaseSourceError: the relation has no such column.
        """
        from dativo_dagster.cursor import cursor_of  # noqa: PLC0415

        cursor = cursor_of(self.loaded)
        if cursor is None:
            return None
        index = dict(selected).get(cursor.cursor_field)
        if index is None:
            raise DatabaseSourceError(
                f"{self._where()}.incremental.cursor_field: {unit.uri} has no column {cursor.cursor_field!r}; it has "
                + ", ".join(names)
            )
        return names[index]

    def _selected(self, names: Sequence[str], unit: SourceFile, report: FileReport) -> list[tuple[str, int]]:
        """The spec's fields found among the relation's columns ``names``, as (field, column index); the columns
        the spec lacks and the fields the relation lacks go to ``report``.

        Raises:
            DatabaseSourceError: a column name occurs twice, or none of the spec's fields is there.
        """
        try:
            mapping, report.missing_columns, report.extra_columns = match_columns(names, self.loaded.spec.fields)
        except DuplicateColumnError as exc:
            raise DatabaseSourceError(
                f"{self._where()}: {unit.uri} has more than one column named {exc.name!r} (columns {exc.columns})"
            ) from None
        selected = list(mapping.items())
        if not selected:
            raise DatabaseSourceError(
                f"{self._where()}: {unit.uri} has none of the spec's columns; it has " + ", ".join(names)
            )
        return selected


def text_batch(
    values: Sequence[pa.Array], num_rows: int, schema: pa.Schema, position_of: dict[str, int], uri: str
) -> pa.RecordBatch:
    """The selected columns' text (``values``, in the order of the SELECT) in :func:`text_schema`: each spec field
    from its column (null when the relation lacks it), ``_source_file`` the source's URI, no line or parse error."""
    columns = []
    for f in schema:
        if f.name == SOURCE_FILE:
            columns.append(repeated(uri, num_rows))
        elif f.name in (SOURCE_LINE, PARSE_ERROR, RAW_RECORD):
            columns.append(pa.nulls(num_rows, f.type))
        elif f.name in position_of:
            columns.append(values[position_of[f.name]])
        else:
            columns.append(pa.nulls(num_rows, pa.string()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def cursor_value(value: object, kind: TypeKind) -> CursorValue | None:
    """A value the driver returned as the spec's cursor type (time stamps with a zone in UTC)."""
    if value is None:
        return None
    if kind is TypeKind.TIMESTAMPTZ and isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if kind is TypeKind.TIMESTAMP and isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if kind is TypeKind.DATE and isinstance(value, datetime):
        return value.date()
    return value if isinstance(value, (date, datetime)) else int(value)


class DriverErrors:
    """Turns a driver error into :class:`DatabaseSourceError` or :class:`DatabaseUnavailableError`, naming the spec,
    the source and what was being done, with the password removed. A kind says which errors are its driver's, what
    their message is and which a new attempt can get past (:meth:`classify`)."""

    def __init__(self, where: str, password: str, uri: str, doing: str):
        self.where, self.password, self.uri, self.doing = where, password, uri, doing

    def classify(self, exc: BaseException) -> tuple[str, bool] | None:
        """The driver error's message (with its code) and whether it is transient; None: not the driver's."""
        raise NotImplementedError

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, (DatabaseSourceError, DatabaseUnavailableError)):
            return False
        classified = self.classify(exc)
        if classified is None:
            return False
        message, transient = classified
        full = f"{self.where}: {self.doing} {self.uri}: " + redact(" ".join(message.split()), [self.password])
        raise (DatabaseUnavailableError if transient else DatabaseSourceError)(full) from None
