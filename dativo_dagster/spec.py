"""Asset specs: YAML files parsed into frozen, typed models (CONTRACT section 1)."""

from __future__ import annotations

import codecs
import difflib
import enum
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from dativo_dagster.errors import MAX_PATTERN_CHARS, SpecError, retryable_pattern_problem
from dativo_dagster.layouts import layout_problems
from dativo_dagster.types import ColumnType, TypeKind

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Names become Dagster tag values (at most 63 characters), catalog identifiers and folder names
MAX_NAME_LENGTH = 63
# an owner with '@' is an email address, as Dagster accepts it; without '@' it is a team name
OWNER_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,7}")
SPEC_SUFFIXES = (".yaml", ".yml")
MAX_SPEC_BYTES = 1 << 20
MAX_YAML_DEPTH = 50
# Pure-Python YAML takes about 0.1 ms per node: a 1 MiB flow list of 350,000 numbers would take a minute to load.
# 20,000 nodes take 1-2 s and hold a schema of some 1,800 fully described columns.
MAX_YAML_NODES = 20_000
SYSTEM_COLUMNS = ("_ingested_at", "_source_file", "_run_id")
# extra columns of the quarantine table (table_schema.rejects_iceberg_schema); a spec column must not shadow them
REJECTS_COLUMNS = ("_reject_reason", "_source_line", "_raw_record")
RESERVED_COLUMNS = (*SYSTEM_COLUMNS, *REJECTS_COLUMNS)


class SpecProblems(ValueError):
    """Raised by model validators that find several problems at once.

    ``problems`` holds ``(key path relative to the validated model, message)`` pairs; the loader turns each
    into its own line, so one spec's problems are all reported together.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{key}: {message}" if key else message for key, message in self.problems))


class _Model(BaseModel):
    """Frozen, no unknown keys. Numbers are ``strict=True`` where declared: YAML ``yes`` is not 1."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _identifier(value: str) -> str:
    lowered = value.lower()
    # fullmatch: '$' alone would let a trailing line break through; ASCII only: 'K' (Kelvin) lower-cases to 'k'
    if not value.isascii() or not NAME_PATTERN.fullmatch(lowered):
        shown = _shown(value) if value.isascii() else ascii(value)  # makes look-alike letters visible
        raise ValueError(f"expected a name matching [a-z][a-z0-9_]* after lower-casing; got {shown}")
    if len(lowered) > MAX_NAME_LENGTH:
        raise ValueError(f"expected at most {MAX_NAME_LENGTH} characters; got {len(lowered)}")
    return lowered


Identifier = Annotated[str, AfterValidator(_identifier)]


def _column_type(value: Any) -> ColumnType:
    if isinstance(value, ColumnType):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a type name such as 'string' or 'decimal(10,2)'; got {_shown(value)}")
    return ColumnType.parse(value)


class ValidationMode(str, enum.Enum):
    """What happens to invalid rows."""

    STRICT = "strict"
    WARN = "warn"


class WriteMode(str, enum.Enum):
    """How a run's rows join the table."""

    APPEND = "append"
    OVERWRITE = "overwrite"
    MERGE = "merge"  # by primary key: a row replaces the row with its key, or adds a new key (CONTRACT 8)


class CatalogKind(str, enum.Enum):
    """Where committed files are registered."""

    ICEBERG = "iceberg"
    NONE = "none"


_FORMAT_KINDS = (TypeKind.DATE, TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ)
CURSOR_KINDS = (TypeKind.INTEGER, TypeKind.DATE, TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ)


def _any_case(word: str) -> str:
    # JSON Schema patterns are ECMA-262: no inline (?i) flag, so spell every letter in both cases
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


_TYPE_PATTERN = (
    r"^\s*("
    + "|".join(_any_case(w) for w in ("string", "integer", "long", "float", "double", "boolean", "date", "timestamptz", "timestamp"))
    + "|" + _any_case("decimal") + r"\(\s*\d+\s*,\s*\d+\s*\))\s*$"
)


class FieldSpec(_Model):
    """One column of the schema."""

    name: str = Field(min_length=1, max_length=255)
    type: Annotated[
        ColumnType,
        WithJsonSchema(
            {
                "type": "string",
                "pattern": _TYPE_PATTERN,
                "examples": ["string", "integer", "double", "boolean", "date", "timestamp", "timestamptz", "decimal(10,4)"],
                "description": "string, integer/long, float/double, boolean, date, timestamp, timestamptz or decimal(p,s)",
            }
        ),
    ]
    required: bool = False
    primary_key: bool = False
    description: str | None = None
    classification: str | None = None
    format: str | None = Field(
        default=None, min_length=1, description="strptime-style layout for date/timestamp text"
    )

    @property
    def is_pii(self) -> bool:
        """Whether the field is classified PII (any case): its values are never shown outside the tables."""
        return self.classification is not None and self.classification.strip().lower() == "pii"

    @field_validator("type", mode="before")
    @classmethod
    def _parse_type(cls, value: Any) -> ColumnType:
        return _column_type(value)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value != value.strip() or any(ord(ch) < 32 for ch in value) or "." in value:
            raise ValueError(f"column name {value!r} must not contain dots, control characters or edge spaces")
        if value.lower() in RESERVED_COLUMNS:
            raise ValueError(
                f"column name {value!r} is reserved for a system column; reserved: {', '.join(RESERVED_COLUMNS)}"
            )
        return value

    @model_validator(mode="after")
    def _format_fits_type(self) -> FieldSpec:
        if self.format is not None and self.type.kind not in _FORMAT_KINDS:
            raise SpecProblems(
                [("format", f"only allowed on date, timestamp or timestamptz fields; this field is {self.type}")]
            )
        if self.format is not None:
            problems = layout_problems(self.format, zoned=self.type.kind is TypeKind.TIMESTAMPTZ)
            if problems:
                raise SpecProblems([("format", f"{_shown(self.format)}: {problem}") for problem in problems])
        return self


