"""Row-sparse optimizers (issue 33 item 1): lazy_adam, adagrad and ftrl against straightforward dense numpy
references on the touched rows, untouched rows unchanged bit for bit, FTRL's exact zeros, state_dict round
trips, and in-process training on the sparse layout (a resumed run equals a straight one)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkml_dist.config import ConfigError, load_config
from sparkml_dist.models import OPTIMIZERS
from sparkml_dist.training.sparse_optim import DENSE_BELOW_ROWS, Ftrl, LazyAdam, RowAdagrad, coalesce_rows, coalesced

ROWS, COLS, STEPS = DENSE_BELOW_ROWS + 24, 3, 6


class AdamRef:
    """Dense Adam per row over only the steps that touched the row (its own step count)."""

    def __init__(self, w: np.ndarray, lr: float, wd: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.w, self.lr, self.wd, self.b1, self.b2, self.eps = w.copy(), lr, wd, b1, b2, eps
        self.m, self.v = np.zeros_like(w), np.zeros_like(w)
        self.t = np.zeros(w.shape[0], dtype=np.int64)

    def step(self, grad: np.ndarray, rows: np.ndarray) -> None:
        for r in rows:
            g = grad[r] + self.wd * self.w[r]
            self.t[r] += 1
            self.m[r] = self.b1 * self.m[r] + (1 - self.b1) * g
            self.v[r] = self.b2 * self.v[r] + (1 - self.b2) * g * g
            m_hat = self.m[r] / (1 - self.b1 ** self.t[r])
            v_hat = self.v[r] / (1 - self.b2 ** self.t[r])
            self.w[r] = self.w[r] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class AdagradRef:
    def __init__(self, w: np.ndarray, lr: float, wd: float, eps: float = 1e-10):
        self.w, self.lr, self.wd, self.eps = w.copy(), lr, wd, eps
        self.G = np.zeros_like(w)

    def step(self, grad: np.ndarray, rows: np.ndarray) -> None:
        for r in rows:
            g = grad[r] + self.wd * self.w[r]
            self.G[r] += g * g
            self.w[r] = self.w[r] - self.lr * g / (np.sqrt(self.G[r]) + self.eps)


class FtrlRef:
    """McMahan et al. 2013, Algorithm 1, per coordinate, z started so the closed form gives the initial w."""

    def __init__(self, w: np.ndarray, alpha: float, beta: float, l1: float, l2: float):
        self.w, self.alpha, self.beta, self.l1, self.l2 = w.copy(), alpha, beta, l1, l2
        self.z = -(w * (beta / alpha + l2) + np.sign(w) * l1)
        self.n = np.zeros_like(w)

    def step(self, grad: np.ndarray, rows: np.ndarray) -> None:
        for r in rows:
            for c in range(self.w.shape[1]):
                g = grad[r, c]
                sigma = (np.sqrt(self.n[r, c] + g * g) - np.sqrt(self.n[r, c])) / self.alpha
                self.z[r, c] += g - sigma * self.w[r, c]
                self.n[r, c] += g * g
                z = self.z[r, c]
                if abs(z) <= self.l1:
                    self.w[r, c] = 0.0
                else:
                    rate = (self.beta + np.sqrt(self.n[r, c])) / self.alpha + self.l2
                    self.w[r, c] = -(z - np.sign(z) * self.l1) / rate


def _build(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "lazy_adam":
        return LazyAdam(params, lr=0.05, weight_decay=0.01)
    if name == "adagrad":
        return RowAdagrad(params, lr=0.3, weight_decay=0.01)
    return Ftrl(params, lr=0.5, beta=1.0, l1=0.05, l2=0.1)


def _reference(name: str, w: np.ndarray):
    if name == "lazy_adam":
        return AdamRef(w, lr=0.05, wd=0.01)
    if name == "adagrad":
        return AdagradRef(w, lr=0.3, wd=0.01)
    return FtrlRef(w, alpha=0.5, beta=1.0, l1=0.05, l2=0.1)


def _step_grads(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(touched rows, dense gradient with zero rows elsewhere) for each step: different, overlapping sets
    (row 0 every step, some rows once), one row touched in only one of its columns."""
    rng = np.random.default_rng(seed)
    steps = []
    for s in range(STEPS):
        rows = np.unique(np.concatenate([[0], rng.choice(ROWS, size=40 + 10 * s, replace=False)]))
        grad = np.zeros((ROWS, COLS))
        grad[rows] = rng.standard_normal((len(rows), COLS))
        grad[rows[-1], 1:] = 0.0  # touched in one column only: its other columns still move under Adam
        steps.append((rows, grad))
    return steps


