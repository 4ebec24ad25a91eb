"""``read_table`` and ``write_table``: Spark reads and writes whose connections always
get a fresh token.

Reads return a DataFrame over the ``aurora`` Python data source (see
:mod:`aurora_dbx.source`): nothing time-limited is in its plan, every task fetches a
token from the driver's broker when it connects, so the DataFrame keeps working for as
long as the role session can be refreshed. ``method="jdbc"`` uses Spark's built-in JDBC
source instead, with a token minted now: faster to set up for one immediate action, but
valid only while that token is (see docs/SPARK_IO.md).

Writes stage into a private table and publish in one transaction: the target either
receives the whole DataFrame or stays exactly as it was.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict
from datetime import date, datetime
from typing import Any, Literal

from .audit import AuditEvent
from .broker import shared_broker
from .columns import Column, mysql_columns, postgres_columns
from .context import Context, _active_mlflow_run_id, current_context
from .engines import ca_bundle_for, dialect_for
from .errors import AccessDenied, AuroraDbxError, SchemaMismatch
from .identifiers import TableName, check_identifier, parse_table
from .policy import Cluster, Role
from .sqltext import check_fragment

__all__ = ["read_table", "write_table"]

log = logging.getLogger(__name__)

WriteMode = Literal["append", "overwrite", "upsert"]
STAGE_PREFIX = "_adbx_stage_"
STALE_STAGE_SECONDS = 24 * 3600
# Below this many rows a table is read by one task: more would cost more than it saves.
MIN_ROWS_PER_PARTITION = 20_000

_registered: set[int] = set()
_registered_lock = threading.Lock()


def _spark(ctx: Context, spark: Any) -> Any:
    if spark is not None:
        return spark
    if ctx.spark is not None:
        return ctx.spark
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    return active if active is not None else SparkSession.builder.getOrCreate()


def _register(spark: Any) -> None:
    from .source import AuroraDataSource

    with _registered_lock:
        if id(spark) not in _registered:
            spark.dataSource.register(AuroraDataSource)
            _registered.add(id(spark))


def _cluster_spec(cluster: Cluster) -> dict[str, Any]:
    spec = asdict(cluster)
    # Executors see the same CA path (the init script installs it on every node).
    spec["ca_bundle"] = ca_bundle_for(cluster)
    return spec


def _tags(ctx: Context) -> dict[str, str]:
    return ctx.connection_tags(ctx.principal(), {"mlflow_run": _active_mlflow_run_id()})


# -- reads ------------------------------------------------------------------------------


def _describe(conn: Any, cluster: Cluster, select: str, relation: str) -> list[Column]:
    dialect = dialect_for(cluster)
    with conn.cursor() as cur:
        if cluster.engine == "postgresql":
            cur.execute(f"SELECT {select} FROM {relation} WHERE false")  # noqa: S608 - validated pieces
            cols = postgres_columns(cur.description, dialect.quote)
        else:
            cur.execute(f"SELECT {select} FROM {relation} WHERE 1=0")  # noqa: S608
            cols = mysql_columns(cur._result.fields, dialect.quote)
            cur.fetchall()
    conn.rollback()
    names = [c.name for c in cols]
    if len(set(names)) != len(names):
        raise SchemaMismatch(f"the result has duplicate column names ({', '.join(names)}); alias them in the query")
    return cols


def _query_tables(conn: Any, cluster: Cluster, query: str) -> set[TableName]:
    """The base tables a query reads, as the database's planner sees them."""
    tables: set[TableName] = set()
    with conn.cursor() as cur:
        if cluster.engine == "postgresql":
            cur.execute(f"EXPLAIN (FORMAT JSON, VERBOSE) {query}")
            plan = cur.fetchone()[0]

            def walk(node: Any) -> None:
                if isinstance(node, dict):
                    if "Relation Name" in node:
                        tables.add(TableName(node.get("Schema", "public"), node["Relation Name"]))
                    for v in node.values():
                        walk(v)
                elif isinstance(node, list):
                    for v in node:
                        walk(v)

            walk(plan)
        else:
            cur.execute(f"EXPLAIN FORMAT=JSON {query}")
            plan = json.loads(cur.fetchone()[0])

            def walk_my(node: Any) -> None:
                if isinstance(node, dict):
                    if "table_name" in node and not str(node["table_name"]).startswith("<"):
                        tables.add(TableName(node.get("database", cluster.database), node["table_name"]))
                    for v in node.values():
                        walk_my(v)
                elif isinstance(node, list):
                    for v in node:
                        walk_my(v)

            walk_my(plan)
    conn.rollback()
    return tables


