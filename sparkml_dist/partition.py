"""DataFrame -> sample shards, validation split and feature groups, described by one manifest.

Scales the way Spark scales: no collect() of data, no single-partition sort or window. The permutation
for shuffle-split is "random bucket, then random order inside the bucket": every row gets a seeded
64-bit hash key; bucket = key mod B. One cheap pass counts rows per bucket (only the row id and label
are read); the main pass shuffles rows to their bucket's partition, sorts each partition by (bucket,
key), and the row's index in its sorted partition plus per-bucket offsets gives its global position in
the permutation. Position -> validation (the first n_val) or shard (t mod K), so
shard sizes differ by at most one row.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from pyspark import StorageLevel
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkml_dist.config import DataConfig, JobConfig, PartitionConfig
from sparkml_dist.errors import UserError
from sparkml_dist.manifest import (
    MANIFEST_NAME,
    FeatureGroup,
    FileEntry,
    Manifest,
    ManifestError,
    ShardEntry,
)
from sparkml_dist.metrics import REGRESSION
from sparkml_dist.storage import HadoopFS, atomic_output

SHARD_COL = "shard"
FEATURES_COL = "features"
BUCKET_BYTES = 256 * 1024 * 1024
_KEY, _BUCKET, _POS = "_key", "_bucket", "_pos"
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)
_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)


class PartitionError(UserError):
    """The input or the settings cannot be partitioned; the message names the value and the fix."""


@dataclass(frozen=True)
class PartitionResult:
    manifest_url: str
    mode: str
    input_rows: int
    train_rows: list[int]
    validation_rows: int
    dropped_rows: int
    feature_groups: int
    skipped: bool
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class _Input:
    df: DataFrame
    """row_id, features (array<float>), label (int; double for regression), valid flag."""
    feature_names: list[str]
    fingerprint: str
    input_bytes: int


def partition(spark: SparkSession, cfg: JobConfig) -> PartitionResult:
    """Run the partition job described by ``cfg.data`` and ``cfg.partition``; publish atomically."""
    started = time.monotonic()
    pcfg, dcfg = cfg.partition, cfg.data
    out_url = pcfg.output_url.rstrip("/")
    fs = HadoopFS(spark, out_url)
    if fs.exists(out_url) and fs.is_file(out_url):
        raise PartitionError(f"partition.output_url {out_url} is a file: remove it or choose a directory")
    inp = _read_input(spark, dcfg)
    settings = {"data": asdict(dcfg), "partition": asdict(pcfg)}
    settings["partition"].pop("output_url")
    existing = _existing_manifest(fs, out_url)
    if existing and existing.input_fingerprint == inp.fingerprint and existing.config == settings:
        return _result(existing, skipped=True, started=started)

    keyed = inp.df.withColumn(_KEY, F.xxhash64(F.col("row_id"), F.lit(pcfg.seed)))
    spark.sparkContext.setJobDescription("partition: count rows per bucket and check labels")
    if pcfg.mode == "shuffle_split":
        assigned, stats = _shuffle_split(keyed, dcfg, pcfg, inp.input_bytes)
    else:
        assigned, stats = _random_sample(keyed, dcfg, pcfg)

    groups = _feature_groups(inp.feature_names, pcfg)
    if groups:
        assigned = assigned.persist(StorageLevel.MEMORY_AND_DISK)
    block_bytes = str(int(pcfg.row_group_mb * 1024 * 1024))
    try:
        with atomic_output(spark, out_url) as tmp:
            spark.sparkContext.setJobDescription(f"partition: write {pcfg.num_shards} shards + validation")
            _write(_layout(assigned, inp.feature_names, None, pcfg), f"{tmp}/train", block_bytes, pcfg.num_shards)
            if fs.exists(f"{tmp}/train/{SHARD_COL}=-1"):
                fs.rename(f"{tmp}/train/{SHARD_COL}=-1", f"{tmp}/validation")
            else:  # validation_fraction 0 (or tiny data): an empty split, still a directory
                fs.mkdirs(f"{tmp}/validation")
            for g, names in enumerate(groups):
                spark.sparkContext.setJobDescription(f"partition: write feature group {g}")
                sub = _layout(assigned, inp.feature_names, names, pcfg).filter(F.col(SHARD_COL) >= 0)
                _write(sub, f"{tmp}/features/group={g}", block_bytes, pcfg.num_shards)
            manifest = _build_manifest(
                fs, tmp, out_url, inp, groups, stats["input_rows"], stats["dropped_rows"], settings, cfg
            )
            _check_row_groups(manifest, pcfg)
            fs.write_text(f"{tmp}/{MANIFEST_NAME}", manifest.to_json())
    except Exception as exc:
        raise _clean_error(exc) from exc
    finally:
        if groups:
            assigned.unpersist()
    return _result(manifest, skipped=False, started=started)


# ------------------------------------------------------------------------------------------- reading


def _read_input(spark: SparkSession, dcfg: DataConfig) -> _Input:
    fs = HadoopFS(spark, dcfg.input_url)
    if not fs.exists(dcfg.input_url):
        raise PartitionError(f"data.input_url {dcfg.input_url} does not exist (run jobs/generate.py, or fix the path)")
    files = fs.list_files(dcfg.input_url, suffix=".parquet")
    if not files:
        raise PartitionError(f"data.input_url {dcfg.input_url} holds no .parquet files: the input is empty")
    _check_input_files(dcfg.input_url, [p for p, _, _ in files])
    try:
        df = spark.read.parquet(dcfg.input_url)
    except AnalysisException as exc:
        raise PartitionError(f"cannot read Parquet at data.input_url {dcfg.input_url}: {exc}") from exc
    fields = {f.name: f.dataType for f in df.schema.fields}
    if dcfg.label_col not in fields:
        raise PartitionError(
            f"label column data.label_col={dcfg.label_col!r} is not in the input; columns: {sorted(fields)}"
        )
    label_type = fields[dcfg.label_col]
    regression = dcfg.task == "regression"
    if regression and not isinstance(label_type, _NUMERIC):
        raise PartitionError(
            f"label column {dcfg.label_col!r} has type {label_type.simpleString()}; data.task=regression needs "
            "a numeric label"
        )
    if not regression and not isinstance(label_type, _INTEGRAL):
        hint = " (real-valued labels: set data.task=regression)" if isinstance(label_type, _NUMERIC) else ""
        raise PartitionError(
            f"label column {dcfg.label_col!r} has type {label_type.simpleString()}; "
            f"it must hold integer class ids 0..num_classes-1{hint}"
        )
    features, names = feature_expr(df, fields, dcfg)
    row_id = F.col(dcfg.row_id_col).cast("long") if dcfg.row_id_col in fields else F.monotonically_increasing_id()
    label = F.col(dcfg.label_col).cast("double" if regression else "int")
    # Built-in array functions (code-generated), not a per-element lambda: NaN sorts above every number
    # in Spark, so a NaN shows as the array's max; array_contains is null, not false, when the array
    # holds a null and no match (and NaN, the value looked for, is caught by the max).
    hi, lo = F.array_max(features), F.array_min(features)
    finite_label = (~F.isnan(label) & (F.abs(label) != F.lit(float("inf")))) if regression else F.lit(True)
    valid = (
        label.isNotNull()
        & finite_label
        & (F.size(features) == F.lit(len(names)))
        & F.array_contains(features, F.lit(float("nan"))).isNotNull()
        & ~F.isnan(hi)
        & (hi != F.lit(float("inf")))
        & (lo != F.lit(float("-inf")))
    )
    out = df.select(row_id.alias("row_id"), features.alias(FEATURES_COL), label.alias("label"), valid.alias("_valid"))
    body = json.dumps([dcfg.input_url, files])
    return _Input(out, names, hashlib.sha256(body.encode()).hexdigest()[:16], sum(f[1] for f in files))


def _check_input_files(input_url: str, paths: list[str]) -> None:
    """Read every input file's footer (in parallel, no data): a corrupt or truncated file, or one whose
    columns differ from the first file's (schema drift), is named before any Spark job starts."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(input_url.rstrip("/"))

    def columns(path: str) -> list[tuple[str, str]] | str:
        try:
            with filesystem.open_input_file(f"{root}/{path}") as f:
                return [(c.name, str(c.type)) for c in pq.ParquetFile(f).schema_arrow]
        except Exception as exc:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError ...: all mean unreadable)
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(columns, paths))
    for path, cols in zip(paths, found, strict=True):
        if isinstance(cols, str):
            raise PartitionError(
                f"input file {input_url.rstrip('/')}/{path} is not a readable Parquet file ({cols[:300]}): "
                "rewrite it or move it out of data.input_url"
            )
    first = found[0]
    for path, cols in zip(paths, found, strict=True):
        if cols != first:
            a, b = dict(first), dict(cols)  # type: ignore[arg-type]
            diff = sorted(
                f"{n}: {a.get(n, 'missing')} vs {b.get(n, 'missing')}" for n in set(a) | set(b) if a.get(n) != b.get(n)
            )
            raise PartitionError(
                f"schema drift in data.input_url: {path} differs from {paths[0]} ({'; '.join(diff)}): rewrite "
                "it with the same columns and types, or move it out of data.input_url"
            )


