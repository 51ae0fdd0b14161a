"""The write pass: the shards (and feature groups) as Parquet partitioned by shard in the assigned order, and
the manifest built from the files' footers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkml_dist.config import JobConfig, PartitionConfig
from sparkml_dist.data.features import INDICES, VALUES
from sparkml_dist.data.manifest import (
    MANIFEST_NAME,
    FeatureGroup,
    FileEntry,
    Manifest,
    ManifestError,
    ShardEntry,
    SparseLayout,
    arrow_fs,
)
from sparkml_dist.data.partition.common import FEATURES_COL, SHARD_COL, PartitionError, _Input
from sparkml_dist.data.storage import WRITE_CHECKSUMS, HadoopFS
from sparkml_dist.metrics import REGRESSION


def _sparse_group_layout(df: DataFrame, stride: int, offset: int, width: int) -> DataFrame:
    """row_id, the group's entries (local indices, ascending like the global ones), label and shard."""
    pairs = F.arrays_zip(F.col(INDICES).alias("i"), F.col(VALUES).alias("v"))
    if stride == 1:
        kept = F.filter(pairs, lambda e: (e["i"] >= offset) & (e["i"] < offset + width))
    else:
        kept = F.filter(pairs, lambda e: F.pmod(e["i"], F.lit(stride)) == offset)
    local = F.transform(kept, lambda e: ((e["i"] - offset) / stride).cast("int"))  # exact: ints below 2^31
    label = F.col("label") if dict(df.dtypes)["label"] == "double" else F.col("label").cast("int").alias("label")
    values = F.transform(kept, lambda e: e["v"])
    return df.select("row_id", local.alias(INDICES), values.alias(VALUES), label, SHARD_COL)


def _layout(df: DataFrame, inp: _Input, subset: list[str] | None, pcfg: PartitionConfig) -> DataFrame:
    """Select row_id, the (subset of) features in the configured layout, label and shard."""
    names = inp.feature_names
    idx = [names.index(n) for n in (subset if subset is not None else names)]
    if inp.encoding is not None:
        feats = [F.col(INDICES), F.col(VALUES)]
    elif pcfg.feature_layout == "array":
        feats = [(_pick(idx) if subset is not None else F.col(FEATURES_COL)).alias(FEATURES_COL)]
    else:
        feats = [F.col(FEATURES_COL)[i].alias(names[i]) for i in idx]
    # Classification labels passed the 0..num_classes-1 check as 64-bit values, so int cannot wrap here.
    label = F.col("label") if dict(df.dtypes)["label"] == "double" else F.col("label").cast("int").alias("label")
    return df.select("row_id", *feats, label, SHARD_COL)


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
        .options(**WRITE_CHECKSUMS)
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
    sparse_groups: list[list[int]] | None = None,
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
    if shard("validation").rows == 0:
        raise PartitionError(
            f"the validation split is empty (partition.validation_fraction={pcfg.validation_fraction}): raise "
            "partition.validation_fraction or use more data"
        )
    feature_groups = [
        FeatureGroup(
            g,
            names,
            [shard(f"features/group={g}/{SHARD_COL}={k}") for k in range(pcfg.num_shards)],
            sparse_groups[g] if sparse_groups is not None else None,
        )
        for g, names in enumerate(groups)
    ]
    regression = cfg.data.task == "regression"
    schema = {"row_id": "long", "label": "double" if regression else "int"}
    sparse = None
    if inp.encoding is not None:
        schema.update({INDICES: f"array<int>[<{inp.encoding.dimension}]", VALUES: "array<float>"})
        sparse = SparseLayout(inp.encoding.dimension, INDICES, VALUES, inp.encoding.to_dict())
    elif pcfg.feature_layout == "array":
        schema[FEATURES_COL] = f"array<float>[{len(inp.feature_names)}]"
    else:
        schema.update({n: "float" for n in inp.feature_names})
    return Manifest(
        root_url=out_url,
        mode=pcfg.mode,
        seed=pcfg.seed,
        input_url=cfg.data.input_url,
        input_fingerprint=inp.fingerprint,
        input_files=[d.to_list() for d in inp.digests],
        input_rows=input_rows,
        dropped_rows=dropped,
        num_classes=REGRESSION if regression else cfg.data.num_classes,
        label_col="label",
        row_id_col="row_id",
        features_col=FEATURES_COL if pcfg.feature_layout == "array" and sparse is None else None,
        feature_names=inp.feature_names,
        train=train,
        validation=shard("validation"),
        feature_groups=feature_groups,
        schema=schema,
        config=settings,
        sparse=sparse,
        columns=inp.columns,
    )


def _read_footers(urls: list[str]) -> list[tuple[int, int]]:
    """(rows, row groups) of each Parquet file, read from the footers in parallel threads."""
    import pyarrow.parquet as pq

    if not urls:
        return []
    filesystem, _ = arrow_fs(urls[0])

    def footer(url: str) -> tuple[int, int]:
        _, path = arrow_fs(url)
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            return meta.num_rows, meta.num_row_groups

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(footer, urls))
