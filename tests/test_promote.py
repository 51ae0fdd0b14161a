"""Evaluate + promote against a real MLflow Model Registry (sqlite), scoring through the real Spark UDF."""

from __future__ import annotations

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs import promote as promote_job
from sparkml_dist import tracking
from sparkml_dist.config import load_config, url_to_path
from sparkml_dist.manifest import read_manifest
from sparkml_dist.metrics import eval_sums, summarize
from sparkml_dist.models import LogisticRegression, ProbabilityModel
from sparkml_dist.partition import partition
from sparkml_dist.promote import PromotionError, promote
from sparkml_dist.synthetic import read_truth, write_dataset

FEATURES = 4
NAME = "clf"


def _argv(work, date: str, *sets: str) -> list[str]:
    argv = [
        f"paths.work_dir={work}",
        "generate.rows=3000",
        f"generate.features={FEATURES}",
        "generate.partitions=2",
        "partition.row_group_mb=0.05",
        "partition.validation_fraction=0.2",
        f"promote.registered_model={NAME}",
        f"promote.logical_date={date}",
        *sets,
    ]
    return [a for s in argv for a in ("--set", s)]


def _cfg(work, date: str, *sets: str):
    return load_config("conf/local.yaml", _argv(work, date, *sets)[1::2])


@pytest.fixture(scope="module")
def setup(spark, tmp_path_factory):
    work = tmp_path_factory.mktemp("promote")
    cfg = _cfg(work, "2024-01-01")
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return work, cfg, read_manifest(cfg.train.manifest_url), read_truth(spark, cfg.data.input_url)


def _train_run(cfg, manifest, truth, scale: float) -> str:
    """A 'training' run of kind allreduce on the manifest's data whose model is the true model x scale
    (1 is the best model there is; smaller is less confident, a negative scale is wrong)."""
    model = LogisticRegression(FEATURES)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor(truth.weights, dtype=torch.float32) * scale)
        model.linear.bias.copy_(torch.tensor(truth.bias, dtype=torch.float32) * scale)
    tags = {"data_fingerprint": manifest.input_fingerprint}
    run = tracking.start_run(cfg, tags, kind="allreduce")
    example = np.zeros((3, FEATURES), dtype=np.float32)
    tracking.log_torch_model(run, ProbabilityModel(model).eval(), example)
    tracking.finish_run(run)
    return run.run_id


def _alias(cfg) -> str | None:
    mv = tracking.get_alias(cfg.tracking.tracking_uri, NAME, "champion")
    return mv.version if mv else None


def _promotion_runs(cfg, date: str) -> list:
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], f"tags.kind = 'promotion' and tags.logical_date = '{date}'")


