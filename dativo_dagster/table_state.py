"""Committed branch state (source files loaded, runs committed), compacted at every commit into a small file.

Every commit names in its snapshot summary its own share of the state (``SOURCE_STATE_KEY``: the source files it
read at their versions; ``RUN_ID_KEY``: its run) and, under ``STATE_FILE_KEY``, a JSON file next to the table
metadata that holds the state of the branch just before it: every source file the branch holds at its latest
version, and the newest ``RUNS_REMEMBERED`` runs that committed with their snapshots. Reading the state of a
branch therefore needs its head snapshot and one small file, however many snapshots the table keeps, and
expiring old snapshots forgets nothing.

The state lives in a file and not in the summary itself because summaries are copied into every table metadata
version (which pyiceberg also copies many times per commit): a state of 100,000 files inline in every snapshot
would make each commit rewrite megabytes per snapshot kept. A summary carries only the file's location. For the
same reason a commit that read more than ``SUMMARY_SOURCES_MAX`` files keeps its own share in its state file
too (which then holds the state just after it), not in its summary: one run over 10,000 files would otherwise
add a megabyte to every later metadata version.

Tables written before the file existed (or whose file is gone) are read as before: by walking the branch
lineage from the head and merging each snapshot's own share, the newest first, down to the first snapshot
that names a readable state file, or to the root.

State files live in the table's metadata folder, or in ``<table location>/_dativo_state/`` where a REST catalog
refuses other files there; with neither writable a commit names none, and readers walk the history.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of

from dativo_dagster.errors import TerminalError

log = logging.getLogger(__name__)

SOURCE_STATE_KEY = "dativo.source-state"
RUN_ID_KEY = "dativo.run-id"
STATE_FILE_KEY = "dativo.state-file"
STATE_FILE_PREFIX = "dativo-state-"
# Where state files go when the metadata folder refuses them: a REST catalog may let clients write there only
# Iceberg's own files. SeaweedFS's takes *.avro and *.metadata.json under metadata/, *.parquet under data/, and
# elsewhere under the table location only folders named like hidden ones (a leading underscore, no hyphen), which
# Hadoop and Spark listings skip too.
STATE_FOLDER = "_dativo_state"
STATE_FILE_FORMAT = 1
# a run re-executed after this many later commits to its branch is no longer recognised by its run id (an
# incremental spec still finds its files in the source state); ~80 bytes each, so the file stays under 1 MB
RUNS_REMEMBERED = 10_000
# a commit's own share of the source state goes into its summary up to this many files (see the module docstring)
SUMMARY_SOURCES_MAX = 100


def parse_source_state(text: str | None) -> dict[str, str]:
    """The ``{uri: version}`` mapping stored in a snapshot summary or a commit marker."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        log.warning("ignoring unreadable source state %r", text[:80])
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


class StateFile(BaseModel):
    """The content of a state file: the branch's state just before the commit whose summary names the file."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: int = STATE_FILE_FORMAT
    sources: dict[str, str] = {}
    runs: list[tuple[str, int]] = []  # (run id, its newest snapshot id), newest run first


@dataclass(frozen=True)
class BranchState:
    """What a branch holds at its head: source files at their versions, and the runs that committed to it."""

    head: int | None = None  # the snapshot the state was read at (None: the branch does not exist)
    sources: dict[str, str] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)  # run id -> its newest snapshot id, newest run first
    snapshots_read: int = 0  # snapshots walked to read it: 1 for a branch whose head names a state file
    compacted: bool = False  # a state file was found; False: the whole lineage was walked


def _properties(snapshot: Snapshot) -> dict[str, str]:
    return snapshot.summary.additional_properties if snapshot.summary is not None else {}


def state_file_of(snapshot: Snapshot) -> str | None:
    """The state file a snapshot's summary names, if any."""
    return _properties(snapshot).get(STATE_FILE_KEY)


def source_state_of(snapshot: Snapshot) -> dict[str, str]:
    """The source files the commit of ``snapshot`` itself read, at their versions (its own share of the state)."""
    return parse_source_state(_properties(snapshot).get(SOURCE_STATE_KEY))


