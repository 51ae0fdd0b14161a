"""Batch scoring: Parquet rows -> predictions, with a logged or registered model given by URI.

The model runs inside Spark as a vectorised MLflow pyfunc UDF (``tracking.model_udf``): each task feeds
it Arrow batches of the features column and gets class probabilities (or a regression's values) back, so
the data never passes through the driver. Input is either a data set (features picked by ``data.features_col`` /
``data.feature_cols`` exactly as the partition job picks them, so the model sees the order it was
trained on) or a partition output (its ``_manifest.json`` names the files and the features).

Columns are matched by name: a model trained by jobs/train.py records its feature names (run tags
``manifest.feature_tags``), and scoring picks exactly those columns from the input whatever their order,
refusing missing ones. Rows with a NaN, infinite or null feature follow ``data.invalid_values`` as in
the partition job: fail naming the row, or drop and count them (``dropped_rows``).

A sparse model with categorical columns also counts, per column, the scored rows whose value it never saw
in training: outside its vocabulary, or (hash encoding) in a bucket no training row hit, where the model
records those buckets; a hash model that does not (made before, or too many buckets) cannot tell a new value
from a seen one, and the summary lists such columns as not counted. The counts go in the summary,
``_score.json`` and the score run's MLflow metrics (``score/unseen_fraction_<column>``); above
``score.max_unseen_fraction`` the job warns, or with ``score.unseen=fail`` stops before publishing anything.
Every scoring job is an MLflow run of kind ``score`` (the model, the input, the counts).

Output: the row key, ``prediction`` (the most probable class, and ``prob_0 .. prob_{C-1}``; for a regression
model the predicted value, double) and any ``score.keep_cols``, published atomically with ``_score.json``
(model URI and run, rows, files) beside the Parquet files; a rerun replaces the whole output, and only an
earlier scoring output is ever replaced (``outputs.check_output``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from functools import reduce
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkml_dist.config import DataConfig, JobConfig, ScoreConfig
from sparkml_dist.data.features import (
    Encoding,
    FeatureError,
    check_scoring_columns,
    sparse_columns,
    with_vocabulary_indices,
)
from sparkml_dist.data.manifest import (
    FEATURE_DIGEST_TAG,
    FEATURE_NAMES_TAG,
    MANIFEST_NAME,
    MANIFEST_URL_TAG,
    Manifest,
    ManifestError,
    feature_names_digest,
    read_manifest,
)
from sparkml_dist.data.outputs import OutputKind, check_output, files_listed
from sparkml_dist.data.partition import (
    PartitionError,
    apply_invalid_policy,
    clean_invalid_row_error,
    corrupt_file_error,
    feature_expr,
    is_feature_array,
    read_parquet_checked,
    valid_features,
)
from sparkml_dist.data.storage import READ_VERIFY, WRITE_CHECKSUMS, HadoopFS, atomic_output
from sparkml_dist.errors import UserError
from sparkml_dist.experiments import tracking

log = logging.getLogger("sparkml_dist.score")  # its pre-move name: logging configs keep working

FEATURES = "_features"
SPARSE_INDICES, SPARSE_VALUES = "_indices", "_values"
"""A sparse model's input columns (the stored encoding applied to the input)."""
PROBS = "_probs"
PREDICTION = "prediction"
PROB_PREFIX = "prob_"
SUMMARY_NAME = "_score.json"
SCORE_OUTPUT = OutputKind("score", SUMMARY_NAME, files_listed)
SCORE_KIND = "score"
"""MLflow run kind (tag) of a scoring job."""
_VALID = "_valid"
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)


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
    feature_names: list[str] | None = None
    """The input's feature names in the order of ``FEATURES``."""
    valid: Column | None = None
    """Sparse input: which rows are valid (indices in range, finite values); dense input: ``valid_features``."""
    sparse: bool = False
    """The features are ``SPARSE_INDICES`` and ``SPARSE_VALUES`` columns (a sparse model's input), not ``FEATURES``."""
    encoded: bool = False
    """A partition output: the rows hold the encoded features, not the input columns they were built from (so
    there are no categories to check against the model's: they are the data it was partitioned from)."""


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
    dropped_rows: int = 0
    """Rows left out under data.invalid_values=drop (a NaN, infinite or null feature)."""
    unseen_rows: dict[str, int] = field(default_factory=dict)
    """Per categorical column of a sparse model: scored rows whose value training never saw."""
    unseen_fraction: dict[str, float] = field(default_factory=dict)
    """unseen_rows as a share of the scored rows."""
    unseen_not_counted: list[str] = field(default_factory=list)
    """Hash-encoded columns whose model does not record the buckets training hit: not counted."""
    mlflow_run_id: str | None = None
    """The score run in MLflow (kind ``score``)."""


