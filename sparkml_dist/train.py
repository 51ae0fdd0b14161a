"""The loop that runs inside one barrier task: Petastorm batches -> PyTorch -> Horovod ring-AllReduce.

Every rank runs the same number of steps per epoch (the loader guarantees it), so no collective waits
for a rank that ran out of data. Only rank 0 (``master``) writes checkpoints and logs metrics.
Resume is exact at epoch boundaries: the data order and the dropout RNG of an epoch are functions of
(seed, epoch, rank), and the checkpoint holds model, optimizer and the metric history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkml_dist import checkpoint, faults, heartbeat, tracking
from sparkml_dist.config import LaunchConfig, TrainConfig
from sparkml_dist.loader import build_loader_spec, iterate_batches, read_all
from sparkml_dist.manifest import Manifest
from sparkml_dist.metrics import batch_sums, empty_sums, summarize
from sparkml_dist.models import build_model, loss_fn, predictions


@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs, built on the driver and shipped with the task."""

    cfg: TrainConfig
    launch: LaunchConfig
    manifest: Manifest
    run: tracking.RunHandle
    checkpoint_url: str
    steps_per_epoch: int


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def whole_optimizer_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Batches per epoch rounded down to whole optimizer steps of ``backward_passes_per_step`` batches each."""
    k = cfg.backward_passes_per_step
    steps = (steps_per_epoch // k) * k
    if steps == 0:
        raise ValueError(
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


def epoch_metrics(
    epoch: int,
    loss_sum: float,
    rows: float,
    seconds: float,
    scores: dict[str, float],
    timing: Any,
    opt: torch.optim.Optimizer,
    ctx: Any,
    history: list[dict[str, Any]],
    bytes_per_step: float,
    world: int,
) -> dict[str, Any]:
    """One epoch's tracked metrics, the same keys for every trainer. ``scores``: metrics.summarize of the
    validation split (val_log_loss, val_accuracy, val_auc; for regression val_mse, val_rmse, val_mae,
    val_r2). ``timing``: (data wait, compute, allreduce) seconds averaged over ranks; ``bytes_per_step``:
    what one step sends into the allreduce."""
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / rows,
        **{f"val_{k}": v for k, v in scores.items() if k != "rows"},
        "rows_per_s": rows / seconds,
        "epoch_s": seconds,
        "data_wait_s": float(timing[0]),
        "compute_s": float(timing[1]),
        "allreduce_s": float(timing[2]),
        "lr": float(opt.param_groups[0]["lr"]),
        "attempt": float(getattr(ctx, "attempt", 0)),
        "elapsed_s": sum(h["epoch_s"] for h in history) + seconds,
        # ... and what the ring moves per rank for it
        "allreduce_bytes_per_step": float(bytes_per_step),
        "ring_bytes_per_rank_per_step": float(bytes_per_step * 2 * (world - 1) / world),
    }


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**31)


def train_rank(ctx: Any, job: TrainJob) -> dict[str, Any] | None:
    """Train on this rank's shard; rank 0 returns the final state, history and timing to the driver."""
    import horovod.torch as hvd

    cfg, m = job.cfg, job.manifest
    rank, world = ctx.rank, ctx.world_size
    master = rank == 0
    device = torch.device(getattr(ctx, "device", "cpu"))
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (broadcast below makes sure)
    model = build_model(cfg, m.num_features, m.num_classes).to(device)
    base_opt = make_optimizer(cfg, model)
    k = cfg.backward_passes_per_step
    steps = whole_optimizer_steps(cfg, job.steps_per_epoch)

    compression = hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none
    # DistributedOptimizer builds a new optimizer over base_opt's param groups (not its state), so
    # checkpointed optimizer state is loaded into the wrapped one.
    opt = hvd.DistributedOptimizer(
        base_opt,
        named_parameters=model.named_parameters(),
        compression=compression,
        backward_passes_per_step=k,
        op=hvd.Average,
    )
    start_epoch, history = 0, []
    state = checkpoint.load_latest(job.checkpoint_url) if (master and cfg.checkpoint) else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
    start_epoch, history = hvd.broadcast_object((start_epoch, history), root_rank=0, name="resume_point")
    if master and start_epoch > 0:
        _note_resume(job.run, history, start_epoch, getattr(ctx, "attempt", 0))
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    grad_bytes = sum(p.numel() for p in model.parameters()) * (2 if cfg.fp16_allreduce else 4)
    train_spec = build_loader_spec(m, rank, world, cfg, split="train")
    train_spec = _with_steps(train_spec, steps)
    val_spec = build_loader_spec(m, rank, world, cfg, split="validation")
    val_x, val_y = read_all(val_spec)

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        model.train()
        started = time.perf_counter()
        t_data = t_compute = t_reduce = 0.0
        loss_sum = torch.zeros(2, dtype=torch.float64)
        with iterate_batches(train_spec, epoch) as batches:
            it = iter(batches)
            for step in range(steps):
                heartbeat.progress(epoch * steps + step)  # reliability: the driver's stall watch sees it
                faults.maybe_inject(job.launch, rank, getattr(ctx, "attempt", 0), epoch * steps + step)
                t0 = time.perf_counter()
                x, y = next(it)
                x, y = x.to(device), y.to(device)
                t1 = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, world, epoch * steps + step, steps)
                loss = loss_fn(model(x), y)
                (loss / k).backward()
                t2 = time.perf_counter()
                if (step + 1) % k == 0:
                    if cfg.grad_clip_norm > 0:
                        opt.synchronize()  # the averaged gradient, then clip, then step without a 2nd allreduce
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                        with opt.skip_synchronize():
                            opt.step()
                    else:
                        opt.step()
                    opt.zero_grad()
                t3 = time.perf_counter()
                loss_sum += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
                t_data, t_compute, t_reduce = t_data + t1 - t0, t_compute + t2 - t1, t_reduce + t3 - t2
        train = hvd.allreduce(loss_sum, op=hvd.Sum, name=f"train_loss.{epoch}")
        val = evaluate(model, val_x, val_y, m.num_classes)
        val = hvd.allreduce(torch.from_numpy(val), op=hvd.Sum, name=f"val.{epoch}").numpy()
        seconds = time.perf_counter() - started
        timing = hvd.allreduce(torch.tensor([t_data, t_compute, t_reduce]), op=hvd.Average, name=f"t.{epoch}")
        # grad_bytes: what one optimizer step sends into the allreduce
        metrics = epoch_metrics(
            epoch,
            float(train[0]),
            float(train[1]),
            seconds,
            summarize(val, m.num_classes),
            timing,
            opt,
            ctx,
            history,
            grad_bytes,
            world,
        )
        history.append(metrics)
        if master:
            # Checkpoint first, then log: a crash in between leaves the epoch unlogged, and the resumed
            # attempt logs it from the checkpoint's history (_note_resume) - never the same step twice.
            if cfg.checkpoint:
                checkpoint.save_checkpoint(
                    job.checkpoint_url,
                    epoch + 1,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                        "run_id": job.run.run_id,
                        "rng": torch.get_rng_state(),
                        "data_position": {"epoch": epoch + 1, "step": 0},
                    },
                )
            tracking.log_metrics(job.run, {k_: v for k_, v in metrics.items() if k_ != "epoch"}, step=epoch + 1)
    if not master:
        return None
    return {
        "state_dict": {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()},
        "history": history,
        "start_epoch": start_epoch,
        "steps_per_epoch": steps,
    }


def _note_resume(run: tracking.RunHandle, history: list[dict[str, Any]], start_epoch: int, attempt: int) -> None:
    """One continuous metric history across restarts: log the checkpoint's epochs MLflow lacks, then mark
    the restart with ``resumed_from_epoch`` at the step it resumed from."""
    logged = {step for step, _ in tracking.metric_history(run, "train_loss")}
    for h in history:
        if int(h["epoch"]) not in logged:
            tracking.log_metrics(run, {k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
    note = {"resumed_from_epoch": float(start_epoch), "restart_attempt": float(attempt)}
    tracking.log_metrics(run, note, step=start_epoch)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int, batch: int = 65536) -> np.ndarray:
    """Additive metric sums (see metrics.batch_sums) of ``model`` on (x, y)."""
    model.eval()
    total = empty_sums(num_classes)
    with torch.no_grad():
        for i in range(0, len(y), batch):
            preds = predictions(model(torch.from_numpy(x[i : i + batch])), num_classes).double().numpy()
            total = total + batch_sums(preds, y[i : i + batch], num_classes)
    model.train()
    return total


def _with_steps(spec: Any, steps: int) -> Any:
    import dataclasses

    return dataclasses.replace(spec, steps=steps)
