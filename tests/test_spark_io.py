"""Spark reads and writes on real PostgreSQL and MariaDB with IAM auth (local Spark)."""

from __future__ import annotations

import threading
import time
from datetime import date, datetime, timezone
from decimal import Decimal

import pytest

import aurora_dbx
from aurora_dbx.errors import AccessDenied, AuroraDbxError, SchemaMismatch
from aurora_dbx.identifiers import IdentifierError
from aurora_dbx.sqltext import SqlFragmentError
from tests.conftest import ANALYST, PIPELINE_SP, World
from tests.support.sts_proxy import DENIED, Fault

pytestmark = pytest.mark.slow

UNICODE = "Zoë — 東京 🚀 \"quoted\" 'single', comma\nnewline \\ backslash"

PG_TYPES = """
CREATE TABLE IF NOT EXISTS features.typed (
  id bigint PRIMARY KEY, small smallint, amount numeric(38,18), price numeric(12,2), loose numeric,
  ratio double precision, flag boolean, label text, born date, seen_at timestamptz, local_at timestamp,
  payload bytea, uid uuid, doc jsonb
)"""

ROWS = [
    (1, 7, Decimal("12345678901234567890.123456789012345678"), Decimal("0.01"), Decimal("3.1415926535"),
     1.5e300, True, UNICODE, date(1999, 12, 31), datetime(2024, 3, 10, 1, 59, 59, 999999, tzinfo=timezone.utc),
     datetime(2024, 3, 10, 2, 30), b"\x00\xff\x10", "6a1c2f0e-1111-2222-3333-444455556666", '{"a": [1, 2]}'),
    (2, None, None, None, None, None, None, None, None, None, None, None, None, None),
    (3, -32768, Decimal("-0.000000000000000001"), Decimal("-9999999999.99"), Decimal("0"), -0.0, False, "",
     date(2024, 2, 29), datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(2038, 1, 19, 3, 14, 8), b"", None, "[]"),
]


@pytest.fixture(scope="module")
def typed(world: World):
    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS features.typed")
    pg.execute_admin(PG_TYPES)
    pg.execute_admin("GRANT SELECT ON features.typed TO analyst_ro")
    conn = pg.admin_connect()
    with conn.cursor() as cur:
        for r in ROWS:
            cur.execute("INSERT INTO features.typed VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", r)
    conn.commit()
    conn.close()
    return "features.typed"


def as_sp(env, spark):
    env(PIPELINE_SP)
    return aurora_dbx.configure(spark=spark)


def test_postgres_types_read_exactly(world, env, spark, typed):
    as_sp(env, spark)
    df = aurora_dbx.read_table(typed, cluster="analytics")
    types = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    assert types == {
        "id": "bigint", "small": "smallint", "amount": "decimal(38,18)", "price": "decimal(12,2)",
        "loose": "decimal(38,10)", "ratio": "double", "flag": "boolean", "label": "string", "born": "date",
        "seen_at": "timestamp", "local_at": "timestamp_ntz", "payload": "binary", "uid": "string", "doc": "string",
    }
    rows = {r["id"]: r for r in df.collect()}
    r1 = rows[1]
    assert r1["amount"] == ROWS[0][2] and r1["price"] == Decimal("0.01") and r1["loose"] == Decimal("3.1415926535")
    assert r1["ratio"] == 1.5e300 and r1["flag"] is True and r1["label"] == UNICODE
    assert r1["born"] == date(1999, 12, 31)
    # session time zone is UTC: the instant survives exactly
    assert r1["seen_at"].replace(tzinfo=timezone.utc) == ROWS[0][9]
    assert r1["local_at"] == datetime(2024, 3, 10, 2, 30)
    assert bytes(r1["payload"]) == b"\x00\xff\x10" and r1["uid"] == ROWS[0][12] and r1["doc"] == '{"a": [1, 2]}'
    assert all(v is None for k, v in rows[2].asDict().items() if k != "id")
    r3 = rows[3]
    assert r3["label"] == "" and bytes(r3["payload"]) == b"" and r3["amount"] == Decimal("-0.000000000000000001")
    assert r3["small"] == -32768 and r3["flag"] is False and r3["born"] == date(2024, 2, 29)


