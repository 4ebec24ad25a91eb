# Databricks notebook source
# MAGIC %md
# MAGIC # aurora_dbx quickstart
# MAGIC
# MAGIC Read an Amazon Aurora table into Spark **with no password anywhere**.
# MAGIC
# MAGIC 1. `aurora_dbx.configure()` loads the admin's access policy (a Unity Catalog volume or workspace file).
# MAGIC 2. `aurora_dbx.whoami()` shows who you are (your Databricks user, or the job's service principal)
# MAGIC    and the IAM roles the policy binds to you.
# MAGIC 3. `aurora_dbx.read_table()` assumes the right role with STS, mints a 15-minute Aurora IAM token per
# MAGIC    connection and returns a Spark DataFrame.
# MAGIC
# MAGIC Leave **policy** empty on a cluster whose init script sets `spark.aurora_dbx.policy`.
# MAGIC Leave **cluster** empty when the policy has a single Aurora cluster.

# COMMAND ----------

dbutils.widgets.text("policy", "", "Access policy path (empty: cluster default)")
dbutils.widgets.text("table", "public.customers", "Table (schema.table)")
dbutils.widgets.text("cluster", "", "Aurora cluster in the policy (empty: the only one)")

# COMMAND ----------

import aurora_dbx

policy_path = dbutils.widgets.get("policy").strip() or None
table = dbutils.widgets.get("table").strip()
cluster = dbutils.widgets.get("cluster").strip() or None

ctx = aurora_dbx.configure(policy=policy_path, spark=spark)
print(f"policy {ctx.policy.source} (project {ctx.policy.project})")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Who am I?
# MAGIC The identity comes from the Databricks runtime: it cannot be overridden from a notebook.

# COMMAND ----------

me = aurora_dbx.whoami()
print(f"principal:  {me.name} ({me.kind})")
print(f"groups:     {', '.join(me.groups) or '-'}")
print(f"roles:      {', '.join(me.roles) or 'none: ask the admin for a binding in the access policy'}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Read a table
# MAGIC The least-privileged bound role that may read the table is chosen. Denials (no binding, table out of
# MAGIC scope) are raised as `aurora_dbx.AccessDenied` before anything touches AWS or the database.

# COMMAND ----------

df = aurora_dbx.read_table(table, cluster=cluster)
df.printSchema()
display(df)
