"""Commit: register a run's data files in an Iceberg table, atomically, on the tenant's branch."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    NamespaceAlreadyExistsError,
    TableAlreadyExistsError,
)
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import (
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.partitioning import PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table, Transaction
from pyiceberg.table.snapshots import Operation, Snapshot, ancestors_of
from pyiceberg.table.update.snapshot import ManageSnapshots
from pyiceberg.typedef import Record

from dativo_dagster.errors import CommitError, DuplicateKeysError, TerminalError, is_transient
from dativo_dagster.merge import (
    KEY_CHECKED_KEY,
    DuplicateKeys,
    KeySelection,
    MergeKeys,
    duplicate_keys,
    duplicate_keys_among,
    merge_keys_to_check,
)
from dativo_dagster.publish import fast_forward_main, main_before_publish, publish_to_main
from dativo_dagster.rewrite import RowSelection, SourceRemoval, remove_rows, remove_sources
from dativo_dagster.storage import S3Settings, map_per_object
from dativo_dagster.table_schema import Partitioner, arrow_schema
from dativo_dagster.table_state import (
    RUN_ID_KEY,
    SOURCE_STATE_KEY,
    STATE_FILE_KEY,
    BranchState,
    delete_state_file,
    large_source_share,
    read_branch_state,
    write_state_file,
)
from dativo_dagster.write import PartitionedParquetWriter, WriterSettings, WrittenFile

log = logging.getLogger(__name__)

ASSET_KEY = "dativo.asset"
ROWS_KEY = "dativo.rows"
MAIN = "main"
COMMIT_ATTEMPTS = 20
COMMIT_BACKOFF_SECONDS = (0.05, 2.0)
# Our own loop retries conflicts, re-reading the committed source state each time; pyiceberg's rebasing retry would
# re-apply a stale plan (a delete, a rewrite) and could load a file twice. pyiceberg reads this property from the
# metadata the transaction holds, so our commits go through a Table whose in-memory metadata carries it
# (_without_pyiceberg_retries): the table itself keeps its own value, for other engines' jobs (compaction, deletes).
PYICEBERG_RETRIES = "commit.retry.num-retries"
# Versions of this project before "2" wrote PYICEBERG_RETRIES=0 onto every table and forced it back at every commit;
# a table without this key is one of theirs, and its "0" (theirs, since they overwrote any other value) is removed
# once (_own_properties), after which the table's value is the user's.
PROPERTIES_VERSION_KEY = "dativo.table-properties-version"
TABLE_PROPERTIES = {
    "write.parquet.compression-codec": "snappy",
    "write.format.default": "parquet",
    PROPERTIES_VERSION_KEY: "2",
    # Each run appends one manifest; once a branch's head lists ``commit.manifest.min-count-to-merge`` of them (100
    # unless set), the next append merges them into manifests of ``commit.manifest.target-size-bytes`` (8 MB), as
    # Iceberg's Java appends do: a table loaded every few minutes would otherwise make every reader open one
    # manifest per run ever committed.
    "commit.manifest-merge.enabled": "true",
    # Every commit writes a metadata file: keep the newest 100 (the metadata log) and delete older ones.
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "100",
}


class CommitResult(BaseModel):
    """What one run's commit did to one table."""

    table: str
    branch: str
    snapshot_id: int | None = None
    files: int = 0
    rows: int = 0
    bytes: int = 0
    already_committed: bool = False
    location: str = ""
    metadata_location: str = ""
    partitions: list[str] = Field(default_factory=list)
    table_rows: int | None = None  # rows visible at the branch head after the commit
    replaced_sources: list[str] = Field(default_factory=list)  # source files whose earlier rows were replaced
    nothing_new: bool = False  # incremental run that found no new or changed source file
    # what the commit did to the branch, from its snapshots' summaries (None: not known, e.g. catalog: none)
    records_added: int | None = None  # rows its append added
    records_removed: int | None = None  # rows its delete took away for good (rewritten rows counted out)
    table_rows_before: int | None = None  # rows at the branch head it committed on
    table_rows_after: int | None = None  # rows at its own newest snapshot
    overwrite: bool = False  # the commit replaced every row of the branch
    main_snapshot_id: int | None = None  # publish: main's head after the commit (the branch's head, CONTRACT 9)
    # merge: the key counts of the committed snapshot's data files, taken before the catalog commit (unique_key)
    unique_key: dict[str, Any] | None = None


