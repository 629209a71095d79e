"""MySQL / MariaDB source: one table or view, or one read-only SELECT, read in one snapshot and streamed as Arrow text.

PyMySQL looks the columns up (in a read-only transaction, with every error's code); the rows' one SELECT is read by
ConnectorX in a process of its own (:mod:`dativo_dagster.mysql_reader`, docs/sources/mysql.md says why) and arrives
``BATCH_ROWS`` at a time, so memory stays flat whatever the table size. Every column is
rendered as text by the server (its own exact text of the value: decimals without trailing zeros, ``TIMESTAMP`` in
UTC with ``+00:00``, binary strings as hex), and validation parses that text by the CSV rules of CONTRACT section
2: a value is accepted only when the spec type holds it exactly (a zero date ``0000-00-00`` is not a date, a
``BIGINT UNSIGNED`` beyond int64 is out of range, ``TINYINT(1)``'s ``1`` / ``0`` are booleans).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

import pyarrow as pa

from dativo_dagster.errors import DatabaseSourceError
from dativo_dagster.mysql_reader import ReaderError, read_batches
from dativo_dagster.sources.base import (
    FileReport,
    SourceFile,
    text_schema,
)
from dativo_dagster.sources.database import CursorValue, DatabaseSource, DriverErrors, cursor_value, text_batch

log = logging.getLogger(__name__)

DEFAULT_PORT = 3306
URL_SCHEMES = ("mysql", "mariadb")
BATCH_ROWS = 10_000  # rows per Arrow batch: a few MiB of text (docs/sources/mysql.md has the measurements)
CONNECT_TIMEOUT_SECONDS = 10
# set before the read's transaction: the text the server makes of each value does not depend on its settings, and a
# slow consumer (validation, writing) is not cut off while the server waits to send the next rows
SESSION_SETTINGS = (
    "SET time_zone = '+00:00'",
    "SET SESSION net_write_timeout = 3600",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
)
# the same for the rows' stream, whose one statement is its own read-only transaction (its snapshot)
STREAM_SETTINGS = (
    "SET time_zone = '+00:00'",
    "SET SESSION net_write_timeout = 3600",
    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
)
# MySQL protocol column types (pymysql.constants.FIELD_TYPE) that need more than CAST(... AS CHAR)
_DECIMAL_TYPES = {0, 246}
_TIMESTAMP = 7
_BIT = 16
_GEOMETRY = 255
_STRING_TYPES = {15, 249, 250, 251, 252, 253, 254}  # text and binary strings share these codes
# server error codes a new attempt can get past: too many connections (1040), server shutting down (1053), lock wait
# timeout (1205), deadlock (1213), connection killed (1927, MariaDB); client codes 2000-2099: cannot connect,
# server gone away, lost connection...
_TRANSIENT_CODES = {1040, 1053, 1205, 1213, 1927}
# how ConnectorX (the Rust mysql crate) words a server error, and a connection that could not be made or was lost
_SERVER_ERROR = re.compile(r"ERROR (?P<code>\d+) \(\w+\): (?P<message>.*?) \}")
_CONNECTION_LOST = re.compile(
    r"IO error|IoError|Could not connect|Connection (refused|reset)|Broken pipe|timed out|bytes remaining"
    r"|reading process",
    re.IGNORECASE,
)


class _DriverErrors(DriverErrors):
    """PyMySQL's errors and socket errors; transient: a lost connection (client codes 2000-2099) or _TRANSIENT_CODES."""

    def classify(self, exc: BaseException) -> tuple[str, bool] | None:
        import pymysql  # noqa: PLC0415 - loaded only when a database is read

        if not isinstance(exc, (pymysql.MySQLError, OSError)):
            return None
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        message = str(exc.args[1]) if code is not None and len(exc.args) > 1 else str(exc)
        lost = isinstance(exc, (OSError, pymysql.err.InterfaceError)) or (code is not None and 2000 <= code < 2100)
        return message + (f" (error {code})" if code else ""), lost or code in _TRANSIENT_CODES


class _StreamErrors(DriverErrors):
    """ConnectorX's errors while rows stream (:class:`ReaderError`: the text of its ``RuntimeError`` or Rust panic),
    holding the server's ``ERROR <code>`` or the client's I/O error. Transient: the codes of :class:`_DriverErrors`,
    or no server code and a lost or refused connection, or the reading process ended without a word."""

    def classify(self, exc: BaseException) -> tuple[str, bool] | None:
        if not isinstance(exc, ReaderError):
            return None
        text = str(exc)
        server = _SERVER_ERROR.search(text)
        if server:
            code = int(server["code"])
            return f"{server['message']} (error {code})", 2000 <= code < 2100 or code in _TRANSIENT_CODES
        return text, bool(_CONNECTION_LOST.search(text))


