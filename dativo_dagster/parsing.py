"""Vectorised conversion of CSV text columns into typed Arrow arrays (CONTRACT section 2)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dativo_dagster.layouts import REST, directives, layout_pattern, layout_problems
from dativo_dagster.types import ColumnType, TypeKind


class ErrorKind(str, enum.Enum):  # noqa: UP042 - same base as TypeKind: str() keeps the Enum form
    """Why one cell of a column was rejected."""

    MISSING_REQUIRED = "missing_required"
    INVALID_INTEGER = "invalid_integer"
    INVALID_FLOAT = "invalid_float"
    INVALID_BOOLEAN = "invalid_boolean"
    INVALID_DATE = "invalid_date"
    INVALID_TIMESTAMP = "invalid_timestamp"
    INVALID_TIMESTAMPTZ = "invalid_timestamptz"
    INVALID_DECIMAL = "invalid_decimal"
    OUT_OF_RANGE = "out_of_range"


@dataclass(frozen=True)
class ParsedColumn:
    """Typed values of a column and, per row, the reason it was rejected (null when fine)."""

    values: pa.Array
    errors: pa.Array


DEFAULT_NULL_VALUES = ("", "NULL", "null", "None")
TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")
FALSE_WORDS = ("false", "f", "no", "n", "off", "0")

_BLANKS = " \t"
_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,6})?)?"
_OFFSET = r"(?:Z|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)"

_INTEGER_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$|^[+-]?(?i:nan|inf|infinity)$"
_DECIMAL_RE = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$"
_DATE_RE = f"^{_DATE}(?:[T ]00:00(?::00(?:\\.0{{1,6}})?)?)?$"
_TIMESTAMP_RE = f"^{_DATE}[T ]{_TIME}$"
_TIMESTAMPTZ_RE = f"^{_DATE}[T ]{_TIME}{_OFFSET}?$"
# Only meaningful on text that already matched _TIMESTAMPTZ_RE: the date's own dashes never end the text.
_OFFSET_TAIL_RE = r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)$"

_INT64_MAX_DIGITS = "9223372036854775807"
_INT64_MIN_DIGITS = "9223372036854775808"
_EPOCH = datetime(1970, 1, 1)
_ONE_US = timedelta(microseconds=1)
# Python's datetime range: values outside it could not be read back by any Python consumer.
_MIN_US = (datetime(1, 1, 1) - _EPOCH) // _ONE_US
_MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999999) - _EPOCH) // _ONE_US
_MIN_DAY = (datetime(1, 1, 1) - _EPOCH).days
_MAX_DAY = (datetime(9999, 12, 31) - _EPOCH).days

# The smallest normal double (sys.float_info.min): below it a double keeps fewer than 53 significant bits.
_FLOAT_MIN_NORMAL = 2.2250738585072014e-308

_TS = pa.timestamp("us")
_TSTZ = pa.timestamp("us", tz="UTC")

_FORMAT_KINDS = (TypeKind.DATE, TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ)

_Checks = list[tuple[pa.Array, ErrorKind]]
# A parser gets the non-null cells to convert, the type, the layout and the bytes of the column's cells (the
# null ones included): the bytes only choose between a fast and a slow path, so having more is safe.
_Parser = Callable[[pa.Array, ColumnType, str | None, bytes], tuple[pa.Array, _Checks]]


def parse_column(
    text: pa.Array | pa.ChunkedArray,
    column_type: ColumnType,
    *,
    null_values: Sequence[str] = DEFAULT_NULL_VALUES,
    required: bool = False,
    fmt: str | None = None,
) -> ParsedColumn:
    """Convert a text column into ``column_type.arrow_type``, recording a reason for every rejected row.

    Args:
        text: String (or large string) cells as read from the source; nulls are treated as null cells.
        column_type: The spec type of the column.
        null_values: Texts that mean null; compared verbatim for strings, after trimming spaces and tabs
            (on both sides of the comparison) for every other type.
        required: Whether a null cell is an error (``missing_required``).
        fmt: strptime-style layout for date, timestamp and timestamptz text; replaces ISO 8601 parsing.

    Returns:
        A ParsedColumn whose ``values`` are null where the cell is null or rejected and whose ``errors``
        hold the ErrorKind value of rejected rows.

    Raises:
        ValueError: ``fmt`` was given for a type that does not take one, or has an offset directive
            (``%z``/``%Z``) for a type without time zone.
        TypeError: ``text`` is not a string column.
    """
    if fmt is not None:
        if column_type.kind not in _FORMAT_KINDS:
            raise ValueError(f"format {fmt!r} only applies to date, timestamp and timestamptz, not {column_type}")
        problems = layout_problems(fmt, zoned=column_type.kind is TypeKind.TIMESTAMPTZ)
        if problems:
            raise ValueError(f"format {fmt!r}: {'; '.join(problems)}")
    if isinstance(text, pa.ChunkedArray):
        chunks = text.chunks or [pa.array([], pa.string())]
        parts = [_parse_array(chunk, column_type, null_values, required, fmt) for chunk in chunks]
        if len(parts) == 1:
            return parts[0]
        return ParsedColumn(
            pa.concat_arrays([part.values for part in parts]),
            pa.concat_arrays([part.errors for part in parts]),
        )
    return _parse_array(text, column_type, null_values, required, fmt)


def _parse_array(
    text: pa.Array, column_type: ColumnType, null_values: Sequence[str], required: bool, fmt: str | None
) -> ParsedColumn:
    text = _as_string(text)
    kind = column_type.kind
    blob = _text_bytes(text)  # the one copy of the cells' bytes, searched by the cheap checks below
    if kind is TypeKind.STRING:
        null = _null_mask(text, null_values, blob)
        values = text if null is None else _keep(text, pc.invert(null))
        checks: _Checks = []
    else:
        trimmed = text
        if _contains(blob, _BLANKS.encode()):
            trimmed = pc.ascii_trim(text, characters=_BLANKS)
            blob = _text_bytes(trimmed)
        null = _null_mask(trimmed, [value.strip(_BLANKS) for value in null_values], blob)
        work = trimmed if null is None else _keep(trimmed, pc.invert(null))
        values, checks = _PARSERS[kind](work, column_type, fmt, blob)
    if required and null is not None:
        checks.insert(0, (null, ErrorKind.MISSING_REQUIRED))
    return ParsedColumn(values, _errors(len(text), checks))


def _as_string(text: pa.Array) -> pa.Array:
    if pa.types.is_string(text.type):
        return text
    if pa.types.is_large_string(text.type) or pa.types.is_null(text.type):
        return text.cast(pa.string())
    raise TypeError(f"expected a string column, got {text.type}")


def _null_mask(text: pa.Array, null_values: Sequence[str], blob: bytes) -> pa.Array | None:
    """Cells that are null or spell one of ``null_values`` exactly; None when there are none (the usual column).

    Cheap tests come first: a column whose bytes (``blob``) lack the first character of every non-empty null text
    (a memchr scan; numbers, dates and booleans rarely hold one) needs no lookup, and otherwise only the cells
    of a null text's length are compared. Empty cells are found from the offsets alone.
    """
    mask = pc.is_null(text) if text.null_count else None
    n = len(text)
    if n == 0 or not null_values:
        return mask
    _, _, lengths = _cell_bytes(text)
    hit = lengths == 0 if "" in null_values else None
    tokens = [value for value in null_values if value]
    if tokens and any(blob.find(token.encode()[:1]) >= 0 for token in tokens):
        sizes = {len(token.encode()) for token in tokens}
        candidates = None
        for size in sizes:
            same = lengths == size
            candidates = same if candidates is None else candidates | same
        rows = np.flatnonzero(candidates)
        if len(rows):
            found = pc.is_in(pc.take(text, pa.array(rows)), value_set=pa.array(tokens, pa.string()))
            matched = rows[found.to_numpy(zero_copy_only=False)]
            if len(matched):
                hit = np.zeros(n, dtype=bool) if hit is None else hit
                hit[matched] = True
    if hit is not None and hit.any():
        mask = pa.array(hit) if mask is None else pc.or_(mask, pa.array(hit))
    return mask


def _errors(length: int, checks: _Checks) -> pa.Array:
    """Combine row masks into one error column; earlier checks win."""
    errors = None
    for mask, kind in reversed(checks):
        rows = pc.fill_null(mask, False) if mask.null_count else mask
        if _any(rows):
            errors = pc.if_else(rows, kind.value, errors if errors is not None else pa.nulls(length, pa.string()))
    return errors if errors is not None else pa.nulls(length, pa.string())


def _cell_bytes(text: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The data buffer as bytes (numpy, no copy) and each cell's start in it and length."""
    _, offsets, data = text.buffers()
    n = len(text)
    if n == 0 or offsets is None or data is None:
        return np.zeros(0, np.uint8), np.zeros(n, np.int32), np.zeros(n, np.int32)
    bounds = np.frombuffer(offsets, dtype=np.int32, count=n + 1, offset=text.offset * 4)
    return np.frombuffer(data, dtype=np.uint8), bounds[:-1], bounds[1:] - bounds[:-1]


