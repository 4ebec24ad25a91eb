"""``init_scripts/aurora-dbx-init.sh``, run with bash in a sandbox root as a cluster would.

``AURORA_DBX_INIT_ROOT`` prefixes every path the script reads or writes, so a driver and an
executor node are simulated in a temporary directory with Databricks' own variables
(``DB_IS_DRIVER``, ``DB_CLUSTER_ID``, ``DB_IS_JOB_CLUSTER``). The Databricks pip at
``<root>/databricks/python/bin/pip`` is a stand-in that records its arguments: nothing is
installed for real. No stack, no Spark.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "init_scripts" / "aurora-dbx-init.sh"
WHEEL = "/Volumes/main/aurora_dbx/artifacts/aurora_dbx-0.1.0-py3-none-any.whl"
CA_SOURCE = "/Volumes/main/aurora_dbx/artifacts/rds-global-bundle.pem"
POLICY = "/Volumes/main/aurora_dbx/policy/policy.yaml"
CA_TARGET = "etc/ssl/certs/rds-global-bundle.pem"
CONF = "databricks/driver/conf/00-aurora-dbx.conf"
SPARK_ENV = "databricks/spark/conf/spark-env.sh"
BASE_ROLE = "arn:aws:iam::123456789012:role/databricks-aurora-base"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBfakeRDSroot1\n-----END CERTIFICATE-----\n" \
      "-----BEGIN CERTIFICATE-----\nMIIBfakeRDSroot2\n-----END CERTIFICATE-----\n"
# Secrets a cluster's environment may hold; the script must never echo or write them.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEINITSCRIPT01",
    "AWS_SECRET_ACCESS_KEY": "fake/secret+key/do-not-log-0123456789abcdef",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzFAKEsessionTOKENdoNotLog",
    "DATABRICKS_TOKEN": "dapi0123456789abcdef-do-not-log",
}

FAKE_PIP = """#!/usr/bin/env bash
# records one call per line: its arguments, tab-separated
(IFS=$'\\t'; printf '%s\\n' "$*") >> "$(dirname "$0")/pip-calls"
echo "Successfully installed aurora-dbx-0.1.0 (fake pip)"
"""

FAKE_CURL = """#!/usr/bin/env bash
(IFS=$'\\t'; printf '%s\\n' "$*") >> "$FAKE_CURL_LOG"
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--output" ]; then out="$2"; shift; fi
  shift
