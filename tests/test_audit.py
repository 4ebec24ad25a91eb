"""Audit sinks (log, jsonl, table), concurrency, fail-closed, and ``aurora-dbx audit``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from aurora_dbx import cli
from aurora_dbx.audit import (
    AuditEvent,
    Auditor,
    JsonlSink,
    LogSink,
    TableSink,
    filter_events,
    parse_since,
    read_events,
    read_table_events,
    recent,
    sink_for,
)
from aurora_dbx.errors import AuditError
from aurora_dbx.redaction import register_secret

ROOT = Path(__file__).resolve().parents[1]
READ_ARN = "arn:aws:iam::123456789012:role/aurora-analyst-read"
WRITE_ARN = "arn:aws:iam::123456789012:role/aurora-pipeline-write"
NOW = datetime.now(timezone.utc)


def ts(delta: timedelta) -> str:
    return (NOW - delta).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sample_events() -> list[AuditEvent]:
    """Seven events over ten days, written out of time order on purpose."""
    common = {"cluster": "analytics", "project": "churn-model"}
    return [
        AuditEvent(
            "assume_role",
            "ok",
            "analyst@example.com",
            "user",
            READ_ARN,
            "analyst_ro",
            role="analyst-read",
            time=ts(timedelta(days=10)),
            **common,
        ),
        AuditEvent(
            "read",
            "ok",
            "analyst@example.com",
            "user",
            READ_ARN,
            "analyst_ro",
            table="public.customers",
            role="analyst-read",
            time=ts(timedelta(days=9)),
            **common,
        ),
        AuditEvent(
            "denied",
            "denied",
            "mallory@example.com",
            "user",
            table="secret.salaries",
            reason="user 'mallory@example.com' may not read secret.salaries: no binding",
            time=ts(timedelta(hours=30)),
            **common,
        ),
        AuditEvent(
            "write",
            "ok",
            "6a1c2f0e-1111-2222-3333-444455556666",
            "service_principal",
            WRITE_ARN,
            "pipeline_rw",
            table="features.scores",
            role="pipeline-write",
            rows=2,
            mode="upsert",
            time=ts(timedelta(hours=2)),
            **common,
        ),
        AuditEvent(
            "read",
            "ok",
            "analyst@example.com",
            "user",
            READ_ARN,
            "analyst_ro",
            table="features.customer_ltv",
            role="analyst-read",
            time=ts(timedelta(hours=3)),
            **common,
        ),
        AuditEvent(
            "read",
            "error",
            "analyst@example.com",
            "user",
            READ_ARN,
            "analyst_ro",
            table="public.customers",
            role="analyst-read",
            reason="connection reset",
            time=ts(timedelta(minutes=5)),
            **common,
        ),
        AuditEvent(
            "read",
            "ok",
            "analyst@example.com",
            "user",
            READ_ARN,
            "analyst_ro",
            table="public.customers",
            role="analyst-read",
            time=ts(timedelta(minutes=1)),
            **common,
        ),
    ]


def policy_file(tmp_path: Path, sink: str, fail_closed: bool = False) -> Path:
    policy = {
        "version": 1,
        "project": "churn-model",
        "clusters": {
            "analytics": {
                "engine": "postgresql",
                "host": "analytics.example.com",
                "port": 5432,
                "database": "analytics",
                "region": "us-east-1",
            }
        },
        "roles": {
            "analyst-read": {
                "cluster": "analytics",
                "iam_role_arn": READ_ARN,
                "db_user": "analyst_ro",
                "access": "read",
                "tables": ["public.*"],
            }
        },
        "bindings": [{"user": "analyst@example.com", "roles": ["analyst-read"]}],
        "audit": {"sink": sink, "fail_closed": fail_closed},
    }
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture
def no_identity(monkeypatch):
    """The audit command must work with no Databricks identity and no AWS at all."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "DATABRICKS_", "AURORA_DBX_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:1")  # any STS call would fail


# -- event format and sinks ---------------------------------------------------------------


