"""Driver side of a parameter-server run: shards up, one Spark job per worker, epochs evaluated and tracked.

Choices, and why:
- **Servers are processes the driver starts** on its own address (``python -m sparkml_dist.ps.server``),
  one per slice of the flat parameter vector. They need no Spark slot, the driver already has every input
  they need (the initial model, the config), and the driver stops them in ``finally``; a shard also exits
  by itself when the driver's process is gone, so nothing outlives a killed driver.
- **Workers are not a barrier stage.** Asynchronous and bounded-staleness workers do not need a gang; each
  worker is its own one-task Spark job, so a lost worker (its Python process or executor killed) fails only
  that job, which the driver submits again (attempt 1, 2, ... up to ``launch.max_attempts``, 4 when 0) while
  the other workers go on. The resubmitted worker asks the servers for its clock and continues there. Under
  ``async`` nobody waits for it; under ``ssp`` the others wait at the bound until it is back, and a pull held
  longer than ``comm.ps_timeout_s`` names the lost worker and its host.
- **Epochs are counted by the servers**: epoch e ends when K x steps_per_epoch pushes are applied, whoever
  made them. The shards snapshot their slice at that moment; the driver fetches the snapshots, evaluates the
  whole model on the validation split here (workers never wait for validation), and logs the epoch.
- **Transport: ZeroMQ** (pyzmq, already installed with Petastorm). Measured (``bench/ps_transport.py``,
  loopback): a round trip of this project's typical model (33 floats) takes 85 us against 118 us for
  HTTP/1.1 keep-alive with TCP_NODELAY; at 65k-1M floats HTTP is 5-20% faster (pyzmq copies the frames).
  ZeroMQ's ROUTER socket decides it: a shard can hold a pull back (the staleness bound) and answer it later
  without a thread per waiting worker, and framing, reconnects and queueing are the library's.
  torch.distributed.rpc needs every participant in ``init_rpc`` with a fixed world size (a gang), which a
  resubmitted worker breaks.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pyspark.sql import SparkSession

from sparkml_dist.comm.base import flatten, unflatten_into
from sparkml_dist.config import CommConfig, ConfigError, JobConfig
from sparkml_dist.data.manifest import Manifest
from sparkml_dist.errors import InfraError, UserError
from sparkml_dist.experiments import tracking
from sparkml_dist.metrics import summarize
from sparkml_dist.ps.client import Endpoint, PSClient, RefusedError, ServerUnreachableError
from sparkml_dist.ps.server import ShardSpec, cut_path, list_cuts, load_state
from sparkml_dist.ps.worker import WorkerJob, run_worker
from sparkml_dist.runtime.launch import _FAILURE_MARK, _USER_MARK, LaunchError, _driver_host, available_slots
from sparkml_dist.training.loader import build_loader_spec, read_all
from sparkml_dist.training.loop import lr_at
from sparkml_dist.training.models import build_model
from sparkml_dist.training.train import evaluate

log = logging.getLogger("sparkml_dist.ps.driver")  # its pre-move name: logging configs keep working
START_TIMEOUT_S = 60.0
POLL_S = 0.2
DEFAULT_ATTEMPTS = 4
FINISH_S = 60.0
"""After the last epoch, how long the driver waits for each worker's job to see "done" before cancelling it."""
DRIVER_CALL_S = 10.0
"""The driver's own calls to the shards (epoch polls) wait this long, then it checks the shard processes."""


class ParameterServerError(InfraError):
    """A server shard or a worker was lost beyond what the run can absorb."""


def kind(cfg: JobConfig) -> str:
    """The run kind of a parameter-server run: ps_async, ps_ssp2, ps_bsp (ssp with staleness 0)."""
    c = cfg.comm
    if c.pace == "async":
        return "ps_async"
    return "ps_bsp" if c.staleness == 0 else f"ps_ssp{c.staleness}"


