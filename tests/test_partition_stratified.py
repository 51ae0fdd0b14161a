"""partition.mode=stratified_split on real local Spark: each input task deals its rows to the validation split
and the shards without a network shuffle (issue 17 section 2). The same promises as shuffle_split (every row
once, exact validation size, shards within one row, seeded, re-run a no-op, feature groups line up), plus
what the mode is named for: every input task spread over the shards in proportion."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from sparkml_dist.config import load_config
from sparkml_dist.manifest import read_manifest
from sparkml_dist.partition import _apportion, partition

GROUPS = {0: 600, 1: 1200, 2: 1800, 3: 2400}  # rows per input file; the label is sorted within each file
K = 3


@pytest.fixture(scope="module")
def grouped_url(spark, tmp_path_factory) -> str:
    """Four files of different sizes, each one input task, rows in label order (the hard case for a split
    that keeps input order: a shard file would hold long runs of one label)."""
    out = tmp_path_factory.mktemp("grouped") / "in"
    start = 0
    for g, n in GROUPS.items():
        rows = [(start + i, float(i % 7), float(g), int(i >= n // 2)) for i in range(n)]
        spark.createDataFrame(rows, "row_id long, a double, g double, label int").coalesce(1).write.mode(
            "append"
        ).parquet(str(out))
        start += n
    return f"file://{out}"


@pytest.fixture
def one_task_per_file(spark):
    keys = ("spark.sql.files.openCostInBytes", "spark.sql.files.maxPartitionBytes")
    saved = {k: spark.conf.get(k) for k in keys}
    spark.conf.set("spark.sql.files.openCostInBytes", str(1 << 30))  # never pack two files in one task
    yield
    for k, v in saved.items():
        spark.conf.set(k, v)


def _cfg(tmp_path: Path, url: str, out: str = "out", *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={tmp_path}",
            f"data.input_url={url}",
            f"partition.output_url={tmp_path}/{out}",
            "partition.mode=stratified_split",
            f"partition.num_shards={K}",
            "partition.validation_fraction=0.1",
            "partition.feature_layout=columns",
            "data.feature_cols=[a, g]",
            *sets,
        ],
    )


def _rows(spark, url: str) -> list:
    return spark.read.parquet(url).select("row_id", "g", "label").collect()


def test_every_row_once_exact_sizes_and_each_input_task_dealt_in_proportion(
    spark, tmp_path, grouped_url, one_task_per_file
):
    result = partition(spark, _cfg(tmp_path, grouped_url))
    m = read_manifest(f"file://{tmp_path}/out")
    n = sum(GROUPS.values())
    assert m.mode == result.mode == "stratified_split"
    assert all(len(s.files) == len(GROUPS) for s in m.train)  # one task per input file, each wrote its own
    assert result.validation_rows == round(n * 0.1)
    assert sum(result.train_rows) == n - round(n * 0.1) and max(result.train_rows) - min(result.train_rows) <= 1
    shards = [_rows(spark, m.shard_url(s)) for s in m.train]
    val = _rows(spark, m.shard_url(m.validation))
    ids = [r.row_id for part in [*shards, val] for r in part]
    assert sorted(ids) == list(range(n))  # every row exactly once
    # stratified: each input file's validation share within one row of its exact share, and its training
    # rows dealt to the K shards within one row of each other
    val_by_group = Counter(int(r.g) for r in val)
    for g, rows in GROUPS.items():
        assert abs(val_by_group[g] - rows * result.validation_rows / n) <= 1, (g, val_by_group)
        per_shard = [sum(1 for r in part if r.g == g) for part in shards]
        assert max(per_shard) - min(per_shard) <= 1, (g, per_shard)
    # a seeded random order inside each task: labels sorted in the input are mixed in every shard file
    for part in shards:
        labels = [r.label for r in part]
        assert 0.4 < sum(labels) / len(labels) < 0.6
        runs = sum(1 for a, b in zip(labels, labels[1:], strict=False) if a != b)
        assert runs > len(labels) / 4  # a label-sorted file would have about 4 runs


def test_seeded_reproducible_and_a_rerun_is_a_noop(spark, tmp_path, grouped_url, one_task_per_file):
    first = partition(spark, _cfg(tmp_path, grouped_url, "a"))
    partition(spark, _cfg(tmp_path, grouped_url, "b"))
    partition(spark, _cfg(tmp_path, grouped_url, "c", "partition.seed=99"))

    def shard0(out: str) -> list[int]:
        m = read_manifest(f"file://{tmp_path}/{out}")
        return [r.row_id for r in _rows(spark, m.shard_url(m.train[0]))]

    assert shard0("a") == shard0("b")  # the same rows in the same order
    assert set(shard0("a")) != set(shard0("c"))
    again = partition(spark, _cfg(tmp_path, grouped_url, "a"))
    assert again.skipped and not first.skipped


def test_feature_groups_line_up_row_by_row(spark, tmp_path, grouped_url, one_task_per_file):
    partition(spark, _cfg(tmp_path, grouped_url, "out", "partition.feature_groups=2"))
    m = read_manifest(f"file://{tmp_path}/out")
    for k, shard in enumerate(m.train):
        orders = [
            [r.row_id for r in spark.read.parquet(m.shard_url(g.shards[k])).select("row_id").collect()]
            for g in m.feature_groups
        ]
        main = [r.row_id for r in spark.read.parquet(m.shard_url(shard)).select("row_id").collect()]
        assert orders[0] == orders[1] == main


def test_sparse_input_goes_through_the_same_path(spark, tmp_path):
    rows = [(i, f"c{i % 11}", float(i % 5), i % 2) for i in range(3000)]
    spark.createDataFrame(rows, "row_id long, cat string, x double, label int").repartition(3).write.parquet(
        str(tmp_path / "in")
    )
    sets = [
        f"paths.work_dir={tmp_path}", f"data.input_url=file://{tmp_path}/in", f"partition.output_url={tmp_path}/out",
        "partition.mode=stratified_split", "partition.num_shards=2", "data.categorical_cols=[cat]",
        "data.feature_cols=[x]", "data.hash_buckets=64",
    ]  # fmt: skip
    result = partition(spark, load_config(None, sets))
    m = read_manifest(f"file://{tmp_path}/out")
    assert m.sparse is not None and result.validation_rows == 300 and sorted(result.train_rows) == [1350, 1350]
    ids = [r.row_id for s in [*m.train, m.validation] for r in spark.read.parquet(m.shard_url(s)).collect()]
    assert sorted(ids) == list(range(3000))


def test_apportion_is_exact_and_within_one_of_each_share():
    rng = random.Random(3)
    for _ in range(200):
        counts = {k: rng.randint(0, 10_000) for k in range(rng.randint(1, 40))}
        if not sum(counts.values()):
            continue
        total = rng.randint(0, sum(counts.values()))
        share = _apportion(counts, total)
        assert sum(share.values()) == total
        n = sum(counts.values())
        assert all(abs(share[k] - counts[k] * total / n) < 1 and 0 <= share[k] <= counts[k] for k in counts)
