"""``aurora-dbx plan``: the IAM policies and database SQL an access policy implies.

The access policy is a client-side convenience; the security boundaries are the IAM
role trust policies (who may assume which role), the ``rds-db:connect`` permission on
exactly one database user, and that user's database GRANTs. :func:`build_plan` derives
all three from a :class:`~aurora_dbx.policy.Policy`, without touching AWS, a database or
any credential, so its output never contains a secret. ``docs/PLAN.md`` explains how an
admin applies it and what it cannot express.

Design points:

* Mapped roles trust only the base principals (``credentials.base_role_arn``, the OIDC
  web identity role, ``--trusted-principal-arn``), only with the session tag
  ``project`` set to the policy's project, and only with a ``SourceIdentity`` naming a
  principal bound to the role (the value the library sends, see
  :func:`aurora_dbx.credentials.source_identity`). Group members cannot be enumerated,
  so a group-bound role requires a ``SourceIdentity`` to be present and says so.
* The SQL converges: re-running it first revokes what the user had, then grants exactly
  what the policy's table patterns and access imply. PostgreSQL statements should run in
  one transaction (``psql --single-transaction``).
* Every identifier reaches SQL through :func:`aurora_dbx.identifiers.quote_identifier`,
  or, for names only known to the catalog at run time, through PostgreSQL's
  ``format('%I')`` / MySQL's backtick doubling. Values (LIKE patterns, user names inside
  procedural code) are SQL string literals built by :func:`_literal`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import AuroraDbxError, PolicyError
from .identifiers import quote_identifier
from .policy import Cluster, Policy, Role, TablePattern, load_policy

__all__ = [
    "MYSQL_GRANT_HELPER",
    "STAGE_PREFIX",
    "ClusterSql",
    "OidcTrust",
    "Plan",
    "RolePlan",
    "SqlBlock",
    "TrustedPrincipal",
    "build_plan",
    "build_sql",
    "register",
]

IAM_POLICY_VERSION = "2012-10-17"
ASSUME_ACTIONS = ("sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession")
MIN_MAX_SESSION_DURATION = 3600  # IAM refuses a role MaxSessionDuration below one hour
MAX_CHAINED_SESSION = 3600  # STS caps a session assumed with another role's session
STAGE_PREFIX = "_adbx_stage_"  # write_table stages into <schema>._adbx_stage_<random>
MYSQL_GRANT_HELPER = "_adbx_plan_grant"  # temporary procedure for MySQL wildcard grants
_READ_PRIVILEGES = "SELECT"
_WRITE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
_MYSQL_STAGE_PRIVILEGES = "CREATE, DROP"
_PG_RELKINDS = "('r', 'p', 'v', 'm', 'f')"  # tables, partitioned, views, matviews, foreign
_MYSQL_SYSTEM_SCHEMAS = "('mysql', 'information_schema', 'performance_schema', 'sys')"

_PRINCIPAL_ARN = re.compile(
    r"^arn:aws(-[a-z]+)*:iam::\d{12}:(root|(role|user)/[\w+=,.@/-]{1,512})$"
)
_OIDC_PROVIDER_ARN = re.compile(
    r"^arn:aws(-[a-z]+)*:iam::\d{12}:oidc-provider/([A-Za-z0-9.-]+(?::\d+)?(/[\w.~-]+)*)$"
)
_LIKE_FRAGMENT = re.compile(r"^[\w$*]+$", re.UNICODE)


# -- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OidcTrust:
    """Who may exchange an OIDC token for the web identity role (``credentials.web_identity_role_arn``).

    ``provider_arn`` is the IAM OIDC identity provider, ``audience`` the token's ``aud``
    and ``subjects`` the exact ``sub`` values allowed (no wildcards).
    """

    provider_arn: str
    audience: str
    subjects: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _OIDC_PROVIDER_ARN.match(self.provider_arn or ""):
            raise AuroraDbxError(
                f"--oidc-provider-arn {self.provider_arn!r} is not an IAM OIDC provider ARN "
                "(arn:aws:iam::123456789012:oidc-provider/HOST[/PATH])"
            )
        object.__setattr__(self, "subjects", tuple(self.subjects))
        if not self.audience or not self.audience.strip():
            raise AuroraDbxError("--oidc-audience is required with --oidc-provider-arn")
        if not self.subjects:
            raise AuroraDbxError(
                "at least one --oidc-subject is required: without it any token of the "
                "provider could assume the web identity role"
            )
        for value in (self.audience, *self.subjects):
            if not value.strip() or value != value.strip() or any(c in value for c in "*?\n\r"):
                raise AuroraDbxError(
                    f"OIDC audience/subject {value!r} must be an exact value "
                    "(no wildcards, no surrounding spaces)"
                )

    @property
    def provider(self) -> str:
        """The provider URL without ``https://``: the prefix of its IAM condition keys."""
        return self.provider_arn.split(":oidc-provider/", 1)[1]