def resolve_model_uri(cfg: JobConfig) -> str:
    """score.model_uri, or the registered champion when it is unset."""
    return cfg.score.model_uri or f"models:/{cfg.promote.registered_model}@{cfg.promote.alias}"


def model_feature_names(cfg: JobConfig, spec: tracking.ModelSpec) -> list[str] | None:
    """The feature names, in order, that the model was trained on, from its training run's tags (the
    manifest the run names, if the names did not fit a tag); None for a model that does not record them."""
    if spec.run_id is None:
        return None
    tags = tracking.get_run_record(cfg.tracking, spec.run_id, ()).tags
    if FEATURE_NAMES_TAG in tags:
        return list(json.loads(tags[FEATURE_NAMES_TAG]))
    if MANIFEST_URL_TAG in tags and FEATURE_DIGEST_TAG in tags:
        try:
            names = read_manifest(tags[MANIFEST_URL_TAG], verify=False).feature_names
        except ManifestError:
            names = []
        if feature_names_digest(names) == tags[FEATURE_DIGEST_TAG]:
            return names
        raise ScoreError(
            f"model {spec.model_uri} was trained on {tags[MANIFEST_URL_TAG]}, whose manifest no longer holds the "
            "model's feature names (it was re-partitioned or removed), so its input columns cannot be matched by "
            "name: score with data.feature_cols set to the training features in training order"
        )
    return None


def _array_prefix(names: list[str]) -> str | None:
    """'features' for ['features_0', 'features_1', ...] (the names of an array column's elements)."""
    m = re.match(r"^(.*)_0$", names[0]) if names else None
    if m is None or names != [f"{m.group(1)}_{i}" for i in range(len(names))]:
        return None
    return m.group(1)


def read_input(
    spark: SparkSession,
    url: str,
    data: DataConfig,
    split: str = "all",
    model_names: list[str] | None = None,
    encoding: dict[str, Any] | None = None,
) -> ScoreInput:
    """A data set or a partition output (detected by its manifest) as rows with a features array.

    With ``model_names`` (the model's features in training order) the features are picked by name; with
    ``encoding`` (a sparse model's) the stored encoding builds the indices and values from columns by name.
    """
    url = url.rstrip("/")
    fs = HadoopFS(spark, url)
    if not fs.exists(url):
        raise ScoreError(f"score.input_url {url} does not exist: run jobs/generate.py or fix the path")
    if fs.exists(f"{url}/{MANIFEST_NAME}"):
        manifest = read_manifest(url)
        if encoding is not None and (manifest.sparse is None or manifest.sparse.encoding != encoding):
            raise ScoreError(
                f"the model was trained on a sparse feature space ({_describe(encoding)}), but {url} holds "
                f"{_describe(manifest.sparse.encoding) if manifest.sparse else 'dense features'}: score the input "
                "table itself (the model applies its own encoding) or a partition output made with the same settings"
            )
        return manifest_input(spark, manifest, split, model_names)
    if split != "all":
        raise ScoreError(f"score.split={split!r} needs a partition output; {url} has no {MANIFEST_NAME}")
    try:
        df, _, _ = read_parquet_checked(spark, url, "score.input_url")
    except PartitionError as exc:
        raise ScoreError(str(exc)) from exc
    return frame_input(df, data, model_names, encoding, url, "score.input_url ")