def feature_expr(df: DataFrame, fields: dict[str, T.DataType], dcfg: DataConfig) -> tuple[Column, list[str]]:
    """The features as one array<float> expression and their names, picked as ``data.features_col`` /
    ``data.feature_cols`` say (the partition job and the scoring job both use it, so a model sees the
    order it was trained on). Raises PartitionError naming a missing or non-numeric column."""
    if dcfg.features_col is not None or (
        dcfg.feature_cols is None and isinstance(fields.get(FEATURES_COL), T.ArrayType)
    ):
        name = dcfg.features_col or FEATURES_COL
        if name not in fields:
            raise PartitionError(
                f"features column data.features_col={name!r} is not in the input; columns: {sorted(fields)}"
            )
        dtype = fields[name]
        if not (isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, _NUMERIC)):
            raise PartitionError(
                f"features column {name!r} has type {dtype.simpleString()}; it must be an array of numbers"
            )
        first = df.select(F.size(name).alias("n")).where(F.col("n") > 0).first()
        if first is None:
            raise PartitionError(f"data.input_url {dcfg.input_url} has no rows: the input is empty")
        return F.col(name).cast("array<float>"), [f"{name}_{i}" for i in range(first["n"])]
    names = dcfg.feature_cols or [
        n for n, t in fields.items() if isinstance(t, _NUMERIC) and n not in (dcfg.label_col, dcfg.row_id_col)
    ]
    missing = [n for n in names if n not in fields]
    if missing:
        raise PartitionError(
            f"feature column(s) {missing} from data.feature_cols are not in the input; columns: {sorted(fields)}"
        )
    bad = [f"{n} ({fields[n].simpleString()})" for n in names if not isinstance(fields[n], _NUMERIC)]
    if bad:
        raise PartitionError(f"feature column(s) {bad} are not numeric: drop them from data.feature_cols or cast them")
    if not names:
        raise PartitionError("the input has no numeric feature columns: set data.feature_cols or data.features_col")
    return F.array(*[F.col(n).cast("float") for n in names]), names


