"""Credential lineage on MLflow runs: who read or wrote which Aurora table, through which role.

``record(access)`` is called by ``read_table`` / ``write_table`` after each access. Inside an
MLflow run (the active, innermost run of the calling thread; else ``MLFLOW_RUN_ID``; or an
explicit ``run_id=``) it sets the contract's run tags::

    aurora_dbx.principal  aurora_dbx.principal_type  aurora_dbx.role_arn  aurora_dbx.db_user
    aurora_dbx.source_identity  aurora_dbx.session_name  aurora_dbx.cluster
    aurora_dbx.tables_read  aurora_dbx.tables_written  aurora_dbx.credential_expires_at
    aurora_dbx.project  (and aurora_dbx.queries_read for query reads)

Every tag except ``credential_expires_at`` and ``project`` is a comma-separated, sorted,
deduplicated list that ACCUMULATES across calls: the run's current tags are read back from
the tracking store and merged under a process-wide lock. ``credential_expires_at`` is the
latest expiry (ISO-8601 UTC) of any role session used in the run.

Each read also logs one MLflow dataset input whose source has type ``aurora``
(:class:`AuroraDatasetSource`: cluster, engine, host, port, database, table or the SHA-256 of
the query text, role name and ARN, database user). Query text is never stored.

Guarantees: nothing happens outside a run; mlflow is imported lazily and is optional; an
MLflow failure of any kind (unreachable server, slow server, bad run id) never breaks the
read or write: it is reported once per process as a warning on ``aurora_dbx.lineage`` and is
silent afterwards. Each call is bounded in time (``AURORA_DBX_MLFLOW_TIMEOUT`` seconds,
default 10; an HTTP tracking server is probed with a short TCP connect first). Every value
passes :func:`aurora_dbx.redaction.scrub`; no token or secret is ever written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import urlparse

from .identity import Principal
from .policy import Cluster, Role
from .redaction import scrub

__all__ = [
    "Access",
    "AuroraDataset",  # noqa: F822 - defined on first use (module __getattr__)
    "AuroraDatasetSource",  # noqa: F822
    "TAGS",
    "dataset_for",
    "query_digest",
    "record",
]

log = logging.getLogger("aurora_dbx.lineage")

SOURCE_TYPE = "aurora"
TAG_PREFIX = "aurora_dbx."
# Run tags (contract names).
PRINCIPAL = TAG_PREFIX + "principal"
PRINCIPAL_TYPE = TAG_PREFIX + "principal_type"
ROLE_ARN = TAG_PREFIX + "role_arn"
DB_USER = TAG_PREFIX + "db_user"
SOURCE_IDENTITY = TAG_PREFIX + "source_identity"
SESSION_NAME = TAG_PREFIX + "session_name"
CLUSTER = TAG_PREFIX + "cluster"
TABLES_READ = TAG_PREFIX + "tables_read"
TABLES_WRITTEN = TAG_PREFIX + "tables_written"
QUERIES_READ = TAG_PREFIX + "queries_read"
CREDENTIAL_EXPIRES_AT = TAG_PREFIX + "credential_expires_at"
PROJECT = TAG_PREFIX + "project"
TAGS = (
    PRINCIPAL,
    PRINCIPAL_TYPE,
    ROLE_ARN,
    DB_USER,
    SOURCE_IDENTITY,
    SESSION_NAME,
    CLUSTER,
    TABLES_READ,
    TABLES_WRITTEN,
    CREDENTIAL_EXPIRES_AT,
    PROJECT,
)
# Accumulating list tags: a run that used two roles shows both ARNs, both db users, ...
LIST_TAGS = (
    PRINCIPAL,
    PRINCIPAL_TYPE,
    ROLE_ARN,
    DB_USER,
    SOURCE_IDENTITY,
    SESSION_NAME,
    CLUSTER,
    TABLES_READ,
    TABLES_WRITTEN,
    QUERIES_READ,
)
DATASET_CONTEXT = "aurora_dbx.read"  # the input tag mlflow.data.context of each read

TIMEOUT_ENV = "AURORA_DBX_MLFLOW_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
PROBE_TIMEOUT = 2.0
_MAX_TAG = 7900  # MLflow limits tag values to 8000 characters


@dataclass(frozen=True)
class Access:
    """What one read or write did (built by read_table / write_table)."""

    principal: Principal
    role: Role
    cluster: Cluster
    kind: Literal["read", "write"]
    table: str | None  # "schema.table", or None for a query read
    query: str | None  # the SQL of a query read: only its SHA-256 is recorded
    session_name: str
    source_identity: str
    credential_expires_at: datetime
    rows: int | None = None
    mode: str | None = None
    # The Spark schema (StructType), an mlflow.types.Schema, or None.
    schema: Any = field(default=None, compare=False, repr=False)
    # The policy's project; when None, the configured context's project if there is one.
    project: str | None = None


# -- public entry point ------------------------------------------------------------------


def record(access: Access, *, run_id: str | None = None, spark: Any = None) -> None:
    """Tag the MLflow run with this access and log the dataset of a read. Never raises.

    ``spark`` is accepted for symmetry with the I/O functions and is not needed today.
    """
    try:
        mlflow = _mlflow(run_id)
        if mlflow is None:
            return
        rid = run_id or _active_run_id(mlflow)
        if not rid:
            return
        uri = mlflow.get_tracking_uri()  # resolved in the caller: the worker has no context
        project = access.project or _context_project()
        _bounded(lambda: _record(access, rid, uri, project), uri)
    except Exception as e:  # noqa: BLE001 - lineage must never break the data access
        _warn_once(run_id, e)


# -- MLflow plumbing -------------------------------------------------------------------------


def _mlflow(run_id: str | None) -> Any:
    # Without mlflow imported there can be no active fluent run in this process: skip the
    # (slow) import unless a run id was given explicitly or by the environment.
    if "mlflow" not in sys.modules and not run_id and not os.environ.get("MLFLOW_RUN_ID"):
        return None
    try:
        import mlflow
    except ImportError:
        return None
    return mlflow


def _active_run_id(mlflow: Any) -> str | None:
    run = mlflow.active_run()  # the innermost run of this thread (nested runs, autologging)
    if run is not None:
        return str(run.info.run_id)
    return os.environ.get("MLFLOW_RUN_ID") or None


def _context_project() -> str | None:
    try:
        from . import context

        ctx = context._default  # never create a context just for a tag
        return ctx.policy.project if ctx is not None else None
    except Exception:  # noqa: BLE001
        return None


# One lock per (tracking URI, run): serialises the read-merge-write of a run's tags in this
# process without letting a hung server block runs elsewhere.
_run_locks: dict[tuple[str, str], threading.Lock] = {}
_known: dict[tuple[str, str], dict[str, set[str]]] = {}  # (uri, run) -> values we set
_state_lock = threading.Lock()
_warned = False
_hung: threading.Thread | None = None


def _timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def _probe(uri: str) -> None:
    """Fail fast when an HTTP tracking server does not even accept a TCP connection."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    proxies = urllib.request.getproxies()
    if proxies.get(parsed.scheme) and not urllib.request.proxy_bypass(parsed.hostname):
        return  # reached through a proxy: a direct probe would prove nothing
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection(
            (parsed.hostname, port), timeout=min(PROBE_TIMEOUT, _timeout())
        ).close()
    except OSError as e:
        raise ConnectionError(
            f"MLflow tracking server {parsed.hostname}:{port} is not reachable ({e.strerror or e})"
        ) from None


