"""``aurora-dbx plan``: IAM trust/permission policies and database SQL from the policy.

The unit tests pin the IAM documents and the SQL text. The stack tests apply the
generated SQL to the real PostgreSQL and MariaDB servers as their superuser, log in as
each database user with a real IAM auth token (moto STS + the stack's PAM verifier) and
prove that each user can do exactly what the policy says and nothing else.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pymysql
import pytest
import yaml

from aurora_dbx.cli import main
from aurora_dbx.errors import AuroraDbxError, PolicyError
from aurora_dbx.plan import OidcTrust, build_plan, build_sql
from aurora_dbx.policy import load_policy

ACCOUNT = "123456789012"
BASE_ROLE = f"arn:aws:iam::{ACCOUNT}:role/databricks-uc-aurora"
EXTRA_ROLE = f"arn:aws:iam::{ACCOUNT}:role/ops-break-glass"
SP = "6a1c2f0e-1111-2222-3333-444455556666"

POLICY: dict[str, Any] = {
    "version": 1,
    "project": "churn-model",
    "clusters": {
        "analytics": {"engine": "postgresql", "host": "analytics.cluster-abc.us-east-1.rds.amazonaws.com",
                      "port": 5432, "database": "analytics", "region": "us-east-1",
                      "resource_id": "cluster-ABCDEFGHIJKLMNOP"},
        "orders": {"engine": "mysql", "host": "orders.cluster-abc.eu-west-1.rds.amazonaws.com",
                   "port": 3306, "database": "orders", "region": "eu-west-1",
                   "resource_id": "cluster-ORDERS00000001"},
    },
    "roles": {
        "analyst-read": {"cluster": "analytics", "iam_role_arn": f"arn:aws:iam::{ACCOUNT}:role/aurora-analyst-read",
                         "db_user": "analyst_ro", "access": "read",
                         "tables": ["public.*", "features.customer_*"], "session_seconds": 900},
        "pipeline-write": {"cluster": "analytics", "iam_role_arn": f"arn:aws:iam::{ACCOUNT}:role/aurora-pipeline-write",
                           "db_user": "pipeline_rw", "access": "write", "tables": ["features.*"],
                           "session_seconds": 7200},
        "orders-read": {"cluster": "orders", "iam_role_arn": "arn:aws:iam::210987654321:role/aurora-orders-read",
                        "db_user": "orders_ro", "access": "read", "tables": ["orders.*"]},
    },
    "bindings": [
        {"user": "Analyst@Example.com", "roles": ["analyst-read", "orders-read"]},
        {"user": "bob o'neil@example.com", "roles": ["analyst-read"]},
        {"service_principal": SP, "roles": ["pipeline-write"]},
        {"group": "data-science", "roles": ["orders-read"]},
    ],
    "credentials": {"source": "service_credential", "service_credential": "aurora-dbx",
                    "base_role_arn": BASE_ROLE},
}


def policy(mutate: Any = None) -> Any:
    data = copy.deepcopy(POLICY)
    if mutate:
        mutate(data)
    return load_policy(data)


def role(plan: Any, name: str) -> Any:
    return next(r for r in plan.roles if r.role == name)


# -------------------------------------------------------------------- IAM documents


def test_trust_policy_allows_only_the_base_principals_with_project_tag_and_bound_identities() -> None:
    plan = build_plan(policy(), trusted_principal_arns=[EXTRA_ROLE, BASE_ROLE])
    trust = role(plan, "pipeline-write").trust_policy
    assert trust == {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "AuroraDbxAssume",
            "Effect": "Allow",
            "Principal": {"AWS": [BASE_ROLE, EXTRA_ROLE]},  # deduplicated, policy's first
            "Action": ["sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession"],
            "Condition": {
                "StringEquals": {"aws:RequestTag/project": "churn-model"},
                "StringEqualsIgnoreCase": {"sts:SourceIdentity": [SP]},
            },
        }],
    }
    # users: the SourceIdentity the library sends (characters STS refuses become '-', plus a hash)
    from aurora_dbx.credentials import source_identity
    from aurora_dbx.identity import Principal

    analyst = role(plan, "analyst-read").trust_policy["Statement"][0]["Condition"]
    assert analyst["StringEqualsIgnoreCase"] == {
        "sts:SourceIdentity": ["Analyst@Example.com", source_identity(Principal("bob o'neil@example.com", "user"))]
    }
    assert "StringLike" not in analyst and "Null" not in analyst


def test_source_identities_match_what_the_library_sends() -> None:
    from aurora_dbx.credentials import source_identity
    from aurora_dbx.identity import Principal

    plan = build_plan(policy())
    allowed = role(plan, "analyst-read").trust_policy["Statement"][0]["Condition"]["StringEqualsIgnoreCase"]
    assert source_identity(Principal("bob o'neil@example.com", "user")) in allowed["sts:SourceIdentity"]


def test_group_binding_requires_a_present_source_identity_and_says_why() -> None:
    r = role(build_plan(policy()), "orders-read")
    cond = r.trust_policy["Statement"][0]["Condition"]
    assert cond == {
        "StringEquals": {"aws:RequestTag/project": "churn-model"},
        "StringLike": {"sts:SourceIdentity": "*"},
        "Null": {"sts:SourceIdentity": "false"},
    }
    assert any("data-science" in n and "cannot enumerate" in n for n in r.notes)


def test_permission_policy_is_rds_db_connect_on_exactly_one_database_user() -> None:
    plan = build_plan(policy())
    assert role(plan, "analyst-read").permission_policy == {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "AuroraDbxConnect",
            "Effect": "Allow",
            "Action": "rds-db:connect",
            "Resource": f"arn:aws:rds-db:us-east-1:{ACCOUNT}:dbuser:cluster-ABCDEFGHIJKLMNOP/analyst_ro",
        }],
    }
    # account from the role ARN, region and resource id from the cluster
    assert role(plan, "orders-read").permission_policy["Statement"][0]["Resource"] == (
        "arn:aws:rds-db:eu-west-1:210987654321:dbuser:cluster-ORDERS00000001/orders_ro"
    )


def test_permission_policy_keeps_the_role_partition() -> None:
    def china(d: dict) -> None:
        d["roles"]["analyst-read"]["iam_role_arn"] = f"arn:aws-cn:iam::{ACCOUNT}:role/r"

    arn = role(build_plan(policy(china)), "analyst-read").permission_policy["Statement"][0]["Resource"]
    assert arn.startswith(f"arn:aws-cn:rds-db:us-east-1:{ACCOUNT}:dbuser:")


def test_max_session_duration_is_at_least_the_iam_minimum() -> None:
    plan = build_plan(policy())
    short = role(plan, "analyst-read")
    assert short.max_session_duration == 3600
    assert any("900" in n and "3600" in n for n in short.notes)
    long = role(plan, "pipeline-write")
    assert long.max_session_duration == 7200
    # the base principal is a role: assuming with its session is role chaining (1 h cap)
    assert any("role-chained" in n and "at most 3600" in n for n in long.notes)
    assert role(plan, "orders-read").max_session_duration == 3600
    assert not any("MaxSessionDuration" in n for n in role(plan, "orders-read").notes)


def test_base_role_gets_a_permission_policy_for_the_mapped_roles_only() -> None:
    plan = build_plan(policy())
    (base,) = plan.trusted_principals
    assert base.arn == BASE_ROLE and base.trust_policy is None
    statement = base.permission_policy["Statement"][0]
    assert statement["Action"] == ["sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession"]
    assert statement["Resource"] == [r.iam_role_arn for r in plan.roles]


def test_web_identity_role_trusts_the_oidc_provider_and_is_trusted_by_mapped_roles() -> None:
    wif = f"arn:aws:iam::{ACCOUNT}:role/aurora-dbx-oidc"
    provider = f"arn:aws:iam::{ACCOUNT}:oidc-provider/accounts.cloud.databricks.com/oidc/accounts/abc"

    def web(d: dict) -> None:
        d["credentials"] = {"source": "web_identity", "web_identity_token_file": "/var/run/oidc/token",
                            "web_identity_role_arn": wif}

    oidc = OidcTrust(provider, "sts.amazonaws.com", ("job-1", "job-2"))
    plan = build_plan(policy(web), oidc=oidc)
    (web_role,) = plan.trusted_principals
    assert web_role.arn == wif and web_role.source == "web_identity_role_arn"
    host = "accounts.cloud.databricks.com/oidc/accounts/abc"
    assert web_role.trust_policy == {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "AuroraDbxWebIdentity",
            "Effect": "Allow",
            "Principal": {"Federated": provider},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {f"{host}:aud": "sts.amazonaws.com",
                                           f"{host}:sub": ["job-1", "job-2"]}},
        }],
    }
    for r in plan.roles:
        assert r.trust_policy["Statement"][0]["Principal"] == {"AWS": [wif]}

    with pytest.raises(AuroraDbxError, match="--oidc-provider-arn"):
        build_plan(policy(web))
    with pytest.raises(AuroraDbxError, match="--oidc-subject"):
        OidcTrust(provider, "sts.amazonaws.com", ())
    with pytest.raises(AuroraDbxError, match="exact"):
        OidcTrust(provider, "sts.amazonaws.com", ("repo:org/*",))
    with pytest.raises(AuroraDbxError, match="OIDC provider ARN"):
        OidcTrust(wif, "sts.amazonaws.com", ("job-1",))


def test_without_any_trusted_principal_plan_fails_with_what_to_set() -> None:
    def bare(d: dict) -> None:
        del d["credentials"]

    with pytest.raises(PolicyError) as info:
        build_plan(policy(bare))
    message = str(info.value)
    assert "credentials.base_role_arn" in message and "--trusted-principal-arn" in message
    assert "\n" not in message
    # a CLI principal is enough
    assert build_plan(policy(bare), trusted_principal_arns=[EXTRA_ROLE]).trusted_principals[0].arn == EXTRA_ROLE


def test_bad_trusted_principal_arn_is_refused() -> None:
    with pytest.raises(AuroraDbxError, match="not an IAM role, user or account root ARN"):
        build_plan(policy(), trusted_principal_arns=["arn:aws:iam::123:role/x*"])


def test_missing_resource_id_names_the_key() -> None:
    def no_id(d: dict) -> None:
        del d["clusters"]["orders"]["resource_id"]

    with pytest.raises(PolicyError) as info:
        build_plan(policy(no_id))
    assert info.value.key == "clusters.orders.resource_id"
    assert "clusters.orders.resource_id" in str(info.value)
    # the SQL alone does not need it
    assert "orders" in build_sql(policy(no_id))


def test_unbound_role_gets_no_trust_policy_and_a_note() -> None:
    def unbound(d: dict) -> None:
        d["bindings"] = [b for b in d["bindings"] if "service_principal" not in b]

    plan = build_plan(policy(unbound))
    r = role(plan, "pipeline-write")
    assert r.trust_policy is None and "no binding" in r.notes[0]
    assert r.iam_role_arn not in plan.trusted_principals[0].permission_policy["Statement"][0]["Resource"]


# -------------------------------------------------------------------------- SQL text


def test_postgres_sql_creates_an_iam_user_and_grants_exactly_the_patterns() -> None:
    sql = build_sql(policy())["analytics"]
    assert sql.engine == "postgresql"
    text = "\n".join(sql.statements)
    assert 'CREATE ROLE "analyst_ro" WITH LOGIN;' in text
    assert 'GRANT rds_iam TO "analyst_ro"' in sql.statements
    assert 'GRANT CONNECT ON DATABASE "analytics" TO "analyst_ro"' in sql.statements
    assert 'ALTER ROLE "analyst_ro" SET default_transaction_read_only = on' in sql.statements
    assert 'GRANT SELECT ON ALL TABLES IN SCHEMA "public" TO "analyst_ro"' in sql.statements
    assert 'ALTER DEFAULT PRIVILEGES IN SCHEMA "public" GRANT SELECT ON TABLES TO "analyst_ro"' in sql.statements
    # partial wildcard: enumerated with an escaped LIKE (the '_' is literal)
    assert "c.relname LIKE 'customer!_%' ESCAPE '!'" in text
    assert 'GRANT CREATE ON SCHEMA "features" TO "pipeline_rw"' in sql.statements
    assert ('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "features" TO "pipeline_rw"'
            in sql.statements)
    assert 'ALTER ROLE "pipeline_rw" RESET default_transaction_read_only' in sql.statements
    # staging needs exactly CREATE on the schema: nothing broader
    for word in ("TRUNCATE", "ALL PRIVILEGES", "SUPERUSER", "CREATEROLE", "pg_read_all_data"):
        assert word not in text
    assert 'GRANT CREATE ON SCHEMA "public"' not in text


def test_mysql_sql_creates_an_iam_user_with_tls_and_database_grants() -> None:
    sql = build_sql(policy())["orders"]
    assert sql.statements == [
        "CREATE USER IF NOT EXISTS `orders_ro`@'%' IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS' REQUIRE SSL",
        "ALTER USER `orders_ro`@'%' IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS'",
        "ALTER USER `orders_ro`@'%' REQUIRE SSL",
        "REVOKE ALL PRIVILEGES, GRANT OPTION FROM `orders_ro`@'%'",
        "GRANT SELECT ON `orders`.* TO `orders_ro`@'%'",
    ]


def test_mysql_write_roles_get_staging_ddl_only_on_whole_databases() -> None:
    def writers(d: dict) -> None:
        d["roles"]["orders-read"].update(access="write", tables=["orders.*", "hist_*.*", "shop.items"])

    sql = build_sql(policy(writers))["orders"]
    assert "GRANT CREATE, DROP ON `orders`.* TO `orders_ro`@'%'" in sql.statements
    assert ("CALL `orders`.`_adbx_plan_grant`('hist!_%', NULL, 'CREATE, DROP', 'orders_ro')"
            in sql.statements)
    assert not any("`shop`.*" in s for s in sql.statements)
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON `shop`.`items` TO `orders_ro`@'%'" in sql.statements
    assert any(n.startswith("shop.items: on MySQL, write_table's staging table") for n in sql.notes)


def test_mysql_user_without_a_grant_in_the_cluster_database_gets_a_note() -> None:
    assert not any("error 1044" in n for n in build_sql(policy())["orders"].notes)

    def elsewhere(d: dict) -> None:
        d["roles"]["orders-read"]["tables"] = ["archive.*"]

    notes = build_sql(policy(elsewhere))["orders"].notes
    assert any("orders_ro has no grant in the cluster's database orders" in n for n in notes)


def test_odd_but_valid_identifiers_are_always_quoted() -> None:
    def odd(d: dict) -> None:
        d["roles"]["analyst-read"]["tables"] = ["Order.Select", "public.line$items"]
        d["roles"]["analyst-read"]["db_user"] = "Weird_User"
        d["roles"]["orders-read"]["tables"] = ["Group.Table$1", "orders.cust_*"]
        d["roles"]["orders-read"]["db_user"] = "_Odd"

    sql = build_sql(policy(odd))
    pg = sql["analytics"].statements
    assert 'GRANT SELECT ON TABLE "Order"."Select" TO "Weird_User"' in pg
    assert 'GRANT SELECT ON TABLE "public"."line$items" TO "Weird_User"' in pg
    assert 'GRANT USAGE ON SCHEMA "Order" TO "Weird_User"' in pg
    my = sql["orders"].statements
    assert "GRANT SELECT ON `Group`.`Table$1` TO `_Odd`@'%'" in my
    assert any(s.startswith("CALL `orders`.`_adbx_plan_grant`('orders', 'cust!_%', 'SELECT', '_Odd')") for s in my)
    # no bare identifier anywhere in a GRANT
    for stmt in pg + my:
        if stmt.startswith("GRANT"):
            assert " Weird_User" not in stmt and " _Odd" not in stmt


def test_shared_database_user_gets_the_union_and_a_warning() -> None:
    def shared(d: dict) -> None:
        d["roles"]["analyst-read"]["db_user"] = "pipeline_rw"

    sql = build_sql(policy(shared))["analytics"]
    assert any("shared by roles" in n and "own db_user" in n for n in sql.notes)
    assert sum(s.startswith("GRANT rds_iam") for s in sql.statements) == 1


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_is_stable_and_parseable(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--policy", str(policy_file), "--format", "json", "--trusted-principal-arn", EXTRA_ROLE)
    code, first, err = run(capsys, *args)
    assert code == 0, err
    assert run(capsys, *args)[1] == first
    doc = json.loads(first)
    assert doc["project"] == "churn-model"
    assert [r["role"] for r in doc["roles"]] == ["analyst-read", "pipeline-write", "orders-read"]
    for r in doc["roles"]:
        assert {"role", "iam_role_arn", "trust_policy", "permission_policy",
                "max_session_duration", "notes"} <= set(r)
    assert doc["roles"][0]["trust_policy"]["Statement"][0]["Principal"]["AWS"] == [BASE_ROLE, EXTRA_ROLE]
    assert set(doc["sql"]) == {"analytics", "orders"}
    assert doc["sql"]["orders"]["engine"] == "mysql"
    assert all(isinstance(s, str) for s in doc["sql"]["analytics"]["statements"])


def test_cli_text_and_sql_only(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text, _ = run(capsys, "--policy", str(policy_file))
    assert code == 0
    assert "## Role analyst-read: analyst_ro@analytics (read)" in text
    assert '"Action": "rds-db:connect"' in text  # JSON pretty-printed
    assert 'GRANT rds_iam TO "analyst_ro";' in text
    code, script, _ = run(capsys, "--policy", str(policy_file), "--sql-only", "orders")
    assert code == 0
    assert script.startswith("-- aurora-dbx plan: cluster orders (mysql)")
    assert "GRANT SELECT ON `orders`.* TO `orders_ro`@'%';" in script
    assert "rds-db" not in script
    code, _, err = run(capsys, "--policy", str(policy_file), "--sql-only", "nope")
    assert code == 2 and "no role uses that cluster" in err


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy.deepcopy(POLICY)
    del data["credentials"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = run(capsys, "--policy", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "credentials.base_role_arn" in err and "--trusted-principal-arn" in err
    code, _, err = run(capsys, "--policy", str(path), "--oidc-audience", "x")
    assert code == 2 and "--oidc-provider-arn" in err


def test_cli_oidc_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy.deepcopy(POLICY)
    data["credentials"] = {"source": "web_identity", "web_identity_token_file": "/t",
                           "web_identity_role_arn": f"arn:aws:iam::{ACCOUNT}:role/oidc"}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    provider = f"arn:aws:iam::{ACCOUNT}:oidc-provider/token.actions.githubusercontent.com"
    code, out, err = run(capsys, "--policy", str(path), "--format", "json",
                         "--oidc-provider-arn", provider, "--oidc-audience", "sts.amazonaws.com",
                         "--oidc-subject", "repo:org/app:ref:refs/heads/main")
    assert code == 0, err
    (web,) = json.loads(out)["trusted_principals"]
    cond = web["trust_policy"]["Statement"][0]["Condition"]["StringEquals"]
    assert cond["token.actions.githubusercontent.com:sub"] == ["repo:org/app:ref:refs/heads/main"]


def test_plan_output_contains_no_secrets(
    policy_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, session = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPLANSECRET", "FwoGZXIvYXdzPLANSESSIONTOKEN"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTESTKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", session)
    outputs = [run(capsys, "--policy", str(policy_file), "--format", f)[1] for f in ("json", "text")]
    for out in outputs:
        for value in (secret, session, "AKIAPLANTESTKEY00000", "X-Amz-", "***"):
            assert value not in out  # "***" absent: nothing even needed scrubbing


# ------------------------------------------------------------ real databases (stack)


@dataclass
class Applied:
    stack: Any
    sfx: str
    roles: dict[str, str]  # policy role -> moto role ARN
    policy: Any

    def schema(self, name: str) -> str:
        return f"pl{self.sfx}_{name}"


def _moto_roles(stack: Any, sfx: str, names: list[str]) -> dict[str, str]:
    return {n: stack.create_role(f"plan-{sfx}-{n}") for n in names}


def _login(stack: Any, engine: str, role_arn: str, db_user: str) -> Any:
    """Log in as ``db_user`` the Aurora way: assume the role, mint a token, connect over TLS."""
    creds = stack.aws_client("sts").assume_role(
        RoleArn=role_arn, RoleSessionName="plan-test", SourceIdentity="plan-test"
    )["Credentials"]
    db = stack.database(engine)
    token = boto3.client(
        "rds", region_name="us-east-1", aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"], aws_session_token=creds["SessionToken"],
    ).generate_db_auth_token(DBHostname="localhost", Port=db.port, DBUsername=db_user, Region="us-east-1")
    if engine == "postgresql":
        return psycopg.connect(host="localhost", port=db.port, user=db_user, password=token,
                               dbname=db.database, sslmode="verify-full",
                               sslrootcert=str(stack.ca_bundle), connect_timeout=10, autocommit=True)
    # no default database: these users' grants are in their own databases (see the note
    # test_mysql_user_without_a_grant_in_the_cluster_database_gets_a_note)
    return pymysql.connect(host="localhost", port=db.port, user=db_user, password=token,
                           ssl={"ca": str(stack.ca_bundle), "check_hostname": True},
                           connect_timeout=10, autocommit=True)


def _run(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    cur.execute(sql)
    rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
    cur.close()
    return rows


def _apply_postgres(stack: Any, statements: list[str]) -> None:
    conn = stack.postgres.admin_connect()
    try:
        with conn.transaction():  # as `psql --single-transaction` would
            for stmt in statements:
                conn.execute(stmt)
    finally:
        conn.close()


def _apply_mysql(stack: Any, statements: list[str], users: list[str]) -> None:
    # MariaDB has no AWSAuthenticationPlugin: the stack's PAM user stands in for it.
    for user in users:
        stack.mysql.create_iam_user(user)
    conn = stack.mysql.admin_connect()
    try:
        for stmt in statements:
            if "AWSAuthenticationPlugin" not in stmt:
                _run(conn, stmt)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pg(world: Any) -> Iterator[Applied]:
    stack = world.stack
    sfx = secrets.token_hex(3)
    a = Applied(stack, sfx, {}, None)
    pub, feat, secret, odd = a.schema("pub"), a.schema("feat"), a.schema("secret"), f"Pl{sfx}Order"
    sales_eu, sales_us, salesx = a.schema("sales_eu"), a.schema("sales_us"), a.schema("salesx")
    setup = f"""
    CREATE SCHEMA {pub}; CREATE SCHEMA {feat}; CREATE SCHEMA {secret}; CREATE SCHEMA "{odd}";
    CREATE SCHEMA {sales_eu}; CREATE SCHEMA {sales_us}; CREATE SCHEMA {salesx};
    CREATE TABLE {pub}.customers (id bigint PRIMARY KEY, name text);
    CREATE TABLE {feat}.customer_ltv (id bigint PRIMARY KEY, ltv numeric);
    CREATE TABLE {feat}.customer_churn (id bigint PRIMARY KEY, p double precision);
    CREATE TABLE {feat}."customerXltv" (id bigint PRIMARY KEY);
    CREATE TABLE {feat}.scores (id bigint PRIMARY KEY, score double precision);
    CREATE TABLE {secret}.salaries (id bigint PRIMARY KEY, salary numeric);
    CREATE TABLE "{odd}"."Line$Items" (id bigint PRIMARY KEY, "Select" text);
    CREATE TABLE {sales_eu}.orders (id bigint); CREATE TABLE {sales_us}.orders (id bigint);
    CREATE TABLE {salesx}.orders (id bigint);
    INSERT INTO {pub}.customers VALUES (1, 'Ada'); INSERT INTO {feat}.customer_ltv VALUES (1, 9.5);
    INSERT INTO {feat}.scores VALUES (1, 0.5); INSERT INTO {secret}.salaries VALUES (1, 100);
    INSERT INTO "{odd}"."Line$Items" VALUES (1, 'x');
    """
    conn = stack.postgres.admin_connect()
    try:
        conn.execute(setup)
    finally:
        conn.close()
    a.roles = _moto_roles(stack, sfx, ["reader", "writer", "sales"])
    data = {
        "version": 1, "project": "plan-test",
        "clusters": {"analytics": {"engine": "postgresql", "host": "localhost",
                                   "port": stack.postgres.port, "database": stack.postgres.database,
                                   "region": "us-east-1", "resource_id": "cluster-PLANTEST0001"}},
        "roles": {
            "reader": {"cluster": "analytics", "iam_role_arn": a.roles["reader"], "db_user": f"PlanReader_{sfx}",
                       "access": "read", "tables": [f"{pub}.*", f"{feat}.customer_*", f"{odd}.Line$Items"]},
            "writer": {"cluster": "analytics", "iam_role_arn": a.roles["writer"], "db_user": f"plan_rw_{sfx}",
                       "access": "write", "tables": [f"{feat}.*"]},
            "sales": {"cluster": "analytics", "iam_role_arn": a.roles["sales"], "db_user": f"plan_sales_{sfx}",
                      "access": "read", "tables": [f"pl{sfx}_sales_*.*"]},
        },
        "bindings": [{"user": "someone@example.com", "roles": ["reader", "writer", "sales"]}],
    }
    a.policy = load_policy(data)
    statements = build_sql(a.policy)["analytics"].statements
    _apply_postgres(stack, statements)
    _apply_postgres(stack, statements)  # idempotent: a re-run converges to the same grants
    for name, r in a.policy.roles.items():
        stack.allow(a.roles[name], r.db_user, "postgresql")
    yield a


def _pg_refused(conn: Any, sql: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _run(conn, sql)


def test_postgres_read_user_reads_its_tables_only(pg: Applied) -> None:
    pub, feat, secret = pg.schema("pub"), pg.schema("feat"), pg.schema("secret")
    with _login(pg.stack, "postgresql", pg.roles["reader"], f"PlanReader_{pg.sfx}") as conn:
        assert _run(conn, f"SELECT name FROM {pub}.customers") == [("Ada",)]
        assert _run(conn, f"SELECT count(*) FROM {feat}.customer_ltv") == [(1,)]
        assert _run(conn, f"SELECT count(*) FROM {feat}.customer_churn") == [(0,)]
        assert _run(conn, f'SELECT "Select" FROM "Pl{pg.sfx}Order"."Line$Items"') == [("x",)]
        assert _run(conn, "SHOW default_transaction_read_only") == [("on",)]
        for table in (f"{feat}.scores", f'{feat}."customerXltv"', f"{secret}.salaries"):
            _pg_refused(conn, f"SELECT * FROM {table}")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            _run(conn, f"INSERT INTO {pub}.customers VALUES (2, 'Eve')")
        # even in a read-write transaction the grants refuse writes
        with conn.transaction():
            _run(conn, "SET TRANSACTION READ WRITE")
            _pg_refused(conn, f"INSERT INTO {pub}.customers VALUES (2, 'Eve')")
        with conn.transaction():
            _run(conn, "SET TRANSACTION READ WRITE")
            _pg_refused(conn, f"CREATE TABLE {pub}._adbx_stage_x (id int)")


def test_postgres_schema_wildcard_covers_matching_schemas_only(pg: Applied) -> None:
    with _login(pg.stack, "postgresql", pg.roles["sales"], f"plan_sales_{pg.sfx}") as conn:
        for s in ("sales_eu", "sales_us"):
            assert _run(conn, f"SELECT count(*) FROM {pg.schema(s)}.orders") == [(0,)]
        _pg_refused(conn, f"SELECT * FROM {pg.schema('salesx')}.orders")
        _pg_refused(conn, f"SELECT * FROM {pg.schema('pub')}.customers")


def test_postgres_write_user_writes_and_stages_in_its_schema_only(pg: Applied) -> None:
    pub, feat, secret = pg.schema("pub"), pg.schema("feat"), pg.schema("secret")
    with _login(pg.stack, "postgresql", pg.roles["writer"], f"plan_rw_{pg.sfx}") as conn:
        _run(conn, f"INSERT INTO {feat}.scores VALUES (2, 0.7)")
        _run(conn, f"UPDATE {feat}.scores SET score = 0.9 WHERE id = 2")
        _run(conn, f"DELETE FROM {feat}.scores WHERE id = 2")
        # write_table's stage-and-publish, in one transaction
        stage = f"{feat}._adbx_stage_1_ab"
        _run(conn, f"CREATE UNLOGGED TABLE {stage} AS SELECT id, score FROM {feat}.scores WITH NO DATA")
        _run(conn, f"ALTER TABLE {stage} ADD COLUMN _adbx_attempt bigint NOT NULL")
        _run(conn, f"INSERT INTO {stage} VALUES (3, 0.3, 0)")
        with conn.transaction():
            _run(conn, f"SELECT count(*) FROM {stage}")
            _run(conn, f"INSERT INTO {feat}.scores (id, score) SELECT id, score FROM {stage} "
                       "ON CONFLICT (id) DO UPDATE SET score = EXCLUDED.score")
        _run(conn, f"DROP TABLE IF EXISTS {stage}")
        assert _run(conn, f"SELECT score FROM {feat}.scores WHERE id = 3") == [(0.3,)]
        _pg_refused(conn, f"SELECT * FROM {pub}.customers")
        _pg_refused(conn, f"INSERT INTO {secret}.salaries VALUES (9, 1)")
        _pg_refused(conn, f"CREATE TABLE {pub}._adbx_stage_x (id int)")
        _pg_refused(conn, f"DROP TABLE {feat}.scores")  # not the owner
        _pg_refused(conn, f"TRUNCATE {feat}.scores")


def test_postgres_default_privileges_cover_tables_created_later(pg: Applied) -> None:
    pub, feat = pg.schema("pub"), pg.schema("feat")
    pg.stack.postgres.execute_admin(f"CREATE TABLE {feat}.later (id int)")
    pg.stack.postgres.execute_admin(f"CREATE TABLE {pub}.later (id int)")
    with _login(pg.stack, "postgresql", pg.roles["writer"], f"plan_rw_{pg.sfx}") as conn:
        _run(conn, f"INSERT INTO {feat}.later VALUES (1)")
    with _login(pg.stack, "postgresql", pg.roles["reader"], f"PlanReader_{pg.sfx}") as conn:
        assert _run(conn, f"SELECT count(*) FROM {pub}.later") == [(0,)]
        _pg_refused(conn, f"SELECT * FROM {feat}.later")


def test_postgres_rerun_revokes_grants_outside_the_policy(pg: Applied) -> None:
    user, secret = f"PlanReader_{pg.sfx}", pg.schema("secret")
    admin = pg.stack.postgres
    admin.execute_admin(f'GRANT USAGE ON SCHEMA {secret} TO "{user}"')
    admin.execute_admin(f'GRANT SELECT, INSERT ON {secret}.salaries TO "{user}"')
    admin.execute_admin(f'ALTER DEFAULT PRIVILEGES IN SCHEMA {secret} GRANT SELECT ON TABLES TO "{user}"')
    with _login(pg.stack, "postgresql", pg.roles["reader"], user) as conn:
        assert _run(conn, f"SELECT count(*) FROM {secret}.salaries") == [(1,)]
    _apply_postgres(pg.stack, build_sql(pg.policy)["analytics"].statements)
    with _login(pg.stack, "postgresql", pg.roles["reader"], user) as conn:
        _pg_refused(conn, f"SELECT * FROM {secret}.salaries")
        assert _run(conn, f"SELECT name FROM {pg.schema('pub')}.customers") == [("Ada",)]
    admin.execute_admin(f"CREATE TABLE {secret}.newer (id int)")
    with _login(pg.stack, "postgresql", pg.roles["reader"], user) as conn:
        _pg_refused(conn, f"SELECT * FROM {secret}.newer")


@pytest.fixture(scope="module")
def my(world: Any) -> Iterator[Applied]:
    stack = world.stack
    sfx = secrets.token_hex(3)
    a = Applied(stack, sfx, {}, None)
    shop, other, arch23, arch24 = a.schema("shop"), a.schema("other"), a.schema("arch_2023"), a.schema("arch_2024")
    admin = stack.mysql
    for db in (shop, other, arch23, arch24):
        admin.execute_admin(f"CREATE DATABASE `{db}`")
    for stmt in (
        f"CREATE TABLE `{shop}`.`orders` (id BIGINT PRIMARY KEY, total DECIMAL(12,2))",
        f"CREATE TABLE `{shop}`.`cust_a` (id BIGINT PRIMARY KEY)",
        f"CREATE TABLE `{shop}`.`cust_b` (id BIGINT PRIMARY KEY)",
        f"CREATE TABLE `{shop}`.`custXa` (id BIGINT PRIMARY KEY)",
        f"CREATE TABLE `{shop}`.`Cust_c` (id BIGINT PRIMARY KEY)",
        f"CREATE TABLE `{shop}`.`customers` (id BIGINT PRIMARY KEY)",
        f"CREATE TABLE `{other}`.`secret` (id BIGINT PRIMARY KEY)",
        f"CREATE TABLE `{arch23}`.`orders` (id BIGINT)",
        f"CREATE TABLE `{arch24}`.`orders` (id BIGINT)",
        f"INSERT INTO `{shop}`.`orders` VALUES (1, 10.50)",
        f"INSERT INTO `{shop}`.`cust_a` VALUES (1)",
        f"INSERT INTO `{other}`.`secret` VALUES (1)",
    ):
        admin.execute_admin(stmt)
    a.roles = _moto_roles(stack, sfx, ["myreader", "mywriter", "myarch", "mytable"])
    users = {"myreader": f"plan_myro_{sfx}", "mywriter": f"plan_myrw_{sfx}",
             "myarch": f"plan_myarch_{sfx}", "mytable": f"plan_mytw_{sfx}"}
    data = {
        "version": 1, "project": "plan-test",
        "clusters": {"orders": {"engine": "mysql", "host": "localhost", "port": admin.port,
                                "database": admin.database, "region": "us-east-1",
                                "resource_id": "cluster-PLANTEST0002"}},
        "roles": {
            "myreader": {"cluster": "orders", "iam_role_arn": a.roles["myreader"], "db_user": users["myreader"],
                         "access": "read", "tables": [f"{shop}.cust_*", f"{shop}.orders"]},
            "mywriter": {"cluster": "orders", "iam_role_arn": a.roles["mywriter"], "db_user": users["mywriter"],
                         "access": "write", "tables": [f"{shop}.*"]},
            "myarch": {"cluster": "orders", "iam_role_arn": a.roles["myarch"], "db_user": users["myarch"],
                       "access": "read", "tables": [f"pl{sfx}_arch_*.*"]},
            "mytable": {"cluster": "orders", "iam_role_arn": a.roles["mytable"], "db_user": users["mytable"],
                        "access": "write", "tables": [f"{shop}.orders"]},
        },
        "bindings": [{"group": "ops", "roles": list(users)}],
    }
    a.policy = load_policy(data)
    statements = build_sql(a.policy)["orders"].statements
    _apply_mysql(stack, statements, list(users.values()))
    _apply_mysql(stack, statements, list(users.values()))  # idempotent
    for name, user in users.items():
        stack.allow(a.roles[name], user, "mysql")
    yield a


def _my_refused(conn: Any, sql: str) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        _run(conn, sql)
    assert info.value.args[0] in (1142, 1044, 1143), info.value  # table/db/column access denied


def test_mysql_read_user_reads_its_tables_only(my: Applied) -> None:
    shop, other = my.schema("shop"), my.schema("other")
    with _login(my.stack, "mysql", my.roles["myreader"], f"plan_myro_{my.sfx}") as conn:
        assert _run(conn, f"SELECT COUNT(*) FROM `{shop}`.`orders`") == [(1,)]
        assert _run(conn, f"SELECT COUNT(*) FROM `{shop}`.`cust_a`") == [(1,)]
        assert _run(conn, f"SELECT COUNT(*) FROM `{shop}`.`cust_b`") == [(0,)]
        for table in ("custXa", "Cust_c", "customers"):  # '_' literal, case-sensitive
            _my_refused(conn, f"SELECT * FROM `{shop}`.`{table}`")
        _my_refused(conn, f"SELECT * FROM `{other}`.`secret`")
        _my_refused(conn, f"INSERT INTO `{shop}`.`orders` VALUES (5, 1)")
        _my_refused(conn, f"CREATE TABLE `{shop}`.`_adbx_stage_x` (id INT)")
        assert _run(conn, "SELECT @@have_ssl")[0][0] == "YES"
        assert _run(conn, "SHOW STATUS LIKE 'Ssl_cipher'")[0][1]  # the login is over TLS


def test_mysql_users_require_tls(my: Applied) -> None:
    rows = my.stack.mysql.execute_admin(
        "SELECT User, JSON_VALUE(Priv, '$.ssl_type') FROM mysql.global_priv WHERE User LIKE %s",
        (f"plan_my%{my.sfx}",),
    )
    assert len(rows) == 4 and all(ssl_type == "1" for _, ssl_type in rows), rows  # 1 = ANY (REQUIRE SSL)


def test_mysql_schema_wildcard_covers_matching_databases_only(my: Applied) -> None:
    with _login(my.stack, "mysql", my.roles["myarch"], f"plan_myarch_{my.sfx}") as conn:
        for db in ("arch_2023", "arch_2024"):
            assert _run(conn, f"SELECT COUNT(*) FROM `{my.schema(db)}`.`orders`") == [(0,)]
        _my_refused(conn, f"SELECT * FROM `{my.schema('shop')}`.`orders`")


def test_mysql_write_user_writes_and_stages_in_its_database_only(my: Applied) -> None:
    shop, other = my.schema("shop"), my.schema("other")
    with _login(my.stack, "mysql", my.roles["mywriter"], f"plan_myrw_{my.sfx}") as conn:
        _run(conn, f"INSERT INTO `{shop}`.`orders` VALUES (2, 20.00)")
        _run(conn, f"UPDATE `{shop}`.`orders` SET total = 21.00 WHERE id = 2")
        _run(conn, f"DELETE FROM `{shop}`.`orders` WHERE id = 2")
        # write_table's stage-and-publish, statement for statement (aurora_dbx.writes)
        stage = f"`{shop}`.`_adbx_stage_1_ab`"
        _run(conn, f"CREATE TABLE {stage} (_adbx_attempt BIGINT NOT NULL DEFAULT 0) "
                   f"SELECT `id`, `total` FROM `{shop}`.`orders` WHERE 1=0")
        _run(conn, f"INSERT INTO {stage} (`id`, `total`, _adbx_attempt) VALUES (3, 30.00, 0)")
        _run(conn, f"SELECT count(*) FROM {stage}")
        _run(conn, "START TRANSACTION")
        _run(conn, f"INSERT INTO `{shop}`.`orders` (`id`, `total`) SELECT `id`, `total` FROM {stage} "
                   "ON DUPLICATE KEY UPDATE `total` = VALUES(`total`)")
        _run(conn, "COMMIT")
        _run(conn, f"DROP TABLE IF EXISTS {stage}")
        assert _run(conn, f"SELECT total FROM `{shop}`.`orders` WHERE id = 3")[0][0] == 30
        _my_refused(conn, f"SELECT * FROM `{other}`.`secret`")
        _my_refused(conn, f"INSERT INTO `{other}`.`secret` VALUES (9)")
        _my_refused(conn, f"CREATE TABLE `{other}`.`_adbx_stage_x` (id INT)")
        _my_refused(conn, f"CREATE PROCEDURE `{shop}`.`p`() SELECT 1")


def test_mysql_table_level_write_user_gets_no_database_wide_ddl(my: Applied) -> None:
    shop = my.schema("shop")
    with _login(my.stack, "mysql", my.roles["mytable"], f"plan_mytw_{my.sfx}") as conn:
        _run(conn, f"INSERT INTO `{shop}`.`orders` VALUES (7, 70.00)")
        _run(conn, f"DELETE FROM `{shop}`.`orders` WHERE id = 7")
        _my_refused(conn, f"SELECT * FROM `{shop}`.`cust_a`")
        _my_refused(conn, f"CREATE TABLE `{shop}`.`_adbx_stage_1_cd` (id INT)")
        _my_refused(conn, f"DROP TABLE `{shop}`.`cust_a`")


def test_mysql_rerun_revokes_grants_outside_the_policy(my: Applied) -> None:
    user, other = f"plan_myro_{my.sfx}", my.schema("other")
    my.stack.mysql.execute_admin(f"GRANT SELECT ON `{other}`.* TO '{user}'@'%'")
    with _login(my.stack, "mysql", my.roles["myreader"], user) as conn:
        assert _run(conn, f"SELECT COUNT(*) FROM `{other}`.`secret`") == [(1,)]
    users = [r.db_user for r in my.policy.roles.values()]
    _apply_mysql(my.stack, build_sql(my.policy)["orders"].statements, users)
    with _login(my.stack, "mysql", my.roles["myreader"], user) as conn:
        _my_refused(conn, f"SELECT * FROM `{other}`.`secret`")
    # the helper procedure is gone again
    assert my.stack.mysql.execute_admin(
        "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE ROUTINE_NAME = '_adbx_plan_grant'"
    ) == [(0,)]
