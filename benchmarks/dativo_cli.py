"""``dativo-dagster`` exactly as its console script runs it, plus a record of the run's step times.

    BENCH_STEP_TIMES=steps.json python dativo_cli.py materialize --specs DIR --select NAME

The console script is ``sys.exit(dativo_dagster.cli.main())``; this does the same, with
``JobDefinition.execute_in_process`` (what the CLI runs its job with) wrapped so that, once the run is over,
the timestamps of its STEP_START and STEP_SUCCESS events are read from
the instance that the CLI passed (the ephemeral one, as for a CI user without DAGSTER_HOME) and written as
JSON: ``{"run_id": ..., "steps": {step_key: [start, end]}, "stages": {"extract": busy s, ...}}`` (the stages
of the streaming pass, from the materialization metadata). Nothing else changes, so the process's wall time
is the command's.
"""

from __future__ import annotations

import json
import os
import sys

import dagster as dg


def _recording(execute_in_process):
    def wrapper(*args, **kwargs):
        result = execute_in_process(*args, **kwargs)
        instance = kwargs.get("instance")
        steps: dict[str, list[float]] = {}
        if instance is not None:
            kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
            for entry in instance.all_logs(result.run_id, of_type=kinds):
                span = steps.setdefault(entry.step_key or "", [0.0, 0.0])
                span[0 if entry.dagster_event_type == dg.DagsterEventType.STEP_START else 1] = entry.timestamp
        stages: dict[str, float] = {}
        for event in result.get_asset_materialization_events():
            metadata = event.materialization.metadata
            for key in ("extract_seconds", "validate_seconds", "write_seconds", "stream_seconds"):
                if key in metadata:
                    stages[key.removesuffix("_seconds")] = float(metadata[key].value)
        with open(os.environ["BENCH_STEP_TIMES"], "w") as out:
            json.dump({"run_id": result.run_id, "steps": steps, "stages": stages}, out)
        return result

    return wrapper


if __name__ == "__main__":
    dg.JobDefinition.execute_in_process = _recording(dg.JobDefinition.execute_in_process)
    from dativo_dagster.cli import main

    sys.exit(main())
