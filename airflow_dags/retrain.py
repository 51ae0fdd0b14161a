"""Retrain on each logical date's data: partition -> train -> baselines -> evaluate -> promote.

Every task is a SparkSubmitOperator running one of the project's jobs (jobs/*.py) with the project venv's
spark-submit, against the master of the Airflow connection ``SPARKML_DIST_SPARK_CONN`` (default
``spark_local``, created by ``make airflow-setup``). Each task gets ``--config`` plus ``--set`` overrides
that put the date's outputs under a per-date directory, so a rerun for a date rewrites exactly that date:

  input       SPARKML_DIST_INPUT_URL    default {work_dir}/input/ds={{ ds }}    (one directory per date)
  outputs     SPARKML_DIST_OUTPUT_URL   default {work_dir}/daily/{{ ds }}       (partitioned/, runs/)

``{work_dir}`` is the config's ``paths.work_dir``; MLflow is the config's ``tracking.tracking_uri`` for every
task. Reruns and retries add no MLflow runs or model versions: train and baselines pass
``tracking.run_key={{ ds }}`` (training reuses the date's finished run, or resumes its failed one; a baseline
replaces the date's earlier run), evaluate/promote pass ``promote.logical_date={{ ds }}`` (one decision per
date; a training run is registered once).

Where the input comes from: upstream writes each date's Parquet to ``SPARKML_DIST_INPUT_URL`` before the
run (a sensor on that path would gate it in production). The demo (``make airflow-run DATE=...``) and the
tests write synthetic data there first with ``jobs/generate.py``; regenerating it changes its fingerprint,
and the next run then re-partitions and retrains that date.

Settings (environment of the scheduler/dag-processor and workers, read when the file is parsed):
  SPARKML_DIST_CONFIG        YAML config (default conf/local.yaml of this repository)
  SPARKML_DIST_VENV          project venv whose spark-submit and python run the jobs (default .venv)
  SPARKML_DIST_SCHEDULE      cron or preset (default @daily); catchup is off
  SPARKML_DIST_SPARK_CONN    Airflow connection with the Spark master (default spark_local)
  SPARKML_DIST_PY_FILES      zip/wheel of the library for --py-files on a cluster
                             (python -m sparkml_dist.cluster package); empty for local masters
  SPARKML_DIST_RETRIES       retries per task, with exponential back-off from 1 minute (default 2)
  SPARKML_DIST_TASK_TIMEOUT_MIN  execution timeout of each task in minutes (default 180)

Nothing heavy is imported here (no pyspark, torch, mlflow or sparkml_dist): the file is parsed often.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, chain

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SPARKML_DIST_VENV", str(REPO / ".venv")))
CONFIG = os.environ.get("SPARKML_DIST_CONFIG", str(REPO / "conf" / "local.yaml"))
INPUT_URL = os.environ.get("SPARKML_DIST_INPUT_URL", "{work_dir}/input/ds={{ ds }}")
OUTPUT_URL = os.environ.get("SPARKML_DIST_OUTPUT_URL", "{work_dir}/daily/{{ ds }}")
SCHEDULE = os.environ.get("SPARKML_DIST_SCHEDULE", "@daily")
CONN_ID = os.environ.get("SPARKML_DIST_SPARK_CONN", "spark_local")
PY_FILES = os.environ.get("SPARKML_DIST_PY_FILES") or None
RETRIES = int(os.environ.get("SPARKML_DIST_RETRIES", "2"))
TASK_TIMEOUT = timedelta(minutes=float(os.environ.get("SPARKML_DIST_TASK_TIMEOUT_MIN", "180")))

PYTHON = str(VENV / "bin" / "python")
# spark-submit is looked up on this PATH (the provider only accepts the names spark-submit/spark2-/spark3-submit).
JOB_ENV = {
    "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    "PYSPARK_PYTHON": PYTHON,
    "PYSPARK_DRIVER_PYTHON": PYTHON,
    "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
}
PARTITIONED = f"{OUTPUT_URL}/partitioned"
DATE_SETS = {
    "data.input_url": INPUT_URL,
    "partition.output_url": PARTITIONED,
    "train.manifest_url": PARTITIONED,
    "train.runs_url": f"{OUTPUT_URL}/runs",
}


def job(task_id: str, script: str, *sets: str) -> SparkSubmitOperator:
    """One jobs/<script>.py run through spark-submit with the date's overrides (all templated)."""
    args = ["--config", CONFIG]
    for item in [*(f"{k}={v}" for k, v in DATE_SETS.items()), *sets]:
        args += ["--set", item]
    return SparkSubmitOperator(
        task_id=task_id,
        application=str(REPO / "jobs" / f"{script}.py"),
        application_args=args,
        conn_id=CONN_ID,
        name=f"sparkml-dist-{task_id}-{{{{ ds }}}}",
        py_files=PY_FILES,
        conf={"spark.pyspark.python": PYTHON, "spark.pyspark.driver.python": PYTHON},
        env_vars=JOB_ENV,
        verbose=False,
    )


with DAG(
    dag_id="retrain",
    description="partition the date's input -> Horovod training -> baselines -> evaluate -> promote",
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # dates share the champion alias: decide one date after the other
    default_args={
        "retries": RETRIES,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=30),
        "execution_timeout": TASK_TIMEOUT,
    },
    tags=["sparkml-dist"],
) as dag:
    per_date = "tracking.run_key={{ ds }}"
    steps = [
        job("partition", "partition"),
        job("train", "train", per_date),
        job("baselines", "baseline", per_date),
        job("evaluate", "evaluate", "promote.logical_date={{ ds }}"),
        job("promote", "promote", "promote.logical_date={{ ds }}"),
    ]
    chain(*steps)
