"""Collective engines: what the ranks of one barrier stage talk over (``launch.collectives``).

An ``Engine`` has three steps, run by the launcher inside every barrier task (rank side: never imports
pyspark):

1. ``serve`` (rank 0 only): start a rendezvous bound to rank 0's task address, guarded by a per-run secret and
   the stage's host list; its ``address`` travels to every rank through the barrier stage's ``allGather``.
2. ``join``: every rank joins the group through that address (bounded by ``launch.start_timeout_s``) and gets
   its metered ``Collectives``.
3. ``leave``: every rank leaves the group, so Spark can reuse the Python worker for the next stage.

``horovod`` (the default) is Horovod 0.28.1's ring AllReduce over Gloo (NCCL for CUDA tensors) with
Horovod's own HTTP rendezvous; ``torch`` is a ``torch.distributed`` process group (gloo on CPU, nccl on GPU)
over our ``kvstore``. Every strategy, compressor and mode talks to ``Collectives`` only, so both engines run
the same loop, heartbeats, checkpoints and byte counts. A new engine is one class and one
``@ENGINES.register``.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from sparkml_dist.config import LaunchConfig
from sparkml_dist.errors import UserError
from sparkml_dist.registry import Registry
from sparkml_dist.runtime import heartbeat
from sparkml_dist.runtime.rank import Collectives

log = logging.getLogger("sparkml_dist.engines")  # its pre-move name: logging configs keep working
T = TypeVar("T")

HOROVOD_RANK = "HOROVOD_RANK"
HOROVOD_SIZE = "HOROVOD_SIZE"
HOROVOD_LOCAL_RANK = "HOROVOD_LOCAL_RANK"
HOROVOD_LOCAL_SIZE = "HOROVOD_LOCAL_SIZE"
HOROVOD_CROSS_RANK = "HOROVOD_CROSS_RANK"
HOROVOD_CROSS_SIZE = "HOROVOD_CROSS_SIZE"
HOROVOD_HOSTNAME = "HOROVOD_HOSTNAME"
HOROVOD_GLOO_RENDEZVOUS_ADDR = "HOROVOD_GLOO_RENDEZVOUS_ADDR"
HOROVOD_GLOO_RENDEZVOUS_PORT = "HOROVOD_GLOO_RENDEZVOUS_PORT"
HOROVOD_GLOO_IFACE = "HOROVOD_GLOO_IFACE"
HOROVOD_GLOO_TIMEOUT_SECONDS = "HOROVOD_GLOO_TIMEOUT_SECONDS"
HOROVOD_CONTROLLER = "HOROVOD_CONTROLLER"
HOROVOD_CPU_OPERATIONS = "HOROVOD_CPU_OPERATIONS"
HOROVOD_GPU_OPERATIONS = "HOROVOD_GPU_OPERATIONS"
GLOO_SOCKET_IFNAME = "GLOO_SOCKET_IFNAME"
"""torch's gloo binds its pairs to this interface's address (else to what the hostname resolves to)."""


LEFT_SCOPE = "sparkml-dist-left"
"""The rendezvous keys (torch: TCPStore keys under the run's secret; Horovod: an ad-hoc KV scope) where each
rank other than 0 marks that it left the group: rank 0's exit barrier (``Rendezvous.wait_left``)."""
LEFT_POLL_S = 0.01
LEFT_PUT_TIMEOUT_S = 5.0


class LaunchError(UserError):
    """The cluster cannot run the barrier stage as configured (slots, host setup, an engine not installed)."""


@dataclass(frozen=True)
class Slot:
    """One rank's place in the stage (the fields Horovod's rendezvous server reads from a host plan entry)."""

    hostname: str
    rank: int
    local_rank: int
    cross_rank: int
    size: int
    local_size: int
    cross_size: int


def host_plan(hosts: list[str]) -> list[Slot]:
    """Rank i runs on hosts[i]; local ranks count per host, cross ranks count hosts per local rank."""
    size = len(hosts)
    local_rank = [hosts[:i].count(h) for i, h in enumerate(hosts)]
    plan = []
    for i, h in enumerate(hosts):
        peers = [hosts[j] for j in range(size) if local_rank[j] == local_rank[i]]
        plan.append(Slot(h, i, local_rank[i], peers.index(h), size, hosts.count(h), len(peers)))
    return plan


class Rendezvous(Protocol):
    """What ``Engine.serve`` returns: the address to share, a wait for every other rank's exit mark, and a
    way to stop it."""

    @property
    def address(self) -> str: ...

    def wait_left(self, world_size: int, timeout_s: float) -> bool:
        """Block until ranks 1..world_size-1 have marked that they left the group (``Engine.leave``), at most
        ``timeout_s``; whether they all did. Rank 0 calls it before ``close``, so no rank is still using the
        rendezvous when it stops: the exit barrier, through the engine's own store (Spark's
        ``BarrierTaskContext.barrier`` polls its RPC once a second, which cost every stage ~1 s)."""
        ...

    def close(self) -> None: ...


class Engine(ABC):
    """One rank's membership in a collective group; built fresh in every task."""

    name: ClassVar[str]

    def __init__(self, cfg: LaunchConfig) -> None:
        self.cfg = cfg

    def check_hosts(self, hosts: list[str], host: str) -> None:
        """Refuse a host setup this engine cannot run on, before anything starts."""
        return None

    @abstractmethod
    def serve(self, host: str, hosts: list[str], plan: list[Slot]) -> Rendezvous:
        """Rank 0: the rendezvous every rank joins through, bound to ``host``."""

    @abstractmethod
    def join(self, address: str, slot: Slot, host: str, device: str) -> Collectives:
        """Join the group (every rank, bounded by launch.start_timeout_s); this rank's collectives."""

    @abstractmethod
    def leave(self) -> None:
        """Leave the group; called on every exit after a successful ``join``. A rank other than 0 then marks
        in the rendezvous that it left (best effort: on a failed stage rank 0 may be gone already)."""


ENGINES: Registry[type[Engine]] = Registry("collective engine", "launch.collectives")


def build_engine(cfg: LaunchConfig) -> Engine:
    return ENGINES.get(cfg.collectives)(cfg)


def join_with_timeout(join: Any, timeout_s: float, rank: int, what: str) -> None:
    """Run ``join()`` (which blocks until every rank reached the rendezvous); exit the worker if it takes
    longer than ``timeout_s``: neither hvd.init nor gloo's connect can be interrupted from Python, and exiting
    fails the task and so the stage instead of hanging it."""
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(timeout_s):
            log.error("rank %d: %s did not finish within launch.start_timeout_s=%g", rank, what, timeout_s)
            print(f"rank {rank}: {what} did not finish within launch.start_timeout_s={timeout_s}", flush=True)
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True, name="sparkml-dist-join-watchdog").start()
    try:
        join()
    finally:
        done.set()


