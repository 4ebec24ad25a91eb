"""Policy loading, strict validation and access decisions (no network)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from aurora_dbx.errors import AccessDenied, PolicyError
from aurora_dbx.identifiers import IdentifierError
from aurora_dbx.policy import load_policy

BASE = {
    "version": 1,
    "project": "churn-model",
    "clusters": {
        "analytics": {
            "engine": "postgresql", "host": "analytics.cluster-abc123.us-east-1.rds.amazonaws.com",
            "port": 5432, "database": "analytics", "region": "us-east-1",
            "resource_id": "cluster-ABCDEFGHIJKLMNOP",
        },
        "orders": {
            "engine": "mysql", "host": "orders.cluster-abc123.us-east-1.rds.amazonaws.com",
            "port": 3306, "database": "orders", "region": "us-east-1",
        },
    },
    "roles": {
        "analyst-read": {
            "cluster": "analytics", "iam_role_arn": "arn:aws:iam::123456789012:role/aurora-analyst-read",
            "db_user": "analyst_ro", "access": "read", "tables": ["public.*", "features.customer_*"],
        },
        "customers-read": {
            "cluster": "analytics", "iam_role_arn": "arn:aws:iam::123456789012:role/aurora-customers-read",
            "db_user": "customers_ro", "access": "read", "tables": ["public.customers"],
        },
        "pipeline-write": {
            "cluster": "analytics", "iam_role_arn": "arn:aws:iam::123456789012:role/aurora-pipeline-write",
            "db_user": "pipeline_rw", "access": "write", "tables": ["features.*"],
        },
        "orders-read": {
            "cluster": "orders", "iam_role_arn": "arn:aws:iam::123456789012:role/aurora-orders-read",
            "db_user": "orders_ro", "access": "read", "tables": ["orders.*"],
        },
    },
    "bindings": [
        {"user": "analyst@example.com", "roles": ["analyst-read", "customers-read"]},
        {"group": "data-science", "roles": ["analyst-read"]},
        {"service_principal": "6a1c2f0e-1111-2222-3333-444455556666", "roles": ["pipeline-write", "analyst-read"]},
    ],
}


def policy(**changes):
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def test_user_gets_least_privileged_role_that_covers_the_table():
    p = load_policy(BASE)
    # both analyst-read (public.*) and customers-read (public.customers) allow it:
    # the narrower one wins
    role = p.decide(name="analyst@example.com", kind="user", groups=(), table="public.customers",
                    access="read", cluster="analytics")
    assert role.name == "customers-read"
    role = p.decide(name="analyst@example.com", kind="user", groups=(), table="public.orders",
                    access="read", cluster="analytics")
    assert role.name == "analyst-read"


def test_user_names_match_case_insensitively():
    p = load_policy(BASE)
    role = p.decide(name="Analyst@Example.com", kind="user", groups=(), table="public.x",
                    access="read", cluster="analytics")
    assert role.name == "analyst-read"


def test_group_member_gets_group_role():
    p = load_policy(BASE)
    role = p.decide(name="someone@example.com", kind="user", groups=("data-science",),
                    table="features.customer_ltv", access="read", cluster="analytics")
    assert role.name == "analyst-read"


def test_service_principal_read_prefers_read_role_and_writes_with_write_role():
    p = load_policy(BASE)
    sp = "6a1c2f0e-1111-2222-3333-444455556666"
    assert p.decide(name=sp, kind="service_principal", groups=(), table="features.customer_x",
                    access="read", cluster="analytics").name == "analyst-read"
    assert p.decide(name=sp, kind="service_principal", groups=(), table="features.scores",
                    access="write", cluster="analytics").name == "pipeline-write"


def test_user_binding_does_not_match_service_principal_with_same_name():
    p = load_policy(BASE)
    with pytest.raises(AccessDenied, match="no binding"):
        p.decide(name="analyst@example.com", kind="service_principal", groups=(), table="public.x",
                 access="read", cluster="analytics")


def test_unbound_principal_is_denied_with_explanation():
    p = load_policy(BASE)
    with pytest.raises(AccessDenied) as e:
        p.decide(name="mallory@example.com", kind="user", groups=("sales",), table="public.x",
                 access="read", cluster="analytics")
    assert "no binding" in str(e.value) and "mallory@example.com" in str(e.value)


def test_out_of_scope_table_is_denied_naming_the_patterns():
    p = load_policy(BASE)
    with pytest.raises(AccessDenied) as e:
        p.decide(name="someone@example.com", kind="user", groups=("data-science",),
                 table="secret.salaries", access="read", cluster="analytics")
    assert "public.*" in str(e.value) and "secret.salaries" in str(e.value)


def test_write_with_read_role_is_denied():
    p = load_policy(BASE)
    with pytest.raises(AccessDenied, match="read-only"):
        p.decide(name="analyst@example.com", kind="user", groups=(), table="public.customers",
                 access="write", cluster="analytics")


def test_wildcard_does_not_cross_the_schema_dot():
    p = load_policy(BASE)
    # features.customer_* must not match a schema called features.customer_x.y
    with pytest.raises((AccessDenied, IdentifierError)):
        p.decide(name="someone@example.com", kind="user", groups=("data-science",),
                 table="features.customer_a.b", access="read", cluster="analytics")
    with pytest.raises(AccessDenied):
        p.decide(name="someone@example.com", kind="user", groups=("data-science",),
                 table="featuresx.customer_a", access="read", cluster="analytics")


def test_cluster_required_when_policy_has_several():
    p = load_policy(BASE)
    with pytest.raises(AccessDenied, match="pass cluster"):
        p.decide(name="analyst@example.com", kind="user", groups=(), table="public.x", access="read")


def test_explicit_role_must_be_bound():
    p = load_policy(BASE)
    with pytest.raises(AccessDenied, match="not bound to role 'pipeline-write'"):
        p.decide(name="analyst@example.com", kind="user", groups=(), table="features.a",
                 access="read", cluster="analytics", role="pipeline-write")


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.pop("project"), "project"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["clusters"]["analytics"].update(engine="oracle"), "clusters.analytics.engine"),
        (lambda d: d["clusters"]["analytics"].update(port="5432"), "clusters.analytics.port"),
        (lambda d: d["clusters"]["analytics"].update(port=True), "clusters.analytics.port"),
        (lambda d: d["clusters"]["analytics"].update(tls="off"), "clusters.analytics.tls"),
        (lambda d: d["clusters"]["analytics"].update(host="bad host;"), "clusters.analytics.host"),
        (lambda d: d["clusters"]["analytics"].update(region="mars"), "clusters.analytics.region"),
        (lambda d: d["clusters"]["analytics"].update(resource_id="abc"), "clusters.analytics.resource_id"),
        (lambda d: d["clusters"]["analytics"].pop("database"), "clusters.analytics.database"),
        (lambda d: d["roles"]["analyst-read"].update(cluster="nope"), "roles.analyst-read.cluster"),
        (lambda d: d["roles"]["analyst-read"].update(iam_role_arn="arn:aws:iam::12:role/x"), "roles.analyst-read.iam_role_arn"),
        (lambda d: d["roles"]["analyst-read"].update(iam_role_arn="arn:aws:iam::123456789012:user/x"), "roles.analyst-read.iam_role_arn"),
        (lambda d: d["roles"]["analyst-read"].update(access="admin"), "roles.analyst-read.access"),
        (lambda d: d["roles"]["analyst-read"].update(db_user="x; drop"), "roles.analyst-read.db_user"),
        (lambda d: d["roles"]["analyst-read"].update(tables=["public"]), "roles.analyst-read.tables[0]"),
        (lambda d: d["roles"]["analyst-read"].update(tables=["public.a;b"]), "roles.analyst-read.tables[0]"),
        (lambda d: d["roles"]["analyst-read"].update(tables=["pub**.x"]), "roles.analyst-read.tables[0]"),
        (lambda d: d["roles"]["analyst-read"].update(tables=[]), "roles.analyst-read.tables"),
        (lambda d: d["roles"]["analyst-read"].update(session_seconds=60), "roles.analyst-read.session_seconds"),
        (lambda d: d["roles"]["analyst-read"].update(grants="all"), "roles.analyst-read.grants"),
        (lambda d: d["bindings"].append({"user": "x@example.com", "roles": ["ghost"]}), "bindings[3].roles[0]"),
        (lambda d: d["bindings"].append({"user": "*", "roles": ["analyst-read"]}), "bindings[3].user"),
        (lambda d: d["bindings"].append({"user": "a", "group": "b", "roles": ["analyst-read"]}), "bindings[3]"),
        (lambda d: d.update(credentials={"source": "magic"}), "credentials.source"),
        (lambda d: d.update(credentials={"max_age_hours": 48}), "credentials.max_age_hours"),
        (lambda d: d.update(audit={"sink": "s3://x"}), "audit.sink"),
        (lambda d: d.update(audit={"fail_closed": "yes"}), "audit.fail_closed"),
    ],
)
def test_invalid_policies_name_file_and_key(tmp_path: Path, mutate, key):
    data = copy.deepcopy(BASE)
    mutate(data)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert e.value.key == key, str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("version: 1\nproject: &a x\n", "anchors"),
        ("a: &x [1]\nb: *x\n", "anchors"),
        ("version: 1\nversion: 1\n", "duplicate key"),
        ("base: {x: 1}\nother:\n  <<: {y: 2}\n", "merge keys"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "not valid policy YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_yaml_features_that_must_not_be_honoured(tmp_path: Path, text, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=fragment):
        load_policy(path)


def test_missing_file_says_how_to_configure(tmp_path: Path):
    with pytest.raises(PolicyError, match="AURORA_DBX_POLICY"):
        load_policy(tmp_path / "absent.yaml")


def test_oversized_file_is_refused(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text("#" * 1_000_001)
    with pytest.raises(PolicyError, match="limit"):
        load_policy(path)


def test_dbfs_volume_prefix_is_read_through_the_fuse_path():
    from aurora_dbx.policy import _normalise_path

    assert _normalise_path("dbfs:/Volumes/main/sec/p.yaml") == "/Volumes/main/sec/p.yaml"