@dataclass(frozen=True)
class TrustedPrincipal:
    """An identity the mapped roles trust, with the policies it needs itself."""

    arn: str
    source: str  # base_role_arn | web_identity_role_arn | cli
    permission_policy: dict[str, Any]
    trust_policy: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "arn": self.arn,
            "source": self.source,
            "trust_policy": self.trust_policy,
            "permission_policy": self.permission_policy,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class RolePlan:
    """IAM settings for one policy role."""

    role: str
    cluster: str
    db_user: str
    access: str
    iam_role_arn: str
    trust_policy: dict[str, Any] | None
    permission_policy: dict[str, Any]
    max_session_duration: int
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "iam_role_arn": self.iam_role_arn,
            "cluster": self.cluster,
            "db_user": self.db_user,
            "access": self.access,
            "trust_policy": self.trust_policy,
            "permission_policy": self.permission_policy,
            "max_session_duration": self.max_session_duration,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class SqlBlock:
    """Statements with one purpose (a comment in the script), each without a terminator."""

    comment: str
    statements: tuple[str, ...]


@dataclass(frozen=True)
class ClusterSql:
    """The SQL for one cluster, to run as its master user."""

    cluster: str
    engine: str
    database: str
    blocks: tuple[SqlBlock, ...]
    notes: tuple[str, ...] = ()

    @property
    def statements(self) -> list[str]:
        return [s for b in self.blocks for s in b.statements]

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "database": self.database,
                "statements": self.statements, "notes": list(self.notes)}

    def script(self) -> str:
        """A script for ``psql --single-transaction -f`` or the ``mysql`` client."""
        client = (
            f"psql --single-transaction -v ON_ERROR_STOP=1 -d {self.database} -f FILE"
            if self.engine == "postgresql" else f"mysql --ssl-mode=VERIFY_IDENTITY {self.database} < FILE"
        )
        lines = [
            f"-- aurora-dbx plan: cluster {self.cluster} ({self.engine}), database {self.database}",
            f"-- run as the cluster's master user, e.g. {client}",
        ]
        lines += [f"-- note: {n}" for n in self.notes]
        for block in self.blocks:
            lines += ["", f"-- {block.comment}"]
            for stmt in block.statements:
                if self.engine == "mysql" and stmt.startswith("CREATE PROCEDURE"):
                    lines += ["DELIMITER //", stmt + " //", "DELIMITER ;"]
                else:
                    lines.append(stmt + ";")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Plan:
    """Everything ``aurora-dbx plan`` emits for one policy."""

    project: str
    source: str
    roles: tuple[RolePlan, ...]
    trusted_principals: tuple[TrustedPrincipal, ...]
    sql: Mapping[str, ClusterSql]
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "policy": self.source,
            "trusted_principals": [p.as_dict() for p in self.trusted_principals],
            "roles": [r.as_dict() for r in self.roles],
            "sql": {name: c.as_dict() for name, c in self.sql.items()},
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_text(self) -> str:
        out: list[str] = [f"# aurora-dbx plan for project {self.project} (policy {self.source})", ""]
        out += [f"note: {n}" for n in self.notes]
        out.append("## Trusted principals (may assume every mapped role)")
        for p in self.trusted_principals:
            out += ["", f"### {p.arn} ({p.source})"]
            if p.trust_policy is not None:
                out += ["trust policy:", _pretty(p.trust_policy)]
            out += ["permission policy (to assume the mapped roles):", _pretty(p.permission_policy)]
            out += [f"note: {n}" for n in p.notes]
        for r in self.roles:
            verb = "read+write" if r.access == "write" else "read"
            out += ["", f"## Role {r.role}: {r.db_user}@{r.cluster} ({verb})",
                    f"IAM role:             {r.iam_role_arn}",
                    f"MaxSessionDuration:   {r.max_session_duration}",
                    "trust policy:", _pretty(r.trust_policy) if r.trust_policy else "(none: see notes)",
                    "permission policy:", _pretty(r.permission_policy)]
            out += [f"note: {n}" for n in r.notes]
        for c in self.sql.values():
            out += ["", f"## SQL for cluster {c.cluster} ({c.engine})", c.script().rstrip("\n")]
        return "\n".join(out) + "\n"


def _pretty(doc: Any) -> str:
    return json.dumps(doc, indent=2)


# -- IAM -------------------------------------------------------------------------------


def _partition(arn: str) -> str:
    return arn.split(":")[1]


def _source_identities(policy: Policy, role: Role) -> tuple[list[str], list[str]]:
    """SourceIdentity values of the principals bound to ``role``, and its group names."""
    from .credentials import source_identity
    from .identity import Principal

    values: set[str] = set()
    groups: set[str] = set()
    for b in policy.bindings:
        if role.name not in b.roles:
            continue
        if b.kind == "group":
            groups.add(b.subject)
        else:
            values.add(source_identity(Principal(name=b.subject, kind=b.kind)))
    return sorted(values), sorted(groups)


