"""Checkpoints on any filesystem pyarrow reaches (file://, hdfs://, s3://), written atomically.

A checkpoint is published by renaming a fully written temporary file, so a crash leaves either the
previous checkpoint or the new one, never a truncated file that looks valid.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Callable
from typing import Any

import torch

from sparkml_dist.runtime import faults

_NAME = re.compile(r"^epoch-(\d{6})(?:-step-(\d{8}))?\.pt$")
KEEP = 3
"""Newest checkpoints kept (epoch ends and mid-epoch positions alike)."""


def _fs(url: str) -> tuple[Any, str]:
    from sparkml_dist.data.manifest import arrow_fs  # takes paths with spaces, unlike FileSystem.from_uri

    return arrow_fs(url.rstrip("/"))


def _name(epoch: int, step: int) -> str:
    return f"epoch-{epoch:06d}.pt" if step == 0 else f"epoch-{epoch:06d}-step-{step:08d}.pt"


def save_checkpoint(dir_url: str, epoch: int, payload: dict[str, Any], step: int = 0) -> str:
    """Write ``payload`` as the checkpoint after ``epoch`` finished epochs and ``step`` batches of the next."""
    from pyarrow import fs as pafs

    filesystem, root = _fs(dir_url)
    filesystem.create_dir(root, recursive=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    final = f"{root}/{_name(epoch, step)}"
    tmp = f"{root}/.{_name(epoch, step)}.tmp-{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(buf.getvalue())
    faults.crash_point("checkpoint.before_publish")
    filesystem.move(tmp, final)
    infos = filesystem.get_file_info(pafs.FileSelector(root))  # one listing serves both clean-ups
    for old in _positions_in(infos)[:-KEEP]:
        filesystem.delete_file(f"{root}/{_name(*old)}")
    for info in infos:  # temp files of a crashed save
        if info.base_name.startswith(".epoch-") and ".pt.tmp-" in info.base_name:
            filesystem.delete_file(info.path)
    return f"{dir_url.rstrip('/')}/{_name(epoch, step)}"


def load_latest(dir_url: str, load: Callable[[bytes], Any] | None = None) -> dict[str, Any] | None:
    """The newest complete checkpoint under ``dir_url``, or None if there is none.

    ``load``: bytes -> object (e.g. ``device.Placement.load``, which maps tensors onto the rank's device);
    default: onto the CPU.
    """
    filesystem, root = _fs(dir_url)
    positions = _positions(filesystem, root)
    if not positions:
        return None
    with filesystem.open_input_stream(f"{root}/{_name(*positions[-1])}") as f:
        data = f.read()
    if load is not None:
        return load(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _positions(filesystem: Any, root: str) -> list[tuple[int, int]]:
    from pyarrow import fs as pafs

    return _positions_in(filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)))


def _positions_in(infos: list[Any]) -> list[tuple[int, int]]:
    """(finished epochs, steps into the next) of every checkpoint file, oldest first."""
    from pyarrow import fs as pafs

    found = (_NAME.match(i.base_name) for i in infos if i.type == pafs.FileType.File)
    return sorted((int(m.group(1)), int(m.group(2) or 0)) for m in found if m)
