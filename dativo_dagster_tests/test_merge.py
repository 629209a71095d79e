"""Merge by primary key (CONTRACT 8): upserts, last row wins, deletes, pruning, exactly-once, and the unique_key check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from dativo_dagster import commit as commit_module
from dativo_dagster import rewrite as rewrite_module
from dativo_dagster.merge import last_per_key, recorded_key
from dativo_dagster.spec import parse_spec_document
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows
from dativo_dagster_tests.table_checks import (
    assert_written_by_project,
    commit_conflicts,
    data_files,
    failures,
    materialization,
    materialize_concurrently,
)

BRANCH = "acme"
TABLE = "testdomain.people"


def merge_spec(name: str = "people", **target: Any) -> dict[str, Any]:
    """A merge spec keyed by ``id``, with a ``deleted`` flag, reading ``data/<name>.csv`` in full every run."""
    return base_spec(
        name,
        schema=[
            {"name": "id", "type": "integer", "required": True, "primary_key": True},
            {"name": "name", "type": "string"},
            {"name": "deleted", "type": "boolean"},
        ],
        target={"partitioning": ["ingest_date"], "write_mode": "merge", "delete_field": "deleted", **target},
    )


def run(project: Project) -> dg.ExecuteInProcessResult:
    result = project.materialize()
    assert result.success, failures(result)
    return result


def rows_by_id(project: Project, table: str = TABLE) -> dict[int, str]:
    rows = branch_rows(project.table(table), BRANCH)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a key occurs twice: {sorted(ids)}"
    return {r["id"]: r["name"] for r in rows}


def check(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


# ---- the dedupe rule, vectorised ------------------------------------------------------------------------------


def test_last_per_key_keeps_the_last_row_of_each_key_and_drops_deletes() -> None:
    keys = pa.table({"k": [1, 2, 1, 3, 3, 4, 4]})
    deleted = pa.array([False, False, False, False, True, True, False])

    keep, distinct, keys_deleted = last_per_key(keys, deleted)

    # 1: rows 0, 2 -> 2; 2: row 1; 3: rows 3, 4 (delete last) -> none; 4: delete then insert -> row 6
    assert keep.tolist() == [False, True, True, False, False, False, True]
    assert sorted(distinct.column("k").to_pylist()) == [1, 2, 3, 4]
    assert keys_deleted == 1


def test_last_per_key_with_a_composite_key() -> None:
    keys = pa.table({"a": ["x", "x", "y", "x"], "b": [1, 2, 1, 1]})

    keep, distinct, _ = last_per_key(keys, None)

    assert keep.tolist() == [False, True, True, True]
    assert distinct.num_rows == 3


# ---- end to end on the embedded default -----------------------------------------------------------------------


def test_merge_updates_inserts_last_row_wins_and_deletes(project: Project) -> None:
    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},v1-{i},false\n" for i in range(1, 7)))
    first = run(project)
    assert rows_by_id(project) == {i: f"v1-{i}" for i in range(1, 7)}
    assert check(first, "unique_key").passed

    project.write_data(
        "people.csv",
        """
        id,name,deleted
        2,v2-2,false
        7,new-7,false
        3,first-3,false
        3,second-3,
        4,,true
        8,gone-8,true
        8,back-8,false
        9,in-9,false
        9,,true
        """,
    )
    second = run(project)

    assert rows_by_id(project) == {1: "v1-1", 2: "v2-2", 3: "second-3", 5: "v1-5", 6: "v1-6", 7: "new-7", 8: "back-8"}
    # the table records its key, and the run's counts add up with the rows a merge did not load
    assert recorded_key(project.table(TABLE)) == ["id"]
    unique = check(second, "unique_key")
    assert unique.passed and unique.metadata["duplicate_keys"].value == 0
    assert unique.metadata["rows_checked"].value == 7
    reconciliation = check(second, "reconciliation")
    assert reconciliation.passed, reconciliation.description
    assert reconciliation.metadata["rows_not_loaded_by_merge"].value == 5  # 3's first, 4, 8's delete, 9 twice
    meta = materialization(second, "people")
    assert meta["rows_committed"] == 4 and meta["dagster/row_count"] == 7


def test_merge_a_null_key_is_rejected_and_the_table_is_unchanged(project: Project) -> None:
    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n")
    run(project)
    before = project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id

    project.write_data("people.csv", "id,name,deleted\n1,changed,false\n,no-key,false\n")
    result = project.materialize()

    assert not result.success
    assert "id" in " ".join(failures(result)) and "null" in " ".join(failures(result)).lower()
    assert project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id == before
    assert rows_by_id(project) == {1: "a", 2: "b"}


def test_merge_a_run_that_only_deletes_commits_the_deletes(project: Project) -> None:
    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n3,c,false\n")
    run(project)

    project.write_data("people.csv", "id,name,deleted\n2,,true\n")
    result = run(project)

    assert rows_by_id(project) == {1: "a", 3: "c"}
    assert materialization(result, "people")["rows_committed"] == 0


# ---- spec errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [
        (lambda s: s["schema"][0].pop("primary_key"), "target.write_mode", "merge needs a primary key"),
        (lambda s: s["target"].update(delete_field="nope"), "target.delete_field", "unknown field 'nope'"),
        (lambda s: s["target"].update(delete_field="name"), "target.delete_field", "is string; expected a boolean"),
        (lambda s: s["target"].update(write_mode="append"), "target.delete_field", "only allowed with write_mode: merge"),
        (lambda s: s["target"].update(write_mode="overwrite"), "target.delete_field", "only allowed with write_mode"),
        (lambda s: s["target"].update(catalog="none", partitioning=[]), "target.write_mode", "merge needs catalog: iceberg"),
        (lambda s: s["schema"].append({"name": "f", "type": "double", "required": True, "primary_key": True}),
         "schema[3].primary_key", "float/double"),
    ],
)
def test_merge_spec_errors_name_the_key(change: Any, key: str, expected: str) -> None:
    spec = merge_spec()
    change(spec)

    parsed, problems = parse_spec_document(spec, "asset_specs/people.yaml")

    assert parsed is None
    assert any(p.startswith(f"asset_specs/people.yaml: {key}: ") and expected in p for p in problems), problems


def test_a_valid_merge_spec_parses() -> None:
    parsed, problems = parse_spec_document(merge_spec(), "asset_specs/people.yaml")

    assert problems == [] and parsed is not None
    assert parsed.target.delete_field == "deleted" and parsed.primary_key == ["id"]
