"""Synthetic classification or regression data with a known ground-truth model, generated on the executors.

Rows are generated in fixed blocks of BLOCK_ROWS by row_id, each block from its own RNG seeded with
(seed, block), so the data set is the same for a seed whatever the number of partitions or executors, and
nothing passes through the driver except the true model (features x classes numbers).

layout=criteo makes Criteo-like click data instead (CriteoTrueModel): 13 count-like numeric columns with
nulls and 26 Zipf-distributed categorical string columns whose cardinalities reach millions. Category
strings and weights are hashes of (column, value) and (seed, column, string), never tables, so the true
model stays small and a row's true probability can be recomputed from the row alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from sparkml_dist.config import ConfigError, GenerateConfig
from sparkml_dist.data.outputs import OutputKind, files_listed
from sparkml_dist.metrics import REGRESSION

BLOCK_ROWS = 4096
TRUTH_NAME = "_truth.json"
GENERATE_OUTPUT = OutputKind("generate", TRUTH_NAME, files_listed)
"""A generated data set is marked by its _truth.json, which also lists the data files (``files``)."""

log = logging.getLogger("sparkml_dist.synthetic")  # its pre-move name: logging configs keep working


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
    return _bisect_intercept(rng.normal(0.0, float(np.linalg.norm(w)), size=200_000), positive_fraction)


def _bisect_intercept(z: np.ndarray, positive_fraction: float) -> float:
    """Bisection for b with mean(sigmoid(z + b)) = positive_fraction over a sample z of bias-free logits."""
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
    if cfg.layout == "criteo":
        fields += [T.StructField(c, T.DoubleType(), True) for c in CRITEO_NUMERIC_COLS]
        fields += [T.StructField(c, T.StringType(), False) for c in CRITEO_CATEGORICAL_COLS]
    elif cfg.layout == "array":
        fields.append(T.StructField("features", T.ArrayType(T.FloatType(), False), False))
    else:
        fields += [T.StructField(f"f{i}", T.FloatType(), False) for i in range(cfg.features)]
    label_type = T.DoubleType() if cfg.task == "regression" else T.IntegerType()
    fields.append(T.StructField("label", label_type, False))
    return T.StructType(fields)


def generate(spark: SparkSession, cfg: GenerateConfig) -> tuple[DataFrame, TrueModel | CriteoTrueModel]:
    """A DataFrame of cfg.rows generated rows (lazy) and the model that generated them."""
    if cfg.layout == "criteo":
        return generate_criteo(spark, cfg)
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


# --- layout=criteo ----------------------------------------------------------------------------------------

CRITEO_NUMERIC = 13
CRITEO_CATEGORICAL = 26
CRITEO_NUMERIC_COLS = tuple(f"i{j + 1}" for j in range(CRITEO_NUMERIC))
CRITEO_CATEGORICAL_COLS = tuple(f"c{j + 1}" for j in range(CRITEO_CATEGORICAL))
CRITEO_CARDINALITIES = tuple(int(round(c)) for c in np.geomspace(10, 10_000_000, CRITEO_CATEGORICAL))
"""Cardinalities of c1..c26 before generate.max_cardinality caps them: log-spaced from 10 to 10M."""
CRITEO_NUM_MU = tuple(round(float(m), 3) for m in np.linspace(0.0, 6.0, CRITEO_NUMERIC))
CRITEO_NUM_SIGMA = tuple(round(float(s), 3) for s in np.linspace(0.8, 1.6, CRITEO_NUMERIC))
"""i_j = floor(exp(N(mu_j, sigma_j^2))): counts from mostly-0 (i1) to thousands (i13)."""
ZIPF_HEAD = 1 << 10
"""Ranks sampled by an exact inverse CDF table; beyond them, by the continuous power law (see _zipf_indices)."""
_BIAS_SAMPLE_ROWS = 1 << 17
_TOKEN_SALT = 0x746F6B656E
_WEIGHT_SALT = 0x776569676874
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)


@dataclass(frozen=True)
class CriteoTrueModel:
    """The generating model of layout=criteo (binary): logit = bias + sum_j w_num[j] * log1p(i_j) (a null i_j
    adds 0) + sum_c category_weight(seed, c, token of c) * cat_scale; P(label = 1) = sigmoid(logit), then label
    noise as in TrueModel. Everything needed to recompute a row's probability from the row is here."""

    w_num: list[float]
    """Weights of log1p(i1..i13)."""
    bias: float
    """Intercept, set so that the share of label 1 (before noise) is generate.positive_fraction."""
    seed: int
    """Keys the category weights: category_weight(seed, column, token) is a hash-seeded N(0, 1) draw."""
    cat_scale: float
    """Scale of the category weights: weight_scale / sqrt(26)."""
    cardinalities: list[int]
    """Number of distinct values of c1..c26 (before 32-bit token collisions, ~n^2/2^33 of them)."""
    zipf_exponent: float
    null_fraction: float
    num_mu: list[float]
    num_sigma: list[float]
    label_noise: float
    classes: int = 2
    layout: str = "criteo"

    def logits(self, num: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Noise-free logit of label 1: num float [rows, 13] (NaN = null), tokens uint32 [rows, 26]."""
        x = np.log1p(num.astype(np.float64))
        logit = np.where(np.isnan(x), 0.0, x) @ np.asarray(self.w_num) + self.bias
        for c in range(tokens.shape[1]):
            logit += category_weights(self.seed, c, tokens[:, c], self.cat_scale)
        return logit

    def probabilities(self, df: pd.DataFrame) -> np.ndarray:
        """P(label = c | row) of the generating process, noise included: rows x 2, for rows with columns
        i1..i13 and c1..c26 as generated (other columns are ignored)."""
        num = df[list(CRITEO_NUMERIC_COLS)].to_numpy(dtype=np.float64, na_value=np.nan)
        tokens = np.stack([parse_tokens(df[c]) for c in CRITEO_CATEGORICAL_COLS], axis=1)
        p1 = _sigmoid(self.logits(num, tokens))
        probs = np.stack([1.0 - p1, p1], axis=1)
        return (1.0 - self.label_noise) * probs + self.label_noise / self.classes

    def log_loss(self, df: pd.DataFrame, y: np.ndarray) -> float:
        """Mean negative log-likelihood of labels y under the true model (the best any model can do)."""
        p = self.probabilities(df)[np.arange(len(y)), np.asarray(y).astype(np.int64)]
        return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CriteoTrueModel:
        raw = json.loads(text)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wrapping arithmetic): a bijection that scrambles every bit."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_key(*parts: int) -> np.ndarray:
    """A uint64 [1] key chained from integers (any sign)."""
    h = np.zeros(1, dtype=np.uint64)
    for part in parts:
        h = _mix64(h ^ np.uint64(part % 2**64))
    return h


def category_tokens(column: int, index: np.ndarray) -> np.ndarray:
    """uint32 token of value index (0 = the most frequent) of categorical column (0 for c1): the same for every
    seed, so one category has one string everywhere."""
    return (_mix64(_hash_key(_TOKEN_SALT, column) ^ index.astype(np.uint64)) >> np.uint64(32)).astype(np.uint32)


def category_weights(seed: int, column: int, tokens: np.ndarray, scale: float) -> np.ndarray:
    """scale * N(0, 1) draw keyed by (seed, column, token): Box-Muller on two hashed uniforms, no table."""
    h = _mix64(_hash_key(_WEIGHT_SALT, seed, column) ^ tokens.astype(np.uint64))
    u1 = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    u2 = (_mix64(h) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def token_strings(tokens: np.ndarray) -> pd.Series:
    """uint32 tokens as 8 lower-case hex chars, an Arrow-backed string Series built without Python strings."""
    chars = np.ascontiguousarray(_HEX[(tokens.astype(np.uint32)[:, None] >> _NIBBLE_SHIFTS) & np.uint32(0xF)])
    n = len(tokens)
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)
    array = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))
    return pd.Series(pd.arrays.ArrowExtensionArray(array))


def parse_tokens(values: pd.Series | np.ndarray) -> np.ndarray:
    """Inverse of token_strings: 8-hex-char strings to uint32 tokens."""
    objects = np.asarray(values, dtype=object)
    chars = objects.astype("S9").view(np.uint8).reshape(-1, 9).astype(np.int16)
    digits = np.where(chars >= ord("a"), chars - (ord("a") - 10), chars - ord("0"))[:, :8]
    bad = ((digits < 0) | (digits > 15)).any(axis=1) | (chars[:, 8] != 0)
    if bad.any():
        raise ConfigError(f"{objects[np.argmax(bad)]!r} is not a generated category (8 lower-case hex chars)")
    return np.bitwise_or.reduce(digits.astype(np.uint32) << _NIBBLE_SHIFTS, axis=1)


@dataclass(frozen=True)
class _ZipfTable:
    head_cdf: np.ndarray
    """P(index <= i) for i < min(cardinality, ZIPF_HEAD); its last value is the head's mass (1 without tail)."""
    cardinality: int
    exponent: float


@functools.lru_cache(maxsize=4)
def _zipf_tables(cardinalities: tuple[int, ...], exponent: float) -> tuple[_ZipfTable, ...]:
    """Per column: P(rank k) = k^-s / Z over k = 1..n. Z sums the head exactly and integrates the tail
    (ranks > ZIPF_HEAD) as x^-s over [ZIPF_HEAD + 1/2, n + 1/2), the midpoint rule for each rank."""
    tables = []
    for n in cardinalities:
        head = min(n, ZIPF_HEAD)
        p = np.arange(1, head + 1, dtype=np.float64) ** -exponent
        s1 = 1.0 - exponent
        tail = ((n + 0.5) ** s1 - (head + 0.5) ** s1) / s1 if n > head else 0.0
        cdf = np.cumsum(p) / (p.sum() + tail)
        if n == head:
            cdf /= cdf[-1]
        tables.append(_ZipfTable(cdf, n, exponent))
    return tuple(tables)


def _zipf_indices(table: _ZipfTable, u: np.ndarray) -> np.ndarray:
    """Value indices (rank - 1) for uniforms u, rejection-free: the exact inverse CDF over the head table,
    and in the tail the inverse CDF of the truncated power law x^-s on [head + 1/2, n + 1/2) rounded to the
    nearest rank (each rank's probability is then off by a relative s(s+1)/(24 k^2): < 1e-7 at s = 1.1,
    k > 1024). The small head table stays in cache, which makes this several times faster than a big one."""
    head = len(table.head_cdf)
    idx = np.minimum(np.searchsorted(table.head_cdf, u, side="right"), head - 1)
    mass = table.head_cdf[-1]
    in_tail = u >= mass
    if table.cardinality > head and in_tail.any():
        s1 = 1.0 - table.exponent
        a, b = (head + 0.5) ** s1, (table.cardinality + 0.5) ** s1
        v = (u[in_tail] - mass) / (1.0 - mass)
        x = (a + v * (b - a)) ** (1.0 / s1)
        idx[in_tail] = np.clip(np.rint(x), head + 1, table.cardinality).astype(np.int64) - 1
    return idx


def _criteo_features(
    truth: CriteoTrueModel, tables: tuple[_ZipfTable, ...], rng: np.random.Generator, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Numeric columns float64 [rows, 13] (NaN = null) and category tokens uint32 [rows, 26]. The draws are
    the same whatever null_fraction, so it only masks."""
    z = rng.standard_normal((rows, CRITEO_NUMERIC))
    num = np.floor(np.exp(np.asarray(truth.num_mu) + np.asarray(truth.num_sigma) * z))
    num[rng.random((rows, CRITEO_NUMERIC)) < truth.null_fraction] = np.nan
    u = rng.random((rows, CRITEO_CATEGORICAL))
    tokens = np.empty((rows, CRITEO_CATEGORICAL), dtype=np.uint32)
    for c, table in enumerate(tables):
        tokens[:, c] = category_tokens(c, _zipf_indices(table, u[:, c]))
    return num, tokens


def make_criteo_true_model(cfg: GenerateConfig) -> CriteoTrueModel:
    """Numeric weights N(0, weight_scale^2 / 13); the intercept by bisection on a private sample of rows (a
    separate RNG stream, not the data's blocks) for the share of label 1 to be positive_fraction."""
    rng = np.random.default_rng([cfg.seed, 0xC0FFEE])
    truth = CriteoTrueModel(
        w_num=rng.normal(0.0, cfg.weight_scale / np.sqrt(CRITEO_NUMERIC), size=CRITEO_NUMERIC).tolist(),
        bias=0.0,
        seed=cfg.seed,
        cat_scale=float(cfg.weight_scale / np.sqrt(CRITEO_CATEGORICAL)),
        cardinalities=[min(c, cfg.max_cardinality) for c in CRITEO_CARDINALITIES],
        zipf_exponent=cfg.zipf_exponent,
        null_fraction=cfg.null_fraction,
        num_mu=list(CRITEO_NUM_MU),
        num_sigma=list(CRITEO_NUM_SIGMA),
        label_noise=cfg.label_noise,
    )
    tables = _zipf_tables(tuple(truth.cardinalities), truth.zipf_exponent)
    num, tokens = _criteo_features(truth, tables, rng, _BIAS_SAMPLE_ROWS)
    return dataclasses.replace(truth, bias=_bisect_intercept(truth.logits(num, tokens), cfg.positive_fraction))


def criteo_block(
    cfg: GenerateConfig, truth: CriteoTrueModel, tables: tuple[_ZipfTable, ...], block: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numerics, tokens and labels (int32) of rows [block, block + 1) * BLOCK_ROWS."""
    rng = np.random.default_rng([cfg.seed, block])
    num, tokens = _criteo_features(truth, tables, rng, BLOCK_ROWS)
    y = rng.random(BLOCK_ROWS) < _sigmoid(truth.logits(num, tokens))
    noisy = rng.random(BLOCK_ROWS) < truth.label_noise
    y = np.where(noisy, rng.integers(0, 2, size=BLOCK_ROWS), y)
    return num, tokens, y.astype(np.int32)


def _criteo_fill(
    cfg: GenerateConfig, truth: CriteoTrueModel
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def fill(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tables = _zipf_tables(tuple(truth.cardinalities), truth.zipf_exponent)
        kept: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # the block shared with the next batch
        for batch in batches:
            row_ids = batch["id"].to_numpy()
            if len(row_ids) == 0:
                continue
            first, last = int(row_ids.min()) // BLOCK_ROWS, int(row_ids.max()) // BLOCK_ROWS
            blocks = [kept.get(b) or criteo_block(cfg, truth, tables, b) for b in range(first, last + 1)]
            kept = {last: blocks[-1]}
            offset = row_ids - first * BLOCK_ROWS
            num, tokens, y = (np.concatenate(part)[offset] for part in zip(*blocks, strict=True))
            out: dict[str, np.ndarray | pd.Series] = {"row_id": row_ids}
            out.update({name: num[:, j] for j, name in enumerate(CRITEO_NUMERIC_COLS)})
            out.update({name: token_strings(tokens[:, c]) for c, name in enumerate(CRITEO_CATEGORICAL_COLS)})
            out["label"] = y
            yield pd.DataFrame(out)

    return fill


def generate_criteo(spark: SparkSession, cfg: GenerateConfig) -> tuple[DataFrame, CriteoTrueModel]:
    """layout=criteo: a DataFrame of cfg.rows rows (lazy) and the model that generated them."""
    truth = make_criteo_true_model(cfg)
    log.info(
        "criteo truth: bias %.4f, cardinalities %s..%s, zipf %.3g, null fraction %.3g",
        truth.bias,
        truth.cardinalities[0],
        truth.cardinalities[-1],
        truth.zipf_exponent,
        truth.null_fraction,
    )
    ids = spark.range(0, cfg.rows, numPartitions=cfg.partitions)
    df = ids.mapInPandas(_criteo_fill(cfg, truth), schema=output_schema(cfg))  # type: ignore[arg-type]
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

    from sparkml_dist.data.outputs import check_output
    from sparkml_dist.data.storage import WRITE_CHECKSUMS, HadoopFS, atomic_output

    started = time.monotonic()
    out = cfg.output_url.rstrip("/")
    check_output(HadoopFS(spark, out), out, GENERATE_OUTPUT, "generate.output_url", {})
    df, truth = generate(spark, cfg)
    features = CRITEO_NUMERIC + CRITEO_CATEGORICAL if cfg.layout == "criteo" else cfg.features
    spark.sparkContext.setJobDescription(f"generate: {cfg.rows} rows x {features} features")
    with atomic_output(spark, out, GENERATE_OUTPUT, "generate.output_url", {}) as tmp:
        df.write.mode("errorifexists").options(**WRITE_CHECKSUMS).parquet(tmp)
        fs = HadoopFS(spark, tmp)
        marker = {**asdict(truth), "files": [p for p, _, _ in fs.list_files(tmp)]}
        fs.write_text(f"{tmp}/{TRUTH_NAME}", json.dumps(marker))
    return GenerateResult(
        out, cfg.rows, features, truth.classes, f"{out}/{TRUTH_NAME}", round(time.monotonic() - started, 3)
    )


def _read_truth_text(spark: SparkSession, data_url: str) -> tuple[str, str]:
    from sparkml_dist.data.storage import HadoopFS

    url = f"{data_url.rstrip('/')}/{TRUTH_NAME}"
    text = HadoopFS(spark, url).read_text(url)
    return text, json.loads(text).get("layout", "dense")


def read_truth(spark: SparkSession, data_url: str) -> TrueModel:
    """The true model of a dense (layout=array or columns) data set."""
    text, layout = _read_truth_text(spark, data_url)
    if layout == "criteo":
        raise ConfigError(f"{data_url} was generated with layout=criteo: read its truth with read_criteo_truth")
    return TrueModel.from_json(text)


def read_criteo_truth(spark: SparkSession, data_url: str) -> CriteoTrueModel:
    """The true model of a layout=criteo data set."""
    text, layout = _read_truth_text(spark, data_url)
    if layout != "criteo":
        raise ConfigError(f"{data_url} was not generated with layout=criteo: read its truth with read_truth")
    return CriteoTrueModel.from_json(text)