def _is_permission_error(e: BaseException) -> bool:
    text = str(e).lower()
    code = e.args[0] if getattr(e, "args", None) else None
    return "permission denied" in text or code in (1142, 1143, 1044)


def _partitioning(
    conn: Any, cluster: Cluster, relation: str, table: TableName | None, where: str | None,
    column: str | None, num_partitions: int | None, parallelism: int,
) -> list[str] | None:
    """Range predicates over a numeric or date column, or None for a single task."""
    dialect = dialect_for(cluster)
    with conn.cursor() as cur:
        if column is None and table is not None:
            column = _primary_key_column(cur, cluster, table)
        if column is None:
            conn.rollback()
            return None
        q = dialect.quote(column)
        cond = f" WHERE {where}" if where else ""
        cur.execute(f"SELECT min({q}), max({q}), count(*) FROM {relation}{cond}")  # noqa: S608
        lo, hi, count = cur.fetchone()
    conn.rollback()
    if lo is None or hi is None:
        return None
    if num_partitions is None:
        num_partitions = max(1, min(parallelism, math.ceil(count / MIN_ROWS_PER_PARTITION)))
    if num_partitions <= 1:
        return None
    if isinstance(lo, datetime) or isinstance(lo, date):
        return _date_ranges(q, lo, hi, num_partitions, cluster.engine)
    if isinstance(lo, int) or (hasattr(lo, "is_integer") and float(lo).is_integer() and float(hi).is_integer()):
        lo_i, hi_i = int(lo), int(hi)
        step = max(1, math.ceil((hi_i - lo_i + 1) / num_partitions))
        bounds = list(range(lo_i + step, hi_i + 1, step))[: num_partitions - 1]
    else:
        step_f = (float(hi) - float(lo)) / num_partitions
        bounds = [repr(float(lo) + step_f * i) for i in range(1, num_partitions)]  # type: ignore[misc]
    return _ranges(q, [str(b) for b in bounds])


def _ranges(q: str, bounds: list[str]) -> list[str]:
    if not bounds:
        return [f"{q} IS NULL OR {q} IS NOT NULL"]
    preds = [f"{q} < {bounds[0]} OR {q} IS NULL"]
    preds += [f"{q} >= {a} AND {q} < {b}" for a, b in zip(bounds, bounds[1:], strict=False)]
    preds.append(f"{q} >= {bounds[-1]}")
    return preds


def _date_ranges(q: str, lo: Any, hi: Any, n: int, engine: str) -> list[str]:
    as_dt = lambda v: v if isinstance(v, datetime) else datetime(v.year, v.month, v.day)  # noqa: E731
    start, end = as_dt(lo), as_dt(hi)
    step = (end - start) / n
    bounds = sorted({start + step * i for i in range(1, n)})
    if isinstance(lo, datetime):
        lit = (lambda d: f"TIMESTAMP '{d.isoformat(sep=' ')}'") if engine == "mysql" or lo.tzinfo is None else (lambda d: f"TIMESTAMPTZ '{d.isoformat(sep=' ')}'")
    else:
        lit = lambda d: f"DATE '{d.date().isoformat()}'"  # noqa: E731
    literals = sorted({lit(b) for b in bounds})
    return _ranges(q, literals)


