"""What crosses the wire between workers, the driver and the server shards: ZeroMQ multipart messages of one
JSON header frame and zero or more raw little-endian float32 frames (parameters, gradients). ZeroMQ does the
framing, reconnection and queueing; this module only names the fields. Pure standard library + numpy.

A request header carries ``op``, the run's ``secret`` and a request id ``rid`` that the reply echoes, so a
client that gave up on a reply (timeout) never mistakes a late one for the answer to its next request.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

OPS = ("hello", "pull", "push", "epoch", "status", "stop")


def encode(header: dict[str, Any], *arrays: np.ndarray) -> list[bytes]:
    """One message: the JSON header, then each array's float32 bytes."""
    frames = [json.dumps(header, separators=(",", ":")).encode()]
    frames += [np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays]
    return frames


def decode(frames: list[bytes]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(header, arrays) of a message made by ``encode``; the arrays are read-only views of the frames."""
    header = json.loads(frames[0])
    if not isinstance(header, dict):
        raise ValueError("message header is not a JSON object")
    return header, [np.frombuffer(f, dtype="<f4") for f in frames[1:]]