def _role_trust(
    policy: Policy, role: Role, principals: Sequence[str]
) -> tuple[dict[str, Any] | None, list[str]]:
    identities, groups = _source_identities(policy, role)
    notes: list[str] = []
    if not identities and not groups:
        return None, [
            "no binding names this role: nobody may use it, so no trust policy is emitted; "
            "do not create the IAM role (or delete it)"
        ]
    condition: dict[str, Any] = {"StringEquals": {"aws:RequestTag/project": policy.project}}
    if groups:
        # IAM cannot see Databricks group membership: any principal the base role acts
        # for may assume the role, but the session must name who (SourceIdentity).
        condition["StringLike"] = {"sts:SourceIdentity": "*"}
        condition["Null"] = {"sts:SourceIdentity": "false"}
        notes.append(
            f"bound through group(s) {', '.join(groups)}: IAM cannot enumerate Databricks group "
            "members, so this trust policy accepts any SourceIdentity (it must be present); "
            "group membership is enforced by the client-side policy only, and the database "
            "grants still bound what the role can do"
        )
    else:
        # Databricks user names and application ids compare case-insensitively, as in
        # the access policy's bindings.
        condition["StringEqualsIgnoreCase"] = {"sts:SourceIdentity": identities}
    statement = {
        "Sid": "AuroraDbxAssume",
        "Effect": "Allow",
        "Principal": {"AWS": list(principals)},
        "Action": list(ASSUME_ACTIONS),
        "Condition": condition,
    }
    return {"Version": IAM_POLICY_VERSION, "Statement": [statement]}, notes


def _connect_arn(role: Role, cluster: Cluster, policy: Policy) -> str:
    if not cluster.resource_id:
        raise PolicyError(
            f"is required by plan for role {role.name}'s rds-db:connect ARN: set it to the "
            "cluster's DbClusterResourceId (aws rds describe-db-clusters --query "
            "'DBClusters[].DbClusterResourceId')",
            source=policy.source, key=f"clusters.{cluster.name}.resource_id",
        )
    return (
        f"arn:{_partition(role.iam_role_arn)}:rds-db:{cluster.region}:{role.account_id}:"
        f"dbuser:{cluster.resource_id}/{role.db_user}"
    )


def _trusted_principals(
    policy: Policy, extra: Iterable[str], oidc: OidcTrust | None
) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    creds = policy.credentials
    if creds.base_role_arn:
        found.append((creds.base_role_arn, "base_role_arn"))
    if creds.source == "web_identity" or oidc is not None:
        if not creds.web_identity_role_arn:
            raise PolicyError(
                "plan needs the IAM role that OIDC tokens are exchanged for "
                "(web identity): set credentials.web_identity_role_arn",
                source=policy.source, key="credentials.web_identity_role_arn",
            )
        if oidc is None:
            raise AuroraDbxError(
                "the policy uses credentials.source: web_identity; pass --oidc-provider-arn, "
                "--oidc-audience and --oidc-subject so plan can write the web identity role's trust policy"
            )
        found.append((creds.web_identity_role_arn, "web_identity_role_arn"))
    for arn in extra:
        if not _PRINCIPAL_ARN.match(arn):
            raise AuroraDbxError(
                f"--trusted-principal-arn {arn!r} is not an IAM role, user or account root ARN"
            )
        found.append((arn, "cli"))
    unique: dict[str, str] = {}
    for arn, source in found:
        unique.setdefault(arn, source)
    if not unique:
        raise PolicyError(
            "plan needs at least one principal allowed to assume the roles: set "
            "credentials.base_role_arn (the IAM role of the Unity Catalog service credential "
            "or instance profile) or pass --trusted-principal-arn ARN",
            source=policy.source, key="credentials.base_role_arn",
        )
    return list(unique.items())


def _assume_permission(role_arns: Sequence[str]) -> dict[str, Any]:
    return {
        "Version": IAM_POLICY_VERSION,
        "Statement": [{
            "Sid": "AuroraDbxAssumeMappedRoles",
            "Effect": "Allow",
            "Action": list(ASSUME_ACTIONS),
            "Resource": list(role_arns),
        }],
    }


def _web_identity_trust(oidc: OidcTrust) -> dict[str, Any]:
    subjects: str | list[str] = list(oidc.subjects)
    return {
        "Version": IAM_POLICY_VERSION,
        "Statement": [{
            "Sid": "AuroraDbxWebIdentity",
            "Effect": "Allow",
            "Principal": {"Federated": oidc.provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                f"{oidc.provider}:aud": oidc.audience,
                f"{oidc.provider}:sub": subjects,
            }},
        }],
    }


