"""The audit trail: one structured event per role assumption, read, write and denial.

Sinks (policy ``audit.sink``):
- ``log``: JSON on the ``aurora_dbx.audit`` logger at INFO;
- ``jsonl:<path>``: one JSON object per line, appended with a single ``write`` on an
  ``O_APPEND`` descriptor under an exclusive ``flock``, so concurrent writers (threads,
  processes, executors on a shared volume) never interleave or tear lines;
- ``table:<catalog.schema.table>``: appended through Spark (a Delta table on Databricks).
  Local Spark has no Unity Catalog: use ``table:spark_catalog.<schema>.<table>`` there (the
  session catalog; a two-part ``schema.table`` is accepted by :class:`TableSink` too).

A ``jsonl:`` file needs a POSIX file system with appends (local disk, NFS/EFS with working
locks). Unity Catalog volumes and workspace files do not support appending: use the
``table:`` sink on Databricks.

With ``fail_closed: true`` an access whose event cannot be written is refused
(:class:`AuditError`); otherwise the failure is logged once as a warning.
Events never contain a token, secret key or session token: they are built from
explicit fields, and every string passes :func:`aurora_dbx.redaction.scrub`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from .errors import AuditError
from .redaction import scrub

__all__ = [
    "AuditEvent",
    "Auditor",
    "JsonlSink",
    "LogSink",
    "Sink",
    "TableSink",
    "filter_events",
    "parse_since",
    "read_events",
    "read_table_events",
    "recent",
    "sink_for",
]

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
    time: str = field(
        default_factory=lambda: (
            datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
    )
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
    duration_ms: int | None = None  # read_table: time to a ready DataFrame; write_table: whole write

    def to_json(self) -> str:
        data = {
            k: (scrub(v) if isinstance(v, str) else v)
            for k, v in asdict(self).items()
            if v is not None
        }
        return json.dumps(data, sort_keys=True, ensure_ascii=False)


class Sink(Protocol):
    def write(self, event: AuditEvent) -> None: ...


class LogSink:
    def write(self, event: AuditEvent) -> None:
        audit_log.info(event.to_json())

    def __repr__(self) -> str:
        return "LogSink()"


class JsonlSink:
    """Appends one line per event; safe with concurrent threads and processes.

    Each event is one ``write`` on an ``O_APPEND`` descriptor while holding an exclusive
    ``flock`` on the file: writers never interleave or tear lines. A file system without
    ``flock`` (some network mounts) still gets the single ``O_APPEND`` write.
    """

    _NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)

    def __init__(self, path: str):
        self.path = path

    def write(self, event: AuditEvent) -> None:
        line = (event.to_json() + "\n").encode("utf-8")
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                if e.errno not in self._NO_LOCKS:
                    raise
            view = memoryview(line)
            while view:  # a short write on a full disk must not leave half a line silently
                n = os.write(fd, view)
                view = view[n:]
        finally:
            os.close(fd)  # closing releases the lock

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"


_TABLE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*){1,2}$")


def _quote_table(name: str) -> str:
    if not _TABLE_NAME.match(name):
        raise AuditError(f"audit table {name!r} is not [catalog.]schema.table")
    return ".".join(f"`{part}`" for part in name.split("."))


class TableSink:
    """Appends events to a table through Spark (Delta on Databricks).

    The table is created on the first event (all columns STRING except ``rows`` and ``duration_ms``, BIGINT).
    Appends resolve columns by name; fields the table does not have yet are added by
    Delta's schema evolution, and on formats without it they are left out (warned once).
    On local Spark name the session catalog: ``spark_catalog.default.audit_events``.
    """

    def __init__(self, table: str, spark: Any = None):
        self.table = table
        self._quoted = _quote_table(table)
        self._spark = spark
        self._columns: list[str] | None = None
        self._lock = threading.Lock()
        self._warned = False

    def spark(self) -> Any:
        spark = self._spark
        if spark is None:
            from pyspark.sql import SparkSession

            spark = SparkSession.getActiveSession()
        if spark is None:
            raise AuditError(f"audit sink table:{self.table} needs an active Spark session")
        return spark

    @staticmethod
    def row(event: AuditEvent) -> dict[str, Any]:
        return {k: (scrub(v) if isinstance(v, str) else v) for k, v in asdict(event).items()}

    def write(self, event: AuditEvent) -> None:
        spark = self.spark()
        row = self.row(event)
        with self._lock:
            if self._columns is None and spark.catalog.tableExists(self.table):
                self._columns = list(spark.table(self._quoted).columns)
            extra = [k for k in row if self._columns is not None and k not in self._columns]
            if extra and any(row[k] is not None for k in extra):
                try:
                    self._append(spark, row, merge=True)
                    self._columns = None  # re-read: the table gained columns
                    return
                except Exception as e:  # noqa: BLE001 - no schema evolution here
                    if not self._warned:
                        self._warned = True
                        log.warning(
                            "audit table %s lacks columns %s and cannot add them (%s); "
                            "writing the other fields",
                            self.table,
                            ", ".join(extra),
                            type(e).__name__,
                        )
            if extra:
                row = {k: v for k, v in row.items() if k not in extra}
            self._append(spark, row, merge=False)
            if self._columns is None:
                self._columns = list(row)

    def _append(self, spark: Any, row: dict[str, Any], *, merge: bool) -> None:
        schema = ", ".join(f"`{k}` {'BIGINT' if k in ('rows', 'duration_ms') else 'STRING'}" for k in row)
        writer = spark.createDataFrame([row], schema=schema).write.mode("append")
        if merge:
            writer = writer.option("mergeSchema", "true")
        writer.saveAsTable(self.table)

    def __repr__(self) -> str:
        return f"TableSink({self.table!r})"


def sink_for(spec: str, spark: Any = None) -> Sink:
    if spec == "log":
        return LogSink()
    if spec.startswith("jsonl:"):
        return JsonlSink(spec[len("jsonl:") :])
    if spec.startswith("table:"):
        return TableSink(spec[len("table:") :], spark)
    raise AuditError(
        f"unknown audit sink {spec!r}; use log, jsonl:<path> or table:<catalog.schema.table>"
    )


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
                log.warning(
                    "audit events cannot be written to %r (%s); continuing because the "
                    "policy is not fail-closed",
                    self.sink,
                    reason,
                )


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


def read_table_events(
    spark: Any, sink_table: str, /, *, limit: int | None = None, **filters: Any
) -> list[dict[str, Any]]:
    """Events of a ``table:`` sink, oldest first: the ``limit`` most recent matching ``filters``
    (the keyword arguments of :func:`filter_events`), filtered in Spark first."""
    from pyspark.sql import functions as F

    df = spark.table(_quote_table(sink_table))
    cols = set(df.columns)
    if filters.get("principal") and "principal" in cols:
        df = df.where(F.col("principal") == filters["principal"])
    if filters.get("table") and "table" in cols:
        df = df.where(F.col("table") == filters["table"])
    if filters.get("event") and "event" in cols:
        df = df.where(F.col("event") == filters["event"])
    if filters.get("outcome") and "outcome" in cols:
        df = df.where(F.col("outcome") == filters["outcome"])
    if filters.get("role"):
        cond = F.lit(False)
        for c in ("role", "role_arn"):
            if c in cols:
                cond = cond | (F.col(c) == filters["role"])
        df = df.where(cond)
    since = filters.get("since")
    if since is not None:  # times are fixed-width ISO-8601 UTC strings: they sort as text
        df = df.where(F.col("time") >= _iso(since))
    df = df.orderBy(F.col("time").desc())
    if limit:
        df = df.limit(limit)
    rows = [{k: v for k, v in r.asDict().items() if v is not None} for r in df.collect()]
    return recent(filter_events(rows, **filters), limit)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event_time(e: dict[str, Any]) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(e.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def filter_events(
    events: Iterable[dict[str, Any]],
    *,
    principal: str | None = None,
    role: str | None = None,
    table: str | None = None,
    since: datetime | None = None,
    event: str | None = None,
    outcome: str | None = None,
) -> list[dict[str, Any]]:
    """Events matching every given filter; ``role`` matches the role name or its ARN."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    out = []
    for e in events:
        if principal and str(e.get("principal", "")).casefold() != principal.casefold():
            continue
        if role and role not in (e.get("role"), e.get("role_arn")):
            continue
        if table and e.get("table") != table:
            continue
        if event and e.get("event") != event:
            continue
        if outcome and e.get("outcome") != outcome:
            continue
        if since is not None:
            t = _event_time(e)
            if t is None or t < since:
                continue
        out.append(e)
    return out


def recent(events: Iterable[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The ``limit`` most recent events (all if falsy), oldest first."""
    ordered = sorted(events, key=lambda e: str(e.get("time", "")))  # stable: file order on ties
    return ordered[-limit:] if limit else ordered


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``24h``, ``7d``, ``30m``, ``2w``, ``90s`` ago, or an ISO-8601 time (naive = UTC)."""
    now = now or datetime.now(timezone.utc)
    m = _RELATIVE.match(text)
    if m:
        return now - timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a relative age (30m, 24h, 7d, 2w) nor an ISO-8601 time"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