@dataclass(frozen=True)
class MySQLSource(DatabaseSource):
    """``source.type: mysql`` bound to one spec (:class:`dativo_dagster.sources.base.Source`)."""

    URI_SCHEME: ClassVar[str] = "mysql"
    URL_SCHEMES: ClassVar[tuple[str, ...]] = URL_SCHEMES
    URL_EXAMPLE: ClassVar[str] = "mysql://user:password@host:3306/db"
    DRIVER_ERRORS: ClassVar[type[DriverErrors]] = _DriverErrors

    def _address(self) -> tuple[str, int, str]:
        parts = urlsplit(self.url())
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise DatabaseSourceError(f"{self._where()}.connection.url_env: the URL's port is not a number") from None
        return parts.hostname or "localhost", port, unquote(parts.path.lstrip("/"))

    def uri(self) -> str:
        """The source as ``_source_file`` shows it: ``mysql://host:port/db/<table>`` or ``.../query``, without
        credentials."""
        host, port, database = self._address()
        shown_host = f"[{host}]" if ":" in host else host
        return f"mysql://{shown_host}:{port}/{database}/{self.spec.table or 'query'}"

    def _read_unit(self, unit: SourceFile, report: FileReport) -> Iterator[pa.RecordBatch]:
        password = unquote(urlsplit(self.url()).password or "")
        schema = text_schema(self.loaded.spec.fields)
        conn = self._connect(password, unit.uri)
        try:
            with self._errors(password, unit.uri, "reading"):
                cur = conn.cursor()
                for setting in SESSION_SETTINGS:
                    cur.execute(setting)
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                relation = self._relation()
                cur.execute(f"SELECT * FROM {relation} LIMIT 0")  # noqa: S608 - the spec's own SQL
                described = list(cur.description or ())
                cur.close()
            names = [d[0] for d in described]
            selected = self._selected(names, unit, report)
            where = self._where_cursor(conn, names, selected, unit)  # the cursor mark and a partition window
            row_texts = _text_columns([described[index] for _, index in selected])
            position_of = {name: position for position, (name, _) in enumerate(selected)}
            select = f"SELECT {row_texts} FROM {relation}{where}"  # noqa: S608 - quoted names and the spec's SQL
            if self._nothing_past_mark(conn, names, selected, unit, password):
                # only the rows from the bound to the mark can be new (at the mark, in the lookback): read in this
                # transaction's snapshot, without starting the reading process
                for batch in self._read_in_snapshot(conn, select, password, unit.uri):
                    report.rows += batch.num_rows
                    yield text_batch(batch.columns, batch.num_rows, schema, position_of, unit.uri)
                return
        finally:
            _close(conn, unit.uri)
        # one statement on a connection of its own: InnoDB reads it from one consistent snapshot (taken when the
        # statement starts), in a read-only session (STREAM_SETTINGS), so a query cannot lock or write rows
        batches = read_batches(self._connectorx_url(password), select, STREAM_SETTINGS, BATCH_ROWS)
        try:
            while True:
                with _StreamErrors(self._where(), password, unit.uri, "reading"):
                    batch = next(batches, None)
                if batch is None:
                    return
                report.rows += batch.num_rows
                yield text_batch(batch.columns, batch.num_rows, schema, position_of, unit.uri)
        finally:
            batches.close()  # a read stopped early: the reading process is stopped and its file removed now

    def _nothing_past_mark(self, conn: Any, names: list[str], selected: list[tuple[str, int]], unit: SourceFile,
                           password: str) -> bool:
        """Whether a cursor run with a committed mark finds no row past it (one ``EXISTS`` in the transaction's
        snapshot, on the cursor's index where there is one); False for every other read."""
        column = self._cursor_column(names, selected, unit)
        mark = self._cursor_mark(unit)
        if column is None or mark is None:
            return False
        with self._errors(password, unit.uri, "reading"):
            cur = conn.cursor()
            cur.execute(f"SELECT EXISTS (SELECT 1 FROM {self._relation()}"  # noqa: S608 - quoted name, typed literal
                        f" WHERE {self._quote(column)} > {self._literal(mark)})")
            (past,) = cur.fetchone()
            cur.close()
        return not past

    def _read_in_snapshot(self, conn: Any, select: str, password: str, uri: str) -> Iterator[pa.RecordBatch]:
        """``select``'s rows (text columns) read on the lookup's connection, in its snapshot, ``BATCH_ROWS`` at a
        time from an unbuffered cursor (bounded memory)."""
        import pymysql.cursors  # noqa: PLC0415 - loaded only when a database is read

        with self._errors(password, uri, "reading"):
            cur = conn.cursor(pymysql.cursors.SSCursor)
            cur.execute(select)
            count = len(cur.description or ())
        try:
            while True:
                with self._errors(password, uri, "reading"):
                    rows = cur.fetchmany(BATCH_ROWS)
                if not rows:
                    return
                columns = list(zip(*rows, strict=True))
                yield pa.RecordBatch.from_arrays(
                    [pa.array(columns[i], pa.string()) for i in range(count)], names=[f"c{i}" for i in range(count)]
                )
        finally:
            cur.close()

    def _connectorx_url(self, password: str) -> str:
        """The URL ConnectorX connects with: the spec's user, password and database, scheme ``mysql``."""
        parts = urlsplit(self.url())
        host, port, database = self._address()
        shown_host = f"[{host}]" if ":" in host else host
        user = quote(unquote(parts.username or ""), safe="")
        return f"mysql://{user}:{quote(password, safe='')}@{shown_host}:{port}/{quote(database, safe='')}"

    def _where_cursor(self, conn: Any, names: list[str], selected: list[tuple[str, int]], unit: SourceFile) -> str:
        """`` WHERE <cursor> >= <bound>`` for a cursor run with a committed mark, a partition's window for a table,
        else nothing (:meth:`DatabaseSource._row_filter`); the bounds are escaped by the driver as it escapes query
        parameters (a zoned bound in UTC, the session's time zone)."""
        return self._row_filter(names, selected, unit)

    def _literal(self, value: CursorValue) -> str:
        """A bound escaped by PyMySQL as it escapes a query parameter, typed with ``CAST`` (dates, time stamps)."""
        from pymysql.converters import escape_item  # noqa: PLC0415 - loaded only when a database is read

        if isinstance(value, datetime):
            if value.tzinfo is not None:
                value = value.astimezone(timezone.utc).replace(tzinfo=None)
            return f"CAST({escape_item(value, 'utf8mb4')} AS DATETIME(6))"
        if isinstance(value, date):
            return f"CAST({escape_item(value, 'utf8mb4')} AS DATE)"
        return escape_item(int(value), "utf8mb4")

    def _quote(self, name: str) -> str:
        return _quoted(name)

    def max_cursor(self) -> CursorValue | None:
        """The source's highest cursor value now (``SELECT max(...)``: one row, no row transfer)."""
        from dativo_dagster.cursor import cursor_field  # noqa: PLC0415

        password = unquote(urlsplit(self.url()).password or "")
        uri = self.uri()
        unit = SourceFile(uri=uri, size=0, version="")
        conn = self._connect(password, uri)
        try:
            with self._errors(password, uri, "reading"):
                cur = conn.cursor()
                cur.execute(SESSION_SETTINGS[0])
                relation = self._relation()
                cur.execute(f"SELECT * FROM {relation} LIMIT 0")  # noqa: S608 - the spec's own SQL
                names = [d[0] for d in cur.description or ()]
            column = self._cursor_column(names, self._selected(names, unit, FileReport(uri=uri)), unit)
            with self._errors(password, uri, "reading"):
                cur.execute(f"SELECT max({_quoted(column)}) FROM {relation}")  # noqa: S608 - as above
                value = cur.fetchone()[0]
        finally:
            _close(conn, uri)
        return cursor_value(value, cursor_field(self.loaded).type.kind)

    def _connect(self, password: str, uri: str):  # noqa: ANN202 - the driver's connection type
        import pymysql  # noqa: PLC0415 - loaded only when a database is read

        parts = urlsplit(self.url())
        host, port, database = self._address()
        with self._errors(password, uri, "connecting to"):
            return pymysql.connect(
                host=host,
                port=port,
                user=unquote(parts.username or ""),
                password=password,
                database=database or None,
                charset="utf8mb4",
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                autocommit=True,
            )



