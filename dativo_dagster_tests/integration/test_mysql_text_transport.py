"""The MySQL source's texts arrive exactly as the server renders them, whatever characters they hold: each row
travels as one JSON object of the columns' texts (docs/sources/mysql.md, "Speed"), decoded by Arrow."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from dativo_dagster.sources import source_for
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import Project, base_spec

from .servers import MariaDBServer

DB = "transport"
URL_ENV = "DATIVO_TEST_TRANSPORT_URL"
# (id, text, doc): texts that a transport which joins, splits or re-encodes would change
AWKWARD = [
    (1, 'a "quoted" word', '{"b":  [1,  2]}'),
    (2, "back\\slash and \\n as two characters", "[]"),
    (3, "new\nline, tab\tand carriage\rreturn", None),
    (4, "control \x01\x1f and DEL \x7f", '"just a string"'),
    (5, "unicode: € ü 𝄞 and the line separator \u2028", "null"),
    (6, '{"c0": "looks like our own row"}', '{"c0": 1}'),
    (7, "", "1"),
    (8, None, None),
    (9, "   spaces kept   ", "true"),
]


@pytest.fixture(scope="module")
def transport(mariadb: MariaDBServer) -> MariaDBServer:
    mariadb.execute(f"CREATE DATABASE IF NOT EXISTS {DB}")
    mariadb.execute("CREATE TABLE awkward (id INT PRIMARY KEY, txt TEXT, doc JSON) CHARACTER SET utf8mb4", DB)
    conn = mariadb.connect(DB)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO awkward VALUES (%s, %s, %s)", AWKWARD)
    conn.close()
    return mariadb


def test_every_text_arrives_exactly(transport: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = Project(tmp_path / "project")
    schema = [{"name": "id", "type": "integer", "required": True}, {"name": "txt", "type": "string"},
              {"name": "doc", "type": "string"}]
    spec = base_spec("awkward", schema=schema)
    spec["source"] = {"type": "mysql", "connection": {"url_env": URL_ENV}, "table": "awkward"}
    path = project.write_spec(spec)
    monkeypatch.setenv(URL_ENV, f"mysql://root@{transport.host}:{transport.port}/{DB}")
    from dativo_dagster.spec import load_spec_file  # noqa: PLC0415

    loaded, problems = load_spec_file(path, project.root)
    assert loaded is not None, problems
    source = source_for(loaded, S3Settings())
    table = pa.Table.from_batches(list(source.read(source.list_units(), [])))
    got = sorted(zip(table.column("id").to_pylist(), table.column("txt").to_pylist(), table.column("doc").to_pylist(),
                     strict=True), key=lambda row: int(row[0]))
    assert got == [(str(i), txt, doc) for i, txt, doc in AWKWARD]