class Description(_Model):
    purpose: str | None = None
    usage: str | None = None
    limitations: str | None = None


class Team(_Model):
    owner: str = Field(min_length=1)
    name: str | None = None

    @field_validator("owner")
    @classmethod
    def _email_or_team(cls, value: str) -> str:
        if "@" in value and not OWNER_EMAIL.fullmatch(value):
            raise ValueError(
                f"expected an email address such as data-team@example.com, or a team name without '@'; got {_shown(value)}"
            )
        return value


class Compliance(_Model):
    classification: list[str] = Field(default_factory=list)
    retention_days: int | None = Field(default=None, ge=0, strict=True)
    regulations: list[str] = Field(default_factory=list)


class SourceFile(_Model):
    path: str = Field(min_length=1)
    object: str | None = None


_LINE_BREAKS = ("\n", "\r")


class CsvOptions(_Model):
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quote_char: str = Field(default='"', min_length=1, max_length=1)
    encoding: str = "utf-8"
    header: bool = True
    null_values: list[str] = Field(default_factory=lambda: ["", "NULL", "null", "None"])

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        expected = "expected a text encoding such as utf-8, utf-16 or latin-1"
        try:
            info = codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}; {expected}") from None
        # base64, rot13, zlib ... are codecs but cannot turn bytes into text
        if not getattr(info, "_is_text_encoding", True):
            raise ValueError(f"{value!r} is not a text encoding; {expected}")
        return info.name

    @model_validator(mode="after")
    def _distinct_characters(self) -> CsvOptions:
        problems = []
        for key in ("delimiter", "quote_char"):
            if getattr(self, key) in _LINE_BREAKS:
                problems.append((key, "a line break cannot be used here; expected a single other character"))
        if not problems and self.delimiter == self.quote_char:
            problems.append(("quote_char", f"must differ from the delimiter {self.delimiter!r}"))
        if problems:
            raise SpecProblems(problems)
        return self


class IncrementalStrategy(str, enum.Enum):
    FILE_MODIFIED_TIME = "file_modified_time"


def _strategy_for(kind: str, expected: str) -> Any:
    """A before-validator of ``strategy``: the other kind's strategy gets a message saying where it belongs."""

    def check(value: Any) -> Any:
        if value in ("cursor", "file_modified_time") and value != expected:
            other = "database sources (postgres, mysql)" if value == "cursor" else "csv sources"
            raise ValueError(f"{value!r} is for {other} only; {kind} sources use {expected!r}")
        return value

    return check


class Incremental(_Model):
    strategy: IncrementalStrategy = IncrementalStrategy.FILE_MODIFIED_TIME
    lookback_days: int = Field(default=0, ge=0, strict=True)

    _strategy = field_validator("strategy", mode="before")(_strategy_for("csv", "file_modified_time"))


class CursorIncremental(_Model):
    """``incremental: {strategy: cursor, ...}`` of a database source (CONTRACT 7): rows at or above the committed
    high-water mark of ``cursor_field`` (less ``lookback_seconds`` for time stamps)."""

    strategy: Literal["cursor"]
    cursor_field: str = Field(min_length=1, max_length=255)
    lookback_seconds: int = Field(default=0, ge=0, strict=True)

    _strategy = field_validator("strategy", mode="before")(_strategy_for("database", "cursor"))


DEFAULT_STEP_SIZE_MB = 512


class FanOut(_Model):
    """``source.fan_out``: the run's files are split into groups of about ``step_size_mb`` (MiB of source files),
    each streamed in its own step, and committed once (docs/fan-out.md)."""

    step_size_mb: int = Field(default=DEFAULT_STEP_SIZE_MB, ge=1, strict=True)


class CsvSourceSpec(_Model):
    """``source.type: csv``: files read as CSV text (CONTRACT section 1)."""

    type: Literal["csv"] = "csv"
    files: list[SourceFile] = Field(min_length=1)
    options: CsvOptions = Field(default_factory=CsvOptions)
    incremental: Incremental | None = None
    fan_out: FanOut | None = None


ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# a table or view: name or schema.name, each part a plain identifier or a double-quoted one
_TABLE_PART = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
TABLE_PATTERN = re.compile(rf"^{_TABLE_PART}(?:\.{_TABLE_PART})?$")
# MySQL / MariaDB: database.table, parts plain or back-quoted
_MYSQL_TABLE_PART = r"(?:[A-Za-z0-9_$]+|`(?:[^`]|``)+`)"
MYSQL_TABLE_PATTERN = re.compile(rf"^{_MYSQL_TABLE_PART}(?:\.{_MYSQL_TABLE_PART})?$")


class Connection(_Model):
    """Where a database source connects: the NAME of an environment variable holding the URL, never the URL."""

    url_env: str = Field(min_length=1, max_length=255)

    @field_validator("url_env")
    @classmethod
    def _variable_name(cls, value: str) -> str:
        if "://" in value or not ENV_NAME_PATTERN.fullmatch(value):
            raise ValueError(
                "expected the NAME of an environment variable that holds the URL (such as SHOP_DB_URL), never the URL"
                " itself; got " + ("a URL" if "://" in value else _shown(value))
            )
        return value