def ensure_table(
    catalog: Catalog,
    identifier: tuple[str, str],
    schema: Schema,
    partition_spec_for: Any,
    location: str | None,
    *,
    table: Table | None = None,
) -> Table:
    """Load the table, creating namespace and table from the spec when missing (``table``: the table as the caller
    loaded it already, not loaded again).

    The table is created at ``location`` (CONTRACT 4), except in a REST catalog: REST catalogs assign
    table locations themselves (and may accept data only under their own location), so theirs is kept.
    A spec that adds columns evolves the table schema; a changed partitioning is refused.
    """
    if table is not None:
        return _evolve(table, schema, partition_spec_for)
    if isinstance(catalog, RestCatalog):
        location = None
    namespace, name = identifier
    try:
        catalog.create_namespace_if_not_exists(namespace)
    except NamespaceAlreadyExistsError:
        pass
    except CommitError:
        # two first runs at once: the other one inserted the namespace between the SQL catalog's check and
        # its insert (a unique-key violation, not NamespaceAlreadyExistsError); anything else stays an error
        if not catalog.namespace_exists(namespace):
            raise
    full = f"{namespace}.{name}"
    if catalog.table_exists(full):
        table = catalog.load_table(full)
    else:
        try:
            table = catalog.create_table(
                full,
                schema=schema,
                partition_spec=partition_spec_for(schema),
                location=location,
                properties={**TABLE_PROPERTIES, **({"write.data.path": f"{location}/data"} if location else {})},
            )
            log.info("created table %s at %s", full, table.location())
        except TableAlreadyExistsError:
            table = catalog.load_table(full)
    return _evolve(table, schema, partition_spec_for)


def _evolve(table: Table, schema: Schema, partition_spec_for: Any) -> Table:
    current = table.schema()
    missing = [f for f in schema.fields if not _has(current, f.name)]
    if missing:
        with table.update_schema() as update:
            update.union_by_name(schema)
        table = table.refresh()
        log.info("added columns %s to %s", [f.name for f in missing], table.name())
    for field in schema.fields:
        existing = table.schema().find_field(field.name)
        if existing.field_type != field.field_type:
            raise TerminalError(
                f"table {'.'.join(table.name())}: column {field.name!r} is {existing.field_type} in the table"
                f" but {field.field_type} in the spec; change the type with a schema migration"
            )
    wanted = partition_spec_for(table.schema())
    if not _same_partitioning(table.spec(), wanted):
        raise TerminalError(
            f"table {'.'.join(table.name())}: partitioning {table.spec()} differs from the spec's {wanted};"
            " partition evolution is not supported yet"
        )
    return table


def _has(schema: Schema, name: str) -> bool:
    try:
        schema.find_field(name)
        return True
    except ValueError:
        return False


def _same_partitioning(a: PartitionSpec, b: PartitionSpec) -> bool:
    key = lambda spec: [(f.source_id, str(f.transform), f.name) for f in spec.fields]  # noqa: E731
    return key(a) == key(b)


@dataclass(frozen=True)
class CommittedRun:
    """A run's earlier commit: its newest snapshot (which snapshot expiry may since have removed)."""

    snapshot_id: int


def find_run_commit(table: Table, branch: str, run_id: str, state: BranchState | None = None) -> CommittedRun | None:
    """The newest snapshot on ``branch`` (or main) made by ``run_id``, if the run already committed.

    Read from the branch state at the head (``state`` when the caller has it), so it costs the same however
    long the history, and still knows runs whose snapshots were expired.
    """
    for ref in dict.fromkeys((branch, MAIN)):
        runs = (state if state is not None and ref == branch else read_branch_state(table, ref)).runs
        if run_id in runs:
            return CommittedRun(runs[run_id])
    return None


