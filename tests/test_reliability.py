"""A lost rank, a stalled rank and the rendezvous's door: real Spark, real Horovod ranks, real signals.

The kill/stop-and-retry runs need their own SparkContext (a JVM holds one, and the session's local[2]
gives one attempt): they run ``python -m jobs.train`` as a subprocess with a ``local[2,F]`` master, whose
F is the stage's attempt budget (launch.max_attempts=0). Costs on the 2-core CI machine: the two
subprocess runs about 90 s each (JVM start + 2 attempts), the in-process tests 10-30 s each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from pyspark import cloudpickle

from sparkml_dist import checkpoint
from sparkml_dist.config import LaunchConfig, load_config
from sparkml_dist.fit import run_training
from sparkml_dist.heartbeat import HeartbeatServer
from sparkml_dist.launch import RankFailedError, run_on_ranks
from sparkml_dist.partition import partition
from sparkml_dist.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN_SETS = (
    "train.batch_size=64",
    "train.max_steps_per_epoch=10",
    "train.epochs=3",
    "train.optimizer=adam",
    "tracking.log_model=false",
    "launch.collective_timeout_s=60",
    "launch.start_timeout_s=90",
)
FAULT_STEP = 15  # epoch 1 (0-based), step 5: the retry resumes from the checkpoint after epoch 1


def _sets(work, *extra: str) -> list[str]:
    return [
        f"paths.work_dir={work}",
        "generate.rows=4000",
        "generate.features=4",
        "generate.partitions=2",
        "partition.num_shards=2",
        "partition.row_group_mb=0.02",
        *TRAIN_SETS,
        *extra,
    ]


@pytest.fixture(scope="module")
def work(spark, tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability")
    cfg = load_config(REPO / "conf" / "local.yaml", _sets(work))
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return work


@pytest.fixture(scope="module")
def reference(spark, work):
    """An uninterrupted run's final parameters."""
    cfg = load_config(REPO / "conf" / "local.yaml", _sets(work))
    result = run_training(spark, cfg)
    state = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")
    return state["model"]


