"""Feature-parallel vs data-parallel training of one wide linear model on the same data; prints JSON.

.venv/bin/python bench/feature_parallel.py                     # 20k features, 4k rows, logistic, 2 ranks each way
.venv/bin/python bench/feature_parallel.py --classes 100        # softmax: a 20k x 100 weight matrix
.venv/bin/python bench/feature_parallel.py --regression         # linear regression (least squares)
.venv/bin/python bench/feature_parallel.py --features 5000 --rows 20000

The data (a known logistic, softmax or linear model, written with pyarrow) is partitioned once into 2
sample shards and 2 feature groups. Then each mode trains in its own child process with a fresh local[2]
Spark (fresh Python workers, so one mode's memory does not show up in the other's):
``train.mode=feature_parallel`` (rank r: feature group r of every row, weight block r, partial outputs
allreduced) and ``data_parallel`` (rank r: all features of shard r, the whole model, gradients
allreduced). Each rank samples its own RSS every 20 ms while it trains. Reported per mode: per-rank
start/peak RSS, seconds per step (mean over the epochs after the first, as rank 0 timed them), rows/s,
and the bytes one step puts into the allreduce: batch x outputs x 4 (+ a 32-byte row-id digest) against
the full gradient, (features + 1) x outputs x 4. The per-step data-wait and allreduce seconds are rank
averages; a rank's allreduce time includes waiting for the other (rank 0 logs to MLflow between epochs),
so they can exceed rank 0's step time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

MODES = ("feature_parallel", "data_parallel")


def _sets(args: argparse.Namespace, mode: str) -> list[str]:
    work = Path(args.work)
    return [
        f"paths.work_dir={work}",
        f"data.input_url={work}/raw",
        "data.features_col=features",
        "partition.num_shards=2",
        "partition.feature_groups=2",
        "partition.row_group_mb=8",
        "partition.validation_fraction=0.05",
        f"partition.output_url={work}/partitioned",
        f"train.manifest_url={work}/partitioned",
        f"train.mode={mode}",
        f"train.model={_model(args)}",
        f"data.task={'regression' if args.regression else 'classification'}",
        f"data.num_classes={max(args.classes, 2)}",
        "train.optimizer=adam",
        "train.lr=0.01",
        f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}",
        "train.shuffle=false",
        "train.checkpoint=false",
        "tracking.log_model=false",
        "launch.start_timeout_s=120",
        "launch.collective_timeout_s=300",
        "launch.job_timeout_s=1200",
        "spark.log_level=ERROR",
        'spark.conf={"spark.ui.enabled": "false", "spark.driver.memory": "3g", '
        '"spark.driver.bindAddress": "127.0.0.1", "spark.driver.host": "127.0.0.1"}',
    ]


def _model(args: argparse.Namespace) -> str:
    return "linear" if args.regression else ("logistic" if args.classes == 2 else "softmax")


def _write_data(out: Path, args: argparse.Namespace, seed: int = 0, chunk: int = 256) -> None:
    """x ~ N(0, I), W ~ N(0, 1/features); y ~ Bernoulli(sigmoid(x.w)), a softmax draw (Gumbel-max) over
    x @ W.T for several classes, or x.w + N(0, 0.25) for regression."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, features = args.rows, args.features
    rng = np.random.default_rng(seed)
    k = 1 if args.regression or args.classes == 2 else args.classes
    w = rng.normal(0.0, 1.0 / np.sqrt(features), size=(features, k)).astype(np.float32)
    out.mkdir(parents=True)
    label = pa.float64() if args.regression else pa.int32()
    schema = pa.schema([("row_id", pa.int64()), ("features", pa.list_(pa.float32())), ("label", label)])
    with pq.ParquetWriter(out / "part-00000.parquet", schema, compression="snappy") as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            x = rng.standard_normal((n, features), dtype=np.float32)
            z = x @ w
            if args.regression:
                y = z[:, 0].astype(np.float64) + rng.normal(0.0, 0.5, size=n)
            elif k == 1:
                y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z[:, 0]))).astype(np.int32)
            else:
                y = np.argmax(z + rng.gumbel(size=z.shape), axis=1).astype(np.int32)
            flat = pa.array(x.ravel(), pa.float32())
            col = pa.ListArray.from_arrays(pa.array(np.arange(0, n * features + 1, features, dtype=np.int32)), flat)
            writer.write_table(pa.table([pa.array(np.arange(start, start + n)), col, pa.array(y)], schema=schema))


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    from sparkml_dist.config import load_config
    from sparkml_dist.data.partition import partition
    from sparkml_dist.runtime.session import build_spark_session

    started = time.monotonic()
    _write_data(Path(args.work) / "raw", args)
    written = time.monotonic() - started
    cfg = load_config(None, _sets(args, "feature_parallel"))
    spark = build_spark_session(cfg.spark)
    try:
        t0 = time.monotonic()
        result = partition(spark, cfg)
        return {"write_s": round(written, 1), "partition_s": round(time.monotonic() - t0, 1), **result.__dict__}
    finally:
        spark.stop()