def build_plan(
    policy: Policy | str | os.PathLike[str] | Mapping[str, Any],
    *,
    trusted_principal_arns: Iterable[str] = (),
    oidc: OidcTrust | None = None,
) -> Plan:
    """The IAM trust and permission policies and the database SQL ``policy`` implies.

    ``trusted_principal_arns`` are trusted in addition to ``credentials.base_role_arn``
    (and the web identity role when ``credentials.source`` is ``web_identity``, which
    needs ``oidc``). Raises :class:`PolicyError` when the policy lacks what a plan needs
    (a cluster's ``resource_id``, any trusted principal), :class:`AuroraDbxError` on a bad
    argument. Pure: no network, no credentials.
    """
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    principals = _trusted_principals(policy, trusted_principal_arns, oidc)
    principal_arns = [arn for arn, _ in principals]

    roles: list[RolePlan] = []
    for role in policy.roles.values():
        cluster = policy.clusters[role.cluster]
        trust, notes = _role_trust(policy, role, principal_arns)
        permission = {
            "Version": IAM_POLICY_VERSION,
            "Statement": [{
                "Sid": "AuroraDbxConnect",
                "Effect": "Allow",
                "Action": "rds-db:connect",
                "Resource": _connect_arn(role, cluster, policy),
            }],
        }
        max_duration = max(MIN_MAX_SESSION_DURATION, role.session_seconds)
        if role.session_seconds < MIN_MAX_SESSION_DURATION:
            notes.append(
                f"MaxSessionDuration is {MIN_MAX_SESSION_DURATION} (the IAM minimum); the library "
                f"still requests session_seconds={role.session_seconds} for each role session"
            )
        if role.session_seconds > MAX_CHAINED_SESSION and any(":role/" in a for a in principal_arns):
            notes.append(
                f"session_seconds={role.session_seconds}: STS caps role-chained sessions at "
                f"{MAX_CHAINED_SESSION} s, and a role session (Unity Catalog service credential, "
                "instance profile, web identity role) assuming this role is role chaining, so "
                f"such requests fail: set session_seconds to at most {MAX_CHAINED_SESSION}"
            )
        roles.append(RolePlan(
            role.name, role.cluster, role.db_user, role.access, role.iam_role_arn,
            trust, permission, max_duration, tuple(notes),
        ))

    mapped = [r.iam_role_arn for r in roles if r.trust_policy is not None]
    trusted: list[TrustedPrincipal] = []
    for arn, source in principals:
        notes = []
        trust = None
        if source == "web_identity_role_arn":
            assert oidc is not None
            trust = _web_identity_trust(oidc)
            notes.append(
                "web identity role: only OIDC tokens with the listed audience and subjects may "
                "assume it; it needs no permission besides assuming the mapped roles"
            )
        elif source == "cli":
            notes.append("attach this permission policy to it (required if it is in another account)")
        elif source == "base_role_arn":
            notes.append(
                "the base role's own trust policy is managed by Databricks (Unity Catalog service "
                "credential or instance profile); add this permission policy to it"
            )
        trusted.append(TrustedPrincipal(
            arn, source, _assume_permission(mapped) if mapped else {}, trust, tuple(notes)
        ))

    return Plan(policy.project, policy.source, tuple(roles), tuple(trusted), build_sql(policy))


# -- SQL -------------------------------------------------------------------------------


def _literal(value: str) -> str:
    """A SQL string literal. Values are identifiers or LIKE patterns built from them."""
    if "\\" in value or "\x00" in value:
        raise AuroraDbxError(f"refusing to put {value!r} into a SQL literal")
    return "'" + value.replace("'", "''") + "'"


def _like(part: str) -> str:
    """A policy pattern part as a LIKE pattern with ESCAPE '!' (``*`` -> ``%``)."""
    if not _LIKE_FRAGMENT.match(part):
        raise AuroraDbxError(f"table pattern part {part!r} is not an identifier pattern")
    return "".join("%" if c == "*" else ("!" + c if c in "!%_" else c) for c in part)


def _split(pattern: TablePattern) -> tuple[str, str]:
    schema, table = pattern.text.split(".")
    return schema, table


def _dollar_quote(body: str) -> str:
    tag = "$adbx$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$adbx{n}$"
    return f"{tag}\n{body}\n{tag}"


def _pg_do(declare: Sequence[str], body: Sequence[str]) -> str:
    text = "DECLARE\n" + "".join(f"  {d}\n" for d in declare) + "BEGIN\n"
    text += "".join(f"  {line}\n" for line in body) + "END"
    return "DO " + _dollar_quote(text)


@dataclass
class _DbUser:
    """One database user on one cluster, with every role that maps to it."""

    name: str
    roles: list[Role] = field(default_factory=list)

    @property
    def access(self) -> str:
        return "write" if any(r.access == "write" for r in self.roles) else "read"

    @property
    def patterns(self) -> list[TablePattern]:
        seen: dict[str, TablePattern] = {}
        for r in self.roles:
            for p in r.tables:
                seen.setdefault(p.text, p)
        return list(seen.values())


def _users_by_cluster(policy: Policy) -> dict[str, list[_DbUser]]:
    result: dict[str, dict[str, _DbUser]] = {}
    for role in policy.roles.values():
        users = result.setdefault(role.cluster, {})
        users.setdefault(role.db_user, _DbUser(role.db_user)).roles.append(role)
    return {c: list(u.values()) for c, u in result.items()}