done
cat "$FAKE_CURL_BODY" > "$out"
"""


@dataclass
class Sandbox:
    root: Path

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def pip_calls(self) -> list[list[str]]:
        log = self.path("/databricks/python/bin/pip-calls")
        return [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []

    def run(self, *, driver: bool, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "AURORA_DBX_INIT_ROOT": str(self.root),
            "DB_CLUSTER_ID": "0923-164208-meows279",
            "DB_IS_JOB_CLUSTER": "TRUE",
            "DB_IS_DRIVER": "TRUE" if driver else "FALSE",
            **SECRETS,
        }
        base.update(env)
        base = {k: v for k, v in base.items() if v is not None}
        proc = subprocess.run(["bash", str(SCRIPT)], env=base, capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        for secret in SECRETS.values():  # never in the log, whatever happened
            assert secret not in proc.stdout + proc.stderr
        return proc


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path / "node")
    pip = box.path("/databricks/python/bin/pip")
    pip.parent.mkdir(parents=True)
    pip.write_text(FAKE_PIP)
    pip.chmod(0o755)
    wheel = box.path(WHEEL)
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"PK\x03\x04 not really a wheel")
    box.path(CA_SOURCE).write_text(PEM)
    box.path(POLICY).parent.mkdir(parents=True)
    box.path(POLICY).write_text("version: 1\n")
    return box


def wheel_sha(box: Sandbox) -> str:
    return hashlib.sha256(box.path(WHEEL).read_bytes()).hexdigest()


def written_files(box: Sandbox) -> dict[str, bytes]:
    """Every file the script created (the fixture's inputs excluded)."""
    inputs = {box.path(p) for p in (WHEEL, CA_SOURCE, POLICY, "/databricks/python/bin/pip",
                                    "/databricks/python/bin/pip-calls")}
    return {str(p.relative_to(box.root)): p.read_bytes() for p in sorted(box.root.rglob("*"))
            if p.is_file() and p not in inputs}


# -- the normal runs --------------------------------------------------------------------


def test_driver_installs_wheel_ca_and_policy_conf_and_a_second_run_changes_nothing(sandbox):
    first = sandbox.run(driver=True)
    files = written_files(sandbox)
    assert set(files) == {CA_TARGET, CONF, "databricks/aurora_dbx/installed-wheel"}
    assert files[CA_TARGET].decode() == PEM
    assert stat.S_IMODE(sandbox.path("/" + CA_TARGET).stat().st_mode) == 0o644
    assert files[CONF].decode() == f'[driver] {{\n  "spark.aurora_dbx.policy" = "{POLICY}"\n}}\n'
    assert sandbox.pip_calls() == [[
        "install", "--disable-pip-version-check", "--no-input", "--upgrade-strategy", "only-if-needed",
        str(sandbox.path(WHEEL)),
    ]]
    log = first.stdout
    assert f"wheel: installed {WHEEL} sha256:{wheel_sha(sandbox)}" in log
    assert "CA bundle: /etc/ssl/certs/rds-global-bundle.pem written (2 certificates" in log
    assert f"policy: spark.aurora_dbx.policy = {POLICY}" in log
    assert "aurora-dbx-init[0923-164208-meows279 driver]" in log and log.rstrip().endswith("done")

    mtimes = {p: sandbox.path("/" + p).stat().st_mtime_ns for p in files}
    second = sandbox.run(driver=True)
    assert written_files(sandbox) == files
    assert {p: sandbox.path("/" + p).stat().st_mtime_ns for p in files} == mtimes  # not even rewritten
    assert len(sandbox.pip_calls()) == 1
    assert "already installed" in second.stdout and "written" not in second.stdout


def test_executor_gets_wheel_and_ca_but_no_driver_conf(sandbox):
    out = sandbox.run(driver=False).stdout
    files = written_files(sandbox)
    assert set(files) == {CA_TARGET, "databricks/aurora_dbx/installed-wheel"}
    assert len(sandbox.pip_calls()) == 1
    assert "executor node, nothing to do" in out and "aurora-dbx-init[0923-164208-meows279 executor]" in out
    sandbox.run(driver=False)
    assert written_files(sandbox) == files and len(sandbox.pip_calls()) == 1


def test_a_new_wheel_is_installed_on_the_next_run(sandbox):
    sandbox.run(driver=True)
    sandbox.path(WHEEL).write_bytes(b"PK\x03\x04 a rebuilt wheel")
    sandbox.run(driver=True, AURORA_DBX_WHEEL_SHA256=wheel_sha(sandbox).upper())
    assert len(sandbox.pip_calls()) == 2


def test_pip_never_touches_pyspark_or_mlflow(sandbox):
    sandbox.run(driver=True)
    sandbox.run(driver=True, AURORA_DBX_WHEEL="aurora-dbx==0.1.0")
    calls = sandbox.pip_calls()
    assert calls[1][-1] == "aurora-dbx==0.1.0"
    for call in calls:
        assert call[0] == "install"
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed", "--no-deps"} & set(call)
        assert not any("pyspark" in Path(a).name or "mlflow" in Path(a).name for a in call)


def test_empty_settings_skip_their_step(sandbox):
    out = sandbox.run(driver=True, AURORA_DBX_WHEEL="", AURORA_DBX_RDS_CA_SOURCE="",
                      AURORA_DBX_POLICY_PATH="").stdout
    assert written_files(sandbox) == {} and sandbox.pip_calls() == []
    assert "wheel: skipped" in out and "CA bundle: skipped" in out and "policy: skipped" in out


def test_settings_come_from_the_environment(sandbox):
    wheel = "/Volumes/prod/libs/whl/aurora_dbx-0.2.0-py3-none-any.whl"
    sandbox.path(wheel).parent.mkdir(parents=True)
    sandbox.path(wheel).write_bytes(b"PK")
    policy = "/Workspace/Users/admin@example.com/aurora/policy.yaml"
    sandbox.run(driver=True, AURORA_DBX_WHEEL=wheel, AURORA_DBX_POLICY_PATH=policy)
    assert sandbox.pip_calls()[0][-1] == str(sandbox.path(wheel))
    assert f'"spark.aurora_dbx.policy" = "{policy}"' in sandbox.path("/" + CONF).read_text()


def test_ca_bundle_download_is_https_only(sandbox, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(FAKE_CURL)
    (bin_dir / "curl").chmod(0o755)
    body = tmp_path / "downloaded.pem"
    body.write_text(PEM.replace("root2", "root3"))
    url = "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CURL_LOG": str(tmp_path / "curl-calls"),
           "FAKE_CURL_BODY": str(body)}
    out = sandbox.run(driver=False, AURORA_DBX_RDS_CA_URL=url, **env).stdout
    assert sandbox.path("/" + CA_TARGET).read_text() == body.read_text()
    (call,) = [line.split("\t") for line in (tmp_path / "curl-calls").read_text().splitlines()]
    assert call[-1] == url and "--fail" in call and call[call.index("--proto") + 1] == "=https"
    assert f"from {url}" in out

    bad = sandbox.run(driver=False, check=False, AURORA_DBX_RDS_CA_URL="http://example.com/b.pem", **env)
    assert bad.returncode != 0 and "must be an https:// URL" in bad.stderr


def test_base_role_for_dedicated_clusters_is_optional_and_reversible(sandbox):
    env_file = sandbox.path("/" + SPARK_ENV)
    env_file.parent.mkdir(parents=True)
    original = "#!/usr/bin/env bash\nexport PYSPARK_PYTHON=/databricks/python3/bin/python3\n"
    env_file.write_text(original)
    env_file.chmod(0o755)

    sandbox.run(driver=True)  # not configured: spark-env.sh untouched
    assert env_file.read_text() == original

    for _ in range(2):
        out = sandbox.run(driver=True, AURORA_DBX_BASE_ROLE_ARN=BASE_ROLE).stdout
    config = sandbox.path("/databricks/aurora_dbx/aws-config")
    assert config.read_text() == (
        f"[default]\nrole_arn = {BASE_ROLE}\ncredential_source = Ec2InstanceMetadata\n"
        "role_session_name = aurora-dbx-0923-164208-meows279\n"
    )
    text = env_file.read_text()
    assert text.startswith(original) and text.count("# >>> aurora-dbx >>>") == 1
    assert f"export AWS_CONFIG_FILE={config}\n" in text
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o755
    assert f"base role: {BASE_ROLE} from the instance profile" in out

    out = sandbox.run(driver=True).stdout  # switched off again: the block goes, the rest stays
    assert env_file.read_text() == original and "base role: removed from" in out

    bad = sandbox.run(driver=True, check=False, AURORA_DBX_BASE_ROLE_ARN="arn:aws:iam::123:user/x")
    assert bad.returncode != 0 and "not an IAM role ARN" in bad.stderr


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AURORA_DBX_WHEEL_SHA256": "0" * 64}, "expected 000"),
        ({"AURORA_DBX_WHEEL": "aurora-dbx"}, "pinned requirement"),
        ({"AURORA_DBX_WHEEL": "aurora-dbx[local]==0.1.0"}, "pinned requirement"),
        ({"AURORA_DBX_WHEEL": "aurora-dbx>=0.1"}, "pinned requirement"),
        ({"AURORA_DBX_WHEEL": "/Volumes/main/libs/pyspark-4.0.0-py3-none-any.whl"}, "not an aurora_dbx wheel"),
        ({"AURORA_DBX_WHEEL": "/Volumes/main/libs/aurora_dbx-9.9.9-py3-none-any.whl"}, "does not exist"),
        ({"AURORA_DBX_PIP": "/nonexistent/pip"}, "no pip at /nonexistent/pip"),
        ({"AURORA_DBX_RDS_CA_SOURCE": "/Volumes/main/missing.pem"}, "does not exist"),
        ({"AURORA_DBX_POLICY_PATH": '/Volumes/main/p/policy.yaml" spark.x = "y'}, "plain characters"),
        ({"AURORA_DBX_POLICY_PATH": "/tmp/policy.yaml"}, "/Volumes/... or /Workspace/..."),  # noqa: S108
        ({"AURORA_DBX_INIT_ROOT": "", "DB_CLUSTER_ID": None}, "not on a Databricks node"),
    ],
)
def test_bad_settings_fail_the_node_with_a_clear_reason(sandbox, env, message):
    proc = sandbox.run(driver=True, check=False, **env)
    assert proc.returncode != 0
    assert message in proc.stderr and "ERROR:" in proc.stderr
    if "AURORA_DBX_WHEEL" in env or "AURORA_DBX_WHEEL_SHA256" in env:
        assert sandbox.pip_calls() == []


def test_a_file_that_is_not_a_pem_bundle_is_refused(sandbox):
    sandbox.path(CA_SOURCE).write_text("<html>proxy login page</html>\n")
    proc = sandbox.run(driver=False, check=False)
    assert proc.returncode != 0 and "is not a PEM certificate bundle" in proc.stderr
    assert not sandbox.path("/" + CA_TARGET).exists()


def test_nothing_secret_is_written(sandbox):
    sandbox.run(driver=True, AURORA_DBX_BASE_ROLE_ARN=BASE_ROLE)
    for name, content in written_files(sandbox).items():
        for secret in SECRETS.values():
            assert secret.encode() not in content, name


# -- static ------------------------------------------------------------------------------


def test_script_is_strict_bash():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert "set -x" not in text  # would echo every expanded value into the cluster log
    assert os.access(SCRIPT, os.X_OK)
    # the exact path aurora_dbx verifies Aurora's certificate with
    from aurora_dbx.engines import DEFAULT_CA_BUNDLE

    assert f'CA_TARGET="{DEFAULT_CA_BUNDLE}"' in text


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