class DatabaseSourceSpec(_Model):
    """``source.type: postgres`` or ``mysql``: one table or view, or one read-only SELECT (CONTRACT section 7)."""

    type: Literal["postgres", "mysql"]
    connection: Connection
    table: str | None = Field(default=None, min_length=1, max_length=1000)
    query: str | None = Field(default=None, min_length=1, max_length=100_000)
    incremental: CursorIncremental | None = None
    # refused with a reason rather than as an unknown key; not offered by the JSON schema
    fan_out: SkipJsonSchema[Any] = None

    @field_validator("fan_out")
    @classmethod
    def _no_fan_out(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "a database source is read as one consistent snapshot (one transaction), which cannot be split across"
                " processes; remove fan_out (it is for csv sources)"
            )
        return None

    @field_validator("table")
    @classmethod
    def _table_name(cls, value: str, info: ValidationInfo) -> str:
        mysql = info.data.get("type") == "mysql"
        if not (MYSQL_TABLE_PATTERN if mysql else TABLE_PATTERN).fullmatch(value.strip()):
            quoting = "back-quoted" if mysql else "double-quoted"
            raise ValueError(
                f"expected a table or view name such as orders or sales.orders (parts may be {quoting});"
                f" got {_shown(value)}; use query: for anything else"
            )
        return value.strip()

    @model_validator(mode="after")
    def _one_relation(self) -> DatabaseSourceSpec:
        problems = []
        if (self.table is None) == (self.query is None):
            key = "table" if self.table is None else "query"
            problems.append((key, "expected exactly one of table or query"))
        if problems:
            raise SpecProblems(problems)
        return self


def _source_kind(value: Any) -> str:
    """The tag of a ``source`` mapping: its ``type``, ``csv`` when left out (and for anything not a mapping, which
    the CSV model then refuses with a clear message)."""
    if isinstance(value, dict):
        kind = value.get("type", "csv")
        return kind if isinstance(kind, str) else "csv"
    return getattr(value, "type", "csv")


SOURCE_MODELS: dict[str, type[BaseModel]] = {"csv": CsvSourceSpec, "postgres": DatabaseSourceSpec, "mysql": DatabaseSourceSpec}
SOURCE_KINDS = tuple(SOURCE_MODELS)
SourceSpec = Annotated[
    Annotated[CsvSourceSpec, Tag("csv")]
    | Annotated[DatabaseSourceSpec, Tag("postgres")]
    | Annotated[DatabaseSourceSpec, Tag("mysql")],
    Discriminator(_source_kind),
]


_CALL = re.compile(r"^(?P<fn>[A-Za-z_][A-Za-z0-9_]*)\s*\((?P<args>[^()]*)\)$")
_PLAIN_FIELD = re.compile(r"^[^(),]+$")
_WIDTH_TRANSFORMS = ("bucket", "truncate")
MAX_TRANSFORM_WIDTH = 2**31 - 1
_FIELD_TRANSFORMS = ("identity", "day", "month", "year", "hour")
PARTITION_FORMS = "a field name, day(f), month(f), year(f), hour(f), bucket(n, f), truncate(n, f) or ingest_date"

_TIME_KINDS = frozenset({TypeKind.DATE, TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ})
# which column kinds each Iceberg transform accepts (Iceberg spec, "Partition Transforms")
TRANSFORM_KINDS: dict[str, frozenset[TypeKind]] = {
    "identity": frozenset(TypeKind),
    "year": _TIME_KINDS,
    "month": _TIME_KINDS,
    "day": _TIME_KINDS,
    "hour": frozenset({TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ}),
    "bucket": frozenset(TypeKind) - {TypeKind.FLOAT, TypeKind.BOOLEAN},
    "truncate": frozenset({TypeKind.INTEGER, TypeKind.STRING, TypeKind.DECIMAL}),
}


class PartitionField(_Model):
    """One partitioning entry: a field name, a transform of a field, or ``ingest_date``."""

    transform: Literal["identity", "day", "month", "year", "hour", "bucket", "truncate"]
    source: str
    width: int | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionField:
        """Parse ``field``, ``day(field)``, ``bucket(16, field)`` or ``ingest_date``.

        Raises:
            ValueError: naming the entry and the accepted forms.
        """
        text = text.strip()
        if text == "ingest_date":
            return cls(transform="day", source="_ingested_at")
        match = _CALL.match(text)
        if not match:
            if not _PLAIN_FIELD.match(text):
                raise ValueError(f"cannot read partition {text!r}; expected {PARTITION_FORMS}")
            return cls(transform="identity", source=text)
        fn = match.group("fn")
        args = [a.strip() for a in match.group("args").split(",")]
        if fn in _WIDTH_TRANSFORMS:
            if len(args) != 2 or not args[0].isdigit() or int(args[0]) < 1 or not args[1]:
                raise ValueError(f"{text!r}: expected {fn}(n, field) with a positive whole number n")
            if int(args[0]) > MAX_TRANSFORM_WIDTH:
                raise ValueError(f"{text!r}: n is at most {MAX_TRANSFORM_WIDTH} (an Iceberg int)")
            return cls(transform=fn, source=args[1], width=int(args[0]))
        if fn in _FIELD_TRANSFORMS:
            if len(args) != 1 or not args[0]:
                raise ValueError(f"{text!r}: expected {fn}(field)")
            return cls(transform=fn, source=args[0])
        raise ValueError(f"{text!r}: unknown transform {fn!r}; expected {PARTITION_FORMS}")

    @property
    def name(self) -> str:
        """Partition field name, also the Hive folder key."""
        if self.source == "_ingested_at" and self.transform == "day":
            return "ingest_date"
        if self.transform == "identity":
            return self.source.lower()
        suffix = f"{self.transform}_{self.width}" if self.width else self.transform
        return f"{self.source.lower()}_{suffix}"

    def __str__(self) -> str:
        if self.name == "ingest_date":
            return "ingest_date"
        if self.transform == "identity":
            return self.source
        if self.width is not None:
            return f"{self.transform}({self.width}, {self.source})"
        return f"{self.transform}({self.source})"