def _primary_key_column(cur: Any, cluster: Cluster, table: TableName) -> str | None:
    """The single-column primary key if it is numeric or temporal."""
    if cluster.engine == "postgresql":
        cur.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
               WHERE i.indrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass AND i.indisprimary""",
            (table.schema, table.table),
        )
    else:
        cur.execute(
            """SELECT column_name, data_type FROM information_schema.key_column_usage k
               JOIN information_schema.columns c USING (table_schema, table_name, column_name)
               WHERE k.table_schema = %s AND k.table_name = %s AND k.constraint_name = 'PRIMARY'""",
            (table.schema, table.table),
        )
    rows = cur.fetchall()
    if len(rows) != 1:
        return None
    name, type_name = rows[0]
    numeric = ("int", "numeric", "decimal", "date", "timestamp", "datetime", "serial")
    return str(name) if any(t in str(type_name).lower() for t in numeric) else None


def read_table(
    table: str,
    *,
    cluster: str | None = None,
    role: str | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    query: str | None = None,
    spark: Any = None,
    **options: Any,
) -> Any:
    """Read an Aurora table (or a query) as a Spark DataFrame.

    ``table`` is ``schema.table`` (for MySQL the schema is the database). ``columns`` and
    ``where`` are pushed into the database; ``query`` replaces the table with a SELECT
    whose every base table must be in the chosen role's scope. Without ``role`` the
    least-privileged bound role that allows reading ``table`` is used.

    Options: ``partition_column`` (numeric or date column to split on; default: a
    single-column numeric/date primary key), ``num_partitions`` (default: the cluster's
    parallelism, fewer for small tables), ``fetch_size`` (MySQL rows per batch),
    ``method`` (``"source"``, the default, or ``"jdbc"``).
    """
    ctx = current_context()
    known = {"partition_column", "num_partitions", "fetch_size", "method"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"read_table() got unknown options {sorted(unknown)}; known: {sorted(known)}")
    name = parse_table(table)
    principal, chosen, target = ctx.decide(name, "read", cluster=cluster, role=role)
    dialect = dialect_for(target)
    select = ", ".join(dialect.quote(check_identifier(c, "column")) for c in columns) if columns else "*"
    if where is not None:
        where = check_fragment(where, target.engine, "where")
    if query is not None:
        query = check_fragment(query, target.engine, "query")
    relation = f"({query}) AS adbx_q" if query else name.quoted(target.engine)
    spark = _spark(ctx, spark)
    method = options.get("method", "source")
    if method not in ("source", "jdbc"):
        raise ValueError("method must be 'source' or 'jdbc'")

    started = time.perf_counter()
    conn = ctx.open(chosen, read_only=True)
    try:
        tables_read = {name}
        if query:
            try:
                tables_read = _query_tables(conn, target, query)
            except Exception as e:
                if not _is_permission_error(e):
                    raise
                err = AccessDenied(
                    f"the database refused the query for {chosen.db_user} (role {chosen.name}): "
                    f"{str(e).strip().splitlines()[0]}"
                )
                ctx.audit(AuditEvent(event="denied", outcome="denied", principal=principal.name,
                                     principal_type=principal.kind, role_arn=chosen.iam_role_arn,
                                     role=chosen.name, db_user=chosen.db_user, cluster=target.name,
                                     table=str(name), reason=str(err), project=ctx.policy.project))
                raise err from None
            outside = sorted(str(t) for t in tables_read if not chosen.allows(t, "read"))
            if outside:
                err = AccessDenied(
                    f"{principal} may not read {', '.join(outside)} through role {chosen.name} "
                    f"(covers {', '.join(p.text for p in chosen.tables)}); the query was not run"
                )
                ctx.audit(AuditEvent(event="denied", outcome="denied", principal=principal.name,
                                     principal_type=principal.kind, role_arn=chosen.iam_role_arn,
                                     role=chosen.name, db_user=chosen.db_user, cluster=target.name,
                                     table=",".join(outside), reason=str(err), project=ctx.policy.project))
                raise err
        cols = _describe(conn, target, select, relation)
        num = options.get("num_partitions")
        if num is not None and (not isinstance(num, int) or num < 1):
            raise ValueError("num_partitions must be a positive integer")
        part_col = options.get("partition_column")
        if part_col is not None:
            check_identifier(part_col, "partition_column")
        predicates = _partitioning(
            conn, target, relation, None if query else name, where, part_col, num,
            spark.sparkContext.defaultParallelism,
        )
    finally:
        conn.close()

    if method == "jdbc":
        df = _jdbc_read(ctx, spark, chosen, target, cols, relation, where, predicates)
    else:
        broker = shared_broker(spark)
        capability = broker.grant(ctx.token_source(chosen), f"{principal} as {chosen.name}")
        spec = {
            "cluster": _cluster_spec(target), "db_user": chosen.db_user,
            "columns": [asdict(c) for c in cols], "relation": relation, "where": where,
            "predicates": predicates, "fetch_size": options.get("fetch_size"),
            "broker": broker.url, "capability": capability, "tags": _tags(ctx),
        }
        _register(spark)
        ddl = ", ".join(c.ddl() for c in cols)
        df = spark.read.format("aurora").schema(ddl).option("spec", json.dumps(spec)).load()
    _after_access(ctx, chosen, target, "read", sorted(str(t) for t in tables_read), query=query,
                  schema=df.schema, elapsed=time.perf_counter() - started)
    return df


def _jdbc_read(ctx: Context, spark: Any, role: Role, cluster: Cluster, cols: list[Column],
               relation: str, where: str | None, predicates: list[str] | None) -> Any:
    """Spark's JDBC source with a token minted now: valid for actions in the next ~10 min."""
    token = ctx.token_source(role)(False)
    url, props = jdbc_options(cluster, role.db_user, token.value, read_only=True, tags=_tags(ctx))
    select = ", ".join(c.select + (f" AS {dialect_for(cluster).quote(c.name)}" if c.select != dialect_for(cluster).quote(c.name) else "") for c in cols)
    base = f"(SELECT {select} FROM {relation}{' WHERE ' + where if where else ''}) adbx_j"
    if predicates:
        return spark.read.jdbc(url, base, predicates=predicates, properties=props)
    return spark.read.jdbc(url, base, properties=props)


