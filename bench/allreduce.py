"""Small-message allreduce latency on 2 ranks of our barrier launch: Horovod (with its knobs) vs bare gloo.

    .venv/bin/python bench/allreduce.py [--budget-s 0.25] [--rounds 2] [--configs default,cycle_5ms,...]
                                        [--max-mb 0]

Every configuration is one ``launch.run_on_ranks`` stage on local[2] Spark, the path training takes; its
HOROVOD_* knobs reach the ranks through the Python workers' environment (``SparkContext.environment``, set
before the stage; ``_run_rank`` adds the rendezvous variables on top), so each one starts fresh
Python workers and a fresh ``hvd.init``. Inside a stage, rank 0's milliseconds per call (warm-up
excluded) of:

- ``hvd_sync``: ``hvd.allreduce`` of 33, 1k, 64k and 1M floats (a sync call, the background thread's
  cycle included);
- ``gloo``: ``torch.distributed.all_reduce`` (backend gloo, tcp://127.0.0.1) of the same bytes between the
  same two processes: the floor, measured while Horovod's background thread runs beside it;
- ``variants_33``: ``hvd_async_sync`` (``allreduce_async_`` of a 32- and a 1-float tensor, then
  ``synchronize`` both: what DistributedOptimizer does for a logistic model), ``hvd_async_poll``
  (the same, waiting with ``hvd.poll`` and a short sleep instead of Horovod's yield loop), ``hvd_grouped``
  (``grouped_allreduce`` of the 32 + 1 floats: one negotiation) and ``gloo_two_tensors``;
- ``step``: one optimizer step of the 33-parameter logistic model (32 features, batch 1024, Adam; forward,
  backward, step): ``compute_only`` (no communication), ``hvd_optimizer`` (``hvd.DistributedOptimizer``,
  as ``train.train_rank`` builds it), ``hvd_optimizer_groups1`` (``groups=1``: one grouped allreduce)
  and ``gloo_bypass`` (gradients flattened into one tensor, ``torch.distributed.all_reduce``, divided by
  the world size, copied back, then ``step``);
- ``idle_cpu_s_per_s``: CPU seconds per second a rank burns while its Python thread sleeps.

Each figure is {median, p10, p90, n}; n comes from a time budget per figure (``--budget-s``) and rank 0's
estimate, broadcast so both ranks make the same calls; figures compared side by side are interleaved in
blocks so a noisy neighbour hits them alike. Every configuration runs ``--rounds`` times (odd rounds in
reverse order); ``side_by_side_*`` shows [min, max] over the rounds. ``--max-mb N`` adds the older
bandwidth sweep (1..N MB, best of 5) to the first stage. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkml_dist.config import LaunchConfig, SparkConfig  # noqa: E402
from sparkml_dist.runtime.launch import RankContext, run_on_ranks  # noqa: E402
from sparkml_dist.runtime.session import build_spark_session  # noqa: E402

SIZES = (33, 1024, 65536, 1048576)
WARMUP, CALIBRATE, BLOCKS = 20, 10, 5  # calls before timing, calls to size the loop, interleaved blocks
MIN_CALLS, MAX_CALLS = 50, 2000
FEATURES, BATCH = 32, 1024  # logistic regression on 32 features: 33 parameters
# name -> HOROVOD_* variables the ranks get on top of what launch._run_rank sets. Horovod 0.28.1 reads
# these in operations.cc (InitializeHorovodOnce / BackgroundThreadLoop): cycle time default 1 ms, fusion
# threshold default 128 MB, response cache default capacity 1024, background thread affinity unset.
CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "cycle_0ms": {"HOROVOD_CYCLE_TIME": "0"},
    "cycle_0.1ms": {"HOROVOD_CYCLE_TIME": "0.1"},
    "cycle_0.2ms": {"HOROVOD_CYCLE_TIME": "0.2"},
    "cycle_0.5ms": {"HOROVOD_CYCLE_TIME": "0.5"},
    "cycle_5ms": {"HOROVOD_CYCLE_TIME": "5"},
    "cycle_20ms": {"HOROVOD_CYCLE_TIME": "20"},
    "fusion_0": {"HOROVOD_FUSION_THRESHOLD": "0"},
    "fusion_64mb": {"HOROVOD_FUSION_THRESHOLD": str(64 * 1024 * 1024)},
    "cache_0": {"HOROVOD_CACHE_CAPACITY": "0"},
    "affinity": {"HOROVOD_THREAD_AFFINITY": "0,1"},
}
DEFAULT_CONFIGS = "default,cycle_0.1ms,cycle_0.5ms,cycle_5ms,cycle_20ms,fusion_0,cache_0"


def _summary(samples: list[float]) -> dict[str, float | int]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    p10 = ordered[int(0.1 * len(ordered))]
    return {
        "median": round(statistics.median(ordered) * 1e3, 4),
        "p10": round(p10 * 1e3, 4),
        "p90": round(p90 * 1e3, 4),
        "n": len(ordered),
    }


def _time(fns: dict[str, Callable[[], Any]], budget_s: float, dist: Any, torch: Any) -> dict[str, Any]:
    """Per-call seconds of each of ``fns``, interleaved in blocks so that a noisy neighbour hits them alike.

    Each function is warmed up (first negotiations, buffers), its per-call time estimated on rank 0 from
    further calls, and its call count sized to ``budget_s``; rank 0's counts are broadcast so both ranks
    make the same collective calls. Ranks meet at a barrier before each block.
    """
    est = []
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
        t0 = time.perf_counter()
        for _ in range(CALIBRATE):
            fn()
        est.append((time.perf_counter() - t0) / CALIBRATE)
    counts = torch.tensor([max(MIN_CALLS, min(MAX_CALLS, int(budget_s / max(e, 1e-6)))) for e in est])
    dist.broadcast(counts, src=0)
    per_block = [max(1, int(c) // BLOCKS) for c in counts]
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(BLOCKS):
        for (name, fn), n in zip(fns.items(), per_block, strict=True):
            dist.barrier()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: _summary(s) for name, s in samples.items()}


def _idle_cpu(dist: Any, seconds: float = 1.0) -> float:
    """CPU seconds this rank's process burns per second while its Python thread sleeps: Horovod's background
    thread runs a coordination allreduce every cycle even with nothing queued."""
    dist.barrier()
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    time.sleep(seconds)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall, 3)


def _steps(hvd: Any, dist: Any, torch: Any, budget_s: float, world: int) -> dict[str, Any]:
    """One optimizer step of the 33-parameter logistic model, with each way of averaging its gradient."""
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(BATCH, FEATURES)
    y = (x[:, 0] > 0).float()

    def build(kind: str) -> Callable[[], None]:
        model = nn.Linear(FEATURES, 1)
        opt: Any = torch.optim.Adam(model.parameters(), lr=1e-3)
        if kind == "hvd_optimizer":  # as train.train_rank builds it
            opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average)
        elif kind == "hvd_optimizer_groups1":
            opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), op=hvd.Average, groups=1)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        params = list(model.parameters())

        def step() -> None:
            loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
            loss.backward()
            if kind == "gloo_bypass":
                grads = [p.grad for p in params if p.grad is not None]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat)
                flat.div_(world)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            opt.step()
            opt.zero_grad()

        return step

    kinds = ("compute_only", "hvd_optimizer", "hvd_optimizer_groups1", "gloo_bypass")
    return _time({kind: build(kind) for kind in kinds}, budget_s, dist, torch)


def measure(ctx: RankContext, *, budget_s: float, bandwidth_mb: list[int]) -> dict[str, Any]:
    entered = time.time()
    import horovod.torch as hvd
    import torch
    import torch.distributed as dist

    if ctx.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = 0
    port = hvd.broadcast_object(port, root_rank=0, name="port")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=ctx.rank, world_size=ctx.world_size)
    knobs = {n for c in CONFIGS.values() for n in c}
    result: dict[str, Any] = {"env_seen_by_rank": {k: v for k, v in os.environ.items() if k in knobs}}
    try:
        result["idle_cpu_s_per_s"] = _idle_cpu(dist)
        by_size = {}
        for n in SIZES:
            t = torch.ones(n, dtype=torch.float32)
            by_size[str(n)] = _time(
                {
                    "hvd_sync": partial(hvd.allreduce, t, op=hvd.Sum, name=f"s{n}"),
                    "gloo": partial(dist.all_reduce, t),
                },
                budget_s,
                dist,
                torch,
            )
        result["hvd_sync"] = {n: r["hvd_sync"] for n, r in by_size.items()}
        result["gloo"] = {n: r["gloo"] for n, r in by_size.items()}
        w, b = torch.ones(32), torch.ones(1)

        def async_sync() -> None:
            handles = [hvd.allreduce_async_(w, name="w"), hvd.allreduce_async_(b, name="b")]
            for h in handles:
                hvd.synchronize(h)

        def async_poll() -> None:
            handles = [hvd.allreduce_async_(w, name="w"), hvd.allreduce_async_(b, name="b")]
            for h in handles:
                while not hvd.poll(h):
                    time.sleep(20e-6)  # give the core to the background thread instead of Horovod's yield loop
                hvd.synchronize(h)

        def gloo_two() -> None:
            dist.all_reduce(w)
            dist.all_reduce(b)

        result["variants_33"] = _time(
            {
                "hvd_async_sync": async_sync,
                "hvd_async_poll": async_poll,
                "hvd_grouped": partial(hvd.grouped_allreduce, [w, b], name="wb"),
                "gloo_two_tensors": gloo_two,
            },
            budget_s,
            dist,
            torch,
        )
        result["step"] = _steps(hvd, dist, torch, budget_s, ctx.world_size)
        if bandwidth_mb:
            result["bandwidth"] = _bandwidth(hvd, dist, torch, bandwidth_mb, ctx.world_size)
    finally:
        dist.destroy_process_group()
    result["rank_entered_unix"] = entered
    result["measure_s"] = round(time.time() - entered, 1)
    return result


def _bandwidth(hvd: Any, dist: Any, torch: Any, sizes_mb: list[int], k: int) -> list[dict[str, float]]:
    """The older sweep: best of 5 per size, bus bandwidth = algbw x 2(K-1)/K."""

    def best(fn: Callable[[], Any]) -> float:
        fn()
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    rows = []
    for mb in sizes_mb:
        t = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
        nbytes = t.numel() * 4
        hv = best(partial(hvd.allreduce, t, op=hvd.Sum, name=f"a{mb}"))
        td = best(partial(dist.all_reduce, t))
        mc = best(t.clone)
        rows.append(
            {
                "mb": mb,
                "horovod_s": round(hv, 5),
                "horovod_busbw_gb_s": round(nbytes / hv / 1e9 * 2 * (k - 1) / k, 3),
                "torch_gloo_s": round(td, 5),
                "torch_gloo_busbw_gb_s": round(nbytes / td / 1e9 * 2 * (k - 1) / k, 3),
                "memcpy_s": round(mc, 5),
                "memcpy_gb_s": round(nbytes / mc / 1e9, 3),
            }
        )
    return rows


def _run_config(spark: Any, env: dict[str, str], fn: Callable[[RankContext], dict[str, Any]]) -> dict[str, Any]:
    """One barrier stage whose Python workers (a fresh daemon per distinct environment) carry ``env``."""
    sc = spark.sparkContext
    saved = dict(sc.environment)
    sc.environment.update(env)
    try:
        t0 = time.time()
        out = run_on_ranks(spark, fn, 2, LaunchConfig(start_timeout_s=120, collective_timeout_s=120), "bench: rank")
        out["stage_s"] = round(time.time() - t0, 1)
        out["start_s"] = round(out.pop("rank_entered_unix") - t0, 1)  # launch, worker start, hvd.init
        return out
    finally:
        sc.environment.clear()
        sc.environment.update(saved)


def _columns() -> dict[str, tuple[str, ...]]:
    """Side-by-side column -> path of a median in one round's result."""
    cols: dict[str, tuple[str, ...]] = {}
    for n, label in zip(SIZES, ("33", "1k", "64k", "1m"), strict=True):
        cols[f"hvd_{label}"] = ("hvd_sync", str(n), "median")
        cols[f"gloo_{label}"] = ("gloo", str(n), "median")
    for key in ("hvd_async_sync", "hvd_async_poll", "hvd_grouped", "gloo_two_tensors"):
        cols[f"{key}_33"] = ("variants_33", key, "median")
    for key in ("compute_only", "hvd_optimizer", "hvd_optimizer_groups1", "gloo_bypass"):
        cols[f"step_{key}"] = ("step", key, "median")
    return cols


