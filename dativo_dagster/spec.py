"""Asset specs: YAML files parsed into frozen, typed models (CONTRACT section 1)."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dativo_dagster.errors import SpecError
from dativo_dagster.types import ColumnType

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
SPEC_SUFFIXES = (".yaml", ".yml")
MAX_SPEC_BYTES = 1 << 20
SYSTEM_COLUMNS = ("_ingested_at", "_source_file", "_run_id")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _identifier(value: str) -> str:
    lowered = value.lower()
    if not NAME_PATTERN.match(lowered):
        raise ValueError(f"{value!r} is not a valid name; expected [a-z][a-z0-9_]* after lower-casing")
    return lowered


Identifier = Annotated[str, AfterValidator(_identifier)]


def _column_type(value: Any) -> ColumnType:
    if isinstance(value, ColumnType):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a type name, got {type(value).__name__}")
    return ColumnType.parse(value)


class ValidationMode(str, enum.Enum):
    """What happens to invalid rows."""

    STRICT = "strict"
    WARN = "warn"


class WriteMode(str, enum.Enum):
    """How a run's rows join the table."""

    APPEND = "append"
    OVERWRITE = "overwrite"


class CatalogKind(str, enum.Enum):
    """Where committed files are registered."""

    ICEBERG = "iceberg"
    NONE = "none"


class FieldSpec(_Model):
    """One column of the schema."""

    name: str = Field(min_length=1, max_length=255)
    type: Annotated[ColumnType, Field(json_schema_extra={"type": "string"})]
    required: bool = False
    description: str | None = None
    classification: str | None = None
    format: str | None = Field(default=None, description="strptime-style layout for date/timestamp text")

    @field_validator("type", mode="before")
    @classmethod
    def _parse_type(cls, value: Any) -> ColumnType:
        return _column_type(value)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value != value.strip() or any(ord(ch) < 32 for ch in value) or "." in value:
            raise ValueError(f"column name {value!r} must not contain dots, control characters or edge spaces")
        if value.lower() in SYSTEM_COLUMNS:
            raise ValueError(f"column name {value!r} is reserved for a system column")
        return value

    @model_validator(mode="after")
    def _format_fits_type(self) -> FieldSpec:
        if self.format is not None and self.type.kind.value not in ("date", "timestamp", "timestamptz"):
            raise ValueError(f"format is only allowed for date/timestamp/timestamptz, not {self.type}")
        return self


class Description(_Model):
    purpose: str | None = None
    usage: str | None = None
    limitations: str | None = None


class Team(_Model):
    owner: str = Field(min_length=1)
    name: str | None = None


class Compliance(_Model):
    classification: list[str] = Field(default_factory=list)
    retention_days: int | None = Field(default=None, ge=0)
    regulations: list[str] = Field(default_factory=list)


class SourceFile(_Model):
    path: str = Field(min_length=1)
    object: str | None = None


class CsvOptions(_Model):
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quote_char: str = Field(default='"', min_length=1, max_length=1)
    encoding: str = "utf-8"
    header: bool = True
    null_values: list[str] = Field(default_factory=lambda: ["", "NULL", "null", "None"])

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            return codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None


class IncrementalStrategy(str, enum.Enum):
    FILE_MODIFIED_TIME = "file_modified_time"


class Incremental(_Model):
    strategy: IncrementalStrategy = IncrementalStrategy.FILE_MODIFIED_TIME
    lookback_days: int = Field(default=0, ge=0)


class SourceSpec(_Model):
    type: Literal["csv"] = "csv"
    files: list[SourceFile] = Field(min_length=1)
    options: CsvOptions = Field(default_factory=CsvOptions)
    incremental: Incremental | None = None


_TRANSFORM = re.compile(r"^(?P<fn>day|month|year|hour|bucket|truncate|identity)\((?P<args>[^()]*)\)$")


class PartitionField(_Model):
    """One partitioning entry: a field name, a transform of a field, or ``ingest_date``."""

    transform: Literal["identity", "day", "month", "year", "hour", "bucket", "truncate"]
    source: str
    width: int | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionField:
        """Parse ``field``, ``day(field)``, ``bucket(16, field)`` or ``ingest_date``."""
        text = text.strip()
        if text == "ingest_date":
            return cls(transform="day", source="_ingested_at")
        match = _TRANSFORM.match(text)
        if not match:
            return cls(transform="identity", source=text)
        fn = match.group("fn")
        args = [a.strip() for a in match.group("args").split(",")]
        if fn in ("bucket", "truncate"):
            if len(args) != 2 or not args[0].isdigit() or int(args[0]) < 1:
                raise ValueError(f"{text!r}: expected {fn}(n, field) with a positive whole number n")
            return cls(transform=fn, source=args[1], width=int(args[0]))
        if len(args) != 1 or not args[0]:
            raise ValueError(f"{text!r}: expected {fn}(field)")
        return cls(transform=fn, source=args[0])

    @property
    def name(self) -> str:
        """Partition field name, also the Hive folder key."""
        if self.source == "_ingested_at" and self.transform == "day":
            return "ingest_date"
        if self.transform == "identity":
            return self.source.lower()
        suffix = f"{self.transform}_{self.width}" if self.width else self.transform
        return f"{self.source.lower()}_{suffix}"


class TargetSpec(_Model):
    catalog: CatalogKind = CatalogKind.ICEBERG
    warehouse: str | None = None
    branch: Identifier | None = None
    partitioning: list[str] = Field(default_factory=list)
    parquet_target_size_mb: float = Field(default=128, gt=0, le=4096)
    write_mode: WriteMode = WriteMode.APPEND

    @field_validator("partitioning")
    @classmethod
    def _parse_partitioning(cls, value: list[str]) -> list[str]:
        for entry in value:
            PartitionField.parse(entry)
        return value

    @property
    def partition_fields(self) -> list[PartitionField]:
        """The partitioning entries, parsed."""
        return [PartitionField.parse(entry) for entry in self.partitioning]