def _partition_entry(value: str) -> str:
    PartitionField.parse(value)
    return value


class TargetSpec(_Model):
    catalog: CatalogKind = CatalogKind.ICEBERG
    warehouse: str | None = Field(default=None, min_length=1)
    branch: Identifier | None = None
    partitioning: list[Annotated[str, AfterValidator(_partition_entry)]] = Field(default_factory=list)
    parquet_target_size_mb: float = Field(default=128, gt=0, le=4096, strict=True)
    write_mode: WriteMode = WriteMode.APPEND
    # merge only: a boolean field whose true value removes the row's key from the table (the row is not loaded)
    delete_field: str | None = Field(default=None, min_length=1)
    # write-audit-publish (CONTRACT 9): each run's commit also moves main to the branch's new head, in one catalog
    # commit (publish.publish_to_main)
    publish: bool = Field(default=False, strict=True)

    @property
    def partition_fields(self) -> list[PartitionField]:
        """The partitioning entries, parsed."""
        return [PartitionField.parse(entry) for entry in self.partitioning]


def _retryable_pattern(value: str) -> str:
    problem = retryable_pattern_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class RetryConfig(_Model):
    max_retries: int = Field(default=3, ge=0, le=100, strict=True)
    retry_delay_seconds: float = Field(default=5, ge=0, strict=True)
    backoff: Literal["exponential", "linear", "none"] = "exponential"
    retryable_errors: list[
        Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS), AfterValidator(_retryable_pattern)]
    ] = Field(default_factory=list)


class ScheduleSpec(_Model):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        import dagster as dg  # noqa: PLC0415 - dagster's own cron rules decide what a schedule accepts

        try:
            dg.ScheduleDefinition(name="cron_check", cron_schedule=value, job_name="cron_check")
        except dg.DagsterInvalidDefinitionError:
            raise ValueError(
                f"invalid cron expression {value!r}; expected five fields such as '0 * * * *' or @hourly/@daily"
            ) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        if value.upper() == "UTC":
            return "UTC"
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {value!r}; expected an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value


class SensorSpec(_Model):
    minimum_interval_seconds: int = Field(default=60, ge=1, strict=True)


class PartitionType(str, enum.Enum):
    """How long one time partition of a partitioned asset is."""

    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


PARTITION_START_PATTERN = re.compile(r"^(\d{4}-\d{2}-\d{2})(?: (\d{2}:\d{2}))?$")


class PartitionsSpec(_Model):
    """``partitions:``: the asset is time-partitioned in Dagster; a partition's run replaces the rows whose ``field``
    falls in its window (CONTRACT section 10, docs/partitions.md)."""

    type: PartitionType
    start: str = Field(min_length=1, description="first partition: YYYY-MM-DD, or YYYY-MM-DD HH:MM (hourly only)")
    field: str = Field(min_length=1, description="a required date, timestamp or timestamptz schema field")
    timezone: str = Field(default="UTC", description="IANA zone of the partitions' bounds")

    @field_validator("start")
    @classmethod
    def _valid_start(cls, value: str) -> str:
        from datetime import datetime  # noqa: PLC0415 - local: the module imports no datetime otherwise

        match = PARTITION_START_PATTERN.fullmatch(value.strip())
        expected = "expected YYYY-MM-DD or YYYY-MM-DD HH:MM (such as 2024-01-01 or 2024-01-01 00:00)"
        if match is None:
            raise ValueError(f"{expected}; got {_shown(value)}")
        try:
            datetime.strptime(value.strip(), "%Y-%m-%d %H:%M" if match.group(2) else "%Y-%m-%d")
        except ValueError:
            raise ValueError(f"not a real date or time; {expected}; got {_shown(value)}") from None
        return value.strip()

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        if value.upper() == "UTC":
            return "UTC"
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}; expected an IANA name such as UTC or Europe/Berlin") from None
        return value