def build_sql(policy: Policy | str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, ClusterSql]:
    """Per cluster (in policy order, clusters without roles left out): the SQL creating
    each database user for IAM authentication with exactly the grants its roles imply."""
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    out: dict[str, ClusterSql] = {}
    by_cluster = _users_by_cluster(policy)
    for name, cluster in policy.clusters.items():
        users = by_cluster.get(name)
        if not users:
            continue
        make = _postgres_sql if cluster.engine == "postgresql" else _mysql_sql
        out[name] = make(cluster, users)
    return out


def _shared_user_notes(user: _DbUser) -> list[str]:
    if len(user.roles) < 2:
        return []
    names = ", ".join(f"{r.name} ({r.access})" for r in user.roles)
    note = f"database user {user.name} is shared by roles {names}: it gets the union of their grants"
    if len({r.access for r in user.roles}) > 1:
        note += (
            "; the read role can therefore write through the database: give it its own db_user"
        )
    return [note]


# PostgreSQL ---------------------------------------------------------------------------


def _postgres_sql(cluster: Cluster, users: list[_DbUser]) -> ClusterSql:
    blocks: list[SqlBlock] = []
    notes: list[str] = []
    for user in users:
        user_blocks, user_notes = _postgres_user(cluster, user)
        blocks += user_blocks
        notes += user_notes
    return ClusterSql(cluster.name, cluster.engine, cluster.database, tuple(blocks), tuple(notes))


def _postgres_user(cluster: Cluster, user: _DbUser) -> tuple[list[SqlBlock], list[str]]:
    q = lambda name: quote_identifier(name, "postgresql")  # noqa: E731
    u = q(user.name)
    write = user.access == "write"
    privileges = _WRITE_PRIVILEGES if write else _READ_PRIVILEGES
    roles = ", ".join(r.name for r in user.roles)
    notes = _shared_user_notes(user)

    create = [
        _pg_do(
            [f"u text := {_literal(user.name)};"],
            ["IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = u) THEN",
             f"  CREATE ROLE {u} WITH LOGIN;",
             "END IF;"],
        ),
        # No password: an rds_iam member logs in with IAM auth tokens only.
        f"ALTER ROLE {u} WITH LOGIN PASSWORD NULL",
        f"GRANT rds_iam TO {u}",
    ]
    reset = [
        _pg_do(
            [f"u text := {_literal(user.name)};", "uid oid;", "r record;"],
            [
                "SELECT oid INTO uid FROM pg_catalog.pg_roles WHERE rolname = u;",
                "FOR r IN SELECT DISTINCT n.nspname, c.relname, c.relkind",
                "    FROM pg_catalog.pg_class c",
                "    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
                "    CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a",
                "    WHERE a.grantee = uid AND c.relowner <> uid LOOP",
                "  IF r.relkind = 'S' THEN",
                "    EXECUTE format('REVOKE ALL ON SEQUENCE %I.%I FROM %I', r.nspname, r.relname, u);",
                "  ELSE",
                "    EXECUTE format('REVOKE ALL ON TABLE %I.%I FROM %I', r.nspname, r.relname, u);",
                "  END IF;",
                "END LOOP;",
                "FOR r IN SELECT DISTINCT n.nspname FROM pg_catalog.pg_namespace n",
                "    CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a",
                "    WHERE a.grantee = uid AND n.nspowner <> uid LOOP",
                "  EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %I', r.nspname, u);",
                "END LOOP;",
                "FOR r IN SELECT DISTINCT n.nspname FROM pg_catalog.pg_default_acl d",
                "    LEFT JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace",
                "    CROSS JOIN LATERAL pg_catalog.aclexplode(d.defaclacl) a",
                "    WHERE a.grantee = uid AND d.defaclobjtype = 'r'",
                "      AND d.defaclrole = (SELECT oid FROM pg_catalog.pg_roles"
                " WHERE rolname = current_user) LOOP",
                "  IF r.nspname IS NULL THEN",
                "    EXECUTE format('ALTER DEFAULT PRIVILEGES REVOKE ALL ON TABLES FROM %I', u);",
                "  ELSE",
                "    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE ALL ON TABLES"
                " FROM %I', r.nspname, u);",
                "  END IF;",
                "END LOOP;",
            ],
        ),
        f"REVOKE ALL ON DATABASE {q(cluster.database)} FROM {u}",
    ]
    session = [
        f"GRANT CONNECT ON DATABASE {q(cluster.database)} TO {u}",
        (f"ALTER ROLE {u} RESET default_transaction_read_only" if write
         else f"ALTER ROLE {u} SET default_transaction_read_only = on"),
    ]

    grants: list[str] = []
    exact_schemas: list[str] = []
    for p in user.patterns:
        schema, _ = _split(p)
        if "*" not in schema and schema not in exact_schemas:
            exact_schemas.append(schema)
    for schema in exact_schemas:
        grants.append(f"GRANT USAGE ON SCHEMA {q(schema)} TO {u}")
        if write:
            # write_table stages into <schema>._adbx_stage_<random>, then publishes.
            grants.append(f"GRANT CREATE ON SCHEMA {q(schema)} TO {u}")
    for p in user.patterns:
        schema, table = _split(p)
        if "*" in schema:
            grants.append(_pg_schema_loop(user.name, schema, table, privileges, write))
            notes.append(
                f"{p.text}: granted in the schemas that match when the SQL runs; re-run the "
                "plan's SQL after creating a matching schema"
            )
        elif table == "*":
            grants.append(f"GRANT {privileges} ON ALL TABLES IN SCHEMA {q(schema)} TO {u}")
            grants.append(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA {q(schema)} GRANT {privileges} ON TABLES TO {u}"
            )
        elif "*" in table:
            grants.append(_pg_table_loop(user.name, schema, table, privileges))
            notes.append(
                f"{p.text}: granted on the tables that match when the SQL runs; re-run the "
                "plan's SQL after creating a matching table"
            )
        else:
            grants.append(f"GRANT {privileges} ON TABLE {q(schema)}.{q(table)} TO {u}")

    verb = "read+write" if write else "read-only"
    return [
        SqlBlock(f"database user {user.name} for role(s) {roles}: IAM authentication only", tuple(create)),
        SqlBlock(f"{user.name}: revoke earlier grants so the result is exactly the policy", tuple(reset)),
        SqlBlock(f"{user.name}: {verb} sessions", tuple(session)),
        SqlBlock(
            f"{user.name}: {privileges} on {', '.join(p.text for p in user.patterns)}"
            + (" (+ CREATE on the schema for staging tables)" if write else ""),
            tuple(grants),
        ),
    ], notes


