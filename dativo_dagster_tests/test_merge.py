"""Merge by primary key (CONTRACT 8): upserts, last row wins, deletes, pruning, exactly-once, and the unique_key check."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dativo_dagster import commit as commit_module
from dativo_dagster import merge as merge_module
from dativo_dagster import rewrite as rewrite_module
from dativo_dagster.merge import MergeKeys, last_per_key, recorded_key
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


def load_three_files(project: Project) -> list[str]:
    """Run the spec (written already) over ids 1..100, then 201..300, then 1001..1100: one data file a run, each
    run's unique_key check passing. Returns the three files' paths in that order."""
    files: list[str] = []
    for first in (1, 201, 1001):
        project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},a-{i},false\n" for i in range(first, first + 100)))
        assert check(run(project), "unique_key").passed
        files.append(next(f for f in data_files(project.table(TABLE), BRANCH) if f not in files))
    return files


def spy_on_reads(monkeypatch: pytest.MonkeyPatch, module: Any, names: Sequence[str] = ("read_matches",)) -> list[str]:
    """From now on, record the path of every data file the readers ``names`` of ``module`` open (and still open it)."""
    opened: list[str] = []

    def spying(read: Any) -> Any:
        def spy(table: Any, data_file: Any, *args: Any) -> Any:
            opened.append(data_file.file_path)
            return read(table, data_file, *args)

        return spy

    for name in names:
        monkeypatch.setattr(module, name, spying(getattr(module, name)))
    return opened


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
    # the rows holding a key the run brought (2, 3, 7, 8: the first run's merge counted the others already)
    assert unique.metadata["rows_checked"].value == 4
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


# ---- the table's recorded key -----------------------------------------------------------------------------------


def test_merge_onto_a_table_created_in_append_mode_is_refused_until_an_overwrite_records_the_key(
    project: Project,
) -> None:
    spec = merge_spec()
    spec["target"] = {"partitioning": ["ingest_date"]}  # append, key marked but not recorded on a new append table
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n")
    run(project)
    assert recorded_key(project.table(TABLE)) == []
    before = project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id

    project.write_spec(merge_spec())
    refused = project.materialize()

    assert not refused.success
    message = " ".join(failures(refused))
    assert "holds rows but records no primary key" in message and "write_mode: overwrite" in message
    assert project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id == before

    overwrite = merge_spec()
    overwrite["target"] = {"partitioning": ["ingest_date"], "write_mode": "overwrite"}
    project.write_spec(overwrite)
    run(project)
    assert recorded_key(project.table(TABLE)) == ["id"]

    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n2,b2,false\n3,c,false\n")
    run(project)
    assert rows_by_id(project) == {1: "a", 2: "b2", 3: "c"}


def test_merge_with_a_changed_key_is_refused_naming_the_fix(project: Project) -> None:
    spec = merge_spec()
    spec["schema"][1].update(required=True)
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n")
    run(project)

    spec["schema"][0]["primary_key"] = False
    spec["schema"][1]["primary_key"] = True
    project.write_spec(spec)
    result = project.materialize()

    assert not result.success
    message = " ".join(failures(result))
    assert "primary key ['name'] differs from the key the table records ['id']" in message
    assert "primary_key: true on id" in message and "write_mode: overwrite" in message
    assert rows_by_id(project) == {1: "a"}


# ---- only the files that can hold a key are read and rewritten -----------------------------------------------------


def test_merge_touching_one_partition_leaves_the_other_partitions_files_alone(project: Project) -> None:
    spec = merge_spec(partitioning=["region"])
    spec["schema"].insert(0, {"name": "region", "type": "string", "required": True, "primary_key": True})
    project.write_spec(spec)
    project.write_data(
        "people.csv",
        "region,id,name,deleted\n" + "".join(f"{r},{i},{r}-{i},false\n" for r in ("eu", "us") for i in range(1, 51)),
    )
    run(project)
    table = project.table(TABLE)
    us_before = [f for f in data_files(table, BRANCH) if "/region=us/" in f]
    eu_before = [f for f in data_files(table, BRANCH) if "/region=eu/" in f]
    assert us_before and eu_before

    project.write_data("people.csv", "region,id,name,deleted\neu,7,changed,false\neu,99,new,false\n")
    result = run(project)

    table = project.table(TABLE)
    after = data_files(table, BRANCH)
    assert [f for f in after if "/region=us/" in f] == us_before
    assert not set(eu_before) & set(after)  # the eu file was rewritten without id 7
    rows = branch_rows(table, BRANCH)
    assert len(rows) == 101 and {(r["region"], r["id"], r["name"]) for r in rows} >= {("eu", 7, "changed"),
                                                                                     ("eu", 99, "new"),
                                                                                     ("us", 7, "us-7")}
    # every file on the branch, the rewritten one included, was written by the project (CONTRACT 4)
    run_id = result.run_id
    rewritten = [f for f in after if "/region=eu/" in f and f not in eu_before]
    for uri in rewritten:
        keys = assert_written_by_project(table, uri, run_id=run_id)
        assert keys["asset-name"] == "people" and keys["partition"] == "region=eu"


def test_merge_reads_only_files_whose_key_bounds_can_hold_a_run_key(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_spec(merge_spec(partitioning=[]))
    files = load_three_files(project)
    read = spy_on_reads(monkeypatch, rewrite_module)  # the files the merge's removal opens (not the check's)

    # 250 keys (more than pyiceberg's planning evaluates one by one: it plans with their range 1..1125, which
    # covers the middle file); no key lies within the middle file's own bounds 201..300, so it is not even read
    changed = [*range(1, 126), *range(1001, 1126)]
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},b-{i},false\n" for i in changed))
    run(project)

    rows = rows_by_id(project)
    assert len(rows) == 350 and rows[1] == "b-1" and rows[250] == "a-250" and rows[1125] == "b-1125"
    assert sorted(set(read)) == sorted([files[0], files[2]])
    assert files[1] in data_files(project.table(TABLE), BRANCH)  # untouched
    assert files[0] not in data_files(project.table(TABLE), BRANCH)  # every row replaced: deleted whole


# ---- exactly once ----------------------------------------------------------------------------------------------


def test_merge_re_executed_with_the_same_run_id_does_not_apply_twice(project: Project) -> None:
    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n")
    run(project)
    project.write_data("people.csv", "id,name,deleted\n2,b2,false\n3,c,false\n")
    instance = dg.DagsterInstance.ephemeral()
    first = project.materialize(instance=instance)
    assert first.success
    head = project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id

    # the same run's commit step once more (a retried step): the run id finds its commit, nothing is applied
    # again, and the run's keys file (removed after the commit) is not even needed
    table = project.table(TABLE)
    again = commit_module.commit_files(
        table, branch=BRANCH, files=[], partitioner=commit_module.Partitioner(table.spec(), table.schema()),
        run_id=first.run_id, properties={},
        merge=MergeKeys(str(project.root / "missing.parquet"), ("id",)),
    )
    assert again.already_committed and again.snapshot_id is not None
    assert project.table(TABLE).snapshot_by_name(BRANCH).snapshot_id == head
    assert rows_by_id(project) == {1: "a", 2: "b2", 3: "c"}


def test_concurrent_merges_of_overlapping_keys_both_land_exactly(project: Project) -> None:
    project.write_spec(merge_spec())
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},v1-{i},false\n" for i in range(1, 21)))
    run(project)
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},v2-{i},false\n" for i in range(10, 31)))

    with commit_conflicts() as conflicts:
        results = materialize_concurrently(project, 2, commit_together=True)

    assert all(r.success for r in results), [failures(r) for r in results]
    assert conflicts.lines, "the two commits did not race"
    rows = rows_by_id(project)  # asserts each key occurs once
    assert rows == {**{i: f"v1-{i}" for i in range(1, 10)}, **{i: f"v2-{i}" for i in range(10, 31)}}
    assert all(check(r, "unique_key").passed for r in results)


def test_merge_failing_mid_commit_leaves_the_table_unchanged(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_spec(merge_spec(partitioning=[]))
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n3,c,false\n")
    run(project)
    table = project.table(TABLE)
    head, files = table.snapshot_by_name(BRANCH).snapshot_id, data_files(table, BRANCH)
    on_disk = {p for p in Path(table.location().removeprefix("file://"), "data").rglob("*.parquet")}

    def broken(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("catalog refused the write (injected)")

    monkeypatch.setattr(commit_module, "_commit_once", broken)
    project.write_data("people.csv", "id,name,deleted\n2,b2,false\n4,d,false\n")
    result = project.materialize()

    assert not result.success and "injected" in " ".join(failures(result))
    table = project.table(TABLE)
    assert table.snapshot_by_name(BRANCH).snapshot_id == head and data_files(table, BRANCH) == files
    assert rows_by_id(project) == {1: "a", 2: "b", 3: "c"}
    # the file the merge rewrote (1 and 3 without 2) was removed again; only the run's own files remain uncommitted
    new = {p for p in Path(table.location().removeprefix("file://"), "data").rglob("*.parquet")} - on_disk
    assert all(result.run_id[:8] in p.name for p in new)
    assert sum(pq.read_metadata(p).num_rows for p in new) <= 2


# ---- the unique_key check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pii", [False, True])
def test_unique_key_fails_on_a_branch_with_a_duplicate_key(project: Project, pii: bool) -> None:
    spec = merge_spec()
    spec["target"] = {"partitioning": ["ingest_date"]}  # append: loading the file twice repeats its keys
    if pii:
        spec["schema"][0]["classification"] = "PII"
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n")
    first = run(project)
    assert check(first, "unique_key").passed

    project.write_data("people.csv", "id,name,deleted\n2,b,false\n3,c,false\n")
    second = run(project)  # append: not blocking, the run succeeds

    unique = check(second, "unique_key")
    assert not unique.passed
    assert unique.metadata["duplicate_keys"].value == 1 and unique.metadata["extra_rows"].value == 1
    # only the rows holding a key the run added are counted: 2 twice and 3, not key 1's row
    assert unique.metadata["rows_checked"].value == 3 and unique.metadata["keys_checked"].value == 2
    if pii:
        assert "withheld" in unique.metadata["examples"].value
        assert "'2'" not in str(unique.metadata["examples"].value)
    else:
        assert unique.metadata["examples"].value == [{"id": "2", "count_all": "2"}]


def test_unique_key_of_an_append_opens_only_the_files_that_can_hold_the_keys_the_run_added(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyed append's (non-blocking) check costs what the run added, not the table: files whose key bounds hold
    none of the run's keys are not opened; a duplicate within the run, or of a key already on the branch, is found;
    a duplicate the branch held before among keys the run did not add is not reported again (the run that added it
    reported it)."""
    spec = merge_spec(partitioning=[])
    spec["target"] = {"partitioning": []}  # append
    project.write_spec(spec)
    files = load_three_files(project)
    opened = spy_on_reads(monkeypatch, merge_module, ("read_matches", "read_column_groups"))

    # a new file 1101..1110 with 1105 twice, and 1001 again (already on the branch in the third file)
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},b-{i},false\n" for i in range(1101, 1111))
                       + "1105,again,false\n1001,again,false\n")
    second = run(project)

    unique = check(second, "unique_key")
    assert not unique.passed
    assert unique.metadata["duplicate_keys"].value == 2 and unique.metadata["extra_rows"].value == 2
    assert unique.metadata["keys_checked"].value == 11 and unique.metadata["rows_checked"].value == 13
    assert sorted(e["id"] for e in unique.metadata["examples"].value) == ["1001", "1105"]
    (own,) = [f for f in data_files(project.table(TABLE), BRANCH) if f not in files]
    # the run's own file (its keys), then the third file: the only one whose bounds hold one of them
    assert sorted(set(opened)) == sorted([own, files[2]])

    opened.clear()
    project.write_data("people.csv", "id,name,deleted\n5000,c,false\n")
    third = run(project)  # adds a new key only: the branch's earlier duplicates are not its rows

    unique = check(third, "unique_key")
    assert unique.passed and unique.metadata["rows_checked"].value == 1
    assert unique.metadata["scope"].value == "the keys this run added"
    assert files[0] not in opened and files[1] not in opened and files[2] not in opened


