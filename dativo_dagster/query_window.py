"""The ``:partition_start`` / ``:partition_end`` placeholders of a partitioned database ``query`` (CONTRACT 10).

A query is scanned once, left to right, the way its server's lexer would: string literals (``'...'`` with ``''``;
MySQL also ``"..."`` and backslash escapes; PostgreSQL ``E'...'`` backslash escapes and ``$tag$...$tag$`` bodies),
quoted identifiers (``"..."`` / ````...````) and comments (``-- ...``, ``/* ... */``, nested in PostgreSQL; MySQL
``# ...``) are skipped whole, so a placeholder inside them is text, never a bound. Outside them a placeholder is
``:partition_start`` or ``:partition_end`` not preceded by another ``:`` (``x::partition_start`` is a cast) nor
followed by a name character. Each one found is replaced by a literal the source renders from the window's bound
(a ``date`` or ``datetime``, never text from the spec or the source), so nothing from outside is ever formatted
into the SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

START = "partition_start"
END = "partition_end"
PLACEHOLDERS = (START, END)
_NAME_CHAR = re.compile(r"[A-Za-z0-9_$]")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


@dataclass(frozen=True)
class Placeholder:
    """One placeholder of a query: which bound, and where (``start``..``end`` of the query text)."""

    name: str  # START or END
    start: int
    end: int


class UnterminatedQueryError(ValueError):
    """A string literal, quoted identifier or block comment of the query never ends."""


def find_placeholders(query: str, dialect: str) -> list[Placeholder]:
    """The placeholders of ``query`` outside literals, quoted names and comments, in order.

    Args:
        query: the spec's SQL.
        dialect: ``postgres`` or ``mysql`` (which quotes and comments the server knows).

    Raises:
        UnterminatedQueryError: a literal, quoted name or block comment is not closed (naming its offset).
    """
    mysql = dialect == "mysql"
    found: list[Placeholder] = []
    i, n = 0, len(query)
    while i < n:
        char = query[i]
        if char == "'" or (mysql and char == '"'):
            backslash = mysql or (i > 0 and query[i - 1] in "eE" and (i < 2 or not _NAME_CHAR.match(query[i - 2])))
            i = _skip_quoted(query, i, char, backslash)
        elif char == '"' or (mysql and char == "`"):
            i = _skip_quoted(query, i, char, backslash=False)
        elif query.startswith("--", i) or (mysql and char == "#"):
            newline = query.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif query.startswith("/*", i):
            i = _skip_block_comment(query, i, nested=not mysql)
        elif char == "$" and not mysql and (i == 0 or not _NAME_CHAR.match(query[i - 1])):
            tag = _DOLLAR_TAG.match(query, i)
            if tag is None:
                i += 1
                continue
            close = query.find(tag.group(), tag.end())
            if close < 0:
                raise UnterminatedQueryError(f"the dollar-quoted string at offset {i} is not closed")
            i = close + len(tag.group())
        elif char == ":" and not (i > 0 and query[i - 1] == ":") and not query.startswith("::", i):
            for name in PLACEHOLDERS:
                after = i + 1 + len(name)
                if query.startswith(name, i + 1) and not (after < n and _NAME_CHAR.match(query[after])):
                    found.append(Placeholder(name, i, after))
                    i = after
                    break
            else:
                i += 1
        elif char == ":":
            i += 2 if query.startswith("::", i) else 1
        else:
            i += 1
    return found


def _skip_quoted(query: str, i: int, quote: str, backslash: bool) -> int:
    """The offset just past the quoted text that opens at ``i`` (a doubled quote is one quote character)."""
    j = i + 1
    while j < len(query):
        if backslash and query[j] == "\\":
            j += 2
            continue
        if query[j] == quote:
            if j + 1 < len(query) and query[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    kind = "string literal" if quote == "'" or backslash else "quoted name"
    raise UnterminatedQueryError(f"the {kind} at offset {i} is not closed")


def _skip_block_comment(query: str, i: int, nested: bool) -> int:
    depth, j = 1, i + 2
    while j < len(query):
        if nested and query.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif query.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    raise UnterminatedQueryError(f"the comment at offset {i} is not closed")


def missing_placeholders(query: str, dialect: str) -> list[str]:
    """The placeholders ``query`` lacks outside literals and comments (``[]``: both are there)."""
    names = {p.name for p in find_placeholders(query, dialect)}
    return [f":{name}" for name in PLACEHOLDERS if name not in names]


def bind_window(query: str, dialect: str, literal: Callable[[str], str]) -> str:
    """``query`` with each placeholder replaced by ``literal(name)`` (the source's rendering of that bound)."""
    parts, last = [], 0
    for placeholder in find_placeholders(query, dialect):
        parts.extend((query[last:placeholder.start], literal(placeholder.name)))
        last = placeholder.end
    parts.append(query[last:])
    return "".join(parts)


__all__ = ["END", "PLACEHOLDERS", "START", "Placeholder", "UnterminatedQueryError", "bind_window",
           "find_placeholders", "missing_placeholders"]
