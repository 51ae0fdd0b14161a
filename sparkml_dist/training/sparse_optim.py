"""Row-sparse optimizers for wide sparse models (issue 33): ``lazy_adam``, ``adagrad`` and ``ftrl``.

A sparse batch touches a few thousand of ``SparseLinear``'s 2^20 weight rows (one row per input feature), yet
a dense optimizer reads and writes every row each step. These optimizers update, and keep state for, only
the rows a step touched:

- **Touched rows.** A parameter is viewed as rows: a 2-D (or wider) parameter by its first dimension (for
  ``SparseLinear.weight`` [in_features, out], one row per input feature), a 1-D parameter as one row. With a
  sparse COO gradient the touched rows are its (coalesced) indices; with a dense gradient (``SparseLinear``'s,
  after the collectives averaged it) the rows whose gradient row is not all zero.
- **Small parameters are dense.** A parameter with fewer than ``dense_below_rows`` rows (default
  ``DENSE_BELOW_ROWS``: biases, later MLP layers, the output layer) has every row touched on every step it
  has a gradient, so it follows the dense rule of its optimizer: nothing is saved by skipping rows there, and a
  dead ReLU unit's zero gradient row keeps decaying its Adam moments as dense Adam does.
- A parameter whose ``grad`` is ``None`` is skipped, as torch's optimizers do.

Each optimizer's exact update is in its docstring, with how it differs from its dense counterpart. Rows
never touched keep their value bit for bit and their state as initialised. The state is tensors
in ``self.state`` (per-row step counts under the key ``step``, which torch's ``load_state_dict`` does not cast
to the parameter's dtype), so ``state_dict``/``load_state_dict`` round-trip through checkpoints unchanged.

Rank side: imports torch only (never pyspark); ``register`` adds the three names to ``models.OPTIMIZERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkml_dist.config import TrainConfig
from sparkml_dist.registry import Registry

DENSE_BELOW_ROWS = 1024
"""Parameters with fewer rows than this are updated densely (every row touched each step)."""


POSITION_TABLE_MAX_RATIO = 64
"""``coalesce_rows`` maps a row to its place among the unique rows through a table of one int64 per row of the
parameter while that table is at most this many times the number of indices (a 2^20-row layer and a 160k-index
step); beyond it (a 2^24-row layer and a small step), through ``np.unique``'s inverse, which costs no table."""


def coalesce_rows(index: torch.Tensor, values: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sorted distinct rows of ``index`` [n] as int64, ``values`` [n, ...] summed per distinct row): what
    ``torch.sparse_coo_tensor(index[None], values, (rows, ...)).coalesce()`` holds, summed in index order.

    Why not that: on CPU torch's coalesce sorts the int64 indices with a scalar sort; for one 4,096-row step of
    the Criteo-like table (160k indices, a 2^20-row layer) it took 21 ms of a ~25 ms step (issue 33). Here
    the indices are sorted as int32 with numpy's vectorised sort, the distinct ones kept, each index mapped
    to its distinct row's place and the values summed with one ``index_add_``: ~4 ms (measured, one thread).
    An index outside [0, rows) is a ``ValueError`` naming it (the check torch's ``check_invariants`` makes).
    Other devices use torch's coalesce (a GPU's sort is not the bottleneck).
    """
    n = index.numel()
    if index.device.type != "cpu" or n == 0 or rows >= 2**31:
        shape = (rows, *values.shape[1:])
        summed = torch.sparse_coo_tensor(index.reshape(1, -1), values, shape, check_invariants=True).coalesce()
        return summed.indices()[0], summed.values()
    raw = index.numpy()
    lo, hi = int(raw.min()), int(raw.max())
    if lo < 0 or hi >= rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"row index {bad} is outside [0, {rows}): a row-sparse gradient's rows must be in range")
    keys = raw.astype(np.int32)
    ordered = np.sort(keys)
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    distinct = ordered[first]
    if rows <= POSITION_TABLE_MAX_RATIO * n:
        place = np.empty(rows, dtype=np.int64)  # only the distinct rows' entries are written, and read
        place[distinct] = np.arange(len(distinct))
        inverse = place[keys]
    else:
        distinct, inverse = np.unique(keys, return_inverse=True)
    summed = values.new_zeros((len(distinct), *values.shape[1:]))
    summed.index_add_(0, torch.from_numpy(inverse.astype(np.int64, copy=False)), values)
    return torch.from_numpy(distinct.astype(np.int64)), summed


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A sparse COO tensor sparse in its first dimension, coalesced by ``coalesce_rows`` (marked coalesced, so
    later ``coalesce()`` calls are free); anything else as ``grad.coalesce()`` (a dense tensor unchanged)."""
    if not grad.is_sparse or grad.is_coalesced():
        return grad
    if grad.sparse_dim() != 1:
        return grad.coalesce()
    idx, values = coalesce_rows(grad._indices()[0], grad._values(), grad.shape[0])
    return torch.sparse_coo_tensor(idx.unsqueeze(0), values, grad.shape, is_coalesced=True, check_invariants=False)


