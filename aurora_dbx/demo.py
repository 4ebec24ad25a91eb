"""``aurora-dbx demo``: the main job, end to end, on an embedded local stack.

Starts a PostgreSQL with Aurora-faithful IAM authentication, moto's STS, a loopback
workspace API, local Spark and a local MLflow store; writes a demo policy and applies the
SQL ``aurora-dbx plan`` generates for it; seeds a customer dataset; then runs the real
library code as a data scientist (read, train in an MLflow run) and as a scheduled job's
service principal (score, upsert back twice), shows a denied out-of-scope read, prints the
run's lineage and the audit trail, and stops everything it started.

Nothing in the flow below is demo-specific: pointed at a real policy (``--policy``) the
same calls run against Aurora; only the stack set-up is local.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["register", "run_demo"]

SCIENTIST = "scientist@example.com"
PIPELINE_SP = "6a1c2f0e-1111-2222-3333-444455556666"
TOKENS = {SCIENTIST: "dapi-demo-scientist", PIPELINE_SP: "dapi-demo-pipeline"}
SEED_ROWS = 200_000

SEED_SQL = [
    "CREATE SCHEMA IF NOT EXISTS features",
    "CREATE SCHEMA IF NOT EXISTS hr",
    "SELECT setseed(0.42)",
    """CREATE TABLE IF NOT EXISTS features.customer_activity (
        id bigint PRIMARY KEY, signup date NOT NULL, tenure_months integer NOT NULL,
        monthly_spend numeric(10,2) NOT NULL, support_calls integer NOT NULL,
        plan text NOT NULL, churned boolean NOT NULL)""",
    f"""INSERT INTO features.customer_activity
        SELECT g, date '2019-01-01' + (g % 1800), 1 + (g % 72), round((20 + random() * 180)::numeric, 2),
               (random() * 8)::int, (ARRAY['basic', 'plus', 'pro'])[1 + g % 3],
               random() < 0.15 + 0.05 * ((g % 7) / 6.0)
        FROM generate_series(1, {SEED_ROWS}) g ON CONFLICT DO NOTHING""",
    """CREATE TABLE IF NOT EXISTS features.churn_scores (
        id bigint PRIMARY KEY, churn_probability double precision NOT NULL, scored_at timestamptz NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS hr.salaries (id bigint PRIMARY KEY, salary numeric(12,2))",
    "INSERT INTO hr.salaries VALUES (1, 123456.78) ON CONFLICT DO NOTHING",
]


def _policy(stack: Any, roles: dict[str, str], audit_path: Path) -> dict[str, Any]:
    pg = stack.postgres
    return {
        "version": 1,
        "project": "churn-demo",
        "clusters": {"analytics": {
            "engine": "postgresql", "host": pg.host, "port": pg.port, "database": pg.database,
            "region": "us-east-1", "resource_id": "cluster-DEMO0000000001", "tls": "verify-full",
            "ca_bundle": str(stack.ca_bundle)}},
        "roles": {
            "analyst-read": {"cluster": "analytics", "iam_role_arn": roles["analyst-read"],
                             "db_user": "analyst_ro", "access": "read", "tables": ["features.customer_*"]},
            "pipeline-write": {"cluster": "analytics", "iam_role_arn": roles["pipeline-write"],
                               "db_user": "pipeline_rw", "access": "write", "tables": ["features.*"]},
        },
        "bindings": [
            {"group": "data-science", "roles": ["analyst-read"]},
            {"service_principal": PIPELINE_SP, "roles": ["pipeline-write"]},
        ],
        "credentials": {"base_role_arn": "arn:aws:iam::123456789012:role/databricks-uc-service-credential"},
        "audit": {"sink": f"jsonl:{audit_path}"},
    }


class _Progress:
    def __init__(self, out: Callable[[str], None]):
        self.out = out
        self.start = time.perf_counter()

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        t = time.perf_counter()
        self.out(f"  … {text}")
        yield
        self.out(f"    done in {time.perf_counter() - t:.1f} s")


