"""The one training loop every rank runs, whatever the mode and the communication strategy.

    resume -> broadcast -> for each epoch: steps -> sync -> validation -> checkpoint -> metrics
    (every step: heartbeat progress, fault injection, lr schedule, forward/backward, strategy update)

Two things vary, each behind a small interface and a registry:

- the **mode** (``train.mode``, ``MODES``): which model a rank holds and which rows it reads, how a batch's
  loss is formed, validation, checkpoints and what rank 0 returns. ``data_parallel`` (``train.py``): the
  whole model, a sample shard per rank. ``feature_parallel`` (``feature_parallel.py``): a weight block and
  a column group per rank.
- the **communication strategy** (``comm.strategy``, ``comm.STRATEGIES``): what happens between "local
  gradients computed" and "parameters updated", and at the epoch's sync point.

Resume is exact at epoch boundaries: the data order and the dropout RNG of an epoch are functions of
(seed, epoch, rank), strategies sync every epoch, and checkpoints hold model, optimizer, history and each
rank's communication state. Runs inside ranks; never imports pyspark.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkml_dist import registry
from sparkml_dist.comm import Strategy
from sparkml_dist.config import CommConfig, LaunchConfig, TrainConfig
from sparkml_dist.data.manifest import Manifest
from sparkml_dist.errors import UserError
from sparkml_dist.experiments import tracking
from sparkml_dist.metrics import summarize
from sparkml_dist.registry import Registry
from sparkml_dist.runtime import faults, heartbeat
from sparkml_dist.runtime.rank import Collectives, Meter, RankContext
from sparkml_dist.training.device import Placement
from sparkml_dist.training.models import build_optimizer

log = logging.getLogger("sparkml_dist.loop")  # its pre-move name: logging configs keep working
_INIT_LOCK = threading.Lock()
"""Held while a rank seeds torch and builds its model. Ranks of the in-process backend are threads of one
process: without it, rank 1's seeding could land between rank 0's seeding and its draws, and rank 0 (whose
weights the broadcast gives everyone) would start from other weights than a barrier-stage run (seen as a
flaky test_in_process_backend_runs_the_same_loop_with_the_device_check_on, ~1 run in 3)."""


@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs, built on the driver and shipped with the task."""

    cfg: TrainConfig
    launch: LaunchConfig
    manifest: Manifest
    run: tracking.RunHandle
    checkpoint_url: str
    steps_per_epoch: int
    comm: CommConfig = field(default_factory=CommConfig)
    system_metrics_s: float = 0.0
    """tracking.system_metrics_s: each rank's host metrics sampling interval (0: off)."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a rank starts: the same on every rank (rank 0 reads it and broadcasts it)."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    comm_states: list[dict[str, Any]] | None = None
    """Each rank's strategy state (rank order), when the checkpoint holds it."""
    step: int = 0
    """Batches of epoch ``epoch`` already done (a mid-epoch checkpoint): the stream is skipped to there."""


