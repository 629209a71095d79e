"""Validate: text batches become typed rows or rejected rows with their reasons (CONTRACT section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from dativo_dagster.sources.base import PARSE_ERROR, RAW_RECORD, SOURCE_LINE
from dativo_dagster.table_schema import SOURCE_FILE
from dativo_dagster.parsing import parse_column
from dativo_dagster.spec import FieldSpec
from dativo_dagster.table_schema import REPEATED_TYPE

REJECT_REASON = "_reject_reason"
if TYPE_CHECKING:
    from dativo_dagster.partitions import PartitionWindow

UNPARSEABLE = "unparseable_record"
OUT_OF_PARTITION = "out_of_partition"  # a partition's run: the partition field falls outside its window
MAX_EXAMPLES = 3
MAX_EXAMPLE_CHARS = 200  # examples go into failure messages and check metadata; the rejects table keeps all


class RejectExample(BaseModel):
    """One failing value with where it came from.

    A value of a field classified PII (or the raw text of a record that holds one) is never kept here: the
    example has ``withheld`` set and only the value's length, since examples go into failure messages, check
    metadata and logs. The rejects table keeps the record as written.
    """

    file: str
    line: int | None  # None for a source without lines (a database table or query)
    value: str | None
    withheld: bool = False
    length: int | None = None  # characters of a withheld value

    def place(self) -> str:
        """Where the value came from: ``file, line N``, or the source alone when it has no lines."""
        return self.file if self.line is None else f"{self.file}, line {self.line}"

    def shown(self) -> str:
        """The value as messages show it: quoted, or that a PII value was withheld."""
        if self.withheld:
            return f"PII value withheld, {self.length:,} characters"
        return repr(self.value)


class FieldErrors(BaseModel):
    """How often one field failed with one kind of error, with the first examples."""

    field: str
    kind: str
    count: int = 0
    examples: list[RejectExample] = Field(default_factory=list)


class ValidationReport(BaseModel):
    """The outcome of validating a whole run's rows."""

    rows_read: int = 0
    rows_valid: int = 0
    rows_rejected: int = 0
    errors: list[FieldErrors] = Field(default_factory=list)

    def add(self, other: BatchTally) -> None:
        """Fold one batch's tally into the report."""
        self.rows_read += other.rows_read
        self.rows_valid += other.rows_valid
        self.rows_rejected += other.rows_rejected
        index = {(e.field, e.kind): e for e in self.errors}
        for (field, kind), (count, examples) in other.errors.items():
            entry = index.get((field, kind))
            if entry is None:
                entry = FieldErrors(field=field, kind=kind)
                self.errors.append(entry)
                index[(field, kind)] = entry
            entry.count += count
            room = MAX_EXAMPLES - len(entry.examples)
            entry.examples.extend(examples[:room])

    def describe(self, limit: int = 50) -> str:
        """Human-readable lines: one per failing field and error kind, with examples."""
        lines = [f"{self.rows_rejected} of {self.rows_read} rows are invalid:"]
        for entry in sorted(self.errors, key=lambda e: (-e.count, e.field, e.kind))[:limit]:
            shown = "; ".join(f"{ex.place()}: {ex.shown()}" for ex in entry.examples)
            lines.append(f"  {entry.field}: {entry.kind} x{entry.count} (e.g. {shown})")
        return "\n".join(lines)


@dataclass
class BatchTally:
    rows_read: int
    rows_valid: int
    rows_rejected: int
    errors: dict[tuple[str, str], tuple[int, list[RejectExample]]]


def typed_schema(fields: Sequence[FieldSpec]) -> pa.Schema:
    """Schema of validated batches: the spec's typed columns, then the source file."""
    return pa.schema(
        [pa.field(f.name, f.type.arrow_type) for f in fields] + [pa.field(SOURCE_FILE, REPEATED_TYPE)]
    )


def rejects_schema(fields: Sequence[FieldSpec]) -> pa.Schema:
    """Schema of rejected rows: every spec column as its original text, the reason and the place."""
    return pa.schema(
        [pa.field(f.name, pa.string()) for f in fields]
        + [
            pa.field(REJECT_REASON, pa.string()),
            pa.field(SOURCE_FILE, REPEATED_TYPE),
            pa.field(SOURCE_LINE, pa.int64()),
            pa.field(RAW_RECORD, pa.string()),
        ]
    )


