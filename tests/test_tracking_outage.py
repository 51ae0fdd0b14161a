"""A tracking server that goes away mid-run (issue 19 section 3): a real `mlflow server` process, stopped
while a real `python -m jobs.train` runs against it, with MLflow's client retry budget made short.

Training goes on without waiting; the epochs logged meanwhile are kept in the run's spool and delivered when
the server is back, and the run ends FINISHED with every epoch once. A server that never comes back ends the
job with an error that says where the metrics and the model are.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _mlflow_db import epochs_logged

from sparkml_dist.config import TrackingConfig, load_config
from sparkml_dist.metric_names import mlflow_key
from sparkml_dist.ui import free_port, server_command, stop_server, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8


@pytest.fixture(scope="module")
def data(spark, tmp_path_factory):
    from sparkml_dist.partition import partition
    from sparkml_dist.synthetic import write_dataset

    work = tmp_path_factory.mktemp("outage")
    cfg = load_config(None, _sets(work, 0))
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return work


def _sets(work: Path, port: int, *extra: str) -> list[str]:
    return [
        f"paths.work_dir={work}", "generate.rows=8000", "generate.features=8", "generate.partitions=2",
        "partition.num_shards=2", "partition.row_group_mb=0.02", "train.batch_size=64", f"train.epochs={EPOCHS}",
        "train.max_steps_per_epoch=30", "tracking.log_model=false", "tracking.system_metrics_s=1",
        f"tracking.tracking_uri=http://127.0.0.1:{port}", f"tracking.artifact_url=file://{work}/mlartifacts",
        # rank 1 sleeps 0.1 s a step: ~3 s epochs, so the outage below spans several of them
        "launch.fault_kind=slow", "launch.fault_rank=1", "launch.fault_delay_s=0.1",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}",
        *extra,
    ]  # fmt: skip


def _store(work: Path) -> TrackingConfig:
    return TrackingConfig(tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_url=f"file://{work}/mlartifacts")


def _start_server(work: Path, port: int) -> subprocess.Popen:
    log = work / f"server-{port}.log"
    proc = subprocess.Popen(
        server_command(_store(work), port), stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_until_ready(f"http://127.0.0.1:{port}", proc, 120, log)
    return proc


def _spooled(work: Path) -> list[Path]:
    return sorted(p for p in (work / "runs").glob("*/tracking-spool/*.json") if not p.name.startswith("."))


def _start_job(work: Path, port: int, run_key: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.train", "--config", "conf/local.yaml"]
    for s in _sets(work, port, f"tracking.run_key={run_key}", *extra):
        cmd += ["--set", s]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1",  # the client's own retry budget, made short
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(what: str, ready, job: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert job.poll() is None, f"the job ended before {what}:\n{job.communicate()[1][-4000:]}"
        if time.monotonic() >= deadline:
            _dump_stacks(job.pid)  # where the driver's and the ranks' threads are, before the kill
            job.kill()
            err = job.communicate()[1]
            raise AssertionError(f"{what}: not within {timeout_s} s; the job's stderr:\n{err[-20000:]}")
        time.sleep(0.2)


def _dump_stacks(pid: int) -> None:
    """SIGUSR1 to the job's driver and to its Spark Python workers (the ranks; heartbeat.dump_stacks_on_signal):
    each writes its threads' stacks to the job's stderr. Not to the JVM or the workers' daemon (no handler)."""
    import psutil

    def forked_by_the_daemon(p: psutil.Process) -> bool:
        try:
            parent = p.parent()
            return parent is not None and all("pyspark.daemon" in " ".join(q.cmdline()) for q in (p, parent))
        except psutil.Error:
            return False

    try:
        workers = [p.pid for p in psutil.Process(pid).children(recursive=True) if forked_by_the_daemon(p)]
    except psutil.Error:
        workers = []
    for p in [pid, *workers]:
        try:
            os.kill(p, signal.SIGUSR1)
        except OSError:
            pass
    time.sleep(3)


def test_an_outage_mid_run_is_absorbed_and_every_epoch_is_delivered(data):
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = _start_server(data, port)
    job = _start_job(data, port, "outage-back")
    try:
        _wait("epoch 1 logged", lambda: epochs_logged(data / "mlflow.db", run_key="outage-back") >= 1, job)
        stop_server(server)
        outage_started = time.monotonic()
        _wait("two epochs kept in the spool", lambda: len(_spooled(data)) >= 2, job)
        assert time.monotonic() - outage_started < 60  # training went on: epochs ~3 s apart, not stalled
        server = _start_server(data, port)
        out, err = job.communicate(timeout=300)
    finally:
        job.kill()
        stop_server(server)
    assert job.returncode == 0, err[-4000:]
    assert "does not answer" in err and "is back: delivered" in err, err[-4000:]
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    client = MlflowClient(_store(data).tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("val_log_loss", "train_loss", "epoch_s"):  # every epoch once, the spooled ones included
        steps = sorted(m.step for m in client.get_metric_history(run_id, mlflow_key(key)))
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    assert _spooled(data) == []


def test_a_server_that_never_comes_back_ends_the_job_saying_where_metrics_and_model_are(data):
    port = free_port()
    server = _start_server(data, port)
    # half the epochs of the test above: after the first one every epoch is spooled either way
    job = _start_job(data, port, "outage-gone", "tracking.outage_wait_s=3", f"train.epochs={EPOCHS // 2}")
    try:
        _wait("epoch 1 logged", lambda: epochs_logged(data / "mlflow.db", run_key="outage-gone") >= 1, job)
        stop_server(server)
        _, err = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode != 0
    assert "did not answer for tracking.outage_wait_s=3 s" in err, err[-4000:]
    # the console still showed every epoch, the last ones read from the spool (issue 32, item 12)
    shown = re.findall(r"epoch (\d+)/\d+ .*read from the run's spool", err)
    assert str(EPOCHS // 2) in shown, err[-4000:]
    spool_url = err.split("Its metrics are kept in ")[1].split()[0]
    kept = list(Path(spool_url.removeprefix("file://")).glob("*.json"))
    assert kept, spool_url  # the epochs logged during the outage, on disk, for `python -m sparkml_dist.spool`
    assert "python -m sparkml_dist.spool" in err and "/checkpoints" in err
    checkpoints = err.split("The trained model's state is in ")[1].split()[0]
    assert list(Path(checkpoints.removeprefix("file://")).glob("epoch-*.pt"))


def test_warming_a_ranks_client_opens_a_local_store_but_never_asks_a_server(tmp_path):
    """Rank 0 opens its MLflow client before the group forms (training.train.prepare_rank): a local store is
    read once; a server, which may be away, is not asked (MLflow would wait out its retries)."""
    from sparkml_dist import tracking

    cfg = load_config(None, [f"paths.work_dir={tmp_path}"])
    run = tracking.start_run(cfg, {"data_fingerprint": "fp", "world_size": "2"}, "allreduce")
    tracking.warm(run)
    tracking.finish_run(run)
    away = tracking.RunHandle(f"http://127.0.0.1:{free_port()}", "0", "no-such-run", "file:///nowhere")
    started = time.monotonic()
    tracking.warm(away)  # no request: nothing listens there, and nothing raises
    assert time.monotonic() - started < 5
