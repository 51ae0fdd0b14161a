"""The retrain DAG under real Airflow 3 (its own venv, .venv-airflow), run with `airflow dags test`.

Airflow runs as subprocesses of .venv-airflow's python with AIRFLOW_HOME in a tmp dir; every task is a real
spark-submit of the project's jobs on local[2] through the provider's SparkSubmitOperator.

Cost on the 2-core CI machine: the DagBag check ~10 s; AIRFLOW_HOME init (db migrate) ~30 s; each DAG run
five spark-submits (~1.5-2.5 min alone; much slower when the machine is shared), two runs in all.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sparkml_dist.config import load_config
from sparkml_dist.manifest import MANIFEST_NAME
from sparkml_dist.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_VENV = REPO / ".venv-airflow"
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
DATE = "2024-01-01"
DAG_RUN_TIMEOUT_S = 1500
CLI_TIMEOUT_S = 300

TINY = """
paths:
  work_dir: {work}
spark:
  conf:
    spark.sql.shuffle.partitions: "4"
    spark.default.parallelism: "4"
    spark.ui.enabled: "false"
    spark.driver.bindAddress: 127.0.0.1
    spark.driver.host: 127.0.0.1
generate:
  rows: 3000
  features: 8
  partitions: 2
partition:
  num_shards: 2
  row_group_mb: 0.02
train:
  batch_size: 128
  epochs: 1
launch:
  start_timeout_s: 120
  collective_timeout_s: 120
  job_timeout_s: 600
baselines:
  kinds: [gd]
  max_iterations: 3
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """AIRFLOW_HOME in a tmp dir, initialised by the same script as `make airflow-setup`; a tiny config."""
    if not AIRFLOW.exists():
        pytest.fail(f"{AIRFLOW} is missing: run `make airflow-venv` (make test does it first)")
    root = tmp_path_factory.mktemp("airflow")
    work = root / "work"
    config = root / "tiny.yaml"
    config.write_text(TINY.format(work=work))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / "home"),
        "SPARK_MASTER": "local[2]",
        "SPARKML_DIST_CONFIG": str(config),
        "SPARKML_DIST_RETRIES": "0",  # a failure fails the test at once instead of backing off
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    _run([str(REPO / "scripts" / "setup_airflow.sh"), "home"], env, CLI_TIMEOUT_S)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout_s: float) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}"
    return proc.stdout


def _cfg(env: dict[str, str], *sets: str):
    out = f"{{work_dir}}/daily/{DATE}"
    return load_config(
        env["SPARKML_DIST_CONFIG"],
        [f"data.input_url={{work_dir}}/input/ds={DATE}", f"train.manifest_url={out}/partitioned", *sets],
    )


def _dags_test(env: dict[str, str]) -> list[dict]:
    """`airflow dags test retrain DATE`, then the task states of the run it made (through the CLI)."""
    _run([str(AIRFLOW), "dags", "test", "retrain", DATE], env, DAG_RUN_TIMEOUT_S)
    runs = _json(_run([str(AIRFLOW), "dags", "list-runs", "retrain", "-o", "json"], env, CLI_TIMEOUT_S))
    newest = max((r for r in runs if r["logical_date"].startswith(DATE)), key=lambda r: r["run_after"])
    assert newest["state"] == "success", newest
    cmd = [str(AIRFLOW), "tasks", "states-for-dag-run", "retrain", newest["run_id"], "-o", "json"]
    return list(_json(_run(cmd, env, CLI_TIMEOUT_S)))


def _json(stdout: str) -> list:
    """The JSON document of an `airflow ... -o json` command (Airflow may print warnings before it)."""
    return list(json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("["))))


def _mlflow_state(env: dict[str, str]) -> dict:
    from mlflow.tracking import MlflowClient

    cfg = _cfg(env)
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)  # live runs only
    versions = client.search_model_versions(f"name = '{cfg.promote.registered_model}'")
    alias = client.get_model_version_by_alias(cfg.promote.registered_model, cfg.promote.alias)
    by_kind: dict[str, list[str]] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("kind", "?"), []).append(r.info.run_id)
    return {"by_kind": by_kind, "versions": sorted(v.run_id for v in versions), "champion": alias.run_id}


def test_dag_folder_imports_without_errors_and_nothing_heavy(tmp_path: Path) -> None:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env.pop("SPARKML_DIST_RETRIES", None)
    probe = f"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(REPO / "airflow_dags")!r})
