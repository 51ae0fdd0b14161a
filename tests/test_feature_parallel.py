"""Feature-parallel training: real Horovod ranks in a real barrier stage, one per feature group.

Cost on the shared, loaded 2-core machine: ~2 min in all - data + reference ~50 s, train + pyfunc + the
scoring job ~55 s, resume (two short stages) ~12 s, misaligned rows ~3 s, config/manifest checks < 1 s;
linear regression (its own data, both modes, scoring) ~1 min.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sparkml_dist import checkpoint, feature_parallel
from sparkml_dist.config import ConfigError, load_config, url_to_path
from sparkml_dist.fit import run_training
from sparkml_dist.launch import RankUserError
from sparkml_dist.loader import build_loader_spec, iterate_aligned_batches, read_all
from sparkml_dist.manifest import CHECKSUM_KEY, MANIFEST_NAME, read_manifest
from sparkml_dist.manifest import _checksum as manifest_checksum
from sparkml_dist.models import build_model, loss_fn, probabilities
from sparkml_dist.models import build_optimizer as make_optimizer
from sparkml_dist.partition import partition
from sparkml_dist.promote import PromotionError, evaluate, promote
from sparkml_dist.score import score
from sparkml_dist.synthetic import write_dataset

FEATURES = 9
CLASSES = 3
EPOCHS = 2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("feature_parallel")


def _cfg(work, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={work}",
            "generate.rows=2400",
            f"generate.features={FEATURES}",
            f"generate.classes={CLASSES}",
            "generate.partitions=2",
            f"data.num_classes={CLASSES}",
            "partition.num_shards=2",
            "partition.feature_groups=2",
            "partition.feature_grouping=hashed",  # groups are not contiguous: the assembly must map columns
            "partition.row_group_mb=0.004",  # several row groups, cut at different rows in each group's files
            "train.mode=feature_parallel",
            "train.model=softmax",
            "train.optimizer=adam",
            "train.lr=0.05",
            "train.batch_size=64",
            "train.shuffle_buffer_rows=256",
            f"train.epochs={EPOCHS}",
            "launch.start_timeout_s=60",
            "launch.collective_timeout_s=60",
            "launch.job_timeout_s=300",
            "launch.device_check=true",  # every tensor that meets a block goes through device.Placement
            *sets,
        ],
    )


@pytest.fixture(scope="module")
def data(spark, work):
    cfg = _cfg(work)
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    manifest = read_manifest(cfg.train.manifest_url)
    assert len(manifest.feature_groups) == 2
    assert feature_parallel.block_columns(manifest, manifest.feature_groups[0]).tolist() != list(
        range(FEATURES // 2 + 1)
    )
    return cfg


@pytest.fixture(scope="module")
def reference(data):
    """Single-process torch training of the whole model on the SAMPLE shards (all features), in the order the
    aligned loader gives (rows and (seed, epoch) only), from zero weights as the feature-parallel blocks."""
    cfg = data
    manifest = read_manifest(cfg.train.manifest_url)
    model = build_model(cfg.train, manifest.num_features, manifest.num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = make_optimizer(cfg.train, model)
    steps = feature_parallel.steps_per_epoch(manifest, cfg.train)
    spec = build_loader_spec(manifest, 0, 1, cfg.train, split="train")  # every sample shard, in order
    spec = dataclasses.replace(spec, steps=steps, row_id_col=manifest.row_id_col)
    for epoch in range(EPOCHS):
        with iterate_aligned_batches(spec, epoch) as batches:
            for x, y, _ in batches:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    return model.eval()


def _assembled(cfg, result) -> dict[str, np.ndarray]:
    commit = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")
    assert commit is not None and commit["mode"] == "feature_parallel"
    return feature_parallel.assemble_state_dict(read_manifest(cfg.train.manifest_url), commit["block_urls"])


def _assert_same_model(state: dict[str, np.ndarray], reference) -> None:
    for name, value in reference.state_dict().items():
        np.testing.assert_allclose(state[name], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_two_feature_blocks_equal_one_process_on_all_features_and_mlflow_serves_the_model(spark, work, data, reference):
    import mlflow

    cfg = data
    result = run_training(spark, cfg)
    assert result.world_size == 2 and result.epochs == EPOCHS
    _assert_same_model(_assembled(cfg, result), reference)

    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mode"] == "feature_parallel" and run.data.tags["kind"] == "feature_parallel"
    assert [m.step for m in client.get_metric_history(result.run_id, "val/log_loss")] == [1, 2]
    assert {"val/accuracy", "val/auc", "train/loss", "system/comm/bytes_per_step"} <= set(run.data.metrics)
    assert run.data.metrics["system/comm/bytes_per_step"] == (64 * CLASSES + 8) * 4

    manifest = read_manifest(cfg.train.manifest_url)
    x, y = read_all(build_loader_spec(manifest, 0, 1, cfg.train, split="validation"))
    with torch.no_grad():
        expected = probabilities(reference(torch.from_numpy(x))).numpy()
    served = np.asarray(mlflow.pyfunc.load_model(result.model_uri).predict(x))
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # the validation metrics the ranks computed from summed partial logits are the whole model's
    log_loss = float(-np.log(expected[np.arange(len(y)), y]).mean())
    assert result.final["val_log_loss"] == pytest.approx(log_loss, rel=1e-4)
    assert result.final["val_accuracy"] == pytest.approx(float((expected.argmax(1) == y).mean()))

    # the scoring job (a Spark pyfunc UDF) scores with the assembled model like with any other
    scfg = _cfg(
        work,
        f"score.model_uri=runs:/{result.run_id}/model",
        f"score.input_url={cfg.train.manifest_url}",
        "score.split=validation",
        f"score.output_url={work}/scores",
    )
    scored = score(spark, scfg)
    assert scored.rows == len(y)
    ids = pq.read_table([url_to_path(u) for u in manifest.file_urls(manifest.validation)], columns=["row_id"])
    position = {int(r): i for i, r in enumerate(ids.column("row_id").to_numpy())}
    out = pq.read_table(url_to_path(scored.output_url)).to_pandas()
    order = [position[int(r)] for r in out["row_id"]]
    probs = out[[f"prob_{c}" for c in range(CLASSES)]].to_numpy()
    np.testing.assert_allclose(probs, expected[order], atol=1e-5)


def test_feature_blocks_on_torch_collectives_equal_one_process(spark, work, data, reference):
    """... with mid-epoch evaluations (every rank scores its block's part; the model is unchanged by them)."""
    from sparkml_dist.experiments import tracking

    cfg = dataclasses.replace(
        data,
        launch=dataclasses.replace(data.launch, collectives="torch"),
        train=dataclasses.replace(data.train, eval_every_steps=2),
    )
    result = run_training(spark, cfg)
    _assert_same_model(_assembled(cfg, result), reference)
    assert result.final["comm_bytes_per_step"] == (64 * CLASSES + 8) * 4
    steps = feature_parallel.steps_per_epoch(read_manifest(cfg.train.manifest_url), cfg.train)
    record = tracking.get_run_record(cfg.tracking, result.run_id, ("step_val_log_loss",))
    inside = [s for e in range(EPOCHS) for s in range(e * steps + 2, (e + 1) * steps, 2)]
    assert [s for s, _ in record.histories["step_val_log_loss"]] == inside and inside


def test_resume_from_the_block_checkpoints_ends_with_the_same_model(spark, work, data, reference):
    first = run_training(spark, _cfg(work, "train.epochs=1", "tracking.log_model=false"))
    resumed_cfg = _cfg(work, f"train.resume_run_id={first.run_id}", "tracking.log_model=false")
    resumed = run_training(spark, resumed_cfg)
    assert resumed.run_id == first.run_id and resumed.resumed_from_epoch == 1 and resumed.epochs == EPOCHS
    _assert_same_model(_assembled(resumed_cfg, resumed), reference)


def test_a_group_shard_in_another_row_order_fails_naming_rank_step_and_fix(spark, work, data, tmp_path):
    src = Path(data.train.manifest_url.removeprefix("file://"))
    dst = tmp_path / "misaligned"
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST_NAME).read_text())
    shard = raw["feature_groups"][1]["shards"][0]
    for entry in shard["files"]:
        path = dst / entry["path"]
        table = pq.read_table(path)
        pq.write_table(table.take(np.arange(table.num_rows)[::-1]), path)  # same rows, reversed
        entry["bytes"] = path.stat().st_size  # a consistent manifest: only the row order is wrong
        entry["row_groups"] = pq.ParquetFile(path).metadata.num_row_groups
    shard["bytes"] = sum(e["bytes"] for e in shard["files"])
    raw.pop(CHECKSUM_KEY)
    raw[CHECKSUM_KEY] = manifest_checksum(raw)  # re-sealed: only the row order is wrong
    (dst / MANIFEST_NAME).write_text(json.dumps(raw))
    cfg = _cfg(work, f"train.manifest_url={dst}", "train.shuffle=false", "tracking.log_model=false")
    with pytest.raises(RankUserError) as err:  # bad data: a user error, not retried
        run_training(spark, cfg)
    text = str(err.value)
    assert "AlignmentError" in text and "epoch 1, step 0" in text
    assert "do not line up by row_id" in text and "partition.feature_groups" in text


