"""An in-memory shard cache (``train.cache``): decode a rank's shard once, replay it every epoch.

Every ``open`` hands the spec's tables over in that epoch's planned order (``plan.planned_order``: the same
permutation the readers use for the same seed): from memory where a table is cached, else from the configured
reader, through the row-group check (``plan.checked``: each planned row group, with its footer's rows), and
then kept. So the first epoch streams as without a cache (reads overlap training), the next one reads what
the first did not reach (the loader stops at the epoch's steps), and from then on no file is read; the batch
stream is the one the streaming readers yield, bit for bit, so a resumed or retried run sees the same data.

Memory: the decoded tables of the spec's columns (Arrow buffers: about rows x (features x 4 + 8) bytes for
the array layout). ``train.cache=auto`` caches a shard whose estimate fits ``train.cache_max_mb`` (0: a
quarter of the memory available on the host, split over the ranks that share it) and streams otherwise;
``memory`` fails naming the figures when it does not fit; ``off`` always streams. The rank logs which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa

from sparkml_dist.errors import UserError
from sparkml_dist.training.readers.plan import checked, plan_row_groups, planned_order

if TYPE_CHECKING:
    from sparkml_dist.training.loader import LoaderSpec

log = logging.getLogger("sparkml_dist.readers.cache")  # its pre-move name: logging configs keep working

CACHE_MODES = ("auto", "off", "memory")
AUTO_SHARE = 0.25
"""train.cache_max_mb=0: the bound is this share of the host's available memory, split over its ranks."""


class CacheError(UserError):
    """train.cache=memory but the shard does not fit the bound; the message has both figures and the fix."""


def estimate_bytes(spec: LoaderSpec, rows: int) -> int:
    """Decoded bytes of ``rows`` rows of the spec's columns (float32/float64 features, int64 labels)."""
    if spec.sparse is not None:
        per_row = 8 * 64  # unknown non-zeros a row: a generous guess, the bound decides
    else:
        per_row = 4 * spec.num_features + 8  # float32 features + list offsets or 4-8 byte scalars
    return rows * (per_row + 8 + (8 if spec.row_id_col else 0))


def bound_bytes(max_mb: float, local_ranks: int) -> int:
    """train.cache_max_mb in bytes, or (0) a quarter of the host's available memory over its ranks."""
    if max_mb > 0:
        return int(max_mb * 2**20)
    import psutil

    return int(psutil.virtual_memory().available * AUTO_SHARE / max(1, local_ranks))


class ShardCache:
    """One rank's cached shard (a training spec); ``open`` has ``readers.open_row_groups``' contract."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self._tables: dict[int, pa.Table] = {}
        self._count: int | None = None
        """Row groups in the spec (from the first plan); None before the first open."""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tables.values())

    @property
    def complete(self) -> bool:
        return self._count is not None and len(self._tables) == self._count

    @contextmanager
    def open(self, spec: LoaderSpec, order_seed: int | None) -> Iterator[Iterator[pa.Table]]:
        """The spec's tables in the planned order: from memory where cached, else from the reader (checked, as
        ``open_row_groups`` does) and kept. The first epoch streams as without a cache, overlapping reads with
        training; what it did not reach (the loader stops at the epoch's steps) is read by the next open."""
        if self.complete:
            order = planned_order(len(self._tables), order_seed)
            yield (self._tables[i] for i in order if self._tables[i].num_rows)
            return
        from sparkml_dist.training.readers import READERS, resolve_reader, spec_columns

        name = resolve_reader(spec.reader)
        plan = plan_row_groups(spec, order_seed)
        self._count = len(plan.row_groups)
        missing = dataclasses.replace(plan, order=tuple(i for i in plan.order if i not in self._tables))
        with READERS.get(name)(spec, missing, spec_columns(spec)) as tagged:

            def keep() -> Iterator[tuple[int, pa.Table]]:
                for index, table in tagged:
                    self._tables[index] = table
                    yield index, table

            fresh = checked(keep(), missing, name)

            def merged() -> Iterator[pa.Table]:
                for index in plan.order:
                    while index not in self._tables:  # pull the reader (checked) until this one has come
                        next(fresh, None)
                    if self._tables[index].num_rows:
                        yield self._tables[index]
                for _ in fresh:  # the end of the reader: the check's count of what came
                    pass
                log.info("%s: %d row groups (%.1f MB decoded) cached in memory; later epochs read no file",
                         spec.shard, len(self._tables), self.nbytes / 2**20)  # fmt: skip

            yield merged()

    def fill(self) -> float:
        """Read and decode the whole shard now (the reader's threads in parallel, file order, checked), so that
        every epoch, the first included, replays from memory, as a script that loads its shard with
        ``read_table`` before training does. Returns the seconds it took (the rank logs them)."""
        import time

        started = time.perf_counter()
        with self.open(self.spec, None) as tables:
            for _ in tables:
                pass
        return time.perf_counter() - started

    def clear(self) -> None:
        self._tables, self._count = {}, None


def build_cache(spec: LoaderSpec, mode: str, max_mb: float, local_ranks: int) -> ShardCache | None:
    """The rank's cache for ``spec`` under ``train.cache=mode``, or None to stream; logs the choice."""
    if mode == "off":
        return None
    rows = sum(r for r, _ in spec.file_counts) if spec.file_counts else 0
    need, bound = estimate_bytes(spec, rows), bound_bytes(max_mb, local_ranks)
    if need <= bound:
        log.info("train.cache=%s: %s (~%.0f MB decoded) fits the %.0f MB bound: cached after its first read",
                 mode, spec.shard, need / 2**20, bound / 2**20)  # fmt: skip
        return ShardCache(spec)
    if mode == "memory":
        raise CacheError(
            f"train.cache=memory: {spec.shard} needs about {need / 2**20:.0f} MB decoded, more than the "
            f"{bound / 2**20:.0f} MB bound: raise train.cache_max_mb, use more shards, or set train.cache=auto "
            "(streams what does not fit)"
        )
    log.info("train.cache=auto: %s (~%.0f MB decoded) exceeds the %.0f MB bound: streamed from its files "
             "every epoch", spec.shard, need / 2**20, bound / 2**20)  # fmt: skip
    return None
