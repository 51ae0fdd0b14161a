"""Row-sparse gradients: the wide first layer's gradient as the rows a step touched, averaged over ranks by
exchanging only those rows.

A ``SparseLinear`` on sparse input reads ~40 of 2^20 rows per sample, so its gradient is zero outside the
rows the batch touched. With ``train.sparse_gradients`` on (``auto`` turns it on wherever it applies) the
layer's backward yields that gradient as a sparse COO tensor (``embedding_bag(sparse=True)``): [rows, cols]
with only the touched rows stored. Nothing dense of the layer's size is then built per step: not the
gradient, not its zeroing, not the exchange.

The exchange (``mean_of_rows``): each rank coalesces its gradient (a row touched twice is summed once),
packs ``[row index | values]`` per touched row into one float32 block (the index bit-cast from int32, as
``comm.compression=nonzero`` does) and the ranks allgather the blocks, whose lengths differ by rank. Every
rank then sums the rows that several ranks sent and divides by K: the exact mean of the ranks' gradients,
in the layout it came in, so a row-sparse optimizer (``lazy_adam``, ``adagrad``, ``ftrl``) updates only
those rows; any other optimizer gets the gradient densified just before its step (``densify_before_step``).

Bytes a rank sends per step: 4 x (cols + 1) x (rows it touched) instead of the dense ring's
2(K-1)/K x 4 x rows x cols. "Touched" is "in the batch": a row whose summed gradient happens to be exactly
zero is still sent and, for ``lazy_adam``, still counts a step (the dense path would skip it; with real
data this does not occur).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sparkml_dist.config import SPARSE_GRADIENT_COMPRESSIONS, SPARSE_GRADIENT_STRATEGIES, CommConfig, TrainConfig
from sparkml_dist.errors import UserError
from sparkml_dist.runtime.rank import Collectives
from sparkml_dist.training.sparse_optim import coalesce_rows, coalesced

INDEX_LIMIT = 2**31
"""Row indices travel as int32 bit patterns."""


def row_block(grad: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [n] int64, values [n, cols] float32) of a gradient for a parameter of ``shape`` [rows, ...]:
    a sparse COO gradient's coalesced rows, or a dense gradient's non-zero rows (a layer fed dense input)."""
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    if grad.is_sparse:
        grad = coalesced(grad)
        idx = grad.indices()[0]
        return idx, grad.values().reshape(len(idx), cols).to(torch.float32)
    flat = grad.reshape(rows, cols)
    idx = flat.ne(0).any(dim=1).nonzero().squeeze(1)
    return idx, flat.index_select(0, idx).to(torch.float32)


def no_rows(param: torch.Tensor) -> torch.Tensor:
    """An empty row-sparse gradient for ``param`` (a rank whose step touched none of its rows)."""
    index = torch.empty(1, 0, dtype=torch.int64, device=param.device)
    return torch.sparse_coo_tensor(index, param.new_empty(0, *param.shape[1:]), param.shape, check_invariants=False)


def mean_of_rows(grad: torch.Tensor, shape: torch.Size, comm: Collectives, name: str) -> torch.Tensor:
    """The mean over ranks of a row-sparse gradient of a parameter of ``shape``, as a coalesced sparse COO
    tensor holding the rows any rank touched. Every rank must call it (with however many rows it has)."""
    rows = shape[0]
    if rows >= INDEX_LIMIT:
        raise ValueError(f"row-sparse gradients pack int32 row indices: {rows} rows is too many")
    idx, values = row_block(grad, shape)
    cols = values.shape[1]
    block = torch.empty(len(idx), cols + 1, dtype=torch.float32, device=values.device)
    block[:, 0] = idx.to(torch.int32).view(torch.float32)
    block[:, 1:] = values
    gathered = comm.allgather(block, name=name)
    where = gathered[:, 0].contiguous().view(torch.int32).to(torch.int64)
    idx, total = coalesce_rows(where, gathered[:, 1:], rows)  # a peer's row out of range is a ValueError
    total /= comm.world_size
    return torch.sparse_coo_tensor(
        idx.unsqueeze(0), total.reshape(-1, *shape[1:]), shape, is_coalesced=True, check_invariants=False
    )


def row_sparse_choice(cfg: TrainConfig, comm: CommConfig, sparse_input: bool, layers: int) -> tuple[bool, str]:
    """(whether the first layer's gradients are row-sparse, why) for ``train.sparse_gradients``; ``layers``:
    the model's ``SparseLinear`` count. ``on`` where it cannot apply is a ``UserError`` naming why (the config
    check has refused the strategy/compression cases already)."""
    if cfg.sparse_gradients == "off":
        return False, "train.sparse_gradients=off"
    why_not = None
    if not sparse_input:
        why_not = "the data is not in the sparse layout (partition.feature_layout=sparse)"
    elif layers == 0:
        why_not = f"train.model={cfg.model} has no SparseLinear layer"
    elif comm.strategy not in SPARSE_GRADIENT_STRATEGIES:
        why_not = f"comm.strategy={comm.strategy} exchanges dense gradients"
    elif comm.compression not in SPARSE_GRADIENT_COMPRESSIONS:
        why_not = f"comm.compression={comm.compression} is lossy"
    if why_not is None:
        return True, "the touched rows of the first layer's gradient are exchanged (train.sparse_gradients)"
    if cfg.sparse_gradients == "on":
        raise UserError(f"train.sparse_gradients=on cannot apply: {why_not}; set train.sparse_gradients=auto or off")
    return False, f"dense gradients: {why_not}"


def set_row_sparse(model: nn.Module, on: bool) -> list[nn.Parameter]:
    """Switch every ``SparseLinear`` of ``model`` to row-sparse (COO) gradients, or back; returns the
    parameters whose gradients are then row-sparse (the layers' weights; their biases stay dense)."""
    from sparkml_dist.training.models import SparseLinear

    params = []
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.sparse_grad = on
            if on:
                params.append(module.weight)
    return params


def densify_before_step(opt: torch.optim.Optimizer) -> Any:
    """For an optimizer that needs dense gradients (sgd, adam, adamw, a user's): turn a sparse ``p.grad`` into
    its dense form right before every ``step`` (after the exchange, so the wire still moves rows only).
    Returns the hook's handle."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()

    return opt.register_step_pre_hook(hook)


@torch.no_grad()
def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) for gradients of which some are sparse COO (torch's refuses
    them): the same total norm and the same scaling. A sparse gradient is coalesced first (a row touched
    twice is summed before it is squared)."""
    grads: list[tuple[nn.Parameter, torch.Tensor]] = []
    for p in params:
        if p.grad is not None:
            if p.grad.is_sparse:
                p.grad = coalesced(p.grad)
            grads.append((p, p.grad))
    if not grads:
        return torch.tensor(0.0)
    squares = [(g.values() if g.is_sparse else g).float().pow(2).sum() for _, g in grads]
    total = torch.stack(squares).sum().sqrt()
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for p, g in grads:
            if g.is_sparse:
                p.grad = g * coef.to(g.dtype)
            else:
                g.mul_(coef.to(g.dtype))
    return total
