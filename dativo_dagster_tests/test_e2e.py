"""End to end through Dagster on the embedded default: what lands in the table, where, and what Dagster records."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg import transforms as tf
from pyiceberg import types as it
from pyiceberg.table.snapshots import ancestors_of

from dativo_dagster.definitions import build_definitions
from dativo_dagster.markers import committed_files, marker_uri
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, base_spec, branch_rows, duckdb_branch_rows

UTC = timezone.utc


def materialization_metadata(result: dg.ExecuteInProcessResult, name: str) -> dict[str, Any]:
    """Metadata values of the one materialization of asset ``name`` in ``result``."""
    mats = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key == dg.AssetKey(name)
    ]
    assert len(mats) == 1, mats
    return {k: v.value for k, v in mats[0].metadata.items()}


def failure_description(result: dg.ExecuteInProcessResult) -> str:
    [failure] = result.get_step_failure_events()
    data = failure.event_specific_data
    assert data is not None and data.user_failure_data is not None, data
    return data.user_failure_data.description or ""


def data_file_paths(table: Any, branch: str) -> list[str]:
    head = table.snapshot_by_name(branch)
    if head is None:
        return []
    return sorted(task.file.file_path for task in table.scan(snapshot_id=head.snapshot_id).plan_files())


def snapshots_of_branch(table: Any, branch: str) -> list[Any]:
    head = table.snapshot_by_name(branch)
    return list(ancestors_of(head, table.metadata)) if head is not None else []


ALL_TYPES_SCHEMA = [
    {"name": "s", "type": "string"},
    {"name": "i", "type": "integer"},
    {"name": "l", "type": "long"},
    {"name": "f", "type": "float"},
    {"name": "d", "type": "double"},
    {"name": "b", "type": "boolean"},
    {"name": "dt", "type": "date"},
    {"name": "ts", "type": "timestamp"},
    {"name": "tz", "type": "timestamptz"},
    {"name": "dec", "type": "decimal(10,4)"},
]
ALL_TYPES_CSV = """\
s,i,l,f,d,b,dt,ts,tz,dec
hello,42,-9223372036854775808,1.5,-2.5e3,yes,2024-02-29,2024-03-01 12:34:56.123456,2024-03-01T12:00:00+02:00,12.3456
"a, b",0,9223372036854775807,NaN,Infinity,F,2024-01-01 00:00:00,2024-03-01T23:59:59,2024-03-01 08:00:00Z,-0.0001
nulls,,,,,,,,,NULL
"""
ALL_TYPES_EXPECTED = [
    ("hello", 42, -(2**63), 1.5, -2500.0, True, date(2024, 2, 29), datetime(2024, 3, 1, 12, 34, 56, 123456),
     datetime(2024, 3, 1, 10, 0, tzinfo=UTC), Decimal("12.3456")),
    ("a, b", 0, 2**63 - 1, math.nan, math.inf, False, date(2024, 1, 1), datetime(2024, 3, 1, 23, 59, 59),
     datetime(2024, 3, 1, 8, 0, tzinfo=UTC), Decimal("-0.0001")),
    ("nulls",) + (None,) * 9,
]


def _normalise(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """NaN compares unequal to itself and DuckDB returns zoned datetimes in its session zone: make rows comparable."""
    out = []
    for value in row:
        if isinstance(value, float) and math.isnan(value):
            out.append("NaN")
        elif isinstance(value, datetime) and value.tzinfo is not None:
            out.append(value.astimezone(UTC))
        else:
            out.append(value)
    return tuple(out)


def _sort_key(row: tuple[Any, ...]) -> tuple[bool, Any]:
    return (row[1] is None, row[1] if row[1] is not None else 0)


def test_every_type_reads_back_with_pyiceberg_and_duckdb(project: Project, duckdb_connection: Any) -> None:
    project.write_spec(base_spec(schema=ALL_TYPES_SCHEMA))
    csv_path = project.write_data("people.csv", ALL_TYPES_CSV)
    before = datetime.now(UTC)
    result = project.materialize()
    after = datetime.now(UTC)
    assert result.success
    table = project.table("testdomain.people")

    types = {f.name: f.field_type for f in table.schema().fields}
    assert types == {
        "s": it.StringType(), "i": it.LongType(), "l": it.LongType(), "f": it.DoubleType(), "d": it.DoubleType(),
        "b": it.BooleanType(), "dt": it.DateType(), "ts": it.TimestampType(), "tz": it.TimestamptzType(),
        "dec": it.DecimalType(10, 4), "_ingested_at": it.TimestamptzType(), "_source_file": it.StringType(),
        "_run_id": it.StringType(),
    }
    assert [f.name for f in table.schema().fields][-3:] == ["_ingested_at", "_source_file", "_run_id"]

    names = [f["name"] for f in ALL_TYPES_SCHEMA]
    rows = branch_rows(table, "acme")
    got = sorted((tuple(r[n] for n in names) for r in rows), key=_sort_key)
    assert [_normalise(r) for r in got] == [_normalise(r) for r in sorted(ALL_TYPES_EXPECTED, key=_sort_key)]

    ingested = {r["_ingested_at"] for r in rows}
    assert len(ingested) == 1
    [ingested_at] = ingested
    assert before <= ingested_at <= after
    assert {r["_source_file"] for r in rows} == {str(csv_path.resolve())}
    assert os.path.isabs(rows[0]["_source_file"])
    assert {r["_run_id"] for r in rows} == {result.run_id}

    described = dict(
        (name, kind)
        for name, kind, *_ in duckdb_connection.execute(
            f"DESCRIBE SELECT * FROM iceberg_scan('{table.metadata_location}',"
            f" snapshot_from_id={table.snapshot_by_name('acme').snapshot_id})"
        ).fetchall()
    )
    assert described == {
        "s": "VARCHAR", "i": "BIGINT", "l": "BIGINT", "f": "DOUBLE", "d": "DOUBLE", "b": "BOOLEAN", "dt": "DATE",
        "ts": "TIMESTAMP", "tz": "TIMESTAMP WITH TIME ZONE", "dec": "DECIMAL(10,4)",
        "_ingested_at": "TIMESTAMP WITH TIME ZONE", "_source_file": "VARCHAR", "_run_id": "VARCHAR",
    }
    duck = sorted((tuple(r[:10]) for r in duckdb_branch_rows(duckdb_connection, table, "acme")), key=_sort_key)
    assert [_normalise(r) for r in duck] == [_normalise(r) for r in sorted(ALL_TYPES_EXPECTED, key=_sort_key)]
    duck_system = {(_normalise((r[10],))[0], r[11], r[12]) for r in duckdb_branch_rows(duckdb_connection, table, "acme")}
    assert duck_system == {(ingested_at, str(csv_path.resolve()), result.run_id)}


def test_identifier_location_and_ingest_date_folders(project: Project) -> None:
    project.write_spec(base_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    assert project.materialize().success

    catalog = project.catalog()
    assert catalog.list_tables("testdomain") == [("testdomain", "people")]
    table = project.table("testdomain.people")
    location = str(project.warehouse / "testdomain" / "testproduct" / "people")
    assert table.location().removeprefix("file://") == location

    [part] = table.spec().fields
    assert (part.name, part.transform) == ("ingest_date", tf.DayTransform())
    assert table.schema().find_field(part.source_id).name == "_ingested_at"

    [ingested_at] = {r["_ingested_at"] for r in branch_rows(table, "acme")}
    paths = data_file_paths(table, "acme")
    assert len(paths) == 1
    relative = paths[0].removeprefix("file://").removeprefix(location + "/")
    assert re.fullmatch(rf"data/ingest_date={ingested_at.date().isoformat()}/[^/]+\.parquet", relative), paths[0]
    assert pq.read_metadata(paths[0].removeprefix("file://")).num_rows == 2


def path_safe(value: str) -> str:
    """CONTRACT section 4: lower case, only [a-z0-9_.-], no '..'."""
    return re.sub(r"\.{2,}", "_", re.sub(r"[^a-z0-9_.-]", "_", value.lower()))


def test_partition_transforms_make_hive_folders_that_match_the_partition_spec(
    project: Project, duckdb_connection: Any
) -> None:
    project.write_spec(
        base_spec(
            schema=[
                {"name": "id", "type": "integer", "required": True},
                {"name": "s", "type": "string"},
                {"name": "cat", "type": "string"},
                {"name": "d", "type": "date"},
            ],
            target={"partitioning": ["month(d)", "cat", "bucket(4, id)", "truncate(2, s)"]},
        )
    )
    project.write_data(
        "people.csv",
        """\
        id,s,cat,d
        1,apple,A,2024-01-05
        2,apricot,A,2024-01-20
        3,banana,B,2024-02-01
        4,avocado,A/../../x,2024-01-31
        5,cherry,,2023-12-31
        6,apple,A,2024-01-06
        7,b,B,2024-02-29
        8,apple,A,2024-01-07
        """,
    )
    assert project.materialize().success
    table = project.table("testdomain.people")
    location = table.location().removeprefix("file://")

    assert [(f.name, f.transform) for f in table.spec().fields] == [
        ("d_month", tf.MonthTransform()),
        ("cat", tf.IdentityTransform()),
        ("id_bucket_4", tf.BucketTransform(4)),
        ("s_truncate_2", tf.TruncateTransform(2)),
    ]
    assert [table.schema().find_field(f.source_id).name for f in table.spec().fields] == ["d", "cat", "id", "s"]

    bucket = tf.BucketTransform(4).transform(it.LongType())
    head = table.snapshot_by_name("acme")
    tasks = list(table.scan(snapshot_id=head.snapshot_id).plan_files())
    seen_ids = []
    for task in tasks:
        path = task.file.file_path.removeprefix("file://")
        assert os.path.realpath(path).startswith(location + "/data/"), path
        rows = pq.read_table(path).to_pylist()
        folders = dict(p.split("=", 1) for p in Path(path).parent.relative_to(location + "/data").parts)
        for row in rows:
            seen_ids.append(row["id"])
            cat = row["cat"]
            assert folders == {
                "d_month": f"{row['d'].year:04d}-{row['d'].month:02d}",
                "cat": "__HIVE_DEFAULT_PARTITION__" if cat is None else path_safe(cat),
                "id_bucket_4": str(bucket(row["id"])),
                "s_truncate_2": row["s"][:2],
            }
            record = task.file.partition
            assert record[0] == (row["d"].year - 1970) * 12 + row["d"].month - 1
            assert record[1] == cat
            assert record[2] == bucket(row["id"])
            assert record[3] == row["s"][:2]
    assert sorted(seen_ids) == list(range(1, 9))
    assert not any(".." in task.file.file_path for task in tasks)
    assert len(tasks) == 7  # ids 1, 6 and 8 share every partition value; every other row is alone
    duck = duckdb_branch_rows(duckdb_connection, table, "acme")
    assert sorted(r[0] for r in duck) == list(range(1, 9))
    # DuckDB prunes by the partition values of the manifests: they must agree with the rows
    pruned = duckdb_connection.execute(
        f"SELECT id FROM iceberg_scan('{table.metadata_location}', snapshot_from_id={head.snapshot_id})"
        " WHERE cat = 'A' AND d < DATE '2024-01-07' ORDER BY id"
    ).fetchall()
    assert pruned == [(1,), (6,)]


def test_snapshot_summary_holds_run_id_and_source_state_and_main_stays_empty(project: Project) -> None:
    project.write_spec(base_spec())
    csv_path = project.write_data("people.csv", "id,name\n1,Ann\n")
    result = project.materialize()
    assert result.success
    table = project.table("testdomain.people")

    head = table.snapshot_by_name("acme")
    summary = head.summary.additional_properties
    assert summary["dativo.run-id"] == result.run_id
    stat = os.stat(csv_path)
    assert json.loads(summary["dativo.source-state"]) == {str(csv_path.resolve()): f"{stat.st_mtime_ns}:{stat.st_size}"}

    main = table.snapshot_by_name("main")
    assert main is not None
    assert branch_rows(table, "main") == []
    assert data_file_paths(table, "main") == []
    lineage = [s.snapshot_id for s in snapshots_of_branch(table, "acme")]
    assert lineage[-1] == main.snapshot_id  # the branch starts at main's head
    assert len(lineage) == 2


def test_materialization_and_asset_definition_metadata(project: Project) -> None:
    spec = base_spec(tags=["test", "Person Data"], team={"owner": "owner@example.com"})
    spec["schema"][1]["classification"] = "PII"
    spec["schema"][1]["description"] = "the person's name"
    spec["schema"].append({"name": "email", "type": "string"})
    project.write_spec(spec)
    csv_path = project.write_data("people.csv", "id,name,unused\n1,Ann,x\n2,Bob,y\n3,Cy,z\n")
    result = project.materialize()
    assert result.success
    table = project.table("testdomain.people")

    meta = materialization_metadata(result, "people")
    assert meta["dagster/row_count"] == 3
    assert meta["dagster/table_name"] == "testdomain.people"
    assert meta["dagster/uri"] == str(project.warehouse / "testdomain" / "testproduct" / "people")
    assert meta["rows_read"] == 3
    assert meta["rows_committed"] == 3
    assert meta["rows_rejected"] == 0
    assert meta["files_written"] == 1
    assert meta["bytes_written"] == sum(os.path.getsize(p.removeprefix("file://")) for p in data_file_paths(table, "acme"))
    assert meta["snapshot_id"] == str(table.snapshot_by_name("acme").snapshot_id)
    assert meta["branch"] == "acme"
    assert meta["source_files"] == [str(csv_path.resolve())]
    assert meta["columns_not_loaded"] == {str(csv_path.resolve()): ["unused"]}
    assert meta["columns_missing"] == {str(csv_path.resolve()): ["email"]}
    assert {r["email"] for r in branch_rows(table, "acme")} == {None}
    assert len(meta["partitions"]) == 1 and meta["partitions"][0].startswith("ingest_date=")

    defs = build_definitions(project.specs_dir)
    [asset_spec] = list(defs.get_assets_def("people").specs)
    assert asset_spec.group_name == "testproduct"
    assert list(asset_spec.owners) == ["owner@example.com"]
    assert set(asset_spec.kinds) == {"csv", "parquet", "iceberg"}
    assert asset_spec.tags["dativo/domain"] == "testdomain"
    assert asset_spec.tags["dativo/tenant"] == "acme"
    assert "test" in asset_spec.tags and "Person_Data" in asset_spec.tags
    assert asset_spec.metadata["dagster/table_name"] == "testdomain.people"
    columns = asset_spec.metadata["dagster/column_schema"].columns
    assert [(c.name, c.type) for c in columns] == [
        ("id", "integer"), ("name", "string"), ("email", "string"), ("_ingested_at", "timestamptz"),
        ("_source_file", "string"),
        ("_run_id", "string"),
    ]
    assert columns[0].constraints.nullable is False
    assert columns[1].constraints.nullable is True
    assert columns[1].tags == {"classification": "PII"}
    assert columns[1].description == "the person's name"
    checks = {c.name: c for c in defs.get_assets_def("people").check_specs}
    assert sorted(checks) == ["reconciliation", "schema_drift", "validation"]
    assert checks["validation"].blocking and not checks["schema_drift"].blocking


def test_strict_failure_names_every_field_and_commits_nothing(project: Project) -> None:
    spec = base_spec(
        schema=[
            {"name": "id", "type": "integer", "required": True},
            {"name": "name", "type": "string"},
            {"name": "born", "type": "date"},
        ]
    )
    project.write_spec(spec)
    project.write_data("people.csv", "id,name,born\n1,Ann,2000-01-01\n")
    assert project.materialize().success
    table = project.table("testdomain.people")
    metadata_before = table.metadata_location
    files_before = data_file_paths(table, "acme")

    csv_path = project.write_data(
        "people.csv",
        "id,name,born\n1,Ann,2000-01-01\nx,Bob,2000-13-01\n3,Cy,yesterday\n,Dee,2000-02-02\n5,Eve,2000-02-30\n",
    )
    result = project.materialize()
    assert not result.success
    description = failure_description(result)
    where = str(csv_path.resolve())
    assert "4 of 5 rows are invalid" in description
    assert re.search(rf"id: invalid_integer x1 \(e\.g\. {re.escape(where)}, line 3: 'x'\)", description), description
    assert re.search(rf"id: missing_required x1 \(e\.g\. {re.escape(where)}, line 5: ''\)", description), description
    assert re.search(
        rf"born: invalid_date x3 \(e\.g\. {re.escape(where)}, line 3: '2000-13-01'; {re.escape(where)}, line 4: "
        rf"'yesterday'; {re.escape(where)}, line 6: '2000-02-30'\)",
        description,
    ), description
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "people.people__validate"
    checks = result.get_asset_check_evaluations()
    # validation fails (ERROR, blocking); the file's columns match the spec; nothing was committed to reconcile
    assert sorted((c.check_name, c.passed, c.severity) for c in checks) == [
        ("schema_drift", True, dg.AssetCheckSeverity.WARN),
        ("validation", False, dg.AssetCheckSeverity.ERROR),
    ]

    table = project.table("testdomain.people")
    assert table.metadata_location == metadata_before
    assert data_file_paths(table, "acme") == files_before
    assert [r["name"] for r in branch_rows(table, "acme")] == ["Ann"]
    assert all(result.run_id[:8] not in p for p in data_file_paths(table, "acme"))
    assert [p for p in project.warehouse.rglob("*.parquet") if result.run_id[:8] in p.name] == []
    assert list((project.root / ".dativo" / "staging").iterdir()) == []


WARN_CSV = """\
id,name,score
1,Ann,1.5
2,"Bob
Jr",2.5
x,Cy,3.0
4,,abc
,Eve,
6,Fay,6
7,Gus,7,extra
"""


def test_warn_mode_commits_valid_rows_and_quarantines_the_rest(project: Project) -> None:
    project.write_spec(
        base_spec(
            schema=[
                {"name": "id", "type": "integer", "required": True},
                {"name": "name", "type": "string"},
                {"name": "score", "type": "double"},
            ],
            schema_validation_mode="warn",
        )
    )
    csv_path = project.write_data("people.csv", WARN_CSV)
    where = str(csv_path.resolve())
    result = project.materialize()
    assert result.success

    table = project.table("testdomain.people")
    assert sorted((r["id"], r["name"], r["score"]) for r in branch_rows(table, "acme")) == [
        (1, "Ann", 1.5), (2, "Bob\nJr", 2.5), (6, "Fay", 6.0)
    ]
    rejects = project.table("testdomain.people__rejects")
    assert rejects.location().removeprefix("file://") == str(
        project.warehouse / "testdomain" / "testproduct" / "people__rejects"
    )
    assert {f.name: f.field_type for f in rejects.schema().fields if not f.name.startswith("_")} == {
        "id": it.StringType(), "name": it.StringType(), "score": it.StringType()
    }
    assert branch_rows(rejects, "main") == []
    rows = sorted(branch_rows(rejects, "acme"), key=lambda r: r["_source_line"])
    assert [(r["_source_line"], r["id"], r["name"], r["score"]) for r in rows] == [
        (5, "x", "Cy", "3.0"), (6, "4", "", "abc"), (7, "", "Eve", ""), (9, None, None, None)
    ]
    reasons = [r["_reject_reason"] for r in rows]
    assert "id" in reasons[0] and "invalid_integer" in reasons[0]
    assert "score" in reasons[1] and "invalid_float" in reasons[1]
    assert "id" in reasons[2] and "missing_required" in reasons[2]
    assert "unparseable_record" in reasons[3]
    assert rows[3]["_raw_record"] is not None and "7,Gus,7,extra" in rows[3]["_raw_record"]
    assert {r["_source_file"] for r in rows} == {where}
    assert {r["_run_id"] for r in rows} == {result.run_id}
    # CONTRACT 4: the system columns are strings in the quarantine's files too (dictionary-encoded inside)
    head = rejects.snapshot_by_name("acme")
    for task in rejects.scan(snapshot_id=head.snapshot_id).plan_files():
        schema = pq.read_schema(task.file.file_path.removeprefix("file://"))
        assert [schema.field(name).type for name in ("_source_file", "_run_id")] == [pa.string(), pa.string()]

    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert sorted(checks) == ["reconciliation", "schema_drift", "validation"]
    check = checks["validation"]
    assert (check.check_name, check.passed, check.severity) == ("validation", False, dg.AssetCheckSeverity.WARN)
    reconciliation = {k: v.value for k, v in checks["reconciliation"].metadata.items()}
    assert checks["reconciliation"].passed
    assert (reconciliation["rows_read"], reconciliation["rows_committed"], reconciliation["rows_rejected"]) == (7, 3, 4)
    check_meta = {k: v.value for k, v in check.metadata.items()}
    assert (check_meta["rows_read"], check_meta["rows_valid"], check_meta["rows_rejected"]) == (7, 3, 4)
    assert check_meta["id:invalid_integer"] == 1
    assert check_meta["id:missing_required"] == 1
    assert check_meta["score:invalid_float"] == 1
    meta = materialization_metadata(result, "people")
    assert (meta["rows_read"], meta["rows_committed"], meta["rows_rejected"]) == (7, 3, 4)
    assert meta["rejects_table"] == "testdomain.people__rejects"
    assert list((project.root / ".dativo" / "staging").iterdir()) == []


def test_warn_mode_spills_many_rejects_across_batches(project: Project) -> None:
    project.write_spec(base_spec(schema_validation_mode="warn"))
    n = 30_000  # about 1.5 MiB: more than one extract batch
    pad = "-" * 30
    lines = ["id,name"] + [f"{i},valid{pad}{i:08d}" if i % 2 else f"bad{i},reject{pad}{i:08d}" for i in range(n)]
    project.write_data("people.csv", "\n".join(lines) + "\n")
    result = project.materialize()
    assert result.success
    rejects = branch_rows(project.table("testdomain.people__rejects"), "acme")
    assert len(rejects) == n // 2
    assert sorted(r["_source_line"] for r in rejects) == list(range(2, n + 2, 2))
    assert all(r["id"] == f"bad{r['_source_line'] - 2}" for r in rejects)
    assert len(branch_rows(project.table("testdomain.people"), "acme")) == n // 2


def test_second_run_appends_with_its_own_run_id(project: Project) -> None:
    project.write_spec(base_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    first = project.materialize()
    project.write_data("people.csv", "id,name\n3,Cy\n")
    second = project.materialize()
    assert first.success and second.success
    assert first.run_id != second.run_id
    table = project.table("testdomain.people")
    rows = branch_rows(table, "acme")
    assert sorted((r["id"], r["_run_id"]) for r in rows) == [
        (1, first.run_id), (2, first.run_id), (3, second.run_id)
    ]
    assert len({r["_ingested_at"] for r in rows}) == 2
    run_ids = [s.summary.additional_properties.get("dativo.run-id") for s in snapshots_of_branch(table, "acme")]
    assert run_ids[:2] == [second.run_id, first.run_id]
    assert materialization_metadata(second, "people")["dagster/row_count"] == 3
    assert materialization_metadata(second, "people")["rows_committed"] == 1


def test_overwrite_replaces_the_content_in_one_commit(project: Project) -> None:
    project.write_spec(base_spec(target={"partitioning": ["ingest_date"], "write_mode": "overwrite"}))
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    first = project.materialize()
    assert first.success
    table = project.table("testdomain.people")
    log_before = len(table.metadata.metadata_log)
    snapshots_before = {s.snapshot_id for s in table.snapshots()}

    project.write_data("people.csv", "id,name\n3,Cy\n")
    second = project.materialize()
    assert second.success
    table = project.table("testdomain.people")
    assert [(r["id"], r["_run_id"]) for r in branch_rows(table, "acme")] == [(3, second.run_id)]
    assert len(table.metadata.metadata_log) == log_before + 1  # one new metadata version
    new = [s for s in table.snapshots() if s.snapshot_id not in snapshots_before]
    assert new and all(s.summary.additional_properties["dativo.run-id"] == second.run_id for s in new)
    assert {s.summary.operation.value for s in new} == {"delete", "append"}
    assert branch_rows(table, "main") == []
    assert materialization_metadata(second, "people")["dagster/row_count"] == 1


@pytest.mark.parametrize("catalog", ["iceberg", "none"])
def test_overwrite_replaces_the_quarantined_rows_too(project: Project, catalog: str) -> None:
    """CONTRACT 3: after an overwrite run both tables describe that run's sources only; rows fixed in the source
    leave the quarantine, and the same rejects are not added again."""
    project.write_spec(
        base_spec(target={"catalog": catalog, "write_mode": "overwrite"}, schema_validation_mode="warn")
    )
    rejects_location = str(project.warehouse / "testdomain" / "testproduct" / "people__rejects")

    def quarantined() -> list[tuple[str, str]]:
        if catalog == "iceberg":
            rows = branch_rows(project.table("testdomain.people__rejects"), "acme")
        else:
            rows = [r for f in committed_files(rejects_location, S3Settings()) for r in pq.read_table(f).to_pylist()]
        return sorted((r["id"], r["_run_id"]) for r in rows)

    def loaded() -> list[int]:
        if catalog == "iceberg":
            return sorted(r["id"] for r in branch_rows(project.table("testdomain.people"), "acme"))
        location = str(project.warehouse / "testdomain" / "testproduct" / "people")
        return sorted(r["id"] for f in committed_files(location, S3Settings()) for r in pq.read_table(f).to_pylist())

    project.write_data("people.csv", "id,name\n1,Ann\nx,Bad\ny,Worse\n")
    first = project.materialize()
    assert first.success
    assert quarantined() == [("x", first.run_id), ("y", first.run_id)]

    project.write_data("people.csv", "id,name\n1,Ann\n2,Fixed\ny,Worse\n")  # x fixed, y still bad
    second = project.materialize()
    assert second.success
    assert loaded() == [1, 2]
    assert quarantined() == [("y", second.run_id)]

    project.write_data("people.csv", "id,name\n1,Ann\n2,Fixed\n3,Also\n")  # nothing left to reject
    third = project.materialize()
    assert third.success
    assert loaded() == [1, 2, 3]
    assert quarantined() == []


def test_catalog_none_writes_parquet_and_a_commit_marker(project: Project) -> None:
    project.write_spec(
        base_spec(target={"catalog": "none", "partitioning": ["ingest_date"]}, schema_validation_mode="warn")
    )
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\nx,Bad\n")
    result = project.materialize()
    assert result.success
    location = str(project.warehouse / "testdomain" / "testproduct" / "people")

    written = sorted(str(p) for p in Path(location).rglob("*.parquet"))
    assert len(written) == 1
    assert re.fullmatch(rf"{re.escape(location)}/data/ingest_date=\d{{4}}-\d\d-\d\d/[^/]+\.parquet", written[0])
    marker = Path(marker_uri(location, result.run_id))
    assert marker == Path(location) / "_commits" / f"{result.run_id}.json"
    body = json.loads(marker.read_text())
    assert [f["uri"] for f in body["files"]] == written
    assert body["properties"]["dativo.source-state"]
    assert committed_files(location, S3Settings()) == written
    rows = pq.read_table(written[0]).to_pylist()
    assert sorted((r["id"], r["name"], r["_run_id"]) for r in rows) == [(1, "Ann", result.run_id), (2, "Bob", result.run_id)]

    rejects_location = location + "__rejects"
    [reject_file] = committed_files(rejects_location, S3Settings())
    assert [(r["id"], r["_source_line"]) for r in pq.read_table(reject_file).to_pylist()] == [("x", 4)]
    assert not project.catalog().table_exists("testdomain.people")

    meta = materialization_metadata(result, "people")
    assert meta["commit_marker"] == str(marker)
    assert meta["dagster/row_count"] == 2
    [asset_spec] = list(build_definitions(project.specs_dir).get_assets_def("people").specs)
    assert set(asset_spec.kinds) == {"csv", "parquet", "s3"}

    # a file that no marker lists is not part of the table
    stray = Path(written[0]).with_name("stray.parquet")
    stray.write_bytes(Path(written[0]).read_bytes())
    second = project.materialize()
    assert second.success
    visible = committed_files(location, S3Settings())
    assert len(visible) == 2 and str(stray) not in visible
    assert visible[0] == written[0]


@pytest.mark.parametrize("missing", ["file", "glob"])
def test_nothing_readable_fails_the_run(project: Project, missing: str) -> None:
    path = "data/absent.csv" if missing == "file" else "data/none_*.csv"
    project.write_spec(base_spec(source={"type": "csv", "files": [{"path": path}]}))
    result = project.materialize()
    assert not result.success
    description = failure_description(result)
    assert str(project.data_dir / path.removeprefix("data/")) in description
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "people.people__extract"