def _span(text: pa.Array) -> np.ndarray:
    """The raw characters of all cells, back to back (numpy, no copy; a null's bytes included, normally none)."""
    data, starts, lengths = _cell_bytes(text)
    return data[starts[0] : starts[-1] + lengths[-1]] if len(starts) else data[:0]


def _text_bytes(text: pa.Array) -> bytes:
    """:func:`_span` as bytes: scanning it (memchr) is far cheaper than a per-row kernel; it only ever chooses
    between a fast and a slow path."""
    return _span(text).tobytes()


def _contains(blob: bytes, chars: bytes) -> bool:
    """Whether any of the bytes ``chars`` occurs in ``blob``."""
    return any(blob.find(chars[i : i + 1]) >= 0 for i in range(len(chars)))


def _any(mask: pa.Array) -> bool:
    return mask.true_count > 0  # counted in place, no kernel call


def _keep(values: pa.Array, mask: pa.Array) -> pa.Array:
    """Values where mask is true, null elsewhere (and where mask is null)."""
    return pc.if_else(mask, values, pa.scalar(None, values.type))


def _rejected(work: pa.Array, ok: pa.Array) -> pa.Array:
    """Non-null cells whose check failed."""
    return pc.and_(pc.is_valid(work), pc.invert(pc.fill_null(ok, False)))


