"""The README's main-job command runs end to end (as a separate process, like a user would)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_flow_and_stops_everything(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DATABRICKS_", "AURORA_DBX_", "MLFLOW_"))}
    env["PYSPARK_PYTHON"] = sys.executable
    exe = Path(sys.executable).with_name("aurora-dbx")
    proc = subprocess.run([str(exe), "demo", "--workdir", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data scientist in a notebook: scientist@example.com" in out
    assert "aurora_dbx.tables_read = features.customer_activity" in out
    assert "aurora_dbx.role_arn = arn:aws:iam::123456789012:role/demo-analyst-read" in out
    assert "may not read hr.salaries" in out
    assert "200,000 then 200,000 (idempotent)" in out
    assert "everything the demo started has been stopped" in out
    events = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert any('"event": "denied"' in e for e in events) and any('"event": "write"' in e for e in events)
    assert "X-Amz-Signature" not in out + proc.stderr