# --------------------------------------------------------------------------------------- assignment


def _checked_counts(keyed: DataFrame, dcfg: DataConfig, by_bucket: int) -> tuple[dict[int, int], dict[str, int]]:
    """One pass over row_id, label (and, to drop invalid rows, the features): rows per bucket + checks."""
    df = keyed
    if dcfg.invalid_values == "drop":
        df = df.filter(F.col("_valid"))
    agg = (
        df.groupBy(_bucket_of(by_bucket).alias(_BUCKET))
        .agg(F.count(F.lit(1)).alias("n"), F.min("label").alias("lo"), F.max("label").alias("hi"))
        .collect()
    )
    counts = {int(r[_BUCKET]): int(r["n"]) for r in agg}
    total = sum(counts.values())
    labels = [(r["lo"], r["hi"]) for r in agg if r["lo"] is not None]
    if labels and dcfg.task == "classification":
        lo, hi = min(x[0] for x in labels), max(x[1] for x in labels)
        if lo < 0 or hi >= dcfg.num_classes:
            raise PartitionError(
                f"labels range from {lo} to {hi}, outside the declared classes 0..{dcfg.num_classes - 1}: "
                f"set data.num_classes={hi + 1} or fix the labels"
            )
    dropped = 0
    if dcfg.invalid_values == "drop":
        dropped = keyed.filter(~F.col("_valid")).count()
    if total == 0:
        raise PartitionError(f"data.input_url {dcfg.input_url} has no usable rows: the input is empty")
    return counts, {"input_rows": total + dropped, "dropped_rows": dropped, "rows": total}


