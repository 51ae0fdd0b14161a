"""The synthetic data generator: deterministic for a seed, balanced as asked, truth recorded."""

from __future__ import annotations

import json

import numpy as np

from jobs import generate as generate_job
from sparkml_dist.config import GenerateConfig
from sparkml_dist.synthetic import generate, read_truth


def _collect(spark, cfg: GenerateConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    df, _ = generate(spark, cfg)
    rows = sorted(df.collect(), key=lambda r: r.row_id)
    ids = np.array([r.row_id for r in rows])
    x = (
        np.array([r.features for r in rows], dtype=np.float32)
        if cfg.layout == "array"
        else np.array([[r[f"f{i}"] for i in range(cfg.features)] for r in rows], dtype=np.float32)
    )
    return ids, x, np.array([r.label for r in rows])


def test_same_seed_same_rows_whatever_the_partitioning(spark):
    a = _collect(spark, GenerateConfig(rows=9000, features=5, partitions=2, seed=3))
    b = _collect(spark, GenerateConfig(rows=9000, features=5, partitions=7, seed=3, layout="columns"))
    c = _collect(spark, GenerateConfig(rows=9000, features=5, partitions=2, seed=4))
    assert (a[0] == np.arange(9000)).all()
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[1], c[1])


def test_class_balance_noise_and_truth(spark):
    cfg = GenerateConfig(rows=20000, features=6, partitions=2, seed=5, positive_fraction=0.2)
    df, truth = generate(spark, cfg)
    _, x, y = _collect(spark, cfg)
    assert abs(y.mean() - 0.2) < 0.02
    # the generating model explains the labels better than a perturbed one
    worse = type(truth)((np.asarray(truth.weights) * 0.5).tolist(), truth.bias, truth.classes, truth.label_noise)
    assert truth.log_loss(x, y) < worse.log_loss(x, y)
    noisy_cfg = GenerateConfig(rows=20000, features=6, partitions=2, seed=5, label_noise=0.3)
    _, xn, yn = _collect(spark, noisy_cfg)
    noisy_truth = generate(spark, noisy_cfg)[1]
    # labels flipped by noise: clean-model accuracy drops by about noise/2
    clean_pred = (truth.probabilities(xn)[:, 1] > 0.5).astype(int)
    assert (clean_pred == yn).mean() < (clean_pred == y).mean() - 0.1
    assert noisy_truth.label_noise == 0.3


def test_multiclass(spark):
    cfg = GenerateConfig(rows=6000, features=4, classes=4, partitions=2, seed=1)
    _, x, y = _collect(spark, cfg)
    assert set(np.unique(y)) == {0, 1, 2, 3}
    truth = generate(spark, cfg)[1]
    assert np.asarray(truth.weights).shape == (4, 4)
    assert truth.log_loss(x, y) < np.log(4)


def test_generate_job_writes_data_and_truth_and_prints_json(spark, tmp_path, capsys):
    out = generate_job.main(
        ["--config", "conf/local.yaml", "--set", f"paths.work_dir={tmp_path}", "--set", "generate.rows=5000"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(out))
    assert out["rows"] == 5000
    truth = read_truth(spark, out["output_url"])
    assert len(truth.weights[0]) == 32
    assert spark.read.parquet(out["output_url"]).count() == 5000


def test_regression_labels_are_the_true_linear_model_plus_gaussian_noise(spark):
    cfg = GenerateConfig(rows=8192, features=5, partitions=2, seed=2, task="regression", noise_std=0.4)
    df, truth = generate(spark, cfg)
    assert dict(df.dtypes)["label"] == "double" and truth.classes == 0
    ids, x, y = _collect(spark, cfg)
    residual = y - truth.predict(x)
    assert abs(residual.mean()) < 0.03 and abs(residual.std() - 0.4) < 0.02
    assert truth.best_mse() == 0.4**2
    # deterministic for the seed, like classification data
    np.testing.assert_array_equal(y, _collect(spark, cfg)[2])
