"""A loopback HTTP proxy in front of moto's STS that records requests and injects faults.

It sits exactly at the network boundary boto3 talks to (``AWS_ENDPOINT_URL_STS``), so
tests see what the real client sends (SourceIdentity, session tags, how many calls) and
can make STS throttle, fail with 5xx, hang or deny, then recover.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

THROTTLE = (400, "Throttling", "Rate exceeded")
UNAVAILABLE = (503, "ServiceUnavailable", "Service is unavailable")
INTERNAL = (500, "InternalFailure", "internal failure")
DENIED = (403, "AccessDenied", "User is not authorized to perform: sts:AssumeRole")


@dataclass
class Fault:
    """Answer the next ``times`` AssumeRole calls with an error or a delay."""

    times: int
    error: tuple[int, str, str] | None = None
    delay: float = 0.0


@dataclass
class StsProxy:
    upstream: str
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    on_request: Callable[[dict[str, list[str]]], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        proxy = self
        up = urlparse(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # STS is a query protocol over POST
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                form = parse_qs(body.decode(), keep_blank_values=True)
                fault = None
                with proxy._lock:
                    if form.get("Action", [""])[0].startswith("AssumeRole"):
                        proxy.requests.append(form)
                        if proxy.faults:
                            fault = proxy.faults[0]
                            fault.times -= 1
                            if fault.times <= 0:
                                proxy.faults.pop(0)
                if fault is not None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.error is not None:
                        status, code, message = fault.error
                        payload = (
                            '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                            f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
                            "</Error><RequestId>fault-injected</RequestId></ErrorResponse>"
                        ).encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "text/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def assume_role_calls(self, role_arn: str | None = None) -> list[dict[str, list[str]]]:
        with self._lock:
            return [r for r in self.requests if role_arn is None or r.get("RoleArn") == [role_arn]]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
