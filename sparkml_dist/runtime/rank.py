"""The rank side's seam: who a rank is (``RankContext``) and how it talks to the others (``Collectives``).

Never imports pyspark: the barrier launcher (``launch.py``) builds a ``RankContext`` inside each Spark task
with the configured engine's collectives (``engines.py``: Horovod or torch.distributed); ``run_in_process``
runs the same rank function on threads of this process with ``ThreadCollectives``, for fast tests of the
training loop and of communication strategies without Spark or Horovod.

Every collective is *metered*: the payload bytes handed to it, the per-rank bytes a ring algorithm moves
for that payload, and the seconds spent in it. Measured here, at the one place every byte passes, a
compressor that did nothing shows up as unchanged bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from sparkml_dist.errors import InfraError
from sparkml_dist.runtime import heartbeat

log = logging.getLogger("sparkml_dist.rank")  # its pre-move name: logging configs keep working
T = TypeVar("T")


@dataclass(frozen=True)
class RankContext:
    """Who this rank is; built by the launcher inside the task."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_size: int = 1
    cross_rank: int = 0
    cross_size: int = 1
    hostname: str = "localhost"
    attempt: int = 0
    device: str = "cpu"
    cpus: int = 1
    comm: Collectives | None = field(default=None, compare=False)
    """How this rank talks to the others: set by the launcher (``engines``) or by ``run_in_process``."""

    @property
    def master(self) -> bool:
        """Rank 0 writes checkpoints, logs metrics and returns the result."""
        return self.rank == 0

    def collectives(self) -> Collectives:
        if self.comm is None:
            raise RuntimeError(f"rank {self.rank} has no collectives: RankContext.comm is set by the launcher")
        return self.comm


class CollectiveTimeoutError(InfraError):
    """A collective waited longer than its timeout for the other ranks."""


@dataclass
class Meter:
    """What this rank's collectives moved: calls, payload bytes, per-rank ring bytes, seconds."""

    calls: int = 0
    payload_bytes: int = 0
    """Bytes of the tensors this rank handed to collectives (after any compression)."""
    wire_bytes: float = 0.0
    """Bytes a ring algorithm sends per rank for those payloads: 2(K-1)/K x payload for an allreduce,
    (K-1) x payload for an allgather, the payload for a broadcast from the root."""
    seconds: float = 0.0

    def snapshot(self) -> Meter:
        return replace(self)

    def since(self, earlier: Meter) -> Meter:
        return Meter(
            self.calls - earlier.calls,
            self.payload_bytes - earlier.payload_bytes,
            self.wire_bytes - earlier.wire_bytes,
            self.seconds - earlier.seconds,
        )

    def plus(self, other: Meter) -> Meter:
        return Meter(
            self.calls + other.calls,
            self.payload_bytes + other.payload_bytes,
            self.wire_bytes + other.wire_bytes,
            self.seconds + other.seconds,
        )


class Collectives(ABC):
    """Allreduce, allgather and broadcast between the ranks of one training job, metered; each call marks
    the rank as inside that collective for its heartbeats (``heartbeat.in_collective``)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.meter = Meter()

    def _count(self, nbytes: int, factor: float, started: float) -> None:
        self.meter.calls += 1
        self.meter.payload_bytes += nbytes
        self.meter.wire_bytes += nbytes * factor
        self.meter.seconds += time.perf_counter() - started

    def allreduce(self, tensor: torch.Tensor, *, average: bool, name: str) -> torch.Tensor:
        """Elementwise sum (or mean) of ``tensor`` over the ranks; a new tensor, the input is unchanged."""
        t0 = time.perf_counter()
        with heartbeat.in_collective(name):
            out = self._allreduce(tensor, average, name)
        nbytes = tensor.numel() * tensor.element_size()
        self._count(nbytes, self._allreduce_wire_factor(nbytes), t0)
        return out

    def allgather(self, tensor: torch.Tensor, *, name: str) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0, in rank order (first dims may differ)."""
        t0 = time.perf_counter()
        with heartbeat.in_collective(name):
            out = self._allgather(tensor, name)
        self._count(tensor.numel() * tensor.element_size(), self.world_size - 1, t0)
        return out

    def broadcast_(self, tensors: list[torch.Tensor], *, root: int, name: str) -> None:
        """Overwrite ``tensors`` in place with the root rank's."""
        for i, t in enumerate(tensors):
            t0 = time.perf_counter()
            with heartbeat.in_collective(f"{name}.{i}"):
                self._broadcast_(t, root, f"{name}.{i}")
            self._count(t.numel() * t.element_size() if self.rank == root else 0, 1.0, t0)

    def broadcast_object(self, obj: T, *, root: int, name: str) -> T:
        with heartbeat.in_collective(name):
            return self._broadcast_object(obj, root, name)

    def allgather_object(self, obj: T, *, name: str) -> list[T]:
        with heartbeat.in_collective(name):
            return self._allgather_object(obj, name)

    def _allreduce_wire_factor(self, nbytes: int) -> float:
        """Bytes each rank sends per byte of an allreduce of ``nbytes``: a ring's 2(K-1)/K."""
        k = self.world_size
        return 2 * (k - 1) / k

    @abstractmethod
    def _allreduce(self, tensor: torch.Tensor, average: bool, name: str) -> torch.Tensor: ...

    @abstractmethod
    def _allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor: ...

    @abstractmethod
    def _broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> None: ...

    @abstractmethod
    def _broadcast_object(self, obj: T, root: int, name: str) -> T: ...

    @abstractmethod
    def _allgather_object(self, obj: T, name: str) -> list[T]: ...