def jdbc_options(cluster: Cluster, user: str, token: str, *, read_only: bool, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """JDBC URL and properties for Spark's built-in source (PostgreSQL or MariaDB driver)."""
    from .engines import connection_label

    ca = ca_bundle_for(cluster)
    if cluster.engine == "postgresql":
        url = f"jdbc:postgresql://{cluster.host}:{cluster.port}/{cluster.database}"
        props = {"driver": "org.postgresql.Driver", "user": user, "password": token,
                 "ApplicationName": connection_label(tags, 63), "reWriteBatchedInserts": "true",
                 "sslmode": "disable" if cluster.tls == "disable" else cluster.tls, "fetchsize": "10000"}
        if ca and cluster.tls != "disable":
            props["sslrootcert"] = ca
        if read_only:
            props["readOnly"] = "true"
            props["options"] = "-c default_transaction_read_only=on"
    else:
        # jdbc:mysql: (accepted by the MariaDB driver) makes Spark pick its MySQL dialect,
        # which quotes identifiers with backticks.
        url = f"jdbc:mysql://{cluster.host}:{cluster.port}/{cluster.database}"
        props = {"driver": "org.mariadb.jdbc.Driver", "user": user, "password": token,
                 "rewriteBatchedStatements": "true", "useBulkStmts": "true", "fetchsize": "10000",
                 "connectionAttributes": ",".join(f"{k}:{v}" for k, v in tags.items())[:1000]}
        if cluster.tls != "disable":
            props["useSsl"] = "true"
            if ca:
                props["serverSslCert"] = ca
            if cluster.tls == "require":
                props["trustServerCertificate"] = "true"
    return url, props


def _after_access(ctx: Context, role: Role, cluster: Cluster, kind: str, tables: list[str], *,
                  query: str | None = None, schema: Any = None, rows: int | None = None,
                  mode: str | None = None, elapsed: float | None = None) -> None:
    p = ctx.principal()
    creds = ctx.credentials(role)
    for t in tables:
        ctx.audit(AuditEvent(
            event=kind, outcome="ok", principal=p.name, principal_type=p.kind,
            role_arn=role.iam_role_arn, role=role.name, db_user=role.db_user, cluster=cluster.name,
            table=t, project=ctx.policy.project, session_name=creds.session_name,
            source_identity=creds.source_identity, credential_expires_at=creds.expires_at.isoformat(),
            rows=rows, mode=mode, job_id=p.job_id, run_id=p.run_id, mlflow_run_id=_active_mlflow_run_id(),
        ))
    try:
        from . import lineage
    except ImportError:
        return
    for t in tables or [None]:  # type: ignore[list-item]
        lineage.record(lineage.Access(
            principal=p, role=role, cluster=cluster, kind=kind, table=t, query=query,  # type: ignore[arg-type]
            session_name=creds.session_name, source_identity=creds.source_identity,
            credential_expires_at=creds.expires_at, rows=rows, mode=mode,
            **({"schema": schema} if schema is not None and "schema" in lineage.Access.__dataclass_fields__ else {}),
        ))


# -- writes -----------------------------------------------------------------------------

_FAMILIES = {
    "numeric": ("smallint", "integer", "bigint", "int", "numeric", "decimal", "real", "double", "float",
                "tinyint", "mediumint", "serial", "bigserial", "year"),
    "string": ("char", "text", "varchar", "character", "uuid", "json", "jsonb", "enum", "set", "citext",
               "mediumtext", "longtext", "tinytext"),
    "temporal": ("date", "timestamp", "datetime", "time"),
    "boolean": ("boolean", "bool", "tinyint", "bit"),
    "binary": ("bytea", "blob", "binary", "varbinary", "longblob", "mediumblob", "tinyblob", "bit"),
}


def _spark_family(dtype: Any) -> str:
    name = type(dtype).__name__
    if name in ("ByteType", "ShortType", "IntegerType", "LongType", "FloatType", "DoubleType", "DecimalType"):
        return "numeric"
    if name in ("StringType", "VarcharType", "CharType"):
        return "string"
    if name in ("DateType", "TimestampType", "TimestampNTZType"):
        return "temporal"
    if name == "BooleanType":
        return "boolean"
    if name == "BinaryType":
        return "binary"
    return "unsupported"


def _target_columns(conn: Any, cluster: Cluster, table: TableName) -> dict[str, tuple[str, bool, bool]]:
    """name -> (data type, nullable, has default or is generated)."""
    with conn.cursor() as cur:
        cur.execute(
            """SELECT column_name, data_type, is_nullable, column_default IS NOT NULL
                      OR COALESCE(is_identity, 'NO') = 'YES' OR COALESCE(is_generated, 'NEVER') <> 'NEVER'
               FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"""
            if cluster.engine == "postgresql" else
            """SELECT column_name, data_type, is_nullable,
                      column_default IS NOT NULL OR extra LIKE '%%auto_increment%%' OR extra LIKE '%%GENERATED%%'
               FROM information_schema.columns WHERE table_schema = %s AND table_name = %s""",
            (table.schema, table.table),
        )
        rows = cur.fetchall()
    conn.rollback()
    return {str(r[0]): (str(r[1]).lower(), r[2] == "YES", bool(r[3])) for r in rows}


def _unique_keys(conn: Any, cluster: Cluster, table: TableName) -> list[set[str]]:
    with conn.cursor() as cur:
        if cluster.engine == "postgresql":
            cur.execute(
                """SELECT array_agg(a.attname::text) FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                   WHERE i.indrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass
                     AND i.indisunique AND i.indpred IS NULL GROUP BY i.indexrelid""",
                (table.schema, table.table),
            )
            keys = [set(r[0]) for r in cur.fetchall()]
        else:
            cur.execute(
                """SELECT index_name, column_name FROM information_schema.statistics
                   WHERE table_schema = %s AND table_name = %s AND non_unique = 0""",
                (table.schema, table.table),
            )
            by: dict[str, set[str]] = {}
            for idx, col in cur.fetchall():
                by.setdefault(idx, set()).add(col)
            keys = list(by.values())
    conn.rollback()
    return keys


def _check_schema(df: Any, target_cols: dict[str, tuple[str, bool, bool]], table: TableName,
                  mode: str, key: Sequence[str] | None, unique: list[set[str]]) -> list[str]:
    if not target_cols:
        raise SchemaMismatch(f"table {table} does not exist or the write role cannot see it; create it first")
    problems = []
    names = [f.name for f in df.schema.fields]
    if len(set(names)) != len(names):
        problems.append("the DataFrame has duplicate column names")
    for f in df.schema.fields:
        if f.name not in target_cols:
            problems.append(f"column {f.name!r} is not in {table} (columns: {', '.join(sorted(target_cols))})")
            continue
        fam = _spark_family(f.dataType)
        db_type = target_cols[f.name][0]
        if fam == "unsupported":
            problems.append(f"column {f.name!r} has Spark type {f.dataType.simpleString()}, which cannot be written")
        elif not any(t in db_type for t in _FAMILIES[fam]):
            problems.append(f"column {f.name!r} is {f.dataType.simpleString()} in the DataFrame but {db_type} in {table}")
    for col, (_, nullable, has_default) in target_cols.items():
        if col not in names and not nullable and not has_default:
            problems.append(f"{table}.{col} is NOT NULL without a default but the DataFrame has no {col!r}")
    if mode == "upsert":
        if not key:
            problems.append("mode='upsert' needs key=[...] (the columns of a unique key)")
        else:
            missing = [k for k in key if k not in names]
            if missing:
                problems.append(f"key columns {missing} are not in the DataFrame")
            elif set(key) not in unique:
                problems.append(f"key {list(key)} is not a primary key or unique index of {table}; upsert needs one")
    elif key:
        problems.append("key=... is only used with mode='upsert'")
    if problems:
        raise SchemaMismatch(f"cannot write to {table}; nothing was written: " + "; ".join(problems))
    for c in names:
        check_identifier(c, "column")
    return names


def _drop_stale_stages(conn: Any, cluster: Cluster, schema: str) -> None:
    """Stage tables older than a day belong to killed jobs: remove them."""
    dialect = dialect_for(cluster)
    now = int(time.time())
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s AND table_name LIKE %s",
            (schema, STAGE_PREFIX.replace("_", "\\_") + "%"),
        )
        names = [r[0] for r in cur.fetchall()]
        for n in names:
            try:
                created = int(n[len(STAGE_PREFIX):].split("_")[0])
            except ValueError:
                continue
            if now - created > STALE_STAGE_SECONDS:
                cur.execute(f"DROP TABLE IF EXISTS {dialect.quote(schema)}.{dialect.quote(n)}")
    conn.commit()


