"""Sparse data end to end (issue 16): Spark ML sparse vectors, Spark's own LIBSVM files and categorical
columns become the sparse layout (indices + values per row, never densified), which real Horovod ranks train
on through Petastorm with a sparse first layer. Real local Spark, real ranks, real MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sparkml_dist.baselines import run_baselines
from sparkml_dist.config import load_config
from sparkml_dist.errors import UserError
from sparkml_dist.fit import run_training
from sparkml_dist.loader import build_loader_spec, iterate_batches, read_all
from sparkml_dist.manifest import read_manifest
from sparkml_dist.partition import partition
from sparkml_dist.score import score
from sparkml_dist.sparse import SparseRows

DIM = 1 << 20
REPO = Path(__file__).resolve().parents[1]


def _cfg(root: Path, src: Path, out: str, *sets: str):
    return load_config(None, _cfg_sets(root, src, out, *sets))


def _cfg_sets(root: Path, src: Path, out: str = "out", *sets: str) -> list[str]:
    return [
        f"paths.work_dir={root}",
        f"data.input_url=file://{src}",
        f"partition.output_url=file://{root / out}",
        f"train.manifest_url=file://{root / out}",
        "partition.num_shards=2",
        "partition.row_group_mb=0.05",
        "train.batch_size=128",
        "train.epochs=3",
        "train.lr=0.2",
        "launch.start_timeout_s=60",
        "launch.collective_timeout_s=60",
        "launch.job_timeout_s=300",
        *sets,
    ]


def _rows(table) -> dict[int, tuple[list[int], list[float]]]:
    t = table.to_pydict()
    return {r: (i, v) for r, i, v in zip(t["row_id"], t["indices"], t["values"], strict=True)}


def _clicks(spark, n: int, seed: int = 0):
    """A click-log-like table: two categorical columns (one with 300 Zipf-distributed values), a boolean, a
    numeric column, and a label from a known model of them."""
    rng = np.random.default_rng(seed)
    site = rng.zipf(1.3, n) % 300
    device = rng.integers(0, 4, n)
    weight_site = np.random.default_rng(99).standard_normal(300)
    promo = rng.random(n) < 0.3
    price = rng.standard_normal(n)
    logit = 1.5 * weight_site[site] + 0.8 * (device == 2) - 0.7 * promo + 0.5 * price
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    rows = [(i, f"s{site[i]}", int(device[i]), bool(promo[i]), float(price[i]), int(label[i])) for i in range(n)]
    return spark.createDataFrame(rows, "row_id long, site string, device int, promo boolean, price double, label long")


def test_a_feature_hasher_vector_stays_sparse_and_exact(spark, tmp_path: Path) -> None:
    from pyspark.ml.feature import FeatureHasher

    df = _clicks(spark, 3000)
    hashed = FeatureHasher(inputCols=["site", "device", "promo", "price"], outputCol="features", numFeatures=DIM)
    src = tmp_path / "hashed"
    hashed.transform(df).select("row_id", "features", "label").write.parquet(f"file://{src}")
    cfg = _cfg(tmp_path, src, "out", "partition.feature_layout=sparse")
    result = partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    assert manifest.sparse is not None and manifest.sparse.dimension == DIM and manifest.num_features == DIM
    assert manifest.features_col is None and manifest.feature_names == ["features"]
    assert result.input_rows == 3000 and result.dropped_rows == 0
    out = tmp_path / "out"
    got = _rows(pq.read_table(out / "train")) | _rows(pq.read_table(out / "validation"))
    want = {
        r["row_id"]: (list(map(int, r["features"].indices)), list(map(float, r["features"].values)))
        for r in hashed.transform(df).select("row_id", "features").collect()
    }
    assert got.keys() == want.keys()
    for k, (idx, val) in want.items():
        assert got[k][0] == idx and np.allclose(got[k][1], val, rtol=1e-6)
    assert pq.read_schema(next((out / "train").rglob("*.parquet"))).names[:3] == ["row_id", "indices", "values"]


def test_libsvm_written_by_spark_trains_on_two_ranks(spark, tmp_path: Path) -> None:
    from pyspark.ml.feature import FeatureHasher

    df = _clicks(spark, 6000, seed=1)
    hashed = FeatureHasher(inputCols=["site", "device", "promo", "price"], outputCol="features", numFeatures=DIM)
    src = tmp_path / "libsvm"
    hashed.transform(df).select(df.label.cast("double"), "features").write.format("libsvm").save(str(src))
    cfg = _cfg(tmp_path, src, "out", "data.input_format=libsvm", f"data.dimension={DIM}")
    partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    assert manifest.sparse is not None and manifest.sparse.dimension == DIM
    assert manifest.input_rows == 6000

    dense_sent = run_training(spark, load_config(None, [*_cfg_sets(tmp_path, src), "train.sparse_gradients=off"]))
    losses = _val_losses(dense_sent)
    base = _base_rate_logloss(manifest, cfg)
    assert losses[-1] < base - 0.05, (losses, base)
    # comm.compression=nonzero sends only the touched gradient entries: the same training, far fewer bytes;
    # and so do row-sparse gradients (train.sparse_gradients=auto, the default here): the touched rows
    nonzero = run_training(spark, load_config(None, [*_cfg_sets(tmp_path, src), "comm.compression=nonzero",
                                                     "train.sparse_gradients=off"]))  # fmt: skip
    rows = run_training(spark, cfg)
    dense = dense_sent.final["comm_bytes_per_step"]
    for other in (nonzero, rows):
        assert np.allclose(_val_losses(other), losses, rtol=0, atol=1e-5), (_val_losses(other), losses)
        assert other.final["comm_bytes_per_step"] < dense / 20, (other.final, dense)
    # MLlib's LogisticRegression on SparseVectors of the same shards: ours is at least as good, within 1%
    (mllib,) = run_baselines(spark, load_config(None, [*_cfg_sets(tmp_path, src), "baselines.kinds=[mllib_lr]"]))
    assert losses[-1] <= 1.01 * mllib.final["val_log_loss"], (losses, mllib.final)


def _val_losses(result) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "val/log_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _base_rate_logloss(manifest, cfg) -> float:
    _, y = read_all(build_loader_spec(manifest, 0, 1, cfg.train, split="validation"))
    p = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_categorical_columns_hash_one_hot_and_train(spark, tmp_path: Path) -> None:
    src = tmp_path / "clicks"
    _clicks(spark, 6000, seed=2).write.parquet(f"file://{src}")
    buckets = 4096
    cats = ["data.categorical_cols=[site,device]", f"data.hash_buckets={buckets}", "tracking.system_metrics_s=1"]
    cfg = _cfg(tmp_path, src, "out", *cats)
    partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    assert manifest.sparse is not None
    enc = manifest.sparse.encoding
    assert enc["numeric"] == ["promo", "price"] and enc["categorical"] == ["site", "device"]
    assert manifest.sparse.dimension == 2 + 2 * buckets
    table = pq.read_table(tmp_path / "out" / "train").to_pydict()
    for idx, val in zip(table["indices"][:200], table["values"][:200], strict=True):
        assert idx[:2] == [0, 1] and val[0] in (0.0, 1.0)  # promo (boolean as 0/1), then price
        assert 2 <= idx[2] < 2 + buckets <= idx[3] < 2 + 2 * buckets and val[2:] == [1.0, 1.0]

    result = run_training(spark, cfg)
    losses = _val_losses(result)
    assert losses[-1] < _base_rate_logloss(manifest, cfg) - 0.05, losses
    # the host was sampled into the run as MLflow system metrics once, by its first local rank: the two ranks
    # share it (and the second never loads an MLflow client)
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert "system/rank0/cpu_utilization_percentage" in logged, sorted(logged)
    assert "system/rank0/system_memory_usage_megabytes" in logged, sorted(logged)
    assert not [k for k in logged if k.startswith("system/rank1/")], sorted(logged)

    # Scoring: the raw table with its columns in another order (picked by name, hashed with the stored
    # encoding) scores exactly as the partition output's rows; a missing column is named.
    shuffled = tmp_path / "shuffled"
    spark.read.parquet(f"file://{src}").select("price", "label", "device", "row_id", "site", "promo").write.parquet(
        f"file://{shuffled}"
    )
    by_row = {}
    for name, url in (("table", shuffled), ("partitioned", tmp_path / "out")):
        sets = [f"score.model_uri={result.model_uri}", f"score.input_url=file://{url}"]
        scored = score(
            spark, load_config(None, [*_cfg_sets(tmp_path, src), *sets, f"score.output_url=file://{tmp_path / name}"])
        )
        table = pq.read_table(tmp_path / name).to_pydict()
        by_row[name] = dict(zip(table["row_id"], table["prob_1"], strict=True))
        assert scored.rows == 6000
    assert by_row["table"].keys() == by_row["partitioned"].keys()
    assert all(abs(by_row["table"][k] - by_row["partitioned"][k]) < 1e-6 for k in by_row["table"])
    # The logged model loads and predicts where sparkml_dist cannot be imported (a pyfunc logged as code).
    rows = pq.read_table(tmp_path / "out" / "validation").slice(0, 5).to_pydict()
    blocked = (
        "import json, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        "try:\n    import sparkml_dist\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    sys.exit('sparkml_dist is still importable: the check proves nothing')\n"
        "import mlflow, numpy as np, pandas as pd\n"
        f"mlflow.set_tracking_uri({result.tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model({result.model_uri!r})\n"
        f"rows = pd.DataFrame({{'indices': {rows['indices']!r}, 'values': {rows['values']!r}}})\n"
        "print(json.dumps(np.asarray(model.predict(rows)).tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(served[:, 1], [by_row["partitioned"][r] for r in rows["row_id"]], atol=1e-6)

    spark.read.parquet(f"file://{src}").drop("site").write.parquet(f"file://{tmp_path / 'nosite'}")
    missing = [f"score.model_uri={result.model_uri}", f"score.input_url=file://{tmp_path / 'nosite'}"]
    with pytest.raises(UserError, match=r"lacks column\(s\) \['site'\]"):
        score(
            spark, load_config(None, [*_cfg_sets(tmp_path, src), *missing, f"score.output_url=file://{tmp_path / 'x'}"])
        )


def test_a_string_column_not_declared_categorical_is_named(spark, tmp_path: Path) -> None:
    src = tmp_path / "clicks"
    _clicks(spark, 300).write.parquet(f"file://{src}")
    with pytest.raises(UserError, match=r"site \(string\).*data.categorical_cols"):
        partition(spark, _cfg(tmp_path, src, "out", "data.categorical_cols=[device]"))
    # listed in data.ignore_cols: left out on purpose, and the manifest says what became of every column
    partition(spark, _cfg(tmp_path, src, "out", "data.categorical_cols=[device]", "data.ignore_cols=[site]"))
    roles = read_manifest(f"file://{tmp_path / 'out'}").columns
    assert roles["site"] == "ignored (data.ignore_cols)" and roles["label"] == "label" and roles["row_id"] == "row key"
    assert roles["device"].startswith("categorical feature") and roles["price"] == roles["promo"] == "feature"
    with pytest.raises(UserError, match=r"data.ignore_cols lists \['nope'\]"):
        partition(spark, _cfg(tmp_path, src, "out2", "data.categorical_cols=[device]", "data.ignore_cols=[nope]"))


def test_loader_memory_follows_non_zeros_not_the_dimension(spark, tmp_path: Path) -> None:
    """At 2^24 dimensions one dense batch of 256 rows would take 16 GiB; the sparse loader holds the
    non-zeros only: its peak traced allocation stays the same at 2^16 and 2^24 dimensions."""
    from pyspark.sql import functions as F

    peaks = {}
    for dim in (1 << 16, 1 << 24):
        src = tmp_path / f"iv{dim}"
        n = 4000
        spread = F.expr(f"transform(sequence(0, 29), k -> cast((id * 7919 + k * 104729) % {dim} as int))")
        df = spark.range(n).select(F.col("id").alias("row_id"), spread, (F.col("id") % 2).alias("label"))
        df = df.toDF("row_id", "raw", "label").select(
            "row_id", F.array_sort(F.array_distinct("raw")).alias("idx"), "label"
        )
        df = df.withColumn("val", F.transform("idx", lambda i: F.lit(1.0)))
        df.write.parquet(f"file://{src}")
        cfg = _cfg(
            tmp_path,
            src,
            f"out{dim}",
            "data.indices_col=idx",
            "data.values_col=val",
            f"data.dimension={dim}",
            "train.batch_size=256",
        )
        partition(spark, cfg)
        manifest = read_manifest(cfg.partition.output_url)
        spec = build_loader_spec(manifest, 0, 2, cfg.train)
        tracemalloc.start()
        rows = 0
        with iterate_batches(spec, epoch=0) as batches:
            for x, y in batches:
                assert x.shape == (256, dim) and x.layout.__repr__().endswith("sparse_csr")
                rows += len(y)
        peaks[dim] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rows == spec.steps * 256 > 0
    assert peaks[1 << 24] < 2 * peaks[1 << 16] + (8 << 20), peaks


def test_sparse_rows_batch_like_dense_blocks() -> None:
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((50, 40)) < 0.2, rng.standard_normal((50, 40)), 0).astype(np.float32)
    dense[7] = 0  # an empty row
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum((dense != 0).sum(1))]).astype(np.int64)
    x = SparseRows(indptr, cols.astype(np.int64), dense[rows, cols], 40)
    assert np.array_equal(x.to_dense(), dense)
    pick = rng.permutation(50)[:17]
    assert np.array_equal(x.take(pick).to_dense(), dense[pick])
    assert np.array_equal(x[5:20].to_dense(), dense[5:20])
    assert np.array_equal(SparseRows.concatenate([x[:7], x[7:8], x[8:]]).to_dense(), dense)
    assert np.array_equal(x.to_torch().to_dense().numpy(), dense)


def test_criteo_like_table_with_nulls_hashing_and_imputation(spark, tmp_path: Path) -> None:
    """The generator's Criteo-like table (13 numeric columns with nulls, 26 Zipf categorical columns): a null
    in a column without a fill fails naming the column and the row; with every numeric column filled (means
    computed in one pass, stored in the manifest) it partitions, trains and beats the base rate."""
    from sparkml_dist.synthetic import write_dataset

    src = tmp_path / "criteo"
    gen = [
        f"generate.output_url=file://{src}",
        "generate.layout=criteo",
        "generate.rows=8000",
        "generate.partitions=2",
        "generate.null_fraction=0.05",
        "generate.max_cardinality=2000",
    ]
    write_dataset(spark, load_config(None, [f"paths.work_dir={tmp_path}", *gen]).generate)
    cats = "data.categorical_cols=[" + ",".join(f"c{i}" for i in range(1, 27)) + "]"
    partial = "data.null_fill={" + ", ".join(f"i{i}: mean" for i in range(2, 14)) + "}"
    with pytest.raises(UserError, match=r"row_id \d+ \(null in column\(s\) i1\)"):
        partition(spark, _cfg(tmp_path, src, "failed", cats, partial, "data.hash_buckets=1024"))
    fill = "data.null_fill={i1: 0, " + ", ".join(f"i{i}: mean" for i in range(2, 14)) + "}"
    cfg = _cfg(
        tmp_path,
        src,
        "out",
        cats,
        fill,
        "data.hash_buckets=1024",
        "data.numeric_transform=log1p",
        "train.optimizer=adam",
        "train.lr=0.01",
    )
    partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    assert manifest.sparse is not None and manifest.sparse.dimension == 13 + 26 * 1024
    filled = manifest.sparse.encoding["fill"]
    assert filled["i1"] == 0.0 and all(filled[f"i{i}"] > 0 for i in range(2, 14))
    raw = spark.read.parquet(f"file://{src}").agg({"i5": "avg"}).first()[0]
    assert filled["i5"] == pytest.approx(raw)
    losses = _val_losses(run_training(spark, cfg))
    assert losses[-1] < _base_rate_logloss(manifest, cfg) - 0.02, losses


def test_vocabulary_indexing_keeps_the_most_frequent_values_and_scores_unseen_ones_out_of_vocabulary(
    spark, tmp_path: Path
) -> None:
    src = tmp_path / "clicks"
    clicks = _clicks(spark, 6000, seed=3)
    clicks.write.parquet(f"file://{src}")
    sets = ["data.categorical_cols=[site,device]", "data.categorical_encoding=vocabulary", "data.vocabulary_size=50"]
    cfg = _cfg(tmp_path, src, "out", *sets)
    partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    assert manifest.sparse is not None
    vocab = manifest.sparse.encoding["vocabularies"]
    counts = clicks.groupBy("site").count().collect()
    expected = [r["site"] for r in sorted(counts, key=lambda r: (-r["count"], r["site"]))[:50]]
    assert vocab["site"] == expected and sorted(vocab["device"]) == ["0", "1", "2", "3"]
    assert manifest.sparse.dimension == 2 + 51 + 5
    table = pq.read_table(tmp_path / "out" / "train").to_pydict()
    raw = {r["row_id"]: r for r in clicks.collect()}
    for row_id, idx in list(zip(table["row_id"], table["indices"], strict=True))[:300]:
        site = raw[row_id]["site"]
        assert idx[2] == 2 + (vocab["site"].index(site) if site in vocab["site"] else 50)
        assert idx[3] == 2 + 51 + vocab["device"].index(str(raw[row_id]["device"]))
    result = run_training(spark, cfg)
    assert _val_losses(result)[-1] < _base_rate_logloss(manifest, cfg) - 0.05
    # a site never seen in training scores through the out-of-vocabulary index
    unseen = tmp_path / "unseen"
    spark.createDataFrame(
        [(1, "never-seen", 2, True, 0.3, 1), (2, vocab["site"][0], 2, True, 0.3, 1)],
        "row_id long, site string, device int, promo boolean, price double, label long",
    ).write.parquet(f"file://{unseen}")
    sets = [f"score.model_uri={result.model_uri}", f"score.input_url=file://{unseen}"]
    score(spark, load_config(None, [*_cfg_sets(tmp_path, src), *sets, f"score.output_url=file://{tmp_path / 's'}"]))
    probs = pq.read_table(tmp_path / "s").to_pydict()
    assert sorted(probs["row_id"]) == [1, 2] and all(0 < p < 1 for p in probs["prob_1"])


@pytest.mark.parametrize("grouping", ["contiguous", "hashed"])
def test_sparse_feature_groups_train_feature_parallel_like_one_process(spark, tmp_path: Path, grouping: str) -> None:
    """Feature groups of the sparse layout (index ranges, or index mod M), never densified: two ranks, each
    holding one group's weight block, end with the parameters of one process training the whole sparse model
    on the same rows in the same order."""
    import dataclasses

    import torch

    from sparkml_dist import checkpoint, feature_parallel
    from sparkml_dist.loader import iterate_aligned_batches
    from sparkml_dist.models import build_model, build_optimizer, loss_fn

    src = tmp_path / "clicks"
    _clicks(spark, 3000, seed=4).write.parquet(f"file://{src}")
    sets = [
        "data.categorical_cols=[site,device]",
        "data.hash_buckets=256",
        "partition.feature_groups=2",
        f"partition.feature_grouping={grouping}",
        "train.mode=feature_parallel",
        "train.optimizer=adam",
        "train.lr=0.05",
        "train.epochs=2",
        "train.batch_size=64",
        "train.shuffle_buffer_rows=256",
    ]
    cfg = _cfg(tmp_path, src, "out", *sets)
    partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    groups = manifest.feature_groups
    assert [g.num_features for g in groups] == ([257, 257] if grouping == "contiguous" else [257, 257])
    table = pq.read_table(tmp_path / "out" / "features" / "group=1").to_pydict()
    assert all(all(0 <= i < 257 for i in idx) for idx in table["indices"])

    result = run_training(spark, cfg)
    commit = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")
    assert commit is not None
    state = feature_parallel.assemble_state_dict(manifest, commit["block_urls"])

    model = build_model(cfg.train, manifest.num_features, manifest.num_classes, sparse=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = build_optimizer(cfg.train, model)
    steps = feature_parallel.steps_per_epoch(manifest, cfg.train)
    spec = build_loader_spec(manifest, 0, 1, cfg.train, split="train")
    spec = dataclasses.replace(spec, steps=steps, row_id_col=manifest.row_id_col)
    for epoch in range(2):
        with iterate_aligned_batches(spec, epoch) as batches:
            for x, y, _ in batches:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(state[name], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("model", ["softmax", "mlp"])
def test_softmax_and_mlp_take_the_sparse_layout(spark, tmp_path: Path, model: str) -> None:
    """Softmax (3 classes) and an MLP whose first layer is sparse, on hashed categorical columns; the logged
    model scores the raw table through its encoding."""
    from pyspark.sql import functions as F

    src = tmp_path / "clicks"
    clicks = _clicks(spark, 4000, seed=5)
    if model == "softmax":  # three classes: the site's weight bucket decides
        clicks = clicks.withColumn("label", (F.abs(F.hash("site")) % 3).cast("long"))
    clicks.write.parquet(f"file://{src}")
    sets = ["data.categorical_cols=[site,device]", "data.hash_buckets=512", f"train.model={model}"]
    sets += ["train.optimizer=adam", "train.lr=0.02", "train.hidden_sizes=[16]"]
    if model == "softmax":
        sets.append("data.num_classes=3")
    cfg = _cfg(tmp_path, src, "out", *sets)
    partition(spark, cfg)
    manifest = read_manifest(cfg.partition.output_url)
    result = run_training(spark, cfg)
    assert _val_losses(result)[-1] < (1.0 if model == "softmax" else 0.66), _val_losses(result)
    out = tmp_path / "scored"
    sets = [f"score.model_uri={result.model_uri}", f"score.input_url=file://{src}", f"score.output_url=file://{out}"]
    scored = score(spark, load_config(None, [*_cfg_sets(tmp_path, src), *sets]))
    assert scored.rows == 4000 and scored.num_classes == manifest.num_classes
    probs = pq.read_table(out).to_pydict()
    total = np.sum([probs[f"prob_{c}"] for c in range(manifest.num_classes)], axis=0)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