def branch_row_count(table: Table, branch: str) -> int:
    """Rows visible at the head of ``branch``, from its snapshot summary (0 when the branch does not exist)."""
    head = table.snapshot_by_name(branch)
    if head is None or head.summary is None:
        return 0
    return int(head.summary.get("total-records") or 0)


@dataclass(frozen=True)
class RunCommitCounts:
    """Row counts of one run's commit on a branch, from the summaries of the snapshots it made."""

    records_added: int
    records_removed: int
    table_rows_before: int
    table_rows_after: int

    def as_update(self) -> dict[str, int]:
        return {"records_added": self.records_added, "records_removed": self.records_removed,
                "table_rows_before": self.table_rows_before, "table_rows_after": self.table_rows_after}


def run_commit_counts(table: Table, start: Snapshot | None, run_id: str) -> RunCommitCounts | None:
    """What the commit of ``run_id`` did, read from its snapshots at or below ``start`` (None: none found).

    The commit's newest snapshot is its append (an overwrite without rows has none); a delete that rewrote files
    adds their surviving rows back in its own summary, so what it took away for good is its deleted minus its
    added records.
    """
    ours: list[Snapshot] = []
    before: Snapshot | None = None
    for snapshot in ancestors_of(start, table.metadata) if start is not None else ():
        if _summary_value(snapshot, RUN_ID_KEY) == run_id:
            ours.append(snapshot)
        elif ours:
            before = snapshot
            break
    if not ours:
        return None
    newest = ours[0]
    is_append = newest.summary is not None and newest.summary.operation == Operation.APPEND
    added = _summary_int(newest, "added-records") if is_append else 0
    net = sum(_summary_int(s, "added-records") - _summary_int(s, "deleted-records") for s in ours)
    return RunCommitCounts(
        records_added=added,
        records_removed=added - net,
        table_rows_before=_summary_int(before, "total-records") if before is not None else 0,
        table_rows_after=_summary_int(newest, "total-records"),
    )


def _summary_value(snapshot: Snapshot, key: str) -> str | None:
    return snapshot.summary.get(key) if snapshot.summary is not None else None


def _summary_int(snapshot: Snapshot, key: str) -> int:
    return int(_summary_value(snapshot, key) or 0)


def _data_files(table: Table, files: Sequence[WrittenFile], partitioner: Partitioner, run_id: str) -> list[DataFile]:
    """The Iceberg entries of the written files, with column statistics from their footers.

    On object storage the footers are fetched all at once (``storage.map_per_object``), as pyiceberg's own
    ``add_files`` does; local ones one after the other.

    Raises:
        TerminalError: a written file is gone (the maintenance job removes unreferenced files once they are old
            enough, e.g. before a run re-executed days later commits): the commit never names a missing file.
    """
    schema = table.schema()
    stats_plan = compute_statistics_plan(schema, table.metadata.properties)
    column_mapping = parquet_path_to_id_mapping(schema)

    def footer(written: WrittenFile) -> pq.FileMetaData:
        try:
            with table.io.new_input(written.uri).open() as stream:
                return pq.read_metadata(stream)
        except FileNotFoundError:
            raise TerminalError(
                f"run {run_id}: data file {written.uri} written for this commit to {'.'.join(table.name())} is gone"
                " (the maintenance job removes files no commit references once they are old enough); nothing was"
                " committed: materialize the asset again in a new run"
            ) from None

    out = []
    for written, parquet_metadata in zip(files, map_per_object(footer, files), strict=True):
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=parquet_metadata, stats_columns=stats_plan, parquet_column_mapping=column_mapping
        )
        out.append(
            DataFile.from_args(
                content=DataFileContent.DATA,
                file_path=written.uri,
                file_format=FileFormat.PARQUET,
                partition=Record(*partitioner.from_json(written.partition_values)),
                file_size_in_bytes=written.size_bytes,
                sort_order_id=None,
                spec_id=table.metadata.default_spec_id,
                equality_ids=None,
                key_metadata=None,
                **statistics.to_serialized_dict(),
            )
        )
    return out


