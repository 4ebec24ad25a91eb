"""Leak scan: after every test, look for every secret the run created in what the test produced.

The design promises that tokens, secret keys and session tokens never appear in logs (any
level), exception messages, reprs, MLflow, audit records, Spark plan strings or CLI output.
``tests/conftest.py`` (the "leak scan" block) runs a :class:`LeakScan` around every test:

* **logs**: a handler on the root logger at DEBUG for the test's duration (the root level is
  lowered to DEBUG and the other root handlers, pytest's ``caplog`` among them, get a filter
  that keeps exactly what they would have seen without it, so no other test changes);
* **exceptions**: the text of every :class:`aurora_dbx.errors.AuroraDbxError` the library
  constructs, every PySpark ``CapturedException`` and ``Py4JJavaError`` (job failures carry
  the executors' tracebacks), and pytest's own report of a failing test;
* **audit records**: every event an :class:`aurora_dbx.audit.Auditor` hands to its sink,
  serialised exactly as the sinks serialise it;
* **CLI output**: everything read through ``capsys`` and whatever capture is left in the
  report;
* **Spark plan strings**: the query execution (parsed, analysed, optimised, physical plans)
  of every DataFrame ``spark.read`` created during the test;
* **MLflow**: every row of a ``sqlite:`` tracking store the test used.

The secrets searched for are the run's *own*: everything registered with
:func:`aurora_dbx.redaction.register_secret` (each token minted, each secret key and session
token received, each broker capability; for tokens also their signature and embedded session
token, so a partial token is found too), and, in tests that used the shared stack, every
secret key and session token moto's STS issued (``/moto-api/data.json``). A finding names
where it was found and what kind of secret it is (with a short SHA-256 fingerprint), never the
value itself.

Cheap by construction: only text gathered during the test is scanned; every text is cut into
maximal runs of the characters secrets are made of, the distinct runs are joined once, and each
secret is one substring search in that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import sys
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import pytest

__all__ = ["Finding", "LeakScan", "Secret", "Tally", "registered_secrets", "sts_secrets", "tally"]

_MIN_SECRET = 12  # shorter registered values are test fixtures' toy strings, not secrets


@dataclass(frozen=True)
class Secret:
    value: str = field(repr=False)
    label: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Secret({self.label}, sha256:{self.fingerprint})"


@dataclass(frozen=True)
class Finding:
    where: str
    secret: Secret

    def __str__(self) -> str:
        return (f"{self.secret.label} (sha256:{self.secret.fingerprint}, {len(self.secret.value)} chars) "
                f"found in {self.where}")


# -- the secrets ---------------------------------------------------------------------------


def _variants(value: str, label: str) -> Iterator[Secret]:
    yield Secret(value, label)
    encoded = quote(value, safe="")
    if encoded != value:
        yield Secret(encoded, label + " (URL-encoded)")


def _token_parts(value: str) -> Iterator[Secret]:
    """An Aurora IAM token: the token, its signature and its embedded session token."""
    yield from _variants(value, "Aurora IAM auth token")
    query = parse_qs(urlparse("https://" + value).query)
    for sig in query.get("X-Amz-Signature", []):
        yield Secret(sig, "signature of an Aurora IAM auth token")
    for tok in query.get("X-Amz-Security-Token", []):
        yield from _variants(tok, "session token inside an Aurora IAM auth token")


def registered_secrets() -> list[Secret]:
    """Everything the library registered with ``register_secret`` so far in this process."""
    from aurora_dbx import redaction

    with redaction._lock:
        known = list(redaction._known)
    out: list[Secret] = []
    for value in known:
        if len(value) < _MIN_SECRET:
            continue
        if "Action=connect" in value and "X-Amz-Signature=" in value:
            out.extend(_token_parts(value))
        elif value.startswith("FQoGZXIvYXdzE"):
            out.extend(_variants(value, "STS session token (registered)"))
        else:
            out.extend(_variants(value, "registered secret (secret key, session token or broker capability)"))
    return out


_sts_cache: dict[str, tuple[int, list[Secret]]] = {}


def sts_secrets(endpoint: str) -> list[Secret]:
    """Every secret access key and session token moto's STS has issued in this run."""
    with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=10) as resp:  # noqa: S310
        data = json.load(resp)
    out: list[Secret] = []
    for item in (data.get("sts", {}) or {}).get("AssumedRole", []) or []:
        role = str(item.get("role_arn", "?")).rsplit("/", 1)[-1]
        if item.get("secret_access_key"):
            out.extend(_variants(item["secret_access_key"], f"STS secret access key (role {role})"))
        if item.get("session_token"):
            out.extend(_variants(item["session_token"], f"STS session token (role {role})"))
    return out


