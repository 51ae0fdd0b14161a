"""The barrier launcher with real Horovod ranks on local Spark: results, failures, pre-flight, timeouts."""

from __future__ import annotations

import dataclasses
import sys
import time

import pytest
from pyspark import cloudpickle

from sparkml_dist.config import LaunchConfig
from sparkml_dist.launch import LaunchError, RankFailedError, check_cluster, host_plan, run_on_ranks

CFG = LaunchConfig(start_timeout_s=60, collective_timeout_s=30)
# The rank functions below live in a test module the executors cannot import: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _allreduce(ctx):
    import horovod.torch as hvd
    import torch

    total = hvd.allreduce(torch.tensor([float(ctx.rank + 1)]), op=hvd.Sum, name="sum")
    return float(total[0]), ctx, hvd.size(), hvd.rank()


def _fails_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on purpose")
    import horovod.torch as hvd
    import torch

    return hvd.allreduce(torch.tensor([1.0]), name="never_completes")


def _sleeps(ctx):
    time.sleep(120)


def test_two_ranks_allreduce_and_rank_0_returns(spark):
    total, ctx, size, rank = run_on_ranks(spark, _allreduce, 2, CFG)
    assert total == 3.0 and size == 2 and rank == 0
    assert (ctx.rank, ctx.world_size, ctx.local_size, ctx.cross_size, ctx.device) == (0, 2, 2, 1, "cpu")
    assert ctx.hostname == "127.0.0.1"


def test_a_rank_exception_reaches_the_driver_with_rank_and_traceback_then_workers_are_reused(spark):
    with pytest.raises(RankFailedError) as err:
        run_on_ranks(spark, _fails_on_rank_1, 2, CFG)
    text = str(err.value)
    assert "rank 1 on 127.0.0.1" in text and "ValueError: boom on purpose" in text and "_fails_on_rank_1" in text
    assert "org.apache.spark" not in text
    assert run_on_ranks(spark, _allreduce, 2, CFG)[0] == 3.0


def test_preflight_refuses_more_ranks_than_slots_quickly(spark):
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"needs 3 task slots at once .* has 2 .*partition.num_shards"):
        run_on_ranks(spark, _allreduce, 3, CFG)
    with pytest.raises(LaunchError, match="world size must be >= 1"):
        check_cluster(spark, 0)
    assert time.monotonic() - started < 5


def test_preflight_refuses_dynamic_allocation(spark):
    conf = spark.sparkContext._conf  # the live SparkConf the check reads
    conf.set("spark.dynamicAllocation.enabled", "true")
    try:
        with pytest.raises(LaunchError, match="dynamic allocation"):
            check_cluster(spark, 2)
    finally:
        conf.set("spark.dynamicAllocation.enabled", "false")


def test_job_timeout_cancels_the_stage(spark):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="launch.job_timeout_s=5"):
        run_on_ranks(spark, _sleeps, 2, LaunchConfig(start_timeout_s=60, job_timeout_s=5))
    assert time.monotonic() - started < 60
    assert run_on_ranks(spark, _allreduce, 2, CFG)[0] == 3.0


def test_host_plan_groups_local_ranks_by_host():
    plan = host_plan(["a", "b", "a", "b", "a"])
    assert [(s.rank, s.local_rank, s.local_size, s.cross_rank, s.cross_size) for s in plan] == [
        (0, 0, 3, 0, 2),
        (1, 0, 2, 1, 2),
        (2, 1, 3, 0, 2),
        (3, 1, 2, 1, 2),
        (4, 2, 3, 0, 1),
    ]


def _user_error_on_rank_1(ctx):
    from sparkml_dist.loader import LoaderError

    if ctx.rank == 1:
        raise LoaderError("shard-1 holds 3 rows, fewer than one batch: lower train.batch_size")
    return ctx.rank


def test_a_rank_user_error_comes_back_as_a_user_error_naming_rank_and_fix_without_retry(spark):
    from sparkml_dist.errors import UserError
    from sparkml_dist.launch import RankUserError

    with pytest.raises(RankUserError) as err:
        run_on_ranks(spark, _user_error_on_rank_1, 2, CFG)
    assert isinstance(err.value, UserError) and not err.value.retryable
    assert str(err.value) == (
        "rank 1 on 127.0.0.1: LoaderError: shard-1 holds 3 rows, fewer than one batch: lower train.batch_size"
    )
    assert "_user_error_on_rank_1" in err.value.details  # the traceback, for the debug log


