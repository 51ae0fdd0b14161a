"""The partition job: read, assign, write feature groups, check, then publish atomically under the output's
lock; an output already made from the same input and settings is kept (``skipped``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass

from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkml_dist.config import JobConfig
from sparkml_dist.data.manifest import MANIFEST_NAME, Manifest, ManifestError, manifest_files, verify_files
from sparkml_dist.data.outputs import OutputKind, check_output
from sparkml_dist.data.partition.assign import _assign
from sparkml_dist.data.partition.checks import _check_row_groups, _check_split
from sparkml_dist.data.partition.common import SHARD_COL, PartitionError, _DuplicateRowIds, _Input
from sparkml_dist.data.partition.groups import _feature_groups, _sparse_groups
from sparkml_dist.data.partition.read import _clean_error, _read_input, _recorded_digests
from sparkml_dist.data.partition.write import _build_manifest, _existing_manifest, _layout, _sparse_group_layout, _write
from sparkml_dist.data.storage import HadoopFS, atomic_output, output_lock
from sparkml_dist.training.model_size import ModelSizeError, check_model_size, estimate_parameters

log = logging.getLogger("sparkml_dist.partition")  # one logger for the job, as before the split


PARTITION_OUTPUT = OutputKind("partition", MANIFEST_NAME, manifest_files)


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
    row_ids_rekeyed: bool = False
    """True when the input's row ids had duplicates or nulls and data.duplicate_row_ids=rekey numbered the rows."""
    fingerprint_s: float = 0.0
    """Of ``seconds``: reading the input to fingerprint its content (0 when every file's digest was reused)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def partition(spark: SparkSession, cfg: JobConfig) -> PartitionResult:
    """Run the partition job described by ``cfg.data`` and ``cfg.partition``; publish atomically.

    The output's lock (``storage.output_lock``) is held from the first look at the output to the publish, so a
    second job on the same ``partition.output_url`` fails at once, naming this one, and cannot delete its work."""
    with output_lock(spark, cfg.partition.output_url, "partition.output_url"):
        return _partition(spark, cfg)


def _partition(spark: SparkSession, cfg: JobConfig) -> PartitionResult:
    started = time.monotonic()
    pcfg, dcfg = cfg.partition, cfg.data
    out_url = pcfg.output_url.rstrip("/")
    fs = HadoopFS(spark, out_url)
    inputs = {"data.input_url": dcfg.input_url}
    check_output(fs, out_url, PARTITION_OUTPUT, "partition.output_url", inputs)
    existing = _existing_manifest(fs, out_url)
    same_input = existing is not None and existing.input_url.rstrip("/") == dcfg.input_url.rstrip("/")
    known = {} if pcfg.rehash or not same_input else _recorded_digests(existing)
    inp = _read_input(spark, dcfg, pcfg, known)
    _check_model_fits(cfg, inp)
    settings = {"data": asdict(dcfg), "partition": asdict(pcfg)}
    settings["partition"].pop("output_url")
    settings["partition"].pop("rehash")  # how the fingerprint was read, not what the output is
    if existing and existing.input_fingerprint == inp.fingerprint and existing.config == settings:
        try:
            verify_files(existing)
            return _result(existing, skipped=True, started=started, fingerprint_s=inp.fingerprint_s)
        except ManifestError as exc:  # our own output, damaged since: write it again
            log.warning("re-partitioning: the earlier output no longer matches its manifest (%s)", exc)

    spark.sparkContext.setJobDescription("partition: count rows per bucket and check labels")
    rekeyed = False
    try:
        assigned, stats = _assign(inp, dcfg, pcfg)
    except _DuplicateRowIds as dup:
        rekeyed = True
        log.warning("data.duplicate_row_ids=rekey: %s; numbering the rows anew", dup.detail)
        inp = dataclasses.replace(
            inp, df=inp.df.withColumn("row_id", F.monotonically_increasing_id()), ids_from_input=False
        )
        assigned, stats = _assign(inp, dcfg, pcfg)
    except Exception as exc:
        raise _clean_error(exc, spark, dcfg) from exc

    sparse_groups = _sparse_groups(inp.encoding.dimension, pcfg) if inp.encoding is not None else None
    groups = [[] for _ in sparse_groups] if sparse_groups is not None else _feature_groups(inp.feature_names, pcfg)
    if groups:
        assigned = assigned.persist(StorageLevel.MEMORY_AND_DISK)
    block_bytes = str(int(pcfg.row_group_mb * 1024 * 1024))
    try:
        with atomic_output(spark, out_url, PARTITION_OUTPUT, "partition.output_url", inputs) as tmp:
            spark.sparkContext.setJobDescription(f"partition: write {pcfg.num_shards} shards + validation")
            _write(_layout(assigned, inp, None, pcfg), f"{tmp}/train", block_bytes, pcfg.num_shards)
            if fs.exists(f"{tmp}/train/{SHARD_COL}=-1"):
                fs.rename(f"{tmp}/train/{SHARD_COL}=-1", f"{tmp}/validation")
            else:  # validation_fraction 0 (or tiny data): an empty split, still a directory
                fs.mkdirs(f"{tmp}/validation")
            for g, names in enumerate(groups):
                spark.sparkContext.setJobDescription(f"partition: write feature group {g}")
                if sparse_groups is not None:
                    sub = _sparse_group_layout(assigned, *sparse_groups[g]).filter(F.col(SHARD_COL) >= 0)
                else:
                    sub = _layout(assigned, inp, names, pcfg).filter(F.col(SHARD_COL) >= 0)
                _write(sub, f"{tmp}/features/group={g}", block_bytes, pcfg.num_shards)
            manifest = _build_manifest(
                fs, tmp, out_url, inp, groups, stats["input_rows"], stats["dropped_rows"], settings, cfg, sparse_groups
            )
            _check_row_groups(manifest, pcfg)
            _check_split(manifest, stats["rows"], pcfg)
            fs.write_text(f"{tmp}/{MANIFEST_NAME}", manifest.to_json())
    except Exception as exc:
        raise _clean_error(exc, spark, dcfg) from exc
    finally:
        if groups:
            assigned.unpersist()
    result = _result(manifest, skipped=False, started=started, fingerprint_s=inp.fingerprint_s)
    return dataclasses.replace(result, row_ids_rekeyed=rekeyed)


def _check_model_fits(cfg: JobConfig, inp: _Input) -> None:
    """Refuse a feature space whose model would not fit a rank (``train.max_model_gib``), estimated from the
    config's train section before any pass over the rows."""
    width = inp.encoding.dimension if inp.encoding is not None else len(inp.feature_names)
    regression = cfg.data.task == "regression"
    outputs = 1 if regression or cfg.data.num_classes == 2 else cfg.data.num_classes
    params = estimate_parameters(cfg.train, width, outputs)
    what = f"feature dimension {width:,}, {outputs} output(s)"
    try:
        check_model_size(cfg.train, params, what)
    except ModelSizeError as exc:
        raise PartitionError(f"{exc}. Nothing was written") from None


def _result(m: Manifest, skipped: bool, started: float, fingerprint_s: float) -> PartitionResult:
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
        fingerprint_s=fingerprint_s,
    )