def _num_buckets(pcfg: PartitionConfig, input_bytes: int) -> int:
    """Buckets of about BUCKET_BYTES of input each (the unit one task sorts), at least 2K; a power of 2
    so that the bucket is the top bits of the row's hash key."""
    wanted = pcfg.buckets or max(2 * pcfg.num_shards, math.ceil(input_bytes / BUCKET_BYTES))
    return 1 << max(1, math.ceil(math.log2(wanted)))


def _bucket_of(b: int) -> Column:
    """The top log2(b) bits of the hash key: sorting keys as unsigned numbers sorts by bucket first."""
    return F.shiftrightunsigned(F.col(_KEY), 64 - (b.bit_length() - 1))


def _fail_invalid(df: DataFrame, dcfg: DataConfig) -> DataFrame:
    """Rows with NaN/inf/missing features or a null label: fail the write (policy fail) or drop them."""
    if dcfg.invalid_values == "drop":
        return df.filter(F.col("_valid"))
    msg = F.concat(
        F.lit("row_id "),
        F.col("row_id").cast("string"),
        F.lit(
            " has a NaN/infinite feature, a features array of the wrong length or a null (or, for regression, "
            "NaN/infinite) label; "
            "clean the input or set data.invalid_values=drop to drop and count such rows"
        ),
    )
    # A filter, not a projection: a projected column nobody reads would be pruned and never checked.
    return df.filter(F.when(F.col("_valid"), F.lit(True)).otherwise(F.raise_error(msg)))


