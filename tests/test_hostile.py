"""Hostile input: malformed and adversarial policies, identities, names, SQL and DataFrames.

Every input here is one a careless or malicious user (or a compromised notebook) could hand
the library. Each must end in one clear error before anything reaches a database, or, where
it is legitimate, be handled without widening anyone's access. Canary tables on both engines
prove that nothing smuggled into ``where``/``query``/table names executed; a jsonl audit sink
proves that every access denial is also an audit event. Each input tried is counted
(``tests/support/leaks.tally``) for docs/SECURITY.md.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

import aurora_dbx
from aurora_dbx.errors import AccessDenied, AuroraDbxError, IdentityError, PolicyError, SchemaMismatch
from aurora_dbx.identifiers import IdentifierError
from aurora_dbx.identity import parse_local_principal
from aurora_dbx.policy import load_policy
from aurora_dbx.sqltext import SqlFragmentError
from tests.conftest import ANALYST, MALLORY, PIPELINE_SP, World
from tests.support.leaks import tally

ARN = "arn:aws:iam::123456789012:role/"
SP = "6a1c2f0e-1111-2222-3333-444455556666"

# A valid policy that uses every key the format has, so every key path gets mutated.
FULL: dict[str, Any] = {
    "version": 1,
    "project": "churn-model",
    "clusters": {
        "analytics": {
            "engine": "postgresql", "host": "analytics.cluster-abc123.us-east-1.rds.amazonaws.com",
            "port": 5432, "database": "analytics", "region": "us-east-1",
            "resource_id": "cluster-ABCDEFGHIJKLMNOP", "tls": "require", "ca_bundle": "/etc/ssl/rds.pem",
        },
        "orders": {
            "engine": "mysql", "host": "orders.cluster-abc123.us-east-1.rds.amazonaws.com",
            "port": 3306, "database": "orders", "region": "us-east-1",
        },
    },
    "roles": {
        "analyst-read": {
            "cluster": "analytics", "iam_role_arn": ARN + "aurora-analyst-read", "db_user": "analyst_ro",
            "access": "read", "tables": ["public.*", "features.customer_*"], "session_seconds": 3600,
        },
        "pipeline-write": {
            "cluster": "analytics", "iam_role_arn": ARN + "aurora-pipeline-write", "db_user": "pipeline_rw",
            "access": "write", "tables": ["features.*"],
        },
        "orders-read": {
            "cluster": "orders", "iam_role_arn": ARN + "aurora-orders-read", "db_user": "orders_ro",
            "access": "read", "tables": ["orders.*"],
        },
    },
    "bindings": [
        {"user": "analyst@example.com", "roles": ["analyst-read", "orders-read"]},
        {"group": "data-science", "roles": ["analyst-read"]},
        {"service_principal": SP, "roles": ["pipeline-write", "analyst-read"]},
    ],
    "credentials": {
        "source": "web_identity", "web_identity_token_file": "/var/run/oidc/token",
        "web_identity_role_arn": ARN + "aurora-dbx-oidc", "base_role_arn": ARN + "aurora-dbx-base",
        "service_credential": "aurora-dbx", "max_age_hours": 12,
    },
    "audit": {"sink": "jsonl:/var/log/aurora-dbx/audit.jsonl", "fail_closed": True},
}

# Keys whose absence the format allows (a documented default applies).
OPTIONAL = {"credentials", "audit", "resource_id", "tls", "ca_bundle", "session_seconds", "source",
            "service_credential", "web_identity_token_file", "web_identity_role_arn", "base_role_arn",
            "max_age_hours", "sink", "fail_closed"}


def _paths(node: Any, prefix: str = "") -> list[tuple[str, tuple]]:
    """(library-style key path, access path) for every key and list element."""
    out: list[tuple[str, tuple]] = []

    def walk(n: Any, label: str, access: tuple) -> None:
        if isinstance(n, dict):
            for k, v in n.items():
                sub = f"{label}.{k}" if label else k
                out.append((sub, (*access, k)))
                walk(v, sub, (*access, k))
        elif isinstance(n, list):
            for i, v in enumerate(n):
                sub = f"{label}[{i}]"
                out.append((sub, (*access, i)))
                walk(v, sub, (*access, i))

    walk(node, prefix, ())
    return out


def _wrong(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return ["a list", value]
    if isinstance(value, list):
        return {"a": "mapping"}
    return ["a list"]


def _empty(value: Any) -> Any:
    return {str: "", int: 0, float: 0.0, list: [], dict: {}}.get(type(value), None)


def _mutations() -> list[tuple[str, str, tuple]]:
    cases = []
    for label, access in _paths(FULL):
        value = FULL
        for a in access:
            value = value[a]
        cases.append(("delete", label, access))
        cases.append(("wrong type", label, access))
        if not isinstance(value, bool):
            cases.append(("empty", label, access))
    return cases


def _apply(kind: str, access: tuple) -> dict:
    data = copy.deepcopy(FULL)
    parent = data
    for a in access[:-1]:
        parent = parent[a]
    last = access[-1]
    if kind == "delete":
        del parent[last]
    elif kind == "wrong type":
        parent[last] = _wrong(parent[last])
    else:
        parent[last] = _empty(parent[last])
    return data


PRINCIPALS = [("analyst@example.com", "user", ()), ("someone@example.com", "user", ("data-science",)),
              (SP, "service_principal", ()), ("stranger@example.com", "user", ("sales",))]
TABLES = ["public.customers", "features.customer_ltv", "features.scores", "orders.orders", "secret.salaries"]


def _grants(policy) -> set[tuple]:
    """Everything the policy lets anyone do, through any bound role, on a grid of principals,
    tables and clusters: (principal, cluster, table, access, role ARN, db user, endpoint)."""
    out = set()
    for name, kind, groups in PRINCIPALS:
        for r in policy.bound_roles(name, kind, groups):
            for table in TABLES:
                for access in ("read", "write"):
                    try:
                        policy.decide(name=name, kind=kind, groups=groups, table=table, access=access,
                                      cluster=r.cluster, role=r.name)
                    except AccessDenied:
                        continue
                    c = policy.clusters[r.cluster]
                    out.add((name, c.name, table, access, r.iam_role_arn, r.db_user, c.host, c.port, c.database))
    return out


ORIGINAL_GRANTS = _grants(load_policy(FULL))

# (kind, path) -> a PolicyError key other than the path itself: a binding without its
# subject is reported on the binding; a deleted definition where it is referenced.
OTHER_KEY = {
    ("delete", "bindings[0].user"): "bindings[0]",
    ("delete", "bindings[1].group"): "bindings[1]",
    ("delete", "bindings[2].service_principal"): "bindings[2]",
    ("delete", "clusters.analytics"): "roles.analyst-read.cluster",
    ("delete", "clusters.orders"): "roles.orders-read.cluster",
    ("delete", "roles.analyst-read"): "bindings[0].roles[0]",
    ("delete", "roles.pipeline-write"): "bindings[2].roles[0]",
    ("delete", "roles.orders-read"): "bindings[0].roles[1]",
    ("empty", "clusters.analytics"): "clusters.analytics.database",
    ("empty", "clusters.orders"): "clusters.orders.database",
    ("empty", "roles.analyst-read"): "roles.analyst-read.access",
    ("empty", "roles.pipeline-write"): "roles.pipeline-write.access",
    ("empty", "roles.orders-read"): "roles.orders-read.access",
    ("empty", "bindings[0]"): "bindings[0]",
    ("empty", "roles"): "bindings[0].roles[0]",
    ("delete", "credentials.web_identity_token_file"): "credentials.web_identity_token_file",
    ("empty", "credentials"): None,  # valid: every default
    ("empty", "audit"): None,
    ("empty", "bindings"): None,  # valid: nobody may do anything
    # accepted as "not set": an empty optional string falls back to the default
    ("empty", "clusters.analytics.ca_bundle"): None,
    ("empty", "credentials.service_credential"): None,
    ("empty", "credentials.web_identity_token_file"): None,
}
# Library bugs this suite found were fixed; the tables stay for any new finding.


def _expected_key(kind: str, label: str, access: tuple) -> str | None:
    """The key a PolicyError must name; None when the mutated policy is valid."""
    if (kind, label) in OTHER_KEY:
        return OTHER_KEY[(kind, label)]
    if kind == "delete":
        if isinstance(access[-1], int):  # a list element: valid while the list keeps one
            parent = FULL
            for a in access[:-1]:
                parent = parent[a]
            if len(parent) > 1:
                return None
            return label.rsplit("[", 1)[0]
        return None if label.rsplit(".", 1)[-1] in OPTIONAL else label
    return label


def _mutation_params():
    return [pytest.param(kind, label, access, id=f"{kind}:{label}") for kind, label, access in _mutations()]


@pytest.mark.parametrize("kind, label, access", _mutation_params())
def test_every_key_of_a_policy_deleted_retyped_or_emptied(tmp_path: Path, kind, label, access):
    """Either a PolicyError naming the file and the key, or a valid policy that grants no
    more than the original (deleting an optional key, a list element, ...)."""
    data = _apply(kind, access)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    expected = _expected_key(kind, label, access)
    try:
        policy = load_policy(path)
    except PolicyError as e:
        assert str(path) in str(e)
        if expected is not None:
            assert e.key == expected, f"{kind} {label}: {e}"
        else:
            assert e.key, f"{kind} {label}: a PolicyError must name a key: {e}"
        tally("hostile", f"policy {kind} {label}")
        return
    assert expected is None, f"{kind} {label}: loaded, expected a PolicyError on {expected}"
    assert _grants(policy) <= ORIGINAL_GRANTS, f"{kind} {label} widened access"
    tally("hostile", f"policy {kind} {label}")


@pytest.mark.parametrize("kind", ["user", "group", "service_principal"])
@pytest.mark.parametrize("subject", ["*", "?", "analyst*", "*@example.com", " analyst@example.com",
                                     "analyst@example.com\n", "", "a\tb", "a\rb"])
def test_wildcards_and_padding_in_binding_subjects_are_refused(kind, subject):
    data = copy.deepcopy(FULL)
    data["bindings"].append({kind: subject, "roles": ["analyst-read"]})
    with pytest.raises(PolicyError) as e:
        load_policy(data)
    assert e.value.key == f"bindings[3].{kind}"
    tally("hostile", f"binding {kind} {subject!r}")


STAR_STAR = {**copy.deepcopy(FULL), "roles": {"all": {
    "cluster": "analytics", "iam_role_arn": ARN + "all", "db_user": "everything_ro", "access": "read",
    "tables": ["*.*"]}}, "bindings": [{"user": "analyst@example.com", "roles": ["all"]}]}


@pytest.mark.parametrize("table", ["public.customers", "a.b", "_x.y$2", "Kunden.Straße", "日本.東京", "s.select"])
def test_star_star_matches_any_schema_table_name(table):
    p = load_policy(STAR_STAR)
    assert p.decide(name="analyst@example.com", kind="user", groups=(), table=table, access="read",
                    cluster="analytics").name == "all"
    tally("hostile", f"*.* matches {table}")


@pytest.mark.parametrize("table", ["a.b.c", "public", '"public".customers', "public.\"x\"", "public.cust omers",
                                       "public.x;y", "public.x--", "public.x/*", "`a`.b", "a.b\x00", ".b", "a.",
                                       "public.customers\n", "public\n.customers", "public.customers\r"])
def test_star_star_never_matches_dots_quotes_or_control_characters(table):
    p = load_policy(STAR_STAR)
    with pytest.raises(IdentifierError):
        p.decide(name="analyst@example.com", kind="user", groups=(), table=table, access="read", cluster="analytics")
    tally("hostile", f"*.* refuses {table!r}")


@pytest.mark.parametrize("pattern", ["**.x", "*.**", "*a*.x", "public.%", "public._%", "pub lic.x", "public.x y",
                                     "public.[a]*", "public.?", "public", "a.b.c", ".x", "x.", "*", "public.x;",
                                     "public.\"x\"", "public.x\n"])
def test_table_patterns_that_would_widen_or_confuse_are_refused(pattern):
    data = copy.deepcopy(FULL)
    data["roles"]["analyst-read"]["tables"] = [pattern]
    with pytest.raises(PolicyError) as e:
        load_policy(data)
    assert e.value.key == "roles.analyst-read.tables[0]"
    tally("hostile", f"table pattern {pattern!r}")


# -- YAML features that must not be honoured ---------------------------------------------------


def _full_yaml(without: str | None = None, **replace: str) -> str:
    data = {k: v for k, v in FULL.items() if k != without}
    text = yaml.safe_dump(data, sort_keys=False)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))

YAML_CASES = {
    "billion laughs": (BILLION_LAUGHS, "anchors"),
    "alias reusing a node": (_full_yaml() + "extra: &r [analyst-read]\nmore: *r\n", "anchors"),
    "merge key": (_full_yaml() + "extra:\n  <<: {access: write}\n", "merge keys"),
    "python object tag": ("!!python/object/apply:os.system ['touch /tmp/adbx-pwned']\n", "not valid policy YAML"),
    "python name tag": (_full_yaml(**{"project: churn-model": "project: !!python/name:os.system"}), "not valid policy YAML"),
    "python module tag": (_full_yaml(**{"project: churn-model": "project: !!python/module:os"}), "not valid policy YAML"),
    "custom tag": (_full_yaml(**{"project: churn-model": "project: !vault churn-model"}), "not valid policy YAML"),
    "binary value": (_full_yaml(**{"project: churn-model": "project: !!binary Y2h1cm4="}), "project: must be a string"),
    "set instead of list": (_full_yaml("bindings") + "bindings: !!set {a: null}\n", "bindings: must be a list"),
    "timestamp for a string": (_full_yaml(**{"project: churn-model": "project: 2024-01-01"}), "project: must be a string"),
    "duplicate key deep inside": (_full_yaml(**{"    access: read\n": "    access: read\n    access: write\n"}), "duplicate key"),
    "two documents": (_full_yaml() + "---\n" + _full_yaml(), "single document"),
    "NUL byte": (_full_yaml(**{"churn-model": "churn\x00model"}), "not valid policy YAML"),
    "tab indentation": (_full_yaml(**{"\n  analytics:": "\n\tanalytics:"}), "not valid policy YAML"),
    "non-string key": (_full_yaml() + "1: one\n", "unknown key 1"),
    "null key": (_full_yaml() + "~: nothing\n", "unknown key None"),
    "deep nesting": ("version: " + "[" * 5000 + "]" * 5000 + "\n", ""),
    "deep mapping nesting": ("version: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", ""),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_yaml_features_that_must_not_be_honoured(tmp_path, case):
    text, fragment = YAML_CASES[case]
    path = tmp_path / "policy.yaml"
    path.write_bytes(text.encode("utf-8"))
    started = time.monotonic()
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert time.monotonic() - started < 10  # bounded (billion laughs would never finish)
    assert fragment in str(e.value) and str(path) in str(e.value)
    assert not os.path.exists("/tmp/adbx-pwned")  # noqa: S108 - the file the payload would create
    tally("hostile", f"YAML {case}")


def test_a_large_but_allowed_policy_loads_quickly(tmp_path):
    data = copy.deepcopy(FULL)
    data["bindings"] += [{"user": f"user{i}@example.com", "roles": ["analyst-read"]} for i in range(9000)]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert path.stat().st_size < 1_000_000
    started = time.monotonic()
    policy = load_policy(path)
    assert len(policy.bindings) == 9003 and time.monotonic() - started < 10
    tally("hostile", "policy just under the size limit")


def _load_in_child(path: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """load_policy(path) in a child with 1 GB of address space, so a runaway read cannot
    take the machine down; prints the error type and message."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from aurora_dbx.policy import load_policy\n"
        "try:\n    load_policy(sys.argv[1])\nexcept BaseException as e:\n"
        "    print(type(e).__name__, str(e)[:300]); sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])