# ------------------------------------------------------------------------------------------------ horovod


class HorovodCollectives(Collectives):
    """Horovod's collectives (Gloo on CPU, NCCL on GPU); hvd.init() has been called by the engine."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        import horovod.torch as hvd

        self._hvd = hvd

    def _allreduce(self, tensor: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        hvd = self._hvd
        return hvd.allreduce(tensor, op=hvd.Average if average else hvd.Sum, name=name)

    def _allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self._hvd.allgather(tensor, name=name)

    def _broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> None:
        self._hvd.broadcast_(tensor, root_rank=root, name=name)

    def _broadcast_object(self, obj: T, root: int, name: str) -> T:
        return self._hvd.broadcast_object(obj, root_rank=root, name=name)

    def _allgather_object(self, obj: T, name: str) -> list[T]:
        return list(self._hvd.allgather_object(obj, name=name))


@ENGINES.register("horovod")
class HorovodEngine(Engine):
    """Horovod over Gloo: its rendezvous HTTP server on rank 0, configured through HOROVOD_* variables.

    Gloo's C++ store client builds "http://" + ADDR + ":" + PORT + "/" + scope + "/" + key and cannot send
    headers, so the per-run secret rides inside ADDR: "host:port/secret" makes the URL
    http://host:port/secret:port/scope/key, whose first path segment the guarded handler checks.
    """

    name = "horovod"

    def __init__(self, cfg: LaunchConfig) -> None:
        super().__init__(cfg)
        self._left_url = ""
        """Where this rank (not 0) marks that it left: the rendezvous's guarded KV store, as Gloo's client
        would address it."""

    def check_hosts(self, hosts: list[str], host: str) -> None:
        check_hostname(hosts, host)

    def serve(self, host: str, hosts: list[str], plan: list[Slot]) -> Rendezvous:
        try:
            from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
        except ImportError as exc:
            raise LaunchError(
                f"launch.collectives=horovod but Horovod does not import here ({exc}): build it with "
                "scripts/build_horovod.sh (make setup does), or set launch.collectives=torch"
            ) from exc

        class GuardedHandler(RendezvousHandler):
            def _guard(self) -> bool:
                prefix = f"/{self.server.secret}:{self.server.server_address[1]}/"  # type: ignore[attr-defined]
                path: str = self.path  # type: ignore[has-type]
                head = path[: len(prefix)]
                peer_ok = self.client_address[0] in self.server.allowed_peers  # type: ignore[attr-defined]
                if peer_ok and hmac.compare_digest(head.encode(), prefix.encode()):
                    self.path = path[len(prefix) - 1 :]
                    return True
                self.send_status_code(403)
                return False

            def do_GET(self) -> None:  # noqa: N802
                if self._guard():
                    super().do_GET()

            def do_PUT(self) -> None:  # noqa: N802
                if self._guard():
                    super().do_PUT()

            def do_DELETE(self) -> None:  # noqa: N802
                if self._guard():
                    super().do_DELETE()

        server = RendezvousHTTPServer((host, 0), GuardedHandler, 0)
        server.secret = secrets.token_hex(16)  # type: ignore[attr-defined]
        server.allowed_peers = {resolve(h) for h in hosts}  # type: ignore[attr-defined]
        server.init(plan)
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": heartbeat.SERVER_POLL_S}, daemon=True,
            name="horovod-rendezvous",
        ).start()  # fmt: skip
        return _HorovodRendezvous(server, f"{host}:{server.server_address[1]}/{server.secret}")  # type: ignore[attr-defined]

    def join(self, address: str, slot: Slot, host: str, device: str) -> Collectives:
        cfg = self.cfg
        port = address.split("/", 1)[0].rsplit(":", 1)[1]
        env = {
            HOROVOD_RANK: slot.rank, HOROVOD_SIZE: slot.size, HOROVOD_LOCAL_RANK: slot.local_rank,
            HOROVOD_LOCAL_SIZE: slot.local_size, HOROVOD_CROSS_RANK: slot.cross_rank,
            HOROVOD_CROSS_SIZE: slot.cross_size, HOROVOD_HOSTNAME: host,
            HOROVOD_GLOO_RENDEZVOUS_ADDR: address, HOROVOD_GLOO_RENDEZVOUS_PORT: port,
            HOROVOD_GLOO_IFACE: cfg.nic or iface_of(host), HOROVOD_CONTROLLER: "gloo",
            HOROVOD_CPU_OPERATIONS: "gloo", HOROVOD_GLOO_TIMEOUT_SECONDS: int(cfg.collective_timeout_s),
        }  # fmt: skip
        if device.startswith("cuda"):
            env[HOROVOD_GPU_OPERATIONS] = "NCCL"
        os.environ.update({k: str(v) for k, v in env.items()})
        import horovod.torch as hvd

        join_with_timeout(hvd.init, cfg.start_timeout_s, slot.rank, "hvd.init")
        if slot.rank > 0:
            self._left_url = f"http://{address}:{port}/{LEFT_SCOPE}/{slot.rank}"
        return HorovodCollectives(slot.rank, slot.size)

    def leave(self) -> None:
        import horovod.torch as hvd

        hvd.shutdown()
        if self._left_url:
            try:
                import urllib.request

                request = urllib.request.Request(self._left_url, data=b"1", method="PUT")
                self._left_url = ""
                urllib.request.urlopen(request, timeout=LEFT_PUT_TIMEOUT_S).close()
            except OSError as exc:  # rank 0 gone (a failed stage): nothing waits for the mark
                log.debug("could not mark leaving in the rendezvous: %s", exc)


@dataclass
class _HorovodRendezvous:
    server: Any
    address: str

    def wait_left(self, world_size: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.server.cache_lock:
                left = len(self.server.cache.get(LEFT_SCOPE, {}))
            if left >= world_size - 1:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(LEFT_POLL_S)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------ torch.distributed


class TorchCollectives(Collectives):
    """A torch.distributed process group's collectives (gloo on CPU, nccl on GPU).

    Horovod semantics kept: the input is never changed, ``average`` divides the sum by the world size (gloo
    has no AVG), and an allgather accepts a different first dimension per rank (sizes gathered first, then
    padded to the largest). ``small_allreduce_bytes`` (``launch.small_allreduce_bytes``, gloo only): an
    allreduce whose gathered size is at most this goes as one allgather and a sum in rank order (``_sum_of_rows``).
    """

    def __init__(self, rank: int, world_size: int, group: Any = None, small_allreduce_bytes: int = 0) -> None:
        super().__init__(rank, world_size)
        import torch.distributed as dist

        self._dist = dist
        self._group = group
        self._small_bytes = small_allreduce_bytes

    def _gathers(self, nbytes: int) -> bool:
        return self.world_size > 1 and nbytes * self.world_size <= self._small_bytes

    def _allreduce_wire_factor(self, nbytes: int) -> float:
        return float(self.world_size - 1) if self._gathers(nbytes) else super()._allreduce_wire_factor(nbytes)

    def _allreduce(self, tensor: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        if self._gathers(tensor.numel() * tensor.element_size()):
            out = self._sum_of_rows(tensor.detach())
        else:
            out = tensor.detach().clone()
            self._dist.all_reduce(out, group=self._group)
        return out.div_(self.world_size) if average else out

    def _sum_of_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks as one allgather (K-1 ring steps; gloo's ring allreduce takes 2(K-1), and for a
        small vector each step's latency, not its bytes, is the cost) and K-1 additions in rank order, the
        same on every rank, so every rank holds bit-identical sums."""
        flat = tensor.contiguous().reshape(-1)
        gathered = flat.new_empty(self.world_size * flat.numel())  # gloo takes the rows concatenated, flat
        self._dist.all_gather_into_tensor(gathered, flat, group=self._group)
        rows = gathered.view(self.world_size, flat.numel())
        out = rows[0].clone()
        for row in rows[1:]:
            out += row
        return out.reshape(tensor.shape)

    def _allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        dist = self._dist
        t = tensor.detach().contiguous()
        rows = torch.tensor([t.shape[0] if t.dim() else 1], dtype=torch.int64, device=t.device)
        counts = [torch.zeros_like(rows) for _ in range(self.world_size)]
        dist.all_gather(counts, rows, group=self._group)
        sizes = [int(c.item()) for c in counts]
        if t.dim() == 0:
            t = t.reshape(1)
        longest = max(sizes)
        padded = t if t.shape[0] == longest else torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self._group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    def _broadcast_(self, tensor: torch.Tensor, root: int, name: str) -> None:
        with torch.no_grad():
            self._dist.broadcast(tensor.data, src=root, group=self._group)

    def _broadcast_object(self, obj: T, root: int, name: str) -> T:
        box: list[Any] = [obj if self.rank == root else None]
        self._dist.broadcast_object_list(box, src=root, group=self._group)
        return box[0]

    def _allgather_object(self, obj: T, name: str) -> list[T]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out


