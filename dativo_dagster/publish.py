"""Publish: move ``main`` to the branch's new head in the same catalog commit as the run's change (CONTRACT 9)."""

from __future__ import annotations

import logging

from pyiceberg.table import Table, Transaction
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.table.update import (
    AssertRefSnapshotId,
    SetSnapshotRefUpdate,
    UpdatesAndRequirements,
    UpdateTableMetadata,
)

from dativo_dagster.errors import MainDivergedError

log = logging.getLogger(__name__)

MAIN = "main"


class AssertMainSnapshotId(AssertRefSnapshotId):
    """``AssertRefSnapshotId`` for ``main``, under a class of its own.

    pyiceberg 0.12's ``Transaction._stage`` keeps one requirement per class: staged after the branch's snapshots, a
    plain ``AssertRefSnapshotId`` for ``main`` would be dropped, and the catalog would move ``main`` without checking
    where it was. Catalogs see the same requirement (``assert-ref-snapshot-id`` on the wire, the same ``validate``).
    """


class PublishToMain(UpdateTableMetadata["PublishToMain"]):
    """Set ``main`` to ``snapshot_id``, required to be at ``expected`` (None: ``main`` must not exist yet)."""

    def __init__(self, transaction: Transaction, snapshot_id: int, expected: int | None) -> None:
        super().__init__(transaction)
        self._snapshot_id = snapshot_id
        self._expected = expected

    def _commit(self) -> UpdatesAndRequirements:
        update = SetSnapshotRefUpdate(ref_name=MAIN, type=SnapshotRefType.BRANCH, snapshot_id=self._snapshot_id)
        return (update,), (AssertMainSnapshotId(ref=MAIN, snapshot_id=self._expected),)


def main_before_publish(table: Table, branch: str) -> int | None:
    """Where ``main`` is, checked to be a fast-forward away from the head of ``branch`` (None: no ``main`` yet).

    Publishing fast-forwards ``main``: it may be at the branch's head or at any snapshot in the branch's history
    (publish was turned on later, or an earlier publish's run found nothing new), never somewhere the branch has not
    been, for moving it would drop rows that someone committed to ``main`` directly.

    Raises:
        MainDivergedError: ``main`` holds a snapshot that is not in the history of ``branch`` (terminal).
    """
    main = table.snapshot_by_name(MAIN)
    if main is None:
        return None
    head = table.snapshot_by_name(branch)
    if head is None:
        return main.snapshot_id  # the branch is going to start at main's head
    if any(snapshot.snapshot_id == main.snapshot_id for snapshot in ancestors_of(head, table.metadata)):
        return main.snapshot_id
    raise MainDivergedError(
        table=".".join(table.name()), branch=branch, main_snapshot_id=main.snapshot_id,
        branch_snapshot_id=head.snapshot_id,
    )


def publish_to_main(tx: Transaction, branch: str, expected_main: int | None) -> int:
    """Stage, in ``tx``, ``main`` moving to the head that ``tx`` gives ``branch``; returns that snapshot id.

    Call it after the run's snapshots are staged: the transaction then commits the branch's snapshots, the branch ref
    and ``main`` in one catalog commit, each ref required to be where the run found it (both move or neither).
    """
    ref = tx.table_metadata.refs.get(branch)
    if ref is None:
        raise ValueError(f"publish: the transaction holds no branch {branch!r}")
    PublishToMain(tx, ref.snapshot_id, expected_main).commit()
    return ref.snapshot_id


def fast_forward_main(table: Table, branch: str) -> Table:
    """Move ``main`` to the head of ``branch`` when it is behind it, in a commit of its own (a run that commits
    nothing: an earlier commit made while publish was off, or by a run that found nothing new)."""
    head = table.snapshot_by_name(branch)
    if head is None:
        return table  # nothing committed to the branch yet: nothing to publish
    expected = main_before_publish(table, branch)
    if expected == head.snapshot_id:
        return table
    with table.transaction() as tx:
        PublishToMain(tx, head.snapshot_id, expected).commit()
    log.info("published %s@%s: main moved from %s to %s", ".".join(table.name()), branch, expected, head.snapshot_id)
    return table.refresh()