def test_every_wait_has_a_finite_default_that_scales_with_the_rows(spark):
    """Issue 19 section 5: job_timeout_s=0 derives a deadline linear in the rows per rank; Spark's barrier
    waits get ours instead of their one-year default."""
    from sparkml_dist.launch import job_deadline
    from sparkml_dist.session import BARRIER_TIMEOUT, barrier_timeout_s

    cfg = LaunchConfig(start_timeout_s=120, collective_timeout_s=300, min_rows_per_s=50)
    small, large = job_deadline(cfg, 3, 1_000), job_deadline(cfg, 3, 1_000_000)
    assert small.job_timeout_s == 120 + 3 * 300  # a small epoch: at least a collective's timeout
    assert large.job_timeout_s == 120 + 3 * 1_000_000 / 50  # linear in the rows per rank
    assert job_deadline(LaunchConfig(job_timeout_s=42), 3, 1e9).job_timeout_s == 42  # a set one is kept
    with pytest.raises(Exception, match="job_timeout_s must be >= 0"):
        LaunchConfig(job_timeout_s=-1)
    assert spark.conf.get(BARRIER_TIMEOUT) == f"{barrier_timeout_s(LaunchConfig())}s" == "360s"


def test_a_multi_host_stage_refuses_a_hostname_that_resolves_to_loopback(monkeypatch):
    """Horovod 0.28.1's Gloo binds its process-set context to the hostname's address: on a host whose name
    resolves to 127.x the ranks of a multi-host stage would advertise loopback to each other (found on the
    namespaced cluster, tests/test_netcluster.py). One host, or loopback task addresses, are fine."""
    import socket

    from sparkml_dist.launch import LaunchError, _check_hostname

    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    with pytest.raises(LaunchError, match=r"hostname 'localhost' resolves to 127\.0\.0\.1, a loopback address"):
        _check_hostname(["10.9.9.1", "10.9.9.2"], "10.9.9.1")
    _check_hostname(["127.0.0.1", "127.0.0.1"], "127.0.0.1")
    _check_hostname(["10.9.9.1", "10.9.9.1"], "10.9.9.1")


# ------------------------------------------------------------------ the collectives seam: both engines


def _every_collective(ctx):
    import torch

    comm = ctx.collectives()
    total = comm.allreduce(torch.tensor([float(ctx.rank + 1), 2.0]), average=False, name="sum")
    mean = comm.allreduce(torch.tensor([float(ctx.rank + 1)]), average=True, name="mean")
    rows = comm.allgather(torch.full((ctx.rank + 1, 2), float(ctx.rank)), name="rows")  # unequal first dims
    param = torch.nn.Parameter(torch.full((3,), float(ctx.rank)))
    comm.broadcast_([param], root=1, name="param")
    obj = comm.broadcast_object({"from": ctx.rank}, root=0, name="obj")
    objs = comm.allgather_object(ctx.rank * 10, name="objs")
    kind = type(comm).__name__
    return total.tolist(), mean.tolist(), rows.tolist(), param.tolist(), obj, objs, comm.meter.calls, kind


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_both_engines_give_the_same_collectives_and_count_them(spark, engine):
    out = run_on_ranks(spark, _every_collective, 2, dataclasses.replace(CFG, collectives=engine))
    total, mean, rows, param, obj, objs, calls, kind = out
    assert total == [3.0, 4.0] and mean == [1.5]
    assert rows == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert param == [1.0, 1.0, 1.0] and obj == {"from": 0} and objs == [0, 10]
    assert calls == 4  # allreduce x2, allgather, one broadcast tensor (object collectives are not metered)
    assert kind == {"horovod": "HorovodCollectives", "torch": "TorchCollectives"}[engine]


def _torch_fails_on_rank_1(ctx):
    import torch

    if ctx.rank == 1:
        raise ValueError("boom on purpose")
    return ctx.collectives().allreduce(torch.tensor([1.0]), average=False, name="never_completes")


def test_torch_engine_reports_the_failing_rank_and_leaves_the_worker_reusable(spark):
    cfg = dataclasses.replace(CFG, collectives="torch")
    with pytest.raises(RankFailedError) as err:
        run_on_ranks(spark, _torch_fails_on_rank_1, 2, cfg)
    assert "rank 1 on 127.0.0.1" in str(err.value) and "ValueError: boom on purpose" in str(err.value)
    assert run_on_ranks(spark, _every_collective, 2, cfg)[0] == [3.0, 4.0]


def _listening(ctx):
    import os

    import psutil

    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    leaked = [k for k, v in os.environ.items() if "/" in v and len(v.rsplit("/", 1)[-1]) == 32 and ":" in v]
    return sorted({a.ip for a in listening}), leaked


def test_the_torch_rendezvous_and_gloo_listen_only_on_the_task_address_and_keep_the_secret_out_of_env(spark):
    ips, leaked = run_on_ranks(spark, _listening, 2, dataclasses.replace(CFG, collectives="torch"))
    assert ips == ["127.0.0.1"]  # the TCPStore (rank 0) and gloo's pairs: never 0.0.0.0 or ::
    assert leaked == []  # host:port/secret travels through allGather only


