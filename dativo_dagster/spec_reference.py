"""The spec reference, docs/spec-reference.md, generated from the models: ``python -m dativo_dagster.spec_reference``.

Keys, types, constraints and defaults come from the pydantic models in ``spec.py``; what each key means and an
example value come from ``KEY_DOCS`` below, which must name exactly the models' keys (rendering fails on a key
without a description, or a description without a key).
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dativo_dagster.spec import PARTITION_FORMS, AssetSpecModel
from dativo_dagster.types import TYPE_NAMES, ColumnType

REGENERATE = "python -m dativo_dagster.spec_reference > docs/spec-reference.md"

# key path -> (what it means and does, an example value as written in YAML)
KEY_DOCS: dict[str, tuple[str, str]] = {
    "apiVersion": ("ODCS version the contract follows; recorded, not interpreted.", "v3.0.2"),
    "kind": ("Always `DataContract`.", "DataContract"),
    "id": (
        "Your own identifier of the contract (e.g. a UUID from a contract registry); recorded only.",
        "53581432-6c55-4ba2-a65f-72344a91553a",
    ),
    "name": (
        "Asset name, Dagster asset key and table name. Letters, digits and `_`, starting with a letter; lower-cased;"
        " at most 63 characters; unique across the specs folder.",
        "csv_person",
    ),
    "version": (
        "Version of the contract, stored in every data file's metadata. Quote it: an unquoted `1.10` reads as"
        " the number 1.1 and is refused.",
        '"1.0"',
    ),
    "status": ("Lifecycle status of the contract (`active`, `draft`...); recorded only.", "active"),
    "domain": (
        "Iceberg namespace of the table (`<domain>.<name>`) and first folder of its location.",
        "adventureworks",
    ),
    "dataProduct": (
        "Dagster asset group, one `<dataProduct>__group_job` per group, and a folder of the table location.",
        "adventureworks",
    ),
    "tenant": (
        "Tenant the data belongs to: the Iceberg branch unless `target.branch` says otherwise; a tag on the asset.",
        "demo_tenant",
    ),
    "description": (
        "What the data is; `purpose` becomes the asset's description in the Dagster UI.",
        "{purpose: People from AdventureWorks}",
    ),
    "description.purpose": (
        "Why the data exists; first line of the asset's description in the UI.",
        "People from AdventureWorks",
    ),
    "description.usage": ("How consumers should use the data; recorded only.", "Join on BusinessEntityID"),
    "description.limitations": ("Known limitations; recorded only.", "Sample data, 10 rows"),
    "tags": (
        "Free tags; each becomes a Dagster asset tag (characters outside `[A-Za-z0-9_.-]` become `_`).",
        "[adventureworks, person]",
    ),
    "team": ("Who owns the data.", "{owner: data-team@example.com}"),
    "team.owner": (
        "Owner shown in the Dagster UI and stored in every data file's metadata: an email address, or a team"
        " name without `@` (shown as `team:<name>`).",
        "data-team@example.com",
    ),
    "team.name": ("Display name of the owning team; recorded only.", "Data Platform"),
    "compliance": (
        "Governance facts written into every data file's metadata (and S3 object tags).",
        "{classification: [internal], retention_days: 90}",
    ),
    "compliance.classification": (
        "Data classifications, comma-joined into the files' `classification` metadata and tag.",
        "[confidential, pii]",
    ),
    "compliance.retention_days": (
        "Retention in days, written into the files' metadata; not enforced by the pipeline.",
        "365",
    ),
    "compliance.regulations": ("Regulations that apply (GDPR, HIPAA...); recorded only.", "[GDPR]"),
    "schema": (
        "The columns, in table order (at least one). Names are unique ignoring case and must not be a system"
        " column (`_ingested_at`, `_source_file`, `_run_id`, `_reject_reason`, `_source_line`, `_raw_record`).",
        "[{name: id, type: integer, required: true, primary_key: true}, {name: Deleted, type: boolean}]",
    ),
    "schema[].name": (
        "Column name as in the file's header (exact match first, else case-insensitive) and in the table;"
        " no dots, control characters or edge spaces.",
        "BusinessEntityID",
    ),
    "schema[].type": (
        "Column type (see Column types below); text that does not fit is a validation error, never null.",
        "decimal(10,4)",
    ),
    "schema[].required": ("A null value (empty, or one of `null_values`) makes the row invalid.", "true"),
    "schema[].primary_key": (
        "Part of the table's key (the key is the fields marked, in schema order); such a field must be `required`."
        " The key identifies rows at a database cursor's boundary and for `write_mode: merge`.",
        "true",
    ),
    "schema[].description": ("Column description in the asset's column schema in the UI.", "Primary key"),
    "schema[].classification": (
        "Column classification, shown as a tag on the column in the UI. `PII` (any case): a rejected value of the"
        " field is never shown in failure messages, check metadata or logs, only its error kind, file, line and"
        " length (nor is the raw text of an unparseable record of the spec); the quarantine table keeps it as written.",
        "PII",
    ),
    "schema[].format": (
        "strptime layout for date, timestamp or timestamptz text that is not ISO 8601. A value read under it means"
        " exactly what Python's `datetime.strptime(text, format)` makes of the trimmed text, and text strptime"
        " refuses is rejected. Directives: `%Y` (exactly 4 digits), `%y` (00-68: 20xx, 69-99: 19xx), `%m`, `%d`,"
        " `%H`, `%I` (with `%p` AM/PM in English, any case; without `%p` before noon), `%M`, `%S` (60 and 61 are"
        " refused), `%f` (1-6 digits), `%z` (timestamptz only: `+hh:mm`, `+hhmm`, optional seconds, or `Z`;"
        " applied, the value is stored in UTC; without `%z` a timestamptz is taken as UTC) and `%%`; any run of"
        " whitespace matches any run of whitespace; letters match in any case. Missing fields default as in"
        " Python (year 1900, month and day 1, time 00:00). Refused when the spec loads: `%Z` (a zone name is only"
        " checked and dropped by strptime: use `%z`), locale-dependent names (`%b %B %a %A %c %x %X`), other"
        " directives, a directive twice, `%Y` with `%y` or `%H` with `%I`, a lone `%`, non-ASCII text around"
        " the directives. Only ASCII digits are read (strptime also takes other Unicode digits: such text is"
        " rejected). A date must have a midnight time.",
        '"%d/%m/%Y"',
    ),
    "source": (
        "Where the rows come from.",
        "{type: csv, files: [{path: data/people/*.csv}], incremental: {strategy: file_modified_time}}",
    ),
    "source.type": (
        "Source kind: `csv` (files; the default), `postgres` (a table or query; docs/sources/postgres.md) or"
        " `mysql` (MySQL 8 / MariaDB 10.6+; docs/sources/mysql.md). The keys below `files` belong to csv,"
        " `connection`, `table` and `query` to postgres and mysql.",
        "csv",
    ),
    "source.files": (
        "Files to read (at least one entry): every match of every entry is read.",
        "[{path: data/adventureworks/Person.csv}]",
    ),
    "source.files[].path": (
        "An absolute path, a path relative to the parent of the specs folder (the project root), a glob"
        " (`*`, `?`, `[...]`, `**`), or an `s3://bucket/key` URI (globs too).",
        '"data/music_listening/listening_history*.csv"',
    ),
    "source.files[].object": ("Logical name of the source object (ODCS); recorded only.", "Person"),
    "source.options": ("How the CSV text is read.", '{delimiter: "|", encoding: utf-16, header: false}'),
    "source.options.delimiter": ("Field separator, one character other than a line break.", '";"'),
    "source.options.quote_char": ("Quote character, one character other than the delimiter or a line break.", "\"'\""),
    "source.options.encoding": (
        "Any text encoding Python knows: utf-8 (a BOM is tolerated), utf-16 (the BOM decides the byte order),"
        " latin-1, cp1252...",
        "utf-16",
    ),
    "source.options.header": (
        "`true`: the first line names the columns; `false`: columns are taken in schema order. With `true`, a"
        " file without a header (zero bytes, or only a BOM or line breaks) is nothing readable: the run fails"
        " naming it (exit 2); a header-only file is a valid empty file. With `false`, such a file has no rows.",
        "false",
    ),
    "source.options.null_values": (
        "Texts that mean null (for string columns an exact match, for other types after trimming spaces).",
        '["", "NULL", "n/a"]',
    ),
    "source.incremental": (
        "csv: read only new and changed files (with `write_mode: append` or `merge`); omit it to read every file on every"
        " run. postgres, mysql: `{strategy: cursor, cursor_field, lookback_seconds}` reads only rows at or above the"
        " committed high-water mark (docs/sources/postgres.md).",
        "{strategy: file_modified_time, lookback_days: 7}",
    ),
    "source.incremental.strategy": (
        "How changes are detected. csv: `file_modified_time`, a file is read when it is new or its version (local:"
        " modification time and size; S3: ETag) differs from the last committed run; a changed file replaces the rows"
        " of its earlier version. postgres, mysql: `cursor` (see `cursor_field`); each kind refuses the other's.",
        "file_modified_time",
    ),
    "source.incremental.lookback_days": (
        "Files last modified more than this many days ago are never read; 0: no limit.",
        "7",
    ),
    "source.fan_out": (
        "csv only: split the run's files into groups of about `step_size_mb`, stream each group in its own step"
        " (`<name>__extract[g0]`, `[g1]`, ... Dagster dynamic outputs) so that every worker of a distributed executor"
        " (Celery, Kubernetes) takes a share, and commit all groups once. Omit it for one extract step. Refused for"
        " postgres/mysql (one snapshot cannot be split across processes) and with `write_mode: merge`"
        " (docs/fan-out.md).",
        "{step_size_mb: 512}",
    ),
    "source.fan_out.step_size_mb": (
        "MiB of source files per group: files are taken in listing order until a group reaches this size; a larger"
        " file is a group of its own.",
        "256",
    ),
    "source.incremental.cursor_field": (
        "postgres, mysql (`strategy: cursor`): the spec field whose highest committed value is the high-water mark;"
        " a required field of type integer/long, date, timestamp or timestamptz. The first run reads every row, later"
        " runs the rows at or above the mark; rows already committed at the boundary (same primary key and cursor"
        " value, or without a key the same content) are skipped. The mark is committed with the rows.",
        "ModifiedDate",
    ),
    "source.incremental.lookback_seconds": (
        "postgres, mysql (`strategy: cursor`, time stamp cursors only): re-read this many seconds below the mark, for"
        " rows whose transactions committed late; rows already committed are skipped, never loaded twice.",
        "300",
    ),
    "source.connection": (
        "postgres, mysql: how to reach the database. The URL itself never goes into a spec.",
        "{url_env: SHOP_DB_URL}",
    ),
    "source.connection.url_env": (
        "postgres, mysql: the NAME of the environment variable that holds the URL"
        " (`postgresql://user:password@host:5432/db`, `mysql://user:password@host:3306/db`). Unset at run time: the run fails naming the spec and the"
        " variable (exit 2). The password never shows in logs, metadata, errors or the table.",
        "SHOP_DB_URL",
    ),
    "source.table": (
        "postgres, mysql: a table or view, schema-qualified where needed (`sales.orders`; postgres parts may be"
        " double-quoted, mysql parts back-quoted, where the qualifier is the database); exactly one of `table` /"
        " `query`. `_source_file` is `postgresql://host:port/db/<table>` or `mysql://host:port/db/<table>`.",
        "sales.orders",
    ),
    "source.query": (
        "postgres, mysql: one read-only SELECT (run in a READ ONLY transaction); exactly one of `table` /"
        " `query`. `_source_file` is `postgresql://host:port/db/query` or `mysql://host:port/db/query`.",
        '"SELECT id, total FROM sales.orders WHERE total > 0"',
    ),
    "target": ("Where and how the rows land.", "{partitioning: [ingest_date], write_mode: append}"),
    "target.catalog": (
        "`iceberg`: an Iceberg table in the catalog `dativo`; `none`: Parquet files plus commit markers"
        " (`<table location>/_commits/<run id>.json`) only.",
        "iceberg",
    ),
    "target.warehouse": (
        "Warehouse root for this asset (a local folder or `s3://bucket[/prefix]`), overriding `DATIVO_WAREHOUSE`;"
        " the table lives at `<warehouse>/<domain>/<dataProduct>/<name>`.",
        "s3://lake",
    ),
    "target.branch": (
        "Iceberg branch the runs commit to (created from main when missing); default: the tenant. Not with `catalog: "
        "none`.",
        "staging",
    ),
    "target.publish": (
        "`true`: write-audit-publish. Every run's commit also moves `main` to the branch's new head, in the same"
        " catalog commit (both refs or neither), so readers of `main` see exactly the branch's rows; blocking checks"
        " run before it, and a failed run publishes nothing. `main` must be in the branch's history (fast-forward);"
        " a `main` written to directly is refused. The quarantine table stays on the branch. Iceberg only, with a"
        " branch other than `main`.",
        "true",
    ),
    "target.partitioning": (
        f"Partition fields, in order; each is {PARTITION_FORMS}. `ingest_date` is the day of `_ingested_at`."
        " Quote entries with a comma inside a `[...]` list.",
        '[ingest_date, "bucket(16, BusinessEntityID)"]',
    ),
    "target.parquet_target_size_mb": (
        "Target size of each Parquet file in MiB of written, compressed bytes: all but the last file of each"
        " partition in a run are between half and 110 % of it.",
        "256",
    ),
    "target.write_mode": (
        "`append`: each run adds its rows; `overwrite`: each run replaces the whole table (and records the spec's"
        " primary key on it, if any); `merge`: by the primary key (`primary_key: true` fields; Iceberg only), a row"
        " replaces the branch's row with its key or adds a new key, the last row read for a key wins within a run,"
        " and after the run every key occurs once. The table records its key (Iceberg identifier fields): a merge"
        " onto a table that holds rows under no key (made by an append) or another key is refused; run once with"
        " `overwrite` to record the key, then merge.",
        "merge",
    ),
    "target.delete_field": (
        "With `write_mode: merge` only: a boolean field; a row whose value is true removes its key from the table"
        " and is not loaded (the last row read for a key decides).",
        "Deleted",
    ),
    "schema_validation_mode": (
        "`strict`: any invalid row fails the run and nothing is committed; `warn`: valid rows are committed and"
        " invalid ones go to `<domain>.<name>__rejects` with their reasons.",
        "warn",
    ),
    "retry_config": (
        "How failed steps are retried (a Dagster `RetryPolicy` on every step).",
        "{max_retries: 3, retry_delay_seconds: 5}",
    ),
    "retry_config.max_retries": (
        "Retries of a step after a transient error (network, throttling, 5xx, commit conflicts).",
        "5",
    ),
    "retry_config.retry_delay_seconds": ("Delay before the first retry, in seconds.", "10"),
    "retry_config.backoff": (
        "How the delay grows: `exponential` or `linear` (both with jitter), or `none` (constant).",
        "linear",
    ),
    "retry_config.retryable_errors": (
        "Exception class names or regular expressions (matched against `Class: message`, cut to its first 1,000"
        " characters) that also count as transient. Each must compile and be at most 200 characters; patterns that"
        " can backtrack for ages are refused: a repeated group holding a repeat or an alternation (`(a+)+`,"
        " `(a|ab)*`), more than two long repeats (`*`, `+`, `{n,}`, `{n,m}` with m - n > 20).",
        '["ReadTimeout", "(?i)temporarily unavailable"]',
    ),
    "schedule": (
        "Run the asset's job `<name>__job` on a cron schedule `<name>__schedule` (created stopped). The asset's"
        " `freshness_check` warns when its last materialization is older than the cron's longest gap between two"
        " ticks plus a grace (10 %, at least 15 minutes); see docs/ui.md.",
        '{cron: "0 * * * *"}',
    ),
    "schedule.cron": ("Cron expression with five fields, or `@hourly`, `@daily`...", '"0 2 * * *"'),
    "schedule.timezone": ("IANA time zone the cron expression is read in.", "Europe/Berlin"),
    "sensor": (
        "Run the asset when new or changed source files appear: sensor `<name>__sensor` (created stopped). An"
        " `append` asset with a sensor needs `source.incremental` (a spec error otherwise). Files of a run that"
        " failed are requested again at the next evaluation. Without"
        " `schedule`, the asset's `freshness_check` warns when no run materialized it for 10 × the interval plus"
        " a grace (10 %, at least 15 minutes).",
        "{minimum_interval_seconds: 60}",
    ),
    "sensor.minimum_interval_seconds": ("Least time between two evaluations of the sensor, in seconds.", "300"),
    "partitions": (
        "Make the asset time-partitioned in Dagster (docs/partitions.md). A partition's run reads the source paths"
        " with `{partition}` replaced by its key, rejects rows whose `field` falls outside its window"
        " (`out_of_partition`) and replaces exactly the window's rows on the branch in one atomic commit. CSV"
        " sources with `{partition}` in a path, `write_mode: append`, `catalog: iceberg`; not with"
        " `source.incremental` or `sensor` (yet). With `schedule`, each tick requests the last partition ended"
        " by then.",
        '{type: daily, start: "2024-01-01", field: ModifiedDate}',
    ),
    "partitions.type": (
        "Length of a partition: `hourly` (key `2024-01-31-05:00`), `daily` (`2024-01-31`), `weekly` (starts"
        " Sunday, key of its first day) or `monthly` (`2024-01-01`).",
        "daily",
    ),
    "partitions.start": ("First partition: `YYYY-MM-DD`, or `YYYY-MM-DD HH:MM` for hourly partitions.", '"2024-01-01"'),
    "partitions.field": (
        "A required `date`, `timestamp` or `timestamptz` field whose value places a row in a partition (a `date`"
        " field cannot take hourly partitions).",
        "ModifiedDate",
    ),
    "partitions.timezone": (
        "IANA zone of the partitions' bounds (default UTC): a `timestamptz` is compared as an instant, a"
        " `timestamp` as wall-clock time in this zone, a `date` as the calendar day in this zone.",
        "Europe/Berlin",
    ),
}

EXAMPLE = """\
# yaml-language-server: $schema=../asset-spec.schema.json
apiVersion: v3.0.2
kind: DataContract
id: 53581432-6c55-4ba2-a65f-72344a91553a
name: csv_person
version: "1.0"
status: active
domain: adventureworks
dataProduct: adventureworks
tenant: demo_tenant
description:
  purpose: People from the AdventureWorks sample database
  usage: Join on BusinessEntityID
  limitations: Sample data
