"""Benchmark aurora_dbx reads, writes and the handshake against raw Spark JDBC and COPY.

One process stands up the embedded local stack (PostgreSQL + MariaDB with Aurora-style IAM
token auth, moto STS behind a recording proxy, a fake workspace API), seeds a mixed-type
table on both engines, starts local Spark (``local[2]``), and measures every variant side
by side: each repeat runs all variants of a group in turn (A, B, C, A, B, C, ...), and the
report gives medians and ratios of those interleaved runs, never a single absolute number.

    .venv/bin/python -m bench.run --rows 2000000 --repeats 3

writes ``bench/RESULTS.md`` (and ``bench/results.json``) from the measurements. Must run
as root (the local stack configures PAM). See ``bench/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
SP = "0b3e7c9a-5eed-4000-8000-000000000001"
SP_TOKEN = "dapi-bench-pipeline"  # noqa: S105 - the fake workspace's bearer token
PG_SCHEMA = "bench"
SRC, DST = "wide", "wide_w"
COLS = ["id", "qty", "amount", "score", "label", "day", "ts", "flag"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# -- memory -------------------------------------------------------------------------------


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


HZ = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process's CPU plus that of its reaped children."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2 :].split()
        return sum(int(x) for x in fields[11:15])
    except (OSError, IndexError, ValueError):
        return 0


def _tree(roots: list[int], exclude: set[int] | None = None) -> list[int]:
    kids = _ppid_map()
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if exclude and p in exclude:
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _is_jvm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip() == b"java"
    except OSError:
        return False


class MemorySampler:
    """Peak of the summed memory of this process and its descendants (the Spark JVM, the
    PySpark daemons and Python workers, forked limit streams), excluding the local stack's
    servers (they stand in for Aurora).

    The JVM is counted by RSS (``/proc/<pid>/statm``, read every ``interval`` s: nothing
    shares its pages). Python processes are counted by PSS (``/proc/<pid>/smaps_rollup``,
    read every ``pss_every`` ticks since it costs milliseconds): forked workers share pages
    with their parent, which RSS would count twice. The process tree is re-read every 0.5 s.
    """

    def __init__(self, exclude: set[int], interval: float = 0.05, pss_every: int = 4):
        self.exclude = exclude
        self.interval = interval
        self.pss_every = pss_every
        self._pids: list[tuple[int, bool]] = []
        self._pss: dict[int, int] = {}
        self._tree_at = 0.0
        self._tick = 0
        self._lock = threading.Lock()
        self.peak = 0
        self.start_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pids(self) -> list[tuple[int, bool]]:
        now = time.monotonic()
        if now - self._tree_at > 0.5:
            kids = _ppid_map()
            out, todo = [], [os.getpid()]
            while todo:
                p = todo.pop()
                if p in self.exclude:
                    continue
                out.append((p, _is_jvm(p)))
                todo.extend(kids.get(p, []))
            self._pids, self._tree_at = out, now
        return self._pids

    def total(self, full: bool = True) -> int:
        self._tick += 1
        refresh = full or self._tick % self.pss_every == 0
        total = 0
        for pid, jvm in self.pids():
            if jvm:
                total += _rss_bytes(pid)
                continue
            if refresh or pid not in self._pss:
                self._pss[pid] = _pss_bytes(pid)
            total += self._pss[pid]
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t = self.total(full=False)
            with self._lock:
                self.peak = max(self.peak, t)

    @contextmanager
    def measure(self) -> Any:
        self._tree_at = 0.0
        self._pss.clear()
        self.start_rss = self.peak = self.total()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.total())


# -- results ------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_mb: float
    delta_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variant:
    key: str
    label: str
    fn: Callable[[], dict[str, Any] | None]
    before: Callable[[], None] | None = None
    runs: list[Run] = field(default_factory=list)
    failed: str | None = None

    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def peak(self) -> float:
        return statistics.median(r.peak_mb for r in self.runs)

    def delta(self) -> float:
        return statistics.median(r.delta_mb for r in self.runs)

    def cpu(self) -> str:
        """Median CPU seconds, client / database server ('–' for runs measured without)."""
        c = [r.extra["cpu_client"] for r in self.runs if "cpu_client" in r.extra]
        d = [r.extra["cpu_server"] for r in self.runs if "cpu_server" in r.extra]
        if not c:
            return "–"
        return f"{statistics.median(c):.1f} / {statistics.median(d):.1f}"


# -- the bench ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rows: int = args.rows
        self.tmp = Path(tempfile.gettempdir())  # a private directory once start() runs
        self.stack: Any = None
        self.sts: Any = None
        self.spark: Any = None
        self.ctx: Any = None
        self.sampler: MemorySampler | None = None
        self.groups: dict[str, list[Variant]] = {}
        self.handshake: dict[str, Any] = {}
        self.sts_calls: dict[str, Any] = {}
        self.facts: dict[str, Any] = {}
        self.notes: list[str] = []
        self.write_df: Any = None
        self.pg_csv: bytes = b""
        self.my_tsv = Path("/dev/shm") / f"aurora-dbx-bench-{os.getpid()}.tsv"  # noqa: S108 - read by the server too

    # ---------------------------------------------------------------- set-up
    def start(self) -> None:
        import yaml

        from aurora_dbx.local_stack import LocalStack
        from tests.support.sts_proxy import StsProxy

        self.tmp = Path(tempfile.mkdtemp(prefix="aurora-dbx-bench-"))
        t = time.perf_counter()
        self.stack = LocalStack(engines=("postgresql", "mysql")).start()
        stack = self.stack
        log(f"stack up in {time.perf_counter() - t:.1f} s ({stack.dir})")
        self.roles = {n: stack.create_role(f"bench-{n}") for n in ("pg-read", "pg-write", "my-read", "my-write")}
        self.sts = StsProxy(stack.sts_endpoint)
        pg, my = stack.postgres, stack.mysql
        self.my_db = my.database
        ca = str(stack.ca_bundle)
        policy = {
            "version": 1, "project": "bench",
            "clusters": {
                "analytics": {"engine": "postgresql", "host": pg.host, "port": pg.port, "database": pg.database,
                              "region": "us-east-1", "resource_id": "cluster-BENCHPG000001", "tls": "verify-full",
                              "ca_bundle": ca},
                "orders": {"engine": "mysql", "host": my.host, "port": my.port, "database": my.database,
                           "region": "us-east-1", "resource_id": "cluster-BENCHMY000001", "tls": "verify-full",
                           "ca_bundle": ca},
            },
            "roles": {
                "pg-read": {"cluster": "analytics", "iam_role_arn": self.roles["pg-read"], "db_user": "bench_ro",
                            "access": "read", "tables": [f"{PG_SCHEMA}.*"]},
                "pg-write": {"cluster": "analytics", "iam_role_arn": self.roles["pg-write"], "db_user": "bench_rw",
                             "access": "write", "tables": [f"{PG_SCHEMA}.*"]},
                "my-read": {"cluster": "orders", "iam_role_arn": self.roles["my-read"], "db_user": "bench_ro",
                            "access": "read", "tables": [f"{my.database}.*"]},
                "my-write": {"cluster": "orders", "iam_role_arn": self.roles["my-write"], "db_user": "bench_rw",
                             "access": "write", "tables": [f"{my.database}.*"]},
            },
            "bindings": [{"service_principal": SP, "roles": ["pg-read", "pg-write", "my-read", "my-write"]}],
            "audit": {"sink": "log"},
        }
        self.policy_path = self.tmp / "policy.yaml"
        self.policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        self._grants()
        self._seed()
        stack.add_databricks_principal(SP_TOKEN, user_name=SP, kind="service_principal", display_name="bench")
        os.environ.update(stack.environ())
        os.environ["AWS_ENDPOINT_URL_STS"] = self.sts.url
        os.environ["DATABRICKS_TOKEN"] = SP_TOKEN
        os.environ["AURORA_DBX_POLICY"] = str(self.policy_path)
        os.environ["HOME"] = str(self.tmp)  # no ~/.databrickscfg or ~/.aws of the machine
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        self._spark()
        import aurora_dbx

        self.ctx = aurora_dbx.configure(spark=self.spark)
        self.sampler = MemorySampler(exclude=set(stack.pids()))

    def _grants(self) -> None:
        pg, my = self.stack.postgres, self.stack.mysql
        for user in ("bench_ro", "bench_rw"):
            pg.create_iam_user(user)
            my.create_iam_user(user)
        pg.execute_admin(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}")
        pg.execute_admin(f"GRANT USAGE ON SCHEMA {PG_SCHEMA} TO bench_ro, bench_rw")
        pg.execute_admin(f"GRANT CREATE ON SCHEMA {PG_SCHEMA} TO bench_rw")
        pg.execute_admin(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {PG_SCHEMA} GRANT SELECT ON TABLES TO bench_ro")
        pg.execute_admin(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {PG_SCHEMA} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO bench_rw")
        my.execute_admin(f"GRANT SELECT ON `{my.database}`.* TO 'bench_ro'@'%'")
        my.execute_admin(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP ON `{my.database}`.* TO 'bench_rw'@'%'")
        self.stack.allow(self.roles["pg-read"], "bench_ro", "postgresql")
        self.stack.allow(self.roles["pg-write"], "bench_rw", "postgresql")
        self.stack.allow(self.roles["my-read"], "bench_ro", "mysql")
        self.stack.allow(self.roles["my-write"], "bench_rw", "mysql")
        # The stack's MariaDB is sized for tests (32 MB buffer pool, 8 MB redo log); Aurora's
        # are sized to the instance. Give InnoDB room for the bench tables (both are dynamic).
        settings = [f"SET GLOBAL innodb_buffer_pool_size = {self.args.mariadb_buffer_pool_mb << 20}",
                    "SET GLOBAL innodb_log_file_size = 512 * 1024 * 1024"]
        if self.args.mariadb_isolation:
            settings.append(f"SET GLOBAL tx_isolation = '{self.args.mariadb_isolation}'")
            self.notes.append(f"MariaDB ran with `tx_isolation = {self.args.mariadb_isolation}` "
                              "(`--mariadb-isolation`; the server default is REPEATABLE-READ).")
        for stmt in settings:
            try:
                my.execute_admin(stmt)
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"MariaDB: `{stmt}` failed ({e})")
        time.sleep(1)
        self.facts["mariadb_settings"] = dict(my.execute_admin(
            "SELECT variable_name, variable_value FROM information_schema.global_variables WHERE variable_name IN "
            "('INNODB_BUFFER_POOL_SIZE', 'INNODB_LOG_FILE_SIZE', 'INNODB_FLUSH_LOG_AT_TRX_COMMIT', 'INNODB_FLUSH_METHOD', "
            "'TX_ISOLATION')"))
        self.facts["postgres_settings"] = dict(pg.execute_admin(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN "
            "('shared_buffers', 'fsync', 'synchronous_commit', 'max_wal_size', 'work_mem')"))

    def _seed(self) -> None:
        """The same rows on both engines, from deterministic SQL (no random())."""
        n = self.rows
        pg, my = self.stack.postgres, self.stack.mysql
        t = time.perf_counter()
        cols = """(id bigint PRIMARY KEY, qty integer NOT NULL, amount numeric(12,2), score double precision NOT NULL,
                   label text, day date NOT NULL, ts timestamptz NOT NULL, flag boolean NOT NULL)"""
        pg.execute_admin(f"CREATE TABLE {PG_SCHEMA}.{SRC} {cols}")
        pg.execute_admin(f"CREATE TABLE {PG_SCHEMA}.{DST} {cols}")
        pg.execute_admin(f"""INSERT INTO {PG_SCHEMA}.{SRC}
            SELECT g, (g * 7919) % 100000,
                   CASE WHEN g % 50 = 0 THEN NULL ELSE ((g * 104729) % 10000000) / 100.0 END,
                   (((g * 15485863) % 1000003) / 7.0)::double precision,
                   CASE WHEN g % 97 = 0 THEN NULL ELSE 'cust-' || left(md5(g::text), 15) END,
                   date '2020-01-01' + (g % 1500)::int,
                   timestamptz '2020-01-01 00:00:00+00' + (g * 37) * interval '1 second' + ((g * 13) % 1000000) * interval '1 microsecond',
                   g % 3 = 0
            FROM generate_series(1::bigint, {n}::bigint) g""")
        pg.execute_admin(f"VACUUM (ANALYZE, FREEZE) {PG_SCHEMA}.{SRC}")  # hint bits set now, not in run 1
        log(f"seeded PostgreSQL {n:,} rows in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        db = my.database
        mcols = """(id BIGINT PRIMARY KEY, qty INT NOT NULL, amount DECIMAL(12,2), score DOUBLE NOT NULL,
                    label VARCHAR(32), day DATE NOT NULL, ts TIMESTAMP(6) NOT NULL, flag BOOLEAN NOT NULL)"""
        my.execute_admin(f"CREATE TABLE `{db}`.`{SRC}` {mcols}")
        my.execute_admin(f"CREATE TABLE `{db}`.`{DST}` {mcols}")
        conn = my.admin_connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SET time_zone = '+00:00'")
                cur.execute(f"""INSERT INTO `{db}`.`{SRC}`
                    SELECT seq, (seq * 7919) % 100000,
                           IF(seq % 50 = 0, NULL, ((seq * 104729) % 10000000) / 100),
                           ((seq * 15485863) % 1000003) / 7e0,
                           IF(seq % 97 = 0, NULL, CONCAT('cust-', LEFT(MD5(seq), 15))),
                           DATE '2020-01-01' + INTERVAL (seq % 1500) DAY,
                           TIMESTAMP '2020-01-01 00:00:00' + INTERVAL (seq * 37 * 1000000 + (seq * 13) % 1000000) MICROSECOND,
                           seq % 3 = 0
                    FROM seq_1_to_{n}""")
                cur.execute(f"ANALYZE TABLE `{db}`.`{SRC}`")
                cur.fetchall()
                # The LOAD DATA limit's input: the same rows in LOAD DATA's default format.
                self.my_tsv.unlink(missing_ok=True)
                cur.execute(f"SELECT {', '.join(COLS)} INTO OUTFILE '{self.my_tsv}' FROM `{db}`.`{SRC}`")
        finally:
            conn.close()
        data = self.my_tsv.read_bytes()
        cut = data.index(b"\n", len(data) // 2) + 1
        self.my_tsv.with_suffix(".1.tsv").write_bytes(data[:cut])
        self.my_tsv.with_suffix(".2.tsv").write_bytes(data[cut:])
        log(f"seeded MariaDB {n:,} rows in {time.perf_counter() - t:.1f} s")
        # The COPY FROM limit's input: the same rows as PostgreSQL CSV, in memory.
        conn = pg.admin_connect()
        try:
            buf = bytearray()
            with conn.cursor() as cur, cur.copy(
                f"COPY {PG_SCHEMA}.{SRC} ({', '.join(COLS)}) TO STDOUT WITH (FORMAT csv)"
            ) as copy:
                for chunk in copy:
                    buf += chunk
            self.pg_csv = bytes(buf)
        finally:
            conn.close()
        self.facts["csv_mb"] = len(self.pg_csv) / 1e6

    def _spark(self) -> None:
        from pyspark.sql import SparkSession

        t = time.perf_counter()
        self.spark = (
            SparkSession.builder.master("local[2]").appName("aurora-dbx-bench")
            .config("spark.jars", ",".join(self.stack.jdbc_jars()))
            .config("spark.driver.memory", self.args.driver_memory)
            .config("spark.ui.enabled", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
        self.spark.sparkContext.setLogLevel("ERROR")
        log(f"Spark up in {time.perf_counter() - t:.1f} s")

    def stop(self) -> None:
        if self.spark is not None:
            self.spark.stop()
        if self.sts is not None:
            self.sts.close()
        if self.stack is not None:
            self.stack.stop()
        for f in (self.my_tsv, self.my_tsv.with_suffix(".1.tsv"), self.my_tsv.with_suffix(".2.tsv")):
            f.unlink(missing_ok=True)
        if self.tmp.name.startswith("aurora-dbx-bench-"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers
    def role(self, name: str) -> Any:
        return self.ctx.policy.roles[name]

    def token(self, role: str) -> str:
        return self.ctx.token_source(self.role(role))(False).value

    def jdbc(self, engine: str, role: str) -> tuple[str, dict[str, str]]:
        """URL and the minimum properties: driver, login, TLS as the library uses it."""
        user = self.role(role).db_user
        ca = str(self.stack.ca_bundle)
        if engine == "pg":
            pg = self.stack.postgres
            return (f"jdbc:postgresql://{pg.host}:{pg.port}/{pg.database}",
                    {"driver": "org.postgresql.Driver", "user": user, "password": self.token(role),
                     "sslmode": "verify-full", "sslrootcert": ca})
        my = self.stack.mysql
        return (f"jdbc:mysql://{my.host}:{my.port}/{my.database}",
                {"driver": "org.mariadb.jdbc.Driver", "user": user, "password": self.token(role),
                 "useSsl": "true", "serverSslCert": ca})

    @staticmethod
    def cluster(engine: str) -> str:
        return "analytics" if engine == "pg" else "orders"

    def table(self, engine: str, name: str) -> str:
        return f"{PG_SCHEMA}.{name}" if engine == "pg" else f"{self.my_db}.{name}"

    def admin(self, engine: str, sql: str) -> list[tuple[Any, ...]]:
        db = self.stack.postgres if engine == "pg" else self.stack.mysql
        return db.execute_admin(sql)

    def count(self, engine: str, name: str) -> int:
        q = f"SELECT count(*) FROM {self.table(engine, name)}"
        return int(self.admin(engine, q)[0][0])

    def truncate(self, engine: str) -> None:
        self.admin(engine, f"TRUNCATE TABLE {self.table(engine, DST)}")
        if engine == "pg":
            self.admin("pg", "CHECKPOINT")

    def quiesce(self) -> None:
        gc.collect()
        try:
            self.spark._jvm.java.lang.System.gc()
        except Exception:  # noqa: BLE001, S110 - best effort before a measurement
            pass
        time.sleep(0.3)

    def cpu(self) -> tuple[int, int]:
        """CPU ticks used so far by the client side (this process and its descendants: the
        JVM, Python workers, forked limit streams) and by the database servers."""
        servers = [p for p in (self.stack.postgres.process.pid, self.stack.mysql.process.pid) if p]
        client = sum(_cpu_ticks(p) for p in _tree([os.getpid()], set(self.stack.pids())))
        server = sum(_cpu_ticks(p) for p in _tree(servers))
        return client, server

    def measure(self, v: Variant) -> Run:
        if v.before is not None:
            v.before()
        self.quiesce()
        assert self.sampler is not None
        c0, s0 = self.cpu()
        with self.sampler.measure() as m:
            t = time.perf_counter()
            extra = v.fn() or {}
            seconds = time.perf_counter() - t
        c1, s1 = self.cpu()
        extra = {**extra, "load1": os.getloadavg()[0], "cpu_client": (c1 - c0) / HZ, "cpu_server": (s1 - s0) / HZ}
        run = Run(seconds, m.peak / 2**20, (m.peak - m.start_rss) / 2**20, extra)
        v.runs.append(run)
        return run

    def interleave(self, group: str, variants: list[Variant], repeats: int,
                   check: Callable[[Variant], None] | None = None) -> None:
        self.groups[group] = variants
        for r in range(repeats):
            for v in variants:
                if v.failed:
                    continue
                try:
                    run = self.measure(v)
                    if check is not None:
                        check(v)
                except Exception as e:  # noqa: BLE001 - record, keep measuring the others
                    first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), "")
                    v.failed = f"{type(e).__name__}: {first[:300]}"
                    v.runs = []
                    self.notes.append(f"`{v.key}` failed in repeat {r + 1} and was dropped: {v.failed}")
                    log(f"{group} #{r + 1} {v.key} FAILED: {v.failed}")
                    continue
                log(f"{group} #{r + 1} {v.key:<22} {run.seconds:8.2f} s  peak {run.peak_mb:7.0f} MB "
                    f"(+{run.delta_mb:.0f})  cpu {run.extra['cpu_client']:.1f} s client, "
                    f"{run.extra['cpu_server']:.1f} s db")

    # ---------------------------------------------------------------- reads
    def read_variants(self) -> list[Variant]:
        import aurora_dbx

        n = self.rows

        def noop(df: Any) -> None:
            df.write.format("noop").mode("overwrite").save()

        def aurora(engine: str) -> Callable[[], None]:
            return lambda: noop(aurora_dbx.read_table(self.table(engine, SRC), cluster=self.cluster(engine)))

        def jdbc_default(engine: str) -> Callable[[], None]:
            def run() -> None:
                url, props = self.jdbc(engine, f"{engine}-read")
                noop(self.spark.read.jdbc(url, self.table(engine, SRC), properties=props))
            return run

        def jdbc_tuned(engine: str) -> Callable[[], None]:
            def run() -> None:
                url, props = self.jdbc(engine, f"{engine}-read")
                noop(self.spark.read.jdbc(url, self.table(engine, SRC), column="id", lowerBound=1, upperBound=n,
                                          numPartitions=2, properties={**props, "fetchsize": "10000"}))
            return run

        return [
            Variant("aurora_pg", "read_table (PostgreSQL)", aurora("pg")),
            Variant("jdbc_default_pg", "Spark JDBC defaults (PostgreSQL)", jdbc_default("pg")),
            Variant("jdbc_tuned_pg", "Spark JDBC tuned (PostgreSQL)", jdbc_tuned("pg")),
            Variant("copy_raw_pg", "COPY TO STDOUT, count bytes, 1 stream", lambda: self.copy_out(1, False)),
            Variant("copy_raw_pg_x2", "COPY TO STDOUT, count bytes, 2 processes", lambda: self.copy_out(2, False)),
            Variant("copy_arrow_pg", "COPY TO STDOUT -> Arrow, 1 stream", lambda: self.copy_out(1, True)),
            Variant("copy_arrow_pg_x2", "COPY TO STDOUT -> Arrow, 2 processes", lambda: self.copy_out(2, True)),
            Variant("aurora_my", "read_table (MariaDB)", aurora("my")),
            Variant("jdbc_default_my", "Spark JDBC defaults (MariaDB)", jdbc_default("my")),
            Variant("jdbc_tuned_my", "Spark JDBC tuned (MariaDB)", jdbc_tuned("my")),
            Variant("pymysql_raw_my", "PyMySQL unbuffered fetch, 1 stream", lambda: self.pymysql_out(1)),
            Variant("pymysql_raw_my_x2", "PyMySQL unbuffered fetch, 2 processes", lambda: self.pymysql_out(2)),
        ]

    def _halves(self, streams: int) -> list[str]:
        if streams == 1:
            return ["true"]
        mid = self.rows // 2
        return [f"id <= {mid}", f"id > {mid}"]

    def pg_kwargs(self, role: str) -> dict[str, Any]:
        """psycopg connection arguments as the library builds them (token minted now)."""
        r = self.role(role)
        pg = self.stack.postgres
        kw = {"host": pg.host, "port": pg.port, "dbname": pg.database, "user": r.db_user,
              "password": self.token(role), "sslmode": "verify-full", "sslrootcert": str(self.stack.ca_bundle)}
        if r.access == "read":
            kw["options"] = "-c default_transaction_read_only=on"
        return kw

    def my_kwargs(self, role: str) -> dict[str, Any]:
        r = self.role(role)
        my = self.stack.mysql
        return {"host": my.host, "port": my.port, "user": r.db_user, "password": self.token(role),
                "database": my.database, "ca": str(self.stack.ca_bundle)}

    def copy_out(self, streams: int, arrow: bool) -> dict[str, Any]:
        """The limit: psycopg COPY of the whole table, counting bytes or parsed into Arrow
        batches; 2 streams run in 2 forked processes (as Spark's 2 Python workers do)."""
        kw = self.pg_kwargs("pg-read")
        select = "id, qty, amount, score, label, day, (ts AT TIME ZONE 'UTC') AS ts, flag"
        jobs = [(kw, f"COPY (SELECT {select} FROM {PG_SCHEMA}.{SRC} WHERE {pred}) TO STDOUT WITH (FORMAT csv, NULL '\\N')",
                 arrow) for pred in self._halves(streams)]
        results = _run_streams(_pg_copy_out, jobs)
        rows = sum(r[0] for r in results)
        if arrow and rows != self.rows:
            raise AssertionError(f"COPY -> Arrow read {rows} rows, expected {self.rows}")
        return {"bytes": sum(r[1] for r in results), "rows": rows}

    def pymysql_out(self, streams: int) -> dict[str, Any]:
        """MariaDB's counterpart of the driver limit: PyMySQL's unbuffered cursor, rows discarded."""
        kw = self.my_kwargs("my-read")
        jobs = [(kw, f"SELECT {', '.join(COLS)} FROM `{self.my_db}`.`{SRC}` WHERE {pred}")
                for pred in self._halves(streams)]
        rows = sum(_run_streams(_my_fetch, jobs))
        if rows != self.rows:
            raise AssertionError(f"PyMySQL read {rows} rows, expected {self.rows}")
        return {"rows": rows}

    def run_reads(self) -> None:
        import aurora_dbx

        # Warm up (JIT, Python workers, drivers) and check every path returns every row.
        for engine in ("pg", "my"):
            got = aurora_dbx.read_table(self.table(engine, SRC), cluster=self.cluster(engine)).count()
            if got != self.rows:
                raise AssertionError(f"read_table({engine}) counted {got} rows, expected {self.rows}")
            url, props = self.jdbc(engine, f"{engine}-read")
            got = self.spark.read.jdbc(url, self.table(engine, SRC), column="id", lowerBound=1, upperBound=self.rows,
                                       numPartitions=2, properties={**props, "fetchsize": "10000"}).count()
            if got != self.rows:
                raise AssertionError(f"Spark JDBC ({engine}) counted {got} rows, expected {self.rows}")
        self.interleave("reads", self.read_variants(), self.args.repeats)

    # ---------------------------------------------------------------- writes
    def write_variants(self) -> list[Variant]:
        import aurora_dbx

        def wt(engine: str, mode: str) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                kw = {"key": ["id"]} if mode == "upsert" else {}
                return {"rows": aurora_dbx.write_table(self.write_df, self.table(engine, DST), mode=mode, cluster=self.cluster(engine), **kw)}
            return run

        def jdbc_default(engine: str) -> Callable[[], None]:
            def run() -> None:
                url, props = self.jdbc(engine, f"{engine}-write")
                self.write_df.write.jdbc(url, self.table(engine, DST), mode="append", properties=props)
            return run

        def trunc(engine: str) -> Callable[[], None]:
            return lambda: self.truncate(engine)

        def prefilled(engine: str) -> Callable[[], None]:
            def check() -> None:  # upsert over a target that already holds every key: N updates
                if self.count(engine, DST) != self.rows:
                    self.truncate(engine)
                    wt(engine, "append")()
                if engine == "pg":
                    self.admin("pg", f"VACUUM {PG_SCHEMA}.{DST}")
                    self.admin("pg", "CHECKPOINT")
            return check

        return [
            Variant("aurora_append_pg", "write_table append (PostgreSQL)", wt("pg", "append"), trunc("pg")),
            Variant("aurora_upsert_pg", "write_table upsert, all keys exist (PostgreSQL)", wt("pg", "upsert"), prefilled("pg")),
            Variant("jdbc_default_pg", "Spark JDBC append defaults (PostgreSQL)", jdbc_default("pg"), trunc("pg")),
            Variant("copy_in_pg", "COPY FROM STDIN, 1 stream", lambda: self.copy_in(1), trunc("pg")),
            Variant("copy_in_pg_x2", "COPY FROM STDIN, 2 processes", lambda: self.copy_in(2), trunc("pg")),
            Variant("aurora_append_my", "write_table append (MariaDB)", wt("my", "append"), trunc("my")),
            Variant("aurora_upsert_my", "write_table upsert, all keys exist (MariaDB)", wt("my", "upsert"), prefilled("my")),
            Variant("jdbc_default_my", "Spark JDBC append defaults (MariaDB)", jdbc_default("my"), trunc("my")),
            Variant("load_data_my", "LOAD DATA LOCAL INFILE, 1 stream", lambda: self.load_data(1), trunc("my")),
            Variant("load_data_my_x2", "LOAD DATA LOCAL INFILE, 2 processes", lambda: self.load_data(2), trunc("my")),
        ]

    def copy_in(self, streams: int) -> dict[str, Any]:
        """The limit: psycopg COPY FROM STDIN of the pre-generated CSV, one transaction per
        stream; 2 streams (the CSV cut in half at a line end) run in 2 forked processes."""
        global _SHARED_CSV
        _SHARED_CSV = self.pg_csv
        n = len(self.pg_csv)
        bounds = [(0, n)] if streams == 1 else [(0, self.pg_csv.index(b"\n", n // 2) + 1), (self.pg_csv.index(b"\n", n // 2) + 1, n)]
        kw = self.pg_kwargs("pg-write")
        sql = f"COPY {PG_SCHEMA}.{DST} ({', '.join(COLS)}) FROM STDIN WITH (FORMAT csv)"
        _run_streams(_pg_copy_in, [(kw, sql, a, b) for a, b in bounds])
        return {}

    def load_data(self, streams: int = 1) -> dict[str, Any]:
        """MariaDB's limit: LOAD DATA LOCAL INFILE over the same TLS login as the library;
        2 streams load the two halves of the file from 2 forked processes."""
        kw = self.my_kwargs("my-write")
        files = [self.my_tsv] if streams == 1 else [self.my_tsv.with_suffix(f".{i}.tsv") for i in (1, 2)]
        _run_streams(_my_load, [(kw, str(f), DST) for f in files])
        return {}

    def run_writes(self) -> None:
        import aurora_dbx

        # The DataFrame to write: the source table, read once and cached in Spark memory.
        self.write_df = aurora_dbx.read_table(self.table("pg", SRC), cluster="analytics").cache()
        if self.write_df.count() != self.rows:
            raise AssertionError("cached write DataFrame has the wrong row count")
        self.facts["write_df_partitions"] = self.write_df.rdd.getNumPartitions()
        variants = self.write_variants()

        def check(v: Variant) -> None:
            engine = "pg" if v.key.endswith(("_pg", "_pg_x2")) else "my"
            got = self.count(engine, DST)
            if got != self.rows:
                raise AssertionError(f"{v.key}: target holds {got} rows, expected {self.rows}")

        self.interleave("writes", variants, self.args.write_repeats or self.args.repeats, check)
        self.write_df.unpersist()

    # ---------------------------------------------------------------- handshake
    def run_handshake(self) -> None:
        import aurora_dbx

        warm_n, cold_n = self.args.handshake_warm, self.args.handshake_cold
        out: dict[str, Any] = {}
        for engine in ("pg", "my"):
            table = self.table(engine, SRC)
            jdbc_ms, warm_ms, cold_ms = [], [], []

            def raw(engine: str = engine, table: str = table) -> float:
                url, props = self.jdbc(engine, f"{engine}-read")  # token minted before the clock starts
                t = time.perf_counter()
                self.spark.read.jdbc(url, table, properties=props)
                return (time.perf_counter() - t) * 1000

            def warm(engine: str = engine, table: str = table) -> float:
                t = time.perf_counter()
                aurora_dbx.read_table(table, cluster=self.cluster(engine))
                return (time.perf_counter() - t) * 1000

            def cold(engine: str = engine, table: str = table) -> float:
                t = time.perf_counter()
                aurora_dbx.configure(spark=self.spark)
                aurora_dbx.read_table(table, cluster=self.cluster(engine))
                return (time.perf_counter() - t) * 1000

            raw(), warm()  # first-call costs of this engine's paths
            for i in range(max(warm_n, cold_n)):
                jdbc_ms.append(raw())
                if i < cold_n:
                    cold_ms.append(cold())  # leaves a fresh context behind: the next warm() uses it
                warm_ms.append(warm())
            jm, wm, cm = (statistics.median(x) for x in (jdbc_ms, warm_ms, cold_ms))
            out[engine] = {"jdbc_ms": jm, "warm_ms": wm, "cold_ms": cm, "warm_over_ms": wm - jm,
                           "cold_over_ms": cm - jm, "n_warm": len(warm_ms), "n_cold": len(cold_ms)}
            log(f"handshake {engine}: jdbc planning {jm:.1f} ms, warm read_table {wm:.1f} ms, cold {cm:.1f} ms")
        self.ctx = aurora_dbx.configure(spark=self.spark)
        self.handshake = out

    def run_sts(self) -> None:
        import aurora_dbx

        n = self.args.sts_reads
        self.ctx = aurora_dbx.configure(spark=self.spark)
        self.sts.reset()
        t = time.perf_counter()
        for i in range(n):
            eng = "pg" if i % 2 == 0 else "my"
            aurora_dbx.read_table(self.table(eng, SRC), cluster=self.cluster(eng))
        elapsed = time.perf_counter() - t
        per_role = {name: len(self.sts.assume_role_calls(arn)) for name, arn in self.roles.items()}
        self.sts_calls = {"reads": n, "per_role": per_role, "total": len(self.sts.assume_role_calls()),
                          "seconds": elapsed}
        log(f"STS AssumeRole calls for {n} read_table() calls (alternating engines): {per_role}")

    # ---------------------------------------------------------------- facts
    def machine(self) -> dict[str, Any]:
        import psycopg
        import pyarrow
        import pymysql
        import pyspark

        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "?")
        mem_kb = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal")), 0)
        mem = f"{mem_kb / 2**20:.1f} GiB"
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
        return {
            "nproc": os.cpu_count(), "cpu": cpu, "mem_total": mem, "kernel": platform.release(),
            "python": platform.python_version(), "spark": pyspark.__version__, "java": java[0] if java else "?",
            "postgresql": self.admin("pg", "SHOW server_version")[0][0],
            "mariadb": self.admin("my", "SELECT VERSION()")[0][0],
            "jdbc_drivers": [_jar_version(j) for j in self.stack.jdbc_jars()],
            "psycopg": psycopg.__version__, "psycopg_impl": psycopg.pq.__impl__, "pymysql": pymysql.__version__,
            "pyarrow": pyarrow.__version__, "load_avg_start": self.facts.get("load_start"),
            "load_avg_end": os.getloadavg(),
        }


def _git(*a: str) -> str:
    try:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _pin_library(ref: str) -> tuple[str, Path]:
    """Export aurora_dbx at ``ref`` and put it first on sys.path and PYTHONPATH (Spark workers
    inherit the driver's environment). Must run before anything imports aurora_dbx."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"bench: --library {ref}: not a commit of {ROOT}")
    if "aurora_dbx" in sys.modules:
        raise SystemExit("bench: aurora_dbx was imported before --library could pin it")
    root = Path(tempfile.mkdtemp(prefix="aurora-dbx-bench-lib-"))
    archive = subprocess.run(["git", "archive", commit, "aurora_dbx"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), os.environ.get("PYTHONPATH", "")) if x)
    # Spark starts its Python workers with `python -m` in the driver's working directory,
    # which goes first on their sys.path: run from the export, not from the checkout.
    os.chdir(root)
    log(f"benchmarking aurora_dbx at {commit[:12]} (exported to {root})")
    return commit, root


def _library_version(pinned: tuple[str, Path] | None = None) -> dict[str, Any]:
    """The commit benchmarked, whether aurora_dbx differs from it, and a hash of its source."""
    import hashlib

    base = pinned[1] if pinned else ROOT
    h = hashlib.sha256()
    for f in sorted((base / "aurora_dbx").rglob("*.py")):
        h.update(f.relative_to(base).as_posix().encode() + b"\0" + f.read_bytes())
    ref = pinned[0] if pinned else "HEAD"
    return {"commit": _git("rev-parse", "--short", ref), "subject": _git("log", "-1", "--format=%s", ref),
            "dirty": False if pinned else bool(_git("status", "--porcelain", "--", "aurora_dbx")),
            "pinned": bool(pinned), "tree_sha256": h.hexdigest()[:16]}


def _jar_version(path: str) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            manifest = z.read("META-INF/MANIFEST.MF").decode(errors="replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return Path(path).name
    fields = dict(ln.split(": ", 1) for ln in manifest.splitlines() if ": " in ln)
    title = fields.get("Bundle-Name") or fields.get("Implementation-Title") or Path(path).stem
    version = fields.get("Bundle-Version") or fields.get("Implementation-Version") or "?"
    return f"{title} {version}"


# -- stream helpers ---------------------------------------------------------------------------


_SHARED_CSV: bytes = b""


def _run_streams(fn: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
    """One job in this process; several in forked processes (no GIL shared), results in order."""
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the child inherits the pre-built arguments and the CSV
    queue = ctx.Queue()
    procs = [ctx.Process(target=_stream_child, args=(fn, i, job, queue), daemon=True) for i, job in enumerate(jobs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            i, ok, value = queue.get(timeout=1800)
            if not ok:
                raise RuntimeError(f"stream {i} failed: {value}")
            results[i] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [results[i] for i in range(len(jobs))]


def _stream_child(fn: Callable[..., Any], i: int, job: tuple[Any, ...], queue: Any) -> None:
    try:
        queue.put((i, True, fn(*job)))
    except BaseException as e:  # noqa: BLE001
        queue.put((i, False, f"{type(e).__name__}: {e}"))


def _pg_copy_out(kw: dict[str, Any], sql: str, arrow: bool) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(**kw) as conn, conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        with cur.copy(sql) as copy:
            return _arrow_rows(copy) if arrow else _count_bytes(copy)


def _pg_copy_in(kw: dict[str, Any], sql: str, start: int, end: int) -> int:
    import psycopg

    data = memoryview(_SHARED_CSV)[start:end]
    with psycopg.connect(**kw) as conn:
        with conn.cursor() as cur, cur.copy(sql) as copy:
            for at in range(0, len(data), 1 << 20):
                copy.write(data[at : at + (1 << 20)])
        conn.commit()
    return end - start


def _my_load(kw: dict[str, Any], path: str, table: str) -> int:
    import ssl

    import pymysql

    kw = dict(kw)
    ctx = ssl.create_default_context(cafile=kw.pop("ca"))
    conn = pymysql.connect(**kw, ssl=ctx, local_infile=True, autocommit=False, charset="utf8mb4")
    try:
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
            cur.execute(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE `{table}` ({', '.join(COLS)})")
            n = cur.rowcount
        conn.commit()
    finally:
        conn.close()
    return n


def _my_fetch(kw: dict[str, Any], sql: str) -> int:
    import ssl

    import pymysql
    import pymysql.cursors

    kw = dict(kw)
    ctx = ssl.create_default_context(cafile=kw.pop("ca"))
    conn = pymysql.connect(**kw, ssl=ctx, autocommit=False, charset="utf8mb4")
    rows = 0
    try:
        with conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(sql)
            while True:
                got = cur.fetchmany(10_000)
                if not got:
                    break
                rows += len(got)
    finally:
        conn.close()
    return rows


def _count_bytes(copy: Any) -> tuple[int, int]:
    n = rows = 0
    for chunk in copy:
        n += len(chunk)
    return rows, n


class _Chunks(io.RawIOBase):
    """COPY chunks (one per row) as a readable stream, regrouped into large reads."""

    def __init__(self, copy: Any):
        self._it = iter(copy)
        self._buf = b""
        self._pos = 0
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._pos >= len(self._buf):
            parts, size = [], 0
            for chunk in self._it:
                parts.append(bytes(chunk))  # keeping psycopg's memoryviews alive is ~3x slower
                size += len(chunk)
                if size >= 1 << 20:
                    break
            if not parts:
                return 0
            self._buf, self._pos = b"".join(parts), 0
            self.nbytes += size
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n


def _arrow_rows(copy: Any) -> tuple[int, int]:
    import pyarrow as pa
    from pyarrow import csv

    types = {"id": pa.int64(), "qty": pa.int32(), "amount": pa.decimal128(12, 2), "score": pa.float64(),
             "label": pa.string(), "day": pa.date32(), "ts": pa.timestamp("us"), "flag": pa.bool_()}
    src = _Chunks(copy)
    stream = io.BufferedReader(src, buffer_size=1 << 20)
    reader = csv.open_csv(
        stream,
        read_options=csv.ReadOptions(column_names=COLS, block_size=4 << 20, use_threads=False),
        parse_options=csv.ParseOptions(newlines_in_values=True),
        convert_options=csv.ConvertOptions(column_types=types, null_values=["\\N"], strings_can_be_null=True,
                                           quoted_strings_can_be_null=False, true_values=["t"], false_values=["f"]),
    )
    rows = 0
    for batch in reader:
        rows += batch.num_rows
    return rows, src.nbytes


# -- the report --------------------------------------------------------------------------------


def _paired(a: Variant, bases: list[Variant]) -> float | None:
    """Median over repeats of a's time / the best baseline time of the same repeat."""
    bases = [b for b in bases if b.runs]
    if not a.runs or not bases:
        return None
    n = min(len(a.runs), *(len(b.runs) for b in bases))
    return statistics.median(a.runs[i].seconds / min(b.runs[i].seconds for b in bases) for i in range(n))


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def report(b: Bench, command: str, started: datetime, elapsed: float) -> str:
    m = b.facts["machine"]
    rows = b.rows
    L: list[str] = []
    L += [
        "# aurora_dbx benchmark results",
        "",
        "Generated by `bench/run.py` from its own measurements (do not edit by hand; re-run to refresh).",
        "",
        f"- **date**: {started.strftime('%Y-%m-%d %H:%M UTC')} (whole run {elapsed / 60:.1f} min)",
        f"- **command**: `{command}`",
        f"- **aurora_dbx**: {_lib(b.facts)}",
        f"- **data**: {rows:,} rows of `(id bigint PK, qty int, amount numeric(12,2), score double, "
        f"label text ~20 chars, day date, ts timestamptz, flag boolean)`, ~2% NULL amounts, ~1% NULL labels; "
        f"{b.facts.get('csv_mb', 0):.0f} MB as PostgreSQL CSV. MariaDB: the same rows as "
        "`BIGINT, INT, DECIMAL(12,2), DOUBLE, VARCHAR(32), DATE, TIMESTAMP(6), BOOLEAN`.",
        f"- **repeats**: reads {len(next(iter(b.groups.get('reads', [])), Variant('', '', lambda: None)).runs)}, "
        f"writes {len(next(iter(b.groups.get('writes', [])), Variant('', '', lambda: None)).runs)}, interleaved "
        "(every variant of a group once per repeat, in turn); tables show medians; ratios are the median of the "
        "per-repeat ratios (each run divided by its own repeat's baseline).",
        "",
        "## Machine",
        "",
        "| | |", "|---|---|",
        f"| cores (`nproc`) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| RAM | {m['mem_total']} |",
        f"| kernel | {m['kernel']} |",
        f"| load average at start / end | {_load(m['load_avg_start'])} / {_load(m['load_avg_end'])} (the machine is shared) |",
        f"| Python | {m['python']} |",
        f"| Spark | {m['spark']} (`local[2]`, driver memory {b.args.driver_memory}), {m['java']} |",
        f"| PostgreSQL | {m['postgresql']} (local stack: {_kv(b.facts.get('postgres_settings', {}))}) |",
        f"| MariaDB | {m['mariadb']} (local stack; the bench sets the buffer pool and redo log sizes; in effect: "
        f"{_kv(b.facts.get('mariadb_settings', {}))}) |",
        f"| JDBC drivers | {', '.join(m['jdbc_drivers'])} |",
        f"| Python drivers | psycopg {m['psycopg']} ({m['psycopg_impl']} libpq wrapper), PyMySQL {m['pymysql']}, pyarrow {m['pyarrow']} |",
        "",
        "All database connections (library, Spark JDBC and the COPY/LOAD DATA limits) log in the same way: "
        "an IAM token as the password, over TLS with `verify-full`, on loopback.",
        "",
    ]
    if "reads" in b.groups:
        v = {x.key: x for x in b.groups["reads"]}
        pg_limit = [v["copy_raw_pg"], v["copy_raw_pg_x2"]]
        pg_parse = [v["copy_arrow_pg"], v["copy_arrow_pg_x2"]]
        my_limit = [v["pymysql_raw_my"], v["pymysql_raw_my_x2"]]
        L += [
            f"## Reads ({rows:,} rows, fully materialised)",
            "",
            "Spark variants run `df.write.format(\"noop\").mode(\"overwrite\").save()`; the time includes building "
            "the DataFrame (`read_table()` or `spark.read.jdbc()`). The limits log in like the library (IAM "
            "token, TLS `verify-full`): `COPY (SELECT ...) TO STDOUT (FORMAT csv)` through psycopg, counting "
            "bytes (raw) or parsed by pyarrow's streaming CSV reader into record batches with the table's types "
            "(the parse limit). *1 stream* runs in the bench process; *2 processes* split the key range in half "
            "and run in two forked processes (no shared GIL, as Spark's two Python workers). The limit used for "
            "the ratio is the faster of the two in each repeat. MariaDB has no COPY: its limit is PyMySQL's "
            "unbuffered cursor (rows fetched, converted and discarded), the driver `read_table` itself uses.",
            "",
            "| variant | median s | runs s | rows/s | × limit (PG: COPY, MariaDB: PyMySQL) | × COPY→Arrow limit | × JDBC defaults | × JDBC tuned | CPU s client / DB | peak memory MB | Δ memory MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        table_at = len(L) - 2
        for x in b.groups["reads"]:
            if not x.runs:
                L.append(f"| {x.label} | failed | | | | | | | | | |")
                continue
            eng = "pg" if "_pg" in x.key else "my"
            limit, parse = (pg_limit, pg_parse) if eng == "pg" else (my_limit, None)
            L.append(
                f"| {x.label} | {x.median():.2f} | {_runs(x)} | {rows / x.median():,.0f} | {_fmt(_paired(x, limit))} | "
                f"{_fmt(_paired(x, parse)) if parse else '–'} | {_fmt(_paired(x, [v[f'jdbc_default_{eng}']]))} | "
                f"{_fmt(_paired(x, [v[f'jdbc_tuned_{eng}']]))} | {x.cpu()} | {x.peak():.0f} | {x.delta():.0f} |")
        has_cpu = _drop_cpu_column(L, table_at, b.groups["reads"])
        L += ["", "× = time ÷ the baseline's time (above 1: slower than the baseline). " + _load_note(b.groups["reads"])
              + (" " + CPU_NOTE if has_cpu else ""), ""]
    if "writes" in b.groups:
        v = {x.key: x for x in b.groups["writes"]}
        pg_limit = [v["copy_in_pg"], v["copy_in_pg_x2"]]
        L += [
            f"## Writes ({rows:,} rows)",
            "",
            "The DataFrame written is the source table read once and cached in Spark memory "
            f"({b.facts.get('write_df_partitions')} partitions). Append variants start from an empty target "
            "(`TRUNCATE` before each run, not timed); the upsert runs over a target that already holds every key "
            "(so every row is an update). The PostgreSQL limit is `COPY ... FROM STDIN (FORMAT csv)` through "
            "psycopg of the same rows pre-generated as CSV in memory; MariaDB's is `LOAD DATA LOCAL INFILE` of "
            "the same rows (written by `SELECT ... INTO OUTFILE` to `/dev/shm`) over PyMySQL. Both log in like "
            "the library (IAM token, TLS). *2 processes* cut the input in half and load from two forked "
            "processes, each in its own transaction; the limit for the ratio is the faster of 1 and 2 in each "
            "repeat. Spark JDBC runs with its defaults (`batchsize` 1000, one connection per partition) and no "
            "driver tuning properties.",
            "",
            "| variant | median s | runs s | rows/s | × limit (PG: COPY, MariaDB: LOAD DATA) | speed-up over Spark JDBC defaults | CPU s client / DB | peak memory MB | Δ memory MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        table_at = len(L) - 2
        for x in b.groups["writes"]:
            if not x.runs:
                L.append(f"| {x.label} | failed | | | | | | | |")
                continue
            eng = "pg" if "_pg" in x.key else "my"
            limit = pg_limit if eng == "pg" else [v["load_data_my"], v["load_data_my_x2"]]
            jd = v[f"jdbc_default_{eng}"]
            speed = _paired(jd, [x])
            L.append(f"| {x.label} | {x.median():.2f} | {_runs(x)} | {rows / x.median():,.0f} | {_fmt(_paired(x, limit))} | "
                     f"{_fmt(speed, '.1f', '×')} | {x.cpu()} | {x.peak():.0f} | {x.delta():.0f} |")
        has_cpu = _drop_cpu_column(L, table_at, b.groups["writes"])
        L += ["", _load_note(b.groups["writes"]) + (" " + CPU_NOTE if has_cpu else ""), ""]
    if b.handshake:
        L += [
            "## Handshake",
            "",
            "Time from the call to a ready DataFrame (no action). *Raw JDBC planning*: `spark.read.jdbc(url, table, "
            "properties)` with a token already minted (Spark connects once to resolve the schema). *Warm*: "
            "`read_table()` again in the same context (role session and token cached). *Cold*: a fresh context "
            "(`aurora_dbx.configure()`), so identity lookup (SCIM `Me`) + STS AssumeRole + token + first "
            "connection + describe + partition bounds. Runs interleaved raw, cold, warm; medians.",
            "",
            "| engine | raw JDBC planning ms | warm read_table ms | warm overhead ms | cold read_table ms | cold overhead ms | runs (warm / cold) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for eng, h in b.handshake.items():
            L.append(f"| {'PostgreSQL' if eng == 'pg' else 'MariaDB'} | {h['jdbc_ms']:.1f} | {h['warm_ms']:.1f} | "
                     f"{h['warm_over_ms']:+.1f} | {h['cold_ms']:.1f} | {h['cold_over_ms']:+.1f} | {h['n_warm']} / {h['n_cold']} |")
        L.append("")
    if b.sts_calls:
        s = b.sts_calls
        L += [
            "## STS calls",
            "",
            f"{s['reads']} `read_table()` calls in one fresh context, alternating the PostgreSQL and MariaDB tables "
            f"({s['seconds']:.1f} s in all), counted at a recording proxy in front of moto's STS "
            "(`tests/support/sts_proxy.py`):",
            "",
            "| role | AssumeRole calls |", "|---|---:|",
            *[f"| {k} | {n} |" for k, n in s["per_role"].items()],
            f"| **total** | {s['total']} |",
            "",
        ]
    L += _targets(b)
    L += [
        "## How memory is measured",
        "",
        "psutil is not installed; the bench reads `/proc` directly. It sums the memory of the bench process "
        "(the Spark driver's Python side, which also runs the 1-stream limits) and all of its descendants: the "
        "driver JVM, the PySpark daemons and their Python workers, and the forked processes of the 2-process "
        "limits; the local stack's servers (moto, PostgreSQL, MariaDB) are left out (they stand in for "
        "Aurora). The JVM counts by RSS (`/proc/<pid>/statm`, every 50 ms); Python processes count by PSS "
        "(`/proc/<pid>/smaps_rollup`, every 200 ms; it costs milliseconds per read), because forked workers "
        "share pages with their parent and RSS would count those twice. The process tree is re-read every "
        "0.5 s. *peak* is the largest sum seen during the run; *Δ* is that peak minus the sum at the start of "
        "the run. Before each run the bench calls `gc.collect()` and the JVM's `System.gc()` (G1 "
        "returns freed heap to the OS after a full GC); the JVM and the reused Python workers still keep some "
        "memory from earlier runs, so Δ is the clearer per-variant signal and every peak includes a "
        "baseline of about the smallest peak in the table.",
        "",
    ]
    if b.notes:
        L += ["## Notes from the run", "", *[f"- {n}" for n in b.notes], ""]
    analysis = BENCH_DIR / "ANALYSIS.md"
    if analysis.exists():
        L += [analysis.read_text().rstrip(), ""]
    return "\n".join(L)


CPU_NOTE = ("*CPU s*: median CPU seconds (user + system, `/proc/<pid>/stat`, including reaped children) used "
            "during the run by the client side (the bench process and its descendants: JVM, Python workers, "
            "forked limit streams) / by the database servers; less sensitive than wall time to other work "
            "on the machine.")


def _drop_cpu_column(lines: list[str], start: int, variants: list[Variant]) -> bool:
    """Remove the CPU column from the table at lines[start:] if no run measured CPU (older results)."""
    if any("cpu_client" in r.extra for v in variants for r in v.runs):
        return True
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    col = header.index("CPU s client / DB")
    for i in range(start, len(lines)):
        cells = lines[i].strip().strip("|").split("|")
        if len(cells) == len(header):
            del cells[col]
            lines[i] = "|" + "|".join(cells) + "|"
    return False


def _load_note(variants: list[Variant]) -> str:
    loads = [r.extra["load1"] for v in variants for r in v.runs if "load1" in r.extra]
    if not loads:
        return ""
    return (f"The 1-minute load average at the end of each run ranged {min(loads):.1f}–{max(loads):.1f} "
            f"(median {statistics.median(loads):.1f}) on {os.cpu_count()} cores: other work shared the machine.")


def _runs(v: Variant) -> str:
    return " ".join(f"{r.seconds:.2f}" for r in v.runs)


def _lib(facts: dict[str, Any]) -> str:
    lib = facts.get("library_start") or {}
    if not lib:
        return "?"
    dirty = " plus uncommitted changes" if lib.get("dirty") else ""
    how = "pinned with `--library` (exported, first on PYTHONPATH)" if lib.get("pinned") else "the working tree"
    return (f"commit `{lib.get('commit')}` ({lib.get('subject')}){dirty}; {how}; "
            f"source hash `{lib.get('tree_sha256')}`")


def _load(x: Any) -> str:
    return "?" if not x else " ".join(f"{v:.2f}" for v in x)


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k.lower()}={v}" for k, v in d.items())


def _targets(b: Bench) -> list[str]:
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**missed**")

    if "reads" in b.groups:
        v = {x.key: x for x in b.groups["reads"]}
        r = _paired(v["aurora_pg"], [v["copy_raw_pg"], v["copy_raw_pg_x2"]])
        rows.append(("PostgreSQL read within 1.3× of the COPY limit", f"{_fmt(r)}×",
                     verdict(r is not None and r <= 1.3) + ("" if r is None or r <= 1.3 else f" by {r / 1.3:.2f}×")))
        r2 = _paired(v["aurora_pg"], [v["copy_arrow_pg"], v["copy_arrow_pg_x2"]])
        rows.append(("(PostgreSQL read vs the COPY→Arrow parse limit)", f"{_fmt(r2)}×", "for reference"))
        r = _paired(v["aurora_my"], [v["pymysql_raw_my"], v["pymysql_raw_my_x2"]])
        rows.append(("MariaDB read within 1.3× of its limit (PyMySQL fetch)", f"{_fmt(r)}×",
                     verdict(r is not None and r <= 1.3) + ("" if r is None or r <= 1.3 else f" by {r / 1.3:.2f}×")))
    if "writes" in b.groups:
        v = {x.key: x for x in b.groups["writes"]}
        for eng, name, limit in (("pg", "PostgreSQL", [v["copy_in_pg"], v["copy_in_pg_x2"]]),
                                 ("my", "MariaDB", [v["load_data_my"], v["load_data_my_x2"]])):
            best = _paired(v[f"jdbc_default_{eng}"], limit)
            rows.append((f"({name}: the {'COPY' if eng == 'pg' else 'LOAD DATA'} limit itself vs Spark JDBC defaults)",
                         f"{_fmt(best, '.1f')}×", "for reference: the most any client could reach here"))
            for mode in ("append", "upsert"):
                x = v[f"aurora_{mode}_{eng}"]
                s = _paired(v[f"jdbc_default_{eng}"], [x])
                rows.append((f"{name} {mode}: ≥5× faster than Spark JDBC defaults", f"{_fmt(s, '.1f')}×",
                             verdict(s is not None and s >= 5) + ("" if s is None or s >= 5 else f" (reaches {s / 5:.0%} of 5×)")))
                r = _paired(x, limit)
                rows.append((f"{name} {mode}: within 1.5× of the {'COPY' if eng == 'pg' else 'LOAD DATA'} limit",
                             f"{_fmt(r)}×", verdict(r is not None and r <= 1.5) + ("" if r is None or r <= 1.5 else f" by {r / 1.5:.2f}×")))
    for eng, h in b.handshake.items():
        o = h["warm_over_ms"]
        rows.append((f"{'PostgreSQL' if eng == 'pg' else 'MariaDB'} warm handshake < 5 ms over raw JDBC planning",
                     f"{o:+.1f} ms", verdict(o < 5) + ("" if o < 5 else f" by {o - 5:.1f} ms")))
    if b.sts_calls:
        used = {k: n for k, n in b.sts_calls["per_role"].items() if k.endswith("-read")}
        ok = all(n == 1 for n in used.values())
        rows.append(("one STS AssumeRole per role per session", ", ".join(f"{k}: {n}" for k, n in used.items()),
                     verdict(ok)))
    if not rows:
        return []
    return ["## Targets", "", "| target | measured | verdict |", "|---|---:|---|",
            *[f"| {a} | {m} | {c} |" for a, m, c in rows], ""]


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000, help="rows in the bench table (default 2,000,000)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every read/write variant")
    p.add_argument("--write-repeats", type=int, default=0, help="repeats for writes (default: --repeats)")
    p.add_argument("--only", default="reads,writes,handshake,sts",
                   help="comma-separated groups to run: reads, writes, handshake, sts")
    p.add_argument("--handshake-warm", type=int, default=20, help="warm read_table() calls timed per engine")
    p.add_argument("--handshake-cold", type=int, default=5, help="cold (fresh context) read_table() calls per engine")
    p.add_argument("--sts-reads", type=int, default=100, help="read_table() calls for the STS count")
    p.add_argument("--driver-memory", default="4g", help="spark.driver.memory (local mode: the one JVM)")
    p.add_argument("--mariadb-buffer-pool-mb", type=int, default=1024)
    p.add_argument("--mariadb-isolation", default="",
                   help="set MariaDB's global tx_isolation for the run (default: keep the server's REPEATABLE-READ)")
    p.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="where to write the report")
    p.add_argument("--from-json", metavar="RESULTS_JSON",
                   help="only rewrite the report from a finished run's results.json (e.g. after editing ANALYSIS.md)")
    p.add_argument("--library", metavar="GIT_REF",
                   help="benchmark aurora_dbx as committed at GIT_REF (exported to a private directory and put "
                        "first on PYTHONPATH for the driver and the Spark workers), not the working tree: "
                        "pins the code against concurrent edits of a shared checkout")
    args = p.parse_args(argv)
    pinned = _pin_library(args.library) if args.library and not args.from_json else None
    if args.from_json:
        b, command, started, elapsed = _load_run(Path(args.from_json))
        Path(args.out).write_text(report(b, command, started, elapsed) + "\n")
        log(f"rewrote {args.out} from {args.from_json}")
        return 0
    if os.geteuid() != 0:
        print("bench: the local stack must run as root (it configures PAM)", file=sys.stderr)
        return 1
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    command = " ".join([Path(sys.executable).relative_to(ROOT).as_posix() if str(sys.executable).startswith(str(ROOT))
                        else sys.executable, "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])])
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    b = Bench(args)
    b.facts["load_start"] = os.getloadavg()
    b.facts["library_start"] = _library_version(pinned)
    try:
        b.start()
        if "reads" in groups:
            b.run_reads()
        if "writes" in groups:
            b.run_writes()
        if "handshake" in groups:
            b.run_handshake()
        if "sts" in groups:
            b.run_sts()
        b.facts["machine"] = b.machine()
        b.facts["library_end"] = _library_version(pinned)
        if b.facts["library_end"]["tree_sha256"] != b.facts["library_start"]["tree_sha256"]:
            b.notes.append("**aurora_dbx's source changed while the bench ran** (other work on the same "
                           "checkout): Python workers started after the change ran the newer code.")
        elapsed = time.perf_counter() - t0
        text = report(b, command, started, elapsed)
        Path(args.out).write_text(text + "\n")
        raw = {
            "command": command, "started": started.isoformat(), "elapsed": elapsed, "rows": b.rows,
            "args": vars(args), "facts": b.facts,
            "groups": {g: [{"key": v.key, "label": v.label, "failed": v.failed, "runs": [r.__dict__ for r in v.runs]}
                           for v in vs] for g, vs in b.groups.items()},
            "handshake": b.handshake, "sts": b.sts_calls, "notes": b.notes,
        }
        Path(args.out).with_name(Path(args.out).stem.lower() + ".json").write_text(
            json.dumps(raw, indent=1, default=str) + "\n")
        log(f"wrote {args.out} ({elapsed / 60:.1f} min)")
    finally:
        b.stop()
        if pinned is not None:
            shutil.rmtree(pinned[1], ignore_errors=True)
    return 0


def _load_run(path: Path) -> tuple[Bench, str, datetime, float]:
    raw = json.loads(path.read_text())
    b = Bench(argparse.Namespace(**raw["args"]))
    b.facts, b.handshake, b.sts_calls, b.notes = raw["facts"], raw["handshake"], raw["sts"], raw["notes"]
    for g, vs in raw["groups"].items():
        b.groups[g] = [Variant(v["key"], v["label"], lambda: None, runs=[Run(**r) for r in v["runs"]],
                               failed=v["failed"]) for v in vs]
    return b, raw["command"], datetime.fromisoformat(raw["started"]), float(raw["elapsed"])


if __name__ == "__main__":
    sys.exit(main())
