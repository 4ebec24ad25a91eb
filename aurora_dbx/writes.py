"""``write_table``: stage into a private table, publish in one transaction.

The target either receives the whole DataFrame or stays exactly as it was, also when tasks
are retried or the job dies halfway (see docs/SPARK_IO.md).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from .broker import shared_broker
from .context import Context, current_context
from .engines import dialect_for
from .errors import AuroraDbxError, SchemaMismatch
from .identifiers import TableName, check_identifier, parse_table
from .policy import Cluster, Role
from .spark_io import cluster_spec, record_access, resolve_spark, task_tags

__all__ = ["write_table"]

log = logging.getLogger(__name__)

WriteMode = Literal["append", "overwrite", "upsert"]
STAGE_PREFIX = "_adbx_stage_"
STALE_STAGE_SECONDS = 24 * 3600


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
    spark = resolve_spark(ctx, df.sparkSession)
    if type(spark).__module__.startswith("pyspark.sql.connect"):
        raise AuroraDbxError(
            "write_table over Spark Connect (Databricks Connect) is not supported: the write's tasks "
            "run on the cluster and fetch tokens from this process, which the cluster cannot reach. "
            "Run the write in a notebook or job on the cluster"
        )
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
            "cluster": cluster_spec(target), "db_user": chosen.db_user, "broker": broker.url,
            "capability": capability, "tags": task_tags(ctx), "stage": stage, "stage_columns": qcols,
        }
        from .source import write_partition

        try:
            results = df.select(*cols).mapInArrow(
                lambda it, spec=spec: write_partition(spec, it), "part int, attempt long, rows long"
            ).collect()
        except Exception as e:
            raise _task_error(e, name) from None
        finally:
            broker.revoke(capability)
        winners = sorted(int(r["attempt"]) for r in results)
        if len({r["part"] for r in results}) != len(results):
            raise AuroraDbxError(f"Spark returned two results for one partition writing {name}; nothing was published")
        staged = sum(r["rows"] for r in results)
        # The job may have outlived this connection (a failover, an idle timeout): publish
        # on a fresh one; every row is safely staged until then.
        conn.close()
        conn = ctx.open(chosen, read_only=False)

        def audit_before_commit(rows: int) -> None:
            # The write's audit event is written before the publish commits, so a
            # fail-closed policy with a broken sink refuses the write, not just its record.
            record_access(ctx, chosen, target, "write", [str(name)], rows=rows, mode=mode,
                          elapsed=time.perf_counter() - started, lineage=False)

        try:
            rows = _publish(conn, target, name, stage, qcols, mode, key, staged, winners, audit_before_commit)
        except AuroraDbxError:
            raise
        except Exception as e:
            # Before COMMIT the transaction rolls back with the connection: nothing landed.
            raise AuroraDbxError(
                f"writing {name} failed while publishing ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'connection lost'}); "
                "the publish transaction was rolled back and nothing was published; retry the write"
            ) from None
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
    record_access(ctx, chosen, target, "write", [str(name)], rows=rows, mode=mode, audit=False)
    return rows


def _create_stage(conn: Any, target: Cluster, name: TableName, stage: str, qcols: list[str]) -> None:
    """An empty private copy of the target's columns plus the writing task's partition id."""
    with conn.cursor() as cur:
        if target.engine == "postgresql":
            # UNLOGGED: staged rows need no WAL; the publish into the target is logged.
            cur.execute(f"CREATE UNLOGGED TABLE {stage} AS SELECT {', '.join(qcols)} FROM {name.quoted(target.engine)} WITH NO DATA")
            # No index: the publish reads the whole stage once; an index would slow every COPY.
            cur.execute(f"ALTER TABLE {stage} ADD COLUMN _adbx_attempt bigint NOT NULL")
        else:
            # One statement (no ALTER privilege needed): the extra column plus the target's.
            cur.execute(
                f"CREATE TABLE {stage} (_adbx_attempt BIGINT NOT NULL DEFAULT 0) "
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
             mode: str, key: Sequence[str] | None, staged: int, winners: list[int],
             before_commit: Callable[[int], None]) -> int:
    """Move the accepted attempts' rows from the stage into the target in one transaction."""
    dialect = dialect_for(cluster)
    target = table.quoted(cluster.engine)
    cols = ", ".join(qcols)
    # Attempt ids are integers from Spark, rendered by int(): safe to inline.
    accepted = f"_adbx_attempt IN ({', '.join(str(int(a)) for a in winners) or 'NULL'})"
    source = f"(SELECT {cols} FROM {stage} WHERE {accepted}) AS adbx_s"
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {stage} WHERE {accepted}")  # noqa: S608
        found = cur.fetchone()[0]
        if found != staged:
            raise AuroraDbxError(f"stage for {table} holds {found} rows but tasks reported {staged}; nothing was published")
        if cluster.engine == "postgresql":
            if mode == "overwrite":
                cur.execute(f"DELETE FROM {target}")  # noqa: S608
            sql = f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {source}"  # noqa: S608
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
            sql = f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {source}"  # noqa: S608
            if mode == "upsert":
                keys = [dialect.quote(k) for k in key or []]
                others = [c for c in qcols if c not in keys] or keys[:1]
                sql += " ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in others)
            cur.execute(sql)
            rows = staged
    written = int(staged if mode == "upsert" else rows)
    before_commit(written)
    try:
        conn.commit()
    except Exception as e:
        raise AuroraDbxError(
            f"the connection to {cluster.name} failed during the COMMIT that publishes {table} "
            f"({type(e).__name__}); the write may or may not have landed: check the table before retrying"
        ) from None
    return written


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
