"""Tokens, redaction, identity parsing and the public surface (no network)."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone

import boto3
import pytest

import aurora_dbx
from aurora_dbx.credentials import RoleCredentials, role_session_name, source_identity
from aurora_dbx.errors import IdentityError
from aurora_dbx.identity import Principal, parse_local_principal, principal_kind
from aurora_dbx.redaction import install_log_redaction, register_secret, scrub
from aurora_dbx.tokens import TOKEN_REUSE_SECONDS, TokenCache, mint_token

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def creds(key: str = "ASIAEXAMPLEKEY", expires: datetime | None = None) -> RoleCredentials:
    return RoleCredentials(key, "s3cr3t-Access-Key-Value", "SESSION-TOKEN-VALUE-1234567890",
                           expires or NOW + timedelta(hours=1), "arn:aws:iam::123456789012:role/r",
                           "adbx-x", "x")


def test_public_surface_is_pinned_and_sorted():
    assert aurora_dbx.__all__ == sorted(aurora_dbx.__all__)
    assert set(aurora_dbx.__all__) == {
        "AccessDenied", "AuroraDbxError", "Context", "CredentialError", "IdentityError", "PolicyError",
        "Principal", "__version__", "configure", "connect", "errors", "load_policy", "read_table",
        "whoami", "write_table",
    }
    from aurora_dbx import errors

    assert errors.__all__ == sorted(errors.__all__)
    for name in ("PolicyError", "IdentityError", "CredentialError", "AccessDenied"):
        assert issubclass(getattr(errors, name), errors.AuroraDbxError)


def test_token_matches_boto3_generate_db_auth_token():
    c = creds()
    ours = mint_token(c, "db.example.com", 5432, "analyst_ro", "us-east-1")
    rds = boto3.client("rds", region_name="us-east-1", aws_access_key_id=c.access_key_id,
                       aws_secret_access_key=c.secret_access_key, aws_session_token=c.session_token)
    theirs = rds.generate_db_auth_token("db.example.com", 5432, "analyst_ro", "us-east-1")
    strip = lambda s: re.sub(r"X-Amz-(Date|Signature)=[^&]*", "", s)  # noqa: E731 - time-dependent parts
    assert strip(ours.value) == strip(theirs)
    assert "X-Amz-Expires=900" in ours.value and ours.value.startswith("db.example.com:5432/?Action=connect")


def test_token_repr_and_str_hide_the_value():
    t = mint_token(creds(), "h", 1, "u", "us-east-1")
    assert t.value not in repr(t) and t.value not in str(t) and "***" in repr(t)
    assert "s3cr3t" not in repr(creds()) and "SESSION-TOKEN" not in repr(creds())


def test_token_cache_reuses_then_remints_and_never_outlives_the_session():
    now = [NOW]
    cache = TokenCache(clock=lambda: now[0])
    c = creds()
    first = cache.get(c, "h", 5432, "u", "us-east-1")
    assert cache.get(c, "h", 5432, "u", "us-east-1") is first
    assert cache.get(c, "h", 5432, "u", "us-east-1", fresh=True) is not first
    now[0] += timedelta(seconds=TOKEN_REUSE_SECONDS + 1)
    assert cache.minted == 2 and cache.get(c, "h", 5432, "u", "us-east-1").minted_at == now[0]
    short = creds("ASIASHORTLIVED", expires=now[0] + timedelta(seconds=90))
    t = cache.get(short, "h", 5432, "u", "us-east-1")
    assert t.expires_at == short.expires_at
    now[0] += timedelta(seconds=40)  # 50 s left: inside the safety margin, so a new token
    assert cache.get(short, "h", 5432, "u", "us-east-1") is not t
    other_user = cache.get(c, "h", 5432, "other", "us-east-1")
    assert "DBUser=other" in other_user.value


def test_scrub_removes_registered_and_secret_shaped_values():
    register_secret("my-very-secret-capability")
    text = ("failed with my-very-secret-capability and token h:1/?Action=connect&X-Amz-Security-Token=abc"
            "&X-Amz-Signature=deadbeef password=hunter22 Authorization: Bearer dapi123456789")
    clean = scrub(text)
    for secret in ("my-very-secret-capability", "abc", "deadbeef", "hunter22", "dapi123456789"):
        assert secret not in clean


def test_log_records_are_scrubbed_for_every_logger(caplog):
    install_log_redaction()
    register_secret("SECRET-VALUE-FOR-LOGS")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("botocore.credentials").debug("refreshed %s", "SECRET-VALUE-FOR-LOGS")
        try:
            raise RuntimeError("boom SECRET-VALUE-FOR-LOGS")
        except RuntimeError:
            logging.getLogger("some.library").exception("failed")
    assert "SECRET-VALUE-FOR-LOGS" not in caplog.text
    assert "refreshed ***" in caplog.text


@pytest.mark.parametrize(
    "value, expected",
    [
        ("user:dev@example.com", ("dev@example.com", "user", ())),
        ("user:dev@example.com;groups=b,a,a", ("dev@example.com", "user", ("a", "b"))),
        ("service_principal:6a1c2f0e-1111-2222-3333-444455556666", ("6a1c2f0e-1111-2222-3333-444455556666", "service_principal", ())),
    ],
)
def test_local_principal_parsing(value, expected):
    p = parse_local_principal(value)
    assert (p.name, p.kind, p.groups) == expected


@pytest.mark.parametrize(
    "value",
    ["dev@example.com", "admin:root", "user:", "user:a b", "user:x;roles=a", "service_principal:not-a-uuid",
     "user:x;groups=a\nb", "user:x;groups=" + "g" * 300],
)
def test_bad_local_principal_is_refused_with_the_expected_shape(value):
    with pytest.raises(IdentityError, match="AURORA_DBX_LOCAL_PRINCIPAL"):
        parse_local_principal(value)


def test_principal_kind_from_user_name():
    assert principal_kind("6A1C2F0E-1111-2222-3333-444455556666") == "service_principal"
    assert principal_kind("someone@example.com") == "user"


def test_sts_names_are_valid_and_traceable():
    p = Principal(name="first.last+tag@example.com", kind="user")
    assert source_identity(p) == "first.last+tag@example.com"
    assert role_session_name(p) == "adbx-first.last+tag@example.com"
    long = Principal(name="a" * 100 + "@example.com", kind="user")
    assert len(role_session_name(long)) == 64 and len(source_identity(long)) == 64
    assert role_session_name(long) != role_session_name(Principal(name="a" * 101 + "@example.com", kind="user"))
    odd = Principal(name="we!rd name#", kind="user")
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", source_identity(odd))


@pytest.mark.parametrize(
    "text, secret",
    [
        ("Response body: b'<SecretAccessKey>wJalrXUtnFEMI/K7MDENG</SecretAccessKey>'", "wJalrXUtnFEMI/K7MDENG"),
        ("<SessionToken>FQoGZXIvYXdzEXAMPLE==</SessionToken>", "FQoGZXIvYXdzEXAMPLE=="),
        ("CanonicalRequest:\nPOST\n/\n\nhost:sts\nx-amz-security-token:FQoGZXIvYXdzEXAMPLE==\n", "FQoGZXIvYXdzEXAMPLE=="),
        ("headers={'X-Amz-Security-Token': b'FQoGZXIvYXdzEXAMPLE=='}", "FQoGZXIvYXdzEXAMPLE=="),
        ("Signature:\n" + "ab" * 32, "ab" * 32),
        ("Credential=ASIA/x, SignedHeaders=host, Signature=" + "cd" * 32, "cd" * 32),
    ],
)
def test_botocore_debug_shapes_are_scrubbed_even_unregistered(text, secret):
    """botocore logs STS responses, canonical requests and signatures at DEBUG before the
    library ever sees the values; the shapes are masked regardless (found by the leak scan)."""
    assert secret not in scrub(text)
