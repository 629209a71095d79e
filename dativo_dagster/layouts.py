"""strptime layouts (`format:`): the directives honoured exactly and the RE2 pattern that reads them as Python does."""

from __future__ import annotations

import re
import string

# Each directive's pattern is Python 3.11's own (_strptime.TimeRE) with \d spelled [0-9]: Python's \d also takes
# other Unicode digits, which this project refuses. Alternatives keep Python's order: RE2 picks submatches
# leftmost-first, as Python's backtracking does, so the same text splits into the same fields.
DIRECTIVES: dict[str, str] = {
    "Y": r"(?P<Y>[0-9][0-9][0-9][0-9])",
    "y": r"(?P<y>[0-9][0-9])",
    "m": r"(?P<m>1[0-2]|0[1-9]|[1-9])",
    "d": r"(?P<d>3[0-1]|[1-2][0-9]|0[1-9]|[1-9]| [1-9])",
    "H": r"(?P<H>2[0-3]|[0-1][0-9]|[0-9])",
    "I": r"(?P<I>1[0-2]|0[1-9]|[1-9])",
    "p": r"(?P<p>am|pm)",
    "M": r"(?P<M>[0-5][0-9]|[0-9])",
    "S": r"(?P<S>6[0-1]|[0-5][0-9]|[0-9])",
    "f": r"(?P<f>[0-9]{1,6})",
    "z": r"(?P<z>[+-][0-9][0-9]:?[0-5][0-9](?::?[0-5][0-9](?:\.[0-9]{1,6})?)?|(?-i:Z))",  # Arrow: named groups only
}
SUPPORTED = "%Y %y %m %d %H %I %p %M %S %f %z %%"
_REFUSED_WHY = {
    "Z": "a zone name cannot be honoured exactly (Python's strptime only checks the name and drops the zone);"
    " use %z for an offset such as +01:00, +0100 or Z",
    "b": "month names depend on the locale",
    "B": "month names depend on the locale",
    "a": "weekday names depend on the locale",
    "A": "weekday names depend on the locale",
    "c": "it depends on the locale",
    "x": "it depends on the locale",
    "X": "it depends on the locale",
}
# Python's \s for text patterns: every character whose str.isspace() is true. A whitespace run in a layout
# matches one or more of them, as in Python.
_SPACE_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in map(chr, range(0x110000)) if c.isspace()) + "]"
REST = "rest"  # the group that holds what follows Python's match: the text is accepted only when it is empty


def layout_problems(fmt: str, *, zoned: bool) -> list[str]:
    """Why ``fmt`` cannot be honoured exactly as ``datetime.strptime`` would read it; empty when it can.

    Args:
        fmt: The layout.
        zoned: Whether the column holds an instant (timestamptz), the only type that may read an offset.
    """
    problems = []
    seen: list[str] = []
    i = 0
    while i < len(fmt):
        if fmt[i] != "%":
            i += 1
            continue
        if i + 1 == len(fmt):
            problems.append("ends with a lone '%'; write '%%' for a percent sign")
            break
        code = fmt[i + 1]
        i += 2
        if code == "%":
            continue
        if code not in DIRECTIVES:
            why = _REFUSED_WHY.get(code, "it is not one this project can honour exactly")
            problems.append(f"%{code} is not supported: {why}; supported: {SUPPORTED}")
            continue
        if code in seen:
            problems.append(f"%{code} appears twice; Python's strptime refuses such a layout")
        seen.append(code)
    if "Y" in seen and "y" in seen:
        problems.append("%Y and %y both give the year; use one")
    if "H" in seen and "I" in seen:
        problems.append("%H and %I both give the hour; use one")
    odd = sorted({c for c in fmt.replace("%%", "") if not c.isascii() and not c.isspace()})
    if odd:
        # Python and RE2 could disagree on how such characters match (Unicode digits, case folding)
        problems.append(f"only ASCII text may surround the directives; found {''.join(odd)!r}")
    if "z" in seen and not zoned:
        problems.append("%z (a UTC offset) is only allowed on timestamptz fields")
    return problems


def layout_pattern(fmt: str) -> str:
    """The RE2 pattern that matches text the way Python's strptime matches it with ``fmt``.

    Python matches its pattern at the start of the text (case-insensitively) and then refuses the text when
    anything follows the match. The pattern captures that remainder as the group ``rest``: it is empty exactly
    when Python accepts the text's layout.

    Raises:
        ValueError: ``fmt`` has a problem (see :func:`layout_problems`).
    """
    problems = layout_problems(fmt, zoned=True)
    if problems:
        raise ValueError(f"format {fmt!r}: {'; '.join(problems)}")
    parts = []
    i = 0
    while i < len(fmt):
        char = fmt[i]
        if char == "%":
            code = fmt[i + 1]
            parts.append("%" if code == "%" else DIRECTIVES[code])
            i += 2
        elif char.isspace():
            while i < len(fmt) and fmt[i].isspace():
                i += 1
            parts.append(_SPACE_CLASS + "+")
        else:
            parts.append("\\" + char if char in string.punctuation else char)
            i += 1
    return f"(?i)^{''.join(parts)}(?P<{REST}>(?s:.*))$"


def directives(fmt: str) -> set[str]:
    """The directive letters of a valid layout (``%%`` aside)."""
    return set(re.findall(r"%(.)", fmt.replace("%%", ""), flags=re.DOTALL))
