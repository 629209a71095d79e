"""Structured logs: with ``DATIVO_LOG_FORMAT=json`` runs log one JSON object per line to stderr.

Each line carries the run id, job, asset, step and event, the message, and for events that have them the
counts (rows read, committed, rejected, files, bytes...), the check result or the error; see
``docs/logging.md``. Two ways in, as Dagster makes a run's own loggers only from its run config:

- the code location's ``console`` logger (``json_lines_logger``), used by runs whose run config names it
  (``logging_run_config()``; ``dativo-dagster materialize`` and the code location's jobs do);
- ``JsonLinesHandler``, a handler for the instance's ``python_logs`` in ``dagster.yaml``, which sees every run of
  the instance, also those with an empty run config (the UI's Materialize button, Dagster's freshness sensor).

A run that has both logs each line once. The default (variable unset, or ``text``) is Dagster's own coloured
console logger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import dagster as dg

LOG_FORMAT_VAR = "DATIVO_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
# the attribute that Dagster's log manager puts on every record it hands to a @dg.logger
DAGSTER_META = "dagster_meta"
# Dagster logs its own events at DEBUG; these are the ones a collector wants at the default level too
KEY_EVENTS = frozenset(
    {
        "RUN_SUCCESS",
        "RUN_FAILURE",
        "STEP_SUCCESS",
        "STEP_FAILURE",
        "STEP_UP_FOR_RETRY",
        "ASSET_MATERIALIZATION",
        "ASSET_CHECK_EVALUATION",
    }
)
# string entries of a materialization that identify what was written (the rest is counts or detail)
IDENTITY_KEYS = {"dagster/table_name": "table", "snapshot_id": "snapshot_id", "branch": "branch"}
# runs of this process whose own loggers write the JSON lines (JsonLinesHandler leaves them alone); bounded,
# as a code server or a test session runs many
_RUNS_WITH_JSON_LOGGER: OrderedDict[str, None] = OrderedDict()
_MAX_REMEMBERED_RUNS = 1024

# Dagster flags every use of an instance's `python_logs.dagster_handler_config` as beta, in every process of
# every run (two stderr lines each: the run worker and each step process), although there is no other
# instance-wide way to log the runs that carry no logger config (docs/logging.md). The shipped dagster.yaml uses
# it on purpose, so exactly that warning is silenced here; any other BetaWarning still shows.
_YAML_HANDLER_WARNING = "Handling yaml-defined logging configuration"
warnings.filterwarnings("ignore", message=_YAML_HANDLER_WARNING, category=dg.BetaWarning)
# Run and step workers are fresh Pythons that build their log manager before they import the code location:
# they get the same filter from their parent (the code server, the CLI, the run worker) through the
# environment. Its category is the builtin Warning, as naming dagster's class there would make every Python
# started with that environment import dagster first.
_INHERITED_FILTER = f"ignore:{_YAML_HANDLER_WARNING}:Warning"
if _INHERITED_FILTER not in os.environ.get("PYTHONWARNINGS", "").split(","):
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), _INHERITED_FILTER)))


def _event_name(event: Any) -> str:
    """The event type's name: ``RUN_SUCCESS``, where Dagster's stored value still says ``PIPELINE_SUCCESS``."""
    return event.event_type.name


def _asset_of(step_key: str | None, event: Any) -> str | None:
    key = getattr(event, "asset_key", None) if event is not None else None
    if key is not None:
        return key.to_user_string()
    if step_key and "." in step_key:
        # the ops of a graph-backed asset run as steps "<asset>.<op>"
        return step_key.split(".", 1)[0]
    return None


def _counts(metadata: Mapping[str, Any] | None) -> dict[str, int | float]:
    """The numeric entries of event metadata (``dagster/row_count`` keeps its name)."""
    counts: dict[str, int | float] = {}
    for key, entry in (metadata or {}).items():
        value = getattr(entry, "value", entry)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            counts[key] = value
    return counts


def _event_fields(event: Any) -> dict[str, Any]:
    """Counts, check results and errors carried by one Dagster event."""
    fields: dict[str, Any] = {}
    kind = _event_name(event)
    data = event.event_specific_data
    metadata: Mapping[str, Any] | None = None
    if kind == "ASSET_MATERIALIZATION":
        metadata = event.step_materialization_data.materialization.metadata
        for key, name in IDENTITY_KEYS.items():
            entry = metadata.get(key)
            if entry is not None and getattr(entry, "value", None) not in (None, ""):
                fields[name] = str(entry.value)
    elif kind == "ASSET_CHECK_EVALUATION":
        evaluation = event.asset_check_evaluation_data
        metadata = evaluation.metadata
        fields["check"] = evaluation.check_name
        fields["passed"] = evaluation.passed
        fields["severity"] = evaluation.severity.value
    elif kind in ("STEP_OUTPUT", "HANDLED_OUTPUT"):
        metadata = getattr(data, "metadata", None)
        fields["output"] = getattr(getattr(data, "step_output_handle", None), "output_name", None)
    elif kind == "STEP_SUCCESS":
        fields["duration_ms"] = getattr(data, "duration_ms", None)
    elif kind == "STEP_FAILURE":
        user_failure = getattr(data, "user_failure_data", None)
        if user_failure is not None:
            metadata = user_failure.metadata
        error = getattr(data, "error", None)
        if error is not None:
            fields["error_class"] = error.cls_name
            described = user_failure is not None and user_failure.description
            fields["error"] = (user_failure.description if described else error.message).strip()
    counts = _counts(metadata)
    if counts:
        fields["counts"] = counts
    return {k: v for k, v in fields.items() if v is not None}


class JsonLineFormatter(logging.Formatter):
    """One flat JSON object per record: timestamp, level, run_id, job, asset, step, event, message, counts.

    Records below ``threshold`` (the key Dagster events that ``_LevelOrKeyEvent`` lets through) show as ``INFO``.
    """

    def __init__(self, threshold: int = logging.NOTSET):
        super().__init__()
        self.threshold = threshold

    def format(self, record: logging.LogRecord) -> str:
        meta: Mapping[str, Any] = getattr(record, DAGSTER_META, None) or {}
        event = meta.get("dagster_event")
        step_key = meta.get("step_key") or (getattr(event, "step_key", None) if event is not None else None)
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname if record.levelno >= self.threshold else "INFO",
            "run_id": meta.get("run_id"),
            "job": meta.get("job_name"),
            "asset": _asset_of(step_key, event),
            "step": step_key,
            "op": meta.get("op_name"),
            "event": _event_name(event) if event is not None else "LOG",
            "message": meta.get("orig_message", record.getMessage()),
        }
        if event is not None:
            line.update(_event_fields(event))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _LevelOrKeyEvent(logging.Filter):
    """Records at the configured level or above, and the key Dagster events whatever their level.

    It leaves the record as it is: Dagster hands the same record to the instance's other handlers.
    """

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        event = (getattr(record, DAGSTER_META, None) or {}).get("dagster_event")
        return event is not None and _event_name(event) in KEY_EVENTS


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, is_required=False, default_value="INFO", description="The logger's threshold."),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
    },
    description="One JSON object per line on stderr (run id, job, asset, step, event, message, counts).",
)
def json_lines_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    """The console logger of the code location when ``DATIVO_LOG_FORMAT=json``."""
    config = init_context.logger_config
    level = _level(config["log_level"])
    if init_context.run_id:
        _RUNS_WITH_JSON_LOGGER[init_context.run_id] = None
        while len(_RUNS_WITH_JSON_LOGGER) > _MAX_REMEMBERED_RUNS:
            _RUNS_WITH_JSON_LOGGER.popitem(last=False)
    logger = logging.Logger(config["name"], level=logging.DEBUG)  # the handler's filter decides what is shown
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter(level))
    handler.addFilter(_LevelOrKeyEvent(level))
    logger.addHandler(handler)
    return logger


def _level(name: object) -> int:
    level = logging.getLevelName(str(name).upper())
    if not isinstance(level, int):
        raise ValueError(f"log_level: unknown level {name!r}; expected DEBUG, INFO, WARNING or ERROR")
    return level


class JsonLinesHandler(logging.StreamHandler):
    """The JSON lines of every run of a Dagster instance, for ``python_logs`` in its ``dagster.yaml``::

        python_logs:
          dagster_handler_config:
            handlers:
              dativo_json:
                class: dativo_dagster.logging.JsonLinesHandler
                log_level: INFO          # optional; Dagster's key events are written at any level
                stream: ext://sys.stderr # optional

    Writes only when the run's process has ``DATIVO_LOG_FORMAT=json`` (read when Dagster makes the handler, at
    the start of each run and step process), and leaves out the runs whose own ``console`` logger is the JSON
    one, so no line comes twice. Use ``log_level``, not ``level``: Dagster drops records below a handler's
    ``level`` before the handler sees them, also its key events.
    """

    def __init__(self, log_level: str = "INFO", stream: Any = None):
        super().__init__(stream if stream is not None else sys.stderr)
        self.enabled = os.environ.get(LOG_FORMAT_VAR, "").strip().lower() == "json"
        level = _level(log_level)
        self.setFormatter(JsonLineFormatter(level))
        self.addFilter(_LevelOrKeyEvent(level))

    def emit(self, record: logging.LogRecord) -> None:
        if not self.enabled:
            return
        run_id = (getattr(record, DAGSTER_META, None) or {}).get("run_id")
        if run_id is not None and run_id in _RUNS_WITH_JSON_LOGGER:
            return
        super().emit(record)


def logging_run_config() -> dict[str, Any]:
    """Run config that makes a run use the code location's console logger: empty unless the format is json.

    Dagster creates a job's own loggers only for runs whose run config names them (an empty ``loggers``
    section means Dagster's default console logger), so jobs and commands that should log JSON pass this.
    """
    return {"loggers": {"console": {}}} if loggers_from_env() else {}


def loggers_from_env() -> dict[str, dg.LoggerDefinition]:
    """The code location's loggers for ``DATIVO_LOG_FORMAT``: ``json`` replaces the console logger.

    Raises:
        ValueError: for a value other than ``text`` or ``json`` (unset or empty means ``text``).
    """
    value = os.environ.get(LOG_FORMAT_VAR, "").strip().lower()
    if value in ("", "text"):
        return {}
    if value == "json":
        return {"console": json_lines_logger}
    raise ValueError(f"{LOG_FORMAT_VAR}={value!r} is not a log format; expected one of {', '.join(LOG_FORMATS)}")


__all__ = [
    "LOG_FORMAT_VAR",
    "JsonLineFormatter",
    "JsonLinesHandler",
    "json_lines_logger",
    "loggers_from_env",
    "logging_run_config",
]
