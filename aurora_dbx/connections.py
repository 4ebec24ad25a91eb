"""Opening database connections with fresh IAM tokens, on the driver or an executor.

The same function serves ``connect()`` on the driver and the Spark data source on
executors: it takes a *credential supplier* (a live role session on the driver, shipped
short-lived credentials or a service credential on an executor), mints or reuses a token
for exactly this (session, host, port, user, region), and connects.

Failures are sorted three ways:
- an authentication failure with a cached token: mint a fresh token and try once more;
- transient errors (refused, reset, "starting up", read-only after a failover): retry
  with jittered backoff and a fresh token each time;
- everything else fails at once with a :class:`ConnectionFailed` naming what to check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tenacity

from .credentials import RoleCredentials
from .engines import Dialect
from .errors import AuroraDbxError, ConnectionFailed
from .policy import Cluster
from .redaction import register_secret, scrub
from .tokens import Token, TokenCache

__all__ = ["CONNECT_RETRY_STOP", "CONNECT_RETRY_WAIT", "TokenSource", "open_connection", "session_tokens"]

# fresh=True asks for a newly minted token (after the server refused a cached one).
TokenSource = Callable[[bool], Token]


def session_tokens(
    credentials: Callable[[], RoleCredentials], tokens: TokenCache, cluster: Cluster, db_user: str
) -> TokenSource:
    """Tokens for ``db_user`` on ``cluster`` signed with a live role session (driver side)."""

    def source(fresh: bool) -> Token:
        creds = credentials()
        register_secret(creds.secret_access_key)
        register_secret(creds.session_token)
        return tokens.get(creds, cluster.host, cluster.port, db_user, cluster.region, fresh=fresh)

    return source

# A failover on Aurora takes ~30 s; keep trying a little longer than that.
CONNECT_RETRY_STOP = tenacity.stop_after_attempt(8) | tenacity.stop_after_delay(60)
CONNECT_RETRY_WAIT = tenacity.wait_random_exponential(multiplier=0.5, max=8)


class _Transient(Exception):
    def __init__(self, cause: BaseException):
        self.cause = cause


def open_connection(
    dialect: Dialect,
    cluster: Cluster,
    db_user: str,
    token_source: TokenSource,
    *,
    read_only: bool,
    tags: dict[str, str],
    stop: tenacity.stop.stop_base = CONNECT_RETRY_STOP,
    wait: tenacity.wait.wait_base = CONNECT_RETRY_WAIT,
    sleep: Callable[[float], None] | None = None,
) -> Any:
    """A DB-API connection as ``db_user`` authenticated with a fresh IAM token."""

    def attempt_once() -> Any:
        fresh = False
        while True:
            token = token_source(fresh)
            register_secret(token.value)
            try:
                return dialect.dbapi_connect(cluster, db_user, token.value, read_only=read_only, tags=tags)
            except Exception as e:
                if dialect.is_auth_failure(e) and not fresh:
                    # The cached token may be older than the server accepts (clock skew,
                    # a rotated session): one fresh token, once.
                    fresh = True
                    continue
                if dialect.is_transient(e):
                    raise _Transient(e) from None
                raise

    retrying = tenacity.Retrying(
        stop=stop, wait=wait, reraise=True,
        retry=tenacity.retry_if_exception_type(_Transient),
        sleep=sleep or tenacity.nap.sleep,
    )
    where = f"{cluster.engine} cluster {cluster.name} ({cluster.host}:{cluster.port}) as {db_user}"
    try:
        for attempt in retrying:
            with attempt:
                return attempt_once()
    except _Transient as t:
        raise ConnectionFailed(
            f"could not reach {where} after retries: {scrub(str(t.cause)).strip()}; "
            "the cluster may be failing over or unreachable from here (security groups, VPC)"
        ) from None
    except AuroraDbxError:  # credentials, audit (fail-closed): already clear, keep their type
        raise
    except Exception as e:
        text = scrub(str(e)).strip()
        if dialect.is_auth_failure(e):
            raise ConnectionFailed(
                f"{where}: the database refused the IAM token ({text}). Check that the role "
                f"may rds-db:connect as {db_user}, that the user exists with IAM auth "
                "(`aurora-dbx plan` prints both), and that this machine's clock is right"
            ) from None
        raise ConnectionFailed(f"{where}: {type(e).__name__}: {text}") from None
    raise AssertionError("unreachable")
