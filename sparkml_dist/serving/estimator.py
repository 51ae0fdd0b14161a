"""A Spark ML estimator/model pair over the whole pipeline, for notebooks and ``pyspark.ml.Pipeline``.

    from sparkml_dist.serving.estimator import DistributedTorchEstimator
    est = DistributedTorchEstimator(overrides=["train.epochs=3", "comm.strategy=local_sgd"])
    model = est.fit(df)                      # partition -> Horovod ranks in a barrier stage -> MLflow run
    scored = model.transform(df)             # + prediction (double), probability (vector)
    Pipeline(stages=[VectorAssembler(...), est]).fit(df).save(path)   # PipelineModel.load(path) works

``fit`` is the jobs a user would run, called on the DataFrame it is given: the DataFrame is written once as
Parquet under ``paths.work_dir`` (``estimator/<uid>-<n>/input``: the partition job needs files to fingerprint
and split, and this is the only copy made), partitioned beside it, trained with the configured strategy and
tracked in MLflow. The settings are the same typed config as the jobs (a YAML ``configPath`` and ``--set``
style ``overrides``), so an estimator and a job with the same settings train the same model.

The fitted model is the MLflow model the run logged; ``transform`` runs it inside Spark exactly as the
scoring job does (features picked by name, a sparse model's stored encoding applied). Persistence: Spark
ML's default params writer, storing the MLflow model URI and the tracking URI, not the weights: MLflow is
the model store (versions, lineage, registry aliases), and a saved pipeline that pointed at a copy of the
weights would drift from what the registry serves. Loading needs that tracking server to be reachable.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from pyspark.ml import Estimator, Model
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkml_dist.config import DataConfig, JobConfig, load_config
from sparkml_dist.data.partition import apply_invalid_policy, clean_invalid_row_error, partition
from sparkml_dist.data.storage import WRITE_CHECKSUMS
from sparkml_dist.experiments import tracking
from sparkml_dist.fit import TrainResult, run_training
from sparkml_dist.serving.score import (
    PREDICTION,
    PROBS,
    ScoreError,
    frame_input,
    model_feature_names,
    predict,
    row_validity,
)

log = logging.getLogger("sparkml_dist.estimator")  # its pre-move name: logging configs keep working
_FITS = itertools.count()
_ROW = "_sparkml_dist_row"


class DistributedTorchEstimator(Estimator, DefaultParamsReadable, DefaultParamsWritable):
    """``fit(DataFrame) -> DistributedTorchModel``: partition, distributed training, MLflow tracking."""

    configPath = Param(
        Params._dummy(), "configPath", "YAML config file (as the jobs' --config)", TypeConverters.toString
    )
    overrides = Param(
        Params._dummy(), "overrides", "section.key=value settings (as the jobs' --set)", TypeConverters.toListString
    )

    def __init__(self, *, configPath: str | None = None, overrides: list[str] | None = None) -> None:
        super().__init__()
        self._setDefault(configPath="", overrides=[])
        self._set(configPath=configPath or "", overrides=list(overrides or []))

    def job_config(self, extra: list[str] = ()) -> JobConfig:  # type: ignore[assignment]
        """The typed config these params describe (checked now: a bad setting fails before any Spark job)."""
        path = self.getOrDefault(self.configPath) or None
        return load_config(path, [*self.getOrDefault(self.overrides), *extra])

    def _fit(self, dataset: DataFrame) -> DistributedTorchModel:
        cfg = self.job_config()
        spark = dataset.sparkSession
        stage = f"{cfg.paths.work_dir}/estimator/{self.uid}-{next(_FITS)}"
        sets = [
            f"data.input_url={stage}/input",
            f"partition.output_url={stage}/partitioned",
            f"train.manifest_url={stage}/partitioned",
        ]
        cfg = self.job_config(sets)
        log.info("estimator: writing the DataFrame to %s for partitioning", cfg.data.input_url)
        dataset.write.mode("errorifexists").options(**WRITE_CHECKSUMS).parquet(cfg.data.input_url)
        partition(spark, cfg)
        result: TrainResult = run_training(spark, cfg)
        if result.model_uri is None:
            raise ScoreError("the estimator needs the trained model logged: leave tracking.log_model=true")
        model = DistributedTorchModel(
            modelUri=result.model_uri, trackingUri=result.tracking_uri, rowIdCol=cfg.data.row_id_col
        )
        model.train_result = result
        return model


class DistributedTorchModel(Model, DefaultParamsReadable, DefaultParamsWritable):
    """``transform(DataFrame)``: the logged MLflow model run inside Spark; adds ``prediction`` (the most
    probable class as a double, or the regression value) and ``probability`` (a dense vector; classifiers)."""

    modelUri = Param(Params._dummy(), "modelUri", "MLflow model URI", TypeConverters.toString)
    trackingUri = Param(Params._dummy(), "trackingUri", "MLflow tracking URI", TypeConverters.toString)
    rowIdCol = Param(Params._dummy(), "rowIdCol", "row key column, named in error messages", TypeConverters.toString)
    predictionCol = Param(Params._dummy(), "predictionCol", "output column of predictions", TypeConverters.toString)
    probabilityCol = Param(Params._dummy(), "probabilityCol", "output column of probabilities", TypeConverters.toString)

    train_result: TrainResult | None = None
    """Set on the model ``fit`` returns: the run's summary (run id, final metrics)."""

    def __init__(
        self, *, modelUri: str = "", trackingUri: str = "", rowIdCol: str = "row_id", predictionCol: str = "prediction",
        probabilityCol: str = "probability",
    ) -> None:  # fmt: skip
        super().__init__()
        self._setDefault(rowIdCol="row_id", predictionCol="prediction", probabilityCol="probability")
        self._set(
            modelUri=modelUri, trackingUri=trackingUri, rowIdCol=rowIdCol, predictionCol=predictionCol,
            probabilityCol=probabilityCol,
        )  # fmt: skip

    def _transform(self, dataset: DataFrame) -> DataFrame:
        model_uri, tracking_uri = self.getOrDefault(self.modelUri), self.getOrDefault(self.trackingUri)
        cfg = load_config(None, [f"tracking.tracking_uri={tracking_uri}"])
        spec = tracking.model_spec(tracking_uri, model_uri)
        row_id = self.getOrDefault(self.rowIdCol)
        df = dataset if row_id in dataset.columns else dataset.withColumn(_ROW, F.monotonically_increasing_id())
        data = DataConfig(row_id_col=row_id if row_id in dataset.columns else _ROW)
        names = None if spec.encoding is not None else model_feature_names(cfg, spec)
        inp = frame_input(df, data, names, spec.encoding)
        pred, prob = self.getOrDefault(self.predictionCol), self.getOrDefault(self.probabilityCol)
        taken = sorted({c for c in (pred, prob, PREDICTION) if c in dataset.columns})
        if taken:
            raise ScoreError(
                f"the DataFrame already has column(s) {taken}: drop them or set predictionCol/probabilityCol"
            )
        valid = row_validity(inp)
        # A row with a NaN, infinite or null feature fails the action that reads it, naming the row
        # (``explain_error`` turns that Spark failure into a ScoreError).
        checked = apply_invalid_policy(inp.df, valid, inp.row_id_col, "fail", "a null feature value")
        scored = predict(dataset.sparkSession, dataclasses.replace(inp, df=checked), spec)
        out = [*[F.col(c) for c in dataset.columns], F.col(PREDICTION).cast("double").alias(pred)]
        if not spec.regression:
            out.append(array_to_vector(F.col(PROBS)).alias(prob))
        return scored.select(*out)


def explain_error(exc: BaseException, row_id_col: str = "row_id") -> BaseException:
    """The ScoreError a failed action on a transformed DataFrame carries (an invalid row), else ``exc``."""
    clean = clean_invalid_row_error(exc, row_id_col)
    return ScoreError(str(clean)) if clean is not None else exc


__all__ = ["DistributedTorchEstimator", "DistributedTorchModel", "explain_error"]
