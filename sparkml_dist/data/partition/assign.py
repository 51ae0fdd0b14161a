"""The assignment pass: count and check the rows, then give each its shard (-1: validation), one function per
``partition.mode`` (``_MODES``).

DataFrame -> sample shards, validation split and feature groups, described by one manifest.

Scales the way Spark scales: no collect() of data, no single-partition sort or window. The permutation
for shuffle-split is "random bucket, then random order inside the bucket": every row gets a seeded
64-bit hash key; bucket = key mod B. One cheap pass counts rows per bucket (only the row id and label
are read); the main pass shuffles rows to their bucket's partition, sorts each partition by (bucket,
key), and the row's index in its sorted partition plus per-bucket offsets gives its global position in
the permutation. Position -> validation (the first n_val) or shard (t mod K), so
shard sizes differ by at most one row.
"""

from __future__ import annotations

import math

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkml_dist.config import DataConfig, PartitionConfig
from sparkml_dist.data.partition.common import (
    _BUCKET,
    _KEY,
    _NULLS,
    _POS,
    _WHY,
    SHARD_COL,
    PartitionError,
    _DuplicateRowIds,
    _Input,
)
from sparkml_dist.data.partition.invalid import apply_invalid_policy

BUCKET_BYTES = 256 * 1024 * 1024


def _assign(inp: _Input, dcfg: DataConfig, pcfg: PartitionConfig) -> tuple[DataFrame, dict[str, int]]:
    """Count (and check) the rows, then give each its shard (-1: validation)."""
    keyed = inp.df.withColumn(_KEY, F.xxhash64(F.col("row_id"), F.lit(pcfg.seed)))
    return _MODES[pcfg.mode](keyed, dcfg, pcfg, inp)


def _checked_counts(
    keyed: DataFrame, dcfg: DataConfig, by_bucket: int, ids_from_input: bool
) -> tuple[dict[int, int], dict[str, int]]:
    """One pass over row_id, label (and, to drop invalid rows, the features): rows per bucket + checks.

    The input's row ids are checked in the same pass: nulls by a count, duplicates by a distinct count
    per bucket (equal ids share a hash key and so a bucket; the pass shuffles only (bucket, id) pairs).
    """
    df = keyed
    if dcfg.invalid_values == "drop":
        df = df.filter(F.col("_valid"))
    aggs = [F.count(F.lit(1)).alias("n"), F.min("label").alias("lo"), F.max("label").alias("hi")]
    if ids_from_input:
        aggs += [F.count("row_id").alias("ids"), F.countDistinct("row_id").alias("distinct_ids")]
    agg = df.groupBy(_bucket_of(by_bucket).alias(_BUCKET)).agg(*aggs).collect()
    counts = {int(r[_BUCKET]): int(r["n"]) for r in agg}
    total = sum(counts.values())
    if ids_from_input:
        nulls = total - sum(int(r["ids"]) for r in agg)
        repeats = sum(int(r["ids"]) - int(r["distinct_ids"]) for r in agg)
        if nulls or repeats:
            _report_bad_ids(df, dcfg, nulls, repeats, total)
    labels = [(r["lo"], r["hi"]) for r in agg if r["lo"] is not None]
    if labels and dcfg.task == "classification":
        lo, hi = min(x[0] for x in labels), max(x[1] for x in labels)
        if lo < 0 or hi >= dcfg.num_classes:
            raise PartitionError(
                f"labels range from {lo} to {hi}, outside the declared classes 0..{dcfg.num_classes - 1}: "
                + _label_fix(lo, hi)
            )
    dropped = 0
    if dcfg.invalid_values == "drop":
        dropped = keyed.filter(~F.col("_valid")).count()
    if total == 0:
        raise PartitionError(f"data.input_url {dcfg.input_url} has no usable rows: the input is empty")
    return counts, {"input_rows": total + dropped, "dropped_rows": dropped, "rows": total}


MAX_SUGGESTED_CLASSES = 100_000
"""Above this many classes a label range is taken for ids or codes, not class ids: the message does not
suggest data.num_classes (a softmax that wide over mostly empty classes is never what was meant)."""