def write_table(
    df: Any,
    table: str,
    *,
    mode: WriteMode = "append",
    key: Sequence[str] | None = None,
    cluster: str | None = None,
    role: str | None = None,
) -> int:
    """Write a DataFrame to an Aurora table: ``append``, ``overwrite`` or ``upsert`` (by ``key``).

    The rows are staged in a private table and published in one transaction: the target
    receives the whole DataFrame or stays exactly as it was, also when tasks are retried
    or the job dies halfway. Schema mismatches fail before anything is written.
    Returns the number of rows written.
    """
    ctx = current_context()
    if mode not in ("append", "overwrite", "upsert"):
        raise ValueError("mode must be 'append', 'overwrite' or 'upsert'")
    name = parse_table(table)
    principal, chosen, target = ctx.decide(name, "write", cluster=cluster, role=role)
    dialect = dialect_for(target)
    spark = _spark(ctx, df.sparkSession)
    started = time.perf_counter()

    conn = ctx.open(chosen, read_only=False)
    stage_name = f"{STAGE_PREFIX}{int(time.time())}_{secrets.token_hex(4)}"
    stage = f"{dialect.quote(name.schema)}.{dialect.quote(stage_name)}"
    created = False
    try:
        target_cols = _target_columns(conn, target, name)
        unique = _unique_keys(conn, target, name) if mode == "upsert" else []
        cols = _check_schema(df, target_cols, name, mode, key, unique)
        _drop_stale_stages(conn, target, name.schema)
        qcols = [dialect.quote(c) for c in cols]
        try:
            _create_stage(conn, target, name, stage, qcols)
        except Exception as e:
            conn.rollback()
            raise AuroraDbxError(
                f"{chosen.db_user} cannot create the stage table in schema {name.schema} "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0]}); write roles need CREATE "
                "on the target schema (`aurora-dbx plan` prints the GRANT); nothing was written"
            ) from None
        created = True

        broker = shared_broker(spark)
        capability = broker.grant(ctx.token_source(chosen), f"{principal} as {chosen.name}")
        spec = {
            "cluster": _cluster_spec(target), "db_user": chosen.db_user, "broker": broker.url,
            "capability": capability, "tags": _tags(ctx), "stage": stage, "stage_columns": qcols,
            "lock_key": zlib.crc32(stage_name.encode()) & 0x7FFFFFFF,
        }
        from .source import write_partition

        try:
            results = df.select(*cols).mapInArrow(
                lambda it, spec=spec: write_partition(spec, it), "part int, rows long"
            ).collect()
        except Exception as e:
            raise _task_error(e, name) from None
        finally:
            broker.revoke(capability)
        staged = sum(r["rows"] for r in results)
        rows = _publish(conn, target, name, stage, qcols, mode, key, staged)
    except BaseException:
        try:
            conn.rollback()
        except Exception:  # noqa: S110 - the connection may be the thing that failed
            pass
        raise
    finally:
        if created:
            _drop_stage(ctx, chosen, stage)
        conn.close()
    _after_access(ctx, chosen, target, "write", [str(name)], rows=rows, mode=mode,
                  elapsed=time.perf_counter() - started)
    return rows


