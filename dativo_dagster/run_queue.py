"""Run-queue limits per table: every step of an asset's run belongs to its table's concurrency pool.

With ``concurrency: pools: {granularity: run, default_limit: N}`` in the instance's ``dagster.yaml`` (the shipped
ones set it), the daemon's run queue starts at most N runs that write one table at once, whatever launched them:
a backfill from the asset page, a job backfill, a schedule, a sensor, ``dagster asset materialize``. Runs of other
tables are not held back. A run tag would not do: Dagster copies neither asset tags nor the implicit asset job's
onto the runs of an asset backfill (the UI's backfill of a partitioned asset), so a ``tag_concurrency_limits``
rule would never see them. See docs/deployment.md ("Run queue").
"""

from __future__ import annotations

from dativo_dagster.spec import AssetSpecModel

TABLE_POOL_PREFIX = "dativo/table/"


def table_pool(spec: AssetSpecModel) -> str:
    """The concurrency pool of the spec's table: ``dativo/table/<domain>.<name>``."""
    return f"{TABLE_POOL_PREFIX}{spec.domain}.{spec.name}"


__all__ = ["TABLE_POOL_PREFIX", "table_pool"]
