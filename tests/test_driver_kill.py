"""A killed driver (issue 19 §2): SIGKILL of a real `python -m jobs.train` process after its second epoch.

Nothing it started outlives it for long (its Spark JVM, the Python workers, the parameter-server shards),
and the same command again resumes the same MLflow run from its checkpoint (with a run key), or says the
exact flag that does (without one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from _mlflow_db import epochs_logged

from sparkml_dist.session import LOCAL_DIRS

REPO = Path(__file__).resolve().parents[1]
OUTLIVE_S = 60.0
"""How long a process the driver started may outlive it (the JVM sees its stdin close; the workers and the
shards see their parent gone); well inside launch.start_timeout_s of the tests' config."""


@pytest.fixture(scope="module")
def kill_data(spark, tmp_path_factory):
    from sparkml_dist.config import load_config
    from sparkml_dist.partition import partition
    from sparkml_dist.synthetic import write_dataset

    work = tmp_path_factory.mktemp("driver-kill")
    cfg = load_config(None, _sets(work))
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return work


def _sets(work: Path, *extra: str) -> list[str]:
    return [
        f"paths.work_dir={work}", "generate.rows=20000", "generate.features=16", "generate.partitions=2",
        "partition.num_shards=2", "partition.row_group_mb=0.05", "train.batch_size=128", "train.epochs=6",
        "train.max_steps_per_epoch=40", "tracking.log_model=false", "tracking.system_metrics_s=0",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}",
        *extra,
    ]  # fmt: skip


def _command(sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "jobs.train", "--config", "conf/local.yaml"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _kill_after_epoch(work: Path, sets: list[str], epoch: int) -> tuple[list[psutil.Process], str, int]:
    """Start the job, SIGKILL it once ``epoch`` epochs are logged; (every process it had started, with the
    command line it had, its stderr, its pid)."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    since_ms = int(time.time() * 1000)
    proc = subprocess.Popen(_command(sets), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    children: dict[int, psutil.Process] = {}
    while epochs_logged(work / "mlflow.db", since_ms=since_ms) < epoch:
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "the job did not reach the epoch in 300 s"
        _collect(proc.pid, children)  # the JVM, Python workers, shards: all it ever started
        time.sleep(0.2)
    _collect(proc.pid, children)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    return list(children.values()), err.decode(), proc.pid


def _collect(pid: int, into: dict[int, psutil.Process]) -> None:
    """Add ``pid``'s descendants to ``into``, refreshing each one's command line: spark-submit's child starts
    as ``bash spark-class`` and only then execs ``java``, so the first look may see the bash one."""
    for c in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(c.cmdline()[:4])
        except psutil.Error:
            continue
        into.setdefault(c.pid, c).info = {"cmd": cmd}


def _assert_nothing_outlives(started: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(started, timeout=OUTLIVE_S)
    described = [f"{p.pid} {p.info['cmd']}" for p in alive if p.is_running()]
    for p in alive:
        p.kill()
    assert not described, f"outlived the killed driver by {OUTLIVE_S:.0f} s: {described}"


def _run(sets: list[str]) -> tuple[dict, str]:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.run(_command(sets), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("extra", [(), ("comm.strategy=parameter_server", "comm.staleness=0")], ids=["ring", "ps"])
def test_a_killed_driver_leaves_nothing_behind_and_the_same_command_resumes_its_run(kill_data, extra):
    sets = _sets(kill_data, f"tracking.run_key=kill-{len(extra)}", *extra)
    started, _, pid = _kill_after_epoch(kill_data, sets, 2)
    commands = " | ".join(p.info["cmd"] for p in started)
    assert "java" in commands, commands  # its Spark JVM (executors included, on a local master)
    if extra:
        assert "sparkml_dist.ps.server" in commands, commands
    _assert_nothing_outlives(started)
    scratch = list((Path(tempfile.gettempdir()) / LOCAL_DIRS).glob(f"{pid}-*"))
    assert scratch, "the killed driver had no Spark scratch dir of its own"  # and could not remove it
    out, _ = _run(sets)
    assert out["resumed_from_epoch"] >= 2 and out["epochs"] == 6, out
    assert not [p for p in scratch if p.exists()], "the next driver did not remove the killed one's scratch dir"


def test_without_a_run_key_the_rerun_names_the_flag_that_resumes_the_killed_run(kill_data):
    sets = _sets(kill_data, "train.seed=11")  # a training of its own: no other run has this fingerprint
    started, _, _ = _kill_after_epoch(kill_data, sets, 2)
    _assert_nothing_outlives(started)
    out, err = _run(sets)
    hint = [line for line in err.splitlines() if "--set train.resume_run_id=" in line]
    assert hint, err[-3000:]
    killed = hint[0].split("--set train.resume_run_id=")[1].split()[0].strip("`'\".,")
    resumed, _ = _run([*sets, f"train.resume_run_id={killed}"])
    assert out["run_id"] != killed  # without a key the rerun was a new run, as the hint said
    assert resumed["run_id"] == killed and resumed["resumed_from_epoch"] >= 2
