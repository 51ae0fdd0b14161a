"""Row-group readers: where a rank's shard files become decoded Arrow tables, behind one seam (``train.reader``).

``open_row_groups(spec, order_seed)`` is everything the loader asks of a reader: a context manager that
yields the spec's row groups as ``pyarrow.Table`` s (only the spec's columns), one per row group, in the
planned order, and stops and joins the reader's threads or processes on every exit. Two readers are
registered in ``READERS``:

- ``petastorm``: Petastorm 0.12.1's ``Reader`` with our numbered pool and worker (``petastorm_reader``).
  Petastorm imports the pyarrow APIs removed in pyarrow 15, so it runs on the pinned stack only; it is
  imported lazily, when this reader is opened, never when this package is.
- ``arrow``: the project's own, on ``pyarrow.parquet`` + ``pyarrow.fs`` (``arrow_reader``); any pyarrow >= 14.

Order: ``plan.plan_row_groups`` lists the row groups from the files' footers in file order and, with shuffle
on, permutes them exactly as Petastorm's ventilator does for the same seed; both readers hand tables over in
that order whatever order their workers finish in. So for the same spec, seed and epoch the two readers
yield the same tables, and the loader the same batches, bit for bit, for any ``workers_count``.

Memory: each reader keeps at most ``workers_count + 2`` row groups read ahead and not yet handed over,
whatever the shard size.

The check (never lose a row group silently): the tables go through ``plan.checked`` before the loader sees
them. Every handed-over table must be the next planned row group with the rows its footer records (and the
footers must match the manifest's rows and row groups per file, checked when the plan is made), and when the
reader is exhausted every planned row group must have come. A miss is a ``RowGroupError`` naming the shard,
the file and row group, and the rows expected and got; an infrastructure error (``InfraError``), since the
files hold the rows and the reader lost them (Petastorm 0.13's thread pool drops row groups under a race).

Choice (``resolve_reader``): ``auto`` is ``petastorm`` where it imports (and is older than 0.13), else
``arrow``, logged with the reason; ``petastorm`` where it cannot import is a one-line ``LoaderError``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa

from sparkml_dist.errors import UserError
from sparkml_dist.registry import Registry
from sparkml_dist.training.readers.arrow_reader import read_arrow
from sparkml_dist.training.readers.petastorm_reader import read_petastorm
from sparkml_dist.training.readers.plan import Plan, RowGroup, RowGroupError, checked, plan_row_groups, spec_columns

if TYPE_CHECKING:
    from sparkml_dist.training.loader import LoaderSpec

__all__ = [
    "READERS",
    "Plan",
    "ReaderError",
    "RowGroup",
    "RowGroupError",
    "open_row_groups",
    "petastorm_unusable",
    "resolve_reader",
    "spec_columns",
]

log = logging.getLogger("sparkml_dist.readers")  # its pre-move name: logging configs keep working

RowGroupReader = Callable[["LoaderSpec", Plan, list[str]], AbstractContextManager[Iterator[tuple[int, pa.Table]]]]
"""A reader: (spec, plan, columns) -> a context manager yielding (row-group index into ``plan.row_groups``,
table) in ``plan.order``; a reader may not skip the check: ``open_row_groups`` applies it."""

READERS: Registry[RowGroupReader] = Registry("row-group reader", "train.reader")
READERS.register("petastorm")(read_petastorm)
READERS.register("arrow")(read_arrow)

PETASTORM_BELOW = (0, 13)
"""Petastorm 0.13's ThreadPool drops row groups under a check-then-act race (issue 30); 0.12.1 does not."""


class ReaderError(UserError):
    """``train.reader`` names a reader that cannot run here; the message names why and the fix."""


@functools.cache
def petastorm_unusable() -> str | None:
    """Why the petastorm reader cannot run in this interpreter (the import error), or None where it can."""
    try:
        import petastorm
        from petastorm.arrow_reader_worker import ArrowReaderWorker  # noqa: F401
        from petastorm.reader import Reader  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (ImportError, or AttributeError from a removed pyarrow API)
        return " ".join(f"import petastorm failed: {type(exc).__name__}: {exc}".split())  # one line
    version = getattr(petastorm, "__version__", "0")
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= PETASTORM_BELOW:
        return f"petastorm {version} is installed, whose thread pool drops row groups: the reader needs < 0.13"
    return None


_logged: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def resolve_reader(name: str) -> str:
    """The registered reader ``train.reader=name`` runs here: ``auto`` becomes ``petastorm`` or ``arrow``.

    Raises:
        ReaderError: ``petastorm`` is asked for where it cannot run.
        UnknownNameError: no reader of that name is registered.
    """
    if name == "auto":
        why = petastorm_unusable()
        if why is None:
            _log_once(logging.INFO, "train.reader=auto: reading shards with petastorm (it imports here)")
            return "petastorm"
        _log_once(logging.WARNING, f"train.reader=auto: reading shards with the arrow reader: {why}")
        return "arrow"
    READERS.get(name)
    if name == "petastorm" and (why := petastorm_unusable()) is not None:
        raise ReaderError(
            f"train.reader=petastorm cannot run here ({why}): set train.reader=arrow (same batches), or install "
            "the pinned stack (petastorm>=0.12.1,<0.13 with pyarrow<=14: make setup)"
        )
    return name


@contextmanager
def open_row_groups(spec: LoaderSpec, order_seed: int | None) -> Iterator[Iterator[pa.Table]]:
    """The spec's row groups as Arrow tables, in planned order (file order, or ``order_seed``'s permutation),
    checked against the plan (``plan.checked``); the reader is stopped and joined on every exit."""
    name = resolve_reader(spec.reader)
    plan = plan_row_groups(spec, order_seed)
    with READERS.get(name)(spec, plan, spec_columns(spec)) as tagged:
        yield checked(tagged, plan, name)
