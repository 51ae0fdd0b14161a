"""The loader (with the reader train.reader=auto picks: Petastorm on this stack) over real Parquet written by
the partition job (both feature layouts); tests/test_readers.py holds both readers to the same batches."""

from __future__ import annotations

import dataclasses
import pickle
import threading

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkml_dist.config import ConfigError, TrainConfig, load_config
from sparkml_dist.loader import (
    LoaderError,
    build_loader_spec,
    iterate_aligned_batches,
    iterate_batches,
    iterate_chunks,
    read_all,
    steps_per_epoch,
)
from sparkml_dist.manifest import Manifest, read_manifest
from sparkml_dist.partition import partition
from sparkml_dist.readers import RowGroupError, petastorm_unusable
from sparkml_dist.readers.petastorm_reader import SEQ_KEY, _in_ventilation_order
from sparkml_dist.synthetic import write_dataset

FEATURES = 8
BATCH = 64
NEEDS_PETASTORM = pytest.mark.skipif(
    petastorm_unusable() is not None, reason="reader processes are Petastorm's; it cannot run here"
)


@pytest.fixture(scope="module")
def raw(spark, tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("loader")
    cfg = load_config(None, [f"paths.work_dir={work}", "generate.rows=3000", f"generate.features={FEATURES}"])
    write_dataset(spark, cfg.generate)
    return str(work)


@pytest.fixture(scope="module", params=["array", "columns"])
def manifest(request, spark, raw) -> Manifest:
    """Two random-sample shards of unequal size, several small row groups per file."""
    out = f"{raw}/{request.param}"
    sets = [
        f"paths.work_dir={raw}",
        f"partition.output_url={out}",
        f"partition.feature_layout={request.param}",
        "partition.mode=random_sample",
        "partition.sample_fraction=0.5",
        "partition.num_shards=2",
        "partition.row_group_mb=0.01",
    ]
    partition(spark, load_config(None, sets))
    m = read_manifest(f"file://{out}")
    assert m.train[0].rows != m.train[1].rows and m.train[0].row_groups > 2
    return m


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": BATCH, "shuffle_buffer_rows": 256, "seed": 3, **kw})


def _collect(spec, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    with iterate_batches(spec, epoch) as batches:
        out = list(batches)
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


def _file_rows(m: Manifest, urls: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The files' rows in Parquet order, read straight with pyarrow."""
    t = pq.read_table([u.removeprefix("file://") for u in urls])
    if m.features_col:
        x = np.stack(t.column(m.features_col).to_numpy(zero_copy_only=False))
    else:
        x = np.column_stack([t.column(c).to_numpy() for c in m.feature_names])
    return x, t.column(m.label_col).to_numpy()


def test_every_rank_runs_the_same_steps_with_unequal_shards(manifest):
    rows = [s.rows for s in manifest.train]
    batch = next(b for b in range(BATCH, 200) if rows[0] // b != rows[1] // b)  # shards of unequal batch counts
    steps = steps_per_epoch(manifest, batch, 2)
    assert steps == min(rows) // batch < max(rows) // batch
    assert steps_per_epoch(manifest, batch, 2, max_steps=3) == 3
    for rank in range(2):
        spec = build_loader_spec(manifest, rank, 2, _train(batch_size=batch))
        assert spec.steps == steps and pickle.loads(pickle.dumps(spec)) == spec
        with iterate_batches(spec, 0) as batches:
            got = list(batches)
        assert len(got) == steps
        for x, y in got:
            assert x.shape == (batch, FEATURES) and x.dtype == torch.float32 and x.is_contiguous()
            assert y.shape == (batch,) and y.dtype == torch.int64


def test_shuffle_off_gives_the_parquet_file_order(manifest):
    spec = build_loader_spec(manifest, 1, 2, _train(shuffle=False))
    x, y = _collect(spec)
    fx, fy = _file_rows(manifest, spec.urls)
    n = spec.steps * BATCH
    np.testing.assert_array_equal(x.numpy(), fx[:n])
    np.testing.assert_array_equal(y.numpy(), fy[:n])
    assert torch.equal(_collect(spec, epoch=5)[0], x)  # the epoch changes nothing without shuffling


def test_shuffle_is_seeded_by_seed_epoch_and_rank(manifest):
    spec = build_loader_spec(manifest, 0, 2, _train())
    x, y = _collect(spec)
    again, _ = _collect(spec)
    assert torch.equal(x, again)
    for other in (_collect(spec, epoch=1)[0], _collect(dataclasses.replace(spec, seed=4))[0]):
        assert other.shape == x.shape and not torch.equal(other, x)
    # a shuffled epoch is distinct rows of the shard, labels still attached to their features
    fx, fy = _file_rows(manifest, spec.urls)
    index = {row.tobytes(): label for row, label in zip(fx, fy, strict=True)}
    keys = [row.tobytes() for row in x.numpy()]
    assert len(set(keys)) == len(keys) and [index[k] for k in keys] == y.tolist()
    assert not np.array_equal(x.numpy(), fx[: len(x)])


def test_reader_is_closed_after_early_break_and_after_an_exception(manifest):
    spec = build_loader_spec(manifest, 0, 2, _train())
    before = set(threading.enumerate())
    with iterate_batches(spec, 0) as batches:
        for i, _ in enumerate(batches):
            assert len(set(threading.enumerate()) - before) >= 1  # the reader's threads are running
            if i == 1:
                break
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(RuntimeError, match="boom"), iterate_batches(spec, 0) as batches:
        next(batches)
        raise RuntimeError("boom")
    assert set(threading.enumerate()) - before == set()


def test_a_shard_smaller_than_one_batch_is_a_clear_error(manifest):
    small = min(s.rows for s in manifest.train)
    with pytest.raises(LoaderError, match=r"shard train/shard=\d \(\d+ rows\).*lower train.batch_size to at most"):
        build_loader_spec(manifest, 0, 2, _train(batch_size=small + 1))
    spec = dataclasses.replace(build_loader_spec(manifest, 0, 2, _train(shuffle=False)), steps=10_000)
    with pytest.raises(LoaderError, match="ran out of rows"), iterate_batches(spec, 0) as batches:
        list(batches)
    with pytest.raises(LoaderError, match="world size 3"):
        steps_per_epoch(manifest, BATCH, 3)


def test_validation_shares_are_equal_contiguous_and_cover_the_split(manifest):
    whole_x, whole_y = read_all(build_loader_spec(manifest, 0, 1, _train(), split="validation"))
    fx, fy = _file_rows(manifest, tuple(manifest.file_urls(manifest.validation)))
    np.testing.assert_array_equal(whole_x, fx)
    np.testing.assert_array_equal(whole_y, fy)
    assert whole_x.dtype == np.float32 and whole_y.dtype == np.int64 and len(whole_y) == manifest.validation.rows
    parts = [read_all(build_loader_spec(manifest, r, 3, _train(), split="validation")) for r in range(3)]
    assert max(len(p[1]) for p in parts) - min(len(p[1]) for p in parts) <= 1
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole_x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_y)


# ------------------------------------------------------------------ several reader workers: the same stream


def _tagged(seq: int, rows: int) -> pa.Table:
    return pa.table({"v": np.full(rows, seq)}).replace_schema_metadata({SEQ_KEY: str(seq).encode()})


def test_the_reorder_buffer_releases_tables_in_ventilation_order():
    """No Spark, no Petastorm: tables finishing out of order come out in order; a lost one is an error."""
    empty = pa.table({}).replace_schema_metadata({SEQ_KEY: b"3"})  # what a worker sends for a row group without rows
    finished = [_tagged(2, 2), _tagged(0, 1), empty, _tagged(1, 3), _tagged(5, 2), _tagged(4, 1)]
    out = [t.column("v")[0].as_py() if t.num_rows else None for t in _in_ventilation_order(iter(finished), "s")]
    assert out == [0, 1, 2, None, 4, 5]
    with pytest.raises(RowGroupError, match=r"s: the reader ended after 1 row groups with later ones \[2, 3\] waiting"):
        list(_in_ventilation_order(iter([_tagged(0, 1), _tagged(3, 1), _tagged(2, 1)]), "s"))


@pytest.mark.parametrize(
    ("workers", "pool"), [(3, "thread"), (4, "thread"), pytest.param(2, "process", marks=NEEDS_PETASTORM)]
)
@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_n_reader_workers_give_exactly_the_one_worker_stream(manifest, shuffle, workers, pool):
    one = build_loader_spec(manifest, 0, 2, _train(shuffle=shuffle), workers_count=1)
    many = dataclasses.replace(one, workers_count=workers, reader_pool=pool)
    assert build_loader_spec(manifest, 0, 2, _train(shuffle=shuffle, reader_workers=workers)).workers_count == workers
    for epoch in (0, 1):
        with iterate_batches(one, epoch) as a, iterate_batches(many, epoch) as b:
            pairs = list(zip(a, b, strict=True))
        assert len(pairs) == one.steps
        for (x1, y1), (xn, yn) in pairs:
            assert torch.equal(x1, xn) and torch.equal(y1, yn)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_n_reader_workers_keep_aligned_batches_and_row_windows(manifest, shuffle):
    one = dataclasses.replace(
        build_loader_spec(manifest, 0, 1, _train(shuffle=shuffle), workers_count=1), row_id_col=manifest.row_id_col
    )
    many = dataclasses.replace(one, workers_count=4)
    with iterate_aligned_batches(one, 2) as a, iterate_aligned_batches(many, 2) as b:
        pairs = list(zip(a, b, strict=True))
    assert len(pairs) == one.steps
    for first, other in pairs:
        assert all(torch.equal(u, v) for u, v in zip(first, other, strict=True))
    for world in (1, 3):
        for rank in range(world):
            val = build_loader_spec(manifest, rank, world, _train(), split="validation", workers_count=1)
            x1, y1 = read_all(val)
            xn, yn = read_all(dataclasses.replace(val, workers_count=3))
            np.testing.assert_array_equal(x1, xn)
            np.testing.assert_array_equal(y1, yn)
            with iterate_chunks(dataclasses.replace(val, workers_count=3)) as chunks:
                np.testing.assert_array_equal(np.concatenate([x for x, _ in chunks]), x1)


@pytest.mark.parametrize("pool", ["thread", pytest.param("process", marks=NEEDS_PETASTORM)])
def test_n_reader_workers_are_stopped_and_joined_on_early_exit(manifest, pool):
    spec = dataclasses.replace(build_loader_spec(manifest, 0, 2, _train()), workers_count=3, reader_pool=pool)
    me = psutil.Process()
    threads, children = set(threading.enumerate()), {p.pid for p in me.children(recursive=True)}
    with iterate_batches(spec, 0) as batches:
        next(batches)
        running = set(threading.enumerate()) - threads
        started = {p.pid for p in me.children(recursive=True)} - children
        assert len(running if pool == "thread" else started) >= 3  # the workers are up
    assert set(threading.enumerate()) - threads == set()
    assert {p.pid for p in me.children(recursive=True)} - children == set()
    with pytest.raises(RuntimeError, match="boom"), iterate_batches(spec, 1) as batches:
        next(batches)
        raise RuntimeError("boom")
    assert set(threading.enumerate()) - threads == set()
    assert {p.pid for p in me.children(recursive=True)} - children == set()


def test_reader_workers_must_be_positive(manifest):
    with pytest.raises(ConfigError, match="train.reader_workers must be >= 1, got 0"):  # at config time
        _train(reader_workers=0)
    train = _train()
    object.__setattr__(train, "reader_workers", 0)  # past the config check: the loader refuses it too
    with pytest.raises(LoaderError, match="train.reader_workers must be >= 1, got 0"):
        build_loader_spec(manifest, 0, 2, train)