def _shuffle_split(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, input_bytes: int
) -> tuple[DataFrame, dict[str, int]]:
    b = _num_buckets(pcfg, input_bytes)
    counts, stats = _checked_counts(keyed, dcfg, b)
    n = stats["rows"]
    n_val = int(round(n * pcfg.validation_fraction))
    if n - n_val < pcfg.num_shards:
        raise PartitionError(
            f"partition.num_shards={pcfg.num_shards} is larger than the {n - n_val} training rows: "
            "lower num_shards or use more data"
        )
    offsets, acc = {}, 0
    for bucket in range(b):
        offsets[bucket] = acc
        acc += counts.get(bucket, 0)
    # Bucket b goes to partition pmod(hash(b), b_count), as repartition(n, col) places it; inside a
    # partition rows are sorted by (bucket, key), so a row's index in its partition minus the number of
    # rows of lower buckets in the same partition is its rank inside its bucket. This avoids a window,
    # which would buffer (and spill) every bucket.
    spark = keyed.sparkSession
    placement = (
        spark.range(b).select(F.col("id").alias(_BUCKET), F.pmod(F.hash(F.col("id")), F.lit(b)).alias("p")).collect()
    )
    before: dict[int, int] = {}
    shift = {}
    for row in sorted(placement, key=lambda r: r[_BUCKET]):
        bucket, part = int(row[_BUCKET]), int(row["p"])
        shift[bucket] = offsets[bucket] - before.get(part, 0)
        before[part] = before.get(part, 0) + counts.get(bucket, 0)
    shift_map = F.create_map(*[x for k, v in shift.items() for x in (F.lit(k), F.lit(v))])
    df = _fail_invalid(keyed, dcfg).withColumn(_BUCKET, _bucket_of(b))
    # One 64-bit sort key whose order is (bucket, key): Spark sorts it by prefix alone, where a leading
    # bucket column would make nearly every comparison a full-row compare. row_id only breaks hash ties.
    unsigned_key = F.col(_KEY).bitwiseXOR(F.lit(-(2**63)))
    df = df.repartition(b, _BUCKET).sortWithinPartitions(unsigned_key, "row_id")
    index_in_partition = F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))
    df = df.withColumn(_POS, shift_map[F.col(_BUCKET)] + index_in_partition)
    shard = F.when(F.col(_POS) < n_val, F.lit(-1)).otherwise(F.pmod(F.col(_POS) - n_val, F.lit(pcfg.num_shards)))
    return df.withColumn(SHARD_COL, shard.cast("int")), stats


def _random_sample(keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig) -> tuple[DataFrame, dict[str, int]]:
    """Validation by a seeded hash; then each shard an independent seeded sample of the other rows.

    Per row and shard, a uniform u from a hash of (row_id, seed, shard) decides how often the row lands in
    the shard: Bernoulli(fraction) without replacement, Poisson(fraction) with replacement (inverse CDF).
    One pass over the input writes all K shards (rows are exploded into their shards).
    """
    _, stats = _checked_counts(keyed, dcfg, 2)
    df = _fail_invalid(keyed, dcfg)
    is_val = _uniform(F.col("row_id"), pcfg.seed, -1) < F.lit(pcfg.validation_fraction)
    reps = []
    for k in range(pcfg.num_shards):
        u = _uniform(F.col("row_id"), pcfg.seed, k)
        if pcfg.with_replacement:
            count = _poisson_from_uniform(u, pcfg.sample_fraction)
        else:
            count = F.when(u < F.lit(pcfg.sample_fraction), F.lit(1)).otherwise(F.lit(0))
        reps.append(F.array_repeat(F.lit(k), count))
    shards = F.when(is_val, F.array(F.lit(-1))).otherwise(F.flatten(F.array(*reps)))
    return df.withColumn(SHARD_COL, F.explode(shards)), stats


def _uniform(row_id: Column, seed: int, salt: int) -> Column:
    h = F.xxhash64(row_id, F.lit(seed), F.lit(salt))
    return F.pmod(h, F.lit(1 << 53)).cast("double") / F.lit(float(1 << 53))


def _poisson_from_uniform(u: Column, lam: float) -> Column:
    """Inverse-CDF Poisson(lam) draw from a uniform column (exact up to a 1e-12 tail)."""
    expr, cdf, p, k = F.lit(0), 0.0, math.exp(-lam), 0
    thresholds = []
    while cdf < 1 - 1e-12 and k < 200:
        cdf += p
        thresholds.append(cdf)
        k += 1
        p *= lam / k
    expr = F.lit(len(thresholds))
    for i in reversed(range(len(thresholds))):
        expr = F.when(u < F.lit(thresholds[i]), F.lit(i)).otherwise(expr)
    return expr