def check(cfg: JobConfig) -> None:
    """What a parameter-server run cannot do, said before anything starts."""
    if cfg.train.mode != "data_parallel":
        raise ConfigError("comm.strategy=parameter_server trains train.mode=data_parallel only")
    if cfg.comm.compression != "none":
        raise ConfigError(
            f"comm.compression={cfg.comm.compression} does not apply to comm.strategy=parameter_server "
            "(workers push their whole gradient slice): use comm.compression=none"
        )
    if cfg.train.backward_passes_per_step != 1:
        raise ConfigError("comm.strategy=parameter_server pushes every batch: set train.backward_passes_per_step=1")
    if cfg.launch.backend != "barrier" or cfg.launch.use_gpu:
        raise ConfigError(
            "comm.strategy=parameter_server runs its workers as Spark tasks on CPU: use launch.backend=barrier "
            "(the default) and launch.use_gpu=false"
        )


def shard_ranges(size: int, shards: int, max_params: int) -> list[tuple[int, int]]:
    """Contiguous, disjoint [lo, hi) slices covering [0, size): ``shards`` of them, or (0) as many as
    ``max_params`` per shard needs."""
    n = shards if shards > 0 else max(1, math.ceil(size / max_params))
    n = min(n, max(1, size))
    bounds = [size * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def plan_shards(size: int, comm: CommConfig) -> list[tuple[int, int]]:
    """``shard_ranges`` of the config, saying so when comm.ps_shards asks for more shards than there are
    parameters (each shard holds at least one, so fewer are started)."""
    ranges = shard_ranges(size, comm.ps_shards, comm.ps_shard_max_params)
    if comm.ps_shards > len(ranges):
        log.warning(
            "comm.ps_shards=%d asks for more server shards than the model has parameters (%d): starting %d shards "
            "of one parameter each; set comm.ps_shards to at most %d (or 0: sized by comm.ps_shard_max_params)",
            comm.ps_shards, size, len(ranges), size,
        )  # fmt: skip
    return ranges


@dataclass
class _Server:
    index: int
    proc: subprocess.Popen
    endpoint: Endpoint


@dataclass
class _Workers:
    """The worker jobs' shared state: results, attempts, the first fatal error."""

    attempts: Counter = field(default_factory=Counter)
    results: dict[int, dict[str, float]] = field(default_factory=dict)
    fatal: BaseException | None = None
    lost: list[str] = field(default_factory=list)
    stopping: bool = False
    """The driver is ending the run (done, or failed): a cancelled worker job is not submitted again."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def train(
    spark: SparkSession, cfg: JobConfig, manifest: Manifest, run: tracking.RunHandle, checkpoint_url: str, steps: int
) -> dict[str, Any]:
    """Train on ``manifest.num_shards`` workers through the parameter server; the result as rank 0 returns it."""
    check(cfg)
    tc, comm = cfg.train, cfg.comm
    workers = manifest.num_shards
    slots = available_slots(spark)
    if slots < workers:  # workers at a staleness bound would wait for one that never gets a slot
        raise LaunchError(
            f"the parameter server's {workers} workers (one per shard) must all run at once, but the cluster has "
            f"{slots} task slots ({spark.sparkContext.master}): add executors/cores or partition into fewer shards"
        )
    torch.manual_seed(tc.seed)  # the same initial weights as a data-parallel run
    model = build_model(tc, manifest.num_features, manifest.num_classes, manifest.sparse is not None)
    params = list(model.parameters())
    flat = flatten(params).numpy()
    ranges = plan_shards(flat.size, comm)
    host = _driver_host(spark)
    secret = secrets.token_hex(16)
    resume = _resumable(checkpoint_url, ranges)
    history = _load_history(checkpoint_url)[: resume.epochs_done] if resume else []
    servers: list[_Server] = []
    state = _Workers()
    groups: dict[int, str] = {}
    threads: list[threading.Thread] = []
    sc = spark.sparkContext
    try:
        for i, (lo, hi) in enumerate(ranges):
            spec = ShardSpec(i, lo, hi, flat[lo:hi].copy(), tc, workers, steps, tc.epochs, comm.pace, comm.staleness,
                             secret, host, checkpoint_url, comm.ps_checkpoint_s, comm.ps_timeout_s, resume is not None,
                             resume.cut if resume else -1)  # fmt: skip
            servers.append(_start_server(spec))
        endpoints = [s.endpoint for s in servers]
        log.info(
            "parameter server: %d shard(s) at %s, %d workers, pace %s%s",
            len(servers), ", ".join(e.address for e in endpoints), workers, comm.pace,
            f" (staleness {comm.staleness})" if comm.pace == "ssp" else "",
        )  # fmt: skip
        job = WorkerJob(tc, cfg.launch, manifest, endpoints, secret, comm.ps_timeout_s, workers, steps, comm)
        attempts = cfg.launch.max_attempts or DEFAULT_ATTEMPTS
        threads += [
            threading.Thread(
                target=_guarded_worker_job,
                args=(sc, job, wid, attempts, state, groups, _whereis(job)),
                daemon=True,
                name=f"ps-worker-{wid}",
            )  # fmt: skip
            for wid in range(workers)
        ]
        for t in threads:
            t.start()
        with PSClient(endpoints, secret, DRIVER_CALL_S) as client:
            start_epoch = len(history)
            cuts = _Cuts(resume.cut + 1 if resume else 0, comm.ps_checkpoint_s)
            history = _follow_epochs(
                cfg, manifest, run, client, servers, state, model, history, checkpoint_url, steps, cuts
            )
            for t in threads:  # the workers see "done" on their next push or pull; a stopped one is cancelled
                t.join(timeout=min(comm.ps_timeout_s, FINISH_S))
            stalled = _name_stalled(client, threads, steps * tc.epochs * workers, min(comm.ps_timeout_s, FINISH_S))
            state_dict = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        traffic = {**_traffic_summary(state), "stalled": stalled}
        tracking.log_dict(run, traffic, "ps/workers.json", best_effort=True)
        if history:  # in the job's summary (the last epoch's figures) and the run's metrics
            history[-1]["stalled_workers"] = float(len(stalled))
            tracking.log_metrics(run, {"stalled_workers": float(len(stalled))}, step=len(history))
        return {
            "state_dict": state_dict,
            "history": history,
            "start_epoch": start_epoch,
            "steps_per_epoch": steps,
        }
    finally:
        with state.lock:
            state.stopping = True
        for group in list(groups.values()):
            sc.cancelJobGroup(group)
        for t in threads:
            t.join(timeout=60)
        _stop_servers(servers, secret, comm.ps_timeout_s)


def _name_stalled(
    client: PSClient, threads: list[threading.Thread], total: int, waited_s: float
) -> dict[str, dict[str, Any]]:
    """Workers whose job had not ended ``waited_s`` after the last epoch (a running worker ends on its next pull
    or push once the servers are done): stopped or stalled, e.g. SIGSTOPped for the whole run while the others
    made every push under async. Each is named in a warning with its host and the pushes it made."""
    stuck = [int(t.name.rsplit("-", 1)[1]) for t in threads if t.is_alive()]
    if not stuck:
        return {}
    try:
        status = client.call({"op": "status"})[0][0]
        clocks, hosts = status["clocks"], status["hosts"]
    except (ServerUnreachableError, RefusedError):
        clocks, hosts = {}, {}
    out = {}
    for wid in stuck:
        pushes = int(clocks[wid]) if wid < len(clocks) else -1
        host = hosts.get(str(wid), "a host it never said hello from")
        out[str(wid)] = {"host": host, "pushes": pushes}
        log.warning(
            "parameter-server worker %d on %s was stopped or stalled: it made %s of the run's %d pushes and had not "
            "ended %.0f s after the last epoch (the other workers made the rest); its job is cancelled. Check that "
            "host (a stopped process, load, swap)",
            wid, host, pushes if pushes >= 0 else "an unknown number", total, waited_s,
        )  # fmt: skip
    return out


def _start_server(spec: ShardSpec) -> _Server:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkml_dist.ps.server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.close()
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("READY "):
        proc.kill()
        raise ParameterServerError(
            f"parameter server shard {spec.index} did not start within {START_TIMEOUT_S:g} s on {spec.host} "
            f"(exit code {proc.poll()}); see its messages above"
        )
    port = int(line.split()[1])
    return _Server(spec.index, proc, Endpoint(spec.index, f"tcp://{spec.host}:{port}", spec.lo, spec.hi))


def _stop_servers(servers: list[_Server], secret: str, timeout_s: float) -> None:
    if not servers:
        return
    live = [s for s in servers if s.proc.poll() is None]
    if live:
        try:
            with PSClient([s.endpoint for s in live], secret, min(timeout_s, 30.0)) as client:
                client.call({"op": "stop"})
        except (InfraError, UserError) as exc:
            log.warning("parameter server shards did not stop cleanly (%s); killing them", exc)
    for s in servers:
        try:
            s.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait(timeout=10)


def _whereis(job: WorkerJob) -> Callable[[int], str]:
    """worker id -> the host it said hello from (the servers know; a loss message names it)."""

    def host(wid: int) -> str:
        try:
            with PSClient(job.endpoints[:1], job.secret, 5.0) as client:
                return str(
                    client.call({"op": "status"})[0][0]["hosts"].get(str(wid), "a host it never said hello from")
                )
        except (InfraError, UserError):
            return "an unknown host (the servers did not answer)"

    return host


def _guarded_worker_job(*args: Any) -> None:
    """``_worker_job``, and any error of its own (not the worker's) ends the run instead of a silent thread."""
    state: _Workers = args[4]
    try:
        _worker_job(*args)
    except BaseException as exc:
        with state.lock:
            state.fatal = state.fatal or ParameterServerError(f"the driver's worker thread failed: {exc!r}")


def _worker_job(
    sc: Any,
    job: WorkerJob,
    wid: int,
    attempts: int,
    state: _Workers,
    groups: dict[int, str],
    whereis: Callable[[int], str],
) -> None:
    """Run worker ``wid`` as its own Spark job; submit it again when its task is lost."""
    for attempt in range(attempts):
        group = f"sparkml-dist-ps-{uuid.uuid4().hex[:8]}-w{wid}-a{attempt}"
        with state.lock:
            if state.stopping:
                return
            groups[wid] = group
        sc.setJobGroup(group, f"parameter-server worker {wid} (attempt {attempt})", interruptOnCancel=True)
        task = _make_task(job, wid, attempt)
        try:
            out = sc.parallelize([wid], 1).mapPartitions(task).collect()
            with state.lock:
                state.results[wid] = out[0]
                state.attempts[wid] = attempt
            return
        except BaseException as exc:  # Py4J/Spark errors: sorted by the marks our task put in the text
            text = str(exc)
            with state.lock:
                if state.stopping:
                    return
                state.attempts[wid] = attempt
                if _USER_MARK in text or state.fatal is not None:
                    state.fatal = state.fatal or UserError(_first_lines(text))
                    return
                where = f"on {whereis(wid)}: {_first_lines(text)}"
                state.lost.append(f"worker {wid} attempt {attempt} {where}")
            if attempt + 1 >= attempts:
                with state.lock:
                    state.fatal = state.fatal or ParameterServerError(
                        f"parameter-server worker {wid} failed {attempts} time(s) (launch.max_attempts); last: {where}"
                    )
                return
            log.warning("parameter-server worker %d lost (attempt %d) %s; submitting it again", wid, attempt, where)
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)


def _first_lines(text: str) -> str:
    at = text.find(_FAILURE_MARK)
    body = text[at + len(_FAILURE_MARK) + 2 :] if at >= 0 else text
    end = body.find("\n\tat org.apache.spark")
    body = body[:end] if end > 0 else body
    lines = [ln for ln in body.splitlines() if ln.strip()]
    return " | ".join(lines[:2] + lines[-2:]) if len(lines) > 4 else " | ".join(lines)


def _make_task(job: WorkerJob, wid: int, attempt: int) -> Any:
    def task(_: Any) -> Any:
        import traceback

        host = os.environ.get("SPARK_LOCAL_IP") or socket.gethostname()
        try:
            torch.set_num_threads(max(1, int(os.environ.get("SPARK_TASK_CPUS", "1") or 1)))
            yield run_worker(job, wid, host, attempt)
        except BaseException as exc:
            user = f"{_USER_MARK} {type(exc).__name__}: {exc}\n" if isinstance(exc, UserError) else ""
            raise RuntimeError(f"{_FAILURE_MARK}: worker {wid} on {host}\n{user}{traceback.format_exc()}") from None

    return task


def _follow_epochs(
    cfg: JobConfig,
    manifest: Manifest,
    run: tracking.RunHandle,
    client: PSClient,
    servers: list[_Server],
    state: _Workers,
    model: torch.nn.Module,
    history: list[dict[str, Any]],
    checkpoint_url: str,
    steps: int,
    cuts: _Cuts,
) -> list[dict[str, Any]]:
    """Wait for each epoch's snapshot on every shard (``steps`` pushes per worker an epoch); evaluate it with
    ``model``, log and keep it; take a consistent cut of the shards every comm.ps_checkpoint_s and after each
    epoch. Returns the full history; ``model`` holds the last epoch's parameters."""
    tc = cfg.train
    params = list(model.parameters())
    size = sum(p.numel() for p in params)
    val_x, val_y = read_all(build_loader_spec(manifest, 0, 1, tc, split="validation"))
    deadline = time.monotonic() + cfg.launch.job_timeout_s if cfg.launch.job_timeout_s > 0 else None
    hist_all: Counter = Counter()
    k = manifest.num_shards
    ring = 2 * (k - 1) / k * 4 * size
    epoch, unanswered = len(history), 0
    if epoch:
        unflatten_into(torch.from_numpy(_snapshot_from_history(checkpoint_url, size)), [p.data for p in params])
    while epoch < tc.epochs:
        with state.lock:
            fatal = state.fatal
        if fatal is not None:
            raise fatal
        _check_servers(servers, checkpoint_url, run)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"parameter-server training ran longer than launch.job_timeout_s={cfg.launch.job_timeout_s}"
            )
        if cuts.due():
            cuts.take(client)
        try:
            replies = client.call({"op": "epoch", "epoch": epoch})
        except ServerUnreachableError:
            _check_servers(servers, checkpoint_url, run)  # a dead shard says so; a busy one is asked again
            unanswered += 1
            if unanswered * DRIVER_CALL_S >= cfg.comm.ps_timeout_s:
                raise
            continue
        unanswered = 0
        if not all(r["ready"] for r, _ in replies):
            time.sleep(POLL_S)
            continue
        flat = np.concatenate([data[0] for _, data in replies])
        unflatten_into(torch.from_numpy(flat), [p.data for p in params])
        scores = summarize(evaluate(model, val_x, val_y, manifest.num_classes), manifest.num_classes)
        stats = [r["stats"] for r, _ in replies]
        first = stats[0]
        hist = Counter({int(a): int(b) for a, b in first["staleness"].items()})
        hist_all.update(hist)
        pushes = max(1, first["pushes"])
        seconds = max(1e-9, first["ended"] - first["started"])
        push_b = sum(s["push_bytes"] for s in stats) / pushes
        pull_b = sum(s["pull_bytes"] for s in stats) / max(1, first["pulls"])
        n = sum(hist.values()) or 1
        metrics = {
            "train_loss": first["loss_sum"] / max(1.0, first["rows"]),
            **{f"val_{key}": v for key, v in scores.items() if key != "rows"},
            "rows_per_s": first["rows"] / seconds,
            "epoch_s": seconds,
            "elapsed_s": sum(h["epoch_s"] for h in history) + seconds,
            "lr": lr_at(tc, k, (epoch + 1) * steps - 1, steps),  # the servers' schedule at the epoch's last step
            "comm_bytes_per_step": push_b + pull_b,
            "ps_push_bytes_per_step": push_b,
            "ps_pull_bytes_per_step": pull_b,
            "ring_bytes_per_rank_per_step": ring,
            "comm_rounds": first["pushes"] / k,  # one round = one worker's pull + push, as a ring step
            "staleness_mean": sum(a * b for a, b in hist.items()) / n,
            "staleness_max": float(max(hist, default=0)),
            "bound_wait_s": first["held_s"] / k,
            "attempt": float(max(state.attempts.values(), default=0)),
            **_per_worker(first),
        }
        history.append({"epoch": epoch + 1, **metrics})
        _save_history(checkpoint_url, history, flat)
        client.call({"op": "epoch", "epoch": epoch, "release": True})
        tracking.log_metrics(run, metrics, step=epoch + 1)
        counts = {str(a): b for a, b in sorted(hist.items())}
        tracking.log_dict(
            run,
            {"epoch": epoch + 1, "staleness_histogram": counts},
            f"ps/staleness/epoch-{epoch + 1:04d}.json",
            best_effort=True,
        )
        epoch += 1
        if epoch < tc.epochs:
            cuts.take(client)  # the epoch's end, kept: a rerun after a loss resumes from at least here
    tracking.log_dict(
        run,
        {"staleness_histogram": {str(a): b for a, b in sorted(hist_all.items())}},
        "ps/staleness.json",
        best_effort=True,
    )
    return history


