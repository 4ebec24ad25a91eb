"""``read_table``: a Spark DataFrame over an Aurora table or query whose tasks always get a
fresh token.

The DataFrame reads through the ``aurora`` Python data source (see :mod:`aurora_dbx.source`):
nothing time-limited is in its plan, every task fetches a token from the driver's broker when it
connects, so the DataFrame keeps working for as long as the role session can be refreshed.
``method="jdbc"`` uses Spark's built-in JDBC source instead, with a token minted now: valid only
while that token is (see docs/SPARK_IO.md).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import date, datetime
from typing import Any

from .audit import AuditEvent
from .broker import shared_broker
from .columns import Column, mysql_columns, postgres_columns
from .context import Context, current_context
from .engines import dialect_for
from .errors import AccessDenied, SchemaMismatch
from .identifiers import TableName, check_identifier, parse_table
from .policy import Cluster, Role
from .spark_io import cluster_spec, jdbc_options, record_access, register_source, resolve_spark, task_tags
from .sqltext import SqlFragmentError, check_fragment

__all__ = ["read_table"]

_SUBQUERY = re.compile(r"\bselect\b", re.IGNORECASE)
# Below this many rows a table is read by one task: more would cost more than it saves.
MIN_ROWS_PER_PARTITION = 20_000


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


def _plan_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a JSON query plan, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _plan_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _plan_nodes(v)


def _query_tables(conn: Any, cluster: Cluster, query: str) -> set[TableName]:
    """The base tables a query reads, as the database's planner sees them."""
    with conn.cursor() as cur:
        if cluster.engine == "postgresql":
            cur.execute(f"EXPLAIN (FORMAT JSON, VERBOSE) {query}")
            nodes = list(_plan_nodes(cur.fetchone()[0]))
            tables = {TableName(n.get("Schema", "public"), n["Relation Name"]) for n in nodes if "Relation Name" in n}
        else:
            cur.execute(f"EXPLAIN FORMAT=JSON {query}")
            try:
                nodes = list(_plan_nodes(json.loads(cur.fetchone()[0], strict=False)))
            except ValueError:
                raise SqlFragmentError(
                    "cannot check which tables this query reads: MariaDB's EXPLAIN output for it is not "
                    "valid JSON (quotes or tabs in its literals); read the table with where= instead, "
                    "or move the literal out of the query"
                ) from None
            # Derived tables show as <derived2> and the like: their sources are listed too.
            tables = {TableName(n.get("database", cluster.database), n["table_name"]) for n in nodes
                      if "table_name" in n and not str(n["table_name"]).startswith("<")}
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
        cur.execute(f"SELECT min({q}), max({q}) FROM {relation}{cond}")  # noqa: S608 - an index lookup on a key
        lo, hi = cur.fetchone()
        # The planner's row estimate, not count(*): sizing partitions must not scan the table.
        count = _estimated_rows(cur, cluster, f"SELECT 1 FROM {relation}{cond}") if num_partitions is None else 0
    conn.rollback()
    if lo is None or hi is None:
        return None
    if num_partitions is None:
        wanted = parallelism if math.isinf(count) else math.ceil(count / MIN_ROWS_PER_PARTITION)
        num_partitions = max(1, min(parallelism, wanted))
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


