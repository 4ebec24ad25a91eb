"""The token broker: how Spark tasks get fresh Aurora tokens without holding AWS secrets.

Spark is lazy and its tasks open connections on executors, possibly hours after
``read_table()`` and in many waves, long after any token minted at planning time has
expired. So nothing time-limited is baked into a plan. Instead the driver process runs a
small HTTP broker; each ``read_table``/``write_table`` registers a *grant* (this principal's
live role session for one role, one cluster, one database user) under an unguessable
capability id, and tasks ask the broker for a token at connect time. The broker answers
from the role session (refreshed ahead of expiry by botocore) and the token cache.

Executors therefore never receive AWS credentials, only 15-minute tokens scoped to one
database user on one host. The capability is not a credential: it is useless off the
cluster network, dies with the driver process, and only yields tokens for what the
principal was already granted. When the role session can no longer be refreshed the
broker answers with the reason, and the task fails with that one clear error.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib import error as urlerror
from urllib import request as urlrequest

from .errors import AuroraDbxError, CredentialError, SessionExpired
from .redaction import register_secret, scrub
from .tokens import Token

__all__ = ["BrokerTokenSource", "TokenBroker"]

log = logging.getLogger(__name__)
_MAX_BODY = 4096


@dataclass
class _Grant:
    source: Callable[[bool], Token]
    label: str  # who/what, for error messages (no secrets)


class TokenBroker:
    """An HTTP token broker in the driver process (one per process, started lazily)."""

    def __init__(self, bind: str = "127.0.0.1", advertise: str | None = None, port: int = 0):
        self._grants: dict[str, _Grant] = {}
        self._lock = threading.Lock()
        self.requests = 0
        broker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # never log request lines
                pass

            def do_POST(self) -> None:
                status, body = broker._handle(self)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((bind, port), Handler)
        self._server.daemon_threads = True
        host = advertise or bind
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="aurora-dbx-broker", daemon=True)
        self._thread.start()

    def grant(self, source: Callable[[bool], Token], label: str) -> str:
        """Register a token source; returns the capability tasks present to use it."""
        capability = secrets.token_urlsafe(32)
        register_secret(capability)
        with self._lock:
            self._grants[capability] = _Grant(source, label)
        return capability

    def revoke(self, capability: str) -> None:
        with self._lock:
            self._grants.pop(capability, None)

    def _handle(self, req: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        self.requests += 1
        if req.path != "/v1/token":
            return 404, {"error": "unknown path"}
        length = int(req.headers.get("Content-Length") or 0)
        if length <= 0 or length > _MAX_BODY:
            return 400, {"error": "bad request"}
        try:
            payload = json.loads(req.rfile.read(length))
            capability = str(payload["capability"])
            fresh = bool(payload.get("fresh", False))
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "bad request"}
        with self._lock:
            grant = self._grants.get(capability)
        if grant is None:
            return 403, {"error": "unknown or revoked capability: this DataFrame belongs to a "
                                  "driver session that has ended; call read_table() again"}
        try:
            token = grant.source(fresh)
        except SessionExpired as e:
            return 409, {"error": scrub(str(e)), "kind": "SessionExpired"}
        except AuroraDbxError as e:
            return 409, {"error": scrub(str(e)), "kind": type(e).__name__}
        except Exception as e:  # report, never crash the broker
            log.warning("token broker could not mint a token for %s: %s", grant.label, scrub(str(e)))
            return 500, {"error": scrub(f"{type(e).__name__}: {e}"), "kind": "Internal"}
        return 200, {"token": token.value, "minted_at": token.minted_at.isoformat(),
                     "expires_at": token.expires_at.isoformat(), "db_user": token.db_user}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class BrokerTokenSource:
    """The task side: ``source(fresh) -> Token`` over HTTP to the driver's broker.

    Picklable (URL and capability only); shipped inside the Spark data source reader.
    """

    def __init__(self, url: str, capability: str, timeout: float = 15.0):
        if not url.startswith("http://"):
            raise ValueError("the token broker URL must be http://host:port")
        self.url = url
        self.capability = capability
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"BrokerTokenSource({self.url!r}, capability=***)"

    def __call__(self, fresh: bool = False) -> Token:
        body = json.dumps({"capability": self.capability, "fresh": fresh}).encode()
        last: Exception | None = None
        for attempt in range(4):  # the driver may be briefly busy (GC, a long collect)
            req = urlrequest.Request(  # noqa: S310 - the URL is checked to be http:// in __init__
                self.url + "/v1/token", data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urlrequest.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - http:// to our driver
                    data = json.loads(resp.read())
                break
            except urlerror.HTTPError as e:
                try:
                    detail = json.loads(e.read()).get("error", "")
                except Exception:
                    detail = ""
                if e.code == 409:
                    kind = SessionExpired if "expired" in detail else CredentialError
                    raise kind(detail) from None
                raise CredentialError(f"the driver's token broker refused ({e.code}): {detail}") from None
            except (urlerror.URLError, OSError, TimeoutError) as e:
                last = e
                time.sleep(0.2 * 2**attempt)
        else:
            raise CredentialError(
                f"cannot reach the driver's token broker at {self.url} ({type(last).__name__}): "
                "executors must reach the driver (cluster networking), or the driver has exited"
            )
        register_secret(data["token"])
        return Token(data["token"], datetime.fromisoformat(data["minted_at"]),
                     datetime.fromisoformat(data["expires_at"]), data["db_user"])


_broker: TokenBroker | None = None
_broker_lock = threading.Lock()


def shared_broker(spark: Any = None) -> TokenBroker:
    """The process's broker, bound where executors can reach it.

    Local Spark (``local[...]`` master): loopback. A cluster: the driver's address
    (``spark.driver.host``), overridable with ``spark.aurora_dbx.broker.bindAddress``.
    """
    global _broker
    with _broker_lock:
        if _broker is None:
            bind, advertise = "127.0.0.1", None
            if spark is not None:
                conf = spark.sparkContext.getConf() if hasattr(spark, "sparkContext") else None
                master = conf.get("spark.master", "local") if conf else "local"
                override = conf.get("spark.aurora_dbx.broker.bindAddress", None) if conf else None
                if override:
                    bind = override
                    advertise = conf.get("spark.driver.host", override) if conf else None
                elif not master.startswith("local"):
                    advertise = conf.get("spark.driver.host", None) if conf else None
                    bind = "0.0.0.0"  # noqa: S104 - executors on other nodes must reach it
            _broker = TokenBroker(bind=bind, advertise=advertise)
        return _broker
