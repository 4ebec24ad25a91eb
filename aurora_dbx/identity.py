"""Who is running this code: an ordered chain of named identity resolvers.

1. ``databricks_runtime``: inside a Databricks runtime, the notebook/job context names the
   principal and the workspace API (with the runtime's own token, never environment
   settings) supplies its groups. Inside a runtime this is the only resolver used: no
   environment variable or argument can change who you are there.
2. ``local_override``: ``AURORA_DBX_LOCAL_PRINCIPAL`` (``user:NAME`` or
   ``service_principal:ID``, optional ``;groups=a,b``) for development off Databricks.
   Refused with :class:`IdentityError` inside a runtime.
3. ``databricks_sdk``: the databricks-sdk's unified auth (profiles, ``DATABRICKS_HOST`` /
   ``DATABRICKS_TOKEN``, OAuth, Databricks Connect) and ``current_user.me()``.

Each resolver returns ``None`` when it does not apply; when none resolves, the error names
every resolver and why it did not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import IdentityError
from .identifiers import shorten
from .runtime import RuntimeContext, in_databricks_runtime, runtime_context

__all__ = [
    "LOCAL_PRINCIPAL_ENV",
    "Principal",
    "Resolver",
    "default_resolvers",
    "principal_kind",
    "resolve_principal",
]

LOCAL_PRINCIPAL_ENV = "AURORA_DBX_LOCAL_PRINCIPAL"
PrincipalKind = Literal["user", "service_principal"]
# Databricks service principals always have their application id (a UUID) as userName;
# SCIM Me does not otherwise distinguish them (the Databricks CLI relies on this too).
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_GROUP = re.compile(r"^[^\x00-\x1f;,]{1,256}$")
_NAME = re.compile(r"^[^\x00-\x1f\s;,]{1,256}$")


def principal_kind(user_name: str) -> PrincipalKind:
    return "service_principal" if _UUID.fullmatch(user_name) else "user"


@dataclass(frozen=True)
class Principal:
    """The identity running this code.

    ``name`` is the user name (an e-mail) or the service principal's application id.
    ``roles`` is filled by :func:`aurora_dbx.whoami` with the policy roles bound to it.
    """

    name: str
    kind: PrincipalKind
    groups: tuple[str, ...] = ()
    display_name: str | None = None
    resolver: str = ""
    workspace_id: str | None = None
    cluster_id: str | None = None
    job_id: str | None = None
    run_id: str | None = None
    roles: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


Resolver = Callable[[], "Principal | None"]


@dataclass
class _Attempt:
    name: str
    outcome: str


# Every workspace API call (the SDK's config probe included) gives up after this long:
# a slow or unreachable workspace must not hang a notebook for the SDK's default 5 minutes.
WORKSPACE_API_TIMEOUT_SECONDS = 30


def _bounded() -> dict[str, object]:
    seconds = int(WORKSPACE_API_TIMEOUT_SECONDS)  # read at call time: tests and admins tune it
    return {"retry_timeout_seconds": seconds, "http_timeout_seconds": min(seconds, 30)}


def _sdk_me(host: str | None = None, token: str | None = None) -> tuple[str, str | None, tuple[str, ...]]:
    """Ask the workspace who the caller is: (user_name, display_name, groups)."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.config import Config

    kwargs: dict[str, object] = _bounded()
    if host is not None:
        kwargs.update(host=host, token=token, auth_type="pat")
    me = WorkspaceClient(config=Config(**kwargs)).current_user.me()  # type: ignore[arg-type]
    if not me.user_name:
        raise IdentityError("the workspace answered SCIM Me without a userName")
    groups = tuple(sorted({g.display for g in (me.groups or []) if g.display}))
    return me.user_name, me.display_name, groups


def databricks_runtime_resolver(
    context: Callable[[], RuntimeContext | None] = runtime_context,
    me: Callable[..., tuple[str, str | None, tuple[str, ...]]] = _sdk_me,
) -> Resolver:
    def resolve() -> Principal | None:
        if not in_databricks_runtime():
            return None
        ctx = context()
        if ctx is None or not ctx.user:
            raise IdentityError(
                "running inside a Databricks runtime but the notebook/job context names no "
                "user; run aurora_dbx from a notebook, job task or Databricks Connect session"
            )
        host = None
        if ctx.workspace_url:
            host = ctx.workspace_url if "://" in ctx.workspace_url else f"https://{ctx.workspace_url}"
        try:
            user_name, display, groups = me(host, ctx.api_token)
        except IdentityError:
            raise
        except Exception as e:  # the SDK raises many types; the message carries no secret
            raise IdentityError(
                f"the workspace API did not confirm who is running this code ({type(e).__name__}: {e}); "
                "retry, or check that the workspace is reachable from the cluster"
            ) from None
        if user_name.casefold() != ctx.user.casefold():
            raise IdentityError(
                f"the notebook context says {ctx.user!r} but the workspace API says {user_name!r}; "
                "refusing to guess who is running this code"
            )
        return Principal(
            name=user_name,
            kind=principal_kind(user_name),
            groups=groups,
            display_name=display,
            resolver="databricks_runtime",
            workspace_id=ctx.workspace_id,
            cluster_id=ctx.cluster_id,
            job_id=ctx.job_id,
            run_id=ctx.run_id,
        )

    resolve.__name__ = "databricks_runtime"
    resolve.absent = "not inside a Databricks runtime"  # type: ignore[attr-defined]
    return resolve


