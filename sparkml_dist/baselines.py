"""Iterative-MapReduce baselines on the same partition manifest and model family as the AllReduce trainer.

Kinds (numpy + pyspark only, never torch; the driver holds the parameters):

* ``gd``: full-batch gradient descent, one treeAggregate of per-partition gradient sums per iteration.
* ``sgd``: the same over a seeded Bernoulli sample of each partition (seed = f(seed, iteration, partition)).
* ``averaging``: iterative parameter mixing; every partition runs an epoch of local SGD from the broadcast
  model, the driver averages the local models (weighted by rows), one MapReduce per round.
* ``mllib_lr`` / ``mllib_mlp``: Spark ML's LogisticRegression (L-BFGS over treeAggregate) and
  MultilayerPerceptronClassifier, the incumbent a Spark team would use today.

The linear model is binary logistic regression (one logit) or softmax regression when num_classes > 2,
held as ``theta`` of shape [k, features + 1] with the bias in the last column. Every metric goes through
metrics.eval_sums + summarize, summed over partitions, exactly as the trainer computes it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pyspark import RDD, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkml_dist import storage, tracking
from sparkml_dist.config import BASELINE_KINDS, BaselineConfig, ConfigError, JobConfig
from sparkml_dist.manifest import Manifest, ManifestError, ShardEntry, read_manifest
from sparkml_dist.metrics import REGRESSION, eval_sums, summarize

log = logging.getLogger(__name__)

Block = tuple[np.ndarray, np.ndarray]
"""One Spark partition's rows as numpy: features [n, d] float64 and labels [n] int64."""


@dataclass(frozen=True)
class BaselineResult:
    """What one baseline run produced; everything here is also in its MLflow run."""

    run_id: str
    kind: str
    iterations: int
    """MapReduce rounds run (gd/sgd/averaging) or MLlib's totalIterations."""
    stopped: str
    """max_iterations | target | time_cap | converged (MLlib stopped before max_iterations)."""
    final: dict[str, float]
    """train_/val_ log_loss, accuracy and auc of the final model."""
    weights: list[list[float]]
    """Linear kinds: one row per logit, [w_1..w_d, bias]; mllib_mlp: one row, MLlib's flat weights."""
    seconds: float
    """Training seconds (validation passes included, MLflow logging and the data load left out)."""
    time_to_target_s: float | None
    """Seconds until the validation log-loss first reached target_log_loss (MLlib: the fit's seconds, an
    upper bound, as MLlib is only evaluated at the end); None when off or not reached."""
    history: list[dict[str, float]]
    """One dict per iteration: train_loss (at the iteration's starting weights), timings, bytes, val_*."""

    def summary(self) -> dict[str, Any]:
        """The result without weights and history (those are in the MLflow run)."""
        return {k: v for k, v in asdict(self).items() if k not in ("weights", "history")}


@dataclass(frozen=True)
class BaselineData:
    """The manifest's splits read once and cached: numpy blocks, and vector DataFrames for MLlib."""

    manifest: Manifest
    train: RDD
    validation: RDD
    train_rows: int
    validation_rows: int
    load_s: float
    """Seconds to read, convert, cache and count both splits (shared by every kind, in no kind's seconds)."""
    train_df: DataFrame | None = None
    validation_df: DataFrame | None = None

    def unpersist(self) -> None:
        for cached in (self.train, self.validation, self.train_df, self.validation_df):
            if cached is not None:
                cached.unpersist()


# ------------------------------------------------------------------------------------------ loading


