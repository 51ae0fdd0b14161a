"""Synthetic classification or regression data with a known ground-truth model, generated on the executors.

Rows are generated in fixed blocks of BLOCK_ROWS by row_id, each block from its own RNG seeded with
(seed, block), so the data set is the same for a seed whatever the number of partitions or executors, and
nothing passes through the driver except the true model (features x classes numbers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from sparkml_dist.config import GenerateConfig
from sparkml_dist.metrics import REGRESSION
from sparkml_dist.outputs import OutputKind, files_listed

BLOCK_ROWS = 4096
TRUTH_NAME = "_truth.json"
GENERATE_OUTPUT = OutputKind("generate", TRUTH_NAME, files_listed)
"""A generated data set is marked by its _truth.json, which also lists the data files (``files``)."""


@dataclass(frozen=True)
class TrueModel:
    """The generating model: logits = x @ weights.T + bias, then label noise; for regression
    (classes == 0) label = x @ weights.T + bias + N(0, noise_std^2)."""

    weights: list[list[float]]
    """classes x features for multi-class; 1 x features for binary (the logit of class 1) and regression."""
    bias: list[float]
    classes: int
    """0 for regression (metrics.REGRESSION)."""
    label_noise: float
    noise_std: float = 0.0
    """regression only: standard deviation of the label noise."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Regression: the noise-free label x @ w + b, float64 [rows]."""
        w = np.asarray(self.weights, dtype=np.float64)
        return (x.astype(np.float64) @ w.T + np.asarray(self.bias))[:, 0]

    def best_mse(self) -> float:
        """Regression: the expected squared error of the true model (the noise variance), the best any model does."""
        return float(self.noise_std**2)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """P(label = c | x) of the generating process, noise included: rows x classes."""
        w = np.asarray(self.weights, dtype=np.float64)
        logits = x.astype(np.float64) @ w.T + np.asarray(self.bias)
        if self.classes == 2:
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            probs = np.stack([1.0 - p1, p1], axis=1)
        else:
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probs = e / e.sum(axis=1, keepdims=True)
        return (1.0 - self.label_noise) * probs + self.label_noise / self.classes

    def log_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean negative log-likelihood of labels y under the true model (the best any model can do)."""
        p = self.probabilities(x)[np.arange(len(y)), y.astype(np.int64)]
        return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrueModel:
        raw = json.loads(text)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def make_true_model(cfg: GenerateConfig) -> TrueModel:
    rng = np.random.default_rng([cfg.seed, 0xC0FFEE])
    if cfg.task == "regression":
        weights = rng.normal(0.0, cfg.weight_scale, size=(1, cfg.features))
        return TrueModel(weights.tolist(), [float(rng.normal(0.0, 1.0))], REGRESSION, 0.0, cfg.noise_std)
    k = 1 if cfg.classes == 2 else cfg.classes
    weights = rng.normal(0.0, cfg.weight_scale, size=(k, cfg.features))
    if cfg.classes == 2:
        bias = [_intercept_for_balance(weights[0], cfg.positive_fraction, rng)]
    else:
        bias = [0.0] * k
    return TrueModel(weights.tolist(), bias, cfg.classes, cfg.label_noise)


def _intercept_for_balance(w: np.ndarray, positive_fraction: float, rng: np.random.Generator) -> float:
    """Bisection for b with E[sigmoid(x.w + b)] = positive_fraction, x ~ N(0, I)."""
    z = rng.normal(0.0, float(np.linalg.norm(w)), size=200_000)
    lo, hi = -50.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < positive_fraction:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def generate_block(cfg: GenerateConfig, truth: TrueModel, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and labels (int32; float64 for regression) of rows [block, block + 1) * BLOCK_ROWS."""
    rng = np.random.default_rng([cfg.seed, block])
    x = rng.standard_normal(size=(BLOCK_ROWS, cfg.features), dtype=np.float32)
    if truth.classes == REGRESSION:
        return x, truth.predict(x) + truth.noise_std * rng.standard_normal(BLOCK_ROWS)
    # Labels from the clean model, then noise: P(y) = (1-noise)*p + noise/classes, as TrueModel says.
    clean = TrueModel(truth.weights, truth.bias, truth.classes, 0.0).probabilities(x)
    u = rng.random(BLOCK_ROWS)
    y = (u[:, None] > np.cumsum(clean, axis=1)).sum(axis=1)
    noisy = rng.random(BLOCK_ROWS) < cfg.label_noise
    y = np.where(noisy, rng.integers(0, cfg.classes, size=BLOCK_ROWS), y)
    return x, np.minimum(y, cfg.classes - 1).astype(np.int32)


