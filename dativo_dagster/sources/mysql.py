"""MySQL / MariaDB source: one table or view, or one read-only SELECT, read in one snapshot and streamed as Arrow text.

The driver is PyMySQL with an unbuffered (server-side) cursor (docs/sources/mysql.md says why): rows come off the
socket as they are fetched, ``BATCH_ROWS`` at a time, so memory stays flat whatever the table size. Every column is
rendered as text by the server (its own exact text of the value: decimals without trailing zeros, ``TIMESTAMP`` in
UTC with ``+00:00``, binary strings as hex), and validation parses that text by the CSV rules of CONTRACT section
2: a value is accepted only when the spec type holds it exactly (a zero date ``0000-00-00`` is not a date, a
``BIGINT UNSIGNED`` beyond int64 is out of range, ``TINYINT(1)``'s ``1`` / ``0`` are booleans).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.json as pajson

from dativo_dagster.errors import DatabaseSourceError
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
        import pymysql.cursors  # noqa: PLC0415 - loaded only when a database is read

        password = unquote(urlsplit(self.url()).password or "")
        schema = text_schema(self.loaded.spec.fields)
        conn = self._connect(password, unit.uri)
        stream = None
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
            selected = self._selected([d[0] for d in described], unit, report)
            row_object = _row_as_json([described[index] for _, index in selected])
            position_of = {name: position for position, (name, _) in enumerate(selected)}
            where = self._where_cursor(conn, [d[0] for d in described], selected, unit)
            with self._errors(password, unit.uri, "reading"):
                stream = conn.cursor(pymysql.cursors.SSCursor)
                stream.execute(f"SELECT {row_object} FROM {relation}{where}")  # noqa: S608 - quoted names, the spec's SQL
            while True:
                with self._errors(password, unit.uri, "reading"):
                    rows = stream.fetchmany(BATCH_ROWS)
                if not rows:
                    break
                report.rows += len(rows)
                yield text_batch(_columns_of(rows, len(selected)), len(rows), schema, position_of, unit.uri)
            with self._errors(password, unit.uri, "reading"):
                stream.close()  # every row was read: nothing left to drain
        finally:
            _close(conn, stream, unit.uri)

    def _where_cursor(self, conn: Any, names: list[str], selected: list[tuple[str, int]], unit: SourceFile) -> str:
        """`` WHERE <cursor> >= <bound>`` for a cursor run with a committed mark, else nothing; the bound is escaped by
        the driver as it escapes query parameters (a zoned mark in UTC, the session's time zone)."""
        column = self._cursor_column(names, selected, unit)
        bound = self._cursor_bound(unit)
        if column is None or bound is None:
            return ""
        if isinstance(bound, datetime) and bound.tzinfo is not None:
            bound = bound.astimezone(timezone.utc).replace(tzinfo=None)
        return f" WHERE {_quoted(column)} >= {conn.escape(bound)}"

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
            _close(conn, None, uri)
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



def _close(conn: Any, stream: Any, uri: str) -> None:
    """Close the connection, which ends the read-only transaction (nothing to commit).

    A read that stopped early (a strict-mode failure, a dropped connection) leaves rows unsent: closing the socket
    drops them instead of draining the rest of the table, and the unbuffered result is marked finished so that
    PyMySQL's destructors do not try to read from the closed socket.
    """
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - the read's own outcome matters; the server ends the session anyway
        log.warning("could not close the connection to %s", uri)
    result = getattr(stream, "_result", None)
    if result is not None and getattr(result, "unbuffered_active", False):
        result.unbuffered_active = False
    if stream is not None:
        stream.connection = None


def _row_as_json(columns: list[tuple]) -> str:
    """SQL for one row as one JSON object of its columns' texts, ``{"c0": "...", "c1": null, ...}``.

    PyMySQL parses every field of every row in Python: one field a row instead of one a column makes the read 2-3x
    faster (docs/sources/mysql.md, "Speed"), and Arrow's JSON reader splits the objects into columns in C++. The
    server's JSON escaping keeps every text exactly (quotes, backslashes, line breaks, control characters).
    """
    return "JSON_OBJECT(" + ", ".join(f"'c{position}', {_as_text(c)}" for position, c in enumerate(columns)) + ")"


def _columns_of(rows: list[tuple[str]], count: int) -> list[pa.Array]:
    """The columns' texts of ``rows`` (each one JSON object from :func:`_row_as_json`), in the SELECT's order."""
    body = "\n".join([row[0] for row in rows]).encode()  # a JSON text holds no raw line break: one object a line
    table = pajson.read_json(
        io.BytesIO(body),
        read_options=pajson.ReadOptions(use_threads=False, block_size=len(body) + 1),
        parse_options=pajson.ParseOptions(
            explicit_schema=pa.schema([(f"c{position}", pa.string()) for position in range(count)]),
            unexpected_field_behavior="error",
        ),
    )
    if table.num_rows != len(rows):
        raise DatabaseSourceError(f"read {len(rows)} rows but decoded {table.num_rows}")
    return [column.combine_chunks() for column in table.columns]


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
