# Databricks notebook source
# MAGIC %md
# MAGIC # Score customers and upsert the scores into Aurora
# MAGIC
# MAGIC The scheduled job (`bundle/`) runs this notebook as the pipeline's **service principal**. It reads a
# MAGIC feature table, computes a score per key and writes it back with
# MAGIC `aurora_dbx.write_table(..., mode="upsert", key=[...])`: rows are staged in a private table and
# MAGIC published in one transaction, so the target gets every row or none, also when tasks are retried.
# MAGIC
# MAGIC An upsert is idempotent: running it again with the same input leaves the same rows. With
# MAGIC **check_idempotent** on, the notebook proves it by rerunning the upsert and comparing row counts.

# COMMAND ----------

dbutils.widgets.text("policy", "", "Access policy path (empty: cluster default)")
dbutils.widgets.text("source_table", "features.customer_ltv", "Feature table to score (schema.table)")
dbutils.widgets.text("value_column", "ltv", "Numeric column the score is computed from")
dbutils.widgets.text("target_table", "features.scores", "Score table to upsert into (schema.table)")
dbutils.widgets.text("key", "id", "Key column(s), comma-separated")
dbutils.widgets.text("cluster", "", "Aurora cluster in the policy (empty: the only one)")
dbutils.widgets.dropdown("check_idempotent", "true", ["true", "false"], "Rerun the upsert and compare counts")

# COMMAND ----------

import pandas as pd
from pyspark.sql import functions as F

import aurora_dbx

policy_path = dbutils.widgets.get("policy").strip() or None
source_table = dbutils.widgets.get("source_table").strip()
value_column = dbutils.widgets.get("value_column").strip()
target_table = dbutils.widgets.get("target_table").strip()
keys = [k.strip() for k in dbutils.widgets.get("key").split(",") if k.strip()]
cluster = dbutils.widgets.get("cluster").strip() or None
check_idempotent = dbutils.widgets.get("check_idempotent") == "true"

aurora_dbx.configure(policy=policy_path, spark=spark)
me = aurora_dbx.whoami()
print(f"running as {me.name} ({me.kind}) with roles {', '.join(me.roles) or '-'}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Compute the scores
# MAGIC A deterministic score in [0, 1): `1 - exp(-value / 1000)`, rounded to 6 digits.

# COMMAND ----------

features = aurora_dbx.read_table(source_table, cluster=cluster, columns=[*keys, value_column])
scores = features.select(
    *keys,
    F.round(1 - F.exp(-F.coalesce(F.col(value_column).cast("double"), F.lit(0.0)) / 1000.0), 6).alias("score"),
)
display(scores)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Upsert into Aurora

# COMMAND ----------

def target_rows() -> int:
    return aurora_dbx.read_table(target_table, cluster=cluster, columns=keys).count()


written = aurora_dbx.write_table(scores, target_table, mode="upsert", key=keys, cluster=cluster)
after_first = target_rows()
steps = [{"step": "upsert", "rows_written": written, "target_rows": after_first}]
print(f"upserted {written} rows into {target_table}; it now has {after_first} rows")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Rerun the same upsert: nothing changes

# COMMAND ----------

if check_idempotent:
    rewritten = aurora_dbx.write_table(scores, target_table, mode="upsert", key=keys, cluster=cluster)
    after_second = target_rows()
    steps.append({"step": "same upsert again", "rows_written": rewritten, "target_rows": after_second})
    target = aurora_dbx.read_table(target_table, cluster=cluster, columns=[*keys, "score"])
    missing = scores.join(target, on=[*keys, "score"], how="left_anti").count()
    steps.append({"step": "scored rows not in the target", "rows_written": 0, "target_rows": missing})

summary = pd.DataFrame(steps, columns=["step", "rows_written", "target_rows"])
display(summary)

if check_idempotent and (after_second != after_first or missing):
    raise AssertionError(
        f"the upsert is not idempotent: {after_first} rows after the first run, {after_second} after the "
        f"second, {missing} scored rows missing or different in {target_table}"
    )