def test_a_device_as_policy_path_is_refused_not_read_forever():
    proc = _load_in_child("/dev/zero")
    assert proc.stdout.startswith("PolicyError"), proc.stdout + proc.stderr
    tally("hostile", "policy path /dev/zero")


def test_a_directory_or_missing_or_binary_policy_is_one_policy_error(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    for path in (tmp_path, tmp_path / "absent.yaml", tmp_path / "bin.yaml"):
        with pytest.raises(PolicyError) as e:
            load_policy(path)
        assert str(path) in str(e.value)
        tally("hostile", f"policy path {path.name or 'dir'}")


# -- identities --------------------------------------------------------------------------------


BAD_PRINCIPALS = [
    "user:a;b", "user:a,b@example.com", "user:a\nb", "user:", "user", ":x", "admin:bob@example.com",
    "User:bob@example.com", "user:bob smith@example.com", "user:bob;groups=a;b", "user:bob;roles=admin",
    "user:bob;groups=a\nb", "user:" + "a" * 257,
    "service_principal:not-a-uuid", "service_principal:" + SP + "x", "user:bob\t@example.com",
    "user:" + "é" * 10_000, "user:bob\n;groups=data-science",
]


@pytest.mark.parametrize("value", [pytest.param(v, id=repr(v[:30])) for v in BAD_PRINCIPALS])
def test_malformed_local_principals_are_refused_with_a_short_clear_error(value):
    with pytest.raises(IdentityError) as e:
        parse_local_principal(value)
    assert "AURORA_DBX_LOCAL_PRINCIPAL" in str(e.value)
    assert len(str(e.value)) < 1000, "the error echoes an unbounded input"
    tally("hostile", f"principal {value[:40]!r}")


@pytest.mark.parametrize("value, name, groups", [
    ("user:zoë.müller@例え.jp", "zoë.müller@例え.jp", ()),
    ("user:bob@example.com;groups=*", "bob@example.com", ("*",)),
    ("user:ana\u200blyst@example.com", "ana\u200blyst@example.com", ()),  # zero-width space
    ("user:\u0430nalyst@example.com", "\u0430nalyst@example.com", ()),  # Cyrillic a
    ("user:" + "a" * 256, "a" * 256, ()),
])
def test_odd_but_well_formed_principals_get_no_access_they_are_not_bound_to(value, name, groups):
    """Look-alikes of a bound user and a claimed '*' group resolve, but match no binding."""
    p = parse_local_principal(value)
    assert (p.name, p.groups) == (name, groups)
    policy = load_policy(FULL)
    assert policy.bound_roles(p.name, p.kind, p.groups) == []
    tally("hostile", f"look-alike principal {value[:40]!r}")


# -- end to end on the stack: names, SQL, DataFrames --------------------------------------------------

@pytest.fixture(scope="module")
def canaries(world: World):
    """Canary tables on both engines, readable and writable by the write roles."""
    pg, my = world.stack.postgres, world.stack.mysql
    pg.execute_admin("DROP TABLE IF EXISTS features.canary")
    pg.execute_admin("CREATE TABLE features.canary (id bigint PRIMARY KEY, note text)")
    pg.execute_admin("INSERT INTO features.canary VALUES (1, 'alive'), (2, 'still alive')")
    pg.execute_admin("CREATE TABLE IF NOT EXISTS features.hostile_notes (id bigint PRIMARY KEY)")
    pg.execute_admin("INSERT INTO features.hostile_notes VALUES (1) ON CONFLICT DO NOTHING")
    pg.execute_admin("GRANT USAGE ON SCHEMA features TO analyst_ro")
    pg.execute_admin("GRANT SELECT ON features.hostile_notes TO analyst_ro")
    db = my.database
    my.execute_admin(f"DROP TABLE IF EXISTS `{db}`.`canary`")
    my.execute_admin(f"CREATE TABLE `{db}`.`canary` (id BIGINT PRIMARY KEY, note VARCHAR(40))")
    my.execute_admin(f"INSERT INTO `{db}`.`canary` VALUES (1, 'alive'), (2, 'still alive')")
    return {"postgresql": "features.canary", "mysql": f"{db}.canary"}


def canary_rows(world: World, engine: str) -> list[tuple]:
    if engine == "postgresql":
        return world.stack.postgres.execute_admin("SELECT id, note FROM features.canary ORDER BY id")
    db = world.stack.mysql.database
    return world.stack.mysql.execute_admin(f"SELECT id, note FROM `{db}`.`canary` ORDER BY id")


ALIVE = [(1, "alive"), (2, "still alive")]


@pytest.fixture
def audited(world: World, env, tmp_path):
    """Act as a principal under a copy of the policy with a jsonl audit sink; returns a
    function that reads the audit events written so far."""
    sink = tmp_path / "audit.jsonl"
    data = copy.deepcopy(world.policy)
    data["audit"] = {"sink": f"jsonl:{sink}", "fail_closed": False}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))

    def as_principal(principal: str, spark=None):
        env(principal, AURORA_DBX_POLICY=str(path))
        aurora_dbx.configure(policy=path, spark=spark)

        def events() -> list[dict]:
            if not sink.exists():
                return []
            return [json.loads(line) for line in sink.read_text().splitlines()]

        return events

    return as_principal


