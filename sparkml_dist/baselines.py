"""Iterative-MapReduce baselines on the same partition manifest and model family as the AllReduce trainer.

Kinds (numpy + pyspark only, never torch; the driver holds the parameters):

* ``gd``: full-batch gradient descent, one treeAggregate of per-partition gradient sums per iteration.
* ``sgd``: the same over a seeded Bernoulli sample of each partition (seed = f(seed, iteration, partition)).
* ``averaging``: iterative parameter mixing; every partition runs an epoch of local SGD from the broadcast
  model, the driver averages the local models (weighted by rows), one MapReduce per round.
* ``mllib_lr`` / ``mllib_mlp``: Spark ML's LogisticRegression (L-BFGS over treeAggregate) and
  MultilayerPerceptronClassifier, the incumbent a Spark team would use today.

The sparse layout (``manifest.sparse``: per row ascending feature indices and their values in a space of
``dimension`` features, possibly 2^20 and more) is never densified: the numpy kinds read each partition as
one scipy CSR matrix (gradients are X^T r, averaging's local steps touch only a batch's columns), and MLlib
gets ``SparseVector`` rows built by an Arrow map (no per-row Python). Only the parameters are dense. An MLlib
kind whose model cannot fit the memory Spark has (the MLP densifies its input layer) is refused up front.

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
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pyspark import RDD, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkml_dist.config import BASELINE_KINDS, BaselineConfig, ConfigError, JobConfig
from sparkml_dist.data import storage
from sparkml_dist.data.manifest import Manifest, ManifestError, ShardEntry, read_manifest
from sparkml_dist.experiments import tracking
from sparkml_dist.metrics import REGRESSION, eval_sums, summarize

log = logging.getLogger(__name__)

Block = tuple[Any, np.ndarray]
"""One Spark partition's rows: features [n, d] float64 (a numpy array, or a scipy CSR array for the sparse
layout) and labels [n] int64."""


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

    if manifest.sparse is None:
        to_blocks: Callable[..., Iterator] = functools.partial(_arrow_blocks, manifest=manifest)
        schema, concat = "x binary, y binary", _concat_blocks
    else:
        to_blocks = functools.partial(_arrow_sparse_blocks, manifest=manifest)
        schema = "indptr binary, indices binary, values binary, y binary"
        concat = functools.partial(_concat_sparse_blocks, dimension=manifest.num_features)

    def split(shards: list[ShardEntry]) -> tuple[RDD, int, DataFrame | None]:
        frames = [read(s) for s in shards]
        rdd = spark.sparkContext.union(
            [df.mapInArrow(to_blocks, schema).rdd.mapPartitions(concat) for df in frames]
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


BLOCK_BYTES = 256 << 20
"""A cached block's size cap: PySpark pickles each RDD element with a 32-bit length, so a partition's rows go
as several blocks of at most this many bytes (a 10M-row shard in one block overflowed it)."""


def _grouped(rows: Iterable[Any], size: Callable[[Any], int]) -> Iterator[list[Any]]:
    """Consecutive runs of ``rows`` of at most BLOCK_BYTES (one row more if a single row is larger)."""
    group: list[Any] = []
    held = 0
    for r in rows:
        if group and held + size(r) > BLOCK_BYTES:
            yield group
            group, held = [], 0
        group.append(r)
        held += size(r)
    if group:
        yield group


def _concat_blocks(rows: Iterable[Any]) -> Iterator[Block]:
    for group in _grouped(rows, lambda r: len(r.x) + len(r.y)):
        parts = [(np.frombuffer(r.x, dtype=np.float64), np.frombuffer(r.y, dtype=np.int64)) for r in group]
        y = np.concatenate([p[1] for p in parts])
        yield np.concatenate([p[0] for p in parts]).reshape(len(y), -1), y


def _sparse_parts(batch: Any, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse-layout Arrow batch as CSR pieces: indptr int64 from 0, indices int32, values float64.

    Checked, vectorized, so that no kind reinterprets bad rows (CSR would sum a repeated index, MLlib refuses
    it): no nulls, as many values as indices per row, indices strictly ascending inside 0..dimension-1.
    """
    assert manifest.sparse is not None
    sp = manifest.sparse
    ind, val = batch.column(sp.indices_col), batch.column(sp.values_col)
    flat_i, flat_v = ind.flatten(), val.flatten()  # flatten honours a sliced batch's offsets
    where = f"{manifest.root_url}: the sparse layout's {sp.indices_col}/{sp.values_col}"
    fix = "the partition output is damaged or was not written by jobs/partition.py: re-run it"
    if ind.null_count or val.null_count or flat_i.null_count or flat_v.null_count:
        raise ManifestError(f"{where} hold a null; {fix}")
    offsets, value_offsets = ind.offsets.to_numpy(), val.offsets.to_numpy()
    indptr = (offsets - offsets[0]).astype(np.int64)
    if not np.array_equal(indptr, value_offsets - value_offsets[0]):
        raise ManifestError(f"{where}: a row has a different number of indices and values; {fix}")
    idx = flat_i.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    values = flat_v.to_numpy(zero_copy_only=False).astype(np.float64)
    if len(idx):
        bad = None
        if idx.min() < 0 or idx.max() >= sp.dimension:
            bad = int(np.flatnonzero((idx < 0) | (idx >= sp.dimension))[0])
            what = f"an index outside 0..{sp.dimension - 1} (the manifest's sparse.dimension)"
        else:
            rising = np.diff(idx) > 0  # entry j+1 vs entry j ...
            starts = indptr[1:-1]
            rising[starts[(starts > 0) & (starts < len(idx))] - 1] = True  # ... except across rows
            if not rising.all():
                bad = int(np.flatnonzero(~rising)[0]) + 1
                what = "indices that are not strictly ascending"
        if bad is not None:
            row = int(np.searchsorted(indptr, bad, side="right")) - 1
            key = batch.column(manifest.row_id_col)[row].as_py() if manifest.row_id_col in batch.schema.names else row
            raise ManifestError(f"{where}: row {manifest.row_id_col}={key} has {what}; {fix}")
    return indptr, idx, values