class Workload(ABC):
    """What a training mode decides; the loop does the rest. Built on every rank after ``torch.manual_seed``."""

    model: nn.Module
    """The module this rank trains (the whole model, or its block), on the rank's device."""
    steps: int
    """Batches per epoch: equal on every rank, whole optimizer steps."""
    same_rows: bool = False
    """Every rank sees the same rows (feature-parallel): its train loss is the global one, not a share."""

    def __init__(self, ctx: RankContext, job: TrainJob, comm: Collectives, place: Placement) -> None:
        self.ctx, self.job, self.comm, self.place = ctx, job, comm, place

    @abstractmethod
    def build_strategy(self) -> Strategy:
        """The communication strategy over this rank's parameters."""

    @abstractmethod
    def resume(self, opt: torch.optim.Optimizer) -> ResumePoint:
        """Load the newest checkpoint into the model and ``opt`` (every rank calls it)."""

    def broadcast(self, opt: torch.optim.Optimizer, resumed: bool) -> None:
        """Make every rank start from rank 0's parameters (and optimizer state when resumed)."""
        return None

    @abstractmethod
    def batches(self, epoch: int) -> AbstractContextManager[Iterator[Any]]:
        """Exactly ``steps`` batches of this epoch; the reader is closed on exit."""

    @abstractmethod
    def loss(self, batch: Any, where: str) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch, rows) for a batch from ``batches``; moves it with ``self.place``."""

    @abstractmethod
    def evaluate(self, epoch: int) -> np.ndarray:
        """Metric sums over every validation row, the same on every rank (``metrics.batch_sums``)."""

    def prepare_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Called once with the freshly built optimizer (e.g. to densify row-sparse gradients for it)."""
        return None

    def clip(self, max_norm: float) -> None:
        """Clip this rank's gradient to a global norm of ``max_norm``."""
        nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def dense_ring_bytes(self) -> float:
        """Reference: what a dense fp32 ring allreduce of the gradient moves per rank per step, 2(K-1)/K x 4D."""
        k = self.ctx.world_size
        return 2 * (k - 1) / k * 4 * sum(p.numel() for p in self.model.parameters())

    @abstractmethod
    def save(
        self,
        epoch: int,
        opt: torch.optim.Optimizer,
        history: list[dict[str, Any]],
        comm_states: list[Any],
        step: int = 0,
    ) -> None:
        """The checkpoint after ``epoch`` finished epochs and ``step`` batches of the next (every rank calls
        it; the last epoch included); ``comm_states``: every rank's ``_rank_state``."""

    @abstractmethod
    def result(self, history: list[dict[str, Any]], start_epoch: int) -> dict[str, Any]:
        """What rank 0 returns to the driver."""


MODES: Registry[type[Workload]] = Registry("training mode", "train.mode")


def whole_optimizer_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Batches per epoch rounded down to whole optimizer steps of ``backward_passes_per_step`` batches each."""
    k = cfg.backward_passes_per_step
    steps = (steps_per_epoch // k) * k
    if steps == 0:
        raise UserError(
            f"train.backward_passes_per_step={k} exceeds the {steps_per_epoch} steps per epoch: lower it "
            "or train.batch_size"
        )
    return steps


def lr_at(cfg: TrainConfig, world_size: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: optionally scaled by world size, with linear warm-up to it."""
    if not cfg.scale_lr_by_world_size:
        return cfg.lr
    target = cfg.lr * world_size
    warmup = cfg.warmup_epochs * steps_per_epoch
    if warmup <= 0 or step >= warmup:
        return target
    return cfg.lr + (target - cfg.lr) * step / warmup


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**31)


@dataclass
class _EpochClock:
    data_s: float = 0.0
    loop_s: float = 0.0
    checkpoint_s: float = 0.0
    """Seconds spent writing mid-epoch checkpoints (their rank-state gather included)."""
    eval_s: float = 0.0
    """Seconds spent in mid-epoch evaluations (``train.eval_every_steps``)."""
    eval_traffic: Meter = field(default_factory=Meter)
    """What the mid-epoch evaluations' collectives moved: left out of the epoch's communication figures."""
    started: float = 0.0
    """When the epoch began (perf_counter), for the elapsed time a mid-epoch evaluation is logged with."""
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))


