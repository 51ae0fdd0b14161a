"""How much memory one rank's model takes, estimated before anything is allocated (issue 32, item 6).

A LIBSVM line with index 2147483647 (or a declared ``data.dimension``, an indices column or a vector that
wide) makes a 2^31-wide feature space. Partitioning it is cheap (the rows stay sparse), but every rank then
allocates the first layer densely: 8 GiB of weights alone for one output, and as much again for the gradient
and each optimizer state copy. So the size is checked twice against ``train.max_model_gib``: when the
partition job has decided the dimension (from the config's ``train`` section, by formula: partitioning never
imports torch), and when training starts (the real model counted on torch's ``meta`` device, which allocates
nothing, so a user model is counted as exactly as a built-in one).

Bytes per parameter: float32 weights and gradient (``SparseLinear``'s gradient is dense), plus the optimizer's
state copies. Communication strategies may keep more (a residual for top-k with error feedback, a copy of the
averaged parameters for local SGD): the estimate is a floor, which is what a refusal needs.
"""

from __future__ import annotations

from sparkml_dist.config import TrainConfig
from sparkml_dist.errors import UserError

GIB = 1 << 30
BYTES_PER_VALUE = 4
"""float32."""
_OPTIMIZER_COPIES = {"adam": 2, "adamw": 2, "lazy_adam": 2, "adagrad": 1, "ftrl": 2}  # lazy_adam: + a row count
"""State tensors the size of the parameters that each optimizer keeps (sgd: one with momentum, else none)."""


class ModelSizeError(UserError):
    """The model would not fit the configured memory bound (``train.max_model_gib``)."""


def state_copies(cfg: TrainConfig) -> int:
    """Parameter-sized tensors a rank holds: weights, gradient, and the optimizer's state."""
    if cfg.optimizer == "sgd":
        return 2 + (1 if cfg.momentum > 0 else 0)
    return 2 + _OPTIMIZER_COPIES.get(cfg.optimizer, 2)  # an unknown optimizer: assume Adam's two moments


def estimate_parameters(cfg: TrainConfig, num_features: int, outputs: int) -> int:
    """Parameters of a built-in model over ``num_features`` inputs with ``outputs`` outputs (the first layer
    dominates); for a user model ('module:Class') the smallest model that reads every feature: a linear one."""
    if cfg.model == "mlp":
        widths = [num_features, *cfg.hidden_sizes, outputs]
        return sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))
    return num_features * outputs + outputs


def count_parameters(cfg: TrainConfig, num_features: int, num_classes: int, sparse: bool) -> int:
    """The exact parameter count of the model training would build, built on torch's ``meta`` device (shapes
    only, no memory)."""
    import torch

    from sparkml_dist.training.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_features, num_classes, sparse)
    return sum(p.numel() for p in model.parameters())


def check_model_size(cfg: TrainConfig, parameters: int, what: str) -> None:
    """Raise ``ModelSizeError`` when ``parameters`` would take more than ``train.max_model_gib`` on a rank.

    Args:
        cfg: the train section (model, optimizer, the bound).
        parameters: the model's parameter count.
        what: where the count comes from, for the message (e.g. "data dimension 2147483647 x 1 output").
    """
    if cfg.max_model_gib <= 0:
        return
    copies = state_copies(cfg)
    need = parameters * BYTES_PER_VALUE * copies
    if need <= cfg.max_model_gib * GIB:
        return
    raise ModelSizeError(
        f"train.model={cfg.model} would hold {parameters:,} parameters ({what}): about {need / GIB:,.1f} GiB per "
        f"rank (float32 weights, gradient and {copies - 2} train.optimizer={cfg.optimizer} state copies), above "
        f"train.max_model_gib={cfg.max_model_gib:g}. Set data.dimension to the real width of the features (a "
        "LIBSVM file or indices column with one stray huge index makes a space that wide), hash categorical "
        "features into fewer indices (data.hash_buckets), or raise train.max_model_gib if every rank has the memory"
    )
