"""Feature-parallel training of a wide generalized linear model (logistic, softmax or least-squares linear
regression): rank r holds only feature group r and weight block r.

The partition job can write the features as M column groups that hold the same rows in the same order
(``partition.feature_groups=M``). With ``train.mode=feature_parallel`` there is one Horovod rank per
group. The model's outputs ``z = x @ W.T + b`` (logits, or the regression's value; "logits" below) split
by feature: ``z = sum_r x_r @ W_r.T (+ b)``, so every step:

1. rank r reads the next batch of group r (``loader.iterate_aligned_batches``: same rows, same order and
   same batch boundaries on every rank; the shuffle, if on, is seeded by (seed, epoch), not by rank);
2. it computes its partial logits ``x_r @ W_r.T`` (rank 0 adds the bias, which only it holds);
3. ONE allreduce (Sum) of [partial logits | a digest of the batch's row ids] gives every rank the full
   logits and proves the rows line up (every rank compares the summed digest with world x its own);
4. every rank computes the loss from the full logits and back-propagates through its own partial only
   (``partial + (full - partial).detach()``), which is exactly the full model's gradient w.r.t. its block;
5. a plain torch optimizer steps its own block. No gradient is communicated.

What crosses the network per step is batch x outputs x 4 bytes, against the full gradient's
features x outputs x 4 in data-parallel training. Weights start at zero (the loss is convex: no symmetry
to break), so the start needs no communication and does not depend on the number of ranks.

The step loop is ``loop.run_rank`` (shared with data-parallel training: heartbeats, fault injection,
validation, checkpoints and metrics are the same code); this module supplies the ``FeatureParallel``
workload and the driver-side checks.

Checkpoints: after each epoch rank r writes its block (weights + optimizer state) under
``<checkpoint_url>/block=<r>/``, then rank 0 writes the epoch's commit record (history + the block
files) under ``<checkpoint_url>/``. A resume starts from the newest commit, so a crash between block
writes never mixes epochs. The final blocks are always written; the driver assembles them into one
ordinary ``models.LogisticRegression``/``SoftmaxRegression``/``LinearRegression`` state dict
(``assemble_state_dict``).

Runs inside Horovod ranks and on the driver; never imports pyspark.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkml_dist.comm import COMPRESSORS, Strategy
from sparkml_dist.config import TrainConfig
from sparkml_dist.data.manifest import FeatureGroup, Manifest, arrow_fs
from sparkml_dist.data.sparse import SparseRows, to_tensor
from sparkml_dist.errors import UserError
from sparkml_dist.metrics import batch_sums, empty_sums
from sparkml_dist.runtime.rank import Collectives, RankContext
from sparkml_dist.training import checkpoint
from sparkml_dist.training.device import Placement
from sparkml_dist.training.loader import (
    AlignedBatch,
    LoaderError,
    LoaderSpec,
    build_loader_spec,
    file_counts,
    iterate_aligned_batches,
    iterate_chunks,
    label_dtype_of,
)
from sparkml_dist.training.loop import MODES, ResumePoint, TrainJob, Workload, whole_optimizer_steps
from sparkml_dist.training.models import check_model_for_data, csr_times, loss_fn, output_width, predictions
from sparkml_dist.training.readers import resolve_reader

MODE = "feature_parallel"
DIGEST_BYTES = 4
"""Row-id digest bytes sent with the logits; each byte (and its square) sums exactly in float32 for up to
256 ranks, and a misaligned batch goes unnoticed with probability 2**-32."""
EVAL_ROWS = 8192
"""Validation rows per allreduce of partial logits."""


class AlignmentError(UserError):
    """The ranks' batches do not hold the same rows: the feature-group files do not line up."""


# ------------------------------------------------------------------------------------- driver side


