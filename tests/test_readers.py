"""The reader seam (sparkml_dist/readers): the arrow reader yields the petastorm reader's batches bit for bit,
every delivered row group is checked against the manifest, and train.reader=auto picks what can run here.

Real Spark writes and partitions the data (array, scalar-columns and sparse layouts, feature groups); both
readers read the same files. ~1 min on the shared 2-core machine. On a stack where Petastorm cannot import
(pyarrow >= 15) the same tests run the arrow reader alone: its batches are compared with its own at other
worker counts, and ``test_the_planned_shuffle_is_petastorms`` pins the order to Petastorm's by value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparkml_dist import readers
from sparkml_dist.config import TrainConfig, load_config
from sparkml_dist.errors import InfraError, UserError
from sparkml_dist.feature_parallel import build_block_spec
from sparkml_dist.loader import (
    LoaderSpec,
    build_loader_spec,
    iterate_aligned_batches,
    iterate_batches,
    iterate_chunks,
    read_all,
)
from sparkml_dist.manifest import Manifest, ManifestError, read_manifest
from sparkml_dist.partition import partition
from sparkml_dist.readers import READERS, ReaderError, RowGroupError, arrow_reader, open_row_groups, resolve_reader
from sparkml_dist.readers.plan import Plan, plan_row_groups, planned_order
from sparkml_dist.synthetic import write_dataset

BATCH = 64
PETASTORM = readers.petastorm_unusable() is None
READER_NAMES = ("petastorm", "arrow") if PETASTORM else ("arrow",)
REFERENCE = READER_NAMES[0]
"""What the arrow reader's batches are compared with: petastorm's, or where it cannot run its own."""
needs_petastorm = pytest.mark.skipif(not PETASTORM, reason=f"petastorm cannot run here: {readers.petastorm_unusable()}")


# ------------------------------------------------------------------ data: the three layouts and feature groups


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("readers")


@pytest.fixture(scope="module")
def raw(spark, work) -> str:
    cfg = load_config(None, [f"paths.work_dir={work}", "generate.rows=3000", "generate.features=8"])
    write_dataset(spark, cfg.generate)
    return str(work)


def _partition(spark, work, name: str, *sets: str) -> Manifest:
    out = f"file://{work}/{name}"
    partition(spark, load_config(None, [f"paths.work_dir={work}", f"partition.output_url={out}", *sets]))
    return read_manifest(out)


@pytest.fixture(scope="module", params=["array", "columns", "sparse"])
def manifest(request, spark, work, raw) -> Manifest:
    """Two random-sample shards of unequal size, many small row groups."""
    sample = ["partition.mode=random_sample", "partition.sample_fraction=0.6", "partition.num_shards=2"]
    if request.param != "sparse":
        m = _partition(
            spark,
            work,
            request.param,
            f"partition.feature_layout={request.param}",
            "partition.row_group_mb=0.01",
            *sample,
        )
    else:  # categorical columns hashed into a sparse feature space
        rng = np.random.default_rng(0)
        n = 3000
        src = work / "clicks"
        src.mkdir()
        site, device, price = rng.integers(0, 300, n), rng.integers(0, 4, n), rng.standard_normal(n)
        pq.write_table(
            pa.table(
                {
                    "row_id": np.arange(n),
                    "site": [f"s{s}" for s in site],
                    "device": device.astype(np.int32),
                    "price": price,
                    "label": (price + (device == 2) > 0.5).astype(np.int64),
                }
            ),
            src / "part-0.parquet",
        )
        m = _partition(
            spark,
            work,
            "sparse",
            f"data.input_url=file://{src}",
            "data.categorical_cols=[site,device]",
            "data.hash_buckets=64",
            "partition.feature_layout=sparse",
            "partition.row_group_mb=0.002",
            *sample,
        )
        assert m.sparse is not None
    assert all(s.row_groups > 4 for s in m.train) and m.validation.row_groups > 1
    return m


@pytest.fixture(scope="module")
def grouped(spark, work, raw) -> tuple[Manifest, TrainConfig]:
    """Two feature groups (hashed), whose files cut row groups at other rows than the sample shards'."""
    sets = ["partition.num_shards=2", "partition.feature_groups=2", "partition.feature_grouping=hashed",
            "partition.row_group_mb=0.004"]  # fmt: skip
    return _partition(spark, work, "grouped", *sets), _train()


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": BATCH, "shuffle_buffer_rows": 256, "seed": 3, **kw})


