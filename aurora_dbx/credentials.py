"""AWS credentials: base credential sources and role sessions with refresh-ahead caching.

Base sources are an ordered chain of named strategies (each returns ``None`` when it does
not apply): a Unity Catalog service credential, OIDC web identity (token file or any
token provider, e.g. an Okta client-credentials flow), environment variables, and the
boto3 default chain (instance profile, container, shared config). ``credentials.source``
in the policy picks one explicitly; ``auto`` walks the chain.

A :class:`RoleSession` assumes one policy role for one principal with ``SourceIdentity``
set to the principal, a ``RoleSessionName`` derived from it and session tags, and keeps the
result fresh with botocore's ``DeferredRefreshableCredentials`` (advisory/mandatory
refresh windows, one refreshing thread, frozen snapshots), tuned for short sessions.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import boto3
import botocore.config
import botocore.credentials
import botocore.exceptions
import tenacity

from .errors import AuditError, CredentialError, SessionExpired
from .identity import Principal
from .policy import CredentialSettings, Role
from .runtime import in_databricks_runtime

__all__ = [
    "STS_RETRY_STOP",
    "STS_RETRY_WAIT",
    "AssumeRoleEvent",
    "RoleCredentials",
    "RoleSession",
    "RoleSessionCache",
    "base_session",
    "role_session_name",
    "source_identity",
]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Retry policy for STS: throttling, 5xx and network errors back off with jitter for up to
# 5 attempts / 30 s; access denied and validation errors fail at once (no retry storm).
STS_RETRY_STOP = tenacity.stop_after_attempt(5) | tenacity.stop_after_delay(30)
STS_RETRY_WAIT = tenacity.wait_random_exponential(multiplier=0.25, max=5)
# A denial is remembered this long: the tasks of a Spark job then fail with it at once
# instead of each asking STS again (a retry storm against a policy that will not change).
DENIAL_MEMORY_SECONDS = 60
_RETRYABLE_CODES = {
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "ServiceUnavailable", "InternalFailure", "InternalError", "IDPCommunicationError",
    "RequestTimeout", "RequestTimeoutException",
}
# botocore retries too by default; one layer of retries (ours, with the policy above) is
# enough and keeps the attempt count predictable.
_STS_CONFIG = botocore.config.Config(
    retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10
)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _RETRYABLE_CODES or status >= 500
    return isinstance(
        exc,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ),
    )


# -- names that STS accepts -----------------------------------------------------------

_STS_NAME_BAD = re.compile(r"[^\w+=,.@-]", re.ASCII)  # STS accepts ASCII only
_TAG_VALUE_BAD = re.compile(r"[^\w\s.:/=+\-@]", re.UNICODE)


def _fit(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9]}-{digest}"


def _sts_name(name: str) -> str:
    clean = _STS_NAME_BAD.sub("-", name)
    if clean != name:  # keep names that differ only in replaced characters apart
        clean += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return clean


def source_identity(principal: Principal) -> str:
    """The principal as STS ``SourceIdentity`` (2-64 ASCII chars of ``[\\w+=,.@-]``)."""
    return _fit(_sts_name(principal.name), 64).ljust(2, "-")


def role_session_name(principal: Principal) -> str:
    """``adbx-<principal>``, valid as a ``RoleSessionName`` and traceable in CloudTrail."""
    return _fit("adbx-" + _sts_name(principal.name), 64)


def _tag(key: str, value: str) -> dict[str, str]:
    return {"Key": key, "Value": _fit(_TAG_VALUE_BAD.sub("_", value), 256)}


# -- base credential sources -----------------------------------------------------------

BaseSource = Callable[[str], "boto3.Session | None"]


class _Fixed(botocore.credentials.CredentialProvider):
    METHOD = "aurora-dbx"

    def __init__(self, creds: botocore.credentials.Credentials):
        self._creds = creds

    def load(self) -> botocore.credentials.Credentials:
        return self._creds


def _session_with(creds: botocore.credentials.Credentials, region: str) -> boto3.Session:
    """A boto3 session that uses exactly ``creds`` (no other provider is consulted)."""
    import botocore.session

    bs = botocore.session.get_session()
    bs.get_component("credential_provider").providers = [_Fixed(creds)]
    return boto3.Session(botocore_session=bs, region_name=region)


def environment_source(region: str) -> boto3.Session | None:
    """``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` only."""
    creds = botocore.credentials.EnvProvider().load()
    return _session_with(creds, region) if creds is not None else None


def instance_profile_source(region: str) -> boto3.Session | None:
    """boto3's default chain: instance profile, container role, shared config, SSO."""
    session = boto3.Session(region_name=region)
    return session if session.get_credentials() is not None else None


def service_credential_source(name: str) -> BaseSource:
    """A Unity Catalog service credential (``dbutils.credentials``), on Databricks only."""

    def source(region: str) -> boto3.Session | None:
        if not in_databricks_runtime():
            return None
        try:
            from databricks.sdk.runtime import dbutils  # type: ignore[attr-defined]

            provider = dbutils.credentials.getServiceCredentialsProvider(name)  # type: ignore[call-arg]
        except Exception as e:
            raise CredentialError(
                f"Unity Catalog service credential {name!r} is not usable here ({type(e).__name__}); "
                "ask the admin for ACCESS on it, or set credentials.source in the policy"
            ) from None
        return boto3.Session(botocore_session=provider, region_name=region)

    source.__name__ = "service_credential"
    return source


def web_identity_source(
    role_arn: str, token_provider: Callable[[], str], session_name: str = "aurora-dbx-oidc"
) -> BaseSource:
    """OIDC web identity: exchange a JWT (from any provider) for a base role session."""

    def source(region: str) -> boto3.Session | None:
        import botocore.session

        bs = botocore.session.get_session()
        fetcher = botocore.credentials.AssumeRoleWithWebIdentityCredentialFetcher(
            client_creator=bs.create_client,
            web_identity_token_loader=token_provider,
            role_arn=role_arn,
            extra_args={"RoleSessionName": session_name},
        )
        creds = botocore.credentials.DeferredRefreshableCredentials(
            method="assume-role-with-web-identity", refresh_using=fetcher.fetch_credentials
        )
        return _session_with(creds, region)

    source.__name__ = "web_identity"
    return source


def token_file_provider(path: str) -> Callable[[], str]:
    """Reads the OIDC token file on every call (the issuer rotates it in place)."""

    def read() -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise CredentialError(f"cannot read the web identity token file {path}: {e.strerror}") from None

    return read


def base_sources(
    settings: CredentialSettings, token_provider: Callable[[], str] | None = None
) -> list[BaseSource]:
    """The base credential chain the policy's ``credentials`` section asks for."""
    named: dict[str, BaseSource] = {}
    if settings.service_credential:
        named["service_credential"] = service_credential_source(settings.service_credential)
    provider = token_provider or (
        token_file_provider(settings.web_identity_token_file) if settings.web_identity_token_file else None
    )
    if provider is not None:
        if not settings.web_identity_role_arn:
            raise CredentialError(
                "web identity needs credentials.web_identity_role_arn in the policy "
                "(the role the OIDC token may assume)"
            )
        named["web_identity"] = web_identity_source(settings.web_identity_role_arn, provider)
    named["environment"] = environment_source
    named["instance_profile"] = instance_profile_source
    if settings.source != "auto":
        if settings.source not in named:
            raise CredentialError(f"credentials.source {settings.source} is not configured")
        return [named[settings.source]]
    return [named[k] for k in ("service_credential", "web_identity", "environment", "instance_profile") if k in named]


def base_session(sources: list[BaseSource], region: str) -> tuple[boto3.Session, str]:
    tried = []
    for source in sources:
        name = getattr(source, "__name__", "source").removesuffix("_source")
        session = source(region)
        if session is not None:
            return session, name
        tried.append(name)
    raise CredentialError(
        "no AWS credentials to assume the role with (tried "
        + ", ".join(tried)
        + "); on Databricks attach a Unity Catalog service credential or instance profile, "
        "locally configure AWS credentials"
    )


# -- role sessions ---------------------------------------------------------------------


@dataclass(frozen=True)
class RoleCredentials:
    """A frozen snapshot of one role session's credentials (never mixed across refreshes)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expires_at: datetime
    role_arn: str
    session_name: str
    source_identity: str

    def __repr__(self) -> str:
        return (
            f"RoleCredentials(role_arn={self.role_arn!r}, session_name={self.session_name!r}, "
            f"expires_at={self.expires_at.isoformat()!r}, secret=***)"
        )

    def botocore(self) -> botocore.credentials.Credentials:
        return botocore.credentials.Credentials(
            self.access_key_id, self.secret_access_key, self.session_token
        )


@dataclass(frozen=True)
class AssumeRoleEvent:
    """What an audit sink learns about each role assumption (no secrets)."""

    principal: Principal
    role: Role
    outcome: str  # ok | denied | error
    request_id: str | None = None
    expires_at: datetime | None = None
    reason: str | None = None
    refresh: bool = False


class RoleSession:
    """One principal's session in one policy role, refreshed ahead of expiry."""

    def __init__(
        self,
        principal: Principal,
        role: Role,
        *,
        project: str,
        sources: list[BaseSource],
        region: str,
        clock: Clock = utcnow,
        listener: Callable[[AssumeRoleEvent], None] | None = None,
        retry_sleep: Callable[[float], None] | None = None,
    ):
        self.principal = principal
        self.role = role
        self.project = project
        self.region = region
        self.created_at = clock()
        self.sts_calls = 0
        self._sources = sources
        self._clock = clock
        self._listener = listener
        self._retry_sleep = retry_sleep
        self._sts: Any = None
        self._expiry: dict[str, datetime] = {}
        # (when, reason) of the last AccessDenied: every task of a job would ask again.
        self._denied: tuple[datetime, str] | None = None
        self._creds = botocore.credentials.DeferredRefreshableCredentials(
            refresh_using=self._fetch, method="aurora-dbx-assume-role", time_fetcher=clock
        )
        # botocore's defaults (refresh 15 min ahead, block 10 min ahead) would refresh a
        # 15-minute session constantly; scale the windows to the session length.
        life = role.session_seconds
        self._creds._advisory_refresh_timeout = min(15 * 60, life // 4)
        self._creds._mandatory_refresh_timeout = min(10 * 60, life // 6)

    @property
    def session_name(self) -> str:
        return role_session_name(self.principal)

    def _request(self) -> dict[str, Any]:
        p = self.principal
        tags = [_tag("project", self.project), _tag("principal", p.name),
                _tag("principal_type", p.kind)]
        if p.job_id:
            tags.append(_tag("job_id", p.job_id))
        if p.run_id:
            tags.append(_tag("run_id", p.run_id))
        return {
            "RoleArn": self.role.iam_role_arn,
            "RoleSessionName": self.session_name,
            "SourceIdentity": source_identity(p),
            "DurationSeconds": self.role.session_seconds,
            "Tags": tags,
            # Keep who and what project across role chaining.
            "TransitiveTagKeys": ["project", "principal"],
        }

    def _client(self) -> Any:
        if self._sts is None:
            session, _ = base_session(self._sources, self.region)
            self._sts = session.client("sts", region_name=self.region, config=_STS_CONFIG)
        return self._sts

    def _assume(self) -> dict[str, Any]:
        retrying = tenacity.Retrying(
            stop=STS_RETRY_STOP,
            wait=STS_RETRY_WAIT,
            retry=tenacity.retry_if_exception(_retryable),
            reraise=True,
            sleep=self._retry_sleep or tenacity.nap.sleep,
        )
        for attempt in retrying:
            with attempt:
                self.sts_calls += 1
                return self._client().assume_role(**self._request())  # type: ignore[no-any-return]
        raise AssertionError("unreachable")

    def _fetch(self) -> dict[str, Any]:
        refresh = bool(self._expiry)
        who = f"{self.principal} in role {self.role.name} ({self.role.iam_role_arn})"
        if self._denied is not None and (self._clock() - self._denied[0]).total_seconds() < DENIAL_MEMORY_SECONDS:
            raise CredentialError(self._denied[1])
        try:
            resp = self._assume()
        except CredentialError as e:
            self._emit("error", reason=str(e), refresh=refresh)
            raise
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "Unknown")
            denied = code in ("AccessDenied", "AccessDeniedException")
            reason = (
                f"STS refused to let {who} assume the role ({code}): the role's trust policy "
                "must allow the base credentials with sts:AssumeRole, sts:SetSourceIdentity "
                "and sts:TagSession (see `aurora-dbx plan`)"
                if denied
                else f"STS failed for {who}: {code}: {e.response.get('Error', {}).get('Message', '')}"
            )
            if denied:
                self._denied = (self._clock(), reason)
            self._emit("denied" if denied else "error", reason=reason, refresh=refresh)
            raise CredentialError(reason) from None
        except botocore.exceptions.BotoCoreError as e:
            reason = f"STS unreachable for {who} after retries: {type(e).__name__}: {e}"
            self._emit("error", reason=reason, refresh=refresh)
            raise CredentialError(reason) from None
        c = resp["Credentials"]
        expires = c["Expiration"]
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=timezone.utc)
        self._expiry[c["AccessKeyId"]] = expires
        self._emit(
            "ok",
            request_id=resp.get("ResponseMetadata", {}).get("RequestId"),
            expires_at=expires,
            refresh=refresh,
        )
        return {
            "access_key": c["AccessKeyId"],
            "secret_key": c["SecretAccessKey"],
            "token": c["SessionToken"],
            "expiry_time": expires.isoformat(),
        }

    def _emit(self, outcome: str, **kw: Any) -> None:
        if self._listener is not None:
            self._listener(AssumeRoleEvent(self.principal, self.role, outcome, **kw))

    def credentials(self) -> RoleCredentials:
        """A consistent snapshot, refreshed first if it is inside the refresh window."""
        try:
            frozen = self._creds.get_frozen_credentials()
        except (CredentialError, AuditError):
            raise
        except Exception as e:  # botocore's "refreshed but still expired" and the like
            raise SessionExpired(
                f"the role session for {self.principal} in {self.role.name} expired and could "
                f"not be renewed ({type(e).__name__}); check the base credentials and retry"
            ) from None
        expires = self._expiry[frozen.access_key]
        if expires <= self._clock():
            raise SessionExpired(
                f"the role session for {self.principal} in {self.role.name} expired at "
                f"{expires.isoformat()} and could not be renewed"
            )
        return RoleCredentials(
            frozen.access_key, frozen.secret_key, frozen.token, expires,
            self.role.iam_role_arn, self.session_name, source_identity(self.principal),
        )


class RoleSessionCache:
    """Role sessions per (principal, role); rebuilt from scratch past ``max_age_hours``."""

    def __init__(
        self,
        settings: CredentialSettings,
        *,
        project: str,
        clock: Clock = utcnow,
        listener: Callable[[AssumeRoleEvent], None] | None = None,
        token_provider: Callable[[], str] | None = None,
        retry_sleep: Callable[[float], None] | None = None,
    ):
        self._settings = settings
        self._project = project
        self._clock = clock
        self._listener = listener
        self._token_provider = token_provider
        self._retry_sleep = retry_sleep
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, str, str], RoleSession] = {}

    def session(self, principal: Principal, role: Role, region: str) -> RoleSession:
        key = (principal.kind + ":" + principal.name, role.iam_role_arn, region)
        max_age = self._settings.max_age_hours * 3600
        with self._lock:
            current = self._sessions.get(key)
            if current is None or (self._clock() - current.created_at).total_seconds() >= max_age:
                current = RoleSession(
                    principal, role, project=self._project,
                    sources=base_sources(self._settings, self._token_provider),
                    region=region, clock=self._clock, listener=self._listener,
                    retry_sleep=self._retry_sleep,
                )
                self._sessions[key] = current
            return current

    def sessions(self) -> Mapping[tuple[str, str, str], RoleSession]:
        with self._lock:
            return dict(self._sessions)
