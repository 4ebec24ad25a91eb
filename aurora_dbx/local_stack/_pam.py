"""Build the ``pam_aurora_iam`` PAM module and manage ``/etc/pam.d`` service files."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from ._proc import LocalStackError, run

__all__ = [
    "PAM_DIR",
    "build_pam_module",
    "cache_dir",
    "remove_pam_service",
    "remove_stale_pam_services",
    "write_pam_service",
]

PAM_DIR = Path("/etc/pam.d")
SERVICE_PREFIX = "aurora-dbx-"
_SOURCE = Path(__file__).with_name("pam_aurora_iam.c")
_MARKER = "# aurora_dbx.local_stack"


def cache_dir() -> Path:
    """World-readable cache for built artefacts (``$AURORA_DBX_LOCAL_STACK_CACHE``)."""
    default = "/var/tmp/aurora-dbx-local-stack"  # noqa: S108 - shared with the server users
    path = Path(os.environ.get("AURORA_DBX_LOCAL_STACK_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def build_pam_module(dest_dir: Path) -> Path:
    """Compile ``pam_aurora_iam.c`` (cached by source hash) and copy it into ``dest_dir``."""
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cached = cache_dir() / f"pam_aurora_iam-{digest}.so"
    if not cached.exists():
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise LocalStackError("gcc is required to build the local stack's PAM module")
        if not Path("/usr/include/security/pam_modules.h").exists():
            raise LocalStackError("PAM headers missing: install libpam0g-dev")
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, str(_SOURCE), "-lpam"])
            os.chmod(tmp, 0o755)  # noqa: S103 - loaded by the postgres/mysql server users
            os.replace(tmp, cached)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dest = dest_dir / "pam_aurora_iam.so"
    shutil.copy2(cached, dest)
    dest.chmod(0o755)
    return dest


def write_pam_service(
    service: str, *, module: Path, socket_path: Path, endpoint: str, stack_dir: Path
) -> Path:
    """Write ``/etc/pam.d/<service>`` pointing at ``module`` for one database server."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", service):
        raise ValueError(f"bad PAM service name {service!r}")
    if not os.access(PAM_DIR, os.W_OK):
        raise LocalStackError(f"{PAM_DIR} is not writable: the local stack must run as root")
    path = PAM_DIR / service
    path.write_text(
        f"{_MARKER} pid={os.getpid()} stack_dir={stack_dir}\n"
        "# Aurora IAM token authentication for the aurora_dbx local stack; removed on stop.\n"
        f"auth required {module} socket={socket_path} endpoint={endpoint}\n"
        f"account required {module}\n"
    )
    path.chmod(0o644)
    return path


def remove_pam_service(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_stale_pam_services() -> None:
    """Remove service files left by stacks whose process or directory is gone (crashed runs)."""
    try:
        entries = list(PAM_DIR.glob(SERVICE_PREFIX + "*"))
    except OSError:
        return
    for path in entries:
        try:
            first = path.read_text().splitlines()[0]
        except (OSError, IndexError):
            continue
        match = re.fullmatch(re.escape(_MARKER) + r" pid=(\d+) stack_dir=(.+)", first)
        if match is None:
            continue
        if not pid_alive(int(match.group(1))) or not Path(match.group(2)).exists():
            remove_pam_service(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
