"""Keep secrets out of text: logs, error messages, reprs, CLI output, MLflow, audit.

Two layers: known secret values registered at runtime (every token minted, every secret
key and session token received) are replaced wherever they appear, and anything shaped
like a presigned token or an AWS secret is masked even if it was never registered.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["RedactingFilter", "install_log_redaction", "register_secret", "scrub"]

_MASK = "***"
_PATTERNS = [
    # presigned query parameters of an Aurora token or any SigV4 URL
    re.compile(r"(X-Amz-(?:Security-Token|Signature|Credential)=)[^&\s'\"]+"),
    # Authorization headers and bearer tokens
    re.compile(r"((?:Bearer|bearer|Basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    # STS responses as botocore logs them at DEBUG (XML body)
    re.compile(r"(<(?:SecretAccessKey|SessionToken)>)[^<]+"),
    # the session token as a signed header in botocore's DEBUG canonical requests
    # (and as a header in request reprs: 'X-Amz-Security-Token': b'...')
    re.compile(r"((?i:x-amz-security-token)['\"]?\s*:\s*b?['\"]?)[^\s'\",}]+"),
    # the signature in an Authorization header
    re.compile(r"(Signature=)[0-9a-f]{64}"),
    # SigV4 signatures botocore logs at DEBUG while signing (a token's last part)
    re.compile(r"(Signature:\s*)[0-9a-f]{64}"),
    # AWS secret access keys / session tokens printed as key=value or JSON
    re.compile(r"((?:aws_)?(?:secret_access_key|secret_key|session_token|SecretAccessKey|SessionToken|password)[\"']?\s*[:=]\s*[\"']?)[^\s,'\"}]+", re.I),
]
_known: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret so :func:`scrub` removes it from any text later."""
    if value and len(value) >= 8:
        with _lock:
            _known.add(value)


def scrub(text: str) -> str:
    """Return ``text`` with every known or secret-shaped value masked."""
    if not text:
        return text
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, _MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + _MASK, text)
    return text


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:
        return
    clean = scrub(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text = scrub(str(exc))
        if text != str(exc):
            # The traceback would repeat the secret; keep the type and the clean text.
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.msg} [{type(exc).__name__}: {text}]"


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs every record passing through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


_installed = False


def install_log_redaction() -> None:
    """Scrub every log record created in this process, whatever logger it comes from.

    A record factory (not a logger filter) because logger filters do not see records of
    child loggers, and botocore, urllib3, py4j and the drivers log under many names.
    """
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
