"""The project's own row-group reader (``train.reader=arrow``): pyarrow.parquet over pyarrow.fs, any pyarrow >= 14.

Each planned row group is one task for a pool of ``spec.workers_count`` threads: open the file on its
filesystem (local, HDFS, S3 through ``manifest.arrow_fs``), wrap it in a ``ParquetFile`` with the footer the
plan already read, ``read_row_group(i, columns=...)`` with only the spec's columns. Tasks are submitted in
planned order and handed over in that order (the head task is waited for; later ones finish meanwhile), so
the stream is the same for any number of threads.

Memory: at most ``workers_count + 2`` row groups are submitted and not yet handed over (the bound
Petastorm's ventilator keeps), whatever the shard size; the next one is submitted as one is handed over.
Decoding releases the GIL, so the threads decode row groups in parallel (and pyarrow decodes a row group's
columns on its own CPU pool). Where pyarrow can (>= 15), Parquet page checksums are verified as pages are
read, as Spark does.

Only pyarrow calls whose meaning is the same from 14 to today's releases are used (``ParquetFile`` with
``metadata=``, ``read_row_group``, ``FileSystem.open_input_file``).
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sparkml_dist.training.readers.plan import Plan

if TYPE_CHECKING:
    from sparkml_dist.training.loader import LoaderSpec

IN_FLIGHT_EXTRA = 2
"""Row groups submitted beyond one per thread, so a thread never waits for the consumer to ask."""


def _file_options() -> dict[str, Any]:
    params = inspect.signature(pq.ParquetFile.__init__).parameters
    return {"page_checksum_verification": True} if "page_checksum_verification" in params else {}


_OPTIONS = _file_options()


def _read(plan: Plan, index: int, columns: list[str]) -> pa.Table:
    group = plan.row_groups[index]
    filesystem, path = plan.files[group.file]
    with filesystem.open_input_file(path) as f:
        parquet = pq.ParquetFile(f, metadata=plan.footers[group.file], **_OPTIONS)
        return parquet.read_row_group(group.index, columns=columns)


def _handed_over(
    pool: ThreadPoolExecutor, plan: Plan, columns: list[str], in_flight: int
) -> Iterator[tuple[int, pa.Table]]:
    """Submits the first ``in_flight`` row groups now, then one more as each is handed over, in plan order."""
    todo = iter(plan.order)

    def submit(index: int) -> tuple[int, Future[pa.Table]]:
        return index, pool.submit(_read, plan, index, columns)

    pending = deque(submit(i) for i in itertools.islice(todo, in_flight))

    def handed() -> Iterator[tuple[int, pa.Table]]:
        while pending:
            index, future = pending.popleft()
            table = future.result()
            pending.extend(submit(i) for i in itertools.islice(todo, 1))
            yield index, table

    return handed()


@contextmanager
def read_arrow(spec: LoaderSpec, plan: Plan, columns: list[str]) -> Iterator[Iterator[tuple[int, pa.Table]]]:
    """(row-group index, table) in ``plan.order``, reading ahead from the start; the threads are stopped
    and joined on exit."""
    if spec.reader_pool != "thread":
        raise ValueError(f"{spec.shard}: the arrow reader decodes in threads; reader_pool={spec.reader_pool!r}")
    pool = ThreadPoolExecutor(max_workers=spec.workers_count, thread_name_prefix="sparkml-arrow-reader")
    try:
        yield _handed_over(pool, plan, columns, spec.workers_count + IN_FLIGHT_EXTRA)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
