"""Score customers and upsert the scores into Aurora: the serverless job's entry point.

The same steps as ``notebooks/03_write_features.py`` (which the job-cluster variant runs),
as a plain Python file for a serverless ``spark_python_task``: serverless job environments
install the aurora_dbx wheel for Python-file tasks, not for notebook tasks.

    python write_features.py --policy /Volumes/.../policy.yaml --source-table features.customer_ltv \\
        --value-column ltv --target-table features.scores --key id --cluster analytics
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="", help="access policy path (empty: AURORA_DBX_POLICY / spark.aurora_dbx.policy)")
    p.add_argument("--source-table", default="features.customer_ltv")
    p.add_argument("--value-column", default="ltv")
    p.add_argument("--target-table", default="features.scores")
    p.add_argument("--key", default="id", help="key column(s), comma-separated")
    p.add_argument("--cluster", default="", help="Aurora cluster in the policy (empty: the only one)")
    p.add_argument("--check-idempotent", action="store_true", help="rerun the upsert and compare row counts")
    return p.parse_args(argv)


def scores_of(features: Any, keys: list[str], value_column: str) -> Any:
    """``1 - exp(-value / 1000)`` rounded to 6 digits: the notebook's score."""
    from pyspark.sql import functions as F

    value = F.coalesce(F.col(value_column).cast("double"), F.lit(0.0))
    return features.select(*keys, F.round(1 - F.exp(-value / 1000.0), 6).alias("score"))


def main(argv: Sequence[str] | None = None, spark: Any = None) -> dict[str, int]:
    import aurora_dbx

    args = parse_args(argv)
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.getOrCreate()
    keys = [k.strip() for k in args.key.split(",") if k.strip()]
    cluster = args.cluster.strip() or None

    aurora_dbx.configure(policy=args.policy.strip() or None, spark=spark)
    me = aurora_dbx.whoami()
    print(f"running as {me.name} ({me.kind}) with roles {', '.join(me.roles) or '-'}")

    features = aurora_dbx.read_table(args.source_table, cluster=cluster, columns=[*keys, args.value_column])
    scores = scores_of(features, keys, args.value_column)

    def target_rows() -> int:
        return aurora_dbx.read_table(args.target_table, cluster=cluster, columns=keys).count()

    written = aurora_dbx.write_table(scores, args.target_table, mode="upsert", key=keys, cluster=cluster)
    result = {"rows_written": written, "target_rows": target_rows()}
    print(f"upserted {written} rows into {args.target_table}; it now has {result['target_rows']} rows")
    if args.check_idempotent:
        aurora_dbx.write_table(scores, args.target_table, mode="upsert", key=keys, cluster=cluster)
        again = target_rows()
        if again != result["target_rows"]:
            raise SystemExit(f"the upsert is not idempotent: {result['target_rows']} rows, then {again}")
        print(f"same upsert again: {again} rows, unchanged")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
