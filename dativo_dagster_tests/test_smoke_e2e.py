"""A first end-to-end run on the embedded default, read back with pyiceberg and DuckDB."""

from dativo_dagster_tests.conftest import base_spec, branch_rows, duckdb_branch_rows


def test_csv_lands_in_iceberg_branch(project, duckdb_connection):
    project.write_spec(base_spec())
    project.write_data("people.csv", "id,name\n1,Ann\n2,Bob\n")
    result = project.materialize()
    assert result.success
    table = project.table("testdomain.people")
    rows = branch_rows(table, "acme")
    assert sorted((r["id"], r["name"]) for r in rows) == [(1, "Ann"), (2, "Bob")]
    assert branch_rows(table, "main") == []
    duck = duckdb_branch_rows(duckdb_connection, table, "acme")
    assert sorted((r[0], r[1]) for r in duck) == [(1, "Ann"), (2, "Bob")]
