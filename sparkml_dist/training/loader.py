"""A rank's shard -> fixed-size torch batches; runs inside the training ranks (no pyspark).

Reading: ``readers.open_row_groups`` hands over the shard's row groups as Arrow tables (only the needed
columns) from the reader ``train.reader`` picks: Petastorm 0.12.1, or the project's own Arrow reader
(``sparkml_dist/training/readers``). Everything from there on is the same code for both: windowing to ``row_range``,
the batching (``_in_order``) or the seeded shuffle buffer (``_shuffled``), exactly ``steps`` batches
(``_exactly_steps``), the conversion to tensors and the sparse layout.

Steps: every rank runs exactly ``steps_per_epoch`` = min over ranks of floor(rows_r / batch_size) batches
per epoch (capped by ``train.max_steps_per_epoch``), so unequal shards never leave a rank waiting in a
collective. A larger shard's remainder is skipped for that epoch: with shuffle off always the same rows
(the end of the shard in file order); with shuffle on, the last rows of that epoch's seeded stream, so a
different random set each epoch.

Order: row groups come in the planned order: file order, or with shuffle on a permutation seeded by (seed,
epoch, rank) (Petastorm's own, reproduced by the Arrow reader), whatever order the reader's workers finish
in. The stream is therefore a pure function of (files, seed, epoch, rank): the same for any number of
reader workers and for either reader, bit for bit. Shuffle on: rows then pass through our seeded shuffle
buffer; both seeds derive from (seed, epoch, rank).

Memory: a reader keeps at most ``workers_count + 2`` row groups read ahead and not yet handed over, whatever
the shard size; plus the shuffle buffer.

No lost rows: every epoch the tables are checked against the plan made from the files' footers, which are
checked against the manifest's rows and row groups per file: each table must be the next planned row group
with its footer's rows, and an exhausted reader must have handed over all of them (else
``readers.RowGroupError``, naming the shard, file, row group and rows expected and got). The loader stops
pulling when an epoch's steps are done or a ``row_range`` window is full; the check then covers exactly the
prefix that was read, which is every row any batch came from.

Speed: the Arrow table is converted here, the array layout zero-copy (``ListArray.flatten().to_numpy().reshape``),
the scalar-columns layout with one ``np.stack``. Decoding releases the GIL, so reader threads decode row
groups in parallel (``bench/loader.py`` measures both readers).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sparkml_dist.config import TrainConfig
from sparkml_dist.data.manifest import Manifest, ShardEntry
from sparkml_dist.data.sparse import SparseRows, concatenate, from_arrow, take, to_tensor
from sparkml_dist.errors import UserError
from sparkml_dist.metrics import REGRESSION
from sparkml_dist.training.readers import open_row_groups, resolve_reader
from sparkml_dist.training.readers.cache import ShardCache
from sparkml_dist.training.readers.petastorm_reader import READER_POOLS

if TYPE_CHECKING:  # torch is imported where batches are made: reader processes import this module without it
    import torch

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
    """Reader workers decoding row groups in parallel; the stream is the same for any count."""
    reader_pool: Literal["thread", "process"] = "thread"
    """Petastorm worker pool: threads (default, measured faster here) or processes (Arrow IPC per row group).
    The arrow reader takes threads only."""
    reader: str = "auto"
    """The row-group reader (``readers.READERS``): ``petastorm`` or ``arrow``, as ``build_loader_spec``
    resolved ``train.reader``; ``auto`` is resolved where the reader is opened."""
    file_counts: tuple[tuple[int, int], ...] = ()
    """(rows, row groups) the manifest records for each of ``urls``; the files' footers must agree before a
    row is read. Empty: the footers alone make the plan the rows are checked against."""
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
        if self.file_counts and len(self.file_counts) != len(self.urls):
            raise ValueError(f"LoaderSpec.file_counts of {self.shard} needs one (rows, row groups) per url")

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


def file_counts(shards: list[ShardEntry]) -> tuple[tuple[int, int], ...]:
    """(rows, row groups) of every file of ``shards``, in ``Manifest.file_urls`` order (``LoaderSpec.file_counts``)."""
    return tuple((f.rows, f.row_groups) for s in shards for f in s.files)


def build_loader_spec(
    manifest: Manifest,
    rank: int,
    world_size: int,
    cfg: TrainConfig,
    split: Literal["train", "validation"] = "train",
    workers_count: int | None = None,
) -> LoaderSpec:
    """The spec of ``rank``'s data: its training shard(s), or its contiguous 1/world_size of validation rows.

    ``workers_count`` (reader workers) defaults to ``cfg.reader_workers``. The reader is ``cfg.reader``
    resolved here (``readers.resolve_reader``: ``auto`` becomes petastorm or arrow, logged with the reason).

    Raises:
        ReaderError: ``train.reader=petastorm`` where Petastorm cannot import.
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
        reader=resolve_reader(cfg.reader),
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
            name,
            files,
            steps=steps,
            shuffle=cfg.shuffle,
            shuffle_buffer_rows=cfg.shuffle_buffer_rows,
            file_counts=file_counts(shards),
            **common,
        )
    if split != "validation":
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is outside 0..{world_size - 1}")
    val = manifest.validation
    start, stop = val.rows * rank // world_size, val.rows * (rank + 1) // world_size
    # Keep only the files overlapping [start, stop); the range becomes relative to the first one kept.
    urls: list[str] = []
    counts: list[tuple[int, int]] = []
    offset, first = 0, None
    for entry, url in zip(val.files, manifest.file_urls(val), strict=True):
        if offset < stop and offset + entry.rows > start:
            first = offset if first is None else first
            urls.append(url)
            counts.append((entry.rows, entry.row_groups))
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
        file_counts=tuple(counts),
        **common,
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