def _per_worker(stats: dict[str, Any]) -> dict[str, float]:
    """Each worker's staleness (mean, max) and seconds held at the bound: a straggler shows as low staleness
    and the others as waiting on it."""
    out = {}
    for w, counts in stats["by_worker"].items():
        hist = {int(a): b for a, b in counts.items()}
        n = sum(hist.values()) or 1
        out[f"staleness_mean/worker{w}"] = sum(a * b for a, b in hist.items()) / n
        out[f"staleness_max/worker{w}"] = float(max(hist, default=0))
    for w, held in stats["held_by_worker"].items():
        out[f"bound_wait_s/worker{w}"] = float(held)
    return out


def _check_servers(servers: list[_Server], checkpoint_url: str, run: tracking.RunHandle) -> None:
    for s in servers:
        if s.proc.poll() is not None:
            raise ParameterServerError(
                f"parameter server shard {s.index} at {s.endpoint.address} exited with code {s.proc.returncode}; "
                f"the shards' last consistent cut is in {checkpoint_url.rstrip('/')}/ps: run the same command "
                f"again with train.resume_run_id={run.run_id} (or the same tracking.run_key) to resume every shard "
                "from there"
            )


@dataclass
class _Cuts:
    """The driver's side of the shards' consistent cuts (``server`` module docstring): freeze every shard, set
    the target at each worker's highest clock, and every shard writes the same pushes' state."""

    next_id: int
    every_s: float
    last: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def take(self, client: PSClient) -> bool:
        """One cut; False (the previous cut stands) when a shard could not complete it."""
        cut, self.next_id, self.last = self.next_id, self.next_id + 1, time.monotonic()
        try:
            frozen = client.call({"op": "freeze", "cut": cut})
            target = [max(clocks) for clocks in zip(*(r["clocks"] for r, _ in frozen), strict=True)]
            client.call({"op": "cut", "cut": cut, "target": target})
        except (ServerUnreachableError, RefusedError) as exc:
            log.info("parameter-server cut %d not taken (%s); the previous one stands", cut, exc)
            return False
        log.debug("parameter-server cut %d written at clocks %s", cut, target)
        return True


