"""Many small source objects on SeaweedFS (issue 19): listed once, each fetched with one request, read ahead."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from dativo_dagster.sources import csv as csv_module
from dativo_dagster.sources.base import SOURCE_FILE, FileReport
from dativo_dagster.sources.csv import iter_source_batches, list_source_files
from dativo_dagster.spec import AssetSpecModel, LoadedSpec
from dativo_dagster.storage import S3Settings
from dativo_dagster_tests.conftest import base_spec

from .servers import SeaweedFS

FILES = 400
ROWS = 25


class _CountingFileSystem:
    def __init__(self, inner: Any, opened: list[str]):
        self._inner = inner
        self._opened = opened

    def open_input_stream(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._opened.append(path)
        return self._inner.open_input_stream(path, *args, **kwargs)

    def open_input_file(self, path: str) -> Any:
        self._opened.append(path)
        return self._inner.open_input_file(path)


def test_many_small_objects_are_each_fetched_once_and_read_in_order(seaweedfs: SeaweedFS, tmp_path: Path,
                                                                     monkeypatch) -> None:
    bucket = seaweedfs.create_bucket("manyfiles").removeprefix("s3://")
    client = seaweedfs.boto3_client()
    for index in range(FILES):
        ids = range(index * ROWS, (index + 1) * ROWS)
        body = "id,name\n" + "".join(f"{i},n{i}\n" for i in ids)
        client.put_object(Bucket=bucket, Key=f"events/part-{index:05d}.csv", Body=body.encode())
    s3 = S3Settings(seaweedfs.s3_endpoint, seaweedfs.region, seaweedfs.access_key, seaweedfs.secret_key)
    spec = AssetSpecModel.model_validate(
        base_spec("events", source={"type": "csv", "files": [{"path": f"s3://{bucket}/events/*.csv"}]})
    )
    loaded = LoadedSpec(spec=spec, path=tmp_path / "events.yaml", base_dir=tmp_path)

    opened: list[str] = []
    real = csv_module.filesystem_for

    def counting(uri: str, settings: S3Settings) -> tuple[Any, str]:
        fs, path = real(uri, settings)
        return _CountingFileSystem(fs, opened), path

    monkeypatch.setattr(csv_module, "filesystem_for", counting)
    started = time.perf_counter()
    files = list_source_files(loaded, s3)
    reports: list[FileReport] = []
    table = pa.Table.from_batches(list(iter_source_batches(files, loaded, s3, reports)))
    seconds = time.perf_counter() - started

    assert len(files) == FILES
    # one GET per object (header, rows and last record used to be three), fetched ahead on the shared pool
    assert len(opened) == FILES and len(set(opened)) == FILES
    assert table.num_rows == FILES * ROWS
    rows = table.select(["id", SOURCE_FILE]).to_pylist()
    assert [int(r["id"]) for r in rows] == list(range(FILES * ROWS))  # in file order, every row once
    assert all(r[SOURCE_FILE] == f"s3://{bucket}/events/part-{int(r['id']) // ROWS:05d}.csv" for r in rows)
    assert [r.rows for r in reports] == [ROWS] * FILES
    assert seconds < 60, f"{FILES} objects listed and read in {seconds:.2f} s"