def _label_fix(lo: int, hi: int) -> str:
    """What to do about labels ``lo..hi`` outside the declared classes."""
    if lo < 0:
        return "class ids start at 0, so map the labels to 0..K-1 (e.g. -1/+1 to 0/1), or set data.task=regression"
    if hi + 1 > MAX_SUGGESTED_CLASSES:
        return (
            f"{hi} is no class id (more than {MAX_SUGGESTED_CLASSES} classes): map the labels to 0..K-1 (e.g. with "
            "Spark ML's StringIndexer), or set data.task=regression for a numeric target"
        )
    return f"set data.num_classes={hi + 1} or fix the labels"


def _report_bad_ids(df: DataFrame, dcfg: DataConfig, nulls: int, repeats: int, total: int) -> None:
    """Null or repeated row ids: with them the seeded shuffle degenerates (equal keys keep input order)."""
    examples = []
    if repeats:
        dup = df.groupBy("row_id").count().where(F.col("count") > 1).orderBy("row_id").limit(3).collect()
        examples = [f"{r['row_id']} ({r['count']} rows)" for r in dup]
    what = "; ".join(
        x
        for x in (
            f"{nulls} of {total} rows have a null id" if nulls else "",
            f"{repeats} rows repeat an id (e.g. {', '.join(examples)})" if repeats else "",
        )
        if x
    )
    if dcfg.duplicate_row_ids == "rekey":
        raise _DuplicateRowIds(f"row key column {dcfg.row_id_col!r}: {what}")
    raise PartitionError(
        f"row key column data.row_id_col={dcfg.row_id_col!r} is not a unique key: {what}. Fix the ids, or set "
        "data.duplicate_row_ids=rekey to number the rows anew (the input's ids are then not kept)"
    )


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
    detail = F.col(_NULLS) if _NULLS in df.columns else None
    reason = F.col(_WHY) if _WHY in df.columns else None
    checked = apply_invalid_policy(
        df, F.col("_valid"), "row_id", dcfg.invalid_values, "a null (or, for regression, NaN/infinite) label", detail,
        reason,
    )  # fmt: skip
    return checked.drop(_NULLS, _WHY)  # read by the filter above; not carried through the shuffle


def _validation_rows(n: int, pcfg: PartitionConfig) -> int:
    """The exact size of the validation split of ``n`` rows; refuse an empty split or too few training rows."""
    n_val = int(round(n * pcfg.validation_fraction))
    if n_val == 0:
        raise PartitionError(
            f"partition.validation_fraction={pcfg.validation_fraction} of {n} rows leaves the validation split "
            "empty: raise partition.validation_fraction or use more data"
        )
    if n - n_val < pcfg.num_shards:
        raise PartitionError(
            f"partition.num_shards={pcfg.num_shards} is larger than the {n - n_val} training rows: "
            "lower num_shards or use more data"
        )
    return n_val


def _shuffle_split(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, inp: _Input
) -> tuple[DataFrame, dict[str, int]]:
    b = _num_buckets(pcfg, inp.input_bytes)
    counts, stats = _checked_counts(keyed, dcfg, b, inp.ids_from_input)
    n = stats["rows"]
    n_val = _validation_rows(n, pcfg)
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
    df = _fail_invalid(keyed, dcfg).withColumn(_BUCKET, _bucket_of(b))
    # One 64-bit sort key whose order is (bucket, key): Spark sorts it by prefix alone, where a leading
    # bucket column would make nearly every comparison a full-row compare. row_id only breaks hash ties.
    df = df.repartition(b, _BUCKET).sortWithinPartitions(_unsigned_key(), "row_id")
    df = df.withColumn(_POS, _literal_map(shift)[F.col(_BUCKET)] + _index_in_partition())
    shard = F.when(F.col(_POS) < n_val, F.lit(-1)).otherwise(F.pmod(F.col(_POS) - n_val, F.lit(pcfg.num_shards)))
    return df.withColumn(SHARD_COL, shard.cast("int")), stats