def _network_quiet(world: World):
    v = world.stack.verifier
    return (v.verified + v.refused, len(world.sts.assume_role_calls()))


# Payloads for `where`, with the engine(s) they are aimed at. Every one must be refused by the
# fragment checker, before any connection is opened.
WHERE_PAYLOADS = [
    ("both", "1=1; DELETE FROM {canary}"),
    ("both", "1=1;"),
    ("postgresql", "1=1; COMMIT; SET TRANSACTION READ WRITE; DELETE FROM {canary}"),
    ("both", "1=1 -- and the rest of the generated SQL"),
    ("both", "1=1 /* swallow */"),
    ("both", "1=1 /"),  # harmless on its own: refused below only if it opens a comment
    ("mysql", "1=1 # comment"),
    ("mysql", "/*! DROP TABLE {canary} */ 1=1"),
    ("postgresql", "note = E'\\''; DELETE FROM {canary}; --'"),
    ("postgresql", "note = e'x'"),
    ("postgresql", "note = $$x$$"),
    ("postgresql", "note = $tag$'; DELETE FROM {canary}; $tag$"),
    ("both", "1=1) OR (1=1"),
    ("both", "1=1)) UNION SELECT id, note FROM {canary} WHERE ((1=1"),
    ("both", "(1=1"),
    ("both", "note = 'unterminated"),
    ("both", "note = \"unterminated"),
    ("mysql", "note = `unterminated"),
    ("both", "1=1\x00; DELETE FROM {canary}"),
    ("both", ""),
    ("both", "   "),
    ("both", "x" * 100_001),
]


