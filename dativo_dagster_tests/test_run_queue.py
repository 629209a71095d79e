"""Run-queue limits per table (run_queue.py): every step of an asset is in its table's pool, and the shipped instance
configurations limit each pool at the run level."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from dativo_dagster.definitions import build_definitions
from dativo_dagster_tests.conftest import Project, base_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("dagster.yaml", "deploy/dagster.docker.yaml")


def test_every_step_of_an_asset_is_in_its_tables_pool(project: Project) -> None:
    project.write_spec(base_spec("people"))
    project.write_spec(base_spec("orders", domain="sales"))
    defs = build_definitions(project.specs_dir)
    pools = {
        asset.key.to_user_string(): {op.name: op.pool for op in asset.node_def.iterate_op_defs()}
        for asset in defs.assets or []
    }
    assert pools == {
        "people": {f"people__{step}": "dativo/table/testdomain.people" for step in ("extract", "validate", "write", "commit")},
        "orders": {f"orders__{step}": "dativo/table/sales.orders" for step in ("extract", "validate", "write", "commit")},
    }


def test_the_fan_out_steps_are_in_their_tables_pool_too(project: Project) -> None:
    spec = base_spec("events")
    spec["source"]["fan_out"] = {"step_size_mb": 1}
    project.write_spec(spec)
    (asset,) = build_definitions(project.specs_dir).assets or []
    pools = {op.name: op.pool for op in asset.node_def.iterate_op_defs()}
    steps = ("plan", "extract", "validate", "write", "commit")
    assert pools == {f"events__{step}": "dativo/table/testdomain.events" for step in steps}


@pytest.mark.parametrize("shipped", SHIPPED)
def test_the_shipped_instances_limit_runs_per_table(shipped: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load((ROOT / shipped).read_text())
    if "postgres" in config.get("storage", {}):
        # the rest of the docker-compose instance as Dagster loads it, on local storage
        config["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:  # what the daemon loads
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config is not None
        assert concurrency.run_queue_config.max_concurrent_runs == 4
        # a run holds one slot of each pool its steps are in, from dequeue to its end
        assert concurrency.pool_config.pool_granularity is not None
        assert concurrency.pool_config.pool_granularity.value == "run"
        assert concurrency.pool_config.default_pool_limit == 4
        assert instance.event_log_storage.supports_global_concurrency_limits
