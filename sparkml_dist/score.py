"""Batch scoring: Parquet rows -> predictions, with a logged or registered model given by URI.

The model runs inside Spark as a vectorised MLflow pyfunc UDF (``tracking.model_udf``): each task feeds
it Arrow batches of the features column and gets class probabilities (or a regression's values) back, so
the data never passes through the driver. Input is either a data set (features picked by ``data.features_col`` /
``data.feature_cols`` exactly as the partition job picks them, so the model sees the order it was
trained on) or a partition output (its ``_manifest.json`` names the files and the features).

Output: the row key, ``prediction`` (the most probable class, and ``prob_0 .. prob_{C-1}``; for a regression
model the predicted value, double) and any ``score.keep_cols``, published atomically with ``_score.json``
(model URI and run, rows) beside the Parquet files; a rerun replaces the whole output.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkml_dist import tracking
from sparkml_dist.config import DataConfig, JobConfig, ScoreConfig
from sparkml_dist.errors import UserError
from sparkml_dist.manifest import MANIFEST_NAME, Manifest, read_manifest
from sparkml_dist.partition import PartitionError, feature_expr
from sparkml_dist.storage import HadoopFS, atomic_output

FEATURES = "_features"
PROBS = "_probs"
PREDICTION = "prediction"
PROB_PREFIX = "prob_"
SUMMARY_NAME = "_score.json"


class ScoreError(UserError):
    """The input, the model or the output cannot be scored as asked; the message says what to change."""


@dataclass(frozen=True)
class ScoreInput:
    """Rows to score: the input's columns plus ``FEATURES`` (array<float>, model order)."""

    df: DataFrame
    row_id_col: str
    num_features: int
    label_col: str | None
    description: str


@dataclass(frozen=True)
class ScoreResult:
    output_url: str
    model_uri: str
    model_run_id: str | None
    input_url: str
    rows: int
    num_classes: int
    columns: list[str]
    seconds: float


def resolve_model_uri(cfg: JobConfig) -> str:
    """score.model_uri, or the registered champion when it is unset."""
    return cfg.score.model_uri or f"models:/{cfg.promote.registered_model}@{cfg.promote.alias}"


def read_input(spark: SparkSession, url: str, data: DataConfig, split: str = "all") -> ScoreInput:
    """A data set or a partition output (detected by its manifest) as rows with a features array."""
    url = url.rstrip("/")
    fs = HadoopFS(spark, url)
    if not fs.exists(url):
        raise ScoreError(f"score.input_url {url} does not exist: run jobs/generate.py or fix the path")
    if fs.exists(f"{url}/{MANIFEST_NAME}"):
        return manifest_input(spark, read_manifest(url), split)
    if split != "all":
        raise ScoreError(f"score.split={split!r} needs a partition output; {url} has no {MANIFEST_NAME}")
    if not fs.list_files(url, suffix=".parquet"):
        raise ScoreError(f"score.input_url {url} holds no .parquet files: nothing to score")
    df = spark.read.parquet(url)
    fields = {f.name: f.dataType for f in df.schema.fields}
    if data.row_id_col not in fields:
        raise ScoreError(
            f"score.input_url {url} has no row key column data.row_id_col={data.row_id_col!r}; "
            f"columns: {sorted(fields)}. Set data.row_id_col to the input's key"
        )
    try:
        features, names = feature_expr(df, fields, data)
    except PartitionError as exc:
        raise ScoreError(f"score.input_url {url}: {exc}") from exc
    label = data.label_col if data.label_col in fields else None
    return ScoreInput(df.withColumn(FEATURES, features), data.row_id_col, len(names), label, url)


def manifest_input(spark: SparkSession, manifest: Manifest, split: str) -> ScoreInput:
    """The shards of ``split`` (all, train, validation) of a partition output."""
    shards = {
        "all": [*manifest.train, manifest.validation],
        "train": manifest.train,
        "validation": [manifest.validation],
    }
    chosen = [s for s in shards[split] if s.files]
    if not chosen:
        raise ScoreError(f"{manifest.root_url}: split {split!r} holds no rows (see its {MANIFEST_NAME})")
    # One read per shard directory: the train shards (shard=k) and the validation split do not share one
    # partitioned layout, so reading them together would fail Spark's partition discovery.
    frames = [spark.read.parquet(*manifest.file_urls(s)) for s in chosen]
    df = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
    if manifest.mode == "random_sample" and split != "validation":
        df = df.dropDuplicates([manifest.row_id_col])  # a sampled row can sit in several shards
    features: Column = (
        F.col(manifest.features_col).cast("array<float>")
        if manifest.features_col
        else F.array(*[F.col(n).cast("float") for n in manifest.feature_names])
    )
    where = f"{manifest.root_url} ({split})"
    return ScoreInput(
        df.withColumn(FEATURES, features), manifest.row_id_col, manifest.num_features, manifest.label_col, where
    )


