"""Batch scoring through a real mlflow.pyfunc Spark UDF on the session's local Spark, real MLflow (sqlite)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sparkml_dist import tracking
from sparkml_dist.config import load_config, url_to_path
from sparkml_dist.errors import OutputPathError
from sparkml_dist.manifest import read_manifest
from sparkml_dist.models import LogisticRegression, ProbabilityModel
from sparkml_dist.partition import partition
from sparkml_dist.score import ScoreError, score
from sparkml_dist.synthetic import write_dataset

FEATURES = 4
NAME = "scorer"


def _cfg(work, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={work}",
            "generate.rows=3000",
            f"generate.features={FEATURES}",
            "generate.partitions=2",
            "partition.row_group_mb=0.05",
            f"promote.registered_model={NAME}",
            *sets,
        ],
    )


def log_model(cfg, num_features: int, seed: int, tags: dict[str, str] | None = None) -> str:
    """A logistic model with seeded weights, logged as a run's model; returns the run id."""
    torch.manual_seed(seed)
    model = ProbabilityModel(LogisticRegression(num_features)).eval()
    run = tracking.start_run(cfg, tags or {}, kind="allreduce")
    example = np.random.default_rng(seed).standard_normal((5, num_features)).astype(np.float32)
    tracking.log_torch_model(run, model, example)
    tracking.finish_run(run)
    return run.run_id


@pytest.fixture(scope="module")
def setup(spark, tmp_path_factory):
    work = tmp_path_factory.mktemp("score")
    cfg = _cfg(work, "partition.feature_layout=columns")
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    run_id = log_model(cfg, FEATURES, seed=1)
    version = tracking.register_model(cfg.tracking.tracking_uri, NAME, run_id, tags={})
    tracking.set_alias(cfg.tracking.tracking_uri, NAME, "champion", version.version)
    return work, run_id


def _read(url: str):
    return pq.read_table(url_to_path(url)).to_pandas().sort_values("row_id").reset_index(drop=True)


@pytest.mark.slow
def test_raw_data_scores_equal_the_models_own_predictions_and_a_rerun_replaces_them(spark, setup, capsys):
    from jobs import score as score_job

    work, run_id = setup
    out_url = f"file://{work}/scores-raw"
    argv = [
        "--set",
        f"paths.work_dir={work}",
        "--set",
        f"score.model_uri=runs:/{run_id}/model",
        "--set",
        f"score.output_url={out_url}",
        "--set",
        "score.keep_cols=[label]",
    ]
    summary = score_job.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 3000 == summary["rows"]
    scored = _read(out_url)
    assert list(scored.columns) == ["row_id", "label", "prediction", "prob_0", "prob_1"]
    raw = _read(f"file://{work}/data/raw")
    assert scored["row_id"].tolist() == raw["row_id"].tolist() == list(range(3000))
    x = np.stack(raw["features"].to_numpy()).astype(np.float32)
    expected = np.asarray(tracking.load_model(f"sqlite:///{work}/mlflow.db", f"runs:/{run_id}/model").predict(x))
    probs = scored[["prob_0", "prob_1"]].to_numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    assert (scored["prediction"].to_numpy() == expected.argmax(axis=1)).all()
    assert (scored["label"] == raw["label"]).all()
    info = json.loads((url_to_path(out_url) / "_score.json").read_text())
    assert info["model_run_id"] == run_id and info["rows"] == 3000

    score_job.main([*argv, "--set", "score.keep_cols=[]"])  # the rerun replaces the output exactly
    again = _read(out_url)
    assert list(again.columns) == ["row_id", "prediction", "prob_0", "prob_1"] and len(again) == 3000
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("scores-raw")) == ["scores-raw"]


def test_a_partition_split_scores_with_registry_uris(spark, setup):
    work, run_id = setup
    manifest = read_manifest(f"file://{work}/data/partitioned")
    by_version = score(
        spark,
        _cfg(
            work,
            f"score.model_uri=models:/{NAME}/1",
            f"score.input_url={work}/data/partitioned",
            "score.split=validation",
            f"score.output_url={work}/scores-val-v1",
        ),
    )
    by_alias = score(  # score.model_uri unset: the champion of promote.registered_model
        spark,
        _cfg(
            work,
            f"score.input_url={work}/data/partitioned",
            "score.split=validation",
            f"score.output_url={work}/scores-val-champion",
        ),
    )
    assert by_alias.model_uri == f"models:/{NAME}@champion" and by_alias.model_run_id == run_id
    assert by_version.rows == by_alias.rows == manifest.validation.rows
    a, b = _read(by_version.output_url), _read(by_alias.output_url)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    whole = score(spark, _cfg(work, f"score.input_url={work}/data/partitioned", f"score.output_url={work}/scores-all"))
    assert whole.rows == 3000 and _read(whole.output_url)["row_id"].nunique() == 3000


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["score.model_uri=runs:/0123456789abcdef0123456789abcdef/model"], "does not exist"),
        ([f"score.model_uri=models:/{NAME}@staging"], "has no alias 'staging'.*champion"),
        ([f"score.model_uri=models:/{NAME}/7"], r"has no version '7' \(versions: \[1\]\)"),
        (["score.model_uri=models:/nope@champion"], "no registered model 'nope'"),
        (["score.input_url={work}/missing"], "does not exist"),
        (["data.features_col=feats"], "features_col='feats' is not in the input"),
        (["score.keep_cols=[weight]"], r"keep_cols \['weight'\] are not in"),
        (["score.output_url={work}/data/raw/scores"], "is inside score.input_url"),
        (["score.split=train"], "needs a partition output"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(spark, setup, sets, match):
    work, _ = setup
    cfg = _cfg(work, f"score.output_url={work}/scores-bad", *[s.format(work=work) for s in sets])
    with pytest.raises((ScoreError, OutputPathError, tracking.TrackingError), match=match):
        score(spark, cfg)
    assert not (work / "scores-bad").exists()


def test_feature_count_mismatch_names_both_counts(spark, setup):
    work, _ = setup
    cfg = _cfg(work)
    narrow = log_model(cfg, FEATURES - 1, seed=2)
    with pytest.raises(ScoreError, match=rf"takes {FEATURES - 1} features, but .* has {FEATURES}"):
        score(spark, _cfg(work, f"score.model_uri=runs:/{narrow}/model", f"score.output_url={work}/scores-n"))
    assert not (work / "scores-n").exists()
