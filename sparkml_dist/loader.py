"""A rank's shard -> fixed-size torch batches, read with Petastorm; runs inside Horovod ranks (no pyspark).

Steps: every rank runs exactly ``steps_per_epoch`` = min over ranks of floor(rows_r / batch_size) batches
per epoch (capped by ``train.max_steps_per_epoch``), so unequal shards never leave a rank waiting in a
collective. A larger shard's remainder is skipped for that epoch: with shuffle off always the same rows
(the end of the shard in file order); with shuffle on, the last rows of that epoch's seeded stream, so a
different random set each epoch.

Order: one Petastorm worker thread reads row groups strictly in ventilation order, so the stream is a
pure function of the files and the seed. Shuffle on: the row-group order is shuffled by Petastorm's
ventilator, seeded through ``make_batch_reader(seed=...)`` (0.12.1 does seed it; more than one worker would
make the completion order, hence the data order, timing-dependent), then rows pass through our seeded
shuffle buffer; both seeds derive from (seed, epoch, rank). Shuffle off: file order, row-group order.

Speed: Petastorm's results reader turns every column into pandas and a list column into an object array
stacked row by row (about 0.4x a raw pyarrow scan). We take the Arrow table the worker already decoded and
convert it ourselves: the array layout zero-copy (``ListArray.flatten().to_numpy().reshape``), the
scalar-columns layout with one ``np.stack``. Memory is bounded by the results queue (about two row groups)
plus the shuffle buffer, whatever the shard size.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sparkml_dist.config import TrainConfig
from sparkml_dist.errors import UserError
from sparkml_dist.manifest import Manifest, ShardEntry
from sparkml_dist.metrics import REGRESSION

RESULTS_QUEUE_SIZE = 4
"""Petastorm queue entries; each row group puts its table and a 'processed' marker, so <= 2 tables wait."""

Batch = tuple[torch.Tensor, torch.Tensor]
Chunk = tuple[np.ndarray, np.ndarray]


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
    """Petastorm reader threads; > 1 reads faster but makes the row order timing-dependent."""
    row_range: tuple[int, int] | None = None
    """Only rows [start, stop) of the files' concatenation (validation shares); needs shuffle off."""
    row_id_col: str | None = None
    """Also read this row-key column; ``iterate_aligned_batches`` needs it and yields it with each batch."""
    label_dtype: str = "int64"
    """int64 class ids, or float32 values for regression (``label_dtype_of``)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 0 or self.workers_count < 1:
            raise ValueError(f"bad LoaderSpec for {self.shard}: batch_size, workers_count >= 1 and steps >= 0")
        if self.row_range is not None and self.shuffle:
            raise ValueError("LoaderSpec.row_range selects rows in file order: it needs shuffle=False")

    @property
    def num_features(self) -> int:
        return len(self.feature_cols)


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
    workers_count: int = 1,
) -> LoaderSpec:
    """The spec of ``rank``'s data: its training shard(s), or its contiguous 1/world_size of validation rows."""
    common: dict[str, Any] = dict(
        features_col=manifest.features_col,
        feature_cols=tuple(manifest.feature_names),
        label_col=manifest.label_col,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        workers_count=workers_count,
        label_dtype=label_dtype_of(manifest),
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


def _open_reader(spec: LoaderSpec, order_seed: int | None) -> Any:
    from petastorm import make_batch_reader
    from petastorm.arrow_reader_worker import ArrowReaderWorkerResultsQueueReader

    columns = [spec.features_col] if spec.features_col else list(spec.feature_cols)
    reader = make_batch_reader(
        list(spec.urls),
        # Anchored: schema_fields are regexes and an unanchored 'f1' would also match f10 (and warn).
        schema_fields=[re.escape(c) + "$" for c in [*columns, spec.label_col, *filter(None, [spec.row_id_col])]],
        reader_pool_type="thread",
        workers_count=spec.workers_count,
        results_queue_size=RESULTS_QUEUE_SIZE,
        shuffle_row_groups=order_seed is not None,
        seed=order_seed,
        num_epochs=1,
    )
    # The one private hook: skip the per-column pandas conversion (see the module doc). On another
    # Petastorm version it is left alone and _to_numpy takes the namedtuples instead.
    if type(getattr(reader, "_results_queue_reader", None)) is ArrowReaderWorkerResultsQueueReader:
        reader._results_queue_reader = _ArrowTables()
    return reader


def _to_numpy(item: Any, spec: LoaderSpec) -> Chunk:
    """One row group -> (float32 [rows, features] C-contiguous, labels [rows] of ``spec.label_dtype``)."""
    if not isinstance(item, pa.Table):  # Petastorm's namedtuple of numpy columns
        cols = item._asdict()
        names = [spec.features_col] if spec.features_col else list(spec.feature_cols)
        x = np.column_stack([cols[n] for n in names]).astype(np.float32, copy=False)
        return x, np.asarray(cols[spec.label_col], dtype=spec.label_dtype)
    y = item.column(spec.label_col).to_numpy().astype(spec.label_dtype)
    if spec.features_col is None:
        x = np.stack([item.column(c).to_numpy() for c in spec.feature_cols], axis=1)
        return x.astype(np.float32, copy=False), y
    col = item.column(spec.features_col)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    n = spec.num_features
    if len(arr) and (arr.null_count or pc.min_max(arr.value_lengths()).as_py() != {"min": n, "max": n}):
        raise LoaderError(f"{spec.shard}: column {spec.features_col!r} has a null or a row without {n} features")
    x = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), n)  # zero-copy for float32
    return x.astype(np.float32, copy=False), y


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