def touched_rows(grad: torch.Tensor, rows: int, dense: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row indices, their gradient rows [k, cols]) of ``grad`` viewed as ``rows`` rows.

    Indices are ``None`` when every row is touched (``dense``): the caller then updates the whole parameter
    in place instead of gathering and scattering. A sparse COO gradient gives its coalesced indices (sparse
    in the first dimension, as ``nn.EmbeddingBag(sparse=True)`` produces); a dense one the rows with any
    non-zero entry.
    """
    if grad.is_sparse:
        grad = coalesced(grad)
        if dense or grad.dim() < 2 or grad.sparse_dim() != 1:  # not row-sparse in the first dimension: densify
            grad = grad.to_dense()
        else:
            return grad.indices()[0], grad.values().reshape(grad.indices().shape[1], -1)
    flat = grad.reshape(rows, -1)
    if dense:
        return None, flat
    idx = _nonzero_rows(flat)
    return idx, flat.index_select(0, idx)


def _nonzero_rows(flat: torch.Tensor) -> torch.Tensor:
    """Indices (int64) of the rows of ``flat`` [rows, cols] with a non-zero entry. On CPU through numpy:
    ``np.flatnonzero`` of a boolean mask is ~5x faster than ``torch.nonzero`` on a 2^20-row gradient (0.75 vs
    3.9 ms, one thread), and this scan is what a dense gradient costs a row-sparse step."""
    mask = flat.ne(0)
    if flat.device.type != "cpu":
        return mask.any(dim=1).nonzero().squeeze(1)
    m = mask.numpy()
    return torch.from_numpy(np.flatnonzero(m[:, 0] if m.shape[1] == 1 else m.any(axis=1)))


class RowSparseOptimizer(torch.optim.Optimizer):
    """Shared loop: for every parameter with a gradient, find its touched rows and hand the rows, their
    gradients and the parameter's state to ``update_rows``; scatter the results back."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], dense_below_rows: int) -> None:
        if dense_below_rows < 1:
            raise ValueError(f"dense_below_rows must be >= 1, got {dense_below_rows}")
        self.dense_below_rows = dense_below_rows
        super().__init__(params, defaults)

    @staticmethod
    def rows_of(p: torch.Tensor) -> int:
        """How many rows ``p`` has: its first dimension, or one for a scalar or 1-D parameter."""
        return p.shape[0] if p.dim() >= 2 else 1

    def init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The parameter's first state, created on its first step."""
        raise NotImplementedError

    def update_rows(
        self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The new weights [k, cols] of the rows whose weights are ``w`` and gradients ``g``, and their new state:
        ``{"param": rows, state key: rows}``. ``state`` holds those rows' state (gathered, or views of the whole
        tensors on the dense path): read it, do not write it; the caller writes the results back."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows = self.rows_of(p)
                state = self.state[p]
                if not state:
                    state.update(self.init_state(p, group))
                idx, g = touched_rows(p.grad, rows, dense=rows < self.dense_below_rows)
                flat = p.view(rows, -1)
                if idx is None:  # every row: update the tensors in place, no gather/scatter
                    views = {k: v.view(rows, -1) if k != "step" else v for k, v in state.items()}
                    new = self.update_rows(flat, g.to(p.dtype), views, group)
                    flat.copy_(new.pop("param"))
                    for key, value in new.items():
                        views[key].copy_(value)
                    continue
                if idx.numel() == 0:
                    continue
                gathered = {k: v.view(rows, -1).index_select(0, idx) if k != "step" else v[idx] for k, v in
                            state.items()}  # fmt: skip
                new = self.update_rows(flat.index_select(0, idx), g.to(p.dtype), gathered, group)
                flat.index_copy_(0, idx, new.pop("param"))
                for key, value in new.items():
                    target = state[key] if key == "step" else state[key].view(rows, -1)
                    target.index_copy_(0, idx, value)
        return loss


