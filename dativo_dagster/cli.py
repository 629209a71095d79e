"""The ``dativo-dagster`` command line: validate specs and materialize assets, with CI exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_REJECTS = 1
EXIT_FAILED = 2


def _specs_dir(arg: str | None) -> Path:
    from dativo_dagster.definitions import specs_dir_from_env  # noqa: PLC0415

    return Path(arg).resolve() if arg else specs_dir_from_env()


def cmd_validate(args: argparse.Namespace) -> int:
    """Check every spec; print each problem; 0 when all are valid, else 2."""
    from dativo_dagster.errors import DeploymentError, SpecError  # noqa: PLC0415
    from dativo_dagster.resources import check_deployment  # noqa: PLC0415
    from dativo_dagster.spec import load_specs  # noqa: PLC0415

    specs_dir = _specs_dir(args.specs)
    try:
        check_deployment()
    except DeploymentError as exc:
        print(exc, file=sys.stderr)  # the specs are checked all the same
        deployment_failed = True
    else:
        deployment_failed = False
    try:
        loaded = load_specs(specs_dir)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found in {specs_dir}", file=sys.stderr)
        return EXIT_FAILED
    if deployment_failed:
        return EXIT_FAILED
    for item in loaded:
        print(f"{item.display_path}: ok ({item.spec.name} -> {item.spec.domain}.{item.spec.name})")
    if not loaded:
        # not a failure (an empty code location is valid), but a wrong --specs folder should not pass unnoticed
        print(f"no asset specs (*.yaml, *.yml) found in {specs_dir}", file=sys.stderr)
    else:
        print(f"{len(loaded)} asset spec(s) valid in {specs_dir}")
    return EXIT_OK


def cmd_materialize(args: argparse.Namespace) -> int:
    """Materialize the selected assets in this process; print one summary line per asset."""
    import dagster as dg  # noqa: PLC0415

    from dativo_dagster.definitions import build_definitions  # noqa: PLC0415
    from dativo_dagster.errors import DeploymentError, SpecError  # noqa: PLC0415

    specs_dir = _specs_dir(args.specs)
    try:
        defs = build_definitions(specs_dir)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found; nothing was materialized", file=sys.stderr)
        return EXIT_FAILED
    except DeploymentError as exc:
        print(f"{exc} Nothing was materialized.", file=sys.stderr)
        return EXIT_FAILED
    assets = list(defs.assets or [])
    names = sorted(a.key.to_user_string() for a in assets)  # type: ignore[union-attr]
    if not names:
        print(f"no asset specs under {specs_dir}; nothing to materialize", file=sys.stderr)
        return EXIT_FAILED
    selected = list(dict.fromkeys(args.select)) if args.select else names
    unknown = sorted(set(selected) - set(names))
    if unknown:
        print(f"unknown asset(s): {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return EXIT_FAILED
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    # dg.materialize() would drop the code location's loggers (DATIVO_LOG_FORMAT=json): build its job here
    job_name = "__ephemeral_asset_job__"
    # only the selected assets: resolving a job over every asset of a large code location takes seconds
    chosen = [a for a in assets if a.key.to_user_string() in selected]  # type: ignore[union-attr]
    problem = _partition_problem(chosen, args.partition)
    if problem:
        print(f"{problem}; nothing was materialized", file=sys.stderr)
        return EXIT_FAILED
    job = dg.Definitions(
        jobs=[dg.define_asset_job(job_name, selection=dg.AssetSelection.assets(*selected))],
        assets=chosen,
        resources=defs.resources,
        loggers=defs.loggers,
    ).resolve_job_def(job_name)
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": args.log_level}}}},
        partition_key=args.partition,
    )
    return summarize(result, selected)


def _partition_problem(chosen: Sequence[object], partition: str | None) -> str:
    """Why the selection cannot run with (or without) ``--partition``; empty when it can."""
    partitioned = sorted(a.key.to_user_string() for a in chosen if a.partitions_def is not None)  # type: ignore[attr-defined]
    others = sorted(a.key.to_user_string() for a in chosen if a.partitions_def is None)  # type: ignore[attr-defined]
    if partitioned and partition is None:
        return (f"time-partitioned asset(s) {', '.join(partitioned)} need --partition KEY (such as 2024-01-31);"
                " select them apart from unpartitioned assets")
    if partition is not None and others:
        return f"--partition applies to time-partitioned assets only; not partitioned: {', '.join(others)}"
    if partition is not None:
        for asset in chosen:
            if not asset.partitions_def.has_partition_key(partition):  # type: ignore[attr-defined]
                return f"{asset.key.to_user_string()}: no partition {partition!r}"  # type: ignore[attr-defined]
    return ""


def summarize(result: object, selected: Sequence[str]) -> int:
    """Print one line per asset from a run's events (failure details go to stderr); returns the exit code.

    0: every asset committed with no rejected row; 1: all committed, some rows quarantined (warn mode);
    2: any asset failed or was not materialized.
    """
    import dagster as dg  # noqa: PLC0415

    assert isinstance(result, dg.ExecuteInProcessResult)
    materialized: dict[str, dict[str, object]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.materialization
        materialized[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    failures: dict[str, tuple[str, str, dict[str, object]]] = {}
    for event in result.get_step_failure_events():
        step = event.step_key or ""
        asset = step.split(".", 1)[0]
        op = step.rsplit("__", 1)[-1]
        message, metadata = _failure_details(event.event_specific_data)
        failures.setdefault(asset, (op, message, metadata))
    code = EXIT_OK
    for name in selected:
        if name in failures:
            op, message, metadata = failures[name]
            counts = "".join(f" {key}={metadata[key]}" for key in ("rows_read", "rows_rejected") if key in metadata)
            first_line = message.splitlines()[0] if message else "unknown error"
            first_line = first_line.removeprefix(f"{name}: ")
            print(f"{name}: FAILED at {op}{counts}: {first_line}")
            if message.count("\n"):
                print(f"{name}: {message}", file=sys.stderr)
            code = EXIT_FAILED
        elif name in materialized:
            m = materialized[name]
            rejected = int(m.get("rows_rejected") or 0)  # type: ignore[call-overload]
            status = "WARN" if rejected else "ok"
            line = (
                f"{name}: {status} rows_read={m.get('rows_read')} committed={m.get('rows_committed')}"
                f" rejected={rejected} files={m.get('files_written')} snapshot={m.get('snapshot_id') or '-'}"
                f" table={m.get('dagster/table_name')}"
            )
            if m.get("branch"):
                line += f" branch={m.get('branch')}"
            if m.get("published_to_main"):
                line += f" main={m.get('main_snapshot_id')}"  # publish: main's head, the branch's (CONTRACT 9)
            if rejected:
                line += f" rejects={m.get('rejects_table')}"
            if m.get("nothing_new"):
                line += " nothing_new (no new or changed source file; no snapshot added)"
            replaced = m.get("replaced_sources") or []
            if replaced:
                line += f" replaced_files={len(replaced)}"  # type: ignore[arg-type]
            print(line)
            if rejected and code == EXIT_OK:
                code = EXIT_REJECTS
        else:
            print(f"{name}: FAILED: not materialized (an upstream step failed)")
            code = EXIT_FAILED
    return code


def _failure_details(data: object) -> tuple[str, dict[str, object]]:
    """The failure's own description (a ``dg.Failure``) or the user error's message, and its metadata."""
    user_failure = getattr(data, "user_failure_data", None)
    if user_failure is not None and user_failure.description:
        return user_failure.description.strip(), {k: v.value for k, v in (user_failure.metadata or {}).items()}
    error = getattr(data, "error", None)
    if error is None:
        return "unknown error", {}
    # user-code errors carry the original exception in the cause
    while getattr(error, "cause", None) is not None:
        error = error.cause
    message = (getattr(error, "message", "") or "").strip()
    cls = getattr(error, "cls_name", None)
    if cls:
        # "package.module.ClassName: text" -> "text"
        message = re.sub(rf"^[\w.]*\b{re.escape(cls)}: ", "", message)
    return message or "unknown error", {}


def cmd_schema(args: argparse.Namespace) -> int:
    """Write (or with --check, compare) the JSON Schema that editors use for spec files."""
    import json  # noqa: PLC0415

    from dativo_dagster.spec import SCHEMA_FILE_NAME, spec_json_schema  # noqa: PLC0415

    path = Path(args.output) if args.output else _specs_dir(args.specs) / SCHEMA_FILE_NAME
    text = json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is out of date; run: dativo-dagster schema", file=sys.stderr)
            return EXIT_FAILED
        print(f"{path} is current")
        return EXIT_OK
    path.write_text(text)
    print(f"wrote {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dativo-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check every asset spec; exit 0 or 2")
    validate.add_argument("--specs", help="folder of asset specs (default: DATIVO_ASSET_SPECS_DIR or asset_specs/)")
    validate.set_defaults(func=cmd_validate)
    materialize = sub.add_parser("materialize", help="materialize assets in process; exit 0, 1 (rejects) or 2")
    materialize.add_argument("--specs", help="folder of asset specs (default: DATIVO_ASSET_SPECS_DIR or asset_specs/)")
    materialize.add_argument("--select", nargs="+", metavar="NAME", help="asset names (default: all)")
    materialize.add_argument(
        "--partition", metavar="KEY", help="the partition of time-partitioned assets to run (such as 2024-01-31)"
    )
    materialize.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Dagster console log level"
    )
    materialize.set_defaults(func=cmd_materialize)
    schema = sub.add_parser("schema", help="write the spec JSON Schema for editors (asset_specs/asset-spec.schema.json)")
    schema.add_argument("--specs", help="folder of asset specs (default: DATIVO_ASSET_SPECS_DIR or asset_specs/)")
    schema.add_argument("--output", help="file to write (default: <specs>/asset-spec.schema.json)")
    schema.add_argument("--check", action="store_true", help="exit 2 when the file is not current")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - any crash is exit code 2 for CI, never 1
        logging.getLogger("dativo_dagster").exception("dativo-dagster failed: %s", exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
