"""A real Spark standalone cluster (a master and two single-core workers on 127.0.0.1) running the real
generate, partition and training jobs through spark-submit, with the library shipped as --py-files.

Cost: about 2-3 minutes on the 2-core CI machine: one cluster for the module, generate and partition once,
then two trainings (one killed and resumed) that start torch + Horovod in two executors each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _mlflow_db import epochs_logged

from sparkml_dist.cluster import (
    ClusterError,
    ClusterInfo,
    alive_workers,
    package_library,
    read_state,
    running_cluster,
    spark_home,
)
from sparkml_dist.config import load_config
from sparkml_dist.manifest import read_manifest
from sparkml_dist.tracking import get_run_record

REPO = Path(__file__).resolve().parents[1]
SUBMIT_TIMEOUT_S = 600


def _overrides(work: Path) -> list[str]:
    return [
        f"paths.work_dir={work}",
        "generate.rows=4000",
        "generate.features=8",
        "generate.partitions=2",
        "partition.num_shards=2",
        "partition.row_group_mb=0.02",
        "train.batch_size=128",
        "train.epochs=2",
        "launch.start_timeout_s=120",
        "launch.collective_timeout_s=120",
        "launch.job_timeout_s=400",
    ]


def _submit(master_url: str, py_files: Path, job: str, work: Path, *extra: str) -> dict:
    """spark-submit one job to the cluster in client mode; return the JSON summary (its last stdout line)."""
    cmd, env = _submit_command(master_url, py_files, job, work, *extra)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    assert proc.returncode == 0, f"spark-submit {job} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _submit_command(master_url: str, py_files: Path, job: str, work: Path, *extra: str) -> tuple[list[str], dict]:
    python = sys.executable
    cmd = [
        str(spark_home() / "bin" / "spark-submit"),
        "--master", master_url,
        "--deploy-mode", "client",
        "--py-files", str(py_files),
        "--driver-memory", "1g",
        "--executor-memory", "512m",
        "--executor-cores", "1",
        "--total-executor-cores", "2",
        "--conf", f"spark.pyspark.python={python}",
        "--conf", f"spark.pyspark.driver.python={python}",
        "--conf", "spark.driver.host=127.0.0.1",
        "--conf", "spark.driver.bindAddress=127.0.0.1",
        "--conf", "spark.dynamicAllocation.enabled=false",
        # Wait until both executors registered, so the barrier stage sees its 2 slots.
        "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
        "--conf", "spark.scheduler.maxRegisteredResourcesWaitingTime=120s",
        "--conf", "spark.ui.enabled=false",
        "--conf", f"spark.local.dir={work / 'spark-local'}",
        str(REPO / "jobs" / f"{job}.py"),
        "--config", str(REPO / "conf" / "local.yaml"),
    ]  # fmt: skip
    for item in [*_overrides(work), *extra]:
        cmd += ["--set", item]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python}
    return cmd, env


@dataclass(frozen=True)
class Cluster:
    info: ClusterInfo
    work: Path
    py_files: Path
    parts: dict


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the module, with the data generated and partitioned once by spark-submit: the two
    drills below train on it (each its own run), which saves a cluster start and two applications. Its
    teardown checks the stop: no state file and no daemon left."""
    root = tmp_path_factory.mktemp("standalone")
    work = root / "work"
    work.mkdir()
    py_files = package_library(root / "dist")
    run_dir = root / "cluster"
    with running_cluster(run_dir, workers=2, cores=1, memory="1g", timeout_s=180) as info:
        _submit(info.master_url, py_files, "generate", work)
        parts = _submit(info.master_url, py_files, "partition", work)
        yield Cluster(info, work, py_files, parts)
    assert not (run_dir / "cluster.json").exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in info.pids), "stop left a daemon running"


@pytest.mark.slow
def test_jobs_run_on_a_standalone_cluster(cluster: Cluster) -> None:
    info, work = cluster.info, cluster.work
    assert info.master_url.startswith("spark://127.0.0.1:")
    assert alive_workers(info.webui_url) == 2
    trained = _submit(info.master_url, cluster.py_files, "train", work)
    with urllib.request.urlopen(f"{info.webui_url}/json/", timeout=10) as resp:
        master = json.loads(resp.read())

    cfg = load_config(REPO / "conf" / "local.yaml", _overrides(work))
    manifest = read_manifest(cfg.train.manifest_url)
    assert manifest.num_shards == 2
    assert cluster.parts["manifest_url"] == f"{cfg.train.manifest_url}/_manifest.json"

    record = get_run_record(cfg.tracking, trained["run_id"], ("val_log_loss",))
    assert record.status == "FINISHED"
    assert record.tags["world_size"] == "2"
    assert len(record.histories["val_log_loss"]) == 2
    app_id = record.tags["spark_app_id"]
    assert app_id.startswith("app-"), f"training did not run on the standalone master: {app_id}"
    apps = {a["id"]: a for a in master["completedapps"] + master.get("activeapps", [])}
    assert apps[app_id]["cores"] == 2  # two single-core executors: one Horovod rank each


