"""The Criteo-like generator (generate.layout=criteo): schema, nulls, Zipf categories, determinism, truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from jobs import generate as generate_job
from sparkml_dist.config import ConfigError, GenerateConfig
from sparkml_dist.synthetic import (
    CRITEO_CARDINALITIES,
    CRITEO_CATEGORICAL_COLS,
    CRITEO_NUMERIC_COLS,
    _zipf_tables,
    category_tokens,
    criteo_block,
    generate,
    make_criteo_true_model,
    read_criteo_truth,
    read_truth,
    token_strings,
)

CFG = GenerateConfig(layout="criteo", rows=20000, partitions=2, seed=11, null_fraction=0.2, positive_fraction=0.25)


def _collect(spark, cfg: GenerateConfig) -> pd.DataFrame:
    df, _ = generate(spark, cfg)
    rows = df.collect()
    return pd.DataFrame([r.asDict() for r in rows], columns=df.columns).sort_values("row_id", ignore_index=True)


@pytest.fixture(scope="module")
def sample(spark) -> pd.DataFrame:
    return _collect(spark, CFG)


def test_schema_nulls_and_values(spark, sample):
    df, truth = generate(spark, CFG)
    types = dict(df.dtypes)
    assert df.columns == ["row_id", *CRITEO_NUMERIC_COLS, *CRITEO_CATEGORICAL_COLS, "label"]
    assert types["row_id"] == "bigint" and types["label"] == "int"
    assert all(types[c] == "double" for c in CRITEO_NUMERIC_COLS)
    assert all(types[c] == "string" for c in CRITEO_CATEGORICAL_COLS)
    assert (sample["row_id"].to_numpy() == np.arange(CFG.rows)).all()
    num = sample[list(CRITEO_NUMERIC_COLS)].to_numpy(dtype=np.float64, na_value=np.nan)
    assert np.abs(np.isnan(num).mean(axis=0) - 0.2).max() < 0.02  # nulls in every numeric column, ~null_fraction
    values = num[~np.isnan(num)]
    assert (values >= 0).all() and (values == np.floor(values)).all()  # counts
    assert np.nanmedian(num[:, 0]) < np.nanmedian(num[:, -1])  # from mostly small to large counts
    cats = sample[list(CRITEO_CATEGORICAL_COLS)]
    assert not cats.isna().any().any()
    assert cats.stack().str.fullmatch("[0-9a-f]{8}").all()
    assert set(sample["label"].unique()) == {0, 1}


def test_same_seed_same_rows_whatever_the_partitioning(spark, sample):
    other = _collect(spark, dataclasses.replace(CFG, partitions=5))
    pd.testing.assert_frame_equal(sample, other)
    # another seed: other rows, but one category keeps one string (the most frequent value of c1 here)
    truth, reseeded = make_criteo_true_model(CFG), make_criteo_true_model(dataclasses.replace(CFG, seed=12))
    tables = _zipf_tables(tuple(truth.cardinalities), truth.zipf_exponent)
    a, b = criteo_block(CFG, truth, tables, 0), criteo_block(dataclasses.replace(CFG, seed=12), reseeded, tables, 0)
    assert not np.array_equal(a[1], b[1])
    top = token_strings(category_tokens(0, np.array([0])))[0]
    assert sample["c1"].value_counts().index[0] == top


def test_distinct_counts_rise_with_cardinality_and_zipf_head_is_heavy(sample):
    distinct = np.array([sample[c].nunique() for c in CRITEO_CATEGORICAL_COLS])
    assert (distinct <= np.array(CRITEO_CARDINALITIES)).all()
    assert distinct[0] == 10 and distinct[3] == CRITEO_CARDINALITIES[3]  # small columns: every value is seen
    assert (np.diff(distinct[::4]) > 0).all() and distinct[-1] > 5000
    # the value of rank k (1-based) has probability k^-s / Z; check ranks 1, 2, 10 of c13 (cardinality 4365)
    c, s = 12, CFG.zipf_exponent
    z = (np.arange(1, CRITEO_CARDINALITIES[c] + 1, dtype=np.float64) ** -s).sum()
    freq = sample[f"c{c + 1}"].value_counts(normalize=True)
    tokens = token_strings(category_tokens(c, np.array([0, 1, 9])))
    for k, token in zip([1, 2, 10], tokens, strict=True):
        assert abs(freq.get(token, 0.0) - k**-s / z) < 0.15 * k**-s / z + 0.003
    # head heavier than tail: in c26 (10M values) the top 10 hold ~31% of rows, the median seen value 1 row
    counts = sample["c26"].value_counts().to_numpy()
    assert counts[:10].sum() > 0.25 * len(sample) and counts[0] > 100 * np.median(counts)


def test_true_model_reproduces_the_labels(sample):
    truth = make_criteo_true_model(CFG)
    y = sample["label"].to_numpy()
    p = truth.probabilities(sample)[:, 1]
    assert abs(y.mean() - 0.25) < 0.02 and abs(p.mean() - y.mean()) < 0.02
    for lo, hi in [(0.0, 0.2), (0.2, 0.5), (0.5, 1.0)]:  # calibrated
        sel = (p >= lo) & (p < hi)
        assert sel.sum() > 500 and abs(y[sel].mean() - p[sel].mean()) < 0.03
    # the generating model is the floor: weaker category weights or the base rate do worse
    worse = dataclasses.replace(truth, cat_scale=truth.cat_scale * 0.5)
    base = -np.mean(y * np.log(y.mean()) + (1 - y) * np.log(1 - y.mean()))
    assert truth.log_loss(sample, y) < min(worse.log_loss(sample, y), base)
    # label noise: P(1) = (1 - noise) * p + noise / 2, as the truth says
    noisy = dataclasses.replace(CFG, label_noise=0.4)
    noisy_truth = make_criteo_true_model(noisy)
    tables = _zipf_tables(tuple(truth.cardinalities), truth.zipf_exponent)
    y_noisy = np.concatenate([criteo_block(noisy, noisy_truth, tables, b)[2] for b in range(5)])
    assert abs(y_noisy.mean() - (0.6 * 0.25 + 0.2)) < 0.02


def test_job_writes_criteo_data_and_truth(spark, tmp_path):
    out = generate_job.main(
        [
            "--config",
            "conf/local.yaml",
            "--set",
            f"paths.work_dir={tmp_path}",
            "--set",
            "generate.layout=criteo",
            "--set",
            "generate.rows=5000",
            "--set",
            "generate.max_cardinality=1000",
        ]
    )
    assert out["rows"] == 5000 and out["features"] == 39 and out["classes"] == 2  # generate.features=32 ignored
    data = spark.read.parquet(out["output_url"]).toPandas()
    assert len(data) == 5000 and data[list(CRITEO_CATEGORICAL_COLS)].nunique().max() <= 1000
    truth = read_criteo_truth(spark, out["output_url"])
    assert truth.cardinalities[-1] == 1000 and truth.cardinalities[0] == 10
    assert abs(truth.probabilities(data)[:, 1].mean() - data["label"].mean()) < 0.03
    with pytest.raises(ConfigError, match="read_criteo_truth"):
        read_truth(spark, out["output_url"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layout": "criteo", "classes": 3}, "generate.classes=3.*set generate.classes=2"),
        ({"layout": "criteo", "task": "regression"}, "generate.task='regression'.*set generate.task=classification"),
        ({"null_fraction": 1.0}, r"generate.null_fraction must be in \[0, 1\)"),
        ({"null_fraction": -0.1}, "generate.null_fraction"),
        ({"zipf_exponent": 1.0}, "generate.zipf_exponent must be > 1"),
        ({"max_cardinality": 0}, "generate.max_cardinality must be >= 1"),
        ({"max_cardinality": 2**32 + 1}, "generate.max_cardinality must be <= 2"),
    ],
)
def test_config_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(**overrides)
