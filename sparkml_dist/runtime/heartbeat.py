"""Per-rank heartbeats to the driver, so a stalled rank fails the stage instead of hanging it.

A rank blocked in a collective cannot tell a slow peer from a stopped one, and Gloo's own timeout fires
on the *waiting* ranks with a message that names none of them. So every rank's daemon thread PUTs a tiny
JSON record (rank, host, pid, step) to a server on the driver every few seconds; a process that is
SIGSTOPped, swapped out or lost stops beating (its peers, blocked in the allreduce, keep beating). The
driver (``launch.run_on_ranks``) polls ``stalled()`` and cancels the stage with a message naming the
rank, its host and pid.

A rank can also hang *alive*: its heart beats, but it never reaches the next collective (a deadlocked
loader thread, an endless loop, a blocking call outside the step loop) while its peers wait inside one.
So each beat also says which collective the rank is in (if any) and how many it has entered; ``stuck()``
finds ranks outside every collective whose state has not moved for as long as a peer has waited inside
one, and the driver fails the attempt naming them.

When the watch says a rank is stuck but not why, its stacks do: ``dump_stacks_on_signal`` (called in the job's
driver and in every rank) makes ``kill -USR1 <pid>`` write every thread's Python stack to that process's
stderr (a rank's reaches the executor's log; locally, the job's console) and carry on.

The server binds the driver's own address (127.0.0.1 locally), answers only requests whose path starts
with a per-run random secret (403 otherwise), and is a context manager that stops it on every exit.
Pure standard library; no pyspark, no torch.
"""

from __future__ import annotations

import faulthandler
import hmac
import json
import logging
import secrets
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("sparkml_dist.heartbeat")  # its pre-move name: logging configs keep working

FORBIDDEN = 403
MAX_BODY = 16384

_progress: dict[str, Any] = {"step": -1, "entered": 0, "waiting": None}


STACKS_SIGNAL = getattr(signal, "SIGUSR1", None)
"""The signal on which a driver or rank writes every thread's stack to its stderr (None where there is none)."""


def dump_stacks_on_signal() -> bool:
    """From now on ``kill -USR1 <this pid>`` writes every thread's Python stack to stderr (``faulthandler``, so
    even a thread that holds the GIL in C, or a deadlocked one, shows where it is) and the process goes on.
    False where it cannot (no such signal, a stderr without a file descriptor): nothing else changes."""
    stderr = sys.__stderr__
    if STACKS_SIGNAL is None or stderr is None:
        return False
    try:
        faulthandler.register(STACKS_SIGNAL, file=stderr, all_threads=True, chain=False)
    except (AttributeError, OSError, RuntimeError, TypeError, ValueError) as exc:  # no fd behind stderr, no such signal
        log.debug("kill -USR1 will not dump this process's stacks: %s", exc)
        return False
    return True


def progress(step: int) -> None:
    """Record this process's latest training step; the next heartbeat carries it."""
    _progress["step"] = step


@contextmanager
def in_collective(name: str) -> Iterator[None]:
    """Mark this process as inside collective ``name`` while the block runs (the next beats carry it)."""
    _progress["entered"] += 1
    _progress["waiting"] = name
    try:
        yield
    finally:
        _progress["waiting"] = None


@dataclass(frozen=True)
class Beat:
    rank: int
    host: str
    pid: int
    step: int
    age_s: float
    done: bool
    waiting: str | None = None
    """The collective this rank is inside, if any."""
    still_s: float = 0.0
    """Seconds since this rank's step, collective count or collective last changed."""
    failure: str | None = None
    """The error this rank ended with, as its task reported it (its final beat), if it failed."""


