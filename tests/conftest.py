"""Shared fixtures: one local stack (PostgreSQL, MariaDB, STS, workspace API) per run.

The stack is real: servers started on their own data directories and ports, PAM-verified
IAM tokens, moto's STS behind a recording proxy, a loopback SCIM server. Every test that
needs it shares the same instance; tests isolate themselves with their own principals,
roles and tables rather than restarting servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.sts_proxy import StsProxy

ANALYST = "analyst@example.com"
SCIENTIST = "scientist@example.com"
PIPELINE_SP = "6a1c2f0e-1111-2222-3333-444455556666"
MALLORY = "mallory@example.com"
TOKENS = {ANALYST: "dapi-analyst", SCIENTIST: "dapi-scientist", PIPELINE_SP: "dapi-pipeline", MALLORY: "dapi-mallory"}


@dataclass
class World:
    """The shared stack plus what the suite seeded into it."""

    stack: object
    sts: StsProxy
    policy_path: Path
    policy: dict
    roles: dict[str, str]  # policy role name -> IAM role ARN

    def env(self, principal: str | None = None) -> dict[str, str]:
        env = dict(self.stack.environ())
        env["AWS_ENDPOINT_URL_STS"] = self.sts.url
        env["AURORA_DBX_POLICY"] = str(self.policy_path)
        if principal is not None:
            env["DATABRICKS_TOKEN"] = TOKENS[principal]
        return env


PG_SEED = """
CREATE SCHEMA IF NOT EXISTS features;
CREATE SCHEMA IF NOT EXISTS secret;
CREATE TABLE IF NOT EXISTS public.customers (id bigint PRIMARY KEY, name text, signup date);
CREATE TABLE IF NOT EXISTS features.customer_ltv (id bigint PRIMARY KEY, ltv numeric(12,2));
CREATE TABLE IF NOT EXISTS features.scores (id bigint PRIMARY KEY, score double precision);
CREATE TABLE IF NOT EXISTS secret.salaries (id bigint PRIMARY KEY, salary numeric);
INSERT INTO public.customers VALUES (1, 'Ada', '2024-01-02'), (2, 'Grace', '2024-02-03') ON CONFLICT DO NOTHING;
INSERT INTO secret.salaries VALUES (1, 100000) ON CONFLICT DO NOTHING;
"""


def _policy(stack, roles: dict[str, str]) -> dict:
    pg, my = stack.postgres, stack.mysql
    ca = str(stack.ca_bundle)
    return {
        "version": 1,
        "project": "churn-model",
        "clusters": {
            "analytics": {"engine": "postgresql", "host": pg.host, "port": pg.port,
                          "database": pg.database, "region": "us-east-1",
                          "resource_id": "cluster-ANALYTICS0001", "tls": "verify-full", "ca_bundle": ca},
            "orders": {"engine": "mysql", "host": my.host, "port": my.port,
                       "database": my.database, "region": "us-east-1",
                       "resource_id": "cluster-ORDERS0000001", "tls": "verify-full", "ca_bundle": ca},
        },
        "roles": {
            "analyst-read": {"cluster": "analytics", "iam_role_arn": roles["analyst-read"],
                             "db_user": "analyst_ro", "access": "read",
                             "tables": ["public.*", "features.customer_*"]},
            "pipeline-write": {"cluster": "analytics", "iam_role_arn": roles["pipeline-write"],
                               "db_user": "pipeline_rw", "access": "write", "tables": ["features.*"]},
            "orders-read": {"cluster": "orders", "iam_role_arn": roles["orders-read"],
                            "db_user": "orders_ro", "access": "read", "tables": [f"{my.database}.*"]},
            "orders-write": {"cluster": "orders", "iam_role_arn": roles["orders-write"],
                             "db_user": "orders_rw", "access": "write", "tables": [f"{my.database}.*"]},
        },
        "bindings": [
            {"user": ANALYST, "roles": ["analyst-read", "orders-read"]},
            {"group": "data-science", "roles": ["analyst-read"]},
            {"service_principal": PIPELINE_SP, "roles": ["pipeline-write", "analyst-read", "orders-write"]},
        ],
        "audit": {"sink": "log"},
    }


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from aurora_dbx.local_stack import LocalStack

    stack = LocalStack(engines=("postgresql", "mysql"))
    stack.start()
    try:
        roles = {name: stack.create_role(f"aurora-{name}") for name in ("analyst-read", "pipeline-write", "orders-read", "orders-write")}
        pg, my = stack.postgres, stack.mysql
        for user in ("analyst_ro", "pipeline_rw"):
            pg.create_iam_user(user)
        for stmt in PG_SEED.strip().split(";\n"):
            if stmt.strip():
                pg.execute_admin(stmt)
        pg.execute_admin("GRANT USAGE ON SCHEMA public, features TO analyst_ro, pipeline_rw")
        pg.execute_admin("GRANT SELECT ON public.customers, features.customer_ltv TO analyst_ro")
        pg.execute_admin("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA features TO pipeline_rw")
        pg.execute_admin("GRANT CREATE ON SCHEMA features TO pipeline_rw")
        my.create_iam_user("orders_ro")
        my.execute_admin(f"CREATE TABLE IF NOT EXISTS `{my.database}`.`orders` (id BIGINT PRIMARY KEY, total DECIMAL(12,2))")
        my.execute_admin(f"INSERT IGNORE INTO `{my.database}`.`orders` VALUES (1, 10.50), (2, 99.99)")
        my.execute_admin(f"GRANT SELECT ON `{my.database}`.* TO 'orders_ro'@'%'")
        my.create_iam_user("orders_rw")
        my.execute_admin(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP ON `{my.database}`.* TO 'orders_rw'@'%'")
        pg.execute_admin("ALTER DEFAULT PRIVILEGES IN SCHEMA features GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO pipeline_rw")
        pg.execute_admin("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO analyst_ro")
        stack.allow(roles["analyst-read"], "analyst_ro", "postgresql")
        stack.allow(roles["pipeline-write"], "pipeline_rw", "postgresql")
        stack.allow(roles["orders-read"], "orders_ro", "mysql")
        stack.allow(roles["orders-write"], "orders_rw", "mysql")
        stack.add_databricks_principal(TOKENS[ANALYST], user_name=ANALYST, groups=["analysts"])
        stack.add_databricks_principal(TOKENS[SCIENTIST], user_name=SCIENTIST, groups=["data-science", "users"])
        stack.add_databricks_principal(TOKENS[PIPELINE_SP], user_name=PIPELINE_SP, kind="service_principal",
                                       display_name="churn-pipeline", groups=[])
        stack.add_databricks_principal(TOKENS[MALLORY], user_name=MALLORY, groups=["sales"])
        policy = _policy(stack, roles)
        path = tmp_path_factory.mktemp("policy") / "policy.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        sts = StsProxy(stack.sts_endpoint)
        yield World(stack, sts, path, policy, roles)
        sts.close()
    finally:
        stack.stop()


_CLEAN_PREFIXES = ("AWS_", "DATABRICKS_", "AURORA_DBX_")


@pytest.fixture
def env(world: World, monkeypatch: pytest.MonkeyPatch):
    """Point this test's process at the stack, as ``principal`` (a function to call)."""
    for key in list(os.environ):
        if key.startswith(_CLEAN_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(Path(world.policy_path).parent))  # no ~/.databrickscfg, ~/.aws
    world.sts.reset()

    def as_principal(principal: str | None = None, **extra: str) -> dict[str, str]:
        values = world.env(principal)
        values.update(extra)
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        return values

    yield as_principal
    import aurora_dbx.context

    aurora_dbx.context.reset()


