"""Small process, port and file helpers shared by the local stack's parts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "LocalStackError",
    "ManagedProcess",
    "free_port",
    "run",
    "tail",
    "wait_until",
]


class LocalStackError(RuntimeError):
    """The local stack could not be started or used."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def run(
    args: Sequence[str],
    *,
    user: str | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, raising :class:`LocalStackError` with its output on failure."""
    try:
        proc = subprocess.run(
            list(args),
            user=user,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalStackError(f"cannot run {args[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise LocalStackError(
            f"{' '.join(args[:2])} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    on_fail: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` until it returns true; fail early if ``alive`` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ready = check()
        except Exception:  # noqa: BLE001 - readiness probes fail until ready
            ready = False
        if ready:
            return
        if alive is not None and not alive():
            detail = on_fail() if on_fail else ""
            raise LocalStackError(f"{what} exited during startup\n{detail}")
        if time.monotonic() > deadline:
            detail = on_fail() if on_fail else ""
            raise LocalStackError(f"{what} not ready after {timeout:.0f}s\n{detail}")
        time.sleep(interval)


_SETPRIV = shutil.which("setpriv")


class ManagedProcess:
    """A child server process with its output in a log file.

    When started from the main thread (and ``setpriv`` is available) the child gets a
    parent-death signal, so a crashed or killed test run does not leave servers behind.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        death_signal: str = "TERM",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self.user = user
        self.stop_signal = stop_signal
        self.death_signal = death_signal
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        args = self.args
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            args = [_SETPRIV, "--pdeathsig", self.death_signal, "--", *args]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            user=self.user,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.kill(self.proc.pid, self.stop_signal)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    # kill only this child's own process group (it started a new session)
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.proc.wait(timeout=5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
