"""The served form of a model trained on the sparse layout: an MLflow pyfunc model logged as code ("models
from code"), so it loads wherever mlflow, numpy and torch are installed, without sparkml_dist.

Input: a DataFrame with ``indices`` (a list of int feature indices per row) and ``values`` (their numbers),
the sparse layout the partition job writes and the scoring job builds with the stored encoding. The first
layer runs as an ``embedding_bag`` sum over the non-zeros (never a dense [rows, dimension] block); the rest of
the network is a ``torch.export`` program of the layers after it, ending in probabilities (or the value).
This file imports nothing from sparkml_dist: MLflow copies it into the model and executes it on load.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel
from torch.nn import functional as F


class SparseInputModel(PythonModel):
    def load_context(self, context: Any) -> None:
        first = torch.load(context.artifacts["first_layer"], weights_only=True)
        self.weight, self.bias = first["weight"], first["bias"]
        self.tail = torch.export.load(context.artifacts["tail"]).module()

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints
        indices, values = list(model_input["indices"]), list(model_input["values"])
        lengths = np.fromiter((len(v) for v in indices), np.int64, len(indices))
        if not np.array_equal(lengths, np.fromiter((len(v) for v in values), np.int64, len(values))):
            raise ValueError("every row needs as many values as indices")
        offsets = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat_i = np.concatenate([np.asarray(v, np.int64) for v in indices]) if len(indices) else np.empty(0, np.int64)
        flat_v = np.concatenate([np.asarray(v, np.float32) for v in values]) if len(values) else np.empty(0, np.float32)
        dim = self.weight.shape[0]
        if len(flat_i) and (flat_i.min() < 0 or flat_i.max() >= dim):
            raise ValueError(f"a feature index lies outside 0..{dim - 1}")
        with torch.no_grad():
            z = F.embedding_bag(
                torch.from_numpy(flat_i),
                self.weight,
                torch.from_numpy(offsets),
                mode="sum",
                per_sample_weights=torch.from_numpy(flat_v),
            )
            return self.tail(z + self.bias).numpy()


mlflow.models.set_model(SparseInputModel())