class AssetSpecModel(_Model):
    """One asset spec file (ODCS v3.0.2 flavoured)."""

    api_version: str = Field(default="v3.0.2", alias="apiVersion")
    kind: Literal["DataContract"] = "DataContract"
    id: str | None = None
    name: Identifier
    version: Annotated[str, WithJsonSchema({"type": ["string", "integer"], "minLength": 1})] = Field(min_length=1)
    status: str | None = None
    domain: Identifier
    data_product: Identifier = Field(alias="dataProduct")
    tenant: Identifier
    description: Description | None = None
    tags: list[str] = Field(default_factory=list)
    team: Team
    compliance: Compliance = Field(default_factory=Compliance)
    schema_: list[FieldSpec] = Field(alias="schema", min_length=1)
    source: SourceSpec
    target: TargetSpec = Field(default_factory=TargetSpec)
    schema_validation_mode: ValidationMode = ValidationMode.STRICT
    retry_config: RetryConfig = Field(default_factory=RetryConfig)
    schedule: ScheduleSpec | None = None
    sensor: SensorSpec | None = None
    partitions: PartitionsSpec | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        if isinstance(value, float):
            # YAML reads 1.10 as the number 1.1: refuse rather than store a version nobody wrote
            raise ValueError(f"write the version in quotes (e.g. \"{value}\"); unquoted it reads as the number {value}")
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> AssetSpecModel:
        problems = [*self._column_problems(), *self._partition_problems(), *self._merge_problems()]
        problems.extend(self._time_partition_problems())
        if self.target.catalog is CatalogKind.NONE and self.target.branch is not None:
            problems.append(("target.branch", "a branch needs catalog: iceberg; remove it for catalog: none"))
        problems.extend(self._publish_problems())
        problems += self._cursor_problems()
        if getattr(self.source, "fan_out", None) is not None and self.target.write_mode is WriteMode.MERGE:
            problems.append((
                "source.fan_out",
                "a merge keeps the last row of each key across the whole run, in one step; remove fan_out, or use"
                " write_mode: append or overwrite",
            ))
        if self.sensor is not None and self.source.type != "csv" and self.source.incremental is None:
            problems.append((
                "sensor",
                f"a {self.source.type} source's sensor compares the source's highest cursor value with the committed"
                " mark: it needs source.incremental: {strategy: cursor, cursor_field: ...}; add it, or use schedule:",
            ))
        elif self.sensor is not None and self.source.incremental is None and self.target.write_mode is WriteMode.APPEND:
            problems.append((
                "sensor",
                "an append asset with a sensor needs source.incremental (e.g. incremental: {strategy:"
                " file_modified_time}), or every trigger loads every file again; add it, use write_mode: overwrite,"
                " or remove sensor",
            ))
        if problems:
            raise SpecProblems(problems)
        return self

    def _publish_problems(self) -> list[tuple[str, str]]:
        if not self.target.publish:
            return []
        if self.target.catalog is CatalogKind.NONE:
            return [("target.publish", "publishing to main needs catalog: iceberg; remove publish for catalog: none")]
        if self.branch == "main":
            return [(
                "target.publish",
                "the branch is main itself, so there is nothing to publish; commit to another branch (target.branch,"
                " default: the tenant) or remove publish",
            )]
        return []

    def _cursor_problems(self) -> list[tuple[str, str]]:
        """``source.incremental`` of a database source: the cursor field is a required spec field of a type with an
        order (integer/long, date, timestamp, timestamptz); ``lookback_seconds`` only for time stamps."""
        incremental = self.source.incremental
        if not isinstance(incremental, CursorIncremental):
            return []
        key = "source.incremental.cursor_field"
        fields = {f.name: f for f in self.schema_}
        field = fields.get(incremental.cursor_field)
        if field is None:
            return [(key, f"{_shown(incremental.cursor_field)} is not a field of schema; expected one of "
                     + ", ".join(fields))]
        problems = []
        if field.type.kind not in CURSOR_KINDS:
            problems.append((key, f"{field.name!r} is {field.type}; a cursor field must be integer/long, date,"
                             " timestamp or timestamptz"))
        if not field.required:
            problems.append((key, f"{field.name!r} must be required (a row with a null cursor is never at or above"
                             " the mark); add required: true to its schema entry"))
        if self.target.write_mode is WriteMode.OVERWRITE:
            problems.append(("source.incremental", "a cursor reads only the rows past the committed mark, and"
                             " write_mode: overwrite would replace the table with them: use write_mode: append, or"
                             " remove incremental to read every row on every run"))
        if incremental.lookback_seconds and field.type.kind not in (TypeKind.TIMESTAMP, TypeKind.TIMESTAMPTZ):
            problems.append(("source.incremental.lookback_seconds", f"only time stamp cursors have a lookback;"
                             f" {field.name!r} is {field.type}: remove it or set 0"))
        return problems

    def _column_problems(self) -> list[tuple[str, str]]:
        problems = []
        first: dict[str, int] = {}
        for index, field in enumerate(self.schema_):
            if field.primary_key and not field.required:
                message = "a primary key field must be required (a key with a null cannot identify a row); add required: true"
                problems.append((f"schema[{index}].primary_key", message))
            key = field.name.lower()
            if key in first:
                message = (
                    f"duplicate column {field.name!r} (also schema[{first[key]}]; names are compared ignoring case)"
                )
                problems.append((f"schema[{index}].name", message))
            first.setdefault(key, index)
        return problems

    def _merge_problems(self) -> list[tuple[str, str]]:
        """``write_mode: merge`` needs a key and an Iceberg table; ``delete_field`` is a boolean field, merge only."""
        problems = []
        target = self.target
        merge = target.write_mode is WriteMode.MERGE
        if merge and not self.primary_key:
            problems.append((
                "target.write_mode",
                "merge needs a primary key: mark the key field(s) in schema with primary_key: true (and required: true)",
            ))
        if merge and target.catalog is CatalogKind.NONE:
            problems.append((
                "target.write_mode",
                "merge needs catalog: iceberg (it rewrites and deletes files in one atomic commit); use append or"
                " overwrite with catalog: none",
            ))
        for index, field in enumerate(self.schema_):
            if merge and field.primary_key and field.type.kind is TypeKind.FLOAT:
                problems.append((
                    f"schema[{index}].primary_key",
                    f"a float/double field ({field.name!r}) cannot be a key of a merge (Iceberg refuses it as an"
                    " identifier field, and equal-looking values may differ); use an integer, string or decimal key",
                ))
        if target.delete_field is not None:
            kinds = {f.name: f.type.kind for f in self.schema_}
            if not merge:
                problems.append((
                    "target.delete_field",
                    f"only allowed with write_mode: merge (this spec has write_mode: {target.write_mode.value})",
                ))
            elif target.delete_field not in kinds:
                known = ", ".join(f.name for f in self.schema_ if f.type.kind is TypeKind.BOOLEAN) or "none"
                problems.append((
                    "target.delete_field",
                    f"unknown field {target.delete_field!r}; expected a boolean schema field (boolean fields: {known})",
                ))
            elif kinds[target.delete_field] is not TypeKind.BOOLEAN:
                problems.append((
                    "target.delete_field",
                    f"field {target.delete_field!r} is {kinds[target.delete_field].value}; expected a boolean field",
                ))
            elif target.delete_field in self.primary_key:
                problems.append(("target.delete_field", f"{target.delete_field!r} is a key field; use another field"))
        return problems

    def _partition_problems(self) -> list[tuple[str, str]]:
        problems = []
        kinds = {f.name: f.type.kind for f in self.schema_}
        kinds["_ingested_at"] = TypeKind.TIMESTAMPTZ
        columns = {f.name.lower(): f.name for f in self.schema_}
        seen: dict[str, int] = {}
        for index, part in enumerate(self.target.partition_fields):
            key = f"target.partitioning[{index}]"
            kind = kinds.get(part.source)
            if kind is None:
                known = ", ".join(f.name for f in self.schema_)
                message = f"unknown field {part.source!r}; expected a schema field ({known}) or ingest_date"
                problems.append((key, message))
                continue
            if kind not in TRANSFORM_KINDS[part.transform]:
                allowed = _or_list([k.value for k in TypeKind if k in TRANSFORM_KINDS[part.transform]])
                needs = f"{part.transform} needs a {allowed} field"
                problems.append((key, f"{part} cannot apply to {kind.value} field {part.source!r}; {needs}"))
                continue
            if part.name in seen:
                message = f"duplicate partition {part.name!r} (also target.partitioning[{seen[part.name]}])"
                problems.append((key, message))
                continue
            seen[part.name] = index
            column = columns.get(part.name)
            if column is not None and not (part.transform == "identity" and part.source == column):
                message = (
                    f"{part} makes a partition named {part.name!r}, which is already the schema column {column!r};"
                    " rename the column"
                )
                problems.append((key, message))
        return problems

    def _time_partition_problems(self) -> list[tuple[str, str]]:
        """``partitions:`` needs a required time field and a source and write mode that a window can replace."""
        parts = self.partitions
        if parts is None:
            return []
        problems = []
        by_name = {f.name: (index, f) for index, f in enumerate(self.schema_)}
        found = by_name.get(parts.field)
        if found is None:
            known = ", ".join(f.name for f in self.schema_ if f.type.kind in _TIME_KINDS) or "none"
            problems.append((
                "partitions.field",
                f"unknown field {parts.field!r}; expected a date, timestamp or timestamptz schema field ({known})",
            ))
        else:
            index, field = found
            if field.type.kind not in _TIME_KINDS:
                problems.append((
                    "partitions.field",
                    f"field {parts.field!r} is {field.type}; expected a date, timestamp or timestamptz field",
                ))
            elif field.type.kind is TypeKind.DATE and parts.type is PartitionType.HOURLY:
                problems.append(("partitions.field", f"field {parts.field!r} is a date: hourly partitions need a"
                                 " timestamp or timestamptz field"))
            if not field.required:
                problems.append((
                    "partitions.field",
                    f"field {parts.field!r} must be required (schema[{index}].required: true): a row without it"
                    " belongs to no partition",
                ))
        if " " in parts.start and parts.type is not PartitionType.HOURLY:
            problems.append(("partitions.start", f"a time of day is for hourly partitions only; {parts.type.value}"
                             " partitions start at midnight: write YYYY-MM-DD"))
        if self.target.catalog is CatalogKind.NONE:
            problems.append(("partitions", "needs catalog: iceberg (a partition's run replaces the rows of its window"
                             " in one atomic commit); remove partitions for catalog: none"))
        if self.target.write_mode is not WriteMode.APPEND:
            problems.append((
                "target.write_mode",
                f"{self.target.write_mode.value} cannot be combined with partitions: a partition's run already"
                " replaces exactly its window's rows; use write_mode: append (the default)",
            ))
        if self.source.type != "csv":
            problems.append(("partitions", f"not supported yet for {self.source.type} sources (query windows"
                             " :partition_start / :partition_end are planned); remove partitions"))
        else:
            if self.source.incremental is not None:
                problems.append(("source.incremental", "not supported yet together with partitions: every partition"
                                 " run reads its partition's files whole; remove incremental"))
            if not any("{partition}" in f.path for f in self.source.files):
                problems.append(("source.files", "a partitioned asset reads its partition's files: put {partition}"
                                 " (the partition key, e.g. 2024-01-31) in at least one path"))
        if self.sensor is not None:
            problems.append(("sensor", "not supported with partitions (a sensor would request unpartitioned runs);"
                             " use schedule:, which requests the last complete partition"))
        return problems

    @property
    def fields(self) -> list[FieldSpec]:
        """The schema's columns in order."""
        return list(self.schema_)

    @property
    def primary_key(self) -> list[str]:
        """The names of the key fields (``primary_key: true``) in schema order; empty without a key."""
        return [field.name for field in self.schema_ if field.primary_key]

    @property
    def branch(self) -> str:
        """The Iceberg branch the asset commits to (default: the tenant)."""
        return self.target.branch or self.tenant

    @property
    def table_identifier(self) -> tuple[str, str]:
        """(namespace, table) in the catalog."""
        return (self.domain, self.name)

    @property
    def rejects_identifier(self) -> tuple[str, str]:
        """(namespace, table) of the quarantine table."""
        return (self.domain, f"{self.name}__rejects")

    @property
    def table_path(self) -> str:
        """Table location relative to the warehouse root."""
        return f"{self.domain}/{self.data_product}/{self.name}"


