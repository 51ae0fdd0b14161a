"""One parameter-server shard: a contiguous slice ``[lo, hi)`` of the model's flat float32 parameter vector,
the optimizer over that slice, and the clocks of every worker. Runs as its own process
(``python -m sparkml_dist.ps.server``, its ``ShardSpec`` pickled on stdin, ``READY <port>`` on stdout),
started and stopped by the driver; it exits by itself when the driver's process is gone.

Protocol (``wire``): a ZeroMQ ROUTER socket bound to the driver's address, never 0.0.0.0. Every request
must carry the run's secret (compared in constant time); anything else is refused with an error reply.

- ``hello`` (worker id, host, attempt): registers the worker; replies its clock (pushes this shard has from
  it), so a resubmitted worker continues where its lost attempt stopped.
- ``pull`` (clock c): the slice and its version (updates applied so far). Under ``ssp`` with bound s the
  reply is held back while the slowest worker's clock is below c - s; held longer than ``timeout_s``, the
  reply is an error naming the slowest worker and its host.
- ``push`` (clock c, the version the gradient was computed at, loss sums; the gradient slice): applied.
  ``async`` and ``ssp`` with s > 0 apply each push on arrival as one optimizer step on gradient / K (K pushes
  are one synchronous step's worth). ``ssp`` with s = 0 buffers the K pushes of a clock and applies one
  step on their mean: bulk-synchronous SGD, the same parameters as ``allreduce`` with the same batches.
  A push for a clock the shard already has (a resubmitted worker repeating its last step) is ignored.
- ``epoch`` (e): when K x steps_per_epoch x (e + 1) pushes are applied, the epoch's snapshot of the slice and
  its statistics (train loss sums, staleness histogram, bytes, time held on the bound); not ready yet: says so.
- ``freeze`` (cut id), then ``cut`` (cut id, target clocks): one step of a consistent checkpoint, below.
- ``status``, ``stop``.

Checkpoints are consistent cuts (issue 32, item 8). Each shard saving on its own timer joined slices from
different times on resume (one shard 2513 pushes in, the other 2250): every slice must hold the same pushes.
The driver coordinates a cut: ``freeze`` makes every shard hold (not apply) the pushes that arrive and report
its clocks; the target is each worker's highest clock over the shards. A worker's clocks differ by at most
one between shards (it sends a step's push to every shard and waits for all replies before the next), so a
shard behind the target is missing a push already on its way: ``cut`` applies held pushes up to the target,
then writes the state (slice, optimizer, clocks, unfinished epoch statistics, snapshots the driver has not
fetched) as ``ps/shard-NNN.cut-MMMMMM.pt``, replies, and goes on with what it held. Every shard's file of
one cut thus holds exactly the same pushes. A cut that cannot complete (a worker lost mid-send, a shard
done) is dropped after ``CUT_WAIT_S`` and the shard thaws. A rerun resumes every shard from the newest cut
that every shard wrote (``ShardSpec.cut``); the last two cuts are kept.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import logging
import os
import pickle
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparkml_dist.config import TrainConfig
from sparkml_dist.ps.wire import decode, encode
from sparkml_dist.runtime import faults
from sparkml_dist.training.loop import lr_at
from sparkml_dist.training.models import OPTIMIZERS
from sparkml_dist.training.sparse_optim import RowSparseOptimizer, coalesced

log = logging.getLogger("sparkml_dist.ps.server")
POLL_MS = 100
CUT_WAIT_S = 5.0
"""How long a frozen shard waits for the driver's target and for the pushes that reach it, then thaws."""
KEEP_CUTS = 2


@dataclass(frozen=True)
class ShardSpec:
    index: int
    lo: int
    hi: int
    init: np.ndarray
    """The slice's initial values (float32), used unless a checkpoint is resumed."""
    train: TrainConfig
    workers: int
    steps_per_epoch: int
    """Pushes per worker per epoch: an epoch is ``workers * steps_per_epoch`` pushes, whoever made them."""
    epochs: int
    pace: str
    staleness: int
    secret: str
    host: str
    checkpoint_url: str
    checkpoint_s: float
    timeout_s: float
    resume: bool = False
    cut: int = -1
    """With ``resume``: the consistent cut to load (``cut_path``), one every shard has."""