def check_manifest(manifest: Manifest, cfg: TrainConfig) -> int:
    """The world size (= number of feature groups) for ``manifest``; raises with the fix if it cannot train."""
    groups = manifest.feature_groups
    m = len(groups)
    if m == 0:
        raise UserError(
            f"train.mode=feature_parallel needs feature groups, but {manifest.root_url} has none: re-partition "
            "with partition.feature_groups=M (M = the number of ranks) into a new partition.output_url"
        )
    if [g.group for g in groups] != list(range(m)):
        raise UserError(f"{manifest.root_url}: feature groups {[g.group for g in groups]} are not 0..{m - 1}")
    cover = np.zeros(manifest.num_features, np.int32)
    for g in groups:
        np.add.at(cover, block_columns(manifest, g), 1)
    if not (cover == 1).all():
        raise UserError(f"{manifest.root_url}: the feature groups do not cover every feature exactly once")
    for g in groups:
        rows = [s.rows for s in g.shards]
        expected = [s.rows for s in manifest.train]
        if rows != expected:
            raise UserError(
                f"{manifest.root_url}: feature group {g.group} has {rows} rows per shard, the sample shards have "
                f"{expected}: the output is inconsistent, re-run jobs/partition.py into a new partition.output_url"
            )
    check_model_for_data(cfg.model, manifest.num_classes)
    return m


def steps_per_epoch(manifest: Manifest, cfg: TrainConfig) -> int:
    """Every rank reads all training rows: floor(rows / batch_size), capped by train.max_steps_per_epoch."""
    rows = sum(s.rows for s in manifest.train)
    if rows < cfg.batch_size:
        raise LoaderError(
            f"the training split holds {rows} rows, fewer than one batch of train.batch_size={cfg.batch_size}: "
            f"lower train.batch_size to at most {rows}"
        )
    steps = rows // cfg.batch_size
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch > 0 else steps


def block_columns(manifest: Manifest, group: FeatureGroup) -> np.ndarray:
    """Positions of a group's features in the manifest's (= the assembled model's) feature order."""
    if group.sparse_index is not None:
        stride, offset, width = group.sparse_index
        if offset + stride * (width - 1) >= manifest.num_features or width < 1:
            raise UserError(f"{manifest.root_url}: sparse feature group {group.group} lies outside the dimension")
        return np.arange(offset, offset + stride * width, stride, dtype=np.int64)
    index = {name: i for i, name in enumerate(manifest.feature_names)}
    missing = [n for n in group.features if n not in index]
    if missing:
        raise UserError(f"{manifest.root_url}: feature group {group.group} names unknown features {missing[:5]}")
    return np.asarray([index[n] for n in group.features], np.int64)


def assemble_state_dict(manifest: Manifest, block_urls: list[str]) -> dict[str, np.ndarray]:
    """The blocks written by the ranks -> one ``LogisticRegression``/``SoftmaxRegression``/``LinearRegression``
    state dict."""
    if len(block_urls) != len(manifest.feature_groups):
        raise UserError(f"{len(block_urls)} block files for {len(manifest.feature_groups)} feature groups")
    outputs = output_width(manifest.num_classes)
    weight = np.full((outputs, manifest.num_features), np.nan, dtype=np.float32)
    bias = None
    for group, url in zip(manifest.feature_groups, block_urls, strict=True):
        block = read_url(url)["block"]
        cols = block_columns(manifest, group)
        if tuple(block["weight"].shape) != (outputs, len(cols)):
            raise UserError(f"{url}: block of shape {tuple(block['weight'].shape)}, expected {(outputs, len(cols))}")
        weight[:, cols] = block["weight"].numpy()
        if "bias" in block:
            bias = block["bias"].numpy()
    if bias is None or np.isnan(weight).any():
        raise UserError(f"the blocks {block_urls} do not make a whole model (a bias or some features missing)")
    if manifest.sparse is not None:  # models.SparseLinear holds its weight as [features, outputs]
        return {"linear.weight": np.ascontiguousarray(weight.T), "linear.bias": bias}
    return {"linear.weight": weight, "linear.bias": bias}