@contextmanager
def _row_groups(
    spec: LoaderSpec,
    order_seed: int | None,
    convert: Callable[[pa.Table, LoaderSpec], Chunk] = _to_numpy,
    cache: ShardCache | None = None,
) -> Iterator[Iterator[Chunk]]:
    """``convert``ed row groups in planned order (checked against the manifest), windowed to ``spec.row_range``;
    the reader is stopped and joined on every exit. With a ``cache`` the tables come from memory after the
    cache's first (checked) read, in the same order."""
    with (cache.open if cache is not None else open_row_groups)(spec, order_seed) as tables:
        yield _window((convert(t, spec) for t in tables), spec.row_range)


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


@contextmanager
def iterate_batches(spec: LoaderSpec, epoch: int, cache: ShardCache | None = None) -> Iterator[Iterator[Batch]]:
    """Yield an iterator of exactly ``spec.steps`` (features float32 [B, F], labels [B]) batches.

    The reader is stopped and joined on every exit: normal end, early break, exception. ``cache``
    (``readers.cache.build_cache``): replay the decoded shard from memory; the same batches.

    Raises (from the iterator):
        LoaderError: the shard ran out of rows before ``spec.steps`` batches.
        RowGroupError: the reader did not hand over the planned row groups (``readers``).
    """
    _silence_readonly_warning()
    order_seed, rng = None, None
    if spec.shuffle:
        seq_order, seq_rows = np.random.SeedSequence([spec.seed % 2**63, epoch, spec.rank]).spawn(2)
        order_seed, rng = int(seq_order.generate_state(1)[0]), np.random.default_rng(seq_rows)

    def batches(chunks: Iterator[Chunk]) -> Iterator[Batch]:
        import torch

        if rng is None:
            stream = _in_order(chunks, spec.batch_size, spec.empty_features())
        else:
            stream = _shuffled(chunks, spec.batch_size, spec.shuffle_buffer_rows, rng)
        for x, y in _exactly_steps(stream, spec):
            yield to_tensor(x), torch.from_numpy(y)

    with _row_groups(spec, order_seed, cache=cache) as chunks:
        yield batches(chunks)


def read_all(spec: LoaderSpec) -> tuple[Any, np.ndarray]:
    """Every row of the spec (its ``row_range``), in file order: (float32 [n, F] or SparseRows, labels [n]).
    Small splits only."""
    xs, ys = [spec.empty_features()], [np.empty(0, spec.label_dtype)]
    if spec.urls:
        with _row_groups(spec, None) as chunks:
            for x, y in chunks:
                xs.append(x)
                ys.append(y)
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

    def batches(chunks: Iterator[Chunk]) -> Iterator[AlignedBatch]:
        import torch

        stream = _in_order(chunks, spec.batch_size, spec.empty_features())
        if rng is not None:  # inputs are whole batch-size blocks, so the buffer's cuts match on every rank
            stream = _shuffled(stream, spec.batch_size, spec.shuffle_buffer_rows, rng)
        for x, both in _exactly_steps(stream, spec):
            labels, ids = np.ascontiguousarray(both["label"]), np.ascontiguousarray(both["row_id"])
            yield to_tensor(x), torch.from_numpy(labels), torch.from_numpy(ids)

    with _row_groups(spec, None, _with_row_ids) as chunks:
        yield batches(chunks)


@contextmanager
def iterate_chunks(spec: LoaderSpec) -> Iterator[Iterator[Chunk]]:
    """Every row of the spec (its ``row_range``) in file order, one row group at a time (``read_all``
    without holding the whole split); the reader is stopped and joined on exit."""
    if not spec.urls:
        yield iter(())
        return
    with _row_groups(spec, None) as chunks:
        yield chunks
