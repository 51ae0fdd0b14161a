"""Row-sparse gradients (``train.sparse_gradients``, ``sparkml_dist/comm/rows.py``): the wide first layer's
gradient as the rows a batch touched, exchanged as rows. The maths on in-process ranks (no Spark): the
exchange is the exact mean, a strategy step with it equals the dense one for a dense and a row-sparse
optimizer, clipping equals torch's, the bytes are the rows'; where it cannot apply it is refused or left off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sparkml_dist.comm import build_strategy
from sparkml_dist.comm.rows import clip_grad_norm, densify_before_step, mean_of_rows, row_sparse_choice, set_row_sparse
from sparkml_dist.config import CommConfig, ConfigError, TrainConfig, load_config
from sparkml_dist.errors import UserError
from sparkml_dist.models import OPTIMIZERS, SparseLinear, build_model
from sparkml_dist.rank import run_in_process
from sparkml_dist.sparse_optim import RowSparseOptimizer


def _csr(rows: list[list[int]], width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    crow = torch.tensor([0, *torch.tensor([len(r) for r in rows]).cumsum(0).tolist()])
    cols = torch.tensor([c for r in rows for c in r])
    return torch.sparse_csr_tensor(crow, cols, torch.rand(len(cols), generator=g), (len(rows), width))


def test_the_layers_sparse_gradient_holds_exactly_the_dense_gradients_touched_rows():
    torch.manual_seed(0)
    x = _csr([[1, 5, 5], [7], [1, 900]], 1000, 0)  # a row twice in one sample, one in two samples
    layer = SparseLinear(1000, 3)
    dense = copy.deepcopy(layer)
    layer.sparse_grad = True
    y = torch.randn(3, 3)
    ((layer(x) - y) ** 2).sum().backward()
    ((dense(x) - y) ** 2).sum().backward()
    assert layer.weight.grad.is_sparse and not dense.weight.grad.is_sparse
    grad = layer.weight.grad.coalesce()
    assert grad.indices()[0].tolist() == [1, 5, 7, 900]
    torch.testing.assert_close(grad.to_dense(), dense.weight.grad, atol=1e-7, rtol=0)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


def test_the_row_exchange_is_the_exact_mean_and_sends_only_the_touched_rows():
    shape = torch.Size([50, 2])
    touched = [[3, 10, 49], [10, 11], []]  # overlapping rows, a different count per rank, one rank with none
    grads = []
    for rank, rows in enumerate(touched):
        dense = torch.zeros(shape)
        dense[rows] = torch.randn(len(rows), 2, generator=torch.Generator().manual_seed(rank))
        grads.append(dense)

    def fn(ctx):
        comm = ctx.collectives()
        sparse = grads[ctx.rank].to_sparse(1)
        out = mean_of_rows(sparse, shape, comm, "g")
        return out, comm.meter.payload_bytes

    results = run_in_process(fn, 3)
    expected = torch.stack(grads).mean(0)
    for out, _ in results:
        assert out.is_sparse and out.indices()[0].tolist() == [3, 10, 11, 49]
        torch.testing.assert_close(out.to_dense(), expected, atol=1e-7, rtol=0)
    assert [sent for _, sent in results] == [len(rows) * (2 + 1) * 4 for rows in touched]


def test_a_dense_gradient_of_a_row_sparse_parameter_is_sent_as_its_nonzero_rows():
    dense = torch.zeros(20, 1)
    dense[[4, 9]] = 1.0
    out = run_in_process(lambda ctx: mean_of_rows(dense, dense.shape, ctx.collectives(), "g"), 2)
    assert out[0].indices()[0].tolist() == [4, 9]
    torch.testing.assert_close(out[0].to_dense(), dense)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lazy_adam", "adagrad", "ftrl"])
@pytest.mark.parametrize("compression", ["none", "nonzero"])
def test_an_allreduce_step_with_row_sparse_gradients_equals_the_dense_step(optimizer: str, compression: str):
    """Two ranks, different batches, three steps: the same parameters as the dense path (the rows travel,
    the optimizer gets the same mean gradient: densified for adam/sgd, as rows for the row-sparse ones)."""
    width = 3000  # above the row-sparse optimizers' dense-below bound, so their row path runs
    cfg = TrainConfig(model="mlp", hidden_sizes=[4], optimizer=optimizer, lr=0.05, momentum=0.0)
    batches = {
        (rank, step): (
            _csr([[rank * 7 + step, 100 + rank, 2999 - step], [5, 6 + rank]], width, 10 * rank + step),
            torch.randint(0, 2, (2, 1), generator=torch.Generator().manual_seed(rank + step)).float(),
        )
        for rank in range(2)
        for step in range(3)
    }
    torch.manual_seed(3)
    start = build_model(cfg, width, 2, sparse=True)

    def run(row_sparse: bool):
        def fn(ctx):
            model = copy.deepcopy(start)
            params = set_row_sparse(model, row_sparse)
            opt = OPTIMIZERS.get(optimizer)(cfg, model.parameters())
            if params and not isinstance(opt, RowSparseOptimizer):
                densify_before_step(opt)
            strategy = build_strategy(CommConfig(compression=compression), ctx.collectives(), list(model.parameters()),
                                      params)  # fmt: skip
            for step in range(3):
                x, y = batches[ctx.rank, step]
                F.binary_cross_entropy_with_logits(model(x), y).backward()
                strategy.update(opt, None, step)
                opt.zero_grad()
            return model.state_dict()

        return run_in_process(fn, 2)

    dense, rows = run(False), run(True)
    assert dense[0].keys() == rows[0].keys()
    for key in dense[0]:
        torch.testing.assert_close(rows[0][key], dense[0][key], atol=2e-6, rtol=0)
        torch.testing.assert_close(rows[1][key], rows[0][key], atol=0, rtol=0)  # every rank holds the same model


def test_clipping_a_row_sparse_gradient_equals_torch_on_its_dense_form():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(30, 2))
    b = torch.nn.Parameter(torch.randn(2))
    index = torch.tensor([[4, 4, 17]])  # uncoalesced: row 4 twice, summed before the norm
    w.grad = torch.sparse_coo_tensor(index, torch.randn(3, 2) * 10, (30, 2))
    b.grad = torch.randn(2) * 10
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    w2.grad, b2.grad = w.grad.to_dense(), b.grad.clone()
    norm = clip_grad_norm([w, b], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([w2, b2], 1.0)
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(w.grad.to_dense(), w2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_auto_turns_it_on_only_where_it_applies_and_on_says_why_not():
    on = TrainConfig(sparse_gradients="on")
    auto = TrainConfig()
    assert row_sparse_choice(auto, CommConfig(), True, 1)[0]
    assert row_sparse_choice(auto, CommConfig(strategy="local_sgd", compression="nonzero"), True, 1)[0]
    assert not row_sparse_choice(TrainConfig(sparse_gradients="off"), CommConfig(), True, 1)[0]
    for comm, sparse, layers, why in [
        (CommConfig(), False, 1, "not in the sparse layout"),
        (CommConfig(), True, 0, "no SparseLinear layer"),
        (CommConfig(compression="topk"), True, 1, "comm.compression=topk is lossy"),
    ]:
        choice, reason = row_sparse_choice(auto, comm, sparse, layers)
        assert not choice and why in reason
        with pytest.raises(UserError, match=rf"train.sparse_gradients=on cannot apply: .*{why}.*auto or off"):
            row_sparse_choice(on, comm, sparse, layers)


def test_on_is_refused_at_load_where_the_strategy_mode_or_compression_cannot_carry_it():
    base = ["train.sparse_gradients=on"]
    assert load_config(None, base).train.sparse_gradients == "on"  # YAML 1.1 reads on as true: the word is meant
    assert load_config(None, ["train.sparse_gradients=off"]).train.sparse_gradients == "off"
    assert load_config(None, [*base, "comm.strategy=parameter_server"]).comm.strategy == "parameter_server"
    assert load_config(None, ["train.cache=off"]).train.cache == "off"  # the same for every on/off choice
    for extra, message in [
        (["comm.compression=topk"], r"comm.compression=topk would compress the rest lossily: use comm.compression"),
        (["comm.compression=fp16"], r"comm.compression=fp16"),
        (["train.mode=feature_parallel"], r"applies to train.mode=data_parallel, not feature_parallel"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, *extra])
    with pytest.raises(ConfigError, match="sparse_gradients"):
        load_config(None, ["train.sparse_gradients=sometimes"])