def _last_rank_lingers(ctx):
    import torch

    total = ctx.collectives().allreduce(torch.tensor([1.0]), average=False, name="last")
    if ctx.rank == 1:
        time.sleep(2.0)  # past the last collective: only the exit barrier holds rank 0
    return float(total[0])


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_rank_0_keeps_the_rendezvous_until_every_rank_marked_leaving_through_the_engines_own_store(spark, engine):
    """The exit barrier is the engine's store (Spark's barrier() polls once a second): a rank that leaves late
    is waited for, and its mark arrives (without it, rank 0 would wait out launch.collective_timeout_s)."""
    cfg = dataclasses.replace(CFG, collectives=engine, collective_timeout_s=40)
    started = time.monotonic()
    assert run_on_ranks(spark, _last_rank_lingers, 2, cfg) == 2.0
    assert 2.0 <= time.monotonic() - started < 40


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_the_exit_barrier_counts_only_marked_ranks_and_gives_up_at_its_timeout(engine):
    """Rank 0's side alone, no Spark: an unmarked rank is not waited for past the timeout; a mark, made as a
    leaving rank makes it (a TCPStore key under the run's secret / a PUT to the guarded Horovod store), ends
    the wait."""
    import datetime
    import urllib.request

    from sparkml_dist.runtime import engines

    engine_ = engines.build_engine(dataclasses.replace(CFG, collectives=engine))
    plan = host_plan(["127.0.0.1", "127.0.0.1"])
    rendezvous = engine_.serve("127.0.0.1", ["127.0.0.1", "127.0.0.1"], plan)
    try:
        assert rendezvous.wait_left(1, 0.1)  # a single rank waits for nobody
        started = time.monotonic()
        assert not rendezvous.wait_left(2, 0.3)
        assert time.monotonic() - started < 10
        hostport, _, secret = rendezvous.address.partition("/")
        if engine == "torch":
            import torch.distributed as dist

            host, _, port = hostport.rpartition(":")
            client = dist.TCPStore(host, int(port), 2, False, datetime.timedelta(seconds=10), use_libuv=False)
            dist.PrefixStore(secret, client).set(f"{engines.LEFT_SCOPE}/1", "1")
        else:
            port = hostport.rpartition(":")[2]
            url = f"http://{rendezvous.address}:{port}/{engines.LEFT_SCOPE}/1"
            urllib.request.urlopen(urllib.request.Request(url, data=b"1", method="PUT"), timeout=5).close()
        assert rendezvous.wait_left(2, 10)
    finally:
        rendezvous.close()


def _prepare_marks(rank, where):
    import os

    if rank == 1:
        raise RuntimeError("a failed preparation is logged, not fatal")
    with open(os.path.join(where, f"prepared-{rank}"), "w") as f:
        f.write("x")


def _sees_its_preparation(ctx, where):
    import os

    return os.path.exists(os.path.join(where, f"prepared-{ctx.rank}"))  # done before the rank function began


def test_prepare_runs_on_every_rank_before_the_group_forms_and_its_failure_is_not_fatal(spark, tmp_path):
    import functools

    fn = functools.partial(_sees_its_preparation, where=str(tmp_path))
    assert run_on_ranks(spark, fn, 2, CFG, prepare=functools.partial(_prepare_marks, where=str(tmp_path))) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared-0"]


def _warm_marks(where):
    import os
    import uuid

    with open(os.path.join(where, f"warmed-{os.getpid()}-{uuid.uuid4().hex[:6]}"), "w") as f:
        f.write("x")


def _warm_stalls():
    time.sleep(120)


def test_a_worker_warmup_runs_in_one_task_per_rank_and_a_stalled_one_is_cancelled_before_the_stage(spark, tmp_path):
    import functools

    from sparkml_dist.runtime.launch import WorkerWarmup

    warmup = WorkerWarmup.start(spark, 2, functools.partial(_warm_marks, str(tmp_path)))
    assert warmup is not None
    assert run_on_ranks(spark, _allreduce, 2, CFG, warmup=warmup)[0] == 3.0
    assert len(list(tmp_path.iterdir())) == 2  # one warm-up task per rank, done before the stage began
    started = time.monotonic()
    stalled = WorkerWarmup.start(spark, 2, _warm_stalls)
    assert run_on_ranks(spark, _allreduce, 2, dataclasses.replace(CFG, start_timeout_s=3), warmup=stalled)[0] == 3.0
    assert time.monotonic() - started < 60  # waited launch.start_timeout_s=3, cancelled, and the stage ran


def test_no_worker_warmup_when_spark_would_not_reuse_its_workers(spark):
    from sparkml_dist.runtime.launch import WorkerWarmup

    conf = spark.sparkContext._conf  # the live SparkConf the check reads
    conf.set("spark.python.worker.reuse", "false")
    try:
        assert WorkerWarmup.start(spark, 2, _warm_stalls) is None
    finally:
        conf.set("spark.python.worker.reuse", "true")


def _signals_itself(ctx):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGUSR1)  # without the handler SIGUSR1's default ends the process
    return ctx.collectives().allreduce(__import__("torch").tensor([1.0]), average=False, name="after").item()


def test_kill_usr1_on_a_rank_dumps_its_stacks_and_the_rank_goes_on(spark):
    """A rank's Python worker answers SIGUSR1 with its threads' stacks (to the executor's log) and trains on:
    what an operator sends a rank the heartbeat watch calls stuck."""
    assert run_on_ranks(spark, _signals_itself, 2, dataclasses.replace(CFG, collectives="torch")) == 2.0
