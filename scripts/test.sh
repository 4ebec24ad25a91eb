#!/usr/bin/env bash
# Runs the whole test suite (unit, real local stack, Spark, MLflow, faults, hostile input,
# notebooks). Installs what it needs first (see scripts/bootstrap.sh); safe to re-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export PYSPARK_PYTHON="$ROOT/.venv/bin/python"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
