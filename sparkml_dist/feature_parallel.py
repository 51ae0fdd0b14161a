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
import io
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkml_dist import checkpoint, tracking
from sparkml_dist.config import TrainConfig
from sparkml_dist.errors import UserError
from sparkml_dist.loader import (
    LoaderError,
    LoaderSpec,
    build_loader_spec,
    iterate_aligned_batches,
    iterate_chunks,
    label_dtype_of,
)
from sparkml_dist.manifest import FeatureGroup, Manifest
from sparkml_dist.metrics import batch_sums, empty_sums, summarize
from sparkml_dist.models import check_model_for_data, loss_fn, output_width, predictions
from sparkml_dist.train import TrainJob, epoch_metrics, make_optimizer, whole_optimizer_steps

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
        raise ValueError(
            f"train.mode=feature_parallel needs feature groups, but {manifest.root_url} has none: re-partition "
            "with partition.feature_groups=M (M = the number of ranks) into a new partition.output_url"
        )
    if [g.group for g in groups] != list(range(m)):
        raise ValueError(f"{manifest.root_url}: feature groups {[g.group for g in groups]} are not 0..{m - 1}")
    columns = [i for g in groups for i in block_columns(manifest, g)]
    if sorted(columns) != list(range(manifest.num_features)):
        raise ValueError(f"{manifest.root_url}: the feature groups do not cover every feature exactly once")
    for g in groups:
        rows = [s.rows for s in g.shards]
        expected = [s.rows for s in manifest.train]
        if rows != expected:
            raise ValueError(
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


def block_columns(manifest: Manifest, group: FeatureGroup) -> list[int]:
    """Positions of a group's features in the manifest's (= the assembled model's) feature order."""
    index = {name: i for i, name in enumerate(manifest.feature_names)}
    missing = [n for n in group.features if n not in index]
    if missing:
        raise ValueError(f"{manifest.root_url}: feature group {group.group} names unknown features {missing[:5]}")
    return [index[n] for n in group.features]


def assemble_state_dict(manifest: Manifest, block_urls: list[str]) -> dict[str, np.ndarray]:
    """The blocks written by the ranks -> one ``LogisticRegression``/``SoftmaxRegression``/``LinearRegression``
    state dict."""
    if len(block_urls) != len(manifest.feature_groups):
        raise ValueError(f"{len(block_urls)} block files for {len(manifest.feature_groups)} feature groups")
    outputs = output_width(manifest.num_classes)
    weight = np.full((outputs, manifest.num_features), np.nan, dtype=np.float32)
    bias = None
    for group, url in zip(manifest.feature_groups, block_urls, strict=True):
        block = read_url(url)["block"]
        cols = block_columns(manifest, group)
        if tuple(block["weight"].shape) != (outputs, len(cols)):
            raise ValueError(f"{url}: block of shape {tuple(block['weight'].shape)}, expected {(outputs, len(cols))}")
        weight[:, cols] = block["weight"].numpy()
        if "bias" in block:
            bias = block["bias"].numpy()
    if bias is None or np.isnan(weight).any():
        raise ValueError(f"the blocks {block_urls} do not make a whole model (a bias or some features missing)")
    return {"linear.weight": weight, "linear.bias": bias}


def read_url(url: str) -> dict[str, Any]:
    """A file written by ``checkpoint.save_checkpoint``, by its URL."""
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(url)
    with filesystem.open_input_stream(path) as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------- rank side


class LinearBlock(nn.Module):
    """Weight block ``[outputs, features of the group]``, plus the bias on the rank that holds it."""

    def __init__(self, num_features: int, outputs: int, with_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, num_features))
        self.bias = nn.Parameter(torch.zeros(outputs)) if with_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out + self.bias if self.bias is not None else out