def _create_stage(conn: Any, target: Cluster, name: TableName, stage: str, qcols: list[str]) -> None:
    """An empty private copy of the target's columns plus the writing task's partition id."""
    with conn.cursor() as cur:
        if target.engine == "postgresql":
            # UNLOGGED: staged rows need no WAL; the publish into the target is logged.
            cur.execute(f"CREATE UNLOGGED TABLE {stage} AS SELECT {', '.join(qcols)} FROM {name.quoted(target.engine)} WITH NO DATA")
            cur.execute(f"ALTER TABLE {stage} ADD COLUMN _adbx_part integer NOT NULL")
            cur.execute(f"CREATE INDEX ON {stage} (_adbx_part)")
        else:
            # One statement (no ALTER privilege needed): the extra column plus the target's.
            cur.execute(
                f"CREATE TABLE {stage} (_adbx_part INT NOT NULL DEFAULT 0, INDEX (_adbx_part)) "
                f"SELECT {', '.join(qcols)} FROM {name.quoted(target.engine)} WHERE 1=0"
            )
    conn.commit()


def _task_error(e: BaseException, table: TableName) -> AuroraDbxError:
    from .redaction import scrub

    text = scrub(str(e))
    # Surface our own error (raised inside the task) rather than Spark's wrapper.
    for marker in ("SessionExpired: ", "CredentialError: ", "ConnectionFailed: "):
        if marker in text:
            detail = text.split(marker, 1)[1].splitlines()[0]
            return AuroraDbxError(f"writing {table} failed in a Spark task: {marker.strip(': ')}: {detail}; nothing was published")
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [type(e).__name__]
    return AuroraDbxError(f"writing {table} failed in a Spark task ({last[0][:500]}); nothing was published")


