"""What crosses the wire between workers, the driver and the server shards: ZeroMQ multipart messages of one
JSON header frame and zero or more raw little-endian float32 frames (parameters, gradients), or int32 ones
(the keys of a sparse pull or push, named in the header's ``dtypes``). ZeroMQ does the framing, reconnection
and queueing; this module only names the fields. Pure standard library + numpy.

A request header carries ``op``, the run's ``secret`` and a request id ``rid`` that the reply echoes, so a
client that gave up on a reply (timeout) never mistakes a late one for the answer to its next request.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

OPS = ("hello", "pull", "push", "epoch", "status", "stop")


WIRE_DTYPES = {"f4": "<f4", "i4": "<i4"}


def encode(header: dict[str, Any], *arrays: np.ndarray) -> list[bytes]:
    """One message: the JSON header, then each array's bytes: int32 arrays as int32 (their kinds listed in
    the header's ``dtypes``), everything else as float32."""
    kinds = ["i4" if a.dtype == np.int32 else "f4" for a in arrays]
    if "i4" in kinds:
        header = {**header, "dtypes": kinds}
    frames = [json.dumps(header, separators=(",", ":")).encode()]
    frames += [np.ascontiguousarray(a, dtype=WIRE_DTYPES[k]).tobytes() for a, k in zip(arrays, kinds, strict=True)]
    return frames


def decode(frames: list[bytes]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(header, arrays) of a message made by ``encode``; the arrays are read-only views of the frames."""
    header = json.loads(frames[0])
    if not isinstance(header, dict):
        raise ValueError("message header is not a JSON object")
    kinds = header.get("dtypes") or ["f4"] * (len(frames) - 1)
    if len(kinds) != len(frames) - 1 or any(k not in WIRE_DTYPES for k in kinds):
        raise ValueError("message dtypes do not match its frames")
    arrays = [np.frombuffer(f, dtype=WIRE_DTYPES[k]) for f, k in zip(frames[1:], kinds, strict=True)]
    return header, [a.astype(np.int32) if k == "i4" else a for a, k in zip(arrays, kinds, strict=True)]