@dataclass(frozen=True)
class _ResumeCut:
    cut: int
    applied: int
    epochs_done: int


def _resumable(checkpoint_url: str, ranges: list[tuple[int, int]]) -> _ResumeCut | None:
    """The newest consistent cut that every shard of this layout wrote (a rerun of a lost run), checked: each
    file holds its shard's slice and all hold the same clocks, i.e. the same pushes. None: nothing to resume."""
    where = f"{checkpoint_url.rstrip('/')}/ps"
    cuts = [set(list_cuts(checkpoint_url, i)) for i in range(len(ranges) + 1)]  # one more: a layout that shrank
    if not any(cuts):
        if load_state(f"{where}/shard-000.pt") is not None:
            raise ConfigError(
                f"{where} holds parameter-server checkpoints written before consistent cuts (each shard saved on its "
                "own, so their slices may hold different pushes): they cannot be resumed; start a new run"
            )
        return None
    if cuts[-1]:
        raise ConfigError(
            f"{where} holds cuts of more than this run's {len(ranges)} shards: resume with the same comm.ps_shards "
            "and comm.ps_shard_max_params, or start a new run"
        )
    common = set.intersection(*cuts[:-1])
    if not common:
        have = "; ".join(f"shard {i}: {sorted(c) or 'none'}" for i, c in enumerate(cuts[:-1]))
        raise ConfigError(
            f"{where}: the parameter-server shards share no consistent cut ({have}), so no point holds every slice "
            "at the same pushes and the run cannot be resumed; start a new run"
        )
    cut = max(common)
    states = [load_state(cut_path(checkpoint_url, i, cut)) for i in range(len(ranges))]
    for i, (state, (lo, hi)) in enumerate(zip(states, ranges, strict=True)):
        if state is None or (state["lo"], state["hi"]) != (lo, hi):
            raise ConfigError(
                f"{cut_path(checkpoint_url, i, cut)} does not hold slice [{lo}, {hi}) of this run's shards: resume "
                "with the same comm.ps_shards and comm.ps_shard_max_params, or start a new run"
            )
    found = [(list(st["clocks"]), int(st["applied"])) for st in states if st is not None]
    if any(f != found[0] for f in found):
        shown = "; ".join(f"shard {i}: clocks {c}, {a} pushes" for i, (c, a) in enumerate(found))
        raise ConfigError(
            f"{where}: cut {cut} does not hold the same pushes on every shard ({shown}): resuming would join slices "
            "from different times; start a new run"
        )
    epochs_done = min(int(st["epochs_done"]) for st in states if st is not None)
    log.info("resuming every parameter-server shard from cut %d (%d pushes applied)", cut, found[0][1])
    return _ResumeCut(cut, found[0][1], epochs_done)


def _history_url(checkpoint_url: str) -> str:
    return f"{checkpoint_url.rstrip('/')}/ps/history.pt"


def _save_history(checkpoint_url: str, history: list[dict[str, Any]], flat: np.ndarray) -> None:
    from sparkml_dist.ps.server import save_state

    save_state(_history_url(checkpoint_url), {"history": history, "params": flat.copy()})


def _load_history(checkpoint_url: str) -> list[dict[str, Any]]:
    state = load_state(_history_url(checkpoint_url))
    return list(state["history"]) if state else []


def _snapshot_from_history(checkpoint_url: str, size: int) -> np.ndarray:
    state = load_state(_history_url(checkpoint_url))
    assert state is not None and state["params"].size == size
    return np.asarray(state["params"])


def _traffic_summary(state: _Workers) -> dict[str, Any]:
    return {
        "workers": {str(w): r for w, r in sorted(state.results.items())},
        "attempts": {str(w): a for w, a in sorted(state.attempts.items())},
        "lost": state.lost,
    }
