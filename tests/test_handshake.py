"""The handshake end to end on the real local stack: identity -> policy -> STS -> token -> login."""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from datetime import datetime, timedelta, timezone

import pytest

import aurora_dbx
from aurora_dbx.errors import AccessDenied, ConnectionFailed, CredentialError, IdentityError
from tests.conftest import ANALYST, MALLORY, PIPELINE_SP, SCIENTIST, World
from tests.support.sts_proxy import DENIED, THROTTLE, UNAVAILABLE, Fault


def _current_user(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        return cur.fetchone()[0]


def test_user_resolved_through_workspace_api_gets_bound_roles(world: World, env):
    env(ANALYST)
    me = aurora_dbx.whoami()
    assert (me.name, me.kind, me.resolver) == (ANALYST, "user", "databricks_sdk")
    assert me.groups == ("analysts",)
    assert set(me.roles) == {"analyst-read", "orders-read"}


def test_user_connects_to_postgres_as_mapped_db_user_over_verified_tls(world: World, env):
    env(ANALYST)
    with aurora_dbx.connect(cluster="analytics") as conn:
        assert _current_user(conn) == "analyst_ro"
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cur.fetchone()[0] is True
            cur.execute("SELECT count(*) FROM public.customers")
            assert cur.fetchone()[0] >= 2


def test_user_connects_to_mariadb_with_cleartext_token_over_tls(world: World, env):
    env(ANALYST)
    conn = aurora_dbx.connect(cluster="orders")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER(), @@session.tx_read_only")
            user, ro = cur.fetchone()
            assert user.startswith("orders_ro@") and ro == 1
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            assert cur.fetchone()[1]
    finally:
        conn.close()


def test_group_member_gets_group_role(world: World, env):
    env(SCIENTIST)
    me = aurora_dbx.whoami()
    assert me.groups == ("data-science", "users") and me.roles == ("analyst-read",)
    with aurora_dbx.connect(cluster="analytics") as conn:
        assert _current_user(conn) == "analyst_ro"


def test_service_principal_gets_write_role_for_writes(world: World, env):
    env(PIPELINE_SP)
    me = aurora_dbx.whoami()
    assert me.kind == "service_principal"
    with aurora_dbx.connect(cluster="analytics", access="write") as conn:
        assert _current_user(conn) == "pipeline_rw"
    with aurora_dbx.connect(cluster="analytics") as conn:  # reads use the read role
        assert _current_user(conn) == "analyst_ro"


def test_read_session_is_read_only_even_for_write_role(world: World, env):
    env(PIPELINE_SP)
    import psycopg

    with aurora_dbx.connect(cluster="analytics", role="pipeline-write", access="read") as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            with conn.cursor() as cur:
                cur.execute("INSERT INTO features.scores VALUES (999, 1.0)")


def test_unbound_principal_denied_before_any_network_call(world: World, env):
    env(MALLORY)
    before = world.stack.verifier.verified + world.stack.verifier.refused
    with pytest.raises(AccessDenied, match="no binding"):
        aurora_dbx.connect(cluster="analytics")
    assert world.sts.assume_role_calls() == []
    assert world.stack.verifier.verified + world.stack.verifier.refused == before


def test_out_of_scope_table_denied_before_any_network_call(world: World, env):
    env(SCIENTIST)
    ctx = aurora_dbx.configure()
    with pytest.raises(AccessDenied, match="secret.salaries"):
        ctx.decide("secret.salaries", "read", cluster="analytics")
    with pytest.raises(AccessDenied, match="read-only"):
        ctx.decide("features.customer_ltv", "write", cluster="analytics")
    assert world.sts.assume_role_calls() == []


def test_role_session_carries_source_identity_session_name_and_tags(world: World, env):
    env(PIPELINE_SP)
    with aurora_dbx.connect(cluster="analytics", access="write"):
        pass
    (call,) = world.sts.assume_role_calls(world.roles["pipeline-write"])
    assert call["SourceIdentity"] == [PIPELINE_SP]
    assert call["RoleSessionName"] == [f"adbx-{PIPELINE_SP}"]
    tags = {call[f"Tags.member.{i}.Key"][0]: call[f"Tags.member.{i}.Value"][0]
            for i in range(1, 10) if f"Tags.member.{i}.Key" in call}
    assert tags == {"project": "churn-model", "principal": PIPELINE_SP, "principal_type": "service_principal"}
    assert call["DurationSeconds"] == ["3600"]


def test_sixteen_concurrent_callers_make_one_sts_call(world: World, env):
    env(ANALYST)
    ctx = aurora_dbx.configure()
    role = ctx.policy.roles["analyst-read"]
    barrier = threading.Barrier(16)
    seen: list[tuple[str, str, str]] = []
    errors: list[BaseException] = []

    def worker():
        try:
            barrier.wait()
            c = ctx.credentials(role)
            seen.append((c.access_key_id, c.secret_access_key, c.session_token))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(world.sts.assume_role_calls(role.iam_role_arn)) == 1
    assert len(set(seen)) == 1 and len(seen) == 16


def test_sts_throttling_and_5xx_are_retried(world: World, env):
    env(ANALYST)
    sleeps: list[float] = []
    ctx = aurora_dbx.configure(retry_sleep=sleeps.append)
    world.sts.faults.extend([Fault(2, THROTTLE), Fault(1, UNAVAILABLE)])
    with ctx.connect(cluster="analytics") as conn:
        assert _current_user(conn) == "analyst_ro"
    assert len(world.sts.assume_role_calls()) == 4 and len(sleeps) == 3


def test_sts_access_denied_is_not_retried_and_names_role_and_principal(world: World, env):
    env(ANALYST)
    sleeps: list[float] = []
    ctx = aurora_dbx.configure(retry_sleep=sleeps.append)
    world.sts.faults.append(Fault(5, DENIED))
    with pytest.raises(CredentialError) as e:
        ctx.connect(cluster="analytics")
    assert "aurora-analyst-read" in str(e.value) and ANALYST in str(e.value)
    assert len(world.sts.assume_role_calls()) == 1 and sleeps == []


def test_role_session_rebuilt_from_scratch_after_max_age(world: World, env):
    env(ANALYST)
    now = [datetime.now(timezone.utc)]
    ctx = aurora_dbx.configure(clock=lambda: now[0])
    role = ctx.policy.roles["analyst-read"]
    first = ctx.role_session(role)
    first.credentials()
    now[0] += timedelta(minutes=20)  # well inside the session: same object, no STS call
    assert ctx.role_session(role) is first
    now[0] += timedelta(hours=24)
    assert ctx.role_session(role) is not first


def test_expired_token_refused_by_server_then_fresh_token_used(world: World, env):
    """A cached token the server refuses (too old for it) is re-minted once, transparently."""
    env(ANALYST)
    ctx = aurora_dbx.configure()
    with ctx.connect(cluster="analytics"):
        pass
    minted = ctx.tokens.minted
    verifier = world.stack.verifier
    old = verifier.max_token_age_seconds
    verifier.max_token_age_seconds = 1
    try:
        import time

        time.sleep(2.1)  # the cached token is now older than the server accepts
        refused = verifier.refused
        with ctx.connect(cluster="analytics") as conn:
            assert _current_user(conn) == "analyst_ro"
        assert verifier.refused == refused + 1 and ctx.tokens.minted == minted + 1
    finally:
        verifier.max_token_age_seconds = old


def test_role_not_allowed_for_db_user_fails_with_aurora_message(world: World, env, tmp_path):
    """The server, not the client, enforces rds-db:connect: a role mapped to a db user it
    may not connect as is refused with Aurora's message and a hint."""
    import yaml

    env(ANALYST)
    data = dict(world.policy)
    data["roles"] = dict(data["roles"])
    data["roles"]["analyst-read"] = dict(data["roles"]["analyst-read"], db_user="pipeline_rw")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    ctx = aurora_dbx.configure(policy=path)
    with pytest.raises(ConnectionFailed) as e:
        ctx.connect(cluster="analytics")
    assert 'PAM authentication failed for user "pipeline_rw"' in str(e.value)
    assert "rds-db:connect" in str(e.value) and "X-Amz" not in str(e.value)


def _fake_runtime(monkeypatch, world: World, user: str):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    ctx = types.SimpleNamespace(
        user=user, workspaceUrl=world.stack.databricks_host, workspaceId="1234",
        clusterId="0101-abc", jobId="77", currentRunId="88", notebookPath="/Users/x/nb",
        apiToken={ANALYST: "dapi-analyst", PIPELINE_SP: "dapi-pipeline"}[user],
    )
    module = types.ModuleType("dbruntime.databricks_repl_context")
    module.get_context = lambda: ctx  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dbruntime", types.ModuleType("dbruntime"))
    monkeypatch.setitem(sys.modules, "dbruntime.databricks_repl_context", module)


def test_runtime_identity_comes_from_notebook_context_and_workspace(world: World, env, monkeypatch):
    env()
    monkeypatch.delenv("DATABRICKS_HOST")
    _fake_runtime(monkeypatch, world, PIPELINE_SP)
    me = aurora_dbx.whoami()
    assert (me.name, me.kind, me.resolver) == (PIPELINE_SP, "service_principal", "databricks_runtime")
    assert (me.job_id, me.run_id, me.cluster_id) == ("77", "88", "0101-abc")
    with aurora_dbx.connect(cluster="analytics", access="write"):
        pass
    (call,) = world.sts.assume_role_calls()
    keys = {call[f"Tags.member.{i}.Key"][0]: call[f"Tags.member.{i}.Value"][0] for i in range(1, 10) if f"Tags.member.{i}.Key" in call}
    assert keys["job_id"] == "77" and keys["run_id"] == "88"


def test_local_override_refused_inside_databricks_runtime(world: World, env, monkeypatch):
    env()
    _fake_runtime(monkeypatch, world, ANALYST)
    monkeypatch.setenv("AURORA_DBX_LOCAL_PRINCIPAL", f"service_principal:{PIPELINE_SP}")
    with pytest.raises(IdentityError, match="refused inside a Databricks runtime"):
        aurora_dbx.whoami()


def test_environment_token_cannot_change_identity_inside_runtime(world: World, env, monkeypatch):
    """DATABRICKS_TOKEN of another principal is ignored: the runtime's context rules."""
    env(PIPELINE_SP)
    _fake_runtime(monkeypatch, world, ANALYST)
    assert aurora_dbx.whoami().name == ANALYST


def test_local_override_outside_runtime(world: World, env, monkeypatch):
    env()
    monkeypatch.setenv("AURORA_DBX_LOCAL_PRINCIPAL", "user:dev@example.com;groups=data-science")
    me = aurora_dbx.whoami()
    assert (me.name, me.groups, me.resolver, me.roles) == ("dev@example.com", ("data-science",), "local_override", ("analyst-read",))


def test_no_identity_lists_every_resolver_tried(world: World, env, monkeypatch):
    env()
    monkeypatch.delenv("DATABRICKS_HOST")
    with pytest.raises(IdentityError) as e:
        aurora_dbx.whoami()
    assert "local_override" in str(e.value) and "databricks_sdk" in str(e.value)


def test_cli_whoami_and_check(world: World, env, capsys):
    from aurora_dbx.cli import main

    env(ANALYST)
    assert main(["whoami", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["principal"] == ANALYST and {r["role"] for r in out["roles"]} == {"analyst-read", "orders-read"}
    assert main(["check", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["roles"]) == 2
    for role in report["roles"]:
        assert [s["step"] for s in role["steps"]] == ["assume_role", "mint_token", "connect"]
        assert "TLS" in role["steps"][-1]["detail"]


def test_cli_check_reports_failure_in_one_line(world: World, env, capsys):
    from aurora_dbx.cli import main

    env(ANALYST)
    world.sts.faults.append(Fault(50, DENIED))
    assert main(["check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "assume_role" in err[0] and "AccessDenied" in err[0]


def test_cli_unbound_principal_exits_nonzero(world: World, env, capsys):
    from aurora_dbx.cli import main

    env(MALLORY)
    assert main(["check"]) == 1
    assert "no roles are bound" in capsys.readouterr().err


def test_web_identity_base_credentials_then_role_chaining(world: World, env, tmp_path):
    """OIDC: the token file is exchanged for the base role, which then assumes the mapped role."""
    import copy

    import yaml

    env(ANALYST)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(key, None)  # no static keys: only the OIDC token
    token_file = tmp_path / "oidc-token"
    token_file.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJkYXRhYnJpY2tzIn0.c2lnbmF0dXJl\n")
    base = world.stack.create_role("aurora-dbx-oidc")
    data = copy.deepcopy(world.policy)
    data["credentials"] = {"source": "web_identity", "web_identity_token_file": str(token_file),
                           "web_identity_role_arn": base}
    path = tmp_path / "oidc.yaml"
    path.write_text(yaml.safe_dump(data))
    ctx = aurora_dbx.configure(policy=path)
    with ctx.connect(cluster="analytics") as conn:
        assert _current_user(conn) == "analyst_ro"
    actions = [(r["Action"][0], r["RoleArn"][0]) for r in world.sts.assume_role_calls()]
    assert actions == [("AssumeRoleWithWebIdentity", base), ("AssumeRole", world.roles["analyst-read"])]


def test_token_provider_plugs_in_any_oidc_flow(world: World, env, tmp_path):
    """A callable (e.g. an Okta client-credentials flow) replaces the token file."""
    import copy

    env(ANALYST)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(key, None)
    calls = []

    def okta_client_credentials() -> str:
        calls.append(1)
        return "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJva3RhIn0.c2ln"

    data = copy.deepcopy(world.policy)
    data["credentials"] = {"source": "web_identity", "web_identity_token_file": "/nonexistent",
                           "web_identity_role_arn": world.stack.create_role("aurora-dbx-okta")}
    ctx = aurora_dbx.configure(policy=data, token_provider=okta_client_credentials)
    with ctx.connect(cluster="analytics") as conn:
        assert _current_user(conn) == "analyst_ro"
    assert calls == [1]