def load_data(
    spark: SparkSession, manifest: Manifest, partitions_per_shard: int = 1, with_vectors: bool = False
) -> BaselineData:
    """Read the train shards and the validation split once, cache them and count them to materialize.

    Each shard is read as its own DataFrame of ``partitions_per_shard`` partitions and the RDDs are
    unioned, so every Spark partition holds rows of exactly one shard. One partition per shard (the
    default) also keeps per-task overhead, which dominates small data, as low as the AllReduce job's.
    """

    def read(shard: ShardEntry) -> DataFrame:
        df = spark.read.options(**storage.READ_VERIFY).parquet(*manifest.file_urls(shard))
        n = partitions_per_shard
        return df.coalesce(1) if n == 1 else df.repartition(n)  # coalesce: no shuffle, one task reads the files

    def split(shards: list[ShardEntry]) -> tuple[RDD, int, DataFrame | None]:
        frames = [read(s) for s in shards]
        to_blocks = functools.partial(_arrow_blocks, manifest=manifest)
        rdd = spark.sparkContext.union(
            [df.mapInArrow(to_blocks, "x binary, y binary").rdd.mapPartitions(_concat_blocks) for df in frames]
        ).persist(StorageLevel.MEMORY_AND_DISK)
        rows = int(rdd.map(lambda b: len(b[1])).sum())
        if rows != sum(s.rows for s in shards):
            raise ManifestError(
                f"{manifest.root_url}: read {rows} rows, the manifest lists {sum(s.rows for s in shards)}"
            )
        vectors = None
        if with_vectors:
            vectors = _vector_frame(frames, manifest).persist(StorageLevel.MEMORY_AND_DISK)
            vectors.count()
        return rdd, rows, vectors

    if manifest.validation.rows == 0:
        raise ManifestError(
            f"{manifest.root_url} has no validation split: re-run jobs/partition.py with "
            "partition.validation_fraction > 0"
        )
    started = time.perf_counter()
    train, train_rows, train_df = split(manifest.train)
    val, val_rows, val_df = split([manifest.validation])
    return BaselineData(manifest, train, val, train_rows, val_rows, time.perf_counter() - started, train_df, val_df)


def _arrow_blocks(batches: Iterable[Any], manifest: Manifest) -> Iterator[Any]:
    """Arrow batches -> one row of raw float64 feature / int64 label bytes per batch (no per-row Python)."""
    import pyarrow as pa

    d = manifest.num_features
    for batch in batches:
        if manifest.features_col is not None:
            flat = batch.column(manifest.features_col).flatten()  # honours the list array's offsets
            x = flat.to_numpy(zero_copy_only=False).reshape(batch.num_rows, d)
        else:
            x = np.column_stack([batch.column(n).to_numpy(zero_copy_only=False) for n in manifest.feature_names])
        y = batch.column(manifest.label_col).to_numpy(zero_copy_only=False)
        x64, y64 = np.ascontiguousarray(x, dtype=np.float64), y.astype(np.int64)
        yield pa.RecordBatch.from_pydict({"x": [x64.tobytes()], "y": [y64.tobytes()]})


def _concat_blocks(rows: Iterable[Any]) -> Iterator[Block]:
    parts = [(np.frombuffer(r.x, dtype=np.float64), np.frombuffer(r.y, dtype=np.int64)) for r in rows]
    if parts:
        y = np.concatenate([p[1] for p in parts])
        yield np.concatenate([p[0] for p in parts]).reshape(len(y), -1), y


def _vector_frame(frames: list[DataFrame], manifest: Manifest) -> DataFrame:
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.functions import array_to_vector

    df = functools.reduce(DataFrame.unionAll, frames)
    label = F.col(manifest.label_col).cast("double").alias("label")
    if manifest.features_col is not None:
        return df.select(array_to_vector(F.col(manifest.features_col)).alias("features"), label)
    assembled = VectorAssembler(inputCols=manifest.feature_names, outputCol="features").transform(df)
    return assembled.select("features", label)


# ------------------------------------------------------------------------------- numpy on executors