OPTIMIZER_NAMES = ["lazy_adam", "adagrad", "ftrl"]


@pytest.mark.parametrize("layout", ["dense", "coo"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_touched_rows_follow_the_dense_reference_and_untouched_rows_stay_bit_for_bit(name: str, layout: str) -> None:
    w0 = np.random.default_rng(1).uniform(-0.2, 0.2, (ROWS, COLS))
    weight = torch.nn.Parameter(torch.tensor(w0))
    opt = _build(name, [weight])
    ref = _reference(name, w0)
    for rows, grad in _step_grads(2):
        before = weight.detach().clone()
        if layout == "dense":
            weight.grad = torch.tensor(grad)
        else:  # what nn.EmbeddingBag(sparse=True) hands over: the touched rows' indices and values
            idx = torch.tensor(rows).unsqueeze(0)
            weight.grad = torch.sparse_coo_tensor(idx, torch.tensor(grad[rows]), (ROWS, COLS), check_invariants=True)
        opt.step()
        ref.step(grad, rows)
        untouched = np.setdiff1d(np.arange(ROWS), rows)
        assert torch.equal(weight.detach()[untouched], before[untouched])
        np.testing.assert_allclose(weight.detach().numpy()[rows], ref.w[rows], rtol=0, atol=1e-6)
    np.testing.assert_allclose(weight.detach().numpy(), ref.w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_float32_weights_follow_the_reference(name: str) -> None:
    """The layer's real dtype: float32 state and bias corrections, same maths to float32 precision."""
    w0 = np.random.default_rng(3).uniform(-0.2, 0.2, (ROWS, COLS)).astype(np.float32)
    weight = torch.nn.Parameter(torch.tensor(w0))
    opt, ref = _build(name, [weight]), _reference(name, w0.astype(np.float64))
    for rows, grad in _step_grads(4):
        weight.grad = torch.tensor(grad, dtype=torch.float32)
        opt.step()
        ref.step(grad.astype(np.float32).astype(np.float64), rows)
    np.testing.assert_allclose(weight.detach().numpy(), ref.w, rtol=0, atol=1e-5)


def test_small_parameters_are_dense_lazy_adam_and_adagrad_equal_torch() -> None:
    """A bias (1-D) and a layer below DENSE_BELOW_ROWS rows update every row each step: exactly torch's Adam
    and Adagrad, zero gradient entries included (Adam's moments keep decaying there)."""
    rng = np.random.default_rng(5)
    pairs = [
        (lambda p: LazyAdam(p, lr=0.05, weight_decay=0.01), lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01)),
        (
            lambda p: RowAdagrad(p, lr=0.3, weight_decay=0.01),
            lambda p: torch.optim.Adagrad(p, lr=0.3, weight_decay=0.01),
        ),
    ]
    for ours, theirs in pairs:
        init = [torch.tensor(rng.standard_normal(8)), torch.tensor(rng.standard_normal((16, 4)))]
        a = [torch.nn.Parameter(t.clone()) for t in init]
        b = [torch.nn.Parameter(t.clone()) for t in init]
        opt_a, opt_b = ours(a), theirs(b)
        for s in range(STEPS):
            grads = [torch.tensor(rng.standard_normal(t.shape)) for t in init]
            grads[1][s] = 0.0  # a zero row: still a dense step for a small parameter
            for p, q, g in zip(a, b, grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-9, rtol=0)


def test_adagrad_without_weight_decay_equals_torch_adagrad_on_a_wide_layer() -> None:
    """An untouched row's gradient is zero, where dense Adagrad changes nothing either: the same result."""
    w0 = torch.tensor(np.random.default_rng(6).uniform(-0.2, 0.2, (ROWS, COLS)))
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a, opt_b = RowAdagrad([a], lr=0.3), torch.optim.Adagrad([b], lr=0.3)
    for _, grad in _step_grads(7):
        a.grad, b.grad = torch.tensor(grad), torch.tensor(grad)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0)


def test_ftrl_l1_gives_exact_zeros_where_the_reference_does() -> None:
    w0 = np.zeros((ROWS, COLS))
    weight = torch.nn.Parameter(torch.tensor(w0))
    opt = Ftrl([weight], lr=0.5, l1=0.8, l2=0.1)
    ref = FtrlRef(w0, alpha=0.5, beta=1.0, l1=0.8, l2=0.1)
    touched: set[int] = set()
    for rows, grad in _step_grads(8):
        weight.grad = torch.tensor(grad * 0.5)
        opt.step()
        ref.step(grad * 0.5, rows)
        touched.update(rows.tolist())
    w = weight.detach().numpy()
    seen = sorted(touched)
    zeros = w[seen] == 0.0
    assert zeros.any() and not zeros.all(), zeros.mean()  # L1 cuts some touched coordinates, not all
    np.testing.assert_array_equal(zeros, ref.w[seen] == 0.0)
    np.testing.assert_allclose(w, ref.w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_round_trips_and_a_resumed_optimizer_equals_a_straight_one(name: str) -> None:
    rng = np.random.default_rng(9)
    init = [torch.tensor(rng.uniform(-0.2, 0.2, (ROWS, COLS))), torch.tensor(rng.standard_normal(COLS))]
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    opt = _build(name, straight)
    steps = _step_grads(10)

    def run(params: list[torch.nn.Parameter], o: torch.optim.Optimizer, part: list) -> None:
        for _, grad in part:
            params[0].grad, params[1].grad = torch.tensor(grad), torch.tensor(grad[0])
            o.step()

    run(straight, opt, steps[:3])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in straight], "opt": opt.state_dict()}, buf)
    run(straight, opt, steps[3:])

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = _build(name, resumed)
    opt2.load_state_dict(saved["opt"])
    if name == "lazy_adam":  # the per-row step counts stay integers through load_state_dict
        assert opt2.state[resumed[0]]["step"].dtype == torch.int64
    run(resumed, opt2, steps[3:])
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("rows", [1000, 1 << 24])  # the position table, and np.unique's inverse
@pytest.mark.parametrize("trailing", [(), (1,), (3,), (2, 2)])
def test_coalesce_rows_equals_torch_coalesce(rows: int, trailing: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(rows + len(trailing))
    index = torch.randint(0, rows, (5000,), generator=gen)
    index[:50] = rows - 1  # the last row, many times
    index[50:60] = 0
    values = torch.randn(5000, *trailing, generator=gen)
    want = torch.sparse_coo_tensor(index[None], values, (rows, *trailing)).coalesce()
    got_idx, got = coalesce_rows(index, values, rows)
    assert got_idx.dtype == torch.int64 and torch.equal(got_idx, want.indices()[0])
    torch.testing.assert_close(got, want.values(), rtol=1e-5, atol=1e-5)
    sparse = torch.sparse_coo_tensor(index[None], values, (rows, *trailing))
    merged = coalesced(sparse)
    assert merged.is_coalesced() and torch.equal(merged.indices(), want.indices())
    torch.testing.assert_close(merged.to_dense(), want.to_dense(), rtol=1e-5, atol=1e-5)


def test_coalesce_rows_names_a_row_out_of_range_and_takes_no_rows() -> None:
    values = torch.ones(3, 2)
    for bad in (10, -1):
        with pytest.raises(ValueError, match=f"row index {bad} is outside \\[0, 10\\)"):
            coalesce_rows(torch.tensor([1, bad, 2]), values, 10)
    idx, summed = coalesce_rows(torch.empty(0, dtype=torch.int64), torch.empty(0, 2), 10)
    assert idx.numel() == 0 and summed.shape == (0, 2)


def test_the_names_are_registered_and_the_ftrl_fields_are_checked(tmp_path: Path) -> None:
    assert {"lazy_adam", "adagrad", "ftrl"} <= set(OPTIMIZERS.names())
    base = [f"paths.work_dir={tmp_path}"]
    cfg = load_config(None, [*base, "train.optimizer=ftrl", "train.ftrl_alpha=0.3", "train.ftrl_l1=1"])
    opt = OPTIMIZERS.get("ftrl")(cfg.train, [torch.nn.Parameter(torch.zeros(3))])
    assert opt.param_groups[0]["alpha"] == 0.3 and opt.param_groups[0]["l1"] == 1.0
    with pytest.raises(ConfigError, match=r"train.ftrl_alpha must be > 0 .*got -1"):
        load_config(None, [*base, "train.ftrl_alpha=-1"])
    for key in ("ftrl_beta", "ftrl_l1", "ftrl_l2"):
        with pytest.raises(ConfigError, match=rf"train.{key} must be >= 0, got -0.5: set train.{key}=0"):
            load_config(None, [*base, f"train.{key}=-0.5"])
    with pytest.raises(ConfigError, match=r"train.weight_decay=0.1 does not apply to train.optimizer=ftrl.*ftrl_l2"):
        load_config(None, [*base, "train.optimizer=ftrl", "train.weight_decay=0.1"])
    with pytest.raises(ConfigError, match=r"train.optimizer='lazyadam' is not a known optimizer.*lazy_adam"):
        load_config(None, [*base, "train.optimizer=lazyadam"])


# --- in-process training on the sparse layout (Spark partitions, ranks run as driver threads) ----------


BUCKETS = 2048  # 2 + 2 x 2048 weight rows: above DENSE_BELOW_ROWS, so the first layer is row-sparse
SETTINGS = {
    "lazy_adam": ["train.optimizer=lazy_adam", "train.lr=0.05"],
    "adagrad": ["train.optimizer=adagrad", "train.lr=0.3"],
    "ftrl": ["train.optimizer=ftrl", "train.lr=0.5", "train.ftrl_l1=0.001", "train.ftrl_l2=0.001"],
}


def _sets(root: Path, *extra: str) -> list[str]:
    return [
        f"paths.work_dir={root}",
        f"data.input_url=file://{root / 'clicks'}",
        f"partition.output_url=file://{root / 'out'}",
        f"train.manifest_url=file://{root / 'out'}",
        "data.categorical_cols=[site,device]",
        f"data.hash_buckets={BUCKETS}",
        "partition.num_shards=2",
        "partition.row_group_mb=0.05",
        "train.batch_size=64",
        "train.epochs=3",
        "launch.backend=in_process",
        "tracking.log_model=false",
        "tracking.system_metrics_s=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def clicks(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sparkml_dist.partition import partition

    root = tmp_path_factory.mktemp("sparse-optim")
    rng = np.random.default_rng(0)
    n = 3000
    site, device = rng.zipf(1.3, n) % 300, rng.integers(0, 4, n)
    weight_site = np.random.default_rng(99).standard_normal(300)
    promo, price = rng.random(n) < 0.3, rng.standard_normal(n)
    logit = 1.5 * weight_site[site] + 0.8 * (device == 2) - 0.7 * promo + 0.5 * price
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    rows = [(i, f"s{site[i]}", int(device[i]), bool(promo[i]), float(price[i]), int(label[i])) for i in range(n)]
    schema = "row_id long, site string, device int, promo boolean, price double, label long"
    spark.createDataFrame(rows, schema).write.parquet(f"file://{root / 'clicks'}")
    partition(spark, load_config(None, _sets(root)))
    return root


def _history(result, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _base_rate_logloss(cfg) -> float:
    from sparkml_dist.loader import build_loader_spec, read_all
    from sparkml_dist.manifest import read_manifest

    _, y = read_all(build_loader_spec(read_manifest(cfg.train.manifest_url), 0, 1, cfg.train, split="validation"))
    p = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_each_optimizer_trains_the_sparse_layout_and_a_resume_equals_a_straight_run(spark, clicks, name):
    from sparkml_dist import checkpoint
    from sparkml_dist.fit import run_training

    sets = [*SETTINGS[name], "train.max_steps_per_epoch=12"]
    cfg = load_config(None, _sets(clicks, *sets))
    straight = run_training(spark, cfg)
    train_loss = _history(straight, "train/loss")
    assert train_loss[-1] < train_loss[0], train_loss
    assert _history(straight, "val/log_loss")[-1] < _base_rate_logloss(cfg) - 0.02, _history(straight, "val/log_loss")

    first = run_training(spark, load_config(None, _sets(clicks, *sets, "train.epochs=1")))
    resumed = run_training(spark, load_config(None, _sets(clicks, *sets, f"train.resume_run_id={first.run_id}")))
    assert resumed.run_id == first.run_id and resumed.resumed_from_epoch == 1
    a, b = (checkpoint.load_latest(f"{cfg.train.runs_url}/{r.run_id}/checkpoints") for r in (straight, resumed))
    assert a is not None and b is not None
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-6, rtol=0)
    assert a["optimizer"]["state"], "the checkpoint holds the optimizer's row state"


@pytest.mark.parametrize("name", ["adam", "lazy_adam"])
def test_row_sparse_gradients_train_the_same_model_as_dense_ones_and_send_only_the_touched_rows(spark, clicks, name):
    """train.sparse_gradients on the real path (Spark partitions, in-process ranks): the same model as dense
    gradients, for a dense optimizer (the rows are densified after the exchange) and a row-sparse one, with
    the bytes per step of the touched rows instead of the whole first layer."""
    from sparkml_dist import checkpoint
    from sparkml_dist.fit import run_training

    sets = [*SETTINGS.get(name, ["train.optimizer=adam", "train.lr=0.05"]), "train.max_steps_per_epoch=12"]
    runs = {}
    for mode in ("off", "on"):
        cfg = load_config(None, _sets(clicks, *sets, "train.epochs=2", f"train.sparse_gradients={mode}"))
        runs[mode] = run_training(spark, cfg)
    runs_url = load_config(None, _sets(clicks)).train.runs_url
    models = {m: checkpoint.load_latest(f"{runs_url}/{r.run_id}/checkpoints")["model"] for m, r in runs.items()}
    for key in models["off"]:
        torch.testing.assert_close(models["on"][key], models["off"][key], atol=1e-5, rtol=0)
    sent = {m: r.final["comm_bytes_per_step"] for m, r in runs.items()}
    width = 2 + 2 * BUCKETS
    assert sent["off"] == pytest.approx(4 * (width + 1))  # the dense gradient, every step
    # 64 rows x 2 categorical columns touch at most 128 rows; each row travels as (index, value): 8 bytes
    assert 0 < sent["on"] <= 4 * (1 + 2 * (2 + 128)), sent
    assert all(r.final["rank_peak_rss_mb"] > 50 for r in runs.values())  # the ranks' high-water mark, logged
