"""The seam between the training loop and how ranks communicate.

The loop computes local gradients (``p.grad``, averaged over ``train.backward_passes_per_step`` micro
batches) and then hands over to a ``Strategy``: it decides what crosses the wire, how often and at which
pace, and it makes the parameter update (``update``). At the end of every epoch the loop calls ``sync``,
after which every rank holds the same parameters: validation and checkpoints happen only there, so a
resumed run continues exactly. What a strategy sends goes through a ``Compressor`` (the content axis:
none, fp16, top-k) and the rank's metered ``Collectives``.

A strategy is one module and one ``@STRATEGIES.register(name)``; a compressor one ``@COMPRESSORS.register``.
The parameter-server topology (``comm.strategy=parameter_server``) is not a strategy of this loop: its
workers are not a Horovod gang and must not wait for each other at epoch ends, so it has its own worker
loop and driver in ``sparkml_dist/ps`` (same models, loader, seeds, metrics and tracking).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from sparkml_dist.comm.rows import mean_of_rows, no_rows
from sparkml_dist.config import CommConfig
from sparkml_dist.registry import Registry
from sparkml_dist.runtime.rank import Collectives


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous float32 vector of ``tensors`` (one collective per step instead of one per tensor)."""
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` (in place)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


class Compressor(ABC):
    """What is sent: turns a rank's vector into an estimate of the mean of every rank's vector.

    ``sizes``: the lengths of the tensors the vector is the concatenation of (per-tensor compressors
    such as top-k select within each). Stateful compressors (error feedback) keep per-rank state that
    the loop checkpoints through ``state_dict``.
    """

    name: ClassVar[str]
    wire_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, cfg: CommConfig, sizes: Sequence[int]) -> None:
        self.cfg = cfg
        self.sizes = list(sizes)

    @abstractmethod
    def mean(self, flat: torch.Tensor, comm: Collectives, name: str) -> torch.Tensor:
        """The (estimated) mean over ranks of ``flat``; every rank must call it with equally long vectors."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class Strategy(ABC):
    """How often ranks communicate and how the parameters are updated from local gradients."""

    name: ClassVar[str]
    rank_local_optimizer: ClassVar[bool] = False

    @property
    def in_sync(self) -> bool:
        """Every rank holds the same parameters now (a mid-epoch checkpoint of rank 0's model is whole)."""
        return True

    """Ranks step their own optimizers between rounds, so each rank's optimizer state is checkpointed."""

    def __init__(self, cfg: CommConfig, comm: Collectives, params: list[nn.Parameter], compressor: Compressor) -> None:
        self.cfg = cfg
        self.comm = comm
        self.params = params
        self.compressor = compressor
        self.rounds = 0
        """Communication rounds so far (gradient or parameter exchanges)."""
        self.row_sparse: set[int] = set()
        """ids of the parameters whose gradients are row-sparse (``use_row_sparse``)."""
        self._dense_compressor = compressor

    def use_row_sparse(self, params: Sequence[nn.Parameter]) -> None:
        """Exchange these parameters' gradients as the rows a step touched (``comm/rows.py``), the rest through
        the compressor as before. Only stateless, exact compressors (none, nonzero) combine with it: the
        config check refuses the others with ``train.sparse_gradients=on`` and ``auto`` leaves it off."""
        self.row_sparse = {id(p) for p in params}
        dense = [p.numel() for p in self.params if id(p) not in self.row_sparse]
        self._dense_compressor = type(self.compressor)(self.cfg, dense)

    def start(self) -> None:
        """Called once, after resume and the initial broadcast: every rank holds the same parameters."""
        return None

    @abstractmethod
    def update(self, opt: torch.optim.Optimizer, clip: Callable[[], None] | None, opt_step: int) -> None:
        """Local gradients are in ``p.grad``: communicate as this strategy does and update the parameters.

        ``opt_step``: the global optimizer step (0-based, counted from the first epoch), the same on every
        rank, so schedules (warm-up, every k steps) resume exactly. ``clip``: clips the gradient in place
        (None = no clipping); the strategy calls it on the gradient the update uses.
        """

    def sync(self, opt: torch.optim.Optimizer) -> None:
        """End of epoch: bring every rank to the same parameters (no-op for strategies that always are)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """This rank's communication state (e.g. error-feedback residuals), saved with every checkpoint."""
        return {"compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state.get("compressor", {}))

    def _mean_of_grads(self, name: str) -> None:
        """Replace every local ``p.grad`` by the (compressed) mean over ranks: one round (a row-sparse
        parameter's rows travel in one more collective of the same round)."""
        dense = [p for p in self.params if id(p) not in self.row_sparse]
        if dense:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
            mean = self._dense_compressor.mean(flatten(grads), self.comm, name)
            for p, g in zip(dense, grads, strict=True):
                if p.grad is None:
                    p.grad = g
            unflatten_into(mean, [p.grad for p in dense])  # type: ignore[misc]
        for p in self.params:
            if id(p) in self.row_sparse:
                grad = p.grad if p.grad is not None else no_rows(p)
                p.grad = mean_of_rows(grad, p.shape, self.comm, f"{name}_rows")
        self.rounds += 1


STRATEGIES: Registry[type[Strategy]] = Registry("communication strategy", "comm.strategy")
COMPRESSORS: Registry[type[Compressor]] = Registry("compressor", "comm.compression")


def build_strategy(
    cfg: CommConfig, comm: Collectives, params: list[nn.Parameter], row_sparse: Sequence[nn.Parameter] = ()
) -> Strategy:
    """The configured strategy over ``params`` with the configured compressor; ``row_sparse``: the parameters
    whose gradients are exchanged as rows (``comm/rows.py``)."""
    compressor = COMPRESSORS.get(cfg.compression)(cfg, [p.numel() for p in params])
    strategy = STRATEGIES.get(cfg.strategy)(cfg, comm, params, compressor)
    if row_sparse:
        strategy.use_row_sparse(row_sparse)
    return strategy