def _feature_groups(names: list[str], pcfg: PartitionConfig) -> list[list[str]]:
    m = pcfg.feature_groups
    if m == 0:
        return []
    if m > len(names):
        raise PartitionError(f"partition.feature_groups={m} is more than the {len(names)} features")
    if pcfg.feature_grouping == "explicit":
        groups = [list(g) for g in pcfg.explicit_groups or []]
        flat = [n for g in groups for n in g]
        if len(groups) != m or sorted(flat) != sorted(names) or len(set(flat)) != len(flat):
            raise PartitionError(
                f"partition.explicit_groups must be {m} lists that cover every feature exactly once; features: {names}"
            )
        return groups
    if pcfg.feature_grouping == "hashed":
        buckets: list[list[str]] = [[] for _ in range(m)]
        for n in names:
            buckets[int(hashlib.md5(n.encode()).hexdigest(), 16) % m].append(n)
        if any(not b for b in buckets):
            raise PartitionError("hashed feature grouping left a group empty: use fewer groups or contiguous")
        return buckets
    size, extra = divmod(len(names), m)
    groups, start = [], 0
    for g in range(m):
        end = start + size + (1 if g < extra else 0)
        groups.append(names[start:end])
        start = end
    return groups


# ------------------------------------------------------------------------------------------- writing


def _layout(df: DataFrame, names: list[str], subset: list[str] | None, pcfg: PartitionConfig) -> DataFrame:
    """Select row_id, the (subset of) features in the configured layout, label and shard."""
    idx = [names.index(n) for n in (subset if subset is not None else names)]
    if pcfg.feature_layout == "array":
        feats = [(_pick(idx) if subset is not None else F.col(FEATURES_COL)).alias(FEATURES_COL)]
    else:
        feats = [F.col(FEATURES_COL)[i].alias(names[i]) for i in idx]
    return df.select("row_id", *feats, "label", SHARD_COL)


def _pick(idx: list[int]) -> Column:
    """features[idx] as one array expression. ``array(features[i] for i in idx)`` would generate code that
    grows with the group (Spark's codegen runs out of heap near 10k elements); a slice, or a ``transform``
    over a constant index array, stays one small expression whatever the width."""
    features = F.col(FEATURES_COL)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return F.slice(features, idx[0] + 1, len(idx))
    return F.transform(F.lit(idx), lambda i: features[i])


def _write(df: DataFrame, url: str, block_bytes: str, shards: int) -> None:
    """Write partitioned by shard, in the rows' current order: one open writer per shard instead of the
    sort by shard a partitioned write otherwise adds. That order (by permutation position) is identical
    for every feature group written from the same data, so group files line up row by row."""
    spark = df.sparkSession
    saved = {k: spark.conf.get(k, None) for k in _WRITE_CONF}
    spark.conf.set("spark.sql.optimizer.plannedWrite.enabled", "false")
    spark.conf.set("spark.sql.maxConcurrentOutputFileWriters", str(shards + 2))
    try:
        _write_parquet(df, url, block_bytes)
    finally:
        for k, v in saved.items():
            spark.conf.unset(k) if v is None else spark.conf.set(k, v)


_WRITE_CONF = ("spark.sql.optimizer.plannedWrite.enabled", "spark.sql.maxConcurrentOutputFileWriters")


def _write_parquet(df: DataFrame, url: str, block_bytes: str) -> None:
    (
        df.write.mode("errorifexists")
        .option("parquet.block.size", block_bytes)
        .option("compression", "snappy")
        .partitionBy(SHARD_COL)
        .parquet(url)
    )


def _existing_manifest(fs: HadoopFS, out_url: str) -> Manifest | None:
    url = f"{out_url}/{MANIFEST_NAME}"
    if not fs.exists(url):
        return None
    try:
        return Manifest.from_json(fs.read_text(url), root_url=out_url)
    except (ManifestError, ValueError, KeyError, TypeError):
        return None


