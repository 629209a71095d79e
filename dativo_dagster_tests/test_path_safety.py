"""Path and name safety: nothing derived from data or specs can place a file outside its table location, and
object tags and metadata stay within S3's character set and sizes.

- End to end: a spec partitioned by identity and by truncate on string columns whose values (and one column
  name) are path attacks: ``..``, absolute paths, ``%2e%2e``, NUL, Unicode look-alikes of dots and slashes,
  Windows paths and device names, very long values. After the run, every file anywhere under the project is
  where it belongs: data and metadata under the table locations, each path segment a plain name.
- Names from specs (name, domain, dataProduct, tenant, branch) are identifiers before anything uses them:
  generated text either is refused by the spec model or is ``[a-z][a-z0-9_]{0,62}``, so
  ``<warehouse>/<domain>/<dataProduct>/<name>`` is always three plain segments below the warehouse.
- Column names become partition folder keys only through ``safe_folder_value``: generated names and values
  always give one safe segment per partition field.
- Object tags and user metadata of data files (``storage.object_tags``, ``tag_safe``, ``object_metadata``) keep
  S3's limits for any governance text: at most 10 tags, keys up to 128 and values up to 256 characters from
  S3's tag alphabet; metadata printable ASCII, 2 KB in all, and unchanged text where it fits.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import pyarrow as pa
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dativo_dagster.spec import AssetSpecModel
from dativo_dagster.storage import (
    MAX_TAG_KEY,
    MAX_TAG_VALUE,
    MAX_TAGS,
    MAX_USER_METADATA_BYTES,
    join_uri,
    object_metadata,
    object_tags,
    tag_safe,
)
from dativo_dagster.table_schema import HIVE_NULL, Partitioner, iceberg_schema, partition_spec
from dativo_dagster.write import governance_metadata
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows

IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")
SAFE_SEGMENT = re.compile(r"[a-z0-9_.-]+")
# S3 tag keys and values: letters, digits, spaces and + - = . _ : / @ (we keep to the ASCII ones)
S3_TAG_TEXT = re.compile(r"[A-Za-z0-9 +\-=._:/@]*")
LONG = "a/" * 3000 + "tail"
HOSTILE_VALUES = [
    "..",
    ".",
    "../../../../../../etc/passwd",
    "/etc/passwd",
    "/",
    "%2e%2e%2f%2e%2e%2fescape",
    "%2E%2E/x",
    "a\x00b",
    "\u2025",  # two dot leader
    "\uff0e\uff0e\uff0fescape",  # fullwidth ". . /"
    "\u2215etc\u2215passwd",  # division slash
    "..\u2044x",  # fraction slash
    "C:\\Windows\\System32",
    "..\\..\\x",
    "CON",
    "nul",
    "\n",
    " ",
    "~root",
    "$(touch x)",
    "__HIVE_DEFAULT_PARTITION__",
    "ü" * 200,
    LONG,
    "",  # a null value: the Hive null folder
]
HOSTILE_COLUMN = "Tag/Sub\\Zone"  # slashes are allowed in column names; the folder key must not carry them


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO(newline="")
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


def _segments_below(path: Path, root: Path) -> tuple[str, ...]:
    real = Path(os.path.realpath(path))
    assert real.is_relative_to(root), f"{path} escapes {root}"
    return real.relative_to(root).parts


def test_hostile_partition_values_and_column_names_stay_inside_the_table_location(project: Project) -> None:
    schema = [
        {"name": "id", "type": "integer", "required": True},
        {"name": "value", "type": "string"},
        {"name": HOSTILE_COLUMN, "type": "string"},
    ]
    project.write_spec(
        base_spec(
            schema=schema,
            target={"partitioning": ["value", "truncate(3, value)", HOSTILE_COLUMN]},
            schema_validation_mode="warn",
        )
    )
    rows = [["id", "value", HOSTILE_COLUMN]] + [[str(i), v, v[::-1]] for i, v in enumerate(HOSTILE_VALUES)]
    rows.append(["bad", "../../rejected", "../../rejected"])  # a quarantined row takes the same path
    project.write_data("people.csv", _csv(rows))
    result = project.materialize()
    assert result.success

    warehouse = Path(os.path.realpath(project.warehouse))
    location = warehouse / "testdomain" / "testproduct" / "people"
    rejects_location = warehouse / "testdomain" / "testproduct" / "people__rejects"
    table = project.table("testdomain.people")
    assert table.location().removeprefix("file://") == str(location)

    # every file of the project is where it belongs, and every segment below a table location is a plain name
    for path in project.root.rglob("*"):
        assert not path.is_symlink(), path
        if not path.is_file():
            continue
        real = Path(os.path.realpath(path))
        top = real.relative_to(Path(os.path.realpath(project.root))).parts[0]
        assert top in ("asset_specs", "data", ".dativo"), path
        if real.is_relative_to(warehouse):
            assert real.is_relative_to(location) or real.is_relative_to(rejects_location), path
            base = location if real.is_relative_to(location) else rejects_location
            for segment in _segments_below(real, base):
                assert segment not in (".", "..") and len(segment.encode()) <= 255, segment
                if "=" in segment:  # a partition folder
                    key, _, value = segment.partition("=")
                    assert SAFE_SEGMENT.fullmatch(key) and (SAFE_SEGMENT.fullmatch(value) or value == HIVE_NULL), segment
                else:  # data/, metadata/ and the files the run and pyiceberg named
                    assert re.fullmatch(r"[A-Za-z0-9_.-]+", segment), segment
    assert not (project.root.parent / "escape").exists() and not Path("/etc/passwd.parquet").exists()

    # the data files: three partition folders each, named by the partition spec, holding the values unchanged
    head = table.snapshot_by_name("acme")
    tasks = list(table.scan(snapshot_id=head.snapshot_id).plan_files())
    for task in tasks:
        parts = _segments_below(Path(task.file.file_path.removeprefix("file://")), location)
        assert parts[0] == "data" and len(parts) == 5, parts
        assert [p.split("=", 1)[0] for p in parts[1:4]] == ["value", "value_truncate_3", "tag_sub_zone"]
        assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}-[0-9a-f]{32}-\d{5}\.parquet", parts[4]), parts[4]
        assert task.file.partition[0] is None or task.file.partition[0] in HOSTILE_VALUES
    got = {r["id"]: (r["value"], r[HOSTILE_COLUMN]) for r in branch_rows(table, "acme")}
    assert got == {
        i: (v or None, v[::-1] or None) for i, v in enumerate(HOSTILE_VALUES)
    }  # "" is a null value: it goes to the Hive null folder and comes back as null
    [reject] = branch_rows(project.table("testdomain.people__rejects"), "acme")
    assert (reject["id"], reject["value"]) == ("bad", "../../rejected")
    assert list((project.root / ".dativo" / "staging").iterdir()) == []


# --- names from specs are identifiers ------------------------------------------------------------------------------

NAME_KEYS = ("name", "domain", "dataProduct", "tenant")
NASTY_TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["..", "../x", "a/b", "a\\b", "a\n", "a\x00", "peopl\u0435", "\u212aelvin", "p" * 64, "P" * 63, "x.y", "%2e%2e"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,70}\n?", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from((*NAME_KEYS, "branch")), value=NASTY_TEXT)
def test_names_from_specs_are_refused_or_plain_identifiers(key: str, value: str) -> None:
    overrides: dict[str, Any] = {"target": {"branch": value}} if key == "branch" else {key: value}
    try:
        spec = AssetSpecModel.model_validate(base_spec(**overrides))
    except ValidationError:
        return
    for name in (spec.name, spec.domain, spec.data_product, spec.tenant, spec.branch):
        assert IDENTIFIER.fullmatch(name), name
    parts = spec.table_path.split("/")
    assert len(parts) == 3 and all(IDENTIFIER.fullmatch(p) for p in parts)
    for warehouse in ("/srv/warehouse", "s3://lake/prefix"):
        for suffix in ("", "__rejects"):
            location = join_uri(warehouse, spec.table_path + suffix)
            assert location == f"{warehouse}/{spec.domain}/{spec.data_product}/{spec.name}{suffix}"
            assert posixpath.normpath(location.removeprefix("s3:/")) == location.removeprefix("s3:/")


COLUMN_NAMES = st.text(min_size=1, max_size=300).filter(
    lambda n: n == n.strip() and "." not in n and not any(ord(c) < 32 for c in n) and not n.lower().startswith("_")
)


@settings(max_examples=150, deadline=None)
@given(column=COLUMN_NAMES, values=st.lists(st.one_of(st.none(), st.text(max_size=300)), min_size=1, max_size=5))
def test_partition_folders_are_one_safe_segment_per_field_whatever_the_column_name(
    column: str, values: list[str | None]
) -> None:
    try:
        spec = AssetSpecModel.model_validate(
            base_spec(
                schema=[{"name": "id", "type": "integer"}, {"name": column, "type": "string"}],
                target={"partitioning": [column, f"truncate(2, {column})", "ingest_date"]},
            )
        )
    except ValidationError:
        assume(False)  # e.g. a name with parentheses or commas cannot be partitioned on: refused, precisely
    schema = iceberg_schema(spec.fields)
    partitioner = Partitioner(partition_spec(spec, schema), schema)
    n = len(values)
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            column: pa.array(values, pa.string()),
            "_ingested_at": pa.array([datetime(2025, 11, 7, tzinfo=timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
            "_source_file": pa.array(["/src.csv"] * n),
            "_run_id": pa.array(["run"] * n),
        }
    )
    for partition, rows in partitioner.split(table):
        path = partitioner.hive_path(partition)
        segments = path.split("/")
        assert len(segments) == 3 and posixpath.normpath(path) == path
        for segment in segments:
            key, _, value = segment.partition("=")
            assert SAFE_SEGMENT.fullmatch(key) and (SAFE_SEGMENT.fullmatch(value) or value == HIVE_NULL), segment
            assert len(segment.encode()) <= 255 and ".." not in segment
        assert rows.num_rows >= 1


# --- object tags and metadata --------------------------------------------------------------------------------------

GOVERNANCE_TEXT = st.text(max_size=600) | st.sampled_from(["a,b", "Team <x@y.z>; DROP TABLE", "\r\n", "ü" * 300, "%41"])


@settings(max_examples=300, deadline=None)
@given(metadata=st.dictionaries(
    st.sampled_from(["asset-name", "domain", "data-product", "tenant-id", "owner", "classification", "branch", "run-id"]),
    GOVERNANCE_TEXT,
))
def test_object_tags_keep_s3s_alphabet_count_and_lengths(metadata: dict[str, str]) -> None:
    tags = object_tags(metadata)
    assert len(tags) <= MAX_TAGS
    for key, value in tags.items():
        assert 0 < len(key) <= MAX_TAG_KEY and len(value) <= MAX_TAG_VALUE
        assert S3_TAG_TEXT.fullmatch(key) and S3_TAG_TEXT.fullmatch(value), (key, value)
        assert not key.lower().startswith("aws:")


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=1000), limit=st.integers(1, 300))
def test_tag_safe_is_safe_bounded_and_keeps_safe_text(value: str, limit: int) -> None:
    safe = tag_safe(value, limit)
    assert len(safe) == min(len(value), limit)
    assert S3_TAG_TEXT.fullmatch(safe)
    if S3_TAG_TEXT.fullmatch(value):
        assert safe == value[:limit]


@settings(max_examples=300, deadline=None)
@given(metadata=st.dictionaries(st.from_regex(r"[a-z][a-z-]{0,20}", fullmatch=True), GOVERNANCE_TEXT, max_size=14))
def test_object_metadata_is_printable_ascii_within_2_kb_and_unchanged_where_it_fits(metadata: dict[str, str]) -> None:
    out = object_metadata(metadata)
    assert set(out) == set(metadata)
    assert sum(len(k.encode()) + len(v.encode()) for k, v in out.items()) <= MAX_USER_METADATA_BYTES
    for key, value in out.items():
        assert all(0x20 <= ord(c) < 0x7F for c in value), value
        original = metadata[key].strip()
        if value.endswith("...") and unquote(value) != original:
            # a shortened value is the start of the original's UTF-8 bytes (cut between characters, see the next test)
            assert original.encode().startswith(unquote_to_bytes(value[:-3])), (value, original)
        else:
            assert unquote(value) == original


def test_a_shortened_metadata_value_still_decodes_as_text() -> None:
    value = object_metadata({"owner": "ú" * 1000, "domain": "d"})["owner"]
    assert value.endswith("...")
    assert "\ufffd" not in unquote(value, errors="replace")


@pytest.mark.parametrize(
    "owner",
    ["Data Team\r\nX-Injected: 1", "équipe données", "team " * 100, "<script>alert(1)</script>", "a" * 1000],
)
def test_governance_of_a_hostile_spec_gives_safe_tags_and_metadata(owner: str) -> None:
    spec = AssetSpecModel.model_validate(
        base_spec(
            team={"owner": owner},
            compliance={"classification": ["PII", "a,b", "x" * 500, "ünïcode\n"], "retention_days": 10**12},
            version="v" * 2000,
        )
    )
    metadata = governance_metadata(spec, branch=spec.branch, run_id="r" * 64, ingested_at=datetime(2025, 1, 1, tzinfo=timezone.utc))
    tags = object_tags(metadata)
    assert len(tags) <= MAX_TAGS
    assert all(S3_TAG_TEXT.fullmatch(k) and S3_TAG_TEXT.fullmatch(v) and len(v) <= MAX_TAG_VALUE for k, v in tags.items())
    headers = object_metadata(metadata)
    assert sum(len(k) + len(v) for k, v in headers.items()) <= MAX_USER_METADATA_BYTES
    assert all("\r" not in v and "\n" not in v and v.isascii() for v in headers.values())
    assert headers["domain"] == "testdomain" and headers["tenant-id"] == "acme"  # short values are kept whole