def frame_input(
    df: DataFrame,
    data: DataConfig,
    model_names: list[str] | None = None,
    encoding: dict[str, Any] | None = None,
    description: str = "the DataFrame",
    key: str = "",
) -> ScoreInput:
    """Rows of a DataFrame (a table read from score.input_url, or one the caller holds) with the model's
    features picked by name (``model_names``) or built by its stored sparse ``encoding``. Messages name the
    input as ``key + description``."""
    where = f"{key}{description}"
    fields = {f.name: f.dataType for f in df.schema.fields}
    if data.row_id_col not in fields:
        raise ScoreError(
            f"{where} has no row key column data.row_id_col={data.row_id_col!r}; "
            f"columns: {sorted(fields)}. Set data.row_id_col to the input's key"
        )
    label = data.label_col if data.label_col in fields else None
    if encoding is not None:
        enc = Encoding.from_dict(encoding)
        try:
            check_scoring_columns(enc, fields, where)
        except FeatureError as exc:
            raise ScoreError(str(exc)) from exc
        indices, values, valid = sparse_columns(enc)
        sparse_df = (
            with_vocabulary_indices(df, enc).withColumn(SPARSE_INDICES, indices).withColumn(SPARSE_VALUES, values)
        )
        return ScoreInput(
            sparse_df, data.row_id_col, enc.dimension, label, description, enc.columns, valid, sparse=True
        )
    try:
        features, names = _pick_features(df, fields, data, model_names)
    except PartitionError as exc:
        raise ScoreError(f"{where}: {exc}") from exc
    return ScoreInput(df.withColumn(FEATURES, features), data.row_id_col, len(names), label, description, names)


def _describe(encoding: dict[str, Any]) -> str:
    return f"{encoding.get('kind')} encoding of {encoding.get('columns')}, dimension {encoding.get('dimension')}"


def _pick_features(
    df: DataFrame, fields: dict[str, T.DataType], data: DataConfig, model_names: list[str] | None
) -> tuple[Column, list[str]]:
    """The model's features from a data set, by name when the model records them."""
    if model_names is None:
        if data.features_col is None and data.feature_cols is None and not is_feature_array(fields.get("features")):
            raise ScoreError(
                "the model does not record its feature names (it was not trained by jobs/train.py on a manifest "
                "that tags them), so the input's numeric columns cannot be matched by name: set data.feature_cols "
                "to the training features in training order"
            )
        return feature_expr(df, fields, data)
    prefix = _array_prefix(model_names)
    if prefix is not None and not all(n in fields for n in model_names):
        # The model was trained on an array column: its elements are positional by nature.
        column = data.features_col or prefix
        if column not in fields:
            raise ScoreError(
                f"the model takes the array column {prefix!r} ({len(model_names)} values), which the input lacks; "
                f"columns: {sorted(fields)}. Set data.features_col to the input's feature array"
            )
        expr, names = feature_expr(df, fields, DataConfig(features_col=column, label_col=data.label_col))
        if len(names) != len(model_names):
            raise ScoreError(
                f"the model takes {len(model_names)} features, but the input's array column {column!r} holds "
                f"{len(names)}: score data with the features the model was trained on"
            )
        return expr, model_names
    if data.feature_cols is not None and sorted(data.feature_cols) != sorted(model_names):
        raise ScoreError(
            f"data.feature_cols {data.feature_cols} are not the model's features {model_names}: leave "
            "data.feature_cols unset (the model's features are picked by name) or list exactly those"
        )
    missing = [n for n in model_names if n not in fields]
    if missing:
        raise ScoreError(
            f"the model takes feature column(s) {missing} that the input lacks (it takes {model_names}; the input "
            f"has {sorted(fields)}): score data with the columns the model was trained on"
        )
    bad = [f"{n} ({fields[n].simpleString()})" for n in model_names if not isinstance(fields[n], _NUMERIC)]
    if bad:
        raise ScoreError(f"feature column(s) {bad} are not numeric: cast them to numbers")
    return F.array(*[F.col(n).cast("float") for n in model_names]), model_names


