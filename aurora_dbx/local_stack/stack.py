"""The embedded local stack: STS/IAM (moto), Aurora-like databases, a fake workspace."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import urllib.request
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from . import _pam
from ._proc import LocalStackError, ManagedProcess, free_port, tail, wait_until
from ._tls import TestCertificates, make_certificates
from .databases import DatabaseServer, MariaDBServer, PostgresServer
from .fake_databricks import DatabricksPrincipal, FakeDatabricksWorkspace, PrincipalKind
from .verifier import TokenVerifier

__all__ = ["ACCOUNT_ID", "Engine", "LocalStack"]

Engine = Literal["postgresql", "mysql"]
ACCOUNT_ID = "123456789012"  # moto's default account
_ENGINES: tuple[str, ...] = ("postgresql", "mysql")
_OPEN_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:root"},
            "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
        }
    ],
}
_JDBC_JARS = {
    "postgresql": ("/usr/share/java/postgresql.jar",),
    "mysql": ("/usr/share/java/mariadb-java-client.jar",),
}


_log = logging.getLogger(__name__)
_TEMP_ROOT = "/tmp"  # noqa: S108 - must be reachable by the postgres/mysql OS users
_TEMP_PREFIX = "aurora-dbx-stack-"
_OWNER_FILE = "owner.pid"


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback http URL
        return bool(resp.status == 200)


def _remove_stale_temp_dirs() -> None:
    """Remove temporary stack directories whose owning process died without stop()."""
    for path in Path(_TEMP_ROOT).glob(_TEMP_PREFIX + "*"):
        try:
            pid = int((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _pam.pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


class LocalStack:
    """Everything aurora_dbx talks to, running locally with real servers.

    * moto server (STS + IAM) on loopback: :attr:`sts_endpoint`, :meth:`create_role`;
    * PostgreSQL and/or MariaDB (:attr:`postgres`, :attr:`mysql`) with TLS from a test CA
      (:attr:`ca_bundle`) and Aurora-style IAM token authentication through PAM, checked
      by :attr:`verifier` (grant connect rights with ``verifier.allow(role_arn, db_user)``);
    * a fake Databricks workspace answering SCIM ``Me``: :attr:`databricks_host`,
      :meth:`add_databricks_principal`, :attr:`databricks_delay_seconds`, :attr:`databricks_down`.

    Must run as root (it writes ``/etc/pam.d/aurora-dbx-*`` files and runs the servers as
    the ``postgres``/``mysql`` OS users). ``stop()`` (or leaving the ``with`` block) stops
    every process and removes those files. Without ``base_dir`` a temporary directory
    is used and removed on stop; a given ``base_dir`` is kept (logs stay for inspection).
    """

    def __init__(
        self,
        base_dir: Path | str | None = None,
        engines: Sequence[Engine] = ("postgresql", "mysql"),
        *,
        region: str = "us-east-1",
        startup_timeout: float = 60,
    ) -> None:
        unknown = [e for e in engines if e not in _ENGINES]
        if unknown:
            raise ValueError(f"unknown engines {unknown}; choose from {_ENGINES}")
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self.engines: tuple[Engine, ...] = tuple(engines)
        self.region = region
        self.startup_timeout = startup_timeout
        self.stack_id = secrets.token_hex(4)
        self._dir: Path | None = None
        self._owns_dir = False
        self._started = False
        self._lock = threading.RLock()
        self._moto: ManagedProcess | None = None
        self._moto_port = 0
        self._certs: TestCertificates | None = None
        self._verifier: TokenVerifier | None = None
        self._databricks: FakeDatabricksWorkspace | None = None
        self._databases: dict[str, DatabaseServer] = {}
        self._pam_files: list[Path] = []
        self._at_exit: functools.partial[None] | None = None

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started

    def start(self) -> LocalStack:
        """Start every part (idempotent). Returns ``self``."""
        with self._lock:
            if self._started:
                return self
            if os.geteuid() != 0:
                raise LocalStackError("the local stack must run as root (PAM config, server users)")
            try:
                self._start()
            except BaseException:
                self.stop()
                raise
            self._started = True
            # stop at interpreter exit if the caller forgot (holds only a weak reference)
            self._at_exit = functools.partial(LocalStack._atexit_stop, weakref.ref(self))
            atexit.register(self._at_exit)
            return self

    @staticmethod
    def _atexit_stop(ref: weakref.ref[LocalStack]) -> None:
        stack = ref()
        if stack is not None:
            stack.stop()

    def _start(self) -> None:
        _pam.remove_stale_pam_services()
        stack_dir = self._make_dir()
        timeout = self.startup_timeout

        # 1. moto (STS + IAM) in a child process, so its state is isolated from any
        #    in-process moto mocks and survives their resets
        self._moto_port = free_port()
        self._moto = ManagedProcess(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._moto_port)],
            stack_dir / "moto.log",
        )
        self._moto.start()

        # 2. database data directories, initialised in parallel
        pending: list[tuple[DatabaseServer, ManagedProcess]] = []
        certs_dir = stack_dir / "tls"
        self._certs = make_certificates(certs_dir)
        for engine in self.engines:
            db = self._new_server(engine, stack_dir)
            db.make_root()
            init = ManagedProcess(
                f"{engine}-init",
                db.init_command(),
                db.root / "init.log",
                user=db.os_user if engine == "postgresql" else None,
            )
            init.start()
            pending.append((db, init))
            self._databases[engine] = db

        # 3. PAM module, verifier socket and PAM service files (while init runs)
        module = _pam.build_pam_module(stack_dir)
        sock = stack_dir / "verifier.sock"
        if len(str(sock)) > 100:
            sock = Path(tempfile.mkdtemp(prefix="adbx-", dir=_TEMP_ROOT)) / "verifier.sock"
            sock.parent.chmod(0o755)
        self._verifier = TokenVerifier(
            self.sts_endpoint, stack_dir / "verifier.log", region=self.region
        )
        self._verifier.serve(sock)
        for db in self._databases.values():
            self._pam_files.append(
                _pam.write_pam_service(
                    db.pam_service,
                    module=module,
                    socket_path=sock,
                    endpoint=db.endpoint,
                    stack_dir=stack_dir,
                )
            )

        # 4. servers
        for db, init in pending:
            proc = init.proc
            assert proc is not None
            try:
                code = proc.wait(timeout=timeout)
            finally:
                init.stop()
            if code != 0:
                raise LocalStackError(
                    f"{db.engine} initialisation failed:\n{tail(db.root / 'init.log')}"
                )
            db.prepare()
            db.start_process()

        # 5. fake Databricks workspace
        self._databricks = FakeDatabricksWorkspace()
        self._databricks.start()

        # 6. wait for readiness
        moto = self._moto
        wait_until(
            lambda: _http_ok(self.sts_endpoint + "/moto-api/data.json"),
            timeout=timeout,
            what="moto server",
            alive=moto.alive,
            on_fail=lambda: tail(stack_dir / "moto.log"),
        )
        for db in self._databases.values():
            db.wait_ready(timeout)
            db.bootstrap()

    def _make_dir(self) -> Path:
        if self._base_dir is None:
            _remove_stale_temp_dirs()
            path = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=_TEMP_ROOT))
            (path / _OWNER_FILE).write_text(str(os.getpid()))
            self._owns_dir = True
        else:
            path = self._base_dir.resolve()
            for parent in path.parents:
                if parent.exists() and not os.stat(parent).st_mode & 0o001:
                    raise LocalStackError(
                        f"{parent} is not traversable by other users; the postgres and mysql "
                        "server users need to reach the stack directory (use one under /tmp)"
                    )
            path.mkdir(parents=True, exist_ok=True)
            for child in ("postgresql", "mysql", "tls"):
                shutil.rmtree(path / child, ignore_errors=True)
            for child in ("verifier.log", "moto.log", "verifier.sock"):
                (path / child).unlink(missing_ok=True)
            self._owns_dir = False
        path.chmod(0o755)
        self._dir = path
        return path

    def _new_server(self, engine: str, stack_dir: Path) -> DatabaseServer:
        assert self._certs is not None
        service = f"{_pam.SERVICE_PREFIX}{self.stack_id}-{engine}"
        port = free_port()
        if engine == "postgresql":
            return PostgresServer(stack_dir / "postgresql", port, service, self._certs)
        return MariaDBServer(stack_dir / "mysql", port, service, self._certs)

    def stop(self) -> None:
        """Stop every process, remove the PAM service files (and the temp dir). Idempotent."""
        with self._lock:
            for db in list(self._databases.values()):
                try:
                    db.stop()
                except Exception:  # noqa: BLE001 - keep stopping the rest
                    _log.warning("could not stop %s server cleanly", db.engine, exc_info=True)
            self._databases.clear()
            if self._moto is not None:
                self._moto.stop()
                self._moto = None
            if self._databricks is not None:
                self._databricks.stop()
                self._databricks = None
            if self._verifier is not None:
                sock = self._verifier.socket_path
                self._verifier.close()
                if sock is not None and self._dir is not None and sock.parent != self._dir:
                    shutil.rmtree(sock.parent, ignore_errors=True)
            for path in self._pam_files:
                _pam.remove_pam_service(path)
            self._pam_files.clear()
            if self._owns_dir and self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._started = False
            if self._at_exit is not None:
                atexit.unregister(self._at_exit)
                self._at_exit = None

    # ------------------------------------------------------------- accessors
    def _require(self) -> None:
        if not self._started:
            raise LocalStackError("the local stack is not running; call start() first")

    @property
    def dir(self) -> Path:
        """The stack directory (logs: ``verifier.log``, ``moto.log``, ``*/server.log``)."""
        if self._dir is None:
            raise LocalStackError("the local stack has not been started")
        return self._dir

    @property
    def sts_endpoint(self) -> str:
        """URL of the moto server (STS and IAM)."""
        if not self._moto_port:
            raise LocalStackError("the local stack has not been started")
        return f"http://127.0.0.1:{self._moto_port}"

    @property
    def ca_bundle(self) -> Path:
        """PEM of the test CA that signed the database servers' certificates."""
        if self._certs is None:
            raise LocalStackError("the local stack has not been started")
        return self._certs.ca_cert

    @property
    def verifier(self) -> TokenVerifier:
        if self._verifier is None:
            raise LocalStackError("the local stack has not been started")
        return self._verifier

    @property
    def databases(self) -> dict[str, DatabaseServer]:
        """Running database servers by engine name."""
        return dict(self._databases)

    def database(self, engine: str) -> DatabaseServer:
        try:
            return self._databases[engine]
        except KeyError:
            raise LocalStackError(f"engine {engine!r} is not running in this stack") from None

    @property
    def postgres(self) -> PostgresServer:
        db = self.database("postgresql")
        assert isinstance(db, PostgresServer)
        return db

    @property
    def mysql(self) -> MariaDBServer:
        db = self.database("mysql")
        assert isinstance(db, MariaDBServer)
        return db

    # ------------------------------------------------------------- AWS side
    def aws_client(self, service: str, **kwargs: object) -> object:
        """A boto3 client for moto with the dummy base credentials."""
        import boto3

        params: dict[str, object] = {
            "endpoint_url": self.sts_endpoint,
            "region_name": self.region,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        params.update(kwargs)
        return boto3.client(service, **params)  # type: ignore[call-overload]

    def create_role(self, name: str, *, trust_policy: dict[str, object] | None = None) -> str:
        """Create IAM role ``name`` in moto (idempotent) and return its ARN."""
        self._require()
        iam = self.aws_client("iam")
        try:
            role = iam.create_role(  # type: ignore[attr-defined]
                RoleName=name,
                AssumeRolePolicyDocument=json.dumps(trust_policy or _OPEN_TRUST_POLICY),
                MaxSessionDuration=43200,
            )
        except Exception as exc:  # noqa: BLE001
            if "EntityAlreadyExists" not in str(exc):
                raise
            role = iam.get_role(RoleName=name)  # type: ignore[attr-defined]
        return str(role["Role"]["Arn"])

    def allow(self, role_arn: str, db_user: str, engine: str | None = None) -> None:
        """Shortcut for ``verifier.allow`` (optionally only on one engine's server)."""
        endpoint = self.database(engine).endpoint if engine else None
        self.verifier.allow(role_arn, db_user, endpoint=endpoint)

    def environ(self) -> dict[str, str]:
        """Environment a client process needs to use this stack (merge into ``os.environ``)."""
        self._require()
        return {
            "AWS_ENDPOINT_URL_STS": self.sts_endpoint,
            "AWS_ENDPOINT_URL_IAM": self.sts_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "DATABRICKS_HOST": self.databricks_host,
        }

    # ------------------------------------------------------ Databricks side
    @property
    def databricks(self) -> FakeDatabricksWorkspace:
        if self._databricks is None:
            raise LocalStackError("the local stack has not been started")
        return self._databricks

    @property
    def databricks_host(self) -> str:
        return self.databricks.url

    def add_databricks_principal(
        self,
        token: str,
        *,
        user_name: str,
        kind: PrincipalKind = "user",
        groups: Iterable[str] = (),
        display_name: str | None = None,
    ) -> DatabricksPrincipal:
        """Answer SCIM ``Me`` for bearer ``token`` with this principal (see ``fake_databricks``)."""
        return self.databricks.add_principal(
            token, user_name=user_name, kind=kind, groups=list(groups), display_name=display_name
        )

    @property
    def databricks_delay_seconds(self) -> float:
        return self.databricks.delay_seconds

    @databricks_delay_seconds.setter
    def databricks_delay_seconds(self, value: float) -> None:
        self.databricks.delay_seconds = value

    @property
    def databricks_down(self) -> bool:
        return self.databricks.down

    @databricks_down.setter
    def databricks_down(self, value: bool) -> None:
        self.databricks.down = value

    # ----------------------------------------------------------------- Spark
    @staticmethod
    def jdbc_jars(engines: Iterable[str] = _ENGINES) -> list[str]:
        """Paths of the Debian JDBC driver jars that exist on this machine."""
        jars: list[str] = []
        for engine in engines:
            for cand in _JDBC_JARS.get(engine, ()):
                if Path(cand).exists():
                    jars.append(str(Path(cand).resolve()))
        return jars

    def pids(self) -> list[int]:
        """Process ids of the stack's direct children (moto, database servers)."""
        procs = [self._moto] + [db.process for db in self._databases.values()]
        return [p.pid for p in procs if p is not None and p.pid is not None]

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return f"LocalStack({state}, dir={self._dir}, engines={list(self.engines)})"
