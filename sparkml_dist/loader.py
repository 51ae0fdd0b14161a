"""A rank's shard -> fixed-size torch batches, read with Petastorm; runs inside Horovod ranks (no pyspark).

Steps: every rank runs exactly ``steps_per_epoch`` = min over ranks of floor(rows_r / batch_size) batches
per epoch (capped by ``train.max_steps_per_epoch``), so unequal shards never leave a rank waiting in a
collective. A larger shard's remainder is skipped for that epoch: with shuffle off always the same rows
(the end of the shard in file order); with shuffle on, the last rows of that epoch's seeded stream, so a
different random set each epoch.

Order: Petastorm's ventilator hands row groups to ``workers_count`` reader workers (threads or processes)
in one order: file order, or with shuffle on a permutation seeded through ``Reader(seed=...)``. Workers
finish in any order, so our pool numbers every row group as it is ventilated, our worker tags the decoded
table with that number, and a reorder buffer releases tables strictly in ventilation order. The stream is
therefore the same for any number of workers (the one-worker stream) and a pure function of (files, seed,
epoch, rank). Shuffle on: rows then pass through our seeded shuffle buffer; both seeds derive from (seed,
epoch, rank).

Memory: the ventilator keeps at most ``workers_count + 2`` row groups ventilated and not yet consumed, so
the reorder buffer never holds more than that many tables, whatever the shard size; plus the shuffle buffer.

Speed: Petastorm's results reader turns every column into pandas and a list column into an object array
stacked row by row (about 0.4x a raw pyarrow scan). Our worker's results reader hands over the Arrow table
the worker decoded and we convert it ourselves: the array layout zero-copy
(``ListArray.flatten().to_numpy().reshape``), the scalar-columns layout with one ``np.stack``. Decoding
releases the GIL, so reader threads decode row groups in parallel; processes also decode in parallel but
pay an Arrow IPC copy per row group and a process start per reader (``bench/loader.py`` measures both).
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkml_dist.config import TrainConfig
from sparkml_dist.errors import UserError
from sparkml_dist.manifest import Manifest, ShardEntry
from sparkml_dist.metrics import REGRESSION
from sparkml_dist.sparse import SparseRows, concatenate, from_arrow, take, to_tensor

if TYPE_CHECKING:  # torch is imported where batches are made: reader processes import this module without it
    import torch

RESULTS_QUEUE_SIZE = 4
"""Thread pool queue entries; each row group puts its table and a 'processed' marker, so <= 2 tables wait."""
READER_POOLS = ("thread", "process")
"""Petastorm worker pools a ``LoaderSpec.reader_pool`` may name."""
SEQ_KEY = b"sparkml_dist.ventilation_seq"
"""Schema-metadata key of the number our worker tags each row group's table with (survives Arrow IPC)."""

Batch = tuple["torch.Tensor", "torch.Tensor"]
Chunk = tuple[Any, np.ndarray]
"""(features: float32 [rows, F] ndarray, or SparseRows for the sparse layout; labels [rows])."""