def _arrow_sparse_blocks(batches: Iterable[Any], manifest: Manifest) -> Iterator[Any]:
    """Sparse-layout Arrow batches -> one row of raw CSR pieces (int64 indptr, int32 indices, float64 values)
    and int64 labels per batch."""
    import pyarrow as pa

    for batch in batches:
        indptr, idx, values = _sparse_parts(batch, manifest)
        y = batch.column(manifest.label_col).to_numpy(zero_copy_only=False).astype(np.int64)
        cols = {"indptr": indptr, "indices": idx, "values": values, "y": y}
        yield pa.RecordBatch.from_pydict({k: [v.tobytes()] for k, v in cols.items()})


def _concat_sparse_blocks(rows: Iterable[Any], dimension: int) -> Iterator[Block]:
    """A partition's batches of CSR pieces -> scipy CSR arrays [n, dimension] and labels, at most BLOCK_BYTES each."""

    for group in _grouped(rows, lambda r: len(r.indptr) + len(r.indices) + len(r.values) + len(r.y)):
        yield _csr_block(group, dimension)


def _csr_block(rows: list[Any], dimension: int) -> Block:
    """Batches of raw CSR pieces -> one scipy CSR array [n, dimension] and its labels."""
    from scipy.sparse import csr_array

    y = np.concatenate([np.frombuffer(r.y, np.int64) for r in rows])
    counts = np.concatenate([np.diff(np.frombuffer(r.indptr, np.int64)) for r in rows])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    small = indptr[-1] < np.iinfo(np.int32).max  # int32 indices as long as the entries' count allows
    indptr = indptr.astype(np.int32 if small else np.int64)
    idx = np.concatenate([np.frombuffer(r.indices, np.int32) for r in rows]).astype(indptr.dtype, copy=False)
    values = np.concatenate([np.frombuffer(r.values, np.float64) for r in rows])
    return csr_array((values, idx, indptr), shape=(len(y), dimension)), y


def _arrow_sparse_vectors(batches: Iterable[Any], manifest: Manifest) -> Iterator[Any]:
    """Sparse-layout Arrow batches -> MLlib (features: SparseVector, label: double) batches, vectorized.

    The vector column is written as VectorUDT's storage struct (type 0 = sparse, size, indices, values);
    Spark's Arrow conversion maps a user-defined type to that struct on both sides (pyspark 3.5 and 4.0),
    and MLlib deserializes it into ``SparseVector(size, indices, values)``. A Python UDF returning
    ``SparseVector`` gives the same rows at several times the cost (a pickled object per row).
    """
    import pyarrow as pa

    assert manifest.sparse is not None
    for batch in batches:
        indptr, idx, values = _sparse_parts(batch, manifest)
        n, offsets = batch.num_rows, pa.array(indptr.astype(np.int32))  # a batch holds < 2^31 entries
        vectors = pa.StructArray.from_arrays(
            [
                pa.array(np.zeros(n, np.int8)),
                pa.array(np.full(n, manifest.sparse.dimension, np.int32)),
                pa.ListArray.from_arrays(offsets, pa.array(idx)),
                pa.ListArray.from_arrays(offsets, pa.array(values)),
            ],
            names=["type", "size", "indices", "values"],
        )
        label = batch.column(manifest.label_col).cast(pa.float64())
        yield pa.RecordBatch.from_arrays([vectors, label], names=["features", "label"])


