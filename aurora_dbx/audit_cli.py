"""``aurora-dbx audit``: recent events of the policy's audit sink.

Needs only the policy (``--policy`` or ``AURORA_DBX_POLICY``): no identity, no AWS.
``jsonl:`` sinks are read from the file, ``table:`` sinks through the active Spark session
(a notebook, or a process that created one); the ``log`` sink went to the logging system and
cannot be read back (exit 1). Events are shown oldest first: the ``--limit`` most recent ones
that pass every filter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .audit import filter_events, parse_since, read_events, read_table_events, recent
from .redaction import scrub

__all__ = ["cmd_audit", "register"]

COLUMNS = ("time", "event", "outcome", "principal", "role", "db_user", "cluster", "table", "reason")


def _fail(message: str, status: int = 1) -> int:
    print(scrub(f"aurora-dbx: {message}"), file=sys.stderr)
    return status


def _load_policy(path: str | None) -> Any:
    from .policy import load_policy

    source = path or os.environ.get("AURORA_DBX_POLICY")
    spark = None if source else _active_spark()
    if spark is not None:
        try:
            source = spark.conf.get("spark.aurora_dbx.policy", None)
        except Exception:  # noqa: BLE001
            source = None
    if not source:
        from .errors import PolicyError

        raise PolicyError(
            "no access policy given: pass --policy PATH, set AURORA_DBX_POLICY "
            "or the Spark conf spark.aurora_dbx.policy",
            source="<none>",
        )
    return load_policy(source)


def _active_spark() -> Any:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return None
    return SparkSession.getActiveSession()


def _cell(e: dict[str, Any], column: str) -> str:
    if column == "role":
        value = e.get("role") or e.get("role_arn")
    else:
        value = e.get(column)
    return "-" if value is None or value == "" else str(value).replace("\n", " ")


def format_table(events: list[dict[str, Any]]) -> str:
    rows = [[_cell(e, c) for c in COLUMNS] for e in events]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_audit(args: argparse.Namespace) -> int:
    policy = _load_policy(args.policy)
    sink = policy.audit.sink
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as e:
        return _fail(str(e), 2)
    if args.limit < 0:
        return _fail("--limit must be 0 (all) or more", 2)
    filters = {
        "principal": args.principal,
        "role": args.role,
        "table": args.table,
        "event": args.event,
        "outcome": args.outcome,
        "since": since,
    }
    if sink == "log":
        return _fail(
            f"the audit sink of {policy.source} is 'log': events went to the aurora_dbx.audit "
            "logger and cannot be read back; use jsonl:<path> or table:<catalog.schema.table>"
        )
    if sink.startswith("jsonl:"):
        path = sink[len("jsonl:") :]
        if not os.path.exists(path):
            print(f"aurora-dbx: no audit events yet ({path} does not exist)", file=sys.stderr)
        events = recent(filter_events(read_events(path), **filters), args.limit)
    elif sink.startswith("table:"):
        table = sink[len("table:") :]
        spark = _active_spark()
        if spark is None:
            return _fail(
                f"the audit sink is table:{table}; reading it needs an active Spark "
                "session (run this in a notebook: aurora_dbx.cli.main(['audit']))"
            )
        try:
            events = read_table_events(spark, table, limit=args.limit, **filters)
        except Exception as e:  # noqa: BLE001 - one line, not a Java stack trace
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return _fail(f"cannot read the audit table {table}: {type(e).__name__}: {first}")
    else:  # the policy loader validates sinks; this is only for hand-built policies
        return _fail(f"unknown audit sink {sink!r}")
    if args.format == "json":
        sys.stdout.write(scrub(json.dumps(events, indent=2, sort_keys=True)) + "\n")
    elif events:
        sys.stdout.write(scrub(format_table(events)) + "\n")
    else:
        print("aurora-dbx: no audit events match", file=sys.stderr)
    return 0


def register(add: Any) -> None:
    p = add("audit", "show recent audit events from the policy's audit sink", cmd_audit)
    p.add_argument("--principal", help="only this user name or service principal id")
    p.add_argument("--role", help="only this policy role name or IAM role ARN")
    p.add_argument("--table", help="only this schema.table")
    p.add_argument("--event", help="only this event (assume_role, read, write, denied, connect)")
    p.add_argument("--outcome", choices=("ok", "denied", "error"), help="only this outcome")
    p.add_argument("--since", help="only events at or after this time: ISO-8601 or 30m, 24h, 7d")
    p.add_argument(
        "--limit", type=int, default=50, help="the N most recent events (0: all; default 50)"
    )
