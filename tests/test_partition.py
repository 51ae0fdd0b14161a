"""The partition job on real local Spark: conservation, balance, determinism, feature groups, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from sparkml_dist.config import ConfigError, GenerateConfig, load_config
from sparkml_dist.errors import OutputPathError
from sparkml_dist.manifest import MANIFEST_NAME, ManifestError, read_manifest
from sparkml_dist.partition import PartitionError, partition
from sparkml_dist.synthetic import write_dataset

ROWS = 5000


@pytest.fixture(scope="session")
def raw_url(spark, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("raw") / "data"
    cfg = GenerateConfig(output_url=f"file://{out}", rows=ROWS, features=6, partitions=3, seed=1, layout="columns")
    write_dataset(spark, cfg)
    return f"file://{out}"


def _cfg(tmp_path: Path, raw_url: str, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={tmp_path}",
            f"data.input_url={raw_url}",
            f"partition.output_url={tmp_path}/out",
            "partition.num_shards=3",
            "partition.validation_fraction=0.1",
            *sets,
        ],
    )


def _ids(spark, url: str) -> list[int]:
    return [r.row_id for r in spark.read.parquet(url).select("row_id").collect()]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shuffle_split_conserves_rows_and_balances_shards(spark, tmp_path, raw_url):
    result = partition(spark, _cfg(tmp_path, raw_url))
    m = read_manifest(f"file://{tmp_path}/out")
    assert m.num_shards == 3 and m.input_rows == ROWS
    assert max(result.train_rows) - min(result.train_rows) <= 1
    assert result.validation_rows == 500
    shard_ids = [_ids(spark, m.shard_url(s)) for s in m.train]
    val_ids = _ids(spark, m.shard_url(m.validation))
    everything = [i for ids in shard_ids for i in ids] + val_ids
    assert len(everything) == len(set(everything)) == ROWS
    assert set(everything) == set(range(ROWS))
    assert [len(ids) for ids in shard_ids] == [s.rows for s in m.train]
    # the manifest describes the files exactly
    for shard in m.train:
        files = sorted(p.name for p in (tmp_path / "out" / shard.name).glob("*.parquet"))
        assert files == sorted(Path(f.path).name for f in shard.files)
        assert sum(pq.ParquetFile(tmp_path / "out" / f.path).metadata.num_rows for f in shard.files) == shard.rows
    raw = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert raw["mode"] == "shuffle_split" and raw["feature_names"] == [f"f{i}" for i in range(6)]
    assert raw["input_fingerprint"] and raw["schema"]["features"] == "array<float>[6]"


def test_same_seed_same_shards_other_seed_other_shards(spark, tmp_path, raw_url):
    partition(spark, _cfg(tmp_path / "a", raw_url))
    partition(spark, _cfg(tmp_path / "b", raw_url))
    partition(spark, _cfg(tmp_path / "c", raw_url, "partition.seed=99"))

    def shard0(d: str) -> list[int]:
        return _ids(spark, f"file://{tmp_path}/{d}/out/train/shard=0")

    assert shard0("a") == shard0("b")  # same rows in the same order
    assert set(shard0("a")) != set(shard0("c"))


def test_rerun_is_a_noop_and_leaves_output_identical(spark, tmp_path, raw_url):
    cfg = _cfg(tmp_path, raw_url)
    partition(spark, cfg)
    before = _snapshot(tmp_path / "out")
    again = partition(spark, cfg)
    assert again.skipped
    assert _snapshot(tmp_path / "out") == before
    # a changed setting rewrites the whole output: no old shard directory survives
    partition(spark, dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, num_shards=2)))
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir() if p.is_dir()) == ["shard=0", "shard=1"]
    assert not list(tmp_path.glob("out.*"))  # no temp or old siblings left behind


def test_random_sampling_fractions_and_replacement(spark, tmp_path, raw_url):
    partition(spark, _cfg(tmp_path / "wo", raw_url, "partition.mode=random_sample", "partition.sample_fraction=0.3"))
    m = read_manifest(f"file://{tmp_path}/wo/out")
    train_rows = ROWS - m.validation.rows
    assert abs(m.validation.rows - 500) < 4 * (ROWS * 0.1 * 0.9) ** 0.5
    for shard in m.train:
        ids = _ids(spark, m.shard_url(shard))
        assert len(ids) == len(set(ids))  # without replacement: no duplicates
        assert abs(len(ids) - 0.3 * train_rows) < 4 * (train_rows * 0.3 * 0.7) ** 0.5
    a, b = (set(_ids(spark, m.shard_url(s))) for s in m.train[:2])
    assert a != b  # independent samples

    partition(
        spark,
        _cfg(
            tmp_path / "w",
            raw_url,
            "partition.mode=random_sample",
            "partition.sample_fraction=1.0",
            "partition.with_replacement=true",
        ),
    )
    m = read_manifest(f"file://{tmp_path}/w/out")
    ids = _ids(spark, m.shard_url(m.train[0]))
    train_rows = ROWS - m.validation.rows
    assert abs(len(ids) - train_rows) < 4 * train_rows**0.5
    distinct = len(set(ids))
    # Poisson(1) draws: about 1 - 1/e of the rows appear at least once
    assert abs(distinct / train_rows - 0.632) < 0.03


def test_feature_groups_cover_every_feature_and_rejoin(spark, tmp_path, raw_url):
    partition(spark, _cfg(tmp_path, raw_url, "partition.feature_groups=2", "partition.feature_layout=columns"))
    m = read_manifest(f"file://{tmp_path}/out")
    flat = [n for g in m.feature_groups for n in g.features]
    assert sorted(flat) == sorted(m.feature_names) and len(flat) == len(set(flat))
    raw = spark.read.parquet(raw_url)
    for k, shard in enumerate(m.train):
        parts = [spark.read.parquet(m.shard_url(g.shards[k])) for g in m.feature_groups]
        # same rows, in the same order, in every group file of the shard
        orders = [[r.row_id for r in p.select("row_id").collect()] for p in parts]
        assert orders[0] == orders[1] == _ids(spark, m.shard_url(shard))
        joined = parts[0].join(parts[1].drop("label"), "row_id")
        assert joined.count() == shard.rows
        back = joined.select("row_id", *m.feature_names).exceptAll(
            raw.select("row_id", *[F.col(c).cast("float").alias(c) for c in m.feature_names])
        )
        assert back.count() == 0


def test_array_feature_groups_line_up_with_shards(spark, tmp_path, raw_url):
    partition(spark, _cfg(tmp_path, raw_url, "partition.feature_groups=3", "partition.feature_grouping=hashed"))
    m = read_manifest(f"file://{tmp_path}/out")
    assert len(m.feature_groups) == 3
    for g in m.feature_groups:
        sizes = {len(r.features) for r in spark.read.parquet(m.shard_url(g.shards[0])).select("features").collect()}
        assert sizes == {len(g.features)}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.label_col=nope"], "label column data.label_col='nope' is not in the input"),
        (["data.feature_cols=[f0, missing]"], "['missing']"),
        (["partition.num_shards=100000"], "partition.num_shards=100000 is larger than"),
        (["data.num_classes=2", "data.label_col=f0"], "must hold integer class ids"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_manifest(spark, tmp_path, raw_url, sets, message):
    with pytest.raises(PartitionError, match=None) as err:
        partition(spark, _cfg(tmp_path, raw_url, *sets))
    assert message in str(err.value)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert not list(tmp_path.glob("out*"))


def test_non_numeric_feature_and_labels_outside_classes(spark, tmp_path):
    df = spark.createDataFrame(
        [(i, float(i), "x", i % 3) for i in range(20)], "row_id long, a double, s string, label int"
    )
    df.write.parquet(str(tmp_path / "in"))
    with pytest.raises(PartitionError, match=r"feature column\(s\) \['s \(string\)'\] are not numeric"):
        partition(spark, _cfg(tmp_path, f"file://{tmp_path}/in", "data.feature_cols=[a, s]"))
    with pytest.raises(PartitionError, match=r"labels range from 0 to 2, outside the declared classes 0..1"):
        partition(spark, _cfg(tmp_path, f"file://{tmp_path}/in", "data.feature_cols=[a]", "partition.num_shards=2"))
    assert not (tmp_path / "out").exists()


def test_empty_input_and_output_that_is_a_file(spark, tmp_path, raw_url):
    spark.createDataFrame([], "row_id long, a double, label int").write.parquet(str(tmp_path / "empty"))
    with pytest.raises(PartitionError, match="empty"):
        partition(spark, _cfg(tmp_path, f"file://{tmp_path}/empty"))
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(OutputPathError, match="is an existing file, not a directory"):
        partition(spark, _cfg(tmp_path, raw_url))
    assert (tmp_path / "out").read_text() == "not a directory"


def test_nan_features_fail_or_are_dropped_and_counted(spark, tmp_path):
    rows = [(i, float("nan") if i == 7 else float(i), i % 2) for i in range(40)]
    spark.createDataFrame(rows, "row_id long, a double, label int").write.parquet(str(tmp_path / "in"))
    with pytest.raises(PartitionError, match=r"row_id 7 has a NaN/infinite feature.*data.invalid_values=drop"):
        partition(spark, _cfg(tmp_path, f"file://{tmp_path}/in", "partition.num_shards=2"))
    assert not list(tmp_path.glob("out*"))
    result = partition(
        spark, _cfg(tmp_path, f"file://{tmp_path}/in", "partition.num_shards=2", "data.invalid_values=drop")
    )
    assert result.dropped_rows == 1 and result.input_rows == 40
    assert sum(result.train_rows) + result.validation_rows == 39


def test_real_valued_labels_need_task_regression_and_must_be_finite(spark, tmp_path):
    rows = [(i, float(i % 5), 0.5 * i if i != 11 else float("nan")) for i in range(40)]
    spark.createDataFrame(rows, "row_id long, a double, label double").write.parquet(str(tmp_path / "in"))
    url, two = f"file://{tmp_path}/in", "partition.num_shards=2"
    with pytest.raises(PartitionError, match=r"has type double.*integer class ids.*set data.task=regression"):
        partition(spark, _cfg(tmp_path, url, two))
    with pytest.raises(PartitionError, match=r"row_id 11 is invalid: its label .* is NaN.*data.invalid_values=drop"):
        partition(spark, _cfg(tmp_path, url, two, "data.task=regression"))
    assert not list(tmp_path.glob("out*"))
    result = partition(spark, _cfg(tmp_path, url, two, "data.task=regression", "data.invalid_values=drop"))
    assert result.dropped_rows == 1 and sum(result.train_rows) + result.validation_rows == 39
    manifest = read_manifest(f"file://{tmp_path}/out")
    assert manifest.num_classes == 0 and manifest.schema["label"] == "double"
    labels = pq.read_table(str(tmp_path / "out"), columns=["label"]).column("label").to_pylist()
    assert sorted(labels) == sorted(0.5 * i for i in range(40) if i != 11)  # values kept, not cast to classes


def test_wide_feature_groups_do_not_grow_the_generated_code(spark, tmp_path):
    """24k features in 2 hashed groups: a group built as array(features[i], ...) ran Spark's codegen out of
    heap (a contiguous group is a slice; the feature-parallel regression test partitions that way)."""
    wide = GenerateConfig(
        output_url=f"file://{tmp_path}/wide", rows=200, features=24_000, partitions=1, weight_scale=0.01
    )
    write_dataset(spark, wide)
    sets = ("data.features_col=features", "partition.feature_groups=2", "partition.feature_grouping=hashed")
    manifest = read_manifest(
        partition(spark, _cfg(tmp_path, wide.output_url, *sets)).manifest_url[: -len(MANIFEST_NAME)]
    )
    group = manifest.feature_groups[1]
    names = {n: i for i, n in enumerate(manifest.feature_names)}
    sample = pq.read_table(str(tmp_path / "out" / group.shards[0].files[0].path)).slice(0, 1).to_pylist()[0]
    full = spark.read.parquet(wide.output_url).filter(F.col("row_id") == sample["row_id"]).first()
    assert len(sample["features"]) == len(group.features)
    assert sample["features"] == [full.features[names[n]] for n in group.features]


def test_unknown_config_key_lists_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) \['shards'\] in section 'partition'; valid keys: output_url"
    ):
        load_config(None, ["partition.shards=3"])
    with pytest.raises(ConfigError, match="partition.num_shards must be an integer"):
        load_config(None, ["partition.num_shards=two"])


def test_manifest_refuses_changed_or_missing_output(spark, tmp_path, raw_url):
    partition(spark, _cfg(tmp_path, raw_url))
    with pytest.raises(ManifestError, match="not a partition output"):
        read_manifest(f"file://{tmp_path}")
    victim = next((tmp_path / "out" / "train" / "shard=1").glob("*.parquet"))
    victim.unlink()
    with pytest.raises(ManifestError, match="missing; the output was changed"):
        read_manifest(f"file://{tmp_path}/out")


def test_fingerprint_follows_content_not_location_times_or_sizes(spark, tmp_path, raw_url, caplog):
    """A copy keeps the data fingerprint; a same-size edit changes it; an unchanged re-run reads nothing."""
    import logging
    import os
    import shutil

    import pyarrow as pa

    src = tmp_path / "src"
    shutil.copytree(raw_url[len("file://") :], src, ignore=shutil.ignore_patterns("*.crc"))  # files we rewrite
    # one file rewritten uncompressed and without dictionaries, so a value can change at the same size
    first = sorted(src.glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table, first, compression="none", use_dictionary=False)
    url = f"file://{src}"
    before = partition(spark, _cfg(tmp_path, url))
    fp = read_manifest(f"file://{tmp_path}/out").input_fingerprint
    recorded = read_manifest(f"file://{tmp_path}/out").input_files
    assert not before.skipped and len(recorded) == len(list(src.glob("part-*")))

    # a copy elsewhere (new times, new location): the same fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    out2 = f"{tmp_path}/out2"
    partition(spark, _cfg(tmp_path, f"file://{copy}", f"partition.output_url={out2}"))
    assert read_manifest(f"file://{out2}").input_fingerprint == fp

    # an unchanged re-run: a no-op that reads no input file to fingerprint it
    caplog.clear()  # the runs above logged their scans (when an earlier test left INFO on)
    with caplog.at_level(logging.INFO, logger="sparkml_dist.fingerprint"):
        noop = partition(spark, _cfg(tmp_path, url))
    assert noop.skipped and noop.fingerprint_s == 0 < before.fingerprint_s
    assert not [r for r in caplog.records if "fingerprinting" in r.getMessage()]

    # one value edited in place, the file's size unchanged: a new fingerprint, so the output is rebuilt
    size = first.stat().st_size
    col = "f0"
    values = table.column(col).to_pylist()
    values[len(values) // 2] = values[len(values) // 2] + 0.5
    field = table.schema.field(col)
    edited = table.set_column(table.column_names.index(col), field, pa.array(values, field.type))
    pq.write_table(edited, first, compression="none", use_dictionary=False)
    assert first.stat().st_size == size
    again = partition(spark, _cfg(tmp_path, url))
    assert not again.skipped and read_manifest(f"file://{tmp_path}/out").input_fingerprint != fp
    fp_edited = read_manifest(f"file://{tmp_path}/out").input_fingerprint

    # the documented limit: size and time both unchanged (the time forged back) reuse the recorded digest;
    # partition.rehash=true reads every file regardless
    edited_mtime = first.stat().st_mtime_ns
    pq.write_table(table, first, compression="none", use_dictionary=False)  # the original values again
    os.utime(first, ns=(edited_mtime, edited_mtime))
    assert partition(spark, _cfg(tmp_path, url)).skipped
    restored = partition(spark, _cfg(tmp_path, url, "partition.rehash=true"))
    assert not restored.skipped and read_manifest(f"file://{tmp_path}/out").input_fingerprint == fp != fp_edited