def _vector_frame(frames: list[DataFrame], manifest: Manifest) -> DataFrame:
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType

    df = functools.reduce(DataFrame.unionAll, frames)
    if manifest.sparse is not None:
        schema = StructType([StructField("features", VectorUDT()), StructField("label", DoubleType())])
        return df.mapInArrow(functools.partial(_arrow_sparse_vectors, manifest=manifest), schema)
    label = F.col(manifest.label_col).cast("double").alias("label")
    if manifest.features_col is not None:
        return df.select(array_to_vector(F.col(manifest.features_col)).alias("features"), label)
    assembled = VectorAssembler(inputCols=manifest.feature_names, outputCol="features").transform(df)
    return assembled.select("features", label)


# ------------------------------------------------------------------------------- numpy on executors


def loss_grad(theta: np.ndarray, x: Any, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed log-loss and its gradient w.r.t. theta [k, d+1] (k = 1: logistic, else softmax); x is a
    numpy block or a scipy CSR one (then the weight gradient is the sparse product X^T r)."""
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
    grad_w = r.T @ x if isinstance(x, np.ndarray) else (x.T @ r).T
    return loss, np.hstack([grad_w, r.sum(axis=0)[:, None]])


def probabilities(theta: np.ndarray, x: Any) -> np.ndarray:
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
        if not isinstance(x, np.ndarray):
            theta, loss_sum = _local_sgd_sparse(theta, x, y, cfg, lr, rng)
            out[0] += loss_sum
            out[1] += len(y)
            continue
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


def _local_sgd_sparse(
    theta: np.ndarray, x: Any, y: np.ndarray, cfg: BaselineConfig, lr: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """_local_sgd_task's steps on a CSR block, each touching only its mini-batch's columns.

    The same steps as the dense loop (same row order, same update theta -= lr * (grad / n + reg * W)), but
    the weights are held as ``scale * v``: the L2 shrink of every weight, (1 - lr * reg), is one multiply of
    ``scale``, and the gradient, non-zero only on the batch's columns, updates those columns of ``v``.
    A step costs O(non-zeros of the batch), not O(dimension). Returns the new theta and the summed loss / epochs.
    """
    from scipy.sparse import csr_array

    v, bias, scale, loss_sum = theta[:, :-1].copy(), theta[:, -1].copy(), 1.0, 0.0
    shrink = 1.0 - lr * cfg.reg_param
    for _ in range(cfg.local_epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), cfg.local_batch_size):
            idx = order[start : start + cfg.local_batch_size]
            xb = x[idx]
            cols, local = np.unique(xb.indices, return_inverse=True)
            xc = csr_array((xb.data, local, xb.indptr), shape=(len(idx), len(cols)))
            loss, grad = loss_grad(np.hstack([scale * v[:, cols], bias[:, None]]), xc, y[idx])
            if shrink <= 0.0 or abs(scale * shrink) < 1e-100:  # fold the scale in (rare), not divide by ~0
                v *= scale * shrink
                scale = 1.0
            else:
                scale *= shrink
            v[:, cols] -= (lr / len(idx) / scale) * grad[:, :-1]
            bias -= (lr / len(idx)) * grad[:, -1]
            loss_sum += loss / cfg.local_epochs
    return np.hstack([scale * v, bias[:, None]]), loss_sum


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


# ------------------------------------------------------------------------------------- size limits

_JAVA_MAX_ARRAY = 2**31 - 1
"""Int.MaxValue: MLlib sizes its weight vector and the MLP's stacked blocks with Int arithmetic in Java arrays."""
_MLP_BLOCK_ROWS = 128
"""MultilayerPerceptronClassifier's blockSize (we keep the default): rows densified into one block per task."""
_LBFGS_PAIRS = 10
"""Correction pairs MLlib's L-BFGS keeps (LogisticRegression's and the MLP's optimizer alike), two
weight-sized vectors each, beside the weights and the gradient."""


def mllib_weights(manifest: Manifest, b: BaselineConfig, kind: str) -> int:
    """Number of parameters the MLlib kind fits on ``manifest``'s feature space."""
    if kind == "mllib_lr":
        return (1 if manifest.num_classes == 2 else manifest.num_classes) * (manifest.num_features + 1)
    layers = [manifest.num_features, *b.mlp_hidden_sizes, manifest.num_classes]
    return sum(n_in * n_out + n_out for n_in, n_out in zip(layers, layers[1:], strict=False))


def _memory_bytes(text: str | None) -> int | None:
    """A Spark memory setting (MiB without a unit, as spark.driver.memory) in bytes; None if unreadable."""
    match = re.fullmatch(r"(\d+)\s*([kmgtp]?b?)", (text or "").strip().lower())
    if match is None:
        return None
    unit = match[2]
    return int(match[1]) * (2**20 if unit == "" else 1 if unit == "b" else 1024 ** ("kmgtp".index(unit[0]) + 1))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(spark: SparkSession, manifest: Manifest, b: BaselineConfig, kind: str) -> None:
    """Refuse an MLlib kind that cannot run on ``manifest``'s feature space with this Spark's memory.

    Only certain failures are refused (lower bounds of what MLlib allocates, against the JVM heaps):
    the weights past Java's array limit, MLlib's L-BFGS state past spark.driver.memory, and for the MLP,
    which densifies its input, one block of 128 dense rows past Java's array limit or an executor's memory.
    The numpy kinds (gd, sgd, averaging) hold O(dimension) parameters and always run.
    """
    if not kind.startswith("mllib"):
        return
    conf, d = spark.sparkContext.getConf(), manifest.num_features
    weights = mllib_weights(manifest, b, kind)
    copies = 2 * min(_LBFGS_PAIRS, b.max_iterations - 1) + 2  # on the driver, at the least
    driver = _memory_bytes(conf.get("spark.driver.memory", "1g"))
    local = re.fullmatch(r"local(\[.*\])?", spark.sparkContext.master or "") is not None  # tasks in the driver
    executor = driver if local else _memory_bytes(conf.get("spark.executor.memory", "1g"))
    block = _MLP_BLOCK_ROWS * (d + manifest.num_classes)
    what = (
        f"the sparse feature space of dimension {d:,} (sparse.dimension of {manifest.root_url})"
        if manifest.sparse is not None
        else f"{d:,} features"
    )
    mlp = kind == "mllib_mlp"
    fit = f"fits {weights:,} coefficients"
    if mlp:
        fit = f"with baselines.mlp_hidden_sizes={b.mlp_hidden_sizes} fits {weights:,} weights"
    problem, memory_key, need = None, "", 0
    if weights > _JAVA_MAX_ARRAY:
        problem = f"{kind} on {what} {fit}, past Java's array limit of {_JAVA_MAX_ARRAY:,}"
    elif mlp and block > _JAVA_MAX_ARRAY:
        problem = (
            f"mllib_mlp densifies its input in blocks of {_MLP_BLOCK_ROWS} rows: on {what} one block has "
            f"{block:,} values, past Java's array limit of {_JAVA_MAX_ARRAY:,}"
        )
    elif driver is not None and copies * weights * 8 > driver:
        need, memory_key = copies * weights * 8, "spark.driver.memory"
        problem = (
            f"{kind} on {what} {fit} and MLlib's L-BFGS keeps at least "
            f"{copies} copies of them on the driver ({_gib(need)}), more than spark.driver.memory="
            f"{conf.get('spark.driver.memory', '1g')}"
        )
    elif mlp and executor is not None and (block + 2 * weights) * 8 > executor:
        need = (block + 2 * weights) * 8
        memory_key = "spark.driver.memory" if local else "spark.executor.memory"
        problem = (
            f"mllib_mlp densifies its input: on {what} a task holds a dense block of {_MLP_BLOCK_ROWS} rows, the "
            f"weights and their gradient ({_gib(need)}), more than {memory_key}={conf.get(memory_key, '1g')}"
        )
    if problem is None:
        return
    fixes = [f"drop {kind} from baselines.kinds"]
    if manifest.sparse is not None:
        fixes[0] += " (gd, sgd, averaging" + (" and mllib_lr" if mlp else "") + " train sparse)"
    if mlp and block <= _JAVA_MAX_ARRAY:  # the hidden sizes set the weights, not the block
        fixes.append("use smaller baselines.mlp_hidden_sizes")
    if manifest.sparse is not None:
        fixes.append("partition into a smaller feature space (data.dimension, data.hash_buckets)")
    if memory_key:
        fixes.append(f"raise {memory_key} to at least {_gib(need * 1.25)}")
    raise ConfigError(f"{problem}. Fix: {', or '.join(fixes)}")


# ------------------------------------------------------------------------------------------ running


def run_baselines(spark: SparkSession, cfg: JobConfig) -> list[BaselineResult]:
    """Run every kind in cfg.baselines.kinds on cfg.train.manifest_url's partition output, one MLflow run each."""
    manifest = read_manifest(cfg.train.manifest_url)  # a bad URL fails here, before any run or Spark job
    if manifest.num_classes == REGRESSION:
        raise ValueError(
            f"{manifest.root_url} holds regression data (real-valued labels); the baselines compare classifiers "
            "(log-loss to a target): run them on classification data, and train regression with train.model=linear"
        )
    for kind in cfg.baselines.kinds:  # before any run or Spark job, as a bad URL
        check_fits(spark, manifest, cfg.baselines, kind)
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
    check_fits(spark, data.manifest, cfg.baselines, kind)
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
