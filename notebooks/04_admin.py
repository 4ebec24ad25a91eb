# Databricks notebook source
# MAGIC %md
# MAGIC # aurora_dbx admin: plan, check, audit
# MAGIC
# MAGIC For the platform admin who owns the access policy.
# MAGIC
# MAGIC 1. **Plan**: the IAM trust and permission policies and the database GRANTs the policy implies
# MAGIC    (`aurora-dbx plan`). Pure: reads the policy file, calls nothing.
# MAGIC 2. **Check**: for every role bound to *you*: assume it, mint a token, connect over TLS, `SELECT 1`
# MAGIC    (`aurora-dbx check`). To check a service principal's roles, run this notebook as a job that runs as it.
# MAGIC 3. **Audit**: recent events from the policy's audit sink (`jsonl:` file or `table:` Delta table),
# MAGIC    and role assumptions per principal per day.

# COMMAND ----------

dbutils.widgets.text("policy", "", "Access policy path (empty: cluster default)")
dbutils.widgets.text("trusted_principal_arns", "", "Extra IAM principals the roles trust (comma-separated ARNs)")
dbutils.widgets.text("since", "30d", "Audit window (30m, 24h, 7d, 2w or an ISO-8601 time)")

# COMMAND ----------

import pandas as pd

import aurora_dbx
from aurora_dbx.audit import filter_events, parse_since, read_events, read_table_events
from aurora_dbx.checks import check_roles
from aurora_dbx.context import current_context
from aurora_dbx.plan import build_plan

policy_path = dbutils.widgets.get("policy").strip() or None
trusted = [a.strip() for a in dbutils.widgets.get("trusted_principal_arns").split(",") if a.strip()]
since = parse_since(dbutils.widgets.get("since").strip() or "30d")

ctx = aurora_dbx.configure(policy=policy_path, spark=spark)
print(f"policy {ctx.policy.source}: project {ctx.policy.project}, {len(ctx.policy.roles)} roles, "
      f"{len(ctx.policy.bindings)} bindings, audit sink {ctx.policy.audit.sink}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 1. Plan
# MAGIC Create each IAM role with its trust and permission policy, then run each cluster's SQL as its master
# MAGIC user (`psql --single-transaction` / `mysql`). Rerunning the SQL converges: it revokes, then grants
# MAGIC exactly what the policy says.

# COMMAND ----------

plan = None
try:
    plan = build_plan(ctx.policy, trusted_principal_arns=trusted)
except aurora_dbx.AuroraDbxError as e:
    print(f"plan: {e}")

if plan is not None:
    plan_roles = pd.DataFrame(
        [{"role": r.role, "iam_role_arn": r.iam_role_arn, "cluster": r.cluster, "db_user": r.db_user,
          "access": r.access, "max_session_duration": r.max_session_duration, "notes": " | ".join(r.notes)}
         for r in plan.roles],
        columns=["role", "iam_role_arn", "cluster", "db_user", "access", "max_session_duration", "notes"],
    )
    display(plan_roles)
    plan_json = plan.to_json()  # the same document as `aurora-dbx plan --format json`
    print(plan.to_text())

# COMMAND ----------

# MAGIC %md
# MAGIC ## 2. Check
# MAGIC Every step is timed; a failure says which step failed and why (never a token or key).

# COMMAND ----------

results = check_roles(current_context())
checks = pd.DataFrame(
    [{"role": c.role, "cluster": c.cluster, "db_user": c.db_user, "ok": c.ok,
      "steps": "; ".join(f"{s['step']} {'ok' if s['ok'] else 'FAILED'} ({s['ms']} ms) {s['detail']}".rstrip()
                         for s in c.steps)}
     for c in results],
    columns=["role", "cluster", "db_user", "ok", "steps"],
)
display(checks)
failed = [c.role for c in results if not c.ok]
print("check: OK" if results and not failed else
      f"check: FAILED for {', '.join(failed)}" if failed else "check: no role is bound to you")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 3. Audit trail
# MAGIC The `log` sink goes to the driver log only; use `table:<catalog.schema.table>` on Databricks (volumes
# MAGIC do not support appends, so `jsonl:` is for local disks and POSIX shares).

# COMMAND ----------

sink = ctx.policy.audit.sink
if sink.startswith("jsonl:"):
    events = filter_events(read_events(sink[len("jsonl:"):]), since=since)
elif sink.startswith("table:"):
    audit_table = sink[len("table:"):]
    exists = spark.catalog.tableExists(audit_table)  # created by the first event written to it
    events = read_table_events(spark, audit_table, since=since) if exists else []
else:
    events = []
    print(f"audit sink {sink!r} cannot be read back: set audit.sink to table:<catalog.schema.table>")

columns = ["time", "event", "outcome", "principal", "principal_type", "role", "role_arn", "db_user",
           "cluster", "table", "reason"]
audit = pd.DataFrame(events)
audit = audit.reindex(columns=[c for c in columns if c in audit.columns] or columns)
print(f"{len(audit)} events since {since.isoformat(timespec='seconds')}")
display(audit.tail(500))

# COMMAND ----------

# MAGIC %md
# MAGIC ### Role assumptions per principal per day

# COMMAND ----------

if len(audit):
    assumed = audit[(audit["event"] == "assume_role") & (audit["outcome"] == "ok")]
else:
    assumed = pd.DataFrame(columns=["time", "principal"])
assumptions = (
    assumed.assign(day=assumed["time"].astype(str).str[:10])
    .groupby(["day", "principal"]).size().rename("assumptions").reset_index()
)
display(assumptions)  # on Databricks: switch the result to a bar chart (day on x, assumptions stacked by principal)

try:
    import matplotlib.pyplot as plt
except ImportError:  # matplotlib is optional: the table above is the chart's data
    plt = None
if plt is not None and len(assumptions):
    pivot = assumptions.pivot(index="day", columns="principal", values="assumptions").fillna(0)
    ax = pivot.plot(kind="bar", stacked=True, figsize=(10, 4), title="IAM role assumptions per principal per day")
    ax.set_ylabel("assume_role")
    display(ax.figure)