def test_postgres_round_trip_through_write_table(world, env, spark, typed):
    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS features.typed_copy")
    pg.execute_admin("CREATE TABLE features.typed_copy (LIKE features.typed INCLUDING ALL)")
    as_sp(env, spark)
    src = aurora_dbx.read_table(typed, cluster="analytics").drop("uid", "doc")  # text types are covered above
    assert aurora_dbx.write_table(src, "features.typed_copy", cluster="analytics") == 3
    diff = pg.execute_admin(
        "SELECT count(*) FROM ((SELECT id, small, amount, price, ratio, flag, label, born, seen_at, local_at, payload FROM features.typed"
        " EXCEPT SELECT id, small, amount, price, ratio, flag, label, born, seen_at, local_at, payload FROM features.typed_copy)"
        " UNION ALL (SELECT id, small, amount, price, ratio, flag, label, born, seen_at, local_at, payload FROM features.typed_copy"
        " EXCEPT SELECT id, small, amount, price, ratio, flag, label, born, seen_at, local_at, payload FROM features.typed)) d"
    )
    assert diff == [(0,)]


def test_empty_table_reads_as_empty_dataframe_with_schema(world, env, spark):
    pg = world.stack.postgres
    pg.execute_admin("CREATE TABLE IF NOT EXISTS features.empty_one (id bigint PRIMARY KEY, v text)")
    as_sp(env, spark)
    df = aurora_dbx.read_table("features.empty_one", cluster="analytics")
    assert df.count() == 0 and [f.name for f in df.schema.fields] == ["id", "v"]


def test_mysql_round_trip_with_types(world, env, spark):
    my = world.stack.mysql
    db = my.database
    my.execute_admin(f"DROP TABLE IF EXISTS `{db}`.`typed`")
    my.execute_admin(
        f"CREATE TABLE `{db}`.`typed` (id BIGINT PRIMARY KEY, amount DECIMAL(30,10), ratio DOUBLE, label VARCHAR(200) "
        "CHARACTER SET utf8mb4, born DATE, seen_at DATETIME(6), stamp TIMESTAMP(6) NULL, payload VARBINARY(20), flag TINYINT)"
    )
    as_sp(env, spark)
    src = spark.createDataFrame(
        [(1, Decimal("12345678901234567890.0123456789"), 2.5, UNICODE, date(2000, 1, 1), datetime(2024, 1, 2, 3, 4, 5, 6),
          datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc), bytearray(b"\x00\x01"), 1),
         (2, None, None, None, None, None, None, None, None)],
        "id long, amount decimal(30,10), ratio double, label string, born date, seen_at timestamp_ntz, stamp timestamp, payload binary, flag int",
    )
    assert aurora_dbx.write_table(src, f"{db}.typed", cluster="orders") == 2
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    got = {r["id"]: r for r in aurora_dbx.read_table(f"{db}.typed", cluster="orders").collect()}
    r = got[1]
    assert r["amount"] == Decimal("12345678901234567890.0123456789") and r["label"] == UNICODE
    assert r["born"] == date(2000, 1, 1) and r["seen_at"] == datetime(2024, 1, 2, 3, 4, 5, 6)
    assert r["stamp"].replace(tzinfo=timezone.utc) == datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    assert bytes(r["payload"]) == b"\x00\x01" and r["flag"] == 1
    assert all(v is None for k, v in got[2].asDict().items() if k != "id")