def run_rank(ctx: RankContext, job: TrainJob) -> dict[str, Any] | None:
    """Train this rank's part for ``job``; rank 0 returns the mode's result (state, history, timing)."""
    cfg = job.cfg
    comm = ctx.collectives()
    place = Placement(ctx.device, strict=job.launch.device_check)
    with _INIT_LOCK:  # seed and draw together: in-process ranks are threads sharing torch's one RNG
        torch.manual_seed(cfg.seed)  # the same initial weights everywhere (the broadcast makes sure)
        work = registry.load("modes").get(cfg.mode)(ctx, job, comm, place)  # imports every mode's module
    opt = build_optimizer(cfg, work.model)
    work.prepare_optimizer(opt)
    strategy = work.build_strategy()
    point = work.resume(opt)
    work.broadcast(opt, resumed=point.epoch > 0)
    _load_rank_state(strategy, opt, point, ctx.rank)
    if ctx.master and (point.epoch > 0 or point.step > 0):
        _note_resume(job.run, point.history, point.epoch, ctx.attempt, point.epoch * work.steps + point.step)
    strategy.start()
    clip: Callable[[], None] | None = (lambda: work.clip(cfg.grad_clip_norm)) if cfg.grad_clip_norm > 0 else None
    history = list(point.history)
    # CPU, memory, disk and network are the host's, the same for every rank on it: one rank per host samples
    # them (its first local rank), so the others never load MLflow and its store (~2 s of CPU in each at its
    # first sample, which stalled every rank's epoch on 2 cores; bench/peers.py, 2026-12-06). A rank on a GPU
    # samples too, for its own device's memory.
    sampler = ctx.local_rank == 0 or ctx.device != "cpu"
    with tracking.system_metrics(job.run, f"rank{ctx.rank}", job.system_metrics_s if sampler else 0.0):
        _run_epochs(ctx, job, work, strategy, opt, clip, point, history)
    return work.result(history, point.epoch) if ctx.master else None


def _run_epochs(
    ctx: RankContext,
    job: TrainJob,
    work: Workload,
    strategy: Strategy,
    opt: torch.optim.Optimizer,
    clip: Callable[[], None] | None,
    point: ResumePoint,
    history: list[dict[str, Any]],
) -> None:
    cfg, comm = job.cfg, work.comm
    for epoch in range(point.epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, ctx.rank))
        started = time.perf_counter()
        before, rounds_before = comm.meter.snapshot(), strategy.rounds
        clock, start_step = _EpochClock(started=started), 0
        if epoch == point.epoch and point.step > 0:  # a mid-epoch checkpoint: same RNG, same partial loss
            start_step = point.step
            states = point.comm_states or []
            mine = states[ctx.rank] if ctx.rank < len(states) else {}
            if mine.get("rng") is not None:
                torch.set_rng_state(mine["rng"])
            if mine.get("loss_sum") is not None:
                clock.loss_sum = mine["loss_sum"].clone()
        clock = _run_steps(ctx, job, work, strategy, opt, clip, epoch, clock, start_step, history)
        strategy.sync(opt)
        traffic = comm.meter.since(before).since(clock.eval_traffic)  # training's traffic only
        loop_s = time.perf_counter() - started
        val = work.evaluate(epoch)
        train = comm.allreduce(clock.loss_sum, average=work.same_rows, name=f"train_loss.{epoch}")
        per_step = torch.tensor(
            [clock.data_s, loop_s - clock.data_s - traffic.seconds - clock.checkpoint_s - clock.eval_s,
             traffic.seconds, traffic.payload_bytes, traffic.wire_bytes, clock.checkpoint_s, peak_rss_mb(),
             clock.eval_s],
            dtype=torch.float64,
        )  # fmt: skip
        mean = comm.allreduce(per_step, average=True, name=f"epoch_stats.{epoch}").tolist()
        seconds = time.perf_counter() - started
        rounds = strategy.rounds - rounds_before or traffic.calls
        metrics = epoch_metrics(epoch, train, seconds, summarize(val, job.manifest.num_classes), mean, work,
                                opt, ctx, history, rounds)  # fmt: skip
        history.append(metrics)
        states = comm.allgather_object(_rank_state(strategy, opt), name=f"rank_state.{epoch}") if cfg.checkpoint else []
        # Checkpoint first, then log: a crash in between leaves the epoch unlogged, and the resumed
        # attempt logs it from the checkpoint's history (_note_resume): never the same step twice.
        work.save(epoch + 1, opt, history, states)
        if ctx.master:
            tracking.log_metrics(job.run, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)