class LoaderError(UserError):
    """A shard cannot deliver the batches asked for; the message names the shard and the fix."""


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a rank needs to stream its data; built on the driver, pickled into the task."""

    shard: str
    """Shard name(s), for messages."""
    urls: tuple[str, ...]
    """Parquet file URLs, read in this order (with shuffle off)."""
    features_col: str | None
    """The array<float> column ('array' layout), or None: ``feature_cols`` are scalar columns."""
    feature_cols: tuple[str, ...]
    """Feature names in model order (the column names for the scalar layout)."""
    label_col: str
    batch_size: int
    steps: int
    """Full batches per epoch; equal on every rank."""
    shuffle: bool
    shuffle_buffer_rows: int
    seed: int
    rank: int
    workers_count: int = 1
    """Petastorm reader workers decoding row groups in parallel; the stream is the same for any count."""
    reader_pool: Literal["thread", "process"] = "thread"
    """Petastorm worker pool: threads (default, measured faster here) or processes (Arrow IPC per row group)."""
    row_range: tuple[int, int] | None = None
    """Only rows [start, stop) of the files' concatenation (validation shares); needs shuffle off."""
    row_id_col: str | None = None
    """Also read this row-key column; ``iterate_aligned_batches`` needs it and yields it with each batch."""
    label_dtype: str = "int64"
    """int64 class ids, or float32 values for regression (``label_dtype_of``)."""
    sparse: tuple[str, str, int] | None = None
    """Sparse layout: (indices column, values column, dimension); batches are then sparse CSR tensors."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 0 or self.workers_count < 1:
            raise ValueError(f"bad LoaderSpec for {self.shard}: batch_size, workers_count >= 1 and steps >= 0")
        if self.reader_pool not in READER_POOLS:
            raise ValueError(f"LoaderSpec.reader_pool must be one of {READER_POOLS}, got {self.reader_pool!r}")
        if self.row_range is not None and self.shuffle:
            raise ValueError("LoaderSpec.row_range selects rows in file order: it needs shuffle=False")

    @property
    def num_features(self) -> int:
        return self.sparse[2] if self.sparse is not None else len(self.feature_cols)

    def empty_features(self) -> Any:
        """Zero rows of this spec's features (dense block or SparseRows)."""
        if self.sparse is not None:
            return SparseRows.empty(self.sparse[2])
        return np.empty((0, self.num_features), np.float32)


def label_dtype_of(manifest: Manifest) -> str:
    """How labels reach the model: int64 class ids, float32 for regression (``num_classes == REGRESSION``)."""
    return "float32" if manifest.num_classes == REGRESSION else "int64"


def _rank_shards(manifest: Manifest, rank: int, world_size: int) -> list[ShardEntry]:
    """Rank r reads shards r, r + world_size, ... (one shard per rank when world_size == num_shards)."""
    if not 0 < world_size <= manifest.num_shards:
        raise LoaderError(
            f"world size {world_size} needs 1..{manifest.num_shards} ranks for {manifest.num_shards} shards: "
            f"re-partition with partition.num_shards={world_size}"
        )
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is outside 0..{world_size - 1}")
    return manifest.train[rank::world_size]


def steps_per_epoch(manifest: Manifest, batch_size: int, world_size: int, max_steps: int = 0) -> int:
    """Batches every rank runs per epoch: min over ranks of floor(rows_r / batch_size), capped by max_steps > 0.

    Raises:
        LoaderError: a rank's shard holds fewer rows than one batch.
    """
    per_rank = [_rank_shards(manifest, r, world_size) for r in range(world_size)]
    rows = [sum(s.rows for s in shards) for shards in per_rank]
    small = [
        f"{'+'.join(s.name for s in shards)} ({n} rows)"
        for shards, n in zip(per_rank, rows, strict=True)
        if n < batch_size
    ]
    if small:
        raise LoaderError(
            f"shard {', '.join(small)} holds fewer rows than one batch of train.batch_size={batch_size}: "
            f"lower train.batch_size to at most {min(rows)}, or re-partition with fewer shards "
            "(partition.num_shards) or a larger partition.sample_fraction"
        )
    steps = min(rows) // batch_size
    return min(steps, max_steps) if max_steps > 0 else steps