def _pg_table_grants(schema_expr: str, table: str, privileges: str, indent: str) -> list[str]:
    """PL/pgSQL lines granting on tables of the schema named by ``schema_expr``."""
    if table == "*":
        return [
            f"{indent}EXECUTE format('GRANT {privileges} ON ALL TABLES IN SCHEMA %I TO %I', "
            f"{schema_expr}, u);",
            f"{indent}EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I "
            f"GRANT {privileges} ON TABLES TO %I', {schema_expr}, u);",
        ]
    if "*" in table:
        cond = f"c.relname LIKE {_literal(_like(table))} ESCAPE '!'"
    else:
        cond = f"c.relname = {_literal(table)}"
    return [
        f"{indent}FOR t IN SELECT c.relname FROM pg_catalog.pg_class c",
        f"{indent}    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
        f"{indent}    WHERE n.nspname = {schema_expr} AND c.relkind IN {_PG_RELKINDS}",
        f"{indent}      AND {cond} ORDER BY 1 LOOP",
        f"{indent}  EXECUTE format('GRANT {privileges} ON TABLE %I.%I TO %I', "
        f"{schema_expr}, t.relname, u);",
        f"{indent}END LOOP;",
    ]


def _pg_table_loop(user: str, schema: str, table: str, privileges: str) -> str:
    return _pg_do(
        [f"u text := {_literal(user)};", "t record;"],
        _pg_table_grants(_literal(schema), table, privileges, ""),
    )


def _pg_schema_loop(user: str, schema: str, table: str, privileges: str, write: bool) -> str:
    body = [
        "FOR s IN SELECT n.nspname FROM pg_catalog.pg_namespace n",
        f"    WHERE n.nspname LIKE {_literal(_like(schema))} ESCAPE '!'",
        "      AND n.nspname NOT LIKE 'pg!_%' ESCAPE '!' AND n.nspname <> 'information_schema'",
        "    ORDER BY 1 LOOP",
        "  EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s.nspname, u);",
    ]
    if write:
        body.append("  EXECUTE format('GRANT CREATE ON SCHEMA %I TO %I', s.nspname, u);")
    body += _pg_table_grants("s.nspname", table, privileges, "  ")
    body.append("END LOOP;")
    return _pg_do([f"u text := {_literal(user)};", "s record;", "t record;"], body)


# MySQL --------------------------------------------------------------------------------


