"""Communication strategies: the maths without Spark (in-process ranks, milliseconds), then the same
strategies on real Horovod ranks in a Spark barrier stage, tracked in MLflow, against allreduce."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sparkml_dist.comm import COMPRESSORS, STRATEGIES, build_strategy
from sparkml_dist.config import CommConfig, ConfigError, load_config
from sparkml_dist.rank import CollectiveTimeoutError, RankError, run_in_process

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- pure, fast


def test_thread_collectives_match_horovod_semantics():
    def fn(ctx):
        c = ctx.collectives()
        t = torch.full((3,), float(ctx.rank + 1))
        s = c.allreduce(t, average=False, name="s")
        m = c.allreduce(t, average=True, name="m")
        g = c.allgather(torch.arange(ctx.rank + 1, dtype=torch.float32), name="g")  # ragged first dims
        b = torch.full((2,), float(ctx.rank))
        c.broadcast_([b], root=1, name="b")
        o = c.broadcast_object({"r": ctx.rank}, root=0, name="o")
        return s.tolist(), m.tolist(), g.tolist(), b.tolist(), o, c.allgather_object(ctx.rank, name="ao"), c.meter

    out = run_in_process(fn, 3)
    for s, m, g, b, o, ao, _ in out:
        assert s == [6.0] * 3 and m == [2.0] * 3 and g == [0, 0, 1, 0, 1, 2] and b == [1.0, 1.0]
        assert o == {"r": 0} and ao == [0, 1, 2]
    # metered: 2 allreduces of 12 bytes (ring factor 2(K-1)/K = 4/3), one allgather of (rank+1) x 4 bytes
    meter = out[2][-1]
    assert meter.payload_bytes == 12 + 12 + 12 + 0  # rank 2 is not the broadcast root
    assert meter.wire_bytes == pytest.approx(24 * 4 / 3 + 12 * 2)


def test_a_failing_rank_fails_the_group_naming_it_instead_of_hanging():
    def fn(ctx):
        if ctx.rank == 1:
            raise ValueError("bad shard")
        ctx.collectives().allreduce(torch.zeros(1), average=True, name="x")

    with pytest.raises(RankError, match="rank 1 of 2.*bad shard"):
        run_in_process(fn, 2, timeout_s=10)

    def stuck(ctx):
        if ctx.rank == 0:
            ctx.collectives().allreduce(torch.zeros(1), average=True, name="x")

    with pytest.raises((RankError, CollectiveTimeoutError)):
        run_in_process(stuck, 2, timeout_s=1)


def _mean_via(compression: str, vectors: list[torch.Tensor], sizes: list[int], **extra) -> list[torch.Tensor]:
    cfg = CommConfig(compression=compression, **extra)

    def fn(ctx):
        comp = COMPRESSORS.get(compression)(cfg, sizes)
        return comp.mean(vectors[ctx.rank], ctx.collectives(), "v"), comp

    return run_in_process(fn, len(vectors))


def test_topk_at_ratio_one_is_the_exact_mean_and_sends_values_plus_indices():
    torch.manual_seed(0)
    vs = [torch.randn(10), torch.randn(10)]
    dense = _mean_via("none", vs, [7, 3])
    sparse = _mean_via("topk", vs, [7, 3], topk_ratio=1.0)
    for (d, _), (s, _) in zip(dense, sparse, strict=True):
        torch.testing.assert_close(d, s, atol=1e-7, rtol=0)


def test_nonzero_is_the_exact_mean_and_sends_only_each_ranks_nonzeros():
    torch.manual_seed(1)
    vs = [torch.zeros(1000), torch.zeros(1000)]
    vs[0][[3, 500, 999]] = torch.tensor([1.5, -2.0, 0.25])
    vs[1][[3, 7]] = torch.tensor([0.5, 4.0])  # a different count per rank: the allgather sizes differ
    dense = _mean_via("none", vs, [600, 400])
    sparse = _mean_via("nonzero", vs, [600, 400])
    for (d, _), (s, _) in zip(dense, sparse, strict=True):
        torch.testing.assert_close(d, s, atol=0, rtol=0)
    assert sparse[0][0][3] == 1.0 and sparse[0][0][7] == 2.0


def test_topk_selects_per_tensor_and_error_feedback_keeps_what_was_not_sent():
    v = torch.tensor([0.1, -5.0, 0.2, 0.3, 0.0, 0.0, 3.0, 0.0, 0.0, 1.0])  # tensors of 4 and 6 entries
    ((mean, comp),) = _mean_via("topk", [v], [4, 6], topk_ratio=0.25)  # k = 1 of 4, round(1.5) = 2 of 6
    assert comp.ks == [1, 2]
    sent = v.clone()
    sent[[0, 2, 3, 4, 5, 7, 8]] = 0.0  # kept: -5.0 (tensor 1); 3.0 and 1.0 (tensor 2)
    torch.testing.assert_close(mean, sent)
    torch.testing.assert_close(comp.residual + mean, v)  # nothing lost: sent + residual = input
    ((_, no_ef),) = _mean_via("topk", [v], [4, 6], topk_ratio=0.25, error_feedback=False)
    assert no_ef.residual is None


def test_fp16_halves_the_payload():
    vs = [torch.randn(1000), torch.randn(1000)]
    (_, none), _ = _mean_via("none", vs, [1000])
    out = []

    def fn(ctx):
        comp = COMPRESSORS.get("fp16")(CommConfig(compression="fp16"), [1000])
        c = ctx.collectives()
        comp.mean(vs[ctx.rank], c, "v")
        return c.meter.payload_bytes

    out = run_in_process(fn, 2)
    assert out == [2000, 2000]


def test_local_sgd_with_one_local_step_equals_allreduce_for_plain_sgd():
    torch.manual_seed(1)
    data = [(torch.randn(40, 5), torch.randn(40, 1)) for _ in range(2)]
    start = torch.nn.Linear(5, 1)  # built here: ranks are threads sharing one RNG

    def train(strategy: str):
        def fn(ctx):
            model = copy.deepcopy(start)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            s = build_strategy(
                CommConfig(strategy=strategy, local_steps=1), ctx.collectives(), list(model.parameters())
            )
            s.start()
            x, y = data[ctx.rank]
            for step in range(5):
                torch.nn.functional.mse_loss(model(x[step::5]), y[step::5]).backward()
                s.update(opt, None, step)
                opt.zero_grad()
            s.sync(opt)
            return [p.detach().clone() for p in model.parameters()], s.rounds

        return run_in_process(fn, 2)

    ar, ls = train("allreduce"), train("local_sgd")
    for (pa, ra), (pl, rl) in zip(ar, ls, strict=True):
        assert ra == rl == 5
        for a, b in zip(pa, pl, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_config_lists_registered_strategies_and_refuses_unknown_names():
    with pytest.raises(ConfigError, match="registered: allreduce, local_sgd"):
        load_config(None, ["comm.strategy=gossip"])
    with pytest.raises(ConfigError, match="registered: none, fp16, topk"):
        load_config(None, ["comm.compression=zip"])
    with pytest.raises(ConfigError, match=r"train.model='logstic' is not a known model; registered: logistic"):
        load_config(None, ["train.model=logstic"])
    with pytest.raises(ConfigError, match="feature_parallel.*comm.strategy=local_sgd"):
        load_config(None, ["train.mode=feature_parallel", "comm.strategy=local_sgd"])
    assert load_config(None, ["train.fp16_allreduce=true"]).comm.compression == "fp16"
    assert {"allreduce", "local_sgd"} <= set(STRATEGIES.names())


def test_the_rank_side_never_imports_pyspark():
    """What runs inside a rank (the loop, both modes, the strategies, the collectives) imports no pyspark,
    directly or through anything it imports."""
    import subprocess
    import sys

    modules = ["sparkml_dist.runtime.rank", "sparkml_dist.training.loop", "sparkml_dist.training.train",
               "sparkml_dist.training.feature_parallel", "sparkml_dist.comm", "sparkml_dist.training.device",
               "sparkml_dist.errors"]  # fmt: skip
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if 'pyspark' in m))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------ the whole loop, in process


@pytest.fixture(scope="module")
def comm_data(spark, tmp_path_factory):
    from sparkml_dist.partition import partition
    from sparkml_dist.synthetic import write_dataset

    work = tmp_path_factory.mktemp("comm")
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
            "launch.start_timeout_s=60",
            "launch.collective_timeout_s=60",
            "launch.job_timeout_s=300",
            *sets,
        ],
    )


def _params(cfg, result) -> dict[str, torch.Tensor]:
    from sparkml_dist import checkpoint

    state = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")
    assert state is not None
    return state["model"]


def _assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


SGD_STEPS = ("train.optimizer=sgd", "train.lr=0.5", "train.epochs=2", "train.max_steps_per_epoch=10")


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_in_process_backend_runs_the_same_loop_with_the_device_check_on(spark, comm_data, engine):
    """The in-process backend (threads, in-memory collectives) runs the real loop: same parameters as the
    barrier stage's ranks on either collective engine, and every tensor that reached the model went through
    the placement."""
    from sparkml_dist.fit import run_training

    threads = run_training(spark, _cfg(comm_data, *SGD_STEPS, "launch.backend=in_process", "launch.device_check=true"))
    cfg = _cfg(comm_data, *SGD_STEPS, "launch.device_check=true", f"launch.collectives={engine}")
    ranks = run_training(spark, cfg)
    _assert_same_params(_params(cfg, threads), _params(cfg, ranks))
    assert threads.final["comm_bytes_per_step"] == ranks.final["comm_bytes_per_step"] == 33 * 4


def test_device_check_catches_a_tensor_that_bypassed_the_placement():
    from sparkml_dist.device import DevicePlacementError, Placement

    place = Placement("cpu", strict=True)
    model = place.module(torch.nn.Linear(3, 1))
    (x,) = place.batch(torch.zeros(2, 3))
    model(x)
    with pytest.raises(DevicePlacementError, match="did not go through device.Placement"):
        model(torch.zeros(2, 3))


# ----------------------------------------------------------------------- real Horovod ranks (barrier)


@pytest.fixture(scope="module")
def allreduce_sgd(spark, comm_data):
    from sparkml_dist.fit import run_training

    cfg = _cfg(comm_data, *SGD_STEPS)
    return cfg, run_training(spark, cfg)


@pytest.mark.parametrize(
    "sets",
    [
        ("comm.strategy=local_sgd", "comm.local_steps=1"),
        ("comm.compression=topk", "comm.topk_ratio=1.0"),
        ("comm.strategy=local_sgd", "comm.local_steps=1", "comm.compression=topk", "comm.topk_ratio=1.0"),
        ("launch.collectives=torch",),
        (
            "launch.collectives=torch",
            "comm.strategy=local_sgd",
            "comm.local_steps=1",
            "comm.compression=topk",
            "comm.topk_ratio=1.0",
        ),
    ],
    ids=["local_sgd_k1", "topk_ratio1", "local_sgd_k1_topk_ratio1", "torch_allreduce", "torch_local_sgd_k1_topk1"],
)
def test_exact_special_cases_equal_allreduce_on_two_real_ranks(spark, comm_data, allreduce_sgd, sets):
    from sparkml_dist.fit import run_training

    cfg, reference = allreduce_sgd
    result = run_training(spark, _cfg(comm_data, *SGD_STEPS, *sets))
    _assert_same_params(_params(cfg, reference), _params(cfg, result))


def test_fp16_measured_bytes_are_half_and_topk_sends_values_plus_indices(spark, comm_data, allreduce_sgd):
    import mlflow

    from sparkml_dist.fit import run_training

    cfg, dense = allreduce_sgd
    half = run_training(spark, _cfg(comm_data, *SGD_STEPS, "comm.compression=fp16"))
    sparse = run_training(spark, _cfg(comm_data, *SGD_STEPS, "comm.compression=topk", "comm.topk_ratio=0.1"))
    d, h, s = dense.final, half.final, sparse.final
    assert d["comm_bytes_per_step"] == 33 * 4  # 32 weights + bias, fp32, one allreduce per step
    assert h["comm_bytes_per_step"] == 33 * 2
    assert s["comm_bytes_per_step"] == (3 + 1) * 8  # round(0.1 x 32) + 1 (bias) entries, value + index
    assert d["comm_wire_bytes_per_rank_per_step"] == pytest.approx(33 * 4 * 2 * (2 - 1) / 2)
    assert s["comm_wire_bytes_per_rank_per_step"] == pytest.approx(32 * (2 - 1))  # allgather: (K-1) x payload
    assert d["ring_bytes_per_rank_per_step"] == s["ring_bytes_per_rank_per_step"] == 33 * 4
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(sparse.run_id)
    assert run.data.params["comm.compression"] == "topk" and run.data.params["comm.topk_ratio"] == "0.1"
    assert run.data.tags["kind"] == "allreduce+topk"
    assert [m.value for m in client.get_metric_history(sparse.run_id, "system/comm/rounds")] == [10.0, 10.0]
    assert {"system/time/comm_s", "system/time/compute_s", "system/time/data_wait_s"} <= set(run.data.metrics)


ADAM = ("train.optimizer=adam", "train.lr=0.02", "train.epochs=3")


def test_local_sgd_k8_converges_with_an_eighth_of_the_rounds(spark, comm_data):
    from sparkml_dist.fit import run_training

    bsp = run_training(spark, _cfg(comm_data, *ADAM))
    local = run_training(spark, _cfg(comm_data, *ADAM, "comm.strategy=local_sgd", "comm.local_steps=8"))
    assert local.final["val_log_loss"] <= bsp.final["val_log_loss"] * 1.02
    steps = bsp.final["comm_rounds"]
    assert local.final["comm_rounds"] == -(-steps // 8)  # k local steps per round, plus the epoch's sync


def test_topk_1_percent_with_error_feedback_matches_uncompressed_and_without_it_is_worse(spark, comm_data):
    from sparkml_dist.fit import run_training

    # Plain SGD, as error feedback is analysed for (Stich et al. 2018); 1% of 32 weights is one entry per step.
    sgd = ("train.optimizer=sgd", "train.lr=0.5", "train.epochs=3")
    topk = ("comm.compression=topk", "comm.topk_ratio=0.01")
    dense = run_training(spark, _cfg(comm_data, *sgd))
    ef = run_training(spark, _cfg(comm_data, *sgd, *topk))
    no_ef = run_training(spark, _cfg(comm_data, *sgd, *topk, "comm.error_feedback=false"))
    assert ef.final["val_log_loss"] <= dense.final["val_log_loss"] * 1.02, (ef.final, dense.final)
    assert no_ef.final["val_log_loss"] > ef.final["val_log_loss"], (no_ef.final, ef.final)


def test_local_sgd_resume_after_an_interruption_equals_a_straight_run(spark, comm_data):
    from sparkml_dist.fit import run_training

    sets = (*ADAM, "comm.strategy=local_sgd", "comm.local_steps=3", "comm.compression=topk", "comm.topk_ratio=0.2",
            "train.max_steps_per_epoch=10")  # fmt: skip
    straight = run_training(spark, _cfg(comm_data, *sets))
    first = run_training(spark, _cfg(comm_data, *sets, "train.epochs=1"))
    resumed = run_training(spark, _cfg(comm_data, *sets, f"train.resume_run_id={first.run_id}"))
    assert resumed.resumed_from_epoch == 1
    cfg = _cfg(comm_data)
    _assert_same_params(_params(cfg, straight), _params(cfg, resumed))
