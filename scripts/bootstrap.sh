#!/usr/bin/env bash
# Installs everything aurora_dbx needs for local development, the demo and the tests on a
# Debian machine: system packages (JDBC drivers, PAM headers, TLS tools), a virtual
# environment with the package and its local extras. Safe to re-run: each step is a no-op
# once done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AURORA_DBX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

need_apt=()
for pkg in libpostgresql-jdbc-java libmariadb-java libpam0g-dev gcc openssl shellcheck; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.aurora_dbx-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing aurora_dbx[local,test] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[local,test]"
  echo "$want" > "$stamp"
fi