class _ThreadGroup:
    """The rendezvous of ``world_size`` threads: each collective is write slot -> barrier -> read -> barrier."""

    def __init__(self, world_size: int, timeout_s: float) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def exchange(self, rank: int, value: Any, name: str) -> list[Any]:
        self.slots[rank] = value
        self._wait(rank, name)
        values = list(self.slots)
        self._wait(rank, name)  # nobody overwrites a slot before every rank has read them all
        return values

    def _wait(self, rank: int, name: str) -> None:
        try:
            self.barrier.wait(self.timeout_s)
        except threading.BrokenBarrierError:
            raise CollectiveTimeoutError(
                f"rank {rank}: collective {name!r} did not complete within {self.timeout_s:g} s (another rank "
                "failed or never reached it)"
            ) from None


class ThreadCollectives(Collectives):
    """Collectives between threads of one process (``run_in_process``): same results as Horovod's, sums
    taken in rank order, so they are deterministic."""

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        super().__init__(rank, group.world_size)
        self._group = group

    def _allreduce(self, tensor: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        values = self._group.exchange(self.rank, tensor.detach().clone(), name)
        total = values[0].clone()
        for v in values[1:]:
            total += v
        return total / self.world_size if average else total

    def _allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return torch.cat(self._group.exchange(self.rank, tensor.detach().clone(), name))

    def _broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> None:
        values = self._group.exchange(self.rank, tensor.detach().clone() if self.rank == root else None, name)
        with torch.no_grad():
            tensor.copy_(values[root])

    def _broadcast_object(self, obj: T, root: int, name: str) -> T:
        return self._group.exchange(self.rank, obj, name)[root]

    def _allgather_object(self, obj: T, name: str) -> list[T]:
        return self._group.exchange(self.rank, obj, name)


class RankError(InfraError):
    """A rank run by ``run_in_process`` raised; the message names the rank."""


def run_in_process(fn: Callable[[RankContext], T], world_size: int, timeout_s: float = 300.0) -> list[T]:
    """Run ``fn`` on ``world_size`` ranks as threads of this process; every rank's result, in rank order.

    The in-process backend of the launcher's seam (the barrier stage is the other): the same rank function,
    no Spark, no Horovod, no processes. A rank's exception breaks the group's barrier, so the others fail
    within ``timeout_s`` instead of waiting forever; the first error is raised naming its rank. Ranks share
    the process's torch RNG: models whose result depends on it (dropout) are not deterministic here.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    group = _ThreadGroup(world_size, timeout_s)
    results: list[Any] = [None] * world_size
    errors: dict[int, BaseException] = {}

    def body(rank: int) -> None:
        ctx = RankContext(rank=rank, world_size=world_size, comm=ThreadCollectives(group, rank))
        try:
            results[rank] = fn(ctx)
        except BaseException as exc:
            errors[rank] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank-{r}", daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        group.barrier.abort()
        raise CollectiveTimeoutError(f"in-process ranks did not finish within {timeout_s:g} s")
    if errors:
        # The first real error, not the BrokenBarrier fallout it caused on the other ranks.
        rank = min(errors, key=lambda r: isinstance(errors[r], CollectiveTimeoutError))
        raise RankError(f"rank {rank} of {world_size} (in process) failed: {errors[rank]!r}") from errors[rank]
    return results
