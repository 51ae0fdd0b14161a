"""Sparse rows on the rank side: CSR pieces that batch, shuffle and reach torch without densifying.

A ``SparseRows`` is what a row group of the sparse layout becomes (indptr/indices/values, the CSR form):
memory grows with the non-zeros, never with the dimension. It supports what the loader's batching and
shuffle buffer do to a dense block (length, slicing, ``take``, concatenation), and becomes a torch
``sparse_csr`` tensor [rows, dimension] for the model, whose first layer (``models.SparseLinear``) reads it
as ``EmbeddingBag`` inputs with per-sample weights. Pure numpy here; torch is imported where tensors are made.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SparseRows:
    indptr: np.ndarray
    """int64 [rows + 1], starting at 0: row i holds entries indptr[i]:indptr[i+1]."""
    indices: np.ndarray
    """int64 [nnz]: feature indices, ascending inside a row."""
    values: np.ndarray
    """float32 [nnz]."""
    dimension: int

    @staticmethod
    def empty(dimension: int) -> SparseRows:
        return SparseRows(np.zeros(1, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), dimension)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dimension

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1] - self.indptr[0])

    def __getitem__(self, rows: slice) -> SparseRows:
        """Rows ``rows`` (a slice with step 1): views of the entries, offsets re-based to 0."""
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise ValueError("SparseRows slices take step 1; use take() for other selections")
        stop = max(start, stop)
        ptr = self.indptr[start : stop + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return SparseRows(ptr - lo, self.indices[lo:hi], self.values[lo:hi], self.dimension)

    def take(self, rows: np.ndarray) -> SparseRows:
        """Rows in the order of the index array ``rows`` (vectorized gather, no per-row Python)."""
        starts, lengths = self.indptr[rows], np.diff(self.indptr)[rows]
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # entry positions: for each picked row, starts[r] + 0..lengths[r]-1
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(int(indptr[-1]), dtype=np.int64)
        return SparseRows(indptr, self.indices[pos], self.values[pos], self.dimension)

    @staticmethod
    def concatenate(parts: list[SparseRows]) -> SparseRows:
        if not parts:
            raise ValueError("nothing to concatenate")
        lengths = np.concatenate([np.diff(p.indptr) for p in parts])
        indptr = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return SparseRows(
            indptr,
            np.concatenate([p.indices for p in parts]),
            np.concatenate([p.values for p in parts]),
            parts[0].dimension,
        )

    def feature_block(self, stride: int, offset: int, width: int) -> SparseRows:
        """The entries of global features offset, offset + stride, ... (``width`` of them), re-indexed
        0..width-1: what a feature group of the sparse layout holds (``FeatureGroup.sparse_index``)."""
        idx = self.indices
        keep = (idx >= offset) & (idx < offset + stride * width) & ((idx - offset) % stride == 0)
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))[keep]
        indptr = np.zeros(len(self) + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=len(self)), out=indptr[1:])
        return SparseRows(indptr, (idx[keep] - offset) // stride, self.values[keep], width)

    def to_dense(self) -> np.ndarray:
        """float32 [rows, dimension]: for tests and small checks only."""
        out = np.zeros(self.shape, np.float32)
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.values)
        return out

    def to_torch(self) -> torch.Tensor:
        """A torch sparse CSR tensor [rows, dimension] sharing this memory where dtypes allow."""
        import torch

        with warnings.catch_warnings():  # torch's one-time "sparse CSR support is in beta" notice
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            return torch.sparse_csr_tensor(
                torch.from_numpy(np.ascontiguousarray(self.indptr)),
                torch.from_numpy(np.ascontiguousarray(self.indices)),
                torch.from_numpy(np.ascontiguousarray(self.values)),
                size=self.shape,
                check_invariants=False,
            )


def concatenate(parts: list[Any]) -> Any:
    """np.concatenate for dense blocks, SparseRows.concatenate for sparse ones."""
    if parts and isinstance(parts[0], SparseRows):
        return SparseRows.concatenate(parts)
    return np.concatenate(parts)


def take(x: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of a dense block or of SparseRows."""
    return x.take(rows) if isinstance(x, SparseRows) else np.take(x, rows, axis=0)


def to_tensor(x: Any) -> torch.Tensor:
    """A dense block as a (zero-copy) float tensor; SparseRows as a sparse CSR tensor."""
    import torch

    return x.to_torch() if isinstance(x, SparseRows) else torch.from_numpy(x)


def from_arrow(indices: Any, values: Any, dimension: int, where: str) -> SparseRows:
    """Two Arrow list arrays (one row group's indices and values) -> SparseRows, checked: same lengths per
    row, no nulls, indices inside the dimension. Raises ValueError naming ``where``."""
    import pyarrow.compute as pc

    if indices.null_count or values.null_count:
        raise ValueError(f"{where}: a row has null indices or values")
    offsets = indices.offsets.to_numpy()
    if not np.array_equal(offsets - offsets[0], values.offsets.to_numpy() - values.offsets.to_numpy()[0]):
        raise ValueError(f"{where}: a row has a different number of indices and values")
    idx = indices.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    val = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if len(idx):
        lo, hi = pc.min_max(indices.flatten()).values()
        if lo.as_py() < 0 or hi.as_py() >= dimension:
            raise ValueError(f"{where}: a feature index lies outside 0..{dimension - 1}")
    return SparseRows((offsets - offsets[0]).astype(np.int64), idx, val, dimension)
