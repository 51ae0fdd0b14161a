"""nn.Modules for tabular data, and the loss/probability conventions every trainer shares.

Convention: a model maps features [batch, n_features] (dense, or for the sparse layout a torch
``sparse_csr`` tensor that only the first layer, ``SparseLinear``, reads) to outputs [batch, k]: for
classification the logits, k = 1 for binary data (the logit of class 1) and k = num_classes otherwise; for
regression (a manifest with ``num_classes == REGRESSION``, written by ``data.task=regression``) the predicted
value, k = 1.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from sparkml_dist.config import TrainConfig
from sparkml_dist.errors import UserError
from sparkml_dist.metrics import REGRESSION  # num_classes of regression data: one real-valued output
from sparkml_dist.registry import Registry
from sparkml_dist.training import sparse_optim

CLASSIFIERS = ("logistic", "softmax")
"""Built-in models that need class labels; ``linear`` needs real-valued ones, ``mlp`` and user models take both."""


def output_width(num_classes: int) -> int:
    """Outputs per row: one for regression and for binary data (the logit of class 1), else one per class."""
    return 1 if num_classes in (REGRESSION, 2) else num_classes


def check_model_for_data(model: str, num_classes: int) -> None:
    """Fail before training when ``train.model`` cannot fit the data's labels; the message names the fix."""
    if num_classes == REGRESSION and model in CLASSIFIERS:
        raise UserError(
            f"train.model={model} is a classifier, but the data has real-valued labels (data.task=regression): "
            "use train.model=linear (or mlp)"
        )
    if num_classes != REGRESSION and model == "linear":
        raise UserError(
            f"train.model=linear is least-squares regression, but the data has {num_classes} classes: use "
            f"train.model={'logistic' if num_classes == 2 else 'softmax'}, or re-partition with "
            "data.task=regression for real-valued labels"
        )
    if model == "logistic" and num_classes > 2:
        raise UserError(f"train.model=logistic is binary; the data has {num_classes} classes: use softmax")


class SparseLinear(nn.Module):
    """``x @ weight + bias`` whose cost grows with the non-zeros of a sparse CSR input [batch, in_features]:
    an ``EmbeddingBag`` sum with the values as per-sample weights, so a 2^24-wide input never becomes a dense
    [batch, 2^24] block. Dense inputs are accepted too. ``weight`` is [in_features, out_features] (the
    embedding layout), initialised like ``nn.Linear``. Its gradient is dense (a [in_features, out] block per
    step), or with ``sparse_grad`` (``train.sparse_gradients``, ``sparkml_dist/comm/rows.py``) a sparse COO
    tensor holding only the rows the batch touched."""

    sparse_grad: bool = False

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout == torch.sparse_csr:
            return csr_times(x, self.weight, self.sparse_grad) + self.bias
        return x.to(self.weight.dtype) @ self.weight + self.bias