def _publish(conn: Any, cluster: Cluster, table: TableName, stage: str, qcols: list[str],
             mode: str, key: Sequence[str] | None, staged: int) -> int:
    """Move the stage into the target in one transaction."""
    dialect = dialect_for(cluster)
    target = table.quoted(cluster.engine)
    cols = ", ".join(qcols)
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {stage}")  # noqa: S608
        found = cur.fetchone()[0]
        if found != staged:
            raise AuroraDbxError(f"stage for {table} holds {found} rows but tasks reported {staged}; nothing was published")
        if cluster.engine == "postgresql":
            if mode == "overwrite":
                cur.execute(f"DELETE FROM {target}")  # noqa: S608
            sql = f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage}"  # noqa: S608
            if mode == "upsert":
                keys = [dialect.quote(k) for k in key or []]
                others = [c for c in qcols if c not in keys]
                action = ("DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in others)) if others else "DO NOTHING"
                sql += f" ON CONFLICT ({', '.join(keys)}) {action}"
            try:
                cur.execute(sql)
            except Exception as e:
                if "cannot affect row a second time" in str(e):
                    raise SchemaMismatch(f"the DataFrame has duplicate keys {list(key or [])}; deduplicate it before upserting; nothing was written") from None
                raise
            rows = cur.rowcount
        else:
            conn.begin()
            if mode == "overwrite":
                cur.execute(f"DELETE FROM {target}")  # noqa: S608
            sql = f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage}"  # noqa: S608
            if mode == "upsert":
                keys = [dialect.quote(k) for k in key or []]
                others = [c for c in qcols if c not in keys] or keys[:1]
                sql += " ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in others)
            cur.execute(sql)
            rows = staged
    conn.commit()
    return int(staged if mode == "upsert" else rows)


def _drop_stage(ctx: Context, role: Role, stage: str) -> None:
    try:
        conn = ctx.open(role, read_only=False)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {stage}")
            conn.commit()
        finally:
            conn.close()
    except Exception as e:  # the stale-stage sweep removes it later
        log.warning("could not drop stage table %s (%s); a later write removes it", stage, type(e).__name__)
