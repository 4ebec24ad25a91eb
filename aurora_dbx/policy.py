"""The access policy: loading, strict validation and access decisions.

The policy is an admin-owned YAML file (format in ``docs/POLICY.md``). It is a fast, clear
client-side check, not the security boundary: the IAM trust policies, the
``rds-db:connect`` permission and the database GRANTs are (``aurora-dbx plan`` derives
all three from this file). Deny by default: a principal gets a role only through a
binding that names it, one of its groups, or its service principal application id.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import AccessDenied, PolicyError
from .identifiers import TableName, parse_table

__all__ = [
    "Access",
    "AuditSettings",
    "Binding",
    "Cluster",
    "CredentialSettings",
    "Policy",
    "Role",
    "TablePattern",
    "load_policy",
]

Access = Literal["read", "write"]
ENGINES = ("postgresql", "mysql")
TLS_MODES = ("verify-full", "require", "disable")
CREDENTIAL_SOURCES = ("auto", "service_credential", "instance_profile", "web_identity", "environment")
MAX_POLICY_BYTES = 1_000_000

_ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_RESOURCE_ID = re.compile(r"^cluster-[A-Z0-9]{1,64}$|^db-[A-Z0-9]{1,64}$")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DB_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PATTERN_PART = re.compile(r"^(\*|[^\W\d$][\w$]*\*?|[^\W\d$][\w$]*\*[\w$]*|\*[\w$]+)$", re.UNICODE)


@dataclass(frozen=True)
class TablePattern:
    """A ``schema.table`` pattern; ``*`` matches any run of characters within one part."""

    text: str

    @property
    def _regex(self) -> re.Pattern[str]:
        schema, table = self.text.split(".")
        part = lambda p: "".join("[^.]*" if c == "*" else re.escape(c) for c in p)  # noqa: E731
        return re.compile(f"^{part(schema)}\\.{part(table)}$")

    def matches(self, table: TableName) -> bool:
        return bool(self._regex.fullmatch(str(table)))

    @property
    def breadth(self) -> int:
        """How much the pattern opens: 0 for one table, up to 3 for ``*.*``."""
        schema, table = self.text.split(".")
        return ("*" in schema) * 2 + ("*" in table)


@dataclass(frozen=True)
class Cluster:
    name: str
    engine: Literal["postgresql", "mysql"]
    host: str
    port: int
    database: str
    region: str
    resource_id: str | None = None
    tls: Literal["verify-full", "require", "disable"] = "verify-full"
    ca_bundle: str | None = None


@dataclass(frozen=True)
class Role:
    name: str
    cluster: str
    iam_role_arn: str
    db_user: str
    access: Access
    tables: tuple[TablePattern, ...]
    session_seconds: int = 3600

    def allows(self, table: TableName, access: Access) -> bool:
        if access == "write" and self.access != "write":
            return False
        return any(p.matches(table) for p in self.tables)

    @property
    def account_id(self) -> str:
        return self.iam_role_arn.split(":")[4]

    @property
    def privilege_rank(self) -> tuple[int, int, int]:
        """Sort key: smaller is less privileged (read before write, narrow before broad)."""
        return (
            0 if self.access == "read" else 1,
            sum(p.breadth for p in self.tables),
            len(self.tables),
        )


@dataclass(frozen=True)
class Binding:
    kind: Literal["user", "group", "service_principal"]
    subject: str
    roles: tuple[str, ...]

    def applies_to(self, name: str, kind: str, groups: Iterable[str]) -> bool:
        if self.kind == "group":
            return self.subject in set(groups)
        if self.kind != kind:
            return False
        # Databricks user names are e-mail addresses, compared case-insensitively as the
        # workspace does; application ids are UUIDs, also case-insensitive.
        return self.subject.casefold() == name.casefold()

    def __str__(self) -> str:
        return f"{self.kind}:{self.subject} -> {', '.join(self.roles)}"


@dataclass(frozen=True)
class CredentialSettings:
    source: str = "auto"
    service_credential: str | None = None
    web_identity_token_file: str | None = None
    web_identity_role_arn: str | None = None
    # The IAM role behind the base credentials (the UC service credential's role or the
    # instance profile's role): `plan` writes it into each role's trust policy.
    base_role_arn: str | None = None
    max_age_hours: float = 24.0


@dataclass(frozen=True)
class AuditSettings:
    sink: str = "log"
    fail_closed: bool = False


@dataclass(frozen=True)
class Policy:
    """A validated access policy."""

    source: str
    project: str
    clusters: Mapping[str, Cluster]
    roles: Mapping[str, Role]
    bindings: tuple[Binding, ...]
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    # -- decisions -------------------------------------------------------------------

    def bound_roles(self, name: str, kind: str, groups: Iterable[str] = ()) -> list[Role]:
        """The roles any binding gives this principal, least privileged first."""
        groups = tuple(groups)
        names = {r for b in self.bindings if b.applies_to(name, kind, groups) for r in b.roles}
        return sorted((self.roles[n] for n in names), key=lambda r: (r.privilege_rank, r.name))

    def cluster_for(self, cluster: str | None) -> Cluster:
        if cluster is None:
            if len(self.clusters) == 1:
                return next(iter(self.clusters.values()))
            raise AccessDenied(
                f"the policy {self.source} defines {len(self.clusters)} clusters "
                f"({', '.join(sorted(self.clusters))}); pass cluster=... to choose one"
            )
        if cluster not in self.clusters:
            raise AccessDenied(
                f"cluster {cluster!r} is not in the policy {self.source}; "
                f"known clusters: {', '.join(sorted(self.clusters)) or 'none'}"
            )
        return self.clusters[cluster]

    def decide(
        self,
        *,
        name: str,
        kind: str,
        groups: Iterable[str],
        table: TableName | str | None,
        access: Access,
        cluster: str | None = None,
        role: str | None = None,
    ) -> Role:
        """Return the least-privileged role that lets the principal do ``access`` on ``table``.

        ``table`` may be ``None`` for a connection not tied to one table (``connect()``):
        then any bound role with enough access on the cluster qualifies.
        Raises :class:`AccessDenied` explaining which bindings apply and why none matches.
        """
        groups = tuple(groups)
        table_name = parse_table(table) if isinstance(table, str) else table
        who = f"{kind} {name!r}" + (f" (groups: {', '.join(sorted(groups))})" if groups else "")
        what = f"{access} {table_name}" if table_name else f"{access} access"
        target = self.cluster_for(cluster)
        bound = self.bound_roles(name, kind, groups)
        if not bound:
            raise AccessDenied(
                f"{who} may not {what}: no binding in {self.source} names this principal or "
                f"its groups ({len(self.bindings)} binding(s) exist for other principals). "
                "Ask the policy admin to add a binding."
            )
        if role is not None:
            if role not in self.roles:
                raise AccessDenied(f"role {role!r} is not defined in {self.source}")
            if role not in {r.name for r in bound}:
                raise AccessDenied(
                    f"{who} is not bound to role {role!r}; bound roles: "
                    f"{', '.join(r.name for r in bound)}"
                )
            bound = [self.roles[role]]
        reasons: list[str] = []
        for r in bound:
            if r.cluster != target.name:
                reasons.append(f"{r.name} is for cluster {r.cluster}")
            elif access == "write" and r.access != "write":
                reasons.append(f"{r.name} is read-only")
            elif table_name is not None and not r.allows(table_name, access):
                reasons.append(
                    f"{r.name} covers {', '.join(p.text for p in r.tables)}, not {table_name}"
                )
            else:
                return r
        raise AccessDenied(
            f"{who} may not {what} on cluster {target.name}: " + "; ".join(reasons)
        )


# -- loading -----------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses anchors/aliases, merge keys and duplicate keys.

    Aliases allow exponential expansion and make a binding's meaning depend on text far
    away; merge keys and duplicates silently override. None belongs in a security policy.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in an access policy",
                event.start_mark,
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(
                None, None, "YAML anchors (&name) are not allowed in an access policy",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "YAML merge keys (<<) are not allowed in an access policy",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _normalise_path(path: str) -> str:
    # Databricks shows Unity Catalog volumes and workspace files as dbfs:/ URIs too; the
    # FUSE mount under / is what plain file reads see on the driver.
    if path.startswith("dbfs:/Volumes/") or path.startswith("dbfs:/Workspace/"):
        return path[len("dbfs:") :]
    return path


def load_policy(policy: str | os.PathLike[str] | Mapping[str, Any]) -> Policy:
    """Load and validate a policy from a YAML file path or an already-parsed mapping."""
    if isinstance(policy, Mapping):
        return _build(policy, "<mapping>")
    path = Path(_normalise_path(os.fspath(policy)))
    source = str(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a device or FIFO would be read forever
            raise PolicyError("is not a regular file", source=source)
        size = info.st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyError(f"file is {size} bytes; the limit is {MAX_POLICY_BYTES}", source=source)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(
            "file not found; set AURORA_DBX_POLICY, spark.aurora_dbx.policy or "
            "configure(policy=...) to the admin's policy file",
            source=source,
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read the file: {e}", source=source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - strict SafeLoader subclass
    except yaml.YAMLError as e:
        raise PolicyError(f"not valid policy YAML: {e}", source=source) from None
    except RecursionError:
        raise PolicyError("not valid policy YAML: nested too deeply", source=source) from None
    return _build(data, source)


def _expect(value: Any, kind: type | tuple[type, ...], source: str, key: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise PolicyError(f"must be {what}, got a boolean", source=source, key=key)
    if not isinstance(value, kind):
        raise PolicyError(f"must be {what}, got {type(value).__name__}", source=source, key=key)
    return value


def _keys(
    data: Mapping[str, Any], source: str, key: str, required: set[str], optional: set[str]
) -> None:
    for k in data:
        if not isinstance(k, str) or k not in required | optional:
            allowed = ", ".join(sorted(required | optional))
            raise PolicyError(f"unknown key {k!r} (allowed: {allowed})", source=source, key=f"{key}.{k}".lstrip("."))
    for k in sorted(required):
        if k not in data:
            raise PolicyError("missing required key", source=source, key=f"{key}.{k}".lstrip("."))


def _build(data: Any, source: str) -> Policy:
    _expect(data, dict, source, "(top level)", "a mapping")
    _keys(data, source, "", {"version", "project", "clusters", "roles", "bindings"}, {"credentials", "audit"})
    if data["version"] != 1 or isinstance(data["version"], bool):
        raise PolicyError(f"unsupported version {data['version']!r}; this library reads version 1", source=source, key="version")
    project = _expect(data["project"], str, source, "project", "a string")
    if not _NAME.fullmatch(project):
        raise PolicyError("must be 1-64 letters, digits, '.', '_' or '-'", source=source, key="project")

    clusters: dict[str, Cluster] = {}
    _expect(data["clusters"], dict, source, "clusters", "a mapping of cluster names")
    if not data["clusters"]:
        raise PolicyError("at least one cluster is required", source=source, key="clusters")
    for name, c in data["clusters"].items():
        k = f"clusters.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PolicyError("cluster names are 1-64 letters, digits, '.', '_' or '-'", source=source, key=k)
        _expect(c, dict, source, k, "a mapping")
        _keys(c, source, k, {"engine", "host", "port", "database", "region"}, {"resource_id", "tls", "ca_bundle"})
        if c["engine"] not in ENGINES:
            raise PolicyError(f"must be one of {', '.join(ENGINES)}", source=source, key=f"{k}.engine")
        host = _expect(c["host"], str, source, f"{k}.host", "a host name")
        if not _HOST.fullmatch(host):
            raise PolicyError(f"{host!r} is not a valid host name", source=source, key=f"{k}.host")
        port = _expect(c["port"], int, source, f"{k}.port", "an integer")
        if not 1 <= port <= 65535:
            raise PolicyError("must be between 1 and 65535", source=source, key=f"{k}.port")
        database = _expect(c["database"], str, source, f"{k}.database", "a string")
        if not _DB_USER.fullmatch(database):
            raise PolicyError(f"{database!r} is not a plain database name", source=source, key=f"{k}.database")
        region = _expect(c["region"], str, source, f"{k}.region", "a string")
        if not _REGION.fullmatch(region):
            raise PolicyError(f"{region!r} is not an AWS region such as us-east-1", source=source, key=f"{k}.region")
        resource_id = c.get("resource_id")
        if resource_id is not None and not (isinstance(resource_id, str) and _RESOURCE_ID.fullmatch(resource_id)):
            raise PolicyError("must look like cluster-ABCDEFGHIJKLMNOP (the DbClusterResourceId)", source=source, key=f"{k}.resource_id")
        tls = c.get("tls", "verify-full")
        if tls not in TLS_MODES:
            raise PolicyError(f"must be one of {', '.join(TLS_MODES)}", source=source, key=f"{k}.tls")
        ca = c.get("ca_bundle")
        if ca is not None:
            _expect(ca, str, source, f"{k}.ca_bundle", "a path")
            ca = _normalise_path(ca)
        clusters[name] = Cluster(name, c["engine"], host, port, database, region, resource_id, tls, ca)

    roles: dict[str, Role] = {}
    _expect(data["roles"], dict, source, "roles", "a mapping of role names")
    for name, r in data["roles"].items():
        k = f"roles.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PolicyError("role names are 1-64 letters, digits, '.', '_' or '-'", source=source, key=k)
        _expect(r, dict, source, k, "a mapping")
        _keys(r, source, k, {"cluster", "iam_role_arn", "db_user", "access", "tables"}, {"session_seconds"})
        if not isinstance(r["cluster"], str) or r["cluster"] not in clusters:
            raise PolicyError(
                f"names unknown cluster {r['cluster']!r}; known: {', '.join(sorted(clusters))}",
                source=source, key=f"{k}.cluster",
            )
        arn = _expect(r["iam_role_arn"], str, source, f"{k}.iam_role_arn", "an IAM role ARN")
        if not _ROLE_ARN.fullmatch(arn):
            raise PolicyError(
                f"{arn!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)",
                source=source, key=f"{k}.iam_role_arn",
            )
        db_user = _expect(r["db_user"], str, source, f"{k}.db_user", "a database user name")
        if not _DB_USER.fullmatch(db_user):
            raise PolicyError(f"{db_user!r} is not a plain database user name", source=source, key=f"{k}.db_user")
        if r["access"] not in ("read", "write"):
            raise PolicyError("must be read or write", source=source, key=f"{k}.access")
        tables = _expect(r["tables"], list, source, f"{k}.tables", "a list of schema.table patterns")
        if not tables:
            raise PolicyError("at least one table pattern is required", source=source, key=f"{k}.tables")
        patterns = []
        for i, t in enumerate(tables):
            tk = f"{k}.tables[{i}]"
            _expect(t, str, source, tk, "a schema.table pattern")
            parts = t.split(".")
            if len(parts) != 2 or not all(_PATTERN_PART.fullmatch(p) for p in parts):
                raise PolicyError(
                    f"{t!r} is not a schema.table pattern (identifiers with at most one '*' "
                    "per part, e.g. 'public.*' or 'features.customer_*')",
                    source=source, key=tk,
                )
            patterns.append(TablePattern(t))
        seconds = r.get("session_seconds", 3600)
        _expect(seconds, int, source, f"{k}.session_seconds", "an integer")
        if not 900 <= seconds <= 43200:
            raise PolicyError("must be between 900 and 43200 (STS limits)", source=source, key=f"{k}.session_seconds")
        roles[name] = Role(name, r["cluster"], arn, db_user, r["access"], tuple(patterns), seconds)

    bindings: list[Binding] = []
    _expect(data["bindings"], list, source, "bindings", "a list")
    for i, b in enumerate(data["bindings"]):
        k = f"bindings[{i}]"
        _expect(b, dict, source, k, "a mapping")
        kinds = [x for x in ("user", "group", "service_principal") if x in b]
        if len(kinds) != 1:
            raise PolicyError("needs exactly one of user, group, service_principal", source=source, key=k)
        _keys(b, source, k, {kinds[0], "roles"}, set())
        subject = _expect(b[kinds[0]], str, source, f"{k}.{kinds[0]}", "a string")
        if not subject.strip() or subject != subject.strip() or any(ch in subject for ch in "*?\n\r\t"):
            raise PolicyError(
                f"{subject!r} must be an exact name (no wildcards, no surrounding spaces)",
                source=source, key=f"{k}.{kinds[0]}",
            )
        role_names = _expect(b["roles"], list, source, f"{k}.roles", "a list of role names")
        if not role_names:
            raise PolicyError("at least one role is required", source=source, key=f"{k}.roles")
        for j, rn in enumerate(role_names):
            if not isinstance(rn, str) or rn not in roles:
                raise PolicyError(
                    f"names unknown role {rn!r}; known: {', '.join(sorted(roles))}",
                    source=source, key=f"{k}.roles[{j}]",
                )
        bindings.append(Binding(kinds[0], subject, tuple(role_names)))  # type: ignore[arg-type]

    creds = CredentialSettings()
    if "credentials" in data:
        c = _expect(data["credentials"], dict, source, "credentials", "a mapping")
        _keys(c, source, "credentials", set(), {"source", "service_credential", "web_identity_token_file", "web_identity_role_arn", "base_role_arn", "max_age_hours"})
        src = c.get("source", "auto")
        if src not in CREDENTIAL_SOURCES:
            raise PolicyError(f"must be one of {', '.join(CREDENTIAL_SOURCES)}", source=source, key="credentials.source")
        for opt in ("service_credential", "web_identity_token_file", "web_identity_role_arn", "base_role_arn"):
            if opt in c:
                _expect(c[opt], str, source, f"credentials.{opt}", "a string")
        for opt in ("web_identity_role_arn", "base_role_arn"):
            if opt in c and not _ROLE_ARN.fullmatch(c[opt]):
                raise PolicyError("is not an IAM role ARN", source=source, key=f"credentials.{opt}")
        if src == "service_credential" and "service_credential" not in c:
            raise PolicyError("source service_credential needs credentials.service_credential (the UC service credential name)", source=source, key="credentials.service_credential")
        if src == "web_identity" and "web_identity_token_file" not in c:
            raise PolicyError("source web_identity needs credentials.web_identity_token_file", source=source, key="credentials.web_identity_token_file")
        max_age = c.get("max_age_hours", 24)
        _expect(max_age, (int, float), source, "credentials.max_age_hours", "a number")
        if not 0 < max_age <= 24:
            raise PolicyError("must be more than 0 and at most 24 (credentials are re-established at least daily)", source=source, key="credentials.max_age_hours")
        creds = CredentialSettings(
            src, c.get("service_credential"), c.get("web_identity_token_file"),
            c.get("web_identity_role_arn"), c.get("base_role_arn"), float(max_age),
        )

    audit = AuditSettings()
    if "audit" in data:
        a = _expect(data["audit"], dict, source, "audit", "a mapping")
        _keys(a, source, "audit", set(), {"sink", "fail_closed"})
        sink = a.get("sink", "log")
        _expect(sink, str, source, "audit.sink", "a string")
        if not (sink == "log" or (sink.startswith("jsonl:") and len(sink) > 6) or re.fullmatch(r"table:\w+\.\w+\.\w+", sink)):
            raise PolicyError("must be log, jsonl:<path> or table:<catalog.schema.table>", source=source, key="audit.sink")
        fail_closed = a.get("fail_closed", False)
        if not isinstance(fail_closed, bool):
            raise PolicyError("must be true or false", source=source, key="audit.fail_closed")
        audit = AuditSettings(sink, fail_closed)

    return Policy(source, project, clusters, roles, tuple(bindings), creds, audit)