def build_loader_spec(
    manifest: Manifest,
    rank: int,
    world_size: int,
    cfg: TrainConfig,
    split: Literal["train", "validation"] = "train",
    workers_count: int | None = None,
) -> LoaderSpec:
    """The spec of ``rank``'s data: its training shard(s), or its contiguous 1/world_size of validation rows.

    ``workers_count`` (Petastorm reader workers) defaults to ``cfg.reader_workers``.
    """
    if workers_count is None:
        workers_count = cfg.reader_workers
    if workers_count < 1:
        raise LoaderError(f"train.reader_workers must be >= 1, got {workers_count}: set train.reader_workers=1 or more")
    common: dict[str, Any] = dict(
        features_col=manifest.features_col,
        feature_cols=tuple(manifest.feature_names),
        label_col=manifest.label_col,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        workers_count=workers_count,
        label_dtype=label_dtype_of(manifest),
        sparse=(
            None
            if manifest.sparse is None
            else (manifest.sparse.indices_col, manifest.sparse.values_col, manifest.sparse.dimension)
        ),
    )
    if split == "train":
        shards = _rank_shards(manifest, rank, world_size)
        files = tuple(u for s in shards for u in manifest.file_urls(s))
        steps = steps_per_epoch(manifest, cfg.batch_size, world_size, cfg.max_steps_per_epoch)
        name = "+".join(s.name for s in shards)
        return LoaderSpec(
            name, files, steps=steps, shuffle=cfg.shuffle, shuffle_buffer_rows=cfg.shuffle_buffer_rows, **common
        )
    if split != "validation":
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is outside 0..{world_size - 1}")
    val = manifest.validation
    start, stop = val.rows * rank // world_size, val.rows * (rank + 1) // world_size
    # Keep only the files overlapping [start, stop); the range becomes relative to the first one kept.
    urls: list[str] = []
    offset, first = 0, None
    for entry, url in zip(val.files, manifest.file_urls(val), strict=True):
        if offset < stop and offset + entry.rows > start:
            first = offset if first is None else first
            urls.append(url)
        offset += entry.rows
    base = first or 0
    steps = (stop - start) // cfg.batch_size
    return LoaderSpec(
        val.name,
        tuple(urls),
        steps=steps,
        shuffle=False,
        shuffle_buffer_rows=0,
        row_range=(start - base, stop - base),
        **common,
    )


class _ArrowTables:
    """Stands in for Petastorm's results reader: hands over the worker's Arrow table as it is."""

    batched_output = True

    def read_next(self, workers_pool: Any, schema: Any, ngram: Any) -> pa.Table:
        from petastorm.workers_pool import EmptyResultError

        try:
            return workers_pool.get_results()
        except EmptyResultError:
            raise StopIteration from None


class _SequencedArrowWorker:
    """Petastorm's ``ArrowReaderWorker``, tagging each row group's table with its ventilation number.

    Implements Petastorm's worker protocol (``worker_id``, ``publish_func``, ``process``, ``shutdown``,
    ``new_results_queue_reader``); module-level so the process pool can pickle it by reference.
    """

    def __init__(self, worker_id: int, publish_func: Any, args: Any) -> None:
        from petastorm.arrow_reader_worker import ArrowReaderWorker

        self.worker_id = worker_id
        self.publish_func = publish_func  # the thread pool also sends its 'processed' marker through it
        self._seq = -1
        self._published = False
        self._inner = ArrowReaderWorker(worker_id, self._publish_tagged, args)

    def process(self, piece_index: int, worker_predicate: Any, shuffle_row_drop_partition: Any, seq: int) -> None:
        self._seq, self._published = seq, False
        self._inner.process(piece_index, worker_predicate, shuffle_row_drop_partition)
        if not self._published:  # Petastorm publishes nothing for a row group without rows; the order needs one
            self._publish_tagged(pa.table({}))

    def _publish_tagged(self, table: pa.Table) -> None:
        self._published = True
        self.publish_func(table.replace_schema_metadata({**(table.schema.metadata or {}), SEQ_KEY: b"%d" % self._seq}))

    def shutdown(self) -> None:
        self._inner.shutdown()

    @staticmethod
    def new_results_queue_reader() -> _ArrowTables:
        return _ArrowTables()


