"""Embedded, Aurora-faithful local stack for aurora_dbx tests and the demo.

``LocalStack`` starts, on loopback and from its own directory:

* a moto server for STS and IAM (``stack.sts_endpoint``, ``stack.create_role``);
* PostgreSQL and MariaDB servers with TLS (``stack.ca_bundle``) whose TCP logins take
  an Aurora IAM auth token as the password. A small PAM module
  (``pam_aurora_iam.c``, built with gcc at start) hands the whole token to
  ``stack.verifier``, which re-checks the SigV4 signature against the credentials moto's
  STS issued, ``DBUser``, host/port, age and the role's ``rds-db:connect`` grant
  (``stack.verifier.allow(role_arn, db_user)``); failures read exactly like Aurora's
  (``PAM authentication failed for user "..."`` / ``Access denied for user ...``);
* a fake Databricks workspace answering SCIM ``Me`` (``stack.databricks_host``,
  ``stack.add_databricks_principal``).

Requires root, PostgreSQL and MariaDB server binaries, gcc, libpam0g-dev, openssl and
moto[server]. Clients log in as ``user=<db_user>``, ``password=<IAM token>`` minted for
host ``localhost`` and the server's port, with TLS and host verification:

* psycopg: ``host="localhost", sslmode="verify-full", sslrootcert=str(stack.ca_bundle)``;
* PyMySQL: ``host="localhost", ssl={"ca": str(stack.ca_bundle), "check_hostname": True}``
  (it answers the server's ``mysql_clear_password`` request by itself);
* PostgreSQL JDBC: ``sslmode=verify-full&sslrootcert=<ca_bundle>``;
* MariaDB Connector/J 2.7 (``org.mariadb.jdbc.Driver``, ``jdbc:mariadb:`` or
  ``jdbc:mysql:``): ``useSsl=true&serverSslCert=<ca_bundle>`` (host name verification is
  on by default; the driver refuses ``mysql_clear_password`` without TLS unless
  ``useSsl=false`` is forced).

A token minted for ``127.0.0.1`` is refused on a ``localhost`` server (``endpoint_mismatch``),
as Aurora refuses a token minted for another endpoint.

Example::

    from aurora_dbx.local_stack import LocalStack

    with LocalStack() as stack:
        role = stack.create_role("analytics-reader")
        stack.postgres.create_iam_user("app_ro")
        stack.postgres.execute_admin("GRANT pg_read_all_data TO app_ro")
        stack.verifier.allow(role, "app_ro")
        ...  # assume the role through stack.sts_endpoint, mint a token, connect
"""

from ._proc import LocalStackError
from .databases import DatabaseServer, MariaDBServer, PostgresServer
from .fake_databricks import DatabricksPrincipal, FakeDatabricksWorkspace
from .stack import ACCOUNT_ID, LocalStack
from .verifier import REASONS, TokenVerifier, Verdict, VerificationEvent

__all__ = [
    "ACCOUNT_ID",
    "REASONS",
    "DatabaseServer",
    "DatabricksPrincipal",
    "FakeDatabricksWorkspace",
    "LocalStack",
    "LocalStackError",
    "MariaDBServer",
    "PostgresServer",
    "TokenVerifier",
    "Verdict",
    "VerificationEvent",
]