class LazyAdam(RowSparseOptimizer):
    """Adam that updates a row's moments and weights only on the steps that touched the row (``lazy_adam``).

    Exact semantics, per row r with its own step count t_r (the number of steps that touched r so far, kept
    per row, not one global count): on a step that touches r, with gradient row g (plus ``weight_decay`` x w_r,
    L2 as in ``torch.optim.Adam``, only on touched rows)::

        t_r += 1
        m_r = beta1 m_r + (1 - beta1) g
        v_r = beta2 v_r + (1 - beta2) g^2
        w_r -= lr / (1 - beta1^t_r) * m_r / (sqrt(v_r) / sqrt(1 - beta2^t_r) + eps)

    and on a step that does not touch r nothing of r changes. So a row's trajectory is exactly dense
    ``torch.optim.Adam`` run on the subsequence of its own non-zero gradient rows. How this differs from
    dense Adam on the same gradients: an untouched row (its gradient exactly zero) is not moved by its
    stale momentum and its moments do not decay; weight decay acts only on touched rows; and bias
    correction uses the row's count t_r, so a row first seen at step 10,000 takes a first step of about
    ``lr`` (with a global count, as ``torch.optim.SparseAdam`` and TensorFlow's LazyAdam do, its first step
    would be (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr with the default betas). Parameters updated densely (see
    the module docstring) behave exactly as ``torch.optim.Adam``.

    State per parameter: ``exp_avg`` and ``exp_avg_sq`` (its shape) and ``step`` (int64, one per row).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dense_below_rows: int = DENSE_BELOW_ROWS,
    ) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
                         dense_below_rows)  # fmt: skip

    def init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            "step": torch.zeros(self.rows_of(p), dtype=torch.int64, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }

    def update_rows(
        self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        beta1, beta2 = group["betas"]
        if group["weight_decay"]:
            g = g.add(w, alpha=group["weight_decay"])
        step = state["step"] + 1
        m = state["exp_avg"].mul(beta1).add_(g, alpha=1 - beta1)
        v = state["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
        t = step.to(torch.float64).unsqueeze(1)  # float64: beta^t for t in the millions stays exact enough
        bias1 = (1 - beta1**t).to(w.dtype)
        bias2_sqrt = (1 - beta2**t).sqrt().to(w.dtype)
        denom = (v.sqrt() / bias2_sqrt).add_(group["eps"])
        return {"param": w - group["lr"] / bias1 * m / denom, "step": step, "exp_avg": m, "exp_avg_sq": v}


class RowAdagrad(RowSparseOptimizer):
    """Adagrad with a per-coordinate accumulator, updated only on touched rows (``adagrad``).

    Exact semantics, per coordinate i of a touched row, with gradient g (plus ``weight_decay`` x w_i, only on
    touched rows)::

        G_i += g^2
        w_i -= lr * g / (sqrt(G_i) + eps)

    and nothing changes on an untouched row. Without weight decay this is exactly ``torch.optim.Adagrad``
    (``lr_decay=0``, ``initial_accumulator_value`` as given): an untouched row's gradient is zero, so dense
    Adagrad would leave its accumulator and weights unchanged too; the rows are just never read. With weight
    decay the difference is that untouched rows are not decayed. Hence one name, ``adagrad``, and no separate
    dense variant to choose between.

    State per parameter: ``sum`` (its shape, starting at ``initial_accumulator_value``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        dense_below_rows: int = DENSE_BELOW_ROWS,
    ) -> None:
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay, "initial": initial_accumulator_value}
        super().__init__(params, defaults, dense_below_rows)

    def init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"sum": torch.full_like(p, group["initial"], memory_format=torch.preserve_format)}

    def update_rows(
        self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        if group["weight_decay"]:
            g = g.add(w, alpha=group["weight_decay"])
        total = state["sum"].addcmul(g, g, value=1)
        return {"param": w.addcdiv(g, total.sqrt().add_(group["eps"]), value=-group["lr"]), "sum": total}


class Ftrl(RowSparseOptimizer):
    """FTRL-Proximal (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013, Algorithm 1),
    per coordinate, updated only on touched rows (``ftrl``).

    Exact semantics, per coordinate i of a touched row with gradient g and current weight w_i::

        sigma = (sqrt(n_i + g^2) - sqrt(n_i)) / alpha
        z_i += g - sigma * w_i
        n_i += g^2
        w_i = 0                                                         if |z_i| <= l1
              -(z_i - sign(z_i) l1) / ((beta + sqrt(n_i)) / alpha + l2)   otherwise

    The weight is the lazy closed form from (z, n): L1 gives exact zeros, and a coordinate whose gradient is
    zero is left as it is (sigma = 0, z and n unchanged), so the row-sparse update is the dense one on any
    coordinate not touched. Two choices the paper leaves open:

    - **Start from the model's weights, not zero.** On a parameter's first step, z is set so that the
      closed form with n = 0 gives back its current weight w0: ``z = -(w0 (beta/alpha + l2) + sign(w0) l1)``.
      So a random initialisation (an MLP's first layer needs one) is kept until gradients move it, and a
      zero-initialised model starts at the paper's z = 0.
    - **alpha** is the group's ``alpha`` when set, else its ``lr`` (so ``train.lr``, with world-size scaling
      and warm-up, drives it when ``train.ftrl_alpha`` is unset). beta, l1 and l2 are fixed.

    ``weight_decay`` is not an argument: L2 is ``l2``, applied inside the proximal step.

    State per parameter: ``z`` and ``n`` (its shape).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        alpha: float | None = None,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
        dense_below_rows: int = DENSE_BELOW_ROWS,
    ) -> None:
        if beta < 0 or l1 < 0 or l2 < 0 or (alpha is not None and alpha <= 0):
            raise ValueError(f"FTRL needs alpha > 0 and beta, l1, l2 >= 0; got {alpha}, {beta}, {l1}, {l2}")
        super().__init__(params, {"lr": lr, "alpha": alpha, "beta": beta, "l1": l1, "l2": l2}, dense_below_rows)

    @staticmethod
    def _alpha(group: dict[str, Any]) -> float:
        return float(group["alpha"] if group["alpha"] is not None else group["lr"])

    def init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        w = p.detach()
        z = -(w * (group["beta"] / self._alpha(group) + group["l2"]) + torch.sign(w) * group["l1"])
        return {"z": z.clone(memory_format=torch.preserve_format), "n": torch.zeros_like(p)}

    def update_rows(
        self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        alpha, l1 = self._alpha(group), group["l1"]
        n_old = state["n"]
        n = n_old.addcmul(g, g, value=1)
        sigma = (n.sqrt() - n_old.sqrt()) / alpha
        z = state["z"] + g - sigma * w
        new_w = -(z - torch.sign(z) * l1) / ((group["beta"] + n.sqrt()) / alpha + group["l2"])
        new_w = torch.where(z.abs() <= l1, torch.zeros_like(new_w), new_w)
        return {"param": new_w, "z": z, "n": n}


def register(optimizers: Registry[Callable[[TrainConfig, Iterable[nn.Parameter]], torch.optim.Optimizer]]) -> None:
    """Add ``lazy_adam``, ``adagrad`` and ``ftrl`` to the optimizer registry ``optimizers`` (models.OPTIMIZERS),
    each a builder(cfg, parameters) reading its hyper-parameters from ``TrainConfig``."""
    optimizers.register("lazy_adam")(lambda cfg, params: LazyAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    optimizers.register("adagrad")(lambda cfg, params: RowAdagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    optimizers.register("ftrl")(
        lambda cfg, params: Ftrl(
            params, lr=cfg.lr, alpha=cfg.ftrl_alpha, beta=cfg.ftrl_beta, l1=cfg.ftrl_l1, l2=cfg.ftrl_l2
        )  # fmt: skip
    )
