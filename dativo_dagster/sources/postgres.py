"""PostgreSQL source: one table or view, or one read-only SELECT, read in one snapshot and streamed as Arrow text.

The driver is ADBC's PostgreSQL driver (docs/sources/postgres.md says why): it streams ``COPY ... TO STDOUT
(FORMAT binary)`` into Arrow record batches in C++, ``BATCH_BYTES`` at a time, so memory stays flat whatever the
table size. Every column is cast to text in the server (PostgreSQL's own exact text of the value, UTC for
``timestamptz``, ISO dates, numerics without trailing zeros), and validation parses that text by the CSV rules
of CONTRACT section 2: a value is accepted only when the spec type holds it exactly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from dativo_dagster.errors import DatabaseSourceError
from dativo_dagster.sources.base import (
    FileReport,
    SourceFile,
    text_schema,
)
from dativo_dagster.sources.database import CursorValue, DatabaseSource, DriverErrors, cursor_value, text_batch

log = logging.getLogger(__name__)

DEFAULT_PORT = 5432
MIB = 1 << 20
# The driver's batch size (a hint: a batch ends with the row that crosses it). Its default, 16 MB, is allocated outside
# Arrow's pool and the stages hold several batches at once (the one being filled, the reader's, the queue's, the
# validator's): measured on person5m, the driver's memory at the peak was 120 MiB with 16 MB batches and 55 MiB with
# 2 MiB ones, which the reader combines to its own size (pipeline.COMBINE_BYTES) at no measurable cost in speed.
BATCH_BYTES = 2 * MIB
URL_SCHEMES = ("postgresql", "postgres")
# set inside the read's transaction: the text the server makes of each value does not depend on the server's or
# the role's settings
SESSION_SETTINGS = (
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL IntervalStyle = 'iso_8601'",
    "SET LOCAL extra_float_digits = 1",  # the shortest text that reads back as the same float
)
TYPE_METADATA = b"POSTGRESQL:type"
_BATCH_SIZE_HINT = "adbc.postgresql.batch_size_hint_bytes"  # adbc_driver_postgresql.StatementOptions, without the import
# SQLSTATE classes a new attempt can get past: connection lost (08), server shutting down or starting (57P),
# out of resources (53), serialisation failure or deadlock (40001, 40P01)
_TRANSIENT_SQLSTATE = re.compile(r"^(08|57P|53|40001|40P01)")
_TRANSIENT_CONNECT_TEXT = re.compile(
    r"connection refused|could not connect|timeout|timed out|server closed|starting up|shutting down|"
    r"too many (clients|connections)|no route|unreachable|could not translate host name|terminating connection|"
    r"connection to server was lost|SSL SYSCALL error|EOF detected",
    re.IGNORECASE,
)


class _DriverErrors(DriverErrors):
    """ADBC's errors, and the Arrow stream's (OSError) when the server fails a query half-way; transient by SQLSTATE."""

    def classify(self, exc: BaseException) -> tuple[str, bool] | None:
        module = type(exc).__module__ or ""
        if not (module.startswith("adbc_driver") or isinstance(exc, (pa.ArrowException, OSError))):
            return None
        sqlstate = getattr(exc, "sqlstate", None) or ""
        text = str(exc)
        # the driver's message, without its echo of the query ("Query was: ...") and its own prefixes
        message = text.split("\nQuery was:", 1)[0].strip()
        message = re.sub(r"^(?:[A-Z_]+: )?(?:\[libpq\] )?(?:Execution error \[PGRES_FATAL_ERROR\]: )?", "", message)
        transient = bool(_TRANSIENT_SQLSTATE.match(sqlstate) or (not sqlstate and _TRANSIENT_CONNECT_TEXT.search(text)))
        return message + (f" (SQLSTATE {sqlstate})" if sqlstate else ""), transient


@dataclass(frozen=True)
class PostgresSource(DatabaseSource):
    """``source.type: postgres`` bound to one spec (:class:`dativo_dagster.sources.base.Source`)."""

    URI_SCHEME: ClassVar[str] = "postgresql"
    URL_SCHEMES: ClassVar[tuple[str, ...]] = URL_SCHEMES
    URL_EXAMPLE: ClassVar[str] = "postgresql://user:password@host:5432/db"
    DRIVER_ERRORS: ClassVar[type[DriverErrors]] = _DriverErrors

    def uri(self) -> str:
        """The source as ``_source_file`` shows it: ``postgresql://host:port/db/<table>`` or ``.../query``, without
        credentials."""
        parts = urlsplit(self.url())
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise DatabaseSourceError(f"{self._where()}.connection.url_env: the URL's port is not a number") from None
        database = unquote(parts.path.lstrip("/")) or (unquote(parts.username or "") or "postgres")
        return f"postgresql://{host}:{port}/{database}/{self.spec.table or 'query'}"

    def _read_unit(self, unit: SourceFile, report: FileReport) -> Iterator[pa.RecordBatch]:
        url = self.url()
        password = unquote(urlsplit(url).password or "")
        schema = text_schema(self.loaded.spec.fields)
        conn = self._connect(url, password, unit.uri)
        try:
            cur = conn.cursor()
            with self._errors(password, unit.uri, "reading"):
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                for setting in SESSION_SETTINGS:
                    cur.execute(setting)
                relation = self._relation()
                described = cur.adbc_execute_schema(f"SELECT * FROM {relation}")  # noqa: S608 - the spec's own SQL
            selected = self._selected(described.names, unit, report)
            columns = ", ".join(
                f"{_as_text(described.field(index))} AS c{position}" for position, (_, index) in enumerate(selected)
            )
            where = self._where_cursor(described.names, selected, unit)
            with self._errors(password, unit.uri, "reading"):
                cur.adbc_statement.set_options(**{_BATCH_SIZE_HINT: str(BATCH_BYTES)})
                cur.execute(f"SELECT {columns} FROM {relation}{where}")  # noqa: S608 - quoted names, the spec's SQL
                reader = cur.fetch_record_batch()
            position_of = {name: position for position, (name, _) in enumerate(selected)}
            batches = iter_batches(reader)
            while True:
                with self._errors(password, unit.uri, "reading"):
                    batch = next(batches, None)
                if batch is None:
                    break
                report.rows += batch.num_rows
                text = [c if c.type == pa.string() else c.cast(pa.string()) for c in batch.columns]
                yield text_batch(text, batch.num_rows, schema, position_of, unit.uri)
        finally:
            try:
                conn.close()  # ends the read-only transaction: nothing to commit
            except Exception:  # noqa: BLE001 - the read's own outcome matters; the server ends the session anyway
                log.warning("could not close the connection to %s", unit.uri)

    def _where_cursor(self, names: list[str], selected: list[tuple[str, int]], unit: SourceFile) -> str:
        """`` WHERE <cursor> >= <bound>`` for a cursor run with a committed mark, a partition's window for a table,
        else nothing (:meth:`DatabaseSource._row_filter`).

        The bounds are typed literals rendered from the parsed mark or the window (an int, a date or a datetime,
        never text from anywhere else): the driver streams a result through ``COPY``, which takes no bound
        parameters.
        """
        return self._row_filter(names, selected, unit)

    def _literal(self, value: CursorValue) -> str:
        return _literal(value)

    def _quote(self, name: str) -> str:
        return _quoted(name)

    def max_cursor(self) -> CursorValue | None:
        """The source's highest cursor value now (``SELECT max(...)``: one row, no row transfer)."""
        from dativo_dagster.cursor import cursor_field  # noqa: PLC0415

        url = self.url()
        password = unquote(urlsplit(url).password or "")
        uri = self.uri()
        report = FileReport(uri=uri)
        conn = self._connect(url, password, uri)
        try:
            cur = conn.cursor()
            with self._errors(password, uri, "reading"):
                cur.execute("SET TimeZone = 'UTC'")
                relation = self._relation()
                described = cur.adbc_execute_schema(f"SELECT * FROM {relation}")  # noqa: S608 - the spec's own SQL
            selected = self._selected(described.names, SourceFile(uri=uri, size=0, version=""), report)
            column = self._cursor_column(described.names, selected, SourceFile(uri=uri, size=0, version=""))
            with self._errors(password, uri, "reading"):
                cur.execute(f"SELECT max({_quoted(column)}) FROM {relation}")  # noqa: S608 - as above
                value = cur.fetchone()[0]
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - the query's own outcome matters; the server ends the session anyway
                log.warning("could not close the connection to %s", uri)
        return cursor_value(value, cursor_field(self.loaded).type.kind)

    def _connect(self, url: str, password: str, uri: str):  # noqa: ANN202 - the driver's connection type
        import adbc_driver_postgresql.dbapi as adbc  # noqa: PLC0415 - loaded only when a database is read

        with self._errors(password, uri, "connecting to"):
            return adbc.connect(url, autocommit=True)



def iter_batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The reader's batches (one at a time: the driver fetches the next one when asked)."""
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return


def _literal(value: CursorValue) -> str:
    """A typed SQL literal of a cursor value (an int, a date or a datetime)."""
    if isinstance(value, datetime):
        return f"TIMESTAMPTZ '{value.isoformat()}'" if value.tzinfo is not None else f"TIMESTAMP '{value.isoformat()}'"
    if isinstance(value, date):
        return f"DATE '{value.isoformat()}'"
    return str(int(value))


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _as_text(field: pa.Field) -> str:
    """SQL for one column as the server's exact text: numerics without trailing zeros (``12.340000`` is the
    decimal 12.34), everything else by its type's text output under the read's settings."""
    pg_type = (field.metadata or {}).get(TYPE_METADATA, b"").decode()
    column = _quoted(field.name)
    if pg_type == "numeric":
        return f"trim_scale({column})::text"
    return f"{column}::text"


__all__ = ["PostgresSource"]
