"""Aurora IAM authentication tokens: minted locally, cached briefly, never logged.

A token is a SigV4-presigned ``connect`` request for ``rds-db`` (exactly what
``boto3.client("rds").generate_db_auth_token`` produces) signed with a role session's
credentials. Minting is pure computation (no network call). Aurora checks a token only
when a connection opens and rejects it 15 minutes after it was signed, or once the
signing session has expired, so the cache keeps a token for at most
``TOKEN_REUSE_SECONDS`` and never past the session's expiry minus a margin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest

from .credentials import RoleCredentials

__all__ = ["TOKEN_LIFETIME_SECONDS", "TOKEN_REUSE_SECONDS", "Token", "TokenCache", "mint_token"]

TOKEN_LIFETIME_SECONDS = 900
# Reuse a token for 10 minutes at most: it stays valid 5 more minutes, ample for a login
# that started with it, and well inside the 15-minute life.
TOKEN_REUSE_SECONDS = 600
# Never hand out a token whose signing session ends within this margin.
SESSION_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class Token:
    """An Aurora IAM auth token. ``str(token)`` and ``repr`` never show the value."""

    value: str
    minted_at: datetime
    expires_at: datetime
    db_user: str

    def __repr__(self) -> str:
        return f"Token(db_user={self.db_user!r}, expires_at={self.expires_at.isoformat()!r}, value=***)"

    __str__ = __repr__


def mint_token(
    creds: RoleCredentials, host: str, port: int, db_user: str, region: str,
    now: datetime | None = None,
) -> Token:
    """Sign an Aurora IAM auth token locally (no network call)."""
    now = now or datetime.now(timezone.utc)
    request = AWSRequest(
        method="GET",
        url=f"https://{host}:{port}/?Action=connect&DBUser={quote(db_user, safe='')}",
    )
    SigV4QueryAuth(creds.botocore(), "rds-db", region, expires=TOKEN_LIFETIME_SECONDS).add_auth(request)
    # Aurora expects the presigned URL without its scheme.
    value = request.url[len("https://") :]
    expires = min(now + timedelta(seconds=TOKEN_LIFETIME_SECONDS), creds.expires_at)
    return Token(value, now, expires, db_user)


class TokenCache:
    """Tokens per (role session, host, port, db user, region), thread-safe."""

    def __init__(self, clock: Callable[[], datetime] | None = None):
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, int, str, str], Token] = {}
        self.minted = 0

    def get(
        self, creds: RoleCredentials, host: str, port: int, db_user: str, region: str,
        *, fresh: bool = False,
    ) -> Token:
        """A cached token if still safely usable, else a newly minted one.

        ``fresh=True`` skips the cache: used once after a login with a cached token failed.
        """
        key = (creds.access_key_id, host, port, db_user, region)
        now = self._clock()
        with self._lock:
            token = None if fresh else self._tokens.get(key)
            if token is not None and (
                (now - token.minted_at).total_seconds() < TOKEN_REUSE_SECONDS
                and (token.expires_at - now).total_seconds() > SESSION_MARGIN_SECONDS
            ):
                return token
            token = mint_token(creds, host, port, db_user, region, now)
            self.minted += 1
            # Drop tokens of superseded sessions so the cache stays small.
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
            self._tokens[key] = token
            return token

    def invalidate(self, creds: RoleCredentials, host: str, port: int, db_user: str, region: str) -> None:
        with self._lock:
            self._tokens.pop((creds.access_key_id, host, port, db_user, region), None)
