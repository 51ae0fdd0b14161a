"""nn.Modules for tabular data, and the loss/probability conventions every trainer shares.

Convention: a model maps features [batch, n_features] to logits [batch, k] where k = 1 for binary
classification (the logit of class 1) and k = num_classes otherwise.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.nn import functional as F

from sparkml_dist.config import TrainConfig


class LogisticRegression(nn.Module):
    """Binary logistic regression: one logit."""

    def __init__(self, num_features: int, num_classes: int = 2) -> None:
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"logistic regression is binary; data has {num_classes} classes: use model=softmax")
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression: one logit per class."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Feed-forward network; one output logit for binary data, num_classes otherwise."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden_sizes: list[int] | tuple[int, ...] = (64, 32),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1 if num_classes == 2 else num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(cfg: TrainConfig, num_features: int, num_classes: int) -> nn.Module:
    """The model named by ``cfg.model``: logistic, softmax, mlp, or 'package.module:ClassName'.

    A user class is constructed as ``Class(num_features, num_classes)`` and must follow the logits
    convention in this module's docstring.
    """
    if cfg.model == "logistic":
        return LogisticRegression(num_features, num_classes)
    if cfg.model == "softmax":
        return SoftmaxRegression(num_features, num_classes)
    if cfg.model == "mlp":
        return MLP(num_features, num_classes, cfg.hidden_sizes, cfg.activation, cfg.dropout)
    module_name, sep, class_name = cfg.model.partition(":")
    if not sep:
        raise ValueError(f"train.model={cfg.model!r}: use logistic, softmax, mlp or 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"train.model={cfg.model!r} cannot be imported ({exc}); is it on the executors' path?"
        ) from exc
    model = cls(num_features, num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"train.model={cfg.model!r} is not a torch.nn.Module")
    return model


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Log-loss: binary cross-entropy on one logit, cross-entropy on several."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype), reduction=reduction)
    return F.cross_entropy(logits, labels, reduction=reduction)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities [batch, num_classes] from logits of either convention."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p1, p1], dim=1)
    return torch.softmax(logits, dim=1)


class ProbabilityModel(nn.Module):
    """Wraps a logits model so that it returns class probabilities (what a logged model predicts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model(x.to(torch.float32)))