def test_event_json_has_the_contract_fields_and_utc_time():
    e = AuditEvent(
        "read",
        "ok",
        "analyst@example.com",
        "user",
        READ_ARN,
        "analyst_ro",
        "analytics",
        "public.customers",
    )
    data = json.loads(e.to_json())
    assert {
        "time",
        "event",
        "outcome",
        "principal",
        "principal_type",
        "role_arn",
        "db_user",
        "cluster",
        "table",
    } <= set(data)
    assert "reason" not in data  # absent fields are left out, not null
    assert data["time"].endswith("Z") and datetime.fromisoformat(
        data["time"].replace("Z", "+00:00")
    )


def test_log_sink_writes_json_on_the_audit_logger(caplog):
    with caplog.at_level(logging.INFO, logger="aurora_dbx.audit"):
        Auditor(sink_for("log")).emit(sample_events()[1])
    (record,) = [r for r in caplog.records if r.name == "aurora_dbx.audit"]
    assert json.loads(record.getMessage())["table"] == "public.customers"


def test_jsonl_sink_appends_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    auditor = Auditor(sink_for(f"jsonl:{path}"))
    for e in sample_events():
        auditor.emit(e)
    with open(path, "a") as f:
        f.write('{"torn": \n')  # a foreign or torn line is skipped, not fatal
    events = list(read_events(str(path)))
    assert [e["event"] for e in events] == [e.event for e in sample_events()]
    assert list(read_events(str(tmp_path / "missing.jsonl"))) == []