def _where_params():
    out = []
    for target, payload in WHERE_PAYLOADS:
        for engine in (("postgresql", "mysql") if target == "both" else (target,)):
            if payload == "1=1 /":
                continue
            out.append(pytest.param(engine, payload, id=f"{engine}:{payload[:40]!r}"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine, payload", _where_params())
def test_where_injection_is_refused_before_any_connection(world, env, spark, canaries, engine, payload):
    cluster, role = ("analytics", "pipeline-write") if engine == "postgresql" else ("orders", "orders-write")
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    before = _network_quiet(world)
    with pytest.raises(SqlFragmentError) as e:
        aurora_dbx.read_table(canaries[engine], cluster=cluster, role=role, where=payload.format(canary=canaries[engine]))
    assert len(str(e.value)) < 1000
    assert _network_quiet(world) == before  # nothing was sent anywhere
    assert canary_rows(world, engine) == ALIVE
    tally("hostile", f"where on {engine}: {payload[:60]!r}")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["postgresql", "mysql"])
def test_quoted_semicolons_and_comment_markers_are_data_not_sql(world, env, spark, canaries, engine):
    """The other side of the checker: the same characters inside string literals are legal and
    are compared as data (MySQL's backslash escape included), and nothing else runs.

    Known limitation (MariaDB): EXPLAIN FORMAT=JSON writes condition literals unescaped, so a
    ``query=`` whose literal holds a quote cannot have its tables checked; it is refused with a
    clear SqlFragmentError, never run unchecked. ``where=`` reads work."""

    cluster, role = ("analytics", "pipeline-write") if engine == "postgresql" else ("orders", "orders-write")
    canary = canaries[engine]
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    literals = ["note = '; DELETE FROM x; --'", "note = '/* x */ # y'", "note <> 'it''s'", "note <> 'say \"hi\"'"]
    if engine == "mysql":
        literals.append("note = 'a\\'; DROP TABLE canary; -- '")
    for where in literals:
        df = aurora_dbx.read_table(canary, cluster=cluster, role=role, where=where)
        got = sorted((int(a), b) for a, b in df.collect())
        assert got == (ALIVE if "<>" in where else [])
        try:
            df = aurora_dbx.read_table(canary, cluster=cluster, role=role,
                                       query=f"SELECT id, note FROM {canary} WHERE {where}")
        except SqlFragmentError as e:
            assert engine == "mysql" and "cannot check which tables" in str(e), str(e)
            continue
        assert sorted((int(a), b) for a, b in df.collect()) == got
    assert canary_rows(world, engine) == ALIVE
    tally("hostile", f"quoted SQL metacharacters as data on {engine}")


BAD_TABLES = ["features.canary; DROP TABLE features.canary", 'features."canary"', "features.canary--",
              "features.canary/*", "features.can ary", "features.canary\x00", "features.`canary`",
              "features.canary)", "(SELECT 1).x", "features.*", "features.canary\n", "x" * 1_000_000]


@pytest.mark.slow
@pytest.mark.parametrize("table", [pytest.param(t, id=repr(t[:40])) for t in BAD_TABLES])
def test_table_names_attempting_injection_are_refused_before_any_connection(world, env, spark, canaries, table):
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    before = _network_quiet(world)
    for call in (lambda: aurora_dbx.read_table(table, cluster="analytics", role="pipeline-write"),
                 lambda: aurora_dbx.write_table(spark.createDataFrame([(3, "x")], "id long, note string"), table,
                                                cluster="analytics")):
        with pytest.raises(IdentifierError) as e:
            call()
        assert len(str(e.value)) < 1000
    assert _network_quiet(world) == before
    assert canary_rows(world, "postgresql") == ALIVE
    tally("hostile", f"table name {table[:40]!r}")


@pytest.mark.slow
def test_column_names_attempting_injection_are_refused(world, env, spark, canaries):
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    for col in ['note" FROM secret.salaries --', "note`; DROP TABLE canary; --", "id, note", "*", "note)"]:
        with pytest.raises(IdentifierError):
            aurora_dbx.read_table("features.canary", cluster="analytics", role="pipeline-write", columns=[col])
        with pytest.raises(IdentifierError):
            aurora_dbx.read_table("features.canary", cluster="analytics", role="pipeline-write",
                                  partition_column=col, num_partitions=2)
        tally("hostile", f"column name {col!r}")
    assert canary_rows(world, "postgresql") == ALIVE


@pytest.mark.slow
def test_query_touching_tables_outside_the_role_is_denied_and_audited(world, canaries, audited, spark):
    events = audited(ANALYST, spark)
    cases = [
        # the database refuses: no USAGE on schema secret
        "SELECT id FROM public.customers UNION SELECT id FROM secret.salaries",
        # the client refuses: granted in the database, outside the role's patterns
        "SELECT id FROM public.customers UNION SELECT id FROM features.hostile_notes",
        "SELECT c.id FROM public.customers c WHERE c.id IN (SELECT id FROM features.hostile_notes)",
        "WITH x AS (SELECT id FROM features.hostile_notes) SELECT id FROM x",
    ]
    for query in cases:
        with pytest.raises(AccessDenied):
            aurora_dbx.read_table("public.customers", cluster="analytics", query=query)
        tally("hostile", f"query {query[:60]!r}")
    denied = [e for e in events() if e["event"] == "denied"]
    assert len(denied) == len(cases)
    for e in denied:
        assert e["outcome"] == "denied" and e["principal"] == ANALYST and e["reason"] and e["table"]
        assert e["role_arn"] == world.roles["analyst-read"] and e["db_user"] == "analyst_ro"


@pytest.mark.slow
def test_mysql_query_into_system_tables_is_denied_and_audited(world, canaries, audited, spark):
    events = audited(PIPELINE_SP, spark)
    db = world.stack.mysql.database
    with pytest.raises(AccessDenied):
        aurora_dbx.read_table(canaries["mysql"], cluster="orders", role="orders-write",
                              query=f"SELECT id FROM `{db}`.`canary` UNION SELECT 1 FROM mysql.user")
    assert [e["event"] for e in events() if e["outcome"] == "denied"] == ["denied"]
    assert canary_rows(world, "mysql") == ALIVE
    tally("hostile", "MySQL query UNION mysql.user")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["postgresql", "mysql"])
