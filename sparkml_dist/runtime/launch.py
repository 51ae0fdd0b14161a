"""Barrier-mode launch: one Spark barrier stage, one rank per task, the collectives' rendezvous on task 0.

Task 0 starts the configured engine's rendezvous (``launch.collectives``: Horovod's HTTP server, or our
``kvstore`` for torch.distributed) bound to its own address (not 0.0.0.0), guarded by a per-run secret and the
stage's hosts, and shares its address through ``allGather``. Every task joins the group under a watchdog
(``engines.Engine.join``), runs the user function and leaves the group so its Python worker can be reused.
Rank 0's return value reaches the driver. A rank's exception comes back as a RankFailedError naming the rank,
its host and its traceback; the stage runs in its own job group, which is cancelled on failure, interrupt or
timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from pyspark.sql import SparkSession

from sparkml_dist.config import LaunchConfig
from sparkml_dist.errors import InfraError, UserError
from sparkml_dist.runtime import heartbeat
from sparkml_dist.runtime.engines import LaunchError, build_engine, host_plan
from sparkml_dist.runtime.engines import check_hostname as _check_hostname  # noqa: F401  (tests, older imports)
from sparkml_dist.runtime.rank import RankContext, run_in_process

T = TypeVar("T")
log = logging.getLogger("sparkml_dist.launch")  # its pre-move name: logging configs keep working

DYNAMIC_ALLOCATION = "spark.dynamicAllocation.enabled"
TASK_CPUS = "spark.task.cpus"
MAX_FAILURES = "spark.task.maxFailures"
POLL_S = 1.0
_FAILURE_MARK = "sparkml-dist rank failure"
_USER_MARK = "sparkml-dist user error:"


class RankFailedError(InfraError):
    """A Horovod rank raised, was lost or stalled; the message holds its rank, host and traceback.

    ``retryable``: the failure is the infrastructure's (a lost or stalled process, a collective broken by
    one), not an exception the rank's own code raised, so running the stage again can succeed.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class RankUserError(UserError):
    """A rank stopped on a user error (bad data, config or paths): not retried. ``details``: its traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def check_cluster(spark: SparkSession, world_size: int) -> None:
    """Fail fast, before any task starts, when a barrier stage of ``world_size`` tasks cannot run."""
    if world_size < 1:
        raise LaunchError(f"world size must be >= 1, got {world_size}")
    sc = spark.sparkContext
    if sc.getConf().get(DYNAMIC_ALLOCATION, "false").lower() == "true":
        raise LaunchError(
            f"{DYNAMIC_ALLOCATION}=true: barrier stages cannot run with dynamic allocation; "
            f"submit with --conf {DYNAMIC_ALLOCATION}=false"
        )
    slots = available_slots(spark)
    if slots < world_size:
        raise LaunchError(
            f"the barrier stage needs {world_size} task slots at once (one per shard), but the cluster has "
            f"{slots} ({sc.master}, {TASK_CPUS}={sc.getConf().get(TASK_CPUS, '1')}): add executors/cores "
            "or partition into fewer shards (partition.num_shards)"
        )


def available_slots(spark: SparkSession) -> int:
    sc = spark.sparkContext
    local = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\d+)?\])?", sc.master or "")
    if local:
        cores = local.group(1)
        n = (os.cpu_count() or 1) if cores == "*" else int(cores or 1)
        return n // int(sc.getConf().get(TASK_CPUS, "1"))
    jsc = sc._jsc.sc()  # type: ignore[union-attr]
    return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))


def run_on_ranks(
    spark: SparkSession,
    fn: Callable[[RankContext], T],
    world_size: int,
    cfg: LaunchConfig,
    description: str = "sparkml-dist ranks",
    on_retry: Callable[[int, BaseException], None] | None = None,
    prepare: Callable[[int], None] | None = None,
    warmup: WorkerWarmup | None = None,
) -> T:
    """Run ``fn`` on ``world_size`` ranks (``launch.collectives``) in one barrier stage; return rank 0's result.

    ``prepare(rank)``, if given, runs on each rank before it meets the others (Spark's ``allGather`` of the
    rendezvous address, which sleeps in 1 s steps, absorbs a short one): what the rank will need anyway and
    can do alone (imports, opening a client). On the rank's own thread, before any collective: run on a
    second thread while the group formed, it saved nothing measurable once ``WorkerWarmup`` had done the
    imports (3 runs each, 2026-12-07: 21.1-22.1 s threaded, 20.9-23.0 s in line, 21.2-22.7 s without), and
    imports racing the engine's start in one process were a suspect of a one-off stall. Best effort: its
    errors are logged at DEBUG, and ``fn`` meets them again where they matter. ``warmup``
    (``WorkerWarmup.start``, begun earlier by the caller) is waited for, at most ``launch.start_timeout_s``,
    before the stage starts.

    Spark cannot retry a failed barrier *result* stage ("Could not recover from a failed barrier
    ResultStage"), so the retry is here: when a rank's process is lost or stalls (not when it raises), the
    stage is run again as attempt 1, 2, ... (``RankContext.attempt``), up to ``max_attempts(spark, cfg)``;
    ``on_retry(attempt, error)`` is called before each retry. ``fn`` resumes from its own checkpoints.
    """
    if cfg.backend == "in_process":
        timeout = cfg.job_timeout_s if cfg.job_timeout_s > 0 else cfg.collective_timeout_s * 10
        return run_in_process(fn, world_size, timeout_s=timeout)[0]
    check_cluster(spark, world_size)
    if warmup is not None:
        warmup.wait(cfg.start_timeout_s)
    attempts = max_attempts(spark, cfg)
    deadline = time.monotonic() + cfg.job_timeout_s if cfg.job_timeout_s > 0 else None
    with heartbeat.HeartbeatServer(_driver_host(spark)) as beats:
        for attempt in range(attempts):
            try:
                return _run_attempt(spark, fn, world_size, cfg, description, attempt, beats, deadline, prepare)
            except RankFailedError as exc:
                if not exc.retryable or attempt + 1 >= attempts:
                    if exc.retryable:
                        exc.args = (f"{exc.args[0]}\n(gave up after {attempts} attempt(s); raise launch.max_attempts)",)
                    raise
                log.warning(
                    "training stage attempt %d failed: %s; retrying as attempt %d of %d",
                    attempt, str(exc).splitlines()[0], attempt + 2, attempts,
                )  # fmt: skip
                if on_retry is not None:
                    on_retry(attempt + 1, exc)
    raise AssertionError("unreachable")


class WorkerWarmup:
    """A small Spark job, started early, that starts ``world_size`` Python workers and runs ``prepare()`` in
    each, so the barrier stage's tasks, which Spark hands to the idle workers of finished tasks
    (``spark.python.worker.reuse``, on by default), find their imports done. On a 2-core machine this moved
    ~2 s of worker start and imports (pyspark's worker, torch, this package) off the training stage's path
    into the time the driver spends opening MLflow (bench/peers.py's job, 2026-12-07). Best effort: a failure
    is logged at DEBUG (the stage meets it again), and ``wait`` cancels a warm-up that has not ended in time."""

    def __init__(self, spark: SparkSession, world_size: int, prepare: Callable[[], None]) -> None:
        self._sc = spark.sparkContext
        self._group = f"sparkml-dist-warmup-{uuid.uuid4().hex[:12]}"
        self._thread = threading.Thread(target=self._run, args=(world_size, prepare), daemon=True,
                                        name=self._group)  # fmt: skip

    @classmethod
    def start(cls, spark: SparkSession, world_size: int, prepare: Callable[[], None]) -> WorkerWarmup | None:
        """Start it, unless Spark would not reuse the workers it starts (then it would only cost CPU)."""
        if spark.sparkContext.getConf().get("spark.python.worker.reuse", "true").lower() == "false":
            return None
        warmup = cls(spark, world_size, prepare)
        warmup._thread.start()
        return warmup

    def _run(self, world_size: int, prepare: Callable[[], None]) -> None:
        def task(_: Iterable[int]) -> Iterable[int]:
            try:
                prepare()
            except Exception:  # noqa: BLE001 (best effort: the stage meets the same error where it matters)
                log.debug("worker warm-up failed", exc_info=True)
            return iter(())

        try:
            self._sc.setJobGroup(self._group, "sparkml-dist: start and warm the ranks' Python workers",
                                 interruptOnCancel=True)  # fmt: skip
            self._sc.parallelize(range(world_size), world_size).mapPartitions(task).collect()
        except Exception:  # noqa: BLE001 (cancelled, or the session stopped: nothing to warm any more)
            log.debug("worker warm-up did not finish", exc_info=True)

    def wait(self, timeout_s: float) -> None:
        """Let it finish (at most ``timeout_s``), so the stage's tasks get its workers; then cancel it."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.debug("worker warm-up still running after %.0f s: cancelled", timeout_s)
            self._sc.cancelJobGroup(self._group)
            self._thread.join(10)


def job_deadline(cfg: LaunchConfig, epochs: int, rows_per_rank_per_epoch: float) -> LaunchConfig:
    """``cfg`` with a finite ``job_timeout_s``: the configured one, or (when 0) start_timeout_s + epochs x
    max(collective_timeout_s, rows_per_rank_per_epoch / min_rows_per_s), linear in the rows per rank."""
    if cfg.job_timeout_s > 0:
        return cfg
    per_epoch = max(cfg.collective_timeout_s, rows_per_rank_per_epoch / cfg.min_rows_per_s)
    derived = cfg.start_timeout_s + max(1, epochs) * per_epoch
    log.info(
        "launch.job_timeout_s=0: this training stage gets %.0f s (start %.0f s + %d epoch(s) x %.0f s: %.0f rows "
        "per rank per epoch at launch.min_rows_per_s=%g, at least launch.collective_timeout_s)",
        derived, cfg.start_timeout_s, epochs, per_epoch, rows_per_rank_per_epoch, cfg.min_rows_per_s,
    )  # fmt: skip
    return dataclasses.replace(cfg, job_timeout_s=derived)


def max_attempts(spark: SparkSession, cfg: LaunchConfig) -> int:
    """launch.max_attempts, or Spark's task retry budget when it is 0 (local[N,F] -> F, local[N] -> 1)."""
    if cfg.max_attempts > 0:
        return cfg.max_attempts
    sc = spark.sparkContext
    local = re.fullmatch(r"local(?:\[(?:\d+|\*)(?:,(\d+))?\])?", sc.master or "")
    if local:
        return int(local.group(1) or 1)
    return max(1, int(sc.getConf().get(MAX_FAILURES, "4")))


def _driver_host(spark: SparkSession) -> str:
    conf = spark.sparkContext.getConf()
    return conf.get("spark.driver.bindAddress", None) or conf.get("spark.driver.host", None) or "127.0.0.1"


def _run_attempt(
    spark: SparkSession,
    fn: Callable[[RankContext], T],
    world_size: int,
    cfg: LaunchConfig,
    description: str,
    attempt: int,
    beats: heartbeat.HeartbeatServer,
    deadline: float | None,
    prepare: Callable[[int], None] | None = None,
) -> T:
    sc = spark.sparkContext
    group = f"sparkml-dist-{uuid.uuid4().hex[:12]}-a{attempt}"
    sc.setJobGroup(group, description, interruptOnCancel=True)
    task = _make_task(fn, world_size, cfg, attempt, beats.url, prepare)
    rdd = sc.parallelize(range(world_size), world_size).barrier().mapPartitions(task)  # type: ignore[arg-type]
    box: dict[str, Any] = {}

    def collect() -> None:
        try:
            sc.setJobGroup(group, description, interruptOnCancel=True)
            box["out"] = rdd.collect()
        except BaseException as exc:
            box["err"] = exc

    worker = threading.Thread(target=collect, name=group, daemon=True)
    worker.start()
    silence_warn_at = time.monotonic() + max(60.0, 2 * cfg.stall_timeout_s) if cfg.stall_timeout_s > 0 else None
    try:
        while worker.is_alive():
            worker.join(POLL_S)
            if not worker.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                sc.cancelJobGroup(group)
                worker.join(30)
                raise TimeoutError(
                    f"training stage ran longer than launch.job_timeout_s={cfg.job_timeout_s:.0f} s; cancelled. "
                    "Raise launch.job_timeout_s (0 derives it from the rows per rank and launch.min_rows_per_s) "
                    "or train on less data."
                )
            if silence_warn_at is not None and time.monotonic() > silence_warn_at:
                silence_warn_at = None  # once per attempt
                if not beats.heard_from(attempt):
                    log.warning(
                        "no rank of stage attempt %d has reached the heartbeat server at %s yet: either the stage "
                        "still waits for %d free task slots, or the executors cannot reach the driver at that "
                        "address (set spark.driver.host to one they can reach); until they do, a stalled rank "
                        "cannot be detected",
                        attempt, heartbeat.public_address(beats.url), world_size,
                    )  # fmt: skip
            outside, waiting = beats.stuck(attempt, cfg.collective_timeout_s)
            if outside:
                sc.cancelJobGroup(group)
                worker.join(30)
                raise RankFailedError(
                    f"{heartbeat.describe_stuck(outside, waiting)}: longer than launch.collective_timeout_s="
                    f"{cfg.collective_timeout_s:g}; stage attempt {attempt} cancelled. Look at that rank's "
                    "stack (py-spy dump --pid), or raise launch.collective_timeout_s if it was busy for good reason.",
                    retryable=True,
                )
            stalled = beats.stalled(attempt, cfg.stall_timeout_s) if cfg.stall_timeout_s > 0 else []
            if stalled:
                sc.cancelJobGroup(group)
                worker.join(30)
                raise RankFailedError(
                    f"{heartbeat.describe(stalled)}: stalled longer than launch.stall_timeout_s="
                    f"{cfg.stall_timeout_s:g}; stage attempt {attempt} cancelled. Check that host (load, swap, a "
                    "stopped process) or raise launch.stall_timeout_s.",
                    retryable=True,
                )
    except BaseException:
        sc.cancelJobGroup(group)
        raise
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        sc.setLocalProperty("spark.job.description", None)  # type: ignore[arg-type]
    if "err" in box:
        sc.cancelJobGroup(group)
        raise _rank_error(box["err"], beats, attempt, cfg) from box["err"]
    results = dict(box["out"])
    return results[0]


def _make_task(
    fn: Callable[[RankContext], T],
    world_size: int,
    cfg: LaunchConfig,
    attempt: int,
    beat_url: str | None,
    prepare: Callable[[int], None] | None = None,
) -> Callable[[Iterator[int]], Iterator]:
    interval = max(0.5, min(5.0, cfg.stall_timeout_s / 5)) if cfg.stall_timeout_s > 0 else 5.0

    def task(_: Iterator[int]) -> Iterator[tuple[int, Any]]:
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        hosts = [info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos()]
        host = hosts[rank]
        report: dict[str, str] = {}
        try:
            with heartbeat.beating(beat_url, attempt, rank, host, interval, report):
                try:
                    yield rank, _run_rank(fn, ctx, rank, hosts, host, world_size, cfg, attempt, prepare)
                except BaseException as exc:
                    report["failure"] = _failure_text(rank, host, exc)
                    raise
        except BaseException as exc:
            raise RuntimeError(report.get("failure") or _failure_text(rank, host, exc)) from None

    return task


def _failure_text(rank: int, host: str, exc: BaseException) -> str:
    """A rank's error as the text the driver parses (Spark hands it only text): say here, by type, whether the
    error is the user's. Call inside the ``except`` that caught ``exc`` (it formats the live traceback)."""
    user = f"{_USER_MARK} {type(exc).__name__}: {exc}\n" if isinstance(exc, UserError) else ""
    return f"{_FAILURE_MARK}: rank {rank} on {host}\n{user}{traceback.format_exc()}"


def _run_rank(
    fn: Callable[[RankContext], T],
    ctx: Any,
    rank: int,
    hosts: list[str],
    host: str,
    world_size: int,
    cfg: LaunchConfig,
    attempt: int,
    prepare: Callable[[int], None] | None = None,
) -> T | None:
    heartbeat.dump_stacks_on_signal()  # kill -USR1 <worker pid>: this rank's stacks in the executor's log
    if prepare is not None:
        _prepare(prepare, rank)
    plan = host_plan(hosts)
    engine = build_engine(cfg)
    engine.check_hosts(hosts, host)
    rendezvous = None
    try:
        if rank == 0:
            rendezvous = engine.serve(host, hosts, plan)
        gathered = ctx.allGather(rendezvous.address if rendezvous is not None else "")
        slot = plan[rank]
        cpus = int(ctx.getLocalProperty("spark.task.cpus") or os.environ.get("SPARK_TASK_CPUS", "1") or 1)
        device = _pick_device(ctx, cfg)
        import torch

        torch.set_num_threads(max(1, cpus))
        comm = engine.join(gathered[0], slot, host, device)
        try:
            result = fn(RankContext(rank, world_size, slot.local_rank, slot.local_size, slot.cross_rank,
                                    slot.cross_size, host, attempt, device, cpus, comm))  # fmt: skip
        finally:
            engine.leave()  # a rank other than 0 marks in the rendezvous that it left
        if rendezvous is not None and not rendezvous.wait_left(world_size, cfg.collective_timeout_s):
            log.warning(
                "rank 0: not every rank marked leaving the group within launch.collective_timeout_s=%g; stopping "
                "the rendezvous anyway (the stage fails if one of them did)", cfg.collective_timeout_s,
            )  # fmt: skip
        return result if rank == 0 else None
    finally:
        if rendezvous is not None:
            rendezvous.close()


def _prepare(prepare: Callable[[int], None], rank: int) -> None:
    try:
        prepare(rank)
    except Exception:  # noqa: BLE001 (best effort: the rank function meets the same error where it matters)
        log.debug("rank %d: preparing before the group forms failed", rank, exc_info=True)


def _pick_device(ctx: Any, cfg: LaunchConfig) -> str:
    if not cfg.use_gpu:
        return "cpu"
    gpus = ctx.resources().get("gpu")
    if gpus is None or not gpus.addresses:
        raise LaunchError(
            "launch.use_gpu=true but the task has no GPU: submit with spark.task.resource.gpu.amount=1 "
            "and spark.executor.resource.gpu.amount"
        )
    import torch

    index = int(gpus.addresses[0])
    torch.cuda.set_device(index)
    return f"cuda:{index}"


# A peer's death or stop surfaces on the other ranks as one of these (Gloo/Horovod), and in Spark as a
# crashed Python worker or a lost executor: the infrastructure's failures, worth a retry.
_LOST_MARKS = ("Python worker exited unexpectedly", "ExecutorLostFailure", "worker lost", "Connection reset by peer")
_COMM_MARKS = (
    "HorovodInternalError",
    "Horovod has been shut down",
    "DistBackendError",
    "DistNetworkError",
    "gloo",
    "Gloo",
    "Connection closed by peer",
    "Timed out waiting",
)
_TASK = re.compile(r"barrier task \w*Task\(\d+, (\d+)\)")


def _lost_rank(rank: int, beat: heartbeat.Beat | None) -> str:
    """'rank N on host (pid, last step): its process was lost ...', from its last heartbeat where there is one."""
    where = f"{beat.host} (pid {beat.pid}, last heartbeat at step {beat.step})" if beat else "its host"
    return f"rank {rank} on {where}: its process was lost (killed, out of memory, or its executor died)"


def _is_peer_loss(failure: str) -> bool:
    return any(m in failure for m in _COMM_MARKS + _LOST_MARKS)


def _cause(beats: heartbeat.HeartbeatServer, attempt: int, body: str, wait_s: float = 3.0) -> str:
    """The failure to report when Spark's first failed task only lost its peer (``body``): another rank's own
    error (a ValueError, a UserError), as its final heartbeat carried it, if one arrives within ``wait_s``.

    The rank that raised first closes its connections before its task ends, so a peer's 'connection reset'
    often reaches the driver first; without this the run would name the wrong rank and the wrong error.
    """
    deadline = time.monotonic() + wait_s
    while True:
        for beat in sorted(beats.beats(attempt).values(), key=lambda b: b.rank):
            failure = beat.failure or ""
            at = failure.find(_FAILURE_MARK)
            if at >= 0 and not _is_peer_loss(failure):
                return failure[at + len(_FAILURE_MARK) + 2 :]
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    # No rank reported an error of its own: one that never said it was done and has been silent all this
    # while is the one that died (SIGKILL, out of memory) and took its peers' connections with it.
    lost = [b for b in beats.beats(attempt).values() if not b.done and b.age_s >= wait_s]
    if lost:
        b = min(lost, key=lambda b: b.rank)
        return f"{_lost_rank(b.rank, b)}; its peer reported:\n{body}"
    return body


def _rank_error(exc: BaseException, beats: heartbeat.HeartbeatServer, attempt: int, cfg: LaunchConfig) -> BaseException:
    """The stage's failure as a RankFailedError naming the rank and host (and whether a retry may help)."""
    text = str(exc)
    silent = beats.stalled(attempt, max(2.0, min(cfg.stall_timeout_s or 10.0, 10.0)))
    stall_note = f"\n(heartbeats: {heartbeat.describe(silent)})" if silent else ""
    at = text.find(_FAILURE_MARK)
    if at >= 0:
        body = text[at + len(_FAILURE_MARK) + 2 :]
        end = body.find("\n\tat org.apache.spark")
        body = body[:end] if end > 0 else body
        if _is_peer_loss(body):
            body = _cause(beats, attempt, body)
        where, _, rest = body.partition("\n")
        if rest.startswith(_USER_MARK):
            message, _, details = rest[len(_USER_MARK) :].strip().partition("\n")
            return RankUserError(f"{where}: {message}", details)
        retryable = bool(silent) or _is_peer_loss(body)
        return RankFailedError(body + stall_note, retryable=retryable)
    if any(m in text for m in _LOST_MARKS):
        found = _TASK.search(text)
        rank = int(found.group(1)) if found else -1
        return RankFailedError(
            f"{_lost_rank(rank, beats.beats(attempt).get(rank))}{stall_note}\n{text.splitlines()[0] if text else ''}",
            retryable=True,
        )
    return exc
