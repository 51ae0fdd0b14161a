"""Horovod allreduce between 2 ranks started by our barrier launcher, beside memcpy and torch.distributed.

    .venv/bin/python bench/allreduce.py [--max-mb 256] [--reps 5]

For each size: seconds per allreduce, algorithm bandwidth (bytes / s) and bus bandwidth
(algbw x 2(K-1)/K, what each link carries in a ring), beside a plain memcpy (tensor clone) of the same
bytes and torch.distributed's gloo allreduce between the same two ranks, in the same run. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkml_dist.config import LaunchConfig, SparkConfig  # noqa: E402
from sparkml_dist.launch import run_on_ranks  # noqa: E402
from sparkml_dist.session import build_spark_session  # noqa: E402


def _timed(fn, reps: int) -> float:
    fn()
    fn()  # warm-up: buffers, connections
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(ctx, sizes_mb: list[int], reps: int) -> list[dict]:
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
    k = ctx.world_size
    rows = []
    try:
        for mb in sizes_mb:
            t = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
            nbytes = t.numel() * 4
            hv = _timed(lambda t=t, mb=mb: hvd.allreduce(t, op=hvd.Sum, name=f"a{mb}"), reps)
            td = _timed(lambda t=t: dist.all_reduce(t), reps)
            mc = _timed(lambda t=t: t.clone(), reps)
            rows.append(
                {
                    "mb": mb,
                    "horovod_s": round(hv, 5),
                    "horovod_algbw_gb_s": round(nbytes / hv / 1e9, 3),
                    "horovod_busbw_gb_s": round(nbytes / hv / 1e9 * 2 * (k - 1) / k, 3),
                    "torch_gloo_s": round(td, 5),
                    "torch_gloo_busbw_gb_s": round(nbytes / td / 1e9 * 2 * (k - 1) / k, 3),
                    "memcpy_s": round(mc, 5),
                    "memcpy_gb_s": round(nbytes / mc / 1e9, 3),
                }
            )
    finally:
        dist.destroy_process_group()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-mb", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    sizes = [s for s in (1, 4, 16, 64, 256) if s <= args.max_mb]
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
    try:
        rows = run_on_ranks(
            spark,
            lambda ctx: measure(ctx, sizes, args.reps),
            2,
            LaunchConfig(start_timeout_s=120, collective_timeout_s=600),
            "bench: allreduce",
        )
    finally:
        spark.stop()
    print(json.dumps({"benchmark": "allreduce", "ranks": 2, "transport": "loopback (one machine)", "sizes": rows}))


if __name__ == "__main__":
    main()