def test_partitioned_read_is_complete_without_duplicates(world, env, spark):
    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS public.events")
    pg.execute_admin("CREATE TABLE public.events (id bigint PRIMARY KEY, day date, v double precision)")
    pg.execute_admin("INSERT INTO public.events SELECT g, date '2024-01-01' + (g % 300), g * 0.5 FROM generate_series(1, 50000) g")
    pg.execute_admin("INSERT INTO public.events VALUES (-5, NULL, NULL)")
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    df = aurora_dbx.read_table("public.events", cluster="analytics")
    assert df.rdd.getNumPartitions() == 2  # sized to local[2]'s parallelism
    ids = [r[0] for r in df.select("id").collect()]
    assert len(ids) == 50001 and len(set(ids)) == 50001
    by_day = aurora_dbx.read_table("public.events", cluster="analytics", partition_column="day", num_partitions=7,
                                   columns=["id", "day"], where="v > 100")
    assert by_day.rdd.getNumPartitions() == 7
    got = sorted(r[0] for r in by_day.collect())
    assert got == list(range(201, 50001))


def test_query_read_checks_every_table_it_touches(world, env, spark):
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    df = aurora_dbx.read_table("public.customers", cluster="analytics",
                               query="SELECT c.id, c.name FROM public.customers c WHERE c.id = 1")
    assert [tuple(r) for r in df.collect()] == [(1, "Ada")]
    # the database itself refuses: analyst_ro has no USAGE on schema secret
    with pytest.raises(AccessDenied, match="permission denied for schema secret"):
        aurora_dbx.read_table("public.customers", cluster="analytics",
                              query="SELECT c.id FROM public.customers c JOIN secret.salaries s ON s.id = c.id")
    # a table the user can see but the policy does not cover is refused by the client
    world.stack.postgres.execute_admin("CREATE TABLE IF NOT EXISTS features.internal_notes (id bigint PRIMARY KEY)")
    world.stack.postgres.execute_admin("GRANT USAGE ON SCHEMA features TO analyst_ro")
    world.stack.postgres.execute_admin("GRANT SELECT ON features.internal_notes TO analyst_ro")
    with pytest.raises(AccessDenied, match="features.internal_notes"):
        aurora_dbx.read_table("public.customers", cluster="analytics",
                              query="SELECT c.id FROM public.customers c JOIN features.internal_notes n ON n.id = c.id")


def test_action_long_after_token_lifetime_still_works(world, env, spark):
    """The plan holds no token: tasks fetch one when they connect, however late."""
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    verifier = world.stack.verifier
    df = aurora_dbx.read_table("public.events", cluster="analytics", num_partitions=6, columns=["id"])
    old = verifier.max_token_age_seconds
    verifier.max_token_age_seconds = 2
    try:
        time.sleep(3)  # every token minted so far is now too old for the server
        refused = verifier.refused
        assert df.count() == 50001  # 6 tasks in 3 waves on 2 cores
        assert verifier.refused > refused  # the stale cached token was refused, then re-minted
        time.sleep(3)
        assert df.filter("id > 49990").count() == 10  # a second action, later still
    finally:
        verifier.max_token_age_seconds = old


def test_past_role_session_life_the_action_fails_with_one_clear_error(world, env, spark):
    env(ANALYST)
    now = [datetime.now(timezone.utc)]
    aurora_dbx.configure(spark=spark, clock=lambda: now[0], retry_sleep=lambda s: None)
    df = aurora_dbx.read_table("public.customers", cluster="analytics")
    now[0] = now[0].replace(year=now[0].year + 1)  # a year later the session is long gone
    world.sts.faults.append(Fault(1000, DENIED))  # and the role can no longer be assumed
    try:
        with pytest.raises(Exception) as e:
            df.collect()
        text = str(e.value)
        assert "AccessDenied" in text and "aurora-analyst-read" in text
    finally:
        world.sts.reset()


def test_read_role_cannot_write_client_side(world, env, spark):
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    df = spark.createDataFrame([(1, 0.1)], "id long, score double")
    with pytest.raises(AccessDenied, match="read-only"):
        aurora_dbx.write_table(df, "public.customers", cluster="analytics")