def _in_order(chunks: Iterator[Chunk], bs: int, n: int) -> Iterator[Chunk]:
    """Full batches in stream order; views of the row group where possible, a copy only across groups."""
    cx, cy = np.empty((0, n), np.float32), np.empty(0, np.int64)
    for x, y in chunks:
        if len(cy):
            k = bs - len(cy)
            head_x, head_y = np.concatenate([cx, x[:k]]), np.concatenate([cy, y[:k]])
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
    xs: list[np.ndarray] = []
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
        x, y = np.concatenate(xs), np.concatenate(ys)
        perm = rng.permutation(held)
        emit = (held if item is None else held - keep // 2) // bs
        for i in range(emit):
            idx = perm[i * bs : (i + 1) * bs]
            yield np.take(x, idx, axis=0), np.take(y, idx)
        rest = perm[emit * bs :]
        xs, ys, held = [np.take(x, rest, axis=0)], [np.take(y, rest)], len(rest)


def _silence_readonly_warning() -> None:
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
        chunks = _window((_to_numpy(t, spec) for t in reader), spec.row_range)
        if rng is None:
            stream = _in_order(chunks, spec.batch_size, spec.num_features)
        else:
            stream = _shuffled(chunks, spec.batch_size, spec.shuffle_buffer_rows, rng)
        for x, y in _exactly_steps(stream, spec):
            yield torch.from_numpy(x), torch.from_numpy(y)

    try:
        yield batches()
    finally:
        _close(reader)


def read_all(spec: LoaderSpec) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the spec (its ``row_range``), in file order: (float32 [n, F], labels [n]). Small splits only."""
    xs, ys = [np.empty((0, spec.num_features), np.float32)], [np.empty(0, spec.label_dtype)]
    if spec.urls:
        reader = _open_reader(spec, None)
        try:
            for x, y in _window((_to_numpy(t, spec) for t in reader), spec.row_range):
                xs.append(x)
                ys.append(y)
        finally:
            _close(reader)
    return np.concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------ feature-parallel: same rows, other columns

AlignedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _with_row_ids(item: Any, spec: LoaderSpec) -> Chunk:
    """``_to_numpy`` with the row ids riding along the labels in one structured array, so the unchanged
    batching and shuffle-buffer code moves label and row id of a row together."""
    x, y = _to_numpy(item, spec)
    col = spec.row_id_col or ""
    ids = item.column(col).to_numpy() if isinstance(item, pa.Table) else np.asarray(item._asdict()[col])
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
        chunks = _window((_with_row_ids(t, spec) for t in reader), spec.row_range)
        stream = _in_order(chunks, spec.batch_size, spec.num_features)
        if rng is not None:  # inputs are whole batch-size blocks, so the buffer's cuts match on every rank
            stream = _shuffled(stream, spec.batch_size, spec.shuffle_buffer_rows, rng)
        for x, both in _exactly_steps(stream, spec):
            labels, ids = np.ascontiguousarray(both["label"]), np.ascontiguousarray(both["row_id"])
            yield torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(ids)

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
        yield _window((_to_numpy(t, spec) for t in reader), spec.row_range)
    finally:
        _close(reader)
