"""Where this code runs: inside a Databricks runtime or not, and what the runtime says.

Checks ``DATABRICKS_RUNTIME_VERSION`` before importing any runtime-only module (as the
databricks-sdk does), so importing aurora_dbx never fails off Databricks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["RuntimeContext", "in_databricks_runtime", "runtime_context"]


def in_databricks_runtime() -> bool:
    """True on a Databricks cluster, job or serverless compute (driver or executor)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


@dataclass(frozen=True)
class RuntimeContext:
    """What the notebook or job context says about the current execution."""

    user: str | None
    workspace_url: str | None
    workspace_id: str | None
    cluster_id: str | None
    job_id: str | None
    run_id: str | None
    notebook_path: str | None
    # The notebook's short-lived workspace API token; never logged or shown (repr=False).
    api_token: str | None = None

    def __repr__(self) -> str:  # keep the API token out of every repr
        return (
            f"RuntimeContext(user={self.user!r}, workspace_id={self.workspace_id!r}, "
            f"cluster_id={self.cluster_id!r}, job_id={self.job_id!r}, run_id={self.run_id!r})"
        )


def _first(ctx: Any, *names: str) -> str | None:
    for n in names:
        v = getattr(ctx, n, None)
        if v not in (None, ""):
            return str(v)
    return None


def runtime_context() -> RuntimeContext | None:
    """The REPL context of the current notebook or job, or None off Databricks."""
    if not in_databricks_runtime():
        return None
    try:
        # Only importable on Databricks; the same module the databricks-sdk reads.
        from dbruntime.databricks_repl_context import get_context  # type: ignore[import-not-found]
    except ImportError:
        return None
    ctx = get_context()
    if ctx is None:
        return None
    return RuntimeContext(
        user=_first(ctx, "user", "userName"),
        workspace_url=_first(ctx, "workspaceUrl", "browserHostName"),
        workspace_id=_first(ctx, "workspaceId", "orgId"),
        cluster_id=_first(ctx, "clusterId") or os.environ.get("DB_CLUSTER_ID"),
        job_id=_first(ctx, "jobId"),
        run_id=_first(ctx, "currentRunId", "runId", "idInJob"),
        notebook_path=_first(ctx, "notebookPath"),
        api_token=_first(ctx, "apiToken"),
    )
