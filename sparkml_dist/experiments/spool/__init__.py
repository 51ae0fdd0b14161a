"""Metrics kept while the tracking server is away, delivered when it is back (issue 19 section 3).

MLflow's client retries a failed request for about two minutes and then raises; a longer outage would fail
the run, and every retry would stall the rank that logs. So a training run gets a *spool*: a directory
beside its checkpoints (``<train.runs_url>/<run id>/tracking-spool``, on the same storage, so rank 0 on any
executor and the driver all reach it). Before each log, a 2-second TCP probe asks whether the tracking
server answers; if not, the batch becomes one small JSON file in the spool and training goes on at once.
The next log that finds the server up delivers the spool first (oldest first); the driver, at the end of the
run, waits up to ``tracking.outage_wait_s`` for the server and delivers what is left, or fails with an error
that says where the metrics and the model are. Each file is claimed (renamed) before it is sent, so two
processes never deliver the same batch; a failed send puts it back.

Only servers are probed (``http(s)://``): a database or file store has no outage of this kind. Pure
standard library + pyarrow's filesystem; no pyspark, no mlflow.

``python -m sparkml_dist.spool`` (``__main__.py``) delivers a spool by hand; it sits above both this module and
``tracking`` (which sends the rows), so neither imports the other back.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("sparkml_dist.spool")  # its pre-move name: logging configs keep working

SPOOL_DIR = "tracking-spool"
PROBE_TIMEOUT_S = 2.0
Row = tuple[str, float, int, int]
"""(MLflow metric key, value, timestamp ms, step): one metric of a batch, as MLflow's ``Metric`` takes it."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a tracking server at ``uri`` accepts a TCP connection (always True for non-server stores)."""
    if not is_server(uri):
        return True
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _fs(url: str) -> tuple[Any, str]:
    from sparkml_dist.data.manifest import arrow_fs

    return arrow_fs(url.rstrip("/"))


def write(spool_url: str, rows: list[Row]) -> str:
    """Keep one batch as a new file in the spool (written to a temp name, then renamed); its URL."""
    filesystem, root = _fs(spool_url)
    filesystem.create_dir(root, recursive=True)
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    tmp = f"{root}/.{name}.tmp"
    with filesystem.open_output_stream(tmp) as out:
        out.write(json.dumps([list(r) for r in rows]).encode())
    filesystem.move(tmp, f"{root}/{name}")
    return f"{spool_url.rstrip('/')}/{name}"


def pending(spool_url: str) -> list[str]:
    """Names of the batches waiting in the spool, oldest first (none when it does not exist)."""
    from pyarrow import fs as pafs

    filesystem, root = _fs(spool_url)
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.base_name.endswith(".json") and not i.base_name.startswith("."))


def kept_rows(spool_url: str) -> list[Row]:
    """Every row the spool holds now, oldest batch first (read, not claimed: the driver's progress display reads
    them during an outage; a batch delivered meanwhile is skipped)."""
    filesystem, root = _fs(spool_url)
    rows: list[Row] = []
    for name in pending(spool_url):
        try:
            with filesystem.open_input_stream(f"{root}/{name}") as f:
                rows += [(str(k), float(v), int(t), int(s)) for k, v, t, s in json.loads(f.read())]
        except (OSError, ValueError):  # claimed and delivered since it was listed
            continue
    return rows


def deliver(spool_url: str, send: Callable[[list[Row]], None]) -> int:
    """Send every waiting batch, oldest first, deleting each once sent; stop at the first failed send (the
    batch goes back). Returns how many were delivered."""
    filesystem, root = _fs(spool_url)
    sent = 0
    for name in pending(spool_url):
        claimed = f"{root}/.{name}.claimed-{uuid.uuid4().hex[:8]}"
        try:
            filesystem.move(f"{root}/{name}", claimed)
        except OSError:  # another process claimed it first
            continue
        try:
            with filesystem.open_input_stream(claimed) as f:
                rows = [(str(k), float(v), int(t), int(s)) for k, v, t, s in json.loads(f.read())]
            send(rows)
        except BaseException:
            filesystem.move(claimed, f"{root}/{name}")
            raise
        filesystem.delete_file(claimed)
        sent += 1
    return sent