def test_queries_that_would_modify_data_never_do(world, env, spark, canaries, engine):
    """Data-modifying CTEs, SELECT ... INTO, locking reads: refused or failing, never run."""
    cluster, role = ("analytics", "pipeline-write") if engine == "postgresql" else ("orders", "orders-write")
    canary = canaries[engine]
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    queries = {
        "postgresql": [f"WITH gone AS (DELETE FROM {canary} RETURNING id) SELECT id FROM gone",
                       f"SELECT id INTO features.copied FROM {canary}",
                       f"SELECT id FROM {canary} FOR UPDATE"],
        "mysql": [f"SELECT id FROM {canary} INTO OUTFILE '/tmp/adbx-canary-{uuid.uuid4().hex}'",
                  f"SELECT id FROM {canary} INTO @stolen"],
    }[engine]
    for query in queries:
        with pytest.raises(Exception) as e:  # noqa: PT011 - judged below
            aurora_dbx.read_table(canary, cluster=cluster, role=role, query=query).collect()
        text = f"{type(e.value).__name__}: {e.value}".lower()
        assert isinstance(e.value, AuroraDbxError) or any(w in text for w in ("read-only", "syntax", "not allowed", "top level", "privilege")), text
        tally("hostile", f"modifying query on {engine}: {query[:50]!r}")
    assert canary_rows(world, engine) == ALIVE
    if engine == "postgresql":
        assert world.stack.postgres.execute_admin("SELECT to_regclass('features.copied') IS NULL") == [(True,)]


