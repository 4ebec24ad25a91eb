"""Column types: database types -> Spark and Arrow types, and the SELECT expression
that makes each column travel losslessly through PostgreSQL's ``COPY ... (FORMAT csv)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Column", "arrow_type", "mysql_columns", "postgres_columns"]

# Unconstrained NUMERIC has no fixed scale; Spark decimals need one. 38 digits with 10
# after the point covers money, rates and measurements; the server rounds beyond that.
UNCONSTRAINED_NUMERIC = (38, 10)


@dataclass(frozen=True)
class Column:
    name: str
    spark_type: str  # Spark DDL type
    select: str  # SQL expression producing the value (text-safe for COPY)
    convert: str | None = None  # post-processing on the Arrow side: "hex_binary" | "utc"
    nullable: bool = True

    def ddl(self) -> str:
        return f"`{self.name.replace('`', '``')}` {self.spark_type}"


def arrow_type(spark_type: str) -> Any:
    import pyarrow as pa

    t = spark_type.lower()
    if t.startswith("decimal"):
        p, s = (int(x) for x in t[t.index("(") + 1 : -1].split(","))
        return pa.decimal128(p, s)
    return {
        "boolean": pa.bool_(), "tinyint": pa.int8(), "smallint": pa.int16(), "int": pa.int32(),
        "bigint": pa.int64(), "float": pa.float32(), "double": pa.float64(), "string": pa.string(),
        "binary": pa.binary(), "date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC"),
        "timestamp_ntz": pa.timestamp("us"),
    }[t]


# PostgreSQL type OIDs (pg_type.oid, stable across versions).
_PG_SIMPLE = {
    16: "boolean", 20: "bigint", 21: "smallint", 23: "int", 26: "bigint", 700: "float",
    701: "double", 25: "string", 1043: "string", 1042: "string", 19: "string", 18: "string",
    1082: "date", 1114: "timestamp_ntz",
}


def postgres_columns(description: Any, quote: Any) -> list[Column]:
    """Columns from a psycopg cursor description of ``SELECT ... WHERE false``."""
    out = []
    for d in description:
        name, oid = d.name, d.type_code
        q = quote(name)
        if oid in _PG_SIMPLE:
            out.append(Column(name, _PG_SIMPLE[oid], q))
        elif oid == 1700:  # numeric
            p, s = d.precision, d.scale
            if p is None or p > 38:
                p, s = UNCONSTRAINED_NUMERIC
                out.append(Column(name, f"decimal({p},{s})", f"{q}::numeric({p},{s})"))
            else:
                out.append(Column(name, f"decimal({p},{s or 0})", q))
        elif oid == 1184:  # timestamptz: ship UTC wall time, mark as UTC on the Arrow side
            out.append(Column(name, "timestamp", f"({q} AT TIME ZONE 'UTC')", "utc"))
        elif oid == 17:  # bytea
            out.append(Column(name, "binary", f"encode({q}, 'hex')", "hex_binary"))
        else:  # uuid, json, jsonb, time, interval, arrays, enums, ...: their text form
            out.append(Column(name, "string", f"{q}::text"))
    return out


def mysql_columns(fields: Any, quote: Any) -> list[Column]:
    """Columns from PyMySQL result fields of ``SELECT ... WHERE 1=0``."""
    from pymysql.constants import FIELD_TYPE as T

    out = []
    for f in fields:
        name = f.name
        q = quote(name)
        unsigned = bool(f.flags & 32)
        binary = f.charsetnr == 63
        t = f.type_code
        if t in (T.TINY, T.SHORT, T.INT24, T.YEAR):
            out.append(Column(name, "int", q))
        elif t == T.LONG:
            out.append(Column(name, "bigint" if unsigned else "int", q))
        elif t == T.LONGLONG:
            out.append(Column(name, "decimal(20,0)" if unsigned else "bigint", q))
        elif t == T.FLOAT:
            out.append(Column(name, "float", q))
        elif t == T.DOUBLE:
            out.append(Column(name, "double", q))
        elif t in (T.DECIMAL, T.NEWDECIMAL):
            scale = f.scale
            precision = f.length - (1 if scale else 0) - (0 if unsigned else 1)
            precision = max(1, min(precision, 38))
            out.append(Column(name, f"decimal({precision},{min(scale, precision)})", q))
        elif t == T.DATE:
            out.append(Column(name, "date", q))
        elif t == T.DATETIME:
            out.append(Column(name, "timestamp_ntz", q))
        elif t == T.TIMESTAMP:  # stored as UTC; the session reads it in UTC
            out.append(Column(name, "timestamp", q, "utc"))
        elif t in (T.TINY_BLOB, T.MEDIUM_BLOB, T.LONG_BLOB, T.BLOB, T.VAR_STRING, T.STRING, T.VARCHAR) and binary:
            out.append(Column(name, "binary", q))
        elif t == T.BIT:
            out.append(Column(name, "binary", q))
        elif t in (T.TINY_BLOB, T.MEDIUM_BLOB, T.LONG_BLOB, T.BLOB, T.VAR_STRING, T.STRING, T.VARCHAR, T.JSON, T.ENUM, T.SET):
            out.append(Column(name, "string", q))
        else:  # TIME, GEOMETRY, ...: their text form
            out.append(Column(name, "string", f"CAST({q} AS CHAR)"))
    return out
