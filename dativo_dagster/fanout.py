"""Fan-out: a run's files split into groups by size, each streamed in its own step, the outcomes combined for one
commit (``source.fan_out``, docs/fan-out.md). Plain functions over the steps' records; assets.py wires them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from dativo_dagster.pipeline import PipelineOutcome
from dativo_dagster.sources import SourceFile
from dativo_dagster.validate import MAX_EXAMPLES, FieldErrors, ValidationReport

MIB = 1 << 20


class FileGroup(BaseModel):
    """One group of a fanned-out run: the files one mapped extract step streams.

    ``run_id`` and ``ingested_at`` are the planning run's: every group stamps its rows with them (one
    ``_ingested_at`` per run, CONTRACT 4), whichever process or run (a re-execution) streams the group.
    """

    key: str  # the dynamic output's mapping key: g0, g1, ...
    files: list[dict[str, Any]] = Field(default_factory=list)  # SourceFile fields
    bytes: int = 0
    run_id: str
    ingested_at: str
    partition_key: str = ""
    incremental: bool = False

    def source_files(self) -> list[SourceFile]:
        return [SourceFile(**f) for f in self.files]


class GroupOutcome(BaseModel):
    """What one mapped extract step did: its stream's outcome, the tables it created, the process it ran in."""

    key: str
    outcome: PipelineOutcome
    tables_created: list[str] = Field(default_factory=list)
    pid: int = 0


def group_key(index: int) -> str:
    """The mapping key of the ``index``-th group (``g0``, ``g1``, ...): also the suffix of its step key."""
    return f"g{index}"


def group_files(files: Sequence[SourceFile], step_size_mb: int) -> list[list[SourceFile]]:
    """Split ``files`` into groups in listing order: files are added to a group until it holds ``step_size_mb``
    MiB or more; a file of that size or larger is a group of its own. No files: one empty group (so the run's
    steps are the same whatever it finds, and a run that finds nothing new commits as today)."""
    limit = step_size_mb * MIB
    groups: list[list[SourceFile]] = []
    current: list[SourceFile] = []
    size = 0
    for file in files:
        if file.size >= limit:
            if current:
                groups.append(current)
                current, size = [], 0
            groups.append([file])
            continue
        current.append(file)
        size += file.size
        if size >= limit:
            groups.append(current)
            current, size = [], 0
    if current or not groups:
        groups.append(current)
    return groups


def plan_groups(
    files: Sequence[SourceFile],
    step_size_mb: int,
    *,
    run_id: str,
    ingested_at: str,
    partition_key: str = "",
    incremental: bool = False,
) -> list[FileGroup]:
    """The groups of a run (see :func:`group_files`) as records the mapped steps receive."""
    return [
        FileGroup(
            key=group_key(index),
            files=[{"uri": f.uri, "size": f.size, "version": f.version, "modified_ns": f.modified_ns} for f in group],
            bytes=sum(f.size for f in group),
            run_id=run_id,
            ingested_at=ingested_at,
            partition_key=partition_key,
            incremental=incremental,
        )
        for index, group in enumerate(group_files(files, step_size_mb))
    ]


def combine_reports(reports: Sequence[ValidationReport]) -> ValidationReport:
    """One validation report of several groups: counts added, errors per field and kind, the first examples."""
    combined = ValidationReport()
    index: dict[tuple[str, str], FieldErrors] = {}
    for report in reports:
        combined.rows_read += report.rows_read
        combined.rows_valid += report.rows_valid
        combined.rows_rejected += report.rows_rejected
        for entry in report.errors:
            into = index.get((entry.field, entry.kind))
            if into is None:
                into = index[(entry.field, entry.kind)] = FieldErrors(field=entry.field, kind=entry.kind)
                combined.errors.append(into)
            into.count += entry.count
            into.examples.extend(entry.examples[: MAX_EXAMPLES - len(into.examples)])
    return combined


def combine_outcomes(groups: Sequence[GroupOutcome]) -> PipelineOutcome:
    """The outcome of the whole run from its groups' (in group order): files, reports and counts of all groups.

    Every group was stamped with the planning run's id and time (``FileGroup``), so the combined outcome commits
    under that run id, exactly once whichever run streamed each group. Busy seconds add up; the wall time is the
    longest group's (groups may run at once).
    """
    ordered = sorted(groups, key=lambda g: int(g.key.removeprefix("g")))
    outcomes = [g.outcome for g in ordered]
    if not outcomes:
        raise ValueError("a fanned-out run has at least one group")
    run_ids = {o.run_id for o in outcomes}
    if len(run_ids) != 1:
        raise ValueError(f"the groups of one run were stamped with different run ids: {sorted(run_ids)}")
    first = outcomes[0]
    seconds: dict[str, float] = {}
    for outcome in outcomes:
        for stage, value in outcome.seconds.items():
            seconds[stage] = max(seconds.get(stage, 0.0), value) if stage == "wall" else seconds.get(stage, 0.0) + value
    return PipelineOutcome(
        run_id=first.run_id,
        ingested_at=first.ingested_at,
        files_read=[uri for o in outcomes for uri in o.files_read],
        file_reports=[r for o in outcomes for r in o.file_reports],
        validation=combine_reports([o.validation for o in outcomes]),
        data_files=[f for o in outcomes for f in o.data_files],
        reject_files=[f for o in outcomes for f in o.reject_files],
        location=first.location,
        rejects_location=next((o.rejects_location for o in outcomes if o.reject_files), first.rejects_location),
        strict_failed=any(o.strict_failed for o in outcomes),
        seconds=seconds,
    )


__all__ = [
    "FileGroup",
    "GroupOutcome",
    "combine_outcomes",
    "combine_reports",
    "group_files",
    "group_key",
    "plan_groups",
]