def test_bad_settings_fail_before_any_task(data):
    with pytest.raises(ConfigError, match="train.model must be logistic, softmax or linear, got 'mlp'"):
        _cfg(Path("."), "train.model=mlp")
    with pytest.raises(ConfigError, match="train.fp16_allreduce=true does not apply"):
        _cfg(Path("."), "train.fp16_allreduce=true")
    manifest = read_manifest(data.train.manifest_url)
    with pytest.raises(ValueError, match="re-partition with partition.feature_groups=M"):
        feature_parallel.check_manifest(dataclasses.replace(manifest, feature_groups=[]), data.train)
    with pytest.raises(ValueError, match="logistic is binary; the data has 3 classes"):
        feature_parallel.check_manifest(manifest, dataclasses.replace(data.train, model="logistic"))
    with pytest.raises(ValueError, match="train.model=linear is least-squares regression, but the data has 3"):
        feature_parallel.check_manifest(manifest, dataclasses.replace(data.train, model="linear"))
    assert feature_parallel.check_manifest(manifest, data.train) == 2


# ------------------------------------------------------------------------- linear regression (the third GLM)


def _regression_cfg(work, *sets: str):
    return _cfg(
        work / "regression",
        "generate.task=regression",
        "generate.noise_std=0.3",
        "data.task=regression",
        "partition.feature_grouping=contiguous",  # groups as slices of the features array (hashed: above)
        "train.model=linear",
        "train.lr=0.1",
        *sets,
    )