@dataclass
class EpochStats:
    """One epoch's accounting on this shard (additive, so the driver can sum shards' bytes)."""

    loss_sum: float = 0.0
    rows: float = 0.0
    pushes: int = 0
    pulls: int = 0
    push_bytes: int = 0
    pull_bytes: int = 0
    held_s: float = 0.0
    """Seconds pulls were held back by the staleness bound, summed over workers."""
    staleness: Counter = field(default_factory=Counter)
    """How many pushes were computed on parameters this many updates old."""
    by_worker: dict[int, Counter] = field(default_factory=dict)
    """The same histogram per worker."""
    held_by_worker: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ended: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["staleness"] = {str(k): v for k, v in sorted(self.staleness.items())}
        d["by_worker"] = {str(w): {str(k): v for k, v in sorted(c.items())} for w, c in sorted(self.by_worker.items())}
        d["held_by_worker"] = {str(w): v for w, v in sorted(self.held_by_worker.items())}
        return d


class Shard:
    """The shard's state and what each request does to it (no sockets here: ``serve`` owns those)."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.param = torch.nn.Parameter(torch.from_numpy(np.array(spec.init, dtype=np.float32)))
        self.opt = OPTIMIZERS.get(spec.train.optimizer)(spec.train, [self.param])
        self.rows: torch.nn.Parameter | None = None
        """For a row-sparse optimizer: the slice as [n, 1] rows (one per coordinate, the same storage), so
        it keeps state and step counts per coordinate and updates only the pushed ones, as the ranks' copy
        of the optimizer does per weight row; a 1-D parameter would be one row to it."""
        if isinstance(self.opt, RowSparseOptimizer):
            self.rows = torch.nn.Parameter(self.param.data.view(-1, 1))
            self.opt = OPTIMIZERS.get(spec.train.optimizer)(spec.train, [self.rows])
        self.applied = 0
        """Pushes applied (a bulk-synchronous clock counts K)."""
        self.clocks = [0] * spec.workers
        self.hosts: dict[int, str] = {}
        self.pending: dict[int, tuple[torch.Tensor, int]] = {}
        """ssp s=0: clock -> (sum of the gradients pushed for it, how many)."""
        self.epochs_done = 0
        self.stats = EpochStats()
        self.closed: dict[int, dict[str, Any]] = {}
        """Finished epochs the driver has not fetched: statistics and the snapshot."""
        self.snapshots: dict[int, np.ndarray] = {}

    @property
    def total(self) -> int:
        return self.spec.epochs * self.spec.steps_per_epoch * self.spec.workers

    @property
    def done(self) -> bool:
        return self.applied >= self.total

    @property
    def bsp(self) -> bool:
        return self.spec.pace == "ssp" and self.spec.staleness == 0

    def may_pull(self, clock: int) -> bool:
        return self.spec.pace == "async" or min(self.clocks) >= clock - self.spec.staleness

    def slowest(self) -> str:
        wid = int(np.argmin(self.clocks))
        return f"worker {wid} on {self.hosts.get(wid, 'a host that never said hello')} (clock {self.clocks[wid]})"

    def push(
        self, wid: int, clock: int, version: int, loss_sum: float, rows: float, grad: np.ndarray,
        keys: np.ndarray | None = None,
    ) -> str:  # fmt: skip
        """Apply one worker's gradient; returns '' or why it was not applied. ``keys``: a sparse push, the
        positions in this slice (int32, ascending, unique) that ``grad``'s values belong to; the rest of the
        slice has a zero gradient (the rows the worker's batch did not touch)."""
        if clock < self.clocks[wid]:
            return "duplicate"
        if clock > self.clocks[wid]:
            raise ValueError(f"worker {wid} pushed clock {clock}, but this shard expects clock {self.clocks[wid]}")
        if self.done:
            return "done"
        n = self.spec.hi - self.spec.lo
        if keys is None and grad.size != n:
            raise ValueError(f"worker {wid} pushed {grad.size} values to a shard of {n}")
        if keys is not None:
            _check_keys(keys, n, f"worker {wid}'s push")
            if grad.size != keys.size:
                raise ValueError(f"worker {wid} pushed {grad.size} values for {keys.size} keys")
        self.clocks[wid] += 1
        st = self.stats
        if st.pushes == 0:
            st.started = time.time()  # the epoch's clock starts at its first push, not at the server's start
        st.pushes += 1
        st.push_bytes += grad.nbytes + (keys.nbytes if keys is not None else 0)
        st.loss_sum += loss_sum
        st.rows += rows
        age = max(0, self.applied - version)
        st.staleness[age] += 1
        st.by_worker.setdefault(wid, Counter())[age] += 1
        if keys is None:
            g = torch.from_numpy(grad.copy())
        else:
            index = torch.from_numpy(keys.astype(np.int64)).unsqueeze(0)
            g = torch.sparse_coo_tensor(
                index, torch.from_numpy(grad.copy()), (n,), is_coalesced=True, check_invariants=False
            )
        if self.bsp:
            total, count = self.pending.get(clock, (None, 0))
            total = g if total is None else (total + g if total.is_sparse == g.is_sparse else total.to_dense() + g)
            count += 1
            if count < self.spec.workers:
                self.pending[clock] = (total, count)
                return ""
            self.pending.pop(clock, None)
            self._step(total / self.spec.workers, self.spec.workers)
        else:
            self._step(g / self.spec.workers, 1)
        return ""

    def _step(self, grad: torch.Tensor, pushes: int) -> None:
        spec = self.spec
        for group in self.opt.param_groups:  # the global step is applied / K, as allreduce counts it
            group["lr"] = lr_at(spec.train, spec.workers, self.applied // spec.workers, spec.steps_per_epoch)
        target = self.param if self.rows is None else self.rows
        if self.rows is None:
            grad = grad.to_dense() if grad.is_sparse else grad
        elif grad.is_sparse:  # the pushed coordinates only: the row-sparse optimizer updates just those
            grad = coalesced(grad)
            grad = torch.sparse_coo_tensor(
                grad.indices(),
                grad.values().unsqueeze(1),
                (len(self.param), 1),
                is_coalesced=True,
                check_invariants=False,
            )
        else:
            grad = grad.view(-1, 1)
        target.grad = grad
        self.opt.step()
        target.grad = None
        self.applied += pushes
        per_epoch = spec.steps_per_epoch * spec.workers
        while self.applied >= (self.epochs_done + 1) * per_epoch and self.epochs_done < spec.epochs:
            self.stats.ended = time.time()
            self.closed[self.epochs_done] = {**self.stats.to_json(), "applied": self.applied}
            self.snapshots[self.epochs_done] = self.param.detach().numpy().copy()
            self.epochs_done += 1
            self.stats = EpochStats()

    def state(self) -> dict[str, Any]:
        return {
            "lo": self.spec.lo, "hi": self.spec.hi, "param": self.param.detach().clone(),
            "optimizer": self.opt.state_dict(), "applied": self.applied, "clocks": list(self.clocks),
            "pending": {c: (t.clone(), n) for c, (t, n) in self.pending.items()}, "epochs_done": self.epochs_done,
            "stats": self.stats, "closed": dict(self.closed), "snapshots": dict(self.snapshots),
        }  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        if (state["lo"], state["hi"]) != (self.spec.lo, self.spec.hi):
            raise ValueError(
                f"checkpoint holds slice [{state['lo']}, {state['hi']}), not [{self.spec.lo}, {self.spec.hi})"
            )
        with torch.no_grad():
            self.param.copy_(state["param"])
        self.opt.load_state_dict(state["optimizer"])
        self.applied, self.clocks = int(state["applied"]), list(state["clocks"])
        self.pending, self.epochs_done = dict(state["pending"]), int(state["epochs_done"])
        self.stats, self.closed, self.snapshots = state["stats"], dict(state["closed"]), dict(state["snapshots"])


def _check_keys(keys: np.ndarray, n: int, what: str) -> None:
    """Keys of a sparse pull or push: int32 positions in a slice of ``n``, ascending and unique."""
    if keys.dtype != np.int32 or keys.ndim != 1:
        raise ValueError(f"{what}: keys must be a 1-d int32 array, got {keys.dtype} of shape {keys.shape}")
    if keys.size and (keys[0] < 0 or keys[-1] >= n or not bool(np.all(keys[1:] > keys[:-1]))):
        raise ValueError(f"{what}: keys must be ascending, unique and within the slice of {n}")


def checkpoint_path(checkpoint_url: str, index: int) -> str:
    """Where shard ``index``'s checkpoints live: its cuts are this path with ``.cut-NNNNNN`` before ``.pt``."""
    return f"{checkpoint_url.rstrip('/')}/ps/shard-{index:03d}.pt"


def cut_path(checkpoint_url: str, index: int, cut: int) -> str:
    return checkpoint_path(checkpoint_url, index).removesuffix(".pt") + f".cut-{cut:06d}.pt"


def list_cuts(checkpoint_url: str, index: int) -> list[int]:
    """The cut ids shard ``index`` has written, ascending."""
    from pyarrow import fs as pafs

    from sparkml_dist.data.manifest import arrow_fs

    filesystem, path = arrow_fs(checkpoint_path(checkpoint_url, index))
    folder, name = path.rsplit("/", 1)
    prefix = name.removesuffix(".pt") + ".cut-"
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    found = [i.base_name[len(prefix) : -3] for i in infos if i.base_name.startswith(prefix)]
    return sorted(int(c) for c in found if _is_cut_id(c))


def _is_cut_id(text: str) -> bool:
    return text.isdigit() and len(text) == 6


def _drop_cuts(checkpoint_url: str, index: int, keep: int) -> None:
    """Delete shard ``index``'s cuts but the newest ``keep``."""
    from sparkml_dist.data.manifest import arrow_fs

    for old in list_cuts(checkpoint_url, index)[:-keep]:
        filesystem, path = arrow_fs(cut_path(checkpoint_url, index, old))
        filesystem.delete_file(path)


def save_state(url: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``url`` atomically (a temp file renamed over it)."""
    from sparkml_dist.data.manifest import arrow_fs

    filesystem, path = arrow_fs(url)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = f"{path}.tmp-{os.getpid()}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(buf.getvalue())
    filesystem.move(tmp, path)


def load_state(url: str) -> dict[str, Any] | None:
    from pyarrow import fs as pafs

    from sparkml_dist.data.manifest import arrow_fs

    filesystem, path = arrow_fs(url)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), weights_only=False)


@dataclass
class _Freeze:
    """A consistent cut in progress on this shard (see the module docstring)."""

    cut: int
    since: float
    target: list[int] | None = None
    """Each worker's clock the cut is taken at; None until the driver's ``cut`` request says."""
    request: tuple[bytes, dict[str, Any]] | None = None
    """The driver's ``cut`` request, answered once the cut is written (or given up)."""
    held: list[tuple[bytes, dict[str, Any], list[np.ndarray]]] = field(default_factory=list)
    """Pushes that arrived while frozen, in arrival order."""


def serve(spec: ShardSpec, announce: Any = None, parent_pid: int | None = None) -> None:
    """Run the shard until ``stop`` (or the parent process is gone); ``announce(port)`` once bound."""
    import zmq

    shard = Shard(spec)
    if spec.resume:
        state = load_state(cut_path(spec.checkpoint_url, spec.index, spec.cut))
        if state is None:
            raise FileNotFoundError(f"shard {spec.index}: cut {spec.cut} is missing in {spec.checkpoint_url}/ps")
        shard.load(state)
        log.info(
            "shard %d resumed at %d applied pushes (epoch %d) from cut %d, clocks %s",
            spec.index, shard.applied, shard.epochs_done, spec.cut, shard.clocks,
        )  # fmt: skip
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    port = sock.bind_to_random_port(f"tcp://{spec.host}")
    if announce is not None:
        announce(port)
    held: list[tuple[bytes, dict[str, Any], float, list[np.ndarray]]] = []
    frozen: _Freeze | None = None
    saved_epochs, running = shard.epochs_done, True

    def reply(ident: bytes, header: dict[str, Any], *arrays: np.ndarray) -> None:
        sock.send_multipart([ident, *encode(header, *arrays)])

    def answer_pull(ident: bytes, req: dict[str, Any], arrived: float, arrays: list[np.ndarray]) -> None:
        """The whole slice, or with a key array (a sparse pull) the values at those positions only."""
        if arrays:
            try:
                _check_keys(arrays[0], shard.param.numel(), "pull")
            except ValueError as exc:
                reply(ident, {"rid": req["rid"], "ok": False, "error": str(exc)})
                return
        held = time.monotonic() - arrived
        shard.stats.held_s += held
        wid = int(req.get("worker", -1))
        shard.stats.held_by_worker[wid] = shard.stats.held_by_worker.get(wid, 0.0) + held
        shard.stats.pulls += 1
        values = shard.param.detach().numpy()
        if arrays:
            values = values[arrays[0]]
            shard.stats.pull_bytes += arrays[0].nbytes  # the keys asked for travel too
        shard.stats.pull_bytes += values.nbytes
        reply(ident, {"rid": req["rid"], "ok": True, "version": shard.applied, "done": shard.done}, values)

    def apply_push(ident: bytes, req: dict[str, Any], arrays: list[np.ndarray]) -> None:
        try:
            keys = arrays[1] if len(arrays) > 1 else None
            why = shard.push(int(req["worker"]), int(req["clock"]), int(req["version"]), float(req["loss_sum"]),
                             float(req["rows"]), arrays[0], keys)  # fmt: skip
        except (KeyError, ValueError, IndexError) as exc:
            reply(ident, {"rid": req.get("rid"), "ok": False, "error": f"push: {exc}"})
            return
        reply(ident, {"rid": req["rid"], "ok": True, "done": shard.done, "ignored": why})

    def thaw(cut: _Freeze) -> None:
        for ident, req, arrays in cut.held:  # in arrival order: a worker's pushes stay in clock order
            apply_push(ident, req, arrays)

    def advance(cut: _Freeze) -> bool:
        """Apply the held pushes the cut's target still needs; write the cut once the clocks are there.
        True when the cut is over (written) and the shard may thaw."""
        if cut.target is None:
            return False
        still = []
        for ident, req, arrays in cut.held:
            wid, clock = int(req.get("worker", -1)), int(req.get("clock", -1))
            if 0 <= wid < len(cut.target) and clock == shard.clocks[wid] and clock < cut.target[wid]:
                apply_push(ident, req, arrays)
            else:
                still.append((ident, req, arrays))
        cut.held = still
        if shard.clocks != cut.target:
            return False
        nonlocal saved_epochs
        save_state(cut_path(spec.checkpoint_url, spec.index, cut.cut), {**shard.state(), "cut": cut.cut})
        _drop_cuts(spec.checkpoint_url, spec.index, KEEP_CUTS)
        epoch_end, saved_epochs = shard.epochs_done > saved_epochs, shard.epochs_done
        if epoch_end:
            faults.crash_point("ps.server.epoch_saved")
        if cut.request is not None:
            ident, req = cut.request
            reply(ident, {"rid": req["rid"], "ok": True, "cut": cut.cut, "applied": shard.applied,
                          "clocks": shard.clocks})  # fmt: skip
        return True

    try:
        while running:
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("shard %d: the driver (pid %d) is gone; stopping", spec.index, parent_pid)
                break
            if sock.poll(POLL_MS):
                ident, *frames = sock.recv_multipart()
                try:
                    req, arrays = decode(frames)
                except (ValueError, UnicodeDecodeError):
                    continue  # not ours: nothing to answer to
                rid = req.get("rid")
                if not hmac.compare_digest(str(req.get("secret", "")), spec.secret):
                    log.warning("shard %d refused a %r request without the run's secret", spec.index, req.get("op"))
                    reply(ident, {"rid": rid, "ok": False, "error": "refused: wrong or missing run secret"})
                    continue
                op = req.get("op")
                try:
                    if op == "pull":
                        if shard.done or shard.may_pull(int(req["clock"])):
                            answer_pull(ident, req, time.monotonic(), arrays)
                        else:
                            held.append((ident, req, time.monotonic(), arrays))
                    elif op == "push":
                        if frozen is not None:
                            frozen.held.append((ident, req, arrays))
                        else:
                            apply_push(ident, req, arrays)
                    elif op == "freeze":
                        if frozen is not None:  # an earlier cut the driver gave up on
                            thaw(frozen)
                        frozen = _Freeze(int(req["cut"]), time.monotonic())
                        reply(ident, {"rid": rid, "ok": True, "clocks": shard.clocks, "applied": shard.applied})
                    elif op == "cut":
                        if frozen is None or frozen.cut != int(req["cut"]):
                            raise ValueError(f"cut {req['cut']} was not frozen here (or given up)")
                        target = [int(c) for c in req["target"]]
                        if len(target) != len(shard.clocks) or any(
                            t < c for t, c in zip(target, shard.clocks, strict=True)
                        ):
                            raise ValueError(f"target clocks {target} are behind this shard's {shard.clocks}")
                        frozen.target, frozen.request = target, (ident, req)
                    elif op == "hello":
                        wid = int(req["worker"])
                        shard.hosts[wid] = str(req.get("host", "?"))
                        if int(req.get("attempt", 0)) > 0:
                            log.warning(
                                "shard %d: worker %d on %s is back (attempt %s) at clock %d",
                                spec.index, wid, shard.hosts[wid], req.get("attempt"), shard.clocks[wid],
                            )  # fmt: skip
                        reply(ident, {"rid": rid, "ok": True, "clock": shard.clocks[wid], "done": shard.done,
                                      "lo": spec.lo, "hi": spec.hi})  # fmt: skip
                    elif op == "epoch":
                        e = int(req["epoch"])
                        if e in shard.closed:
                            reply(ident, {"rid": rid, "ok": True, "ready": True, "stats": shard.closed[e]},
                                  shard.snapshots[e])  # fmt: skip
                            if req.get("release"):
                                shard.closed.pop(e, None)
                                shard.snapshots.pop(e, None)
                        else:
                            reply(ident, {"rid": rid, "ok": True, "ready": False, "applied": shard.applied,
                                          "epochs_done": shard.epochs_done})  # fmt: skip
                    elif op == "status":
                        reply(ident, {"rid": rid, "ok": True, "applied": shard.applied, "clocks": shard.clocks,
                                      "hosts": {str(k): v for k, v in shard.hosts.items()}, "done": shard.done,
                                      "epochs_done": shard.epochs_done, "lo": spec.lo, "hi": spec.hi})  # fmt: skip
                    elif op == "stop":
                        running = False
                        reply(ident, {"rid": rid, "ok": True})
                    else:
                        reply(ident, {"rid": rid, "ok": False, "error": f"unknown op {op!r}"})
                except (KeyError, ValueError, IndexError) as exc:
                    reply(ident, {"rid": rid, "ok": False, "error": f"{op}: {exc}"})
            now = time.monotonic()
            if frozen is not None:
                if advance(frozen):
                    cut, frozen = frozen, None
                    thaw(cut)
                elif now - frozen.since > CUT_WAIT_S:
                    cut, frozen = frozen, None
                    if cut.request is not None:
                        ident, req = cut.request
                        reply(ident, {"rid": req["rid"], "ok": False, "error": (
                            f"cut {cut.cut}: clocks {shard.clocks} did not reach {cut.target} within {CUT_WAIT_S:g} "
                            "s (a worker lost while pushing, or the shard is done); no cut written")})  # fmt: skip
                    thaw(cut)
            still = []
            for ident, req, arrived, keys in held:
                if shard.done or shard.may_pull(int(req["clock"])):
                    answer_pull(ident, req, arrived, keys)
                elif now - arrived > spec.timeout_s:
                    reply(ident, {"rid": req["rid"], "ok": False, "lost": True, "error": (
                        f"worker {req['worker']} waited {now - arrived:.0f} s at clock {req['clock']} for "
                        f"{shard.slowest()} under comm.staleness={spec.staleness} (comm.ps_timeout_s="
                        f"{spec.timeout_s:g}): that worker is lost or stalled")})  # fmt: skip
                else:
                    still.append((ident, req, arrived, keys))
            held = still
    finally:
        sock.close(linger=2000)
        ctx.term()


def main() -> None:
    """Entry point of ``python -m sparkml_dist.ps.server``."""
    from sparkml_dist.ps import server  # this module under its own name, so its checkpoints unpickle anywhere

    server._main()


def _main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s ps-server: %(message)s", stream=sys.stderr
    )
    spec: ShardSpec = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(1)

    def announce(port: int) -> None:
        sys.stdout.write(f"READY {port}\n")
        sys.stdout.flush()

    serve(spec, announce, parent_pid=os.getppid())


if __name__ == "__main__":
    main()
