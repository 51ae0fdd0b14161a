"""What one parameter-server worker runs inside its Spark task: pull -> forward/backward -> push, on its own
sample shard, until the servers say the run's pushes are all in.

The same model builder, loader and seeds as a data-parallel rank: worker w reads shard w (``shard w`` of
the manifest, as rank w of K would), pass p of it in the order of epoch p, with dropout seeded by
``epoch_seed(seed, p, w)``. So with ``ssp`` and staleness 0 each clock is exactly a synchronous step over
the same K batches. A worker does not stop at the end of its shard: under ``async`` or ``ssp`` a faster
worker goes on into its next pass, and an epoch is K x steps_per_epoch pushes, whoever made them.

A resubmitted worker (``attempt`` > 0) asks the servers for its clock and continues its seeded stream there:
a lost worker costs the step it was in. Runs inside Spark tasks; never imports pyspark.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sparkml_dist import faults
from sparkml_dist.comm.base import flatten, unflatten_into
from sparkml_dist.config import LaunchConfig, TrainConfig
from sparkml_dist.device import Placement
from sparkml_dist.loader import build_loader_spec, iterate_batches
from sparkml_dist.loop import epoch_seed
from sparkml_dist.manifest import Manifest
from sparkml_dist.models import build_model, loss_fn
from sparkml_dist.ps.client import Endpoint, PSClient

log = logging.getLogger(__name__)


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


def run_worker(job: WorkerJob, wid: int, host: str, attempt: int) -> dict[str, float]:
    """Train until the servers are done; returns this worker's traffic (bytes pushed/pulled, pull wait)."""
    cfg, m = job.cfg, job.manifest
    torch.manual_seed(cfg.seed)
    place = Placement("cpu")
    model = place.module(build_model(cfg, m.num_features, m.num_classes, m.sparse is not None))
    params = list(model.parameters())
    spec = dataclasses.replace(build_loader_spec(m, wid, job.workers, cfg, split="train"), steps=job.steps_per_epoch)
    with PSClient(job.endpoints, job.secret, job.timeout_s, worker=wid) as client:
        clock, done = client.hello(host, attempt)
        if attempt > 0:
            log.warning("parameter-server worker %d (attempt %d) continues at clock %d", wid, attempt, clock)
        while not done:
            done, clock = _one_pass(job, model, params, place, spec, client, wid, attempt, clock)
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
            flat, versions, done = client.pull(clock)
            if done:
                return True, clock
            unflatten_into(torch.from_numpy(flat), [p.data for p in params])
            model.zero_grad(set_to_none=False)
            x, y = place.batch(*batch)
            loss = loss_fn(model(x), y)
            loss.backward()
            if job.cfg.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(params, job.cfg.grad_clip_norm)
            grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).numpy()
            rows = len(y)
            done = client.push(np.ascontiguousarray(grad), clock, versions, float(loss.item()) * rows, rows)
            clock += 1
            if done:
                return True, clock
    return False, clock
