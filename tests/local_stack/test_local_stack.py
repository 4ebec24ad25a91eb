"""The local stack against real servers: Aurora-style IAM token logins, STS, SCIM ``Me``.

No mocks: tokens are minted by botocore from credentials that moto's STS issued, and
are presented to real PostgreSQL and MariaDB servers over TLS with host verification.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pymysql
import pytest

from aurora_dbx.local_stack import LocalStack
from aurora_dbx.local_stack.databases import DatabaseServer

ENGINES = ("postgresql", "mysql")


# ----------------------------------------------------------------- helpers
@dataclass
class Session:
    """An assumed-role session that mints Aurora IAM auth tokens (the real botocore path)."""

    role_arn: str
    credentials: dict[str, Any]

    def token(self, db: DatabaseServer, db_user: str, *, host: str = "localhost") -> str:
        rds = boto3.client(
            "rds",
            region_name="us-east-1",
            aws_access_key_id=self.credentials["AccessKeyId"],
            aws_secret_access_key=self.credentials["SecretAccessKey"],
            aws_session_token=self.credentials["SessionToken"],
        )
        return str(
            rds.generate_db_auth_token(
                DBHostname=host, Port=db.port, DBUsername=db_user, Region="us-east-1"
            )
        )


def assume(stack: LocalStack, role_arn: str, session_name: str) -> Session:
    sts = stack.aws_client("sts")
    creds = sts.assume_role(  # type: ignore[attr-defined]
        RoleArn=role_arn, RoleSessionName=session_name, SourceIdentity=session_name
    )["Credentials"]
    return Session(role_arn=role_arn, credentials=creds)


def connect(stack: LocalStack, db: DatabaseServer, user: str, password: str) -> Any:
    """Connect like aurora_dbx clients do: TLS with CA and host name verification."""
    if db.engine == "postgresql":
        return psycopg.connect(
            host="localhost",
            port=db.port,
            user=user,
            password=password,
            dbname=db.database,
            sslmode="verify-full",
            sslrootcert=str(stack.ca_bundle),
            connect_timeout=10,
        )
    return pymysql.connect(
        host="localhost",
        port=db.port,
        user=user,
        password=password,
        database=db.database,
        ssl={"ca": str(stack.ca_bundle), "check_hostname": True},
        connect_timeout=10,
    )


def query(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    cur.execute(sql)
    rows = [tuple(r) for r in cur.fetchall()]
    cur.close()
    return rows


def assert_refused(
    stack: LocalStack, db: DatabaseServer, user: str, token: str, reason: str
) -> None:
    """The login fails with Aurora's own message, and the verifier logged ``reason``."""
    if db.engine == "postgresql":
        with pytest.raises(psycopg.OperationalError) as info:
            connect(stack, db, user, token)
        assert f'FATAL:  PAM authentication failed for user "{user}"' in str(info.value)
    else:
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(stack, db, user, token)
        assert info.value.args[0] == 1045
        assert f"Access denied for user '{user}'" in info.value.args[1]
    event = stack.verifier.last_event(user)
    assert event is not None and not event.ok
    assert event.endpoint == db.endpoint
    assert event.reason == reason, event


@dataclass
class World:
    stack: LocalStack
    reader: Session  # role allowed to connect as app_ro and app_rw
    outsider: Session  # role allowed nothing


@pytest.fixture(scope="module")
def world(stack: LocalStack) -> World:
    reader_arn = stack.create_role("ls-reader")
    outsider_arn = stack.create_role("ls-outsider")
    pg, my = stack.postgres, stack.mysql
    for db in (pg, my):
        db.create_iam_user("app_ro")
        db.create_iam_user("app_rw")
    pg.execute_admin("CREATE TABLE public.customers (id int PRIMARY KEY, name text)")
    pg.execute_admin("INSERT INTO public.customers VALUES (1, 'ada'), (2, 'grace')")
    pg.execute_admin("GRANT SELECT ON public.customers TO app_ro")
    my.execute_admin("CREATE TABLE customers (id int PRIMARY KEY, name text)")
    my.execute_admin("INSERT INTO customers VALUES (1, 'ada'), (2, 'grace')")
    my.execute_admin("GRANT SELECT ON analytics.customers TO 'app_ro'@'%'")
    stack.verifier.allow(reader_arn, "app_ro")
    stack.verifier.allow(reader_arn, "app_rw")
    return World(
        stack=stack,
        reader=assume(stack, reader_arn, "alice"),
        outsider=assume(stack, outsider_arn, "mallory"),
    )