def test_stop_is_a_no_op_without_a_cluster_and_status_names_the_fix(tmp_path: Path) -> None:
    from sparkml_dist.cluster import stop_cluster

    assert stop_cluster(tmp_path) == []
    with pytest.raises(ClusterError, match="sparkml_dist.cluster start"):
        read_state(tmp_path)


@pytest.mark.slow
def test_a_killed_driver_on_a_standalone_cluster_leaves_no_executor_and_the_rerun_resumes(cluster: Cluster) -> None:
    """Issue 19 section 2 on a cluster, where the executors are not the driver's children: SIGKILL the
    spark-submit driver after epoch 2; its executors and their Python workers are gone within 60 s (the
    master ends the application when the driver's connection drops), and the same command resumes the run."""
    import signal
    import time

    import psutil

    info, work, py_files = cluster.info, cluster.work, cluster.py_files
    # rank 1 sleeps 0.1 s a step: ~3 s epochs, so the kill lands after epoch 2 and well before the last
    # (unslowed, the 30-step epochs took 0.1 s each and the run could end before the poll saw epoch 2)
    sets = ("train.epochs=5", "train.max_steps_per_epoch=30", "tracking.run_key=standalone-kill",
            "launch.job_timeout_s=0", "tracking.system_metrics_s=0",
            "launch.fault_kind=slow", "launch.fault_rank=1", "launch.fault_delay_s=0.1")  # fmt: skip
    cmd, env = _submit_command(info.master_url, py_files, "train", work, *sets)
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    executors: dict[int, psutil.Process] = {}  # and everything else the driver started
    earlier = {p.pid for p in psutil.process_iter(["cmdline"]) if _is_executor(p)}  # another test's, ending
    deadline = time.monotonic() + 400
    while epochs_logged(work / "mlflow.db", run_key="standalone-kill") < 2:
        assert proc.poll() is None, proc.communicate()[1].decode()[-4000:]
        assert time.monotonic() < deadline, "training did not reach epoch 2 in 400 s"
        for child in psutil.Process(proc.pid).children(recursive=True):  # the Python driver itself
            executors.setdefault(child.pid, child)
        for p in psutil.process_iter(["cmdline"]):
            if _is_executor(p) and p.pid not in earlier:
                executors.setdefault(p.pid, p)
                for child in p.children(recursive=True):  # the executors' Python workers
                    executors.setdefault(child.pid, child)
        time.sleep(0.5)
    assert len([p for p in executors.values() if "java" in _name(p)]) == 2, executors
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(list(executors.values()), timeout=60)
    left = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in alive if p.is_running()]
    assert not left, f"outlived the killed driver by 60 s: {left}"
    resumed = _submit(info.master_url, py_files, "train", work, *sets)
    assert resumed["resumed_from_epoch"] >= 2 and resumed["epochs"] == 5, resumed


def _is_executor(p) -> bool:
    return "CoarseGrainedExecutorBackend" in " ".join(p.info["cmdline"] or [])


def _name(p) -> str:
    """A process's name, or "" once it is gone (the poll above may have collected it just before it ended)."""
    import psutil

    try:
        return str(p.name())
    except psutil.NoSuchProcess:
        return ""


def test_spark_submit_settings_win_over_the_yaml(tmp_path: Path) -> None:
    """Under spark-submit, a key its --conf set is not replaced by conf/local.yaml's (the YAML's driver host
    127.0.0.1 once replaced a cluster submit's, so executors on other hosts could not reach the driver);
    keys it left unset still come from the YAML."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from sparkml_dist.config import load_config\n"
        "from sparkml_dist.session import build_spark_session\n"
        f"cfg = load_config({str(REPO / 'conf' / 'local.yaml')!r}, [])\n"
        "spark = build_spark_session(cfg.spark)\n"
        "conf = spark.sparkContext.getConf()\n"
        "print(json.dumps({k: conf.get(k) for k in ('spark.sql.shuffle.partitions', 'spark.driver.bindAddress', "
        "'spark.ui.showConsoleProgress')}))\n"
        "spark.stop()\n"
    )
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", "local[1]",
           "--conf", "spark.sql.shuffle.partitions=3", "--conf", "spark.driver.bindAddress=127.0.0.1",
           "--conf", "spark.ui.enabled=false", str(probe)]  # fmt: skip
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    conf = json.loads(proc.stdout.strip().splitlines()[-1])
    assert conf["spark.sql.shuffle.partitions"] == "3"  # spark-submit's, not the YAML's "8"
    assert conf["spark.ui.showConsoleProgress"] == "false"  # unset by spark-submit: the YAML's