def output_schema(cfg: GenerateConfig) -> T.StructType:
    fields = [T.StructField("row_id", T.LongType(), False)]
    if cfg.layout == "array":
        fields.append(T.StructField("features", T.ArrayType(T.FloatType(), False), False))
    else:
        fields += [T.StructField(f"f{i}", T.FloatType(), False) for i in range(cfg.features)]
    label_type = T.DoubleType() if cfg.task == "regression" else T.IntegerType()
    fields.append(T.StructField("label", label_type, False))
    return T.StructType(fields)


def generate(spark: SparkSession, cfg: GenerateConfig) -> tuple[DataFrame, TrueModel]:
    """A DataFrame of cfg.rows generated rows (lazy) and the model that generated them."""
    truth = make_true_model(cfg)
    ids = spark.range(0, cfg.rows, numPartitions=cfg.partitions)

    def fill(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            row_ids = batch["id"].to_numpy()
            if len(row_ids) == 0:
                continue
            first, last = int(row_ids.min()) // BLOCK_ROWS, int(row_ids.max()) // BLOCK_ROWS
            xs, ys = zip(*(generate_block(cfg, truth, b) for b in range(first, last + 1)), strict=True)
            offset = row_ids - first * BLOCK_ROWS
            x, y = np.concatenate(xs)[offset], np.concatenate(ys)[offset]
            out = {"row_id": row_ids}
            if cfg.layout == "array":
                out["features"] = list(x)
            else:
                out.update({f"f{i}": x[:, i] for i in range(cfg.features)})
            out["label"] = y
            yield pd.DataFrame(out)

    df = ids.mapInPandas(fill, schema=output_schema(cfg))  # type: ignore[arg-type]
    return df, truth


@dataclass(frozen=True)
class GenerateResult:
    output_url: str
    rows: int
    features: int
    classes: int
    truth_url: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def write_dataset(spark: SparkSession, cfg: GenerateConfig) -> GenerateResult:
    """Generate and publish the data set atomically, with the true model in ``_truth.json`` beside it."""
    import time

    from sparkml_dist.outputs import check_output
    from sparkml_dist.storage import WRITE_CHECKSUMS, HadoopFS, atomic_output

    started = time.monotonic()
    out = cfg.output_url.rstrip("/")
    check_output(HadoopFS(spark, out), out, GENERATE_OUTPUT, "generate.output_url", {})
    df, truth = generate(spark, cfg)
    spark.sparkContext.setJobDescription(f"generate: {cfg.rows} rows x {cfg.features} features")
    with atomic_output(spark, out, GENERATE_OUTPUT, "generate.output_url", {}) as tmp:
        df.write.mode("errorifexists").options(**WRITE_CHECKSUMS).parquet(tmp)
        fs = HadoopFS(spark, tmp)
        marker = {**asdict(truth), "files": [p for p, _, _ in fs.list_files(tmp)]}
        fs.write_text(f"{tmp}/{TRUTH_NAME}", json.dumps(marker))
    return GenerateResult(
        out, cfg.rows, cfg.features, truth.classes, f"{out}/{TRUTH_NAME}", round(time.monotonic() - started, 3)
    )


def read_truth(spark: SparkSession, data_url: str) -> TrueModel:
    from sparkml_dist.storage import HadoopFS

    url = f"{data_url.rstrip('/')}/{TRUTH_NAME}"
    return TrueModel.from_json(HadoopFS(spark, url).read_text(url))
