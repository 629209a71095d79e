"""What every source kind shares: the units a run reads at their versions, and the text batches it streams."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from dativo_dagster.spec import FieldSpec
from dativo_dagster.table_schema import REPEATED_TYPE, SOURCE_FILE

SOURCE_LINE = "_source_line"
PARSE_ERROR = "_parse_error"
RAW_RECORD = "_raw_record"


@dataclass(frozen=True, order=True)
class SourceFile:
    """One source file as listed: its URI and the version that identifies its content."""

    uri: str
    size: int
    version: str  # local: "<mtime in ns>:<size in bytes>" (``local_version``); S3: ETag
    modified_ns: int = 0  # last modification, nanoseconds since the epoch (0: unknown)


def local_version(mtime_ns: int, size: int) -> str:
    """A local file's version: its modification time and its size (CONTRACT 5).

    The size catches a rewrite that put the old modification time back (``cp -p``, ``rsync -t``, ``touch -r``)
    when the length changed; a same-length rewrite with the old time is not seen.
    """
    return f"{mtime_ns}:{size}"


def same_version(committed: str, listed: str) -> bool:
    """Whether a listed version is the one committed.

    Releases before sizes were recorded committed a local file's modification time alone (digits only; ETags are
    quoted hex): such a version matches the same modification time at any size, so an upgrade reads nothing again.
    The file's next commit records the full version.
    """
    if committed == listed:
        return True
    mtime, sep, _ = listed.partition(":")
    return bool(sep) and committed.isdigit() and committed == mtime


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
            pa.field(SOURCE_FILE, REPEATED_TYPE),  # a batch's rows come from one file
            pa.field(SOURCE_LINE, pa.int64()),
            pa.field(PARSE_ERROR, pa.string()),
            pa.field(RAW_RECORD, pa.string()),
        ]
    )


SourceUnit = SourceFile  # a source unit: a file, or a database table or query (its URI without credentials)


class Source(Protocol):
    """One kind of source, bound to a spec: what a run would read, and the stream of what it reads.

    ``read`` yields batches in :func:`text_schema`: every spec column as text (null where the source holds a
    null), ``_source_file`` (the unit's URI), ``_source_line`` (the physical line where there is one, else null),
    ``_parse_error`` and ``_raw_record`` (for records that could not be split into fields). Validation parses
    the text by the rules of CONTRACT section 2, whatever the kind.
    """

    null_values: Sequence[str]  # texts that mean null (CSV's null_values; databases have real nulls only)

    def list_units(self) -> list[SourceUnit]:
        """What a run would read, each unit at its version."""
        ...

    def read(self, units: Sequence[SourceUnit], reports: list[FileReport]) -> Iterator[pa.RecordBatch]:
        """Stream ``units`` in order; appends one :class:`FileReport` per unit to ``reports``."""
        ...


class DuplicateColumnError(ValueError):
    """A spec column's name matches several source columns (``columns``: their 1-based positions and names)."""

    def __init__(self, name: str, columns: str):
        self.name = name
        self.columns = columns
        super().__init__(f"{name!r} names more than one source column: columns {columns}")


def match_columns(names: Sequence[str], fields: Sequence[FieldSpec]) -> tuple[dict[str, int], list[str], list[str]]:
    """Spec column -> index of the source column of that name: the exact name, else the only case-insensitive match.

    Returns the mapping, the spec columns the source lacks, and the source columns not in the spec.

    Raises:
        DuplicateColumnError: a spec column matches several source columns.
    """
    exact: dict[str, list[int]] = {}
    folded: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        exact.setdefault(name.strip(), []).append(i)
        folded.setdefault(name.strip().casefold(), []).append(i)
    mapping: dict[str, int] = {}
    missing: list[str] = []
    for f in fields:
        idx = exact.get(f.name) or folded.get(f.name.casefold())
        if not idx:
            missing.append(f.name)
            continue
        if len(idx) > 1:
            raise DuplicateColumnError(f.name, ", ".join(f"{i + 1} ({names[i].strip()!r})" for i in idx))
        mapping[f.name] = idx[0]
    used = set(mapping.values())
    return mapping, missing, [name for i, name in enumerate(names) if i not in used]
