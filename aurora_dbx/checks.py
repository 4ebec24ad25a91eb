"""``check``: prove every bound role works end to end: assume, mint, connect, query."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .connections import open_connection
from .context import Context
from .engines import dialect_for
from .errors import AuroraDbxError
from .redaction import scrub

__all__ = ["RoleCheck", "check_roles"]


@dataclass
class RoleCheck:
    role: str
    cluster: str
    db_user: str
    role_arn: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s["ok"] for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "cluster": self.cluster, "db_user": self.db_user,
                "role_arn": self.role_arn, "ok": self.ok, "steps": self.steps}


def _step(check: RoleCheck, name: str, fn: Any) -> Any:
    start = time.perf_counter()
    try:
        result = fn()
    except AuroraDbxError as e:
        check.steps.append({"step": name, "ok": False, "ms": round((time.perf_counter() - start) * 1000, 1),
                            "detail": scrub(str(e))})
        return None
    except Exception as e:  # report, never crash the whole check
        check.steps.append({"step": name, "ok": False, "ms": round((time.perf_counter() - start) * 1000, 1),
                            "detail": scrub(f"{type(e).__name__}: {e}")})
        return None
    detail = result[1] if isinstance(result, tuple) else ""
    check.steps.append({"step": name, "ok": True, "ms": round((time.perf_counter() - start) * 1000, 1),
                        "detail": detail})
    return result[0] if isinstance(result, tuple) else result


def check_roles(ctx: Context) -> list[RoleCheck]:
    """For every role bound to the current principal: assume, mint, connect over TLS, SELECT 1."""
    me = ctx.whoami()
    results = []
    for name in me.roles:
        role = ctx.policy.roles[name]
        cluster = ctx.policy.clusters[role.cluster]
        check = RoleCheck(role.name, cluster.name, role.db_user, role.iam_role_arn)
        results.append(check)
        session = ctx.role_session(role)
        creds = _step(check, "assume_role", lambda s=session: (
            (c := s.credentials()), f"session {c.session_name} until {c.expires_at.isoformat(timespec='seconds')}"))
        if creds is None:
            continue
        token = _step(check, "mint_token", lambda c=creds, cl=cluster, r=role: (
            (t := ctx.tokens.get(c, cl.host, cl.port, r.db_user, cl.region)), f"valid until {t.expires_at.isoformat(timespec='seconds')}"))
        if token is None:
            continue

        def query(cl: Any = cluster, r: Any = role, s: Any = session) -> Any:
            dialect = dialect_for(cl)
            conn = open_connection(dialect, cl, r.db_user, ctx.token_source(r),
                                   read_only=r.access == "read", tags=ctx.connection_tags(me))
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                    if cl.engine == "postgresql":
                        cur.execute("SELECT COALESCE((SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl), 'no TLS')")
                    else:
                        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
                    row = cur.fetchone()
                    tls = (row[-1] if row else None) or "no TLS"
            finally:
                conn.close()
            return True, f"SELECT 1 ok over {tls} ({cl.tls})"

        _step(check, "connect", query)
    return results