def test_the_blocking_unique_key_of_a_merge_opens_only_the_files_that_can_hold_its_keys(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge's staged check costs what the run touches, not the table: it looks for the run's keys (and those of
    files added since the last merge's check) in the files whose bounds can hold them, not in every file."""
    project.write_spec(merge_spec(partitioning=[]))
    files = load_three_files(project)
    opened = spy_on_reads(monkeypatch, merge_module)
    project.write_data("people.csv", "id,name,deleted\n1050,b,false\n" + "".join(f"{i},n,false\n" for i in range(1101, 1105)))
    result = run(project)

    unique = check(result, "unique_key")
    assert unique.passed and unique.metadata["rows_checked"].value == 5
    new = [f for f in data_files(project.table(TABLE), BRANCH) if f not in files]
    assert files[2] not in new and len(new) == 2  # the third file rewritten without 1050's old row, the run's own
    # the check read those two (the files whose bounds can hold the run's keys), not the first two files
    assert set(opened) == set(new)
    assert rows_by_id(project)[1050] == "b" and len(rows_by_id(project)) == 304


def test_a_merge_onto_a_branch_holding_a_duplicate_key_commits_and_publishes_nothing(project: Project) -> None:
    """The blocking unique_key check of a merge is counted on the staged snapshot before the catalog commit: when
    the branch already holds a key twice (another writer appended a row), the run fails, nothing lands on the branch
    or on main, and the check records the failure with its counts."""
    project.write_spec(merge_spec(publish=True))
    project.write_data("people.csv", "id,name,deleted\n1,a,false\n2,b,false\n")
    first = run(project)
    assert check(first, "unique_key").passed and check(first, "unique_key").metadata["rows_checked"].value == 2
    table = project.table(TABLE)
    head = table.snapshot_by_name(BRANCH)
    twice = table.scan(snapshot_id=head.snapshot_id).to_arrow().filter(pa.compute.equal(pa.compute.field("id"), 2))
    table.append(twice, branch=BRANCH)  # another writer repeats key 2 on the branch
    table = table.refresh()
    branch_before, main_before = table.snapshot_by_name(BRANCH).snapshot_id, table.snapshot_by_name("main").snapshot_id

    project.write_data("people.csv", "id,name,deleted\n3,c,false\n")
    result = project.materialize()

    assert not result.success
    assert "would leave 1 key(s) (id) more than once" in " ".join(failures(result))
    unique = check(result, "unique_key")
    assert not unique.passed
    assert unique.metadata["duplicate_keys"].value == 1 and unique.metadata["extra_rows"].value == 1
    assert unique.metadata["examples"].value == [{"id": "2", "count_all": "2"}]
    table = table.refresh()
    assert table.snapshot_by_name(BRANCH).snapshot_id == branch_before
    assert table.snapshot_by_name("main").snapshot_id == main_before
    assert sorted(r["id"] for r in branch_rows(table, BRANCH)) == [1, 2, 2]
    assert 3 not in [r["id"] for r in branch_rows(table, "main")]


def test_unique_key_is_blocking_for_merge_and_absent_without_a_key(project: Project) -> None:
    from dativo_dagster.assets import build_asset  # noqa: PLC0415
    from dativo_dagster.spec import LoadedSpec  # noqa: PLC0415

    def specs_of(spec: dict[str, Any]) -> dict[str, bool]:
        parsed, problems = parse_spec_document(spec, "x.yaml")
        assert parsed is not None, problems
        asset = build_asset(LoadedSpec(spec=parsed, path=Path("x.yaml"), base_dir=Path(".")))
        return {s.name: s.blocking for s in asset.check_specs}

    assert specs_of(merge_spec())["unique_key"] is True
    append = merge_spec()
    append["target"] = {}
    assert specs_of(append)["unique_key"] is False
    assert "unique_key" not in specs_of(base_spec())


def test_merge_with_file_modified_time_replaces_a_changed_files_rows_and_merges_keys(project: Project) -> None:
    spec = merge_spec()
    spec["source"] = {"type": "csv", "files": [{"path": "data/people/*.csv"}],
                      "incremental": {"strategy": "file_modified_time"}}
    project.write_spec(spec)
    a = project.write_data("people/a.csv", "id,name,deleted\n1,a-1,false\n2,a-2,false\n")
    project.write_data("people/b.csv", "id,name,deleted\n3,b-3,false\n")
    run(project)

    # a.csv changes: its earlier rows are replaced (2 is no longer in it), and its key 3 replaces b.csv's row
    a.write_text("id,name,deleted\n1,a2-1,false\n3,a2-3,false\n")
    os.utime(a, (a.stat().st_mtime + 5, a.stat().st_mtime + 5))
    result = run(project)

    assert rows_by_id(project) == {1: "a2-1", 3: "a2-3"}
    assert materialization(result, "people")["replaced_sources"] == [str(a)]
    assert materialization(project.materialize(), "people")["nothing_new"] is True


def test_rewritten_files_are_streamed_by_pyarrow_unless_their_columns_differ_from_the_table(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The project's files are rewritten a row group at a time with pyarrow's reader (pyiceberg's scan reads about a
    whole file ahead); a file that lacks a column the table gained since goes through pyiceberg's scan, which fills
    the column with nulls."""
    spec = merge_spec(partitioning=[])
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},a-{i},false\n" for i in range(1, 11)))
    run(project)
    scanned: list[str] = []

    class SpyScan(rewrite_module.ArrowScan):  # counts the batch scans of whole files (not the key-column reads)
        reading_columns = False

        def to_table(self, tasks: Any) -> Any:
            self.reading_columns = True
            return super().to_table(tasks)

        def to_record_batches(self, tasks: Any) -> Any:
            tasks = list(tasks)
            if not self.reading_columns:
                scanned.extend(t.file.file_path for t in tasks)
            return super().to_record_batches(tasks)

    monkeypatch.setattr(rewrite_module, "ArrowScan", SpyScan)
    project.write_data("people.csv", "id,name,deleted\n1,b-1,false\n")
    run(project)
    assert scanned == [] and rows_by_id(project)[1] == "b-1" and len(rows_by_id(project)) == 10

    spec["schema"].append({"name": "city", "type": "string"})
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,deleted,city\n2,b-2,false,Oslo\n")
    run(project)

    assert len(scanned) == 1  # the file without `city`
    rows = {r["id"]: (r["name"], r["city"]) for r in branch_rows(project.table(TABLE), BRANCH)}
    assert rows[2] == ("b-2", "Oslo") and rows[3] == ("a-3", None) and rows[1] == ("b-1", None) and len(rows) == 10


def test_a_merge_reads_only_the_key_columns_to_plan_and_hands_the_writer_dictionaries(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning reads the key columns alone (not ``_source_file``, the widest column of a file, unless changed source
    files are replaced too); the survivors reach the writer with ``_source_file`` and ``_run_id`` still dictionaries
    as the Parquet file holds them, so no string per row is made (issue 18: merge memory and speed)."""
    from dativo_dagster.merge import KeySelection  # noqa: PLC0415
    from dativo_dagster.write import PartitionedParquetWriter  # noqa: PLC0415

    project.write_spec(merge_spec(partitioning=[]))
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},a-{i},false\n" for i in range(1, 101)))
    run(project)
    planned: list[list[str]] = []
    written: list[dict[str, str]] = []
    matches, write = KeySelection.matches, PartitionedParquetWriter.write

    def matching(self: KeySelection, data: pa.Table) -> pa.Array:
        planned.append(data.column_names)
        return matches(self, data)

    def writing(self: PartitionedParquetWriter, table: pa.Table) -> None:
        written.append({c: str(table.schema.field(c).type) for c in ("_source_file", "_run_id")})
        write(self, table)

    monkeypatch.setattr(KeySelection, "matches", matching)
    monkeypatch.setattr(PartitionedParquetWriter, "write", writing)
    project.write_data("people.csv", "id,name,deleted\n5,b-5,false\n")
    run(project)

    # the removal's planning and the unique_key check (which matches the run's keys the same way) read the key alone
    assert planned and all(columns == ["id"] for columns in planned)
    dictionary = "dictionary<values=string, indices=int32, ordered=0>"
    assert written and all(w == {"_source_file": dictionary, "_run_id": dictionary} for w in written)
    rows = rows_by_id(project)
    assert len(rows) == 100 and rows[5] == "b-5" and rows[6] == "a-6"
    survivors = [r for r in branch_rows(project.table(TABLE), BRANCH) if r["id"] != 5]
    assert {r["_source_file"] for r in survivors} == {str(project.data_dir / "people.csv")}


def test_planning_and_the_unique_key_check_read_a_files_key_column_a_few_row_groups_at_a_time(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge's planning and its blocking unique_key check never hold a candidate file's whole key column: they
    read it a few row groups at a time (up to ``MATCH_ROWS`` rows) and match each piece against the run's keys, so
    memory follows that bound, not the file (issue 18: 603 MiB at 50M rows, where a 128 MiB file holds 10M keys).
    Pieces whose key statistics hold none of the run's keys are not read at all."""
    from dativo_dagster import write as write_module  # noqa: PLC0415
    from dativo_dagster.merge import KeySelection  # noqa: PLC0415

    monkeypatch.setattr(write_module, "MIN_ROW_GROUP_BYTES", 1024)
    monkeypatch.setattr(write_module, "ROW_GROUP_MAX_BYTES", 1024)  # many small row groups in one data file
    monkeypatch.setattr(rewrite_module, "MATCH_ROWS", 100)
    project.write_spec(merge_spec(partitioning=[]))
    project.write_data("people.csv", "id,name,deleted\n" + "".join(f"{i},a-{i},false\n" for i in range(1, 3001)))
    run(project)
    [loaded] = data_files(project.table(TABLE), BRANCH)
    metadata = pq.ParquetFile(loaded.removeprefix("file://")).metadata
    group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert len(group_rows) >= 10 and sum(group_rows) == 3000

    whole: list[int] = []  # rows of every whole-file read of the key column
    groups: list[int] = []  # rows of every read of some row groups' key column
    matched: list[int] = []  # rows handed to the key matching at once
    read, read_row_groups, matches = pq.ParquetFile.read, pq.ParquetFile.read_row_groups, KeySelection.matches

    def reading(self: pq.ParquetFile, *args: Any, columns: Any = None, **kwargs: Any) -> pa.Table:
        data = read(self, *args, columns=columns, **kwargs)
        if columns == ["id"]:
            whole.append(data.num_rows)
        return data

    def reading_groups(self: pq.ParquetFile, i: Any, *args: Any, columns: Any = None, **kwargs: Any) -> pa.Table:
        data = read_row_groups(self, i, *args, columns=columns, **kwargs)
        if columns == ["id"]:
            groups.append(data.num_rows)
        return data

    def matching(self: KeySelection, data: pa.Table) -> pa.Array:
        matched.append(data.num_rows)
        return matches(self, data)

    monkeypatch.setattr(pq.ParquetFile, "read", reading)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", reading_groups)
    monkeypatch.setattr(KeySelection, "matches", matching)
    # two changed keys at either end of the file and one new key
    project.write_data("people.csv", "id,name,deleted\n2,b-2,false\n2999,b-2999,false\n5000,n,false\n")
    result = run(project)

    rows = rows_by_id(project)
    assert len(rows) == 3001 and rows[2] == "b-2" and rows[2999] == "b-2999" and rows[3] == "a-3" and rows[5000] == "n"
    unique = check(result, "unique_key")
    assert unique.passed and unique.metadata["rows_checked"].value == 3
    assert whole == []  # no key column read whole
    assert groups and max(groups) <= 100
    assert matched and max(matched) <= 100
    # planning and the check each read only the pieces whose key bounds hold 2 or 2999 (and the run's own file's)
    assert sum(groups) < 3000