tags: [adventureworks, person]
team: {owner: data-team@example.com, name: Data Platform}
compliance: {classification: [confidential], retention_days: 365, regulations: [GDPR]}

schema:
  - {name: BusinessEntityID, type: integer, required: true, primary_key: true, description: Primary key}
  - {name: PersonType, type: string, required: true}
  - {name: FirstName, type: string, required: true, classification: PII}
  - {name: Rate, type: "decimal(10,4)"}
  - {name: Born, type: date, format: "%d/%m/%Y"}
  - {name: ModifiedDate, type: timestamp, required: true}
  - {name: Deleted, type: boolean}

source:
  type: csv
  files:
    - {path: data/adventureworks/Person.csv, object: Person}
  options: {delimiter: ",", quote_char: '"', encoding: utf-8, header: true, null_values: ["", "NULL"]}
  incremental: {strategy: file_modified_time, lookback_days: 0}

target:
  catalog: iceberg
  warehouse: s3://lake                 # default: DATIVO_WAREHOUSE
  branch: demo_tenant
  publish: false                       # true: every run also lands on main, in the same commit
  partitioning: [ingest_date]
  parquet_target_size_mb: 128
  write_mode: merge                    # append | overwrite | merge (by the primary key)
  delete_field: Deleted                # merge only: true removes the key

