"""Fixtures for the local stack's own tests: one real stack for the module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from aurora_dbx.local_stack import LocalStack


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the local stack needs root (PAM config, server users)"
    for tool in ("gcc", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.path.exists("/usr/include/security/pam_modules.h"):
        return "libpam0g-dev not installed"
    return None


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    reason = _missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with LocalStack() as running:
        yield running