def _ensure_branch(table: Table, branch: str) -> Table:
    if branch == MAIN or table.metadata.refs.get(branch) is not None:
        return table
    if table.current_snapshot() is None:
        # a table without any snapshot refuses writes to a branch: give main an empty one and start the branch
        # there, in one commit (a new table's first run makes one catalog commit less)
        try:
            with _without_pyiceberg_retries(table).transaction() as tx:
                tx.update_snapshot(snapshot_properties={"dativo.operation": "init"}, branch=MAIN).fast_append().commit()
                head = tx.table_metadata.current_snapshot_id
                assert head is not None
                ManageSnapshots(tx).create_branch(head, branch).commit()
        except CommitFailedException:
            pass  # another run gave main its first snapshot: start the branch at main's head as below
        table = table.refresh()
        if table.metadata.refs.get(branch) is not None:
            return table
    snapshot = table.current_snapshot()
    assert snapshot is not None
    try:
        # an autocommitting transaction: the branch must exist (at main's head) before anything is appended
        # to it, or pyiceberg starts a parentless branch
        table.manage_snapshots().create_branch(snapshot.snapshot_id, branch).commit()
    except CommitFailedException:
        table = table.refresh()
        if table.metadata.refs.get(branch) is None:
            raise
    return table.refresh()


def _try_write_state_file(
    table: Table, state: Any, *, keep_sources: bool, own_sources: dict[str, str] | None = None
) -> str | None:
    """The commit's state file, or None when no folder of the table takes it.

    A REST catalog may let clients write only Iceberg's own files under its metadata folder (SeaweedFS's does:
    Access Denied); the file then goes to ``<table location>/_dativo_state/`` (``table_state.write_state_file``).
    Without any file the commit is still complete: its summary holds its own source state and readers walk the
    branch's history instead (slower on a long history, which snapshot expiry keeps short).
    """
    try:
        return write_state_file(table, state, keep_sources=keep_sources, own_sources=own_sources)
    except OSError as exc:
        log.warning(
            "could not write the branch state file of %s (%s); the state is read from the history",
            ".".join(table.name()), exc,
        )
        return None


