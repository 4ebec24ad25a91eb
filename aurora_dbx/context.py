"""The per-process state behind the public API: policy, principal, role sessions, tokens.

Data flows one way: identity -> policy decision -> role session -> token -> connection,
and every step that grants or refuses access leaves an audit event.
``configure()`` replaces the default :class:`Context`; without it the first API call
builds one from ``AURORA_DBX_POLICY`` or the Spark conf ``spark.aurora_dbx.policy``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

from .audit import AuditEvent, Auditor, Sink, sink_for
from .connections import TokenSource, open_connection, session_tokens
from .credentials import AssumeRoleEvent, RoleCredentials, RoleSession, RoleSessionCache, utcnow
from .engines import dialect_for
from .errors import AccessDenied, PolicyError
from .identifiers import TableName, parse_table
from .identity import Principal, Resolver, resolve_principal
from .policy import Access, Cluster, Policy, Role, load_policy
from .redaction import install_log_redaction
from .tokens import TokenCache

__all__ = ["Context", "configure", "current_context"]

POLICY_ENV = "AURORA_DBX_POLICY"
POLICY_SPARK_CONF = "spark.aurora_dbx.policy"
# A pooled metadata connection older than this is replaced (well inside server idle limits).
IDLE_CONNECTION_SECONDS = 300


def _spark_conf_policy(spark: Any) -> str | None:
    if spark is None:
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            return None
        spark = SparkSession.getActiveSession()
    if spark is None:
        return None
    try:
        value = spark.conf.get(POLICY_SPARK_CONF, None)
    except Exception:
        return None
    return str(value) if value else None


def locate_policy(policy: str | os.PathLike[str] | Mapping[str, Any] | Policy | None, spark: Any = None) -> Policy:
    """configure(policy=...) first, then AURORA_DBX_POLICY, then spark.aurora_dbx.policy."""
    if isinstance(policy, Policy):
        return policy
    if policy is not None:
        return load_policy(policy)
    path = os.environ.get(POLICY_ENV) or _spark_conf_policy(spark)
    if not path:
        raise PolicyError(
            "no access policy configured: call aurora_dbx.configure(policy='/Volumes/.../policy.yaml'), "
            f"set {POLICY_ENV}, or set the Spark conf {POLICY_SPARK_CONF}",
            source="<none>",
        )
    return load_policy(path)


class Context:
    """Everything one process needs to turn 'who am I' into database connections."""

    def __init__(
        self,
        policy: Policy,
        *,
        spark: Any = None,
        resolvers: Sequence[Resolver] | None = None,
        clock: Callable[[], datetime] = utcnow,
        token_provider: Callable[[], str] | None = None,
        audit_sink: Sink | None = None,
        retry_sleep: Callable[[float], None] | None = None,
    ):
        install_log_redaction()
        self.policy = policy
        self.spark = spark
        self.clock = clock
        self._resolvers = resolvers
        self._principal: Principal | None = None
        self._lock = threading.Lock()
        self.auditor = Auditor(audit_sink or sink_for(policy.audit.sink, spark), fail_closed=policy.audit.fail_closed)
        self.sessions = RoleSessionCache(
            policy.credentials, project=policy.project, clock=clock,
            listener=self._on_assume, token_provider=token_provider, retry_sleep=retry_sleep,
        )
        self.tokens = TokenCache(clock)
        self._idle: dict[tuple[str, bool], tuple[Any, float]] = {}

    # -- identity and decisions -----------------------------------------------------

    def principal(self) -> Principal:
        with self._lock:
            if self._principal is None:
                self._principal = resolve_principal(self._resolvers)
            return self._principal

    def whoami(self) -> Principal:
        p = self.principal()
        roles = self.policy.bound_roles(p.name, p.kind, p.groups)
        return replace(p, roles=tuple(r.name for r in roles))

    def decide(
        self, table: str | TableName | None, access: Access, *, cluster: str | None = None,
        role: str | None = None,
    ) -> tuple[Principal, Role, Cluster]:
        """The role to use, or AccessDenied (audited) before any network call."""
        p = self.principal()
        name = parse_table(table) if isinstance(table, str) else table
        try:
            chosen = self.policy.decide(
                name=p.name, kind=p.kind, groups=p.groups, table=name, access=access,
                cluster=cluster, role=role,
            )
        except AccessDenied as e:
            self.audit(AuditEvent(
                event="denied", outcome="denied", principal=p.name, principal_type=p.kind,
                cluster=cluster, table=str(name) if name else None, reason=str(e),
                project=self.policy.project, mode=access,
            ))
            raise
        return p, chosen, self.policy.clusters[chosen.cluster]

    # -- credentials -----------------------------------------------------------------

    def role_session(self, role: Role) -> RoleSession:
        cluster = self.policy.clusters[role.cluster]
        return self.sessions.session(self.principal(), role, cluster.region)

    def credentials(self, role: Role) -> RoleCredentials:
        return self.role_session(role).credentials()

    def _on_assume(self, e: AssumeRoleEvent) -> None:
        self.audit(AuditEvent(
            event="assume_role", outcome=e.outcome, principal=e.principal.name,
            principal_type=e.principal.kind, role_arn=e.role.iam_role_arn, role=e.role.name,
            db_user=e.role.db_user, cluster=e.role.cluster, reason=e.reason,
            project=self.policy.project, sts_request_id=e.request_id,
            credential_expires_at=e.expires_at.isoformat() if e.expires_at else None,
            mode="refresh" if e.refresh else "initial",
            job_id=e.principal.job_id, run_id=e.principal.run_id,
        ))

    def audit(self, event: AuditEvent) -> None:
        self.auditor.emit(event)

    # -- connections -----------------------------------------------------------------

    def connection_tags(self, principal: Principal, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        tags = {"project": self.policy.project, "principal": principal.name,
                "job": principal.job_id or "", "run": principal.run_id or ""}
        for k, v in (extra or {}).items():
            if v:
                tags[k] = v
        return {k: v for k, v in tags.items() if v}

    def token_source(self, role: Role) -> TokenSource:
        """Fresh-or-cached tokens for ``role``'s database user, from its live role session."""
        # Look the session up on every call: past max_age_hours the cache replaces it.
        return session_tokens(
            lambda: self.role_session(role).credentials(), self.tokens,
            self.policy.clusters[role.cluster], role.db_user,
        )

    def open(self, role: Role, *, read_only: bool, extra_tags: Mapping[str, str | None] | None = None) -> Any:
        """A DB-API connection for ``role`` (already decided) with a fresh token."""
        cluster = self.policy.clusters[role.cluster]
        return open_connection(
            dialect_for(cluster), cluster, role.db_user, self.token_source(role),
            read_only=read_only, tags=self.connection_tags(self.principal(), extra_tags),
        )

    @contextmanager
    def borrow(self, role: Role, *, read_only: bool) -> Iterator[Any]:
        """A driver-side connection from a one-per-role idle pool (for metadata queries).

        Reused only if it is younger than ``IDLE_CONNECTION_SECONDS`` and answers a ping;
        returned to the pool only if the caller's block finished cleanly.
        """
        key = (role.name, read_only)
        with self._lock:
            conn, since = self._idle.pop(key, (None, 0.0))
        if conn is not None and (time.monotonic() - since > IDLE_CONNECTION_SECONDS or not _alive(conn)):
            _close_quietly(conn)
            conn = None
        if conn is None:
            conn = self.open(role, read_only=read_only)
        try:
            yield conn
            conn.rollback()
        except BaseException:
            _close_quietly(conn)
            raise
        with self._lock:
            previous = self._idle.pop(key, (None, 0.0))[0]
            self._idle[key] = (conn, time.monotonic())
        if previous is not None:
            _close_quietly(previous)

    def connect(self, *, cluster: str | None = None, role: str | None = None, access: Access = "read") -> Any:
        p, chosen, target = self.decide(None, access, cluster=cluster, role=role)
        conn = open_connection(
            dialect_for(target), target, chosen.db_user, self.token_source(chosen),
            read_only=chosen.access == "read" or access == "read",
            tags=self.connection_tags(p, {"mlflow_run": _active_mlflow_run_id()}),
        )
        self.audit(AuditEvent(
            event="connect", outcome="ok", principal=p.name, principal_type=p.kind,
            role_arn=chosen.iam_role_arn, role=chosen.name, db_user=chosen.db_user,
            cluster=target.name, project=self.policy.project, mode=access,
        ))
        return conn