def _measured(ctx: Any, fn: Any) -> dict[str, Any] | None:
    """Run a rank's training function while a thread samples this process's RSS; gather every rank's figures."""
    import horovod.torch as hvd
    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn(ctx)
    finally:
        stop.set()
        sampler.join()
    mib = 1024 * 1024
    mine = {"rank": ctx.rank, "start_rss_mb": round(start / mib, 1), "peak_rss_mb": round(peak[0] / mib, 1)}
    everyone = hvd.allgather_object(mine, name="bench.memory")
    return {"out": out, "memory": sorted(everyone, key=lambda m: m["rank"])} if ctx.rank == 0 else None


def _child(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from sparkml_dist.config import load_config
    from sparkml_dist.data.manifest import read_manifest
    from sparkml_dist.experiments import tracking
    from sparkml_dist.metrics import primary_metric
    from sparkml_dist.runtime.launch import run_on_ranks
    from sparkml_dist.runtime.session import build_spark_session
    from sparkml_dist.training import feature_parallel
    from sparkml_dist.training.loader import steps_per_epoch
    from sparkml_dist.training.models import output_width
    from sparkml_dist.training.train import TrainJob, train_rank

    cfg = load_config(None, _sets(args, mode))
    manifest = read_manifest(cfg.train.manifest_url)
    if mode == "feature_parallel":
        world = feature_parallel.check_manifest(manifest, cfg.train)
        steps = feature_parallel.steps_per_epoch(manifest, cfg.train)
    else:
        world = manifest.num_shards
        steps = steps_per_epoch(manifest, cfg.train.batch_size, world, cfg.train.max_steps_per_epoch)
    fn: Any = train_rank  # one loop; the mode comes from cfg.train.mode
    spark = build_spark_session(cfg.spark)
    try:
        run = tracking.start_run(cfg, {"mode": mode, "bench": "feature_parallel"}, kind=f"bench_{mode}")
        ckpt = f"{cfg.train.runs_url}/{run.run_id}/checkpoints"
        job = TrainJob(cfg.train, cfg.launch, manifest, run, ckpt, steps, cfg.comm)
        started = time.monotonic()
        res = run_on_ranks(spark, functools.partial(_measured, fn=functools.partial(fn, job=job)), world, cfg.launch)
        wall = time.monotonic() - started
        tracking.finish_run(run)
    finally:
        spark.stop()
    history = res["out"]["history"]
    timed = history[1:] or history  # the first epoch also pays for warm-up (imports, reader start)
    steps_run = res["out"]["steps_per_epoch"]
    step_s = sum(h["epoch_s"] for h in timed) / (len(timed) * steps_run)
    outputs = output_width(manifest.num_classes)
    val_key = f"val_{primary_metric(manifest.num_classes)}"
    return {
        "mode": mode,
        "ranks": world,
        "steps_per_epoch": steps_run,
        "rows_per_step": cfg.train.batch_size * (1 if mode == "feature_parallel" else world),
        "step_s": round(step_s, 4),
        "rows_per_s": round(sum(h["rows_per_s"] for h in timed) / len(timed), 1),
        "data_wait_s_per_step": round(sum(h["data_wait_s"] for h in timed) / (len(timed) * steps_run), 4),
        "allreduce_s_per_step": round(sum(h["comm_s"] for h in timed) / (len(timed) * steps_run), 4),
        "allreduce_bytes_per_step": history[-1]["comm_bytes_per_step"],
        "full_gradient_bytes": (manifest.num_features + 1) * outputs * 4,
        val_key: round(history[-1][val_key], 5),
        "memory": res["memory"],
        "stage_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--features", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2, help="2: logistic; more: softmax with that many classes")
    parser.add_argument("--regression", action="store_true", help="linear regression on a real-valued label")
    parser.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args, args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-fp-") as tmp:
        args.work = args.work or tmp
        report: dict[str, Any] = {
            "rows": args.rows,
            "features": args.features,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "model": _model(args),
            "classes": 0 if args.regression else args.classes,
            "cpus": os.cpu_count(),
            "data": _prepare(args),
        }
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--work", args.work]
            cmd += ["--rows", str(args.rows), "--features", str(args.features)]
            cmd += ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--classes", str(args.classes)]
            cmd += ["--regression"] if args.regression else []
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{mode} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
            report[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(report))


if __name__ == "__main__":
    main()