def _mysql_helper(database: str) -> tuple[str, str, str]:
    """(drop, create, drop) of a procedure granting on every schema/table matching LIKE
    patterns: MySQL cannot GRANT on a table-name pattern, so matching tables are
    enumerated from information_schema when the SQL runs (names compared byte-wise, as
    the library's own pattern matching is case-sensitive)."""
    proc = f"{quote_identifier(database, 'mysql')}.{quote_identifier(MYSQL_GRANT_HELPER, 'mysql')}"
    create = f"""CREATE PROCEDURE {proc}(
  IN p_schema VARCHAR(255) CHARACTER SET utf8mb4,
  IN p_table VARCHAR(255) CHARACTER SET utf8mb4,
  IN p_privileges VARCHAR(255) CHARACTER SET utf8mb4,
  IN p_user VARCHAR(255) CHARACTER SET utf8mb4)
SQL SECURITY INVOKER
BEGIN
  DECLARE done INT DEFAULT 0;
  DECLARE s VARCHAR(255) CHARACTER SET utf8mb4;
  DECLARE t VARCHAR(255) CHARACTER SET utf8mb4;
  DECLARE cur CURSOR FOR
    SELECT SCHEMA_NAME, NULL FROM information_schema.SCHEMATA
     WHERE p_table IS NULL
       AND CONVERT(SCHEMA_NAME USING utf8mb4) COLLATE utf8mb4_bin LIKE p_schema ESCAPE '!'
       AND SCHEMA_NAME NOT IN {_MYSQL_SYSTEM_SCHEMAS}
    UNION ALL
    SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES
     WHERE p_table IS NOT NULL
       AND CONVERT(TABLE_SCHEMA USING utf8mb4) COLLATE utf8mb4_bin LIKE p_schema ESCAPE '!'
       AND CONVERT(TABLE_NAME USING utf8mb4) COLLATE utf8mb4_bin LIKE p_table ESCAPE '!'
       AND TABLE_SCHEMA NOT IN {_MYSQL_SYSTEM_SCHEMAS};
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1;
  OPEN cur;
  grant_loop: LOOP
    FETCH cur INTO s, t;
    IF done THEN
      LEAVE grant_loop;
    END IF;
    SET @adbx_grant = CONCAT('GRANT ', p_privileges, ' ON `', REPLACE(s, '`', '``'), '`.',
      IF(t IS NULL, '*', CONCAT('`', REPLACE(t, '`', '``'), '`')),
      ' TO `', REPLACE(p_user, '`', '``'), '`@''%''');
    PREPARE adbx_stmt FROM @adbx_grant;
    EXECUTE adbx_stmt;
    DEALLOCATE PREPARE adbx_stmt;
  END LOOP;
  CLOSE cur;
END"""
    drop = f"DROP PROCEDURE IF EXISTS {proc}"
    return drop, create, drop


def _mysql_sql(cluster: Cluster, users: list[_DbUser]) -> ClusterSql:
    database = cluster.database
    proc = f"{quote_identifier(database, 'mysql')}.{quote_identifier(MYSQL_GRANT_HELPER, 'mysql')}"
    blocks: list[SqlBlock] = []
    notes: list[str] = []
    needs_helper = False
    for user in users:
        user_blocks, user_notes, helper = _mysql_user(user, proc, database)
        blocks += user_blocks
        notes += user_notes
        needs_helper = needs_helper or helper
    if needs_helper:
        drop, create, drop_again = _mysql_helper(database)
        blocks.insert(0, SqlBlock(
            f"helper for table-name patterns (dropped at the end): {MYSQL_GRANT_HELPER}",
            (drop, create),
        ))
        blocks.append(SqlBlock(f"drop the helper {MYSQL_GRANT_HELPER}", (drop_again,)))
    return ClusterSql(cluster.name, cluster.engine, database, tuple(blocks), tuple(notes))


def _part_matches(part: str, name: str) -> bool:
    """Whether a pattern part (``*`` wildcard) matches ``name``, as the policy matches."""
    return re.fullmatch("".join(".*" if c == "*" else re.escape(c) for c in part), name) is not None