def _build_manifest(
    fs: HadoopFS,
    tmp: str,
    out_url: str,
    inp: _Input,
    groups: list[list[str]],
    input_rows: int,
    dropped: int,
    settings: dict,
    cfg: JobConfig,
) -> Manifest:
    pcfg = cfg.partition
    listing = fs.list_files(tmp, suffix=".parquet")
    footers = _read_footers([f"{tmp}/{p}" for p, _, _ in listing])

    def shard(prefix: str) -> ShardEntry:
        files = [
            FileEntry(p, size, *footers[i]) for i, (p, size, _) in enumerate(listing) if p.startswith(prefix + "/")
        ]
        return ShardEntry(prefix, sum(f.rows for f in files), sum(f.bytes for f in files), files)

    train = [shard(f"train/{SHARD_COL}={k}") for k in range(pcfg.num_shards)]
    empty = [s.name for s in train if s.rows == 0]
    if empty:
        raise PartitionError(f"shard(s) {empty} are empty: lower partition.num_shards or raise sample_fraction")
    feature_groups = [
        FeatureGroup(g, names, [shard(f"features/group={g}/{SHARD_COL}={k}") for k in range(pcfg.num_shards)])
        for g, names in enumerate(groups)
    ]
    regression = cfg.data.task == "regression"
    schema = {"row_id": "long", "label": "double" if regression else "int"}
    if pcfg.feature_layout == "array":
        schema[FEATURES_COL] = f"array<float>[{len(inp.feature_names)}]"
    else:
        schema.update({n: "float" for n in inp.feature_names})
    return Manifest(
        root_url=out_url,
        mode=pcfg.mode,
        seed=pcfg.seed,
        input_url=cfg.data.input_url,
        input_fingerprint=inp.fingerprint,
        input_rows=input_rows,
        dropped_rows=dropped,
        num_classes=REGRESSION if regression else cfg.data.num_classes,
        label_col="label",
        row_id_col="row_id",
        features_col=FEATURES_COL if pcfg.feature_layout == "array" else None,
        feature_names=inp.feature_names,
        train=train,
        validation=shard("validation"),
        feature_groups=feature_groups,
        schema=schema,
        config=settings,
    )


def _read_footers(urls: list[str]) -> list[tuple[int, int]]:
    """(rows, row groups) of each Parquet file, read from the footers in parallel threads."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    if not urls:
        return []
    filesystem, _ = pafs.FileSystem.from_uri(urls[0])

    def footer(url: str) -> tuple[int, int]:
        _, path = pafs.FileSystem.from_uri(url)
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            return meta.num_rows, meta.num_row_groups

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(footer, urls))


def _check_row_groups(manifest: Manifest, pcfg: PartitionConfig) -> None:
    few = [(s.name, s.row_groups) for s in manifest.train if s.row_groups < pcfg.min_row_groups]
    if few:
        raise PartitionError(
            f"shards {few} have fewer row groups than partition.min_row_groups={pcfg.min_row_groups}: "
            "lower partition.row_group_mb or partition.num_shards"
        )


def _result(m: Manifest, skipped: bool, started: float) -> PartitionResult:
    return PartitionResult(
        manifest_url=f"{m.root_url}/{MANIFEST_NAME}",
        mode=m.mode,
        input_rows=m.input_rows,
        train_rows=[s.rows for s in m.train],
        validation_rows=m.validation.rows,
        dropped_rows=m.dropped_rows,
        feature_groups=len(m.feature_groups),
        skipped=skipped,
        seconds=round(time.monotonic() - started, 3),
    )


def _clean_error(exc: Exception) -> Exception:
    """Turn a Spark task failure caused by raise_error into the PartitionError it carries."""
    if isinstance(exc, PartitionError | ManifestError | FileExistsError):
        return exc
    text = str(exc)
    marker = "has a NaN/infinite feature"
    if marker in text:
        start = text.rfind("row_id ", 0, text.find(marker))
        end = text.find("drop and count such rows", start)
        return PartitionError(text[start : end + len("drop and count such rows")])
    return exc
