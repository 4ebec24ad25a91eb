"""Errors raised by aurora_dbx.

Every error is an :class:`AuroraDbxError`; the message says what went wrong and what to
do next. No message ever contains a token, secret key or session token: errors that wrap
a lower-level exception keep it as ``__cause__`` only after scrubbing (see
:func:`aurora_dbx.redaction.scrub`).

Hierarchy::

    AuroraDbxError
    ├── PolicyError          the access policy file is missing, malformed or inconsistent
    ├── IdentityError        the current principal cannot be resolved (or an override is refused)
    ├── CredentialError      AWS credentials or role assumption failed
    │   └── SessionExpired   the role session cannot be refreshed any more
    ├── AccessDenied         no binding allows this principal this table/access
    ├── ConnectionFailed     the database refused or dropped the connection
    ├── SchemaMismatch       a DataFrame does not fit the target table
    └── AuditError           an audit event could not be written and the policy is fail-closed
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AuditError",
    "AuroraDbxError",
    "ConnectionFailed",
    "CredentialError",
    "IdentityError",
    "PolicyError",
    "SchemaMismatch",
    "SessionExpired",
]


class AuroraDbxError(Exception):
    """Base class of every error aurora_dbx raises."""


class PolicyError(AuroraDbxError):
    """The access policy is missing, malformed or inconsistent.

    ``source`` is the file (or ``<mapping>``) and ``key`` the dotted path of the offending key.
    """

    def __init__(self, message: str, *, source: str = "<policy>", key: str | None = None):
        self.source = source
        self.key = key
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)


class IdentityError(AuroraDbxError):
    """The current principal could not be resolved, or an override was refused."""


class CredentialError(AuroraDbxError):
    """AWS credentials could not be obtained or the role could not be assumed."""


class SessionExpired(CredentialError):
    """The role session is past its life and cannot be refreshed any more."""


class AccessDenied(AuroraDbxError):
    """The access policy does not let this principal do this (deny by default)."""


class ConnectionFailed(AuroraDbxError):
    """The database refused the connection or the connection failed."""


class SchemaMismatch(AuroraDbxError):
    """A DataFrame's schema does not fit the target table; nothing was written."""


class AuditError(AuroraDbxError):
    """An audit event could not be written and the policy says ``fail_closed: true``."""
