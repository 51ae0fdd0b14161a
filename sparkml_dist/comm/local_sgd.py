"""``local_sgd``: periodic model averaging. Each rank takes ``comm.local_steps`` (k) optimizer steps on its own
shard, then the ranks average their parameters: one round every k steps instead of every step.

Optionally the first ``comm.warmup_steps`` (w) optimizer steps are fully synchronous (gradients averaged
every step, as ``allreduce``): post-local SGD (Lin et al., "Don't use large mini-batches, use local SGD",
2020), which keeps the early, fast-changing phase exact.

What is sent at a round is the parameter *change* since the last round (``params - anchor``), through the
compressor; every rank then sets ``params = anchor + mean(change)``. Without compression that is exactly
the average of the parameters; with top-k and error feedback, the change not sent stays in the residual.
With k = 1, plain SGD and equal learning rates this is exactly ``allreduce``: averaging one step from the
same start equals one step along the averaged gradient.

Optimizer state (momentum, Adam's moments) stays local by default: averaging it costs as much again per
round and post-local SGD keeps it local; ``comm.average_optimizer_state=true`` averages the float state
tensors too, at every round.

Every epoch ends with a round (``sync``), so validation and checkpoints see one model and resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparkml_dist.comm.base import STRATEGIES, Strategy, flatten, unflatten_into


@STRATEGIES.register("local_sgd")
class LocalSGD(Strategy):
    name = "local_sgd"
    rank_local_optimizer = True

    @property
    def in_sync(self) -> bool:
        return self.since_sync == 0

    def start(self) -> None:
        self.anchor = flatten(self.params)
        self.since_sync = 0

    def update(self, opt: torch.optim.Optimizer, clip: Callable[[], None] | None, opt_step: int) -> None:
        if opt_step < self.cfg.warmup_steps:
            self._mean_of_grads("grad")
            if clip is not None:
                clip()
            opt.step()
            self.anchor = flatten(self.params)
            return
        if clip is not None:
            clip()  # the local gradient: each rank clips its own
        opt.step()
        self.since_sync += 1
        if self.since_sync >= self.cfg.local_steps:
            self._average(opt)

    def sync(self, opt: torch.optim.Optimizer) -> None:
        if self.since_sync > 0:
            self._average(opt)

    def _average(self, opt: torch.optim.Optimizer) -> None:
        change = flatten(self.params) - self.anchor
        new = self.anchor + self.compressor.mean(change, self.comm, "params")
        unflatten_into(new, [p.data for p in self.params])
        self.anchor = new
        self.since_sync = 0
        self.rounds += 1
        if self.cfg.average_optimizer_state:
            states = [
                v
                for p in self.params
                for v in opt.state.get(p, {}).values()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0
            ]
            if states:
                unflatten_into(self.comm.allreduce(flatten(states), average=True, name="opt_state"), states)
