"""The Databricks notebooks in ``notebooks/``, run top to bottom against the local stack.

Each notebook is parsed from Databricks source format into cells; markdown and magic cells
(``# MAGIC``) are skipped and the code cells run in one namespace, as on a cluster. Only
what a Databricks runtime provides as globals is stood in for: ``dbutils.widgets``
(values chosen by the test, defaults otherwise), ``display`` (records what the user would
see) and ``spark`` (the session's local SparkSession). The notebooks themselves run
unchanged; the assertions are about what a user sees: the rows displayed, the run's
lineage tags, an idempotent upsert, the plan, the check, the audit chart's data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

import aurora_dbx
from tests.conftest import ANALYST, PIPELINE_SP, World

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
TRAINING = "features.customer_training"
TRAINING_IDS = range(1001, 1049)  # 48 rows, ids no other test writes to features.scores


# -- the Databricks stand-ins ----------------------------------------------------------


def cells(path: Path) -> list[str]:
    """The code cells of a Databricks source-format notebook, in order (magic cells dropped)."""
    text = path.read_text(encoding="utf-8")
    first, _, body = text.partition("\n")
    assert first.strip() == HEADER, f"{path.name}: first line must be {HEADER!r}"
    out = []
    for chunk in re.split(rf"^{re.escape(SEPARATOR)}[ \t]*$", body, flags=re.M):
        lines = [ln for ln in chunk.strip("\n").splitlines() if ln.strip()]
        if not lines or lines[0].startswith("# MAGIC"):
            assert all(ln.startswith("# MAGIC") for ln in lines), f"{path.name}: mixed magic/code cell"
            continue
        out.append(chunk.strip("\n") + "\n")
    return out


class InputWidgetNotDefined(Exception):
    """What Databricks raises for ``dbutils.widgets.get`` of an undefined widget."""


class Widgets:
    """``dbutils.widgets``: text/dropdown define a widget, get returns the chosen or default value."""

    def __init__(self, values: dict[str, str]):
        self._values = {k: str(v) for k, v in values.items()}
        self.defined: dict[str, str] = {}

    def text(self, name: str, defaultValue: str, label: str | None = None) -> None:  # noqa: N803
        self.defined[name] = defaultValue

    def dropdown(self, name: str, defaultValue: str, choices: list[str], label: str | None = None) -> None:  # noqa: N803
        assert defaultValue in choices, f"widget {name}: default {defaultValue!r} not in {choices}"
        if name in self._values:
            assert self._values[name] in choices, f"widget {name}: {self._values[name]!r} not in {choices}"
        self.defined[name] = defaultValue

    def get(self, name: str) -> str:
        if name not in self.defined:
            raise InputWidgetNotDefined(name)
        return self._values.get(name, self.defined[name])

    def removeAll(self) -> None:  # noqa: N802
        self.defined.clear()


@dataclass
class Dbutils:
    widgets: Widgets


@dataclass
class Display:
    """``display``: evaluates what it is given at once (as Databricks does) and keeps a pandas copy."""

    shown: list[Any] = field(default_factory=list)

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> None:
        if hasattr(obj, "toPandas"):  # a Spark DataFrame: Databricks runs it and shows the rows
            self.shown.append(obj.toPandas())
        elif hasattr(obj, "copy"):
            self.shown.append(obj.copy())
        else:
            self.shown.append(obj)


def run_notebook(name: str, spark: Any, **widgets: Any) -> tuple[dict[str, Any], list[Any]]:
    """Run ``notebooks/<name>`` top to bottom; return its namespace and what it displayed."""
    path = NOTEBOOKS / name
    dbutils = Dbutils(Widgets(widgets))
    display = Display()
    ns: dict[str, Any] = {"__name__": "__main__", "spark": spark, "dbutils": dbutils, "display": display,
                          "displayHTML": display}
    for i, source in enumerate(cells(path), 1):
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), ns)  # noqa: S102 - the notebook under test
    unknown = set(widgets) - set(dbutils.widgets.defined)
    assert not unknown, f"{name} defines no widget(s) {sorted(unknown)}"
    return ns, display.shown


# -- static checks (no stack) ----------------------------------------------------------


ALL = sorted(p.name for p in NOTEBOOKS.glob("*.py"))


def test_the_four_notebooks_exist():
    assert ALL == ["01_quickstart.py", "02_train_with_lineage.py", "03_write_features.py", "04_admin.py"]


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_databricks_source_format_and_compiles(name):
    path = NOTEBOOKS / name
    text = path.read_text(encoding="utf-8")
    assert text.startswith(HEADER + "\n")
    assert "# MAGIC %md" in text, "every notebook explains itself in markdown cells"
    code = cells(path)
    assert len(code) >= 3
    for i, source in enumerate(code, 1):
        compile(source, f"{name}[cell {i}]", "exec")
    defined = set(re.findall(r"dbutils\.widgets\.(?:text|dropdown)\(\s*\"([^\"]+)\"", text))
    used = set(re.findall(r"dbutils\.widgets\.get\(\s*\"([^\"]+)\"", text))
    assert "policy" in defined and used <= defined and used == defined
    # Databricks provides these globals; a notebook must not build its own session or fake them
    assert "SparkSession" not in text and "def display" not in text and "dbutils =" not in text


# -- shared data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_table(world: World) -> str:
    """A features.customer_* table with numeric features and a 0/1 label, readable by analyst_ro."""
    pg = world.stack.postgres
    pg.execute_admin(f"DROP TABLE IF EXISTS {TRAINING}")
    pg.execute_admin(
        f"CREATE TABLE {TRAINING} (id bigint PRIMARY KEY, tenure_months integer, "
        "monthly_spend numeric(10,2), support_tickets integer, churned integer NOT NULL)"
    )
    rows = []
    for i in TRAINING_IDS:
        tenure, tickets = (i * 7) % 60 + 1, (i * 3) % 5
        churned = int(tenure < 18 or tickets >= 4)
        rows.append(f"({i}, {tenure}, {20 + (i * 13) % 180}.{i % 100:02d}, {tickets}, {churned})")
    pg.execute_admin(f"INSERT INTO {TRAINING} VALUES {', '.join(rows)}")
    pg.execute_admin(f"GRANT SELECT ON {TRAINING} TO analyst_ro")
    return TRAINING


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real sqlite MLflow tracking store for the test; the previous URI is restored after."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    previous = (mlflow.get_tracking_uri(), fluent._active_experiment_id)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    experiment = mlflow.set_experiment("notebooks")  # on Databricks: the notebook's own experiment
    yield uri, experiment
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous[0])
    fluent._active_experiment_id = previous[1]


# -- the notebooks, run -----------------------------------------------------------------


def test_01_quickstart_shows_the_principal_and_the_table(world, env, spark, capsys):
    env(ANALYST)
    ns, shown = run_notebook("01_quickstart.py", spark, policy=world.policy_path,
                             table="public.customers", cluster="analytics")
    out = capsys.readouterr().out
    assert f"principal:  {ANALYST} (user)" in out
    roles = re.search(r"^roles:\s+(.*)$", out, re.M).group(1)
    assert sorted(roles.split(", ")) == ["analyst-read", "orders-read"]
    assert len(shown) == 1
    rows = shown[0].sort_values("id").to_dict("records")
    assert [(r["id"], r["name"]) for r in rows] == [(1, "Ada"), (2, "Grace")]
    assert list(shown[0].columns) == ["id", "name", "signup"]


def test_01_quickstart_uses_the_cluster_default_policy_when_the_widget_is_empty(
    world, env, spark, capsys, monkeypatch
):
    """policy widget empty: the policy is the cluster's spark.aurora_dbx.policy (the init script's conf)."""
    env(ANALYST)
    monkeypatch.delenv("AURORA_DBX_POLICY")
    spark.conf.set("spark.aurora_dbx.policy", str(world.policy_path))
    try:
        _, shown = run_notebook("01_quickstart.py", spark, cluster="analytics")
    finally:
        spark.conf.unset("spark.aurora_dbx.policy")
    assert f"policy {world.policy_path}" in capsys.readouterr().out
    assert sorted(shown[0]["id"]) == [1, 2]


def test_02_training_run_shows_its_credential_lineage(world, env, spark, training_table, tracking, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, experiment = tracking
    env(ANALYST)
    ns, shown = run_notebook("02_train_with_lineage.py", spark, policy=world.policy_path,
                             table=training_table, cluster="analytics")
    tags, inputs = shown
    tags = dict(zip(tags["tag"], tags["value"], strict=True))
    assert tags["aurora_dbx.principal"] == ANALYST
    assert tags["aurora_dbx.principal_type"] == "user"
    assert tags["aurora_dbx.role_arn"] == world.roles["analyst-read"]
    assert tags["aurora_dbx.db_user"] == "analyst_ro"
    assert tags["aurora_dbx.cluster"] == "analytics"
    assert tags["aurora_dbx.tables_read"] == training_table
    assert tags["aurora_dbx.source_identity"] == ANALYST
    assert datetime.fromisoformat(tags["aurora_dbx.credential_expires_at"].replace("Z", "+00:00")) > datetime.now(timezone.utc)
    assert list(inputs["name"]) == [training_table] and list(inputs["source_type"]) == ["aurora"]
    assert json.loads(inputs["source"][0])["db_user"] == "analyst_ro"

    run = MlflowClient(uri).get_run(ns["run_id"])
    assert run.info.experiment_id == experiment.experiment_id and run.info.status == "FINISHED"
    assert run.data.params["rows"] == str(len(TRAINING_IDS))
    assert run.data.params["features"] == "tenure_months,monthly_spend,support_tickets"
    assert 0.5 < run.data.metrics["train_accuracy"] <= 1.0
    model = mlflow.sklearn.load_model(ns["model_info"].model_uri)
    assert list(model.predict(ns["X"].head(3))) == list(ns["model"].predict(ns["X"].head(3)))
    assert f"run {ns['run_id']}: train_accuracy=" in capsys.readouterr().out


def scores_rows(world: World) -> dict[int, float]:
    ids = ", ".join(str(i) for i in TRAINING_IDS)
    return dict(world.stack.postgres.execute_admin(f"SELECT id, score FROM features.scores WHERE id IN ({ids})"))


def test_03_upsert_is_idempotent(world, env, spark, training_table, capsys):
    pg = world.stack.postgres
    ids = ", ".join(str(i) for i in TRAINING_IDS)
    pg.execute_admin(f"DELETE FROM features.scores WHERE id IN ({ids})")
    pg.execute_admin(f"INSERT INTO features.scores VALUES ({TRAINING_IDS[0]}, -1.0)")  # a stale score to update
    others = pg.execute_admin(f"SELECT count(*) FROM features.scores WHERE id NOT IN ({ids})")[0][0]
    env(PIPELINE_SP)
    ns, shown = run_notebook("03_write_features.py", spark, policy=world.policy_path,
                             source_table=training_table, value_column="monthly_spend",
                             target_table="features.scores", cluster="analytics")
    assert f"running as {PIPELINE_SP} (service_principal)" in capsys.readouterr().out
    scores, summary = shown
    n = len(TRAINING_IDS)
    assert len(scores) == n and scores["score"].between(0, 1).all()
    steps = summary.to_dict("records")
    assert steps == [
        {"step": "upsert", "rows_written": n, "target_rows": others + n},
        {"step": "same upsert again", "rows_written": n, "target_rows": others + n},
        {"step": "scored rows not in the target", "rows_written": 0, "target_rows": 0},
    ]
    stored = scores_rows(world)
    assert stored == {int(r["id"]): float(r["score"]) for r in scores.to_dict("records")}
    assert stored[TRAINING_IDS[0]] != -1.0

    # the scheduled job reruns the notebook: same rows, same values
    run_notebook("03_write_features.py", spark, policy=world.policy_path, source_table=training_table,
                 value_column="monthly_spend", cluster="analytics", check_idempotent="false")
    assert scores_rows(world) == stored


def test_04_admin_plans_checks_and_charts_the_audit_trail(world, env, spark, tmp_path, capsys, monkeypatch):
    from aurora_dbx.audit import AuditEvent, JsonlSink

    monkeypatch.setenv("MPLBACKEND", "Agg")  # matplotlib (an MLflow dependency) draws off-screen

    audit_file = tmp_path / "audit.jsonl"
    policy = dict(world.policy, audit={"sink": f"jsonl:{audit_file}"})
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    # yesterday's run of the pipeline, and a real role assumption by it today
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    JsonlSink(str(audit_file)).write(AuditEvent(
        "assume_role", "ok", PIPELINE_SP, "service_principal", world.roles["pipeline-write"], "pipeline_rw",
        cluster="analytics", role="pipeline-write", time=yesterday))
    env(PIPELINE_SP)
    aurora_dbx.configure(policy=str(policy_path))
    aurora_dbx.connect(cluster="analytics", access="write").close()

    env(ANALYST)
    trusted = "arn:aws:iam::123456789012:role/databricks-aurora-base"
    ns, shown = run_notebook("04_admin.py", spark, policy=policy_path, trusted_principal_arns=trusted, since="7d")
    out = capsys.readouterr().out
    plan_roles, checks, audit, assumptions, *chart = shown

    plan = json.loads(ns["plan_json"])
    assert {r["role"]: r["iam_role_arn"] for r in plan["roles"]} == world.roles
    assert [p["arn"] for p in plan["trusted_principals"]] == [trusted]
    assert set(plan["sql"]) == {"analytics", "orders"}
    assert any("GRANT SELECT" in s and "analyst_ro" in s for s in plan["sql"]["analytics"]["statements"])
    assert set(plan_roles["role"]) == set(world.roles)
    assert "## Role analyst-read: analyst_ro@analytics (read)" in out

    assert sorted(checks["role"]) == ["analyst-read", "orders-read"] and checks["ok"].all()
    assert "check: OK" in out

    assert {"assume_role"} <= set(audit["event"]) and set(audit["principal"]) == {ANALYST, PIPELINE_SP}
    today = datetime.now(timezone.utc).date().isoformat()
    got = {(r["day"], r["principal"]): r["assumptions"] for r in assumptions.to_dict("records")}
    assert got[(yesterday[:10], PIPELINE_SP)] == 1 and got[(today, PIPELINE_SP)] == 1
    assert got[(today, ANALYST)] == 2  # check assumed analyst-read and orders-read
    pytest.importorskip("matplotlib")
    (figure,) = chart
    bars = figure.axes[0].patches
    assert figure.axes[0].get_title() == "IAM role assumptions per principal per day"
    assert sum(b.get_height() for b in bars) == 4  # 1 + 1 + 2 assumptions, stacked per day
    import matplotlib.pyplot as plt

    plt.close(figure)
    # nothing secret reached the admin's screen
    for text in (out, audit.to_json(), ns["plan_json"]):
        assert "dapi-" not in text and "X-Amz-Signature" not in text and "SecretAccessKey" not in text


@pytest.mark.slow
def test_04_admin_reads_a_table_sink(world, env, spark, tmp_path, capsys, monkeypatch):
    """The Databricks setup: audit.sink is a table (Delta there; the session catalog locally)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    table = "spark_catalog.default.notebook_audit_events"
    spark.sql(f"DROP TABLE IF EXISTS {table}")
    policy = dict(world.policy, audit={"sink": f"table:{table}"})
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    env(ANALYST)
    _, shown = run_notebook("04_admin.py", spark, policy=policy_path,
                            trusted_principal_arns="arn:aws:iam::123456789012:role/databricks-aurora-base")
    assert "check: OK" in capsys.readouterr().out
    audit, assumptions = shown[2], shown[3]
    assert set(audit["principal"]) == {ANALYST} and "assume_role" in set(audit["event"])
    today = datetime.now(timezone.utc).date().isoformat()
    assert assumptions.to_dict("records") == [{"day": today, "principal": ANALYST, "assumptions": 2}]
    import matplotlib.pyplot as plt

    plt.close("all")
    spark.sql(f"DROP TABLE IF EXISTS {table}")