class _SequencedPool:
    """A Petastorm workers pool (threads or processes) that adds ``seq`` = 0, 1, 2, ... to the row groups in
    ventilation order; the rest of the pool protocol the ``Reader`` uses is forwarded as it is."""

    def __init__(self, kind: str, workers_count: int) -> None:
        from petastorm.reader_impl.arrow_table_serializer import ArrowTableSerializer
        from petastorm.workers_pool.process_pool import ProcessPool
        from petastorm.workers_pool.thread_pool import ThreadPool

        self.workers_count = workers_count
        self.started = False
        self._seq = itertools.count()
        self._pool = (
            ThreadPool(workers_count, RESULTS_QUEUE_SIZE)
            if kind == "thread"
            else ProcessPool(workers_count, ArrowTableSerializer())
        )

    def start(self, worker_class: Any, worker_args: Any = None, ventilator: Any = None) -> None:
        self.started = True  # before: a pool that failed half-way through starting must still be stopped
        self._pool.start(worker_class, worker_args, ventilator=ventilator)

    def ventilate(self, *args: Any, **kwargs: Any) -> None:
        # Only the ventilator thread calls this, so the counter needs no lock.
        self._pool.ventilate(*args, seq=next(self._seq), **kwargs)

    def get_results(self) -> Any:
        return self._pool.get_results()

    def stop(self) -> None:
        self._pool.stop()

    def join(self) -> None:
        self._pool.join()

    @property
    def diagnostics(self) -> dict[str, Any]:
        return dict(self._pool.diagnostics)


def _open_reader(spec: LoaderSpec, order_seed: int | None) -> Any:
    """Petastorm's ``Reader`` (what ``make_batch_reader`` builds) with our worker class and numbered pool."""
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import Reader, normalize_dataset_url_or_urls

    if spec.sparse is not None:
        columns = list(spec.sparse[:2])
    else:
        columns = [spec.features_col] if spec.features_col else list(spec.feature_cols)
    filesystem, paths = get_filesystem_and_path_or_paths(normalize_dataset_url_or_urls(list(spec.urls)))
    pool = _SequencedPool(spec.reader_pool, spec.workers_count)
    try:
        return Reader(
            filesystem,
            paths,
            # Anchored: schema_fields are regexes and an unanchored 'f1' would also match f10 (and warn).
            schema_fields=[re.escape(c) + "$" for c in [*columns, spec.label_col, *filter(None, [spec.row_id_col])]],
            worker_class=_SequencedArrowWorker,
            reader_pool=pool,
            shuffle_row_groups=order_seed is not None,
            seed=order_seed,
            num_epochs=1,
            is_batched_reader=True,
        )
    except BaseException:
        if pool.started:  # e.g. a reader process that did not come up: stop the ones that did
            pool.stop()
            pool.join()
        raise


def _in_ventilation_order(reader: Any, spec: LoaderSpec) -> Iterator[pa.Table]:
    """The reader's tables in ventilation order, whatever order the workers finish in.

    The ventilator keeps at most workers + 2 row groups outstanding, which bounds ``early``.
    """
    early: dict[int, pa.Table] = {}
    expected = 0
    for table in reader:
        early[int(table.schema.metadata[SEQ_KEY])] = table
        while expected in early:
            ready = early.pop(expected)
            expected += 1
            if ready.num_columns:  # not the marker of a row group without rows
                yield ready
    if early:
        raise LoaderError(
            f"{spec.shard}: the reader ended after {expected} row groups with later ones {sorted(early)} "
            "waiting: a row group was lost; check the files are readable and not being rewritten"
        )


def _to_numpy(table: pa.Table, spec: LoaderSpec) -> Chunk:
    """One row group -> (float32 [rows, features] C-contiguous, labels [rows] of ``spec.label_dtype``)."""
    y = table.column(spec.label_col).to_numpy().astype(spec.label_dtype)
    if spec.sparse is not None:
        indices_col, values_col, dimension = spec.sparse
        try:
            rows = from_arrow(
                _one_chunk(table.column(indices_col)), _one_chunk(table.column(values_col)), dimension, spec.shard
            )
        except ValueError as exc:
            raise LoaderError(str(exc)) from exc
        return rows, y
    if spec.features_col is None:
        x = np.stack([table.column(c).to_numpy() for c in spec.feature_cols], axis=1)
        return x.astype(np.float32, copy=False), y
    col = table.column(spec.features_col)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    n = spec.num_features
    if len(arr) and (arr.null_count or pc.min_max(arr.value_lengths()).as_py() != {"min": n, "max": n}):
        raise LoaderError(f"{spec.shard}: column {spec.features_col!r} has a null or a row without {n} features")
    x = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), n)  # zero-copy for float32
    return x.astype(np.float32, copy=False), y


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _row_groups(
    reader: Any, spec: LoaderSpec, convert: Callable[[pa.Table, LoaderSpec], Chunk] = _to_numpy
) -> Iterator[Chunk]:
    """``convert``ed row groups in ventilation order, windowed to ``spec.row_range``."""
    return _window((convert(t, spec) for t in _in_ventilation_order(reader, spec)), spec.row_range)