def commit_files(
    table: Table,
    *,
    branch: str,
    files: Sequence[WrittenFile],
    partitioner: Partitioner,
    run_id: str,
    properties: Mapping[str, str],
    overwrite: bool = False,
    sources: Mapping[str, str] | None = None,
    replace_sources: bool = False,
    record_sources: bool = False,
    writer: WriterSettings | None = None,
    publish: bool = False,
    merge: MergeKeys | None = None,
    unique_key: Sequence[str] | None = None,
    read_from: Mapping[str, str] | None = None,
    window: RowSelection | None = None,
) -> CommitResult:
    """Add ``files`` to ``branch`` in one atomic commit.

    ``read_from`` (a cursor run: each unit's mark when the run read it) must still be what the branch holds when the
    commit lands: a run whose unit another run committed meanwhile read the same rows, and is refused (terminal).

    With ``overwrite`` the commit replaces all rows. With ``replace_sources`` it first deletes the rows
    that earlier commits brought from any of ``sources`` (a changed file, or a file another run loaded
    concurrently), in the same transaction, so the branch holds each source file exactly once: data files that hold
    only such rows are deleted, files that mix them with other sources' rows are rewritten with ``writer`` (the run's
    writer settings, so the new files keep CONTRACT 4; see ``rewrite.py``). With
    ``record_sources`` a run whose sources brought no row at all (empty files, every row quarantined)
    still commits an empty snapshot recording their versions, so that later runs do not read them again. With
    ``merge`` (``write_mode: merge``) the rows of the branch whose key the run brought are taken away in the same
    commit (``merge.KeySelection``, rewriting shared files like ``replace_sources``), so every key occurs once.
    With ``window`` (a partition's run: ``partitions.WindowSelection``) the branch's rows in the partition's window
    are taken away in the same commit, so the branch holds the window's rows of this run only.

    Each commit also writes the branch's state before it (source files held, runs committed) to a small file
    that its summary names (see ``table_state``), so the next commit and the next run read the state from the
    head alone, and snapshot expiry forgets nothing.

    Idempotent per run: if ``run_id`` already committed to the branch, nothing is done again. A commit
    that loses a race with another writer is retried here on a fresh view of the table, checking again
    before each attempt whether the run's commit already landed and which sources the branch now holds.

    With ``publish`` the same catalog commit also moves ``main`` to the branch's new head (``publish.py``), each ref
    required to be where this attempt found it; a run with nothing to commit still brings ``main`` up to the branch.

    With ``unique_key`` (a merge: its blocking ``unique_key`` check) the key columns of the data files the commit
    would leave on the branch are counted on the transaction's staged snapshot, before the catalog commit: a key
    found twice fails the run with nothing committed or published (``DuplicateKeysError``); the counts are returned.

    Raises:
        CommitError: the catalog refused the commit (transient; the caller may retry).
        MainDivergedError: with ``publish``, ``main`` holds a snapshot the branch has never held (terminal).
    """
    name = ".".join(table.name())
    result = CommitResult(
        table=name,
        branch=branch,
        files=len(files),
        rows=sum(f.record_count for f in files),
        bytes=sum(f.size_bytes for f in files),
        location=table.location(),
        partitions=sorted({f.partition_path for f in files if f.partition_path}),
        overwrite=overwrite,
    )
    snapshot_properties = {**properties, RUN_ID_KEY: run_id, ROWS_KEY: str(result.rows)}
    data_files: list[DataFile] | None = None
    last_error: Exception | None = None
    table = _own_properties(table)
    plan = functools.partial(_plan, branch=branch, run_id=run_id, files=files, sources=sources, overwrite=overwrite,
                             replace_sources=replace_sources, record_sources=record_sources,
                             merging=merge is not None or window is not None, read_from=read_from)
    merge_keys: pa.Table | None = None
    for attempt in range(COMMIT_ATTEMPTS):
        if attempt:
            time.sleep(random.uniform(*COMMIT_BACKOFF_SECONDS) * min(attempt, 5) / 5)
            table = table.refresh()
        state_file: str | None = None
        removal: SourceRemoval | None = None
        try:
            table, decided = _plan_on_branch(table, branch, plan)
            if publish and (decided.previous is not None or not decided.needed):
                table = fast_forward_main(_without_pyiceberg_retries(table), branch)
            main_before = main_before_publish(table, branch) if publish and decided.needed else None
            if decided.previous is not None:
                log.info("run %s already committed snapshot %s to %s@%s", run_id, decided.previous.snapshot_id, name,
                         branch)
                counts = run_commit_counts(table, table.snapshot_by_id(decided.previous.snapshot_id), run_id)
                return result.model_copy(
                    update={"snapshot_id": decided.previous.snapshot_id, "already_committed": True,
                            "metadata_location": table.metadata_location, **_published(table, publish),
                            "table_rows": branch_row_count(table, branch),
                            **(counts.as_update() if counts is not None else {})}
                )
            if not decided.needed:
                rows = branch_row_count(table, branch)
                return result.model_copy(update={"table_rows": rows, "records_added": 0, "records_removed": 0,
                                                 "table_rows_before": rows, "table_rows_after": rows,
                                                 **_published(table, publish)})
            if data_files is None:
                data_files = _data_files(table, files, partitioner, run_id)
            # the rows the replaced sources brought, taken off this head (rewriting files they share with others)
            if merge is not None and merge_keys is None:
                merge_keys = merge.read()
            removal = _remove_sources(table, branch, decided.replaced, partitioner, writer, merge_keys, window)
            replacement = None
            if removal is not None:
                replacement = (removal.deleted, _data_files(table, removal.written, partitioner, run_id))
            # the state before this commit, for the next one to read instead of this branch's whole history
            # a run over many files keeps its own share of the state in the state file, not in the summary
            own_sources = large_source_share(snapshot_properties)
            state_file = _try_write_state_file(table, decided.state, keep_sources=not overwrite,
                                               own_sources=own_sources)
            properties_now = {**snapshot_properties, **({STATE_FILE_KEY: state_file} if state_file is not None else {})}
            if state_file is not None and own_sources:
                properties_now.pop(SOURCE_STATE_KEY)
            if unique_key:
                properties_now[KEY_CHECKED_KEY] = "true"
            checked = _commit_once(table, branch, data_files, properties_now, overwrite, replacement,
                                   publish=publish, main_before=main_before, unique_key=unique_key,
                                   run_keys=merge_keys)
        except DuplicateKeysError:
            _discard(removal)  # never committed: nothing names the rewritten files or the state file
            delete_state_file(table, state_file)
            raise
        except CommitStateUnknownException as exc:
            last_error = exc  # the commit may have landed, naming the state file and the rewritten files: keep them
        except (CommitFailedException, ValueError) as exc:
            # a concurrent commit on another branch can make ours stale: "Cannot add snapshot with
            # sequence number N older than last sequence number N"; pyiceberg does not retry it
            _discard(removal)  # refused, or never committed: nothing names the rewritten files
            if isinstance(exc, ValueError) and "sequence number" not in str(exc):
                raise
            delete_state_file(table, state_file)  # refused: nothing names it
            last_error = exc
        except OSError as exc:
            _discard(removal)
            if not is_transient(exc):
                raise  # a refused permission or a missing file stays terminal: retrying cannot help
            raise CommitError(f"commit to {name}@{branch} failed: {exc}") from exc
        except BaseException:
            _discard(removal)
            raise
        else:
            table = table.refresh()
            head = table.snapshot_by_name(branch)
            counts = run_commit_counts(table, head, run_id)
            return result.model_copy(
                update={"snapshot_id": head.snapshot_id if head else None, "metadata_location": table.metadata_location,
                        "table_rows": branch_row_count(table, branch), "replaced_sources": decided.replaced,
                        **(counts.as_update() if counts is not None else {}), **_published(table, publish),
                        "unique_key": dataclasses.asdict(checked) if checked is not None else None}
            )
        # the text only: a log record holding the exception keeps its frames (tables, catalog connections)
        # alive for as long as any handler keeps the record
        log.warning("commit to %s@%s conflicted (attempt %d of %d): %s", name, branch, attempt + 1, COMMIT_ATTEMPTS,
                    str(last_error))
    raise CommitError(f"commit to {name}@{branch} failed after {COMMIT_ATTEMPTS} attempts: {last_error}")