schema_validation_mode: strict
retry_config: {max_retries: 3, retry_delay_seconds: 5, backoff: exponential, retryable_errors: []}
schedule: {cron: "0 * * * *", timezone: UTC}
sensor: {minimum_interval_seconds: 60}
"""


# the other source kind, as the complete example's ``source`` would read for a database
DATABASE_SOURCE_EXAMPLE = """\
source:
  type: postgres
  connection: {url_env: SHOP_DB_URL}
  table: sales.orders
  incremental: {strategy: cursor, cursor_field: ModifiedDate, lookback_seconds: 300}
"""

# a time-partitioned asset: what the complete example would change (docs/partitions.md)
PARTITIONS_EXAMPLE = """\
source:
  type: csv
  files:
    - {path: "data/adventureworks/Person-{partition}.csv"}
  fan_out: {step_size_mb: 256}          # optional: the files stream in steps of about 256 MiB, committed once
target: {partitioning: ["day(ModifiedDate)"], write_mode: append}
partitions: {type: daily, start: "2024-01-01", field: ModifiedDate, timezone: UTC}
"""

def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every model an annotation can hold: one, or each kind of a union such as ``source``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _fields(
    model: type[BaseModel], prefix: str = "", seen: set[str] | None = None
) -> Iterator[tuple[str, FieldInfo, type[BaseModel] | None]]:
    """Every key of ``model`` and its nested models, depth first: (key path, field, nested model). The keys of a
    union of models (``source``: csv, postgres) are listed once, those of its first kind first."""
    seen = set() if seen is None else seen
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        if path not in seen:  # a key another kind has too: listed once, its own nested keys below it still are
            seen.add(path)
            yield path, info, _model_in(info.annotation)
        for kind in _models_in(info.annotation):
            yield from _fields(kind, f"{path}[]." if _is_list(info.annotation) else f"{path}.", seen)


def key_paths() -> list[str]:
    """Every key a spec can have, as ``source.files[].path``."""
    return [path for path, _, _ in _fields(AssetSpecModel)]


def _validator_names(metadata: list[Any]) -> set[str]:
    return {getattr(getattr(m, "func", None), "__name__", "") for m in metadata}


def _type_text(annotation: Any, metadata: list[Any]) -> str:  # noqa: PLR0911 - one branch per kind of type
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        return _type_text(inner, [*metadata, *extra])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(dict.fromkeys(_type_text(a, metadata) for a in options))  # each kind once
    if origin is list:
        (item,) = typing.get_args(annotation)
        plural = {"mapping": "mappings", "partition entry": "partition entries"}
        text = _type_text(item, [])
        return f"list of {plural.get(text, text)}"
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{member.value}`" for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation is ColumnType:
        return "type name"
    validators = _validator_names(metadata)
    if annotation is str:
        if "_identifier" in validators:
            return "name"
        if "_partition_entry" in validators:
            return "partition entry"
        return "text"
    return {bool: "true/false", int: "whole number", float: "number"}.get(annotation, str(annotation))


def _constraints(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        if isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            parts.append("non-empty")
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append("one character" if item.max_length == 1 else f"at most {item.max_length} characters")
        elif isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
    if parts == ["non-empty", "one character"]:
        return "one character"
    return ", ".join(parts)


def _yaml_value(value: Any, in_list: bool = False) -> str:
    """A value as it would be written in a spec (strings plain where YAML reads them back unchanged)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        if value and _reads_back(f"[{value}]" if in_list else value, [value] if in_list else value):
            return value
        return f"'{value}'" if '"' in value and "'" not in value else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v, in_list=True) for v in value) + "]"
    return json.dumps(value, default=str)