def predict(spark: SparkSession, inp: ScoreInput, spec: tracking.ModelSpec) -> DataFrame:
    """The input with ``PROBS`` (array<float>: the model's output) and ``PREDICTION`` added by the model's UDF:
    the most probable class (int), or for a regression model its one output (double)."""
    if spec.num_features != inp.num_features:
        raise ScoreError(
            f"model {spec.model_uri} takes {spec.num_features} features, but {inp.description} has "
            f"{inp.num_features}: score data with the features the model was trained on, or pick them with "
            "data.features_col / data.feature_cols"
        )
    udf = tracking.model_udf(spark, spec.model_uri)
    scored = inp.df.withColumn(PROBS, udf(F.col(FEATURES)))
    if spec.regression:
        return scored.withColumn(PREDICTION, F.col(PROBS)[0].cast("double"))
    # Argmax with built-ins (first index of the maximum), so the UDF's output is not sent back to Python.
    argmax = F.expr(f"array_position({PROBS}, array_max({PROBS})) - 1")  # F.array_position wants a literal
    return scored.withColumn(PREDICTION, argmax.cast("int"))


def output_columns(inp: ScoreInput, num_classes: int, keep_cols: list[str]) -> list[Column]:
    have = set(inp.df.columns) - {FEATURES}
    missing = [c for c in keep_cols if c not in have]
    if missing:
        raise ScoreError(f"score.keep_cols {missing} are not in {inp.description}; columns: {sorted(have)}")
    keep = [c for c in keep_cols if c != inp.row_id_col]
    # num_classes 1: a regression model, whose one output is the prediction itself
    probs = [F.col(PROBS)[i].alias(f"{PROB_PREFIX}{i}") for i in range(num_classes)] if num_classes > 1 else []
    return [F.col(inp.row_id_col), *map(F.col, keep), F.col(PREDICTION), *probs]


def score(spark: SparkSession, cfg: JobConfig) -> ScoreResult:
    """Score ``score.input_url`` with ``score.model_uri`` and publish the predictions at ``score.output_url``."""
    started = time.monotonic()
    scfg: ScoreConfig = cfg.score
    out_url, in_url = scfg.output_url.rstrip("/"), scfg.input_url.rstrip("/")
    if out_url == in_url or out_url.startswith(in_url + "/") or in_url.startswith(out_url + "/"):
        raise ScoreError(
            f"score.output_url {out_url} overlaps score.input_url {in_url}: the output replaces its directory, "
            "choose a path outside the input"
        )
    model_uri = resolve_model_uri(cfg)
    spec = tracking.model_spec(cfg.tracking.tracking_uri, model_uri)
    inp = read_input(spark, in_url, cfg.data, scfg.split)
    columns = output_columns(inp, spec.num_classes, scfg.keep_cols)
    scored = predict(spark, inp, spec).select(*columns)
    print(f"scoring {inp.description} with {model_uri} (run {spec.run_id}) -> {out_url}", file=sys.stderr)
    spark.sparkContext.setJobDescription(f"score: {model_uri} on {inp.description}")
    with atomic_output(spark, out_url) as tmp:
        scored.write.mode("errorifexists").parquet(tmp)
        rows = spark.read.parquet(tmp).count()  # from the Parquet footers
        result = ScoreResult(
            output_url=out_url,
            model_uri=model_uri,
            model_run_id=spec.run_id,
            input_url=inp.description,
            rows=int(rows),
            num_classes=spec.num_classes,
            columns=scored.columns,
            seconds=0.0,
        )
        HadoopFS(spark, tmp).write_text(f"{tmp}/{SUMMARY_NAME}", json.dumps(asdict(result), indent=2))
    return ScoreResult(**{**asdict(result), "seconds": round(time.monotonic() - started, 3)})