def _bounded(fn: Callable[[], None], uri: str) -> None:
    """Run ``fn`` on a daemon thread and stop waiting after the timeout.

    MLflow's own HTTP retries can take minutes; a read must not wait that long. A call that
    is still hanging makes later calls skip MLflow until it returns.
    """
    global _hung
    with _state_lock:
        if _hung is not None and _hung.is_alive():
            raise TimeoutError("an earlier MLflow call is still waiting for the tracking server")
        _hung = None
    _probe(uri)
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    worker = threading.Thread(target=run, name="aurora-dbx-lineage", daemon=True)
    worker.start()
    worker.join(_timeout())
    if worker.is_alive():
        with _state_lock:
            _hung = worker
        raise TimeoutError(f"the MLflow tracking server did not answer within {_timeout():g}s")
    if "error" in box:
        raise box["error"]


def _warn_once(run_id: str | None, error: BaseException) -> None:
    global _warned
    with _state_lock:
        first, _warned = not _warned, True
    reason = scrub(f"{type(error).__name__}: {error}")[:500]
    if first:
        log.warning(
            "aurora_dbx could not record lineage on the MLflow run (%s); reads and writes are "
            "not affected, and further MLflow failures in this process are not reported",
            reason,
        )
    else:
        log.debug("aurora_dbx lineage not recorded: %s", reason)


def _reset() -> None:
    """Forget warn-once and merge state (tests)."""
    global _warned, _hung
    with _state_lock:
        _warned, _hung = False, None
        _known.clear()


# -- tags ------------------------------------------------------------------------------------