def read_url(url: str, place: Placement | None = None) -> dict[str, Any]:
    """A file written by ``checkpoint.save_checkpoint``, by its URL; tensors onto ``place``'s device (CPU)."""
    filesystem, path = arrow_fs(url)
    with filesystem.open_input_stream(path) as f:
        data = f.read()
    return (place or Placement()).load(data)


# --------------------------------------------------------------------------------------- rank side


class LinearBlock(nn.Module):
    """Weight block ``[outputs, features of the group]``, plus the bias on the rank that holds it."""

    def __init__(self, num_features: int, outputs: int, with_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, num_features))
        self.bias = nn.Parameter(torch.zeros(outputs)) if with_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout == torch.sparse_csr:  # the sparse layout: a sum over the non-zeros
            out = csr_times(x, self.weight.t())
        else:
            out = x @ self.weight.T
        return out + self.bias if self.bias is not None else out


def build_block_spec(manifest: Manifest, rank: int, cfg: TrainConfig, steps: int) -> LoaderSpec:
    """Rank ``rank`` streams feature group ``rank`` of every training shard, shard 0 first, in file order."""
    group = manifest.feature_groups[rank]
    sparse = None
    if manifest.sparse is not None:
        sparse = (manifest.sparse.indices_col, manifest.sparse.values_col, group.num_features)
    return LoaderSpec(
        shard=f"features/group={group.group}",
        urls=tuple(u for s in group.shards for u in manifest.file_urls(s)),
        features_col=manifest.features_col,
        feature_cols=tuple(group.features),
        label_col=manifest.label_col,
        batch_size=cfg.batch_size,
        steps=steps,
        shuffle=cfg.shuffle,
        shuffle_buffer_rows=cfg.shuffle_buffer_rows,
        seed=cfg.seed,  # the same on every rank: the batches must be the same rows
        rank=rank,
        workers_count=cfg.reader_workers,  # the planned order is kept whatever the count (training/readers)
        reader=resolve_reader(cfg.reader),
        file_counts=file_counts(group.shards),
        row_id_col=manifest.row_id_col,
        label_dtype=label_dtype_of(manifest),
        sparse=sparse,
    )


