"""``allreduce``: every optimizer step, the ranks' gradients are averaged (ring AllReduce), then every rank
takes the same step. Bulk-synchronous: the step runs at the pace of the slowest rank.

All gradients go as one flat vector (one collective per step: the per-collective latency, not the bytes,
dominates small models), through the configured compressor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparkml_dist.comm.base import STRATEGIES, Strategy


@STRATEGIES.register("allreduce")
class AllReduce(Strategy):
    name = "allreduce"

    def update(self, opt: torch.optim.Optimizer, clip: Callable[[], None] | None, opt_step: int) -> None:
        self._mean_of_grads("grad")
        if clip is not None:
            clip()  # on the averaged gradient, the same on every rank
        opt.step()