@ENGINES.register("torch")
class TorchEngine(Engine):
    """A torch.distributed process group formed over a ``TCPStore`` that rank 0 serves on a socket we bind to
    its task address (never torch's default, which listens on every interface), with every key under a
    per-run secret prefix that travels only through the barrier stage's ``allGather`` (never argv or env).
    gloo binds its pairs to the task address's interface (``GLOO_SOCKET_IFNAME``).

    Why TCPStore and not a Python store over our guarded HTTP server (``kvstore``, which also checks the
    peer's host): with a Python store, gloo's full-mesh connect failed 'Connection closed by peer' in 2-5 of
    8 two-rank barrier stages on this machine (0 of 8 outside Spark, 0 of 8 with TCPStore in the same stage,
    and 0 of 8 with a Python store forwarding to TCPStore); the cause is inside the Spark Python worker and not
    pinned down. TCPStore has no peer check: anyone who can reach rank 0's address during the stage can
    connect, but cannot name the run's keys without the secret.
    """

    name = "torch"

    def __init__(self, cfg: LaunchConfig) -> None:
        super().__init__(cfg)
        self._server: Any = None
        self._store: Any = None
        self._rank = -1

    def serve(self, host: str, hosts: list[str], plan: list[Slot]) -> Rendezvous:
        import torch.distributed as dist

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((resolve(host), 0))
        sock.listen(max(16, len(hosts) * 2))
        port = sock.getsockname()[1]
        self._server = dist.TCPStore(
            host, port, len(hosts), True, datetime.timedelta(seconds=self.cfg.start_timeout_s),
            wait_for_workers=False, master_listen_fd=sock.fileno(), use_libuv=False,
        )  # fmt: skip
        sock.detach()  # the TCPStore owns the listening socket now and closes it when it goes
        return _TorchRendezvous(self, f"{host}:{port}/{secrets.token_hex(16)}")

    def join(self, address: str, slot: Slot, host: str, device: str) -> Collectives:
        import torch.distributed as dist

        cfg = self.cfg
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
            raise LaunchError(f"launch.collectives=torch: this torch build has no {backend} backend")
        os.environ[GLOO_SOCKET_IFNAME] = cfg.nic or iface_of(host)
        hostport, _, secret = address.partition("/")
        store_host, _, port = hostport.rpartition(":")
        timeout = datetime.timedelta(seconds=cfg.start_timeout_s)

        def init() -> None:
            base = self._server or dist.TCPStore(store_host, int(port), slot.size, False, timeout, use_libuv=False)
            self._store, self._rank = dist.PrefixStore(secret, base), slot.rank
            dist.init_process_group(
                backend,
                store=self._store,
                rank=slot.rank,
                world_size=slot.size,
                timeout=datetime.timedelta(seconds=cfg.collective_timeout_s),
            )

        join_with_timeout(init, cfg.start_timeout_s, slot.rank, f"torch.distributed init ({backend})")
        small = cfg.small_allreduce_bytes if backend == "gloo" else 0  # NCCL has its own small-message protocol
        return TorchCollectives(slot.rank, slot.size, small_allreduce_bytes=small)

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if self._store is not None and self._rank > 0:
            try:
                self._store.set(f"{LEFT_SCOPE}/{self._rank}", "1")
            except Exception as exc:  # noqa: BLE001 (rank 0 gone, a failed stage: nothing waits for the mark)
                log.debug("could not mark leaving in the rendezvous: %s", exc)
        self._store = None


