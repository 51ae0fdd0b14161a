"""Evaluation metrics as additive sums, so ranks (or Spark partitions) can add them with one allreduce.

Log-loss and accuracy are exact sums. AUC comes from per-class score histograms (AUC_BINS bins), which
add across workers and give the AUC up to binning (error < 1/AUC_BINS). Numpy only: the AllReduce
trainer and the MapReduce baselines compute metrics the same way.
"""

from __future__ import annotations

import numpy as np

AUC_BINS = 2048


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
    """log_loss, accuracy and AUC (binary; macro one-vs-rest for several classes) from added sums."""
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