WRITER = textwrap.dedent("""
    import sys, threading
    from aurora_dbx.audit import AuditEvent, Auditor, JsonlSink
    path, proc = sys.argv[1], int(sys.argv[2])
    auditor = Auditor(JsonlSink(path), fail_closed=True)
    def work(thread):
        for i in range(50):
            auditor.emit(AuditEvent("read", "ok", f"p{proc}@example.com", "user",
                                    table=f"s{proc}.t{thread}_{i}", reason="x" * 6000))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def test_jsonl_sink_with_8_processes_x_200_events_from_4_threads_each(tmp_path):
    path = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(p)], env=env)
        for p in range(8)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every event ends with its newline
    events = [json.loads(line) for line in lines[:-1]]  # every line parses
    assert len(events) == 8 * 200
    assert len({e["table"] for e in events}) == 8 * 200
    assert all(len(e["reason"]) == 6000 for e in events)


def unwritable(tmp_path: Path) -> str:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, not a directory")  # even root cannot mkdir under it
    return f"jsonl:{blocker}/sub/audit.jsonl"


def test_fail_closed_raises_when_the_sink_cannot_be_written(tmp_path):
    auditor = Auditor(sink_for(unwritable(tmp_path)), fail_closed=True)
    with pytest.raises(AuditError, match="could not be written.*fail-closed, so access is refused"):
        auditor.emit(sample_events()[1])


def test_fail_open_warns_once_and_continues(tmp_path, caplog):
    auditor = Auditor(sink_for(unwritable(tmp_path)), fail_closed=False)
    with caplog.at_level(logging.WARNING, logger="aurora_dbx.audit"):
        for e in sample_events():
            auditor.emit(e)
    warnings = [
        r for r in caplog.records if r.name == "aurora_dbx.audit" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and "not fail-closed" in warnings[0].getMessage()


def test_secrets_never_reach_a_jsonl_sink(tmp_path):
    secret = "FAKE-secret-access-key-9f8e7d6c5b4a"  # noqa: S105 - a fake, registered below
    register_secret(secret)
    path = tmp_path / "audit.jsonl"
    Auditor(JsonlSink(str(path))).emit(
        AuditEvent(
            "read",
            "error",
            "analyst@example.com",
            "user",
            table="public.customers",
            reason=f"failed with {secret} and X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE&x=1",
        )
    )
    text = path.read_text()
    assert secret not in text and "IQoJb3JpZ2luX2VjEXAMPLE" not in text and "***" in text


# -- filters ------------------------------------------------------------------------------


def test_filters_and_recent():
    events = [json.loads(e.to_json()) for e in sample_events()]
    assert len(filter_events(events, principal="ANALYST@example.com")) == 5
    assert len(filter_events(events, role="analyst-read")) == 5
    assert len(filter_events(events, role=WRITE_ARN)) == 1
    assert [e["event"] for e in filter_events(events, table="secret.salaries")] == ["denied"]
    assert len(filter_events(events, since=parse_since("24h"))) == 4
    assert len(filter_events(events, event="read", outcome="error")) == 1
    latest = recent(events, 2)
    assert [e["time"] for e in latest] == sorted(e["time"] for e in events)[-2:]
    assert recent(events, 0) == sorted(events, key=lambda e: e["time"])


def test_parse_since():
    now = datetime(2025, 1, 10, tzinfo=timezone.utc)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2025-01-01T00:00:00Z") == datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert parse_since("2025-01-01") == datetime(2025, 1, 1, tzinfo=timezone.utc)  # naive = UTC
    with pytest.raises(ValueError, match="neither a relative age"):
        parse_since("yesterday")


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def jsonl_policy(tmp_path):
    path = tmp_path / "audit.jsonl"
    auditor = Auditor(JsonlSink(str(path)))
    for e in sample_events():
        auditor.emit(e)
    return policy_file(tmp_path, f"jsonl:{path}")


def run_cli(capsys, *argv):
    status = cli.main(["audit", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_json_filters(jsonl_policy, capsys, no_identity):
    p = str(jsonl_policy)
    status, out, _ = run_cli(capsys, "--policy", p, "--format", "json")
    assert status == 0 and len(json.loads(out)) == 7
    _, out, _ = run_cli(
        capsys, "--policy", p, "--format", "json", "--principal", "mallory@example.com"
    )
    assert [e["table"] for e in json.loads(out)] == ["secret.salaries"]
    _, out, _ = run_cli(capsys, "--policy", p, "--format", "json", "--role", "pipeline-write")
    assert [e["table"] for e in json.loads(out)] == ["features.scores"]
    _, out, _ = run_cli(
        capsys, "--policy", p, "--format", "json", "--role", READ_ARN, "--table", "public.customers"
    )
    assert len(json.loads(out)) == 3
    _, out, _ = run_cli(capsys, "--policy", p, "--format", "json", "--event", "denied")
    assert [e["principal"] for e in json.loads(out)] == ["mallory@example.com"]
    _, out, _ = run_cli(capsys, "--policy", p, "--format", "json", "--since", "24h")
    assert len(json.loads(out)) == 4
    _, out, _ = run_cli(
        capsys, "--policy", p, "--format", "json", "--since", ts(timedelta(hours=2, minutes=30))
    )
    assert len(json.loads(out)) == 3
    _, out, _ = run_cli(capsys, "--policy", p, "--format", "json", "--limit", "2")
    got = json.loads(out)
    assert [e["time"] for e in got] == [ts(timedelta(minutes=5)), ts(timedelta(minutes=1))]
    _, out, _ = run_cli(capsys, "--policy", p, "--format", "json", "--outcome", "error")
    assert [e["reason"] for e in json.loads(out)] == ["connection reset"]


def test_cli_text_is_an_aligned_table(jsonl_policy, capsys, no_identity, monkeypatch):
    monkeypatch.setenv("AURORA_DBX_POLICY", str(jsonl_policy))  # found without --policy
    status, out, _ = run_cli(capsys, "--limit", "3")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 4
    header = lines[0]
    assert header.split() == [
        "TIME",
        "EVENT",
        "OUTCOME",
        "PRINCIPAL",
        "ROLE",
        "DB_USER",
        "CLUSTER",
        "TABLE",
        "REASON",
    ]
    for column in ("EVENT", "PRINCIPAL", "TABLE", "REASON"):
        start = header.index(column)
        for line in lines[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", (column, line)
    assert "6a1c2f0e-1111-2222-3333-444455556666" in out and "pipeline-write" in out


def test_cli_no_match_and_bad_since(jsonl_policy, capsys, no_identity):
    status, out, err = run_cli(capsys, "--policy", str(jsonl_policy), "--table", "nope.nope")
    assert status == 0 and out == "" and "no audit events match" in err
    status, out, err = run_cli(capsys, "--policy", str(jsonl_policy), "--since", "yesterday")
    assert status == 2 and len(err.strip().splitlines()) == 1


def test_cli_log_sink_cannot_be_read_back(tmp_path, capsys, no_identity):
    status, out, err = run_cli(capsys, "--policy", str(policy_file(tmp_path, "log")))
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot be read back" in err


def test_cli_without_a_policy_is_a_one_line_error(capsys, no_identity):
    status, _, err = run_cli(capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "AURORA_DBX_POLICY" in err


def test_cli_table_sink_without_spark_is_a_one_line_error(
    tmp_path, capsys, no_identity, monkeypatch
):
    monkeypatch.setattr("aurora_dbx.audit_cli._active_spark", lambda: None)
    status, _, err = run_cli(
        capsys, "--policy", str(policy_file(tmp_path, "table:main.audit.events"))
    )
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Spark session" in err


# -- table sink on real local Spark ----------------------------------------------------------


# `spark` is the run's shared session (tests/conftest.py): one JVM, with the JDBC drivers.


@pytest.mark.slow
def test_table_sink_writes_filters_and_cli_reads(spark, tmp_path, capsys, no_identity):
    table = f"spark_catalog.default.audit_{uuid.uuid4().hex[:8]}"  # local Spark: session catalog
    auditor = Auditor(sink_for(f"table:{table}", spark), fail_closed=True)
    for e in sample_events():
        auditor.emit(e)
    rows = spark.table(table).collect()
    assert len(rows) == 7 and {r["event"] for r in rows} == {
        "assume_role",
        "read",
        "denied",
        "write",
    }
    assert dict(spark.table(table).dtypes)["rows"] == "bigint"
    got = read_table_events(
        spark, table, limit=2, principal="analyst@example.com", table="public.customers"
    )
    assert [e["outcome"] for e in got] == ["error", "ok"] and got[0]["reason"] == "connection reset"
    assert [
        e["table"]
        for e in read_table_events(spark, table, role="pipeline-write", since=parse_since("1d"))
    ] == ["features.scores"]
    status, out, _ = run_cli(
        capsys,
        "--policy",
        str(policy_file(tmp_path, f"table:{table}")),
        "--format",
        "json",
        "--event",
        "denied",
    )
    assert status == 0 and [e["principal"] for e in json.loads(out)] == ["mallory@example.com"]
    secret = "FAKE-table-sink-secret-0a1b2c3d4e5f"  # noqa: S105 - a fake, registered below
    register_secret(secret)
    auditor.emit(
        AuditEvent(
            "read",
            "error",
            "analyst@example.com",
            "user",
            reason=f"boom {secret}",
            session_name=f"s-{secret}",
        )
    )
    assert secret not in json.dumps([r.asDict() for r in spark.table(table).collect()])


@pytest.mark.slow
def test_table_sink_two_part_name_and_an_older_narrower_table(spark, caplog):
    table = f"default.audit_old_{uuid.uuid4().hex[:8]}"
    spark.sql(
        f"CREATE TABLE {table} (time STRING, event STRING, outcome STRING, principal STRING, "
        "principal_type STRING, `table` STRING) USING parquet"
    )
    sink = TableSink(table, spark)
    with caplog.at_level(logging.WARNING, logger="aurora_dbx.audit"):
        Auditor(sink, fail_closed=True).emit(sample_events()[1])
        Auditor(sink, fail_closed=True).emit(sample_events()[3])
    rows = spark.table(table).orderBy("time").collect()
    assert [r["table"] for r in rows] == ["public.customers", "features.scores"]
    assert len([r for r in caplog.records if "lacks columns" in r.getMessage()]) == 1


def test_table_sink_rejects_a_malformed_name():
    with pytest.raises(AuditError):
        TableSink("main.audit.events; DROP TABLE x")


def test_log_sink_repr_and_sink_for_rejects_unknown():
    assert repr(LogSink()) == "LogSink()"
    with pytest.raises(AuditError, match="unknown audit sink"):
        sink_for("kafka:topic")
