"""aurora_dbx: read and write Amazon Aurora from Databricks with no static secret.

Who is running the code (a Databricks user or service principal) is mapped through an
admin-owned access policy to an IAM role; the role is assumed with STS, short-lived
Aurora IAM tokens are minted for each connection, and every access is audited.

    import aurora_dbx
    aurora_dbx.configure(policy="/Volumes/main/security/aurora/policy.yaml")
    aurora_dbx.whoami()
    with aurora_dbx.connect() as conn: ...
"""

from __future__ import annotations

from typing import Any

from . import errors
from .context import Context, configure, current_context
from .errors import (
    AccessDenied,
    AuroraDbxError,
    CredentialError,
    IdentityError,
    PolicyError,
)
from .identity import Principal
from .policy import Access, load_policy
from .reads import read_table
from .writes import write_table

__all__ = [
    "AccessDenied",
    "AuroraDbxError",
    "Context",
    "CredentialError",
    "IdentityError",
    "PolicyError",
    "Principal",
    "__version__",
    "configure",
    "connect",
    "errors",
    "load_policy",
    "read_table",
    "whoami",
    "write_table",
]

__version__ = "0.1.0"


def whoami() -> Principal:
    """The current principal: ``.name``, ``.kind``, ``.groups`` and the ``.roles`` bound to it."""
    return current_context().whoami()


def connect(*, cluster: str | None = None, role: str | None = None, access: Access = "read") -> Any:
    """A DB-API connection (psycopg or PyMySQL) opened with a fresh IAM token.

    Read access opens a read-only session. For small queries and pandas; use
    ``read_table`` for anything Spark-sized.
    """
    return current_context().connect(cluster=cluster, role=role, access=access)
