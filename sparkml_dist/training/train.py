"""Data-parallel training (``train.mode=data_parallel``): every rank holds the whole model and reads its own
sample shard; the communication strategy (``comm.strategy``) combines the ranks' work.

Every rank runs the same number of steps per epoch (the loader guarantees it), so no collective waits for
a rank that ran out of data. Rank 0 writes the checkpoint (model, optimizer, history, every rank's
communication state) after each epoch. The loop itself is ``loop.run_rank``; ``train_rank`` is its name
for callers of the barrier launcher. Runs inside ranks; never imports pyspark.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkml_dist import registry
from sparkml_dist.comm import Strategy, build_strategy
from sparkml_dist.comm.rows import clip_grad_norm, densify_before_step, row_sparse_choice, set_row_sparse
from sparkml_dist.data.sparse import to_tensor
from sparkml_dist.errors import UserError
from sparkml_dist.experiments import tracking
from sparkml_dist.metrics import batch_sums, empty_sums
from sparkml_dist.runtime.rank import Collectives, RankContext
from sparkml_dist.training import checkpoint
from sparkml_dist.training.device import Placement
from sparkml_dist.training.loader import Batch, build_loader_spec, iterate_batches, read_all
from sparkml_dist.training.loop import (
    MODES,
    ResumePoint,
    TrainJob,
    Workload,
    epoch_seed,
    lr_at,
    run_rank,
    whole_optimizer_steps,
)
from sparkml_dist.training.models import SparseLinear, build_model, loss_fn, predictions
from sparkml_dist.training.readers.cache import build_cache
from sparkml_dist.training.sparse_optim import RowSparseOptimizer

__all__ = [
    "DataParallel",
    "TrainJob",
    "epoch_seed",
    "evaluate",
    "lr_at",
    "prepare_rank",
    "prepare_worker",
    "train_rank",
    "whole_optimizer_steps",
]

log = logging.getLogger("sparkml_dist.train")  # its pre-move name: logging configs keep working
MODE = "data_parallel"


@MODES.register(MODE)
class DataParallel(Workload):
    def __init__(self, ctx: RankContext, job: TrainJob, comm: Collectives, place: Placement) -> None:
        super().__init__(ctx, job, comm, place)
        cfg, m = job.cfg, job.manifest
        self.model = place.module(build_model(cfg, m.num_features, m.num_classes, m.sparse is not None))
        layers = sum(isinstance(mod, SparseLinear) for mod in self.model.modules())
        on, why = row_sparse_choice(cfg, job.comm, m.sparse is not None, layers)
        self.row_sparse = set_row_sparse(self.model, on)
        if ctx.master and (on or cfg.sparse_gradients != "off") and m.sparse is not None:
            log.info("gradients: %s", why)
        self.steps = whole_optimizer_steps(cfg, job.steps_per_epoch)
        spec = build_loader_spec(m, ctx.rank, ctx.world_size, cfg, split="train")
        self.train_spec = dataclasses.replace(spec, steps=self.steps)
        self.cache = build_cache(self.train_spec, cfg.cache, cfg.cache_max_mb, ctx.local_size)
        if self.cache is not None:
            seconds = self.cache.fill()
            log.info("rank %d: %s decoded into memory in %.2f s (%.1f MB)", ctx.rank, self.train_spec.shard,
                     seconds, self.cache.nbytes / 2**20)  # fmt: skip
        self.val_x, self.val_y = read_all(build_loader_spec(m, ctx.rank, ctx.world_size, cfg, split="validation"))

    def build_strategy(self) -> Strategy:
        return build_strategy(self.job.comm, self.comm, list(self.model.parameters()), self.row_sparse)

    def prepare_optimizer(self, opt: torch.optim.Optimizer) -> None:
        if self.row_sparse and not isinstance(opt, RowSparseOptimizer):
            densify_before_step(opt)  # e.g. adam: the rows travel, the step is dense

    def clip(self, max_norm: float) -> None:
        if self.row_sparse:
            clip_grad_norm(self.model.parameters(), max_norm)
        else:
            super().clip(max_norm)

    def resume(self, opt: torch.optim.Optimizer) -> ResumePoint:
        job = self.job
        point = None
        if self.ctx.master and job.cfg.checkpoint:
            state = checkpoint.load_latest(job.checkpoint_url, self.place.load)
            if state is not None:
                if state.get("mode", MODE) != MODE:
                    raise UserError(
                        f"{job.checkpoint_url} holds a {state['mode']} checkpoint: resume it with "
                        f"train.mode={state['mode']}, or start a new run (drop train.resume_run_id)"
                    )
                self.model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                comm_states = state.get("comm") if state.get("comm_spec") == _comm_spec(job) else None
                if state.get("comm") and comm_states is None:
                    log.warning("checkpoint's communication state is for %s; starting it fresh", state.get("comm_spec"))
                step = int(state.get("data_position", {}).get("step", 0))
                point = ResumePoint(int(state["epoch"]), list(state["history"]), comm_states, step)
        return self.comm.broadcast_object(point or ResumePoint(), root=0, name="resume_point")

    def broadcast(self, opt: torch.optim.Optimizer, resumed: bool) -> None:
        self.comm.broadcast_(list(self.model.state_dict().values()), root=0, name="params")
        if resumed:  # fresh optimizers are equal everywhere; a restored one lives on rank 0 only
            state = self.comm.broadcast_object(opt.state_dict() if self.ctx.master else None, root=0, name="opt")
            if not self.ctx.master and state is not None:
                # deep copy: in-process ranks (threads) receive rank 0's very state dict, and load_state_dict
                # keeps its tensors, so without it two ranks would update one set of moments in place
                opt.load_state_dict(copy.deepcopy(state))

    def batches(self, epoch: int) -> AbstractContextManager[Iterator[Batch]]:
        return iterate_batches(self.train_spec, epoch, self.cache)

    def loss(self, batch: Batch, where: str) -> tuple[torch.Tensor, int]:
        x, y = self.place.batch(*batch)
        return loss_fn(self.model(x), y), len(y)

    def evaluate(self, epoch: int) -> np.ndarray:
        m = self.job.manifest
        own = evaluate(self.model, self.val_x, self.val_y, m.num_classes, self.place)
        return self.comm.allreduce(torch.from_numpy(own), average=False, name=f"val.{epoch}").numpy()

    def save(
        self,
        epoch: int,
        opt: torch.optim.Optimizer,
        history: list[dict[str, Any]],
        comm_states: list[Any],
        step: int = 0,
    ) -> None:
        job = self.job
        if not (self.ctx.master and job.cfg.checkpoint):
            return
        payload = {
            "mode": MODE,
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "history": history,
            "run_id": job.run.run_id,
            "rng": torch.get_rng_state(),
            "data_position": {"epoch": epoch, "step": step},
            "comm": comm_states,
            "comm_spec": _comm_spec(job),
        }
        checkpoint.save_checkpoint(job.checkpoint_url, epoch, payload, step)

    def result(self, history: list[dict[str, Any]], start_epoch: int) -> dict[str, Any]:
        return {
            "state_dict": {name: t.detach().cpu().numpy() for name, t in self.model.state_dict().items()},
            "history": history,
            "start_epoch": start_epoch,
            "steps_per_epoch": self.steps,
        }


def _comm_spec(job: TrainJob) -> str:
    """Which strategy and compressor a checkpoint's communication state belongs to."""
    return f"{job.comm.strategy}/{job.comm.compression}"


