"""Spec column types and their Arrow and Iceberg counterparts (CONTRACT section 2)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import pyarrow as pa
from pyiceberg import types as it


class TypeKind(str, enum.Enum):
    """The logical kinds a spec column can have."""

    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    DATE = "date"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    DECIMAL = "decimal"


_ALIASES = {
    "string": TypeKind.STRING,
    "integer": TypeKind.INTEGER,
    "long": TypeKind.INTEGER,
    "float": TypeKind.FLOAT,
    "double": TypeKind.FLOAT,
    "boolean": TypeKind.BOOLEAN,
    "date": TypeKind.DATE,
    "timestamp": TypeKind.TIMESTAMP,
    "timestamptz": TypeKind.TIMESTAMPTZ,
}
_DECIMAL = re.compile(r"^decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
TYPE_NAMES = (*_ALIASES, "decimal(p,s)")


@dataclass(frozen=True)
class ColumnType:
    """A parsed spec type such as ``integer`` or ``decimal(10,4)``."""

    kind: TypeKind
    precision: int = 0
    scale: int = 0

    @classmethod
    def parse(cls, text: str) -> ColumnType:
        """Parse a spec type name; raises ``ValueError`` naming the accepted names."""
        name = text.strip().lower()
        if name in _ALIASES:
            return cls(_ALIASES[name])
        match = _DECIMAL.match(name)
        if match:
            precision, scale = int(match.group(1)), int(match.group(2))
            if not 1 <= precision <= 38:
                raise ValueError(f"decimal precision {precision} out of range; expected 1..38")
            if scale > precision:
                raise ValueError(f"decimal scale {scale} exceeds precision {precision}")
            return cls(TypeKind.DECIMAL, precision, scale)
        raise ValueError(f"unknown type {text!r}; expected one of {', '.join(TYPE_NAMES)}")

    def __str__(self) -> str:
        if self.kind is TypeKind.DECIMAL:
            return f"decimal({self.precision},{self.scale})"
        return self.kind.value

    @property
    def arrow_type(self) -> pa.DataType:
        """The Arrow type that validated values of this column have."""
        return {
            TypeKind.STRING: pa.string(),
            TypeKind.INTEGER: pa.int64(),
            TypeKind.FLOAT: pa.float64(),
            TypeKind.BOOLEAN: pa.bool_(),
            TypeKind.DATE: pa.date32(),
            TypeKind.TIMESTAMP: pa.timestamp("us"),
            TypeKind.TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
        }.get(self.kind) or pa.decimal128(self.precision, self.scale)

    @property
    def iceberg_type(self) -> it.PrimitiveType:
        """The Iceberg type of the table column."""
        return {
            TypeKind.STRING: it.StringType(),
            TypeKind.INTEGER: it.LongType(),
            TypeKind.FLOAT: it.DoubleType(),
            TypeKind.BOOLEAN: it.BooleanType(),
            TypeKind.DATE: it.DateType(),
            TypeKind.TIMESTAMP: it.TimestampType(),
            TypeKind.TIMESTAMPTZ: it.TimestamptzType(),
        }.get(self.kind) or it.DecimalType(self.precision, self.scale)