def build_block_spec(manifest: Manifest, rank: int, cfg: TrainConfig, steps: int) -> LoaderSpec:
    """Rank ``rank`` streams feature group ``rank`` of every training shard, shard 0 first, in file order."""
    group = manifest.feature_groups[rank]
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
        row_id_col=manifest.row_id_col,
        label_dtype=label_dtype_of(manifest),
    )


def read_validation_block(manifest: Manifest, rank: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every validation row, only group ``rank``'s columns: (float32 [n, F_r], labels [n]), in file order.

    The partition job writes no feature groups for the validation split: the 'columns' layout reads just
    the group's columns; the 'array' layout streams one row group at a time and keeps the group's slice.
    """
    group = manifest.feature_groups[rank]
    spec = build_loader_spec(manifest, 0, 1, cfg, split="validation")
    cols: list[int] | None = block_columns(manifest, group)
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


def train_feature_block(ctx: Any, job: TrainJob) -> dict[str, Any] | None:
    """Train weight block ``ctx.rank`` on feature group ``ctx.rank``; rank 0 returns the block files and history."""
    import horovod.torch as hvd

    cfg, m = job.cfg, job.manifest
    rank, world = ctx.rank, ctx.world_size
    master = rank == 0
    if world != len(m.feature_groups):
        raise ValueError(f"{world} ranks for {len(m.feature_groups)} feature groups: launch one rank per group")
    device = torch.device(getattr(ctx, "device", "cpu"))
    outputs = output_width(m.num_classes)
    group = m.feature_groups[rank]
    block = LinearBlock(len(group.features), outputs, with_bias=master).to(device)
    opt = make_optimizer(cfg, block)
    k = cfg.backward_passes_per_step
    steps = whole_optimizer_steps(cfg, job.steps_per_epoch)
    block_dir = f"{job.checkpoint_url.rstrip('/')}/block={rank}"

    start_epoch, history, block_urls = 0, [], []
    commit = checkpoint.load_latest(job.checkpoint_url) if (master and cfg.checkpoint) else None
    if commit is not None:
        if commit.get("mode") != MODE or len(commit["block_urls"]) != world:
            raise ValueError(
                f"{job.checkpoint_url} holds a checkpoint of another training mode or world size "
                f"({commit.get('mode', 'data_parallel')}, {len(commit.get('block_urls', []))} blocks): resume it "
                "with that train.mode and partition, or start a new run (drop train.resume_run_id)"
            )
        start_epoch, history, block_urls = int(commit["epoch"]), list(commit["history"]), list(commit["block_urls"])
    start_epoch, history, block_urls = hvd.broadcast_object(
        (start_epoch, history, block_urls), root_rank=0, name="fp.resume_point"
    )
    if block_urls:
        state = read_url(block_urls[rank])
        block.load_state_dict(state["block"])
        opt.load_state_dict(state["optimizer"])

    spec = build_block_spec(m, rank, cfg, steps)
    val_x, val_y = read_validation_block(m, rank, cfg)
    reduced_floats = cfg.batch_size * outputs + 2 * DIGEST_BYTES
    for epoch in range(start_epoch, cfg.epochs):
        block.train()
        started = time.perf_counter()
        t_data = t_compute = t_reduce = 0.0
        loss_sum = 0.0
        with iterate_aligned_batches(spec, epoch) as batches:
            it = iter(batches)
            for step in range(steps):
                t0 = time.perf_counter()
                x, y, ids = next(it)
                x, y = x.to(device), y.to(device)
                t1 = time.perf_counter()
                partial = block(x)
                own = row_digest(ids).to(device)
                t2 = time.perf_counter()
                summed = hvd.allreduce(torch.cat([partial.detach().reshape(-1), own]), op=hvd.Sum, name="fp.logits")
                t3 = time.perf_counter()
                n = partial.numel()
                check_aligned(summed[n:], own, world, f"rank {rank}, epoch {epoch + 1}, step {step}", ids)
                # The full logits' value, with the gradient flowing into this rank's partial logits only.
                logits = partial + (summed[:n].view_as(partial) - partial.detach())
                loss = loss_fn(logits, y)
                (loss / k).backward()
                clip_s = 0.0
                if (step + 1) % k == 0:
                    if cfg.grad_clip_norm > 0:
                        clip_s = _clip_global_norm(hvd, block, cfg.grad_clip_norm)
                    opt.step()
                    opt.zero_grad()
                loss_sum += loss.item() * len(y)
                t4 = time.perf_counter()
                t_data += t1 - t0
                t_reduce += t3 - t2 + clip_s
                t_compute += (t2 - t1) + (t4 - t3) - clip_s
        val = evaluate_blocks(hvd, block, val_x, val_y, m.num_classes, f"fp.val.{epoch}")
        seconds = time.perf_counter() - started
        timing = hvd.allreduce(torch.tensor([t_data, t_compute, t_reduce]), op=hvd.Average, name=f"fp.t.{epoch}")
        if cfg.checkpoint or epoch + 1 == cfg.epochs:  # the last blocks are how the model reaches the driver
            saved = _save_block(block_dir, epoch + 1, block, opt)
            block_urls = list(hvd.allgather_object(saved, name=f"fp.blocks.{epoch}"))
        if not master:
            continue
        # One step allreduces the partial logits and the row-id digest.
        metrics = epoch_metrics(
            epoch,
            loss_sum,
            steps * cfg.batch_size,
            seconds,
            summarize(val, m.num_classes),
            timing,
            opt,
            ctx,
            history,
            reduced_floats * 4,
            world,
        )
        history.append(metrics)
        tracking.log_metrics(job.run, {k_: v for k_, v in metrics.items() if k_ != "epoch"}, step=epoch + 1)
        if cfg.checkpoint:
            payload = {"mode": MODE, "epoch": epoch + 1, "history": history, "block_urls": block_urls}
            checkpoint.save_checkpoint(job.checkpoint_url, epoch + 1, {**payload, "run_id": job.run.run_id})
    if not master:
        return None
    return {"block_urls": block_urls, "history": history, "start_epoch": start_epoch, "steps_per_epoch": steps}


def evaluate_blocks(
    hvd: Any, block: LinearBlock, x: np.ndarray, y: np.ndarray, num_classes: int, name: str
) -> np.ndarray:
    """Additive metric sums (metrics.eval_sums) of the whole model on the validation rows every rank holds a
    column block of: one allreduce of partial logits per EVAL_ROWS rows. Every rank must call it."""
    block.eval()
    device = block.weight.device
    total = empty_sums(num_classes)
    with torch.no_grad():
        for i in range(0, len(y), EVAL_ROWS):
            partial = block(torch.from_numpy(x[i : i + EVAL_ROWS]).to(device))
            outputs = hvd.allreduce(partial, op=hvd.Sum, name=f"{name}.{i}")
            preds = predictions(outputs, num_classes).double().cpu().numpy()
            total = total + batch_sums(preds, y[i : i + EVAL_ROWS], num_classes)
    block.train()
    return total


def _clip_global_norm(hvd: Any, block: LinearBlock, max_norm: float) -> float:
    """clip_grad_norm_ over the whole model: the squared norms of the blocks add up (one scalar allreduce)."""
    t0 = time.perf_counter()
    grads = [p.grad for p in block.parameters() if p.grad is not None]
    local = torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum().reshape(1).cpu()
    total = float(hvd.allreduce(local, op=hvd.Sum, name="fp.grad_norm")[0]) ** 0.5
    coef = min(max_norm / (total + 1e-6), 1.0)
    for g in grads:
        g.mul_(coef)
    return time.perf_counter() - t0


def _save_block(block_dir: str, epoch: int, block: LinearBlock, opt: torch.optim.Optimizer) -> str:
    return checkpoint.save_checkpoint(block_dir, epoch, {"block": block.state_dict(), "optimizer": opt.state_dict()})
