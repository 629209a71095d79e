"""The column types of a benchmark spec, for the peers that do not read specs themselves.

Imported by the baseline, the naive loader and the dlt loader, which run in different virtualenvs: it needs
only PyYAML and pyarrow, never dativo_dagster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import yaml

DEFAULT_NULL_VALUES = ("", "NULL", "null", "None")

ARROW_TYPES = {
    "string": pa.string(),
    "integer": pa.int64(),
    "long": pa.int64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class BenchColumn:
    """One spec column: its name, spec type, Arrow type and whether it is required."""

    name: str
    kind: str
    arrow_type: pa.DataType
    required: bool


@dataclass(frozen=True)
class BenchSpec:
    """What a peer needs of a spec: the columns in order and the null markers."""

    name: str
    columns: tuple[BenchColumn, ...]
    null_values: tuple[str, ...]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=not c.required) for c in self.columns])

    @property
    def column_types(self) -> dict[str, pa.DataType]:
        return {c.name: c.arrow_type for c in self.columns}


def load_bench_spec(path: str | Path) -> BenchSpec:
    """Read the schema block of a benchmark spec (only the plain types the benchmark specs use)."""
    raw = yaml.safe_load(Path(path).read_text())
    columns = []
    for entry in raw["schema"]:
        kind = str(entry["type"]).lower()
        if kind not in ARROW_TYPES:
            raise ValueError(f"{path}: type {kind!r} is not supported by the benchmark peers")
        columns.append(BenchColumn(entry["name"], kind, ARROW_TYPES[kind], bool(entry.get("required", False))))
    options = (raw.get("source") or {}).get("options") or {}
    null_values = tuple(options.get("null_values", DEFAULT_NULL_VALUES))
    return BenchSpec(name=raw["name"], columns=tuple(columns), null_values=null_values)