def test_read_role_cannot_write_server_side(world, env, spark, tmp_path):
    """Even with a policy that wrongly grants write, the read user's GRANTs refuse it."""
    import copy

    import yaml

    env(ANALYST)
    data = copy.deepcopy(world.policy)
    data["roles"]["analyst-read"]["access"] = "write"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    aurora_dbx.configure(policy=path, spark=spark)
    before = world.stack.postgres.execute_admin("SELECT count(*) FROM public.customers")
    df = spark.createDataFrame([(99, "Eve", date(2024, 1, 1))], "id long, name string, signup date")
    with pytest.raises(AuroraDbxError, match="(?i)permission denied"):
        aurora_dbx.write_table(df, "public.customers", cluster="analytics")
    assert world.stack.postgres.execute_admin("SELECT count(*) FROM public.customers") == before


def test_upsert_is_idempotent(world, env, spark):
    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS features.scores_u")
    pg.execute_admin("CREATE TABLE features.scores_u (id bigint PRIMARY KEY, score double precision, note text)")
    pg.execute_admin("INSERT INTO features.scores_u VALUES (1, 0.0, 'old'), (50, 5.0, 'untouched')")
    as_sp(env, spark)
    df = spark.createDataFrame([(i, i / 10, f"n{i}") for i in range(1, 21)], "id long, score double, note string")
    sc = spark.sparkContext
    for _ in range(2):
        sc.setJobGroup("upsert-idempotent", "upsert")
        aurora_dbx.write_table(df, "features.scores_u", cluster="analytics", mode="upsert", key=["id"])
        # no task needed a retry to succeed (the session would retry and hide a first-attempt bug)
        tracker = sc.statusTracker()
        for job in tracker.getJobIdsForGroup("upsert-idempotent"):
            for stage in tracker.getJobInfo(job).stageIds:
                info = tracker.getStageInfo(stage)
                assert info is None or info.numFailedTasks == 0
        rows = pg.execute_admin("SELECT id, score, note FROM features.scores_u ORDER BY id")
        assert rows == [(i, i / 10, f"n{i}") for i in range(1, 21)] + [(50, 5.0, "untouched")]


def test_mysql_upsert_and_overwrite(world, env, spark):
    my = world.stack.mysql
    db = my.database
    my.execute_admin(f"DROP TABLE IF EXISTS `{db}`.`scores`")
    my.execute_admin(f"CREATE TABLE `{db}`.`scores` (id BIGINT PRIMARY KEY, score DOUBLE)")
    my.execute_admin(f"INSERT INTO `{db}`.`scores` VALUES (1, 0), (9, 9)")
    as_sp(env, spark)
    df = spark.createDataFrame([(1, 1.5), (2, 2.5)], "id long, score double")
    for _ in range(2):
        aurora_dbx.write_table(df, f"{db}.scores", cluster="orders", mode="upsert", key=["id"])
    assert my.execute_admin(f"SELECT id, score FROM `{db}`.`scores` ORDER BY id") == [(1, 1.5), (2, 2.5), (9, 9.0)]
    aurora_dbx.write_table(df, f"{db}.scores", cluster="orders", mode="overwrite")
    assert my.execute_admin(f"SELECT id, score FROM `{db}`.`scores` ORDER BY id") == [(1, 1.5), (2, 2.5)]
    assert my.execute_admin("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '\\_adbx\\_stage\\_%%'") == [(0,)]


