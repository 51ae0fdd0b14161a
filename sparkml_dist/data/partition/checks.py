"""What was written is what was promised: the split's exact sizes and the shards' row groups (before the
publish), and every data page's checksum (``verify_pages``, on request, of a published output).
"""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkml_dist.config import PartitionConfig
from sparkml_dist.data.manifest import Manifest
from sparkml_dist.data.partition.assign import _validation_rows
from sparkml_dist.data.partition.common import PartitionError, corrupt_file_error
from sparkml_dist.data.storage import READ_VERIFY


def verify_pages(spark: SparkSession, manifest: Manifest) -> None:
    """Read every data page of a partition output with page-CRC verification on: one full pass over the
    shards (the footers and sizes ``read_manifest`` checks cost nothing by comparison). Petastorm reads
    through pyarrow 14, which cannot verify page checksums, so this is how a flipped byte inside a shard is
    caught before training. Raises CorruptInputError naming the file."""
    spark.sparkContext.setJobDescription(f"verify page checksums of {manifest.root_url}")
    for shard in manifest.all_shards():  # one read per shard directory: their layouts differ
        if not shard.files:
            continue
        try:
            df = spark.read.options(**READ_VERIFY).parquet(*manifest.file_urls(shard))
            # A hash of every column reads and decodes every page (a count would read the footers only).
            df.select(F.sum(F.xxhash64(*df.columns))).collect()
        except Exception as exc:
            raise corrupt_file_error(exc, manifest.root_url) or exc from exc


def _check_split(manifest: Manifest, rows: int, pcfg: PartitionConfig) -> None:
    """What was written is what the split promises, counted from the files' footers: every row once, the
    exact validation size, shard sizes within one row. A miss means the input changed while it was read
    (or Spark read it differently twice); nothing is published then."""
    if pcfg.mode == "random_sample":
        return
    n_val = _validation_rows(rows, pcfg)
    sizes = [s.rows for s in manifest.train]
    if manifest.validation.rows != n_val or sum(sizes) != rows - n_val or max(sizes) - min(sizes) > 1:
        raise PartitionError(
            f"partition.mode={pcfg.mode} wrote {manifest.validation.rows} validation rows and shards of {sizes} "
            f"rows from {rows} counted input rows (expected {n_val} and {rows - n_val} within one row): "
            f"data.input_url {manifest.input_url} changed while it was partitioned; partition it again once it "
            "is complete. Nothing was published"
        )


def _check_row_groups(manifest: Manifest, pcfg: PartitionConfig) -> None:
    few = [(s.name, s.row_groups) for s in manifest.train if s.row_groups < pcfg.min_row_groups]
    if few:
        raise PartitionError(
            f"shards {few} have fewer row groups than partition.min_row_groups={pcfg.min_row_groups}: "
            "lower partition.row_group_mb or partition.num_shards"
        )