def read_validation_block(manifest: Manifest, rank: int, cfg: TrainConfig) -> tuple[Any, np.ndarray]:
    """Every validation row, only group ``rank``'s columns: (float32 [n, F_r], labels [n]), in file order.

    The partition job writes no feature groups for the validation split: the 'columns' layout reads just
    the group's columns; the 'array' layout streams one row group at a time and keeps the group's slice.
    """
    group = manifest.feature_groups[rank]
    spec = build_loader_spec(manifest, 0, 1, cfg, split="validation")
    if group.sparse_index is not None:  # the sparse layout: the group's entries of every row, re-indexed
        stride, offset, width = group.sparse_index
        xs_sparse, ys_sparse = [SparseRows.empty(width)], [np.empty(0, spec.label_dtype)]
        with iterate_chunks(spec) as chunks:
            for x, y in chunks:
                xs_sparse.append(x.feature_block(stride, offset, width))
                ys_sparse.append(y)
        return SparseRows.concatenate(xs_sparse), np.concatenate(ys_sparse)
    cols: np.ndarray | None = block_columns(manifest, group)
    if spec.features_col is None:
        spec, cols = dataclasses.replace(spec, feature_cols=tuple(group.features)), None
    xs = [np.empty((0, len(group.features)), np.float32)]
    ys = [np.empty(0, spec.label_dtype)]
    with iterate_chunks(spec) as chunks:
        for x, y in chunks:
            xs.append(np.ascontiguousarray(x[:, cols]) if cols is not None else x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def row_digest(row_ids: torch.Tensor) -> torch.Tensor:
    """[bytes, bytes**2] of a hash of the batch's row ids in order, as float32 (sums exactly)."""
    ids = row_ids.detach().cpu().numpy().astype("<i8", copy=False)
    digest = np.frombuffer(hashlib.blake2b(ids.tobytes(), digest_size=DIGEST_BYTES).digest(), np.uint8)
    d = torch.from_numpy(digest.astype(np.float32))
    return torch.cat([d, d * d])


def check_aligned(summed: torch.Tensor, own: torch.Tensor, world: int, where: str, row_ids: torch.Tensor) -> None:
    """Equal digests on all ranks <=> sum == world x own for values AND squares (then every rank fails or none)."""
    if torch.equal(summed.cpu(), own * world):
        return
    first, last = int(row_ids[0]), int(row_ids[-1])
    raise AlignmentError(
        f"{where}: this rank's batch (row_id {first} ... {last}) holds other rows, or another order, than the other "
        "ranks' batches: the feature-group files do not line up by row_id. Re-run jobs/partition.py with "
        "partition.feature_groups=M into a new partition.output_url (never rewrite group files on their own)."
    )


class LocalUpdate(Strategy):
    """Feature-parallel's update: each rank steps its own block with its own (exact) gradient. No gradient
    crosses the wire; the communication is the partial outputs' allreduce inside ``FeatureParallel.loss``."""

    name = "feature_parallel"

    def update(self, opt: torch.optim.Optimizer, clip: Callable[[], None] | None, opt_step: int) -> None:
        if clip is not None:
            clip()
        opt.step()


@MODES.register(MODE)
class FeatureParallel(Workload):
    """Rank r trains weight block r on feature group r; every rank sees the same rows in the same order."""

    same_rows = True

    def __init__(self, ctx: RankContext, job: TrainJob, comm: Collectives, place: Placement) -> None:
        super().__init__(ctx, job, comm, place)
        cfg, m = job.cfg, job.manifest
        if ctx.world_size != len(m.feature_groups):
            raise UserError(
                f"{ctx.world_size} ranks for {len(m.feature_groups)} feature groups: launch one rank per group"
            )
        self.outputs = output_width(m.num_classes)
        group = m.feature_groups[ctx.rank]
        self.model = place.module(LinearBlock(group.num_features, self.outputs, with_bias=ctx.master))
        self.steps = whole_optimizer_steps(cfg, job.steps_per_epoch)
        self.block_dir = f"{job.checkpoint_url.rstrip('/')}/block={ctx.rank}"
        self.block_urls: list[str] = []
        self.spec = build_block_spec(m, ctx.rank, cfg, self.steps)
        self.val_x, self.val_y = read_validation_block(m, ctx.rank, cfg)

    def build_strategy(self) -> Strategy:
        compressor = COMPRESSORS.get("none")(self.job.comm, [p.numel() for p in self.model.parameters()])
        return LocalUpdate(self.job.comm, self.comm, list(self.model.parameters()), compressor)

    def resume(self, opt: torch.optim.Optimizer) -> ResumePoint:
        job, world = self.job, self.ctx.world_size
        found = None
        commit = checkpoint.load_latest(job.checkpoint_url) if (self.ctx.master and job.cfg.checkpoint) else None
        if commit is not None:
            if commit.get("mode") != MODE or len(commit["block_urls"]) != world:
                raise UserError(
                    f"{job.checkpoint_url} holds a checkpoint of another training mode or world size "
                    f"({commit.get('mode', 'data_parallel')}, {len(commit.get('block_urls', []))} blocks): resume "
                    "it with that train.mode and partition, or start a new run (drop train.resume_run_id)"
                )
            found = (
                int(commit["epoch"]),
                list(commit["history"]),
                list(commit["block_urls"]),
                int(commit.get("step", 0)),
                commit.get("comm"),
            )
        epoch, history, self.block_urls, step, states = self.comm.broadcast_object(
            found or (0, [], [], 0, None), root=0, name="fp.resume_point"
        )
        if self.block_urls:
            state = read_url(self.block_urls[self.ctx.rank], self.place)
            self.model.load_state_dict(state["block"])
            opt.load_state_dict(state["optimizer"])
        return ResumePoint(epoch, history, states, step)

    def batches(self, epoch: int) -> AbstractContextManager[Iterator[AlignedBatch]]:
        return iterate_aligned_batches(self.spec, epoch)

    def loss(self, batch: AlignedBatch, where: str) -> tuple[torch.Tensor, int]:
        x, y, ids = batch
        x, y = self.place.batch(x, y)
        partial = self.model(x)
        own = self.place.tensor(row_digest(ids))
        summed = self.comm.allreduce(torch.cat([partial.detach().reshape(-1), own]), average=False, name="fp.logits")
        n = partial.numel()
        check_aligned(summed[n:], own, self.ctx.world_size, where, ids)
        # The full logits' value, with the gradient flowing into this rank's partial logits only.
        logits = partial + (summed[:n].view_as(partial) - partial.detach())
        return loss_fn(logits, y), len(y)

    def evaluate(self, epoch: int) -> np.ndarray:
        m = self.job.manifest
        return evaluate_blocks(
            self.comm, self.place, self.model, self.val_x, self.val_y, m.num_classes, f"fp.val.{epoch}"
        )

    def clip(self, max_norm: float) -> None:
        _clip_global_norm(self.comm, self.model, max_norm)

    def dense_ring_bytes(self) -> float:
        """The data-parallel alternative: a dense fp32 ring allreduce of the *whole* model's gradient."""
        k, m = self.ctx.world_size, self.job.manifest
        return 2 * (k - 1) / k * 4 * self.outputs * (m.num_features + 1)

    def save(
        self,
        epoch: int,
        opt: torch.optim.Optimizer,
        history: list[dict[str, Any]],
        comm_states: list[Any],
        step: int = 0,
    ) -> None:
        cfg = self.job.cfg
        if not (cfg.checkpoint or (epoch == cfg.epochs and step == 0)):  # the last blocks reach the driver so
            return
        saved = _save_block(self.block_dir, epoch, self.model, opt, step)
        self.block_urls = list(self.comm.allgather_object(saved, name=f"fp.blocks.{epoch}.{step}"))
        if self.ctx.master and cfg.checkpoint:
            payload = {"mode": MODE, "epoch": epoch, "step": step, "history": history, "block_urls": self.block_urls}
            payload.update(comm=comm_states or None, run_id=self.job.run.run_id)
            checkpoint.save_checkpoint(self.job.checkpoint_url, epoch, payload, step)

    def result(self, history: list[dict[str, Any]], start_epoch: int) -> dict[str, Any]:
        return {
            "block_urls": self.block_urls,
            "history": history,
            "start_epoch": start_epoch,
            "steps_per_epoch": self.steps,
        }


def evaluate_blocks(
    comm: Collectives, place: Placement, block: nn.Module, x: Any, y: np.ndarray, num_classes: int, name: str
) -> np.ndarray:
    """Additive metric sums (metrics.eval_sums) of the whole model on the validation rows every rank holds a
    column block of: one allreduce of partial logits per EVAL_ROWS rows. Every rank must call it."""
    block.eval()
    total = empty_sums(num_classes)
    with torch.no_grad():
        for i in range(0, len(y), EVAL_ROWS):
            (chunk,) = place.batch(to_tensor(x[i : i + EVAL_ROWS]))
            outputs = comm.allreduce(block(chunk), average=False, name=f"{name}.{i}")
            preds = predictions(outputs, num_classes).double().cpu().numpy()
            total = total + batch_sums(preds, y[i : i + EVAL_ROWS], num_classes)
    block.train()
    return total


def _clip_global_norm(comm: Collectives, block: nn.Module, max_norm: float) -> None:
    """clip_grad_norm_ over the whole model: the squared norms of the blocks add up (one scalar allreduce)."""
    grads = [p.grad for p in block.parameters() if p.grad is not None]
    local = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum().reshape(1).cpu()
    total = float(comm.allreduce(local, average=False, name="fp.grad_norm")[0]) ** 0.5
    coef = min(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)


def _save_block(block_dir: str, epoch: int, block: nn.Module, opt: torch.optim.Optimizer, step: int = 0) -> str:
    state = {"block": block.state_dict(), "optimizer": opt.state_dict()}
    return checkpoint.save_checkpoint(block_dir, epoch, state, step)