def _close(conn: Any, uri: str) -> None:
    """Close the column lookup's connection, which ends its read-only transaction (nothing to commit)."""
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - the read's own outcome matters; the server ends the session anyway
        log.warning("could not close the connection to %s", uri)


def _text_columns(columns: list[tuple]) -> str:
    """SQL for the columns' texts, named ``c0``, ``c1``... in order (a name the server could not misread)."""
    return ", ".join(f"{_as_text(column)} AS c{position}" for position, column in enumerate(columns))


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _as_text(column: tuple) -> str:
    """SQL for one column (a DB-API description entry) as the server's exact text."""
    name, type_code, scale = column[0], column[1], column[5]
    quoted = _quoted(name)
    if type_code in _DECIMAL_TYPES and scale:  # 12.340000 is the decimal 12.34
        text = f"CAST({quoted} AS CHAR)"
        return f"TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM {text}))"
    if type_code == _TIMESTAMP:  # an instant: rendered in UTC (the session's time_zone) with its offset
        return f"CONCAT(CAST({quoted} AS CHAR), '+00:00')"
    if type_code == _BIT:
        return f"CAST({quoted} + 0 AS CHAR)"
    if type_code == _GEOMETRY:
        return f"ST_AsText({quoted})"
    if type_code in _STRING_TYPES:  # text as it is, binary strings (BLOB, BINARY, VARBINARY) as hex
        return f"IF(CHARSET({quoted}) = 'binary', HEX({quoted}), CONVERT({quoted} USING utf8mb4))"
    return f"CAST({quoted} AS CHAR)"


__all__ = ["MySQLSource"]