def evaluate(
    model: nn.Module,
    x: Any,
    y: np.ndarray,
    num_classes: int,
    place: Placement | None = None,
    batch: int = 65536,
) -> np.ndarray:
    """Additive metric sums (see metrics.batch_sums) of ``model`` on (x, y) (x dense, or ``SparseRows``);
    chunks moved by ``place``."""
    place = place or Placement()
    model.eval()
    total = empty_sums(num_classes)
    with torch.no_grad():
        for i in range(0, len(y), batch):
            (chunk,) = place.batch(to_tensor(x[i : i + batch]))
            preds = predictions(model(chunk), num_classes).double().cpu().numpy()
            total = total + batch_sums(preds, y[i : i + batch], num_classes)
    model.train()
    return total


def train_rank(ctx: RankContext, job: TrainJob) -> dict[str, Any] | None:
    """The rank function the launcher runs: the one loop, for the mode in ``job.cfg.mode``."""
    return run_rank(ctx, job)


def prepare_worker() -> None:
    """What ``WorkerWarmup`` runs in each Python worker before the training stage: ``prepare_rank``'s work
    that needs no rank. Not MLflow: any worker may become rank 0, and every worker opening it while the
    driver does made the job slower (3 alternating pairs, 2026-12-07: 20.6-22.2 s against 19.2-21.0 s)."""
    registry.load("modes")
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def prepare_rank(rank: int, job: TrainJob) -> None:
    """What a rank does before the group forms (``run_on_ranks(prepare=...)``), each measured on the peers
    benchmark's job (2 cores): import the training modes; build a throwaway optimizer, since torch's first
    optimizer imports its compiler stack (~1 s, torch 2.13); and on rank 0, the one that logs, open the run's
    MLflow client (~1.3 s, done at rank 0's first epoch end it held every other rank at the next allreduce)."""
    prepare_worker()  # quick in a worker WorkerWarmup ran in: its imports are done
    if rank == 0:
        tracking.warm(job.run)
