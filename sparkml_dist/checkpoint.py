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

from sparkml_dist import faults

_NAME = re.compile(r"^epoch-(\d{6})\.pt$")
KEEP = 3


def _fs(url: str) -> tuple[Any, str]:
    from sparkml_dist.manifest import arrow_fs  # takes paths with spaces, unlike FileSystem.from_uri

    return arrow_fs(url.rstrip("/"))


def save_checkpoint(dir_url: str, epoch: int, payload: dict[str, Any]) -> str:
    """Write ``payload`` as the checkpoint after ``epoch`` (1-based count of finished epochs)."""
    from pyarrow import fs as pafs

    filesystem, root = _fs(dir_url)
    filesystem.create_dir(root, recursive=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    final = f"{root}/epoch-{epoch:06d}.pt"
    tmp = f"{root}/.epoch-{epoch:06d}.pt.tmp-{uuid.uuid4().hex[:8]}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(buf.getvalue())
    faults.crash_point("checkpoint.before_publish")
    filesystem.move(tmp, final)
    infos = filesystem.get_file_info(pafs.FileSelector(root))  # one listing serves both clean-ups
    for old in _epochs_in(infos)[:-KEEP]:
        filesystem.delete_file(f"{root}/epoch-{old:06d}.pt")
    for info in infos:  # temp files of a crashed save
        if info.base_name.startswith(".epoch-") and ".pt.tmp-" in info.base_name:
            filesystem.delete_file(info.path)
    return f"{dir_url.rstrip('/')}/epoch-{epoch:06d}.pt"


def load_latest(dir_url: str, load: Callable[[bytes], Any] | None = None) -> dict[str, Any] | None:
    """The newest complete checkpoint under ``dir_url``, or None if there is none.

    ``load``: bytes -> object (e.g. ``device.Placement.load``, which maps tensors onto the rank's device);
    default: onto the CPU.
    """
    filesystem, root = _fs(dir_url)
    epochs = _epochs(filesystem, root)
    if not epochs:
        return None
    with filesystem.open_input_stream(f"{root}/epoch-{epochs[-1]:06d}.pt") as f:
        data = f.read()
    if load is not None:
        return load(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _epochs(filesystem: Any, root: str) -> list[int]:
    from pyarrow import fs as pafs

    return _epochs_in(filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True)))


def _epochs_in(infos: list[Any]) -> list[int]:
    from pyarrow import fs as pafs

    found = (_NAME.match(i.base_name) for i in infos if i.type == pafs.FileType.File)
    return sorted(int(m.group(1)) for m in found if m)