@pytest.fixture(scope="session")
def spark(world: World, tmp_path_factory: pytest.TempPathFactory):
    """One local Spark session for the run, with the Debian JDBC drivers.

    ``local[2,4]``: two cores, and a failed task is retried (up to 4 attempts) as on a
    cluster, so retry behaviour is exercised for real.
    """
    import sys

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[2,4]")
        .appName("aurora-dbx-tests")
        .config("spark.jars", ",".join(world.stack.jdbc_jars()))
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()


# ==== leak scan (tests/support/leaks.py; owned by the security suites) ========================
# After every test, search the text it produced (logs at DEBUG, library and Spark exception
# texts, pytest's report, audit records, capsys output, Spark plan strings, a sqlite MLflow
# store) for every secret the run created; any finding fails the test (never printing it).


@pytest.fixture(scope="session", autouse=True)
def _leak_scan_plugin(request: pytest.FixtureRequest) -> Iterator[None]:
    from tests.support import leaks

    plugin = leaks.Plugin()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "aurora-dbx-leak-scan")
    yield


@pytest.fixture(autouse=True)
def _leak_scan(request: pytest.FixtureRequest) -> Iterator[None]:
    from tests.support import leaks

    if request.node.nodeid.startswith("tests/local_stack/"):
        # The stack's own tests sign tokens with botocore directly, outside aurora_dbx (no
        # redaction installed): the promise scanned for here is the library's.
        yield
        return
    if "spark" in request.fixturenames:
        import pyspark.sql  # noqa: F401 - so the scan can watch Spark errors and plans
    scan = leaks.LeakScan()
    request.node._leak_scan = scan
    if "capsys" in request.fixturenames:
        capsys = request.getfixturevalue("capsys")
        read = capsys.readouterr

        def readouterr():  # type: ignore[no-untyped-def]
            result = read()
            scan.capture(result.out)
            scan.capture(result.err)
            return result

        capsys.readouterr = readouterr
    scan.start()
    try:
        yield
    finally:
        scan.stop()
    for where, text in leaks.report_texts(request.node):
        scan.add(where, text)
    endpoint = request.getfixturevalue("world").stack.sts_endpoint if "world" in request.fixturenames else None
    findings = scan.findings(endpoint)
    if findings:
        pytest.fail("secret leak scan: " + "; ".join(str(f) for f in findings[:10])
                    + (f" (+{len(findings) - 10} more)" if len(findings) > 10 else ""), pytrace=False)
# ==== end of leak scan =======================================================================
