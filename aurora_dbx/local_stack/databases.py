"""Embedded PostgreSQL and MariaDB servers with Aurora-style IAM (PAM) authentication.

Each server runs from its own data directory on a free loopback port, with TLS on
(the stack's test CA) and TCP logins authenticated by PAM service ``<pam_service>``,
whose module hands the presented password (the IAM token) to the stack's verifier.
Admin access is over the server's unix socket only (PostgreSQL ``trust`` for the
``postgres`` superuser, MariaDB ``unix_socket`` for ``root``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ._proc import LocalStackError, ManagedProcess, tail, wait_until
from ._tls import TestCertificates

__all__ = ["DatabaseServer", "MariaDBServer", "PostgresServer", "validate_identifier"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def validate_identifier(name: str) -> str:
    """Accept only plain SQL identifiers (letters, digits, underscore; max 63 chars)."""
    if not _IDENT.fullmatch(name):
        raise ValueError(f"invalid database identifier {name!r}")
    return name


def _chown_tree(path: Path, user: str) -> None:
    for root, dirs, files in os.walk(path):
        shutil.chown(root, user, user)
        for name in dirs + files:
            shutil.chown(os.path.join(root, name), user, user)


class DatabaseServer(ABC):
    """Common interface of the embedded database servers."""

    engine: ClassVar[str]
    os_user: ClassVar[str]
    host = "localhost"
    database = "analytics"

    def __init__(self, root: Path, port: int, pam_service: str, certs: TestCertificates) -> None:
        self.root = root
        self.port = port
        self.pam_service = pam_service
        self.certs = certs
        self.process: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` as it appears at the start of an IAM token for this server."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    # lifecycle, driven by LocalStack
    @abstractmethod
    def init_command(self) -> list[str]: ...

    @abstractmethod
    def prepare(self) -> None:
        """Write configuration after the data directory was initialised."""

    @abstractmethod
    def server_process(self) -> ManagedProcess: ...

    @abstractmethod
    def bootstrap(self) -> None:
        """Create the database and Aurora-like roles once the server accepts connections."""

    def make_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        shutil.chown(self.root, self.os_user, self.os_user)

    def start_process(self) -> None:
        self.process = self.server_process()
        self.process.start()

    def wait_ready(self, timeout: float = 30) -> None:
        proc = self.process
        assert proc is not None
        wait_until(
            self._ping,
            timeout=timeout,
            what=f"{self.engine} server",
            alive=proc.alive,
            on_fail=lambda: tail(self.log_path),
        )

    def _ping(self) -> bool:
        conn = self._connect_admin(self._bootstrap_database())
        conn.close()
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    # admin API
    @abstractmethod
    def _bootstrap_database(self) -> str: ...

    @abstractmethod
    def _connect_admin(self, database: str) -> Any: ...

    def admin_connect(self) -> Any:
        """A DB-API connection (autocommit) as the server's superuser over the unix socket."""
        return self._connect_admin(self.database)

    def execute_admin(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run SQL as superuser in :attr:`database`; returns the rows of a query, else ``[]``."""
        conn = self.admin_connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            rows = list(cur.fetchall()) if cur.description else []
            cur.close()
            return [tuple(r) for r in rows]
        finally:
            conn.close()

    @abstractmethod
    def create_iam_user(self, db_user: str) -> None:
        """Create ``db_user``, able to log in only with an IAM auth token (over TCP)."""


class PostgresServer(DatabaseServer):
    """PostgreSQL 15 with ``pam`` authentication for TCP and a role ``rds_iam`` like Aurora."""

    engine = "postgresql"
    os_user = "postgres"

    def __init__(
        self,
        root: Path,
        port: int,
        pam_service: str,
        certs: TestCertificates,
        bin_dir: Path | None = None,
    ) -> None:
        super().__init__(root, port, pam_service, certs)
        self.bin_dir = bin_dir or _find_pg_bin()

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def init_command(self) -> list[str]:
        return [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]

    def prepare(self) -> None:
        svc = self.pam_service
        (self.data_dir / "pg_hba.conf").write_text(
            "# aurora_dbx local stack: admin over the unix socket, IAM tokens (PAM) over TCP\n"
            "local   all all                trust\n"
            f"hostssl all all 127.0.0.1/32   pam pamservice={svc}\n"
            f"hostssl all all ::1/128        pam pamservice={svc}\n"
            f"host    all all 127.0.0.1/32   pam pamservice={svc}\n"
            f"host    all all ::1/128        pam pamservice={svc}\n"
        )
        for src, name in (
            (self.certs.server_cert, "server.crt"),
            (self.certs.server_key, "server.key"),
        ):
            dest = self.data_dir / name
            shutil.copyfile(src, dest)
            dest.chmod(0o600)
            shutil.chown(dest, self.os_user, self.os_user)

    def server_process(self) -> ManagedProcess:
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            "ssl": "on",
            "ssl_cert_file": str(self.data_dir / "server.crt"),
            "ssl_key_file": str(self.data_dir / "server.key"),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
            "logging_collector": "off",
            "log_connections": "on",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return ManagedProcess(
            "postgres",
            args,
            self.log_path,
            user=self.os_user,
            stop_signal=signal.SIGINT,
            death_signal="QUIT",
            cwd=self.root,
        )

    def _bootstrap_database(self) -> str:
        return "postgres"

    def _connect_admin(self, database: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=5,
        )

    def bootstrap(self) -> None:
        conn = self._connect_admin("postgres")
        try:
            conn.execute(f'CREATE DATABASE "{validate_identifier(self.database)}"')
            # Aurora PostgreSQL: members of rds_iam must log in with an IAM token
            conn.execute("CREATE ROLE rds_iam NOLOGIN")
        finally:
            conn.close()

    def create_iam_user(self, db_user: str) -> None:
        validate_identifier(db_user)
        conn = self.admin_connect()
        try:
            exists = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (db_user,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE ROLE "{db_user}" LOGIN')
            conn.execute(f'ALTER ROLE "{db_user}" LOGIN PASSWORD NULL')
            conn.execute(f'GRANT rds_iam TO "{db_user}"')
        finally:
            conn.close()


class MariaDBServer(DatabaseServer):
    """MariaDB 10.11 with ``auth_pam`` (cleartext client plugin, like Aurora MySQL's IAM auth)."""

    engine = "mysql"
    os_user = "mysql"

    def __init__(
        self,
        root: Path,
        port: int,
        pam_service: str,
        certs: TestCertificates,
        mariadbd: str | None = None,
    ) -> None:
        super().__init__(root, port, pam_service, certs)
        self.mariadbd = mariadbd or _find_program("mariadbd", "mysqld", extra=("/usr/sbin",))
        self.plugin_dir = Path("/usr/lib/mysql/plugin")
        tool = self.plugin_dir / "auth_pam_tool_dir" / "auth_pam_tool"
        # auth_pam (v2) needs its setuid helper; without it use the in-process v1 plugin
        self.pam_plugin = "auth_pam" if tool.exists() else "auth_pam_v1"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_path(self) -> Path:
        return self.root / "mysqld.sock"

    def _common_args(self) -> list[str]:
        return ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M"]

    def init_command(self) -> list[str]:
        installer = _find_program("mariadb-install-db", "mysql_install_db", extra=("/usr/bin",))
        return [
            installer,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--user={self.os_user}",
            "--skip-test-db",
            "--auth-root-authentication-method=socket",
            "--skip-name-resolve",
            *self._common_args(),
        ]

    def prepare(self) -> None:
        for src, name in (
            (self.certs.server_cert, "server.pem"),
            (self.certs.server_key, "server.key"),
            (self.certs.ca_cert, "ca.pem"),
        ):
            dest = self.root / name
            shutil.copyfile(src, dest)
            dest.chmod(0o600 if name.endswith(".key") else 0o644)
            shutil.chown(dest, self.os_user, self.os_user)
        (self.root / "tmp").mkdir(exist_ok=True)
        shutil.chown(self.root / "tmp", self.os_user, self.os_user)

    def server_process(self) -> ManagedProcess:
        args = [
            self.mariadbd,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket_path}",
            f"--pid-file={self.root / 'mysqld.pid'}",
            f"--tmpdir={self.root / 'tmp'}",
            f"--log-error={self.log_path}",
            f"--plugin-dir={self.plugin_dir}",
            f"--plugin-load-add={self.pam_plugin}.so",
            "--pam-use-cleartext-plugin=ON",
            f"--ssl-ca={self.root / 'ca.pem'}",
            f"--ssl-cert={self.root / 'server.pem'}",
            f"--ssl-key={self.root / 'server.key'}",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--performance-schema=OFF",
            "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--max-connections=200",
            *self._common_args(),
        ]
        return ManagedProcess(
            "mariadbd",
            args,
            self.root / "stdout.log",
            user=self.os_user,
            stop_signal=signal.SIGTERM,
            death_signal="KILL",
            cwd=self.root,
        )

    def _bootstrap_database(self) -> str:
        return "mysql"

    def _connect_admin(self, database: str) -> Any:
        import pymysql

        return pymysql.connect(
            unix_socket=str(self.socket_path),
            user="root",
            database=database,
            autocommit=True,
            connect_timeout=5,
        )

    def bootstrap(self) -> None:
        conn = self._connect_admin("mysql")
        try:
            cur = conn.cursor()
            cur.execute(f"CREATE DATABASE `{validate_identifier(self.database)}`")
            cur.execute("SELECT user, host FROM mysql.global_priv WHERE user = ''")
            for _, host in cur.fetchall():
                cur.execute("DROP USER ''@%s", (host,))
            cur.close()
        finally:
            conn.close()

    def create_iam_user(self, db_user: str) -> None:
        validate_identifier(db_user)
        conn = self.admin_connect()
        try:
            cur = conn.cursor()
            cur.execute(
                "CREATE USER IF NOT EXISTS %s@'%%' IDENTIFIED VIA pam USING %s",
                (db_user, self.pam_service),
            )
            cur.execute(
                "ALTER USER %s@'%%' IDENTIFIED VIA pam USING %s", (db_user, self.pam_service)
            )
            cur.close()
        finally:
            conn.close()


def _find_pg_bin() -> Path:
    env = os.environ.get("AURORA_DBX_PG_BIN")
    candidates = [Path(env)] if env else []
    base = Path("/usr/lib/postgresql")
    if base.is_dir():
        versions = sorted(
            (p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True
        )
        candidates += [v / "bin" for v in versions]
    for cand in candidates:
        if (cand / "postgres").exists() and (cand / "initdb").exists():
            return cand
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise LocalStackError("PostgreSQL server binaries not found (set AURORA_DBX_PG_BIN)")


def _find_program(*names: str, extra: tuple[str, ...] = ()) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in extra:
            cand = Path(directory) / name
            if cand.exists():
                return str(cand)
    raise LocalStackError(f"none of {', '.join(names)} found")
