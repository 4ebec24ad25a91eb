"""PostgreSQL and MySQL dialects: DB-API and JDBC connection settings, quoting, SQL.

Aurora PostgreSQL is reached with psycopg (and the PostgreSQL JDBC driver in Spark);
Aurora MySQL with PyMySQL (and the MariaDB JDBC driver, which speaks MySQL's protocol and
sends IAM tokens with ``mysql_clear_password``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import PolicyError
from .identifiers import quote_identifier
from .policy import Cluster
from .runtime import in_databricks_runtime

__all__ = ["DEFAULT_CA_BUNDLE", "Dialect", "MySQL", "PostgreSQL", "ca_bundle_for", "dialect_for"]

# Where the cluster init script installs Amazon's RDS CA bundle.
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/rds-global-bundle.pem"
CONNECT_TIMEOUT_SECONDS = 10
# A failed certificate or host name check is permanent: never retried as a network blip.
_TLS_FAILURES = ("certificate verify failed", "certificate_verify_failed", "hostname mismatch",
                 "doesn't match", "does not match host name", "ssl: wrong version", "tlsv1 alert")


def _tls_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(t in text for t in _TLS_FAILURES)


def ca_bundle_for(cluster: Cluster) -> str | None:
    """The CA bundle to verify the server with: the policy's, the init script's, or None."""
    if cluster.ca_bundle:
        return cluster.ca_bundle
    env = os.environ.get("AURORA_DBX_CA_BUNDLE")
    if env:
        return env
    return DEFAULT_CA_BUNDLE if os.path.exists(DEFAULT_CA_BUNDLE) else None


def _check_tls(cluster: Cluster) -> None:
    if cluster.tls == "disable" and in_databricks_runtime():
        raise PolicyError(
            "tls: disable is a local-development setting and is refused inside Databricks; "
            "use verify-full (the default)",
            key=f"clusters.{cluster.name}.tls",
        )


def connection_label(tags: dict[str, str], limit: int) -> str:
    """``aurora_dbx project=.. principal=..`` trimmed to what the server keeps."""
    text = "aurora_dbx " + " ".join(f"{k}={v}" for k, v in tags.items() if v)
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    return text[:limit]


@dataclass(frozen=True)
class Dialect:
    engine: str

    def quote(self, name: str) -> str:
        return quote_identifier(name, self.engine)

    # Overridden below.
    def dbapi_connect(self, cluster: Cluster, user: str, password: str, *, read_only: bool,
                      tags: dict[str, str]) -> Any:
        raise NotImplementedError

    def is_auth_failure(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def is_transient(self, exc: BaseException) -> bool:
        raise NotImplementedError


class _PostgreSQL(Dialect):
    _TRANSIENT = (
        "connection refused", "could not connect", "the database system is starting up",
        "the database system is shutting down", "the database system is in recovery mode",
        "server closed the connection unexpectedly", "terminating connection",
        "connection reset", "timeout expired", "no route to host",
        "cannot execute", "read-only transaction",  # writer demoted after a failover
        "consuming input failed", "ssl syscall error", "eof detected",
    )

    def dbapi_connect(self, cluster: Cluster, user: str, password: str, *, read_only: bool,
                      tags: dict[str, str]) -> Any:
        import psycopg

        _check_tls(cluster)
        kwargs: dict[str, Any] = {
            "host": cluster.host, "port": cluster.port, "dbname": cluster.database,
            "user": user, "password": password, "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            # NAMEDATALEN-1: the server keeps 63 bytes of application_name.
            "application_name": connection_label(tags, 63),
        }
        if cluster.tls == "disable":
            kwargs["sslmode"] = "disable"
        else:
            kwargs["sslmode"] = cluster.tls
            ca = ca_bundle_for(cluster)
            kwargs["sslrootcert"] = ca if ca else "system"
        if read_only:
            # A read role's sessions cannot write even if its GRANTs were too broad.
            kwargs["options"] = "-c default_transaction_read_only=on"
        return psycopg.connect(**kwargs)

    def is_auth_failure(self, exc: BaseException) -> bool:
        text = str(exc)
        return "PAM authentication failed" in text or "password authentication failed" in text

    def is_transient(self, exc: BaseException) -> bool:
        import psycopg

        if not isinstance(exc, psycopg.OperationalError) or self.is_auth_failure(exc) or _tls_failure(exc):
            return False
        text = str(exc).lower()
        return any(t in text for t in self._TRANSIENT)


class _MySQL(Dialect):
    # 2003 can't connect, 2006 gone away, 2013 lost connection, 1053 shutdown in progress,
    # 1290/1836 read-only after a failover, 1927 connection killed.
    _TRANSIENT_CODES = {2003, 2006, 2013, 1053, 1290, 1836, 1927, 2055}

    def dbapi_connect(self, cluster: Cluster, user: str, password: str, *, read_only: bool,
                      tags: dict[str, str]) -> Any:
        import ssl

        import pymysql

        _check_tls(cluster)
        ssl_arg: dict[str, Any] | None = None
        if cluster.tls != "disable":
            ca = ca_bundle_for(cluster)
            ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
            if cluster.tls == "require":
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ssl_arg = {"ssl": ctx}
        conn = pymysql.connect(
            host=cluster.host, port=cluster.port, user=user, password=password,
            database=cluster.database, connect_timeout=CONNECT_TIMEOUT_SECONDS,
            program_name=connection_label(tags, 64), autocommit=False, charset="utf8mb4",
            defer_connect=True, **(ssl_arg or {}),
        )
        # Shown in performance_schema.session_connect_attrs next to the session.
        conn._connect_attrs.update({k: v[:256] for k, v in tags.items() if v})
        conn.connect()
        if read_only:
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION READ ONLY")
        return conn

    def is_auth_failure(self, exc: BaseException) -> bool:
        import pymysql

        return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] == 1045

    def is_transient(self, exc: BaseException) -> bool:
        import pymysql

        if _tls_failure(exc) or _tls_failure(exc.__context__ or exc):
            return False
        if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InternalError) and exc.args:
            return exc.args[0] in self._TRANSIENT_CODES
        return isinstance(exc, ConnectionError)


PostgreSQL = _PostgreSQL("postgresql")
MySQL = _MySQL("mysql")


def dialect_for(cluster: Cluster) -> Dialect:
    return PostgreSQL if cluster.engine == "postgresql" else MySQL