def _iso_utc(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def query_digest(query: str) -> str:
    """The SHA-256 (hex) of a query's text: what lineage records instead of the SQL."""
    return hashlib.sha256(query.encode("utf-8")).hexdigest()


def _values(access: Access) -> dict[str, set[str]]:
    p, r = access.principal, access.role
    values: dict[str, set[str]] = {
        PRINCIPAL: {p.name},
        PRINCIPAL_TYPE: {p.kind},
        ROLE_ARN: {r.iam_role_arn},
        DB_USER: {r.db_user},
        SOURCE_IDENTITY: {access.source_identity},
        SESSION_NAME: {access.session_name},
        CLUSTER: {access.cluster.name},
    }
    if access.kind == "write":
        if access.table:
            values[TABLES_WRITTEN] = {access.table}
    elif access.table:
        values[TABLES_READ] = {access.table}
    elif access.query:
        values[QUERIES_READ] = {"sha256:" + query_digest(access.query)[:16]}
    return {k: {scrub(v) for v in vs if v and "," not in v} for k, vs in values.items()}


def _split(value: str | None) -> set[str]:
    return {v.strip() for v in (value or "").split(",") if v.strip()}


def _join(values: Iterable[str]) -> str:
    out = ""
    for v in sorted(set(values)):
        if len(out) + len(v) + 1 > _MAX_TAG:
            return out + ",..."  # MLflow's limit; the audit trail has the full list
        out = f"{out},{v}" if out else v
    return out


def merge_tags(
    current: Mapping[str, str],
    access: Access,
    project: str | None,
    known: Mapping[str, set[str]] | None = None,
) -> dict[str, str]:
    """The run tags after ``access``: lists unioned with ``current`` (and ``known``)."""
    merged: dict[str, str] = {}
    new = _values(access)
    for key in LIST_TAGS:
        union = _split(current.get(key)) | (known or {}).get(key, set()) | new.get(key, set())
        union.discard("...")
        if union:
            merged[key] = _join(union)
    expiries = [
        t
        for t in (
            _parse_iso(current.get(CREDENTIAL_EXPIRES_AT)),
            _parse_iso(_iso_utc(access.credential_expires_at)),
        )
        if t
    ]
    merged[CREDENTIAL_EXPIRES_AT] = _iso_utc(max(expiries))
    if project:
        merged[PROJECT] = scrub(project)
    return merged


def _record(access: Access, run_id: str, uri: str, project: str | None) -> None:
    from mlflow.entities import DatasetInput, InputTag, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    with _state_lock:
        lock = _run_locks.setdefault((uri, run_id), threading.Lock())
        known = _known.setdefault((uri, run_id), {})
    with lock:
        current = client.get_run(run_id).data.tags
        merged = merge_tags(current, access, project, known)
        for key in LIST_TAGS:
            if key in merged:
                known[key] = _split(merged[key]) - {"..."}
        changed = [RunTag(k, v) for k, v in merged.items() if current.get(k) != v]
        if changed:
            client.log_batch(run_id, tags=changed)
    if access.kind == "read":
        dataset = dataset_for(access)
        tags = [InputTag("mlflow.data.context", DATASET_CONTEXT)]
        client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


# -- dataset source and dataset (defined on first use: mlflow is optional) --------------------


def _to_mlflow_schema(schema: Any) -> Any:
    """An mlflow.types.Schema from a Spark StructType (or a Schema as is); None if unknown."""
    if schema is None:
        return None
    from mlflow.types import ColSpec, DataType, Schema

    if isinstance(schema, Schema):
        return schema
    fields = getattr(schema, "fields", None)
    if fields is None:
        return None
    simple = {
        "LongType": DataType.long,
        "IntegerType": DataType.integer,
        "ShortType": DataType.integer,
        "ByteType": DataType.integer,
        "FloatType": DataType.float,
        "DoubleType": DataType.double,
        "DecimalType": DataType.double,
        "BooleanType": DataType.boolean,
        "StringType": DataType.string,
        "VarcharType": DataType.string,
        "CharType": DataType.string,
        "BinaryType": DataType.binary,
        "DateType": DataType.datetime,
        "TimestampType": DataType.datetime,
        "TimestampNTZType": DataType.datetime,
    }
    cols = []
    for f in fields:
        dtype = simple.get(type(f.dataType).__name__, DataType.string)
        cols.append(ColSpec(dtype, name=f.name, required=not getattr(f, "nullable", True)))
    return Schema(cols)  # type: ignore[arg-type]


def _build_classes() -> dict[str, type]:
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources, register_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class AuroraDatasetSource(DatasetSource):
        """Where rows came from: an Aurora table (or query digest) read through one IAM role.

        ``query_sha256`` replaces the SQL of query reads: queries can embed literal values,
        and lineage must never hold data or secrets.
        """

        _FIELDS = (
            "cluster",
            "engine",
            "host",
            "port",
            "database",
            "table",
            "query_sha256",
            "role",
            "role_arn",
            "db_user",
        )

        def __init__(
            self,
            cluster: str,
            engine: str,
            host: str,
            port: int,
            database: str,
            table: str | None = None,
            query_sha256: str | None = None,
            role: str | None = None,
            role_arn: str | None = None,
            db_user: str | None = None,
        ):
            self.cluster = cluster
            self.engine = engine
            self.host = host
            self.port = int(port)
            self.database = database
            self.table = table
            self.query_sha256 = query_sha256
            self.role = role
            self.role_arn = role_arn
            self.db_user = db_user

        @staticmethod
        def _get_source_type() -> str:
            return SOURCE_TYPE

        @property
        def uri(self) -> str:
            what = self.table or f"query:{self.query_sha256}"
            return f"aurora://{self.host}:{self.port}/{self.database}/{what}"

        def load(self, **kwargs: Any) -> Any:
            """The table as a Spark DataFrame through aurora_dbx (policy checks apply)."""
            if not self.table:
                raise ValueError("a query read is recorded by digest only and cannot be reloaded")
            import aurora_dbx

            return aurora_dbx.read_table(self.table, cluster=self.cluster, **kwargs)

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("aurora://")

        @classmethod
        def _resolve(cls, raw_source: Any) -> AuroraDatasetSource:
            parsed = urlparse(raw_source)
            database, _, what = parsed.path.lstrip("/").partition("/")
            query = what[len("query:") :] if what.startswith("query:") else None
            return cls(
                cluster=parsed.hostname or "",
                engine="",
                host=parsed.hostname or "",
                port=parsed.port or 0,
                database=database,
                table=None if query else what or None,
                query_sha256=query,
            )

        def to_dict(self) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k in self._FIELDS:
                v = getattr(self, k)
                if v is not None:
                    out[k] = scrub(v) if isinstance(v, str) else v
            return out

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> AuroraDatasetSource:
            return cls(**{k: source_dict.get(k) for k in cls._FIELDS if k in source_dict})  # type: ignore[arg-type]

        def __repr__(self) -> str:
            return f"AuroraDatasetSource({self.uri!r}, role={self.role!r})"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, AuroraDatasetSource) and self.to_dict() == other.to_dict()

        __hash__ = None  # type: ignore[assignment]

    class AuroraDataset(MetaDataset):
        """Metadata of one Aurora read: name, source, schema (when known), row count.

        The digest is computed from name, source and schema (MLflow's MetaDataset rule),
        not from the rows: reads are lazy and the library never scans data for lineage.
        """

        def __init__(
            self,
            source: Any,
            name: str | None = None,
            digest: str | None = None,
            schema: Any = None,
            rows: int | None = None,
        ):
            self._rows = rows
            super().__init__(source=source, name=name, digest=digest, schema=schema)

        @property
        def profile(self) -> Any:
            return {"num_rows": self._rows} if self._rows is not None else None

        def to_dict(self) -> dict[str, str]:
            config = super().to_dict()
            if self._rows is not None:
                config["profile"] = json.dumps(self.profile)
            return config

    for cls in (AuroraDatasetSource, AuroraDataset):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    if AuroraDatasetSource not in get_registered_sources():
        register_dataset_source(AuroraDatasetSource)  # type: ignore[arg-type]
    return {"AuroraDatasetSource": AuroraDatasetSource, "AuroraDataset": AuroraDataset}