def _mysql_user(user: _DbUser, proc: str, database: str) -> tuple[list[SqlBlock], list[str], bool]:
    q = lambda name: quote_identifier(name, "mysql")  # noqa: E731
    account = f"{q(user.name)}@'%'"
    write = user.access == "write"
    privileges = _WRITE_PRIVILEGES if write else _READ_PRIVILEGES
    roles = ", ".join(r.name for r in user.roles)
    notes = _shared_user_notes(user)
    helper = False

    create = (
        f"CREATE USER IF NOT EXISTS {account} IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS' REQUIRE SSL",
        # An existing user is switched to IAM authentication and TLS too.
        f"ALTER USER {account} IDENTIFIED WITH AWSAuthenticationPlugin AS 'RDS'",
        f"ALTER USER {account} REQUIRE SSL",
    )
    reset = (f"REVOKE ALL PRIVILEGES, GRANT OPTION FROM {account}",)

    def call(schema_like: str, table_like: str | None, privs: str) -> str:
        nonlocal helper
        helper = True
        table_arg = "NULL" if table_like is None else _literal(table_like)
        return f"CALL {proc}({_literal(schema_like)}, {table_arg}, {_literal(privs)}, {_literal(user.name)})"

    grants: list[str] = []
    staged: list[str] = []  # write patterns whose databases get staging DDL
    for p in user.patterns:
        schema, table = _split(p)
        if "*" in schema:
            grants.append(call(_like(schema), None if table == "*" else _like(table), privileges))
            notes.append(
                f"{p.text}: granted on the databases/tables that match when the SQL runs; "
                "re-run the plan's SQL after creating a matching one"
            )
        elif table == "*":
            grants.append(f"GRANT {privileges} ON {q(schema)}.* TO {account}")
        elif "*" in table:
            grants.append(call(_like(schema), _like(table), privileges))
            notes.append(
                f"{p.text}: MySQL cannot grant on a table-name pattern; granted on the tables "
                "that match when the SQL runs; re-run the plan's SQL after creating a matching table"
            )
        else:
            grants.append(f"GRANT {privileges} ON {q(schema)}.{q(table)} TO {account}")
    if write:
        # write_table stages into <database>._adbx_stage_<random>: CREATE TABLE ... SELECT,
        # ALTER TABLE ... ADD COLUMN/INDEX, INSERT/SELECT by the tasks, DROP. MySQL has no
        # table ownership and no grants on table-name patterns, so all of that must be
        # granted database-wide: only where the role already covers the whole database.
        for p in user.patterns:
            schema, table = _split(p)
            if table != "*":
                notes.append(
                    f"{p.text}: on MySQL, write_table's staging table needs INSERT, SELECT, "
                    "ALTER and DROP on a new table in the same database, which MySQL can only "
                    "grant database-wide; plan grants no staging privileges for table-level "
                    f"patterns, so write_table to these tables fails for {user.name}: give MySQL "
                    "write roles whole-database patterns (db.*)"
                )
            elif "*" in schema:
                grants.append(call(_like(schema), None, _MYSQL_STAGE_PRIVILEGES))
                staged.append(p.text)
            else:
                grants.append(f"GRANT {_MYSQL_STAGE_PRIVILEGES} ON {q(schema)}.* TO {account}")
                staged.append(p.text)
        if staged:
            notes.append(
                f"{user.name} gets {_MYSQL_STAGE_PRIVILEGES} on the database(s) of "
                f"{', '.join(staged)} for write_table's staging tables ({STAGE_PREFIX}*); MySQL "
                "cannot limit them to those names, so it can also alter or drop the other "
                "tables there"
            )
    if not any(_part_matches(_split(p)[0], database) for p in user.patterns):
        notes.append(
            f"{user.name} has no grant in the cluster's database {database}, which aurora_dbx "
            "connections open as their default database: MySQL refuses such a login "
            f"(error 1044); add a {database}.* or {database}.<table> pattern, or set the "
            "cluster's database to one the role covers"
        )
    verb = "read+write" if write else "read-only"
    blocks = [
        SqlBlock(f"database user {user.name} for role(s) {roles}: IAM authentication over TLS only", create),
        SqlBlock(f"{user.name}: revoke earlier grants so the result is exactly the policy", reset),
        SqlBlock(
            f"{user.name} ({verb}): {privileges} on {', '.join(p.text for p in user.patterns)}"
            + (f" (+ {_MYSQL_STAGE_PRIVILEGES} on whole databases for staging tables)" if staged else ""),
            tuple(grants),
        ),
    ]
    return blocks, notes, helper


# -- command line ----------------------------------------------------------------------


def cmd_plan(args: Any) -> int:
    from .context import locate_policy
    from .redaction import scrub

    policy = locate_policy(args.policy)
    if args.sql_only:
        sql = build_sql(policy)
        if args.sql_only not in sql:
            known = ", ".join(sql) or "none"
            raise AuroraDbxError(
                f"--sql-only {args.sql_only!r}: no role uses that cluster in {policy.source}; "
                f"clusters with roles: {known}"
            )
        sys.stdout.write(scrub(sql[args.sql_only].script()))
        return 0
    oidc_args = (args.oidc_provider_arn, args.oidc_audience, args.oidc_subjects)
    oidc = None
    if any(oidc_args):
        if args.oidc_provider_arn is None:
            raise AuroraDbxError("--oidc-audience/--oidc-subject need --oidc-provider-arn")
        oidc = OidcTrust(args.oidc_provider_arn, args.oidc_audience or "", tuple(args.oidc_subjects))
    plan = build_plan(policy, trusted_principal_arns=args.trusted_principal_arns, oidc=oidc)
    text = plan.to_json() + "\n" if args.format == "json" else plan.to_text()
    sys.stdout.write(scrub(text))
    return 0


def register(add: Callable[[str, str, Callable[[Any], int]], Any]) -> None:
    """Add ``aurora-dbx plan`` to the command line (see :func:`aurora_dbx.cli.build_parser`)."""
    p = add(
        "plan",
        "IAM trust/permission policies and database SQL (users, grants) implied by the policy",
        cmd_plan,
    )
    p.add_argument(
        "--trusted-principal-arn", action="append", default=[], dest="trusted_principal_arns",
        metavar="ARN",
        help="an IAM role/user the mapped roles trust, besides credentials.base_role_arn (repeatable)",
    )
    p.add_argument("--oidc-provider-arn", metavar="ARN",
                   help="IAM OIDC provider for credentials.source: web_identity")
    p.add_argument("--oidc-audience", metavar="AUD", help="the OIDC tokens' aud claim")
    p.add_argument("--oidc-subject", action="append", default=[], dest="oidc_subjects",
                   metavar="SUB", help="an exact OIDC sub claim allowed (repeatable)")
    p.add_argument("--sql-only", metavar="CLUSTER",
                   help="print only the SQL script for CLUSTER (for psql / mysql)")