@dataclass(frozen=True)
class _Plan:
    """What one commit attempt has to do, decided from the branch state at the head it will commit on."""

    state: BranchState
    previous: CommittedRun | None
    replaced: list[str]
    needed: bool


def _plan(
    table: Table,
    branch: str,
    run_id: str,
    files: Sequence[WrittenFile],
    sources: Mapping[str, str] | None,
    *,
    overwrite: bool,
    replace_sources: bool,
    record_sources: bool,
    merging: bool = False,
    read_from: Mapping[str, str] | None = None,
) -> _Plan:
    state = read_branch_state(table, branch)
    previous = find_run_commit(table, branch, run_id, state)
    moved = sorted(uri for uri, mark in (read_from or {}).items() if state.sources.get(uri, "") != mark)
    if previous is None and moved:
        raise TerminalError(
            f"{'.'.join(table.name())}@{branch}: another run committed rows of {', '.join(moved)} after run {run_id}"
            " read them from the mark it had then; nothing of this run was committed (it would load those rows"
            " twice): materialize the asset again"
        )
    replaced: list[str] = []
    unrecorded = False
    if replace_sources and sources and not overwrite:
        replaced = sorted(uri for uri in sources if uri in state.sources)
    if sources and not overwrite:
        # a source read at a version the branch does not hold yet must be recorded even when it
        # brought no row (empty, or every row quarantined; a cursor's new mark), or every later run reads it again
        unrecorded = record_sources and any(state.sources.get(uri) != version for uri, version in sources.items())
    needed = previous is None and bool(files or overwrite or replaced or unrecorded or merging)
    return _Plan(state, previous, replaced, needed)