def scan(texts: Iterable[tuple[str, str]], secrets: Iterable[Secret]) -> list[Finding]:
    """Every (where, secret) such that the secret occurs in the text gathered at ``where``."""
    secrets = {s.value: s for s in secrets if s.value}
    if not secrets:
        return []
    chars = set().union(*map(set, secrets))
    sep = next(c for c in ("\x00", "\x01", "\x02", "\u2063") if c not in chars)
    alphabet = "".join(re.escape(c) for c in sorted(chars))
    run = re.compile(f"[{alphabet}]{{{min(map(len, secrets))},}}")
    where_of: dict[str, str] = {}
    for where, text in texts:
        if text:
            for r in run.findall(text):
                where_of.setdefault(r, where)
    if not where_of:
        return []
    blob = sep.join(where_of)
    findings = []
    for value, secret in secrets.items():
        if value in blob:
            where = next(w for r, w in where_of.items() if value in r)
            findings.append(Finding(where, secret))
    return findings


# -- what the test produced --------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _AsBefore(logging.Filter):
    """Keeps, for a pre-existing root handler, only the records it would have received had
    the root level not been lowered to DEBUG for the scan."""

    def __init__(self, scan: LeakScan) -> None:
        super().__init__()
        self.scan = scan

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.scan.root_is_ours:
            return True
        logger: logging.Logger | None = logging.getLogger(record.name) if record.name != "root" else logging.root
        while logger is not None and logger is not logging.root:
            if logger.level:
                return record.levelno >= logger.level
            logger = logger.parent  # type: ignore[assignment]
        return record.levelno >= (self.scan.root_level_before or logging.WARNING)


