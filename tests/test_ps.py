"""The parameter-server topology on real Spark tasks, real server processes and a real MLflow store:
ssp with staleness 0 is synchronous SGD, async converges, a lost worker is absorbed, the shards split the
model, a lost run resumes from the shards' checkpoints, and a caller without the secret is refused."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from sparkml_dist.config import ConfigError, load_config


@pytest.fixture(scope="module")
def ps_data(spark, tmp_path_factory):
    from sparkml_dist.partition import partition
    from sparkml_dist.synthetic import write_dataset

    work = tmp_path_factory.mktemp("ps")
    cfg = _cfg(work)
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return work


def _cfg(work, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={work}",
            "generate.rows=20000",
            "generate.features=32",
            "generate.partitions=2",
            "partition.num_shards=2",
            "partition.row_group_mb=0.05",
            "train.batch_size=128",
            "train.epochs=2",
            "tracking.log_model=false",
            "tracking.system_metrics_s=0",
            *sets,
        ],
    )


SGD = ("train.optimizer=sgd", "train.lr=0.5", "train.epochs=2", "train.max_steps_per_epoch=10")
PS = ("comm.strategy=parameter_server",)


def _flat_ps(cfg, result) -> torch.Tensor:
    from sparkml_dist.ps.server import load_state

    state = load_state(f"{cfg.train.runs_url}/{result.run_id}/checkpoints/ps/history.pt")
    assert state is not None
    return torch.from_numpy(np.asarray(state["params"]))


def _flat_ring(cfg, result) -> torch.Tensor:
    from sparkml_dist import checkpoint

    state = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")
    assert state is not None
    return torch.cat([t.reshape(-1).float() for t in state["model"].values()])


def test_ssp_with_staleness_0_is_synchronous_sgd_on_two_server_shards(spark, ps_data):
    """Same initial weights, same batches, K gradients of a clock applied as one step of their mean: the
    parameters of allreduce on Horovod ranks, to 1e-6, with the model split over two server processes."""
    from sparkml_dist.compare import compare
    from sparkml_dist.fit import run_training
    from sparkml_dist.ps.server import cut_path, list_cuts, load_state

    ring_cfg = _cfg(ps_data, *SGD)
    ring = run_training(spark, ring_cfg)
    cfg = _cfg(ps_data, *SGD, *PS, "comm.pace=ssp", "comm.staleness=0", "comm.ps_shards=2")
    ps = run_training(spark, cfg)
    torch.testing.assert_close(_flat_ps(cfg, ps), _flat_ring(ring_cfg, ring), atol=1e-6, rtol=0)
    f = ps.final
    assert f["staleness_max"] == 0.0 and f["comm_rounds"] == 10.0  # a round: every worker's pull + push
    assert f["ps_push_bytes_per_step"] == f["ps_pull_bytes_per_step"] == 33 * 4  # whole slices, both shards
    assert ps.epochs == 2 and ring.final["val_log_loss"] == pytest.approx(f["val_log_loss"], abs=1e-6)
    ckpt = f"{cfg.train.runs_url}/{ps.run_id}/checkpoints"
    cut = max(set(list_cuts(ckpt, 0)) & set(list_cuts(ckpt, 1)))  # the newest consistent cut of both shards
    slices = [load_state(cut_path(ckpt, i, cut)) for i in (0, 1)]
    assert [(s["lo"], s["hi"]) for s in slices] == [(0, 16), (16, 33)]  # disjoint, and together the model
    assert slices[0]["clocks"] == slices[1]["clocks"] and slices[0]["applied"] == slices[1]["applied"]
    table = compare(cfg, [ring.run_id, ps.run_id], None, None, str(ps_data / "report"))
    rows = {r["kind"]: r for r in json.loads((ps_data / "report" / "table.json").read_text())["runs"]}
    assert set(rows) == {"allreduce", "ps_bsp"} and table  # the compare job shows both topologies
    assert rows["ps_bsp"]["bytes_per_round_measured"] == 2 * 33 * 4  # a push and a pull of the whole model


def test_async_converges_within_2_percent_of_bsp_and_logs_staleness(spark, ps_data):
    import mlflow

    from sparkml_dist.fit import run_training

    adam = ("train.optimizer=adam", "train.lr=0.02", "train.epochs=3")
    bsp = run_training(spark, _cfg(ps_data, *adam, *PS, "comm.staleness=0"))
    cfg = _cfg(ps_data, *adam, *PS, "comm.pace=async")
    asp = run_training(spark, cfg)
    assert asp.final["val_log_loss"] <= bsp.final["val_log_loss"] * 1.02, (asp.final, bsp.final)
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(asp.run_id)
    assert run.data.tags["kind"] == "ps_async"
    comm = {f"system/comm/{k}" for k in ("staleness_mean", "staleness_max", "ps_push_bytes_per_step")}
    assert {*comm, "system/time/bound_wait_s"} <= set(run.data.metrics)
    hist = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/ps/staleness.json")["staleness_histogram"]
    assert sum(hist.values()) == 3 * 2 * asp.final["comm_rounds"]  # every push of 3 epochs, 2 workers


def test_a_worker_killed_under_async_is_resubmitted_and_the_run_finishes(spark, ps_data):
    """SIGKILL of worker 1's Python process mid-epoch: only its Spark job fails; the driver submits it again,
    it continues at its clock, the other worker never waited; the run ends FINISHED with every epoch."""
    import mlflow

    from sparkml_dist.fit import run_training

    kill = ("launch.fault_kind=kill", "launch.fault_rank=1", "launch.fault_step=13")
    # 78 steps a worker per epoch: worker 1 reaches clock 13 long before worker 0 could make all 312 pushes
    cfg = _cfg(ps_data, "train.optimizer=sgd", "train.lr=0.5", *PS, "comm.pace=async", *kill)
    result = run_training(spark, cfg)
    assert result.epochs == 2 and np.isfinite(result.final["val_log_loss"])
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    workers = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/ps/workers.json")
    assert workers["attempts"]["1"] == 1 and workers["attempts"]["0"] == 0
    assert any("worker 1 attempt 0 on 127.0.0.1" in lost for lost in workers["lost"]), workers["lost"]


def test_shards_hold_disjoint_slices_that_together_are_the_model():
    from sparkml_dist.ps.driver import shard_ranges

    for size, shards, cap in [(33, 2, 10**6), (10, 3, 10**6), (1000, 0, 300), (5, 8, 10**6)]:
        ranges = shard_ranges(size, shards, cap)
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, disjoint
        assert all(hi > lo for lo, hi in ranges)
    assert len(shard_ranges(1000, 0, 300)) == 4  # comm.ps_shard_max_params decides when ps_shards=0


def _start_shard(tmp_path, secret="s3cret", **kw):
    from sparkml_dist.config import TrainConfig
    from sparkml_dist.ps.server import ShardSpec

    spec = ShardSpec(0, 0, 4, np.zeros(4, np.float32), TrainConfig(optimizer="sgd", lr=1.0), 2, 2, 1,
                     kw.get("pace", "ssp"), kw.get("staleness", 0), secret, "127.0.0.1",
                     str(tmp_path / "ckpt"), 30.0, kw.get("timeout_s", 2.0))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "sparkml_dist.ps.server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)  # fmt: skip
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.close()
    port = int(proc.stdout.readline().split()[1])
    return proc, f"tcp://127.0.0.1:{port}"


def test_a_caller_without_the_run_secret_is_refused(tmp_path):
    from sparkml_dist.ps.client import Endpoint, PSClient, RefusedError

    proc, address = _start_shard(tmp_path)
    try:
        with PSClient([Endpoint(0, address, 0, 4)], "wrong", 10.0, worker=0) as bad:
            with pytest.raises(RefusedError, match="refused: wrong or missing run secret"):
                bad.pull(0)
        with PSClient([Endpoint(0, address, 0, 4)], "s3cret", 10.0, worker=0) as good:
            flat, versions, done = good.pull(0)
            assert flat.tolist() == [0.0] * 4 and versions == [0] and not done
            good.call({"op": "stop"})
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_ssp_holds_a_fast_worker_at_the_bound_and_names_a_lost_one(tmp_path):
    """Worker 0 may run s clocks ahead of worker 1 and no further; when worker 1 never comes, worker 0's
    held pull fails after comm.ps_timeout_s naming worker 1: no hang."""
    from sparkml_dist.ps.client import Endpoint, PSClient, WorkerLostError

    proc, address = _start_shard(tmp_path, pace="ssp", staleness=1, timeout_s=1.5)
    try:
        ep = [Endpoint(0, address, 0, 4)]
        with PSClient(ep, "s3cret", 10.0, worker=0) as w0, PSClient(ep, "s3cret", 10.0, worker=1) as w1:
            w0.hello("host-a", 0)
            w1.hello("host-b", 0)
            for clock in range(2):  # clocks 0 and 1: within the bound of worker 1 at clock 0
                _, versions, _ = w0.pull(clock)
                w0.push(np.ones(4, np.float32), clock, versions, 1.0, 1)
            with pytest.raises(WorkerLostError, match="worker 1 on host-b \\(clock 0\\)"):
                w0.pull(2)
            assert w0.traffic.pull_wait_s >= 1.5
            released = {}
            t = threading.Thread(target=lambda: released.update(r=w0.pull(2)))
            t.start()
            _, v1, _ = w1.pull(0)
            w1.push(np.ones(4, np.float32), 0, v1, 1.0, 1)  # worker 1 reaches clock 1: worker 0 may go on
            t.join(timeout=10)
            assert "r" in released
    finally:
        proc.kill()


def test_parameter_server_config_is_checked_before_anything_starts():
    from sparkml_dist.ps.driver import check

    with pytest.raises(ConfigError, match="comm.compression=none"):
        check(load_config(None, [*PS, "comm.compression=topk"]))
    with pytest.raises(ConfigError, match="backward_passes_per_step=1"):
        check(load_config(None, [*PS, "train.backward_passes_per_step=2"]))
    with pytest.raises(ConfigError, match="or the topology parameter_server"):
        load_config(None, ["comm.strategy=nope"])


def test_a_lost_server_shard_loses_no_run_a_rerun_resumes_from_its_checkpoint(spark, ps_data, monkeypatch):
    """Shard 1 is SIGKILLed right after it checkpointed epoch 1: the run fails naming the shard, its
    checkpoint and the flag that resumes; that rerun continues from the shards' state and ends with the
    parameters of an uninterrupted bulk-synchronous run."""
    from sparkml_dist.fit import run_training
    from sparkml_dist.ps.driver import ParameterServerError

    sets = (*SGD, *PS, "comm.staleness=0", "comm.ps_shards=2")
    straight_cfg = _cfg(ps_data, *sets)
    straight = run_training(spark, straight_cfg)
    monkeypatch.setenv("SPARKML_DIST_CRASH_AT", "ps.server.epoch_saved")
    with pytest.raises(
        ParameterServerError, match=r"shard \d at tcp://127.0.0.1:\d+ exited.*train.resume_run_id=(\w+)"
    ) as err:
        run_training(spark, _cfg(ps_data, *sets))
    monkeypatch.delenv("SPARKML_DIST_CRASH_AT")
    run_id = str(err.value).split("train.resume_run_id=")[1].split()[0]
    cfg = _cfg(ps_data, *sets, f"train.resume_run_id={run_id}")
    resumed = run_training(spark, cfg)
    assert resumed.run_id == run_id and resumed.epochs == 2
    torch.testing.assert_close(_flat_ps(cfg, resumed), _flat_ps(straight_cfg, straight), atol=1e-6, rtol=0)


def test_more_workers_than_task_slots_is_refused_before_anything_starts(spark, ps_data):
    """Workers at a staleness bound would wait forever for one that never gets a slot: refused up front."""
    from sparkml_dist.fit import run_training
    from sparkml_dist.launch import LaunchError
    from sparkml_dist.partition import partition

    three = (
        "partition.num_shards=3",
        f"partition.output_url={ps_data}/shards3",
        f"train.manifest_url={ps_data}/shards3",
    )
    partition(spark, _cfg(ps_data, *three))
    with pytest.raises(LaunchError, match="3 workers .* must all run at once, but the cluster has 2 task slots"):
        run_training(spark, _cfg(ps_data, *three, *PS))


def _server_processes() -> list:
    """This test process's parameter-server shard processes, in the order they were started (shard 0 first)."""
    import os

    import psutil

    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "sparkml_dist.ps.server" in " ".join(p.cmdline()):
                found.append((p.create_time(), p.pid, p))
        except psutil.NoSuchProcess:
            continue
    return [p for _, _, p in sorted(found, key=lambda f: f[:2])]


