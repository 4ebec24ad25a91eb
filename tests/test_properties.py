"""Property tests (hypothesis) for the three pieces every name and SQL fragment goes through.

* identifier quoting: any string is either refused (IdentifierError) or, quoted, is a real
  PostgreSQL identifier that round-trips exactly (CREATE TABLE in a scratch schema);
* table patterns: ``TablePattern.matches`` agrees with an independent reference built on
  ``fnmatch`` (with ``*`` never crossing the schema/table dot);
* the SQL fragment checker: a fragment with ``;``, a comment or an unbalanced parenthesis
  outside quotes is always refused, and the same fragment without it is always accepted.

Examples are derandomized (the same on every run) so the figures in docs/SECURITY.md are
reproducible; every example checked is counted (``tests/support/leaks.tally``).
"""

from __future__ import annotations

import fnmatch
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aurora_dbx.identifiers import IdentifierError, TableName, check_identifier, parse_table, quote_identifier
from aurora_dbx.policy import TablePattern
from aurora_dbx.sqltext import SqlFragmentError, check_fragment
from tests.conftest import World
from tests.support.leaks import tally

FAST = settings(max_examples=300, deadline=None, derandomize=True)
DB = settings(max_examples=50, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- identifiers ---------------------------------------------------------------------------------

# Plain identifiers (any script, up to past the length limit), arbitrary text, and the
# characters that must never pass: quotes, dots, whitespace, control and comment characters.
identifier_like = st.from_regex(r"[^\W\d$][\w$]{0,70}", fullmatch=True)
hostile_chars = st.text(alphabet=st.sampled_from(list("\"'`.; \t\n\r\x00-/*#$\\()[]{}") + ["a", "Z", "_", "é", "日"]),
                        min_size=1, max_size=12)
candidates = st.one_of(identifier_like, st.text(max_size=20), hostile_chars,
                       st.builds(lambda a, b: a + b, identifier_like, hostile_chars))


@FAST
@given(candidates)
@example("a\n")
@example("select")
def test_accepted_identifiers_contain_nothing_but_letters_digits_underscore_dollar(name):
    try:
        check_identifier(name)
    except IdentifierError:
        tally("property", f"identifier refused {name!r}")
        return
    assert re.fullmatch(r"[^\W\d$][\w$]*", name), name
    assert not any(c in name for c in "\"'`.; \t\n\r\x00-/*#()")
    assert 1 <= len(name) <= 63
    tally("property", f"identifier accepted {name!r}")


@pytest.fixture(scope="module")
def scratch(world: World):
    pg = world.stack.postgres
    pg.execute_admin("DROP SCHEMA IF EXISTS adbx_prop CASCADE")
    pg.execute_admin("CREATE SCHEMA adbx_prop")
    conn = pg.admin_connect()
    yield conn
    conn.close()
    pg.execute_admin("DROP SCHEMA IF EXISTS adbx_prop CASCADE")


@pytest.mark.slow
@DB
@given(candidates)
@example("ä" * 32)
@example("Straße_select")
@example("a$b$c")
def test_identifier_is_refused_or_round_trips_exactly_in_postgresql(scratch, name):
    try:
        quoted = quote_identifier(name, "postgresql")
    except IdentifierError:
        tally("property", f"pg identifier refused {name!r}")
        return
    with scratch.cursor() as cur:
        cur.execute(f"CREATE TABLE adbx_prop.{quoted} ({quoted} int)")
        try:
            cur.execute("SELECT relname FROM pg_class WHERE relnamespace = 'adbx_prop'::regnamespace AND relkind = 'r'")
            tables = [r[0] for r in cur.fetchall()]
            cur.execute(f"SELECT attname FROM pg_attribute WHERE attrelid = 'adbx_prop.{quoted}'::regclass AND attnum > 0")
            columns = [r[0] for r in cur.fetchall()]
        finally:
            cur.execute("DO $$ DECLARE r record; BEGIN FOR r IN SELECT c.oid::regclass AS t FROM pg_class c "
                        "WHERE c.relnamespace = 'adbx_prop'::regnamespace AND c.relkind = 'r' "
                        "LOOP EXECUTE 'DROP TABLE ' || r.t; END LOOP; END $$")
    assert tables == [name] and columns == [name], (name, tables, columns)
    tally("property", f"pg identifier round trip {name!r}")


@FAST
@given(identifier_like, identifier_like)
def test_table_names_parse_and_quote_consistently(schema, table):
    try:
        check_identifier(schema)
        check_identifier(table)
    except IdentifierError:
        with pytest.raises(IdentifierError):
            parse_table(f"{schema}.{table}")
        return
    name = parse_table(f"{schema}.{table}")
    assert name == TableName(schema, table) and str(name) == f"{schema}.{table}"
    assert name.quoted("postgresql") == f'"{schema}"."{table}"'
    assert name.quoted("mysql") == f"`{schema}`.`{table}`"
    tally("property", f"table name {schema}.{table}")


# -- table patterns --------------------------------------------------------------------------------

word = st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True)
pattern_part = st.one_of(st.just("*"), word, st.builds("{}*".format, word),
                         st.builds("{}*{}".format, word, word), st.builds("*{}".format, word))
