"""Validation and quoting of database identifiers and table names.

Every schema, table and column name that reaches SQL passes through here. Names are
validated first (no quotes, semicolons, whitespace, control characters or comment
markers: such names are rejected with a clear error rather than escaped, because no
legitimate Aurora table in a governed policy needs them) and then always quoted for the
engine, so reserved words and mixed case work and nothing is ever interpolated bare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AuroraDbxError

__all__ = ["IdentifierError", "TableName", "check_identifier", "parse_table", "quote_identifier", "shorten"]

# Letters (any script), digits, underscore and dollar; must not start with a digit or $.
_IDENT = re.compile(r"^[^\W\d$][\w$]*$", re.UNICODE)
MAX_IDENTIFIER_BYTES = 63  # PostgreSQL keeps NAMEDATALEN-1 = 63 *bytes* (UTF-8); MySQL allows 64 characters.


class IdentifierError(AuroraDbxError, ValueError):
    """A schema, table or column name is not a plain identifier."""


def check_identifier(name: str, what: str = "identifier") -> str:
    """Return ``name`` if it is a plain identifier, else raise :class:`IdentifierError`."""
    if not isinstance(name, str) or not name:
        raise IdentifierError(f"{what} must be a non-empty string, got {shorten(name)}")
    size = len(name.encode("utf-8"))
    if size > MAX_IDENTIFIER_BYTES:
        # PostgreSQL would silently truncate a longer name to a different table.
        raise IdentifierError(f"{what} {shorten(name)} is {size} bytes in UTF-8; the limit is {MAX_IDENTIFIER_BYTES}")
    if not _IDENT.fullmatch(name):
        raise IdentifierError(
            f"{what} {shorten(name)} is not a plain identifier: use letters, digits, '_' or '$' "
            "(no quotes, dots, spaces, semicolons or comment markers)"
        )
    return name


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: errors never echo megabytes of input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def quote_identifier(name: str, engine: str) -> str:
    """Quote a validated identifier for ``engine`` (``postgresql`` or ``mysql``)."""
    check_identifier(name)
    if engine == "postgresql":
        return '"' + name.replace('"', '""') + '"'
    if engine == "mysql":
        return "`" + name.replace("`", "``") + "`"
    raise ValueError(f"unknown engine {engine!r}")


@dataclass(frozen=True, order=True)
class TableName:
    """A ``schema.table`` name, validated."""

    schema: str
    table: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}"

    def quoted(self, engine: str) -> str:
        return f"{quote_identifier(self.schema, engine)}.{quote_identifier(self.table, engine)}"


def parse_table(name: str) -> TableName:
    """Parse ``schema.table`` into a :class:`TableName`, rejecting anything else."""
    if not isinstance(name, str):
        raise IdentifierError(f"table must be a 'schema.table' string, got {type(name).__name__}")
    parts = name.split(".")
    if len(parts) != 2:
        raise IdentifierError(
            f"table {shorten(name)} must be written 'schema.table' (exactly one dot), "
            "for example 'public.customers'"
        )
    return TableName(check_identifier(parts[0], "schema"), check_identifier(parts[1], "table"))