dag = bag.dags.get("retrain")
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"pyspark", "torch", "mlflow", "sparkml_dist", "horovod"}})
tasks = {{t.task_id: [sorted(t.upstream_task_ids), t.retries, bool(t.retry_exponential_backoff)] for t in dag.tasks}}
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dag_ids),
                  "heavy": heavy, "tasks": tasks, "catchup": dag.catchup, "schedule": str(dag.schedule)}}))
"""
    out = _run([str(AIRFLOW_VENV / "bin" / "python"), "-c", probe], env, CLI_TIMEOUT_S)
    info = json.loads(out.strip().splitlines()[-1])
    assert info["errors"] == {}
    assert info["dags"] == ["retrain"]
    assert info["heavy"] == [], "the DAG file must not import heavy modules at parse time"
    assert info["catchup"] is False and info["schedule"] == "@daily"
    assert info["tasks"] == {
        "partition": [[], 2, True],
        "train": [["partition"], 2, True],
        "baselines": [["train"], 2, True],
        "evaluate": [["baselines"], 2, True],
        "promote": [["evaluate"], 2, True],
    }


@pytest.fixture(scope="module")
def first_run(spark, airflow_env: dict[str, str]) -> dict:
    # The date's input, as upstream would write it: one directory per date.
    write_dataset(spark, _cfg(airflow_env, f"generate.output_url={{work_dir}}/input/ds={DATE}").generate)
    states = _dags_test(airflow_env)
    cfg = _cfg(airflow_env)
    manifest = Path(cfg.train.manifest_url.removeprefix("file://")) / MANIFEST_NAME
    return {"states": states, "mlflow": _mlflow_state(airflow_env), "manifest": manifest.read_text()}


@pytest.mark.slow
def test_dag_run_trains_evaluates_and_promotes_every_task_succeeding(first_run: dict, airflow_env: dict) -> None:
    states = {s["task_id"]: s["state"] for s in first_run["states"]}
    assert states == {t: "success" for t in ("partition", "train", "baselines", "evaluate", "promote")}
    mlflow = first_run["mlflow"]
    (train_run,) = mlflow["by_kind"]["allreduce"]
    assert len(mlflow["by_kind"]["gd"]) == 1
    assert len(mlflow["by_kind"]["promotion"]) == 1
    assert mlflow["versions"] == [train_run]
    assert mlflow["champion"] == train_run  # the first model becomes the champion


@pytest.mark.slow
def test_rerun_for_the_same_date_leaves_one_set_of_outputs_and_runs(first_run: dict, airflow_env: dict) -> None:
    states = {s["task_id"]: s["state"] for s in _dags_test(airflow_env)}
    assert set(states.values()) == {"success"}
    again = _mlflow_state(airflow_env)
    before = first_run["mlflow"]
    assert again["by_kind"]["allreduce"] == before["by_kind"]["allreduce"]  # reused, not retrained
    assert again["by_kind"]["promotion"] == before["by_kind"]["promotion"]
    assert len(again["by_kind"]["gd"]) == 1  # replaced: still one baseline run for the date
    assert again["versions"] == before["versions"]  # no new model version
    cfg = _cfg(airflow_env)
    daily = Path(cfg.paths.work_dir) / "daily"
    assert [p.name for p in daily.iterdir()] == [DATE]
    manifest = Path(cfg.train.manifest_url.removeprefix("file://")) / MANIFEST_NAME
    assert manifest.read_text() == first_run["manifest"]  # same input and config: partition was a no-op
    runs_dir = daily / DATE / "runs"
    assert [p.name for p in runs_dir.iterdir()] == before["by_kind"]["allreduce"]


def test_the_dags_per_date_overrides_load_and_a_bad_run_key_names_the_fix() -> None:
    from sparkml_dist.config import ConfigError

    cfg = load_config(
        REPO / "conf" / "local.yaml",
        [
            f"data.input_url={{work_dir}}/input/ds={DATE}",  # not YAML: taken as text, then {work_dir} resolved
            f"partition.output_url={{work_dir}}/daily/{DATE}/partitioned",
            f"tracking.run_key={DATE}",  # YAML reads a date: kept as the ISO string
            f"promote.logical_date={DATE}",
        ],
    )
    assert cfg.data.input_url == f"file://{cfg.paths.work_dir}/input/ds={DATE}"
    assert cfg.partition.output_url.endswith(f"/daily/{DATE}/partitioned")
    assert cfg.tracking.run_key == DATE == cfg.promote.logical_date
    with pytest.raises(ConfigError, match="tracking.run_key='a b'.*e.g. tracking.run_key=2024-01-31"):
        load_config(None, ["tracking.run_key=a b"])
