"""Sources: one module per kind (``csv``, ``postgres``, ``mysql``), all behind :class:`Source` (base.py)."""

from __future__ import annotations

from dativo_dagster.sources.base import FileReport, Source, SourceFile, SourceUnit, text_schema
from dativo_dagster.spec import LoadedSpec
from dativo_dagster.storage import S3Settings


def source_for(loaded: LoadedSpec, s3: S3Settings) -> Source:
    """The source a spec reads from, by its ``source.type``."""
    kind = loaded.spec.source.type
    if kind == "csv":
        from dativo_dagster.sources.csv import CsvSource  # noqa: PLC0415 - a kind's module loads when used

        return CsvSource(loaded, s3)
    if kind == "mysql":
        from dativo_dagster.sources.mysql import MySQLSource  # noqa: PLC0415 - its driver loads only when used

        return MySQLSource(loaded)
    from dativo_dagster.sources.postgres import PostgresSource  # noqa: PLC0415 - its driver loads only when used

    return PostgresSource(loaded)


__all__ = ["FileReport", "Source", "SourceFile", "SourceUnit", "source_for", "text_schema"]