def _with(spec: LoaderSpec, reader: str, workers: int = 1, **kw) -> LoaderSpec:
    return dataclasses.replace(spec, reader=reader, workers_count=workers, **kw)


def _dense(t: torch.Tensor) -> list[torch.Tensor]:
    """A batch tensor as plain tensors torch.equal compares (a sparse CSR batch as its three arrays)."""
    if t.layout == torch.sparse_csr:
        return [t.crow_indices(), t.col_indices(), t.values(), torch.tensor(t.shape)]
    return [t]


def _assert_same_batches(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(a) == len(b) and a
    for first, other in zip(a, b, strict=True):
        assert len(first) == len(other)
        for u, v in zip(first, other, strict=True):
            du, dv = _dense(u), _dense(v)
            assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(du, dv, strict=True))


def _batches(spec: LoaderSpec, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    with iterate_batches(spec, epoch) as it:
        return [tuple(t.clone() for t in b) for b in it]


# ------------------------------------------------------------------ the same batches, bit for bit


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_arrow_yields_petastorms_batches_bit_for_bit(manifest, shuffle):
    for rank in (0, 1):
        for seed, epoch, (pw, aw) in ((3, 0, (1, 3)), (3, 1, (3, 1)), (11, 0, (2, 2))):
            spec = build_loader_spec(manifest, rank, 2, _train(shuffle=shuffle, seed=seed))
            petastorm = _batches(_with(spec, REFERENCE, pw), epoch)
            arrow = _batches(_with(spec, "arrow", aw), epoch)
            _assert_same_batches(petastorm, arrow)
    if shuffle:  # and shuffling does change the stream (the test above compares something that varies)
        spec = _with(build_loader_spec(manifest, 0, 2, _train(shuffle=True)), "arrow")
        labels = [torch.cat([y for _, y in _batches(spec, epoch)]) for epoch in (0, 1)]
        assert not torch.equal(*labels)


@needs_petastorm
def test_shuffled_row_group_order_is_petastorms_for_many_seeds(manifest):
    """Petastorm's ventilation order is checked against the plan on every table (``_tagged`` + ``checked``):
    reading every row group through it for many seeds proves the plan reproduces its shuffle."""
    spec = _with(build_loader_spec(manifest, 0, 2, _train(shuffle=True)), "petastorm", 3)
    orders = set()
    for seed in range(12):
        with open_row_groups(spec, seed) as tables:
            assert sum(t.num_rows for t in tables) == manifest.train[0].rows
        orders.add(plan_row_groups(spec, seed).order)
    assert len(orders) == 12


def test_validation_windows_read_all_and_iterate_chunks_are_the_same(manifest):
    for world in (1, 3):
        for rank in range(world):
            val = build_loader_spec(manifest, rank, world, _train(), split="validation")
            assert val.row_range is not None
            px, py = read_all(_with(val, REFERENCE, 2))
            ax, ay = read_all(_with(val, "arrow", 3))
            assert len(py) == val.row_range[1] - val.row_range[0]
            np.testing.assert_array_equal(py, ay)
            if manifest.sparse is None:
                np.testing.assert_array_equal(px, ax)
                assert px.dtype == ax.dtype == np.float32
            else:
                _assert_same_batches([(px.to_torch(),)], [(ax.to_torch(),)])
            with iterate_chunks(_with(val, "arrow", 2)) as chunks:
                got = list(chunks)
            np.testing.assert_array_equal(np.concatenate([y for _, y in got]), py)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in_order", "shuffled"])
def test_aligned_feature_parallel_batches_are_the_same(grouped, shuffle):
    m, cfg = grouped
    cfg = dataclasses.replace(cfg, shuffle=shuffle)
    steps = sum(s.rows for s in m.train) // BATCH
    for rank in (0, 1):
        spec = build_block_spec(m, rank, cfg, steps)
        assert spec.file_counts and spec.reader == REFERENCE  # what auto picks on this stack
        for epoch, (pw, aw) in ((0, (1, 3)), (1, (3, 1))):
            with iterate_aligned_batches(_with(spec, REFERENCE, pw), epoch) as it:
                petastorm = [tuple(t.clone() for t in b) for b in it]
            with iterate_aligned_batches(_with(spec, "arrow", aw), epoch) as it:
                arrow = [tuple(t.clone() for t in b) for b in it]
            assert len(petastorm) == steps
            _assert_same_batches(petastorm, arrow)


def test_the_planned_shuffle_is_petastorms():
    """By value (numpy's legacy RandomState stream is frozen, so this holds on numpy 1 and 2), and, where
    Petastorm runs, against its own ConcurrentVentilator fed the same items."""
    assert planned_order(12, 3) == (5, 4, 1, 2, 11, 6, 7, 0, 3, 9, 8, 10)
    assert planned_order(7, 2**32 - 1) == (1, 5, 0, 6, 4, 2, 3)
    assert planned_order(5, None) == (0, 1, 2, 3, 4) and planned_order(0, 9) == ()
    if not PETASTORM:
        return
    from petastorm.workers_pool.ventilator import ConcurrentVentilator

    for n, seed in ((1, 5), (12, 3), (40, 12345), (300, 2**32 - 1)):
        got: list[int] = []
        done = threading.Event()

        def ventilate(piece_index: int, n: int = n, got: list[int] = got, done: threading.Event = done, **_) -> None:
            got.append(piece_index)
            if len(got) == n:
                done.set()

        items = [{"piece_index": i} for i in range(n)]
        ventilator = ConcurrentVentilator(ventilate, items, iterations=1, randomize_item_order=True, random_seed=seed)
        ventilator.start()
        assert done.wait(10)
        ventilator.stop()
        assert tuple(got) == planned_order(n, seed)


# ------------------------------------------------------------------ the arrow reader's own contract


def test_arrow_reader_keeps_at_most_workers_plus_two_row_groups_ahead(manifest, monkeypatch):
    reads: list[int] = []
    real = arrow_reader._read

    def counting(plan: Plan, index: int, columns: list[str]) -> pa.Table:
        reads.append(index)
        return real(plan, index, columns)

    monkeypatch.setattr(arrow_reader, "_read", counting)
    for workers in (1, 3):
        reads.clear()
        spec = _with(build_loader_spec(manifest, 0, 1, _train(shuffle=True)), "arrow", workers)
        with open_row_groups(spec, 7) as tables:
            handed = 0
            for _ in tables:
                handed += 1
                assert len(reads) - handed <= workers + 1  # + the one just handed over = workers + 2 ahead
        assert sorted(reads) == list(range(sum(s.row_groups for s in manifest.train)))


def test_arrow_reader_threads_are_joined_on_early_exit_and_on_error(manifest):
    spec = _with(build_loader_spec(manifest, 0, 2, _train()), "arrow", 3)
    before = set(threading.enumerate())
    with iterate_batches(spec, 0) as batches:
        next(batches)
        assert len(set(threading.enumerate()) - before) >= 1
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(RuntimeError, match="boom"), iterate_batches(spec, 1) as batches:
        next(batches)
        raise RuntimeError("boom")
    assert set(threading.enumerate()) - before == set()
    with (
        pytest.raises(ValueError, match="the arrow reader decodes in threads"),
        iterate_batches(dataclasses.replace(spec, reader_pool="process"), 0),
    ):
        pass


# ------------------------------------------------------------------ never lose a row group silently


def _dropping(base: str, where: str) -> readers.RowGroupReader:
    """A reader that loses one row group of ``base``'s stream: the 3rd, the last, or cuts the 3rd short."""

    @contextmanager
    def read(spec: LoaderSpec, plan: Plan, columns: list[str]) -> Iterator[Iterator[tuple[int, pa.Table]]]:
        victim = 2 if where in ("middle", "short") else len(plan.order) - 1

        def lossy(tagged: Iterator[tuple[int, pa.Table]]) -> Iterator[tuple[int, pa.Table]]:
            for pos, (index, table) in enumerate(tagged):
                if pos != victim:
                    yield index, table
                elif where == "short":
                    yield index, table.slice(1)

        with READERS.get(base)(spec, plan, columns) as tagged:
            yield lossy(tagged)

    return read


for _base in READER_NAMES:
    for _where in ("middle", "last", "short"):
        READERS.register(f"test-drop-{_where}-{_base}")(_dropping(_base, _where))


@pytest.mark.parametrize("base", READER_NAMES)
def test_a_dropped_or_short_row_group_fails_naming_shard_file_and_rows(manifest, base):
    spec = build_loader_spec(manifest, 0, 1, _train(shuffle=False))
    whole = dataclasses.replace(spec, steps=manifest.train[0].rows // BATCH + manifest.train[1].rows // BATCH)
    plan = plan_row_groups(spec, None)
    third, last = plan.row_groups[plan.order[2]], plan.row_groups[plan.order[-1]]
    name = f"train/shard=0\\+train/shard=1: row group {third.index} of {spec.urls[third.file]}"

    with pytest.raises(RowGroupError, match=rf"^{name} \({third.rows} rows\) was never handed over") as lost:
        with iterate_batches(dataclasses.replace(whole, reader=f"test-drop-middle-{base}"), 0) as it:
            list(it)
    assert isinstance(lost.value, InfraError) and not isinstance(lost.value, UserError)

    with pytest.raises(RowGroupError, match=rf"^{name} \({third.rows} rows\) came with {third.rows - 1} rows"):
        read_all(dataclasses.replace(spec, reader=f"test-drop-short-{base}"))

    # The last row group: nothing comes after it to reveal a gap, only the end of the reader does.
    total = sum(s.rows for s in manifest.train)
    ended = (
        rf"ended after {len(plan.order) - 1} of {len(plan.order)} planned row groups, {total - last.rows} of "
        rf"{total} rows; 1 never came, first row group {last.index} of {spec.urls[last.file]}"
    )
    with pytest.raises(RowGroupError, match=ended):
        read_all(dataclasses.replace(spec, reader=f"test-drop-last-{base}"))
    with pytest.raises(RowGroupError, match=ended):  # every batch needs every row: found at the end
        with iterate_batches(dataclasses.replace(spec, reader=f"test-drop-last-{base}", steps=total // 4), 0) as it:
            list(it)


@pytest.mark.parametrize("base", READER_NAMES)
def test_a_check_that_stops_early_covers_the_prefix_it_read(manifest, base):
    """Steps that end before the shard's last row group never read it, so losing it changes no batch."""
    spec = dataclasses.replace(build_loader_spec(manifest, 0, 1, _train(shuffle=False)), steps=2)
    plan = plan_row_groups(spec, None)
    assert 2 * BATCH < plan.rows - plan.row_groups[plan.order[-1]].rows  # the last row group is not needed
    _assert_same_batches(
        _batches(dataclasses.replace(spec, reader=base), 0),
        _batches(dataclasses.replace(spec, reader=f"test-drop-last-{base}"), 0),
    )


def test_footers_that_disagree_with_the_manifest_are_refused_before_reading(manifest):
    spec = build_loader_spec(manifest, 1, 2, _train())
    (rows, groups), *rest = spec.file_counts
    bad = dataclasses.replace(spec, file_counts=((rows + 1, groups), *rest), reader="arrow")
    with pytest.raises(ManifestError, match=rf"holds {rows} rows in {groups} row groups, the manifest says {rows + 1}"):
        read_all(bad)


# ------------------------------------------------------------------ choosing the reader


def test_auto_is_petastorm_here_and_arrow_where_petastorm_cannot_import(grouped, monkeypatch, caplog):
    assert resolve_reader("auto") == REFERENCE and resolve_reader("arrow") == "arrow"
    why = "import petastorm failed: ModuleNotFoundError: No module named 'pyarrow.filesystem' (simulated)"
    monkeypatch.setattr(readers, "petastorm_unusable", lambda: why)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparkml_dist.readers"):
        assert resolve_reader("auto") == "arrow"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"train.reader=auto: reading shards with the arrow reader: {why}")
    ]
    with pytest.raises(ReaderError) as err:
        resolve_reader("petastorm")
    text = str(err.value)
    assert "\n" not in text and why in text and "set train.reader=arrow" in text and "petastorm>=0.12.1,<0.13" in text
    m, cfg = grouped
    with pytest.raises(ReaderError):
        build_loader_spec(m, 0, 2, dataclasses.replace(cfg, reader="petastorm"))
    spec = build_loader_spec(m, 0, 2, cfg)
    assert spec.reader == "arrow"
    with pytest.raises(ReaderError):  # a spec resolved elsewhere is checked again where the reader opens
        read_all(dataclasses.replace(spec, reader="petastorm"))


def test_without_petastorm_the_loader_imports_and_reads_with_arrow(manifest):
    """A subprocess where ``import petastorm`` fails: auto picks arrow (saying why), the batches are the ones
    petastorm gives here, and neither petastorm nor pyspark is imported on the rank side."""
    spec = build_loader_spec(manifest, 0, 2, _train(shuffle=True))
    expected = _batches(_with(spec, REFERENCE, 2), 1)
    code = f"""
import json, logging, sys
sys.modules["petastorm"] = None  # import petastorm raises ImportError
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from sparkml_dist.config import TrainConfig
from sparkml_dist.loader import build_loader_spec, iterate_batches
from sparkml_dist.manifest import read_manifest
m = read_manifest({manifest.root_url!r})
spec = build_loader_spec(m, 0, 2, TrainConfig(batch_size={BATCH}, shuffle_buffer_rows=256, seed=3))
with iterate_batches(spec, 1) as it:
    labels = [b[1].tolist() for b in it]
print(json.dumps({{"reader": spec.reader, "labels": labels, "pyspark": "pyspark" in sys.modules,
                  "petastorm": sys.modules.get("petastorm") is not None}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"reader": "arrow", "labels": [y.tolist() for _, y in expected], "pyspark": False,
                   "petastorm": False}  # fmt: skip
    assert "WARNING train.reader=auto: reading shards with the arrow reader: import petastorm failed" in out.stderr


def test_reader_names_come_from_the_registry():
    from sparkml_dist import registry

    assert registry.load("readers") is READERS and {"petastorm", "arrow"} <= set(READERS.names())
    with pytest.raises(registry.UnknownNameError, match="train.reader='nope' is not a known row-group reader"):
        resolve_reader("nope")


# ------------------------------------------------------------------ URLs


def test_one_url_helper_maps_local_hdfs_and_s3_urls(monkeypatch):
    from pyarrow import fs as pafs

    from sparkml_dist import manifest as manifest_mod

    built: list[tuple[str, str]] = []
    monkeypatch.setattr(manifest_mod, "_filesystem", lambda scheme, auth: built.append((scheme, auth)) or scheme)
    assert manifest_mod.arrow_fs("s3a://bucket/out/train/shard=0/part 1.parquet") == (
        "s3",
        "bucket/out/train/shard=0/part 1.parquet",
    )
    assert manifest_mod.arrow_fs("s3://bucket/a%20b/") == ("s3", "bucket/a b")
    assert manifest_mod.arrow_fs("hdfs://nn:8020/data/x.parquet") == ("hdfs", "/data/x.parquet")
    assert built == [("s3", "bucket"), ("s3", "bucket"), ("hdfs", "nn:8020")]
    for url, path in (("file:///tmp/my set/x", "/tmp/my set/x"), ("/tmp/x", "/tmp/x"), ("file:/tmp/x", "/tmp/x")):
        fs, got = manifest_mod.arrow_fs(url)
        assert isinstance(fs, pafs.LocalFileSystem) and got == path