def csr_times(x: torch.Tensor, weight: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """``x @ weight`` for a sparse CSR ``x`` [rows, in] and a dense ``weight`` [in, out], as an ``embedding_bag``
    sum over each row's non-zeros weighted by their values: the cost follows the non-zeros, not ``in``.
    ``sparse_grad``: ``weight``'s gradient comes as a sparse COO tensor of the touched rows."""
    rows = x.crow_indices()
    values = x.values().to(weight.dtype)
    return F.embedding_bag(
        x.col_indices(), weight, rows[:-1], mode="sum", per_sample_weights=values, sparse=sparse_grad
    )


def first_layer(in_features: int, out_features: int, sparse: bool) -> nn.Module:
    """The layer that reads the features: ``SparseLinear`` for the sparse layout, else ``nn.Linear``."""
    return SparseLinear(in_features, out_features) if sparse else nn.Linear(in_features, out_features)


def split_first_layer(model: nn.Module) -> tuple[SparseLinear, nn.Module]:
    """(the model's ``SparseLinear``, a copy of the model with that layer replaced by the identity): the tail
    maps the first layer's output [rows, width] to the model's output. For logging a sparse model, whose
    first layer is served as an ``embedding_bag`` over the non-zeros and the rest as an exported program."""
    import copy

    tail = copy.deepcopy(model)
    found = [(name, m) for name, m in tail.named_modules() if isinstance(m, SparseLinear)]
    if len(found) != 1:
        raise UserError(f"{type(model).__name__} has {len(found)} SparseLinear layers; a sparse model has one")
    name, first = found[0]
    parent = tail.get_submodule(name.rpartition(".")[0]) if "." in name else tail
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return first, tail


class LogisticRegression(nn.Module):
    """Binary logistic regression: one logit."""

    def __init__(self, num_features: int, num_classes: int = 2, sparse: bool = False) -> None:
        super().__init__()
        if num_classes != 2:
            raise UserError(f"logistic regression is binary; data has {num_classes} classes: use model=softmax")
        self.linear = first_layer(num_features, 1, sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LinearRegression(nn.Module):
    """Least-squares linear regression: one real-valued output."""

    def __init__(self, num_features: int, num_classes: int = REGRESSION, sparse: bool = False) -> None:
        super().__init__()
        if num_classes != REGRESSION:
            raise UserError(f"linear regression needs real-valued labels; data has {num_classes} classes")
        self.linear = first_layer(num_features, 1, sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression: one logit per class."""

    def __init__(self, num_features: int, num_classes: int, sparse: bool = False) -> None:
        super().__init__()
        self.linear = first_layer(num_features, num_classes, sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Feed-forward network; ``output_width(num_classes)`` outputs."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden_sizes: list[int] | tuple[int, ...] = (64, 32),
        activation: str = "relu",
        dropout: float = 0.0,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for i, h in enumerate(hidden_sizes):
            layers += [first_layer(width, h, sparse and i == 0), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(first_layer(width, output_width(num_classes), sparse and not hidden_sizes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS: Registry[Callable[[TrainConfig, int, int, bool], nn.Module]] = Registry("model", "train.model")
"""name -> builder(cfg, num_features, num_classes, sparse); a new model is one registration in its own module.
``sparse``: the inputs are sparse CSR tensors (the sparse layout), so the first layer must read them."""
OPTIMIZERS: Registry[Callable[[TrainConfig, Iterable[nn.Parameter]], torch.optim.Optimizer]] = Registry(
    "optimizer", "train.optimizer"
)
"""name -> builder(cfg, parameters)."""

MODELS.register("logistic")(lambda cfg, n, c, sparse: LogisticRegression(n, c, sparse))
MODELS.register("softmax")(lambda cfg, n, c, sparse: SoftmaxRegression(n, c, sparse))
MODELS.register("linear")(lambda cfg, n, c, sparse: LinearRegression(n, c, sparse))
MODELS.register("mlp")(lambda cfg, n, c, sparse: MLP(n, c, cfg.hidden_sizes, cfg.activation, cfg.dropout, sparse))
OPTIMIZERS.register("sgd")(
    lambda cfg, params: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
)
OPTIMIZERS.register("adam")(lambda cfg, params: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
OPTIMIZERS.register("adamw")(lambda cfg, params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
sparse_optim.register(OPTIMIZERS)  # lazy_adam, adagrad, ftrl: update only the rows a step touched


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``model``'s parameters."""
    return OPTIMIZERS.get(cfg.optimizer)(cfg, model.parameters())


def build_model(cfg: TrainConfig, num_features: int, num_classes: int, sparse: bool = False) -> nn.Module:
    """The model named by ``cfg.model``: a registered name (logistic, softmax, linear, mlp, ...) or
    'package.module:ClassName'.

    A user class is constructed as ``Class(num_features, num_classes)`` and must follow the logits
    convention in this module's docstring (on sparse data its forward receives sparse CSR tensors).
    """
    if ":" not in cfg.model:
        return MODELS.get(cfg.model)(cfg, num_features, num_classes, sparse)
    module_name, _, class_name = cfg.model.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"train.model={cfg.model!r} cannot be imported ({exc}); is it on the executors' path?") from exc
    model = cls(num_features, num_classes)
    if not isinstance(model, nn.Module):
        raise UserError(f"train.model={cfg.model!r} is not a torch.nn.Module")
    return model


def loss_fn(outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Log-loss for class labels (binary cross-entropy on one logit, cross-entropy on several); squared
    error for real-valued labels (regression: the labels come as floating point, class ids as integers)."""
    if labels.is_floating_point():
        return F.mse_loss(outputs[:, 0], labels.to(outputs.dtype), reduction=reduction)
    if outputs.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(outputs[:, 0], labels.to(outputs.dtype), reduction=reduction)
    return F.cross_entropy(outputs, labels, reduction=reduction)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities [batch, num_classes] from logits of either convention."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p1, p1], dim=1)
    return torch.softmax(logits, dim=1)


def predictions(outputs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """What a model predicts: class probabilities [batch, num_classes], or for regression the value [batch, 1]."""
    return outputs if num_classes == REGRESSION else probabilities(outputs)


class ProbabilityModel(nn.Module):
    """Wraps a classifier's logits model so that it returns class probabilities (what a logged classifier predicts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model(x.to(torch.float32)))


class ValueModel(nn.Module):
    """Wraps a regression model: float32 in, the predicted value [rows, 1] out (what a logged regressor predicts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float32))


def prediction_model(model: nn.Module, num_classes: int) -> nn.Module:
    """The module to log: ``predictions`` of ``model`` for data with ``num_classes`` (REGRESSION: values)."""
    return (ValueModel(model) if num_classes == REGRESSION else ProbabilityModel(model)).eval()