@pytest.mark.slow
def test_where_subquery_into_a_table_outside_the_role_is_denied_like_a_query(world, canaries, audited, spark):
    events = audited(ANALYST, spark)
    with pytest.raises(AccessDenied):
        aurora_dbx.read_table("public.customers", cluster="analytics",
                              where="id IN (SELECT id FROM features.hostile_notes)").collect()
    assert [e["event"] for e in events() if e["outcome"] == "denied"] == ["denied"]
    tally("hostile", "where subquery into an out-of-scope table")


@pytest.mark.slow
def test_the_policy_is_not_the_boundary_the_database_grants_are(world, env, spark, canaries):
    """Documented limit of the client-side scope check: SQL functions can run SQL of their
    own (query_to_xml). What the database grants still holds: no way into secret.*."""
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    with pytest.raises(Exception) as e:  # noqa: PT011
        aurora_dbx.read_table("public.customers", cluster="analytics",
                              query="SELECT query_to_xml('SELECT * FROM secret.salaries', true, false, '')::text AS x").collect()
    assert "permission denied" in str(e.value)
    tally("hostile", "query_to_xml into a schema without grants")


@pytest.mark.slow
def test_unbound_out_of_scope_and_read_only_writes_are_denied_and_audited(world, canaries, audited, spark):
    events = audited(MALLORY, spark)
    with pytest.raises(AccessDenied, match="no binding"):
        aurora_dbx.read_table("public.customers", cluster="analytics")
    assert world.sts.assume_role_calls() == []
    events = audited(ANALYST, spark)
    with pytest.raises(AccessDenied):
        aurora_dbx.read_table("secret.salaries", cluster="analytics")
    with pytest.raises(AccessDenied, match="read-only"):
        aurora_dbx.write_table(spark.createDataFrame([(1, "x")], "id long, note string"), "public.customers",
                               cluster="analytics")
    with pytest.raises(AccessDenied):
        aurora_dbx.read_table("public.customers", cluster="analytics", role="pipeline-write")
    denied = [e for e in events() if e["event"] == "denied" and e["principal"] == ANALYST]
    assert [(e["principal"], e["table"], e["outcome"]) for e in denied] == [
        (ANALYST, "secret.salaries", "denied"), (ANALYST, "public.customers", "denied"),
        (ANALYST, "public.customers", "denied")]
    assert all(e["reason"] for e in denied)
    assert world.sts.assume_role_calls() == []
    for case in ("unbound principal", "table out of scope", "write with a read role", "role not bound"):
        tally("hostile", f"denied and audited: {case}")