_classes: dict[str, type] | None = None
_classes_lock = threading.Lock()


def _get_classes() -> dict[str, type]:
    global _classes
    with _classes_lock:
        if _classes is None:
            _classes = _build_classes()
        return _classes


def __getattr__(name: str) -> Any:  # PEP 562: AuroraDatasetSource / AuroraDataset on demand
    if name in ("AuroraDatasetSource", "AuroraDataset"):
        return _get_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dataset_for(access: Access) -> Any:
    """The :class:`AuroraDataset` that one read logs on the run."""
    classes = _get_classes()
    c, r = access.cluster, access.role
    digest = query_digest(access.query) if (access.query and not access.table) else None
    source = classes["AuroraDatasetSource"](
        cluster=c.name,
        engine=c.engine,
        host=c.host,
        port=c.port,
        database=c.database,
        table=access.table,
        query_sha256=digest,
        role=r.name,
        role_arn=r.iam_role_arn,
        db_user=r.db_user,
    )
    name = access.table or f"query:{digest[:12] if digest else 'unknown'}"
    try:
        schema = _to_mlflow_schema(access.schema)
    except Exception:  # noqa: BLE001 - a schema we cannot map is left out, not fatal
        schema = None
    return classes["AuroraDataset"](source, name=scrub(name), schema=schema, rows=access.rows)
