"""Test CA and server certificate for the local stack, made with the openssl CLI."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ._proc import LocalStackError, run

__all__ = ["TestCertificates", "make_certificates"]


@dataclass(frozen=True)
class TestCertificates:
    """Paths of the generated PEM files (EC P-256)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certificates(directory: Path, *, days: int = 30) -> TestCertificates:
    """Create a throwaway CA and a server certificate for ``localhost``/``127.0.0.1``/``::1``.

    Clients verifying the CA with host name checks (``sslmode=verify-full``, Python's
    ``check_hostname``, JDBC host name verification) accept the server as ``localhost``.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LocalStackError("openssl is required to create the local stack's test CA")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = directory / "ca.key"
    ca_cert = directory / "ca.pem"
    key = directory / "server.key"
    csr = directory / "server.csr"
    cert = directory / "server.pem"
    ext = directory / "server.ext"
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        [
            openssl,
            "req",
            "-x509",
            *curve,
            "-keyout",
            str(ca_key),
            "-out",
            str(ca_cert),
            "-days",
            str(days),
            "-subj",
            "/O=aurora-dbx local stack/CN=aurora-dbx local stack test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    run(
        [
            openssl,
            "req",
            *curve,
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            "/O=aurora-dbx local stack/CN=localhost",
        ]
    )
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
    )
    run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_cert),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            str(days),
            "-sha256",
            "-extfile",
            str(ext),
        ]
    )
    csr.unlink(missing_ok=True)
    ca_cert.chmod(0o644)
    cert.chmod(0o644)
    key.chmod(0o600)
    ca_key.chmod(0o600)
    return TestCertificates(ca_cert=ca_cert, server_cert=cert, server_key=key)
