"""The comparison job on real MLflow runs: right numbers in the table, plots on disk, clear errors."""

from __future__ import annotations

import json

import mlflow
import pytest

from jobs import compare as compare_job
from sparkml_dist import tracking
from sparkml_dist.baselines import run_baselines
from sparkml_dist.compare import CompareError, compare
from sparkml_dist.config import load_config
from sparkml_dist.partition import partition
from sparkml_dist.synthetic import write_dataset
from sparkml_dist.tracking import TrackingError


def _cfg(work, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={work}",
            "generate.rows=4000",
            "generate.features=4",
            "generate.partitions=2",
            "partition.num_shards=2",
            "baselines.kinds=[gd, mllib_lr]",
            "baselines.max_iterations=8",
            *sets,
        ],
    )


@pytest.fixture(scope="module")
def runs(spark, tmp_path_factory):
    work = tmp_path_factory.mktemp("compare")
    cfg = _cfg(work)
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    results = run_baselines(spark, cfg)
    # a second data set (another seed) in the same experiment: another data fingerprint
    other = _cfg(
        work,
        "generate.seed=9",
        f"generate.output_url={work}/raw2",
        f"data.input_url={work}/raw2",
        f"partition.output_url={work}/part2",
        f"train.manifest_url={work}/part2",
        "baselines.kinds=[gd]",
    )
    write_dataset(spark, other.generate)
    partition(spark, other)
    other_run = run_baselines(spark, other)[0]
    return cfg, work, results, other_run


def test_table_holds_the_runs_numbers_and_plots_exist(runs):
    cfg, work, results, _ = runs
    out = work / "report"
    summary = compare(cfg, [r.run_id for r in results], None, None, str(out))
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    by_kind = {row["kind"]: row for row in summary["runs"]}
    for r in results:
        metrics = client.get_run(r.run_id).data.metrics
        assert by_kind[r.kind]["final_val_log_loss"] == pytest.approx(metrics["val/log_loss"])
        assert by_kind[r.kind]["run_id"] == r.run_id
    mllib = next(r for r in results if r.kind == "mllib_lr")
    assert summary["target_log_loss"] == pytest.approx(client.get_run(mllib.run_id).data.metrics["val/log_loss"] * 1.01)
    for name in ("loss_vs_wall_time.png", "loss_vs_step.png", "throughput.png", "report.md", "table.csv"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "table.json").read_text())["runs"] == summary["runs"]
    artifacts = {a.path for a in client.list_artifacts(summary["comparison_run_id"])}
    assert {"report.md", "loss_vs_wall_time.png", "table.csv"} <= artifacts


def test_latest_run_of_each_kind_by_fingerprint_via_the_job(runs, capsys):
    cfg, work, results, _ = runs
    fingerprint = (
        mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri).get_run(results[0].run_id).data.tags["data_fingerprint"]
    )
    out = compare_job.main(
        ["--data-fingerprint", fingerprint, "--out", str(work / "r2"), "--set", f"paths.work_dir={work}"]
    )
    assert sorted(row["kind"] for row in out["runs"]) == ["gd", "mllib_lr"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["comparison_run_id"] == out["comparison_run_id"]


def test_bad_input_gets_clear_errors(runs):
    cfg, work, results, other = runs
    with pytest.raises(TrackingError, match="run id 'nope' does not exist"):
        compare(cfg, ["nope"], None, None, str(work / "x"))
    with pytest.raises(CompareError, match="different data"):
        compare(cfg, [results[0].run_id, other.run_id], None, None, str(work / "x"))
    with pytest.raises(CompareError, match="no finished runs"):
        compare(cfg, [], "0000", None, str(work / "x"))
    run = tracking.start_run(cfg, {"data_fingerprint": "regression-data"}, kind="allreduce")
    tracking.log_metrics(run, {"val_mse": 0.3, "val_r2": 0.9}, step=1)
    tracking.finish_run(run)
    with pytest.raises(CompareError, match=r"trained regression .* pass only classification runs"):
        compare(cfg, [run.run_id], None, None, str(work / "x"))
    assert not (work / "x").exists()


def test_strategies_are_tabled_next_to_the_baselines_with_rounds_and_bytes_per_round(spark, runs):
    from sparkml_dist.fit import run_training

    cfg, work, results, _ = runs
    sets = ("train.epochs=2", "train.batch_size=64", "train.max_steps_per_epoch=20", "tracking.log_model=false",
            "launch.backend=in_process", "comm.strategy=local_sgd", "comm.local_steps=4")  # fmt: skip
    trained = run_training(spark, _cfg(work, *sets))
    summary = compare(cfg, [*(r.run_id for r in results), trained.run_id], None, None, str(work / "r3"))
    row = next(r for r in summary["runs"] if r["run_id"] == trained.run_id)
    assert row["kind"] == "local_sgd"
    assert row["rounds"] == 2 * 5  # 20 steps per epoch, a round every 4
    assert row["bytes_per_step_measured"] == pytest.approx(5 * 4 / 4)  # 5 parameters, fp32, every 4th step
    assert row["bytes_per_round_measured"] == pytest.approx(5 * 4)
    assert row["job_wall_s"] > 0
    gd = next(r for r in summary["runs"] if r["kind"] == "gd")
    assert gd["rounds"] == 8 and gd["bytes_per_round_measured"] == gd["bytes_per_step_measured"]
    assert "| local_sgd |" in (work / "r3" / "report.md").read_text()
