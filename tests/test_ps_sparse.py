"""The sparse parameter server (``train.sparse_gradients`` with ``comm.strategy=parameter_server``): a worker
pulls only what its batch reads and pushes only those rows' gradient. On a real server process: keyed pulls
and pushes, bad keys refused; on real Spark tasks and server processes: the same model as the dense
parameter server, the same as allreduce with a row-sparse optimizer kept on the server, and the bytes of the
touched rows instead of the model."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkml_dist.config import load_config
from tests.test_ps import _flat_ps as _ps_params
from tests.test_ps import _flat_ring as _ring_params
from tests.test_sparse_optim import BUCKETS, clicks  # noqa: F401  (module fixture: the hashed click table, partitioned)


def _start_shard(tmp_path, optimizer="sgd", size=10, workers=1, staleness=0):
    from sparkml_dist.config import TrainConfig
    from sparkml_dist.ps.server import ShardSpec

    spec = ShardSpec(0, 0, size, np.arange(size, dtype=np.float32), TrainConfig(optimizer=optimizer, lr=1.0),
                     workers, 4, 1, "ssp", staleness, "s3cret", "127.0.0.1", str(tmp_path / "ckpt"), 30.0,
                     5.0)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "sparkml_dist.ps.server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)  # fmt: skip
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.close()
    port = int(proc.stdout.readline().split()[1])
    return proc, f"tcp://127.0.0.1:{port}"


def test_a_keyed_pull_returns_those_values_and_a_keyed_push_updates_only_those_rows(tmp_path):
    from sparkml_dist.ps.client import Endpoint, PSClient, RefusedError

    proc, address = _start_shard(tmp_path, optimizer="sgd", workers=2)
    try:
        eps = [Endpoint(0, address, 0, 10)]
        with PSClient(eps, "s3cret", 10.0, worker=0) as w0, PSClient(eps, "s3cret", 10.0, worker=1) as w1:
            keys = np.array([1, 4, 9], dtype=np.int64)
            values, versions, done = w0.pull(0, keys)
            assert values.tolist() == [1.0, 4.0, 9.0] and versions == [0] and not done
            assert w0.traffic.pull_bytes == 3 * 4 + 3 * 4  # the keys asked for, the values answered
            w0.push(np.array([1.0, 1.0, 1.0], np.float32), 0, versions, 1.0, 1, keys)
            assert w0.traffic.push_bytes == 3 * 4 + 3 * 4
            _, v1, _ = w1.pull(0, np.array([4], dtype=np.int64))
            w1.push(np.array([3.0], np.float32), 0, v1, 1.0, 1, np.array([4], dtype=np.int64))
            whole, _, _ = w0.pull(1)  # bulk-synchronous: one step of the mean of both pushes, lr 1
            expected = np.arange(10, dtype=np.float32)
            expected[[1, 9]] -= 0.5
            expected[4] -= 2.0
            assert whole.tolist() == expected.tolist()
            for bad in ([4, 1], [3, 3], [10], [-1]):  # would be split wrongly and silently dropped
                with pytest.raises(ValueError, match=r"keys must be ascending, unique positions in \[0, 10\)"):
                    w0.pull(1, np.array(bad, dtype=np.int64))
            for bad, why in [([4, 1], "ascending, unique"), ([3, 3], "ascending, unique"), ([10], "within the slice")]:
                with pytest.raises(RefusedError, match=why):  # the shard checks what reaches it too
                    w0.call({"op": "pull", "clock": 1}, {0: ({}, [np.array(bad, dtype=np.int32)])})
            with pytest.raises(RefusedError, match="keys must be a 1-d int32 array"):
                w0.call({"op": "pull", "clock": 1}, {0: ({}, [np.array([1.0], dtype=np.float32)])})
            w0.call({"op": "stop"})
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_a_row_sparse_optimizer_on_the_server_keeps_state_only_for_pushed_rows(tmp_path):
    from sparkml_dist.ps.client import Endpoint, PSClient

    proc, address = _start_shard(tmp_path, optimizer="adagrad", size=4096)
    try:
        with PSClient([Endpoint(0, address, 0, 4096)], "s3cret", 10.0, worker=0) as w:
            keys = np.array([7, 2048], dtype=np.int64)
            before, versions, _ = w.pull(0)
            w.push(np.array([0.5, -0.5], np.float32), 0, versions, 1.0, 1, keys)
            after, _, _ = w.pull(1)
            changed = np.flatnonzero(after != before).tolist()
            assert changed == [7, 2048]  # adagrad's first step moves a touched row by lr, the rest not at all
            assert after[7] == pytest.approx(before[7] - 1.0) and after[2048] == pytest.approx(before[2048] + 1.0)
            w.call({"op": "stop"})
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


# --- on real Spark tasks and server processes (test_sparse_optim's click table, trained differently) ---------


def _sets(root: Path, *extra: str) -> list[str]:
    return [
        f"paths.work_dir={root}",
        f"data.input_url=file://{root / 'clicks'}",
        f"partition.output_url=file://{root / 'out'}",
        f"train.manifest_url=file://{root / 'out'}",
        "data.categorical_cols=[site,device]",
        f"data.hash_buckets={BUCKETS}",
        "partition.num_shards=2",
        "partition.row_group_mb=0.05",
        "train.batch_size=64",
        "train.epochs=2",
        "train.max_steps_per_epoch=10",
        "tracking.log_model=false",
        "tracking.system_metrics_s=0",
        *extra,
    ]


PS_BSP = ("comm.strategy=parameter_server", "comm.pace=ssp", "comm.staleness=0", "comm.ps_shards=2")


def test_the_sparse_parameter_server_trains_the_dense_ones_model_and_moves_only_the_touched_rows(spark, clicks):  # noqa: F811
    from sparkml_dist.fit import run_training

    adam = ("train.optimizer=adam", "train.lr=0.05")
    runs, cfgs = {}, {}
    for mode in ("off", "on"):
        cfgs[mode] = load_config(None, _sets(clicks, *adam, *PS_BSP, f"train.sparse_gradients={mode}"))
        runs[mode] = run_training(spark, cfgs[mode])
    torch.testing.assert_close(_ps_params(cfgs["on"], runs["on"]), _ps_params(cfgs["off"], runs["off"]),
                               atol=1e-5, rtol=0)  # fmt: skip
    width = 2 + 2 * BUCKETS + 1  # the weight rows and the bias
    dense, sparse = runs["off"].final, runs["on"].final
    assert dense["ps_push_bytes_per_step"] == dense["ps_pull_bytes_per_step"] == 4 * width
    # a batch of 64 rows reads at most 64 x 4 weight rows (2 hashed columns, 2 numeric) and the bias: each
    # key travels as 4 bytes with its 4-byte value, so at most 2x the bytes of the touched rows
    most = 2 * 4 * (64 * 4 + 1)
    assert 0 < sparse["ps_push_bytes_per_step"] <= most and 0 < sparse["ps_pull_bytes_per_step"] <= most
    assert sparse["ps_push_bytes_per_step"] < dense["ps_push_bytes_per_step"] / 4


def test_a_row_sparse_optimizer_on_the_servers_equals_allreduce_with_it(spark, clicks):  # noqa: F811
    """lazy_adam kept on the server shards (state for the rows pushed) and the same optimizer on ranks
    exchanging rows: bulk-synchronous, the same steps, so the same model."""
    from sparkml_dist.fit import run_training

    lazy = ("train.optimizer=lazy_adam", "train.lr=0.05")
    ring_cfg = load_config(None, _sets(clicks, *lazy))
    ring = run_training(spark, ring_cfg)
    cfg = load_config(None, _sets(clicks, *lazy, *PS_BSP))
    ps = run_training(spark, cfg)
    torch.testing.assert_close(_ps_params(cfg, ps), _ring_params(ring_cfg, ring), atol=1e-5, rtol=0)
    assert ps.final["val_log_loss"] == pytest.approx(ring.final["val_log_loss"], abs=1e-5)
