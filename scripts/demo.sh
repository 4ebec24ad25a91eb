#!/usr/bin/env bash
# Runs the main job (aurora-dbx demo) on an embedded local stack. Installs what it needs
# first (see scripts/bootstrap.sh); safe to re-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
export PYSPARK_PYTHON="$ROOT/.venv/bin/python"
exec "$ROOT/.venv/bin/aurora-dbx" demo "$@"
