"""Cursor incremental for database sources (CONTRACT 7): the committed high-water mark, the boundary rows a run must
not load again, and the mark a run commits.

The mark lives where file versions live (the unit's entry in the source state of the snapshot summary / state file,
or of the commit marker with ``catalog: none``) as ``cursor:<value>``, so it is committed in the same atomic commit as
the rows it covers: a crash before the commit reads the same rows again, a crash after it never does.

A run reads the rows whose cursor is at or above ``mark - lookback``. Those at the boundary may be committed already
(the rows at the mark itself, and any in the lookback window): they are found by reading the committed rows of that
window (the branch's, filtered on the cursor column) and skipped by an anti-join on their key, the primary key and
the cursor value, or every spec column without a key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc

from dativo_dagster.parsing import parse_column
from dativo_dagster.sources.base import SourceFile
from dativo_dagster.spec import CursorIncremental, FieldSpec, LoadedSpec, WriteMode
from dativo_dagster.types import TypeKind

MARK_PREFIX = "cursor:"
CursorValue = int | date | datetime
# the key of a row, as one string: each column's text, backslashes doubled, the separator escaped, nulls marked
_SEPARATOR = "\x1f"
_NULL = "\\N"


def cursor_of(loaded: LoadedSpec) -> CursorIncremental | None:
    """The spec's cursor incremental, if it has one."""
    incremental = loaded.spec.source.incremental
    return incremental if isinstance(incremental, CursorIncremental) else None


def is_cursor_run(loaded: LoadedSpec) -> bool:
    """Whether the spec's runs read from a cursor's committed mark (``incremental: cursor`` with ``append`` or ``merge``)."""
    return cursor_of(loaded) is not None and loaded.spec.target.write_mode in (WriteMode.APPEND, WriteMode.MERGE)


def cursor_field(loaded: LoadedSpec) -> FieldSpec:
    """The spec field the cursor is on."""
    cursor = cursor_of(loaded)
    assert cursor is not None
    return next(f for f in loaded.spec.fields if f.name == cursor.cursor_field)


def format_mark(value: CursorValue) -> str:
    """The version text of a mark: ``cursor:`` and the value (ISO 8601 for dates and time stamps)."""
    return MARK_PREFIX + (value.isoformat() if isinstance(value, (date, datetime)) else str(int(value)))


def parse_mark(version: str | None, kind: TypeKind) -> CursorValue | None:
    """The mark a version text holds (None: no mark, the first run)."""
    if not version or not version.startswith(MARK_PREFIX):
        return None
    text = version[len(MARK_PREFIX):]
    if kind is TypeKind.INTEGER:
        return int(text)
    if kind is TypeKind.DATE:
        return date.fromisoformat(text)
    value = datetime.fromisoformat(text)
    return value.astimezone(timezone.utc) if kind is TypeKind.TIMESTAMPTZ else value.replace(tzinfo=None)


def lower_bound(loaded: LoadedSpec, mark: CursorValue | None) -> CursorValue | None:
    """The lowest cursor value a run reads: the mark less ``lookback_seconds`` (None: read every row)."""
    cursor = cursor_of(loaded)
    if mark is None or cursor is None:
        return None
    if isinstance(mark, datetime):
        return mark - timedelta(seconds=cursor.lookback_seconds)
    return mark


def key_columns(loaded: LoadedSpec) -> list[str]:
    """The columns that identify a committed row at the boundary: the primary key and the cursor, else every spec
    column."""
    cursor = cursor_field(loaded)
    key = loaded.spec.primary_key
    if key:
        return [*key, *([cursor.name] if cursor.name not in key else [])]
    return [f.name for f in loaded.spec.fields]


def row_keys(table: pa.Table | pa.RecordBatch, columns: Sequence[str]) -> pa.Array:
    """One string per row naming its values in ``columns``, equal exactly when the values are equal (nulls too)."""
    parts = []
    for name in columns:
        column = table.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        text = column.cast(pa.string())
        text = pc.replace_substring(text, "\\", "\\\\")
        text = pc.replace_substring(text, _SEPARATOR, "\\s")
        parts.append(pc.fill_null(text, _NULL))
    if not parts:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(*parts, _SEPARATOR) if len(parts) > 1 else parts[0]