def _stratified_split(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, inp: _Input
) -> tuple[DataFrame, dict[str, int]]:
    """Deal each input task's rows to the validation split and the shards, without a network shuffle.

    Inside each input partition the rows are put in a seeded random order by a local sort on the same
    64-bit key shuffle_split uses; the partition's first rows (its share of the validation split, the
    shares apportioned exactly on the driver) go to validation, the rest take consecutive global training
    positions t, and t mod K is the shard. So the validation split has exactly round(n * fraction) rows,
    shard sizes differ by at most one row, every input partition is spread over the shards in proportion
    (a stratified sample), and the result is a pure function of (input files, their split into tasks,
    seed). What it gives up against shuffle_split: the order inside a shard (and which rows share a shard)
    depends on how Spark splits the input into tasks (``spark.sql.files.maxPartitionBytes``, the files),
    and each task writes its own file per shard, so there are (input tasks) x (K + 1) files.
    """
    _, stats = _checked_counts(keyed, dcfg, _num_buckets(pcfg, inp.input_bytes), inp.ids_from_input)
    n = stats["rows"]
    n_val = _validation_rows(n, pcfg)
    df = _fail_invalid(keyed, dcfg)
    # Under invalid_values=fail an invalid row fails the write below, so counting needs no feature column
    # (Parquet answers from its footers); under drop the count is of the rows kept.
    counted = df if dcfg.invalid_values == "drop" else keyed
    per_task = counted.groupBy(F.spark_partition_id().alias("p")).agg(F.count(F.lit(1)).alias("n")).collect()
    counts = {int(r["p"]): int(r["n"]) for r in per_task}
    if sum(counts.values()) != n:  # the same rows read twice must count the same
        raise PartitionError(
            f"data.input_url {dcfg.input_url} changed while it was being partitioned ({n} rows, then "
            f"{sum(counts.values())}): partition it again once it is complete"
        )
    val_share = _apportion(counts, n_val)
    shift, trained = {}, 0
    for p in sorted(counts):
        shift[p] = trained - val_share[p]  # training position = index in the task + shift
        trained += counts[p] - val_share[p]
    df = df.sortWithinPartitions(_unsigned_key(), "row_id")
    task = F.shiftright(F.monotonically_increasing_id(), 33)  # no shuffle since the read: the input task
    index = _index_in_partition()
    shard = F.when(index < _literal_map(val_share)[task], F.lit(-1)).otherwise(
        F.pmod(index + _literal_map(shift)[task], F.lit(pcfg.num_shards))
    )
    return df.withColumn(SHARD_COL, shard.cast("int")), stats


def _unsigned_key() -> Column:
    """The row's 64-bit hash key with its sign bit flipped, so Spark's signed sort orders it as unsigned."""
    return F.col(_KEY).bitwiseXOR(F.lit(-(2**63)))


def _index_in_partition() -> Column:
    """The row's index in its (sorted) partition: monotonically_increasing_id's low 33 bits."""
    return F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))


def _literal_map(d: dict[int, int]) -> Column:
    """``d`` as a literal Spark map column (Spark folds it to one constant)."""
    return F.create_map(*[x for k, v in d.items() for x in (F.lit(k), F.lit(v))])


def _apportion(counts: dict[int, int], total: int) -> dict[int, int]:
    """Split ``total`` over the keys in proportion to ``counts`` (largest remainder, ties by key): exact
    integers that sum to ``total``, each within one of its exact share."""
    n = sum(counts.values())
    share = {k: c * total // n for k, c in counts.items()}
    left = total - sum(share.values())
    by_remainder = sorted(counts, key=lambda k: (-(counts[k] * total % n), k))
    for k in by_remainder[:left]:
        share[k] += 1
    return share


def _random_sample(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, inp: _Input
) -> tuple[DataFrame, dict[str, int]]:
    """Validation by a seeded hash; then each shard an independent seeded sample of the other rows.

    Per row and shard, a uniform u from a hash of (row_id, seed, shard) decides how often the row lands in
    the shard: Bernoulli(fraction) without replacement, Poisson(fraction) with replacement (inverse CDF).
    One pass over the input writes all K shards (rows are exploded into their shards).
    """
    _, stats = _checked_counts(keyed, dcfg, 2, inp.ids_from_input)
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


_MODES = {"shuffle_split": _shuffle_split, "stratified_split": _stratified_split, "random_sample": _random_sample}
"""partition.mode -> how rows get their shard (-1: validation); each returns (assigned rows, counts)."""


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
