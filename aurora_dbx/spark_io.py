"""Shared plumbing of Spark reads and writes: the session, the data source registration,
the spec sent to tasks, JDBC options, and the audit/lineage record of every access.

``read_table`` lives in :mod:`aurora_dbx.reads`, ``write_table`` in :mod:`aurora_dbx.writes`.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

from .audit import AuditEvent
from .context import Context, _active_mlflow_run_id
from .engines import ca_bundle_for
from .policy import Cluster, Role

__all__ = ["cluster_spec", "jdbc_options", "record_access", "register_source", "resolve_spark", "task_tags"]

_registered: set[int] = set()
_registered_lock = threading.Lock()


def resolve_spark(ctx: Context, spark: Any) -> Any:
    """The caller's session, else the configured one, else the active (or a new) session."""
    if spark is not None:
        return spark
    if ctx.spark is not None:
        return ctx.spark
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    return active if active is not None else SparkSession.builder.getOrCreate()


def register_source(spark: Any) -> None:
    """Register the ``aurora`` Python data source once per Spark session."""
    from .source import AuroraDataSource

    with _registered_lock:
        if id(spark) not in _registered:
            spark.dataSource.register(AuroraDataSource)
            _registered.add(id(spark))


def cluster_spec(cluster: Cluster) -> dict[str, Any]:
    """The cluster as tasks need it (plain JSON, no credentials)."""
    spec = asdict(cluster)
    # Executors see the same CA path (the init script installs it on every node).
    spec["ca_bundle"] = ca_bundle_for(cluster)
    return spec


def task_tags(ctx: Context) -> dict[str, str]:
    """Connection tags for tasks: project, principal, job/run and the active MLflow run."""
    return ctx.connection_tags(ctx.principal(), {"mlflow_run": _active_mlflow_run_id()})


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


def record_access(ctx: Context, role: Role, cluster: Cluster, kind: str, tables: list[str], *,
                  query: str | None = None, schema: Any = None, rows: int | None = None,
                  mode: str | None = None, elapsed: float | None = None, audit: bool = True,
                  lineage: bool = True) -> None:
    """One audit event per table, then the MLflow lineage of the access (never fails the access)."""
    p = ctx.principal()
    creds = ctx.credentials(role)
    for t in tables if audit else []:
        ctx.audit(AuditEvent(
            event=kind, outcome="ok", principal=p.name, principal_type=p.kind,
            role_arn=role.iam_role_arn, role=role.name, db_user=role.db_user, cluster=cluster.name,
            table=t, project=ctx.policy.project, session_name=creds.session_name,
            source_identity=creds.source_identity, credential_expires_at=creds.expires_at.isoformat(),
            rows=rows, mode=mode, job_id=p.job_id, run_id=p.run_id, mlflow_run_id=_active_mlflow_run_id(),
            duration_ms=round(elapsed * 1000) if elapsed is not None else None,
        ))
    if not lineage:
        return
    from . import lineage as mlflow_lineage

    for t in tables or [None]:  # type: ignore[list-item]
        mlflow_lineage.record(mlflow_lineage.Access(
            principal=p, role=role, cluster=cluster, kind=kind, table=t, query=query,  # type: ignore[arg-type]
            session_name=creds.session_name, source_identity=creds.source_identity,
            credential_expires_at=creds.expires_at, rows=rows, mode=mode,
            **({"schema": schema} if schema is not None and "schema" in mlflow_lineage.Access.__dataclass_fields__ else {}),
        ))
