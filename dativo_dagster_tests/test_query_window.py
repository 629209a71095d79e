"""A partitioned database query's window placeholders (query_window.py) and the spec checks of partitioned database
sources: placeholders inside literals, quoted names and comments are text, never bounds."""

from __future__ import annotations

from typing import Any

import pytest

from dativo_dagster.query_window import UnterminatedQueryError, bind_window, find_placeholders, missing_placeholders
from dativo_dagster.spec import parse_spec_document
from dativo_dagster_tests.conftest import base_spec


def bound(query: str, dialect: str) -> str:
    return bind_window(query, dialect, lambda name: "<S>" if name == "partition_start" else "<E>")


@pytest.mark.parametrize("dialect", ["postgres", "mysql"])
def test_placeholders_outside_literals_and_comments_are_bound(dialect: str) -> None:
    query = "SELECT * FROM t WHERE d >= :partition_start AND d < :partition_end"
    assert bound(query, dialect) == "SELECT * FROM t WHERE d >= <S> AND d < <E>"
    # at the very end, next to parentheses and operators, several times
    assert bound("SELECT 1 WHERE (d>=:partition_start)AND d<:partition_end", dialect) == (
        "SELECT 1 WHERE (d>=<S>)AND d<<E>"
    )
    assert bound("SELECT :partition_end, :partition_end", dialect) == "SELECT <E>, <E>"


@pytest.mark.parametrize(
    ("query", "dialect"),
    [
        ("SELECT ':partition_start' AS a", "postgres"),
        ("SELECT 'it''s :partition_start' AS a", "postgres"),
        ("SELECT E'\\' :partition_start' AS a", "postgres"),  # an E-string's escaped quote does not end it
        ("SELECT $$ :partition_start $$ AS a", "postgres"),
        ("SELECT $body$ ' :partition_start $body$ AS a", "postgres"),
        ('SELECT ":partition_start" FROM t', "postgres"),  # a quoted column name
        ("SELECT 1 -- :partition_start\n", "postgres"),
        ("SELECT 1 /* outer /* :partition_start */ :partition_end */", "postgres"),  # PostgreSQL nests comments
        ("SELECT x::partition_start FROM t", "postgres"),  # a cast to a type of that name
        ("SELECT :partition_start_day FROM t", "postgres"),  # a longer name
        ("SELECT 'it\\'s :partition_start' AS a", "mysql"),  # MySQL's backslash escape
        ('SELECT ":partition_start" AS a', "mysql"),  # a MySQL string
        ("SELECT `:partition_start` FROM t", "mysql"),
        ("SELECT 1 # :partition_start\n", "mysql"),
        ("SELECT 1 /* :partition_start */", "mysql"),
    ],
)
def test_placeholders_inside_literals_names_and_comments_are_text(query: str, dialect: str) -> None:
    assert find_placeholders(query, dialect) == []
    assert bound(query, dialect) == query


def test_a_placeholder_after_a_literal_that_holds_one_is_still_found() -> None:
    query = "SELECT 'a '':partition_start' AS x FROM t WHERE d >= :partition_start AND d < :partition_end"
    assert bound(query, "postgres") == "SELECT 'a '':partition_start' AS x FROM t WHERE d >= <S> AND d < <E>"
    # PostgreSQL (standard strings): a backslash does not escape, so the literal ends at the first quote
    assert bound("SELECT 'a\\' WHERE d >= :partition_start", "postgres") == "SELECT 'a\\' WHERE d >= <S>"


@pytest.mark.parametrize(
    ("query", "dialect", "words"),
    [
        ("SELECT 'open :partition_start", "postgres", "string literal at offset 7 is not closed"),
        ('SELECT "open', "postgres", "quoted name at offset 7 is not closed"),
        ("SELECT 1 /* open", "mysql", "comment at offset 9 is not closed"),
        ("SELECT $x$ open", "postgres", "dollar-quoted string at offset 7 is not closed"),
    ],
)
def test_an_unterminated_literal_is_refused(query: str, dialect: str, words: str) -> None:
    with pytest.raises(UnterminatedQueryError, match=words):
        find_placeholders(query, dialect)


def test_missing_placeholders_are_named() -> None:
    assert missing_placeholders("SELECT * FROM t WHERE d >= :partition_start", "postgres") == [":partition_end"]
    assert missing_placeholders("SELECT ':partition_start', ':partition_end'", "mysql") == [
        ":partition_start", ":partition_end"
    ]


# ---- the spec ----------------------------------------------------------------------------------------------------


def db_spec(source: dict[str, Any]) -> dict[str, Any]:
    return base_spec(
        "events",
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "event_date", "type": "date", "required": True},
        ],
        source={"type": "postgres", "connection": {"url_env": "DB_URL"}, **source},
        partitions={"type": "daily", "start": "2024-01-01", "field": "event_date"},
    )


def problems(document: dict[str, Any]) -> list[str]:
    model, found = parse_spec_document(document, "asset_specs/events.yaml")
    return [] if model is not None else found


def test_a_partitioned_table_or_windowed_query_is_a_valid_spec() -> None:
    assert problems(db_spec({"table": "shop.events"})) == []
    query = "SELECT * FROM shop.events WHERE event_date >= :partition_start AND event_date < :partition_end"
    assert problems(db_spec({"query": query})) == []


def test_a_partitioned_query_without_its_window_is_refused_naming_source_query() -> None:
    found = problems(db_spec({"query": "SELECT * FROM shop.events WHERE note <> ':partition_end'"}))
    assert any(
        p.startswith("asset_specs/events.yaml: source.query: a partitioned query must select its window:"
                     " :partition_start and :partition_end missing") for p in found
    ), found
    found = problems(db_spec({"query": "SELECT * FROM t WHERE d >= :partition_start AND note = 'open"}))
    assert any(p.startswith("asset_specs/events.yaml: source.query: cannot find its :partition_start")
               and "string literal at offset" in p for p in found), found


def test_a_cursor_with_partitions_is_refused_naming_source_incremental() -> None:
    spec = db_spec({"table": "shop.events",
                    "incremental": {"strategy": "cursor", "cursor_field": "event_date"}})
    found = problems(spec)
    assert any(p.startswith("asset_specs/events.yaml: source.incremental: a cursor cannot be combined with"
                            " partitions") for p in found), found