def _train_subprocess(work, master: str, *extra: str, timeout: float = 480) -> tuple[dict, str]:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    argv = [sys.executable, "-m", "jobs.train", "--config", "conf/local.yaml"]
    sets = _sets(work, f"spark.master={master}", *extra)
    sets.append(
        'spark.conf={"spark.ui.enabled": "false", "spark.driver.memory": "1g", "spark.driver.host": "127.0.0.1", '
        '"spark.driver.bindAddress": "127.0.0.1", "spark.sql.shuffle.partitions": "4"}'
    )
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _assert_one_continuous_run(work, run_id: str, restarts: int, resumed_from: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == str(restarts) and "restart_1_reason" in run.data.tags
    # one history: every epoch once, no step logged twice
    for key in ("train/loss", "val/log_loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3]
    resumed = client.get_metric_history(run_id, "system/run/resumed_from_epoch")
    assert [(m.step, m.value) for m in resumed] == [(resumed_from, float(resumed_from))]
    assert [m.value for m in client.get_metric_history(run_id, "system/run/restart_attempt")] == [1.0]


def _assert_same_parameters(work, run_id: str, reference: dict) -> None:
    state = checkpoint.load_latest(f"file://{work}/runs/{run_id}/checkpoints")
    for name, value in reference.items():
        torch.testing.assert_close(state["model"][name], value, atol=1e-6, rtol=1e-6)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _reap(pids: list[int]) -> None:
    """Never leave a stopped process behind: continue and kill whatever is left."""
    for pid in pids:
        if not _gone(pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_a_killed_rank_is_retried_from_the_checkpoint_and_ends_like_an_uninterrupted_run(work, reference, engine):
    out, err = _train_subprocess(
        work, "local[2,3]", "launch.fault_kind=kill", "launch.fault_rank=1", f"launch.fault_step={FAULT_STEP}",
        f"launch.collectives={engine}",
    )  # fmt: skip
    assert "rank 1 (pid" in err and f"kill at step {FAULT_STEP}" in err
    assert re.search(r"rank 1 on 127\.0\.0\.1 \(pid \d+.*\): its process was lost", err), err[-3000:]
    assert out["resumed_from_epoch"] == 1 and out["epochs"] == 3
    _assert_one_continuous_run(work, out["run_id"], restarts=1, resumed_from=1)
    _assert_same_parameters(work, out["run_id"], reference)


@pytest.mark.slow
def test_with_step_checkpoints_a_kill_mid_epoch_costs_steps_not_an_epoch(work, reference):
    """train.checkpoint_every_steps=2: the kill at epoch 1, step 5 resumes at step 4 of epoch 1 (the seeded
    stream skipped there, every rank's RNG and partial loss restored) and ends with the same parameters."""
    out, err = _train_subprocess(
        work, "local[2,3]", "train.checkpoint_every_steps=2", "launch.fault_kind=kill", "launch.fault_rank=1",
        f"launch.fault_step={FAULT_STEP}",
    )  # fmt: skip
    assert f"kill at step {FAULT_STEP}" in err
    _assert_one_continuous_run(work, out["run_id"], restarts=1, resumed_from=1)
    _assert_resumed_at_step(work, out["run_id"], FAULT_STEP - 1)
    _assert_same_parameters(work, out["run_id"], reference)


def _assert_resumed_at_step(work, run_id: str, global_step: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    resumed = client.get_metric_history(run_id, "system/run/resumed_from_step")
    assert [m.value for m in resumed] == [float(global_step)]


def test_checkpoints_order_by_epoch_then_step_and_keep_the_newest(tmp_path):
    url = f"file://{tmp_path}"
    for epoch, step in ((1, 0), (1, 4), (1, 8), (2, 0)):
        checkpoint.save_checkpoint(url, epoch, {"at": (epoch, step)}, step)
    assert checkpoint.load_latest(url)["at"] == (2, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-000001-step-00000004.pt", "epoch-000001-step-00000008.pt", "epoch-000002.pt",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_stopped_rank_fails_the_attempt_within_the_stall_timeout_and_the_retry_completes(work, reference):
    pids: list[int] = []
    try:
        out, err = _train_subprocess(
            work,
            "local[2,2]",
            "launch.fault_kind=stop",
            f"launch.fault_step={FAULT_STEP}",
            "launch.stall_timeout_s=8",
        )
        pids = [int(p) for p in re.findall(r"fault injection: rank 1 \(pid (\d+)\)", err)]
        found = re.search(r"rank 1 on 127\.0\.0\.1 \(pid (\d+)\) sent no heartbeat for (\d+) s", err)
        assert found, err[-3000:]
        assert int(found.group(1)) in pids
        assert 8 <= int(found.group(2)) <= 8 + 15  # within the timeout plus a few heartbeats and polls
        assert "launch.stall_timeout_s=8" in err
        _assert_one_continuous_run(work, out["run_id"], restarts=1, resumed_from=1)
        _assert_same_parameters(work, out["run_id"], reference)
        assert all(_gone(p) for p in pids)  # Spark killed the stopped worker when it cancelled the attempt
    finally:
        _reap(pids)


def test_a_rank_hung_alive_outside_the_collectives_fails_the_attempt_naming_it(work, reference):
    """Alive, heart beating, never reaching the next collective (issue 19 section 5): within the collective
    timeout the attempt fails naming that rank, not the peer that waits for it; the retry completes."""
    pids: list[int] = []
    try:
        t0 = time.monotonic()
        out, err = _train_subprocess(
            work,
            "local[2,2]",
            "launch.fault_kind=hang",
            f"launch.fault_step={FAULT_STEP}",
            "launch.collective_timeout_s=10",
            "launch.stall_timeout_s=60",  # its heart beats: the stall detector must not be what fires
        )
        pids = [int(p) for p in re.findall(r"fault injection: rank 1 \(pid (\d+)\)", err)]
        found = re.search(
            r"rank 1 on 127\.0\.0\.1 \(pid (\d+)\) is alive but has been outside every collective for (\d+) s "
            rf"\(at step {FAULT_STEP}\), while its peers wait for it \(rank 0 in '[^']+' for \d+ s\)",
            err,
        )
        assert found, err[-3000:]
        assert int(found.group(1)) in pids and 10 <= int(found.group(2)) <= 10 + 15
        assert "launch.collective_timeout_s=10" in err and "sent no heartbeat" not in err
        _assert_one_continuous_run(work, out["run_id"], restarts=1, resumed_from=1)
        _assert_same_parameters(work, out["run_id"], reference)
        assert all(_gone(p) for p in pids)
        assert time.monotonic() - t0 < 240
    finally:
        _reap(pids)


FEATURE_PARALLEL = ("partition.feature_groups=2", "train.mode=feature_parallel")


def _fp_sets(work) -> tuple[str, ...]:
    return (*FEATURE_PARALLEL, f"partition.output_url={work}/fp", f"train.manifest_url={work}/fp")


def _fp_model(work, run_id: str) -> dict:
    from sparkml_dist.feature_parallel import assemble_state_dict
    from sparkml_dist.manifest import read_manifest

    commit = checkpoint.load_latest(f"file://{work}/runs/{run_id}/checkpoints")
    return assemble_state_dict(read_manifest(f"file://{work}/fp"), commit["block_urls"])


@pytest.mark.slow
def test_a_killed_feature_parallel_rank_is_retried_and_ends_like_an_uninterrupted_run(spark, work):
    """The drills reach feature-parallel ranks too: they run the same loop (heartbeats, fault injection)."""
    cfg = load_config(REPO / "conf" / "local.yaml", _sets(work, *_fp_sets(work)))
    partition(spark, cfg)
    straight = run_training(spark, cfg)
    out, err = _train_subprocess(
        work, "local[2,3]", *_fp_sets(work), "launch.fault_kind=kill", "launch.fault_rank=1",
        f"launch.fault_step={FAULT_STEP}",
    )  # fmt: skip
    assert f"kill at step {FAULT_STEP}" in err
    assert re.search(r"rank 1 on 127\.0\.0\.1 \(pid \d+.*\): its process was lost", err), err[-3000:]
    assert out["resumed_from_epoch"] == 1 and out["epochs"] == 3
    _assert_one_continuous_run(work, out["run_id"], restarts=1, resumed_from=1)
    a, b = _fp_model(work, straight.run_id), _fp_model(work, out["run_id"])
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_feature_parallel_step_checkpoints_resume_mid_epoch_like_an_uninterrupted_run(spark, work):
    cfg = load_config(REPO / "conf" / "local.yaml", _sets(work, *_fp_sets(work)))
    partition(spark, cfg)
    straight = run_training(spark, cfg)
    out, err = _train_subprocess(
        work, "local[2,3]", *_fp_sets(work), "train.checkpoint_every_steps=2", "launch.fault_kind=kill",
        "launch.fault_rank=1", f"launch.fault_step={FAULT_STEP}",
    )  # fmt: skip
    assert f"kill at step {FAULT_STEP}" in err
    _assert_one_continuous_run(work, out["run_id"], restarts=1, resumed_from=1)
    _assert_resumed_at_step(work, out["run_id"], FAULT_STEP - 1)
    a, b = _fp_model(work, straight.run_id), _fp_model(work, out["run_id"])
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0)


def _stops_rank_1(ctx):
    import horovod.torch as hvd

    from sparkml_dist import heartbeat

    for step in range(1000):
        heartbeat.progress(step)
        if ctx.rank == 1 and step == 3:
            print(f"stopping pid {os.getpid()}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        hvd.allreduce(torch.ones(1), name=f"s{step}")
        time.sleep(0.05)


def test_without_retry_budget_a_stall_fails_the_run_within_the_timeout_naming_rank_and_host(spark):
    cfg = LaunchConfig(start_timeout_s=60, collective_timeout_s=120, stall_timeout_s=6)
    pids: list[int] = []
    started = time.monotonic()
    try:
        with pytest.raises(RankFailedError) as err:
            run_on_ranks(spark, _stops_rank_1, 2, cfg)
        elapsed = time.monotonic() - started
        text = str(err.value)
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
        assert re.search(r"rank 1 on 127\.0\.0\.1 \(pid \d+\) sent no heartbeat", text), text
        assert "gave up after 1 attempt(s)" in text and "launch.stall_timeout_s=6" in text
        assert elapsed < 6 + 45, elapsed  # the timeout, not Gloo's 120 s
    finally:
        _reap(pids)
    assert "HOROVOD_GLOO_RENDEZVOUS_ADDR" in run_on_ranks(spark, _echo_env, 2, LaunchConfig(start_timeout_s=60))


def _echo_env(ctx):
    return {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_GLOO_RENDEZVOUS")}


def _status(url: str, method: str = "GET", data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _probe_rendezvous(ctx):
    import horovod.torch as hvd

    addr = os.environ["HOROVOD_GLOO_RENDEZVOUS_ADDR"]
    port = os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"]
    host_port, secret = addr.split("/", 1)
    codes = {
        "no_secret_get": _status(f"http://{host_port}/global/0"),
        "no_secret_put": _status(f"http://{host_port}/global/x", "PUT", b"v"),
        "no_secret_delete": _status(f"http://{host_port}/global/0", "DELETE"),
        "wrong_secret": _status(f"http://{host_port}/{'0' * len(secret)}:{port}/global/0"),
        "with_secret_missing_key": _status(f"http://{host_port}/{secret}:{port}/probe/none"),
    }
    hvd.allreduce(torch.ones(1), name="after_probe")  # Gloo itself got in with the secret
    return host_port, codes


def _probe_then_fail(ctx):
    host_port, _ = _probe_rendezvous(ctx)
    if ctx.rank == 0:
        raise ValueError(f"failing on purpose; rendezvous was {host_port}")
    return None


def _refused(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError:
        return True
    return False


def test_rendezvous_refuses_clients_without_the_run_secret_and_is_gone_after_the_run(spark):
    cfg = LaunchConfig(start_timeout_s=60, collective_timeout_s=30)
    host_port, codes = run_on_ranks(spark, _probe_rendezvous, 2, cfg)
    assert host_port.startswith("127.0.0.1:")
    assert codes == {
        "no_secret_get": 403,
        "no_secret_put": 403,
        "no_secret_delete": 403,
        "wrong_secret": 403,
        "with_secret_missing_key": 404,  # reachable with the secret: the key just is not there
    }
    assert _refused(host_port)
    with pytest.raises(RankFailedError, match="failing on purpose") as err:
        run_on_ranks(spark, _probe_then_fail, 2, cfg)
    failed_at = re.search(r"rendezvous was (127\.0\.0\.1:\d+)", str(err.value)).group(1)
    assert _refused(failed_at)


def test_heartbeat_server_binds_loopback_needs_the_secret_and_stops_on_exit():
    with HeartbeatServer("127.0.0.1") as hb:
        host, port = hb.address
        assert host == "127.0.0.1"
        assert _status(f"http://{host}:{port}/0/1", "PUT", b"{}") == 403
        assert _status(f"http://{host}:{port}/nope/0/1", "PUT", b"{}") == 403
        assert _status(f"{hb.url}/0/1", "PUT", json.dumps({"host": "h", "pid": 1, "step": 4}).encode()) == 200
        assert hb.beats(0)[1].step == 4 and not hb.stalled(0, 60)
        time.sleep(1.2)
        assert [b.rank for b in hb.stalled(0, 1.0)] == [1]
        assert _status(hb.url) == 200 and _status(f"http://{host}:{port}/") == 403
    assert _refused(f"{host}:{port}")


def test_a_heartbeat_server_the_rank_cannot_reach_is_a_warning_naming_the_address(caplog):
    """Not a silently disabled stall detector (issue 19 section 4): the rank warns at start, without the secret."""
    from sparkml_dist import heartbeat

    with HeartbeatServer("127.0.0.1") as hb:
        host, port = hb.address
        url = hb.url
    assert _refused(f"{host}:{port}")  # the server is gone: what an executor that cannot reach it sees
    with caplog.at_level("WARNING", logger="sparkml_dist.heartbeat"):
        with heartbeat.beating(url, attempt=0, rank=1, host="h1", interval_s=0.5):
            pass
    warned = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert f"http://{host}:{port}" in warned[0] and "rank 1 on h1" in warned[0]
    assert url.rsplit("/", 1)[-1] not in warned[0]  # the per-run secret is never logged
    with HeartbeatServer("127.0.0.1") as hb:  # a reachable one: no warning, and the first beat is already in
        caplog.clear()
        with heartbeat.beating(hb.url, attempt=0, rank=0, host="h0", interval_s=5.0):
            assert hb.heard_from(0)
        assert not [r for r in caplog.records if "cannot reach" in r.getMessage()]