def test_schema_mismatch_fails_before_target_is_touched(world, env, spark):
    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS features.strict")
    pg.execute_admin("CREATE TABLE features.strict (id bigint PRIMARY KEY, score double precision NOT NULL, at date)")
    pg.execute_admin("INSERT INTO features.strict VALUES (1, 1.0, NULL)")
    as_sp(env, spark)
    cases = [
        (spark.createDataFrame([(2, 1.0, "x")], "id long, score double, extra string"), "extra"),
        (spark.createDataFrame([(2, "high")], "id long, score string"), "string in the DataFrame"),
        (spark.createDataFrame([(2,)], "id long"), "NOT NULL"),
    ]
    for df, fragment in cases:
        with pytest.raises(SchemaMismatch, match=fragment):
            aurora_dbx.write_table(df, "features.strict", cluster="analytics")
    with pytest.raises(SchemaMismatch, match="unique index"):
        aurora_dbx.write_table(spark.createDataFrame([(2, 1.0)], "id long, score double"), "features.strict",
                               cluster="analytics", mode="upsert", key=["score"])
    with pytest.raises(SchemaMismatch, match="duplicate keys"):
        aurora_dbx.write_table(spark.createDataFrame([(2, 1.0), (2, 2.0)], "id long, score double"),
                               "features.strict", cluster="analytics", mode="upsert", key=["id"])
    assert pg.execute_admin("SELECT id, score FROM features.strict") == [(1, 1.0)]
    assert pg.execute_admin("SELECT count(*) FROM pg_tables WHERE tablename LIKE '\\_adbx\\_stage\\_%%'") == [(0,)]


def test_failing_task_publishes_nothing(world, env, spark):
    from pyspark.sql import functions as F

    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS features.atomic")
    pg.execute_admin("CREATE TABLE features.atomic (id bigint PRIMARY KEY, v double precision)")
    pg.execute_admin("INSERT INTO features.atomic VALUES (-1, -1)")
    as_sp(env, spark)

    @F.udf("double")
    def explode_on_777(i):
        if i == 777:
            raise ValueError("boom")
        return float(i)

    df = spark.range(0, 1000, numPartitions=4).withColumn("v", explode_on_777("id"))
    with pytest.raises(AuroraDbxError, match="nothing was published"):
        aurora_dbx.write_table(df, "features.atomic", cluster="analytics", mode="overwrite")
    assert pg.execute_admin("SELECT id, v FROM features.atomic") == [(-1, -1.0)]
    assert pg.execute_admin("SELECT count(*) FROM pg_tables WHERE tablename LIKE '\\_adbx\\_stage\\_%%'") == [(0,)]


def test_backend_killed_mid_write_leaves_no_partial_or_duplicate_rows(world, env, spark):
    """Terminate the task's database backend during COPY: Spark retries the task, which
    replaces its partition in the stage; the publish lands every row exactly once."""
    from pyspark.sql import functions as F

    pg = world.stack.postgres
    pg.execute_admin("DROP TABLE IF EXISTS features.killed")
    pg.execute_admin("CREATE TABLE features.killed (id bigint PRIMARY KEY, v double precision)")
    as_sp(env, spark)

    @F.udf("double")
    def slow(i):
        if i % 2000 == 0:
            time.sleep(0.2)
        return float(i)

    df = spark.range(0, 40000, numPartitions=2).withColumn("v", slow("id"))
    killed: list[int] = []

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            rows = pg.execute_admin(
                "SELECT pid FROM pg_stat_activity WHERE usename = 'pipeline_rw' AND query LIKE 'COPY%%_adbx_stage_%%'")
            if rows:
                pg.execute_admin("SELECT pg_terminate_backend(%s)", (rows[0][0],))
                killed.append(rows[0][0])
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    written = aurora_dbx.write_table(df, "features.killed", cluster="analytics")
    t.join()
    assert killed, "the test did not manage to kill a writing backend"
    assert written == 40000
    assert pg.execute_admin("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM features.killed") == [(40000, 40000, 0, 39999)]


