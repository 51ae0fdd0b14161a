"""MapReduce and MLlib baselines on real local Spark: convergence to the optimum, MLflow runs, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import baseline as baseline_job
from sparkml_dist.baselines import load_data, run_baseline, run_baselines, tree_aggregate_levels
from sparkml_dist.config import ConfigError, load_config, url_to_path
from sparkml_dist.manifest import ManifestError, read_manifest
from sparkml_dist.partition import partition
from sparkml_dist.synthetic import write_dataset

FEATURES = 6
CONVERGING = ("gd", "sgd", "averaging", "mllib_lr")


def _cfg(work, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={work}",
            "generate.rows=8000",
            f"generate.features={FEATURES}",
            "generate.partitions=2",
            "generate.seed=5",
            "partition.num_shards=2",
            "partition.validation_fraction=0.1",
            "baselines.max_iterations=15",
            "baselines.batch_fraction=0.25",
            *sets,
        ],
    )


def _training_optimum(manifest) -> float:
    """Mean training log-loss of scikit-learn's unpenalized fit on exactly the manifest's training rows."""
    from sklearn.linear_model import LogisticRegression

    tables = [pq.read_table(url_to_path(u)) for s in manifest.train for u in manifest.file_urls(s)]
    x = np.concatenate([np.stack(t.column("features").to_pylist()) for t in tables]).astype(np.float64)
    y = np.concatenate([t.column("label").to_numpy() for t in tables]).astype(np.int64)
    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=2000).fit(x, y)
    p = fit.predict_proba(x)[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def data(spark, work):
    cfg = _cfg(work)
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return cfg


@pytest.fixture(scope="module")
def results(spark, work, data):
    cfg = _cfg(work, f"baselines.kinds=[{','.join(CONVERGING)}]")
    return cfg, {r.kind: r for r in run_baselines(spark, cfg)}


@pytest.mark.parametrize("kind", CONVERGING)
def test_converges_within_one_percent_of_the_optimum(data, results, kind):
    optimum = _training_optimum(read_manifest(data.train.manifest_url))
    r = results[1][kind]
    assert r.final["train_log_loss"] <= optimum * 1.01, (kind, r.final, optimum)
    assert r.final["val_accuracy"] > 0.65 and 0.72 < r.final["val_auc"] <= 1.0
    assert np.asarray(r.weights).shape == (1, FEATURES + 1)
    assert r.time_to_target_s is None and r.stopped in ("max_iterations", "converged")


def test_each_baseline_is_an_mlflow_run_tagged_like_the_allreduce_runs(spark, data, results):
    from mlflow.tracking import MlflowClient

    cfg, by_kind = results
    manifest = read_manifest(cfg.train.manifest_url)
    client = MlflowClient(cfg.tracking.tracking_uri)
    for kind, r in by_kind.items():
        run = client.get_run(r.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["kind"] == kind
        assert run.data.tags["manifest_fingerprint"] == manifest.fingerprint
        assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [manifest.fingerprint]  # same data
        assert run.data.tags["data_fingerprint"] == manifest.input_fingerprint
        assert run.data.tags["spark_app_id"] == spark.sparkContext.applicationId
        assert run.data.tags["world_size"] == "2" and run.data.tags["model"] == "logistic"
        assert run.data.tags["elapsed_s_source"] == ("interpolated over the fit" if "mllib" in kind else "measured")
        assert run.data.params["baselines.max_iterations"] == "15"
        assert json.loads(run.data.params["baselines.kinds"]) == list(CONVERGING)
        loss = client.get_metric_history(r.run_id, "train/loss")
        elapsed = client.get_metric_history(r.run_id, "system/time/elapsed_s")
        assert [m.step for m in loss] == list(range(1, len(loss) + 1)) and len(loss) >= r.iterations
        times = [m.value for m in sorted(elapsed, key=lambda m: m.step)]
        assert times == sorted(times) and times[-1] > 0 and run.data.metrics["system/time/load_s"] > 0
        # timestamps = run start + elapsed, so runs of different kinds line up on a time axis
        stamps = {m.step: m.timestamp for m in loss}
        start = run.info.start_time
        assert all(abs(stamps[m.step] - start - m.value * 1000) < 2000 for m in elapsed)
        artifacts = {a.path for a in client.list_artifacts(r.run_id)}
        assert {"weights.json", "history.json", "config.yaml"} <= artifacts
        if not kind.startswith("mllib"):
            steps = [m.step for m in client.get_metric_history(r.run_id, "val/log_loss")]
            assert steps == list(range(1, r.iterations + 1))
            timings = {f"system/time/{k}" for k in ("broadcast_s", "compute_s", "update_s")}
            assert {*timings, "system/comm/aggregate_bytes", "val/auc"} <= set(run.data.metrics)
            first = r.history[0]  # 2 partial sums [loss, n, gradient] go to the driver, no intermediate level
            assert first["aggregate_bytes"] == 2 * (first["bytes_per_iteration"] - first["broadcast_bytes"] / 2)
            assert (2 + FEATURES + 1) * 8 < first["aggregate_bytes"] / 2 < (2 + FEATURES + 1) * 8 + 200
        else:
            assert {"val/log_loss", "val/auc"} <= set(run.data.metrics)  # at the last step, for the comparison


def test_stops_at_the_target_and_records_the_time_to_reach_it(spark, data, results):
    gd = results[1]["gd"]
    target = gd.history[2]["val_log_loss"]  # reached at iteration 3 of the unconstrained run
    cfg = _cfg(data.paths.work_dir, "baselines.kinds=[gd]", f"baselines.target_log_loss={target}")
    loaded = load_data(spark, read_manifest(cfg.train.manifest_url))
    try:
        hit = run_baseline(spark, cfg, "gd", loaded)
        capped = run_baseline(spark, _cfg(data.paths.work_dir, "baselines.time_cap_s=0.001"), "sgd", loaded)
    finally:
        loaded.unpersist()
    assert hit.stopped == "target" and hit.iterations == 3
    assert hit.time_to_target_s is not None and 0 < hit.time_to_target_s <= hit.seconds
    # gd is deterministic: the capped run walked the same path as the unconstrained one
    np.testing.assert_allclose([h["train_loss"] for h in hit.history], [h["train_loss"] for h in gd.history[:3]])
    assert capped.stopped == "time_cap" and capped.iterations == 1


def test_mllib_mlp_runs_and_scores_sanely(spark, data, results):
    sets = ("baselines.kinds=[mllib_mlp]", "baselines.mlp_hidden_sizes=[8]", "baselines.max_iterations=50")
    (r,) = run_baselines(spark, _cfg(data.paths.work_dir, *sets))
    assert r.kind == "mllib_mlp" and 1 <= r.iterations <= 50
    assert len(r.weights[0]) == (FEATURES * 8 + 8) + (8 * 2 + 2)
    # the data are linear: a small MLP should score about as well as logistic regression
    lr = results[1]["mllib_lr"].final
    assert r.final["val_log_loss"] <= lr["val_log_loss"] * 1.05 and r.final["val_auc"] >= lr["val_auc"] - 0.02
    assert r.history and r.history[-1]["train_loss"] < r.history[0]["train_loss"]


def test_softmax_regression_for_several_classes(spark, tmp_path):
    cfg = _cfg(tmp_path, "generate.rows=6000", "generate.classes=3", "data.num_classes=3")
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    optimum = _training_optimum(read_manifest(cfg.train.manifest_url))
    cfg = _cfg(tmp_path, "generate.classes=3", "data.num_classes=3", "baselines.kinds=[gd,mllib_lr]")
    for r in run_baselines(spark, cfg):
        assert np.asarray(r.weights).shape == (3, FEATURES + 1)
        assert r.final["train_log_loss"] <= optimum * 1.01, (r.kind, r.final, optimum)


def test_columns_layout_reads_the_same_rows(spark, data):
    cols = f"{data.paths.work_dir}/columns"
    partition(spark, _cfg(data.paths.work_dir, "partition.feature_layout=columns", f"partition.output_url={cols}"))
    assert read_manifest(f"file://{cols}").features_col is None
    loaded = [load_data(spark, read_manifest(u), with_vectors=True) for u in (data.train.manifest_url, cols)]
    try:

        def rows(rdd) -> np.ndarray:
            x, y = (np.concatenate(part) for part in zip(*rdd.collect(), strict=True))
            table = np.column_stack([x, y])
            return table[np.lexsort(table.T[::-1])]

        for split in ("train", "validation"):
            np.testing.assert_array_equal(*(rows(getattr(d, split)) for d in loaded))
        assert loaded[1].train_df is not None and loaded[1].train_df.count() == loaded[0].train_rows
    finally:
        for d in loaded:
            d.unpersist()


def test_job_prints_one_json_summary_last(data, results, capsys):
    out = baseline_job.main(
        ["--config", "conf/local.yaml", "--set", f"paths.work_dir={data.paths.work_dir}"]
        + ["--set", "baselines.kinds=[gd]", "--set", "baselines.max_iterations=2"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(out))
    (summary,) = out["baselines"]
    assert summary["kind"] == "gd" and summary["iterations"] == 2 and "weights" not in summary


def test_tree_aggregate_levels_follow_pyspark():
    assert tree_aggregate_levels(2, 2) == [2]
    assert tree_aggregate_levels(100, 2) == [100, 10]
    assert tree_aggregate_levels(8, 3) == [8, 4]
    assert tree_aggregate_levels(8, 1) == [8]


def test_bad_input_fails_clearly_before_any_run(spark, data, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(data.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(data.tracking.experiment)
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    with pytest.raises(ManifestError, match="not a partition output"):
        run_baselines(spark, _cfg(data.paths.work_dir, f"train.manifest_url={tmp_path}"))
    experiment = client.get_experiment_by_name(data.tracking.experiment)
    assert (len(client.search_runs([experiment.experiment_id])) if experiment else 0) == before
    with pytest.raises(ConfigError) as err:
        _cfg(data.paths.work_dir, "baselines.kinds=[gd,newton]")
    assert "newton" in str(err.value) and "gd, sgd, averaging, mllib_lr, mllib_mlp" in str(err.value)