def _at(r: Any, path: tuple[str, ...]) -> float:
    for key in path:
        r = r[key]
    return float(r)


def _side_by_side(runs: dict[str, list[dict[str, Any]]], stat: str) -> list[dict[str, Any]]:
    """One row per configuration: ``stat`` (median or p10) of each figure, as [min, max] over the rounds;
    ``*_comm`` columns are a step minus the compute-only step of the same round (the communication)."""

    def spread(values: list[float]) -> list[float] | float:
        values = sorted(round(v, 3) for v in values)
        return values[0] if len(values) == 1 else [values[0], values[-1]]

    rows = []
    for name, rounds in runs.items():
        row: dict[str, Any] = {"config": name}
        row["idle_cpu_s_per_s"] = spread([r["idle_cpu_s_per_s"] for r in rounds])
        for col, path in _columns().items():
            row[col] = spread([_at(r, path[:-1] + (stat,)) for r in rounds])
        for key in ("hvd_optimizer", "hvd_optimizer_groups1", "gloo_bypass"):
            row[f"step_{key}_comm"] = spread([r["step"][key][stat] - r["step"]["compute_only"][stat] for r in rounds])
        rows.append(row)
    return rows


def _best_step(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The (config, way of averaging) whose optimizer step has the lowest median, taking each pair's worst
    round (a noisy round should not crown a config)."""
    worst = {
        (name, kind): max(r["step"][kind]["median"] for r in rounds)
        for name, rounds in runs.items()
        for kind in ("hvd_optimizer", "hvd_optimizer_groups1", "gloo_bypass")
    }
    (name, kind), ms = min(worst.items(), key=lambda item: item[1])
    return {"config": name, "env": CONFIGS[name], "kind": kind, "step_ms_worst_round_median": round(ms, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=0.25, help="seconds of timed calls per figure")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=2, help="run every config this often (reversed order)")
    parser.add_argument("--max-mb", type=int, default=0, help="also the 1..N MB bandwidth sweep (first config)")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    bandwidth = [s for s in (1, 4, 16, 64, 256) if s <= args.max_mb]
    spark = build_spark_session(
        SparkConfig(
            log_level="ERROR",
            conf={
                "spark.ui.enabled": "false",
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.python.worker.memory": "2g",
            },
        )
    )
    started, load_before = time.perf_counter(), os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    order = [n for r in range(args.rounds) for n in (names if r % 2 == 0 else names[::-1])]
    try:
        for i, name in enumerate(order):
            sweep = bandwidth if i == 0 else []
            fn = partial(measure, budget_s=args.budget_s, bandwidth_mb=sweep)
            runs[name].append(_run_config(spark, CONFIGS[name], fn))
    finally:
        spark.stop()
    print(
        json.dumps(
            {
                "benchmark": "allreduce_small",
                "ranks": 2,
                "launcher": "launch.run_on_ranks (barrier stage, local[2])",
                "transport": "loopback (one machine)",
                "cpus": os.cpu_count(),
                "unit": "ms per call, rank 0",
                "floats": list(SIZES),
                "model": f"logistic regression, {FEATURES} features + bias, batch {BATCH}, Adam",
                "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "wall_s": round(time.perf_counter() - started, 1),
                "side_by_side_medians": _side_by_side(runs, "median"),
                "side_by_side_p10": _side_by_side(runs, "p10"),
                "best_step": _best_step(runs),
                "rounds": args.rounds,
                "order": order,
                "configs": {name: {"env": CONFIGS[name], "rounds": r} for name, r in runs.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
