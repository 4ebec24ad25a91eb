"""``bundle/``: the Databricks Asset Bundle of the scheduled job, checked without the CLI.

The ``databricks`` CLI (``bundle validate``) is not available here and nothing reaches a
workspace, so these tests hold the bundle to what would make a deploy fail or a job run
wrong: the keys the bundle schema requires, a service principal as ``run_as``, paths that
exist and are synced, every ``${var.x}`` declared, a valid-looking quartz schedule, the init
script and the pinned wheel wired in, widgets that match the notebook, no secrets. The
serverless variant's entry point is run for real against the local stack.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import aurora_dbx
from tests.conftest import PIPELINE_SP

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
MAIN = BUNDLE / "databricks.yml"
INIT_SCRIPT = ROOT / "init_scripts" / "aurora-dbx-init.sh"
NOTEBOOK_HEADER = "# Databricks notebook source"
TOP_LEVEL = {"bundle", "include", "sync", "variables", "run_as", "targets", "resources", "workspace",
             "permissions", "artifacts", "presets", "experimental"}
VAR = re.compile(r"\$\{var\.([A-Za-z][\w-]*)\}")
REFERENCE = re.compile(r"\$\{([^}]*)\}")


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    main = load(MAIN)
    files = [MAIN]
    for pattern in main.get("include", []):
        files += sorted(BUNDLE.glob(pattern))
    return {"main": main, "files": files}


def jobs(config) -> dict[str, tuple[dict[str, Any], Path]]:
    """Every job of the bundle with the file that defines it (paths are relative to that file)."""
    out: dict[str, tuple[dict[str, Any], Path]] = {}
    for path in config["files"]:
        for key, job in (load(path).get("resources", {}).get("jobs") or {}).items():
            assert key not in out, f"job {key} defined twice"
            out[key] = (job, path)
    return out


def widgets(notebook: Path) -> set[str]:
    return set(re.findall(r"dbutils\.widgets\.(?:text|dropdown)\(\s*\"([^\"]+)\"", notebook.read_text()))


# -- shape -------------------------------------------------------------------------------


def test_bundle_essentials(config):
    main = config["main"]
    assert set(main) <= TOP_LEVEL, set(main) - TOP_LEVEL
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", main["bundle"]["name"])
    targets = main["targets"]
    assert {"dev", "prod"} <= set(targets)
    assert [t for t, v in targets.items() if (v or {}).get("default")] == ["dev"]
    assert targets["prod"]["mode"] == "production" and targets["dev"]["mode"] == "development"
    assert len(config["files"]) == 3  # databricks.yml and the two job files
    for path in config["files"][1:]:
        assert set(load(path)) == {"resources"}, path


def test_every_job_runs_as_the_pipeline_service_principal(config):
    main = config["main"]
    assert main["run_as"] == {"service_principal_name": "${var.pipeline_sp}"}
    for name, target in main["targets"].items():
        assert "run_as" not in (target or {}), f"target {name} must not run as anyone else"
    assert "default" not in main["variables"]["pipeline_sp"], "the service principal must be given at deploy"
    for key, (job, _) in jobs(config).items():
        assert "run_as" not in job, key
        for cluster in job.get("job_clusters", []):
            spec = cluster["new_cluster"]
            assert spec["data_security_mode"] == "SINGLE_USER" and spec["single_user_name"] == "${var.pipeline_sp}"


def test_every_variable_is_declared_and_used(config):
    declared = config["main"]["variables"]
    used: set[str] = set()
    for path in config["files"]:
        text = path.read_text()
        used |= set(VAR.findall(text))
        for ref in REFERENCE.findall(text):
            assert re.fullmatch(r"(var|bundle|workspace|resources)\.[\w.-]+", ref), f"{path.name}: ${{{ref}}}"
    assert used <= set(declared), f"undeclared: {used - set(declared)}"
    assert set(declared) <= used, f"unused: {set(declared) - used}"
    for name, spec in declared.items():
        assert spec.get("description"), f"variable {name} needs a description"


# -- the jobs -----------------------------------------------------------------------------


def test_task_paths_exist_and_are_synced(config):
    synced = [(BUNDLE / p).resolve() for p in config["main"]["sync"]["paths"]]
    seen = set()
    for key, (job, path) in jobs(config).items():
        for task in job["tasks"]:
            if "notebook_task" in task:
                target = (path.parent / task["notebook_task"]["notebook_path"]).resolve()
                assert target.read_text().startswith(NOTEBOOK_HEADER + "\n"), f"{key}: not a notebook"
            else:
                target = (path.parent / task["spark_python_task"]["python_file"]).resolve()
                # a file with the notebook header would be deployed as a notebook, not a file
                assert not target.read_text().startswith(NOTEBOOK_HEADER), f"{key}: a notebook, not a file"
            assert target.is_file(), f"{key}: {target} does not exist"
            assert any(target.is_relative_to(s) for s in synced), f"{key}: {target} is not under sync.paths"
            seen.add(target.relative_to(ROOT).as_posix())
    assert seen == {"notebooks/03_write_features.py", "bundle/src/write_features.py"}


def test_notebook_parameters_are_the_notebooks_widgets(config):
    job, path = jobs(config)["write_features"]
    (task,) = job["tasks"]
    notebook = (path.parent / task["notebook_task"]["notebook_path"]).resolve()
    params = task["notebook_task"]["base_parameters"]
    assert set(params) == widgets(notebook)
    assert params["policy"] == "${var.policy_path}" and params["check_idempotent"] == "false"
    assert all(isinstance(v, str) for v in params.values())

    # the serverless script takes the same settings as options
    serverless, _ = jobs(config)["write_features_serverless"]
    args = serverless["tasks"][0]["spark_python_task"]["parameters"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options == {"--policy": "${var.policy_path}", "--source-table": "${var.source_table}",
                       "--value-column": "${var.value_column}", "--target-table": "${var.target_table}",
                       "--key": "${var.key}", "--cluster": "${var.aurora_cluster}"}


def quartz_ok(expr: str) -> bool:
    """Quartz cron: seconds minutes hours day-of-month month day-of-week [year], one of the days '?'."""
    fields = expr.split()
    if len(fields) not in (6, 7):
        return False
    field = r"[0-9A-Za-z*/,#LW?-]+"
    if not all(re.fullmatch(field, f) for f in fields):
        return False
    sec, minute, hour, dom, _, dow = fields[:6]
    numbers = [int(n) for f, hi in ((sec, 59), (minute, 59), (hour, 23)) for n in re.findall(r"\d+", f) if int(n) > hi]
    return not numbers and (dom == "?") != (dow == "?")


def test_quartz_checker():
    assert quartz_ok("0 30 2 * * ?") and quartz_ok("0 0/15 * ? * MON-FRI") and quartz_ok("0 0 6 1 * ? 2030")
    assert not quartz_ok("30 2 * * *") and not quartz_ok("0 30 2 * * *") and not quartz_ok("0 61 2 * * ?")


def test_schedules(config):
    variables = config["main"]["variables"]
    assert quartz_ok(variables["schedule"]["default"])
    statuses = {}
    for key, (job, _) in jobs(config).items():
        schedule = job["schedule"]
        assert schedule["quartz_cron_expression"] == "${var.schedule}" and schedule["timezone_id"]
        status = VAR.fullmatch(schedule["pause_status"]).group(1)
        statuses[key] = variables[status]["default"]
        assert job["max_concurrent_runs"] == 1
    # exactly one variant is scheduled by default: both write the same table
    assert statuses == {"write_features": "UNPAUSED", "write_features_serverless": "PAUSED"}


def test_job_cluster_has_the_init_script_and_the_pinned_wheel(config):
    variables = config["main"]["variables"]
    job, _ = jobs(config)["write_features"]
    (cluster,) = job["job_clusters"]
    spec = cluster["new_cluster"]
    assert spec["init_scripts"] == [{"volumes": {"destination": "${var.init_script_path}"}}]
    assert variables["init_script_path"]["default"].endswith("/" + INIT_SCRIPT.name)
    assert variables["init_script_path"]["default"].startswith("/Volumes/")
    # the environment variables the cluster passes are ones the init script reads
    script = INIT_SCRIPT.read_text()
    for name in spec["spark_env_vars"]:
        assert f"${{{name}" in script, name
    assert spec["spark_env_vars"]["AURORA_DBX_WHEEL"] == ""  # the task library installs the wheel
    (task,) = job["tasks"]
    assert task["job_cluster_key"] == cluster["job_cluster_key"]
    assert task["libraries"] == [{"whl": "${var.wheel_path}"}]
    major, minor = (int(x) for x in variables["spark_version"]["default"].split(".")[:2])
    assert (major, minor) >= (15, 4), "the Python data source API needs Databricks Runtime 15.4 LTS+"


def test_wheel_is_pinned_to_this_version(config):
    wheel = config["main"]["variables"]["wheel_path"]["default"]
    assert wheel.startswith("/Volumes/")
    assert wheel.rsplit("/", 1)[1] == f"aurora_dbx-{aurora_dbx.__version__}-py3-none-any.whl"
    assert f'DEFAULT_WHEEL="{wheel}"' in INIT_SCRIPT.read_text()


def test_serverless_variant_uses_a_job_environment(config):
    job, _ = jobs(config)["write_features_serverless"]
    assert "job_clusters" not in job
    envs = {e["environment_key"]: e["spec"] for e in job["environments"]}
    for task in job["tasks"]:
        assert "new_cluster" not in task and "job_cluster_key" not in task and "libraries" not in task
        spec = envs[task["environment_key"]]
        assert spec["dependencies"] == ["${var.wheel_path}"]
        assert spec["environment_version"] == "${var.serverless_environment_version}"
        assert "spark_python_task" in task  # job environments install dependencies for Python-file tasks


SECRET_PATTERNS = [
    re.compile(r"dapi[0-9a-f]{16,}"),  # Databricks personal access token
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?i)(password|passwd|secret|token|private_key)\s*:\s*\S"),
    re.compile(r"\{\{\s*secrets/"),  # even a secret-scope reference: nothing here needs one
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def test_no_secret_looking_values(config):
    for path in [*config["files"], BUNDLE / "src" / "write_features.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in SECRET_PATTERNS:
                assert not pattern.search(line), f"{path.name}:{number}: {line.strip()}"


# -- the serverless entry point, run ----------------------------------------------------


def test_serverless_entry_point_upserts_idempotently(world, env, spark, capsys):
    import importlib.util

    pg = world.stack.postgres
    pg.execute_admin("CREATE TABLE IF NOT EXISTS features.customer_bundle (id bigint PRIMARY KEY, ltv numeric(12,2))")
    pg.execute_admin("INSERT INTO features.customer_bundle VALUES (2001, 0), (2002, 250.5), (2003, NULL) "
                     "ON CONFLICT (id) DO NOTHING")
    pg.execute_admin("GRANT SELECT ON features.customer_bundle TO analyst_ro")
    pg.execute_admin("DELETE FROM features.scores WHERE id BETWEEN 2001 AND 2003")
    spec = importlib.util.spec_from_file_location("bundle_write_features", BUNDLE / "src" / "write_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    env(PIPELINE_SP)
    result = module.main(["--policy", str(world.policy_path), "--source-table", "features.customer_bundle",
                          "--cluster", "analytics", "--check-idempotent"], spark=spark)
    assert result["rows_written"] == 3
    out = capsys.readouterr().out
    assert f"running as {PIPELINE_SP} (service_principal)" in out and "same upsert again" in out
    rows = dict(pg.execute_admin("SELECT id, score FROM features.scores WHERE id BETWEEN 2001 AND 2003"))
    assert rows == {2001: 0.0, 2002: round(1 - math.exp(-0.2505), 6), 2003: 0.0}
