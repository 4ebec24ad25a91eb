"""MLflow lineage against a real MLflow tracking store (sqlite under tmp), no mocks."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from aurora_dbx import lineage  # noqa: E402
from aurora_dbx.identity import Principal  # noqa: E402
from aurora_dbx.lineage import Access, record  # noqa: E402
from aurora_dbx.policy import load_policy  # noqa: E402
from aurora_dbx.redaction import register_secret  # noqa: E402

POLICY = load_policy(
    {
        "version": 1,
        "project": "churn-model",
        "clusters": {
            "analytics": {
                "engine": "postgresql",
                "host": "analytics.cluster-abc123.us-east-1.rds.amazonaws.com",
                "port": 5432,
                "database": "analytics",
                "region": "us-east-1",
            }
        },
        "roles": {
            "analyst-read": {
                "cluster": "analytics",
                "iam_role_arn": "arn:aws:iam::123456789012:role/aurora-analyst-read",
                "db_user": "analyst_ro",
                "access": "read",
                "tables": ["public.*", "features.customer_*"],
            },
            "pipeline-write": {
                "cluster": "analytics",
                "iam_role_arn": "arn:aws:iam::123456789012:role/aurora-pipeline-write",
                "db_user": "pipeline_rw",
                "access": "write",
                "tables": ["features.*"],
            },
        },
        "bindings": [{"user": "analyst@example.com", "roles": ["analyst-read", "pipeline-write"]}],
    }
)
ANALYST = Principal("analyst@example.com", "user", groups=("data-science",))
EXPIRES = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def access(
    kind="read",
    table="public.customers",
    role="analyst-read",
    *,
    query=None,
    expires=EXPIRES,
    schema=None,
    rows=None,
    session_name=None,
    mode=None,
) -> Access:
    r = POLICY.roles[role]
    return Access(
        principal=ANALYST,
        role=r,
        cluster=POLICY.clusters[r.cluster],
        kind=kind,
        table=table,
        query=query,
        session_name=session_name or "aurora-dbx.analyst@example.com",
        source_identity="analyst@example.com",
        credential_expires_at=expires,
        rows=rows,
        mode=mode,
        schema=schema,
        project=POLICY.project,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real sqlite tracking store (and artifact root) for the module."""
    import mlflow.tracking.fluent as fluent

    root = tmp_path_factory.mktemp("mlflow")
    previous = (
        mlflow.get_tracking_uri(),
        fluent._active_experiment_id,
        os.environ.get("MLFLOW_EXPERIMENT_ID"),
    )
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    MlflowClient(uri).create_experiment("lineage", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment("lineage")
    yield root
    while mlflow.active_run():
        mlflow.end_run()
    # leave no tracking URI or experiment behind for other test modules
    mlflow.set_tracking_uri(previous[0])
    fluent._active_experiment_id = previous[1]
    if previous[2] is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = previous[2]


@pytest.fixture(autouse=True)
def clean(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv(lineage.TIMEOUT_ENV, raising=False)
    lineage._reset()
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    lineage._reset()


def spark_schema():
    from pyspark.sql.types import DateType, LongType, StringType, StructField, StructType

    return StructType(
        [
            StructField("id", LongType(), False),
            StructField("name", StringType()),
            StructField("signup", DateType()),
        ]
    )


def aurora_tags(run_id: str) -> dict[str, str]:
    return {
        k: v for k, v in mlflow.get_run(run_id).data.tags.items() if k.startswith("aurora_dbx.")
    }


def test_tags_and_datasets_accumulate_sorted_and_deduplicated(store):
    with mlflow.start_run() as run:
        record(access(table="public.customers", schema=spark_schema()))
        record(access(table="features.customer_ltv", expires=EXPIRES - timedelta(minutes=30)))
        # a second call: a write through another role, and a table read again
        record(
            access(
                "write",
                "features.scores",
                "pipeline-write",
                rows=2,
                mode="upsert",
                expires=EXPIRES + timedelta(minutes=5),
            )
        )
        record(access(table="public.customers", schema=spark_schema()))
    tags = aurora_tags(run.info.run_id)
    assert tags == {
        "aurora_dbx.principal": "analyst@example.com",
        "aurora_dbx.principal_type": "user",
        "aurora_dbx.role_arn": "arn:aws:iam::123456789012:role/aurora-analyst-read,"
        "arn:aws:iam::123456789012:role/aurora-pipeline-write",
        "aurora_dbx.db_user": "analyst_ro,pipeline_rw",
        "aurora_dbx.source_identity": "analyst@example.com",
        "aurora_dbx.session_name": "aurora-dbx.analyst@example.com",
        "aurora_dbx.cluster": "analytics",
        "aurora_dbx.tables_read": "features.customer_ltv,public.customers",
        "aurora_dbx.tables_written": "features.scores",
        "aurora_dbx.credential_expires_at": "2030-01-02T03:09:05Z",  # the latest expiry
        "aurora_dbx.project": "churn-model",
    }
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["features.customer_ltv", "public.customers"]
    for i in inputs:
        assert i.dataset.source_type == "aurora"
        assert {t.key: t.value for t in i.tags} == {"mlflow.data.context": "aurora_dbx.read"}
    customers = next(i for i in inputs if i.dataset.name == "public.customers")
    schema = json.loads(customers.dataset.schema)["mlflow_colspec"]
    assert [(c["name"], c["type"], c["required"]) for c in schema] == [
        ("id", "long", True),
        ("name", "string", False),
        ("signup", "datetime", False),
    ]


def test_dataset_source_round_trips_through_the_registry(store):
    with mlflow.start_run() as run:
        record(access(table="public.customers"))
        record(access(table=None, query="SELECT id FROM public.customers WHERE name = 'Ada'"))
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    source = mlflow.data.get_source(by_name["public.customers"])
    assert type(source).__name__ == "AuroraDatasetSource"
    assert source._get_source_type() == "aurora"
    assert isinstance(source, lineage.AuroraDatasetSource)
    assert source.to_dict() == {
        "cluster": "analytics",
        "engine": "postgresql",
        "host": "analytics.cluster-abc123.us-east-1.rds.amazonaws.com",
        "port": 5432,
        "database": "analytics",
        "table": "public.customers",
        "role": "analyst-read",
        "role_arn": "arn:aws:iam::123456789012:role/aurora-analyst-read",
        "db_user": "analyst_ro",
    }
    assert type(source).from_json(source.to_json()) == source
    digest = lineage.query_digest("SELECT id FROM public.customers WHERE name = 'Ada'")
    (query_name,) = [n for n in by_name if n.startswith("query:")]
    query_source = mlflow.data.get_source(by_name[query_name]).to_dict()
    assert query_source["query_sha256"] == digest and "table" not in query_source
    assert "Ada" not in json.dumps(query_source) and "Ada" not in query_name
    tags = aurora_tags(run.info.run_id)
    assert tags["aurora_dbx.tables_read"] == "public.customers"
    assert tags["aurora_dbx.queries_read"] == "sha256:" + digest[:16]


def test_merges_with_tags_already_in_the_store(store):
    """Another process (or an earlier session) tagged the run: its values are kept."""
    with mlflow.start_run() as run:
        mlflow.set_tag("aurora_dbx.tables_read", "public.orders")
        mlflow.set_tag("aurora_dbx.credential_expires_at", "2031-01-01T00:00:00Z")
        record(access(table="public.customers"))
    tags = aurora_tags(run.info.run_id)
    assert tags["aurora_dbx.tables_read"] == "public.customers,public.orders"
    assert tags["aurora_dbx.credential_expires_at"] == "2031-01-01T00:00:00Z"


def test_concurrent_calls_in_one_process_lose_nothing(store):
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        threads = [
            threading.Thread(
                target=record, args=(access(table=f"public.t{i:02d}"),), kwargs={"run_id": run_id}
            )
            for i in range(12)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lineage._reset()  # forget the in-process cache: the store itself must hold everything
    assert aurora_tags(run_id)["aurora_dbx.tables_read"] == ",".join(
        f"public.t{i:02d}" for i in range(12)
    )
    assert len(mlflow.get_run(run_id).inputs.dataset_inputs) == 12


def test_nested_runs_tag_the_innermost_run_only(store):
    with mlflow.start_run() as parent:
        record(access(table="public.customers"))
        with mlflow.start_run(nested=True) as child:
            record(access(table="features.customer_ltv"))
    assert aurora_tags(parent.info.run_id)["aurora_dbx.tables_read"] == "public.customers"
    assert aurora_tags(child.info.run_id)["aurora_dbx.tables_read"] == "features.customer_ltv"
    assert [i.dataset.name for i in mlflow.get_run(child.info.run_id).inputs.dataset_inputs] == [
        "features.customer_ltv"
    ]


def test_explicit_run_id_without_an_active_run(store):
    client = MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name("lineage").experiment_id)
    client.set_terminated(run.info.run_id)
    assert mlflow.active_run() is None
    record(access("write", "features.scores", "pipeline-write"), run_id=run.info.run_id)
    tags = aurora_tags(run.info.run_id)
    assert tags["aurora_dbx.tables_written"] == "features.scores"
    assert "aurora_dbx.tables_read" not in tags
    assert mlflow.get_run(run.info.run_id).inputs.dataset_inputs == []  # writes log no input


def test_mlflow_run_id_environment_variable(store, monkeypatch):
    run = MlflowClient().create_run(mlflow.get_experiment_by_name("lineage").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    record(access(table="public.customers"))
    assert aurora_tags(run.info.run_id)["aurora_dbx.tables_read"] == "public.customers"


def test_no_active_run_logs_nothing_and_does_not_fail(store, caplog):
    experiment = mlflow.get_experiment_by_name("lineage").experiment_id
    before = len(MlflowClient().search_runs([experiment], max_results=1000))
    with caplog.at_level(logging.DEBUG, logger="aurora_dbx.lineage"):
        record(access(table="public.customers"))
    assert len(MlflowClient().search_runs([experiment], max_results=1000)) == before
    assert not [r for r in caplog.records if r.name == "aurora_dbx.lineage"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1", "closed"])
def test_unreachable_tracking_server_is_fast_and_warns_once(store, caplog, uri):
    uri = f"http://127.0.0.1:{_closed_port()}" if uri == "closed" else uri
    with mlflow.start_run():
        mlflow.set_tracking_uri(uri)  # the run stays active; the server is gone
        with caplog.at_level(logging.WARNING, logger="aurora_dbx.lineage"):
            started = time.monotonic()
            for table in ("public.customers", "features.customer_ltv", "public.orders"):
                record(access(table=table))
            record(access(table="public.customers"), run_id="0" * 32)
            elapsed = time.monotonic() - started
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    assert elapsed < 3, elapsed
    warnings = [r for r in caplog.records if r.name == "aurora_dbx.lineage"]
    assert len(warnings) == 1
    assert "not reachable" in warnings[0].getMessage()
    assert "reads and writes are not affected" in warnings[0].getMessage()


def test_hanging_tracking_server_is_bounded_by_the_timeout(store, caplog, monkeypatch):
    """A server that accepts connections but never answers: bounded, then skipped."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # never accept(): connections complete, requests never get an answer
    monkeypatch.setenv(lineage.TIMEOUT_ENV, "1")
    try:
        with mlflow.start_run():
            mlflow.set_tracking_uri(f"http://127.0.0.1:{server.getsockname()[1]}")
            with caplog.at_level(logging.WARNING, logger="aurora_dbx.lineage"):
                started = time.monotonic()
                record(access(table="public.customers"))
                first = time.monotonic() - started
                record(access(table="public.orders"))  # skipped: the first call still hangs
                total = time.monotonic() - started
            mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    finally:
        server.close()
    assert 0.9 < first < 2.5, first
    assert total - first < 0.5, total
    warnings = [r for r in caplog.records if r.name == "aurora_dbx.lineage"]
    assert len(warnings) == 1 and "did not answer within 1s" in warnings[0].getMessage()


def test_bad_run_id_warns_once_and_never_raises(store, caplog):
    with caplog.at_level(logging.WARNING, logger="aurora_dbx.lineage"):
        record(access(), run_id="f" * 32)
        record(access(), run_id="e" * 32)
    assert len([r for r in caplog.records if r.name == "aurora_dbx.lineage"]) == 1


def test_no_secret_reaches_the_mlflow_store(store):
    secret = "FAKE-session-token-Zq9wX2vB7nT4kL1m"  # noqa: S105 - a fake, registered below
    signed = "X-Amz-Signature=deadbeefcafebabe0123456789abcdef"
    register_secret(secret)
    with mlflow.start_run() as run:
        record(
            access(
                table=None,
                query=f"SELECT * FROM public.customers WHERE k = '{secret}' AND '{signed}'",
            )
        )
        record(access(table="public.customers", session_name=f"s-{secret}", mode=secret))
    tags = aurora_tags(run.info.run_id)
    assert "***" in tags["aurora_dbx.session_name"]
    for path in Path(store).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, path
            assert b"deadbeefcafebabe" not in data, path


def doc_example() -> tuple[dict[str, str], list[dict]]:
    """The example in docs/LINEAGE_AND_AUDIT.md: two reads, then a write, in one run."""
    with mlflow.start_run() as run:
        record(access(table="public.customers", schema=spark_schema()))
        record(access(table="features.customer_ltv"))
        record(
            access(
                "write",
                "features.scores",
                "pipeline-write",
                rows=2,
                mode="upsert",
                expires=EXPIRES + timedelta(minutes=5),
            )
        )
    got = mlflow.get_run(run.info.run_id)
    tags = {k: v for k, v in sorted(got.data.tags.items()) if k.startswith("aurora_dbx.")}
    inputs = [
        {
            "name": i.dataset.name,
            "digest": i.dataset.digest,
            "source_type": i.dataset.source_type,
            "source": json.loads(i.dataset.source),
            "schema": json.loads(i.dataset.schema) if i.dataset.schema else None,
            "tags": {t.key: t.value for t in i.tags},
        }
        for i in got.inputs.dataset_inputs
    ]
    return tags, sorted(inputs, key=lambda i: i["name"])


def test_the_documented_example_is_real_output(store):
    tags, inputs = doc_example()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "LINEAGE_AND_AUDIT.md").read_text()
    for key, value in tags.items():
        assert f"{key!r}: {value!r}" in doc, key
    for i in inputs:
        assert f"'name': {i['name']!r}" in doc and f"'digest': {i['digest']!r}" in doc