@dataclass
class _TorchRendezvous:
    engine: TorchEngine
    address: str

    def wait_left(self, world_size: int, timeout_s: float) -> bool:
        if world_size < 2:
            return True
        import torch.distributed as dist

        secret = self.address.partition("/")[2]
        store = dist.PrefixStore(secret, self.engine._server)
        try:
            store.wait([f"{LEFT_SCOPE}/{r}" for r in range(1, world_size)], datetime.timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 (torch raises a plain RuntimeError/DistStoreError on its timeout)
            return False
        return True

    def close(self) -> None:
        self.engine._server = None  # the TCPStore's server (and its socket) stops when its last reference goes


# ------------------------------------------------------------------------------------------------ addresses


def check_hostname(hosts: list[str], host: str) -> None:
    """Refuse a multi-host stage on a host whose name resolves to loopback. Horovod 0.28.1's Gloo binds its
    process-set context (created by every hvd.init) to the address the machine's hostname resolves to, not to
    HOROVOD_GLOO_IFACE; resolving to 127.x there, each rank would tell the others to connect to their own
    loopback, and hvd.init would crash on every attempt with 'connect [127.0.0.1]: Connection refused'."""
    if len({resolve(h) for h in hosts}) < 2 or resolve(host).startswith("127."):
        return  # one host (loopback is right), or this task's own address is loopback anyway
    name = socket.gethostname()
    if resolve(name).startswith("127."):
        raise LaunchError(
            f"host {host}: its hostname {name!r} resolves to {resolve(name)}, a loopback address, and the ranks "
            f"run on {len(set(hosts))} hosts; Horovod's Gloo would advertise that address to the other hosts. "
            f"Make {name!r} resolve to {host} on this host (its /etc/hosts or DNS), as Spark's own address does, "
            "or use launch.collectives=torch (its gloo binds to the task address's interface)"
        )


def iface_of(host: str) -> str:
    """The network interface that holds ``host``'s address (lo for loopback)."""
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return "lo"
    if addr.startswith("127."):
        return "lo"
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == addr for a in addrs):
            return name
    return "lo"


def resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host