@pytest.fixture
def verifier_settings(stack: LocalStack) -> Iterator[None]:
    """Restore the verifier's runtime settings after a test changed them."""
    age, offset = stack.verifier.max_token_age_seconds, stack.verifier.clock_offset_seconds
    yield
    stack.verifier.max_token_age_seconds = age
    stack.verifier.clock_offset_seconds = offset


# ------------------------------------------------------------ valid logins
def test_postgres_valid_token_connects_with_verify_full(world: World) -> None:
    stack = world.stack
    token = world.reader.token(stack.postgres, "app_ro")
    with connect(stack, stack.postgres, "app_ro", token) as conn:
        assert query(conn, "SELECT current_user") == [("app_ro",)]
        assert query(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == [(True,)]
        assert query(conn, "SELECT name FROM public.customers ORDER BY id") == [
            ("ada",),
            ("grace",),
        ]
    event = stack.verifier.last_event("app_ro")
    assert event is not None and event.ok and event.role_arn == world.reader.role_arn


def test_mysql_valid_token_connects_over_tls_with_cleartext_plugin(world: World) -> None:
    stack = world.stack
    token = world.reader.token(stack.mysql, "app_ro")
    conn = connect(stack, stack.mysql, "app_ro", token)
    try:
        assert query(conn, "SELECT current_user()") == [("app_ro@%",)]
        cipher = query(conn, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert cipher and cipher[0][1]
        assert query(conn, "SELECT name FROM customers ORDER BY id") == [("ada",), ("grace",)]
    finally:
        conn.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_token_longer_than_512_bytes_is_verified_whole(world: World, engine: str) -> None:
    # pam_exec would cut the password at 512 bytes; the C module hands over all of it
    stack = world.stack
    db = stack.database(engine)
    token = world.reader.token(db, "app_ro")
    assert len(token) > 512
    conn = connect(stack, db, "app_ro", token)
    conn.close()
    event = stack.verifier.last_event("app_ro")
    assert event is not None and event.ok and event.token_length == len(token)


def test_postgres_iam_users_are_members_of_rds_iam(stack: LocalStack, world: World) -> None:
    rows = stack.postgres.execute_admin(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
        "JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = 'rds_iam' ORDER BY 1"
    )
    assert rows == [("app_ro",), ("app_rw",)]


def test_database_grants_are_enforced_by_the_server(world: World) -> None:
    stack = world.stack
    token = world.reader.token(stack.postgres, "app_rw")
    with connect(stack, stack.postgres, "app_rw", token) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(conn, "SELECT * FROM public.customers")


# -------------------------------------------------------------- refusals
@pytest.mark.parametrize("engine", ENGINES)
def test_expired_token_is_refused(world: World, engine: str, verifier_settings: None) -> None:
    stack = world.stack
    db = stack.database(engine)
    stack.verifier.max_token_age_seconds = 2
    token = world.reader.token(db, "app_ro")
    time.sleep(3)
    assert_refused(stack, db, "app_ro", token, "expired")


@pytest.mark.parametrize("engine", ENGINES)
def test_tampered_signature_is_refused(world: World, engine: str) -> None:
    stack = world.stack
    db = stack.database(engine)
    token = world.reader.token(db, "app_ro")
    last = token[-1]
    tampered = token[:-1] + ("0" if last != "0" else "1")
    assert_refused(stack, db, "app_ro", tampered, "signature_mismatch")


@pytest.mark.parametrize("engine", ENGINES)
def test_token_for_another_db_user_is_refused(world: World, engine: str) -> None:
    stack = world.stack
    db = stack.database(engine)
    token = world.reader.token(db, "app_rw")
    assert_refused(stack, db, "app_ro", token, "db_user_mismatch")


@pytest.mark.parametrize("engine", ENGINES)
def test_token_of_a_role_not_allowed_for_the_user_is_refused(world: World, engine: str) -> None:
    stack = world.stack
    db = stack.database(engine)
    token = world.outsider.token(db, "app_ro")
    assert_refused(stack, db, "app_ro", token, "role_not_allowed")


def test_token_for_another_server_is_refused(world: World) -> None:
    stack = world.stack
    token = world.reader.token(stack.mysql, "app_ro")  # minted for the MariaDB port
    assert_refused(stack, stack.postgres, "app_ro", token, "endpoint_mismatch")


def test_swapped_session_token_is_refused(world: World) -> None:
    stack = world.stack
    token = world.reader.token(stack.postgres, "app_ro")
    other = world.outsider.credentials["SessionToken"]
    ours = world.reader.credentials["SessionToken"]
    from urllib.parse import quote

    swapped = token.replace(quote(ours, safe="-_.~"), quote(other, safe="-_.~"))
    assert swapped != token
    assert_refused(stack, stack.postgres, "app_ro", swapped, "security_token_mismatch")


def test_token_signed_with_credentials_sts_never_issued_is_refused(world: World) -> None:
    stack = world.stack
    forged = Session(
        role_arn="n/a",
        credentials={
            "AccessKeyId": "ASIAFORGEDFORGED0000",
            "SecretAccessKey": "x" * 40,
            "SessionToken": "forged",
        },
    )
    token = forged.token(stack.postgres, "app_ro")
    assert_refused(stack, stack.postgres, "app_ro", token, "unknown_access_key")


@pytest.mark.parametrize("engine", ENGINES)
def test_static_password_is_refused(world: World, engine: str) -> None:
    stack = world.stack
    assert_refused(stack, stack.database(engine), "app_ro", "hunter2", "malformed")


def test_verifier_clock_skew_is_simulated(world: World, verifier_settings: None) -> None:
    stack = world.stack
    db = stack.postgres
    stack.verifier.clock_offset_seconds = 1000  # verifier clock ahead: 15-minute token expired
    assert_refused(stack, db, "app_ro", world.reader.token(db, "app_ro"), "expired")
    stack.verifier.clock_offset_seconds = -3600  # verifier clock behind: token from the future
    assert_refused(stack, db, "app_ro", world.reader.token(db, "app_ro"), "date_in_future")
    stack.verifier.clock_offset_seconds = 0
    connect(stack, db, "app_ro", world.reader.token(db, "app_ro")).close()


def test_verification_takes_milliseconds(world: World) -> None:
    stack = world.stack
    db = stack.postgres
    token = world.reader.token(db, "app_ro")
    assert stack.verifier.verify(db.endpoint, "app_ro", token).ok  # warm the credential cache
    started = time.perf_counter()
    for _ in range(50):
        assert stack.verifier.verify(db.endpoint, "app_ro", token).ok
    assert (time.perf_counter() - started) / 50 < 0.01
    started = time.perf_counter()
    connect(stack, db, "app_ro", token).close()
    assert time.perf_counter() - started < 1.0


def test_verifier_log_explains_refusals_without_secrets(world: World) -> None:
    stack = world.stack
    token = world.reader.token(stack.postgres, "app_ro")
    lines = (stack.dir / "verifier.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    reasons = {e["reason"] for e in events}
    assert {
        "ok",
        "expired",
        "signature_mismatch",
        "db_user_mismatch",
        "role_not_allowed",
    } <= reasons
    text = "\n".join(lines)
    signature = token.rsplit("X-Amz-Signature=", 1)[1]
    for secret in (
        signature,
        world.reader.credentials["SecretAccessKey"],
        world.reader.credentials["SessionToken"][:40],
        "X-Amz-Signature",
    ):
        assert secret not in text
    assert stack.verifier.verified >= 1 and stack.verifier.refused >= 5


# -------------------------------------------------------------- STS / env
def test_environ_routes_the_real_boto3_path_to_the_local_sts(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = stack.environ()
    for key in (
        "AWS_ENDPOINT_URL_STS",
        "AWS_ENDPOINT_URL_IAM",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "DATABRICKS_HOST",
    ):
        assert env[key]
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    arn = boto3.client("iam").get_role(RoleName="ls-reader")["Role"]["Arn"]
    assert arn == "arn:aws:iam::123456789012:role/ls-reader"
    creds = boto3.client("sts").assume_role(RoleArn=arn, RoleSessionName="env")["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")


# ------------------------------------------------------ Databricks SCIM Me
def _me_request(stack: LocalStack, token: str) -> urllib.request.Request:
    return urllib.request.Request(  # noqa: S310 - loopback http URL
        stack.databricks_host + "/api/2.0/preview/scim/v2/Me",
        headers={"Authorization": f"Bearer {token}"},
    )


def _open(request: urllib.request.Request) -> Any:
    return urllib.request.urlopen(request, timeout=5)  # noqa: S310 - loopback http URL


def _me(stack: LocalStack, token: str) -> Any:
    from databricks.sdk import WorkspaceClient

    return WorkspaceClient(host=stack.databricks_host, token=token).current_user.me()


def test_scim_me_for_a_user_through_the_databricks_sdk(stack: LocalStack) -> None:
    stack.add_databricks_principal(
        "dapi-alice",
        user_name="alice@example.com",
        kind="user",
        groups=["data-scientists", "users"],
        display_name="Alice Doe",
    )
    me = _me(stack, "dapi-alice")
    assert me.user_name == "alice@example.com"
    assert me.display_name == "Alice Doe"
    assert [g.display for g in me.groups or []] == ["data-scientists", "users"]
    assert me.emails and me.emails[0].value == "alice@example.com"


def test_scim_me_for_a_service_principal_through_the_databricks_sdk(stack: LocalStack) -> None:
    app_id = "6f1c2b1e-8d0a-4c77-9a8b-1f2e3d4c5b6a"
    stack.add_databricks_principal(
        "dapi-scorer",
        user_name=app_id,
        kind="service_principal",
        groups=["jobs"],
        display_name="nightly-scorer",
    )
    me = _me(stack, "dapi-scorer")
    assert me.user_name == app_id
    assert me.display_name == "nightly-scorer"
    assert [g.display for g in me.groups or []] == ["jobs"]


def test_scim_me_refuses_unknown_tokens_like_the_workspace(stack: LocalStack) -> None:
    from databricks.sdk.errors import Unauthenticated

    with pytest.raises(Unauthenticated):
        _me(stack, "dapi-nobody")
    request = _me_request(stack, "dapi-nobody")
    with pytest.raises(urllib.error.HTTPError) as info:
        _open(request)
    assert info.value.code == 401
    assert json.loads(info.value.read())["error_code"] == "UNAUTHENTICATED"


def test_workspace_faults_can_be_injected(stack: LocalStack) -> None:
    stack.add_databricks_principal("dapi-faults", user_name="f@example.com", groups=[])
    request = _me_request(stack, "dapi-faults")
    try:
        stack.databricks_delay_seconds = 0.5
        started = time.monotonic()
        with _open(request) as resp:
            assert resp.status == 200
        assert time.monotonic() - started >= 0.5
        stack.databricks_delay_seconds = 0
        stack.databricks_down = True
        with pytest.raises(urllib.error.HTTPError) as info:
            _open(request)
        assert info.value.code == 503
        assert json.loads(info.value.read())["error_code"] == "TEMPORARILY_UNAVAILABLE"
    finally:
        stack.databricks_delay_seconds = 0
        stack.databricks_down = False


# ------------------------------------------------------------------ JDBC
_JAVA = """
import java.sql.*;
import java.util.Properties;
public class JdbcLogin {
  public static void main(String[] a) throws Exception {
    Properties p = new Properties();
    p.setProperty("user", a[1]);
    p.setProperty("password", System.getenv("DB_TOKEN"));
    for (int i = 2; i < a.length; i++) {
      String[] kv = a[i].split("=", 2);
      p.setProperty(kv[0], kv[1]);
    }
    try (Connection c = DriverManager.getConnection(a[0], p);
         ResultSet rs = c.createStatement().executeQuery("SELECT count(*) FROM customers")) {
      rs.next(); System.out.println("ROWS " + rs.getInt(1));
    } catch (SQLException e) { System.out.println("FAILED " + e.getMessage()); }
  }
}
"""


@pytest.fixture(scope="module")
def jdbc_login(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("no JDK")
    if len(LocalStack.jdbc_jars()) < 2:
        pytest.skip("Debian JDBC jars not installed")
    directory = tmp_path_factory.mktemp("jdbc")
    (directory / "JdbcLogin.java").write_text(_JAVA)
    subprocess.run(["javac", "JdbcLogin.java"], cwd=directory, check=True, timeout=120)
    return directory


def jdbc_options(stack: LocalStack, db: DatabaseServer) -> tuple[str, list[str]]:
    ca = str(stack.ca_bundle)
    if db.engine == "postgresql":
        return (
            f"jdbc:postgresql://localhost:{db.port}/{db.database}",
            ["sslmode=verify-full", f"sslrootcert={ca}"],
        )
    # MariaDB Connector/J 2.7: TLS with the CA (host name verification is on by default);
    # it refuses mysql_clear_password without TLS
    return (
        f"jdbc:mariadb://localhost:{db.port}/{db.database}",
        ["useSsl=true", f"serverSslCert={ca}"],
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_jdbc_driver_logs_in_with_a_token(world: World, jdbc_login: Path, engine: str) -> None:
    stack = world.stack
    db = stack.database(engine)
    url, options = jdbc_options(stack, db)
    classpath = ":".join([*LocalStack.jdbc_jars(), str(jdbc_login)])

    def run_java(token: str) -> str:
        out = subprocess.run(
            ["java", "-cp", classpath, "JdbcLogin", url, "app_ro", *options],
            env={**os.environ, "DB_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return out.stdout + out.stderr

    assert "ROWS 2" in run_java(world.reader.token(db, "app_ro"))
    refused = run_java(world.outsider.token(db, "app_ro"))
    if engine == "postgresql":
        assert 'PAM authentication failed for user "app_ro"' in refused
    else:
        assert "Access denied for user 'app_ro'" in refused


# ------------------------------------------------------------- lifecycle
def _descendants(pids: list[int]) -> set[int]:
    """``pids`` and every live process below them."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {p for p in pids if p in parents}
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        grew = bool(children)
        found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stacks_start_in_a_row_and_stop_cleanly(stack: LocalStack) -> None:
    for _ in range(2):
        started = time.monotonic()
        other = LocalStack()
        other.start()
        assert other.start() is other  # idempotent
        try:
            assert time.monotonic() - started < 15
            stack_dir = other.dir
            pam_files = sorted(Path("/etc/pam.d").glob(f"aurora-dbx-{other.stack_id}-*"))
            assert len(pam_files) == 2
            ports = {other.postgres.port, other.mysql.port}
            assert not ports & {stack.postgres.port, stack.mysql.port}
            processes = _descendants(other.pids())
            assert len(processes) >= 4  # moto, postmaster (+ its workers), mariadbd
        finally:
            other.stop()
        other.stop()  # idempotent
        assert not [pid for pid in processes if _alive(pid)]
        assert not any(p.exists() for p in pam_files)
        assert not stack_dir.exists()
    # the module's stack is unaffected
    assert stack.verifier.socket_path is not None and stack.verifier.socket_path.exists()
    connect_ok = stack.postgres.execute_admin("SELECT 1")
    assert connect_ok == [(1,)]
