"""Baselines on the sparse feature layout, on real local Spark: a hand-written partition output (Parquet with
row_id, indices, values, label and a real manifest) of a known sparse logistic problem in a 2^18-wide space,
and the same rows in a 64-wide space written both sparse and as the dense array layout."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkml_dist.baselines import (
    _arrow_sparse_blocks,
    _concat_sparse_blocks,
    _memory_bytes,
    check_fits,
    mllib_weights,
    run_baselines,
)
from sparkml_dist.config import ConfigError, load_config
from sparkml_dist.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    ShardEntry,
    SparseLayout,
    read_manifest,
)

ROWS, TRAIN_SHARD_ROWS = 4000, 1800  # two train shards of 1800 rows, 400 validation rows
WIDE = 2**18
REG = 0.01


def _problem(dimension: int, seed: int = 3) -> dict:
    """A sparse logistic problem: per row 18 of 256 informative columns scattered over the whole space (its
    last index included), values N(0, 3^2), labels drawn from the true model."""
    rng = np.random.default_rng(seed)
    n_active = min(dimension, 256)
    active = np.sort(rng.choice(dimension - 1, n_active - 1, replace=False))
    active = np.append(active, dimension - 1)
    w_true = np.zeros(dimension)
    w_true[active] = rng.normal(0.0, 0.2, n_active)
    b_true = 0.3
    rows = []
    for _ in range(ROWS):
        cols = rng.choice(active, min(18, n_active), replace=False)
        rows.append(np.unique(cols).astype(np.int32))
    values = [(3.0 * rng.normal(size=len(c))).astype(np.float32) for c in rows]
    z = np.array([v.astype(np.float64) @ w_true[c] for c, v in zip(rows, values, strict=True)]) + b_true
    y = (rng.random(ROWS) < 1.0 / (1.0 + np.exp(-z))).astype(np.int32)
    return {"dimension": dimension, "indices": rows, "values": values, "y": y, "z": z, "w": w_true, "b": b_true}


def _log_loss(p1: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.where(y == 1, p1, 1.0 - p1), 1e-15, 1.0)
    return float(-np.mean(np.log(p)))


def _write_output(root, problem: dict, layout: str) -> str:
    """train/shard=0, train/shard=1 and validation Parquet files + _manifest.json, as the partition job writes."""
    d, splits = problem["dimension"], {}
    bounds = {"train/shard=0": (0, TRAIN_SHARD_ROWS), "train/shard=1": (TRAIN_SHARD_ROWS, 2 * TRAIN_SHARD_ROWS)}
    bounds["validation"] = (2 * TRAIN_SHARD_ROWS, ROWS)
    for name, (lo, hi) in bounds.items():
        idx, val = problem["indices"][lo:hi], problem["values"][lo:hi]
        cols = {"row_id": pa.array(np.arange(lo, hi, dtype=np.int64))}
        if layout == "sparse":
            cols["indices"] = pa.array([i.tolist() for i in idx], pa.list_(pa.int32()))
            cols["values"] = pa.array([v.tolist() for v in val], pa.list_(pa.float32()))
        else:
            dense = np.zeros((hi - lo, d), np.float32)
            for r, (i, v) in enumerate(zip(idx, val, strict=True)):
                dense[r, i] = v
            cols["features"] = pa.array(list(dense), pa.list_(pa.float32()))
        cols["label"] = pa.array(problem["y"][lo:hi])
        (root / name).mkdir(parents=True)
        rel = f"{name}/part-00000.parquet"
        pq.write_table(pa.table(cols), root / rel, row_group_size=1000)
        meta = pq.ParquetFile(root / rel).metadata
        entry = FileEntry(rel, (root / rel).stat().st_size, meta.num_rows, meta.num_row_groups)
        splits[name] = ShardEntry(name, entry.rows, entry.bytes, [entry])
    sparse = layout == "sparse"
    manifest = Manifest(
        root_url=f"file://{root}",
        mode="shuffle_split",
        seed=0,
        input_url="file:///synthetic/sparse",
        input_fingerprint=f"sparse-test-{d}",
        input_rows=ROWS,
        dropped_rows=0,
        num_classes=2,
        label_col="label",
        row_id_col="row_id",
        features_col=None if sparse else "features",
        feature_names=["features"] if sparse else [f"f{i}" for i in range(d)],
        train=[splits["train/shard=0"], splits["train/shard=1"]],
        validation=splits["validation"],
        schema={"row_id": "bigint", "indices": "array<int>", "values": "array<float>", "label": "int"}
        if sparse
        else {"row_id": "bigint", "features": "array<float>", "label": "int"},
        sparse=SparseLayout(dimension=d) if sparse else None,
    )
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    assert read_manifest(manifest.root_url).num_features == d  # verifies sizes, rows and row groups
    return manifest.root_url


def _cfg(work, manifest_url: str, *sets: str):
    return load_config(
        None,
        [f"paths.work_dir={work}", f"train.manifest_url={manifest_url}", f"baselines.reg_param={REG}", *sets],
    )


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse-wide")
    problem = _problem(WIDE)
    return problem, _write_output(root / "out", problem, "sparse"), root


def test_mllib_lr_and_gd_learn_a_sparse_problem_in_a_wide_space(spark, wide):
    from mlflow.tracking import MlflowClient

    problem, url, work = wide
    cfg = _cfg(work, url, "baselines.kinds=[gd,mllib_lr]", "baselines.max_iterations=20", "baselines.eval_every=20")
    results = {r.kind: r for r in run_baselines(spark, cfg)}
    y_train, y_val = problem["y"][: 2 * TRAIN_SHARD_ROWS], problem["y"][2 * TRAIN_SHARD_ROWS :]
    base = _log_loss(np.full(len(y_val), y_train.mean()), y_val)
    truth = _log_loss(1.0 / (1.0 + np.exp(-problem["z"][2 * TRAIN_SHARD_ROWS :])), y_val)
    active = np.flatnonzero(problem["w"])
    losses = {k: r.final["val_log_loss"] for k, r in results.items()}
    for kind, r in results.items():  # base rate ~0.69, true model ~0.42, both kinds ~0.45
        w = np.asarray(r.weights)
        assert w.shape == (1, WIDE + 1)
        assert losses[kind] < base - 0.15 and abs(losses[kind] - truth) < 0.08, (kind, losses, base, truth)
        assert r.final["val_auc"] > 0.8
        # the weights landed on the true model's columns: no index was shifted or reinterpreted
        assert np.corrcoef(w[0, active], problem["w"][active])[0, 1] > 0.9, kind
        run = MlflowClient(cfg.tracking.tracking_uri).get_run(r.run_id)
        assert run.info.status == "FINISHED" and {"val/log_loss", "val/auc", "final/train_log_loss"} <= set(
            run.data.metrics
        )
    gd, lr = (np.asarray(results[k].weights)[0] for k in ("gd", "mllib_lr"))
    assert abs(losses["gd"] - losses["mllib_lr"]) < 0.01
    np.testing.assert_allclose(gd[active], lr[active], atol=0.05)


def test_dense_and_sparse_layouts_of_the_same_rows_give_the_same_models(spark, tmp_path):
    problem = _problem(64)
    urls = {layout: _write_output(tmp_path / layout, problem, layout) for layout in ("sparse", "array")}
    kinds = ["gd", "sgd", "averaging", "mllib_lr", "mllib_mlp"]
    sets = (
        f"baselines.kinds=[{','.join(kinds)}]",
        "baselines.max_iterations=6",
        "baselines.eval_every=6",
        "baselines.batch_fraction=0.5",
        "baselines.mlp_hidden_sizes=[4]",
    )
    got = {layout: {r.kind: r for r in run_baselines(spark, _cfg(tmp_path, u, *sets))} for layout, u in urls.items()}
    for kind in kinds:
        sparse, dense = got["sparse"][kind], got["array"][kind]
        np.testing.assert_allclose(sparse.weights, dense.weights, rtol=1e-7, atol=1e-9, err_msg=kind)
        assert sparse.final == pytest.approx(dense.final, rel=1e-7), kind
        assert sparse.iterations == dense.iterations


def test_mllib_kinds_that_cannot_fit_are_refused_before_any_run(spark, wide, tmp_path):
    from mlflow.tracking import MlflowClient

    problem, url, work = wide
    huge = dict(problem, dimension=2**24)
    huge_url = _write_output(tmp_path / "huge", huge, "sparse")
    cfg = _cfg(work, huge_url, "baselines.kinds=[gd,mllib_mlp]", "baselines.mlp_hidden_sizes=[8]")
    client = MlflowClient(cfg.tracking.tracking_uri)

    def runs() -> int:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        return len(client.search_runs([experiment.experiment_id])) if experiment else 0

    before = runs()
    with pytest.raises(ConfigError, match="16,777,216") as err:
        run_baselines(spark, cfg)
    assert "Java's array limit" in str(err.value) and "drop mllib_mlp from baselines.kinds" in str(err.value)
    assert runs() == before
    # 2^18 x [64, 32]: 16.8M weights, L-BFGS needs > 2.9 GiB on the driver, which has 2g in these tests
    assert spark.sparkContext.getConf().get("spark.driver.memory") == "2g"  # (tests/conftest.py)
    default_mlp = _cfg(work, url, "baselines.kinds=[mllib_mlp]").baselines
    with pytest.raises(ConfigError, match="spark.driver.memory=2g") as err:
        check_fits(spark, read_manifest(url), default_mlp, "mllib_mlp")
    assert f"{mllib_weights(read_manifest(url), default_mlp, 'mllib_mlp'):,} weights" in str(err.value)
    assert "baselines.mlp_hidden_sizes" in str(err.value)
    assert "raise spark.driver.memory to at least 3.4 GiB" in str(err.value)
    # logistic regression at 2^24 needs 22 x 128 MiB on the driver too; at 2^18 it runs, as a small MLP does
    with pytest.raises(ConfigError, match=r"dimension 16,777,216 .* fits 16,777,217 coefficients"):
        check_fits(spark, read_manifest(huge_url), cfg.baselines, "mllib_lr")
    check_fits(spark, read_manifest(url), cfg.baselines, "mllib_lr")
    check_fits(spark, read_manifest(url), _cfg(work, url, "baselines.mlp_hidden_sizes=[8]").baselines, "mllib_mlp")


def _batch(indices, values, row_ids=None) -> pa.RecordBatch:
    n = len(indices)
    return pa.RecordBatch.from_pydict(
        {
            "row_id": pa.array(row_ids or list(range(n)), pa.int64()),
            "indices": pa.array(indices, pa.list_(pa.int32())),
            "values": pa.array(values, pa.list_(pa.float32())),
            "label": pa.array([1] * n, pa.int32()),
        }
    )


def test_sparse_rows_become_csr_and_bad_rows_are_refused_not_reinterpreted(wide):
    manifest = read_manifest(wide[1])
    batch = _batch([[0, 5], [], [WIDE - 1], [2, 3]], [[1.0, 2.0], [], [3.0], [4.0, 5.0]], [10, 11, 12, 13])
    out = _arrow_sparse_blocks([batch.slice(1, 3)], manifest)  # a sliced batch: its offsets do not start at 0
    rows = [SimpleNamespace(**pa.Table.from_batches([b]).to_pylist()[0]) for b in out]
    ((x, y),) = list(_concat_sparse_blocks(rows, WIDE))
    assert x.shape == (3, WIDE) and list(y) == [1, 1, 1]
    np.testing.assert_array_equal(x.indptr, [0, 0, 1, 3])
    assert x[[1], [WIDE - 1]].item() == 3.0 and x[[2], [3]].item() == 5.0
    bad = {
        "not strictly ascending": _batch([[1, 2], [4, 3]], [[1.0, 1.0], [1.0, 1.0]], [7, 8]),
        "row_id=8 has indices that": _batch([[1, 2], [3, 3]], [[1.0, 1.0], [1.0, 1.0]], [7, 8]),
        f"outside 0..{WIDE - 1}": _batch([[1, WIDE]], [[1.0, 1.0]]),
        "different number of indices and values": _batch([[1, 2]], [[1.0]]),
        "hold a null": _batch([[1, 2], None], [[1.0, 1.0], None]),
    }
    for message, batch in bad.items():
        with pytest.raises(ManifestError, match=message):
            list(_arrow_sparse_blocks([batch], manifest))


def test_spark_memory_settings_are_read_as_spark_reads_them():
    assert _memory_bytes("2g") == _memory_bytes("2048") == _memory_bytes("2048m") == 2 * 2**30
    assert _memory_bytes("3gb") == 3 * 2**30 and _memory_bytes("512k") == 2**19 and _memory_bytes("100b") == 100
    assert _memory_bytes("lots") is None and _memory_bytes(None) is None


def test_a_partition_goes_as_blocks_under_the_pickle_limit(monkeypatch) -> None:
    """PySpark pickles a cached element with a 32-bit length: a partition's rows are cut into blocks of at
    most BLOCK_BYTES (a 10M-row shard in one block overflowed it), rows and order kept."""
    from types import SimpleNamespace

    from sparkml_dist import baselines

    monkeypatch.setattr(baselines, "BLOCK_BYTES", 3 * (5 * 3 * 8 + 5 * 8))  # three batches of 5 rows x 3 features
    batches = [
        SimpleNamespace(x=np.full((5, 3), b, np.float64).tobytes(), y=np.full(5, b, np.int64).tobytes())
        for b in range(7)
    ]
    blocks = list(baselines._concat_blocks(batches))
    assert [len(y) for _, y in blocks] == [15, 15, 5]
    assert np.array_equal(np.concatenate([y for _, y in blocks]), np.repeat(np.arange(7), 5))
    assert all(x.shape == (len(y), 3) for x, y in blocks)