def _run_steps(
    ctx: RankContext,
    job: TrainJob,
    work: Workload,
    strategy: Strategy,
    opt: torch.optim.Optimizer,
    clip: Callable[[], None] | None,
    epoch: int,
    clock: _EpochClock,
    start_step: int,
    history: list[dict[str, Any]],
) -> _EpochClock:
    cfg, steps, k = job.cfg, work.steps, job.cfg.backward_passes_per_step
    every = cfg.checkpoint_every_steps if cfg.checkpoint else 0
    due = eval_due = False
    work.model.train()
    with work.batches(epoch) as batches:
        it = iter(batches)
        for step in range(steps):
            global_step = epoch * steps + step
            heartbeat.progress(global_step)  # the driver's stall watch sees it
            if step < start_step:  # resuming mid-epoch: the seeded stream, skipped to the checkpoint's position
                next(it)
                continue
            faults.maybe_inject(job.launch, ctx.rank, ctx.attempt, global_step)
            t0 = time.perf_counter()
            batch = next(it)
            clock.data_s += time.perf_counter() - t0
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, ctx.world_size, global_step, steps)
            loss, rows = work.loss(batch, f"rank {ctx.rank}, epoch {epoch + 1}, step {step}")
            (loss / k).backward()
            if (step + 1) % k == 0:
                strategy.update(opt, clip, global_step // k)
                opt.zero_grad()
            clock.loss_sum += torch.tensor([loss.item() * rows, rows], dtype=torch.float64)
            # every rank holds the same parameters, and the epoch's end (which evaluates and checkpoints) is not next
            in_sync = (step + 1) % k == 0 and strategy.in_sync and step + 1 < steps
            eval_due = eval_due or bool(cfg.eval_every_steps and (step + 1) % cfg.eval_every_steps == 0)
            if eval_due and in_sync:
                eval_due = False
                _evaluate_mid_epoch(ctx, job, work, epoch, epoch * steps + step + 1, clock, history)
            due = due or bool(every and (step + 1) % every == 0)
            if due and in_sync:
                due = False
                t_save = time.perf_counter()
                name = f"rank_state.{epoch}.{step + 1}"
                states = work.comm.allgather_object(_rank_state(strategy, opt, clock), name=name)
                work.save(epoch, opt, history, states, step=step + 1)
                clock.checkpoint_s += time.perf_counter() - t_save
    return clock


def _evaluate_mid_epoch(
    ctx: RankContext,
    job: TrainJob,
    work: Workload,
    epoch: int,
    global_step: int,
    clock: _EpochClock,
    history: list[dict[str, Any]],
) -> None:
    """Every rank: score the validation split with the parameters every rank holds now; rank 0 logs it as
    ``step_val_*`` at ``global_step`` with the training seconds so far (``step_elapsed_s``, this evaluation
    included, as an epoch's ``elapsed_s`` includes its own)."""
    t0, before = time.perf_counter(), work.comm.meter.snapshot()
    scores = summarize(work.evaluate(epoch), job.manifest.num_classes)
    work.model.train()
    clock.eval_s += time.perf_counter() - t0
    clock.eval_traffic = clock.eval_traffic.plus(work.comm.meter.since(before))
    if ctx.master:
        elapsed = sum(h["epoch_s"] for h in history) + time.perf_counter() - clock.started
        metrics = {f"step_val_{k}": v for k, v in scores.items() if k != "rows"}
        tracking.log_metrics(job.run, {**metrics, "step_elapsed_s": elapsed, "step_epoch": float(epoch + 1)},
                             step=global_step)  # fmt: skip


def epoch_metrics(
    epoch: int,
    train: torch.Tensor,
    seconds: float,
    scores: dict[str, float],
    mean: list[float],
    work: Workload,
    opt: torch.optim.Optimizer,
    ctx: RankContext,
    history: list[dict[str, Any]],
    rounds: int,
) -> dict[str, Any]:
    """One epoch's tracked metrics, the same keys for every mode and strategy.

    ``scores``: metrics.summarize of the validation split; ``mean``: [data wait s, compute s, communication s,
    payload bytes, ring wire bytes, mid-epoch checkpoint s, peak RSS MB, mid-epoch evaluation s] of the
    epoch's steps, averaged over ranks.
    """
    data_s, compute_s, comm_s, payload, wire, checkpoint_s, peak_rss, eval_s = mean
    steps = work.steps
    return {
        "epoch": epoch + 1,
        "train_loss": float(train[0] / train[1]),
        **{f"val_{k}": v for k, v in scores.items() if k != "rows"},
        "rows_per_s": float(train[1]) / seconds,
        "epoch_s": seconds,
        "data_wait_s": data_s,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "checkpoint_s": checkpoint_s,
        "mid_epoch_eval_s": eval_s,
        "lr": float(opt.param_groups[0]["lr"]),
        "attempt": float(ctx.attempt),
        "elapsed_s": sum(h["epoch_s"] for h in history) + seconds,
        # measured: the payload handed to the collectives per step, and what a ring moves per rank for it
        "comm_bytes_per_step": payload / steps,
        "comm_wire_bytes_per_rank_per_step": wire / steps,
        "comm_rounds": float(rounds),
        # the reference: a dense fp32 ring allreduce of the whole gradient every step, 2(K-1)/K x D
        "ring_bytes_per_rank_per_step": work.dense_ring_bytes(),
        # the rank process's peak resident memory so far (its high-water mark), averaged over ranks
        "rank_peak_rss_mb": peak_rss,
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (``getrusage``: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _rank_state(strategy: Strategy, opt: torch.optim.Optimizer, clock: _EpochClock | None = None) -> dict[str, Any]:
    """What only this rank holds and a checkpoint needs: its strategy's state (e.g. error-feedback residuals)
    and, for strategies whose ranks step their own optimizers (local SGD), its optimizer state; mid-epoch
    (``clock``) also its RNG state and the epoch's partial loss sum."""
    state: dict[str, Any] = {"comm": strategy.state_dict()}
    state["optimizer"] = opt.state_dict() if strategy.rank_local_optimizer else None
    if clock is not None:
        state.update(rng=torch.get_rng_state(), loss_sum=clock.loss_sum.clone())
    return state


def _load_rank_state(strategy: Strategy, opt: torch.optim.Optimizer, point: ResumePoint, rank: int) -> None:
    if not point.comm_states:
        return
    if len(point.comm_states) <= rank:
        log.warning("checkpoint holds the state of %d ranks; rank %d starts fresh", len(point.comm_states), rank)
        return
    state = point.comm_states[rank]
    strategy.load_state_dict(state.get("comm", {}))
    if state.get("optimizer") is not None:
        opt.load_state_dict(state["optimizer"])


def _note_resume(
    run: tracking.RunHandle, history: list[dict[str, Any]], start_epoch: int, attempt: int, global_step: int
) -> None:
    """One continuous metric history across restarts: log the checkpoint's epochs MLflow lacks, then mark
    the restart with ``resumed_from_epoch`` (and the batch, ``resumed_from_step``) at the epoch it resumed in."""
    try:
        logged = {step for step, _ in tracking.metric_history(run, "train_loss")}
    except Exception:
        if not tracking.in_outage(run):
            raise
        logged = {int(h["epoch"]) for h in history}  # the tracker is away: the earlier attempt logged or kept them
    for h in history:
        if int(h["epoch"]) not in logged:
            tracking.log_metrics(run, {k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
    note = {
        "resumed_from_epoch": float(start_epoch),
        "resumed_from_step": float(global_step),
        "restart_attempt": float(attempt),
    }
    tracking.log_metrics(run, note, step=start_epoch)