def _alive(conn: Any) -> bool:
    try:
        if hasattr(conn, "ping"):  # PyMySQL
            conn.ping(reconnect=False)
        else:  # psycopg
            conn.execute("SELECT 1").fetchone()
            conn.rollback()
        return True
    except Exception:
        return False


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: S110 - it is being discarded
        pass


def _active_mlflow_run_id() -> str | None:
    # Importing mlflow costs seconds: only look when the caller already uses it.
    if "mlflow" not in sys.modules:
        return os.environ.get("MLFLOW_RUN_ID")
    import mlflow

    try:
        run = mlflow.active_run()
    except Exception:
        return None
    return run.info.run_id if run else None


_default: Context | None = None
_default_lock = threading.Lock()


def configure(
    policy: str | os.PathLike[str] | Mapping[str, Any] | Policy | None = None,
    spark: Any = None,
    **options: Any,
) -> Context:
    """Set the access policy (path or mapping) and Spark session used by the API.

    Options are passed to :class:`Context` (``resolvers``, ``clock``, ``token_provider``,
    ``audit_sink``): tests and advanced callers inject them; notebooks rarely need to.
    """
    global _default
    ctx = Context(locate_policy(policy, spark), spark=spark, **options)
    with _default_lock:
        _default = ctx
    return ctx


def current_context() -> Context:
    global _default
    with _default_lock:
        if _default is None:
            _default = Context(locate_policy(None))
        return _default


def reset() -> None:
    """Forget the configured context (tests, and notebooks that switch policies)."""
    global _default
    with _default_lock:
        _default = None