def test_a_shard_killed_mid_run_resumes_every_shard_from_one_consistent_cut(spark, ps_data, capfd):
    """Issue 32, item 8: shard 1 is SIGKILLed mid-epoch (not at a checkpoint) while shard 0 goes on. Each shard
    saving on its own timer resumed them at different pushes (2513 vs 2250); with consistent cuts both resume
    from the same cut, at the same pushes and clocks, and the rerun finishes."""
    import time

    from sparkml_dist.fit import run_training
    from sparkml_dist.ps.driver import ParameterServerError
    from sparkml_dist.ps.server import cut_path, list_cuts, load_state

    # ssp with a slowed worker 1: ~3 s epochs, so the kill lands mid-run; a cut every 0.3 s
    sets = ("train.optimizer=sgd", "train.lr=0.5", *PS, "comm.pace=ssp", "comm.staleness=1", "comm.ps_shards=2",
            "comm.ps_checkpoint_s=0.3", "launch.fault_kind=slow", "launch.fault_rank=1",
            "launch.fault_delay_s=0.03")  # fmt: skip
    cfg = _cfg(ps_data, *sets)
    runs = ps_data / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    outcome: dict = {}

    def first() -> None:
        try:
            outcome["result"] = run_training(spark, cfg)
        except BaseException as exc:  # noqa: BLE001 (asserted below)
            outcome["error"] = exc

    def progress_cut() -> bool:
        """Shard 1 has written a cut holding some pushes (the run's first cuts may hold none)."""
        new = set(runs.iterdir()) - before if runs.exists() else set()
        if not new:
            return False
        ckpt = str(next(iter(new)) / "checkpoints")
        try:
            cuts = list_cuts(ckpt, 1)
            state = load_state(cut_path(ckpt, 1, cuts[-1])) if cuts else None
        except OSError:  # an older cut deleted while read
            return False
        return state is not None and state["applied"] > 0

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 240
    while not progress_cut():
        assert time.monotonic() < deadline and not outcome, outcome
        time.sleep(0.1)
    time.sleep(1.0)  # the run goes on past that cut: the kill lands mid-epoch, between checkpoints
    servers = _server_processes()
    assert len(servers) == 2, servers
    servers[1].kill()
    thread.join(240)
    assert isinstance(outcome.get("error"), ParameterServerError), outcome
    run_id = str(outcome["error"]).split("train.resume_run_id=")[1].split()[0]
    capfd.readouterr()
    resumed = run_training(spark, _cfg(ps_data, *sets, f"train.resume_run_id={run_id}"))
    err = capfd.readouterr().err
    lines = re.findall(r"shard (\d) resumed at (\d+) applied pushes \(epoch \d+\) from cut (\d+), clocks (\[[\d, ]+\])",
                       err)  # fmt: skip
    assert sorted(s for s, *_ in lines) == ["0", "1"], err[-3000:]
    assert len({tuple(rest) for _, *rest in lines}) == 1, lines  # the same pushes, cut and clocks on both shards
    assert int(lines[0][1]) > 0 and resumed.run_id == run_id and resumed.epochs == 2
    assert np.isfinite(resumed.final["val_log_loss"])


def test_a_worker_stopped_for_a_whole_async_run_is_named_at_the_end(spark, ps_data, caplog):
    """Issue 32, item 12: under async the other worker makes every push, so the run finishes; the stopped
    worker is named (host, pushes made) in a warning, ps/workers.json and the run's stalled_workers metric."""
    import mlflow

    from sparkml_dist.fit import run_training

    stop = ("launch.fault_kind=stop", "launch.fault_rank=1", "launch.fault_step=2", "comm.ps_timeout_s=5")
    cfg = _cfg(ps_data, "train.optimizer=sgd", "train.lr=0.5", "train.epochs=1", *PS, "comm.pace=async", *stop)
    with caplog.at_level("WARNING", logger="sparkml_dist.ps.driver"):
        result = run_training(spark, cfg)
    assert result.epochs == 1 and result.final["stalled_workers"] == 1.0
    assert re.search(r"parameter-server worker 1 on 127\.0\.0\.1 was stopped or stalled: it made 2 of the run's "
                     r"\d+ pushes", caplog.text), caplog.text  # fmt: skip
    run = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri).get_run(result.run_id)
    workers = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/ps/workers.json")
    assert workers["stalled"] == {"1": {"host": "127.0.0.1", "pushes": 2}}, workers