@dataclass
class CursorRead:
    """One cursor run's boundary: the committed keys it skips, and the highest cursor value it read.

    Used by the validator stage of the stream (``pipeline.run_pipeline``): :meth:`observe` takes every validated
    batch and its rejects.
    """

    field: FieldSpec
    columns: list[str]
    committed: pa.Array  # the keys of the committed rows at or above the lower bound
    mark: CursorValue | None  # the committed mark (None: first run)
    highest: CursorValue | None = None  # the highest cursor value read this run, valid or rejected
    quarantined: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # keys of quarantined rows
    skipped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def skip_quarantined(self, batch: pa.RecordBatch, names: Sequence[str]) -> pa.RecordBatch:
        """A text batch less the rows the quarantine holds already (the same text: they would be rejected again).

        Their cursor values still count towards the new mark (they were read)."""
        if not len(self.quarantined) or not batch.num_rows:
            return batch
        seen = pc.is_in(row_keys(batch, names), value_set=self.quarantined)
        if not pc.any(seen).as_py():
            return batch
        again = batch.filter(seen)
        parsed = parse_column(again.column(self.field.name), self.field.type, null_values=(), required=True,
                              fmt=self.field.format)
        self._fold([pc.max(parsed.values).as_py()], again.num_rows)
        return batch.filter(pc.invert(seen))

    def _fold(self, highest: Sequence[CursorValue | None], skipped: int) -> None:
        with self._lock:
            for value in highest:
                if value is not None and (self.highest is None or value > self.highest):
                    self.highest = value
            self.skipped += skipped

    def observe(self, valid: pa.RecordBatch, rejects: pa.RecordBatch) -> pa.RecordBatch:
        """Fold the batch's cursor values into the new mark; return ``valid`` less the rows already committed."""
        values = [valid.column(self.field.name)]
        if rejects.num_rows:
            parsed = parse_column(rejects.column(self.field.name), self.field.type, null_values=(), required=True,
                                  fmt=self.field.format)
            values.append(parsed.values)
        highest = [pc.max(v).as_py() for v in values if len(v)]
        keep = valid
        if len(self.committed) and valid.num_rows:
            seen = pc.is_in(row_keys(valid, self.columns), value_set=self.committed)
            keep = valid.filter(pc.invert(seen))
        self._fold(highest, valid.num_rows - keep.num_rows)
        return keep

    @property
    def new_mark(self) -> CursorValue | None:
        """The mark to commit: the highest cursor value read, never below the committed mark."""
        if self.highest is None:
            return self.mark
        if self.mark is None:
            return self.highest
        return max(self.highest, self.mark)


def committed_in_window(
    loaded: LoadedSpec, bound: CursorValue, scan: Callable[[str, CursorValue, list[str]], pa.Table]
) -> pa.Array:
    """The keys of the committed rows whose cursor is at or above ``bound``; ``scan(column, bound, columns)`` reads
    them from the table (the branch, or the files that commit markers make visible)."""
    columns = key_columns(loaded)
    committed = scan(cursor_field(loaded).name, bound, columns)
    return pc.unique(row_keys(committed, columns)) if committed.num_rows else pa.array([], pa.string())


def iceberg_scan(table, branch: str) -> Callable[[str, CursorValue, list[str]], pa.Table]:  # noqa: ANN001 - pyiceberg Table
    """A scan of the committed rows at the head of ``branch`` with the cursor at or above a bound (pyiceberg filters
    the files by their statistics and the rows exactly)."""
    from pyiceberg.expressions import GreaterThanOrEqual  # noqa: PLC0415

    def scan(column: str, bound: CursorValue, columns: list[str]) -> pa.Table:
        head = table.snapshot_by_name(branch)
        if head is None:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        literal = bound.isoformat() if isinstance(bound, (date, datetime)) else bound
        return table.scan(
            row_filter=GreaterThanOrEqual(column, literal), selected_fields=tuple(columns), snapshot_id=head.snapshot_id
        ).to_arrow()

    return scan


def files_scan(uris: Sequence[str], s3) -> Callable[[str, CursorValue, list[str]], pa.Table]:  # noqa: ANN001
    """The same over the Parquet files that commit markers make visible (``catalog: none``)."""
    import pyarrow.dataset as ds  # noqa: PLC0415

    from dativo_dagster.storage import filesystem_for  # noqa: PLC0415

    def scan(column: str, bound: CursorValue, columns: list[str]) -> pa.Table:
        if not uris:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        fs, _ = filesystem_for(uris[0], s3)
        paths = [filesystem_for(uri, s3)[1] for uri in uris]
        dataset = ds.dataset(paths, format="parquet", filesystem=fs)
        value = pa.scalar(bound, dataset.schema.field(column).type)
        return dataset.to_table(columns=columns, filter=ds.field(column) >= value)

    return scan