def validate_batch(
    batch: pa.RecordBatch,
    fields: Sequence[FieldSpec],
    null_values: Sequence[str],
    window: PartitionWindow | None = None,
) -> tuple[pa.RecordBatch, pa.RecordBatch, BatchTally]:
    """Parse every column of a text batch at once; split it into valid typed rows and rejects.

    ``null_values`` are the texts that mean null (the source's: CSV options, none for a database); a null cell is
    null whatever they are. With a partition ``window`` a row whose partition field falls outside it is invalid
    (``out_of_partition``).
    """
    n = batch.num_rows
    parse_error = batch.column(PARSE_ERROR)
    unparseable = parse_error.is_valid()
    any_unparseable = parse_error.null_count < n
    invalid = unparseable
    reasons = _prefixed(UNPARSEABLE, parse_error) if any_unparseable else None
    typed: list[pa.Array] = []
    tally: dict[tuple[str, str], tuple[int, list[RejectExample]]] = {}
    parsed_ok = pc.invert(unparseable) if any_unparseable else None
    for f in fields:
        text = batch.column(f.name)
        parsed = parse_column(text, f.type, null_values=null_values, required=f.required, fmt=f.format)
        typed.append(parsed.values)
        if parsed.errors.null_count == n:
            continue  # the common case: every cell of the column is fine
        # an unparseable record's cells are not judged one by one: the record is rejected as a whole
        errors = parsed.errors if parsed_ok is None else pc.if_else(parsed_ok, parsed.errors, pa.nulls(n, pa.string()))
        has_error = errors.is_valid()
        if pc.any(has_error).as_py():
            invalid = pc.or_(invalid, has_error)
            prefixed = _prefixed(f.name, errors)
            reasons = prefixed if reasons is None else _join_reasons(reasons, prefixed)
            _tally_field(tally, f.name, errors, text, batch, withheld=f.is_pii)
    if window is not None:
        index = next(i for i, f in enumerate(fields) if f.name == window.field)
        outside = window.outside(typed[index])
        if pc.any(outside).as_py():
            field = fields[index]
            errors = pc.if_else(outside, OUT_OF_PARTITION, pa.nulls(n, pa.string()))
            invalid = pc.or_(invalid, outside)
            prefixed = _prefixed(field.name, errors)
            reasons = prefixed if reasons is None else _join_reasons(reasons, prefixed)
            _tally_field(tally, field.name, errors, batch.column(field.name), batch, withheld=field.is_pii)
    if any_unparseable:
        # the raw text holds every field's value, so it is withheld when any field is PII
        _tally_field(
            tally,
            "(record)",
            pc.if_else(unparseable, UNPARSEABLE, None),
            batch.column(RAW_RECORD),
            batch,
            withheld=any(f.is_pii for f in fields),
        )
    typed.append(batch.column(SOURCE_FILE))
    valid = pa.RecordBatch.from_arrays(typed, schema=typed_schema(fields))
    if reasons is not None:
        valid = valid.filter(pc.invert(invalid))
    rejected_count = n - valid.num_rows
    if rejected_count and reasons is not None:
        columns = [batch.column(f.name) for f in fields] + [
            reasons,
            batch.column(SOURCE_FILE),
            batch.column(SOURCE_LINE),
            batch.column(RAW_RECORD),
        ]
        rejects = pa.RecordBatch.from_arrays(columns, schema=rejects_schema(fields)).filter(invalid)
    else:
        rejects = pa.RecordBatch.from_pylist([], schema=rejects_schema(fields))
    return valid, rejects, BatchTally(n, valid.num_rows, rejected_count, tally)


def _prefixed(name: str, errors: pa.Array) -> pa.Array:
    """``name: error`` where there is an error, else null."""
    return pc.binary_join_element_wise(pa.repeat(name, len(errors)), errors, ": ")


def _join_reasons(left: pa.Array, right: pa.Array) -> pa.Array:
    # binary_join_element_wise(null_handling="skip") drops rows in pyarrow 26, so nulls are merged by hand
    both = pc.binary_join_element_wise(left, right, "; ")
    return pc.coalesce(both, left, right)


def _tally_field(
    tally: dict[tuple[str, str], tuple[int, list[RejectExample]]],
    field: str,
    errors: pa.Array,
    text: pa.Array,
    batch: pa.RecordBatch,
    *,
    withheld: bool,
) -> None:
    counts = pc.value_counts(pc.drop_null(errors))
    for item in counts.to_pylist():
        kind, count = item["values"], item["counts"]
        idx = pc.indices_nonzero(pc.equal(errors, kind).fill_null(False))
        first = idx.slice(0, MAX_EXAMPLES)
        files = batch.column(SOURCE_FILE).take(first).to_pylist()
        lines = batch.column(SOURCE_LINE).take(first).to_pylist()
        if withheld:
            # only the lengths leave the batch: a PII value never reaches a message, metadata or log
            lengths = pc.utf8_length(text.take(first)).to_pylist()
            examples = [
                RejectExample(file=f, line=ln, value=None, withheld=n is not None, length=n)
                for f, ln, n in zip(files, lines, lengths)
            ]
        else:
            values = text.take(first).to_pylist()
            examples = [RejectExample(file=f, line=ln, value=_shortened(v)) for f, ln, v in zip(files, lines, values)]
        old_count, old_examples = tally.get((field, kind), (0, []))
        tally[(field, kind)] = (old_count + count, (old_examples + examples)[:MAX_EXAMPLES])


def _shortened(value: str | None) -> str | None:
    """An example value short enough for a message: the start, and how long it was."""
    if value is None or len(value) <= MAX_EXAMPLE_CHARS:
        return value
    return f"{value[:MAX_EXAMPLE_CHARS]}... ({len(value):,} characters)"