class LoadedSpec(BaseModel):
    """A spec with where it came from and the folder its relative paths resolve against."""

    model_config = ConfigDict(frozen=True)

    spec: AssetSpecModel
    path: Path
    base_dir: Path

    @property
    def display_path(self) -> str:
        """The spec path as shown in messages (relative to the project where possible)."""
        try:
            return str(self.path.relative_to(self.base_dir))
        except ValueError:
            return str(self.path)


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader for specs: no aliases (no billion-laughs expansion), no tags that construct objects,
    no duplicate or non-text keys, bounded nesting and node count."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in asset specs", event.start_mark
            )
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_YAML_NODES} YAML nodes (values, lists and mappings); asset specs are limited"
                    f" to {MAX_YAML_NODES}",
                    self.peek_event().start_mark,
                )
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_shown(key)} is not text; quote it", key_node.start_mark
                    )
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {first[key].start_mark.line + 1})",
                        key_node.start_mark,
                    )
                first[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def refuse_tag(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"YAML tag {_short_tag(node.tag)!r} is not allowed in asset specs", node.start_mark
        )


_SafeLoader.add_constructor(None, _SafeLoader.refuse_tag)  # type: ignore[arg-type]


def _short_tag(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix) :] if tag.startswith(prefix) else tag


def _loc_to_path(loc: Iterable[Any]) -> str:
    """Render a pydantic error location as ``schema[2].type`` using the YAML key names."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _join_key(base: str, key: str) -> str:
    if not base:
        return key
    return f"{base}.{key}" if key and not key.startswith("[") else base + key


def _shown(value: Any) -> str:
    """A value as a spec author would recognise it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``list[FieldSpec]`` or ``ScheduleSpec | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: Sequence[Any]) -> list[str]:
    """The keys the model at ``loc`` (a pydantic location inside ``AssetSpecModel``) accepts."""
    model: type[BaseModel] | None = AssetSpecModel
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part in SOURCE_KINDS and model in SOURCE_MODELS.values():
            model = SOURCE_MODELS[part]  # the tag pydantic puts into the location of a discriminated union
            continue
        field = next(
            (f for name, f in model.model_fields.items() if part in (name, f.alias)),
            None,
        )
        model = _model_class(field.annotation) if field is not None else None
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _or_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _quoted_choices(expected: str) -> list[str]:
    return re.findall(r"'([^']*)'", expected)


