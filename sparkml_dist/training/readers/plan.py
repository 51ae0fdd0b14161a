"""What a rank will read, decided before any reader starts, and the check that it got exactly that.

``plan_row_groups`` lists the spec's row groups from the files' footers (read in threads, no data pages)
after checking each footer against the manifest's rows and row groups for that file, then fixes the order
they are read in: file order, or with shuffle on a permutation seeded by ``order_seed``. Both readers are
held to that order (``checked``), so it is also what makes their batches equal.

The order is Petastorm 0.12.1's, reproduced exactly: its ``Reader`` enumerates row groups file by file in
the order the paths are given (``etl/dataset_metadata._split_row_groups_from_footers`` over the legacy
``ParquetDataset``'s pieces), each file's row groups 0, 1, ...; with ``shuffle_row_groups`` its
``ConcurrentVentilator`` shuffles that list once per epoch with ``np.random.RandomState(seed).shuffle``
(one item per row group: ``shuffle_row_drop_partitions`` is 1). ``RandomState.shuffle`` of a list makes
the same draws as ``RandomState.permutation(n)`` (the legacy generator's stream is frozen across numpy
versions), so position k reads row group ``permutation[k]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from sparkml_dist.data.manifest import ManifestError, arrow_fs
from sparkml_dist.errors import InfraError

if TYPE_CHECKING:
    from sparkml_dist.training.loader import LoaderSpec

FOOTER_THREADS = 16
"""Footers read at once (each is one small ranged read)."""


class RowGroupError(InfraError):
    """A reader did not hand a rank exactly its planned row groups, each complete: one was skipped, cut short
    or never delivered. The files' footers matched the manifest when the plan was made, so the data is there
    and the reader (or the storage read) lost it: an infrastructure failure, and running again may succeed.
    A file that no longer matches the manifest is a ``ManifestError`` instead (a user error)."""


@dataclass(frozen=True)
class RowGroup:
    """One row group of one of the spec's files."""

    file: int
    """Index into ``LoaderSpec.urls``."""
    index: int
    """Row group number inside the file."""
    rows: int
    """Rows its footer records."""


@dataclass(frozen=True)
class Plan:
    """The spec's row groups and the order this epoch reads them in."""

    shard: str
    urls: tuple[str, ...]
    files: tuple[tuple[Any, str], ...]
    """(pyarrow filesystem, path) of each url."""
    footers: tuple[Any, ...]
    """Each file's ``pyarrow.parquet.FileMetaData`` (the Arrow reader opens files with it: no second footer read)."""
    row_groups: tuple[RowGroup, ...]
    """Every row group, in file order: Petastorm's piece indexes."""
    order: tuple[int, ...]
    """Indexes into ``row_groups`` in the order they are to be handed over."""
    seed: int | None
    """The order's seed (``np.random.RandomState``); None: file order."""

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.row_groups)

    def describe(self, index: int) -> str:
        """'row group 3 of <url> (120 rows)', for messages."""
        g = self.row_groups[index]
        return f"row group {g.index} of {self.urls[g.file]} ({g.rows} rows)"


def _footer(fs_path: tuple[Any, str]) -> Any:
    import pyarrow.parquet as pq

    filesystem, path = fs_path
    with filesystem.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


def plan_row_groups(spec: LoaderSpec, order_seed: int | None) -> Plan:
    """The spec's row groups from its files' footers, in file order or (``order_seed``) Petastorm's shuffle.

    Raises:
        ManifestError: a footer disagrees with ``spec.file_counts`` (the manifest's rows, row groups).
    """
    files = tuple(arrow_fs(u) for u in spec.urls)
    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_THREADS, len(files)))) as pool:
        footers = tuple(pool.map(_footer, files))
    if spec.file_counts:
        for url, meta, (rows, groups) in zip(spec.urls, footers, spec.file_counts, strict=True):
            if (meta.num_rows, meta.num_row_groups) != (rows, groups):
                raise ManifestError(
                    f"{spec.shard}: {url} holds {meta.num_rows} rows in {meta.num_row_groups} row groups, the "
                    f"manifest says {rows} in {groups}; the partition output changed after it was written: "
                    "re-run jobs/partition.py"
                )
    row_groups = tuple(
        RowGroup(f, i, meta.row_group(i).num_rows) for f, meta in enumerate(footers) for i in range(meta.num_row_groups)
    )
    return Plan(
        spec.shard, spec.urls, files, footers, row_groups, planned_order(len(row_groups), order_seed), order_seed
    )


def planned_order(n: int, seed: int | None) -> tuple[int, ...]:
    """The order ``n`` row groups are read in: 0..n-1, or Petastorm's ventilator shuffle for ``seed``
    (``RandomState(seed).shuffle`` of the item list draws as ``RandomState(seed).permutation(n)`` does)."""
    if seed is None:
        return tuple(range(n))
    return tuple(np.random.RandomState(seed).permutation(n).tolist())


def checked(tagged: Iterable[tuple[int, pa.Table]], plan: Plan, reader: str) -> Iterator[pa.Table]:
    """The tables of ``tagged`` ((row-group index, table) from the reader named ``reader``), checked against
    ``plan``; tables without rows are dropped after their check.

    Every table must be the next planned row group, with the rows its footer records; when the reader is
    exhausted every planned row group must have come. The check is exact for the prefix that was read: a
    consumer that stops early (the epoch's steps are done, a ``row_range`` window is full) leaves the unread
    tail unchecked, and none of its batches came from that tail.

    Raises:
        RowGroupError: naming the shard, the row group (file, number) and the rows expected and got.
    """
    fix = f"the files hold it (their footers match the manifest), so train.reader={reader} lost it: run again"
    if reader == "petastorm":
        fix += "; Petastorm must be < 0.13 (0.13's thread pool drops row groups), or set train.reader=arrow"
    pos = delivered = 0
    for index, table in tagged:
        if pos == len(plan.order):
            raise RowGroupError(
                f"{plan.shard}: the reader handed {plan.describe(index)} after all {pos} planned row groups; {fix}"
            )
        want = plan.order[pos]
        if index != want:
            raise RowGroupError(
                f"{plan.shard}: {plan.describe(want)} was never handed over: the reader gave "
                f"{plan.describe(index)} in its place, at position {pos + 1} of {len(plan.order)} in the planned "
                f"order ({delivered} rows before it); {fix}"
            )
        if table.num_rows != plan.row_groups[want].rows:
            raise RowGroupError(
                f"{plan.shard}: {plan.describe(want)} came with {table.num_rows} rows, expected "
                f"{plan.row_groups[want].rows}; {fix}"
            )
        pos += 1
        delivered += table.num_rows
        if table.num_rows:
            yield table
    if pos < len(plan.order):  # complete otherwise: every planned row group came with its footer's rows
        missing = plan.order[pos:]
        raise RowGroupError(
            f"{plan.shard}: the reader ended after {pos} of {len(plan.order)} planned row groups, {delivered} of "
            f"{plan.rows} rows; {len(missing)} never came, first {plan.describe(missing[0])}; {fix}"
        )


def spec_columns(spec: LoaderSpec) -> list[str]:
    """The columns a spec reads: features (array column, scalar columns or sparse pair), label, row id."""
    if spec.sparse is not None:
        features = list(spec.sparse[:2])
    else:
        features = [spec.features_col] if spec.features_col else list(spec.feature_cols)
    return [*features, spec.label_col, *filter(None, [spec.row_id_col])]
