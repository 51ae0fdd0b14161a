"""Petastorm 0.12.1's reader behind the seam (``train.reader=petastorm``); petastorm is imported only here,
inside the functions, so the package imports where Petastorm cannot (pyarrow >= 15).

Petastorm's ventilator hands row groups to ``workers_count`` reader workers (threads or processes) in one
order: file order, or with shuffle on a permutation seeded through ``Reader(seed=...)`` (``plan`` reproduces
it). Workers finish in any order, so our pool numbers every row group as it is ventilated, our worker tags
the decoded table with that number and with the row group it read (Petastorm's piece index, which is the
plan's row-group index), and a reorder buffer releases tables strictly in ventilation order.

Memory: the ventilator keeps at most ``workers_count + 2`` row groups ventilated and not yet consumed, so the
reorder buffer never holds more than that many tables, whatever the shard size.

Speed: Petastorm's results reader turns every column into pandas and a list column into an object array
stacked row by row (about 0.4x a raw pyarrow scan). Our worker's results reader hands over the Arrow table
the worker decoded, and the loader converts it itself. Processes also decode in parallel but pay an Arrow
IPC copy per row group and a process start per reader (``bench/loader.py`` measures both).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sparkml_dist.training.readers.plan import Plan, RowGroupError

if TYPE_CHECKING:
    from sparkml_dist.training.loader import LoaderSpec

RESULTS_QUEUE_SIZE = 4
"""Thread pool queue entries; each row group puts its table and a 'processed' marker, so <= 2 tables wait."""
READER_POOLS = ("thread", "process")
"""Petastorm worker pools a ``LoaderSpec.reader_pool`` may name."""
SEQ_KEY = b"sparkml_dist.ventilation_seq"
"""Schema-metadata key of the number our worker tags each row group's table with (survives Arrow IPC)."""
PIECE_KEY = b"sparkml_dist.piece"
"""Schema-metadata key of the row group the worker read: '<piece index> <row group> <path>'."""


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
    """Petastorm's ``ArrowReaderWorker``, tagging each row group's table with its ventilation number and piece.

    Implements Petastorm's worker protocol (``worker_id``, ``publish_func``, ``process``, ``shutdown``,
    ``new_results_queue_reader``); module-level so the process pool can pickle it by reference.
    """

    def __init__(self, worker_id: int, publish_func: Any, args: Any) -> None:
        from petastorm.arrow_reader_worker import ArrowReaderWorker

        self.worker_id = worker_id
        self.publish_func = publish_func  # the thread pool also sends its 'processed' marker through it
        self._pieces = args[4]  # the Reader's split pieces: one per row group, in its enumeration order
        self._seq = -1
        self._piece = b""
        self._published = False
        self._inner = ArrowReaderWorker(worker_id, self._publish_tagged, args)

    def process(self, piece_index: int, worker_predicate: Any, shuffle_row_drop_partition: Any, seq: int) -> None:
        piece = self._pieces[piece_index]
        self._seq, self._published = seq, False
        self._piece = f"{piece_index} {piece.row_group} {piece.path}".encode()
        self._inner.process(piece_index, worker_predicate, shuffle_row_drop_partition)
        if not self._published:  # Petastorm publishes nothing for a row group without rows; the order needs one
            self._publish_tagged(pa.table({}))

    def _publish_tagged(self, table: pa.Table) -> None:
        self._published = True
        tags = {SEQ_KEY: b"%d" % self._seq, PIECE_KEY: self._piece}
        self.publish_func(table.replace_schema_metadata({**(table.schema.metadata or {}), **tags}))

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


def _open_reader(spec: LoaderSpec, columns: list[str], order_seed: int | None) -> Any:
    """Petastorm's ``Reader`` (what ``make_batch_reader`` builds) with our worker class and numbered pool."""
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import Reader, normalize_dataset_url_or_urls

    if spec.reader_pool not in READER_POOLS:
        raise ValueError(f"LoaderSpec.reader_pool must be one of {READER_POOLS}, got {spec.reader_pool!r}")
    filesystem, paths = get_filesystem_and_path_or_paths(normalize_dataset_url_or_urls(list(spec.urls)))
    pool = _SequencedPool(spec.reader_pool, spec.workers_count)
    try:
        return Reader(
            filesystem,
            paths,
            # Anchored: schema_fields are regexes and an unanchored 'f1' would also match f10 (and warn).
            schema_fields=[re.escape(c) + "$" for c in columns],
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


def _in_ventilation_order(tables: Iterator[pa.Table], shard: str) -> Iterator[pa.Table]:
    """The reader's tables in ventilation order, whatever order the workers finish in.

    The ventilator keeps at most workers + 2 row groups outstanding, which bounds ``early``.
    """
    early: dict[int, pa.Table] = {}
    expected = 0
    for table in tables:
        early[int(table.schema.metadata[SEQ_KEY])] = table
        while expected in early:
            yield early.pop(expected)
            expected += 1
    if early:
        raise RowGroupError(
            f"{shard}: the reader ended after {expected} row groups with later ones {sorted(early)} "
            "waiting: a row group was lost; check the files are readable and not being rewritten"
        )


def _tagged(tables: Iterator[pa.Table], plan: Plan) -> Iterator[tuple[int, pa.Table]]:
    """(plan row-group index, table): Petastorm's piece index, once its piece is seen to be the plan's."""
    for table in tables:
        index_text, group_text, path = table.schema.metadata[PIECE_KEY].decode().split(" ", 2)
        index = int(index_text)
        group = plan.row_groups[index] if 0 <= index < len(plan.row_groups) else None
        if (
            group is None
            or group.index != int(group_text)
            or not (path == plan.files[group.file][1] or plan.urls[group.file].endswith(path))
        ):
            raise RowGroupError(
                f"{plan.shard}: Petastorm's row group {index} is row group {group_text} of {path}, not the "
                "plan's: its enumeration differs from the one this project reproduces (Petastorm 0.12.x)"
            )
        yield index, table


@contextmanager
def read_petastorm(spec: LoaderSpec, plan: Plan, columns: list[str]) -> Iterator[Iterator[tuple[int, pa.Table]]]:
    """(row-group index, table) in Petastorm's ventilation order (which ``plan.order`` reproduces); the
    workers are stopped and joined on exit."""
    reader = _open_reader(spec, columns, plan.seed)
    try:
        yield _tagged(_in_ventilation_order(reader, spec.shard), plan)
    finally:
        reader.stop()
        reader.join()
