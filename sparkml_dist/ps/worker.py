"""What one parameter-server worker runs inside its Spark task: pull -> forward/backward -> push, on its own
sample shard, until the servers say the run's pushes are all in.

The same model builder, loader and seeds as a data-parallel rank: worker w reads shard w (``shard w`` of
the manifest, as rank w of K would), pass p of it in the order of epoch p, with dropout seeded by
``epoch_seed(seed, p, w)``. So with ``ssp`` and staleness 0 each clock is exactly a synchronous step over
the same K batches. A worker does not stop at the end of its shard: under ``async`` or ``ssp`` a faster
worker goes on into its next pass, and an epoch is K x steps_per_epoch pushes, whoever made them.

A resubmitted worker (``attempt`` > 0) asks the servers for its clock and continues its seeded stream there:
a lost worker costs the step it was in. Runs inside Spark tasks; never imports pyspark.

Sparse (``train.sparse_gradients``, on by ``auto`` for a model with a ``SparseLinear`` on sparse data): a
worker reads its batch first, pulls only the parameters that batch reads (the wide layer's touched rows and
every dense parameter) and pushes only their gradient, as ascending flat keys; the servers apply it as a
row-sparse gradient (a row-sparse optimizer on the server updates only those rows and keeps their state).
The rest of the worker's copy of the wide layer is stale and never read: the batch touches none of it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sparkml_dist.comm.base import flatten, unflatten_into
from sparkml_dist.comm.rows import clip_grad_norm, row_block, row_sparse_choice, set_row_sparse
from sparkml_dist.config import CommConfig, LaunchConfig, TrainConfig
from sparkml_dist.data.manifest import Manifest
from sparkml_dist.ps.client import Endpoint, PSClient
from sparkml_dist.runtime import faults
from sparkml_dist.training.device import Placement
from sparkml_dist.training.loader import build_loader_spec, iterate_batches
from sparkml_dist.training.loop import epoch_seed
from sparkml_dist.training.models import SparseLinear, build_model, loss_fn

log = logging.getLogger("sparkml_dist.ps.worker")  # its pre-move name: logging configs keep working


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, built on the driver and shipped with the task."""

    cfg: TrainConfig
    launch: LaunchConfig
    manifest: Manifest
    endpoints: list[Endpoint]
    secret: str
    timeout_s: float
    workers: int
    steps_per_epoch: int
    """Batches per pass over a worker's shard (the same for every worker)."""
    comm: CommConfig = dataclasses.field(default_factory=CommConfig)


