"""The Spark ML API (issue 22 §2): ``DistributedTorchEstimator.fit(DataFrame)`` runs partition + Horovod
training + MLflow on the DataFrame it is given, and its model works in a real ``pyspark.ml.Pipeline``:
transform adds prediction and probability, and a saved PipelineModel loads and predicts the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparkml_dist.config import ConfigError, load_config
from sparkml_dist.estimator import DistributedTorchEstimator, DistributedTorchModel, explain_error
from sparkml_dist.score import ScoreError
from sparkml_dist.synthetic import write_dataset


def _settings(root: Path) -> list[str]:
    return [
        f"paths.work_dir={root}",
        "partition.num_shards=2",
        "partition.row_group_mb=0.05",
        "data.features_col=features",  # the assembler's vector; its input columns are left out on purpose
        "train.batch_size=128",
        "train.epochs=2",
        "train.optimizer=adam",
        "train.lr=0.05",
        "launch.start_timeout_s=60",
        "launch.collective_timeout_s=60",
        "launch.job_timeout_s=300",
    ]


def test_a_pipeline_with_the_estimator_fits_transforms_saves_and_loads(spark, tmp_path: Path) -> None:
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import VectorAssembler

    gen = load_config(None, [f"paths.work_dir={tmp_path}", "generate.rows=6000", "generate.features=6",
                             "generate.layout=columns", "generate.partitions=2"]).generate  # fmt: skip
    write_dataset(spark, gen)
    df = spark.read.parquet(gen.output_url)
    assembler = VectorAssembler(inputCols=[f"f{i}" for i in range(6)], outputCol="features")
    estimator = DistributedTorchEstimator(overrides=_settings(tmp_path))
    fitted = Pipeline(stages=[assembler, estimator]).fit(df)

    model = fitted.stages[-1]
    assert isinstance(model, DistributedTorchModel) and model.train_result is not None
    assert model.train_result.world_size == 2 and model.train_result.final["val_log_loss"] < 0.6
    scored = fitted.transform(df)
    assert {"prediction", "probability"} <= set(scored.columns) and set(df.columns) <= set(scored.columns)
    rows = scored.select("row_id", "label", "prediction", "probability").collect()
    assert len(rows) == 6000
    assert np.mean([r["prediction"] == r["label"] for r in rows]) > 0.7
    assert all(abs(sum(r["probability"]) - 1) < 1e-5 for r in rows[:50])

    path = str(tmp_path / "pipeline")
    fitted.write().save(path)
    again = PipelineModel.load(path).transform(df).select("row_id", "prediction").collect()
    assert {r["row_id"]: r["prediction"] for r in again} == {r["row_id"]: r["prediction"] for r in rows}

    # Spark ML conventions: an existing output column is refused, a bad setting fails before any Spark job
    with pytest.raises(ScoreError, match=r"already has column\(s\) \['prediction'\]"):
        model.transform(scored.drop("probability"))
    with pytest.raises(ConfigError, match="train.epochs"):
        DistributedTorchEstimator(overrides=["train.epochs=zero"]).fit(df)


def test_a_nan_feature_fails_the_transform_naming_the_row(spark, tmp_path: Path) -> None:
    gen = load_config(None, [f"paths.work_dir={tmp_path}", "generate.rows=3000", "generate.features=4",
                             "generate.partitions=2"]).generate  # fmt: skip
    write_dataset(spark, gen)
    df = spark.read.parquet(gen.output_url)
    model = DistributedTorchEstimator(overrides=_settings(tmp_path)).fit(df)
    from pyspark.sql import functions as F

    bad = df.withColumn("features", F.when(F.col("row_id") == 7, F.array(*[F.lit(float("nan"))] * 4)).otherwise(
        F.col("features")))  # fmt: skip
    with pytest.raises(Exception) as failed:
        model.transform(bad).collect()
    assert "row_id 7" in str(explain_error(failed.value))