def read_branch_state(table: Table, ref: str) -> BranchState:
    """The state of ``ref`` (a branch, or main) at its head, from the head's summary and state file.

    Raises:
        OSError: the state file could not be read for another reason than being missing (transient).
        TerminalError: the state file was written by a newer, incompatible version.
    """
    head = table.snapshot_by_name(ref)
    if head is None:
        return BranchState()
    sources: dict[str, str] = {}
    runs: dict[str, int] = {}
    read = 0
    for snapshot in ancestors_of(head, table.metadata):
        read += 1
        for uri, version in source_state_of(snapshot).items():
            sources.setdefault(uri, version)
        if run_id := _properties(snapshot).get(RUN_ID_KEY):
            runs.setdefault(run_id, snapshot.snapshot_id)
        state_file = _read_state_file(table, state_file_of(snapshot))
        if state_file is not None:
            for uri, version in state_file.sources.items():
                sources.setdefault(uri, version)
            for run_id, snapshot_id in state_file.runs:
                runs.setdefault(run_id, snapshot_id)
            return BranchState(head.snapshot_id, sources, runs, read, compacted=True)
    return BranchState(head.snapshot_id, sources, runs, read)


def _read_state_file(table: Table, location: str | None) -> StateFile | None:
    if not location:
        return None
    try:
        with table.io.new_input(location).open(seekable=False) as stream:
            text = stream.read()
    except FileNotFoundError:
        log.warning("state file %s is missing; reading the state from the older snapshots' summaries", location)
        return None
    try:
        state_file = StateFile.model_validate_json(text)
    except ValidationError as exc:
        log.warning("ignoring unreadable state file %s: %s", location, str(exc)[:200])
        return None
    if state_file.format != STATE_FILE_FORMAT:
        raise TerminalError(
            f"state file {location} has format {state_file.format}; this version reads format {STATE_FILE_FORMAT}"
            " only: upgrade dativo-dagster"
        )
    return state_file


def state_file_folders(table: Table) -> list[str]:
    """Where state files are written, in the order tried: the metadata folder, then ``STATE_FOLDER``."""
    return [table.location_provider().metadata_path.rstrip("/"), f"{table.location().rstrip('/')}/{STATE_FOLDER}"]


def large_source_share(properties: dict[str, str]) -> dict[str, str]:
    """A commit's own share of the source state when it is too large for its summary (``SUMMARY_SOURCES_MAX``),
    else an empty mapping: then the summary keeps it."""
    share = parse_source_state(properties.get(SOURCE_STATE_KEY))
    return share if len(share) > SUMMARY_SOURCES_MAX else {}


def write_state_file(
    table: Table, state: BranchState, *, keep_sources: bool = True, own_sources: dict[str, str] | None = None
) -> str:
    """Write ``state`` as the state file of the next commit on its branch; returns the file's location.

    With ``keep_sources`` False (a commit that replaces every row) the file lists no source file: the commit's
    own summary names the only ones the branch will hold. ``own_sources`` (:func:`large_source_share`) is the
    commit's own share, kept here instead of in its summary; it wins over the branch's earlier versions. Runs are
    kept either way, newest first, at most ``RUNS_REMEMBERED``.

    Raises:
        OSError: no folder of :func:`state_file_folders` accepts the file (the last folder's error).
    """
    sources = {**(state.sources if keep_sources else {}), **(own_sources or {})}
    content = StateFile(
        sources=dict(sorted(sources.items())),
        runs=list(state.runs.items())[:RUNS_REMEMBERED],
    ).model_dump_json().encode()
    name = f"{STATE_FILE_PREFIX}{uuid.uuid4()}.json"
    # the folder of the head's own state file goes first: a folder that refused it is not asked at every commit
    head = table.snapshot_by_id(state.head) if state.head is not None else None
    previous = state_file_of(head) if head is not None else None
    folders = sorted(state_file_folders(table), key=lambda f: not (previous or "").startswith(f"{f}/"))
    for folder in folders[:-1]:
        try:
            return _write_new(table, f"{folder}/{name}", content)
        except OSError as exc:
            log.debug("%s refused the state file (%s); trying the next folder", folder, exc)
    return _write_new(table, f"{folders[-1]}/{name}", content)


def _write_new(table: Table, location: str, content: bytes) -> str:
    # a fresh name: nothing to overwrite, and no existence check (one request less on object storage)
    with table.io.new_output(location).create(overwrite=True) as stream:
        stream.write(content)
    return location


def delete_state_file(table: Table, location: str | None) -> None:
    """Remove the state file of a commit that the catalog refused (the maintenance job removes any left)."""
    if location is None:
        return
    try:
        table.io.delete(location)
    except OSError as exc:
        log.warning("could not remove unused state file %s (the maintenance job will): %s", location, exc)

