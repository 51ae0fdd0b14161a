"""The worker's (and the driver's) side of the parameter-server wire: one ZeroMQ DEALER socket per shard.

A call sends one request to every shard it concerns and waits for each reply with a deadline; a request
that outlives its deadline raises ``ServerUnreachableError`` naming the shard and its address, and the
late reply is discarded by its request id. Counts the bytes it pushes and pulls and the seconds it waits
on pulls (the staleness bound shows up there). Runs inside workers; never imports pyspark.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparkml_dist.errors import InfraError, UserError
from sparkml_dist.ps.wire import decode, encode


class ServerUnreachableError(InfraError):
    """A server shard did not answer within comm.ps_timeout_s (lost, or overloaded)."""


class RefusedError(UserError):
    """A server shard refused the request (wrong secret, a bad request)."""


class WorkerLostError(InfraError):
    """A pull waited longer than comm.ps_timeout_s on the staleness bound: the slowest worker is lost."""


@dataclass(frozen=True)
class Endpoint:
    index: int
    address: str
    """tcp://host:port"""
    lo: int
    hi: int


@dataclass
class Traffic:
    push_bytes: int = 0
    pull_bytes: int = 0
    pull_wait_s: float = 0.0
    pushes: int = 0


class PSClient:
    def __init__(self, endpoints: list[Endpoint], secret: str, timeout_s: float, worker: int = -1) -> None:
        import zmq

        self._zmq = zmq
        self.endpoints = endpoints
        self.secret = secret
        self.timeout_s = timeout_s
        self.worker = worker
        self.traffic = Traffic()
        self._ctx = zmq.Context()
        self._socks = []
        for ep in endpoints:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep.address)
            self._socks.append(s)
        self._rid = itertools.count(1)
        self.size = max((ep.hi for ep in endpoints), default=0)

    def close(self) -> None:
        for s in self._socks:
            s.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, header: dict[str, Any], per_shard: dict[int, tuple[dict[str, Any], list[np.ndarray]]] | None = None
    ) -> list[tuple[dict[str, Any], list[np.ndarray]]]:
        """Send ``header`` to every shard (or, with ``per_shard``, shard i its extra header fields and arrays),
        in parallel; each shard's (reply header, arrays), in shard order."""
        requests = per_shard if per_shard is not None else {i: ({}, []) for i in range(len(self.endpoints))}
        rids = {}
        for i, (extra, arrays) in requests.items():
            rids[i] = next(self._rid)
            msg = {**header, **extra, "rid": rids[i], "secret": self.secret, "worker": self.worker}
            self._socks[i].send_multipart(encode(msg, *arrays))
        out: dict[int, tuple[dict[str, Any], list[np.ndarray]]] = {}
        deadline = time.monotonic() + self.timeout_s
        poller = self._zmq.Poller()
        for i in requests:
            poller.register(self._socks[i], self._zmq.POLLIN)
        while len(out) < len(requests):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [self.endpoints[i] for i in requests if i not in out]
                raise ServerUnreachableError(
                    f"parameter server shard(s) {', '.join(f'{e.index} at {e.address}' for e in missing)} did not "
                    f"answer a {header.get('op')} within comm.ps_timeout_s={self.timeout_s:g} s: lost or overloaded"
                )
            for sock, _ in poller.poll(int(min(left, 1.0) * 1000) + 1):
                i = self._socks.index(sock)
                reply, data = decode(sock.recv_multipart())
                if reply.get("rid") != rids[i]:
                    continue  # the late answer to a request we gave up on
                if not reply.get("ok"):
                    err = f"parameter server shard {i} at {self.endpoints[i].address}: {reply.get('error')}"
                    raise (WorkerLostError if reply.get("lost") else RefusedError)(err)
                out[i] = (reply, data)
        return [out[i] for i in sorted(requests)]

    def hello(self, host: str, attempt: int) -> tuple[int, bool]:
        """Register; (the clock to continue at: the lowest any shard has, whether training is done)."""
        replies = self.call({"op": "hello", "host": host, "attempt": attempt})
        return min(int(r["clock"]) for r, _ in replies), any(r["done"] for r, _ in replies)

    def _split(self, keys: np.ndarray) -> list[tuple[int, int]]:
        """Where each shard's keys lie in ``keys`` (ascending global positions): (start, end) per shard. Keys
        out of order or out of range would be split wrongly and dropped, so they are refused here."""
        if keys.ndim != 1 or (keys.size and (keys[0] < 0 or keys[-1] >= self.size or np.any(keys[1:] <= keys[:-1]))):
            raise ValueError(f"keys must be ascending, unique positions in [0, {self.size}): got {keys[:8]}...")
        bounds = np.searchsorted(keys, [ep.lo for ep in self.endpoints] + [self.size])
        return [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(self.endpoints))]

    def pull(self, clock: int, keys: np.ndarray | None = None) -> tuple[np.ndarray, list[int], bool]:
        """(the parameters, each shard's version, done) for a step at ``clock``: the whole flat vector, or with
        ``keys`` (ascending, unique int64 positions in it: what the next batch reads) only those values, in
        the keys' order. Each shard is asked for its own keys, as int32 positions in its slice."""
        t0 = time.perf_counter()
        per_shard: dict[int, tuple[dict[str, Any], list[np.ndarray]]] | None = None
        spans: list[tuple[int, int]] = []
        if keys is not None:
            spans = self._split(keys)
            per_shard = {
                i: ({}, [(keys[a:b] - ep.lo).astype(np.int32)])
                for i, (ep, (a, b)) in enumerate(zip(self.endpoints, spans, strict=True))
            }
            self.traffic.pull_bytes += 4 * len(keys)
        try:
            replies = self.call({"op": "pull", "clock": clock}, per_shard)
        finally:
            self.traffic.pull_wait_s += time.perf_counter() - t0
        out = np.empty(self.size if keys is None else len(keys), dtype=np.float32)
        for i, (ep, (_, data)) in enumerate(zip(self.endpoints, replies, strict=True)):
            a, b = (ep.lo, ep.hi) if keys is None else spans[i]
            if data[0].size != b - a:
                raise RefusedError(f"parameter server shard {i} answered {data[0].size} values for {b - a} asked")
            out[a:b] = data[0]
            self.traffic.pull_bytes += data[0].nbytes
        return out, [int(r["version"]) for r, _ in replies], any(r["done"] for r, _ in replies)

    def push(
        self, grad: np.ndarray, clock: int, versions: list[int], loss_sum: float, rows: int,
        keys: np.ndarray | None = None,
    ) -> bool:  # fmt: skip
        """Push the gradient (each shard its part, with the version it was pulled at); True when done. ``grad``
        is the whole flat gradient, or with ``keys`` (as for ``pull``) its values at those positions: the
        gradient is zero elsewhere. Every shard gets a push, an empty one too, so all clocks advance."""
        header = {"op": "push", "clock": clock, "loss_sum": loss_sum, "rows": rows}
        if keys is None:
            per_shard = {i: ({"version": versions[i]}, [grad[ep.lo : ep.hi]]) for i, ep in enumerate(self.endpoints)}
            sent = grad.nbytes
        else:
            per_shard = {
                i: ({"version": versions[i]}, [grad[a:b], (keys[a:b] - ep.lo).astype(np.int32)])
                for i, (ep, (a, b)) in enumerate(zip(self.endpoints, self._split(keys), strict=True))
            }
            sent = grad.nbytes + 4 * len(keys)
        replies = self.call(header, per_shard)
        self.traffic.push_bytes += sent
        self.traffic.pushes += 1
        return any(r["done"] for r, _ in replies)
