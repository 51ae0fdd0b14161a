"""The one place where tensors meet the rank's device.

Every batch the model sees (training, validation, feature-parallel partial sums) goes through
``Placement.batch``; checkpoints load with ``map_location`` onto the rank's device. On CUDA, host batches
are pinned and copied with ``non_blocking=True``. With ``strict=True`` (``launch.device_check``, used by
tests on CPU machines), every tensor that goes through here is marked and a forward pre-hook on the model
refuses an unmarked input, so a code path that bypasses the placement fails on a CPU as it would on a GPU.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from sparkml_dist.errors import SparkmlDistError

_MARK = "_sparkml_dist_placed"


class DevicePlacementError(SparkmlDistError, RuntimeError):
    """A tensor reached the model without going through the rank's device placement (a code bug)."""


class Placement:
    """Moves tensors to ``device`` (pinned, non-blocking copies on CUDA); optionally checks the model's inputs."""

    def __init__(self, device: str | torch.device = "cpu", strict: bool = False) -> None:
        self.device = torch.device(device)
        self.strict = strict
        self.cuda = self.device.type == "cuda"
        self.moved = 0
        """Tensors moved so far (tests read it)."""

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.cuda and t.device.type == "cpu":
            t = t.pin_memory().to(self.device, non_blocking=True)
        else:
            t = t.to(self.device)
        if self.strict:
            setattr(t, _MARK, True)
        self.moved += 1
        return t

    def batch(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensor(t) for t in tensors)

    def module(self, model: nn.Module) -> nn.Module:
        """``model`` on the device; in strict mode its forward refuses inputs that were not placed here."""
        model = model.to(self.device)
        if self.strict:
            model.register_forward_pre_hook(_check_inputs)
        return model

    def load(self, data: bytes) -> Any:
        """A ``torch.save``d object, its tensors on this device (checkpoints written on any other device)."""
        return torch.load(io.BytesIO(data), map_location=self.device, weights_only=False)


def _check_inputs(module: nn.Module, args: tuple[Any, ...]) -> None:
    for a in args:
        if isinstance(a, torch.Tensor) and not getattr(a, _MARK, False):
            raise DevicePlacementError(
                f"{type(module).__name__} got a tensor of shape {tuple(a.shape)} on {a.device} that did not go "
                "through device.Placement: every batch must be moved with Placement.batch"
            )