class _Handler(BaseHTTPRequestHandler):
    server: _HeartbeatHTTPServer

    def _authorized_path(self) -> list[str] | None:
        parts = self.path.strip("/").split("/")
        if not parts or not hmac.compare_digest(parts[0].encode(), self.server.secret.encode()):
            self.send_response(FORBIDDEN)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return parts[1:]

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        parts = self._authorized_path()
        if parts is None:
            return
        length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
        try:
            attempt, rank = int(parts[0]), int(parts[1])
            body = json.loads(self.rfile.read(length) or b"{}")
        except (IndexError, ValueError):
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        now = time.monotonic()
        state = (body.get("step"), body.get("entered"), body.get("waiting"))
        with self.server.lock:
            moved = self.server.moved.get((attempt, rank))
            if moved is None or moved[1] != state:
                self.server.moved[(attempt, rank)] = (now, state)
            self.server.beats[(attempt, rank)] = (now, body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        parts = self._authorized_path()
        if parts is None:
            return
        with self.server.lock:
            data = json.dumps({f"{a}/{r}": b for (a, r), (_, b) in self.server.beats.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (keep stderr quiet)
        pass


class _HeartbeatHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, secret: str) -> None:
        super().__init__((host, 0), _Handler)
        self.secret = secret
        self.lock = threading.Lock()
        self.beats: dict[tuple[int, int], tuple[float, dict[str, Any]]] = {}
        self.moved: dict[tuple[int, int], tuple[float, tuple[Any, ...]]] = {}


SERVER_POLL_S = 0.05
"""How often a socket server of the stage (this one, Horovod's rendezvous) looks for its shutdown: ``shutdown()``
waits for the next look, and socketserver's default, 0.5 s, was every stage's last half second."""


class HeartbeatServer:
    """Driver side: ``with HeartbeatServer("127.0.0.1") as hb: ... hb.url ... hb.stalled(attempt, 60)``."""

    def __init__(self, host: str) -> None:
        self._server = _HeartbeatHTTPServer(host, secrets.token_hex(16))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": SERVER_POLL_S}, daemon=True, name="heartbeats"
        )

    @property
    def url(self) -> str:
        """Base URL including the per-run secret (shipped to the ranks inside the task closure)."""
        host, port = self.address
        return f"http://{host}:{port}/{self._server.secret}"

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return host if isinstance(host, str) else host.decode(), int(port)

    def __enter__(self) -> HeartbeatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def beats(self, attempt: int) -> dict[int, Beat]:
        now = time.monotonic()
        with self._server.lock:
            items = [(r, t, b) for (a, r), (t, b) in self._server.beats.items() if a == attempt]
            moved = {r: m[0] for (a, r), m in self._server.moved.items() if a == attempt}
        return {
            r: Beat(r, str(b.get("host", "?")), int(b.get("pid", -1)), int(b.get("step", -1)), now - t,
                    bool(b.get("done", False)), b.get("waiting"), now - moved.get(r, t), b.get("failure"))
            for r, t, b in items
        }  # fmt: skip

    def heard_from(self, attempt: int) -> bool:
        """Whether any rank of ``attempt`` has reached this server."""
        with self._server.lock:
            return any(a == attempt for a, _ in self._server.beats)

    def stalled(self, attempt: int, timeout_s: float) -> list[Beat]:
        """Ranks of ``attempt`` that beat at least once, are not done, and were silent for > timeout_s."""
        return sorted(
            (b for b in self.beats(attempt).values() if not b.done and b.age_s > timeout_s), key=lambda b: b.rank
        )

    def stuck(self, attempt: int, timeout_s: float) -> tuple[list[Beat], list[Beat]]:
        """(ranks stuck outside every collective, the peers waiting for them): both unmoved for > timeout_s,
        all still beating and not done; two empty lists when no rank waits that long on a live peer."""
        live = [b for b in self.beats(attempt).values() if not b.done and b.still_s > timeout_s]
        waiting = sorted((b for b in live if b.waiting), key=lambda b: b.rank)
        outside = sorted((b for b in live if not b.waiting and b.age_s <= timeout_s), key=lambda b: b.rank)
        return (outside, waiting) if waiting and outside else ([], [])


def public_address(url: str) -> str:
    """``http://host:port`` of a heartbeat URL, without its per-run secret (safe to log)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def describe(beats: list[Beat]) -> str:
    return "; ".join(
        f"rank {b.rank} on {b.host} (pid {b.pid}) sent no heartbeat for {b.age_s:.0f} s (last at step {b.step})"
        for b in beats
    )


def describe_stuck(outside: list[Beat], waiting: list[Beat]) -> str:
    ranks = "; ".join(
        f"rank {b.rank} on {b.host} (pid {b.pid}) is alive but has been outside every collective for "
        f"{b.still_s:.0f} s (at step {b.step})"
        for b in outside
    )
    peers = ", ".join(f"rank {b.rank} in {b.waiting!r} for {b.still_s:.0f} s" for b in waiting)
    return f"{ranks}, while its peers wait for it ({peers})"


def _clip(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters: its first lines and its end (where a traceback names the error)."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]}\n[... {len(text) - limit} characters ...]\n{text[-(limit - head) :]}"


def _put(url: str, body: dict[str, Any], timeout_s: float) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout_s):
        pass


@contextmanager
def beating(
    url: str | None, attempt: int, rank: int, host: str, interval_s: float, report: dict[str, str] | None = None
) -> Iterator[None]:
    """Rank side: beat every ``interval_s`` while the block runs, then send a final 'done' beat.

    ``report["failure"]``, set by the block before it raises, rides on the final beat: Spark hands the driver
    only the first failed task's error, which is often a peer's lost connection rather than the cause.

    Heartbeats must not be what breaks a run, so a driver this rank cannot reach does not fail it; but the
    first beat is sent before the block starts and, if it fails, a warning names the server's address (not its
    secret): without beats the driver never sees this rank and cannot call it stalled.
    """
    if not url:
        yield
        return
    import os

    target = f"{url}/{attempt}/{rank}"
    stop = threading.Event()

    def body(done: bool = False) -> dict[str, Any]:
        return {"rank": rank, "host": host, "pid": os.getpid(), "done": done, **_progress}

    def loop() -> None:  # the first beat is sent below, before the block starts
        while not stop.wait(interval_s):
            try:
                _put(target, body(), timeout_s=max(1.0, interval_s))
            except Exception:  # noqa: BLE001 (best effort, see above)
                pass

    _progress.update(step=-1, entered=0, waiting=None)
    try:
        _put(target, body(), timeout_s=max(1.0, interval_s))
    except Exception as exc:  # noqa: BLE001 (reported, not raised: see above)
        log.warning(
            "rank %d on %s cannot reach the driver's heartbeat server at %s (%s): stall detection is off for this "
            "rank. The driver listens on spark.driver.bindAddress / spark.driver.host; set it to an address the "
            "executors can reach.",
            rank, host, public_address(url), exc,
        )  # fmt: skip
    thread = threading.Thread(target=loop, daemon=True, name=f"heartbeat-rank-{rank}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(interval_s + 2)
        try:
            final = body(done=True)
            if report and report.get("failure"):
                final["failure"] = _clip(report["failure"], MAX_BODY // 2)  # JSON escapes grow it
            _put(target, final, timeout_s=2.0)
        except Exception:  # noqa: BLE001
            pass