def _pydantic_message(error: Any) -> str:  # noqa: PLR0911 - one branch per pydantic error type
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = _shown(error.get("input"))
    if kind == "extra_forbidden":
        loc = error["loc"]
        allowed = _allowed_keys(loc[:-1])
        if not allowed:
            return "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; expected one of {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"expected one of {', '.join(repr(k) for k in SOURCE_KINDS)}; got {_shown(ctx.get('tag'))}"
    if kind in ("literal_error", "enum"):
        choices = _quoted_choices(ctx.get("expected", ""))
        if len(choices) == 1:
            return f"expected {choices[0]!r}; got {got}"
        return f"expected one of {', '.join(repr(c) for c in choices)}; got {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false; got {got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected a whole number; got {got}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number; got {got}"
    if kind == "greater_than":
        return f"expected a number greater than {_number(ctx['gt'])}; got {got}"
    if kind == "greater_than_equal":
        return f"expected a number of at least {_number(ctx['ge'])}; got {got}"
    if kind == "less_than_equal":
        return f"expected a number of at most {_number(ctx['le'])}; got {got}"
    if kind == "string_type":
        value = error.get("input")
        if value is None:
            return "expected text; got an empty value (null)"
        hint = " (quote it in YAML)" if isinstance(value, (int, float, bool)) else ""
        return f"expected text; got {got}{hint}"
    if kind == "string_too_short":
        if ctx.get("min_length") == 1:
            return "expected non-empty text"
        return f"expected at least {ctx['min_length']} characters; got {got}"
    if kind == "string_too_long":
        if ctx.get("max_length") == 1:
            return f"expected a single character; got {got}"
        return f"expected at most {ctx['max_length']} characters; got {len(error.get('input') or '')}"
    if kind == "list_type":
        return f"expected a list; got {got}"
    if kind == "too_short":
        wanted = "one item" if ctx.get("min_length") == 1 else f"{ctx['min_length']} items"
        return f"expected at least {wanted}; got {got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys; got {got}"
    message = error["msg"]
    return message[len("Value error, ") :] if message.startswith("Value error, ") else message


