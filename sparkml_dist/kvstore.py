"""A guarded key-value rendezvous for torch.distributed: an HTTP server on rank 0's task address and a
``torch.distributed.Store`` client over it. Rank side: never imports pyspark.

Why our own: torch's ``TCPStore`` listens on every interface and accepts anyone who connects, and it has no
way to check a secret. This server binds to the one address the barrier stage gave rank 0, answers only the
stage's hosts, and only requests whose first path segment is the per-run secret (compared in constant time);
anything else gets 403 before it reaches the store. The secret travels like the address, through the barrier
stage's ``allGather``, and lives only in the ``HttpStore`` object: never in argv or the environment.

The store is used only while the process group forms (a few dozen keys: gloo's pair addresses and the
init barrier), so a blocking ``get``/``wait`` polls with a short back-off instead of holding a connection.
Every wait is bounded by the store's timeout (``launch.start_timeout_s``).
"""

from __future__ import annotations

import hmac
import http.client
import json
import secrets
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch.distributed as dist

from sparkml_dist.errors import InfraError

_POLL_S = (0.002, 0.05)
"""First and longest pause between polls of a key that is not there yet."""


class RendezvousError(InfraError):
    """The rendezvous store could not be reached, refused a request, or a key never appeared in time."""


class KVServer:
    """The rendezvous server: a dict of bytes behind a secret, bound to ``host``; a context manager."""

    def __init__(self, host: str, allowed_peers: set[str]) -> None:
        self.secret = secrets.token_hex(16)
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return None  # the stage's logs are not the place for every poll

            def do_POST(self) -> None:  # noqa: N802
                if self.client_address[0] not in allowed_peers or not self._secret_ok():
                    self._reply(403, b"")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                op = self.path.split("/")[2]
                status, out = server._apply(op, json.loads(body))
                self._reply(status, json.dumps(out).encode())

            def _secret_ok(self) -> bool:
                parts = self.path.split("/")
                return len(parts) > 2 and hmac.compare_digest(parts[1].encode(), server.secret.encode())

            def _reply(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._http = ThreadingHTTPServer((host, 0), Handler)
        self._http.daemon_threads = True
        self.host = host
        self.port = int(self._http.server_address[1])
        self._thread = threading.Thread(target=self._http.serve_forever, name="sparkml-dist-kvstore", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """What the ranks need to reach this store: ``host:port/secret``."""
        return f"{self.host}:{self.port}/{self.secret}"

    def _apply(self, op: str, req: dict[str, Any]) -> tuple[int, Any]:
        """One store operation; values travel as latin-1 strings of the raw bytes."""
        with self._lock:
            data = self._data
            if op == "set":
                data[req["key"]] = req["value"].encode("latin-1")
                return 200, None
            if op == "get":
                found = [data.get(k) for k in req["keys"]]
                if any(v is None for v in found):
                    return 200, None
                return 200, [v.decode("latin-1") for v in found if v is not None]
            if op == "add":
                value = int(data.get(req["key"], b"0")) + int(req["amount"])
                data[req["key"]] = str(value).encode()
                return 200, value
            if op == "compare_set":
                current = data.get(req["key"])
                expected = req["expected"].encode("latin-1")
                if (current is None and not expected) or current == expected:
                    data[req["key"]] = req["desired"].encode("latin-1")
                    return 200, req["desired"]
                return 200, (current if current is not None else expected).decode("latin-1")
            if op == "delete":
                return 200, data.pop(req["key"], None) is not None
            if op == "count":
                return 200, len(data)
            return 404, None

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> KVServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpStore(dist.Store):
    """torch.distributed's Store protocol over a ``KVServer``; what ``init_process_group(store=...)`` takes."""

    def __init__(self, address: str, timeout_s: float) -> None:
        super().__init__()
        hostport, _, self._secret = address.partition("/")
        host, _, port = hostport.rpartition(":")
        self._host, self._port = host, int(port)
        self._timeout_s = timeout_s
        self._local = threading.local()  # one keep-alive connection per calling thread

    # -- transport
    def _call(self, op: str, **req: Any) -> Any:
        deadline = time.monotonic() + self._timeout_s
        while True:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
            try:
                conn.request("POST", f"/{self._secret}/{op}", body=json.dumps(req).encode())
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if time.monotonic() > deadline:
                    raise RendezvousError(
                        f"the rendezvous store at {self._host}:{self._port} did not answer within "
                        f"{self._timeout_s:g} s ({exc}); raise launch.start_timeout_s or check rank 0's host"
                    ) from exc
                time.sleep(0.05)
                continue
            if resp.status != 200:
                raise RendezvousError(f"the rendezvous store refused {op!r} (HTTP {resp.status})")
            return json.loads(body)

    def _wait_for(self, keys: list[str], timeout_s: float) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        pause = _POLL_S[0]
        while True:
            found = self._call("get", keys=keys)
            if found is not None:
                return [v.encode("latin-1") for v in found]
            if time.monotonic() > deadline:
                raise RendezvousError(
                    f"keys {keys} did not appear in the rendezvous store within {timeout_s:g} s: another rank "
                    "never reached the process group (see its task's log), or raise launch.start_timeout_s"
                )
            time.sleep(pause)
            pause = min(pause * 2, _POLL_S[1])

    # -- torch.distributed.Store
    def set(self, key: str, value: Any) -> None:
        self._call("set", key=key, value=_text(value))

    def get(self, key: str) -> bytes:
        return self._wait_for([key], self._timeout_s)[0]

    def add(self, key: str, value: int) -> int:
        return int(self._call("add", key=key, amount=int(value)))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return str(self._call("compare_set", key=key, expected=_text(expected), desired=_text(desired))).encode(
            "latin-1"
        )

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(list(keys), timeout.total_seconds() if timeout is not None else self._timeout_s)

    def check(self, keys: list[str]) -> bool:
        return self._call("get", keys=list(keys)) is not None

    def delete_key(self, key: str) -> bool:
        return bool(self._call("delete", key=key))

    def num_keys(self) -> int:
        return int(self._call("count"))

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout_s = timeout.total_seconds()


def _text(value: Any) -> str:
    """Store values (bytes, or str from Python callers) as a latin-1 string: every byte maps to one char."""
    if isinstance(value, str):
        return value
    return bytes(value).decode("latin-1")