class LeakScan:
    """Gathers the text one test produces; :meth:`findings` searches it for secrets."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.handler = _Records()
        self.root_level_before: int | None = None
        self.root_is_ours = False
        self._filtered: list[logging.Handler] = []
        self._filter = _AsBefore(self)
        self._undo: list[Callable[[], None]] = []
        self._frames: list[Any] = []
        self._errors: list[tuple[str, Any]] = []
        self._audit: list[str] = []
        self._captured: list[str] = []
        self.mlflow_uri: str | None = None

    # -- start/stop --------------------------------------------------------------------

    def start(self) -> None:
        root = logging.root
        self.root_level_before = root.level
        root.addHandler(self.handler)
        for h in root.handlers:
            if h is not self.handler:
                h.addFilter(self._filter)
                self._filtered.append(h)
        root.setLevel(logging.DEBUG)
        self.root_is_ours = True
        original_set_level = root.setLevel

        def set_level(level: int | str) -> None:  # caplog.set_level() on the root: theirs now
            self.root_is_ours = False
            original_set_level(level)

        root.setLevel = set_level  # type: ignore[method-assign]
        self._undo.append(lambda: root.__dict__.pop("setLevel", None))
        self._patch_errors()
        self._patch_audit()
        self._patch_spark()

    def stop(self) -> None:
        root = logging.root
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        root.removeHandler(self.handler)
        for h in self._filtered:
            h.removeFilter(self._filter)
        if self.root_is_ours and self.root_level_before is not None:
            root.setLevel(self.root_level_before)

    def _patch(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        had = name in owner.__dict__
        original = owner.__dict__.get(name)
        setattr(owner, name, wrapper)

        def undo() -> None:
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

        self._undo.append(undo)

    def _patch_errors(self) -> None:
        from aurora_dbx.errors import AuroraDbxError

        errors = self._errors
        base_init = Exception.__init__

        def init(exc: BaseException, *args: Any, **kwargs: Any) -> None:
            base_init(exc, *args, **kwargs)
            # only errors the library constructs (tests build their own to test scrubbing)
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__") == "aurora_dbx.errors":
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None and str(frame.f_globals.get("__name__", "")).startswith("aurora_dbx"):
                errors.append((f"{type(exc).__name__} raised in {frame.f_globals['__name__']}:{frame.f_lineno}", exc))

        self._patch(AuroraDbxError, "__init__", init)
        if "pyspark" in sys.modules or "py4j" in sys.modules:
            try:
                from py4j.protocol import Py4JJavaError
                from pyspark.errors.exceptions.captured import CapturedException
            except ImportError:  # pragma: no cover
                return
            for cls in (CapturedException, Py4JJavaError):
                original = cls.__init__

                def spark_init(exc: BaseException, *args: Any, _orig: Any = original, **kwargs: Any) -> None:
                    _orig(exc, *args, **kwargs)
                    errors.append((f"Spark error {type(exc).__name__}", exc))

                self._patch(cls, "__init__", spark_init)

    def _patch_audit(self) -> None:
        from aurora_dbx.audit import Auditor

        original = Auditor.emit
        audit = self._audit

        def emit(auditor: Auditor, event: Any) -> None:
            try:
                audit.append(event.to_json())
            except Exception:  # noqa: BLE001, S110 - the sink will say so itself
                pass
            original(auditor, event)

        self._patch(Auditor, "emit", emit)

    def _patch_spark(self) -> None:
        if "pyspark" not in sys.modules:
            return
        from pyspark.sql.readwriter import DataFrameReader

        frames = self._frames
        for name in ("load", "jdbc"):
            original = getattr(DataFrameReader, name)

            def reading(reader: Any, *args: Any, _orig: Any = original, **kwargs: Any) -> Any:
                df = _orig(reader, *args, **kwargs)
                try:
                    frames.append(weakref.ref(df))
                except TypeError:  # pragma: no cover
                    frames.append(lambda df=df: df)
                return df

            self._patch(DataFrameReader, name, reading)

    # -- adding text -------------------------------------------------------------------

    def add(self, where: str, text: str | None) -> None:
        if text:
            self.texts.append((where, text))

    def capture(self, text: str) -> None:
        """Output a test read through capsys (the CLI's stdout/stderr)."""
        self._captured.append(text)

    def _gather(self) -> None:
        fmt = logging.Formatter("%(levelname)s %(name)s %(message)s")
        for i, record in enumerate(self.handler.records):
            try:
                text = fmt.format(record)
            except Exception:  # noqa: BLE001 - a record whose args fail to format
                text = str(record.msg)
            self.add(f"log record #{i} ({record.levelname} {record.name} at {record.pathname}:{record.lineno})", text)
        for i, (where, exc) in enumerate(self._errors):
            try:
                text = str(exc)
            except Exception:  # noqa: BLE001
                text = repr(getattr(exc, "args", ""))
            self.add(f"exception #{i}: {where}", text)
        for i, line in enumerate(self._audit):
            self.add(f"audit event #{i}", line)
        for i, out in enumerate(self._captured):
            self.add(f"captured output #{i} (capsys)", out)
        for i, ref in enumerate(self._frames):
            df = ref()
            if df is None:
                continue
            try:
                qe = df._jdf.queryExecution()
                self.add(f"Spark plan of DataFrame #{i}", qe.toString())
            except Exception as e:  # noqa: BLE001 - e.g. a plan whose source now refuses
                self.add(f"Spark plan error of DataFrame #{i}", str(e))
        if self.mlflow_uri and self.mlflow_uri.startswith("sqlite:///"):
            self._gather_sqlite(self.mlflow_uri[len("sqlite:///"):])

    def _gather_sqlite(self, path: str) -> None:
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            return
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                rows = conn.execute(f'SELECT * FROM "{t}"').fetchall()  # noqa: S608 - names from sqlite_master
                text = "\n".join(" ".join(str(v) for v in r if isinstance(v, str | bytes)) for r in rows)
                self.add(f"MLflow store {path} table {t}", text)
        except sqlite3.Error:
            pass
        finally:
            conn.close()

    def findings(self, sts_endpoint: str | None = None) -> list[Finding]:
        self._gather()
        secrets = registered_secrets()
        if sts_endpoint:
            secrets += sts_secrets(sts_endpoint)
        TALLY.leak_scans += 1
        TALLY.bytes_scanned += sum(len(t) for _, t in self.texts)
        TALLY.secrets_checked = max(TALLY.secrets_checked, len({s.value for s in secrets}))
        found = scan(self.texts, secrets)
        TALLY.leaks += len(found)
        return found


# -- figures for docs/SECURITY.md --------------------------------------------------------------


@dataclass
class Tally:
    """What the security suites did in this run (printed at the end; see docs/SECURITY.md)."""

    cases: dict[str, set[str]] = field(default_factory=dict)
    leak_scans: int = 0
    bytes_scanned: int = 0
    secrets_checked: int = 0
    leaks: int = 0
    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, case: str) -> None:
        with self._lock:
            self.cases.setdefault(kind, set()).add(case)

    def as_dict(self) -> dict[str, Any]:
        return {
            **{kind: len(cases) for kind, cases in sorted(self.cases.items())},
            "leak_scans": self.leak_scans,
            "bytes_scanned": self.bytes_scanned,
            "distinct_secrets_searched": self.secrets_checked,
            "leaks_found": self.leaks,
        }