def test_linear_regression_by_feature_blocks_equals_one_process_and_scores_values(spark, work):
    import mlflow

    cfg = _regression_cfg(work)
    truth = write_dataset(spark, cfg.generate)
    assert truth.classes == 0
    partition(spark, cfg)
    manifest = read_manifest(cfg.train.manifest_url)
    assert manifest.num_classes == 0 and manifest.schema["label"] == "double"
    with pytest.raises(ValueError, match="classifier, but the data has real-valued labels.*train.model=linear"):
        feature_parallel.check_manifest(manifest, dataclasses.replace(cfg.train, model="logistic"))

    # the single-process reference: the whole LinearRegression on all features, same batches, zero start
    model = build_model(cfg.train, manifest.num_features, manifest.num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = make_optimizer(cfg.train, model)
    spec = build_loader_spec(manifest, 0, 1, cfg.train, split="train")
    spec = dataclasses.replace(spec, steps=feature_parallel.steps_per_epoch(manifest, cfg.train), row_id_col="row_id")
    for epoch in range(EPOCHS):
        with iterate_aligned_batches(spec, epoch) as batches:
            for x, y, _ in batches:
                assert y.dtype == torch.float32
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    model.eval()

    result = run_training(spark, cfg)
    _assert_same_model(_assembled(cfg, result), model)
    x, y = read_all(build_loader_spec(manifest, 0, 1, cfg.train, split="validation"))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()[:, 0]
    mse = float(np.mean((expected - y) ** 2))
    assert result.final["val_mse"] == pytest.approx(mse, rel=1e-4)
    assert result.final["val_r2"] > 0.5 and "val_log_loss" not in result.final
    served = np.asarray(mlflow.pyfunc.load_model(result.model_uri).predict(x))
    assert served.shape == (len(y), 1)
    np.testing.assert_allclose(served[:, 0], expected, atol=1e-5)

    scfg = _regression_cfg(
        work,
        f"score.model_uri=runs:/{result.run_id}/model",
        f"score.input_url={cfg.train.manifest_url}",
        "score.split=validation",
        f"score.output_url={work}/regression-scores",
    )
    scored = score(spark, scfg)
    out = pq.read_table(url_to_path(scored.output_url)).to_pandas()
    assert list(out.columns) == ["row_id", "prediction"] and out["prediction"].dtype == np.float64
    ids = pq.read_table([url_to_path(u) for u in manifest.file_urls(manifest.validation)], columns=["row_id"])
    position = {int(r): i for i, r in enumerate(ids.column("row_id").to_numpy())}
    np.testing.assert_allclose(out["prediction"], expected[[position[int(r)] for r in out["row_id"]]], atol=1e-5)

    # champion/challenger promotion scores regression models by mse (rmse, mae, r2), not log-loss
    dated = ("promote.registered_model=reg", "promote.logical_date=2024-01-01")
    pcfg = _regression_cfg(work, *dated, f"promote.candidate_run_id={result.run_id}")
    with pytest.raises(PromotionError, match="promote.metric=log_loss does not score .* mse, rmse, mae, r2"):
        evaluate(spark, pcfg)
    pcfg = _regression_cfg(work, *dated, f"promote.candidate_run_id={result.run_id}", "promote.metric=mse")
    evaluation = evaluate(spark, pcfg)
    assert evaluation.candidate["mse"] == pytest.approx(mse, rel=1e-4)
    assert evaluation.candidate["r2"] == pytest.approx(result.final["val_r2"], rel=1e-4)
    assert promote(pcfg).promoted

    # the same model, data-parallel (one rank per sample shard, gradients allreduced), learns the data too
    dp = run_training(spark, _regression_cfg(work, "train.mode=data_parallel", "tracking.log_model=false"))
    assert dp.world_size == 2 and dp.final["val_r2"] > 0.5