class RetryConfig(_Model):
    max_retries: int = Field(default=3, ge=0, le=100)
    retry_delay_seconds: float = Field(default=5, ge=0)
    backoff: Literal["exponential", "linear", "none"] = "exponential"
    retryable_errors: list[str] = Field(default_factory=list)


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
            raise ValueError(f"invalid cron expression {value!r}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        if value.upper() == "UTC":
            return "UTC"
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value


class SensorSpec(_Model):
    minimum_interval_seconds: int = Field(default=60, ge=1)


class AssetSpecModel(_Model):
    """One asset spec file (ODCS v3.0.2 flavoured)."""

    api_version: str = Field(default="v3.0.2", alias="apiVersion")
    kind: Literal["DataContract"] = "DataContract"
    id: str | None = None
    name: Identifier
    version: str
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

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @model_validator(mode="after")
    def _consistent(self) -> AssetSpecModel:
        seen: set[str] = set()
        for index, field in enumerate(self.schema_):
            key = field.name.lower()
            if key in seen:
                raise ValueError(f"schema[{index}].name: duplicate column {field.name!r}")
            seen.add(key)
        names = {f.name for f in self.schema_}
        for index, part in enumerate(self.target.partition_fields):
            if part.source != "_ingested_at" and part.source not in names:
                raise ValueError(
                    f"target.partitioning[{index}]: unknown field {part.source!r}; expected one of {sorted(names)}"
                    " or ingest_date"
                )
        if self.target.catalog is CatalogKind.NONE and self.target.branch is not None:
            raise ValueError("target.branch: a branch needs catalog: iceberg")
        return self

    @property
    def fields(self) -> list[FieldSpec]:
        """The schema's columns in order."""
        return list(self.schema_)

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
    """SafeLoader that refuses aliases: no billion-laughs expansion, no object construction."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed in asset specs", event.start_mark
            )
        return super().compose_node(parent, index)


def _loc_to_path(loc: Iterable[Any]) -> str:
    """Render a pydantic error location as ``schema[2].type`` using the YAML key names."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "constrained-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


_KEYED_MESSAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\[\]]*: ")


def _format_pydantic_error(error: dict[str, Any]) -> tuple[str, str]:
    loc = [p for p in error["loc"] if not (isinstance(p, str) and "[" in p and p.endswith("]"))]
    key = _loc_to_path(loc)
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    elif error["type"] in ("literal_error", "enum"):
        message = f"{message}; got {error.get('input')!r}"
    # model-level validators name the key themselves ("schema[1].name: ...")
    if key == "(document)" and _KEYED_MESSAGE.match(message):
        key, message = message.split(": ", 1)
    return key, message


def parse_spec_document(document: Any, display_path: str) -> tuple[AssetSpecModel | None, list[str]]:
    """Validate one parsed YAML document; returns the model or the list of problems."""
    if not isinstance(document, dict):
        return None, [f"{display_path}: (document): expected a mapping of keys, got {type(document).__name__}"]
    try:
        return AssetSpecModel.model_validate(document), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key, message = _format_pydantic_error(error)
            problems.append(f"{display_path}: {key}: {message}")
        return None, problems


def spec_files(specs_dir: Path) -> list[Path]:
    """All spec files under ``specs_dir``, recursively, in a stable order."""
    return sorted(p for p in specs_dir.rglob("*") if p.suffix in SPEC_SUFFIXES and p.is_file())


def load_spec_file(path: Path, base_dir: Path) -> tuple[LoadedSpec | None, list[str]]:
    """Load one spec file; returns the spec or the problems found in it."""
    try:
        display = str(path.relative_to(base_dir))
    except ValueError:
        display = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            return None, [f"{display}: (document): file is {size} bytes; asset specs are limited to {MAX_SPEC_BYTES}"]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{display}: (document): cannot read: {exc}"]
    try:
        document = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return None, [f"{display}: (document): invalid YAML{where}: {problem}"]
    model, problems = parse_spec_document(document, display)
    if model is None:
        return None, problems
    return LoadedSpec(spec=model, path=path.resolve(), base_dir=base_dir), []


def load_specs(specs_dir: Path) -> list[LoadedSpec]:
    """Load every spec under ``specs_dir``; raises ``SpecError`` listing every problem of every file.

    Relative source paths resolve against the parent of ``specs_dir``.
    """
    specs_dir = specs_dir.resolve()
    base_dir = specs_dir.parent
    if not specs_dir.is_dir():
        raise SpecError([f"{specs_dir}: asset specs folder does not exist"])
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
    problems = []
    by_name: dict[str, LoadedSpec] = {}
    by_table: dict[tuple[str, str], LoadedSpec] = {}
    for item in loaded:
        spec = item.spec
        if spec.name in by_name:
            problems.append(
                f"{item.display_path}: name: asset name {spec.name!r} is already used by {by_name[spec.name].display_path}"
            )
        by_name.setdefault(spec.name, item)
        for ident in (spec.table_identifier, spec.rejects_identifier):
            other = by_table.get(ident)
            if other is not None and other is not item:
                problems.append(
                    f"{item.display_path}: name: table {'.'.join(ident)} is already written by {other.display_path}"
                )
            by_table.setdefault(ident, item)
    return problems


__all__ = [
    "AssetSpecModel",
    "CatalogKind",
    "FieldSpec",
    "LoadedSpec",
    "PartitionField",
    "ValidationMode",
    "WriteMode",
    "load_specs",
]
