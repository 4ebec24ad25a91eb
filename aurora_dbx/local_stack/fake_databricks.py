"""A loopback stand-in for the Databricks workspace identity API (SCIM ``Me``).

Only what identity resolution needs is served, shaped like the real workspace:

* ``GET /api/2.0/preview/scim/v2/Me`` with ``Authorization: Bearer <token>`` returns
  the principal registered for that token. Users have ``userName`` = e-mail; service
  principals have ``userName`` = their application id (a UUID) and ``displayName`` =
  their name, as the real workspace answers for a service principal's token.
* ``GET /.well-known/databricks-config`` (unauthenticated host metadata the
  databricks-sdk probes when a client is configured) answers ``workspace_id``,
  ``cloud`` and ``oidc_endpoint`` like an AWS workspace.
* Unknown or missing tokens get ``401`` with a Databricks-style JSON error
  (``{"error_code": "UNAUTHENTICATED", "message": ...}``); unknown paths get ``404``
  ``ENDPOINT_NOT_FOUND``.
* Fault injection: :attr:`FakeDatabricksWorkspace.delay_seconds` delays every answer;
  :attr:`FakeDatabricksWorkspace.down` answers ``503 TEMPORARILY_UNAVAILABLE``
  (note that the databricks-sdk retries 503/429 until its ``retry_timeout_seconds``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["DatabricksPrincipal", "FakeDatabricksWorkspace", "PrincipalKind"]

PrincipalKind = Literal["user", "service_principal"]

_USER_SCHEMAS = [
    "urn:ietf:params:scim:schemas:core:2.0:User",
    "urn:ietf:params:scim:schemas:extension:workspace:2.0:User",
]


def _stable_id(seed: str, digits: int = 16) -> str:
    return str(int(hashlib.sha256(seed.encode()).hexdigest(), 16))[:digits]


@dataclass
class DatabricksPrincipal:
    """A workspace principal answered for one bearer token."""

    kind: PrincipalKind
    user_name: str
    display_name: str
    groups: list[str] = field(default_factory=list)
    id: str = ""
    active: bool = True

    def scim(self) -> dict[str, object]:
        """The SCIM ``Me`` document the workspace returns for this principal."""
        groups = [
            {
                "display": g,
                "type": "direct",
                "value": _stable_id("group:" + g),
                "$ref": f"Groups/{_stable_id('group:' + g)}",
            }
            for g in self.groups
        ]
        doc: dict[str, object] = {
            "schemas": list(_USER_SCHEMAS),
            "id": self.id,
            "userName": self.user_name,
            "displayName": self.display_name,
            "active": self.active,
            "groups": groups,
            "entitlements": [{"value": "workspace-access"}, {"value": "databricks-sql-access"}],
        }
        if self.kind == "user":
            doc["emails"] = [{"type": "work", "value": self.user_name, "primary": True}]
            given, _, family = self.display_name.partition(" ")
            doc["name"] = {"givenName": given, "familyName": family}
        return doc


class FakeDatabricksWorkspace:
    """Threaded loopback HTTP server answering the workspace SCIM ``Me`` endpoint."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, workspace_id: str = "1234567890123456"
    ) -> None:
        self.workspace_id = workspace_id
        self.delay_seconds: float = 0.0
        self.down: bool = False
        self.requests: list[tuple[str, str]] = []  # (method, path) seen, for tests
        self._principals: dict[str, DatabricksPrincipal] = {}
        self._lock = threading.Lock()
        self._bind = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("fake Databricks workspace is not running")
        host, port = self._server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host_text}:{port}"

    def add_principal(
        self,
        token: str,
        *,
        user_name: str,
        kind: PrincipalKind = "user",
        groups: list[str] | None = None,
        display_name: str | None = None,
    ) -> DatabricksPrincipal:
        """Register the principal answered for ``token``.

        For a service principal, ``user_name`` is its application id (a UUID); pass
        its name as ``display_name``. A non-UUID ``user_name`` for a service principal
        is taken as its name and a stable application id is derived from it.
        """
        if kind not in ("user", "service_principal"):
            raise ValueError(f"kind must be 'user' or 'service_principal', not {kind!r}")
        if kind == "service_principal":
            try:
                uuid.UUID(user_name)
                app_id = user_name
                name = display_name or user_name
            except ValueError:
                app_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "databricks-sp:" + user_name))
                name = display_name or user_name
            principal = DatabricksPrincipal(
                kind=kind,
                user_name=app_id,
                display_name=name,
                groups=list(groups or []),
                id=_stable_id("sp:" + app_id),
            )
        else:
            principal = DatabricksPrincipal(
                kind=kind,
                user_name=user_name,
                display_name=display_name or user_name.split("@")[0],
                groups=list(groups or []),
                id=_stable_id("user:" + user_name),
            )
        with self._lock:
            self._principals[token] = principal
        return principal

    def remove_principal(self, token: str) -> None:
        with self._lock:
            self._principals.pop(token, None)

    def principal_for(self, token: str) -> DatabricksPrincipal | None:
        with self._lock:
            return self._principals.get(token)

    def start(self) -> None:
        if self._server is not None:
            return
        workspace = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "FakeDatabricks/1.0"
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

            def _send(self, status: int, body: dict[str, object]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _handle(self) -> None:
                path = urlsplit(self.path).path
                workspace.requests.append((self.command, path))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if workspace.delay_seconds > 0:
                    time.sleep(workspace.delay_seconds)
                if workspace.down:
                    self._send(
                        503,
                        {
                            "error_code": "TEMPORARILY_UNAVAILABLE",
                            "message": "The service at /api/2.0 is temporarily unavailable.",
                        },
                    )
                    return
                if self.command == "GET" and path == "/.well-known/databricks-config":
                    self._send(
                        200,
                        {
                            "oidc_endpoint": f"{workspace.url}/oidc",
                            "workspace_id": workspace.workspace_id,
                            "cloud": "aws",
                        },
                    )
                    return
                auth = self.headers.get("Authorization", "")
                token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
                principal = workspace.principal_for(token) if token else None
                if principal is None:
                    self._send(
                        401, {"error_code": "UNAUTHENTICATED", "message": "Invalid access token."}
                    )
                    return
                if self.command == "GET" and path.rstrip("/") == "/api/2.0/preview/scim/v2/Me":
                    self._send(200, principal.scim())
                    return
                self._send(
                    404,
                    {
                        "error_code": "ENDPOINT_NOT_FOUND",
                        "message": f"No API found for '{self.command} {path}'",
                    },
                )

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle
            do_PATCH = _handle
            do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(self._bind, Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-databricks", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