def _reads_back(text: str, expected: Any) -> bool:
    try:
        return yaml.safe_load(text) == expected
    except yaml.YAMLError:
        return False


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    default = info.get_default(call_default_factory=True)
    if default is None:
        return "—"
    if isinstance(default, BaseModel):
        return "the defaults below"
    return f"`{_yaml_value(default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, FieldInfo, type[BaseModel] | None]], prefix: str) -> list[str]:
    lines = ["| key | type | default | meaning | example |", "|---|---|---|---|---|"]
    for path, info, nested in rows:
        meaning, example = KEY_DOCS[path]
        kind = _type_text(info.annotation, list(info.metadata))
        if nested is not None:
            section = path + ("[]" if _is_list(info.annotation) else "")
            kind = f"{kind} ([`{section}`](#{_anchor(section)}))"
        constraints = _constraints(list(info.metadata))
        if constraints:
            kind = f"{kind}, {constraints}"
        key = path[len(prefix) :]
        lines.append(f"| `{key}` | {kind} | {_default_text(info)} | {_cell(meaning)} | `{_cell(example)}` |")
    return lines


def _anchor(section: str) -> str:
    return "".join(ch for ch in section.lower() if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def render_spec_reference() -> str:
    """The Markdown of docs/spec-reference.md.

    Raises:
        KeyError: when ``KEY_DOCS`` lacks a key of the models or describes a key they do not have.
    """
    fields = list(_fields(AssetSpecModel))
    paths = [path for path, _, _ in fields]
    missing = [p for p in paths if p not in KEY_DOCS]
    stale = [p for p in KEY_DOCS if p not in paths]
    if missing or stale:
        raise KeyError(f"KEY_DOCS out of step with the spec models: undocumented {missing}, unknown {stale}")
    sections: dict[str, list[tuple[str, FieldInfo, type[BaseModel] | None]]] = {"": []}
    for path, info, nested in fields:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        sections.setdefault(parent, []).append((path, info, nested))
    out = [
        "# Asset spec reference",
        "",
        f"<!-- generated from the models in dativo_dagster/spec.py: {REGENERATE} -->",
        "",
        "Every `*.yaml` / `*.yml` file under `asset_specs/` (recursively; another folder via `DATIVO_ASSET_SPECS_DIR`)",
        "is one asset spec. This page lists every key a spec can have: its type and constraints, its default and",
        "an example. Keys are case-sensitive; unknown keys are errors, and every problem of every spec is reported",
        "at once with the file and key path (`dativo-dagster validate`). Editors that read",
        "`asset_specs/asset-spec.schema.json` (the yaml-language-server comment on the first line) complete and",
        "check the same keys.",
        "",
        "Generated from the pydantic models in `dativo_dagster/spec.py`; regenerate with",
        f"`{REGENERATE}` (`dativo_dagster_tests/test_docs.py` fails when this page is not current).",
        "",
        "## Top level",
        "",
        *_table(sections[""], ""),
    ]
    for path, _, nested in fields:
        if nested is None:
            continue
        is_list = _is_list(_field_at(path).annotation)
        section = path + ("[]" if is_list else "")
        intro = "Each entry of the list is a mapping" if is_list else "A mapping"
        out += ["", f"## `{section}`", "", f"{intro} with these keys.", "", *_table(sections[section], section + ".")]
    out += [
        "",
        "## Column types",
        "",
        "`schema[].type` is one of",
        ", ".join(f"`{name}`" for name in TYPE_NAMES) + ",",
        "in any case (`decimal(p,s)`: `p` digits in all, 1 to 38, `s` of them after the point). How text becomes",
        "each type, and which text is refused, is in the README's Types table.",
        "",
        "## Complete example",
        "",
        "A spec that sets every key (`dativo_dagster_tests/test_docs.py` checks that it is valid):",
        "",
        "```yaml",
        EXAMPLE.rstrip("\n"),
        "```",
        "",
        "A database source instead of files (docs/sources/postgres.md; `type: mysql` reads MySQL / MariaDB the"
        " same way, docs/sources/mysql.md):",
        "",
        "```yaml",
        DATABASE_SOURCE_EXAMPLE.rstrip("\n"),
        "```",
        "",
        "A time-partitioned asset (docs/partitions.md): these keys instead of the example's `source`, `target`"
        " and `sensor` (a partitioned asset takes no `incremental`, `sensor`, `merge` or `overwrite`):",
        "",
        "```yaml",
        PARTITIONS_EXAMPLE.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(out)


def _field_at(path: str) -> FieldInfo:
    """The field at a key path such as ``source.files``."""
    models: list[type[BaseModel]] = [AssetSpecModel]
    info: FieldInfo | None = None
    for part in path.replace("[]", "").split("."):
        info = next(f for model in models for name, f in model.model_fields.items() if (f.alias or name) == part)
        models = _models_in(info.annotation)
    assert info is not None
    return info


if __name__ == "__main__":
    sys.stdout.write(render_spec_reference())