def test_identifiers_are_quoted_or_rejected(world, env, spark):
    pg = world.stack.postgres
    pg.execute_admin('CREATE TABLE IF NOT EXISTS public."kunden_ä" (id bigint PRIMARY KEY, "Straße" text, "select" int)')
    pg.execute_admin("""INSERT INTO public."kunden_ä" VALUES (1, 'Hauptstraße', 2) ON CONFLICT DO NOTHING""")
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    df = aurora_dbx.read_table("public.kunden_ä", cluster="analytics", columns=["Straße", "select"])
    assert [tuple(r) for r in df.collect()] == [("Hauptstraße", 2)]
    for bad in ['public."customers"', "public.customers; DROP TABLE public.customers", "public.cust omers", "public.a.b"]:
        with pytest.raises(IdentifierError):
            aurora_dbx.read_table(bad, cluster="analytics")
    with pytest.raises(IdentifierError):
        aurora_dbx.read_table("public.customers", cluster="analytics", columns=['name" FROM secret.salaries --'])
    for where in ["1=1; DROP TABLE public.customers", "1=1) UNION SELECT 1 --", "name = $$x$$"]:
        with pytest.raises(SqlFragmentError):
            aurora_dbx.read_table("public.customers", cluster="analytics", where=where)
    assert pg.execute_admin("SELECT count(*) FROM public.customers")[0][0] >= 2


def test_connections_are_tagged_with_principal_and_project(world, env, spark):
    env(ANALYST)
    with aurora_dbx.connect(cluster="analytics") as conn, conn.cursor() as cur:
        cur.execute("SHOW application_name")
        name = cur.fetchone()[0]
    assert "project=churn-model" in name and f"principal={ANALYST}" in name


def test_jdbc_method_reads_both_engines(world, env, spark):
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    pg = aurora_dbx.read_table("public.customers", cluster="analytics", method="jdbc")
    assert sorted(r["id"] for r in pg.collect())[:2] == [1, 2]
    my = aurora_dbx.read_table(f"{world.stack.mysql.database}.orders", cluster="orders", method="jdbc")
    assert sorted(r["id"] for r in my.collect()) == [1, 2]


def test_plan_strings_hold_no_token_or_capability(world, env, spark, capsys):
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    df = aurora_dbx.read_table("public.customers", cluster="analytics")
    df.explain(True)
    plan = capsys.readouterr().out + df._jdf.queryExecution().toString()
    assert "X-Amz" not in plan and "capability" not in plan and "spec" not in plan.lower().split("==")[0]


def test_unknown_column_or_table_is_one_clear_error(world, env, spark):
    env(ANALYST)
    aurora_dbx.configure(spark=spark)
    with pytest.raises(SchemaMismatch, match='column "nope" does not exist'):
        aurora_dbx.read_table("public.customers", cluster="analytics", columns=["id", "nope"])
    with pytest.raises(SchemaMismatch, match="does not exist"):
        aurora_dbx.read_table("public.no_such_table", cluster="analytics")


def test_mysql_concurrent_partitions_do_not_deadlock(world, env, spark):
    """Two tasks staging at once under MySQL's default REPEATABLE READ used to deadlock."""
    my = world.stack.mysql
    db = my.database
    assert my.execute_admin("SELECT @@global.tx_isolation")[0][0] == "REPEATABLE-READ"
    my.execute_admin(f"DROP TABLE IF EXISTS `{db}`.`bulk`")
    my.execute_admin(f"CREATE TABLE `{db}`.`bulk` (id BIGINT PRIMARY KEY, v DOUBLE, label VARCHAR(40))")
    as_sp(env, spark)
    from pyspark.sql import functions as F

    @F.udf("double")
    def half(i):
        if i % 30000 == 0:  # first row of each partition: both tasks have cleared their partition by now
            time.sleep(1.5)
        return i * 0.5

    df = spark.range(0, 60000, numPartitions=2).select("id", half("id").alias("v"), F.concat(F.lit("row-"), "id").alias("label"))
    assert aurora_dbx.write_table(df, f"{db}.bulk", cluster="orders") == 60000
    assert aurora_dbx.write_table(df, f"{db}.bulk", cluster="orders", mode="upsert", key=["id"]) == 60000
    assert my.execute_admin(f"SELECT count(*), count(DISTINCT id), sum(v) FROM `{db}`.`bulk`") == [(60000, 60000, 899985000.0)]