def _try_cast(text: pa.Array, target: pa.DataType) -> pa.Array | None:
    """The cast, or None when Arrow refuses any row."""
    try:
        # A refused row costs Arrow about a microsecond and it reads on after the first: probe a prefix so a
        # column of junk fails fast. A refused prefix dooms the whole cast anyway.
        if len(text) > 4096:
            pc.cast(text.slice(0, 1024), target)
        return pc.cast(text, target)
    except pa.ArrowInvalid:
        return None


# Each parser first tries Arrow's cast on the whole batch. Arrow's parsers accept a little more than the
# contract (found by fuzzing against the regexes below, and pinned by the tests): hex integers '0x1f', 'nan(...)'
# floats, exponents in decimals, date-only and hour-only timestamps. A fast path is taken only when a cheap
# check rules those out; otherwise, and whenever the cast refuses the batch, the regex path decides row by row.
# The cheap checks also keep a cast that is bound to fail on most rows (a layout for the slow path) from running.


def _parse_integer(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
    if not _contains(blob, b"xX+"):
        values = _try_cast(work, pa.int64())
        if values is not None:
            return values, []
    ok = pc.match_substring_regex(work, _INTEGER_RE)
    bad = _rejected(work, ok)
    src = _keep(work, ok) if _any(bad) else work
    if _any(pc.starts_with(src, "+")):
        # Arrow's cast refuses an explicit plus sign.
        src = pc.ascii_ltrim(src, characters="+")
    checks: _Checks = [(bad, ErrorKind.INVALID_INTEGER)]
    values = _try_cast(src, pa.int64())
    if values is not None:
        return values, checks
    # The regex admits any number of digits, so the cast can only have failed on int64 overflow.
    over = _int64_overflow(src)
    return pc.cast(_keep(src, pc.invert(over)), pa.int64()), [*checks, (over, ErrorKind.OUT_OF_RANGE)]


def _int64_overflow(src: pa.Array) -> pa.Array:
    digits = pc.ascii_ltrim(pc.ascii_ltrim(src, characters="+-"), characters="0")
    length = pc.binary_length(digits)
    limit = pc.if_else(pc.starts_with(src, "-"), _INT64_MIN_DIGITS, _INT64_MAX_DIGITS)
    # Equal-length digit strings compare like the numbers they spell.
    over = pc.or_(pc.greater(length, 19), pc.and_(pc.equal(length, 19), pc.greater(digits, limit)))
    return pc.fill_null(over, False)


def _parse_float(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
    values = None if _contains(blob, b"(") else _try_cast(work, pa.float64())
    checks: _Checks = []
    if values is None:
        ok = pc.match_substring_regex(work, _FLOAT_RE)
        bad = _rejected(work, ok)
        checks.append((bad, ErrorKind.INVALID_FLOAT))
        values = pc.cast(_keep(work, ok), pa.float64())
    infinite = pc.is_inf(values)
    if _any(infinite):
        # A finite literal such as 1e400 overflows to infinity: that would silently change the value.
        over = pc.and_(infinite, pc.invert(pc.match_substring(work, "inf", ignore_case=True)))
        if _any(over):
            values = _keep(values, pc.invert(over))
            checks.append((over, ErrorKind.OUT_OF_RANGE))
    tiny = pc.less(pc.abs(values), _FLOAT_MIN_NORMAL)
    if _any(tiny):
        under = _float_underflow(work, values, tiny)
        if under is not None:
            values = _keep(values, pc.invert(under))
            checks.append((under, ErrorKind.OUT_OF_RANGE))
    return values, checks


def _float_underflow(work: pa.Array, values: pa.Array, tiny: pa.Array) -> pa.Array | None:
    """Rows whose number lies below the smallest normal double, or None when there are none.

    A subnormal result keeps fewer than 53 significant bits, and a non-zero text such as 1e-400 becomes 0.0:
    either would silently change the value, like an overflow. Zero written as zero (0, -0.0, 0e-999) is fine.
    ``tiny``: rows whose absolute value is below the smallest normal double (zeros included).
    """
    zero = pc.equal(values, 0.0)
    under = pc.and_(tiny, pc.invert(zero))
    if _any(pc.and_(tiny, zero)):
        rows = pc.indices_nonzero(pc.fill_null(zero, False))
        # only the zero rows' text is searched: a digit 1-9 before the exponent means a non-zero number
        rounded = pc.match_substring_regex(pc.take(work, rows), r"^[+-]?[0.]*[1-9]")
        if _any(rounded):
            flags = np.zeros(len(values), dtype=bool)
            flags[rows.to_numpy()[rounded.to_numpy(zero_copy_only=False)]] = True
            under = pc.or_(under, pa.array(flags))
    under = pc.fill_null(under, False)
    return under if _any(under) else None


def _parse_boolean(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
    index = pc.index_in(pc.ascii_lower(work), value_set=pa.array(TRUE_WORDS + FALSE_WORDS))
    values = pc.less(index, len(TRUE_WORDS))
    return values, [(pc.and_(pc.is_valid(work), pc.is_null(index)), ErrorKind.INVALID_BOOLEAN)]


def _parse_decimal(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
    target = column_type.arrow_type
    if not _contains(blob, b"eE"):
        # Arrow refuses digits it would have to drop but takes '1.50' for scale 1, so count fraction digits.
        values = _try_cast(work, target)
        if values is not None and _max_fraction_digits(work, blob) <= column_type.scale:
            return values, []
    fits = pc.match_substring_regex(work, _decimal_fit_re(column_type.precision, column_type.scale))
    syntax = pc.match_substring_regex(work, _DECIMAL_RE)
    bad = _rejected(work, syntax)
    over = pc.and_(pc.fill_null(syntax, False), pc.invert(pc.fill_null(fits, False)))
    # Digit counts are the regex's job: the cast refuses a whole batch over one long row and takes '1.50' at scale 1.
    values = pc.cast(_keep(work, fits), target)
    return values, [(bad, ErrorKind.INVALID_DECIMAL), (over, ErrorKind.OUT_OF_RANGE)]


def _max_fraction_digits(work: pa.Array, blob: bytes) -> int:
    if not _contains(blob, b"."):
        return 0
    point = pc.find_substring(work, ".")
    digits = pc.subtract(pc.subtract(pc.binary_length(work), point), 1)
    return pc.max(pc.if_else(pc.less(point, 0), 0, digits)).as_py() or 0


def _decimal_fit_re(precision: int, scale: int) -> str:
    """Regex for decimal text with at most precision-scale integer digits (leading zeros aside), at most
    scale fraction digits, and at least one digit."""
    whole = precision - scale
    integer_part = f"0*[0-9]{{1,{whole}}}" if whole else "0+"
    options = [f"[+-]?{integer_part}(?:\\.[0-9]{{0,{scale}}})?"]
    if scale:
        options.append(f"[+-]?\\.[0-9]{{1,{scale}}}")
    return "|".join(f"^{option}$" for option in options)


def _parse_date(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
    if fmt is not None:
        stamps, bad = _strptime(work, fmt)
        midnight = pc.equal(stamps, pc.floor_temporal(stamps, unit="day"))
        not_midnight = pc.and_(pc.is_valid(stamps), pc.invert(pc.fill_null(midnight, False)))
        if _any(not_midnight):
            stamps = _keep(stamps, pc.invert(not_midnight))
            bad = pc.or_(bad, not_midnight)
        return pc.cast(stamps, pa.date32()), [(bad, ErrorKind.INVALID_DATE)]
    # Arrow's date cast takes exactly YYYY-MM-DD with a real day.
    lengths = pc.min_max(pc.binary_length(work))
    if lengths["min"].as_py() in (None, 10) and lengths["max"].as_py() in (None, 10):
        values = _try_cast(work, pa.date32())
        if values is not None:
            return values, []
    ok = pc.match_substring_regex(work, _DATE_RE)
    bad = _rejected(work, ok)
    src = _keep(work, ok) if _any(bad) else work
    if _any(pc.greater(pc.binary_length(src), 10)):
        # The regex only lets a midnight time follow the date, so the date alone carries the value.
        src = pc.utf8_slice_codeunits(src, 0, 10)
    values, impossible = _cast_calendar(src, pa.date32())
    return values, [(bad, ErrorKind.INVALID_DATE), (impossible, ErrorKind.INVALID_DATE)]


def _parse_timestamp(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
    if fmt is not None:
        values, bad = _strptime(work, fmt)
        return values, [(bad, ErrorKind.INVALID_TIMESTAMP)]
    values = _try_naive_iso(work)
    if values is not None:
        return values, []
    ok = pc.match_substring_regex(work, _TIMESTAMP_RE)
    bad = _rejected(work, ok)
    values, impossible = _cast_calendar(_keep(work, ok) if _any(bad) else work, _TS)
    return values, [(bad, ErrorKind.INVALID_TIMESTAMP), (impossible, ErrorKind.INVALID_TIMESTAMP)]


_Cells = tuple[np.ndarray, np.ndarray, np.ndarray]  # the data buffer, and the non-null cells' starts and lengths


def _offset_marks(work: pa.Array, cells: _Cells) -> int:
    """How many cells carry a UTC offset, provided every cell is ISO date-time text: each such cell has one
    'Z', '+' or third '-', and the others none. Cells that all end in 'Z' (UTC, the usual export) are told
    from their last characters, without counting over every byte. ``cells``: :func:`_valid_cells` of ``work``."""
    count = len(work) - work.null_count
    if _ends_with_z(cells):
        return count
    chars = _span(work)
    marks = int(np.count_nonzero(chars == ord("-"))) - 2 * count
    return marks + int(np.count_nonzero(chars == ord("Z"))) + int(np.count_nonzero(chars == ord("+")))


def _valid_cells(work: pa.Array) -> _Cells:
    """:func:`_cell_bytes` of the non-null cells."""
    data, starts, lengths = _cell_bytes(work)
    if work.null_count:
        valid = work.is_valid().to_numpy(zero_copy_only=False)
        starts, lengths = starts[valid], lengths[valid]
    return data, starts, lengths


def _ends_with_z(cells: _Cells) -> bool:
    """Whether there is a cell and every one ends in 'Z' (read from the raw buffers)."""
    data, starts, lengths = cells
    if not len(starts) or int(lengths.min()) == 0:
        return False
    return bool((data[starts + lengths - 1] == ord("Z")).all())


def _colons_at_13(cells: _Cells) -> bool:
    """Whether every cell of text that Arrow's zoned cast took has ':' after the hour (index 13).

    Such text starts with 'YYYY-MM-DD', 'T' or ' ' and a two-digit hour, so no ':' comes earlier; only the
    hour-only extra ('2024-01-15T10+05:30') lacks it there.
    """
    data, starts, lengths = cells
    if not len(starts):
        return True
    if int(lengths.min()) <= 13:
        return False
    return bool((data[starts + 13] == ord(":")).all())


def _try_naive_iso(work: pa.Array) -> pa.Array | None:
    """Arrow's naive cast; its only extras, date-only and hour-only text, are 10 and 13 characters long."""
    shortest = pc.min(pc.binary_length(work)).as_py()
    if shortest is not None and shortest < 16:
        return None
    return _try_cast(work, _TS)


def _parse_timestamptz(
    work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes
) -> tuple[pa.Array, _Checks]:
    if fmt is not None:
        values, bad = _strptime(work, fmt)
        # Without %z the wall time is taken as UTC; the cast only attaches the zone.
        return pc.cast(values, _TSTZ), [(bad, ErrorKind.INVALID_TIMESTAMPTZ)]
    # Arrow parses text without offset only into a naive type and text with one only into a zoned type.
    cells = _valid_cells(work)  # the non-null cells' bytes, for both checks on the raw text below
    marks = _offset_marks(work, cells)
    if marks == 0:
        values = _try_naive_iso(work)
        if values is not None:
            return pc.cast(values, _TSTZ), []
    elif marks == len(work) - work.null_count:
        values = _try_cast(work, _TSTZ)
        # Hour-only text such as '2024-01-15T10+05:30' is the zoned extra; real times have ':' at 13.
        if values is not None and _colons_at_13(cells):
            return values, []
    ok = pc.match_substring_regex(work, _TIMESTAMPTZ_RE)
    bad = _rejected(work, ok)
    src = _keep(work, ok) if _any(bad) else work
    invalid = ErrorKind.INVALID_TIMESTAMPTZ
    has_offset = pc.match_substring_regex(src, _OFFSET_TAIL_RE)
    with_offset = pc.sum(has_offset).as_py() or 0
    if with_offset == 0:
        values, impossible = _cast_calendar(src, _TS)
        return pc.cast(values, _TSTZ), [(bad, invalid), (impossible, invalid)]
    if with_offset < len(src) - src.null_count:
        # Appending Z to the rows without offset lets one zoned cast read the mixed batch.
        src = pc.binary_join_element_wise(src, pc.if_else(has_offset, "", "Z"), "")
    values, impossible = _cast_calendar(src, _TSTZ)
    return values, [(bad, invalid), (impossible, invalid)]


def _years_checked(parse: _Parser) -> _Parser:
    """Wrap a date or time parser so that values outside years 1..9999 become out_of_range: Arrow takes year
    0000, strptime any year, and an offset can push zoned text past either end; no Python reader could hold
    such values."""

    def checked(work: pa.Array, column_type: ColumnType, fmt: str | None, blob: bytes) -> tuple[pa.Array, _Checks]:
        values, checks = parse(work, column_type, fmt, blob)
        if pa.types.is_date32(values.type):
            numbers, low, high = values.view(pa.int32()), _MIN_DAY, _MAX_DAY
        else:
            numbers, low, high = values.view(pa.int64()), _MIN_US, _MAX_US
        bounds = pc.min_max(numbers)
        if bounds["min"].as_py() is None or (low <= bounds["min"].as_py() and bounds["max"].as_py() <= high):
            return values, checks
        outside = pc.fill_null(pc.or_(pc.less(numbers, low), pc.greater(numbers, high)), False)
        return _keep(values, pc.invert(outside)), [*checks, (outside, ErrorKind.OUT_OF_RANGE)]

    return checked


def _cast_calendar(src: pa.Array, target: pa.DataType) -> tuple[pa.Array, pa.Array]:
    """Cast regex-approved ISO text; rows naming a day their month does not have become null.

    Returns the values and the mask of impossible days.
    """
    values = _try_cast(src, target)
    if values is not None:
        return values, pa.nulls(len(src), pa.bool_())
    # Arrow refuses the whole batch over one 2023-02-29: find such rows and cast the rest.
    real = _real_day(src)
    impossible = pc.and_(pc.is_valid(src), pc.invert(pc.fill_null(real, False)))
    return pc.cast(_keep(src, real), target), impossible


def _real_day(src: pa.Array) -> pa.Array:
    """Whether the YYYY-MM-DD prefix names a real day: add DD-1 days to the first of the month and see
    whether the day of the month survives."""
    first = pc.cast(pc.binary_join_element_wise(pc.utf8_slice_codeunits(src, 0, 8), "01", ""), pa.date32())
    day = pc.cast(pc.utf8_slice_codeunits(src, 8, 10), pa.int32())
    shifted = pc.cast(pc.add(pc.cast(first, pa.int32()), pc.subtract(day, pa.scalar(1, pa.int32()))), pa.date32())
    return pc.equal(pc.day(shifted), pc.cast(day, pa.int64()))


def _strptime(work: pa.Array, fmt: str) -> tuple[pa.Array, pa.Array]:
    """Read text exactly as ``datetime.strptime(text, fmt)`` does, vectorised.

    One RE2 pass (:func:`layout_pattern`) splits each text into the directives' fields the way Python's own
    pattern does (same alternatives, leftmost-first) and keeps what follows the match, which Python refuses.
    The fields then become a value as Python computes it: %y 69-99 is 19xx and 00-68 20xx, a missing year
    1900, month or day 1, %I without %p or with 'am' is before noon, %p without %I is ignored, %f is a
    fraction padded to microseconds; the day must exist in its month and seconds 60 and 61 are refused (as
    ``datetime`` refuses them); %z is an offset under 24 hours whose colons are used consistently.

    Returns:
        Timestamps (naive; with %z, the UTC instant) and the mask of refused rows.
    """
    codes = directives(fmt)
    fields = pc.extract_regex(work, layout_pattern(fmt))
    valid = pc.is_valid(work)
    ok = pc.and_(pc.is_valid(fields), pc.equal(pc.binary_length(pc.struct_field(fields, REST)), 0))
    ok = pc.fill_null(ok, False)

    def number(code: str, default: int) -> pa.Array:
        if code not in codes:
            return pa.repeat(default, len(work)).cast(pa.int64())
        text = pc.ascii_ltrim(pc.struct_field(fields, code), characters=" ")  # %d takes ' 5'
        return pc.cast(_keep(text, ok), pa.int64())

    if "Y" in codes:
        year = number("Y", 1900)
    elif "y" in codes:
        short = number("y", 0)
        year = pc.add(short, pc.if_else(pc.less_equal(short, 68), 2000, 1900))
    else:
        year = pa.repeat(1900, len(work)).cast(pa.int64())
    hour = number("H", 0)
    if "I" in codes:
        twelve = pc.if_else(pc.equal(number("I", 12), 12), 0, number("I", 12))
        if "p" in codes:
            pm = pc.equal(pc.ascii_lower(pc.struct_field(fields, "p")), "pm")
            twelve = pc.add(twelve, pc.if_else(pm, 12, 0))
        hour = twelve
    second = number("S", 0)
    leap = pc.fill_null(pc.greater(second, 59), False)
    ok = pc.and_(ok, pc.invert(leap))
    micros = pa.repeat(0, len(work)).cast(pa.int64())
    if "f" in codes:
        fraction = pc.utf8_rpad(pc.struct_field(fields, "f"), width=6, padding="0")
        micros = pc.cast(_keep(fraction, ok), pa.int64())
    day_text = pc.binary_join_element_wise(
        pc.utf8_lpad(pc.cast(year, pa.string()), width=4, padding="0"),
        pc.utf8_lpad(pc.cast(number("m", 1), pa.string()), width=2, padding="0"),
        pc.utf8_lpad(pc.cast(number("d", 1), pa.string()), width=2, padding="0"),
        "-",
    )
    days, impossible = _cast_calendar(_keep(day_text, ok), pa.date32())
    ok = pc.and_(ok, pc.invert(pc.fill_null(impossible, False)))
    total = pc.add(
        pc.multiply(pc.cast(days.view(pa.int32()), pa.int64()), 86_400_000_000),
        pc.add(
            pc.add(pc.multiply(hour, 3_600_000_000), pc.multiply(number("M", 0), 60_000_000)),
            pc.add(pc.multiply(second, 1_000_000), micros),
        ),
    )
    if "z" in codes:
        offset, good_offset = _utc_offsets(pc.struct_field(fields, "z"))
        ok = pc.and_(ok, good_offset)
        total = pc.subtract(total, offset)
    stamps = pc.cast(_keep(total, ok), _TS)
    return stamps, pc.and_(valid, pc.invert(ok))


_OFFSET_PARTS = (
    r"^(?P<sign>[+-])(?P<hh>[0-9]{2})(?P<c1>:?)(?P<mm>[0-9]{2})"
    r"(?:(?P<c2>:?)(?P<ss>[0-9]{2})(?:\.(?P<ff>[0-9]{1,6}))?)?$|^(?P<utc>Z)$"
)
_DAY_US = 86_400_000_000


def _utc_offsets(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Microseconds east of UTC of %z text, and whether Python takes it: colons used consistently (both or
    neither before minutes and seconds) and less than 24 hours (``datetime.timezone``'s limit)."""
    parts = pc.extract_regex(text, _OFFSET_PARTS)
    ss = pc.struct_field(parts, "ss")
    has_seconds = pc.greater(pc.binary_length(ss), 0)
    consistent = pc.or_(pc.invert(has_seconds), pc.equal(pc.struct_field(parts, "c1"), pc.struct_field(parts, "c2")))

    def part(name: str) -> pa.Array:
        return pc.cast(pc.if_else(pc.equal(pc.struct_field(parts, name), ""), "0", pc.struct_field(parts, name)), pa.int64())

    fraction = pc.cast(pc.utf8_rpad(pc.struct_field(parts, "ff"), width=6, padding="0"), pa.int64())
    size = pc.add(
        pc.multiply(pc.add(pc.add(pc.multiply(part("hh"), 3600), pc.multiply(part("mm"), 60)), part("ss")), 1_000_000),
        fraction,
    )
    size = pc.if_else(pc.equal(pc.struct_field(parts, "utc"), "Z"), 0, size)
    signed = pc.if_else(pc.equal(pc.struct_field(parts, "sign"), "-"), pc.negate(size), size)
    good = pc.fill_null(pc.and_(consistent, pc.less(size, _DAY_US)), False)
    return pc.if_else(good, signed, 0), good


_PARSERS: dict[TypeKind, _Parser] = {
    TypeKind.INTEGER: _parse_integer,
    TypeKind.FLOAT: _parse_float,
    TypeKind.BOOLEAN: _parse_boolean,
    TypeKind.DATE: _years_checked(_parse_date),
    TypeKind.TIMESTAMP: _years_checked(_parse_timestamp),
    TypeKind.TIMESTAMPTZ: _years_checked(_parse_timestamptz),
    TypeKind.DECIMAL: _parse_decimal,
}