def _plan_on_branch(table: Table, branch: str, plan: Callable[[Table], _Plan]) -> tuple[Table, _Plan]:
    """Plan the attempt; when it commits, make sure the branch exists, and plan again if that moved its head."""
    decided = plan(table)
    if decided.needed:
        table = _ensure_branch(table, branch)
        head = table.snapshot_by_name(branch)
        if (head.snapshot_id if head is not None else None) != decided.state.head:
            decided = plan(table)  # the branch was just made from main's head (by us or another run)
    return table, decided


def _own_properties(table: Table) -> Table:
    """Give a table made before a property of TABLE_PROPERTIES existed that property; any property a user has set on
    the table stays as it is. On a table of a version before PROPERTIES_VERSION_KEY, the ``commit.retry.num-retries=0``
    that version wrote is removed (once: the table gets the key in the same commit)."""
    properties = table.metadata.properties
    missing = {key: value for key, value in TABLE_PROPERTIES.items() if key not in properties}
    legacy_switch = PROPERTIES_VERSION_KEY not in properties and properties.get(PYICEBERG_RETRIES) == "0"
    if not missing:
        return table
    try:
        with table.transaction() as tx:
            tx.set_properties(missing)
            if legacy_switch:
                tx.remove_properties(PYICEBERG_RETRIES)
    except CommitFailedException:
        pass  # another writer set them (or changed the table): the next refresh shows it
    else:
        if legacy_switch:
            log.info("removed %s=0, written by an earlier version, from %s", PYICEBERG_RETRIES, ".".join(table.name()))
    return table.refresh()


def _without_pyiceberg_retries(table: Table) -> Table:
    """``table`` as a transaction of ours commits it: its in-memory metadata turns pyiceberg's own retries off.

    pyiceberg reads ``commit.retry.num-retries`` from the metadata the transaction holds when it commits; the catalog
    receives only the transaction's updates, so the table's stored properties never change.
    """
    metadata = table.metadata.model_copy(
        update={"properties": {**table.metadata.properties, PYICEBERG_RETRIES: "0"}}
    )
    return Table(table.name(), metadata, table.metadata_location, table.io, table.catalog, table.config)


def _remove_sources(
    table: Table, branch: str, replaced: Sequence[str], partitioner: Partitioner, writer: WriterSettings | None,
    merge_keys: pa.Table | None = None,
    window: RowSelection | None = None,
) -> SourceRemoval | None:
    """The replaced sources' rows, and the rows with a merge's keys, taken off the head of ``branch``
    (``rewrite.remove_rows``), or None."""
    if not replaced and merge_keys is None and window is None:
        return None

    def new_writer() -> PartitionedParquetWriter:
        if writer is None:
            raise TerminalError(
                f"{'.'.join(table.name())}@{branch}: replacing the rows of {len(replaced)} source file(s) rewrites"
                " data files they share with other sources, which needs the run's writer settings"
            )
        return writer.writer(f"{table.location().rstrip('/')}/data", arrow_schema(table.schema()), partitioner)

    s3 = writer.s3 if writer is not None else S3Settings()
    if window is not None:
        return remove_rows(table, branch, window, new_writer, s3)  # partitions allow no replaced sources or merge
    if merge_keys is not None:
        selection = KeySelection(merge_keys, table.schema(), sorted(set(replaced)))
        return remove_rows(table, branch, selection, new_writer, s3)
    return remove_sources(table, branch, replaced, new_writer, s3)