class SparseKeys:
    """The flat keys a batch reads: every element of the touched rows of the row-sparse weights, and every
    dense parameter. Built per batch from the CSR input's column indices (the rows it reads)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], row_sparse: list[nn.Parameter]) -> None:
        self.params = params
        offsets, offset = {}, 0
        for p in params:
            offsets[id(p)] = offset
            offset += p.numel()
        self.offsets = offsets
        self.row_sparse = {id(p) for p in row_sparse}
        self.dense_keys = {id(p): np.arange(offsets[id(p)], offsets[id(p)] + p.numel()) for p in params
                           if id(p) not in self.row_sparse}  # fmt: skip

    def keys(self, x: torch.Tensor) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(ascending flat keys, per row-sparse parameter the sorted rows read) for the batch ``x``."""
        rows = np.unique(x.col_indices().numpy()) if x.layout == torch.sparse_csr else None
        parts, touched = [], {}
        for p in self.params:
            if id(p) not in self.row_sparse:
                parts.append(self.dense_keys[id(p)])
                continue
            cols = p.numel() // p.shape[0]
            r = rows if rows is not None else np.arange(p.shape[0])
            touched[id(p)] = r
            parts.append((self.offsets[id(p)] + r[:, None] * cols + np.arange(cols)).reshape(-1))
        return np.concatenate(parts).astype(np.int64), touched

    def load(self, values: np.ndarray, touched: dict[int, np.ndarray]) -> None:
        """Write pulled ``values`` (in key order) into the model."""
        at = 0
        with torch.no_grad():
            for p in self.params:
                if id(p) in self.row_sparse:
                    r = touched[id(p)]
                    n = len(r) * (p.numel() // p.shape[0])
                    rows = torch.from_numpy(values[at : at + n]).view(len(r), *p.shape[1:])
                    p.data.index_copy_(0, torch.from_numpy(r), rows)
                else:
                    n = p.numel()
                    p.data.copy_(torch.from_numpy(values[at : at + n]).view_as(p))
                at += n

    def gradient(self, touched: dict[int, np.ndarray]) -> np.ndarray:
        """The gradient at the keys, in key order: a row-sparse weight's rows (zero for a touched row whose
        gradient the backward left out), then the dense parameters whole."""
        parts = []
        for p in self.params:
            if id(p) not in self.row_sparse:
                parts.append((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1))
                continue
            r = torch.from_numpy(touched[id(p)])
            out = torch.zeros(len(r), p.numel() // p.shape[0])
            if p.grad is not None:
                rows, values = row_block(p.grad, p.shape)
                out.index_add_(0, torch.searchsorted(r, rows), values)
            parts.append(out.reshape(-1))
        return torch.cat([t.to(torch.float32) for t in parts]).numpy()


def run_worker(job: WorkerJob, wid: int, host: str, attempt: int) -> dict[str, float]:
    """Train until the servers are done; returns this worker's traffic (bytes pushed/pulled, pull wait)."""
    cfg, m = job.cfg, job.manifest
    torch.manual_seed(cfg.seed)
    place = Placement("cpu")
    model = place.module(build_model(cfg, m.num_features, m.num_classes, m.sparse is not None))
    params = list(model.parameters())
    layers = sum(isinstance(mod, SparseLinear) for mod in model.modules())
    on, why = row_sparse_choice(cfg, job.comm, m.sparse is not None, layers)
    keys = SparseKeys(model, params, set_row_sparse(model, on)) if on else None
    if wid == 0 and attempt == 0 and m.sparse is not None:
        log.info("parameter-server worker: %s", "pulls and pushes the touched rows only" if on else why)
    spec = dataclasses.replace(build_loader_spec(m, wid, job.workers, cfg, split="train"), steps=job.steps_per_epoch)
    with PSClient(job.endpoints, job.secret, job.timeout_s, worker=wid) as client:
        clock, done = client.hello(host, attempt)
        if attempt > 0:
            log.warning("parameter-server worker %d (attempt %d) continues at clock %d", wid, attempt, clock)
        while not done:
            done, clock = _one_pass(job, model, params, place, spec, client, wid, attempt, clock, keys)
        t = client.traffic
        return {"push_bytes": t.push_bytes, "pull_bytes": t.pull_bytes, "pull_wait_s": t.pull_wait_s,
                "pushes": t.pushes, "clock": clock}  # fmt: skip


def _one_pass(
    job: WorkerJob,
    model: nn.Module,
    params: list[nn.Parameter],
    place: Placement,
    spec: object,
    client: PSClient,
    wid: int,
    attempt: int,
    clock: int,
    sparse: SparseKeys | None = None,
) -> tuple[bool, int]:
    """The rest of the pass ``clock`` is in; (done, the clock after it)."""
    steps = job.steps_per_epoch
    epoch, start = divmod(clock, steps)
    torch.manual_seed(epoch_seed(job.cfg.seed, epoch, wid))
    model.train()
    with iterate_batches(spec, epoch) as batches:  # type: ignore[arg-type]
        for i, batch in enumerate(batches):
            if i < start:  # a resubmitted worker: the seeded stream, skipped to where its clock is
                continue
            faults.maybe_inject(job.launch, wid, attempt, clock)
            x, y = place.batch(*batch)
            keys, touched = sparse.keys(x) if sparse is not None else (None, {})
            flat, versions, done = client.pull(clock, keys)
            if done:
                return True, clock
            if sparse is not None:
                sparse.load(flat, touched)
            else:
                unflatten_into(torch.from_numpy(flat), [p.data for p in params])
            model.zero_grad(set_to_none=sparse is not None)
            loss = loss_fn(model(x), y)
            loss.backward()
            if job.cfg.grad_clip_norm > 0:
                clip_grad_norm(params, job.cfg.grad_clip_norm)
            if sparse is not None:
                grad = sparse.gradient(touched)
            else:
                grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).numpy()
            rows = len(y)
            done = client.push(np.ascontiguousarray(grad), clock, versions, float(loss.item()) * rows, rows, keys)
            clock += 1
            if done:
                return True, clock
    return False, clock