@pytest.mark.slow
def test_first_becomes_champion_worse_is_kept_better_moves_the_alias_and_reruns_change_nothing(spark, setup):
    work, cfg, manifest, truth = setup
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)

    # day 1: the first candidate becomes champion, whatever its score
    first = _train_run(cfg, manifest, truth, scale=0.3)
    ev = evaluate_job.main(_argv(work, "2024-01-01"))
    assert ev["candidate_run_id"] == first and ev["champion"] is None
    val = pq.read_table(url_to_path(manifest.shard_url(manifest.validation))).to_pandas()
    x = np.stack(val[manifest.features_col].to_numpy()).astype(np.float32)  # the default array layout
    probs = tracking.load_model(cfg.tracking.tracking_uri, f"runs:/{first}/model").predict(x)
    expected = summarize(eval_sums(np.asarray(probs), val["label"].to_numpy()), 2)
    for key in ("log_loss", "accuracy", "auc", "rows"):
        assert ev["candidate"][key] == pytest.approx(expected[key], rel=1e-5), key
    d1 = promote_job.main(_argv(work, "2024-01-01"))
    assert d1["promoted"] and d1["candidate_version"] == "1" and "first model" in d1["reason"]
    assert _alias(cfg) == "1"

    # day 2: a worse candidate (wrong sign) is registered, the alias stays, the decision is recorded
    worse = _train_run(cfg, manifest, truth, scale=-0.5)
    ev2 = evaluate_job.main(_argv(work, "2024-01-02"))
    assert ev2["candidate_run_id"] == worse and ev2["champion_version"] == "1"
    assert ev2["candidate"]["log_loss"] > ev2["champion"]["log_loss"]
    d2 = promote_job.main(_argv(work, "2024-01-02"))
    assert not d2["promoted"] and d2["candidate_version"] == "2" and _alias(cfg) == "1"
    (run2,) = _promotion_runs(cfg, "2024-01-02")
    assert run2.data.tags["decision"] == "kept" and "does not beat" in run2.data.tags["decision_reason"]
    assert run2.data.metrics["candidate/log_loss"] == pytest.approx(ev2["candidate"]["log_loss"])
    assert run2.data.metrics["champion/log_loss"] == pytest.approx(ev2["champion"]["log_loss"])

    # day 3: a better candidate, but not by the margin asked for -> kept; by the margin -> promoted
    better = _train_run(cfg, manifest, truth, scale=1.0)
    gain = ev2["champion"]["log_loss"] - evaluate_job.main(_argv(work, "2024-01-03"))["candidate"]["log_loss"]
    assert gain > 0
    with pytest.raises(PromotionError, match="re-run jobs/evaluate.py"):  # the date's run is reused below
        client.set_registered_model_alias(NAME, "champion", "2")
        promote(_cfg(work, "2024-01-03"))
    client.set_registered_model_alias(NAME, "champion", "1")
    high = f"promote.min_improvement={gain * 2}"
    d3 = promote_job.main(_argv(work, "2024-01-03", high))
    assert not d3["promoted"] and _alias(cfg) == "1"
    evaluate_job.main(_argv(work, "2024-01-04"))
    d4 = promote_job.main(_argv(work, "2024-01-04", f"promote.min_improvement={gain / 2}"))
    assert d4["promoted"] and d4["candidate_run_id"] == better and d4["champion_before"] == "1"
    assert d4["candidate_version"] == "3" == _alias(cfg)  # day 3 registered it; day 4 reused that version

    # a rerun of day 4 (evaluate + promote) registers nothing new and adds no promotion run
    again_ev = evaluate_job.main(_argv(work, "2024-01-04"))
    again = promote_job.main(_argv(work, "2024-01-04", f"promote.min_improvement={gain / 2}"))
    assert again_ev["reused"] and again["reused"] and again["promoted"] and again["candidate_version"] == "3"
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert [v.run_id for v in sorted(versions, key=lambda v: int(v.version))] == [first, worse, better]
    assert len(_promotion_runs(cfg, "2024-01-04")) == 1 and len(_promotion_runs(cfg, "2024-01-03")) == 1
    assert _alias(cfg) == "3"

    # the champion is what scoring uses by default
    from sparkml_dist.score import score

    scored = score(spark, _cfg(work, "2024-01-04", f"score.output_url={work}/scores"))
    assert scored.model_run_id == better and scored.rows == 3000


def test_promote_without_an_evaluation_or_a_date_says_what_to_run(setup):
    work, *_ = setup
    with pytest.raises(PromotionError, match="run jobs/evaluate.py with the same"):
        promote(_cfg(work, "2030-12-31"))
    cfg = load_config("conf/local.yaml", [f"paths.work_dir={work}"])
    with pytest.raises(PromotionError, match="promote.logical_date is required"):
        promote(cfg)


def test_no_candidate_names_the_data_and_the_fix(spark, setup):
    work, *_ = setup
    with pytest.raises(PromotionError, match="no FINISHED run of kind 'mllib_lr'.*run jobs/train.py"):
        evaluate_job.main(_argv(work, "2024-02-01", "promote.candidate_kind=mllib_lr"))