patterns = st.builds("{}.{}".format, pattern_part, pattern_part)
name_part = st.one_of(word, st.text(alphabet="ab_.*\n\"' ", max_size=6),
                      st.builds(lambda a, s: a + s, word, st.sampled_from(["", ".x", "\n", "x", "_1", "'"])))


def reference_match(pattern: str, schema: str, table: str) -> bool:
    """An independent reading of the documented rule: each part matches fnmatch-style, where
    '*' is any run of characters within the part (so a name part may not contain a dot)."""
    ps, pt = pattern.split(".")
    return ("." not in schema and "." not in table
            and fnmatch.fnmatchcase(schema, ps) and fnmatch.fnmatchcase(table, pt))


def _derived(pattern: str, fill: str) -> tuple[str, str]:
    schema, table = pattern.split(".")
    return schema.replace("*", fill), table.replace("*", fill)


@FAST
@given(patterns, name_part, name_part)
@example("public.customers", "public", "customers\n")
def test_pattern_matching_agrees_with_an_fnmatch_reference(pattern, schema, table):
    got = TablePattern(pattern).matches(TableName(schema, table))
    assert got == reference_match(pattern, schema, table), (pattern, schema, table)
    tally("property", f"pattern {pattern} vs {schema!r}.{table!r}")


@FAST
@given(patterns, st.sampled_from(["", "x", "abc_9", ".", "a.b", "\n", "'"]))
def test_names_derived_from_a_pattern_match_exactly_when_the_fill_has_no_dot(pattern, fill):
    schema, table = _derived(pattern, fill)
    got = TablePattern(pattern).matches(TableName(schema, table))
    assert got == ("*" not in pattern or "." not in fill), (pattern, fill, got)
    tally("property", f"derived {pattern} with {fill!r}")


# -- SQL fragments -------------------------------------------------------------------------------

ident_tok = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True).filter(lambda s: not s.endswith(("e", "E")))
number_tok = st.integers(-10**6, 10**6).map(str)
operator_tok = st.sampled_from(["=", "<>", "<", ">=", "+", "*", "/", "AND", "OR", "NOT", "IN", "LIKE", "IS NULL", ","])
any_text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
string_tok = any_text.map(lambda s: "'" + s.replace("\\", "").replace("'", "''") + "'")
dquoted_tok = any_text.map(lambda s: '"' + s.replace("\\", "").replace('"', '""') + '"')


def _group(children):
    return st.lists(children, min_size=1, max_size=4).map(lambda ts: "(" + " ".join(ts) + ")")


leaf = st.one_of(ident_tok, number_tok, operator_tok, string_tok, dquoted_tok)
token = st.recursive(leaf, _group, max_leaves=12)
fragments = st.lists(token, min_size=1, max_size=10)
ENGINES = ("postgresql", "mysql")


def _outside_quotes(tokens: list[str]) -> list[int]:
    """Positions between tokens (always outside any quote)."""
    return list(range(len(tokens) + 1))


@FAST
@given(fragments)
def test_well_formed_fragments_are_accepted(tokens):
    text = " ".join(tokens)
    for engine in ENGINES:
        assert check_fragment(text, engine, "where") == text.strip()
    tally("property", f"fragment accepted {text[:60]!r}")


@FAST
@given(fragments, st.data(), st.sampled_from([";", " ; ", ";--", "; DROP TABLE t", "--", "/*", "/* x */", ")", "("]))
def test_a_semicolon_comment_or_stray_parenthesis_outside_quotes_is_always_refused(tokens, data, intruder):
    at = data.draw(st.sampled_from(_outside_quotes(tokens)))
    text = " ".join(tokens[:at] + [intruder] + tokens[at:])
    for engine in ENGINES:
        with pytest.raises(SqlFragmentError):
            check_fragment(text, engine, "where")
    tally("property", f"fragment refused {text[:60]!r}")


@FAST
@given(fragments, st.data())
def test_mysql_hash_comments_and_backslash_escaped_quotes(tokens, data):
    at = data.draw(st.sampled_from(_outside_quotes(tokens)))
    with pytest.raises(SqlFragmentError):
        check_fragment(" ".join(tokens[:at] + ["# rest"] + tokens[at:]), "mysql", "where")
    # a backslash-escaped quote keeps MySQL inside the string: a ';' there is data
    text = " ".join(tokens[:at] + ["'it\\'s; DROP TABLE t; --'"] + tokens[at:])
    assert check_fragment(text, "mysql", "where") == text.strip()
    tally("property", f"mysql fragment {text[:60]!r}")