def parse_local_principal(value: str) -> Principal:
    """Parse ``user:NAME`` / ``service_principal:ID`` with optional ``;groups=a,b``."""
    head, _, rest = value.strip().partition(";")
    kind, sep, name = head.partition(":")
    if not sep or kind not in ("user", "service_principal") or not _NAME.fullmatch(name):
        raise IdentityError(
            f"{LOCAL_PRINCIPAL_ENV}={shorten(value)} is not 'user:NAME' or 'service_principal:ID' "
            "(optionally followed by ';groups=a,b')"
        )
    groups: tuple[str, ...] = ()
    if rest:
        key, eq, raw = rest.partition("=")
        if key.strip() != "groups" or not eq:
            raise IdentityError(f"{LOCAL_PRINCIPAL_ENV}: expected ';groups=a,b' after the name, got {shorten(rest)}")
        parts = [g.strip() for g in raw.split(",") if g.strip()]
        bad = [g for g in parts if not _GROUP.fullmatch(g)]
        if bad:
            raise IdentityError(f"{LOCAL_PRINCIPAL_ENV}: invalid group name {shorten(bad[0])}")
        groups = tuple(sorted(set(parts)))
    if kind == "service_principal" and not _UUID.fullmatch(name):
        raise IdentityError(
            f"{LOCAL_PRINCIPAL_ENV}: a service principal is named by its application id (a UUID), got {shorten(name)}"
        )
    return Principal(name=name, kind=kind, groups=groups, resolver="local_override")  # type: ignore[arg-type]


def local_override_resolver() -> Resolver:
    def resolve() -> Principal | None:
        value = os.environ.get(LOCAL_PRINCIPAL_ENV)
        if not value:
            return None
        if in_databricks_runtime():
            raise IdentityError(
                f"{LOCAL_PRINCIPAL_ENV} is set, but identity overrides are refused inside a "
                "Databricks runtime: there the runtime says who you are. Unset it."
            )
        return parse_local_principal(value)

    resolve.__name__ = "local_override"
    resolve.absent = f"{LOCAL_PRINCIPAL_ENV} is not set"  # type: ignore[attr-defined]
    return resolve


def databricks_sdk_resolver(
    me: Callable[..., tuple[str, str | None, tuple[str, ...]]] = _sdk_me,
) -> Resolver:
    def resolve() -> Principal | None:
        try:
            user_name, display, groups = me()
        except ValueError as e:
            if "cannot configure default credentials" in str(e) or "default auth" in str(e):
                return None  # no unified-auth method is configured: this resolver does not apply
            raise IdentityError(
                f"databricks-sdk auth is configured but SCIM Me failed ({type(e).__name__}: {e}); "
                "check DATABRICKS_HOST and your login (databricks auth login)"
            ) from None
        except Exception as e:
            raise IdentityError(
                f"databricks-sdk auth is configured but SCIM Me failed ({type(e).__name__}: {e}); "
                "check DATABRICKS_HOST and your login (databricks auth login)"
            ) from None
        return Principal(
            name=user_name, kind=principal_kind(user_name), groups=groups,
            display_name=display, resolver="databricks_sdk",
        )

    resolve.__name__ = "databricks_sdk"
    resolve.absent = "no databricks-sdk auth configured (profile, DATABRICKS_HOST/TOKEN, OAuth)"  # type: ignore[attr-defined]
    return resolve


def default_resolvers() -> list[Resolver]:
    if in_databricks_runtime():
        # Inside a runtime the override resolver still runs, only to refuse loudly.
        return [local_override_resolver(), databricks_runtime_resolver()]
    return [local_override_resolver(), databricks_sdk_resolver()]


def resolve_principal(resolvers: Sequence[Resolver] | None = None) -> Principal:
    """Run the resolver chain; the first that applies wins."""
    tried: list[_Attempt] = []
    for resolver in resolvers if resolvers is not None else default_resolvers():
        principal = resolver()
        if principal is not None:
            return principal
        tried.append(
            _Attempt(
                getattr(resolver, "__name__", repr(resolver)),
                getattr(resolver, "absent", "did not apply"),
            )
        )
    summary = "; ".join(f"{a.name}: {a.outcome}" for a in tried) or "no resolvers"
    raise IdentityError(
        f"cannot tell who is running this code (tried {summary}). On Databricks this is "
        "automatic; locally, log in with the databricks CLI (databricks auth login) or set "
        f"{LOCAL_PRINCIPAL_ENV}=user:you@example.com for development."
    )
