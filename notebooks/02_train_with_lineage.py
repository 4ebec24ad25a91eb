# Databricks notebook source
# MAGIC %md
# MAGIC # Train a model with credential lineage
# MAGIC
# MAGIC Features are read from Aurora **inside an MLflow run**. aurora_dbx records on the run who read which
# MAGIC table through which IAM role and database user (`aurora_dbx.*` run tags) and adds one dataset input per
# MAGIC table read (source type `aurora`). Nothing secret is ever written to MLflow: no token, no key.
# MAGIC
# MAGIC The table needs a label column (0/1) and numeric feature columns.

# COMMAND ----------

dbutils.widgets.text("policy", "", "Access policy path (empty: cluster default)")
dbutils.widgets.text("table", "features.customer_training", "Training table (schema.table)")
dbutils.widgets.text("label", "churned", "Label column (0/1)")
dbutils.widgets.text("features", "", "Feature columns, comma-separated (empty: every numeric column)")
dbutils.widgets.text("cluster", "", "Aurora cluster in the policy (empty: the only one)")
dbutils.widgets.text("experiment", "", "MLflow experiment path (empty: this notebook's experiment)")
dbutils.widgets.dropdown("log_model", "true", ["true", "false"], "Log the fitted model")

# COMMAND ----------

import mlflow
import pandas as pd
from pyspark.sql.types import NumericType
from sklearn.linear_model import LogisticRegression

import aurora_dbx

policy_path = dbutils.widgets.get("policy").strip() or None
table = dbutils.widgets.get("table").strip()
label = dbutils.widgets.get("label").strip()
wanted = [c.strip() for c in dbutils.widgets.get("features").split(",") if c.strip()]
cluster = dbutils.widgets.get("cluster").strip() or None
experiment = dbutils.widgets.get("experiment").strip()
log_model = dbutils.widgets.get("log_model") == "true"

aurora_dbx.configure(policy=policy_path, spark=spark)
if experiment:
    mlflow.set_experiment(experiment)
print(f"training on {table} as {aurora_dbx.whoami()}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Read and train inside one MLflow run

# COMMAND ----------

with mlflow.start_run(run_name=f"train on {table}") as run:
    df = aurora_dbx.read_table(table, cluster=cluster)  # lineage is recorded on this run
    feature_cols = wanted or [
        f.name for f in df.schema.fields
        if isinstance(f.dataType, NumericType) and f.name not in (label, "id")
    ]
    pdf = df.select(*feature_cols, label).toPandas()
    X = pdf[feature_cols].astype("float64")
    y = pdf[label].astype("int64")
    model = LogisticRegression(max_iter=1000).fit(X, y)

    mlflow.log_params({"table": table, "label": label, "features": ",".join(feature_cols), "rows": len(pdf)})
    mlflow.log_metric("train_accuracy", float(model.score(X, y)))
    model_info = None
    if log_model:
        # MLflow 3 names the model with `name=`; MLflow 2 (older runtimes) with `artifact_path=`.
        where = {"name": "model"} if int(mlflow.__version__.split(".")[0]) >= 3 else {"artifact_path": "model"}
        model_info = mlflow.sklearn.log_model(model, input_example=X.head(3), **where)

run_id = run.info.run_id
print(f"run {run_id}: train_accuracy={model.score(X, y):.3f} on {len(pdf)} rows, features {feature_cols}")
if model_info is not None:
    print(f"model: {model_info.model_uri}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## What the run records: credential lineage
# MAGIC The `aurora_dbx.*` tags name the principal, the IAM role, the database user, the Aurora cluster,
# MAGIC the tables read and when the role session expires. Each table read is also a dataset input.

# COMMAND ----------

finished = mlflow.get_run(run_id)
lineage_tags = pd.DataFrame(
    sorted((k, v) for k, v in finished.data.tags.items() if k.startswith("aurora_dbx.")),
    columns=["tag", "value"],
)
display(lineage_tags)

# COMMAND ----------

dataset_inputs = pd.DataFrame(
    [
        {"name": d.dataset.name, "source_type": d.dataset.source_type, "digest": d.dataset.digest,
         "source": d.dataset.source}
        for d in finished.inputs.dataset_inputs
    ],
    columns=["name", "source_type", "digest", "source"],
)
display(dataset_inputs)