def manifest_input(
    spark: SparkSession, manifest: Manifest, split: str, model_names: list[str] | None = None
) -> ScoreInput:
    """The shards of ``split`` (all, train, validation) of a partition output."""
    if model_names is not None and model_names != manifest.feature_names:
        same = sorted(model_names) == sorted(manifest.feature_names)
        raise ScoreError(
            f"the model takes features {model_names[:8]}{'...' if len(model_names) > 8 else ''}, but "
            f"{manifest.root_url} holds {manifest.feature_names[:8]}{'...' if manifest.num_features > 8 else ''}"
            f"{' in another order' if same else ''}: score a partition output of the data the model was trained on, "
            "or re-partition this data with the model's features (data.feature_cols)"
        )
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
    frames = [spark.read.options(**READ_VERIFY).parquet(*manifest.file_urls(s)) for s in chosen]
    df = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
    if manifest.mode == "random_sample" and split != "validation":
        df = df.dropDuplicates([manifest.row_id_col])  # a sampled row can sit in several shards
    where = f"{manifest.root_url} ({split})"
    if manifest.sparse is not None:
        sp = manifest.sparse
        df = df.withColumn(SPARSE_INDICES, F.col(sp.indices_col)).withColumn(SPARSE_VALUES, F.col(sp.values_col))
        return ScoreInput(
            df, manifest.row_id_col, sp.dimension, manifest.label_col, where, manifest.feature_names, F.lit(True), True,
            encoded=True,
        )  # fmt: skip
    features: Column = (
        F.col(manifest.features_col).cast("array<float>")
        if manifest.features_col
        else F.array(*[F.col(n).cast("float") for n in manifest.feature_names])
    )
    return ScoreInput(
        df.withColumn(FEATURES, features),
        manifest.row_id_col,
        manifest.num_features,
        manifest.label_col,
        where,
        manifest.feature_names,
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
    if (spec.encoding is not None) != inp.sparse:
        raise ScoreError(
            f"model {spec.model_uri} takes {'sparse' if spec.encoding else 'dense'} features but {inp.description} "
            f"holds {'sparse' if inp.sparse else 'dense'} ones: score it on data laid out as it was trained"
        )
    udf = tracking.model_udf(spark, spec.model_uri)
    if inp.sparse:
        sparse_in = F.struct(F.col(SPARSE_INDICES).alias("indices"), F.col(SPARSE_VALUES).alias("values"))
        scored = inp.df.withColumn(PROBS, udf(sparse_in))
    else:
        scored = inp.df.withColumn(PROBS, udf(F.col(FEATURES)))
    if spec.regression:
        return scored.withColumn(PREDICTION, F.col(PROBS)[0].cast("double"))
    # Argmax with built-ins (first index of the maximum), so the UDF's output is not sent back to Python.
    argmax = F.expr(f"array_position({PROBS}, array_max({PROBS})) - 1")  # F.array_position wants a literal
    return scored.withColumn(PREDICTION, argmax.cast("int"))


def unseen_checks(encoding: dict[str, Any] | None) -> tuple[dict[str, Column], list[str]]:
    """(column -> "the row's value is unseen" expression, columns whose unseen values cannot be counted) of a
    model's stored encoding; both empty for a model without categorical columns."""
    if encoding is None:
        return {}, []
    enc = Encoding.from_dict(encoding)
    exprs = enc.unseen_columns()
    return exprs, [c for c in enc.categorical if c not in exprs]


def count_unseen(df: DataFrame, exprs: dict[str, Column]) -> tuple[int, dict[str, int]]:
    """(rows, unseen rows per column) of ``df`` in one pass."""
    aggs = [F.count(F.lit(1)).alias("_n")]
    aggs += [F.sum(F.when(e, 1).otherwise(0)).alias(f"_u{j}") for j, e in enumerate(exprs.values())]
    row = df.agg(*aggs).first()
    assert row is not None
    return int(row["_n"]), {c: int(row[f"_u{j}"] or 0) for j, c in enumerate(exprs)}


def check_unseen(scfg: ScoreConfig, where: str, rows: int, unseen: dict[str, int]) -> None:
    """Warn, or under score.unseen=fail raise, when a column's unseen share is above score.max_unseen_fraction."""
    over = [(c, n) for c, n in unseen.items() if rows and n / rows > scfg.max_unseen_fraction]
    if not over:
        return
    what = ", ".join(f"{c!r} ({n} of {rows} rows, {100 * n / rows:.1f}%)" for c, n in over)
    text = (
        f"{where}: categorical column(s) {what} hold values the model never saw in training, above "
        f"score.max_unseen_fraction={scfg.max_unseen_fraction}"
    )
    if scfg.unseen == "fail":
        raise ScoreError(
            f"{text}: check that the input is coded as the training data was (same columns, same values), or set "
            "score.unseen=warn or a higher score.max_unseen_fraction; nothing was published"
        )
    log.warning("%s; they score as an unknown category (score.unseen=fail refuses such input)", text)


def _metric_name(column: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", column)


def row_validity(inp: ScoreInput) -> Column:
    """Which rows can be scored: the sparse input's own rule, or ``valid_features`` of the dense array."""
    return inp.valid if inp.valid is not None else valid_features(F.col(FEATURES), inp.num_features)


def output_columns(inp: ScoreInput, num_classes: int, keep_cols: list[str]) -> list[Column]:
    have = set(inp.df.columns) - {FEATURES, SPARSE_INDICES, SPARSE_VALUES}
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
    inputs = {"score.input_url": in_url}
    check_output(HadoopFS(spark, out_url), out_url, SCORE_OUTPUT, "score.output_url", inputs)
    model_uri = resolve_model_uri(cfg)
    spec = tracking.model_spec(cfg.tracking.tracking_uri, model_uri)
    inp = read_input(spark, in_url, cfg.data, scfg.split, model_feature_names(cfg, spec), spec.encoding)
    columns = output_columns(inp, spec.num_classes, scfg.keep_cols)
    policy = cfg.data.invalid_values
    checked = inp.df.withColumn(_VALID, row_validity(inp))
    if policy == "drop":
        checked = checked.persist()
    rows_in = apply_invalid_policy(checked, F.col(_VALID), inp.row_id_col, policy, "a null feature value")
    scored = predict(spark, dataclasses.replace(inp, df=rows_in), spec).select(*columns)
    unseen_exprs, not_counted = unseen_checks(None if inp.encoded else spec.encoding)
    if not_counted:
        log.info(
            "unseen values of hash-encoded column(s) %s are not counted: the model does not record which buckets "
            "training hit (trained before it did, or more buckets than recorded)", not_counted,
        )  # fmt: skip
    log.info("scoring %s with %s (run %s) -> %s", inp.description, model_uri, spec.run_id, out_url)
    spark.sparkContext.setJobDescription(f"score: {model_uri} on {inp.description}")
    run = tracking.start_run(
        cfg, {"model_uri": model_uri, "model_run_id": spec.run_id or "", "output_url": out_url}, kind=SCORE_KIND
    )
    unseen: dict[str, int] = {}
    status = "FAILED"
    try:
        with atomic_output(spark, out_url, SCORE_OUTPUT, "score.output_url", inputs) as tmp:
            if unseen_exprs:  # before anything is written: score.unseen=fail publishes nothing
                spark.sparkContext.setJobDescription(f"score: count unseen categories of {sorted(unseen_exprs)}")
                counted, unseen = count_unseen(rows_in, unseen_exprs)
                tracking.log_metrics(run, _unseen_metrics(counted, unseen), step=0)
                check_unseen(scfg, inp.description, counted, unseen)
            spark.sparkContext.setJobDescription(f"score: {model_uri} on {inp.description}")
            scored.write.mode("errorifexists").options(**WRITE_CHECKSUMS).parquet(tmp)
            rows = spark.read.parquet(tmp).count()  # from the Parquet footers
            dropped = checked.filter(~F.col(_VALID)).count() if policy == "drop" else 0
            result = ScoreResult(
                output_url=out_url,
                model_uri=model_uri,
                model_run_id=spec.run_id,
                input_url=inp.description,
                rows=int(rows),
                num_classes=spec.num_classes,
                columns=scored.columns,
                seconds=0.0,
                dropped_rows=int(dropped),
                unseen_rows=unseen,
                unseen_fraction={c: round(n / rows, 6) if rows else 0.0 for c, n in unseen.items()},
                unseen_not_counted=not_counted,
                mlflow_run_id=run.run_id,
            )
            fs = HadoopFS(spark, tmp)
            marker = {**asdict(result), "files": [p for p, _, _ in fs.list_files(tmp)]}
            fs.write_text(f"{tmp}/{SUMMARY_NAME}", json.dumps(marker, indent=2))
        status = "FINISHED"
    except UserError:
        raise
    except Exception as exc:
        clean = clean_invalid_row_error(exc, inp.row_id_col) or corrupt_file_error(exc, "score.input_url")
        if clean is None:
            raise
        raise ScoreError(str(clean)) from exc
    finally:
        if policy == "drop":
            checked.unpersist()
        if status == "FINISHED":
            tracking.log_metrics(run, {"score_rows": rows, "score_dropped_rows": dropped}, step=0)
            tracking.log_dict(run, asdict(result), "score.json")
        tracking.finish_run(run, status)
    if dropped:
        log.warning("score: dropped %d row(s) with a NaN, infinite or null feature (data.invalid_values=drop)", dropped)
    return ScoreResult(**{**asdict(result), "seconds": round(time.monotonic() - started, 3)})


def _unseen_metrics(rows: int, unseen: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c, n in unseen.items():
        out[f"score_unseen_rows_{_metric_name(c)}"] = n
        out[f"score_unseen_fraction_{_metric_name(c)}"] = n / rows if rows else 0.0
    return out