def cursor_read(loaded: LoadedSpec, units: Sequence[SourceFile], catalog, location: str, rejects_location: str, s3,  # noqa: ANN001
                table=None) -> CursorRead:  # noqa: ANN001 - pyiceberg Table
    """The boundary of a cursor run over ``units`` (at their committed marks): the keys of the rows the branch holds
    at or above the lower bound, and of the rows its quarantine holds from these units (as text).

    ``catalog``: the Iceberg catalog (the branch's tables), or None for ``catalog: none`` (the files that commit
    markers under ``location`` / ``rejects_location`` make visible). ``table``: the data table as the caller loaded
    it (else it is loaded here).
    """
    from dativo_dagster.markers import committed_files  # noqa: PLC0415

    spec = loaded.spec
    field_spec = cursor_field(loaded)
    columns = key_columns(loaded)
    marks = [parse_mark(unit.version, field_spec.type.kind) for unit in units]
    mark = max((m for m in marks if m is not None), default=None)
    bound = lower_bound(loaded, mark)
    committed = quarantined = pa.array([], pa.string())
    if bound is None:  # a first run: nothing committed to skip
        return CursorRead(field_spec, columns, committed, mark)
    names = [f.name for f in spec.fields]
    uris = [unit.uri for unit in units]
    if catalog is not None:
        from pyiceberg.exceptions import NoSuchTableError  # noqa: PLC0415

        if table is None:
            table = catalog.load_table(".".join(spec.table_identifier))
        committed = committed_in_window(loaded, bound, iceberg_scan(table, spec.branch))
        try:  # one load (pyiceberg's table_exists is a load too)
            reject_table = catalog.load_table(".".join(spec.rejects_identifier))
        except NoSuchTableError:
            reject_table = None
        if reject_table is not None:
            rejects = _iceberg_rows_of(reject_table, spec.branch, uris, names)
            quarantined = pc.unique(row_keys(rejects, names)) if rejects.num_rows else quarantined
    else:
        committed = committed_in_window(loaded, bound, files_scan(committed_files(location, s3), s3))
        rejects = _file_rows_of(committed_files(rejects_location, s3), s3, uris, names)
        quarantined = pc.unique(row_keys(rejects, names)) if rejects.num_rows else quarantined
    return CursorRead(field_spec, columns, committed, mark, quarantined=quarantined)


def _iceberg_rows_of(table, branch: str, uris: list[str], names: list[str]) -> pa.Table:  # noqa: ANN001
    """The quarantined rows of ``uris`` at the head of ``branch`` (their spec columns, as text)."""
    from pyiceberg.expressions import In  # noqa: PLC0415

    from dativo_dagster.table_schema import SOURCE_FILE  # noqa: PLC0415

    head = table.snapshot_by_name(branch)
    if head is None:
        return pa.table({n: pa.array([], pa.string()) for n in names})
    return table.scan(row_filter=In(SOURCE_FILE, uris), selected_fields=tuple(names),
                      snapshot_id=head.snapshot_id).to_arrow()


def _file_rows_of(files: Sequence[str], s3, uris: list[str], names: list[str]) -> pa.Table:  # noqa: ANN001
    import pyarrow.dataset as ds  # noqa: PLC0415

    from dativo_dagster.storage import filesystem_for  # noqa: PLC0415
    from dativo_dagster.table_schema import SOURCE_FILE  # noqa: PLC0415

    if not files:
        return pa.table({n: pa.array([], pa.string()) for n in names})
    fs, _ = filesystem_for(files[0], s3)
    dataset = ds.dataset([filesystem_for(f, s3)[1] for f in files], format="parquet", filesystem=fs)
    return dataset.to_table(columns=names, filter=ds.field(SOURCE_FILE).isin(uris))


def cursor_run_found_nothing(units: Sequence[SourceFile], outcome) -> bool:  # noqa: ANN001 - a PipelineOutcome
    """Whether a cursor run read no row past what the branch holds and its mark did not move."""
    return outcome.validation.rows_read == 0 and all(
        outcome.cursor_marks.get(unit.uri, unit.version) == unit.version for unit in units
    )


def units_with_marks(units: Sequence[SourceFile], committed: Mapping[str, str]) -> list[SourceFile]:
    """The source's units, each at the mark the branch has committed for it (no mark: a first run)."""
    return [replace(unit, version=committed.get(unit.uri, "")) for unit in units]


__all__ = [
    "CursorRead",
    "committed_in_window",
    "cursor_field",
    "cursor_of",
    "cursor_read",
    "cursor_run_found_nothing",
    "format_mark",
    "is_cursor_run",
    "key_columns",
    "lower_bound",
    "parse_mark",
    "row_keys",
    "units_with_marks",
]
