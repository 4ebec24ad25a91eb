"""The audit trail: one structured event per role assumption, read, write and denial.

Sinks (policy ``audit.sink``):
- ``log``: JSON on the ``aurora_dbx.audit`` logger at INFO;
- ``jsonl:<path>``: one JSON object per line, appended with a single ``write`` on an
  ``O_APPEND`` descriptor under an exclusive ``flock``, so concurrent writers (threads,
  processes, executors on a shared volume) never interleave or tear lines;
- ``table:<catalog.schema.table>``: appended through Spark (a Delta table on Databricks).

With ``fail_closed: true`` an access whose event cannot be written is refused
(:class:`AuditError`); otherwise the failure is logged once as a warning.
Events never contain a token, secret key or session token: they are built from
explicit fields, and every string passes :func:`aurora_dbx.redaction.scrub`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .errors import AuditError
from .redaction import scrub

__all__ = ["AuditEvent", "Auditor", "JsonlSink", "LogSink", "Sink", "TableSink", "read_events", "sink_for"]

audit_log = logging.getLogger("aurora_dbx.audit")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEvent:
    """One audit record; field names are part of the public contract."""

    event: str  # assume_role | read | write | denied | connect
    outcome: str  # ok | denied | error
    principal: str
    principal_type: str
    role_arn: str | None = None
    db_user: str | None = None
    cluster: str | None = None
    table: str | None = None
    reason: str | None = None
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"))
    role: str | None = None
    project: str | None = None
    sts_request_id: str | None = None
    credential_expires_at: str | None = None
    session_name: str | None = None
    source_identity: str | None = None
    rows: int | None = None
    mode: str | None = None
    job_id: str | None = None
    run_id: str | None = None
    mlflow_run_id: str | None = None

    def to_json(self) -> str:
        data = {k: (scrub(v) if isinstance(v, str) else v) for k, v in asdict(self).items() if v is not None}
        return json.dumps(data, sort_keys=True, ensure_ascii=False)


class Sink(Protocol):
    def write(self, event: AuditEvent) -> None: ...


class LogSink:
    def write(self, event: AuditEvent) -> None:
        audit_log.info(event.to_json())

    def __repr__(self) -> str:
        return "LogSink()"


class JsonlSink:
    def __init__(self, path: str):
        self.path = path

    def write(self, event: AuditEvent) -> None:
        line = (event.to_json() + "\n").encode("utf-8")
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(line)
            while view:  # a short write on a full disk must not leave half a line silently
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"


class TableSink:
    """Appends events to a table through Spark (Delta on Databricks)."""

    def __init__(self, table: str, spark: Any = None):
        self.table = table
        self._spark = spark

    def write(self, event: AuditEvent) -> None:
        from pyspark.sql import SparkSession

        spark = self._spark or SparkSession.getActiveSession()
        if spark is None:
            raise AuditError(f"audit sink table:{self.table} needs an active Spark session")
        row = {k: (scrub(v) if isinstance(v, str) else v) for k, v in asdict(event).items()}
        schema = ", ".join(f"`{k}` {'BIGINT' if k == 'rows' else 'STRING'}" for k in row)
        spark.createDataFrame([row], schema=schema).write.mode("append").saveAsTable(self.table)

    def __repr__(self) -> str:
        return f"TableSink({self.table!r})"


def sink_for(spec: str, spark: Any = None) -> Sink:
    if spec == "log":
        return LogSink()
    if spec.startswith("jsonl:"):
        return JsonlSink(spec[len("jsonl:") :])
    if spec.startswith("table:"):
        return TableSink(spec[len("table:") :], spark)
    raise AuditError(f"unknown audit sink {spec!r}; use log, jsonl:<path> or table:<catalog.schema.table>")


class Auditor:
    """Writes events to a sink; fail-closed or warn-once on failure."""

    def __init__(self, sink: Sink, *, fail_closed: bool = False):
        self.sink = sink
        self.fail_closed = fail_closed
        self._warned = False
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        try:
            self.sink.write(event)
        except Exception as e:
            reason = scrub(f"{type(e).__name__}: {e}")
            if self.fail_closed:
                raise AuditError(
                    f"the audit event for this {event.event} could not be written to {self.sink!r} "
                    f"({reason}) and the policy is fail-closed, so access is refused; fix the sink"
                ) from None
            with self._lock:
                first, self._warned = not self._warned, True
            if first:
                log.warning("audit events cannot be written to %r (%s); continuing because the "
                            "policy is not fail-closed", self.sink, reason)


def read_events(path: str) -> Iterator[dict[str, Any]]:
    """Events of a ``jsonl:`` sink, oldest first; torn or foreign lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    yield data
    except FileNotFoundError:
        return


def filter_events(
    events: Iterable[dict[str, Any]], *, principal: str | None = None, role: str | None = None,
    table: str | None = None, since: datetime | None = None, event: str | None = None,
) -> list[dict[str, Any]]:
    out = []
    for e in events:
        if principal and e.get("principal") != principal:
            continue
        if role and role not in (e.get("role"), e.get("role_arn")):
            continue
        if table and e.get("table") != table:
            continue
        if event and e.get("event") != event:
            continue
        if since is not None:
            try:
                t = datetime.fromisoformat(str(e.get("time", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if t < since:
                continue
        out.append(e)
    return out