@pytest.mark.slow
def test_mallory_denial_is_audited(world, canaries, audited, spark):
    events = audited(MALLORY, spark)
    with pytest.raises(AccessDenied):
        aurora_dbx.connect(cluster="analytics")
    (e,) = [e for e in events() if e["event"] == "denied"]
    assert e["principal"] == MALLORY and e["outcome"] == "denied" and "no binding" in e["reason"]


# -- DataFrames that do not fit ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["postgresql", "mysql"])
def test_dataframes_that_do_not_fit_fail_before_anything_is_written(world, env, spark, canaries, engine):
    cluster = "analytics" if engine == "postgresql" else "orders"
    canary = canaries[engine]
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    frames = {
        "extra column": spark.createDataFrame([(3, "x", 1)], "id long, note string, extra int"),
        "wrong type": spark.createDataFrame([(3, 1.5)], "id long, note double"),
        "injection in a column name": spark.createDataFrame([(3, "x")], "id long, `note; DROP TABLE canary; --` string"),
        "quote in a column name": spark.createDataFrame([(3, "x")], 'id long, `note"` string'),
        "nested type": spark.createDataFrame([(3, ["x"])], "id long, note array<string>"),
        "duplicate columns": spark.createDataFrame([(3, "x", "y")], "id long, note string, note string"),
        "map type": spark.createDataFrame([(3, {"a": "b"})], "id long, note map<string,string>"),
    }
    for label, df in frames.items():
        with pytest.raises(SchemaMismatch, match="nothing was written"):
            aurora_dbx.write_table(df, canary, cluster=cluster)
        tally("hostile", f"DataFrame {label} on {engine}")
    with pytest.raises(SchemaMismatch):
        aurora_dbx.write_table(spark.createDataFrame([(3, "x")], "id long, note string"), canary,
                               cluster=cluster, mode="upsert", key=["note"])
    tally("hostile", f"upsert on a non-unique key on {engine}")
    with pytest.raises(ValueError):
        aurora_dbx.write_table(spark.createDataFrame([(3, "x")], "id long, note string"), canary,
                               cluster=cluster, mode="truncate")  # type: ignore[arg-type]
    assert canary_rows(world, engine) == ALIVE


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["postgresql", "mysql"])
def test_oversized_values_fail_the_write_and_leave_the_target_unchanged(world, env, spark, canaries, engine):
    cluster = "analytics" if engine == "postgresql" else "orders"
    env(PIPELINE_SP)
    aurora_dbx.configure(spark=spark)
    if engine == "postgresql":
        world.stack.postgres.execute_admin("DROP TABLE IF EXISTS features.narrow")
        world.stack.postgres.execute_admin("CREATE TABLE features.narrow (id bigint PRIMARY KEY, code varchar(5))")
        world.stack.postgres.execute_admin("INSERT INTO features.narrow VALUES (1, 'ok')")
        table, rows = "features.narrow", lambda: world.stack.postgres.execute_admin("SELECT * FROM features.narrow ORDER BY 1")
    else:
        db = world.stack.mysql.database
        world.stack.mysql.execute_admin(f"DROP TABLE IF EXISTS `{db}`.`narrow`")
        world.stack.mysql.execute_admin(f"CREATE TABLE `{db}`.`narrow` (id BIGINT PRIMARY KEY, code VARCHAR(5))")
        world.stack.mysql.execute_admin(f"INSERT INTO `{db}`.`narrow` VALUES (1, 'ok')")
        table, rows = f"{db}.narrow", lambda: world.stack.mysql.execute_admin(f"SELECT * FROM `{db}`.`narrow` ORDER BY 1")
    df = spark.createDataFrame([(2, "fine"), (3, "x" * 100_000)], "id long, code string")
    with pytest.raises(AuroraDbxError, match="nothing was published"):
        aurora_dbx.write_table(df, table, cluster=cluster)
    assert rows() == [(1, "ok")]
    tally("hostile", f"oversized value on {engine}")


