"""Aurora IAM auth token verifier used by the local stack's PAM module.

The verifier re-implements, independently of botocore's signer, the checks Aurora
makes when a client presents an IAM auth token as its password:

* the token is a SigV4 presigned ``GET`` of ``<host>:<port>/?Action=connect&DBUser=..``
  for the ``rds-db`` service in the configured region;
* the signature matches the secret key that the local STS (moto) issued for the
  token's access key id, and ``X-Amz-Security-Token`` is that session's token;
* ``DBUser`` is the user logging in and ``host:port`` is the server being logged into;
* the token is not dated in the future and is younger than
  ``min(X-Amz-Expires, max_token_age_seconds)`` on the verifier's clock
  (``time.time() + clock_offset_seconds``);
* the role that signed it was granted ``rds-db:connect`` on that database user
  (:meth:`TokenVerifier.allow`; deny by default).

Every decision is appended, as one JSON line with a stable ``reason`` code, to a log
file (tokens, signatures, secrets and session tokens are never written), and kept in
memory in :attr:`TokenVerifier.events` so tests can assert *why* a token was refused.

The PAM module (``pam_aurora_iam.c``) talks to :meth:`TokenVerifier.serve` over a
unix socket; see that file for the wire protocol.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import logging
import os
import socket
import socketserver
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

__all__ = ["TokenVerifier", "Verdict", "VerificationEvent", "REASONS"]

_log = logging.getLogger(__name__)

#: Stable refusal reason codes (``Verdict.reason`` / ``VerificationEvent.reason``).
REASONS = (
    "ok",
    "malformed",
    "endpoint_mismatch",
    "wrong_action",
    "db_user_mismatch",
    "wrong_algorithm",
    "wrong_service",
    "wrong_region",
    "unsigned_host_missing",
    "date_in_future",
    "expired",
    "unknown_access_key",
    "security_token_mismatch",
    "signature_mismatch",
    "role_not_allowed",
)

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_MAGIC = b"AIAM1"
_MAX_FIELD = 64 * 1024


@dataclass(frozen=True)
class Verdict:
    """Outcome of one verification: ``ok`` and a stable ``reason`` code plus detail."""

    ok: bool
    reason: str
    detail: str = ""
    role_arn: str | None = None
    access_key_id: str | None = None


@dataclass(frozen=True)
class VerificationEvent:
    """One logged decision (never contains the token or any secret)."""

    time: float
    endpoint: str
    db_user: str
    ok: bool
    reason: str
    detail: str
    role_arn: str | None
    access_key_id: str | None
    token_length: int


@dataclass
class _IssuedCredential:
    secret_access_key: str
    session_token: str | None
    role_arn: str | None
    fetched_at: float


@dataclass
class _Grants:
    # (role_arn, db_user) -> set of endpoints, or None meaning "any endpoint"
    entries: dict[tuple[str, str], set[str] | None] = field(default_factory=dict)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def _uri_encode(value: str) -> str:
    return quote(value, safe="-_.~")


def _parse_amz_date(value: str) -> float:
    parsed = time.strptime(value, "%Y%m%dT%H%M%SZ")
    return float(calendar.timegm(parsed))


class TokenVerifier:
    """Verifies Aurora IAM auth tokens against the credentials moto's STS issued.

    Runtime-tunable attributes (safe to change while the stack runs):

    ``max_token_age_seconds``
        tokens older than this (or than their ``X-Amz-Expires``) are refused (default 900).
    ``clock_offset_seconds``
        added to the verifier's clock, to simulate a skewed server clock (default 0).
    ``future_skew_seconds``
        how far in the future ``X-Amz-Date`` may be before it is refused (default 60).
    """

    def __init__(
        self,
        sts_endpoint: str,
        log_path: Path,
        *,
        region: str = "us-east-1",
        max_token_age_seconds: float = 900,
        clock_offset_seconds: float = 0.0,
        future_skew_seconds: float = 60.0,
        credential_cache_seconds: float = 30.0,
    ) -> None:
        self.sts_endpoint = sts_endpoint.rstrip("/")
        self.log_path = Path(log_path)
        self.region = region
        self.max_token_age_seconds = max_token_age_seconds
        self.clock_offset_seconds = clock_offset_seconds
        self.future_skew_seconds = future_skew_seconds
        self.credential_cache_seconds = credential_cache_seconds
        self.verified = 0
        self.refused = 0
        self.events: list[VerificationEvent] = []
        self._grants = _Grants()
        self._creds: dict[str, _IssuedCredential] = {}
        self._last_fetch = 0.0
        self._lock = threading.RLock()
        self._fetch_lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None
        self.socket_path: Path | None = None

    # ------------------------------------------------------------------ grants
    def allow(self, role_arn: str, db_user: str, *, endpoint: str | None = None) -> None:
        """Grant ``rds-db:connect`` on ``db_user`` to ``role_arn``.

        ``endpoint`` (``"localhost:PORT"``) restricts the grant to one server, like the
        cluster resource id in a real ``arn:aws:rds-db:...:dbuser:<cluster>/<user>``.
        """
        with self._lock:
            key = (role_arn, db_user)
            if endpoint is None:
                self._grants.entries[key] = None
            else:
                current = self._grants.entries.get(key, set())
                if current is not None:
                    current.add(endpoint)
                    self._grants.entries[key] = current

    def revoke(self, role_arn: str, db_user: str) -> None:
        """Remove every grant of ``db_user`` to ``role_arn``."""
        with self._lock:
            self._grants.entries.pop((role_arn, db_user), None)

    def is_allowed(self, role_arn: str, db_user: str, endpoint: str) -> bool:
        with self._lock:
            key = (role_arn, db_user)
            if key not in self._grants.entries:
                return False
            endpoints = self._grants.entries[key]
            return endpoints is None or endpoint in endpoints

    # ------------------------------------------------------------------ events
    def refusals(self, db_user: str | None = None) -> list[VerificationEvent]:
        """Refused attempts so far, optionally only those for ``db_user``."""
        with self._lock:
            return [
                e for e in self.events if not e.ok and (db_user is None or e.db_user == db_user)
            ]

    def last_event(self, db_user: str | None = None) -> VerificationEvent | None:
        with self._lock:
            for event in reversed(self.events):
                if db_user is None or event.db_user == db_user:
                    return event
        return None

    def now(self) -> float:
        """The verifier's clock: wall clock plus ``clock_offset_seconds``."""
        return time.time() + self.clock_offset_seconds

    # ------------------------------------------------------------ credentials
    def _fetch_issued(self) -> None:
        with self._fetch_lock:
            url = f"{self.sts_endpoint}/moto-api/data.json"
            with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
                data = json.load(resp)
            fetched = time.monotonic()
            fresh: dict[str, _IssuedCredential] = {}
            for item in data.get("sts", {}).get("AssumedRole", []) or []:
                akid = item.get("access_key_id")
                secret = item.get("secret_access_key")
                if akid and secret:
                    fresh[akid] = _IssuedCredential(
                        secret_access_key=secret,
                        session_token=item.get("session_token"),
                        role_arn=item.get("role_arn"),
                        fetched_at=fetched,
                    )
            with self._lock:
                self._creds = fresh
                self._last_fetch = fetched

    def _lookup(self, access_key_id: str) -> _IssuedCredential | None:
        with self._lock:
            cred = self._creds.get(access_key_id)
        if cred is not None and time.monotonic() - cred.fetched_at < self.credential_cache_seconds:
            return cred
        self._fetch_issued()
        with self._lock:
            return self._creds.get(access_key_id)

    # ----------------------------------------------------------- verification
    def verify(self, endpoint: str, db_user: str, token: str) -> Verdict:
        """Check ``token`` presented by ``db_user`` to the server at ``endpoint``.

        Records the decision (counters, :attr:`events`, the log file) and returns it.
        """
        try:
            verdict = self._verify(endpoint, db_user, token)
        except Exception as exc:  # never let a bug read as success
            verdict = Verdict(False, "malformed", f"verifier error: {type(exc).__name__}")
        self._record(endpoint, db_user, token, verdict)
        return verdict

    def _verify(self, endpoint: str, db_user: str, token: str) -> Verdict:
        if "/?" not in token:
            return Verdict(False, "malformed", "token is not a presigned URL")
        host_port, query = token.split("/?", 1)
        params: dict[str, str] = {}
        for part in query.split("&"):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                return Verdict(False, "malformed", f"query part without '=': {key[:40]!r}")
            key = unquote(key)
            if key in params:
                return Verdict(False, "malformed", f"duplicate parameter {key}")
            params[key] = unquote(value)
        required = (
            "Action",
            "DBUser",
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
        )
        missing = [name for name in required if name not in params]
        if missing:
            return Verdict(False, "malformed", f"missing parameters: {', '.join(missing)}")
        if host_port.lower() != endpoint.lower():
            return Verdict(
                False, "endpoint_mismatch", f"token is for {host_port!r}, server is {endpoint!r}"
            )
        if params["Action"] != "connect":
            return Verdict(False, "wrong_action", f"Action={params['Action']!r}")
        if params["DBUser"] != db_user:
            return Verdict(
                False,
                "db_user_mismatch",
                f"token DBUser={params['DBUser']!r}, login user={db_user!r}",
            )
        if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
            return Verdict(False, "wrong_algorithm", params["X-Amz-Algorithm"][:40])
        scope = params["X-Amz-Credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            return Verdict(False, "malformed", "bad X-Amz-Credential scope")
        access_key_id, scope_date, scope_region, scope_service, _ = scope
        if scope_service != "rds-db":
            return Verdict(False, "wrong_service", f"service={scope_service!r}")
        if scope_region != self.region:
            return Verdict(
                False, "wrong_region", f"region={scope_region!r}, expected {self.region!r}"
            )
        signed_headers = params["X-Amz-SignedHeaders"].lower().split(";")
        if "host" not in signed_headers or signed_headers != ["host"]:
            return Verdict(
                False, "unsigned_host_missing", f"SignedHeaders={params['X-Amz-SignedHeaders']!r}"
            )
        amz_date = params["X-Amz-Date"]
        try:
            issued = _parse_amz_date(amz_date)
            expires = int(params["X-Amz-Expires"])
        except ValueError:
            return Verdict(False, "malformed", "bad X-Amz-Date or X-Amz-Expires")
        if scope_date != amz_date[:8]:
            return Verdict(False, "malformed", "credential scope date differs from X-Amz-Date")
        if expires <= 0 or expires > 604800:
            return Verdict(False, "malformed", f"X-Amz-Expires={expires}")
        now = self.now()
        age = now - issued
        if age < -self.future_skew_seconds:
            return Verdict(False, "date_in_future", f"token dated {-age:.0f}s in the future")
        limit = min(float(expires), float(self.max_token_age_seconds))
        if age >= limit:
            return Verdict(False, "expired", f"token age {age:.0f}s >= limit {limit:.0f}s")

        cred = self._lookup(access_key_id)
        if cred is None:
            return Verdict(
                False,
                "unknown_access_key",
                f"access key {access_key_id} was not issued by STS",
                access_key_id=access_key_id,
            )
        presented_session = params.get("X-Amz-Security-Token")
        if cred.session_token is not None and not hmac.compare_digest(
            (presented_session or "").encode(), cred.session_token.encode()
        ):
            return Verdict(
                False,
                "security_token_mismatch",
                "X-Amz-Security-Token is not the session's",
                role_arn=cred.role_arn,
                access_key_id=access_key_id,
            )

        canonical_query = "&".join(
            f"{_uri_encode(k)}={_uri_encode(v)}"
            for k, v in sorted(params.items())
            if k != "X-Amz-Signature"
        )
        canonical_request = "\n".join(
            ["GET", "/", canonical_query, f"host:{host_port}", "", "host", _EMPTY_SHA256]
        )
        credential_scope = f"{scope_date}/{scope_region}/{scope_service}/aws4_request"
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                credential_scope,
                hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
            ]
        )
        signing_key = _hmac(("AWS4" + cred.secret_access_key).encode("utf-8"), scope_date)
        signing_key = _hmac(signing_key, scope_region)
        signing_key = _hmac(signing_key, scope_service)
        signing_key = _hmac(signing_key, "aws4_request")
        expected = hmac.new(signing_key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, params["X-Amz-Signature"]):
            return Verdict(
                False,
                "signature_mismatch",
                "signature does not match",
                role_arn=cred.role_arn,
                access_key_id=access_key_id,
            )
        if cred.role_arn is None or not self.is_allowed(cred.role_arn, db_user, endpoint):
            return Verdict(
                False,
                "role_not_allowed",
                f"{cred.role_arn} has no rds-db:connect on {db_user!r} at {endpoint}",
                role_arn=cred.role_arn,
                access_key_id=access_key_id,
            )
        return Verdict(
            True, "ok", f"token age {age:.0f}s", role_arn=cred.role_arn, access_key_id=access_key_id
        )

    def _record(self, endpoint: str, db_user: str, token: str, verdict: Verdict) -> None:
        event = VerificationEvent(
            time=time.time(),
            endpoint=endpoint,
            db_user=db_user,
            ok=verdict.ok,
            reason=verdict.reason,
            detail=verdict.detail,
            role_arn=verdict.role_arn,
            access_key_id=verdict.access_key_id,
            token_length=len(token),
        )
        with self._lock:
            if verdict.ok:
                self.verified += 1
            else:
                self.refused += 1
            self.events.append(event)
            try:
                with self.log_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(asdict(event), sort_keys=True) + "\n")
            except OSError:  # pragma: no cover - log is best effort
                _log.warning("cannot write verifier log %s", self.log_path)

    # ----------------------------------------------------------------- server
    def serve(self, socket_path: Path) -> None:
        """Listen on ``socket_path`` (mode 0666) for the PAM module, in a daemon thread."""
        if self._server is not None:
            return
        socket_path = Path(socket_path)
        if socket_path.exists():
            socket_path.unlink()
        verifier = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(10)
                try:
                    if _recv_exact(conn, len(_MAGIC)) != _MAGIC:
                        conn.sendall(b"DENY malformed\n")
                        return
                    endpoint = _recv_field(conn).decode("utf-8")
                    user = _recv_field(conn).decode("utf-8")
                    token = _recv_field(conn).decode("utf-8")
                except (OSError, ValueError, UnicodeDecodeError):
                    try:
                        conn.sendall(b"DENY malformed\n")
                    except OSError:
                        pass
                    return
                verdict = verifier.verify(endpoint, user, token)
                conn.sendall(b"OK\n" if verdict.ok else f"DENY {verdict.reason}\n".encode())

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self._server = Server(str(socket_path), Handler)
        os.chmod(socket_path, 0o666)  # noqa: S103 - PAM runs as the postgres/mysql users
        self.socket_path = socket_path
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aurora-iam-verifier", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.socket_path is not None and self.socket_path.exists():
            self.socket_path.unlink()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            raise ValueError("short read")
        chunks.extend(chunk)
    return bytes(chunks)


def _recv_field(conn: socket.socket) -> bytes:
    size = int.from_bytes(_recv_exact(conn, 4), "big")
    if size > _MAX_FIELD:
        raise ValueError("field too large")
    return _recv_exact(conn, size)