def loss_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed log-loss and its gradient w.r.t. theta [k, d+1] (k = 1: logistic, else softmax)."""
    z = x @ theta[:, :-1].T + theta[:, -1]
    if theta.shape[0] == 1:
        z1 = z[:, 0]
        loss = float(np.logaddexp(0.0, z1).sum() - (y * z1).sum())
        r = (np.exp(-np.logaddexp(0.0, -z1)) - y)[:, None]  # sigmoid(z) - y without overflow
    else:
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        loss = float((lse - z[np.arange(len(y)), y]).sum())
        r = np.exp(z - lse[:, None])
        r[np.arange(len(y)), y] -= 1.0
    return loss, np.hstack([r.T @ x, r.sum(axis=0)[:, None]])


def probabilities(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Class probabilities [n, num_classes] of the linear model (the trainer's convention)."""
    z = x @ theta[:, :-1].T + theta[:, -1]
    if theta.shape[0] == 1:
        p1 = np.exp(-np.logaddexp(0.0, -z[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _grad_task(part: int, blocks: Iterable[Block], theta_bc: Any, fraction: float, seed: tuple[int, ...]) -> Iterator:
    theta = theta_bc.value
    out = np.zeros(2 + theta.size)
    for x, y in blocks:
        if fraction < 1.0:
            keep = np.random.default_rng([*seed, part]).random(len(y)) < fraction
            x, y = x[keep], y[keep]
        loss, grad = loss_grad(theta, x, y)
        out += np.concatenate([[loss, len(y)], grad.ravel()])
    yield out


def _local_sgd_task(part: int, blocks: Iterable[Block], theta_bc: Any, cfg: BaselineConfig, rnd: int) -> Iterator:
    """An epoch (or cfg.local_epochs) of local mini-batch SGD; returns [loss_sum, n, n * theta_local]."""
    theta = theta_bc.value.copy()
    out = np.zeros(2 + theta.size)
    lr = cfg.local_lr / math.sqrt(rnd)
    rng = np.random.default_rng([cfg.seed, rnd, part])
    for x, y in blocks:
        for _ in range(cfg.local_epochs):
            order = rng.permutation(len(y))
            for start in range(0, len(y), cfg.local_batch_size):
                idx = order[start : start + cfg.local_batch_size]
                loss, grad = loss_grad(theta, x[idx], y[idx])
                theta -= lr * (grad / len(idx) + cfg.reg_param * _no_bias(theta))
                out[0] += loss / cfg.local_epochs
        out[1] += len(y)
    out[2:] = out[1] * theta.ravel()
    yield out


def _eval_task(blocks: Iterable[Block], theta_bc: Any, num_classes: int) -> Iterator[np.ndarray]:
    total = eval_sums(np.zeros((0, num_classes)), np.zeros(0, dtype=np.int64))
    for x, y in blocks:
        total = total + eval_sums(probabilities(theta_bc.value, x), y)
    yield total


def _eval_rows(rows: Iterable[Any], num_classes: int) -> Iterator[np.ndarray]:
    """eval_sums of MLlib predictions (probability array, label) rows."""
    rows = list(rows)
    probs = np.array([r.p for r in rows], dtype=np.float64).reshape(len(rows), num_classes)
    yield eval_sums(probs, np.array([int(r.label) for r in rows], dtype=np.int64))


def _no_bias(theta: np.ndarray) -> np.ndarray:
    w = theta.copy()
    w[:, -1] = 0.0
    return w


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def tree_aggregate_levels(partitions: int, depth: int) -> list[int]:
    """Partial aggregates sent at each level of PySpark 3.5's RDD.treeAggregate; the last go to the driver."""
    levels, n = [partitions], float(partitions)
    scale = max(math.ceil(partitions ** (1.0 / depth)), 2)
    while n > scale + n / scale:  # PySpark's own (float) stopping rule
        n /= scale
        levels.append(int(n))
    return levels


# ------------------------------------------------------------------------------------------ running


def run_baselines(spark: SparkSession, cfg: JobConfig) -> list[BaselineResult]:
    """Run every kind in cfg.baselines.kinds on cfg.train.manifest_url's partition output, one MLflow run each."""
    manifest = read_manifest(cfg.train.manifest_url)  # a bad URL fails here, before any run or Spark job
    if manifest.num_classes == REGRESSION:
        raise ValueError(
            f"{manifest.root_url} holds regression data (real-valued labels); the baselines compare classifiers "
            "(log-loss to a target): run them on classification data, and train regression with train.model=linear"
        )
    tracking.ensure_experiment(cfg.tracking)
    mllib = any(k.startswith("mllib") for k in cfg.baselines.kinds)
    data = load_data(spark, manifest, cfg.baselines.partitions_per_shard, with_vectors=mllib)
    try:
        return [run_baseline(spark, cfg, kind, data) for kind in cfg.baselines.kinds]
    finally:
        data.unpersist()


def run_baseline(spark: SparkSession, cfg: JobConfig, kind: str, data: BaselineData) -> BaselineResult:
    """One baseline as one MLflow run tagged like the AllReduce runs (kind=<kind>)."""
    if kind not in BASELINE_KINDS:
        raise ConfigError(f"unknown baseline kind {kind!r}; valid kinds: {', '.join(BASELINE_KINDS)}")
    m, sc, mllib = data.manifest, spark.sparkContext, kind.startswith("mllib")
    tags = {
        "spark_app_id": sc.applicationId,
        "manifest_fingerprint": m.fingerprint,
        "data_fingerprint": m.input_fingerprint,
        "world_size": str(m.num_shards),
        "partitions": str(data.train.getNumPartitions()),
        "launcher": "spark-mllib" if mllib else f"spark-treeAggregate(depth={cfg.baselines.tree_depth})",
        "model": "mlp" if kind == "mllib_mlp" else ("logistic" if m.num_classes == 2 else "softmax"),
        # MLlib reports no per-iteration times, so its elapsed_s spreads the fit's time over the iterations
        "elapsed_s_source": "interpolated over the fit" if mllib else "measured",
    }
    name = f"{cfg.tracking.run_name or 'baseline'}-{kind}"
    run = tracking.start_run(
        dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_name=name)), tags, kind
    )
    try:
        tracking.log_manifest_input(run, m, context="training")
        runner = _mllib if mllib else _mapreduce
        result = runner(spark, cfg.baselines, kind, data, run)
        tracking.log_metrics(run, {f"final_{k}": v for k, v in result.final.items()}, step=result.iterations)
        tracking.log_metrics(run, {"load_s": data.load_s}, step=0)
        tracking.log_dict(run, {"kind": kind, "weights": result.weights}, "weights.json")
        tracking.log_dict(run, {"history": result.history}, "history.json")
        tracking.set_tags(run, {"stopped": result.stopped, "time_to_target_s": str(result.time_to_target_s)})
    except BaseException:
        tracking.finish_run(run, "FAILED")
        raise
    tracking.finish_run(run)
    log.info("baseline %s: %d iterations, %s (%s)", kind, result.iterations, result.final, run.run_id)
    return result


class _Clock:
    """Elapsed seconds that leave out MLflow logging, so tracking overhead never counts as training time."""

    def __init__(self) -> None:
        self.start_ms = int(time.time() * 1000)
        self._t0, self._paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0 - self._paused

    def log(self, run: tracking.RunHandle, metrics: dict[str, float], step: int, elapsed: float) -> None:
        t = time.perf_counter()
        metrics = {**metrics, "elapsed_s": elapsed}
        tracking.log_metrics(run, metrics, step=step, timestamp_ms=self.start_ms + int(elapsed * 1000))
        self._paused += time.perf_counter() - t


def _scores(partial_sums: RDD, num_classes: int, depth: int, prefix: str) -> dict[str, float]:
    """Add per-partition eval_sums with treeAggregate and summarize them as the trainer does."""
    zero = eval_sums(np.zeros((0, num_classes)), np.zeros(0, dtype=np.int64))
    scores = summarize(partial_sums.treeAggregate(zero, _add, _add, depth), num_classes)
    return {f"{prefix}{k}": v for k, v in scores.items() if k != "rows"}


def _evaluate(blocks: RDD, theta: np.ndarray, num_classes: int, depth: int, prefix: str) -> dict[str, float]:
    bc = blocks.context.broadcast(theta)
    scores = _scores(
        blocks.mapPartitions(functools.partial(_eval_task, theta_bc=bc, num_classes=num_classes)),
        num_classes,
        depth,
        prefix,
    )
    bc.destroy()
    return scores


def _mapreduce(
    spark: SparkSession, b: BaselineConfig, kind: str, data: BaselineData, run: tracking.RunHandle
) -> BaselineResult:
    sc, m = spark.sparkContext, data.manifest
    k = 1 if m.num_classes == 2 else m.num_classes
    theta = np.zeros((k, m.num_features + 1))
    parts = data.train.getNumPartitions()
    levels = sum(tree_aggregate_levels(parts, b.tree_depth))
    lr, prev = b.gd_lr, None  # gd: (theta, loss, grad) of the last accepted point
    clock, history, stopped, hit = _Clock(), [], "max_iterations", None
    it = 0
    for it in range(1, b.max_iterations + 1):
        sc.setJobDescription(f"baseline {kind}: iteration {it}")
        t0 = time.perf_counter()
        bc = sc.broadcast(theta)
        t1 = time.perf_counter()
        if kind == "averaging":
            task: Callable[..., Iterator] = functools.partial(_local_sgd_task, theta_bc=bc, cfg=b, rnd=it)
        else:
            fraction = b.batch_fraction if kind == "sgd" else 1.0
            task = functools.partial(_grad_task, theta_bc=bc, fraction=fraction, seed=(b.seed, it))
        sums = data.train.mapPartitionsWithIndex(task).treeAggregate(np.zeros(2 + theta.size), _add, _add, b.tree_depth)
        t2 = time.perf_counter()
        bc.destroy()
        loss, n, rest = sums[0], max(sums[1], 1.0), sums[2:].reshape(theta.shape)
        rec: dict[str, float] = {"iteration": it, "train_loss": loss / n, "rows": sums[1]}
        if kind == "averaging":
            theta = rest / n  # rows-weighted mean of the local models
        elif kind == "gd" and prev is not None and not loss / n <= prev[1]:  # (NaN counts as worse)
            lr /= 2.0  # the last step overshot: step again from the last accepted point with half the step
            theta = prev[0] - lr * (prev[2] + b.reg_param * _no_bias(prev[0]))
            rec.update(rejected=1.0, lr=lr)
        elif sums[1] > 0:
            grad = rest / n
            if kind == "gd":
                prev = (theta, loss / n, grad)
            step = lr if kind == "gd" else b.sgd_lr / math.sqrt(it)
            theta = theta - step * (grad + b.reg_param * _no_bias(theta))
            rec["lr"] = step
        if b.reg_param:
            rec["objective"] = rec["train_loss"] + 0.5 * b.reg_param * float((_no_bias(theta) ** 2).sum())
        t3 = time.perf_counter()
        rec.update(broadcast_s=t1 - t0, compute_s=t2 - t1, update_s=t3 - t2)
        # Bytes: per task (the weights in, one partial out, as pickled), and in total: each task fetches the
        # broadcast (an upper bound: torrent fetches once per executor) + every partial of every tree level.
        weights_bytes, partial_bytes = len(pickle.dumps(theta)), len(pickle.dumps(sums))
        rec.update(bytes_per_iteration=weights_bytes + partial_bytes, broadcast_bytes=weights_bytes * parts)
        rec.update(aggregate_bytes=partial_bytes * levels, rows_per_s=sums[1] / max(t3 - t0, 1e-9))
        capped = b.time_cap_s > 0 and clock.elapsed() >= b.time_cap_s
        if it % b.eval_every == 0 or it == b.max_iterations or capped:
            rec.update(_evaluate(data.validation, theta, m.num_classes, b.tree_depth, "val_"))
            rec["eval_s"] = time.perf_counter() - t3
        rec["elapsed_s"] = clock.elapsed()
        history.append(rec)
        clock.log(run, {k_: v for k_, v in rec.items() if k_ != "iteration"}, it, rec["elapsed_s"])
        if b.target_log_loss and rec.get("val_log_loss", math.inf) <= b.target_log_loss:
            stopped, hit = "target", round(rec["elapsed_s"], 3)
            break
        if capped:
            stopped = "time_cap"
            break
    sc.setJobDescription(None)  # type: ignore[arg-type]
    final = _evaluate(data.train, theta, m.num_classes, b.tree_depth, "train_")
    # every way out of the loop evaluated the final theta on the validation split last
    final.update({k_: v for k_, v in history[-1].items() if k_.startswith("val_")})
    return BaselineResult(
        run.run_id, kind, it, stopped, final, theta.tolist(), round(history[-1]["elapsed_s"], 3), hit, history
    )


def _mllib(
    spark: SparkSession, b: BaselineConfig, kind: str, data: BaselineData, run: tracking.RunHandle
) -> BaselineResult:
    from pyspark.ml.classification import LogisticRegression, MultilayerPerceptronClassifier
    from pyspark.ml.functions import vector_to_array

    m = data.manifest
    if data.train_df is None or data.validation_df is None:
        raise ValueError(
            f"baseline {kind} needs the vector DataFrames: load the data with load_data(with_vectors=True)"
        )
    estimator: Any
    if kind == "mllib_lr":
        family = "binomial" if m.num_classes == 2 else "multinomial"
        estimator = LogisticRegression(
            maxIter=b.max_iterations,
            regParam=b.reg_param,
            elasticNetParam=0.0,
            standardization=False,  # the penalty on the raw weights, as the other kinds (MLlib still scales internally)
            family=family,
            aggregationDepth=b.tree_depth,
            tol=b.mllib_tol,
        )
    else:
        layers = [m.num_features, *b.mlp_hidden_sizes, m.num_classes]
        estimator = MultilayerPerceptronClassifier(
            layers=layers, maxIter=b.max_iterations, tol=b.mllib_tol, seed=b.seed
        )
    spark.sparkContext.setJobDescription(f"baseline {kind}: fit")
    clock = _Clock()
    model = estimator.fit(data.train_df)
    seconds = clock.elapsed()
    spark.sparkContext.setJobDescription(None)  # type: ignore[arg-type]
    # LogisticRegressionModel.summary is a property, MultilayerPerceptronClassificationModel.summary a method
    summary = (model.summary() if callable(model.summary) else model.summary) if model.hasSummary else None
    objective = list(summary.objectiveHistory) if summary is not None else []
    iterations = int(summary.totalIterations) if summary is not None else b.max_iterations

    def scores(df: DataFrame, prefix: str) -> dict[str, float]:
        probs = model.transform(df).select(vector_to_array(F.col("probability")).alias("p"), "label")
        sums = probs.rdd.mapPartitions(functools.partial(_eval_rows, num_classes=m.num_classes))
        return _scores(sums, m.num_classes, b.tree_depth, prefix)

    final = {**scores(data.train_df, "train_"), **scores(data.validation_df, "val_")}
    # No per-iteration times from MLlib: spread the fit's time evenly over the objective history (the run
    # is tagged so); step i+1 holds the objective at the start of iteration i+1, as gd's train_loss does.
    history = [
        {"iteration": i + 1, "train_loss": v, "elapsed_s": seconds * (i + 1) / len(objective)}
        for i, v in enumerate(objective)
    ] or [{"iteration": max(iterations, 1), "elapsed_s": seconds}]
    history[-1].update({k: v for k, v in final.items() if k.startswith("val_")})  # evaluated once, at the end
    for rec in history:
        clock.log(run, {k: v for k, v in rec.items() if k != "iteration"}, int(rec["iteration"]), rec["elapsed_s"])
    hit = round(seconds, 3) if b.target_log_loss and final["val_log_loss"] <= b.target_log_loss else None
    stopped = "converged" if iterations < b.max_iterations else "max_iterations"
    if kind == "mllib_lr":
        coef = model.coefficientMatrix.toArray()
        weights = np.hstack([coef, model.interceptVector.toArray()[:, None]]).tolist()
    else:
        weights = [model.weights.toArray().tolist()]
    return BaselineResult(run.run_id, kind, iterations, stopped, final, weights, round(seconds, 3), hit, history)
