"""Checks on the SQL fragments users may pass (``where=``, ``query=``).

A ``where`` or ``query`` is SQL by nature, so it cannot be quoted; what must never
happen is that it escapes its slot: a second statement, a comment that swallows the
rest of the generated SQL, or unbalanced parentheses that close the wrapper. This lexer
walks the text honouring the engine's quoting rules and rejects those. The database
session (read-only for reads, a least-privileged user) remains the real boundary.
"""

from __future__ import annotations

from .errors import AuroraDbxError

__all__ = ["SqlFragmentError", "check_fragment"]

MAX_FRAGMENT_LENGTH = 100_000


class SqlFragmentError(AuroraDbxError, ValueError):
    """A ``where``/``query`` string would escape its place in the generated SQL."""


def check_fragment(text: str, engine: str, what: str) -> str:
    """Return ``text`` stripped if it is a single, self-contained SQL fragment."""
    if not isinstance(text, str) or not text.strip():
        raise SqlFragmentError(f"{what} must be a non-empty SQL string")
    if len(text) > MAX_FRAGMENT_LENGTH:
        raise SqlFragmentError(f"{what} is {len(text)} characters; the limit is {MAX_FRAGMENT_LENGTH}")
    if "\x00" in text:
        raise SqlFragmentError(f"{what} contains a NUL character")
    depth = 0
    i, n = 0, len(text)
    mysql = engine == "mysql"
    while i < n:
        c = text[i]
        if (
            c == "'" and not mysql and i > 0 and text[i - 1] in "eE"
            and (i == 1 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
        ):
            # E'...' strings give backslash escapes a meaning this lexer would have to
            # mirror exactly; plain '...' literals do everything a filter needs.
            raise SqlFragmentError(f"{what} uses an E'...' escape string; use a plain '...' literal")
        if c in ("'", '"') or (c == "`" and mysql):
            # Quoted literal or identifier: skip to the closing quote (doubled quotes
            # escape; MySQL also treats backslash as an escape inside strings).
            j = i + 1
            while True:
                if j >= n:
                    raise SqlFragmentError(f"{what} has an unterminated {c} quote")
                if mysql and text[j] == "\\" and c != "`":
                    j += 2
                    continue
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
            continue
        if c == "$" and not mysql and i + 1 < n and (text[i + 1] == "$" or text[i + 1].isalpha()):
            # PostgreSQL dollar quoting could hide anything from this lexer.
            k = text.find("$", i + 1)
            if k != -1 and all(ch.isalnum() or ch == "_" for ch in text[i + 1 : k]):
                raise SqlFragmentError(f"{what} uses dollar quoting ($$...$$), which is not allowed; use '...' literals")
        if c == ";":
            raise SqlFragmentError(f"{what} contains ';': one expression or SELECT only, no further statements")
        if text.startswith("--", i) or text.startswith("/*", i) or (mysql and c == "#"):
            raise SqlFragmentError(f"{what} contains a SQL comment; remove it")
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise SqlFragmentError(f"{what} closes a parenthesis it did not open")
        i += 1
    if depth != 0:
        raise SqlFragmentError(f"{what} has unbalanced parentheses")
    return text.strip()