def _discard(removal: SourceRemoval | None) -> None:
    if removal is not None:
        removal.discard()


def _published(table: Table, publish: bool) -> dict[str, int | None]:
    """The result's ``main_snapshot_id`` when publishing."""
    main = table.snapshot_by_name(MAIN) if publish else None
    return {"main_snapshot_id": main.snapshot_id} if main is not None else {}


def _commit_once(
    table: Table,
    branch: str,
    data_files: Sequence[DataFile],
    snapshot_properties: Mapping[str, str],
    overwrite: bool,
    replacement: tuple[Sequence[DataFile], Sequence[DataFile]] | None = None,
    *,
    publish: bool = False,
    main_before: int | None = None,
    unique_key: Sequence[str] | None = None,
    run_keys: pa.Table | None = None,
) -> DuplicateKeys | None:
    """One transaction, one new metadata version: everything deleted (overwrite), or the replaced sources' files
    exchanged for their survivors' (``replacement``: files to delete, files to add), then the append; with
    ``publish``, ``main`` moves from ``main_before`` to the branch's new head in the same catalog commit.

    With ``unique_key`` the staged snapshot's keys are counted before the catalog commit (returned): the merge's
    ``run_keys`` and the keys of files added since the last checked merge (``merge.merge_keys_to_check``; all keys
    without ``run_keys``); a key found twice raises ``DuplicateKeysError`` and the transaction is not committed."""
    checked: DuplicateKeys | None = None
    properties = dict(snapshot_properties)
    with _without_pyiceberg_retries(table).transaction() as tx:
        if overwrite:
            head = table.snapshot_by_name(branch)
            if head is not None and table.scan(snapshot_id=head.snapshot_id).plan_files():
                # AlwaysTrue matches every file whole: pyiceberg deletes files and rewrites none
                tx.delete(AlwaysTrue(), snapshot_properties=properties, branch=branch)
        elif replacement is not None and replacement[0]:
            deleted, survivors = replacement
            with tx.update_snapshot(snapshot_properties=properties, branch=branch).overwrite() as exchange:
                for data_file in deleted:
                    exchange.delete_data_file(data_file)
                for data_file in survivors:
                    exchange.append_data_file(data_file)
        if data_files or not overwrite:
            # without data files (a changed source now empty, a new one without valid rows) the append
            # is empty: its snapshot records the source state all the same
            # merge_append: a fast append that merges the branch's manifests once there are enough (TABLE_PROPERTIES)
            with tx.update_snapshot(snapshot_properties=properties, branch=branch).merge_append() as append:
                for data_file in data_files:
                    append.append_data_file(data_file)
        if unique_key:
            checked = _staged_unique_key(table, tx, branch, unique_key, run_keys)
        if publish:
            publish_to_main(tx, branch, main_before)
    return checked


def _staged_unique_key(table: Table, tx: Transaction, branch: str, key: Sequence[str],
                       run_keys: pa.Table | None = None) -> DuplicateKeys:
    """Count the keys of the snapshot ``tx`` has staged for ``branch`` (its manifests are written already): the data
    files this commit would leave on the branch; with ``run_keys`` (a merge) only the keys it could repeat, in the
    files that can hold them. Raises ``DuplicateKeysError`` when a key occurs twice."""
    staged = Table(table.name(), tx.table_metadata, table.metadata_location, table.io, table.catalog)
    # examples stay out of the message (a key may be PII)
    found = (duplicate_keys_among(staged, branch, key, merge_keys_to_check(table, branch, key, run_keys))
             if run_keys is not None else duplicate_keys(staged, branch, key))
    if found.duplicate_keys:
        raise DuplicateKeysError(table=".".join(table.name()), branch=branch, key=list(key), found=found)
    return found


def source_state_json(state: Mapping[str, str]) -> str:
    """The source files and their versions, as stored in the snapshot summary."""
    return json.dumps(dict(sorted(state.items())), separators=(",", ":"))