@pytest.mark.slow
def test_unicode_principal_bound_in_the_policy_works_end_to_end(world, env, tmp_path):
    """A legitimate non-ASCII principal: STS gets a valid SourceIdentity and session name,
    the database session works, the audit trail keeps the real name."""
    name = "zoë.müller@例え.jp"
    data = copy.deepcopy(world.policy)
    data["bindings"].append({"user": name, "roles": ["analyst-read"]})
    sink = tmp_path / "audit.jsonl"
    data["audit"] = {"sink": f"jsonl:{sink}"}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    env(None, AURORA_DBX_LOCAL_PRINCIPAL=f"user:{name}", AURORA_DBX_POLICY=str(path))
    with aurora_dbx.configure(policy=path).connect(cluster="analytics") as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user")
        assert cur.fetchone()[0] == "analyst_ro"
    (call,) = world.sts.assume_role_calls()
    import re

    assert re.fullmatch(r"[\w+=,.@-]{2,64}", call["SourceIdentity"][0], re.ASCII)
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", call["RoleSessionName"][0], re.ASCII)
    assert {json.loads(x)["principal"] for x in sink.read_text().splitlines()} == {name}
    tally("hostile", "non-ASCII principal end to end")


# -- the network ---------------------------------------------------------------------------------


class _Relay:
    """A TCP relay on another loopback address: a stand-in for someone on the network path
    who redirects the connection to a server of their choosing."""

    def __init__(self, bind: str, target_port: int):
        import socket
        import threading

        self._socket = socket
        self.server = socket.socket()
        self.server.bind((bind, 0))
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.target = ("127.0.0.1", target_port)
        self.connections = 0
        self._open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while self._open:
            try:
                client, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            upstream = self._socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._open = False
        self.server.close()


def _policy_with(world: World, tmp_path: Path, cluster: str, **changes) -> Path:
    data = copy.deepcopy(world.policy)
    data["clusters"][cluster].update(changes)
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("engine, cluster, attack", [
    ("postgresql", "analytics", "certificate from another CA"),
    ("postgresql", "analytics", "redirected to another address"),
    pytest.param("mysql", "orders", "certificate from another CA",
                 ),
    pytest.param("mysql", "orders", "redirected to another address",
                 ),
])
@pytest.mark.slow
def test_tls_verification_stops_the_connection_before_the_token_is_sent(world, env, tmp_path, monkeypatch,
                                                                      engine, cluster, attack):
    import tenacity

    sleeps: list[float] = []
    monkeypatch.setattr(tenacity.nap, "sleep", sleeps.append)  # count connect retries, do not wait
    db = world.stack.database(engine)
    relay = None
    if attack == "certificate from another CA":
        other_ca = tmp_path / "other-ca.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(tmp_path / "other.key"), "-out", str(other_ca), "-days", "1",
                        "-subj", "/CN=someone else's CA"], check=True, capture_output=True)
        path = _policy_with(world, tmp_path, cluster, ca_bundle=str(other_ca))
    else:
        relay = _Relay("127.0.0.2", db.port)
        path = _policy_with(world, tmp_path, cluster, host="127.0.0.2", port=relay.port)
    env(ANALYST, AURORA_DBX_POLICY=str(path))
    ctx = aurora_dbx.configure(policy=path)
    v = world.stack.verifier
    seen = v.verified + v.refused
    started = time.monotonic()
    try:
        with pytest.raises(AuroraDbxError) as e:
            ctx.connect(cluster=cluster)
    finally:
        if relay is not None:
            relay.close()
    text = str(e.value).lower()
    assert "certificate" in text or "ssl" in text, text
    assert v.verified + v.refused == seen  # no token reached the server
    assert sleeps == [], f"a certificate failure is not transient, yet it was retried {len(sleeps)} times"
    assert time.monotonic() - started < 10
    if relay is not None:
        assert relay.connections >= 1
    tally("hostile", f"TLS {attack} on {engine}")


@pytest.mark.slow
def test_tls_disable_is_refused_inside_databricks(world, env, tmp_path, monkeypatch):
    from aurora_dbx.identity import Principal

    path = _policy_with(world, tmp_path, "analytics", tls="disable")
    env(ANALYST, AURORA_DBX_POLICY=str(path))
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    ctx = aurora_dbx.configure(policy=path, resolvers=[lambda: Principal(ANALYST, "user", resolver="runtime")])
    v = world.stack.verifier
    seen = v.verified + v.refused
    with pytest.raises(AuroraDbxError, match="refused inside Databricks"):
        ctx.connect(cluster="analytics")
    assert v.verified + v.refused == seen
    tally("hostile", "tls: disable inside Databricks")
