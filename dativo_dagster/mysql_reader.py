"""MySQL rows read by ConnectorX in a process of its own, handed over as Arrow batches in a file on disk.

ConnectorX reads rows in native code, several times faster than a Python driver, but its stream holds the GIL while
it waits for the next batch (which would stall the pipeline's other stages) and reads ahead into memory without
limit when its consumer is slower. So it runs in a child process (``python -m dativo_dagster.mysql_reader``) that
appends each batch to a file as soon as it comes and tells the parent where it is; the parent's memory holds one
batch, the child's a few. The file is a series of segments of about ``SEGMENT_BYTES``, each removed once the parent
has read past it: the spool holds the rows the parent has not taken yet, not the whole table. The request (URL with the password, statement, settings) goes over the child's stdin,
never its command line. Kept free of the package's heavier imports: the child only needs pyarrow and connectorx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

import pyarrow as pa

JOIN_SECONDS = 10
SEGMENT_BYTES = 64 << 20  # the child starts a new spool file beyond this; the parent removes each one it has read


class ReaderError(RuntimeError):
    """What ConnectorX raised in the child (its text, for the source to classify), or the child's own end."""


def read_batches(url: str, select: str, settings: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """``select``'s rows as record batches of text columns, read by ConnectorX in a child process.

    Raises:
        ReaderError: ConnectorX's error text (a server error with its code, a lost connection), or the child
            ended without a word (its exit code and the last line it wrote to stderr).
    """
    folder = tempfile.mkdtemp(prefix="dativo-mysql-")
    with open(os.path.join(folder, "stderr"), "wb") as stderr:
        child = subprocess.Popen(  # noqa: S603 - this package's own module, with this interpreter
            [sys.executable, "-m", "dativo_dagster.mysql_reader"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )
    fd, segment = None, -1
    try:
        assert child.stdin is not None and child.stdout is not None
        request = {"url": url, "select": select, "settings": list(settings), "batch_rows": batch_rows,
                   "folder": folder, "segment_bytes": SEGMENT_BYTES}
        child.stdin.write(json.dumps(request).encode())
        child.stdin.close()
        schema = None
        for line in child.stdout:
            kind, _, rest = line.decode().rstrip("\n").partition(" ")
            if kind == "end":
                return
            if kind == "error":
                raise ReaderError(json.loads(rest))
            number, offset, size = map(int, rest.split())
            if number != segment:  # the child went on to a new segment: the one read so far is done with
                if fd is not None:
                    os.close(fd)
                    os.unlink(segment_path(folder, segment))
                fd, segment = os.open(segment_path(folder, number), os.O_RDONLY), number
            data = pa.py_buffer(os.pread(fd, size, offset))
            if kind == "schema":
                schema = pa.ipc.read_schema(data)
            else:
                yield pa.ipc.read_record_batch(data, schema)
        child.wait(JOIN_SECONDS)
        raise ReaderError(f"the reading process ended with exit code {child.returncode}: {_last_line(folder)}")
    finally:
        if child.poll() is None:
            child.kill()  # a read stopped early: the server drops the statement with the connection
        child.wait(JOIN_SECONDS)
        if fd is not None:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def segment_path(folder: str, number: int) -> str:
    """The spool's segment file ``number`` (0, 1, ...)."""
    return os.path.join(folder, f"batches-{number:06d}.arrow")


def _last_line(folder: str) -> str:
    with open(os.path.join(folder, "stderr"), "rb") as f:
        lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "nothing on stderr"


def _as_string(column: pa.Array) -> pa.Array:
    """A text column as Arrow ``string``: the server sends some texts (``CONVERT(... USING utf8mb4)`` of a TEXT, a
    BLOB's hex) with a binary column type, which ConnectorX reads as bytes; they are UTF-8 text all the same."""
    return column if column.type == pa.string() else column.cast(pa.string())


def _serve() -> None:
    """The child: read the request from stdin, append the schema and each batch to the file, say where on stdout."""
    import connectorx as cx  # noqa: PLC0415 - only the child needs it

    request = json.loads(sys.stdin.read())
    out = sys.stdout
    try:
        reader = cx.read_sql(
            request["url"], request["select"], return_type="arrow_stream", batch_size=request["batch_rows"],
            protocol="binary", pre_execution_query=request["settings"],
        )
        number, spool, offset, schema = 0, None, 0, None
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                if batch.num_rows == 0:
                    continue
                batch = pa.RecordBatch.from_arrays([_as_string(c) for c in batch.columns], names=batch.schema.names)
                messages = [] if schema is not None else [("schema", batch.schema.serialize())]
                schema = batch.schema
                if spool is not None and offset >= request["segment_bytes"]:  # the parent removes the full one
                    spool.close()
                    number, spool, offset = number + 1, None, 0
                if spool is None:
                    spool = open(segment_path(request["folder"], number), "wb")  # noqa: SIM115 - closed above/below
                for kind, data in [*messages, ("batch", batch.serialize())]:
                    spool.write(data)
                    spool.flush()
                    out.write(f"{kind} {number} {offset} {data.size}\n")
                    out.flush()
                    offset += data.size
        finally:
            if spool is not None:
                spool.close()
    except BaseException as exc:  # noqa: BLE001 - RuntimeError or a Rust panic (PanicException): the parent decides
        out.write("error " + json.dumps(str(exc)) + "\n")
        out.flush()
        return
    out.write("end\n")
    out.flush()


if __name__ == "__main__":
    _serve()