def _format_pydantic_error(error: Any) -> list[tuple[str, str]]:
    """One pydantic error as ``(key path, message)`` pairs (a ``SpecProblems`` error gives several)."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and "[" in p and p.endswith("]"))]
    if loc[:1] == ["source"] and len(loc) > 1 and loc[1] in SOURCE_KINDS:
        loc.pop(1)  # the discriminated union's tag: the spec author wrote it as source.type
    if error["type"] == "union_tag_invalid":
        loc.append("type")
    key = _loc_to_path(loc)
    cause = (error.get("ctx") or {}).get("error")
    if error["type"] == "value_error" and isinstance(cause, SpecProblems):
        return [(_join_key(key, sub) or "(document)", message) for sub, message in cause.problems]
    return [(key or "(document)", _pydantic_message(error))]


def parse_spec_document(document: Any, display_path: str) -> tuple[AssetSpecModel | None, list[str]]:
    """Validate one parsed YAML document; returns the model or the list of problems."""
    if document is None:
        return None, [f"{display_path}: (document): the file is empty; expected a mapping of spec keys"]
    if not isinstance(document, dict):
        return None, [f"{display_path}: (document): expected a mapping of spec keys; got {_shown(document)}"]
    try:
        # by alias only: the YAML keys are the contract's (dataProduct, schema), not the Python names
        return AssetSpecModel.model_validate(document, by_alias=True, by_name=False), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            problems.extend(f"{display_path}: {key}: {message}" for key, message in _format_pydantic_error(error))
        return None, problems


def spec_files(specs_dir: Path) -> list[Path]:
    """All spec files under ``specs_dir``, recursively, in a stable order."""
    return sorted(p for p in specs_dir.rglob("*") if p.suffix in SPEC_SUFFIXES and p.is_file())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError)) or (
        isinstance(exc, yaml.composer.ComposerError) and context
    ):
        # "but found another document" only makes sense after its context
        detail = f"{context}, {problem}" if context and problem.startswith("but ") else problem
        return f"{where}invalid YAML: {detail}"
    return f"{where}{problem}"


def load_spec_file(path: Path, base_dir: Path) -> tuple[LoadedSpec | None, list[str]]:
    """Load one spec file; returns the spec or the problems found in it."""
    try:
        display = str(path.relative_to(base_dir))
    except ValueError:
        display = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            return None, [
                f"{display}: (document): file is {size} bytes;"
                f" asset specs are limited to {MAX_SPEC_BYTES} bytes (1 MiB)"
            ]
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, [f"{display}: (document): cannot read as UTF-8 text: {exc.reason} at byte {exc.start}"]
    except OSError as exc:
        return None, [f"{display}: (document): cannot read: {exc.strerror or exc}"]
    try:
        document = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        return None, [f"{display}: (document): {_yaml_problem(exc)}"]
    except RecursionError:
        return None, [f"{display}: (document): nesting too deep"]
    model, problems = parse_spec_document(document, display)
    if model is None:
        return None, problems
    return LoadedSpec(spec=model, path=path.resolve(), base_dir=base_dir), []


def load_specs(specs_dir: Path) -> list[LoadedSpec]:
    """Load every spec under ``specs_dir``; raises ``SpecError`` listing every problem of every file.

    Problems come per file in path order, then the conflicts between files. Relative source paths resolve
    against the parent of ``specs_dir``.
    """
    specs_dir = specs_dir.resolve()
    base_dir = specs_dir.parent
    if not specs_dir.exists():
        raise SpecError([f"{specs_dir}: asset specs folder does not exist"])
    if not specs_dir.is_dir():
        raise SpecError([f"{specs_dir}: expected a folder of asset specs; this is a file"])
    loaded: list[LoadedSpec] = []
    problems: list[str] = []
    for path in spec_files(specs_dir):
        spec, file_problems = load_spec_file(path, base_dir)
        problems.extend(file_problems)
        if spec is not None:
            loaded.append(spec)
    problems.extend(_cross_spec_problems(loaded))
    if problems:
        raise SpecError(problems)
    return loaded


def _cross_spec_problems(loaded: list[LoadedSpec]) -> list[str]:
    """Asset names must be unique, and no two specs may write the same table (a data or rejects table)."""
    problems = []
    by_name: dict[str, LoadedSpec] = {}
    by_table: dict[tuple[str, str], LoadedSpec] = {}
    for item in loaded:
        spec = item.spec
        first = by_name.setdefault(spec.name, item)
        if first is not item:
            problems.append(
                f"{item.display_path}: name: asset name {spec.name!r} is already used by {first.display_path}"
            )
            continue
        for ident in (spec.table_identifier, spec.rejects_identifier):
            other = by_table.setdefault(ident, item)
            if other is not item:
                problems.append(
                    f"{item.display_path}: name: table {'.'.join(ident)} is already written by {other.display_path}"
                )
                break
    return problems


__all__ = [
    "AssetSpecModel",
    "CatalogKind",
    "CsvOptions",
    "FieldSpec",
    "LoadedSpec",
    "PartitionField",
    "PartitionType",
    "PartitionsSpec",
    "SpecProblems",
    "ValidationMode",
    "WriteMode",
    "load_spec_file",
    "load_specs",
]


SCHEMA_FILE_NAME = "asset-spec.schema.json"


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of a spec file, for editors (yaml-language-server) and documentation."""
    schema = AssetSpecModel.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_FILE_NAME
    schema["title"] = "dativo-dagster asset spec"
    return schema