TALLY = Tally()


def tally(kind: str, case: str) -> None:
    """Count one case a security suite checked: ``fault`` (injected and survived),
    ``hostile`` (tried and refused safely) or ``property`` (a property's examples)."""
    TALLY.count(kind, case)


# -- pytest wiring (registered by the "leak scan" block of tests/conftest.py) -------------------

FIGURES_CACHE_KEY = "aurora_dbx/security_figures"


class Plugin:
    """Keeps each test's reports for the scan and prints the run's security figures."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Any:
        report = yield
        item.__dict__.setdefault("_leak_reports", {})[report.when] = report
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: Any) -> Any:
        try:
            return (yield)
        finally:
            scan = item.__dict__.get("_leak_scan")
            if scan is not None and "mlflow" in sys.modules:
                try:
                    scan.mlflow_uri = sys.modules["mlflow"].get_tracking_uri()
                except Exception:  # noqa: BLE001, S110
                    pass

    def pytest_sessionfinish(self, session: Any) -> None:
        figures = {**TALLY.as_dict(), "seconds": round(time.time() - TALLY.started, 1)}
        cache = getattr(session.config, "cache", None)
        if cache is not None and TALLY.leak_scans:
            cache.set(FIGURES_CACHE_KEY, figures)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not TALLY.leak_scans:
            return
        f = TALLY.as_dict()
        parts = [f"{k.replace('_', ' ')}: {v}" for k, v in f.items()]
        terminalreporter.write_sep("-", "aurora-dbx security figures")
        terminalreporter.write_line("; ".join(parts))


def report_texts(item: Any) -> Iterator[tuple[str, str]]:
    """Failure text and captured output pytest holds for a test's setup and call phases."""
    for when, report in (item.__dict__.get("_leak_reports") or {}).items():
        if report.failed:
            yield f"pytest report ({when})", report.longreprtext
        for title, content in report.sections:
            yield f"pytest report section {title!r}", content