def run_demo(workdir: Path | None = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns what it measured (used by the tests)."""
    import yaml

    from .local_stack import LocalStack

    progress = _Progress(out)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="aurora-dbx-demo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    out("aurora_dbx demo: a local Aurora-faithful stack, no AWS or Databricks account needed")
    with progress.step("starting PostgreSQL (IAM token auth via PAM, TLS), STS, workspace API"):
        stack = LocalStack(engines=("postgresql",)).start()
    spark = None
    saved_env = dict(os.environ)
    try:
        roles = {n: stack.create_role(f"demo-{n}") for n in ("analyst-read", "pipeline-write")}
        audit_path = tmp / "audit.jsonl"
        policy = _policy(stack, roles, audit_path)
        policy_path = tmp / "policy.yaml"
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        with progress.step(f"seeding {SEED_ROWS:,} customers; applying the SQL `aurora-dbx plan` generates"):
            from .plan import build_sql
            from .policy import load_policy

            pg = stack.postgres
            for stmt in SEED_SQL:
                pg.execute_admin(stmt)
            for stmt in build_sql(load_policy(policy_path))["analytics"].statements:
                pg.execute_admin(stmt)
            for role, user in (("analyst-read", "analyst_ro"), ("pipeline-write", "pipeline_rw")):
                stack.allow(roles[role], user)  # the role's rds-db:connect permission
        stack.add_databricks_principal(TOKENS[SCIENTIST], user_name=SCIENTIST, groups=["data-science"])
        stack.add_databricks_principal(TOKENS[PIPELINE_SP], user_name=PIPELINE_SP, kind="service_principal",
                                       display_name="churn-scoring-job")
        os.environ.update(stack.environ())
        os.environ["AURORA_DBX_POLICY"] = str(policy_path)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"

        with progress.step("starting local Spark"):
            from pyspark.sql import SparkSession

            spark = (SparkSession.builder.master("local[2]").appName("aurora-dbx-demo")
                     .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
                     .getOrCreate())
            spark.sparkContext.setLogLevel("ERROR")
        summary.update(_as_scientist(spark, progress, out))
        summary.update(_as_pipeline(spark, progress, out, summary["model"]))
        summary["audit"] = _audit(audit_path, out)
    finally:
        if spark is not None:
            spark.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        stack.stop()
    total = time.perf_counter() - progress.start
    summary["seconds"] = total
    out(f"\nfinished in {total:.0f} s; everything the demo started has been stopped")
    return summary


def _as_scientist(spark: Any, progress: _Progress, out: Callable[[str], None]) -> dict[str, Any]:
    import mlflow
    from sklearn.linear_model import LogisticRegression

    import aurora_dbx

    from .errors import AccessDenied

    os.environ["DATABRICKS_TOKEN"] = TOKENS[SCIENTIST]
    aurora_dbx.configure(spark=spark)
    me = aurora_dbx.whoami()
    out(f"\n[1] data scientist in a notebook: {me.name} ({me.kind}, groups {', '.join(me.groups)})")
    out(f"    bound roles: {', '.join(me.roles)}")
    features = ["tenure_months", "monthly_spend", "support_calls"]
    with progress.step("read_table('features.customer_activity'): partitioned read through the role"):
        t = time.perf_counter()
        df = aurora_dbx.read_table("features.customer_activity", columns=["id", *features, "churned"])
        plan_ms = (time.perf_counter() - t) * 1000
        pdf = df.toPandas()
    out(f"    {len(pdf):,} rows in {df.rdd.getNumPartitions()} partitions (plan ready in {plan_ms:.0f} ms)")
    mlflow.set_experiment("churn-demo")
    with progress.step("training a model inside an MLflow run"), mlflow.start_run(run_name="churn-model") as run:
        # Read inside the run too, so the run's lineage names the table and role.
        aurora_dbx.read_table("features.customer_activity", columns=["id", *features, "churned"])
        x = pdf[features].astype(float).to_numpy()
        y = pdf["churned"].astype(int).to_numpy()
        model = LogisticRegression(max_iter=200).fit(x, y)
        accuracy = float(model.score(x, y))
        mlflow.log_metric("train_accuracy", accuracy)
    tags = {k: v for k, v in mlflow.get_run(run.info.run_id).data.tags.items() if k.startswith("aurora_dbx.")}
    inputs = mlflow.get_run(run.info.run_id).inputs
    datasets = [d.dataset.name for d in (inputs.dataset_inputs if inputs else [])]
    out(f"    accuracy {accuracy:.3f}; run {run.info.run_id} lineage:")
    for k in sorted(tags):
        out(f"      {k} = {tags[k]}")
    out(f"      datasets: {', '.join(datasets)}")
    try:
        aurora_dbx.read_table("hr.salaries")
        denied = None
    except AccessDenied as e:
        denied = str(e)
    out(f"    out-of-scope read of hr.salaries: denied before any network call:\n      {denied}")
    return {"rows_read": len(pdf), "model": (model, features), "accuracy": accuracy, "tags": tags,
            "datasets": datasets, "denied": denied, "run_id": run.info.run_id}


def _as_pipeline(spark: Any, progress: _Progress, out: Callable[[str], None], model_info: Any) -> dict[str, Any]:
    from pyspark.sql import functions as F

    import aurora_dbx

    model, features = model_info
    os.environ["DATABRICKS_TOKEN"] = TOKENS[PIPELINE_SP]
    aurora_dbx.configure(spark=spark)
    me = aurora_dbx.whoami()
    out(f"\n[2] scheduled job running as service principal {me.name}; roles: {', '.join(me.roles)}")
    coef = [float(c) for c in model.coef_[0]]
    intercept = float(model.intercept_[0])
    df = aurora_dbx.read_table("features.customer_activity", columns=["id", *features])
    logit = F.lit(intercept)
    for name, c in zip(features, coef, strict=True):
        logit = logit + F.col(name).cast("double") * F.lit(c)
    scores = df.select("id", (1 / (1 + F.exp(-logit))).alias("churn_probability"),
                       F.current_timestamp().alias("scored_at"))
    counts = []
    for attempt in (1, 2):
        with progress.step(f"write_table(..., mode='upsert', key=['id']), run {attempt}"):
            aurora_dbx.write_table(scores, "features.churn_scores", mode="upsert", key=["id"])
            with aurora_dbx.connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM features.churn_scores")
                counts.append(cur.fetchone()[0])
    out(f"    features.churn_scores rows after each run: {counts[0]:,} then {counts[1]:,} (idempotent)")
    return {"scores_rows": counts}


def _audit(path: Path, out: Callable[[str], None]) -> list[dict[str, Any]]:
    from collections import Counter

    from .audit import read_events

    events = list(read_events(str(path)))
    out(f"\n[3] audit trail ({path}): {len(events)} events")
    for (event, outcome, principal), n in sorted(Counter(
            (e["event"], e["outcome"], e["principal"]) for e in events).items()):
        out(f"      {n:>3} x {event:<12} {outcome:<7} {principal}")
    return events


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("demo", "run the main job on an embedded local stack (no AWS or Databricks needed)", _cmd)
    p.add_argument("--workdir", help="keep the demo's policy, MLflow store and audit trail here")


def _cmd(args: argparse.Namespace) -> int:
    if args.policy:
        print("aurora-dbx: demo builds its own policy for the local stack; --policy is not used here",
              file=sys.stderr)
    if os.geteuid() != 0:
        print("aurora-dbx: the demo's local stack must run as root (it configures PAM for the "
              "database's IAM authentication)", file=sys.stderr)
        return 1
    run_demo(Path(args.workdir) if args.workdir else None)
    return 0