def _window(chunks: Iterator[Chunk], row_range: tuple[int, int] | None) -> Iterator[Chunk]:
    if row_range is None:
        yield from chunks
        return
    start, stop = row_range
    pos = 0
    for x, y in chunks:
        lo, hi = max(start - pos, 0), min(stop - pos, len(y))
        if lo < hi:
            yield x[lo:hi], y[lo:hi]
        pos += len(y)
        if pos >= stop:  # stop reading: the rest belongs to other ranks
            return


def _in_order(chunks: Iterator[Chunk], bs: int, empty: Any) -> Iterator[Chunk]:
    """Full batches in stream order; views of the row group where possible, a copy only across groups."""
    cx, cy = empty, np.empty(0, np.int64)
    for x, y in chunks:
        if len(cy):
            k = bs - len(cy)
            head_x, head_y = concatenate([cx, x[:k]]), np.concatenate([cy, y[:k]])
            x, y = x[k:], y[k:]
            if len(head_y) < bs:
                cx, cy = head_x, head_y
                continue
            yield head_x, head_y
        full = len(y) // bs * bs
        for i in range(0, full, bs):
            yield x[i : i + bs], y[i : i + bs]
        cx, cy = x[full:], y[full:]


def _shuffled(chunks: Iterator[Chunk], bs: int, buffer_rows: int, rng: np.random.Generator) -> Iterator[Chunk]:
    """A vectorized shuffle buffer: once ``buffer_rows`` rows are held, permute them and emit batches until
    half a buffer is left; that random half stays and mixes with the next row groups (no per-row Python)."""
    keep = max(buffer_rows, bs)
    xs: list[Any] = []
    ys: list[np.ndarray] = []
    held = 0
    for item in itertools.chain(chunks, [None]):
        if item is not None:
            xs.append(item[0])
            ys.append(item[1])
            held += len(item[1])
            if held < keep:
                continue
        if not held:
            return
        x, y = concatenate(xs), np.concatenate(ys)
        perm = rng.permutation(held)
        emit = (held if item is None else held - keep // 2) // bs
        for i in range(emit):
            idx = perm[i * bs : (i + 1) * bs]
            yield take(x, idx), np.take(y, idx)
        rest = perm[emit * bs :]
        xs, ys, held = [take(x, rest)], [np.take(y, rest)], len(rest)


def _silence_readonly_warning() -> None:
    import torch

    # Batches are zero-copy views of Arrow memory; torch warns once per process that it cannot mark them
    # read-only. Trigger that one warning here, silenced. Batches must not be written in place.
    a = np.zeros(1, np.float32)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(a)


def _exactly_steps(stream: Iterator[Any], spec: LoaderSpec) -> Iterator[Any]:
    """The first ``spec.steps`` items of ``stream`` (islice pulls no row group past the last step); a clear
    error when it runs dry first, since ranks with fewer steps would leave the others waiting in a collective."""
    done = 0
    for item in itertools.islice(stream, spec.steps):
        done += 1
        yield item
    if done < spec.steps:
        raise LoaderError(f"{spec.shard} ran out of rows after {done} of {spec.steps} batches of {spec.batch_size}")


def _close(reader: Any) -> None:
    reader.stop()
    reader.join()


@contextmanager
def iterate_batches(spec: LoaderSpec, epoch: int) -> Iterator[Iterator[Batch]]:
    """Yield an iterator of exactly ``spec.steps`` (features float32 [B, F], labels [B]) batches.

    The reader is stopped and joined on every exit: normal end, early break, exception.
    """
    _silence_readonly_warning()
    order_seed, rng = None, None
    if spec.shuffle:
        seq_order, seq_rows = np.random.SeedSequence([spec.seed % 2**63, epoch, spec.rank]).spawn(2)
        order_seed, rng = int(seq_order.generate_state(1)[0]), np.random.default_rng(seq_rows)
    reader = _open_reader(spec, order_seed)

    def batches() -> Iterator[Batch]:
        import torch

        chunks = _row_groups(reader, spec)
        if rng is None:
            stream = _in_order(chunks, spec.batch_size, spec.empty_features())
        else:
            stream = _shuffled(chunks, spec.batch_size, spec.shuffle_buffer_rows, rng)
        for x, y in _exactly_steps(stream, spec):
            yield to_tensor(x), torch.from_numpy(y)

    try:
        yield batches()
    finally:
        _close(reader)


def read_all(spec: LoaderSpec) -> tuple[Any, np.ndarray]:
    """Every row of the spec (its ``row_range``), in file order: (float32 [n, F] or SparseRows, labels [n]).
    Small splits only."""
    xs, ys = [spec.empty_features()], [np.empty(0, spec.label_dtype)]
    if spec.urls:
        reader = _open_reader(spec, None)
        try:
            for x, y in _row_groups(reader, spec):
                xs.append(x)
                ys.append(y)
        finally:
            _close(reader)
    return concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------ feature-parallel: same rows, other columns

AlignedBatch = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


def _with_row_ids(table: pa.Table, spec: LoaderSpec) -> Chunk:
    """``_to_numpy`` with the row ids riding along the labels in one structured array, so the unchanged
    batching and shuffle-buffer code moves label and row id of a row together."""
    x, y = _to_numpy(table, spec)
    ids = table.column(spec.row_id_col or "").to_numpy()
    both = np.empty(len(y), np.dtype([("label", y.dtype), ("row_id", np.int64)]))
    both["label"], both["row_id"] = y, ids
    return x, both


@contextmanager
def iterate_aligned_batches(spec: LoaderSpec, epoch: int) -> Iterator[Iterator[AlignedBatch]]:
    """``iterate_batches`` for ranks that read different columns of the same rows (feature-parallel training):
    yields exactly ``spec.steps`` (features [B, F_r], labels [B], row ids [B]) batches.

    The order is a function of the rows and (seed, epoch) only, never of the rank or of where the files'
    row groups end (they differ between column groups): row groups in file order, cut into batch-size
    blocks, then (shuffle on) the shuffle buffer seeded by (seed, epoch) - the same on every rank.
    """
    if spec.row_id_col is None:
        raise ValueError(f"{spec.shard}: iterate_aligned_batches needs LoaderSpec.row_id_col")
    _silence_readonly_warning()
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed % 2**63, epoch])) if spec.shuffle else None
    reader = _open_reader(spec, None)

    def batches() -> Iterator[AlignedBatch]:
        import torch

        chunks = _row_groups(reader, spec, _with_row_ids)
        stream = _in_order(chunks, spec.batch_size, spec.empty_features())
        if rng is not None:  # inputs are whole batch-size blocks, so the buffer's cuts match on every rank
            stream = _shuffled(stream, spec.batch_size, spec.shuffle_buffer_rows, rng)
        for x, both in _exactly_steps(stream, spec):
            labels, ids = np.ascontiguousarray(both["label"]), np.ascontiguousarray(both["row_id"])
            yield to_tensor(x), torch.from_numpy(labels), torch.from_numpy(ids)

    try:
        yield batches()
    finally:
        _close(reader)


@contextmanager
def iterate_chunks(spec: LoaderSpec) -> Iterator[Iterator[Chunk]]:
    """Every row of the spec (its ``row_range``) in file order, one row group at a time (``read_all``
    without holding the whole split); the reader is stopped and joined on exit."""
    if not spec.urls:
        yield iter(())
        return
    reader = _open_reader(spec, None)
    try:
        yield _row_groups(reader, spec)
    finally:
        _close(reader)
