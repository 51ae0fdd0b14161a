"""Evaluation metrics as additive sums, so ranks (or Spark partitions) can add them with one allreduce.

Log-loss and accuracy are exact sums. AUC comes from per-class score histograms (AUC_BINS bins), which
add across workers and give the AUC up to binning (error < 1/AUC_BINS). Regression data
(``num_classes == REGRESSION``) gets squared and absolute error sums and the label's first two moments,
which give MSE, RMSE, MAE and R^2. Numpy only: the AllReduce trainer and the MapReduce baselines compute
metrics the same way.
"""

from __future__ import annotations

import numpy as np

AUC_BINS = 2048
REGRESSION = 0
"""``num_classes`` of regression data (``data.task=regression``) everywhere: manifest, metrics, models."""
PRIMARY = {"classification": "log_loss", "regression": "mse"}
"""The score a trainer reports first and the progress, plots and comparisons follow (lower is better)."""
SCORES = {"classification": ("log_loss", "accuracy", "auc"), "regression": ("mse", "rmse", "mae", "r2")}
"""What ``summarize`` returns (besides rows) for each task."""
LOWER_IS_BETTER = frozenset({"log_loss", "mse", "rmse", "mae"})


def task_of(num_classes: int) -> str:
    """``regression`` for ``num_classes == REGRESSION``, else ``classification`` (the data.task values)."""
    return "regression" if num_classes == REGRESSION else "classification"


def scores_of(num_classes: int) -> tuple[str, ...]:
    return SCORES[task_of(num_classes)]


def primary_metric(num_classes: int) -> str:
    """``log_loss`` for classification, ``mse`` for regression (the training loss of each)."""
    return PRIMARY[task_of(num_classes)]


def empty_sums(num_classes: int) -> np.ndarray:
    """The zero of ``eval_sums`` for data with ``num_classes`` (what per-batch sums are added to)."""
    if num_classes == REGRESSION:
        return regression_sums(np.zeros((0, 1)), np.zeros(0))
    return eval_sums(np.zeros((0, num_classes)), np.zeros(0, dtype=np.int64))


def batch_sums(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``eval_sums`` of class probabilities, or ``regression_sums`` of predicted values."""
    return regression_sums(preds, labels) if num_classes == REGRESSION else eval_sums(preds, labels)


def regression_sums(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[squared error, absolute error, n, sum y, sum y^2] of predictions [n, 1] (or [n]) against labels [n]."""
    err = np.asarray(preds, dtype=np.float64).reshape(-1) - np.asarray(labels, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return np.array([float(err @ err), float(np.abs(err).sum()), float(len(y)), float(y.sum()), float(y @ y)])


def eval_sums(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One flat float64 vector of additive sums for a batch: [loss_sum, correct, n, hist...].

    probs: [n, C] class probabilities; labels: [n] ints. The histogram part is [C, 2, AUC_BINS]: for class
    c, the binned scores P(c|x) of rows whose label is not c (0) and is c (1).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = probs.shape
    p_true = np.clip(probs[np.arange(n), labels], 1e-15, 1.0)
    loss_sum = -np.log(p_true).sum()
    correct = float((probs.argmax(axis=1) == labels).sum())
    classes = [1] if c == 2 else list(range(c))
    hist = np.zeros((len(classes), 2, AUC_BINS))
    bins = np.minimum((probs * AUC_BINS).astype(np.int64), AUC_BINS - 1)
    for i, k in enumerate(classes):
        is_k = (labels == k).astype(np.int64)
        np.add.at(hist[i], (is_k, bins[:, k]), 1.0)
    return np.concatenate([[loss_sum, correct, float(n)], hist.ravel()])


def summarize(sums: np.ndarray, num_classes: int) -> dict[str, float]:
    """log_loss, accuracy and AUC (binary; macro one-vs-rest for several classes) from added sums; for
    regression mse, rmse, mae and r2 (1 - SSE / total sum of squares about the mean)."""
    if num_classes == REGRESSION:
        sse, sae, n, sy, syy = sums
        m = max(n, 1.0)
        sst = syy - sy * sy / m
        return {
            "mse": float(sse / m),
            "rmse": float(np.sqrt(sse / m)),
            "mae": float(sae / m),
            "r2": float(1.0 - sse / sst) if sst > 0 else float("nan"),
            "rows": float(n),
        }
    loss_sum, correct, n = sums[:3]
    k = 1 if num_classes == 2 else num_classes
    hist = sums[3:].reshape(k, 2, AUC_BINS)
    aucs = [_auc(h[0], h[1]) for h in hist]
    return {
        "log_loss": float(loss_sum / max(n, 1.0)),
        "accuracy": float(correct / max(n, 1.0)),
        "auc": float(np.nanmean(aucs)) if aucs else float("nan"),
        "rows": float(n),
    }


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), from binned scores."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float(((pos * neg_below).sum() + 0.5 * (pos * neg).sum()) / (n_pos * n_neg))