def _estimated_rows(cur: Any, cluster: Cluster, select: str) -> float:
    if cluster.engine == "postgresql":
        cur.execute(f"EXPLAIN (FORMAT JSON) {select}")
        return float(cur.fetchone()[0][0]["Plan"]["Plan Rows"])
    cur.execute(f"EXPLAIN FORMAT=JSON {select}")
    try:
        plan = json.loads(cur.fetchone()[0], strict=False)
    except ValueError:
        # MariaDB writes literals of conditions into the JSON unescaped; a quote in a
        # `where` makes it invalid. Without an estimate, size for the cluster.
        return float("inf")
    nodes = [n for n in _plan_nodes(plan) if "rows_examined_per_scan" in n or "rows" in n]
    rows = [float(n.get("rows_examined_per_scan", n.get("rows", 0))) * float(n.get("filtered", 100)) / 100 for n in nodes]
    return max(rows, default=0.0)


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
    spark = resolve_spark(ctx, spark)
    # Over Spark Connect (Databricks Connect from an IDE) the tasks run next to a remote
    # driver that cannot reach this process's token broker: use JDBC with a token minted
    # now, valid for actions in the next ~10 minutes (docs/SPARK_IO.md).
    method = options.get("method", "jdbc" if _is_spark_connect(spark) else "source")
    if method not in ("source", "jdbc"):
        raise ValueError("method must be 'source' or 'jdbc'")

    started = time.perf_counter()
    # A pooled driver-side connection: describing and sizing the read needs one round trip
    # each, not a new TLS login per read_table() call.
    with ctx.borrow(chosen, read_only=True) as conn:
        tables_read = {name}
        # A query, or a where with a subquery, may reach other tables: the planner lists
        # them and each must be in the role's scope.
        probe = query or (f"SELECT 1 FROM {relation} WHERE {where}" if where and _SUBQUERY.search(where) else None)
        if probe:
            try:
                tables_read = _query_tables(conn, target, probe)
            except Exception as e:
                if not _is_permission_error(e):
                    raise
                raise _denied(ctx, chosen, target, str(name),
                              f"the database refused the query for {chosen.db_user} (role {chosen.name}): "
                              f"{str(e).strip().splitlines()[0]}") from None
            outside = sorted(str(t) for t in tables_read if not chosen.allows(t, "read"))
            if outside:
                raise _denied(ctx, chosen, target, ",".join(outside),
                              f"{principal} may not read {', '.join(outside)} through role {chosen.name} "
                              f"(covers {', '.join(p.text for p in chosen.tables)}); the query was not run")
        try:
            cols = _describe(conn, target, select, relation)
        except SchemaMismatch:
            raise
        except Exception as e:
            if _is_permission_error(e):
                raise AccessDenied(
                    f"the database refused {chosen.db_user} (role {chosen.name}) reading {name}: "
                    f"{str(e).strip().splitlines()[0]}; the role's GRANTs do not match the policy "
                    "(re-apply `aurora-dbx plan`)"
                ) from None
            if type(e).__module__.split(".")[0] in ("psycopg", "pymysql"):
                raise SchemaMismatch(
                    f"cannot read {'the query' if query else name}: {str(e).strip().splitlines()[0]}"
                ) from None
            raise
        num = options.get("num_partitions")
        if num is not None and (not isinstance(num, int) or num < 1):
            raise ValueError("num_partitions must be a positive integer")
        part_col = options.get("partition_column")
        if part_col is not None:
            check_identifier(part_col, "partition_column")
        predicates = _partitioning(
            conn, target, relation, None if query else name, where, part_col, num,
            _parallelism(spark),
        )

    if method == "jdbc":
        df = _jdbc_read(ctx, spark, chosen, target, cols, relation, where, predicates)
    else:
        broker = shared_broker(spark)
        capability = broker.grant(ctx.token_source(chosen), f"{principal} as {chosen.name}")
        spec = {
            "cluster": cluster_spec(target), "db_user": chosen.db_user,
            "columns": [asdict(c) for c in cols], "relation": relation, "where": where,
            "predicates": predicates, "fetch_size": options.get("fetch_size"),
            "broker": broker.url, "capability": capability, "tags": task_tags(ctx),
        }
        register_source(spark)
        ddl = ", ".join(c.ddl() for c in cols)
        df = spark.read.format("aurora").schema(ddl).option("spec", json.dumps(spec)).load()
    record_access(ctx, chosen, target, "read", sorted(str(t) for t in tables_read), query=query,
                  schema=df.schema, elapsed=time.perf_counter() - started)
    return df


def _denied(ctx: Context, role: Role, cluster: Cluster, table: str, reason: str) -> AccessDenied:
    """An AccessDenied found after the policy decision, audited like the policy's own denials."""
    p = ctx.principal()
    ctx.audit(AuditEvent(event="denied", outcome="denied", principal=p.name, principal_type=p.kind,
                         role_arn=role.iam_role_arn, role=role.name, db_user=role.db_user,
                         cluster=cluster.name, table=table, reason=reason, project=ctx.policy.project))
    return AccessDenied(reason)


def _is_spark_connect(spark: Any) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _parallelism(spark: Any) -> int:
    if _is_spark_connect(spark):  # no SparkContext over Spark Connect
        return int(spark.conf.get("spark.default.parallelism", None) or 8)
    return int(spark.sparkContext.defaultParallelism)


def _jdbc_read(ctx: Context, spark: Any, role: Role, cluster: Cluster, cols: list[Column],
               relation: str, where: str | None, predicates: list[str] | None) -> Any:
    """Spark's JDBC source with a token minted now: valid for actions in the next ~10 min."""
    token = ctx.token_source(role)(False)
    url, props = jdbc_options(cluster, role.db_user, token.value, read_only=True, tags=task_tags(ctx))
    select = ", ".join(c.select + (f" AS {dialect_for(cluster).quote(c.name)}" if c.select != dialect_for(cluster).quote(c.name) else "") for c in cols)
    base = f"(SELECT {select} FROM {relation}{' WHERE ' + where if where else ''}) adbx_j"
    if predicates:
        return spark.read.jdbc(url, base, predicates=predicates, properties=props)
    return spark.read.jdbc(url, base, properties=props)
