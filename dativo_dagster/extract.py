"""The CSV source under its former name: ``dativo_dagster.sources.csv`` re-exported for existing imports."""

from dativo_dagster.sources.base import PARSE_ERROR, RAW_RECORD, SOURCE_LINE, FileReport, SourceFile, text_schema
from dativo_dagster.sources.csv import (
    iter_source_batches,
    list_source_files,
    local_version,
    read_source_file,
    resolve_path,
    same_version,
)

__all__ = [
    "PARSE_ERROR",
    "RAW_RECORD",
    "SOURCE_LINE",
    "FileReport",
    "SourceFile",
    "iter_source_batches",
    "list_source_files",
    "local_version",
    "read_source_file",
    "resolve_path",
    "same_version",
    "text_schema",
]
